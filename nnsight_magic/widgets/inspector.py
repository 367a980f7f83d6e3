"""``GraphInspector``: every traced value's shape before the model runs, its status while it runs, and a summary
of each saved value after.

In [1]: from nnsight_magic.widgets import GraphInspector
In [2]: with net.trace(x) as tracer:
   ...:     GraphInspector(tracer)                  # shows itself as soon as the graph is built
   ...:     h = net.layer1.output.save()
   ...:     net.layer2.output[:, 0] = 0
In [3]: GraphInspector(tracer.graph)                # any graph, drawn as it is: shapes, no statuses
In [4]: print(GraphInspector(tracer.graph))         # the same as text, in a terminal or a script

Given a tracer, the inspector is one of the tracer's observers (:class:`~nnsight_magic.intervention.backends.
TraceObserver`). When the graph is built it shows one row per node (cell line, what the node is, shape, dtype)
before any real compute; while the model runs each row's status moves ``pending → done → freed`` (or ``saved``),
and generation shows its step on a progress bar; after the run each saved value gets its min/mean/max and a small
picture. The dependency graph is drawn under the table (click "graph").

Updates to the front end are throttled (:class:`~nnsight_magic.widgets.throttle.Throttle`, ``update_interval``
seconds apart, with a trailing update), so a long generation sends a few messages a second, not one per node.
Outside a notebook kernel (a terminal IPython, a script) nothing is drawn: the table is printed as text when the
graph is built, and the saved values' summaries when the run ends.
"""

from __future__ import annotations

import html
import time
from typing import Any

import anywidget
import ipywidgets
import traitlets
from ipywidgets.widgets.widget_string import HTMLStyle
from IPython import get_ipython
from IPython.display import display

from ..intervention.tracer import BUILDING, Tracer
from ..tracing.execution import DONE, FREED, PENDING, SKIPPED, STATUS_NAMES, Execution
from ..tracing.graph import Graph, StepSet
from .graph_view import GraphView, graph_drawing
from .summaries import summarize
from . import theme
from .assets import asset
from .forecast import MemoryForecast, memory_forecast
from .table import CSS, FILTER_SCRIPT, STYLE, NodeTable, Row, table_of
from .throttle import Throttle
from .viewer_choice import ChosenViewer, choose_viewers

_STATE_TEXT = {
    "building": "building the graph", "running": "running", "done": "done", "failed": "failed",
    "interrupted": "interrupted", "recorded": "recorded: runs when the session runs",
    "scanned": "scanned: shapes only, the model did not run", "static": "",
}
GENERATED_TOKENS_SHOWN = 400  # the generated text shows at most this many of the last tokens


_SHARED: dict[str, ipywidgets.Widget] = {}


def shared_look() -> dict[str, ipywidgets.Widget]:
    """One ``Layout`` and one ``HTMLStyle`` for the widgets of every inspector (ipywidgets lets widgets share them).

    Each widget otherwise opens two more comms for its own copies; sharing saves about two thirds of the time it
    takes to build an inspector. A shared one that was closed (``Widget.close_all()``) is made again.
    """
    for name, make in (("layout", ipywidgets.Layout), ("style", HTMLStyle)):
        if name not in _SHARED or _SHARED[name].comm is None:
            _SHARED[name] = make()
    return dict(_SHARED)


def in_notebook() -> bool:
    """True inside a Jupyter kernel (JupyterLab, Notebook, VS Code, Colab), where widgets can be displayed."""
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class LiveTable(anywidget.AnyWidget):
    """The part of the inspector that changes while the model runs: header, progress and table (``value``, HTML).

    ``value`` is the whole table, sent once when the graph is built; while the model runs, :meth:`patch` sends
    only what changed (the header and the rows and group heads whose HTML changed), as a custom message. Its
    front end (``widgets/inspector.js``) applies patches in place, adds a filter box and keeps opened groups and
    the scroll position across updates.

    Attributes:
        stale: ``value`` is not what the front end shows now (patches were sent since, or the last changes were
            not sent because the display was replaced): it is sent again before the widget is shown again.
    """

    _esm = asset("widgets", "inspector.js")
    _css = CSS
    value = traitlets.Unicode("").tag(sync=True)

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        self.stale = False

    def patch(self, top: str, rows: dict[int, str], heads: dict[int, str]) -> None:
        """Replace the header part (``top``), the rows ``{node: html}`` and the group heads ``{position: html}``."""
        self.send({"top": top, "rows": list(rows.items()), "heads": list(heads.items())})
        self.stale = True


class TokenStream:
    """A Hugging Face streamer (``generate(streamer=...)``) that keeps the first row's token ids as they come.

    ``generate`` calls ``put`` with the prompt, then once per step with the new tokens; the inspector shows the
    tokens so far (decoded when it renders, a few times a second) even when the cell reads only ``tracer.result``.
    """

    def __init__(self, on_token: Any):
        self.prompt: list[int] = []
        self.generated: list[int] = []
        self._on_token = on_token

    def put(self, value: Any) -> None:
        ids = value.reshape(value.shape[0], -1)[0].tolist() if value.dim() else [int(value)]
        if not self.prompt and not self.generated:
            self.prompt = ids
            return
        self.generated.extend(ids)
        self._on_token()

    def end(self) -> None:
        pass


class GraphInspector(ipywidgets.VBox):
    """One row per node of a trace: shape first, then live status, then a summary (see the module docstring).

    Args:
        source: a :class:`~nnsight_magic.intervention.tracer.Tracer` that is still being built (the inspector
            follows it live and shows itself when its graph is built), or a :class:`~nnsight_magic.tracing.graph.
            Graph` (or a finished tracer), shown as it is.
        title: the header's first words (``%%trace`` could pass its own line).
        update_interval: the least time, in seconds, between two updates of the front end while the model runs.

    Attributes:
        rows: the :class:`~nnsight_magic.widgets.table.Row` of each node, as shown.
        state: ``building``, ``running``, ``done``, ``failed``, ``recorded`` (a session runs it later),
            ``scanned`` or ``static``.
        step: the generation step running now (``None`` before the first one).
        steps_total: how many steps the generation makes, when known.
        error: ``Type: message`` of the error that ended the run, if it failed.
        live: the widget with the header, the progress bar and the table: the part that changes while the model
            runs (one message per update).
        graph_view: the dependency graph, folded under the table: a :class:`~nnsight_magic.widgets.graph_view.
            GraphView` made when there is a drawing to show (``None`` before: a run's live display has none, and
            its final static rendering carries the drawing itself).
        viewers: the viewers chosen for saved values whose kind the graph tells, shown under the inspector after
            a run that finished (:mod:`~nnsight_magic.widgets.viewer_choice`).
    """

    def __init__(self, source: Tracer | Graph, *, title: str = "", update_interval: float = 0.25,
                 memory_warning: int | None = None):
        look = shared_look()
        self.live = LiveTable(layout=look["layout"])
        self.graph_view: GraphView | None = None
        super().__init__(children=(self.live,), layout=look["layout"], _dom_classes=("nnsight-inspector",))
        self.title = title
        self.state = "building"
        self.step: int | None = None
        self.steps_total: int | None = None
        self.error = ""
        self.details = ""
        self.request = ""  # a remote trace's request while it waits or runs: "queued (place 2)", "on the server"
        self.elapsed: float | None = None
        self.table = NodeTable([])
        self.tokens: TokenStream | None = None
        self.memory_warning = memory_warning
        self.forecast: MemoryForecast | None = None
        self.viewers: list[ChosenViewer] = []
        self._decode: Any = None
        self._sections: list[tuple[StepSet, list[int]]] = []
        self._started = 0.0
        self._handle: Any = None
        self._graph: Graph | None = None
        self._graph_html = ""
        self._table_sent = False
        self._whole_table = False
        self._throttle = Throttle(self._render, update_interval)
        if isinstance(source, Tracer) and source.status == BUILDING:
            source.observers.append(self)
            return
        self._load(source if isinstance(source, Graph) else source.graph, "static")
        self._render()

    @property
    def rows(self) -> list[Row]:
        return self.table.rows

    # ----------------------------------------------------------------------------- TraceObserver
    def graph_built(self, tracer: Tracer) -> None:
        """The graph is built and checked: show its rows (shapes, no values yet), before the model runs."""
        state = "scanned" if tracer.scan_only else "recorded" if tracer.session is not None else "running"
        self._load(tracer.graph, state)
        self.details = describe_run(tracer)
        tokenizer = getattr(tracer.model, "tokenizer", None)
        self._decode = getattr(tokenizer, "decode", None)
        options = tracer.run_options
        if options.get("generate") and options.get("max_new_tokens"):
            self.steps_total = int(options["max_new_tokens"])
        if options.get("generate") and self._decode is not None and "streamer" not in options:
            self.tokens = TokenStream(self._throttle.request)
            options["streamer"] = self.tokens
        self._started = time.perf_counter()
        self._throttle.flush()
        if in_notebook():
            self._handle = display(self, display_id=True)
            if tracer.scan_only and self._handle is not None:  # a scan ends here: nothing more will change
                self._handle.update(self.static_bundle(), raw=True)
        else:
            print(self.text())

    def node_status(self, index: int, status: int) -> None:
        """A node's status changed while the model runs (``DONE``, ``FREED``, ``SKIPPED``)."""
        if self.state != "running":
            self._begin_run()
        row = self.table.rows[index]
        if status == DONE:
            row.runs += 1
            row.status = "saved" if row.saved else "done"
        else:
            row.status = STATUS_NAMES[status]
        self._throttle.request()

    def step_started(self, step: int) -> None:
        """Generation step ``step`` begins: the rows of the iteration blocks that run in it wait again."""
        if self.state != "running":
            self._begin_run()
        self.step = step
        rows = self.table.rows
        for steps, members in self._sections:
            if steps.contains(step):
                for index in members:
                    rows[index].status = "pending"
        self._throttle.request()

    def request_status(self, status: str, place: int | None = None) -> None:
        """A remote trace's request: ``"queued"`` (``place`` in the model's queue, 1 = next) or ``"running"``.

        The header reads ``queued (place 2)``, then ``running on the server`` (with ``step k`` during generation),
        then ``done`` when the answer is back.
        """
        if self.state != "running":
            self._begin_run()
        self.request = f"queued (place {place})" if status == "queued" and place is not None else \
            "running on the server" if status == "running" else str(status or "")
        self._throttle.request()

    def run_finished(self, tracer: Tracer, execution: Execution, error: BaseException | None) -> None:
        """The run ended: final statuses, a summary of every saved value, and what happened if it did not finish.

        A row that ran in an earlier generation step keeps its last status (``saved``, ``done``) when the run
        stops before its next step; only rows that never ran read ``not run``. In a notebook the live widget is
        then replaced by its static rendering (:meth:`static_html`), which a saved notebook, nbconvert HTML and
        GitHub show without a kernel.
        """
        if self.tokens is not None and tracer.run_options.get("streamer") is self.tokens:
            del tracer.run_options["streamer"]
        rows = self.table.rows
        for row in rows:
            state = execution.state[row.index]
            if state == DONE:
                row.status = "saved" if row.saved else "done"
                if row.saved:
                    row.summary = summarize(execution.values[row.index], self._decode)
                    if not row.shape and row.summary.shape is not None:  # no shapes while building (validate=False)
                        row.shape, row.dtype = str(row.summary.shape), row.summary.dtype
            elif state == PENDING:
                row.status = ("saved" if row.saved else "done") if row.runs else "not run"
            elif state in (FREED, SKIPPED):
                row.status = STATUS_NAMES[state]
        if error is not None:
            self.state = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            self.error = describe_failure(error, rows)
            if execution.failed_at is not None:
                rows[execution.failed_at].status = "error"
                rows[execution.failed_at].error = str(error) or type(error).__name__
        else:
            self.state = "done"
            self.viewers = choose_viewers(tracer, execution.values)
        self.request = ""
        if self._graph is not None:
            self._graph_html = graph_drawing(self._graph, folded=True)
            self._graph = None  # the inspector keeps no graph alive after the run
        self.elapsed = time.perf_counter() - self._started
        if self._handle is not None:
            # the display becomes the static rendering: the live widgets get the final state only if shown again
            self._throttle.cancel()
            self.live.stale = True
            self._handle.update(self.static_bundle(), raw=True)
            for chosen in self.viewers:
                display(chosen.viewer)
            return
        self._whole_table = True  # the last update is the whole table: what a view shown later draws
        self._throttle.flush()
        self._sync_widgets()
        if not in_notebook():
            print(self.result_text())

    # ------------------------------------------------------------------------------- static forms
    def text(self) -> str:
        """The header, the table and the memory forecast as plain text (what a terminal shows)."""
        return "\n".join([self._header_text(), self.table.text()] + self._memory_lines())

    def _memory_lines(self) -> list[str]:
        if self.forecast is None or not self.forecast.largest:
            return []
        warning = self.forecast.warning(self.memory_warning)
        return [f"memory: {self.forecast.describe()}"] + ([warning] if warning else [])

    def result_text(self) -> str:
        """The header, one line per saved value's summary, and one per viewer chosen (printed at the end of a run
        outside notebooks)."""
        viewers = [f"  {chosen.kind}: {chosen.viewer.text()}" for chosen in self.viewers]
        return "\n".join([self._header_text()] + self.table.summary_lines() + viewers)

    def static_html(self) -> str:
        """The whole inspector as one self-contained HTML fragment: no widget, no kernel needed.

        Groups still fold (CSS), the filter box filters where the page allows scripts, the graph opens.
        """
        filter_box = (f'<input class="nnsight-filter" placeholder="filter rows (name, expression, status)" '
                      f'oninput="{FILTER_SCRIPT}">')
        return (f'<div class="nnsight-inspector nnsight-inspector-static">{STYLE}{self._live_html(filter_box)}'
                f'{self._graph_html}</div>')

    def static_bundle(self) -> dict[str, str]:
        """``text/html`` and ``text/plain``: what a notebook keeps when no widget can be shown."""
        return {"text/html": self.static_html(), "text/plain": self.text()}

    def _repr_mimebundle_(self, **kwargs: Any) -> dict | None:
        """The widget, and its static forms; while the model runs only the text (the display is replaced by the
        static rendering when the run ends, so the HTML would be sent for nothing)."""
        self._sync_widgets()
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is not None:
            bundle.update({"text/plain": self.text()} if self.state == "running" else self.static_bundle())
        return bundle

    def __repr__(self) -> str:
        count = len(self.rows)
        return f"<GraphInspector {self.state}: {count} node{'s' if count != 1 else ''}>"

    def __str__(self) -> str:
        return self.text()  # print(GraphInspector(graph)) in a script prints the table

    # ------------------------------------------------------------------------------- internals
    def _load(self, graph: Graph, state: str) -> None:
        self.state = state
        self.table = table_of(graph, status="pending" if state in ("running", "recorded") else "")
        self._sections = [(section.steps, list(section.nodes)) for section in graph.sections]
        self.forecast = memory_forecast(graph, [row.name or row.expression for row in self.table.rows])
        self._table_sent = self._whole_table = False
        if state in ("running", "recorded"):
            self._graph = graph  # drawn when the run ends (one message then, none while the model runs)
        else:
            self._graph_html = graph_drawing(graph, folded=True)
            self._show_graph()

    def _begin_run(self) -> None:
        """A recorded trace starts running (its session runs)."""
        self.state = "running"
        self._started = time.perf_counter()

    def _render(self) -> None:
        """Send the header, the progress bar and the table to the front end (the throttle calls this): the whole
        table the first time, then only the rows that changed."""
        if self._table_sent and not self._whole_table:
            rows, heads = self.table.changes()
            self.live.patch(self._top_html(), rows, heads)
            return
        self._send_table()

    def _send_table(self) -> None:
        self.live.value = self._live_html()
        self.table.mark_sent()
        self._table_sent = True
        self.live.stale = False

    def _sync_widgets(self) -> None:
        """Make the widgets' state what they show now (before they are shown again, or at the end of a run whose
        display is not replaced): the whole table, and the graph drawing."""
        if self.live.stale:
            self._send_table()
        if self._graph_html:
            self._show_graph()

    def _show_graph(self) -> None:
        """Put the graph's drawing under the table, making the graph view the first time."""
        if self.graph_view is None:
            self.graph_view = GraphView(folded=True, value=self._graph_html, **shared_look())
            self.children = (self.live, self.graph_view)
        elif self.graph_view.value != self._graph_html:
            self.graph_view.value = self._graph_html

    def _top_html(self) -> str:
        return f"{self._header_html()}{self._progress_html()}{self._generated_html()}"

    def _live_html(self, filter_box: str = "") -> str:
        return f'<div class="nnsight-top">{self._top_html()}</div>{self.table.html(filter_box)}'

    def generated_text(self) -> str:
        """The tokens generated so far, decoded (``""`` when not generating or nothing came yet)."""
        if self.tokens is None or not self.tokens.generated or self._decode is None:
            return ""
        return self._decode(self.tokens.generated[-GENERATED_TOKENS_SHOWN:])

    def _progress_text(self) -> str:
        rows = self.table.rows
        if self.state in ("running", "done", "failed", "interrupted"):
            text = f"{sum(1 for row in rows if row.runs)}/{len(rows)} nodes ran"
        else:
            text = f"{len(rows)} node{'s' if len(rows) != 1 else ''}"
        if self.request:
            text = f"{self.request} · {text}"
        if self.tokens is not None and self.tokens.generated:
            text += f" · {len(self.tokens.generated)} token{'s' if len(self.tokens.generated) != 1 else ''}"
        if self.step is not None and (self.steps_total or self.step > 0):
            text += f" · step {self.step + 1}{'/' + str(self.steps_total) if self.steps_total else ''}"
        if self.elapsed is not None:
            text += f" · {self.elapsed:.2f} s"
        return text

    def _header_text(self) -> str:
        parts = [part for part in (self.title, self.details, self._progress_text()) if part]
        state = _STATE_TEXT[self.state]
        text = " · ".join(parts) + (f" — {state}" if state else "")
        generated = self.generated_text()
        if generated:
            text += f"\ngenerated: {generated!r}"
        return text + (f"\n{self.error}" if self.error else "")

    def _header_html(self) -> str:
        escape = html.escape
        parts = [f"<b>{escape(self.title)}</b>" if self.title else "", escape(self.details),
                 escape(self._progress_text())]
        state = _STATE_TEXT[self.state]
        badge = (f' — <span class="state" style="color:{theme.state_colour(self.state)}">{escape(state)}</span>'
                 if state else "")
        failure = f'<div class="failure">{escape(self.error)}</div>' if self.error else ""
        memory = ""
        if self.forecast is not None and self.forecast.largest:
            warning = self.forecast.warning(self.memory_warning)
            memory = (f'<div class="memory muted" data-saved="{self.forecast.saved}" '
                      f'data-largest="{self.forecast.largest}">memory: {escape(self.forecast.describe())}</div>'
                      + (f'<div class="warning">{escape(warning)}</div>' if warning else ""))
        step = "" if self.step is None else self.step
        return (f'<div class="header" data-state="{self.state}" data-step="{step}">'
                f'{" · ".join(part for part in parts if part)}{badge}</div>{memory}{failure}')

    def _generated_html(self) -> str:
        text = self.generated_text()
        if not text:
            return ""
        prompt = self._decode(self.tokens.prompt[-GENERATED_TOKENS_SHOWN:]) if self.tokens.prompt else ""
        return (f'<div class="generated" data-tokens="{len(self.tokens.generated)}"><span class="muted">'
                f'{html.escape(prompt)}</span><b>{html.escape(text)}</b></div>')

    def _progress_html(self) -> str:
        """A bar of the generation's steps (only when the number of steps is known)."""
        if not self.steps_total or self.step is None:
            return ""
        done = min(self.step + 1, self.steps_total)
        return (f'<div class="progress" data-step="{done}" data-total="{self.steps_total}"><div class="track">'
                f'<div class="bar" style="width:{100 * done / self.steps_total:.1f}%"></div></div>'
                f'step {done}/{self.steps_total}</div>')


def describe_failure(error: BaseException, rows: list[Row]) -> str:
    """What the header says when a run did not finish: the error, and what was kept and what did not run.

    In [1]: describe_failure(KeyboardInterrupt(), rows)
    Out[1]: 'interrupted (KeyboardInterrupt) during the run: 39 saved values kept from the steps that ran; 2 nodes did not run'
    """
    saved = sum(1 for row in rows if row.status == "saved")
    not_run = sum(1 for row in rows if row.status == "not run")
    kept = f"{saved} saved value{'s' if saved != 1 else ''} kept from what ran" if saved else "no value was saved"
    missing = f"; {not_run} node{'s' if not_run != 1 else ''} did not run" if not_run else ""
    if isinstance(error, KeyboardInterrupt):
        return f"interrupted (KeyboardInterrupt) during the run: {kept}{missing}"
    message = str(error).strip()
    return f"{type(error).__name__}{': ' + message if message else ''}\n{kept}{missing}"


def describe_run(tracer: Tracer) -> str:
    """``Sequential · cpu · 2 inputs (3 rows)``: what the trace runs on."""
    model = tracer.model
    count = len(tracer.invokes)
    rows = sum(getattr(invoke, "batch_size", 0) for invoke in tracer.invokes)
    inputs = f"{count} input{'s' if count != 1 else ''} ({rows} row{'s' if rows != 1 else ''})" if count else ""
    return " · ".join(part for part in (type(model._module).__name__, str(model.device), inputs) if part)
