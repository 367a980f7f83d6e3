"""The inspector's table: one row per node of a graph, rendered as HTML (the widget) or as text (terminals).

A :class:`Row` holds only strings and numbers copied out of the graph, so a displayed table keeps neither the
graph nor any value alive. The rendered HTML carries what it shows as data attributes too
(``<tr data-node="3" data-status="saved">``), which is what tests and the browser check read.

In [1]: table = NodeTable(rows_of(tracer.graph))
In [2]: print(table.text())
  %  line  node                 shape    dtype    status
 %0     2  layer1.output        (3, 10)  float32  pending
 %1     3  %0[:, 0] = 0         (3, 10)  float32  pending
In [3]: table.rows[1].status = "done"; table.html()        # only row %1 is rendered again
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

import torch

from ..tracing.graph import Graph
from ..tracing.node import Node, describe_fake
from .kinds import SAVED_COLOUR, Kind, node_kind
from .summaries import ValueSummary

#: every status a row can show, and its colour: the engine's four, ``saved`` (done and kept), ``error``, ``not run``
#: (the run ended without it: an early stop or a failure) and ``""`` (no run: a scan or a static graph)
STATUS_COLOURS = {
    "pending": "#9e9e9e", "done": "#2e7d32", "freed": "#b0bec5", "saved": SAVED_COLOUR, "skipped": "#bdbdbd",
    "error": "#c62828", "not run": "#757575", "": "#9e9e9e",
}
_STATUS_MARKS = {"pending": "○", "done": "●", "freed": "◌", "saved": "●", "skipped": "⊘", "error": "✖",
                 "not run": "○", "": "·"}

STYLE = """<style>
.nnsight-inspector table { border-collapse: collapse; font: 12px/1.35 var(--jp-code-font-family, monospace); }
.nnsight-inspector th { text-align: left; font-weight: 600; color: #555; border-bottom: 1px solid #ccc;
  padding: 2px 10px 2px 0; }
.nnsight-inspector td { padding: 1px 10px 1px 0; vertical-align: middle; white-space: nowrap; }
.nnsight-inspector td.line, .nnsight-inspector td.index { color: #888; text-align: right; }
.nnsight-inspector td.status { font-weight: 600; }
.nnsight-inspector tr.error td { background: #ffebee; }
.nnsight-inspector td.error-message { color: #c62828; white-space: normal; }
.nnsight-inspector .kind { display: inline-block; width: 8px; height: 8px; border-radius: 2px; margin-right: 6px; }
.nnsight-inspector .summary { color: #333; }
.nnsight-inspector svg.nnsight-picture { vertical-align: middle; margin-left: 6px; border: 1px solid #ddd; }
.nnsight-inspector .header { font: 13px var(--jp-ui-font-family, sans-serif); margin: 2px 0 4px 0; }
.nnsight-inspector .state { font-weight: 600; }
.nnsight-inspector .failure { color: #c62828; white-space: pre-wrap; }
.nnsight-inspector .progress { display: flex; align-items: center; gap: 8px; margin: 0 0 4px 0;
  font: 12px var(--jp-ui-font-family, sans-serif); }
.nnsight-inspector .progress .track { width: 240px; height: 8px; background: #e0e0e0; border-radius: 4px;
  overflow: hidden; }
.nnsight-inspector .progress .bar { height: 100%; background: #1565c0; }
</style>"""


@dataclass
class Row:
    """One node as the inspector shows it. ``status`` and ``runs`` change while the model runs."""

    index: int
    line: int
    source: str
    name: str
    kind: Kind
    shape: str
    dtype: str
    saved: bool
    flags: str = ""
    status: str = "pending"
    runs: int = 0
    summary: ValueSummary | None = None
    error: str = ""
    _key: tuple = field(default=(), repr=False, compare=False)
    _html: str = field(default="", repr=False, compare=False)


def shape_and_dtype(fake: object) -> tuple[str, str]:
    """``("(1, 10)", "float32")`` for a tensor; the nested description and ``""`` for other values."""
    if isinstance(fake, torch.Tensor):
        return str(tuple(fake.shape)), str(fake.dtype).replace("torch.", "")
    return describe_fake(fake), ""


def node_shape(graph: Graph, node: Node) -> tuple[str, str]:
    """The shape and dtype a node's row shows; an in-place edit shows the value it edits."""
    fake = node.fake
    if fake is None and node.index in graph.writes and node.args and isinstance(node.args[0], Node):
        fake = node.args[0].fake
    return shape_and_dtype(fake)


def rows_of(graph: Graph, status: str = "pending") -> list[Row]:
    """One row per node of ``graph``, every row with ``status``."""
    rows = []
    for node in graph.nodes:
        shape, dtype = node_shape(graph, node)
        flags = []
        if node.section is not None:
            flags.append(f"steps {graph.sections[node.section].steps}")
        if node.branch is not None:
            flags.append(f"if %{node.branch[0]} is {node.branch[1]}")
        rows.append(Row(node.index, node.lineno, node.source_line, node.describe(), node_kind(graph, node), shape,
                        dtype, node.saved, ", ".join(flags), status))
    return rows


class NodeTable:
    """Renders rows as an HTML table or as text; a row's HTML is cached until what it shows changes."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def html(self) -> str:
        """The whole table; rows whose status, runs, summary and error are unchanged are not rendered again."""
        body = []
        for row in self.rows:
            key = (row.status, row.runs, row.summary, row.error)
            if row._key != key:
                row._html, row._key = _row_html(row), key
            body.append(row._html)
        head = ("<tr><th>%</th><th>line</th><th>node</th><th>shape</th><th>dtype</th><th>status</th>"
                "<th>value</th></tr>")
        return f'<table class="nnsight-rows">{head}{"".join(body)}</table>'

    def text(self) -> str:
        """The table as aligned plain text (terminals, scripts, and the text/plain form of the widget)."""
        header = ("%", "line", "node", "shape", "dtype", "status")
        lines = [header] + [(f"%{row.index}", str(row.line or ""), _clip(row.name, 40), row.shape or "-",
                             row.dtype or "-", _status_text(row)) for row in self.rows]
        widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
        out = []
        for line in lines:
            cells = [line[0].rjust(widths[0]), line[1].rjust(widths[1])] + \
                    [line[column].ljust(widths[column]) for column in range(2, len(header))]
            out.append("  ".join(cells).rstrip())
        return "\n".join(out + self.summary_lines())

    def summary_lines(self) -> list[str]:
        """One line per saved value's summary, and per failed node's error."""
        lines = []
        for row in self.rows:
            if row.summary is not None:
                spark = row.summary.sparkline()
                lines.append(f"  %{row.index} {row.name}: {row.summary.describe()}{'  ' + spark if spark else ''}")
            if row.error:
                lines.append(f"  %{row.index} failed: {row.error}")
        return lines


def _status_text(row: Row) -> str:
    status = row.status or "-"
    return f"{status} x{row.runs}" if row.runs > 1 else status


def _row_html(row: Row) -> str:
    escape = html.escape
    colour = STATUS_COLOURS.get(row.status, "#000")
    runs = f' <span class="runs">×{row.runs}</span>' if row.runs > 1 else ""
    status = f'{_STATUS_MARKS.get(row.status, "")} {escape(row.status or "—")}{runs}'
    value = ""
    if row.summary is not None:
        value = f'<span class="summary">{escape(row.summary.describe())}</span>{row.summary.svg()}'
    elif row.error:
        value = f'<span class="error-message">{escape(row.error)}</span>'
    title = escape(f"line {row.line}: {row.source}" if row.source else row.kind.meaning, quote=True)
    flags = f' <span class="flags" style="color:#888">[{escape(row.flags)}]</span>' if row.flags else ""
    saved = f"border:1px solid {SAVED_COLOUR};" if row.saved else ""
    return (f'<tr class="{"error" if row.status == "error" else ""}" data-node="{row.index}" '
            f'data-status="{escape(row.status)}" data-kind="{row.kind.name}" title="{title}">'
            f'<td class="index">%{row.index}</td><td class="line">{row.line or ""}</td>'
            f'<td class="name"><span class="kind" style="background:{row.kind.colour};{saved}"></span>'
            f'{escape(_clip(row.name, 60))}{flags}</td>'
            f'<td class="shape">{escape(row.shape) or "—"}</td><td class="dtype">{escape(row.dtype) or "—"}</td>'
            f'<td class="status" style="color:{colour}">{status}</td><td class="value">{value}</td></tr>')


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
