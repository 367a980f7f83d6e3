"""Widgets that show a trace while it is built and while it runs.

In [1]: from nnsight_magic.widgets import GraphInspector
In [2]: with net.trace(x) as tracer:
   ...:     GraphInspector(tracer)                # shapes now, statuses while the model runs, summaries after
   ...:     h = net.layer1.output.save()

``GraphInspector`` (one row per node, live), ``GraphView`` (the dependency graph as SVG), ``SessionView`` (the
cells of an open ``%session`` and the values bridged between them), ``summarize`` (shape, dtype, min/mean/max
and a small picture of a value). ``%%trace`` shows a ``GraphInspector`` for every cell.

Viewers (anywidget front ends with a static fallback): ``LogitLens``, ``AttentionHeads``, ``TokenValues``,
``TensorView``, and ``view(value, tokens=...)``, which picks the one that fits.
"""

from .graph_view import GraphView, graph_svg
from .inspector import GraphInspector
from .session_view import SessionView
from .summaries import ValueSummary, summarize
from .viewers import AttentionHeads, LogitLens, TensorView, TokenValues, Viewer, view

__all__ = ["AttentionHeads", "GraphInspector", "GraphView", "LogitLens", "SessionView", "TensorView", "TokenValues",
           "ValueSummary", "Viewer", "graph_svg", "summarize", "view"]
