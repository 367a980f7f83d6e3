"""``SessionView``: the cells of an open ``%session``, the values bridged between them, and their shapes.

In [1]: %session start
In [2]: %%trace net x
   ...: h = net.layer1.output                      # recorded, not run
In [3]: %%trace net y
   ...: net.layer1.output[:] = h                   # h crosses over from cell 2: a bridge
In [4]: SessionView(session)                       # the magic's cross-cell session: one row per recorded cell
In [5]: %session run                               # the view follows: each cell running, then done, with summaries

The view listens to the session (``session.add_listener``) and rebuilds its rows after every change; while the
session runs it also follows each cell's trace (as one of the trace's observers), so a cell's status moves from
``recorded`` to ``running`` to ``done`` as it happens. Rows hold strings and summaries only, never a value.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import ipywidgets

from ..tracing.proxy import Proxy
from .summaries import ValueSummary, summarize
from . import theme
from .table import STYLE, shape_and_dtype

_NOT_COMPUTED = object()
_CELL_COLOURS = {"recorded": theme.TEXT_SECONDARY, "running": theme.ACCENT, "done": theme.SUCCESS, "failed": theme.ERROR}


@dataclass
class SavedName:
    """A name a cell binds: its shape while recorded, its value's summary once the session ran."""

    name: str
    shape: str
    dtype: str
    summary: ValueSummary | None = None


@dataclass
class BridgedValue:
    """A value a cell receives from an earlier cell."""

    source_cell: int | None
    label: str
    shape: str
    dtype: str


@dataclass
class CellRow:
    """One recorded cell as the view shows it."""

    number: int
    code: str
    status: str
    saves: list[SavedName] = field(default_factory=list)
    receives: list[BridgedValue] = field(default_factory=list)


class SessionView(ipywidgets.HTML):
    """The cells of a cross-cell session and the values they pass on (see the module docstring).

    Args:
        session: the ``%session`` object of the magics: ``.cells`` (each with ``.number``, ``.source``,
            ``.tracer`` and ``.names``), ``.status`` and ``add_listener(callback)``.

    Attributes:
        cells: one :class:`CellRow` per recorded cell, in order.
        status: the session's status (``open``, ``running``, ``done``, ``failed``).
    """

    def __init__(self, session: Any):
        super().__init__(_dom_classes=("nnsight-inspector",))
        self.status = ""
        self.cells: list[CellRow] = []
        session.add_listener(self.refresh)
        self.refresh(session)

    def refresh(self, session: Any) -> None:
        """Rebuild every row from ``session`` (the session calls this after each change)."""
        self.status = session.status
        cell_of_trace = {cell.tracer.session_index: cell.number for cell in session.cells
                         if cell.tracer.session_index is not None}
        rows = []
        for cell in session.cells:
            tracer = cell.tracer
            if not any(isinstance(observer, _CellWatch) and observer.view is self for observer in tracer.observers):
                tracer.observers.append(_CellWatch(self, cell.number))
            saves = [_saved_name(name, proxy) for name, proxy in cell.names.items()]
            receives = []
            for (source_trace, _), bridge in tracer.bridges.items():
                shape, dtype = shape_and_dtype(bridge.node.fake)
                receives.append(BridgedValue(cell_of_trace.get(source_trace), bridge.node.meta.get("label", ""),
                                             shape, dtype))
            rows.append(CellRow(cell.number, _first_line(cell.source), tracer.status, saves, receives))
        self.cells = rows
        self._render()

    # ------------------------------------------------------------------------------------ text
    def text(self) -> str:
        """The view as plain text."""
        lines = [self._header_text()]
        for row in self.cells:
            lines.append(f"  In [{row.number}] {row.status}: {row.code}")
            for value in row.receives:
                source = _cell_name(value.source_cell)
                lines.append(f"      <- {source}: {value.label} {value.shape} {value.dtype}".rstrip())
            for saved in row.saves:
                summary = f"  {saved.summary.describe()}" if saved.summary is not None else ""
                lines.append(f"      {saved.name} {saved.shape} {saved.dtype}{summary}".rstrip())
        return "\n".join(lines)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if bundle is not None:
            bundle["text/plain"] = self.text()
        return bundle

    # ------------------------------------------------------------------------------- internals
    def _cell_status(self, number: int, status: str) -> None:
        """A cell's trace started or finished running (told by its :class:`_CellWatch`)."""
        for row in self.cells:
            if row.number == number:
                row.status = status
        self._render()

    def _header_text(self) -> str:
        return f"session · {self.status} · {self._counts_text()}"

    def _counts_text(self) -> str:
        count = len(self.cells)
        bridged = sum(len(row.receives) for row in self.cells)
        return f"{count} cell{'s' if count != 1 else ''} · {bridged} value{'s' if bridged != 1 else ''} bridged"

    def __repr__(self) -> str:
        return f"<SessionView {self.status}: {len(self.cells)} cells>"

    def _render(self) -> None:
        """Send the header and one row per cell to the front end."""
        escape = html.escape
        colour = _CELL_COLOURS.get(self.status, theme.TEXT_SECONDARY)
        header = (f'<div class="header" data-state="{escape(self.status)}"><b>%session</b> · '
                  f'<span class="state" style="color:{colour}">{escape(self.status)}</span> · '
                  f'{escape(self._counts_text())}</div>')
        body = []
        for row in self.cells:
            receives = "<br>".join(
                f'<span class="bridge" data-from="{value.source_cell}">← {escape(_cell_name(value.source_cell))}: '
                f'{escape(value.label)} <span class="muted">{escape(value.shape)} {escape(value.dtype)}</span>'
                '</span>' for value in row.receives)
            saves = "<br>".join(
                f'<span class="saved-name" data-name="{escape(saved.name)}"><b>{escape(saved.name)}</b> '
                f'<span class="muted">{escape(saved.shape)} {escape(saved.dtype)}</span>'
                + (f' <span class="summary">{escape(saved.summary.describe())}</span>{saved.summary.svg()}'
                   if saved.summary is not None else "") + "</span>"
                for saved in row.saves)
            status_colour = _CELL_COLOURS.get(row.status, theme.status_colour(row.status))
            body.append(f'<tr data-cell="{row.number}" data-status="{escape(row.status)}">'
                        f'<td class="line">In&nbsp;[{row.number}]</td><td class="name">{escape(row.code)}</td>'
                        f'<td>{receives}</td><td>{saves}</td>'
                        f'<td class="status" style="color:{status_colour}">{escape(row.status)}</td></tr>')
        head = "<tr><th>cell</th><th>code</th><th>receives</th><th>saves</th><th>status</th></tr>"
        self.value = f'{STYLE}{header}<table class="nnsight-cells">{head}{"".join(body)}</table>'


class _CellWatch:
    """Follows one cell's trace while the session runs it, and tells the view (a trace observer)."""

    def __init__(self, view: SessionView, number: int):
        self.view = view
        self.number = number
        self.started = False

    def graph_built(self, tracer: Any) -> None:
        """Not heard: the view starts watching after the cell was recorded."""

    def node_status(self, index: int, status: int) -> None:
        if not self.started:
            self._start()

    def step_started(self, step: int) -> None:
        if not self.started:
            self._start()

    def _start(self) -> None:
        self.started = True
        self.view._cell_status(self.number, "running")

    def run_finished(self, tracer: Any, execution: Any, error: BaseException | None) -> None:
        self.view._cell_status(self.number, "failed" if error is not None else "done")


def _saved_name(name: str, saved: Any) -> SavedName:
    """A name's row: a proxy's shape (or a container's length) now, its real value's summary after the run."""
    if isinstance(saved, Proxy):
        shape, dtype = shape_and_dtype(saved.node.fake)
    else:
        shape, dtype = f"{type(saved).__name__} of {len(saved)}", ""
    real = _real(saved)
    return SavedName(name, shape, dtype, None if real is _NOT_COMPUTED else summarize(real))


def _real(saved: Any) -> Any:
    """The real value of a proxy or of a list/tuple/dict of proxies; ``_NOT_COMPUTED`` if any part has none yet."""
    if isinstance(saved, Proxy):
        if saved.tracer is not None:
            return _NOT_COMPUTED  # its trace has not run
        try:
            return saved.value
        except ValueError:  # not computed: an early stop, a failed run, a branch not taken
            return _NOT_COMPUTED
    if not isinstance(saved, (list, tuple, dict)):
        return saved
    values = [_real(item) for item in (saved.values() if isinstance(saved, dict) else saved)]
    if any(value is _NOT_COMPUTED for value in values):
        return _NOT_COMPUTED
    if isinstance(saved, dict):
        return dict(zip(saved, values))
    return type(saved)(*values) if hasattr(saved, "_fields") else type(saved)(values)


def _first_line(source: str) -> str:
    for line in source.splitlines():
        if line.strip() and not line.lstrip().startswith("%%"):
            text = line.strip()
            return text if len(text) <= 70 else text[:69] + "…"
    return ""


def _cell_name(number: int | None) -> str:
    return f"In [{number}]" if number is not None else "an earlier trace"
