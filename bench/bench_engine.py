"""The engine's own cost: empty traces, saves, an ablation, against the same model with hand-written hooks.

``python bench/run.py engine`` prints three timing groups, a table of targets and a memory table:

* **tiny** (2 blocks of width 64, ~1 ms forward): an empty trace (only the output saved) and one ablation; here a
  trace's fixed cost is visible;
* **tiny12** (12 blocks of width 64): saving 1 vs 12 block outputs, whose difference / 11 is the marginal cost of
  one more save;
* **small** (GPT-2-small shape): saving all 12 block outputs and one ablation, next to the hand-hooked forward.

Traced cases run once with ``validate=False`` (``_off``) and once with the default ``validate=True`` (``_on``),
whose fake-tensor scan is cached by a warm-up trace. Before timing, every case is checked against its baseline,
and the saves are checked to be the very tensors the model produced (zero-copy).
"""

from __future__ import annotations

import statistics
from typing import Any, Callable

import torch

from bench import common
from bench.baselines import ablate_with_hook, save_with_hooks
from bench.models import gpt2_small, tiny_gpt2, token_ids
from nnsight_magic import NNsight


# ------------------------------------------------------------------------------------------- traced cases
def empty_trace(net: NNsight, ids: torch.Tensor, validate: bool) -> Any:
    with net.trace(ids, validate=validate):
        output = net.output.save()
    return output.value


def save_blocks(net: NNsight, ids: torch.Tensor, blocks: range, validate: bool) -> list[torch.Tensor]:
    with net.trace(ids, validate=validate):
        saved = [net.transformer.h[index].output.save() for index in blocks]
    return [proxy.value for proxy in saved]


def ablate(net: NNsight, ids: torch.Tensor, block: int, validate: bool) -> torch.Tensor:
    with net.trace(ids, validate=validate):
        net.transformer.h[block].output[:] = 0
        logits = net.lm_head.output.save()
    return logits.value


def bare(model: torch.nn.Module, ids: torch.Tensor) -> Any:
    with torch.no_grad():
        return model(ids)


# ------------------------------------------------------------------------------------------------ groups
def tiny_cases() -> dict[str, Callable[[], Any]]:
    model = tiny_gpt2()
    net, ids = NNsight(model), token_ids(model)
    block = model.transformer.h[0]
    common.assert_same("empty trace", empty_trace(net, ids, True).logits, bare(model, ids).logits)
    common.assert_same("empty trace, validate=False", empty_trace(net, ids, False).logits, bare(model, ids).logits)
    expected = ablate_with_hook(model, block, ids).logits
    common.assert_same("ablation", ablate(net, ids, 0, True), expected)
    common.assert_same("ablation, validate=False", ablate(net, ids, 0, False), expected)
    return {"bare": lambda: bare(model, ids),
            "empty_off": lambda: empty_trace(net, ids, False),
            "empty_on": lambda: empty_trace(net, ids, True),
            "hook_ablate": lambda: ablate_with_hook(model, block, ids),
            "ablate_off": lambda: ablate(net, ids, 0, False),
            "ablate_on": lambda: ablate(net, ids, 0, True)}


def tiny12_cases() -> dict[str, Callable[[], Any]]:
    model = tiny_gpt2(n_layer=12)
    net, ids = NNsight(model), token_ids(model)
    blocks = list(model.transformer.h)
    for validate in (True, False):
        check_saves(net, model, ids, range(12), validate)
        check_saves(net, model, ids, range(11, 12), validate)
    return {"bare": lambda: bare(model, ids),
            "hooks1": lambda: save_with_hooks(model, blocks[11:], ids),
            "hooks12": lambda: save_with_hooks(model, blocks, ids),
            "save1_off": lambda: save_blocks(net, ids, range(11, 12), False),
            "save12_off": lambda: save_blocks(net, ids, range(12), False),
            "save1_on": lambda: save_blocks(net, ids, range(11, 12), True),
            "save12_on": lambda: save_blocks(net, ids, range(12), True)}


def small_cases() -> dict[str, Callable[[], Any]]:
    model = gpt2_small()
    net, ids = NNsight(model), token_ids(model)
    blocks = list(model.transformer.h)
    for validate in (True, False):
        check_saves(net, model, ids, range(12), validate)
        common.assert_same("ablation of block 5", ablate(net, ids, 5, validate),
                           ablate_with_hook(model, blocks[5], ids).logits)
    return {"bare": lambda: bare(model, ids),
            "hooks12": lambda: save_with_hooks(model, blocks, ids),
            "save12_off": lambda: save_blocks(net, ids, range(12), False),
            "save12_on": lambda: save_blocks(net, ids, range(12), True),
            "hook_ablate": lambda: ablate_with_hook(model, blocks[5], ids),
            "ablate_on": lambda: ablate(net, ids, 5, True)}


def check_saves(net: NNsight, model: torch.nn.Module, ids: torch.Tensor, blocks: range, validate: bool) -> None:
    """The saves equal the hand-hook clones, and each is the very tensor the block returned (zero-copy)."""
    save_blocks(net, ids, blocks, validate)  # the first trace's fake-tensor scan would fire the probes too
    produced: list[int] = []
    probes = [(model.transformer.h[index], lambda _, __, out: produced.append(out.data_ptr())) for index in blocks]
    handles = [module.register_forward_hook(probe) for module, probe in probes]
    try:
        saved = save_blocks(net, ids, blocks, validate)
    finally:
        for handle in handles:
            handle.remove()
    _, clones = save_with_hooks(model, [model.transformer.h[index] for index in blocks], ids)
    common.assert_same(f"saves of blocks {list(blocks)}", saved, clones)
    common.assert_same("zero-copy: data_ptr of each save vs the block's output", [t.data_ptr() for t in saved],
                       produced)


DESCRIPTIONS = {
    "bare": "forward, no hooks (no_grad)",
    "empty_off": "empty trace, save output, validate=False",
    "empty_on": "empty trace, save output, validate=True (scan cached)",
    "hook_ablate": "hand hook zeroes one block's output",
    "ablate_off": "trace: zero one block, save logits, validate=False",
    "ablate_on": "trace: zero one block, save logits, validate=True",
    "hooks1": "hand hook clones last block output",
    "hooks12": "12 hand hooks clone block outputs",
    "save1_off": "trace saves last block, validate=False",
    "save12_off": "trace saves 12 blocks, validate=False",
    "save1_on": "trace saves last block, validate=True",
    "save12_on": "trace saves 12 blocks, validate=True",
}


# -------------------------------------------------------------------------------------------------- run
def main() -> None:
    print("## Engine overhead vs hand-written hooks\n")
    tiny = common.interleave(tiny_cases(), rounds=common.rounds(1500), warmup=20, clock=common.timer())
    print("### tiny: 2 blocks × 64, seq 32\n")
    print(common.table(tiny, {"empty_off": "bare", "empty_on": "bare", "hook_ablate": "bare",
                              "ablate_off": "hook_ablate", "ablate_on": "hook_ablate"}, DESCRIPTIONS), "\n")
    tiny12 = common.interleave(tiny12_cases(), rounds=common.rounds(800), warmup=10, clock=common.timer())
    print("### tiny12: 12 blocks × 64, seq 32\n")
    print(common.table(tiny12, {name: "bare" for name in tiny12 if name != "bare"}, DESCRIPTIONS), "\n")
    small = common.interleave(small_cases(), rounds=common.rounds(150), warmup=3, clock=common.timer())
    print("### small: GPT-2-small shape (12 × 768, vocabulary 50257), seq 32\n")
    print(common.table(small, {"hooks12": "bare", "save12_off": "hooks12", "save12_on": "hooks12",
                               "hook_ablate": "bare", "ablate_on": "hook_ablate"}, DESCRIPTIONS), "\n")
    print("### Targets\n")
    print(common.targets_table(target_rows(tiny, tiny12, small)), "\n")
    print(machine_scale(tiny, tiny12), "\n")
    print("tiny12 has GPT-2 small's module tree (164 modules) and the engine copies no tensor, so it measures the "
          "same engine work as the GPT-2-small rows with a far smaller noise; the GPT-2-small rows' intervals show "
          "what a 120 ms forward lets one resolve. Every case was checked against its baseline before timing; "
          "every save is the tensor the block returned (same `data_ptr`, no copy).\n")
    print("### Memory: save 12 block outputs of the GPT-2-small shape, seq 512 (one subprocess per case)\n")
    print(common.memory_table("bench.bench_engine", MEMORY_DESCRIPTIONS), "\n")
    print(f"The 12 activations are 12 × {MEMORY_SEQ} × 768 float32 = {12 * MEMORY_SEQ * 768 * 4 / 2**20:.1f} MB. The "
          "traced cases run with autograd on globally (no `torch.no_grad()` around them): the engine turns it off, "
          "so the saves carry no autograd graph.\n")


def target_rows(tiny: dict, tiny12: dict, small: dict) -> list:
    def paired(timings: dict, case: str, baseline: str, scale: float = 1.0) -> tuple:
        low, high = common.paired_interval(timings[case], timings[baseline])
        return common.paired_difference(timings[case], timings[baseline]) * scale, (low * scale, high * scale)

    rows = [("empty trace, validate=False", *paired(tiny, "empty_off", "bare"), 0.10, "tiny: empty_off − bare"),
            ("empty trace, validate=True", *paired(tiny, "empty_on", "bare"), 0.33, "tiny: empty_on − bare")]
    for mode in ("off", "on"):
        rows.append((f"one more save, validate={mode == 'on'}", *paired(tiny12, f"save12_{mode}", f"save1_{mode}",
                                                                       1 / 11), 0.02,
                     f"tiny12: (save12_{mode} − save1_{mode}) / 11"))
    for mode in ("off", "on"):
        rows.append((f"save-12 vs hand hooks, 12-block model, validate={mode == 'on'}",
                     *paired(tiny12, f"save12_{mode}", "hooks12"), 0.5, f"tiny12: save12_{mode} − hooks12"))
    for mode in ("off", "on"):
        rows.append((f"save-12 on GPT-2 small vs hand hooks, validate={mode == 'on'}",
                     *paired(small, f"save12_{mode}", "hooks12"), 0.5, f"small: save12_{mode} − hooks12"))
    return rows


def machine_scale(tiny: dict, tiny12: dict) -> str:
    """The targets in ms next to what this machine's CPU makes of plain PyTorch: the cost of one more hand-written
    cloning hook and of the bare forward in the same run, so runs on CPUs of different speed compare."""
    hand = common.paired_difference(tiny12["hooks12"], tiny12["hooks1"]) / 11
    low, high = (bound / 11 for bound in common.paired_interval(tiny12["hooks12"], tiny12["hooks1"]))
    engine = {mode: common.paired_difference(tiny12[f"save12_{mode}"], tiny12[f"save1_{mode}"]) / 11
              for mode in ("off", "on")}
    empty = common.paired_difference(tiny["empty_off"], tiny["bare"])
    bare = statistics.median(tiny["bare"]) * 1e3
    return (f"This machine's scale: one more hand-written cloning hook costs {hand:.4f} ms [{low:.4f}, {high:.4f}] "
            f"(tiny12: (hooks12 − hooks1) / 11), so one more save costs {engine['off'] / hand:.2f}× a hand hook "
            f"with validate=False and {engine['on'] / hand:.2f}× with validate=True; the empty trace "
            f"(validate=False) adds {100 * empty / bare:.1f} % to the tiny model's {bare:.3f} ms bare forward.")


# ---------------------------------------------------------------------------------------- memory cases
MEMORY_SEQ = 512


def forward_and_drop(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """A bare forward that keeps nothing: its peak is the forward's own working memory."""
    bare(model, ids)


MEMORY_DESCRIPTIONS = {
    "bare": "forward, keeps nothing", "hooks12": "12 hand hooks clone block outputs, keeps the clones",
    "save12_off": "trace saves 12 blocks (validate=False), keeps the saves",
    "save12_on": "trace saves 12 blocks (validate=True), keeps the saves",
}


def memory_setup(case: str) -> Callable[[], Any]:
    model = gpt2_small()
    net, ids = NNsight(model), token_ids(model, seq=MEMORY_SEQ)
    blocks = list(model.transformer.h)
    return {"bare": lambda: forward_and_drop(model, ids),
            "hooks12": lambda: save_with_hooks(model, blocks, ids)[1],
            "save12_off": lambda: save_blocks(net, ids, range(12), False),
            "save12_on": lambda: save_blocks(net, ids, range(12), True)}[case]


if __name__ == "__main__":
    common.entry_point(main, memory_setup)
