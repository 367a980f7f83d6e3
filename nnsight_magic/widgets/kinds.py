"""What kind of operation a node is, and the colour and shape the inspector draws it with.

The styles follow the seed's ``Node.visualize`` (nnsight 0.3/0.4, each protocol's ``style()``): a module's value
is a green box, a change of it a green ellipse, a submodule called inside the trace or an iteration block a blue
hexagon, a condition an orange hexagon, ``stop`` a red hexagon, a saved value has a brown outline, and every other
operation is an ellipse in the text colour. Colours are the theme's (:mod:`~nnsight_magic.widgets.theme`), so
they read in light and dark themes.

In [1]: kind = node_kind(tracer.graph, tracer.graph.nodes[0])
In [2]: kind.name, kind.shape
Out[2]: ('module', 'box')
"""

from __future__ import annotations

from dataclasses import dataclass

from ..tracing.graph import Graph
from ..tracing.node import Node
from . import theme

SAVED_COLOUR = theme.SAVED  # the seed's LockProtocol (``.save()``): brown


@dataclass(frozen=True)
class Kind:
    """How one kind of node looks: its name, its colour (CSS), its shape (``box``, ``ellipse``, ``hexagon``)."""

    name: str
    colour: str
    shape: str
    meaning: str


MODULE = Kind("module", theme.SUCCESS, "box", "a value the model produces (a module's input or output, its result)")
GRAD = Kind("grad", theme.SUCCESS, "box", "a gradient, set while .backward() runs")
EDIT = Kind("edit", theme.SUCCESS, "ellipse", "a change of a value: an assignment or an in-place edit")
APPLY = Kind("apply", theme.ACCENT, "hexagon", "a submodule called on a traced value")
STEP = Kind("step", theme.ACCENT, "hexagon", "the generation step inside an iteration block")
CONDITION = Kind("condition", theme.WARN, "hexagon", "an `if` on a traced value, or the value it chose")
STOP = Kind("stop", theme.ERROR, "hexagon", "stop the model run here")
BRIDGE = Kind("bridge", theme.PURPLE, "box", "a value from an earlier trace of the session")
LOG = Kind("log", theme.TEXT_MUTED, "ellipse", "print at execution time")
COMPUTE = Kind("compute", theme.TEXT, "ellipse", "an operation on traced values")

KINDS = (MODULE, GRAD, EDIT, APPLY, STEP, CONDITION, STOP, BRIDGE, LOG, COMPUTE)

_BY_OP = {
    "module_output": MODULE, "module_inputs": MODULE, "result": MODULE, "grad": GRAD, "swap": EDIT,
    "update": EDIT, "apply_module": APPLY, "iteration": STEP, "cond": CONDITION, "merge": CONDITION,
    "stop": STOP, "bridge": BRIDGE, "log": LOG,
}


def node_kind(graph: Graph, node: Node) -> Kind:
    """The kind of ``node``: by its op, and ``edit`` for any operation that changes a value in place."""
    kind = _BY_OP.get(node.op)
    if kind is not None:
        return kind
    return EDIT if node.index in graph.writes else COMPUTE
