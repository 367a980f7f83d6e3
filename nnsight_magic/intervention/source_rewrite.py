"""A module's ``forward`` rewritten so that each of its operations is a call of a tiny module (``.source``).

In [1]: rewrite = ForwardRewrite.of(type(gpt2.transformer.h[0].mlp).forward)
In [2]: [site.name for site in rewrite.sites]
Out[2]: ['c_fc_0', 'hidden_states_0', 'act_0', 'hidden_states_1', 'c_proj_0', 'hidden_states_2', 'dropout_0',
         'hidden_states_3', 'hidden_states']

The function's source is parsed (``inspect.getsource``, the same text Python runs) and two small
``ast.NodeTransformer`` passes change it, each statement keeping its line in the original file:

* :class:`CallWrapping`: every call ``f(a, k=b)`` becomes ``_nnsight_source_.call("f_0", f, a, k=b)``;
  the name is the callee's last name with a count per name, in source order (``view_0``, ``view_1``).
* :class:`AssignmentRecording`: after every assignment to a plain name (``x = ...``, ``a, b = ...``,
  ``x += ...``), ``x = _nnsight_source_.assigned("x", None, x)``. A variable assigned on several lines gets one
  operation per line (``x_0``, ``x_1``, ...) and ``x`` itself for every assignment, in the order they run.

``_nnsight_source_`` is the module's operations holder, ``self._modules["source"]``, read at the top of the
function (see :mod:`.source_install`); a plain function a forward calls (:meth:`ForwardRewrite.of_function`,
``attn.source.attention_interface_0.source``) reads it as :func:`current_holder`, set by the operation calling it. The new function is compiled with the original's globals and closure
cells (so ``eager_attention_forward``, ``apply_rotary_pos_emb`` and zero-argument ``super()`` resolve as before)
inside a class of the original class's name (so private names are mangled the same way). Decorators that wrap
``forward`` with ``functools.wraps`` (Hugging Face's ``deprecate_kwarg``) are rebuilt around the new function
from their own code and cells; nothing is re-evaluated. Calls of ``super``, ``isinstance`` and similar builtins,
calls inside ``raise``/``assert``, and code in nested ``def``/``lambda`` are left as they are. A rewrite is made
once per function and cached.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
import threading
import types
import weakref
from dataclasses import dataclass
from typing import Any, Callable

HOLDER = "_nnsight_source_"  # the local that holds the operations (one leading underscore: never mangled)
HOLDER_OF_CALL = "_nnsight_holder_"  # a plain function's way to its holder: a cell holding `current_holder`
SOURCE_KEY = "source"  # the holder's name among the module's children while a trace uses it
_holders = threading.local()  # the holders of the plain functions being called through operations (innermost last)


def holder_stack() -> list:
    """This thread's holders of rewritten plain functions being called (see :func:`current_holder`)."""
    stack = getattr(_holders, "stack", None)
    if stack is None:
        stack = _holders.stack = []
    return stack


def current_holder() -> Any:
    """The operations holder of the innermost rewritten plain function being called (its first line reads it)."""
    return holder_stack()[-1]
_UNWRAPPED_BUILTINS = frozenset({
    "super", "isinstance", "issubclass", "hasattr", "getattr", "setattr", "delattr", "len", "type", "callable",
    "id", "print", "locals", "globals", "vars", "dir", "eval", "exec", "iter", "next", "range", "enumerate", "zip",
    "repr", "str", "int", "float", "bool", "tuple", "list", "dict", "set", "frozenset", "all", "any", "sorted",
    "reversed", "hash"})


class SourceUnavailable(TypeError):
    """The forward cannot be rewritten (no Python source, an unknown wrapper, no ``self`` argument)."""


@dataclass(frozen=True)
class Site:
    """One addressable operation: ``kind`` is ``"call"``, ``"assignment"`` (one line) or ``"variable"`` (every
    assignment of a name assigned on several lines); ``line`` is its line in ``filename``; ``text`` the callee
    as written or the variable's name; ``lines`` the lines of a variable's assignments."""

    name: str
    kind: str
    line: int
    text: str
    lines: tuple[int, ...] = ()


class ForwardRewrite:
    """The rewritten ``forward`` of one function and its operations; :meth:`of` caches one per function.

    A module's forward finds its operations as ``self._modules["source"]``; a plain function a forward calls
    (:meth:`of_function`: ``eager_attention_forward``, ``apply_rotary_pos_emb``) as :func:`current_holder`, which
    the operation that calls it sets.

    Attributes:
        function: the function as the class holds it (a decorator's wrapper, perhaps).
        sites: every operation, in source order (variables of several assignments last).
        forward: the rewritten function, wrappers rebuilt around it; bind it to a module to run it.
        qualname: the innermost function's qualified name (``LlamaAttention.forward``, ``eager_attention_forward``).
        filename, first_line, lines: where the innermost function's source is, and its text (for printing).
    """

    _cache: "weakref.WeakKeyDictionary[Callable, ForwardRewrite]" = weakref.WeakKeyDictionary()
    _function_cache: "weakref.WeakKeyDictionary[Callable, ForwardRewrite]" = weakref.WeakKeyDictionary()

    def __init__(self, function: Callable, method: bool = True):
        self.function = function
        chain = _wrapper_chain(function)
        inner = chain[-1]
        code = inner.__code__
        self.qualname = inner.__qualname__
        if method and code.co_argcount < 1:
            raise SourceUnavailable(f"{inner.__qualname__} takes no `self` argument")
        try:
            lines, first_line = inspect.getsourcelines(inner)
        except (OSError, TypeError) as error:
            raise SourceUnavailable(f"the source of {inner.__qualname__} is not available ({error})") from error
        self.filename, self.first_line, self.lines = code.co_filename, first_line, lines
        tree = ast.parse(textwrap.dedent("".join(lines)))
        ast.increment_lineno(tree, first_line - 1)
        definition = tree.body[0]
        if not isinstance(definition, ast.FunctionDef):
            raise SourceUnavailable(f"{inner.__qualname__} is not a plain `def` (async or generated)")
        definition.decorator_list = []
        names = _name_sites(definition)
        self.sites = names.sites
        definition = CallWrapping(names.calls).visit(definition)
        definition = AssignmentRecording(names.assignments).visit(definition)
        found = f"{code.co_varnames[0]}._modules[{SOURCE_KEY!r}]" if method else f"{HOLDER_OF_CALL}()"
        holder = ast.parse(f"{HOLDER} = {found}").body[0]
        definition.body.insert(0, ast.copy_location(holder, definition.body[0]))
        rewritten = _compile(definition, inner, {} if method else {HOLDER_OF_CALL: current_holder})
        self.forward = _rebuild(chain, rewritten)

    @classmethod
    def of(cls, function: Callable) -> "ForwardRewrite":
        """The (cached) rewrite of a module's ``forward``; raises :class:`SourceUnavailable` when there is none."""
        rewrite = cls._cache.get(function)
        if rewrite is None:
            rewrite = cls._cache[function] = cls(function)
        return rewrite

    @classmethod
    def of_function(cls, function: Callable) -> "ForwardRewrite":
        """The (cached) rewrite of a plain function a forward calls (its holder: :func:`current_holder`)."""
        rewrite = cls._function_cache.get(function)
        if rewrite is None:
            rewrite = cls._function_cache[function] = cls(function, method=False)
        return rewrite


# ------------------------------------------------------------------------------------------------ naming
@dataclass
class _Names:
    sites: list[Site]
    calls: dict[int, str]  # id(ast.Call) -> operation name
    assignments: dict[int, list[tuple[str, str, str | None]]]  # id(statement) -> [(variable, site, variable op)]


def _scope(definition: ast.FunctionDef) -> list[ast.AST]:
    """The nodes of the function's own body, minus nested defs, lambdas, classes and raise/assert statements."""
    found, stack = [], list(reversed(definition.body))
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.Raise,
                             ast.Assert)):
            continue
        found.append(node)
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return found


def callee_name(call: ast.Call) -> str:
    """``torch.matmul`` → ``matmul``, ``self.c_attn`` → ``c_attn``, ``f`` → ``f``; anything else → ``call``."""
    function = call.func
    if isinstance(function, ast.Attribute):
        return function.attr
    if isinstance(function, ast.Name):
        return function.id
    return "call"


def _wrapped(call: ast.Call) -> bool:
    return not (isinstance(call.func, ast.Name) and call.func.id in _UNWRAPPED_BUILTINS)


def _target_names(target: ast.AST) -> list[str]:
    if isinstance(target, ast.Name):
        return [target.id]
    if isinstance(target, (ast.Tuple, ast.List)):
        return [name for item in target.elts for name in _target_names(item)]
    if isinstance(target, ast.Starred):
        return _target_names(target.value)
    return []


def _name_sites(definition: ast.FunctionDef) -> _Names:
    nodes = _scope(definition)
    calls = sorted((node for node in nodes if isinstance(node, ast.Call) and _wrapped(node)),
                   key=lambda call: (call.func.end_lineno, call.func.end_col_offset))
    statements = []
    for node in nodes:
        if isinstance(node, ast.Assign):
            names = [name for target in node.targets for name in _target_names(target)]
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and getattr(node, "value", None) is not None:
            names = _target_names(node.target)
        else:
            continue
        statements.append((node, list(dict.fromkeys(names))))
    statements.sort(key=lambda item: (item[0].lineno, item[0].col_offset))
    lines_of: dict[str, list[int]] = {}
    for statement, names in statements:
        for name in names:
            lines_of.setdefault(name, []).append(statement.lineno)
    taken: set[str] = set()

    def unique(name: str) -> str:
        while name in taken:
            name += "_"
        taken.add(name)
        return name

    variables = {name: unique(name) for name in lines_of}
    sites: list[Site] = []
    assignments: dict[int, list[tuple[str, str, str | None]]] = {}
    seen: dict[str, int] = {}
    positioned: list[tuple[tuple[int, int], Site]] = []
    for statement, names in statements:
        for name in names:
            several = len(lines_of[name]) > 1
            number = seen.get(name, 0)
            seen[name] = number + 1
            site = unique(f"{name}_{number}") if several else variables[name]
            assignments.setdefault(id(statement), []).append((name, site, variables[name] if several else None))
            positioned.append(((statement.end_lineno, statement.end_col_offset),
                               Site(site, "assignment", statement.lineno, name)))
    counts: dict[str, int] = {}
    call_names: dict[int, str] = {}
    for call in calls:
        base = callee_name(call)
        number = counts.get(base, 0)
        counts[base] = number + 1
        call_names[id(call)] = name = unique(f"{base}_{number}")
        positioned.append(((call.func.end_lineno, call.func.end_col_offset),
                           Site(name, "call", call.func.end_lineno, ast.unparse(call.func))))
    sites = [site for _, site in sorted(positioned, key=lambda item: item[0])]
    sites += [Site(variables[name], "variable", lines[0], name, tuple(lines))
              for name, lines in lines_of.items() if len(lines) > 1]
    return _Names(sites, call_names, assignments)


# --------------------------------------------------------------------------------------------- rewriting
class CallWrapping(ast.NodeTransformer):
    """``f(a, k=b)`` → ``_nnsight_source_.call("f_0", f, a, k=b)`` for each named call (nested code has none)."""

    def __init__(self, names: dict[int, str]):
        self.names = names

    def visit_Call(self, node: ast.Call) -> ast.AST:
        name = self.names.get(id(node))
        self.generic_visit(node)
        if name is None:
            return node
        method = ast.Attribute(ast.Name(HOLDER, ast.Load()), "call", ast.Load())
        return ast.copy_location(ast.Call(method, [ast.Constant(name), node.func, *node.args], node.keywords), node)



class AssignmentRecording(ast.NodeTransformer):
    """After ``x = ...``: ``x = _nnsight_source_.assigned("x_1", "x", x)`` for each named variable."""

    def __init__(self, assignments: dict[int, list[tuple[str, str, str | None]]]):
        self.assignments = assignments

    def _record(self, node: ast.stmt) -> Any:
        recorded = self.assignments.get(id(node))
        if not recorded:
            return node
        statements: list[ast.stmt] = [node]
        for variable, site, every in recorded:
            call = ast.Call(ast.Attribute(ast.Name(HOLDER, ast.Load()), "assigned", ast.Load()),
                            [ast.Constant(site), ast.Constant(every), ast.Name(variable, ast.Load())], [])
            statements.append(ast.copy_location(ast.Assign([ast.Name(variable, ast.Store())], call), node))
        return statements

    visit_Assign = visit_AugAssign = visit_AnnAssign = _record


# --------------------------------------------------------------------------------------------- compiling
def _wrapper_chain(function: Callable) -> list[types.FunctionType]:
    """``[wrapper, ..., original]`` following ``__wrapped__``; each wrapper must hold the next in a cell."""
    chain = [function]
    while hasattr(chain[-1], "__wrapped__"):
        chain.append(chain[-1].__wrapped__)
    for outer, inner in zip(chain, chain[1:]):
        if not isinstance(outer, types.FunctionType) or not any(
                _cell_value(cell) is inner for cell in outer.__closure__ or ()):
            raise SourceUnavailable(f"{function.__qualname__} is wrapped by {outer!r}, which does not keep the "
                                    "function it wraps in a closure; it cannot be rebuilt around the rewrite")
    if not isinstance(chain[-1], types.FunctionType):
        raise SourceUnavailable(f"{function!r} is not a Python function")
    return chain


def _cell_value(cell: types.CellType) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None


def _compile(definition: ast.FunctionDef, original: types.FunctionType,
             extra: dict[str, Any]) -> types.FunctionType:
    """Compile the rewritten ``def`` with ``original``'s globals, closure cells, defaults and name mangling, and
    a cell for each of ``extra`` (names the rewrite added)."""
    code = original.__code__
    free = [*code.co_freevars, *extra]
    factory = ast.FunctionDef(
        name="_nnsight_factory_", args=ast.arguments([], [ast.arg(name) for name in free], None, [], [],
                                                     None, []),
        body=[definition, ast.Return(ast.Name(definition.name, ast.Load()))], decorator_list=[], returns=None)
    body: ast.stmt = factory
    owner = original.__qualname__.split(".")[-2] if "." in original.__qualname__ else None
    if owner and owner != "<locals>":
        body = ast.ClassDef(owner, [], [], [factory], [])  # private names mangle as before
    module = ast.Module([body], [])
    ast.copy_location(factory, definition)
    ast.copy_location(body, definition)
    ast.fix_missing_locations(module)
    compiled = compile(module, code.co_filename, "exec")
    new_code = _find_code(compiled, code.co_name)
    cells = dict(zip(code.co_freevars, original.__closure__ or ()))
    cells.update({name: types.CellType(value) for name, value in extra.items()})
    function = types.FunctionType(new_code, original.__globals__, original.__name__, original.__defaults__,
                                  tuple(cells[name] for name in new_code.co_freevars))
    _copy_metadata(function, original)
    return function


def _find_code(code: types.CodeType, name: str) -> types.CodeType:
    """The code object of the rewritten function inside the compiled module."""
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            if constant.co_qualname.endswith(f"_nnsight_factory_.<locals>.{name}"):
                return constant
            try:
                return _find_code(constant, name)
            except SourceUnavailable:
                pass
    raise SourceUnavailable(f"the rewritten {name} was not found after compiling")


def _copy_metadata(function: types.FunctionType, original: types.FunctionType) -> None:
    function.__kwdefaults__ = original.__kwdefaults__
    function.__qualname__ = original.__qualname__
    function.__doc__ = original.__doc__
    function.__module__ = original.__module__
    function.__dict__.update(original.__dict__)


def _rebuild(chain: list[types.FunctionType], rewritten: types.FunctionType) -> types.FunctionType:
    """The wrappers of ``chain`` rebuilt, innermost first, each around the rebuilt function inside it."""
    current = rewritten
    for outer, inner in zip(reversed(chain[:-1]), reversed(chain[1:])):
        closure = tuple(types.CellType(current) if _cell_value(cell) is inner else cell for cell in outer.__closure__)
        wrapper = types.FunctionType(outer.__code__, outer.__globals__, outer.__name__, outer.__defaults__, closure)
        _copy_metadata(wrapper, outer)
        wrapper.__wrapped__ = current
        current = wrapper
    return current
