"""Where a trace's time goes: cProfile of the engine on the tiny models, by phase and by function.

    python -m bench.profile_engine          # from the repository root; prints Markdown

The model's own forward is the same with and without the engine, so only the engine's functions are listed.
cProfile makes every Python call slower (1.5–2× for code made of small calls, like this engine), so read
the microseconds as shares of the overhead rather than as its size; the unprofiled size is in bench_engine.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from typing import Any, Callable

import torch

from bench import common
from bench.bench_engine import ablate, empty_trace, save_blocks
from bench.models import tiny_gpt2, token_ids
from nnsight_magic import NNsight
from nnsight_magic.errors import user_location

CALLS = 400

# (label, file suffix, function name, which definition of that name in the file: 0 first, -1 last); the
# cumulative time of each is one phase of a trace
PHASES = [
    ("build: `model.trace(...)`", "models/nnsight.py", "trace", 0),
    ("build: `Tracer.__enter__` (prepare input)", "intervention/tracer.py", "__enter__", 0),
    ("build: reading `.output` (Envoy → proxy → node)", "intervention/envoy.py", "output", 0),
    ("build: shape inference of non-entry nodes", "tracing/shapes.py", "infer", 0),
    ("build: order check and shape refresh", "intervention/tracer.py", "_finish_building", 0),
    ("run: `run_trace` in all (includes the model)", "intervention/backends.py", "run_trace", 0),
    ("run: the model's forward (`_run`, includes hooks firing)", "models/nnsight.py", "_run", 0),
    ("run: `ModelExecution.__init__`", "intervention/interleaver.py", "__init__", 0),
    ("run: `Interleaver.__init__` (entry tables)", "intervention/interleaver.py", "__init__", -1),
    ("run: hooks registered (`Interleaver.__enter__`)", "intervention/interleaver.py", "__enter__", 0),
    ("run: hooks removed (`Interleaver.__exit__`)", "intervention/interleaver.py", "__exit__", 0),
    ("run: our hooks firing (output hook)", "intervention/interleaver.py", "hook", 0),
    ("run: our forward wrappers firing (saved-only output)", "intervention/interleaver.py", "storing", 0),
    ("run: `_on_accelerator` (first parameter's device)", "models/nnsight.py", "_on_accelerator", 0),
    ("run: `_detach` (bind saved values)", "intervention/tracer.py", "_detach", 0),
]


def scenarios() -> dict[str, Callable[[], Any]]:
    tiny, tiny12 = tiny_gpt2(), tiny_gpt2(n_layer=12)
    net, net12 = NNsight(tiny), NNsight(tiny12)
    ids, ids12 = token_ids(tiny), token_ids(tiny12)
    return {"empty trace, validate=False (tiny)": lambda: empty_trace(net, ids, False),
            "empty trace, validate=True (tiny)": lambda: empty_trace(net, ids, True),
            "save 12 blocks, validate=False (tiny12)": lambda: save_blocks(net12, ids12, range(12), False),
            "save 12 blocks, validate=True (tiny12)": lambda: save_blocks(net12, ids12, range(12), True),
            "ablation, validate=True (tiny)": lambda: ablate(net, ids, 0, True)}


def profile(case: Callable[[], Any]) -> pstats.Stats:
    for _ in range(20):
        case()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(CALLS):
        case()
    profiler.disable()
    return pstats.Stats(profiler)


def phase_rows(stats: pstats.Stats) -> list[str]:
    rows = []
    for label, suffix, function, which in PHASES:
        matches = sorted((line, cumulative) for (filename, line, name), (_, _, _, cumulative, _) in stats.stats.items()
                         if filename.endswith(suffix) and name == function)
        if matches:
            rows.append(f"| {label} | {matches[which][1] / CALLS * 1e6:.1f} |")
    return rows


def top_functions(stats: pstats.Stats, count: int = 12) -> list[str]:
    entries = [(own, calls, cumulative, filename, line, function)
               for (filename, line, function), (_, calls, own, cumulative, _) in stats.stats.items()
               if "nnsight_magic" in filename]
    rows = []
    for own, calls, cumulative, filename, line, function in sorted(entries, reverse=True)[:count]:
        short = filename.split("nnsight_magic/", 1)[1]
        rows.append(f"| `{short}:{line} {function}` | {calls / CALLS:.0f} | {own / CALLS * 1e6:.1f} | "
                    f"{cumulative / CALLS * 1e6:.1f} |")
    return rows


def component_costs() -> list[str]:
    """Unprofiled costs of single operations the engine repeats per trace, per hooked module or per node, and of
    cheaper alternatives (meta tensors instead of fake ones)."""
    block = tiny_gpt2(n_layer=12).transformer.h[3]
    from nnsight_magic.tracing.shapes import shared_fake_mode
    mode = shared_fake_mode()
    with mode:
        fake = torch.empty(1, 32, 64)
    meta = torch.empty(1, 32, 64, device="meta")

    def register_and_remove() -> None:
        block.register_forward_hook(lambda *_: None).remove()

    def function_level_import() -> None:
        from nnsight_magic.intervention.backends import dispatch  # noqa: F401  (as `Tracer._dispatch` does)

    def fake_op(operation: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def run() -> None:
            with mode:
                operation(fake.clone())
        return run

    def meta_op(operation: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        return lambda: operation(meta.clone())

    def zero(tensor: torch.Tensor) -> None:
        tensor[:] = 0

    operations = {
        "register + remove one forward hook (per hooked module)": register_and_remove,
        "`user_location()` (per node)": user_location,
        "a function-level import (`_dispatch`: 1 per trace)": function_level_import,
        "fake `x.clone()` (shape inference of an in-place edit clones first)": fake_op(lambda tensor: None),
        "fake `x.clone()[:, -1]` (a read of one position)": fake_op(lambda tensor: tensor[:, -1]),
        "fake `x.clone()[:] = 0` (an ablation)": fake_op(zero),
        "fake `x.clone() * 2`": fake_op(lambda tensor: tensor * 2),
        "meta `x.clone()[:, -1]`": meta_op(lambda tensor: tensor[:, -1]),
        "meta `x.clone()[:] = 0`": meta_op(zero),
    }
    rows = []
    for label, operation in operations.items():
        samples = []
        for _ in range(common.rounds(2000)):
            start = time.perf_counter()
            operation()
            samples.append(time.perf_counter() - start)
        rows.append(f"| {label} | {common.summary(samples)['median_ms'] * 1e3:.1f} |")
    return rows


def main() -> None:
    print("## Profile of the engine (cProfile, tiny models)\n")
    for name, case in scenarios().items():
        stats = profile(case)
        print(f"### {name}\n")
        print("| phase | µs per trace (profiled, cumulative) |\n|---|---:|")
        print("\n".join(phase_rows(stats)), "\n")
        print("| engine function | calls per trace | own µs per trace | cumulative µs per trace |")
        print("|---|---:|---:|---:|")
        print("\n".join(top_functions(stats)), "\n")
    print("### Single operations, unprofiled\n")
    print("| operation | median µs |\n|---|---:|")
    print("\n".join(component_costs()), "\n")


if __name__ == "__main__":
    common.entry_point(main)
