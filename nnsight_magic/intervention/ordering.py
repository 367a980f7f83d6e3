"""The check before running: every change to a module's value uses only values produced before that module call.

Reads may come in any order (a read just waits for its value). A change — an assignment to ``.output`` /
``.input``, an in-place edit of a module's value or of a view of it — must happen inside that module call's
hook, so everything it depends on must exist by then. The fake-tensor scan gives the order of module calls; this
module gives every node the position in that order at which it can run at the earliest, and raises
:class:`~nnsight_magic.errors.OutOfOrderError` naming both lines for a change that would need the future.

In [1]: with net.trace(x):
   ...:     net.layer1.output[:] = net.layer2.output.mean()
OutOfOrderError: line 2 `...` changes layer1.output, but it needs layer2.output (line 2), which the model
computes only after layer1.output ...
"""

from __future__ import annotations

import math
from typing import Callable

from ..tracing.graph import Graph
from ..tracing.node import Node
from .interleaver import out_of_order

_BEFORE_MODEL = -1.0


def earliest_positions(graph: Graph, entry_position: Callable[[Node], float | None]) -> list[float | None]:
    """For every node, the earliest point in the model run at which it can run (``None`` when unknown).

    ``entry_position`` places an entry node in the run (its hook event); other nodes run once their last
    dependency has.
    """
    positions: list[float | None] = []
    for node in graph.nodes:
        if node.is_entry:
            position = entry_position(node)
        else:
            position = _BEFORE_MODEL
            for dependency in node.dependencies:
                dependency_position = positions[dependency]
                if dependency_position is None:
                    position = None
                    break
                position = max(position, dependency_position)
        positions.append(position)
    return positions


def check_order(graph: Graph, entry_position: Callable[[Node], float | None]) -> None:
    """Raise ``OutOfOrderError`` for the first change that needs a value from later in the run."""
    if not graph.writes and not graph.swap_indices:
        return  # only changes (edits in place, assignments) can come too late
    positions = earliest_positions(graph, entry_position)
    changes = [(write, root) for write, root in graph.writes.items()]
    changes += [(node.index, node.args[0].index) for node in graph.nodes if node.op == "swap"]
    for write, entry in sorted(changes):
        target = graph.nodes[entry]
        if target.op not in ("module_output", "module_inputs"):
            continue
        write_position, entry_position_value = positions[write], positions[entry]
        if write_position is None or entry_position_value is None or write_position <= entry_position_value:
            continue
        raise out_of_order(graph, write, entry, blocker=_latest_source(graph, write, positions))


def _latest_source(graph: Graph, index: int, positions: list[float | None]) -> Node | None:
    """Follow the dependency that runs last, back to the entry node it comes from."""
    node = graph.nodes[index]
    while not node.is_entry:
        if not node.dependencies:
            return None
        node = graph.nodes[max(node.dependencies, key=lambda dependency: (positions[dependency] or -math.inf,
                                                                          dependency))]
    return node
