"""Rewrite a ``%%trace`` cell so that plain Python control flow on traced values builds graph code.

In [1]: %%trace net x
   ...: h = net.layer1.output                 # top-level name: saved, a tensor after the cell (see autosave_names)
   ...: if h.sum() > 0:                       # IfLowering: tracer.cond(...), else_(), merge() for `label`
   ...:     label = "positive"
   ...: else:
   ...:     label = "negative"
   ...: print(f"sum {h.sum():.3f}", label)    # PrintLowering + FormatLowering: printed when the model runs
   ...: wide = h.max() > 1 or not h.min() < 0 # BooleanLowering: Python's `or`/`not` on the real values
   ...: first, second = net.output            # UnpackLowering: net.output[0], net.output[1]
   ...: flipped = net.layer1.output.T         # AssignmentLocations: the attribute's node names this line

Each transformer below handles one concern and only swaps a construct for a call into the runtime helpers
(:mod:`nnsight_magic.magics.runtime`, bound as ``__nnsight_magic__`` in the notebook namespace). The helpers look
at the real objects when the cell runs, so plain Python values keep plain Python behaviour: ``if n > 2`` on an
int stays an ``if``, ``for i in range(3)`` stays a loop, ``print("hi")`` outside a trace prints. Generated
statements carry the line of the construct they replace, so errors and tracebacks name the user's cell line.
"""

from __future__ import annotations

import ast
import itertools
from dataclasses import dataclass, field
from typing import Iterator

RUNTIME = "__nnsight_magic__"
HELPER_PREFIX = "_nm_"
RESULT_NAME = HELPER_PREFIX + "result"


@dataclass
class RewrittenCell:
    """The rewritten module and what the magic needs to know about it.

    Attributes:
        tree: the rewritten module (every node located; line numbers are the cell's, the magic's line is 1).
        assigned: names the cell binds at its top level (candidates for autosave), in order of appearance.
        helpers: names of helper variables the rewrite binds at the top level (removed after the cell).
        has_result: the last statement was an expression; its value is bound to ``RESULT_NAME``.
        referenced: every name the cell mentions, in any scope (whose lists and dicts a failing cell restores).
    """

    tree: ast.Module
    assigned: list[str]
    helpers: set[str] = field(default_factory=set)
    has_result: bool = False
    referenced: list[str] = field(default_factory=list)


def rewrite_cell(tree: ast.Module) -> RewrittenCell:
    """Apply every rewrite to a parsed cell body (see the module docstring)."""
    reject_top_level_await(tree)
    assigned = autosave_names(tree)
    referenced = list(dict.fromkeys(node.id for node in ast.walk(tree) if isinstance(node, ast.Name)))
    has_result = capture_last_expression(tree)
    names = itertools.count()
    lowering = IfLowering(names)
    for transformer in (PrintLowering(), FormatLowering(), BooleanLowering(), AssignmentLocations(), UnpackLowering(),
                        LoopLowering(), WhileGuard(), lowering):
        tree = transformer.visit(tree)
    ast.fix_missing_locations(tree)
    return RewrittenCell(tree, assigned, lowering.top_level_helpers, has_result, referenced)


# ---------------------------------------------------------------------------------------------- analysis
def reject_top_level_await(tree: ast.Module) -> None:
    """``await`` outside an ``async def`` cannot run in a cell magic: raise a SyntaxError at its line."""
    for node in _walk_scope(tree):
        if isinstance(node, (ast.Await, ast.AsyncFor, ast.AsyncWith)) or \
                (isinstance(node, ast.comprehension) and node.is_async):
            keyword = {ast.AsyncFor: "async for", ast.AsyncWith: "async with"}.get(type(node), "await")
            line = getattr(node, "lineno", None) or _parent_line(tree, node)
            raise SyntaxError(f"`{keyword}` cannot be used in a %%trace cell: the cell body is built and run "
                              "synchronously. Await the coroutine in a normal cell, or inside an `async def` "
                              "that you call outside the trace",
                              ("", line, (getattr(node, "col_offset", 0) or 0) + 1, "", None, None))


def autosave_names(tree: ast.Module) -> list[str]:
    """Names bound at the module level: assignments, loop and ``with`` targets, walrus, ``global`` names.

    Nested ``def``/``class``/``lambda`` and comprehension variables are local to their scope and left out,
    except names a function declares ``global``. Names starting with ``_`` are never saved.
    """
    found = {node.id: None for node in _walk_scope(tree) if isinstance(node, ast.Name) and
             isinstance(node.ctx, ast.Store)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.update(dict.fromkeys(node.names))
    return [name for name in found if not name.startswith("_")]


def capture_last_expression(tree: ast.Module) -> bool:
    """Turn a final expression statement into ``_nm_result = <expression>`` so the magic can display it."""
    if not tree.body or not isinstance(tree.body[-1], ast.Expr):
        return False
    last = tree.body[-1]
    if isinstance(last.value, ast.Call) and _is_print(last.value):
        return False
    tree.body[-1] = ast.copy_location(ast.Assign([ast.Name(RESULT_NAME, ast.Store())], last.value), last)
    return True


def _walk_scope(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of ``tree``'s own scope. A nested ``def`` or ``class`` appears as the name it binds; its body,
    lambdas and comprehension variables are skipped (a comprehension's iterables and conditions, and a walrus
    inside them, still belong to the outer scope)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield ast.Name(child.name, ast.Store())
                continue
            if isinstance(child, ast.Lambda):
                continue
            if isinstance(child, ast.comprehension):
                yield child
                stack.append(child.iter)
                stack.extend(child.ifs)
                continue
            stack.append(child)


def _parent_line(tree: ast.AST, target: ast.AST) -> int:
    for node in ast.walk(tree):
        if any(child is target for child in ast.iter_child_nodes(node)) and hasattr(node, "lineno"):
            return node.lineno
    return 1


def _runtime_call(function: str, args: list[ast.expr], keywords: list[ast.keyword] | None = None) -> ast.Call:
    return ast.Call(ast.Attribute(ast.Name(RUNTIME, ast.Load()), function, ast.Load()), args, keywords or [])


def _is_print(call: ast.Call) -> bool:
    return isinstance(call.func, ast.Name) and call.func.id == "print"


# -------------------------------------------------------------------------------------- small rewrites
class PrintLowering(ast.NodeTransformer):
    """``print(...)`` → ``__nnsight_magic__.print(...)``: printed when the model produces the values, in cell order."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if not _is_print(node):
            return node
        return ast.copy_location(_runtime_call("print", node.args, node.keywords), node)


class FormatLowering(ast.NodeTransformer):
    """``f"{x:.2f}"`` → ``__nnsight_magic__.format(...)``: a traced ``x`` is formatted when it exists."""

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        self.generic_visit(node)
        parts: list[ast.expr] = []
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                conversion = chr(value.conversion) if value.conversion > 0 else None
                spec = value.format_spec if value.format_spec is not None else ast.Constant(None)
                parts.append(ast.Tuple([value.value, ast.Constant(conversion), spec], ast.Load()))
            else:
                parts.append(value)
        return ast.copy_location(_runtime_call("format", parts), node)

    def visit_FormattedValue(self, node: ast.FormattedValue) -> ast.AST:
        # a format spec is itself a JoinedStr; rewrite the parts inside it but keep the FormattedValue node
        node.value = self.visit(node.value)
        if node.format_spec is not None:
            node.format_spec = self.visit(node.format_spec)
        return node


class AssignmentLocations(ast.NodeTransformer):
    """Top-level ``name = value`` → ``name = __nnsight_magic__.located(value)``.

    A traced attribute (``logits = out.logits``) makes its graph node only when it is first used, which for an
    autosaved name is after the body ran, far from this line. ``located`` makes the node at once, so the node,
    its errors and the inspector's row name this line.
    """

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        return node  # names inside functions are not saved

    visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = visit_FunctionDef

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if all(isinstance(target, ast.Name) for target in node.targets):
            node.value = ast.copy_location(_runtime_call("located", [node.value]), node.value)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None and isinstance(node.target, ast.Name):
            node.value = ast.copy_location(_runtime_call("located", [node.value]), node.value)
        return node


class UnpackLowering(ast.NodeTransformer):
    """``a, b = out`` → ``a, b = __nnsight_magic__.unpack(out, 2, False)``: a traced ``out`` is indexed."""

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        self.generic_visit(node)
        if len(node.targets) != 1 or not isinstance(node.targets[0], (ast.Tuple, ast.List)):
            return node
        elements = node.targets[0].elts
        starred = any(isinstance(element, ast.Starred) for element in elements)
        count = sum(1 for element in elements if not isinstance(element, ast.Starred))
        node.value = ast.copy_location(
            _runtime_call("unpack", [node.value, ast.Constant(count), ast.Constant(starred)]), node.value)
        return node


class LoopLowering(ast.NodeTransformer):
    """``for x in it`` → ``for x in __nnsight_magic__.iterate(it)``.

    ``tracer.iter[...]`` / ``tracer.all()`` run their body as one iteration block of the graph; a traced value
    of known length yields its items (``out[0]``, ``out[1]``, ...); anything else is iterated as Python does.
    Comprehensions are treated the same way.
    """

    def visit_For(self, node: ast.For) -> ast.AST:
        self.generic_visit(node)
        node.iter = ast.copy_location(_runtime_call("iterate", [node.iter]), node.iter)
        return node

    def visit_comprehension(self, node: ast.comprehension) -> ast.AST:
        self.generic_visit(node)
        if not node.is_async:
            node.iter = ast.copy_location(_runtime_call("iterate", [node.iter]), node.iter)
        return node


class BooleanLowering(ast.NodeTransformer):
    """``a and b`` / ``a or b`` / ``not a`` → ``__nnsight_magic__.and_(a, lambda: b)`` / ``or_`` / ``not_(a)``.

    On plain values the helpers short-circuit exactly as Python does (the later operands are thunks). Once an
    operand is traced, the rest are evaluated too and Python's ``and``/``or``/``not`` runs on the real values
    when the model has produced them, so ``if h.sum() > 0 and h.max() < 5:`` is one traced condition. Operands
    holding a walrus, ``yield`` or ``await`` keep Python's own operator (a lambda would change their scope), as
    does anything directly in a class body (a lambda there cannot see the class's names).
    """

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        for statement in node.body:
            if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                self.visit(statement)
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        if any(isinstance(each, (ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await))
               for value in node.values for each in ast.walk(value)):
            return node
        function = "and_" if isinstance(node.op, ast.And) else "or_"
        thunks = [ast.copy_location(ast.Lambda(_NO_ARGUMENTS, value), value) for value in node.values[1:]]
        return ast.copy_location(_runtime_call(function, [node.values[0], *thunks]), node)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if not isinstance(node.op, ast.Not):
            return node
        return ast.copy_location(_runtime_call("not_", [node.operand]), node)


_NO_ARGUMENTS = ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None,
                              defaults=[])


class WhileGuard(ast.NodeTransformer):
    """``while cond`` → ``while __nnsight_magic__.loop_condition(cond)``: a traced condition gets a clear error
    (the number of iterations would depend on values the model has not produced)."""

    def visit_While(self, node: ast.While) -> ast.AST:
        self.generic_visit(node)
        node.test = ast.copy_location(_runtime_call("loop_condition", [node.test]), node.test)
        return node


# ------------------------------------------------------------------------------------------- if / else
_CAPTURE = """
try:
    {store}[{name!r}] = {name}
except NameError:
    pass
"""

_RESTORE = """
if {name!r} in {store}:
    {name} = {store}[{name!r}]
else:
    try:
        del {name}
    except NameError:
        pass
"""


class IfLowering(ast.NodeTransformer):
    """``if test: A else: B`` decided by the model when ``test`` is traced, by Python otherwise.

    The test is evaluated once into a :class:`~nnsight_magic.magics.runtime.Branch`. For a plain value the
    original branches run as Python would run them. For a traced value both bodies run while the cell is built,
    each inside its graph branch (``tracer.cond(test)`` / ``.else_()``): the else body first sees the names as
    they were before the ``if``, and afterwards every name either branch assigned is
    ``tracer.merge(condition, value_if_true, value_if_false)`` (a name unbound on one side merges with
    ``UNBOUND`` and is unbound after the run if that side ran). ``elif`` is a nested ``if``. Bodies are never
    duplicated::

        _nm_if_0 = __nnsight_magic__.branch(test, None)
        if _nm_if_0.traced: <remember the names' bindings before the if>
        if _nm_if_0.then_taken:
            with _nm_if_0.then():
                A
        if _nm_if_0.traced: <remember A's bindings, restore the ones before the if>
        if _nm_if_0.else_taken:
            with _nm_if_0.otherwise():
                B
        if _nm_if_0.traced: <remember B's bindings>; _nm_if_0.merge(); <bind the merged names>

    ``break``, ``continue``, ``return``, ``raise`` and ``yield`` inside a branch cannot be decided while
    building; with a traced test the ``if`` raises a TypeError naming the statement's line.
    """

    def __init__(self, counter: "itertools.count[int]"):
        self.counter = counter
        self.top_level_helpers: set[str] = set()
        self._depth = 0  # nesting in functions and classes: helper names there are local

    def visit_FunctionDef(self, node: ast.AST) -> ast.AST:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1
        return node

    visit_AsyncFunctionDef = visit_ClassDef = visit_FunctionDef

    def visit_If(self, node: ast.If) -> list[ast.stmt]:
        names = _branch_names(node.body + node.orelse)
        jump = _first_jump(node.body + node.orelse)
        self.generic_visit(node)
        helper = f"{HELPER_PREFIX}if_{next(self.counter)}"
        if not self._depth:
            self.top_level_helpers.add(helper)
        jump_value = ast.Constant(None) if jump is None else ast.Tuple(
            [ast.Constant(jump[0]), ast.Constant(jump[1])], ast.Load())
        create = _stamped(ast.Assign([ast.Name(helper, ast.Store())],
                                     _runtime_call("branch", [ast.Constant(None), jump_value])), node)
        create.value.args[0] = node.test
        statements: list[ast.stmt] = [create]
        statements += self._when_traced(helper, node, [_CAPTURE.format(store=f"{helper}.before", name=name)
                                                       for name in names])
        statements.append(self._run_branch(helper, "then_taken", "then", node.body, node))
        statements += self._when_traced(helper, node,
                                        [_CAPTURE.format(store=f"{helper}.then_values", name=name) for name in names]
                                        + [_RESTORE.format(store=f"{helper}.before", name=name) for name in names])
        if node.orelse:
            statements.append(self._run_branch(helper, "else_taken", "otherwise", node.orelse, node))
        statements += self._when_traced(helper, node,
                                        [_CAPTURE.format(store=f"{helper}.else_values", name=name) for name in names]
                                        + [f"{helper}.merge()\n"] * bool(names)
                                        + [_RESTORE.format(store=f"{helper}.merged", name=name) for name in names])
        return statements

    @staticmethod
    def _when_traced(helper: str, anchor: ast.AST, sources: list[str]) -> list[ast.stmt]:
        if not sources:
            return []
        test = ast.Attribute(ast.Name(helper, ast.Load()), "traced", ast.Load())
        return [_stamped(ast.If(test, ast.parse("".join(sources)).body, []), anchor)]

    @staticmethod
    def _run_branch(helper: str, flag: str, block: str, body: list[ast.stmt], anchor: ast.AST) -> ast.stmt:
        """``if helper.flag: with helper.block(): body`` — the user's statements keep their own locations."""
        context = ast.Call(ast.Attribute(ast.Name(helper, ast.Load()), block, ast.Load()), [], [])
        with_block = ast.With([ast.withitem(context)], [ast.Pass()])
        statement = _stamped(ast.If(ast.Attribute(ast.Name(helper, ast.Load()), flag, ast.Load()), [with_block], []),
                             anchor)
        with_block.body = body
        return statement


def _stamped(generated: ast.AST, anchor: ast.If) -> ast.AST:
    """Give every node of ``generated`` (which holds no user code yet) the location of ``anchor``'s header line
    (``if <test>``), so errors and tracebacks point at it."""
    location = {"lineno": anchor.lineno, "col_offset": anchor.col_offset,
                "end_lineno": anchor.test.end_lineno, "end_col_offset": anchor.test.end_col_offset}
    for node in ast.walk(generated):
        for attribute, value in location.items():
            if attribute in node._attributes:
                setattr(node, attribute, value)
    return generated


def _branch_names(statements: list[ast.stmt]) -> list[str]:
    """Names bound in these statements' own scope (what an ``if`` must merge), without helper names."""
    found: dict[str, None] = {}
    for statement in statements:
        for node in _walk_scope(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                found[node.id] = None
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                found.update(dict.fromkeys((alias.asname or alias.name).split(".")[0] for alias in node.names))
    return [name for name in found if not name.startswith(HELPER_PREFIX)]


_JUMPS = {ast.Break: "break", ast.Continue: "continue", ast.Return: "return", ast.Raise: "raise",
          ast.Yield: "yield", ast.YieldFrom: "yield"}
_LOOPS = (ast.For, ast.While, ast.AsyncFor)
_SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)


def _first_jump(statements: list[ast.stmt]) -> tuple[str, int] | None:
    """The first statement in these bodies that leaves them (or yields) at build time: ``(keyword, line)``."""
    for statement in statements:
        found = _jump_in(statement, in_loop=False)
        if found is not None:
            return found
    return None


def _jump_in(node: ast.AST, in_loop: bool) -> tuple[str, int] | None:
    """``break``/``continue`` inside a loop of the branch stay in that loop; the others always escape."""
    keyword = _JUMPS.get(type(node))
    if keyword is not None and not (in_loop and keyword in ("break", "continue")):
        return keyword, node.lineno
    if isinstance(node, _SCOPES):
        return None
    for child in ast.iter_child_nodes(node):
        inside = in_loop or (isinstance(node, _LOOPS) and any(child is each for each in node.body))
        found = _jump_in(child, inside)
        if found is not None:
            return found
    return None
