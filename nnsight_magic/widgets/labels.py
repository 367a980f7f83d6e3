"""Rows in the student's words: the name a cell bound, the expression as written, loops folded per line.

A node's *expression* spells its operation with the expressions of the nodes it reads, not their numbers:
``model.lm_head.output[0, -1].softmax(-1)`` rather than ``%3.softmax(-1)``; a node that was bound to a name
(``logits = ...`` on its line) is read by that name. Functions read as they are written in a cell
(``torch.stack(...)``, an f-string as ``f"…{h.sum()}"``, ``a and b``), never as their internals.

A cell line whose nodes repeat (a ``for`` loop or a comprehension over ``model.layers``) is one *group* of
``count`` iterations: the line ``lens = [lm.lm_head(block.output) for block in lm.model.layers]`` makes 30
repeats of the same few operations, shown as ``line 2 · ×30 · lm.model.layers[i].output → …``.

In [1]: labels = node_labels(tracer.graph)
In [2]: labels.names[4], labels.expressions[4]
Out[2]: ('logits', 'model.lm_head.output[0, -1]')
In [3]: [(group.line, group.count) for group in line_groups(tracer.graph, labels)]
Out[3]: [(2, 30), (3, 1)]
"""

from __future__ import annotations

import ast
import builtins
import operator
import re
import weakref
from dataclasses import dataclass
from typing import Any

from ..tracing.graph import Graph
from ..tracing.node import Node, describe_operation, module_label

EXPRESSION_LIMIT = 80  # a nested expression longer than this reads as the name or number of its node
LIST_LIMIT = 2  # a list argument shows its first items, then how many it has

_SYMBOLS = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/", operator.floordiv: "//",
    operator.mod: "%", operator.pow: "**", operator.matmul: "@", operator.and_: "&", operator.or_: "|",
    operator.xor: "^", operator.lshift: "<<", operator.rshift: ">>", operator.eq: "==", operator.ne: "!=",
    operator.lt: "<", operator.le: "<=", operator.gt: ">", operator.ge: ">=", operator.iadd: "+=",
    operator.isub: "-=", operator.imul: "*=", operator.itruediv: "/=",
}
_UNARY = {operator.neg: "-", operator.pos: "+", operator.invert: "~"}
_BOOLEANS = {"python_and": " and ", "python_or": " or "}


@dataclass
class Labels:
    """``names[i]``: the name node ``i`` was bound to (``""`` if none); ``expressions[i]``: its expression."""

    names: list[str]
    expressions: list[str]

    def reference(self, index: int) -> str:
        """How another node's expression reads node ``index``."""
        name = self.names[index]
        if name:
            return name
        expression = self.expressions[index]
        return expression if len(expression) <= EXPRESSION_LIMIT else f"%{index}"


@dataclass
class LineGroup:
    """The nodes one cell line made: ``count`` repeats (iterations) of ``period`` nodes each."""

    line: int
    source: str
    members: list[int]
    count: int
    period: int
    pattern: str
    tail: int = 0

    @property
    def key(self) -> str:
        return f"line{self.line}"


def node_labels(graph: Graph) -> Labels:
    """Names and expressions of every node of ``graph`` (see the module docstring).

    Made once per graph and number of nodes (a graph only grows, and a node never changes what it reads), so the
    inspector's table and its drawing of the graph share them.
    """
    nodes = graph.nodes
    made = _MADE.get(graph)
    if made is not None and made[0] == len(nodes):
        return made[1]
    names = bound_names(graph)
    labels = Labels(names, [""] * len(nodes))
    for node in nodes:  # creation order: every argument is labelled before its readers
        labels.expressions[node.index] = expression(node, labels)
    _MADE[graph] = (len(nodes), labels)
    return labels


_MADE: "weakref.WeakKeyDictionary[Graph, tuple[int, Labels]]" = weakref.WeakKeyDictionary()


def bound_names(graph: Graph) -> list[str]:
    """The name each node's line binds its value to: the last node of each repeat of ``target = ...``.

    A comprehension bound to ``lens`` names its repeats ``lens[0]``, ``lens[1]``, ...
    """
    names = [""] * len(graph.nodes)
    for group in line_groups(graph, None):
        target, comprehension = _assignment_target(group.source)
        if not target:
            continue
        if group.tail:  # `grid = torch.stack([... for ...])`: the line's value is its last node
            names[group.members[-1]] = target
            continue
        for repeat in range(group.count):
            last = group.members[(repeat + 1) * group.period - 1]
            node = graph.nodes[last]
            if node.op in ("log", "cond", "swap") or node.target is operator.setitem or last in graph.writes:
                continue  # an edit or a print is not the value the name holds
            names[last] = f"{target}[{repeat}]" if comprehension and group.count > 1 else target
    return names


def line_groups(graph: Graph, labels: Labels | None) -> list[LineGroup]:
    """The nodes of each cell line, in the order the lines first made a node; repeats found by their ops."""
    by_line: dict[int, list[int]] = {}
    for node in graph.nodes:
        by_line.setdefault(node.lineno, []).append(node.index)
    groups = []
    for line, members in by_line.items():
        signatures = [_signature(graph.nodes[index]) for index in members]
        period, tail = _period(signatures)
        count = (len(members) - tail) // period
        first = graph.nodes[members[0]]
        pattern = ""
        if labels is not None:
            pattern = _generalize(labels, members, period, count)
        groups.append(LineGroup(line, first.source_line, members, count, period, pattern, tail))
    return groups


def expression(node: Node, labels: Labels) -> str:
    """``node``'s operation written as a cell would write it (arguments by their references)."""
    op, target = node.op, node.target

    def ref(value: Any) -> str:
        return _value(value, labels)

    def call_arguments(args: tuple, kwargs: dict) -> str:
        return ", ".join([ref(item) for item in args] + [f"{key}={ref(item)}" for key, item in kwargs.items()])

    if op == "getattr":
        return f"{ref(node.args[0])}.{target}"
    if op == "call_method":
        return f"{ref(node.args[0])}.{target}({call_arguments(node.args[1:], node.kwargs)})"
    if op == "apply_module":
        return f"{module_label(target)}({call_arguments(node.args, node.kwargs)})"
    if op == "log":
        return f"print({call_arguments(node.args, node.kwargs)})"
    if op == "cond":
        return f"if {ref(node.args[0])}"
    if op == "merge":
        return f"{ref(node.args[1])} if {ref(node.args[0])} else {ref(node.args[2])}"
    if op == "swap":
        return f"{ref(node.args[0])} = {ref(node.args[1])}"
    if op == "grad":
        return f"{ref(node.args[0])}.grad"
    if op != "call_function":
        return describe_operation(node)
    args = node.args
    if target is operator.getitem:
        return f"{ref(args[0])}[{_index(args[1], labels)}]"
    if target is operator.setitem:
        return f"{ref(args[0])}[{_index(args[1], labels)}] = {ref(args[2])}"
    if target in _SYMBOLS and len(args) == 2:
        return f"{ref(args[0])} {_SYMBOLS[target]} {ref(args[1])}"
    if target in _UNARY and len(args) == 1:
        return f"{_UNARY[target]}{ref(args[0])}"
    name = getattr(target, "__name__", "")
    if name == "format_string":
        return _f_string(args, labels)
    if name in _BOOLEANS:
        return _BOOLEANS[name].join(ref(item) for item in args)
    if name == "python_not":
        return f"not {ref(args[0])}"
    return f"{function_name(target)}({call_arguments(args, node.kwargs)})"


def function_name(function: Any) -> str:
    """``torch.stack``, ``torch.nn.functional.softmax``, ``len``: the name a cell calls ``function`` by."""
    name = getattr(function, "__name__", None) or repr(function)
    module = getattr(function, "__module__", None) or ""
    if getattr(builtins, name, None) is function:
        return name
    if module.startswith("torch"):
        for public in ("torch", "torch.nn.functional", "torch.linalg", "torch.special", "torch.fft"):
            namespace = __import__(public, fromlist=["_"])
            if getattr(namespace, name, None) is function:
                return f"{public}.{name}"
        return f"torch.{name}"
    return name if not module or module == "__main__" else f"{module.rsplit('.', 1)[-1]}.{name}"


# --------------------------------------------------------------------------------------------- helpers
def _value(value: Any, labels: Labels) -> str:
    if isinstance(value, Node):
        return labels.reference(value.index)
    if isinstance(value, (tuple, list)):
        shown = [_value(item, labels) for item in value[:LIST_LIMIT]]
        if len(value) > LIST_LIMIT:
            shown.append(f"… {len(value)} items")
        inner = ", ".join(shown)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor{tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "…"


def _index(key: Any, labels: Labels) -> str:
    parts = []
    for item in key if isinstance(key, tuple) else (key,):
        if isinstance(item, slice):
            bounds = (item.start, item.stop) + ((item.step,) if item.step is not None else ())
            parts.append(":".join("" if part is None else _value(part, labels) for part in bounds))
        elif item is Ellipsis:
            parts.append("...")
        elif item is None:
            parts.append("None")
        else:
            parts.append(_value(item, labels))
    return ", ".join(parts)


def _f_string(parts: tuple, labels: Labels) -> str:
    pieces = []
    for part in parts:
        if isinstance(part, str):
            pieces.append(part.replace("{", "{{").replace("}", "}}"))
            continue
        value, conversion, spec = part
        text = _value(value, labels)
        pieces.append("{" + text + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}")
    return 'f"' + "".join(pieces) + '"'


def _signature(node: Node) -> tuple:
    """What repeats between loop iterations: the op and its target with numbers blanked out."""
    target = node.target
    text = re.sub(r"\d+", "#", target) if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return node.op, text


def _period(signatures: list[tuple]) -> tuple[int, int]:
    """``(p, t)``: the signatures are copies of their first ``p`` and then ``t`` (at most 3) others, ``p`` least.

    ``t`` is what a line does with the repeats after the loop (``torch.stack([...])``); ``(len, 0)`` if nothing
    repeats.
    """
    for tail in range(0, min(3, len(signatures) - 2) + 1):
        size = len(signatures) - tail
        for period in range(1, size // 2 + 1):
            if tail and size // period < 3:
                break  # a tail only after a real loop: `a.output + b.output` is no loop of two
            if size % period == 0 and all(signatures[i] == signatures[i % period] for i in range(period, size)):
                return period, tail
    return len(signatures), 0


def _generalize(labels: Labels, members: list[int], period: int, count: int) -> str:
    """``model.layers[i].output → …``: the first repeat's first expression, with what changes per repeat as ``i``."""
    first = labels.expressions[members[0]]
    if count < 2:
        return first
    second = labels.expressions[members[period]]
    a, b = re.split(r"(\d+)", first), re.split(r"(\d+)", second)
    if len(a) == len(b):
        first = "".join("i" if x != y and x.isdigit() and y.isdigit() else x for x, y in zip(a, b))
    return first + (" → …" if period > 1 else "")


def _assignment_target(source: str) -> tuple[str, bool]:
    """``("logits", False)`` for ``logits = ...``; ``("lens", True)`` for ``lens = [... for ...]``."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return "", False
    if len(tree.body) != 1:
        return "", False
    statement = tree.body[0]
    if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
        target, value = statement.targets[0], statement.value
    elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
        target, value = statement.target, statement.value
    else:
        return "", False
    if not isinstance(target, (ast.Name, ast.Subscript, ast.Attribute)):
        return "", False
    return ast.unparse(target), isinstance(value, (ast.ListComp, ast.GeneratorExp))
