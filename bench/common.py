"""Side-by-side timing and memory measurement for noisy machines.

Every benchmark in this folder measures the same way:

* **interleaved rounds**: each round runs every case once, in a freshly shuffled order, so a burst of load from
  another process hits all cases alike;
* **medians** per case, with the interquartile range;
* **paired differences**: for a case and its baseline, the median over rounds of (case − baseline) measured in
  the same round, which cancels most of the drift between rounds;
* **peak memory** in a fresh subprocess per case (``measure_memory``), from ``ru_maxrss`` and from the live
  tensor bytes the case keeps.

In [1]: cases = {"bare": lambda: model(x), "traced": lambda: traced(x)}
In [2]: timings = interleave(cases, rounds=200, warmup=20)
In [3]: print(table(timings, baselines={"traced": "bare"}))
"""

from __future__ import annotations

import gc
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch


def interleave(cases: dict[str, Callable[[], Any]], rounds: int, warmup: int = 5,
               seed: int = 0) -> dict[str, list[float]]:
    """Run every case once per round, in a shuffled order per round; return seconds per call per case."""
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    generator = random.Random(seed)
    timings: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        generator.shuffle(names)
        for name in names:
            function = cases[name]
            start = time.perf_counter()
            function()
            timings[name].append(time.perf_counter() - start)
    return timings


def summary(samples: list[float]) -> dict[str, float]:
    """Median, interquartile range and minimum, in milliseconds."""
    ordered = sorted(samples)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) >= 4 else [ordered[0], 0, ordered[-1]]
    return {"median_ms": statistics.median(ordered) * 1e3, "iqr_ms": (quartiles[2] - quartiles[0]) * 1e3,
            "min_ms": ordered[0] * 1e3}


def paired_difference(samples: list[float], baseline: list[float]) -> float:
    """Median over rounds of (case − baseline), in milliseconds."""
    return statistics.median(a - b for a, b in zip(samples, baseline)) * 1e3


def table(timings: dict[str, list[float]], baselines: dict[str, str], descriptions: dict[str, str] | None = None) -> str:
    """A Markdown table: median, IQR and the paired difference against each case's baseline."""
    descriptions = descriptions or {}
    rows = ["| case | what | median ms | IQR ms | Δ vs baseline (paired, ms) |", "|---|---|---:|---:|---:|"]
    for name, samples in timings.items():
        stats = summary(samples)
        baseline = baselines.get(name)
        delta = f"{paired_difference(samples, timings[baseline]):+.3f} ({baseline})" if baseline else "baseline"
        rows.append(f"| {name} | {descriptions.get(name, '')} | {stats['median_ms']:.3f} | {stats['iqr_ms']:.3f} | "
                    f"{delta} |")
    return "\n".join(rows)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu": cpu, "cores": os.cpu_count(), "load_average": os.getloadavg()}


def live_tensor_bytes() -> int:
    """Bytes held by every tensor the garbage collector can see (storages counted once)."""
    gc.collect()
    seen, total = set(), 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and not obj.is_meta and obj.device.type == "cpu":
            try:
                storage = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            key = storage.data_ptr()
            if key and key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(module: str, case: str, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``python -m <module> --memory-case <case> *args`` in a fresh process; return the JSON it prints last.

    The child sets up the case, records its baseline, runs it, and prints one JSON line with what it measured
    (see ``memory_report``). ``MALLOC_MMAP_THRESHOLD_`` is lowered so freed tensor buffers go back to the OS.
    """
    environment = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", **(env or {}))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-m", module, "--memory-case", case, *args], cwd=root,
                            env=environment, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def memory_report(baseline_rss: int, baseline_tensors: int) -> str:
    """The JSON line a memory child prints: peak RSS and live tensor bytes above its baseline.

    Call it while the case's results are still referenced, so "live" includes what the case keeps.
    """
    return json.dumps({"peak_rss_mb": (peak_rss_bytes() - baseline_rss) / 2**20,
                       "live_tensor_mb": (live_tensor_bytes() - baseline_tensors) / 2**20})
