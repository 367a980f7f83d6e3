"""Widgets that show a trace while it is built and while it runs.

In [1]: from nnsight_magic.widgets import GraphInspector
In [2]: with net.trace(x) as tracer:
   ...:     GraphInspector(tracer)                # shapes now, statuses while the model runs, summaries after
   ...:     h = net.layer1.output.save()

``GraphInspector`` (one row per node, live), ``GraphView`` (the dependency graph as SVG), ``SessionView`` (the
cells of an open ``%session`` and the values bridged between them), ``summarize`` (shape, dtype, min/mean/max
and a small picture of a value). ``%%trace`` shows a ``GraphInspector`` for every cell.
"""

from .graph_view import GraphView, graph_svg
from .inspector import GraphInspector
from .session_view import SessionView
from .summaries import ValueSummary, summarize

__all__ = ["GraphInspector", "GraphView", "SessionView", "ValueSummary", "graph_svg", "summarize"]
