"""Side-by-side timing and memory measurement for noisy machines.

Every benchmark in this folder measures the same way:

* **interleaved rounds**: each round runs every case once, in a freshly shuffled order, so a burst of load from
  another process hits all cases alike;
* **medians** per case, with the interquartile range;
* **paired differences**: for a case and its baseline, the median over rounds of (case − baseline) measured in
  the same round, which cancels most of the drift between rounds;
* **peak memory** in a fresh subprocess per case (``measure_memory``), from ``ru_maxrss`` or the kernel's
  resettable high-water mark (``memory_child``), and from the live tensor bytes the case keeps.

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
               seed: int = 0, clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Run every case once per round, in a shuffled order per round; return seconds per call per case.

    ``clock=time.process_time`` counts only the CPU time of this process: on a machine shared with other busy
    processes it leaves out the time the case waited for a core, which is most of the noise of long cases.
    """
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
            start = clock()
            function()
            timings[name].append(clock() - start)
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


# ------------------------------------------------------------------------------------- settings of a run
def rounds(full: int) -> int:
    """How many rounds to run: ``full``, or a twentieth of it (at least 3) when ``BENCH_QUICK=1``.

    A quick run only checks that every case works and computes the right thing; its numbers mean little.
    """
    return max(3, full // 20) if os.environ.get("BENCH_QUICK") == "1" else full


def timer() -> Callable[[], float]:
    """The clock cases are timed with: this process's CPU time, or wall time when ``BENCH_CLOCK=wall``.

    CPU time is the default because the engine's overhead is CPU work, and on a machine shared with busy
    neighbours the wall time of a 115 ms forward spreads over tens of milliseconds while its CPU time spreads over
    a few. With one torch thread and nothing waiting on I/O the two agree on an idle machine.
    """
    return time.perf_counter if os.environ.get("BENCH_CLOCK") == "wall" else time.process_time


def use_threads() -> int:
    """Give torch ``BENCH_THREADS`` intra-op threads (default 1) and return the number.

    One thread is the default because on a small shared machine a second thread mostly waits for a core
    that another process holds: the medians barely move, but the spread grows several-fold.
    """
    threads = int(os.environ.get("BENCH_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


# ------------------------------------------------------------------------------------ reading the numbers
def median_interval(values: list[float]) -> tuple[float, float]:
    """A 95 % confidence interval for the median of ``values``, from order statistics (no distribution assumed).

    The median's rank in a sample of n is binomial(n, 1/2); its 95 % band is n/2 ± 1.96·√n/2 ranks.
    """
    ordered = sorted(values)
    n = len(ordered)
    half_width = 1.96 * n ** 0.5 / 2
    low = max(0, int(n / 2 - half_width))
    high = min(n - 1, int(n / 2 + half_width + 0.999))
    return ordered[low], ordered[high]


def paired_interval(samples: list[float], baseline: list[float]) -> tuple[float, float]:
    """The 95 % confidence interval of :func:`paired_difference`, in milliseconds."""
    low, high = median_interval([a - b for a, b in zip(samples, baseline)])
    return low * 1e3, high * 1e3


def verdict(measured: float, target: float, interval: tuple[float, float] | None = None) -> str:
    """``met`` or ``missed by X`` for a measured cost that must not exceed ``target`` (same unit).

    With a confidence interval, a median over the target whose interval still reaches below it is
    ``within noise`` rather than a miss.
    """
    if measured <= target:
        return "met"
    if interval is not None and interval[0] <= target:
        return f"within noise (median {measured - target:+.3f} over)"
    return f"missed by {measured - target:.3f}"


def targets_table(rows: list[tuple[str, float, tuple[float, float] | None, float, str]]) -> str:
    """A Markdown table of targets: ``(quantity, measured ms, 95 % interval or None, target ms, how measured)``."""
    lines = ["| quantity | measured ms | 95 % CI | target ms | verdict | how |", "|---|---:|---|---:|---|---|"]
    for quantity, measured, interval, target, how in rows:
        band = f"[{interval[0]:+.3f}, {interval[1]:+.3f}]" if interval else ""
        lines.append(f"| {quantity} | {measured:+.3f} | {band} | ≤ {target:.3f} | "
                     f"{verdict(measured, target, interval)} | {how} |")
    return "\n".join(lines)


def assert_same(what: str, actual: Any, expected: Any) -> None:
    """Fail unless ``actual`` equals ``expected`` exactly (tensors, tuples and lists of them, other values by ``==``).

    Every benchmark calls this before timing: a benchmark of a wrong computation is worthless.
    """
    if isinstance(expected, torch.Tensor):
        if not isinstance(actual, torch.Tensor) or actual.shape != expected.shape or not torch.equal(actual, expected):
            difference = (actual - expected).abs().max().item() if isinstance(actual, torch.Tensor) and \
                actual.shape == expected.shape else "shapes differ"
            raise AssertionError(f"{what}: the traced result differs from the baseline (max |Δ| {difference})")
    elif isinstance(expected, (tuple, list)):
        if len(actual) != len(expected):
            raise AssertionError(f"{what}: {len(actual)} values, the baseline has {len(expected)}")
        for index, (left, right) in enumerate(zip(actual, expected)):
            assert_same(f"{what}[{index}]", left, right)
    elif actual != expected:
        raise AssertionError(f"{what}: {actual!r} != {expected!r}")


# ------------------------------------------------------------------------------- memory, in a child process
def current_rss_bytes() -> int:
    """The process's resident memory now."""
    return _status_kilobytes("VmRSS") * 1024


def reset_peak_rss() -> None:
    """Make the kernel's high-water mark of resident memory start again from the current value (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def high_water_rss_bytes() -> int:
    """The most resident memory since the process started or since :func:`reset_peak_rss`."""
    return _status_kilobytes("VmHWM") * 1024


def _status_kilobytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def memory_child(setup: Callable[..., Callable[[], Any]], argv: list[str], repeats: int = 3) -> None:
    """The child side of :func:`measure_memory`: ``argv`` is ``["--memory-case", case, *args]``.

    ``setup(case, *args)`` builds the model and returns the case as a function. The case runs once to warm up
    (lazy initialisation, cached scans), then the baseline is taken with only the model alive, the kernel's
    high-water mark is reset, and the case runs ``repeats`` times; each call's result is dropped before the
    next call, the last one is kept. Printed (one JSON line, megabytes above the baseline): ``peak_rss_mb``
    (the high-water mark), ``retained_rss_mb`` and ``live_tensor_mb`` (what the kept result holds).
    """
    case = setup(*argv[1:])
    case()
    gc.collect()
    baseline_rss, baseline_tensors = current_rss_bytes(), live_tensor_bytes()
    reset_peak_rss()
    kept = None
    for _ in range(repeats):
        kept = None  # the previous result goes before the next call, as in a loop that reassigns it
        kept = case()
    peak = high_water_rss_bytes()
    gc.collect()
    print(json.dumps({"peak_rss_mb": (peak - baseline_rss) / 2**20,
                      "retained_rss_mb": (current_rss_bytes() - baseline_rss) / 2**20,
                      "live_tensor_mb": (live_tensor_bytes() - baseline_tensors) / 2**20}))
    del kept


def entry_point(main: Callable[[], None], memory_setup: Callable[..., Callable[[], Any]] | None = None) -> None:
    """``if __name__ == "__main__"`` of a benchmark module: a memory child when asked (see :func:`memory_child`),
    else the whole benchmark."""
    use_threads()
    if len(sys.argv) > 1 and sys.argv[1] == "--memory-case" and memory_setup is not None:
        memory_child(memory_setup, sys.argv[1:])
    else:
        main()


def memory_table(module: str, cases: dict[str, str], *args: str) -> str:
    """Measure each case of ``module`` in its own subprocess (:func:`measure_memory`) and return a Markdown table."""
    lines = ["| case | what | peak ΔRSS MB | retained ΔRSS MB | live tensors kept MB |", "|---|---|---:|---:|---:|"]
    for case, description in cases.items():
        try:
            report = measure_memory(module, case, *args)
        except subprocess.CalledProcessError as error:
            raise RuntimeError(f"memory case {case} of {module} failed:\n{error.stderr}") from error
        lines.append(f"| {case} | {description} | {report['peak_rss_mb']:.1f} | {report['retained_rss_mb']:.1f} | "
                     f"{report['live_tensor_mb']:.1f} |")
    return "\n".join(lines)
