"""nnsight 0.8.1 side by side with this engine, on the cases of bench_engine, in one process.

nnsight is never a dependency: it lives in its own virtual environment, ``.venv-peer`` (git-ignored), which has
the same torch and transformers as ``.venv``. This module's ``main()`` starts ``.venv-peer/bin/python`` on
itself; that child imports both nnsight and this repository's engine and interleaves their cases in the same
rounds, so the two are compared under the same load. Create the environment with (torch first, the CPU build)

    python3 -m venv .venv-peer
    .venv-peer/bin/pip install torch==2.13.0
    .venv-peer/bin/pip install transformers==5.24.0 nnsight==0.8.1

nnsight wraps its own deep copy of each model, because it replaces ``forward`` on every module for good; the
bare forward, the hand hooks and this engine use the original. Every nnsight case runs under
``torch.no_grad()``, like the baselines (this engine turns autograd off by itself).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from bench import common
from bench.baselines import ablate_with_hook, save_with_hooks
from bench.bench_engine import ablate, bare, empty_trace, save_blocks
from bench.models import gpt2_small, tiny_gpt2, token_ids

ROOT = Path(__file__).resolve().parent.parent
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"


def main() -> None:
    print("## nnsight 0.8.1 side by side (same process, interleaved)\n")
    if not PEER_PYTHON.exists():
        print("Skipped: there is no `.venv-peer`; the docstring of `bench/bench_peer.py` has the commands that "
              "make it.\n")
        return
    child = subprocess.run([str(PEER_PYTHON), "-m", "bench.bench_peer", "--in-peer-venv"], cwd=ROOT,
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if child.returncode:
        raise RuntimeError(f"the nnsight side-by-side run failed:\n{child.stderr}")
    print(child.stdout)


# ------------------------------------------------------------------------------- inside .venv-peer only
def peer_empty(peer: Any, ids: torch.Tensor) -> Any:
    with torch.no_grad():
        with peer.trace(ids):
            output = peer.output.save()
    return output


def peer_save_blocks(peer: Any, ids: torch.Tensor, blocks: range) -> list[torch.Tensor]:
    import nnsight
    with torch.no_grad():
        with peer.trace(ids):
            saved = nnsight.save([peer.transformer.h[index].output for index in blocks])
    return saved


def peer_ablate(peer: Any, ids: torch.Tensor, block: int) -> torch.Tensor:
    with torch.no_grad():
        with peer.trace(ids):
            peer.transformer.h[block].output[:] = 0
            logits = peer.lm_head.output.save()
    return logits


DESCRIPTIONS = {
    "bare": "forward, no hooks (no_grad)",
    "hooks1": "hand hook clones last block output",
    "hooks12": "12 hand hooks clone block outputs",
    "hook_ablate": "hand hook zeroes block 0's output",
    "ours_empty_off": "this engine: empty trace, validate=False",
    "ours_empty_on": "this engine: empty trace, validate=True",
    "nnsight_empty": "nnsight: empty trace (save output)",
    "ours_ablate_on": "this engine: zero block 0, save logits, validate=True",
    "nnsight_ablate": "nnsight: zero block 0, save logits",
    "ours_save1_on": "this engine: save last block, validate=True",
    "ours_save12_on": "this engine: save 12 blocks, validate=True",
    "nnsight_save1": "nnsight: save last block",
    "nnsight_save12": "nnsight: save 12 blocks",
}


def side_by_side() -> None:
    import nnsight
    tiny, tiny12, small = tiny_gpt2(), tiny_gpt2(n_layer=12), gpt2_small()
    groups = [("tiny: 2 blocks × 64, seq 32", 1000, tiny_group(nnsight.NNsight, tiny)),
              ("tiny12: 12 blocks × 64, seq 32", 500, tiny12_group(nnsight.NNsight, tiny12)),
              ("small: GPT-2-small shape, seq 32", 60, small_group(nnsight.NNsight, small))]
    print(f"nnsight {nnsight.__version__}, torch {torch.__version__}, {torch.get_num_threads()} thread(s). "
          "Every case was checked against its baseline first.\n")
    for title, rounds, (cases, baselines) in groups:
        timings = common.interleave(cases, rounds=common.rounds(rounds), warmup=5, clock=common.timer())
        print(f"### {title}\n")
        print(common.table(timings, baselines, DESCRIPTIONS), "\n")
        if "hooks1" in timings:
            print(marginal_save(timings), "\n")


def marginal_save(timings: dict[str, list[float]]) -> str:
    """The cost of one more save for each of the three ways: (12 saves − 1 save) / 11, paired per round."""
    parts = []
    for label, one, twelve in (("hand hook", "hooks1", "hooks12"), ("this engine", "ours_save1_on", "ours_save12_on"),
                               ("nnsight", "nnsight_save1", "nnsight_save12")):
        low, high = common.paired_interval(timings[twelve], timings[one])
        parts.append(f"{label} {common.paired_difference(timings[twelve], timings[one]) / 11:.3f} ms "
                     f"[{low / 11:.3f}, {high / 11:.3f}]")
    return "One more save, (12 saves − 1 save) / 11 with its 95 % interval: " + "; ".join(parts) + "."


def tiny_group(peer_class: type, model: torch.nn.Module) -> tuple[dict, dict]:
    from nnsight_magic import NNsight
    net, peer, ids = NNsight(model), peer_class(copy.deepcopy(model)), token_ids(model)
    common.assert_same("nnsight empty trace", peer_empty(peer, ids).logits, bare(model, ids).logits)
    common.assert_same("nnsight ablation", peer_ablate(peer, ids, 0),
                       ablate_with_hook(model, model.transformer.h[0], ids).logits)
    empty_trace(net, ids, True)
    cases = {"bare": lambda: bare(model, ids),
             "ours_empty_off": lambda: empty_trace(net, ids, False),
             "ours_empty_on": lambda: empty_trace(net, ids, True),
             "nnsight_empty": lambda: peer_empty(peer, ids),
             "hook_ablate": lambda: ablate_with_hook(model, model.transformer.h[0], ids),
             "ours_ablate_on": lambda: ablate(net, ids, 0, True),
             "nnsight_ablate": lambda: peer_ablate(peer, ids, 0)}
    baselines = {name: "hook_ablate" if "ablate" in name and name != "hook_ablate" else "bare"
                 for name in cases if name != "bare"}
    return cases, baselines


def tiny12_group(peer_class: type, model: torch.nn.Module) -> tuple[dict, dict]:
    from nnsight_magic import NNsight
    net, peer, ids = NNsight(model), peer_class(copy.deepcopy(model)), token_ids(model)
    blocks = list(model.transformer.h)
    common.assert_same("nnsight saves", peer_save_blocks(peer, ids, range(12)), save_with_hooks(model, blocks, ids)[1])
    save_blocks(net, ids, range(12), True)
    cases = {"bare": lambda: bare(model, ids),
             "hooks1": lambda: save_with_hooks(model, blocks[11:], ids),
             "hooks12": lambda: save_with_hooks(model, blocks, ids),
             "ours_save1_on": lambda: save_blocks(net, ids, range(11, 12), True),
             "ours_save12_on": lambda: save_blocks(net, ids, range(12), True),
             "nnsight_save1": lambda: peer_save_blocks(peer, ids, range(11, 12)),
             "nnsight_save12": lambda: peer_save_blocks(peer, ids, range(12))}
    return cases, {name: "bare" for name in cases if name != "bare"}


def small_group(peer_class: type, model: torch.nn.Module) -> tuple[dict, dict]:
    from nnsight_magic import NNsight
    net, peer, ids = NNsight(model), peer_class(copy.deepcopy(model)), token_ids(model)
    blocks = list(model.transformer.h)
    common.assert_same("nnsight saves", peer_save_blocks(peer, ids, range(12)), save_with_hooks(model, blocks, ids)[1])
    save_blocks(net, ids, range(12), True)
    cases: dict[str, Callable[[], Any]] = {
        "bare": lambda: bare(model, ids),
        "hooks12": lambda: save_with_hooks(model, blocks, ids),
        "ours_save12_on": lambda: save_blocks(net, ids, range(12), True),
        "nnsight_save12": lambda: peer_save_blocks(peer, ids, range(12))}
    return cases, {"hooks12": "bare", "ours_save12_on": "hooks12", "nnsight_save12": "hooks12"}


if __name__ == "__main__":
    if sys.argv[1:] == ["--in-peer-venv"]:
        common.use_threads()
        side_by_side()
    else:
        common.entry_point(main)
