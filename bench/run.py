"""Run the benchmarks and print Markdown for bench/RESULTS.md.

    python bench/run.py                 # every bench/bench_*.py module, in name order
    python bench/run.py engine invokes  # only bench_engine.py and bench_invokes.py
    python bench/run.py --quick         # few rounds: checks that every case runs and is correct
    python bench/run.py --threads 2     # torch intra-op threads (default 1, steadier on a shared machine)
    python bench/run.py --clock wall    # time with the wall clock instead of this process's CPU time

Each module's ``main()`` prints one Markdown section. The header says what machine and load the numbers were
measured under; the load average is printed again after each section, because a busy neighbour makes a section
noisier (rerun it alone if the load was extreme).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))


def available() -> list[str]:
    """The short names of the benchmark modules (``bench_engine.py`` → ``engine``)."""
    return sorted(path.stem.removeprefix("bench_") for path in BENCH.glob("bench_*.py"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help=f"benchmarks to run (default: all of {', '.join(available())})")
    parser.add_argument("--quick", action="store_true", help="few rounds, to check that the cases work")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="time with this process's CPU time (default; steadier under load) or the wall clock")
    options = parser.parse_args()
    unknown = set(options.names) - set(available())
    if unknown:
        parser.error(f"no benchmark {', '.join(sorted(unknown))}; there are {', '.join(available())}")
    os.environ["BENCH_THREADS"] = str(options.threads)  # subprocesses read these too
    os.environ["BENCH_CLOCK"] = options.clock
    if options.quick:
        os.environ["BENCH_QUICK"] = "1"

    from bench import common
    common.use_threads()
    info = common.machine()
    clock = "process CPU time" if options.clock == "cpu" else "wall-clock time"
    quick = " — QUICK run: the numbers mean nothing" if options.quick else ""
    print(f"# Benchmark run {time.strftime('%Y-%m-%d %H:%M')}\n")
    print(f"`{' '.join(['python', 'bench/run.py', *sys.argv[1:]])}` — {info['cpu']}, {info['cores']} cores, "
          f"Python {info['python']}, torch {info['torch']}, {info['threads']} torch thread(s), times are {clock}, "
          f"load average {_load()}{quick}\n")
    for name in options.names or available():
        started = time.perf_counter()
        importlib.import_module(f"bench.bench_{name}").main()
        print(f"_{name}: {time.perf_counter() - started:.0f} s, load average after: {_load()}_\n", flush=True)


def _load() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


if __name__ == "__main__":
    main()
