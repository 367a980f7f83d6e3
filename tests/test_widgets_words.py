"""The inspector at classroom scale and in the student's words: names, expressions, loops folded per line,
integers and tokens, the theme's colours, and a static rendering that needs no kernel.

Cells run through the real ``%%trace`` magic in an InteractiveShell (``magic_shell.ip``); the inspector is caught
where it displays itself, its rows and HTML read back.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest
import torch

from language_fixtures import make_tiny_gpt2, tokenizer_or_skip
from magic_shell import ok
from nnsight_magic import NNsight
from nnsight_magic.models.language import LanguageModel
from nnsight_magic.widgets import GraphInspector, LogitLens, summarize
from nnsight_magic.widgets import inspector as inspector_module
from nnsight_magic.widgets.table import CSS


class Displays(list):
    """IPython's ``display`` stood in for: what was shown, and each display handle update (the static form)."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[dict] = []

    def __call__(self, shown: Any, display_id: Any = None, **options: Any) -> Any:
        self.append(shown)
        updates = self.updates

        class Handle:
            def update(self, bundle: dict, raw: bool = False) -> None:
                updates.append(bundle)
        return Handle()


@pytest.fixture
def notebook(ip, monkeypatch):
    shown = Displays()
    monkeypatch.setattr(inspector_module, "in_notebook", lambda: True)
    monkeypatch.setattr(inspector_module, "display", shown)
    ok(ip, "%config TraceMagics.widget = True")
    ip.shown = shown
    return ip


class Deep(torch.nn.Module):
    """Thirty small layers in a ModuleList, like a transformer's blocks."""

    def __init__(self, count: int = 30):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(count))
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


LENS_CELL = """%%trace net x
lens = [net.head(layer.output).softmax(-1) for layer in net.layers]
stacked = torch.stack(lens)
best = net.output[0].argmax()
"""


def test_a_loop_over_thirty_layers_folds_into_one_group_per_line(notebook):
    notebook.user_ns.update(net=NNsight(Deep()), x=torch.rand(1, 4), torch=torch)
    ok(notebook, LENS_CELL)
    inspector = notebook.shown[0]
    groups = inspector.table.groups
    assert [(group.line, group.count, len(group.members)) for group in groups] == [(2, 30, 90), (3, 1, 1),
                                                                                   (4, 1, 3)]
    assert groups[0].pattern == "layers[i].output → …"
    names = [row.name for row in inspector.rows]
    assert [names[index] for index in groups[0].members[2::3]] == [f"lens[{layer}]" for layer in range(30)]
    rows = {row.name: row for row in inspector.rows if row.name}
    assert rows["lens[3]"].expression == "head(layers[3].output).softmax(-1)"
    assert rows["stacked"].expression.startswith("torch.stack([lens[0], lens[1], … 30 items")
    assert rows["best"].expression == "model.output[0].argmax()"
    page = inspector.static_html()
    assert 'data-group="line2" data-count="30" class="foldable"' in page
    assert re.search(r"line 2 · ×30 · <span[^>]*>layers\[i\]\.output → …</span>", page)
    assert 'class="nnsight-scroll"' in page and "max-height: 26em" in page     # a bounded, scrolling table
    text = inspector.text().splitlines()
    assert len(text) - len(inspector.table.summary_lines()) == 8 and re.search(r"^\s*2\s+×30\s+layers\[i\]\.output → …", text[2])


def test_a_numbered_child_of_the_root_reads_as_an_index_of_the_model():
    net = NNsight(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    with net.trace(torch.rand(2, 4)) as tracer:
        net[0].output.save()
        net[1](net[0].output)
    assert [row.expression for row in GraphInspector(tracer.graph).rows] == \
        ["model[0].output", "model[1](model[0].output)"]   # one node per value read


def test_integers_read_as_integers_and_token_ids_are_decoded():
    tokenizer = tokenizer_or_skip()
    paris = tokenizer.encode(" Paris")[0]
    assert summarize(torch.tensor(paris), tokenizer.decode).describe() == f"= {paris}  ' Paris'"
    assert summarize(torch.tensor([paris, 11])).describe() == f"= [{paris}, 11]"
    assert summarize(torch.arange(100)).describe().startswith("min 0  mean 49.5  max 99")
    lm = LanguageModel(make_tiny_gpt2(), tokenizer=tokenizer)
    with lm.trace("The Eiffel Tower is in") as tracer:
        inspector = GraphInspector(tracer)
        top = lm.lm_head.output[0, -1].argmax().save()
    token = int(top.value)
    assert inspector.rows[-1].summary.describe() == f"= {token}  {tokenizer.decode(token)!r}"
    assert inspector.rows[-1].name == "top"


def test_f_strings_and_booleans_read_as_written(notebook):
    notebook.user_ns.update(net=NNsight(Deep(2)), x=torch.rand(1, 4))
    ok(notebook, '%%trace net x\nh = net.layers[0].output\nlabel = f"{h.sum():.2f} total"\nboth = h.any() and h.all()\n')
    expressions = {row.name: row.expression for row in notebook.shown[0].rows if row.name}
    assert expressions["label"] == 'f"{h.sum():.2f} total"'
    assert expressions["both"] == "h.any() and h.all()"


def test_colours_come_from_the_theme():
    hard_coded = re.findall(r"(?<!, )#[0-9a-fA-F]{3,6}\b", CSS)
    assert hard_coded == []         # every colour is var(--jp-..., fallback)
    assert "var(--jp-content-font-color1" in CSS and "var(--jp-layout-color0" in CSS


class _Text(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_the_finished_inspector_is_replaced_by_a_static_rendering(notebook):
    notebook.user_ns.update(net=NNsight(Deep(2)), x=torch.rand(1, 4))
    ok(notebook, "%%trace net x\nh = net.layers[1].output\n")
    [inspector] = notebook.shown
    [bundle] = notebook.shown.updates
    assert set(bundle) == {"text/html", "text/plain"}            # no widget: a saved notebook shows it as it is
    parser = _Text()
    parser.feed(bundle["text/html"])
    text = "".join(parser.text)
    assert "done" in text and "h" in text and inspector.rows[0].summary.describe() in text
    assert bundle["text/plain"] == inspector.text()
    live = inspector._repr_mimebundle_()
    assert {"application/vnd.jupyter.widget-view+json", "text/html", "text/plain"} <= set(live)


def test_the_header_forecasts_memory_from_shapes_and_warns_above_the_threshold(notebook):
    notebook.user_ns.update(net=NNsight(Deep(3)), x=torch.rand(5, 4))
    ok(notebook, "%config TraceMagics.memory_warning = '100B'")
    ok(notebook, "%%trace net x\nfirst = net.layers[0].output[0]\nlast = net.layers[2].output\n")
    inspector = notebook.shown[0]
    # `first` is a view: it keeps all of layers[0].output (5 × 4 float32) alive; `last` is 5 × 4 float32 too
    assert (inspector.forecast.saved, inspector.forecast.largest) == (2 * 5 * 4 * 4, 5 * 4 * 4)
    assert "memory: saves 160 B · largest value 80 B" in inspector.text()
    assert "above 100 B (%config TraceMagics.memory_warning)" in inspector.text()
    ok(notebook, "%config TraceMagics.memory_warning = '1GB'")
    ok(notebook, "%%trace net x\nlast = net.layers[2].output\n")
    assert "above" not in notebook.shown[1].text()
    notebook.run_line_magic("config", "TraceMagics.memory_warning = 'lots'")   # refused: the setting stays
    assert notebook.run_line_magic("config", "TraceMagics.memory_warning") == "1GB"


def test_generation_shows_the_tokens_so_far_even_when_the_cell_reads_only_the_result(monkeypatch):
    tokenizer = tokenizer_or_skip()
    lm = LanguageModel(make_tiny_gpt2(), tokenizer=tokenizer)
    seen: list[str] = []
    monkeypatch.setattr(inspector_module, "in_notebook", lambda: True)
    monkeypatch.setattr(inspector_module, "display", lambda widget, **options: None)
    with lm.generate("The Eiffel Tower is in", max_new_tokens=4) as tracer:
        inspector = GraphInspector(tracer, update_interval=0)
        inspector.live.observe(lambda change: seen.append(change["new"]), "value")
        send_patch = inspector.live.patch          # while it runs, updates are patches: the header and changed rows
        inspector.live.patch = lambda top, rows, heads: (seen.append(top), send_patch(top, rows, heads))
        result = tracer.result.save()
    prompt_length = len(tokenizer("The Eiffel Tower is in")["input_ids"])
    generated = result.value[0, prompt_length:].tolist()
    assert inspector.tokens.generated == generated
    assert inspector.generated_text() == tokenizer.decode(generated)
    counts = [int(match) for page in seen for match in re.findall(r'class="generated" data-tokens="(\d+)"', page)]
    assert counts[:4] == [1, 2, 3, 4]                      # one more token at each update while it generated
    assert "streamer" not in tracer.run_options           # the run's options are as the cell gave them


def test_a_trace_cell_shows_the_viewer_its_graph_tells_under_the_inspector(notebook):
    tokenizer = tokenizer_or_skip()
    notebook.user_ns.update(lm=LanguageModel(make_tiny_gpt2(), tokenizer=tokenizer), prompt="The Eiffel Tower is in")
    ok(notebook, "%%trace lm prompt\n"
                 "lens = [lm.lm_head(lm.transformer.ln_f(block.output[0, -1])).softmax(-1) for block in lm.transformer.h]\n"
                 "hidden = lm.transformer.h[0].output\n")
    inspector, viewer = notebook.shown                  # the inspector, then the lens; `hidden` gets no viewer
    assert isinstance(inspector, GraphInspector) and isinstance(viewer, LogitLens)
    lens = notebook.user_ns["lens"]
    assert [[token for token, _ in row] for row in viewer.data["top"]] == [[int(row.argmax())] for row in lens]
    assert viewer.data["tokens"] == [" in"]
    ok(notebook, "%%trace lm prompt --no-widget\nlens = [lm.lm_head(block.output[0, -1]).softmax(-1) "
                 "for block in lm.transformer.h]\n")
    assert len(notebook.shown) == 2                     # no inspector, no viewer
