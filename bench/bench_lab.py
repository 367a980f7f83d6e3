"""The inspector's cost in JupyterLab itself: the kernel cells of ``bench_inspector`` run by a browser.

``python bench/run.py lab`` (or ``python -m bench.bench_lab``; about 4 minutes) starts a private JupyterLab on
loopback (``tests/lab_harness.py``), opens a notebook in headless Chromium and runs it: the setup cell of
``bench_inspector``'s kernel section, then rounds of its four cells (the 30-block logit lens and the 100-step
generation, each with and without ``--no-widget``) in a shuffled order. Unlike the kernel section, a browser
receives every message, renders the widgets and the static tables, and runs on the same two cores as the kernel:
this is the cost a student sees. The kernel times each cell (``pre_run_cell`` to ``post_run_cell``) and the
inspector's own code in it, and writes the times to a file that this module reads when the notebook is done.

``BENCH_LAB_ROUNDS=N`` sets the rounds (default 4, 3 with ``--quick``). It needs Debian's ``chromium`` and
Playwright, as the browser tests do; without them it says so and measures nothing.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.bench_inspector import KERNEL_CELLS, KERNEL_DESCRIPTIONS, KERNEL_SETUP, KERNEL_TARGETS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from lab_harness import CHROMIUM, KERNEL_READY_JS, RUN_ALL_JS, JupyterLab, launch_chromium, write_notebook  # noqa: E402

RECORD = """_bench_times = []
def _bench_record(result):
    _bench_times.append([result.info.raw_cell, *_bench_cell])
get_ipython().events.register("post_run_cell", _bench_record)
"""
DUMP = """import json as _bench_json
with open({path!r}, "w") as _bench_file:
    _bench_json.dump(_bench_times, _bench_file)
"""


def notebook_cells(rounds: int, results: Path) -> tuple[list[str], list[str]]:
    """The notebook's cells, and the case of each timed cell in order: a warm-up round, then ``rounds`` rounds,
    each in its own shuffled order (seeded, so a rerun runs the same notebook)."""
    order = random.Random(0)
    cases: list[str] = []
    for _ in range(rounds + 1):
        names = list(KERNEL_CELLS)
        order.shuffle(names)
        cases.extend(names)
    return [KERNEL_SETUP, RECORD] + [KERNEL_CELLS[name] for name in cases] + [DUMP.format(path=str(results))], cases


def run_notebook(rounds: int) -> list[tuple[str, float, float, float]]:
    """Run the notebook in JupyterLab; ``(case, cell seconds, kernel CPU seconds, inspector seconds)`` per cell."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="bench-lab-") as folder:
        root = Path(folder)
        results = root / "times.json"
        cells, cases = notebook_cells(rounds, results)
        write_notebook(root / "inspector.ipynb", cells)
        os.environ["PYTHONPATH"] = str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
        with JupyterLab(root) as lab, sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(lab.notebook_url("inspector.ipynb"))
                page.wait_for_function(KERNEL_READY_JS, timeout=120_000, polling=200)
                page.evaluate(RUN_ALL_JS)
                deadline = time.monotonic() + 1800
                while not results.exists():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"the notebook did not finish in 30 minutes: {lab.log()}")
                    time.sleep(1)
                time.sleep(0.5)  # the file is written in one call; let it close
            finally:
                browser.close()
        recorded = [entry for entry in json.loads(results.read_text()) if entry[0] in KERNEL_CELLS.values()]
    if [entry[0] for entry in recorded] != [KERNEL_CELLS[name] for name in cases]:
        raise RuntimeError("the notebook's timed cells did not all run, or not in order (a cell failed?)")
    return [(case, wall, cpu, spent) for case, (_, wall, cpu, spent) in zip(cases, recorded)]


def main() -> None:
    print("## The inspector in JupyterLab (headless Chromium)\n")
    if not Path(CHROMIUM).exists():
        print(f"Not measured: {CHROMIUM} is missing (`apt-get install chromium`).\n")
        return
    rounds = int(os.environ.get("BENCH_LAB_ROUNDS", common.rounds(4)))
    load_before = os.getloadavg()
    measured = run_notebook(rounds)[len(KERNEL_CELLS):]  # the warm-up round left out
    by_case: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "spent": []} for name in KERNEL_CELLS}
    for case, wall, cpu, spent in measured:
        for clock, value in (("wall", wall), ("cpu", cpu), ("spent", spent)):
            by_case[case][clock].append(value)
    load = " / ".join(f"{value:.2f}" for value in load_before)
    after = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"Load average before: {load}; after: {after}. {rounds} rounds, each of the four cells once in a "
          "shuffled order, paired within the round; times from `pre_run_cell` to `post_run_cell` in the kernel "
          "while JupyterLab renders every output.\n")
    walls = {name: clocks["wall"] for name, clocks in by_case.items()}
    print(common.table(walls, {"lens_30_layers_inspected": "lens_30_layers",
                               "generate_100_inspected": "generate_100"}, KERNEL_DESCRIPTIONS), "\n")
    rows, shares = [], []
    for case, share in KERNEL_TARGETS:
        baseline = common.summary(walls[case])["median_ms"]
        for clock, what in (("wall", "time in the kernel, pre_run_cell to post_run_cell"),
                            ("cpu", "the same, CPU time of the kernel process")):
            inspected, plain = by_case[f"{case}_inspected"][clock], by_case[case][clock]
            difference = common.paired_difference(inspected, plain)
            rows.append((f"inspector on {case} in JupyterLab ({clock})", difference,
                         common.paired_interval(inspected, plain), share * common.summary(plain)["median_ms"],
                         what))
        own = common.summary(by_case[f"{case}_inspected"]["spent"])["median_ms"]
        rows.append((f"inspector's own code in {case} in JupyterLab", own, None, share * baseline,
                     "timed in the kernel around every inspector entry point, median of the rounds"))
        cost = common.paired_difference(walls[f"{case}_inspected"], walls[case])
        shares.append(f"{case} {100 * cost / baseline:+.1f} % (its own code {100 * own / baseline:.2f} %)")
    print(common.targets_table(rows), "\n")
    print(f"Share of the cell's time: {'; '.join(shares)}.\n")


if __name__ == "__main__":
    common.entry_point(main)
