"""What shapes before running cost: a trace at a never-seen prompt length, at a cached one, and a model's first trace.

``python bench/run.py shapes`` prints one timing group per model (the GPT-2-small shape, and SmolLM2-135M from
``load_embedded_model()`` when its package is installed) and a table of targets:

* **bare**: the forward pass alone (``torch.no_grad()``), seq 32;
* **cached**: a trace that saves block 6's output and the logits, at a length whose scan is cached;
* **never_seen**: the same trace at a length this wrapper has never traced: its per-shape cache is emptied before
  each call, so the shapes come from the model's symbolic scan by substitution (what every new prompt length of a
  ``LanguageModel`` costs once the model has seen two lengths);
* **cold**: the same trace on a new ``LanguageModel`` wrapper each call: no scan of any kind cached, so the call
  pays the model's first scan (a concrete fake forward of a fake twin) before the real run.

The one-time symbolic scan (a model's second prompt shape) is timed on its own, a few times, and reported apart.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from bench import common
from bench.models import gpt2_small, token_ids
from nnsight_magic.models.language import LanguageModel

SEQ = 32
BLOCK = 6


def traced(lm: LanguageModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with lm.trace(ids):
        hidden = _block(lm, BLOCK).output.save()
        logits = lm.lm_head.output.save()
    return hidden.value, logits.value


def _block(lm: LanguageModel, index: int) -> Any:
    return lm.transformer.h[index] if hasattr(lm._module, "transformer") else lm.model.layers[index]


def _module_block(model: torch.nn.Module, index: int) -> torch.nn.Module:
    return model.transformer.h[index] if hasattr(model, "transformer") else model.model.layers[index]


def bare(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids))


def hooked(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground truth: the block's output and the logits, by a hand-written hook and the plain forward."""
    seen = []
    handle = _module_block(model, BLOCK).register_forward_hook(lambda _, __, output: seen.append(output))
    try:
        logits = bare(model, ids).logits
    finally:
        handle.remove()
    return seen[0], logits


def never_seen(lm: LanguageModel, ids: torch.Tensor) -> Any:
    lm._scan_cache.clear()  # this length's concrete scan forgotten; the model's symbolic scan stays
    return traced(lm, ids)


def cases(model: torch.nn.Module) -> tuple[dict[str, Callable[[], Any]], list[float]]:
    """The four cases (checked against the hand-hooked forward first), and the one-time symbolic scan's cost."""
    ids = token_ids(model, seq=SEQ) if hasattr(model, "transformer") else \
        torch.randint(1, model.config.vocab_size - 1, (1, SEQ), generator=torch.Generator().manual_seed(1))
    cached = LanguageModel(model)
    fresh = LanguageModel(model)
    expected = hooked(model, ids)
    common.assert_same("cached-length trace", traced(cached, ids), expected)
    symbolic_costs = []
    for _ in range(1 if common.rounds(20) < 20 else 3):
        first = LanguageModel(model)
        traced(first, ids[:, : SEQ // 2])          # the first shape: a concrete scan
        started = time.perf_counter()
        with first.scan(ids):                        # the second shape: the symbolic scan, once per model
            _block(first, BLOCK).output.shape
        symbolic_costs.append(time.perf_counter() - started)
    traced(fresh, ids[:, : SEQ // 2])
    traced(fresh, ids[:, : SEQ // 2 + 1])           # the symbolic scan exists now
    common.assert_same("never-seen-length trace", never_seen(fresh, ids), expected)
    common.assert_same("cold first trace", traced(LanguageModel(model), ids), expected)
    return {"bare": lambda: bare(model, ids),
            "cached": lambda: traced(cached, ids),
            "never_seen": lambda: never_seen(fresh, ids),
            "cold": lambda: traced(LanguageModel(model), ids)}, symbolic_costs


DESCRIPTIONS = {
    "bare": f"forward, no hooks (no_grad), seq {SEQ}",
    "cached": f"trace: save block {BLOCK} + logits, scan cached",
    "never_seen": "same trace, a length never traced (symbolic scan substituted)",
    "cold": "same trace, new wrapper each call (first scan + run)",
}


def ratio_rows(name: str, timings: dict[str, list[float]]) -> list[str]:
    def ratio(case: str, baseline: str) -> float:
        return common.summary(timings[case])["median_ms"] / common.summary(timings[baseline])["median_ms"]

    rows = []
    for case, baseline, target in (("never_seen", "cached", 1.3), ("cold", "bare", 2.0), ("cached", "bare", 1.05)):
        measured = ratio(case, baseline)
        verdict = "met" if measured <= target else f"missed ({measured:.2f}× > {target:.2f}×)"
        rows.append(f"| {name} | {case} / {baseline} | {measured:.3f}× | ≤ {target:.2f}× | {verdict} | "
                    f"{common.paired_difference(timings[case], timings[baseline]):+.2f} ms |")
    return rows


def models() -> list[tuple[str, Callable[[], torch.nn.Module], int]]:
    found = [("GPT-2-small shape", gpt2_small, 40)]
    try:
        from nnsight_magic import load_embedded_model
        found.append(("SmolLM2-135M (embedded)", lambda: load_embedded_model()._module, 30))
    except Exception as error:  # the package is optional: say so rather than fail
        print(f"_SmolLM2 skipped: {type(error).__name__}: {error}_\n")
    return found


def main() -> None:
    print("## Shapes before running: never-seen length, cached length, cold first trace\n")
    targets = ["| model | ratio of medians | measured | target | verdict | paired Δ |", "|---|---|---:|---:|---|---:|"]
    for name, build, full_rounds in models():
        model = build().eval()
        group, symbolic_costs = cases(model)
        timings = common.interleave(group, rounds=common.rounds(full_rounds), warmup=2, clock=common.timer())
        print(f"### {name}, seq {SEQ}\n")
        print(common.table(timings, {"cached": "bare", "never_seen": "cached", "cold": "bare"}, DESCRIPTIONS), "\n")
        print(f"One-time symbolic scan (the model's second prompt shape), wall time: "
              f"{', '.join(f'{cost * 1e3:.0f}' for cost in symbolic_costs)} ms.\n")
        targets += ratio_rows(name, timings)
    print("### Targets\n")
    print("\n".join(targets), "\n")


if __name__ == "__main__":
    common.entry_point(main)
