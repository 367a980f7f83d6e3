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

import json
import os
import re
from pathlib import Path

import pytest

from lab_harness import CHROMIUM, CONTRAST_JS, KERNEL_READY_JS, RUN_ALL_JS, JupyterLab, gated_model_source, \
    launch_chromium, set_theme_js, write_notebook

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
    expression: row.querySelector('td.expression').textContent,
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
        assert [(row["name"], row["expression"], row["shape"], row["dtype"]) for row in before] == [
            ("h", "layer1.output", "(3, 10)", "float32"), ("", "layer2.output", "(3, 2)", "float32"),
            ("", "layer2.output[:, 0] = 0", "(3, 2)", "float32"), ("out", "model.output", "(3, 2)", "float32")]
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
        # the print cell's own output ("h MIN MEAN MAX"; the inspector's table also reads "h layer1.output")
        printed = page.locator(".jp-OutputArea-output", has_text=re.compile(r"^h -?\d")).last
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

        assert page.locator(".nnsight-inspector-static").count() == 1   # the finished run, as a static page
        saved_colour = page.evaluate("() => getComputedStyle(document.querySelector("
                                     "'.nnsight-inspector tr[data-status=saved] td.status')).color")
        shot = lab.root / f"{flavour}.png"
        inspector.screenshot(path=str(shot))
        assert_shows_saved_rows(shot, [int(part) for part in re.findall(r"\d+", saved_colour)[:3]])
        if flavour == "magic" and os.environ.get("NNSIGHT_MAGIC_UPDATE_SCREENSHOT"):  # the README's picture
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            SCREENSHOT.write_bytes(shot.read_bytes())
    finally:
        page.close()


def assert_shows_saved_rows(path: Path, colour: list[int]) -> None:
    """The screenshot is a real picture of the table: it holds the colour of the saved rows' status."""
    import numpy
    from PIL import Image

    pixels = numpy.asarray(Image.open(path).convert("RGB"), dtype=numpy.int16)
    height, width, _ = pixels.shape
    assert width >= 600 and height >= 200, (width, height)
    matching = int((numpy.abs(pixels - numpy.array(colour)) < 24).all(axis=-1).sum())
    assert matching >= 30, f"only {matching} pixels of the saved colour {colour} in {path}"


IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"

VIEWER_CELLS = ["""%load_ext nnsight_magic
import torch
from nnsight_magic import NNsight
from nnsight_magic.widgets import AttentionHeads, LogitLens, TensorView, TokenValues
torch.manual_seed(0)
tokens = ["The", " Eiff", "el", " Tower", " is", " in"]
vocab = [" Paris", " London", " the", " city", " France", " a", " in", " Rome"]
net = NNsight(torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(6)]))
x = torch.rand(6, 8)""",
                """%%trace net x
lens = [layer.output.softmax(-1) for layer in net]
last = net.output""",
                "LogitLens(torch.stack(lens) ** 2 / (torch.stack(lens) ** 2).sum(-1, keepdim=True), tokens=tokens, "
                "decode=lambda token: vocab[token])",
                "AttentionHeads(torch.rand(4, 6, 6).tril().div(0.1).softmax(-1).tril().div(torch.rand(4, 6, 6)"
                ".tril().div(0.1).softmax(-1).tril().sum(-1, keepdim=True)), tokens=tokens)",
                "TokenValues(last[:, 0] - last[:, 0].mean(), tokens=tokens)",
                "TensorView(torch.stack(lens))"]

#: each viewer's front end, as its anywidget renders it (the interactive form, not the static fallback)
VIEWERS = {"inspector": ".nnsight-inspector", "logit_lens": ".nnsight-logit-lens", "attention_heads":
           ".nnsight-attention-heads", "token_values": ".nnsight-token-values", "tensor_view": ".nnsight-tensor-view"}
TEXT = (".nnsight-inspector .header, .nnsight-inspector th, .nnsight-inspector td.name, "
        ".nnsight-inspector td.expression, .nnsight-inspector tr.group-head label, .nnsight-viewer .title, "
        ".nnsight-viewer th")


def test_viewers_and_the_inspector_read_in_light_and_dark_themes(lab, browser):
    """Every viewer renders its interactive front end; hovering the lens draws a trajectory; in both themes every
    header and label has at least WCAG AA contrast (4.5); screenshots go to docs/images with
    NNSIGHT_MAGIC_UPDATE_SCREENSHOT=1."""
    write_notebook(lab.root / "viewers.ipynb", VIEWER_CELLS)
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    try:
        page.goto(lab.notebook_url("viewers.ipynb"))
        page.wait_for_function(KERNEL_READY_JS, timeout=WAIT_MS, polling=200)
        page.evaluate(RUN_ALL_JS)
        for selector in VIEWERS.values():
            page.locator(selector).first.wait_for(timeout=WAIT_MS)
        page.wait_for_function("() => !!document.querySelector('.nnsight-inspector-static')", timeout=WAIT_MS)
        group = page.locator(".nnsight-inspector tbody.foldable").first
        assert group.get_attribute("data-count") == "6"
        assert not page.locator(".nnsight-inspector tbody.foldable tr[data-node]").first.is_visible()
        group.locator("tr.group-head label").click()                 # the folded loop opens
        assert page.locator(".nnsight-inspector tbody.foldable tr[data-node]").first.is_visible()
        page.locator(".nnsight-logit-lens td[data-layer='2'][data-position='1']").hover()
        page.locator(".nnsight-logit-lens svg.trajectory polyline").wait_for(timeout=WAIT_MS)
        page.locator(".nnsight-attention-heads .head[data-head='2']").click()
        assert page.locator(".nnsight-attention-heads .head.locked").get_attribute("data-head") == "2"
        assert page.locator(".nnsight-token-values span.token").count() == 6
        assert page.locator(".nnsight-tensor-view input[type=range]").count() == 1
        for theme, suffix in (("JupyterLab Light", "light"), ("JupyterLab Dark", "dark")):
            assert page.evaluate(set_theme_js(theme)) == theme
            lowest, worst = page.evaluate(CONTRAST_JS, TEXT)
            assert lowest >= 4.5, f"{theme}: text {worst!r} has contrast {lowest:.2f}"
            for name, selector in VIEWERS.items():
                shot = lab.root / f"{name}-{suffix}.png"
                page.locator(selector).first.screenshot(path=str(shot))
                assert shot.stat().st_size > 2000
                if os.environ.get("NNSIGHT_MAGIC_UPDATE_SCREENSHOT"):
                    IMAGES.mkdir(parents=True, exist_ok=True)
                    (IMAGES / shot.name).write_bytes(shot.read_bytes())
        page.evaluate(set_theme_js("JupyterLab Light"))
        page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
        page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty",
                               timeout=WAIT_MS, polling=200)
    finally:
        page.close()


def test_a_saved_notebook_reopened_without_a_kernel_shows_the_static_inspector(lab, browser):
    """The notebook the viewers test saved (run that test first: they share the module's server), opened with no
    kernel: the inspector is its static table, never "model not found"."""
    saved = json.loads((lab.root / "viewers.ipynb").read_text())
    saved["metadata"]["kernelspec"] = {"name": "no-such-kernel", "display_name": "none", "language": "python"}
    (lab.root / "reopened.ipynb").write_text(json.dumps(saved))
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    try:
        page.goto(lab.notebook_url("reopened.ipynb"))
        page.locator(".nnsight-inspector-static").first.wait_for(timeout=WAIT_MS)
        inspector = page.locator(".nnsight-inspector-static").first
        # an edited notebook is untrusted: JupyterLab sanitizes its HTML (no data attributes, no scripts), the
        # words stay
        assert "— done" in inspector.locator(".header").inner_text()
        assert "×6" in inspector.inner_text() and "lens[5]" in inspector.text_content()
        assert "model not found" not in inspector.inner_text()
        inspector.screenshot(path=str(lab.root / "reopened.png"))
    finally:
        page.close()
