"""The inspector's table: one row per node, grouped by cell line, rendered as HTML (the widget) or text.

A row reads as the cell was written: the name the line bound (``logits``, ``lens[3]``), the expression
(``model.lm_head.output[0, -1]``), then shape, dtype, status and, after the run, the value. The rows of one cell
line form a group; a line that repeats (a loop, a comprehension over the layers) folds into one line
``line 2 · ×30 · model.layers[i].output → …`` that opens when clicked (a checkbox and CSS ``:has()``, so it works
in a static page too). The table scrolls inside a bounded height and long values wrap. Colours are the theme's
(:mod:`~nnsight_magic.widgets.theme`).

A :class:`Row` holds only strings and numbers copied out of the graph, so a displayed table keeps neither the
graph nor any value alive. The HTML carries what it shows as data attributes too
(``<tr data-node="3" data-status="saved">``), which is what tests and the browser check read.

In [1]: table = NodeTable(rows_of(tracer.graph))
In [2]: print(table.text())
line  name    expression                    shape    dtype    status
   2  h       model.layer1.output           (3, 10)  float32  pending
   3          h[:, 0] = 0                   (3, 10)  float32  pending
In [3]: table.rows[1].status = "done"; table.html()        # only row 1 is rendered again
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field

import torch

from ..tracing.graph import Graph
from ..tracing.node import Node, describe_fake
from . import theme
from .kinds import KINDS, Kind, node_kind
from .labels import line_groups, node_labels
from .summaries import ValueSummary

_STATUS_MARKS = {"pending": "○", "done": "●", "freed": "◌", "saved": "●", "skipped": "⊘", "error": "✖",
                 "not run": "○", "": "·"}
MAX_HEIGHT = "26em"  # the table scrolls inside this height
# JupyterLab right-aligns cells of rendered HTML (`:not(.jp-RenderedMarkdown).jp-RenderedHTMLCommon td`, specificity
# 0,2,1): the `table.nnsight-rows` rules outrank it so columns read left to right

CSS = f"""
.nnsight-inspector {{ color: {theme.TEXT}; }}
.nnsight-inspector .nnsight-scroll {{ max-height: {MAX_HEIGHT}; overflow: auto; max-width: 100%;
  border: 1px solid {theme.BORDER_LIGHT}; }}
.nnsight-inspector table {{ border-collapse: collapse; font: 12px/1.35 var(--jp-code-font-family, monospace);
  color: {theme.TEXT}; }}
.nnsight-inspector th {{ text-align: left; font-weight: 600; color: {theme.TEXT_SECONDARY};
  border-bottom: 1px solid {theme.BORDER}; padding: 2px 10px 2px 4px; position: sticky; top: 0;
  background: {theme.BACKGROUND}; }}
.nnsight-inspector td {{ padding: 1px 10px 1px 4px; vertical-align: top; white-space: nowrap; text-align: left; }}
.nnsight-inspector td.line {{ color: {theme.TEXT_MUTED}; text-align: right; }}
.nnsight-inspector table.nnsight-rows th, .nnsight-inspector table.nnsight-rows td {{ text-align: left; }}
.nnsight-inspector table.nnsight-rows td.line {{ text-align: right; }}
.nnsight-inspector td.name {{ font-weight: 600; }}
.nnsight-inspector td.expression {{ max-width: 36em; overflow: hidden; text-overflow: ellipsis; }}
.nnsight-inspector td.value {{ white-space: normal; overflow-wrap: anywhere; min-width: 14em; max-width: 40em; }}
.nnsight-inspector td.status {{ font-weight: 600; }}
.nnsight-inspector tr.error td {{ background: {theme.ERROR_BACKGROUND}; }}
.nnsight-inspector .error-message {{ color: {theme.ERROR}; white-space: pre-wrap; }}
.nnsight-inspector .kind {{ display: inline-block; width: 8px; height: 8px; border-radius: 2px; margin-right: 6px;
  outline: 1px solid {theme.BORDER}; }}
.nnsight-inspector .muted, .nnsight-inspector .flags {{ color: {theme.TEXT_MUTED}; }}
.nnsight-inspector .summary {{ color: {theme.TEXT}; }}
.nnsight-inspector svg.nnsight-picture {{ vertical-align: middle; margin-left: 6px;
  border: 1px solid {theme.BORDER_LIGHT}; }}
.nnsight-inspector tr.group-head td {{ background: {theme.BACKGROUND_RAISED}; color: {theme.TEXT};
  cursor: pointer; white-space: normal; }}
.nnsight-inspector tr.group-head label {{ cursor: pointer; }}
.nnsight-inspector input.nnsight-fold {{ display: none; }}
.nnsight-inspector tr.group-head .arrow::before {{ content: "▸ "; }}
.nnsight-inspector tbody:has(input.nnsight-fold:checked) tr.group-head .arrow::before {{ content: "▾ "; }}
.nnsight-inspector tbody.foldable:not(:has(input.nnsight-fold:checked)) tr[data-node] {{ display: none; }}
.nnsight-inspector .filtering tbody.foldable tr[data-node] {{ display: table-row; }}
.nnsight-inspector .filtering tr[data-node].nomatch {{ display: none !important; }}
.nnsight-inspector .filtering tbody:not(:has(tr[data-node]:not(.nomatch))) {{ display: none; }}
.nnsight-inspector input.nnsight-filter {{ font: 12px var(--jp-ui-font-family, sans-serif); margin: 0 0 4px 0;
  width: 18em; color: {theme.TEXT}; background: {theme.BACKGROUND}; border: 1px solid {theme.BORDER};
  padding: 2px 4px; }}
.nnsight-inspector .header {{ font: 13px var(--jp-ui-font-family, sans-serif); margin: 2px 0 4px 0;
  color: {theme.TEXT}; }}
.nnsight-inspector .state {{ font-weight: 600; }}
.nnsight-inspector .failure {{ color: {theme.ERROR}; white-space: pre-wrap; }}
.nnsight-inspector .warning {{ color: {theme.WARN}; font-weight: 600; }}
.nnsight-inspector .generated {{ font: 12px var(--jp-code-font-family, monospace); white-space: pre-wrap;
  margin: 0 0 4px 0; }}
.nnsight-inspector .progress {{ display: flex; align-items: center; gap: 8px; margin: 0 0 4px 0;
  font: 12px var(--jp-ui-font-family, sans-serif); }}
.nnsight-inspector .progress .track {{ width: 240px; height: 8px; background: {theme.BORDER_LIGHT};
  border-radius: 4px; overflow: hidden; }}
.nnsight-inspector .progress .bar {{ height: 100%; background: {theme.ACCENT}; }}
"""
_STATUS_CLASSES = {status: f" s-{status.replace(' ', '-')}" for status in _STATUS_MARKS if status}
CSS += "".join(f".nnsight-inspector .kind.k-{kind.name} {{ background: {kind.colour}; }}\n" for kind in KINDS)
CSS += f".nnsight-inspector .kind.saved {{ outline: 1.5px solid {theme.SAVED}; }}\n"
CSS += "".join(f".nnsight-inspector td.status.{css_class.strip()} {{ color: {theme.status_colour(status)}; }}\n"
               for status, css_class in _STATUS_CLASSES.items())
STYLE = f"<style>{CSS}</style>"

#: the filter box of a static page: the same classes the live widget's front end sets (scripts allowed only)
FILTER_SCRIPT = ("var q=this.value.toLowerCase(),r=this.parentNode;r.classList.toggle('filtering',!!q);"
                 "r.querySelectorAll('tr[data-node]').forEach(function(t){t.classList.toggle('nomatch',"
                 "!!q&&t.textContent.toLowerCase().indexOf(q)<0)})")


@dataclass
class Row:
    """One node as the inspector shows it. ``status`` and ``runs`` change while the model runs."""

    index: int
    line: int
    source: str
    name: str
    expression: str
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
    _sent: tuple | None = field(default=None, repr=False, compare=False)


@dataclass
class Group:
    """The rows of one cell line: ``count`` repeats, folded when the line repeats."""

    line: int
    source: str
    members: list[int]
    count: int
    pattern: str

    @property
    def foldable(self) -> bool:
        return self.count > 1


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
    return table_of(graph, status).rows


def table_of(graph: Graph, status: str = "pending") -> "NodeTable":
    """The table of ``graph``: its rows (every row with ``status``) and their line groups."""
    labels = node_labels(graph)
    rows = []
    for node in graph.nodes:
        shape, dtype = node_shape(graph, node)
        flags = []
        if node.section is not None:
            flags.append(f"steps {graph.sections[node.section].steps}")
        if node.branch is not None:
            flags.append(f"if {labels.reference(node.branch[0])} is {node.branch[1]}")
        rows.append(Row(node.index, node.lineno, node.source_line, labels.names[node.index],
                        labels.expressions[node.index], node_kind(graph, node), shape, dtype, node.saved,
                        ", ".join(flags), status))
    groups = [Group(group.line, group.source, group.members, group.count, group.pattern)
              for group in line_groups(graph, labels)]
    return NodeTable(rows, groups)


class NodeTable:
    """Renders rows as an HTML table or as text; a row's HTML is cached until what it shows changes."""

    def __init__(self, rows: list[Row], groups: list[Group] | None = None):
        self.rows = rows
        self.groups = groups if groups is not None else [Group(row.line, row.source, [row.index], 1, "")
                                                         for row in rows]

    def html(self, filter_box: str = "") -> str:
        """The table in its scrolling box; rows whose status, runs, summary and error are unchanged are reused.

        ``filter_box``: the ``<input>`` shown above the table (the static page's; the live widget draws its own).
        """
        bodies = []
        for position, group in enumerate(self.groups):
            rows = [self._row_html(self.rows[index]) for index in group.members]
            head = self._head_html(group) if group.foldable else ""
            foldable = ' class="foldable"' if group.foldable else ""
            bodies.append(f'<tbody data-group="line{group.line}" data-count="{group.count}"{foldable} '
                          f'data-index="{position}">{head}{"".join(rows)}</tbody>')
        head = ("<thead><tr><th>line</th><th>name</th><th>expression</th><th>shape</th><th>dtype</th>"
                "<th>status</th><th>value</th></tr></thead>")
        return (f'{filter_box}<div class="nnsight-scroll"><table class="nnsight-rows">{head}{"".join(bodies)}'
                f'</table></div>')

    def mark_sent(self) -> None:
        """The front end now shows every row as it is (after :meth:`html` went to it)."""
        for row in self.rows:
            self._row_html(row)
            row._sent = row._key

    def changes(self) -> tuple[dict[int, str], dict[int, str]]:
        """The rows (by node) and group heads (by group position) whose HTML changed since the front end last got
        them, and mark them sent: what a live update sends instead of the whole table.

        In [1]: table.mark_sent(); table.rows[1].status = "done"
        In [2]: table.changes()
        Out[2]: ({1: '<tr class="" data-node="1" data-status="done" ...</tr>'}, {})
        """
        rows: dict[int, str] = {}
        for row in self.rows:
            text = self._row_html(row)
            if row._sent != row._key:
                rows[row.index] = text
                row._sent = row._key
        heads = {}
        if rows:
            for position, group in enumerate(self.groups):
                if group.foldable and any(index in rows for index in group.members):
                    heads[position] = self._head_html(group)
        return rows, heads

    def _head_html(self, group: Group) -> str:
        return _group_head(group, [self.rows[index] for index in group.members])

    def _row_html(self, row: Row) -> str:
        key = (row.status, row.runs, row.summary, row.error)
        if row._key != key:
            row._html, row._key = _row_html(row), key
        return row._html

    def text(self) -> str:
        """The table as aligned plain text (terminals, scripts, the text/plain form); loops as one line each."""
        header = ("line", "name", "expression", "shape", "dtype", "status")
        lines = [header]
        for group in self.groups:
            members = [self.rows[index] for index in group.members]
            if group.foldable:
                lines.append((str(group.line or ""), f"×{group.count}", _clip(group.pattern, 48), "", "",
                              _status_counts(members)))
                continue
            for row in members:
                lines.append((str(row.line or ""), row.name, _clip(row.expression, 48), row.shape or "-",
                              row.dtype or "-", _status_text(row)))
        widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
        out = []
        for line in lines:
            cells = [line[0].rjust(widths[0])] + [line[column].ljust(widths[column])
                                                  for column in range(1, len(header))]
            out.append("  ".join(cells).rstrip())
        return "\n".join(out + self.summary_lines())

    def summary_lines(self) -> list[str]:
        """One line per saved value's summary, and per failed node's error."""
        lines = []
        for row in self.rows:
            label = row.name or _clip(row.expression, 40)
            if row.summary is not None:
                spark = row.summary.sparkline()
                lines.append(f"  line {row.line} {label}: {row.summary.describe()}{'  ' + spark if spark else ''}")
            if row.error:
                lines.append(f"  line {row.line} {label} failed: {row.error}")
        return lines


def _status_counts(rows: list[Row]) -> str:
    counts = Counter(_status_text(row) if row.runs <= 1 else row.status for row in rows)
    return " · ".join(f"{count} {status or '—'}" for status, count in counts.items())


def _group_head(group: Group, rows: list[Row]) -> str:
    escape = html.escape
    error = any(row.status == "error" for row in rows)
    return (f'<tr class="group-head{" error" if error else ""}"><td colspan="7"><label>'
            f'<input type="checkbox" class="nnsight-fold"{" checked" if error else ""}>'
            f'<span class="arrow"></span>line {group.line} · ×{group.count} · '
            f'<span title="{escape(group.source, quote=True)}">{escape(_clip(group.pattern, 90))}</span> '
            f'<span class="muted">({len(rows)} nodes: {escape(_status_counts(rows))})</span></label></td></tr>')


def _status_text(row: Row) -> str:
    status = row.status or "-"
    return f"{status} x{row.runs}" if row.runs > 1 else status


def _row_html(row: Row) -> str:
    escape = html.escape
    runs = f' <span class="runs">×{row.runs}</span>' if row.runs > 1 else ""
    status = f'{_STATUS_MARKS.get(row.status, "")} {escape(row.status or "—")}{runs}'
    status_class = _STATUS_CLASSES.get(row.status, "")
    value = ""
    if row.summary is not None:
        value = f'<span class="summary">{escape(row.summary.describe())}</span>{row.summary.svg()}'
    elif row.error:
        value = f'<span class="error-message">{escape(row.error)}</span>'
    title = escape(f"line {row.line}: {row.source}\n{row.expression}" if row.source else row.expression, quote=True)
    flags = f' <span class="flags">[{escape(row.flags)}]</span>' if row.flags else ""
    return (f'<tr class="{"error" if row.status == "error" else ""}" data-node="{row.index}" '
            f'data-status="{escape(row.status)}" data-kind="{row.kind.name}" title="{title}">'
            f'<td class="line">{row.line or ""}</td><td class="name">{escape(row.name)}</td>'
            f'<td class="expression"><span class="kind k-{row.kind.name}{" saved" if row.saved else ""}"></span>'
            f'{escape(_clip(row.expression, 90))}{flags}</td>'
            f'<td class="shape">{escape(row.shape) or "—"}</td><td class="dtype">{escape(row.dtype) or "—"}</td>'
            f'<td class="status{status_class}">{status}</td>'
            f'<td class="value">{value}</td></tr>')


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"
