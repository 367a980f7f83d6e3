"""JupyterLab in headless Chromium: a person opening the notebook sees the shapes before the model runs, the
statuses move while it runs, and value summaries after.

The notebook's model waits at two gates (files this test creates, see ``lab_harness.gated_model_source``). The
test opens a gate only after the page shows the state it expects, so each intermediate state is checked on the
rendered page while the cell is provably still running. At the end it takes a screenshot of the inspector and
checks that the picture shows the saved rows' colour. With ``NNSIGHT_MAGIC_UPDATE_SCREENSHOT=1`` the `%%trace`
notebook's screenshot also replaces ``docs/images/inspector.png``, the picture the README shows (otherwise a
test run leaves the repository as it was).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lab_harness import CHROMIUM, KERNEL_READY_JS, RUN_ALL_JS, JupyterLab, gated_model_source, launch_chromium, \
    write_notebook

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)")

SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "inspector.png"
WAIT_MS = 120_000

PYTHON_API_CELLS = ["""from nnsight_magic import NNsight
from nnsight_magic.widgets import GraphInspector
net = NNsight(model)
with net.trace(x) as tracer:
    GraphInspector(tracer)
    h = net.layer1.output.save()
    net.layer2.output[:, 0] = 0
    out = net.output.save()""",
                    'print("h", h.value.min().item(), h.value.mean().item(), h.value.max().item())']

MAGIC_CELLS = ["""from nnsight_magic import NNsight
net = NNsight(model)
%load_ext nnsight_magic""",
               """%%trace net x
h = net.layer1.output
net.layer2.output[:, 0] = 0
out = net.output""",
               'print("h", h.min().item(), h.mean().item(), h.max().item())']

#: the same trace written with the Python API and as a %%trace cell: its cells, and the cell line of each row
NOTEBOOKS = {"python": (PYTHON_API_CELLS, ["6", "7", "7", "8"]), "magic": (MAGIC_CELLS, ["2", "3", "3", "4"])}

#: the inspector's rows as the page shows them
ROWS_JS = """() => Array.from(document.querySelectorAll('.nnsight-inspector table.nnsight-rows tr[data-node]'))
  .map(row => ({
    node: row.dataset.node, status: row.dataset.status,
    line: row.querySelector('td.line').textContent, name: row.querySelector('td.name').textContent,
    shape: row.querySelector('td.shape').textContent, dtype: row.querySelector('td.dtype').textContent,
    summary: (row.querySelector('td.value .summary') || {textContent: ''}).textContent,
    picture: !!row.querySelector('td.value svg.nnsight-picture')}))"""


def wait_for_statuses(page, expected: list[str]) -> None:
    page.wait_for_function(
        f"(expected) => JSON.stringify(({ROWS_JS})().map(row => row.status)) === JSON.stringify(expected)",
        arg=expected, timeout=WAIT_MS, polling=100)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory):
    with JupyterLab(tmp_path_factory.mktemp("lab")) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.parametrize("flavour", ["python", "magic"])
def test_jupyterlab_shows_shapes_then_live_statuses_then_summaries(lab, browser, flavour: str):
    cells, lines = NOTEBOOKS[flavour]
    gates = lab.root / f"gates-{flavour}"
    gates.mkdir()
    write_notebook(lab.root / f"{flavour}.ipynb", [gated_model_source(str(gates))] + cells)
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(lab.notebook_url(f"{flavour}.ipynb"))
        page.wait_for_function(KERNEL_READY_JS, timeout=WAIT_MS, polling=200)
        page.evaluate(RUN_ALL_JS)

        # 1. the rows, with shapes, while the model waits at its first gate: nothing has run
        wait_for_statuses(page, ["pending"] * 4)
        before = page.evaluate(ROWS_JS)
        assert [(row["name"], row["shape"], row["dtype"]) for row in before] == [
            ("layer1.output", "(3, 10)", "float32"), ("layer2.output", "(3, 2)", "float32"),
            ("%1[:, 0] = 0", "(3, 2)", "float32"), ("model.output", "(3, 2)", "float32")]
        assert [row["line"] for row in before] == lines
        assert page.locator(".nnsight-inspector .header").first.get_attribute("data-state") == "running"
        (gates / "1").touch()

        # 2. layer1 ran (saved), layer2 is held at the second gate: the page shows it mid-run
        wait_for_statuses(page, ["saved", "pending", "pending", "pending"])
        (gates / "2").touch()

        # 3. the end: final statuses and the saved values' summaries, equal to what the kernel prints
        wait_for_statuses(page, ["saved", "freed", "freed", "saved"])
        page.wait_for_function("() => document.querySelector('.nnsight-inspector .header')"
                               ".getAttribute('data-state') === 'done'", timeout=WAIT_MS, polling=100)
        printed = page.locator(".jp-OutputArea-output", has_text="h ").last
        printed.wait_for(timeout=WAIT_MS)
        minimum, mean, maximum = (float(value) for value in printed.inner_text().split()[1:4])
        after = page.evaluate(ROWS_JS)
        assert after[0]["summary"].startswith(f"min {minimum:.3g}  mean {mean:.3g}  max {maximum:.3g}")
        assert after[0]["picture"] and after[3]["picture"]
        assert [row["summary"] for row in after[1:3]] == ["", ""]

        # 4. the dependency graph, drawn in the page when its panel is opened
        inspector = page.locator(".nnsight-inspector").first
        inspector.get_by_text("graph", exact=True).click()
        nodes = inspector.locator("svg.nnsight-graph g.node")
        nodes.last.wait_for(state="visible", timeout=WAIT_MS)
        assert [nodes.nth(index).get_attribute("data-kind") for index in range(nodes.count())] == \
            ["module", "module", "edit", "module"]

        shot = lab.root / f"{flavour}.png"
        inspector.screenshot(path=str(shot))
        assert_shows_saved_rows(shot)
        if flavour == "magic" and os.environ.get("NNSIGHT_MAGIC_UPDATE_SCREENSHOT"):  # the README's picture
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            SCREENSHOT.write_bytes(shot.read_bytes())
    finally:
        page.close()


def assert_shows_saved_rows(path: Path) -> None:
    """The screenshot is a real picture of the table: it holds the brown of the saved rows' status."""
    import numpy
    from PIL import Image

    pixels = numpy.asarray(Image.open(path).convert("RGB"), dtype=numpy.int16)
    height, width, _ = pixels.shape
    assert width >= 600 and height >= 200, (width, height)
    brown = int((numpy.abs(pixels - numpy.array([0xA5, 0x2A, 0x2A])) < 24).all(axis=-1).sum())
    assert brown >= 30, f"only {brown} pixels of the saved colour in {path}"
