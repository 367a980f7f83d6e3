"""A session that spans notebook cells: ``%session start`` … ``%%trace`` cells … ``%session run``.

In [1]: %session start
In [2]: %%trace net a
   ...: h = net.layer1.output                 # recorded, not run: `h` is a proxy for now
In [3]: %%trace net b
   ...: net.layer1.output[:] = h * 2          # `h` from cell 2 crosses over (a bridge)
   ...: out = net.output
In [4]: %session run                          # both traces run, in order; `h` and `out` become tensors

:class:`NotebookSession` wraps the engine's :class:`~nnsight_magic.intervention.session.Session` and keeps one
:class:`SessionCell` per recorded cell (its number, source, trace and autosaved names). A cell that fails while
it is built is never recorded, so the earlier cells stay as they were. Live views (the widgets' ``SessionView``)
call :meth:`NotebookSession.add_listener` and are told after every change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..intervention.session import Session
from ..intervention.tracer import DONE, FAILED, Tracer
from .bindings import CellBindings

OPEN, RUNNING, DONE_STATUS, FAILED_STATUS = "open", "running", "done", "failed"


@dataclass
class SessionCell:
    """One recorded cell.

    Attributes:
        number: the cell's execution count (``In[number]``).
        source: the cell's text, ``%%trace`` line included.
        tracer: the cell's recorded trace.
        names: name → the proxy (or container of proxies) saved for it; real values after the run.
    """

    number: int
    source: str
    tracer: Tracer
    bindings: CellBindings = field(repr=False)

    @property
    def names(self) -> dict[str, Any]:
        return self.bindings.saved


class NotebookSession:
    """Records ``%%trace`` cells and runs them as one session; see the module docstring.

    Attributes:
        session: the engine session the cells' traces are recorded into.
        cells: the recorded cells, in order.
        status: ``"open"`` (recording), ``"running"``, ``"done"`` or ``"failed"`` (a failed run, or discarded).
    """

    def __init__(self) -> None:
        self.session = Session()
        self.cells: list[SessionCell] = []
        self.status = OPEN
        self._listeners: list[Callable[["NotebookSession"], None]] = []

    def add_listener(self, callback: Callable[["NotebookSession"], None]) -> None:
        """Call ``callback(this_session)`` after every change (a cell recorded, a run started or ended)."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback(self)

    # ----------------------------------------------------------------------------------------- recording
    def record(self, number: int, source: str, tracer: Tracer, bindings: CellBindings) -> SessionCell:
        """Add a cell whose trace the engine session has just recorded."""
        cell = SessionCell(number, source, tracer, bindings)
        self.cells.append(cell)
        self._changed()
        return cell

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> None:
        """Run every recorded trace in order, then bind each cell's saved names to their real values.

        If a trace fails, the cells that ran keep their values; the failing cell's and later cells' names go
        back to what they were before those cells, and the error says which cell failed.
        """
        self.status = RUNNING
        self._changed()
        try:
            self.session.run()
        except BaseException as error:
            self.status = FAILED_STATUS
            failed = next((cell for cell in self.cells if cell.tracer.status == FAILED), None)
            if failed is not None:
                error.add_note(f"while `%session run` ran the trace of cell In[{failed.number}]")
            for cell in reversed(self.cells):
                if cell.tracer.status != DONE:
                    cell.bindings.unbind_saved()
            for cell in self.cells:
                if cell.tracer.status == DONE:
                    cell.bindings.bind()
            self._changed()
            raise
        for cell in self.cells:
            cell.bindings.bind()
        self.status = DONE_STATUS
        self._changed()

    def discard(self) -> None:
        """Drop every recorded cell without running it; their names get back their earlier values."""
        self.session.discard()
        for cell in reversed(self.cells):
            cell.bindings.unbind_saved()
        self.status = FAILED_STATUS
        self._changed()

    # ------------------------------------------------------------------------------------------- display
    def summary(self) -> str:
        """A few lines of text: status, and per cell its number, names and graph size."""
        what = {OPEN: "open: `%%trace` cells are recorded; `%session run` runs them, `%session discard` drops "
                      "them",
                RUNNING: "running", DONE_STATUS: "done", FAILED_STATUS: "failed"}[self.status]
        lines = [f"nnsight session ({len(self.cells)} cell{'s' if len(self.cells) != 1 else ''}) — {what}"]
        for cell in self.cells:
            names = ", ".join(cell.names) or "no saved names"
            nodes, bridges = len(cell.tracer.graph.nodes), len(cell.tracer.bridges)
            lines.append(f"  In[{cell.number}]: {names}  ({nodes} node{'s' if nodes != 1 else ''}"
                         f"{f', {bridges} from earlier cells' if bridges else ''}; {cell.tracer.status})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<NotebookSession {self.status}: {len(self.cells)} cell(s)>"
