"""100 invokes in one trace vs the same batch hand-hooked: batching must not copy activations per invoke.

nnsight #396: patching one position per prompt over 100 invokes took 41 GB where the hand-batched forward took
5 GB, because every invoke's edit concatenated a new copy of the whole activation. Here each of 100 invokes (one
8-token prompt each, GPT-2-small shape) changes block 6's output for its own row and saves its last-token
logits; the baseline runs the 100×8 batch once with one hook doing all 100 rows.

* ``edit``: ``net.transformer.h[6].output[:, -2, :] = patch[i]``, an in-place edit of the invoke's view (no copy
  at all);
* ``replace``: ``net.transformer.h[6].output = net.transformer.h[6].output + delta[i]``, an assignment; the
  100 new row blocks are composed into one new activation (one copy for all invokes).

A per-invoke copy of block 6's output would allocate 100 × 2.4 MB = 240 MB while block 6 runs. The memory table
shows whether that happens, next to a calibration case that makes exactly those copies (its peak rises by less
than 240 MB because without them the forward's peak comes later, at the logits). Saves are zero-copy views, so
each invoke's saved logits row keeps the whole 154 MB logits tensor alive, as the baseline's ``logits[:, -1]``
does.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from bench import common
from bench.baselines import hooked_forward
from bench.models import gpt2_small, token_ids
from nnsight_magic import NNsight

INVOKES, SEQ, BLOCK = 100, 8, 6


def inputs(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (one row per invoke) and one random 768-vector per invoke."""
    ids = token_ids(model, seq=SEQ, batch=INVOKES)
    vectors = torch.randn(INVOKES, model.config.n_embd, generator=torch.Generator().manual_seed(2))
    return ids, vectors


def traced(net: NNsight, ids: torch.Tensor, vectors: torch.Tensor, kind: str, validate: bool) -> list:
    """One invoke per row; returns every invoke's saved last-token logits (views of the model's logits)."""
    block = net.transformer.h[BLOCK]
    with net.trace(validate=validate) as tracer:
        saved = []
        for row in range(INVOKES):
            with tracer.invoke(ids[row:row + 1]):
                if kind == "edit":
                    block.output[:, -2, :] = vectors[row]
                else:
                    block.output = block.output + vectors[row]
                saved.append(net.lm_head.output[:, -1, :].save())
    return [proxy.value for proxy in saved]


def hand_batched(model: torch.nn.Module, ids: torch.Tensor, vectors: torch.Tensor, kind: str) -> list:
    """The same computation as one batch with one hook on block 6; returns each row's last-token logits.

    ``kind="copying"`` is a calibration, not a baseline: the edit of ``"edit"`` made with one new copy of the
    whole activation per row (the failure of nnsight #396), all alive until the hook returns.
    """
    def edit(_: Any, __: Any, output: torch.Tensor) -> None:
        output[:, -2, :] = vectors

    def replace(_: Any, __: Any, output: torch.Tensor) -> torch.Tensor:
        return output + vectors[:, None, :]

    def copying(_: Any, __: Any, output: torch.Tensor) -> torch.Tensor:
        copies = [output]
        for row in range(INVOKES):
            edited = copies[-1][row:row + 1].clone()
            edited[:, -2, :] = vectors[row]
            copies.append(torch.cat([copies[-1][:row], edited, copies[-1][row + 1:]]))
        return copies[-1]

    hook = {"edit": edit, "replace": replace, "copying": copying}[kind]
    logits = hooked_forward(model, [(model.transformer.h[BLOCK], hook)], ids).logits
    return list(logits[:, -1, :].split(1))  # each invoke's (1, vocabulary) row, as a view


def cases(kind: str) -> dict[str, Callable[[], Any]]:
    model = gpt2_small()
    net, (ids, vectors) = NNsight(model), inputs(model)
    expected = hand_batched(model, ids, vectors, kind)
    for validate in (False, True):
        common.assert_same(f"{INVOKES} invokes ({kind}, validate={validate})", traced(net, ids, vectors, kind,
                                                                                      validate), expected)
    return {f"hand_{kind}": lambda: hand_batched(model, ids, vectors, kind),
            f"invokes_{kind}_off": lambda: traced(net, ids, vectors, kind, False),
            f"invokes_{kind}_on": lambda: traced(net, ids, vectors, kind, True)}


DESCRIPTIONS = {
    "hand_edit": "one 100×8 forward, one hook edits row i at position −2",
    "hand_copying": "calibration: the same edit, one copy of the activation per row (the #396 failure)",
    "invokes_edit_off": "100 invokes, each edits its view in place, validate=False",
    "invokes_edit_on": "the same, validate=True",
    "hand_replace": "one 100×8 forward, one hook returns output + delta",
    "invokes_replace_off": "100 invokes, each assigns output + delta[i], validate=False",
    "invokes_replace_on": "the same, validate=True",
}


def main() -> None:
    print(f"## {INVOKES} invokes vs a hand-batched forward (GPT-2-small shape, {SEQ} tokens per invoke)\n")
    print("### Memory (one subprocess per case; kept: every invoke's saved logits row)\n")
    print(common.memory_table("bench.bench_invokes", DESCRIPTIONS), "\n")
    print("### Time\n")
    for kind in ("edit", "replace"):
        timings = common.interleave(cases(kind), rounds=common.rounds(12), warmup=1, clock=common.timer())
        baseline = f"hand_{kind}"
        print(common.table(timings, {name: baseline for name in timings if name != baseline}, DESCRIPTIONS), "\n")
    print("Before timing, every traced case was checked to save exactly the hand-batched logits; the memory cases "
          "run the same functions.\n")


def memory_setup(case: str) -> Callable[[], Any]:
    model = gpt2_small()
    net, (ids, vectors) = NNsight(model), inputs(model)
    source, kind, *mode = case.split("_")
    if source == "hand":
        return lambda: hand_batched(model, ids, vectors, kind)
    return lambda: traced(net, ids, vectors, kind, mode == ["on"])


if __name__ == "__main__":
    common.entry_point(main, memory_setup)
