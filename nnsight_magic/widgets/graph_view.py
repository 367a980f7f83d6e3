"""The dependency graph of a trace, drawn as SVG in Python: no graphviz, no front-end code.

Nodes are laid out left to right in columns: a node's column is the length of the longest chain of dependencies
leading to it, so the values the model produces come first and everything computed from them follows. Inside a
column, nodes sit near the nodes they read (the barycenter heuristic of layered graph drawing). Data edges are
solid; ordering edges (an in-place edit waiting for earlier readers, a branch waiting for its condition) are
dashed. Colours and shapes are the node kinds of :mod:`~nnsight_magic.widgets.kinds`; saved values have a brown
outline.

In [1]: GraphView(tracer.graph)                     # in a notebook: the drawing
In [2]: svg = graph_svg(tracer.graph)                # the SVG text, e.g. for a file
"""

from __future__ import annotations

import html
from dataclasses import dataclass

import ipywidgets

from ..tracing.graph import Graph
from . import theme
from .kinds import KINDS, SAVED_COLOUR, Kind, node_kind
from .labels import node_labels
from .table import node_shape

NODE_WIDTH, NODE_HEIGHT = 200, 34
COLUMN_GAP, ROW_GAP, MARGIN, LEGEND_HEIGHT = 56, 12, 8, 22
LABEL_CHARACTERS = 28


@dataclass(frozen=True)
class PlacedNode:
    """One node's box in the drawing."""

    index: int
    column: int
    row: int
    label: str
    detail: str
    tooltip: str
    kind: Kind
    saved: bool

    @property
    def x(self) -> int:
        return MARGIN + self.column * (NODE_WIDTH + COLUMN_GAP)

    @property
    def y(self) -> int:
        return MARGIN + LEGEND_HEIGHT + self.row * (NODE_HEIGHT + ROW_GAP)


def layout(graph: Graph) -> tuple[list[PlacedNode], list[tuple[int, int, bool]]]:
    """Place every node (see the module docstring); return the nodes and the edges ``(from, to, is_data)``."""
    nodes = graph.nodes
    column = [0] * len(nodes)
    for node in nodes:  # creation order is a topological order: every dependency has a smaller index
        if node.dependencies:
            column[node.index] = 1 + max(column[dependency] for dependency in node.dependencies)
    columns: dict[int, list[int]] = {}
    for node in nodes:
        columns.setdefault(column[node.index], []).append(node.index)
    row = [0] * len(nodes)

    def barycenter(index: int) -> tuple[float, int]:
        """The mean row of the nodes ``index`` depends on (already placed in earlier columns), then the index."""
        sources = nodes[index].dependencies
        return (sum(row[source] for source in sources) / len(sources), index)

    for number in sorted(columns):
        members = columns[number]
        if number:
            members.sort(key=barycenter)
        for position, index in enumerate(members):
            row[index] = position
    placed = []
    labels = node_labels(graph)
    for node in nodes:
        shape, dtype = node_shape(graph, node)
        name = labels.names[node.index]
        label = f"{name} = {labels.expressions[node.index]}" if name else labels.expressions[node.index]
        detail = f"{shape} {dtype}".strip()
        where = f"line {node.lineno}: {node.source_line}" if node.lineno else ""
        tooltip = "\n".join(part for part in (label, where, detail) if part)
        placed.append(PlacedNode(node.index, column[node.index], row[node.index], _clip(label), detail, tooltip,
                                 node_kind(graph, node), node.saved))
    edges = [(dependency, node.index, dependency in node.data_dependencies)
             for node in nodes for dependency in node.dependencies]
    return placed, edges


def graph_svg(graph: Graph) -> str:
    """The drawing of ``graph`` as one ``<svg>`` element (a legend of the kinds it uses on top)."""
    placed, edges = layout(graph)
    if not placed:
        return '<svg class="nnsight-graph" width="120" height="24"><text x="4" y="16" fill="var(--jp-content-font-color1, #212121)">empty graph</text></svg>'
    legend, legend_width = _legend(placed)
    width = MARGIN * 2 + (max(node.column for node in placed) + 1) * (NODE_WIDTH + COLUMN_GAP) - COLUMN_GAP
    width = max(width, legend_width)
    height = MARGIN * 2 + LEGEND_HEIGHT + (max(node.row for node in placed) + 1) * (NODE_HEIGHT + ROW_GAP) - ROW_GAP
    parts = [f'<svg class="nnsight-graph" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="monospace" font-size="11">',
             f'<defs><marker id="nnsight-arrow" viewBox="0 0 8 8" refX="8" refY="4" markerWidth="7" markerHeight="7" '
             f'orient="auto"><path d="M0,0 L8,4 L0,8 z" fill="{theme.TEXT_MUTED}"/></marker></defs>',
             f'<style>.nnsight-graph .edge {{ fill: none; stroke: {theme.TEXT_MUTED}; stroke-width: 1.2; '
             f'marker-end: url(#nnsight-arrow); }} .nnsight-graph .edge.order {{ stroke: {theme.BORDER}; }}</style>']
    parts.append(legend)
    for source, target, is_data in edges:
        parts.append(_edge(placed[source], placed[target], is_data))
    for node in placed:
        parts.append(_node(node))
    parts.append("</svg>")
    return "".join(parts)


class GraphView(ipywidgets.HTML):
    """The drawing of a graph in a widget (scrolls when the graph is large).

    In [1]: GraphView(tracer.graph)
    In [2]: GraphView(tracer.graph, folded=True)        # a "graph ▸" line that opens the drawing when clicked

    Folding happens in the browser (an HTML ``<details>`` element), so it works while the kernel is busy.
    """

    def __init__(self, graph: Graph | None = None, folded: bool = False, **kwargs: object):
        super().__init__(**kwargs)
        self.folded = folded
        if graph is not None:
            self.show(graph)

    def show(self, graph: Graph) -> None:
        """Draw ``graph`` (replacing what was drawn)."""
        self.value = graph_drawing(graph, self.folded)


def graph_drawing(graph: Graph, folded: bool = False) -> str:
    """The drawing of ``graph`` in its scrolling box; ``folded``: inside a ``<details>`` that opens on a click."""
    drawing = f'<div style="overflow:auto; max-height:520px">{graph_svg(graph)}</div>'
    if folded:
        drawing = (f'<details class="nnsight-graph-panel"><summary style="cursor:pointer; font-weight:600">graph'
                   f'</summary>{drawing}</details>')
    return drawing


def _node(node: PlacedNode) -> str:
    x, y, colour = node.x, node.y, node.kind.colour
    if node.kind.shape == "hexagon":
        inset = 10
        points = (f"{x + inset},{y} {x + NODE_WIDTH - inset},{y} {x + NODE_WIDTH},{y + NODE_HEIGHT / 2} "
                  f"{x + NODE_WIDTH - inset},{y + NODE_HEIGHT} {x + inset},{y + NODE_HEIGHT} {x},{y + NODE_HEIGHT / 2}")
        outline = f'<polygon points="{points}" fill="{theme.BACKGROUND}" stroke="{colour}" stroke-width="1.6"/>'
    else:
        radius = NODE_HEIGHT / 2 if node.kind.shape == "ellipse" else 3
        outline = (f'<rect x="{x}" y="{y}" width="{NODE_WIDTH}" height="{NODE_HEIGHT}" rx="{radius}" fill="{theme.BACKGROUND}" '
                   f'stroke="{colour}" stroke-width="1.6"/>')
    saved = ""
    if node.saved:
        saved = (f'<rect x="{x - 3}" y="{y - 3}" width="{NODE_WIDTH + 6}" height="{NODE_HEIGHT + 6}" rx="6" '
                 f'fill="none" stroke="{SAVED_COLOUR}" stroke-width="1.6"/>')
    return (f'<g class="node" data-node="{node.index}" data-kind="{node.kind.name}" data-saved="{int(node.saved)}">'
            f'<title>{html.escape(node.tooltip)}</title>{saved}{outline}'
            f'<text x="{x + NODE_WIDTH / 2}" y="{y + 14}" text-anchor="middle" fill="{colour}">'
            f'{html.escape(node.label)}</text>'
            f'<text x="{x + NODE_WIDTH / 2}" y="{y + 27}" text-anchor="middle" fill="{theme.TEXT_MUTED}" font-size="10">'
            f'{html.escape(node.detail)}</text></g>')


def _edge(source: PlacedNode, target: PlacedNode, is_data: bool) -> str:
    x1, y1 = source.x + NODE_WIDTH, source.y + NODE_HEIGHT / 2
    x2, y2 = target.x, target.y + NODE_HEIGHT / 2
    bend = max(20.0, (x2 - x1) / 2)
    order = "" if is_data else ' order" stroke-dasharray="4 3'   # an ordering edge: dashed, lighter
    return (f'<path class="edge{order}" data-from="{source.index}" data-to="{target.index}" '
            f'd="M{x1:g},{y1:g} C{x1 + bend:g},{y1:g} {x2 - bend:g},{y2:g} {x2:g},{y2:g}"/>')


def _legend(placed: list[PlacedNode]) -> tuple[str, int]:
    """The kinds the drawing uses, as coloured swatches; and how wide the legend is."""
    used = {node.kind for node in placed}
    parts, x = [], MARGIN
    for kind in KINDS:
        if kind not in used:
            continue
        parts.append(f'<rect x="{x}" y="{MARGIN}" width="10" height="10" rx="2" fill="{kind.colour}"/>'
                     f'<text x="{x + 14}" y="{MARGIN + 9}" fill="{theme.TEXT_SECONDARY}"><title>{html.escape(kind.meaning)}</title>'
                     f'{kind.name}</text>')
        x += 24 + 7 * len(kind.name)
    if any(node.saved for node in placed):
        parts.append(f'<rect x="{x}" y="{MARGIN}" width="10" height="10" rx="2" fill="none" '
                     f'stroke="{SAVED_COLOUR}" stroke-width="1.6"/><text x="{x + 14}" y="{MARGIN + 9}" '
                     f'fill="{theme.TEXT_SECONDARY}">saved</text>')
        x += 24 + 7 * len("saved")
    return f'<g class="legend">{"".join(parts)}</g>', x + MARGIN


def _clip(text: str) -> str:
    return text if len(text) <= LABEL_CHARACTERS else text[:LABEL_CHARACTERS - 1] + "…"
