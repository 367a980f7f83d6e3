"""The inspector, graph view and session view, checked headless: widget state as a front end would receive it.

Every widget here talks to a recording comm (ipywidgets' own testing approach), so the assertions read the exact
messages a browser would get: the table HTML each update carries, parsed back into rows.
"""

from __future__ import annotations

import gc
import re
import threading
import time
import weakref
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser
from typing import Any

import comm
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from conftest import make_tiny
from language_fixtures import make_tiny_gpt2
from magic_shell import ok
from nnsight_magic import NNsight
from nnsight_magic.intervention.tracer import Tracer
from nnsight_magic.models.language import LanguageModel
from nnsight_magic.widgets import GraphInspector, GraphView, SessionView, graph_svg, summarize
from nnsight_magic.widgets import inspector as inspector_module
from nnsight_magic.widgets.kinds import MODULE, SAVED_COLOUR, node_kind
from nnsight_magic.widgets.summaries import HISTOGRAM_BINS, STRIP_LIMIT
from nnsight_magic.widgets.throttle import Throttle


# ------------------------------------------------------------------------------------------------ helpers
class Recorder:
    """Every comm message widgets send, in order: ``(comm_id, msg_type, data)``."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, str, dict]] = []

    def updates(self, widget: Any, key: str) -> list[Any]:
        """The values of ``key`` that ``widget`` sent, in order (its opening state first); for the live table's
        ``value``, what its front end shows after each message: the last whole table with the patches since."""
        values = []
        for comm_id, msg_type, data in self.messages:
            if comm_id != widget.model_id:
                continue
            state = data.get("state", {})
            if key in state:
                values.append(state[key])
            elif key == "value" and data.get("method") == "custom" and values:
                values.append(apply_patch(values[-1], data["content"]))
        return values

    def last(self, widget: Any, key: str) -> Any:
        return self.updates(widget, key)[-1]


def apply_patch(table: str, patch: dict) -> str:
    """What ``widgets/inspector.js`` does with a patch of the live table: the new header part, rows and heads."""
    top, scroll, rows = table.partition('<div class="nnsight-scroll">')
    assert top.startswith('<div class="nnsight-top">') and scroll
    for node, row in patch["rows"]:
        rows, found = re.subn(rf'<tr [^>]*data-node="{node}"[^>]*>.*?</tr>', lambda _: row, rows, count=1, flags=re.S)
        assert found == 1, f"patched row {node} is not in the table"
    for position, head in patch["heads"]:
        rows, found = re.subn(rf'(<tbody [^>]*data-index="{position}"[^>]*>)<tr class="group-head.*?</tr>',
                              lambda match: match.group(1) + head, rows, count=1, flags=re.S)
        assert found == 1, f"patched group head {position} is not in the table"
    return f'<div class="nnsight-top">{patch["top"]}</div>{scroll}{rows}'


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    record = Recorder()

    class RecordingComm(comm.base_comm.BaseComm):
        def publish_msg(self, msg_type: str, data: Any = None, metadata: Any = None, buffers: Any = None,
                        **keys: Any) -> None:
            record.messages.append((self.comm_id, msg_type, data or {}))

    monkeypatch.setattr(comm, "create_comm", lambda **kwargs: RecordingComm(**kwargs))
    return record


class _RowParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict[str, str]] = []
        self._cell: str | None = None
        self._in_picture = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "svg":
            self._in_picture = True
        elif tag == "tr" and "data-node" in values:
            self.rows.append({"node": values["data-node"], "status": values["data-status"],
                              "kind": values["data-kind"]})
        elif tag == "td" and self.rows and values.get("class") in ("shape", "dtype", "name", "expression", "line", "value"):
            self._cell = values["class"]
            self.rows[-1].setdefault(self._cell, "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._cell = None
        elif tag == "svg":
            self._in_picture = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None and not self._in_picture:
            self.rows[-1][self._cell] += data


class Displays(list):
    """Stands in for IPython's ``display``: what was shown (this list) and each ``update`` of a display handle."""

    def __init__(self, shown: list) -> None:
        super().__init__(shown)
        self.updates: list[tuple[Any, dict]] = []

    def __call__(self, shown: Any, display_id: Any = None, **options: Any) -> Any:
        self.append(shown)
        updates = self.updates

        class Handle:
            def update(self, bundle: dict, raw: bool = False) -> None:
                updates.append((shown, bundle))
        return Handle() if display_id else None


def parse_rows(table_html: str) -> list[dict[str, str]]:
    """The rows of a table as sent to the front end: node, status, kind, line, name, shape, dtype, value text."""
    parser = _RowParser()
    parser.feed(table_html)
    return parser.rows


def statuses(table_html: str) -> list[str]:
    return [row["status"] for row in parse_rows(table_html)]


def when_really_called(action: Any) -> Any:
    """A forward (pre-)hook that calls ``action()`` when the model runs on real tensors, not in the shape scan."""
    def hook(module: Any, args: tuple, *output: Any) -> None:
        if not isinstance(args[0], FakeTensor):
            action()
    return hook


class Looping(NNsight):
    """A model that runs its module ``max_new_tokens`` times, the way generation calls a language model."""

    def generate(self, *inputs: Any, max_new_tokens: int) -> Tracer:
        return Tracer(self, inputs, {}, run_options={"generate": True, "max_new_tokens": max_new_tokens})

    def _run(self, prepared: Any, options: dict) -> Any:
        output = None
        for _ in range(options.get("max_new_tokens", 1)):
            output = self._module(*prepared.args, **prepared.kwargs)
        return output


def trace_five_nodes(net: NNsight, x: torch.Tensor, **inspector_options: Any) -> tuple[GraphInspector, Any, Any]:
    """%0 layer1.output (saved), %1 layer2.output, %2 an edit of it, %3 %0.sum(), %4 the model's output (saved)."""
    with net.trace(x) as tracer:
        inspector = GraphInspector(tracer, **inspector_options)
        hidden = net.layer1.output.save()
        net.layer2.output[:, 0] = 0
        net.layer1.output.sum()
        out = net.output.save()
    return inspector, hidden, out


# ---------------------------------------------------------------------------------------- the inspector
def test_rows_with_shapes_reach_the_front_end_before_the_model_runs(recorder, net, tiny, x):
    seen_by_the_model: list[list[dict[str, str]]] = []
    handle = tiny.layer1.register_forward_pre_hook(when_really_called(
        lambda: seen_by_the_model.append(parse_rows(recorder.last(inspector_box[0].live, "value")))))
    inspector_box: list[GraphInspector] = []
    try:
        with net.trace(x) as tracer:
            inspector_box.append(GraphInspector(tracer, update_interval=0))
            net.layer1.output.save()
            net.layer2.output[:, 0] = 0
            net.layer1.output.sum()
            net.output.save()
    finally:
        handle.remove()
    assert len(seen_by_the_model) == 1
    rows = [(row["node"], row["expression"], row["shape"], row["dtype"], row["status"], row["kind"])
            for row in seen_by_the_model[0]]
    assert rows == [  # each node in the words of the cell: the nodes it reads by their expressions, not numbers
        ("0", "layer1.output", "(3, 10)", "float32", "pending", "module"),
        ("1", "layer2.output", "(3, 2)", "float32", "pending", "module"),
        ("2", "layer2.output[:, 0] = 0", "(3, 2)", "float32", "pending", "edit"),
        ("3", "layer1.output.sum()", "()", "float32", "pending", "compute"),
        ("4", "model.output", "(3, 2)", "float32", "pending", "module"),
    ]
    line = int(seen_by_the_model[0][0]["line"])
    assert [int(row["line"]) for row in seen_by_the_model[0]] == [line, line + 1, line + 1, line + 2, line + 3]
    header = recorder.last(inspector_box[0].live, "value")
    assert 'data-state="done"' in header and "5/5 nodes ran" in header


def test_statuses_move_while_the_model_runs(recorder, net, tiny, x):
    box: list[GraphInspector] = []
    at_layer2: list[list[str]] = []
    at_model_end: list[list[str]] = []
    handles = [tiny.layer2.register_forward_pre_hook(when_really_called(
                   lambda: at_layer2.append(statuses(recorder.last(box[0].live, "value"))))),
               tiny.register_forward_hook(when_really_called(
                   lambda: at_model_end.append(statuses(recorder.last(box[0].live, "value")))))]
    try:
        with net.trace(x) as tracer:
            box.append(GraphInspector(tracer, update_interval=0))
            net.layer1.output.save()
            net.layer2.output[:, 0] = 0
            net.layer1.output.sum()
            net.output.save()
    finally:
        for handle in handles:
            handle.remove()
    # layer1 has run: its output is saved, the sum of it ran and was freed; nothing of layer2 has run yet
    assert at_layer2 == [["saved", "pending", "pending", "freed", "pending"]]
    # layer2 has run and its edit was applied (both freed: nobody reads them again); the model's output is next
    assert at_model_end == [["saved", "freed", "freed", "freed", "pending"]]
    assert statuses(recorder.last(box[0].live, "value")) == ["saved", "freed", "freed", "freed", "saved"]
    assert [row.runs for row in box[0].rows] == [1, 1, 1, 1, 1]


def test_saved_values_get_torch_statistics_after_the_run(recorder, net, x):
    inspector, hidden, out = trace_five_nodes(net, x)
    saved = {row.index: row.summary for row in inspector.rows if row.summary is not None}
    assert sorted(saved) == [0, 4]
    for index, value in ((0, hidden.value), (4, out.value)):
        summary = saved[index]
        assert (summary.minimum, summary.mean, summary.maximum) == \
               (value.min().item(), value.mean().item(), value.max().item())
        assert summary.std == value.std().item()
        assert summary.shape == tuple(value.shape) and summary.dtype == "float32"
    sent = {row["node"]: row["value"] for row in parse_rows(recorder.last(inspector.live, "value"))}
    assert sent["0"] == saved[0].describe() and sent["4"] == saved[4].describe()
    assert sent["1"] == sent["2"] == sent["3"] == ""
    assert f"min {hidden.value.min().item():.3g}" in sent["0"]


def test_a_run_shorter_than_the_update_interval_sends_its_rows_and_its_end_only(recorder, net, x):
    inspector, _, _ = trace_five_nodes(net, x, update_interval=3600)
    tables = [table for table in recorder.updates(inspector.live, "value") if parse_rows(table)]
    # the rows when the graph is built; the changes of the run wait for the interval to pass, and the end of the
    # run sends the final state at once (cancelling the trailing update)
    assert [statuses(table) for table in tables] == [["pending"] * 5, ["saved", "freed", "freed", "freed", "saved"]]
    assert not inspector._throttle.pending and inspector._throttle.runs == 2


def test_generation_shows_its_step_on_a_progress_bar(recorder):
    model = make_tiny()
    net = Looping(model)
    box: list[GraphInspector] = []
    at_step: list[tuple[int, str, list[str], list[int]]] = []

    def before_step() -> None:  # runs after the trace's own step hook (that one is prepended)
        inspector = box[0]
        sent = recorder.last(inspector.live, "value")
        progress = re.search(r'class="progress" data-step="(\d+)" data-total="(\d+)".*?</div></div>(step [^<]*)</div>',
                             sent)
        runs = [row.runs for row in inspector.rows]
        at_step.append((int(progress.group(1)), progress.group(3), statuses(sent), runs))

    handle = model.register_forward_pre_hook(when_really_called(before_step))
    try:
        with net.generate(torch.rand(1, 5), max_new_tokens=4) as tracer:
            box.append(GraphInspector(tracer, update_interval=0))
            sums = tracer.list().save()
            with tracer.all():
                sums.append(net.layer1.output.sum())
    finally:
        handle.remove()
    inspector = box[0]
    assert [row.name for row in inspector.rows] == ["sums", "", "", "", ""]   # what the cell's lines bound
    assert [row.expression for row in inspector.rows] == ["list()", "generation step", "layer1.output",
                                                          "layer1.output.sum()", "sums.append(layer1.output.sum())"]
    assert [row.flags for row in inspector.rows] == [""] + ["steps [:]"] * 4
    assert [entry[0] for entry in at_step] == [1, 2, 3, 4]
    assert [entry[1] for entry in at_step] == ["step 1/4", "step 2/4", "step 3/4", "step 4/4"]
    # at the start of each step the block's rows wait again; the list lives on
    # (the step index is delivered as the block is armed; nothing reads it, so it is freed at once)
    assert [entry[2] for entry in at_step] == [["saved", "freed", "pending", "pending", "pending"]] * 4
    assert [entry[3][2] for entry in at_step] == [0, 1, 2, 3]
    assert [row.runs for row in inspector.rows] == [1, 4, 4, 4, 4]
    final = recorder.last(inspector.live, "value")
    assert 'data-step="4" data-total="4"' in final and 'class="header" data-state="done" data-step="3"' in final
    assert inspector.step == 3 and inspector.steps_total == 4
    assert len(sums.value) == 4 and inspector.rows[0].summary.text == "list of 4 tensors () float32"


def test_a_language_model_generation_is_followed_step_by_step(recorder):
    lm = LanguageModel(make_tiny_gpt2())
    with lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3) as tracer:
        inspector = GraphInspector(tracer)
        tokens = tracer.list().save()
        with tracer.all():
            tokens.append(lm.lm_head.output[0, -1].argmax())
        generated = tracer.result.save()
    assert inspector.steps_total == 3 and inspector.step == 2
    assert [(row.name, row.expression, row.shape, row.runs) for row in inspector.rows] == [
        ("tokens", "list()", "[() int64]", 1), ("", "generation step", "", 3),
        ("", "lm_head.output", "(1, 1, 50257)", 3), ("", "lm_head.output[0, -1]", "(50257,)", 3),
        ("", "lm_head.output[0, -1].argmax()", "()", 3),
        ("", "tokens.append(lm_head.output[0, -1].argmax())", "[() int64]", 3), ("generated", "result", "(1, 6)", 1)]
    assert [int(token) for token in tokens.value] == generated.value[0, 3:].tolist()
    assert inspector.rows[-1].summary.maximum == generated.value.max().item()
    assert 'data-step="3" data-total="3"' in recorder.last(inspector.live, "value")


def test_an_error_turns_its_row_red_with_the_message(recorder, net, x):
    def explode(value: torch.Tensor) -> torch.Tensor:
        raise ValueError("no negative numbers here")

    with pytest.raises(ValueError, match="no negative numbers here"):
        with net.trace(x) as tracer:
            inspector = GraphInspector(tracer)
            hidden = net.layer1.output
            tracer.apply(explode, hidden)
            net.output.save()
    assert inspector.state == "failed"
    assert [row.status for row in inspector.rows] == ["done", "error", "not run"]
    assert "no negative numbers here" in inspector.rows[1].error
    assert inspector.error.startswith("ValueError: ") and "no negative numbers here" in inspector.error
    rows = parse_rows(recorder.last(inspector.live, "value"))
    assert [row["status"] for row in rows] == ["done", "error", "not run"]
    assert "no negative numbers here" in rows[1]["value"]
    assert 'data-state="failed"' in recorder.last(inspector.live, "value")


def test_a_scan_shows_shapes_without_statuses(recorder, net, x):
    with net.scan(x) as tracer:
        inspector = GraphInspector(tracer)
        net.layer2.output[0].save()
    assert inspector.state == "scanned"
    assert [(row["expression"], row["shape"], row["status"])
            for row in parse_rows(recorder.last(inspector.live, "value"))] \
        == [("layer2.output", "(3, 2)", ""), ("layer2.output[0]", "(2,)", "")]


def test_a_graph_is_shown_as_it_is(recorder, net, x):
    with net.trace(x, validate=False) as tracer:
        net.layer1.output.save()
    inspector = GraphInspector(tracer.graph)
    assert inspector.state == "static"
    assert [(row.expression, row.shape, row.dtype, row.status) for row in inspector.rows] == \
        [("layer1.output", "", "", "")]
    bundle = inspector._repr_mimebundle_()
    assert bundle["text/plain"] == inspector.text() == str(inspector)
    assert repr(inspector) == "<GraphInspector static: 1 node>"
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == inspector.model_id
    assert inspector.text().splitlines()[2].split() == [str(inspector.rows[0].line), "layer1.output", "-", "-", "-"]
    assert "<table" in bundle["text/html"] and "layer1.output" in bundle["text/html"]   # shown without a kernel


def test_without_a_front_end_a_text_summary_is_printed(net, x, capsys):
    inspector, hidden, _ = trace_five_nodes(net, x)
    printed = capsys.readouterr().out
    built, memory, finished = printed.splitlines()[:7], printed.splitlines()[7], printed.splitlines()[8:]
    assert memory == "memory: saves 144 B · largest value 120 B (hidden)"   # (3, 10) + (3, 2) float32, from shapes
    assert built[0] == "Sequential · cpu · 1 input (3 rows) · 0/5 nodes ran — running"
    assert built[1].split() == ["line", "name", "expression", "shape", "dtype", "status"]
    assert [line.split()[1] for line in built[2:7]] == ["hidden", "layer2.output", "layer2.output[:,",
                                                         "hidden.sum()", "out"]
    assert finished[0].startswith("Sequential · cpu · 1 input (3 rows) · 5/5 nodes ran · ")
    assert finished[0].endswith(" s — done")
    summary = inspector.rows[0].summary
    assert finished[1] == f"  line {inspector.rows[0].line} hidden: {summary.describe()}  {summary.sparkline()}"
    assert len(finished) == 3


def test_in_a_notebook_it_displays_itself_once_when_the_graph_is_built(recorder, net, tiny, x, monkeypatch):
    shown: list[tuple[Any, int]] = []
    calls = []
    handle = tiny.register_forward_pre_hook(when_really_called(lambda: calls.append(len(shown))))
    monkeypatch.setattr(inspector_module, "in_notebook", lambda: True)
    monkeypatch.setattr(inspector_module, "display", lambda widget, **options: shown.append((widget, len(calls))))
    try:
        inspector, _, _ = trace_five_nodes(net, x)
    finally:
        handle.remove()
    assert shown == [(inspector, 0)]      # displayed once, before the model was called
    assert calls == [1]


def test_a_session_trace_is_recorded_then_runs_with_the_session(recorder, net, x):
    with net.session():
        with net.trace(x) as first:
            first_inspector = GraphInspector(first)
            hidden = net.layer1.output.save()
        assert first_inspector.state == "recorded"
        assert [row.status for row in first_inspector.rows] == ["pending"]
        with net.trace(x) as second:
            second_inspector = GraphInspector(second)
            net.layer1.output[:] = hidden * 2
            out = net.output.save()
        assert second_inspector.rows[0].expression.startswith("from trace 0: layer1.output")
        assert second_inspector.rows[0].kind.name == "bridge"
    assert first_inspector.state == second_inspector.state == "done"
    assert first_inspector.rows[0].summary.maximum == hidden.value.max().item()
    assert second_inspector.rows[-1].summary.mean == out.value.mean().item()


def test_a_displayed_inspector_keeps_no_trace_or_value_alive(recorder, net, x):
    with net.trace(x) as tracer:
        inspector = GraphInspector(tracer)
        hidden = net.layer1.output.save()
    references = [weakref.ref(tracer), weakref.ref(tracer.graph), weakref.ref(hidden.value)]
    del tracer, hidden
    gc.collect()
    assert [reference() for reference in references] == [None, None, None]
    assert inspector.rows[0].summary.shape == (3, 10)


def test_without_validation_shapes_come_from_the_saved_values(recorder, net, x):
    with net.trace(x, validate=False) as tracer:
        inspector = GraphInspector(tracer)
        net.layer1.output.save()
        net.layer2.output.sum()
    sent = [parse_rows(table) for table in recorder.updates(inspector.live, "value") if table]
    assert [(row["shape"], row["dtype"], row["status"]) for row in sent[0]] == [("—", "—", "pending")] * 3
    assert [(row["shape"], row["dtype"], row["status"]) for row in sent[-1]] == \
        [("(3, 10)", "float32", "saved"), ("—", "—", "freed"), ("—", "—", "freed")]


# ------------------------------------------------------------------------------------------- summaries
def test_summaries_of_tensors_use_torch_statistics():
    torch.manual_seed(3)
    big = torch.randn(40, 50)
    summary = summarize(big)
    assert (summary.minimum, summary.mean, summary.maximum, summary.std) == \
           (big.min().item(), big.mean().item(), big.max().item(), big.std().item())
    assert summary.picture == "histogram" and len(summary.bins) == HISTOGRAM_BINS
    low, high = big.min().item(), big.max().item()
    by_hand = [0.0] * HISTOGRAM_BINS            # bin of v: floor((v - low) / (high - low) * bins), the max in the last
    for value in big.reshape(-1).tolist():
        by_hand[min(HISTOGRAM_BINS - 1, int((value - low) * (HISTOGRAM_BINS / (high - low))))] += 1
    assert list(summary.bins) == by_hand
    assert sum(summary.bins) == big.numel()
    small = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    assert summarize(small).picture == "strip" and summarize(small).bins == (0.5, -1.0, 2.0, 0.0)
    assert summarize(small).describe() == "min -1  mean 0.375  max 2  std 1.25"
    assert summarize(torch.zeros(STRIP_LIMIT + 1)).picture == "histogram"
    ints = torch.tensor([1, 2, 4])
    assert (summarize(ints).minimum, summarize(ints).mean, summarize(ints).maximum) == (1.0, 7 / 3, 4.0)
    assert summarize(ints).dtype == "int64"
    assert summarize(torch.tensor(2.5)).describe() == "= 2.5"
    assert summarize(torch.empty(0, 3)).describe() == "empty"
    with_nan = torch.tensor([1.0, float("nan"), 3.0, float("inf")] * 20)
    nan_summary = summarize(with_nan)
    assert nan_summary.nonfinite == 40 and nan_summary.describe().endswith("40 non-finite")
    assert sum(nan_summary.bins) == 40 and (nan_summary.low, nan_summary.high) == (1.0, 3.0)


def test_summaries_of_other_values():
    assert summarize([torch.zeros(2), torch.ones(2)]).text == "list of 2 tensors (2,) float32"
    assert summarize([1, 2.5, "a"]).text == "list of 3: [1, 2.5, 'a']"
    assert summarize(3).describe() == "3" and summarize(3).kind == "scalar"
    assert summarize({"a": 1}).describe() == "{'a': 1}"


def test_pictures_are_small_svgs():
    histogram = summarize(torch.arange(1000.0)).svg()
    tree = ElementTree.fromstring(histogram)
    assert tree.get("data-picture") == "histogram"
    assert len(list(tree.iter("{http://www.w3.org/2000/svg}rect"))) == HISTOGRAM_BINS
    strip = ElementTree.fromstring(summarize(torch.tensor([-1.0, 0.0, 1.0])).svg())
    assert [rect.get("fill") for rect in strip.findall("{http://www.w3.org/2000/svg}rect")] == \
        ["#0000ff", "#ffffff", "#ff0000"]


# --------------------------------------------------------------------------------------------- throttle
def test_throttle_runs_at_once_then_once_after_the_interval():
    runs: list[str] = []
    throttle = Throttle(lambda: runs.append(threading.current_thread().name), interval=0.05)
    throttle.request()
    throttle.request()
    throttle.request()
    assert len(runs) == 1 and throttle.pending    # the first at once, the others wait for one trailing run
    deadline = time.monotonic() + 10
    while len(runs) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runs == [threading.current_thread().name, "nnsight-magic-widget-updates"] and not throttle.pending


def test_throttle_flush_runs_now_and_drops_the_trailing_run():
    runs = []
    throttle = Throttle(lambda: runs.append(1), interval=3600)
    throttle.request()
    throttle.request()
    assert len(runs) == 1 and throttle.pending
    throttle.flush()
    assert len(runs) == 2 and not throttle.pending
    throttle.trailing(throttle._ticket)      # the dropped trailing run, should it come due: nothing happens
    assert len(runs) == 2


def test_throttle_with_no_interval_runs_every_request():
    runs = []
    throttle = Throttle(lambda: runs.append(1), interval=0)
    for _ in range(5):
        throttle.request()
    assert len(runs) == 5 and not throttle.pending


# ------------------------------------------------------------------------------------------- graph view
def test_the_graph_is_drawn_with_the_seed_styles(recorder, net, x):
    with net.trace(x) as tracer:
        hidden = net.layer1.output
        logits = net.layer2(hidden).save()
        with tracer.cond(hidden.sum() > 0):
            tracer.log("positive")
        net.layer2.output[:] = 0
        tracer.stop()
    graph = tracer.graph
    kinds = [node_kind(graph, node).name for node in graph.nodes]
    assert kinds == ["module", "apply", "compute", "compute", "condition", "log", "module", "edit", "stop"]
    svg = ElementTree.fromstring(graph_svg(graph))
    namespace = "{http://www.w3.org/2000/svg}"
    groups = [group for group in svg.iter(f"{namespace}g") if group.get("class") == "node"]
    assert [group.get("data-kind") for group in groups] == kinds
    assert [group.get("data-saved") for group in groups] == ["0", "1", "0", "0", "0", "0", "0", "0", "0"]
    first_outline = groups[0].find(f"{namespace}rect")
    assert first_outline.get("stroke") == MODULE.colour == "var(--jp-success-color1, #388e3c)"   # the theme's
    saved_outline = groups[1].find(f"{namespace}rect")
    assert saved_outline.get("stroke") == SAVED_COLOUR
    assert groups[1].find(f"{namespace}polygon").get("stroke") == "var(--jp-brand-color1, #1976d2)"  # apply: blue
    assert groups[4].find(f"{namespace}polygon").get("stroke") == "var(--jp-warn-color1, #f57c00)"      # condition: an orange hexagon
    assert groups[8].find(f"{namespace}polygon").get("stroke") == "var(--jp-error-color1, #d32f2f)"      # stop: a red hexagon
    edges = [path for path in svg.iter(f"{namespace}path") if "edge" in path.get("class", "").split()]
    expected = [(dependency, node.index) for node in graph.nodes for dependency in node.dependencies]
    assert [(int(path.get("data-from")), int(path.get("data-to"))) for path in edges] == expected
    dashed = {(int(path.get("data-from")), int(path.get("data-to"))) for path in edges if path.get("stroke-dasharray")}
    assert dashed == {(dependency, node.index) for node in graph.nodes for dependency in node.dependencies
                      if dependency not in node.data_dependencies}
    left = {int(group.get("data-node")): float(group.find(f"{namespace}text").get("x")) for group in groups}
    for source, target in expected:    # every edge goes left to right
        assert left[source] < left[target]


def test_graph_view_widget_and_the_inspector_panel(recorder, net, x):
    inspector, _, _ = trace_five_nodes(net, x)
    drawn = recorder.last(inspector.graph_view, "value")
    assert drawn.count('class="node"') == 5 and "<svg" in drawn
    assert drawn.startswith('<details class="nnsight-graph-panel"><summary')    # folded until clicked
    assert len(recorder.updates(inspector.graph_view, "value")) == 1           # made once, with its drawing
    assert inspector.children == (inspector.live, inspector.graph_view)
    with net.trace(x) as tracer:
        net.layer1.output.save()
    assert GraphView(tracer.graph).value.count('class="node"') == 1


# ----------------------------------------------------------------------------------------- session view
class FakeCell:
    """A recorded cell as the magics' cross-cell session keeps it."""

    def __init__(self, number: int, source: str, tracer: Tracer, names: dict[str, Any]):
        self.number, self.source, self.tracer, self.names = number, source, tracer, names


class FakeCrossCellSession:
    """The shape of the magics' ``%session`` object that ``SessionView`` is written against."""

    def __init__(self, session: Any):
        self.session = session
        self.cells: list[FakeCell] = []
        self.status = "open"
        self._listeners: list[Any] = []

    def add_listener(self, callback: Any) -> None:
        self._listeners.append(callback)

    def changed(self) -> None:
        for callback in self._listeners:
            callback(self)


def test_session_view_follows_the_cells_and_the_run(recorder, net, tiny, x):
    session = net.session()
    cross = FakeCrossCellSession(session)
    view = SessionView(cross)
    assert view.cells == [] and 'data-state="open"' in recorder.last(view, "value")
    session.activate()
    try:
        with net.trace(x) as first:
            hidden = net.layer1.output.save()
        cross.cells.append(FakeCell(2, "%%trace net x\nhidden = net.layer1.output\n", first, {"hidden": hidden}))
        cross.changed()
        with net.trace(x) as second:
            net.layer1.output[:] = hidden * 2
            out = net.output.save()
        cross.cells.append(FakeCell(3, "%%trace net x\nnet.layer1.output[:] = hidden * 2\nout = net.output\n",
                                    second, {"out": out}))
        cross.changed()
    finally:
        session.deactivate()
    assert [(cell.number, cell.code, cell.status) for cell in view.cells] == [
        (2, "hidden = net.layer1.output", "recorded"), (3, "net.layer1.output[:] = hidden * 2", "recorded")]
    assert [(value.source_cell, value.shape, value.dtype) for value in view.cells[1].receives] == \
        [(2, "(3, 10)", "float32")]
    assert view.cells[1].receives[0].label == f"layer1.output ({hidden.node.location})"
    assert [(saved.name, saved.shape, saved.summary) for saved in view.cells[0].saves] == [("hidden", "(3, 10)", None)]
    sent = recorder.last(view, "value")
    assert sent.count("<tr data-cell=") == 2 and 'data-from="2"' in sent
    assert "1 value bridged" in recorder.last(view, "value")

    seen_during_run: list[list[str]] = []
    calls = {"count": 0}

    def during() -> None:
        calls["count"] += 1
        if calls["count"] == 2:        # the second trace's forward pass: the first cell is done
            seen_during_run.append([cell.status for cell in view.cells])

    handle = tiny.layer2.register_forward_pre_hook(when_really_called(during))
    try:
        cross.status = "running"
        cross.changed()
        session.run()
        cross.status = "done"
        cross.changed()
    finally:
        handle.remove()
    assert seen_during_run == [["done", "running"]]
    assert [cell.status for cell in view.cells] == ["done", "done"]
    hidden_summary = view.cells[0].saves[0].summary
    assert (hidden_summary.minimum, hidden_summary.maximum) == (hidden.value.min().item(), hidden.value.max().item())
    assert view.cells[1].saves[0].summary.mean == out.value.mean().item()
    assert 'data-state="done"' in recorder.last(view, "value")
    assert view.text().splitlines()[0] == "session · done · 2 cells · 1 value bridged"
    assert view._repr_mimebundle_()["text/plain"] == view.text()
    watchers = [observer for observer in second.observers if getattr(observer, "view", None) is view]
    assert len(watchers) == 1             # refreshing again does not watch a cell twice


# ------------------------------------------------------------------------------------------- the magics
TRACE_BODY = "%%trace net x\nh = net.layer1.output\nnet.layer2.output[:, 0] = 0\nout = net.output\n"


@pytest.fixture
def notebook(ip, recorder, monkeypatch):
    """The magics' shell, widgets on, seen as a notebook front end: ``notebook.shown`` lists what was displayed."""
    shown = Displays([])
    monkeypatch.setattr(inspector_module, "in_notebook", lambda: True)
    monkeypatch.setattr(inspector_module, "display", shown)
    monkeypatch.setattr("nnsight_magic.magics.magics.display", shown.append)
    ok(ip, "%config TraceMagics.widget = True")
    ip.user_ns.update(net=NNsight(make_tiny()), x=torch.rand(3, 5))
    ip.shown = shown
    ip.updates = shown.updates if hasattr(shown, "updates") else None
    return ip


def test_trace_cells_show_the_inspector_by_default(notebook):
    ok(notebook, TRACE_BODY)
    [inspector] = notebook.shown
    assert isinstance(inspector, GraphInspector) and inspector.state == "done"
    assert [(row.line, row.name, row.expression, row.status) for row in inspector.rows] == [
        (2, "h", "layer1.output", "saved"), (3, "", "layer2.output", "freed"),
        (3, "", "layer2.output[:, 0] = 0", "freed"), (4, "out", "model.output", "saved")]
    [(_, update)] = notebook.updates      # after the run the live widget gives way to its static rendering
    assert update["text/html"] == inspector.static_html() and "application/vnd.jupyter.widget-view+json" not in update
    assert inspector.rows[0].source == "h = net.layer1.output"
    h = notebook.user_ns["h"]
    assert (inspector.rows[0].summary.minimum, inspector.rows[0].summary.maximum) == (h.min().item(), h.max().item())
    ok(notebook, TRACE_BODY.replace("net x", "net x --no-widget"))
    ok(notebook, "%config TraceMagics.widget = False")
    ok(notebook, TRACE_BODY)
    assert notebook.shown == [inspector]


def test_trace_cells_print_a_text_summary_without_a_front_end(ip, capsys):
    ok(ip, "%config TraceMagics.widget = True")
    ip.user_ns.update(net=NNsight(make_tiny()), x=torch.rand(3, 5))
    ok(ip, TRACE_BODY)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "%%trace net x · Sequential · cpu · 1 input (3 rows) · 0/4 nodes ran — running"
    assert [line.split()[:3] for line in printed[2:6]] == [["2", "h", "layer1.output"], ["3", "layer2.output", "(3,"],
                                                           ["3", "layer2.output[:,", "0]"], ["4", "out", "model.output"]]
    h = ip.user_ns["h"]
    assert any(line.startswith(f"  line 2 h: min {h.min().item():.3g}  mean {h.mean().item():.3g}")
               for line in printed[6:])


def test_session_view_of_the_magics_session(notebook):
    ok(notebook, "%session start")
    ok(notebook, "%%trace net x\nh = net.layer1.output\n")
    ok(notebook, "%%trace net x\nnet.layer1.output[:] = h * 2\nout = net.output\n")
    ok(notebook, "%session")
    [view] = [shown for shown in notebook.shown if isinstance(shown, SessionView)]
    first, second = view.cells
    assert (first.status, second.status) == ("recorded", "recorded")
    assert [(value.source_cell, value.label, value.shape) for value in second.receives] == \
        [(first.number, "layer1.output (line 2)", "(3, 10)")]
    assert (first.code, second.code) == ("h = net.layer1.output", "net.layer1.output[:] = h * 2")
    ok(notebook, "%session run")
    assert view.status == "done" and [cell.status for cell in view.cells] == ["done", "done"]
    h, out = notebook.user_ns["h"], notebook.user_ns["out"]
    assert view.cells[0].saves[0].summary.mean == h.mean().item()
    assert view.cells[1].saves[0].summary.maximum == out.max().item()
