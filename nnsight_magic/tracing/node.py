"""One operation of an intervention graph.

A :class:`Node` records *what* to compute (``op``, ``target``, ``args``, ``kwargs``), *where the user asked for
it* (``filename``, ``lineno``), and what is known about its value before anything runs (``fake``, a
``torch._subclasses.FakeTensor`` or a nested structure of them). Nodes refer to the nodes they read through
their ``args`` (plain ``Node`` objects, as in torch.fx) and to everything else by index, so a graph holds no
reference cycles and frees as soon as nobody holds it.

The set of ops is small and closed:

==================  ============================================================================================
op                  meaning
==================  ============================================================================================
``module_output``   the output of one call of a module (``target`` is the module path); set by a forward hook
``module_inputs``   ``(args, kwargs)`` of one call of a module; set by a forward pre-hook
``grad``            the gradient of ``args[0]`` in one ``.backward()``; set by a tensor hook
``result``          what the model run returned (generated ids for ``generate``)
``bridge``          a value computed by an earlier trace of the same session
``iteration``       the index of the current generation step inside an iteration block
``call_function``   ``target(*args, **kwargs)``
``call_method``     ``args[0].<target>(*args[1:], **kwargs)``
``getattr``         ``getattr(args[0], target)``
``apply_module``    ``module.forward(*args, **kwargs)`` for the module at path ``target`` (hooks do not fire)
``swap``            replace the value of the entry node ``args[0]`` with ``args[1]`` for the rest of the model
``update``          replace the value that the node ``args[0]`` holds with ``args[1]``
``log``             ``print(*args)`` when the values exist
``cond``            ``bool(args[0])``; decides which of the nodes conditioned on it run
``merge``           ``args[1]`` if the condition ``args[0]`` held, else ``args[2]`` (an ``if`` that assigned)
``stop``            stop the model run once every earlier node has run
``new_list``        a fresh ``list`` at execution time (an accumulator)
==================  ============================================================================================

Entry ops (the first six) get their values from outside the graph; every other op computes its value from its
arguments. ``saved`` marks a node whose value outlives the run (``proxy.save()``).
"""

from __future__ import annotations

import io
import linecache
import operator
import os
import tokenize
from typing import Any, Callable, Iterable, Iterator

from ..errors import user_location

ENTRY_OPS = frozenset({"module_output", "module_inputs", "grad", "result", "bridge", "iteration"})

_OPERATOR_SYMBOLS = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/", operator.floordiv: "//",
    operator.mod: "%", operator.pow: "**", operator.matmul: "@", operator.and_: "&", operator.or_: "|",
    operator.xor: "^", operator.lshift: "<<", operator.rshift: ">>", operator.eq: "==", operator.ne: "!=",
    operator.lt: "<", operator.le: "<=", operator.gt: ">", operator.ge: ">=",
    operator.iadd: "+=", operator.isub: "-=", operator.imul: "*=", operator.itruediv: "/=",
    operator.ifloordiv: "//=", operator.imod: "%=", operator.ipow: "**=", operator.imatmul: "@=",
    operator.iand: "&=", operator.ior: "|=", operator.ixor: "^=",
}


class Located:
    """What an object with ``filename`` and ``lineno`` (a node, a :class:`SourceLine`) says about its user line."""

    __slots__ = ()

    @property
    def location(self) -> str:
        """Where the user wrote it: ``line 3`` in a notebook cell, ``script.py:12`` in a file."""
        return describe_location(self.filename, self.lineno)

    @property
    def source_line(self) -> str:
        """The code on the user's line (without a trailing comment), if it can be found."""
        return source_text(self.filename, self.lineno)


class Node(Located):
    """One operation in a :class:`~nnsight_magic.tracing.graph.Graph`.

    In [1]: with net.trace(x) as tracer:
       ...:     h = net.layer1.output[:, 0]
    In [2]: print(tracer.graph.nodes[1])
    %1 = getitem %0[:, 0]    line 2  (1,) float32

    Attributes:
        index: position in the graph; edges to other nodes are these indices.
        op: one of the ops in the module docstring.
        target: the function, method name, attribute name or module path the op applies.
        args, kwargs: arguments, with ``Node`` objects where a traced value goes.
        filename, lineno: where the user's code created the node (a notebook cell or a file).
        fake: the value's fake tensor (shape, dtype, device) when shapes are known, else ``None``.
        dependencies: indices of every node that must run first (data and ordering edges).
        data_dependencies: indices of the nodes whose *values* this node reads.
        listeners: indices of the nodes that depend on this one.
        saved: keep the value after the run.
        section: index of the iteration block (generation steps) the node belongs to, or ``None``.
        branch: ``(cond_index, taken_when)`` when the node only runs if a condition has that truth value.
        alias: index of the node whose storage this node's value shares (a view), or ``None``.
        meta: free-form facts about the node: module call, invoke, generation step, what it writes.
    """

    __slots__ = ("index", "op", "target", "args", "kwargs", "filename", "lineno", "fake", "dependencies",
                 "data_dependencies", "listeners", "saved", "section", "branch", "alias", "meta")

    def __init__(self, index: int, op: str, target: Any, args: tuple = (), kwargs: dict | None = None,
                 filename: str = "", lineno: int = 0):
        self.index = index
        self.op = op
        self.target = target
        self.args = args
        self.kwargs = kwargs or {}
        self.filename = filename
        self.lineno = lineno
        self.fake: Any = None
        self.dependencies: tuple[int, ...] = ()
        self.data_dependencies: tuple[int, ...] = ()
        self.listeners: list[int] = []
        self.saved = False
        self.section: int | None = None
        self.branch: tuple[int, bool] | None = None
        self.alias: int | None = None
        self.meta: dict[str, Any] = {}

    @property
    def is_entry(self) -> bool:
        """True for nodes whose value comes from outside the graph (a hook, a bridge, the run's result)."""
        return self.op in ENTRY_OPS

    @property
    def storage_root(self) -> int:
        """Index of the node that owns the storage this node's value lives in (itself unless it is a view)."""
        return self.index if self.alias is None else self.alias

    def describe(self) -> str:
        """A short, readable description: ``model.layers[5].output``, ``setitem``, ``x.sum()``."""
        return describe_operation(self)

    def __repr__(self) -> str:
        shape = describe_fake(self.fake)
        where = f"    {self.location}" if self.lineno else ""
        return f"%{self.index} = {self.describe()}{where}  {shape}".rstrip()


def iter_nodes(value: Any) -> Iterator[Node]:
    """Yield every ``Node`` inside ``value`` (tuples, lists, dicts and slices are searched)."""
    if isinstance(value, Node):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from iter_nodes(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_nodes(item)
    elif isinstance(value, slice):
        yield from iter_nodes((value.start, value.stop, value.step))


def map_nodes(fn: Callable[[Node], Any], value: Any) -> Any:
    """Return ``value`` with every ``Node`` inside it replaced by ``fn(node)``; containers keep their types."""
    if isinstance(value, Node):
        return fn(value)
    if isinstance(value, tuple):
        items = [map_nodes(fn, item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [map_nodes(fn, item) for item in value]
    if isinstance(value, dict):
        return {key: map_nodes(fn, item) for key, item in value.items()}
    if isinstance(value, slice):
        return slice(map_nodes(fn, value.start), map_nodes(fn, value.stop), map_nodes(fn, value.step))
    return value


def contains_node(value: Any) -> bool:
    """True if ``value`` holds a ``Node`` anywhere inside it."""
    return next(iter_nodes(value), None) is not None


def source_text(filename: str, lineno: int) -> str:
    """The code on line ``lineno`` of ``filename`` (a file or a notebook cell), without a trailing comment."""
    text = linecache.getline(filename, lineno).strip() if filename else ""
    if "#" not in text:
        return text
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT:
                return text[:token.start[1]].rstrip()
    except (tokenize.TokenError, SyntaxError):
        pass
    return text


class SourceLine(Located):
    """A place in the user's code (``filename``, ``lineno``), read like a node's for errors.

    In [1]: SourceLine("cell.py", 3).location
    Out[1]: 'line 3'
    """

    __slots__ = ("filename", "lineno")

    def __init__(self, filename: str, lineno: int):
        self.filename, self.lineno = filename, lineno

    @classmethod
    def here(cls) -> "SourceLine":
        """The user's line that is running now."""
        return cls(*user_location())



def user_line() -> str:
    """``line 3 `code``` (or ``file.py:12 `code```) for the user's line that is running now."""
    filename, lineno = user_location()
    if not lineno:
        return "here"
    source = source_text(filename, lineno)
    where = describe_location(filename, lineno)
    return f"{where} `{source}`" if source else where


def describe_location(filename: str, lineno: int) -> str:
    """``line 3`` for notebook cells and other in-memory code, ``name.py:12`` for files on disk."""
    if not filename or filename.startswith("<") or not os.path.exists(filename) or "ipykernel" in filename:
        return f"line {lineno}"
    return f"{os.path.basename(filename)}:{lineno}"


def describe_fake(fake: Any) -> str:
    """``(1, 10, 576) float32`` for a tensor, a nested form for tuples, ``''`` when unknown."""
    shape = getattr(fake, "shape", None)
    if shape is not None and hasattr(fake, "dtype"):
        return f"{tuple(shape)} {str(fake.dtype).replace('torch.', '')}"
    if isinstance(fake, (tuple, list)) and fake:
        inner = ", ".join(describe_fake(item) or type(item).__name__ for item in fake[:3])
        return f"[{inner}{', ...' if len(fake) > 3 else ''}]"
    if isinstance(fake, (bool, int, float)):
        return f"{type(fake).__name__}"
    return ""


def describe_operation(node: Node) -> str:
    """The human name of a node's operation, used by ``print(graph)``, errors and the inspector widget."""
    op, target = node.op, node.target
    if op in ("module_output", "module_inputs"):
        attribute = "output" if op == "module_output" else "inputs"
        call = node.meta.get("call", 0)
        step = node.meta.get("step", 0)
        suffix = (f" (call {call})" if call else "") + (f" (step {step})" if step else "")
        return f"{module_label(target)}.{attribute}{suffix}"
    if op == "grad":
        return f"%{node.args[0].index}.grad"
    if op == "swap":
        return f"%{node.args[0].index} := %{node.args[1].index}" if isinstance(node.args[1], Node) else \
            f"%{node.args[0].index} := value"
    if op == "getattr":
        return f"{_argument(node.args[0])}.{target}"
    if op == "call_method":
        return f"{_argument(node.args[0])}.{target}({_arguments(node.args[1:], node.kwargs)})"
    if op == "apply_module":
        return f"{module_label(target)}({_arguments(node.args, node.kwargs)})"
    if op == "call_function":
        if target is operator.getitem:
            return f"{_argument(node.args[0])}[{_index(node.args[1])}]"
        if target is operator.setitem:
            return f"{_argument(node.args[0])}[{_index(node.args[1])}] = {_argument(node.args[2])}"
        symbol = _OPERATOR_SYMBOLS.get(target)
        if symbol and len(node.args) == 2:
            return f"{_argument(node.args[0])} {symbol} {_argument(node.args[1])}"
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
        module = getattr(target, "__module__", "") or ""
        if module.startswith("torch"):
            name = "torch." + name if module in ("torch", "torch._C._VariableFunctions") else name
        return f"{name}({_arguments(node.args, node.kwargs)})"
    if op == "log":
        return f"print({_arguments(node.args, node.kwargs)})"
    if op == "cond":
        return f"if {_argument(node.args[0])}"
    if op == "merge":
        return f"%{node.args[0].index} ? {_argument(node.args[1])} : {_argument(node.args[2])}"
    if op == "update":
        return f"{_argument(node.args[0])}.update({_argument(node.args[1])})"
    if op == "bridge":
        return f"from trace {target[0]}: {node.meta.get('label', '%' + str(target[1]))}"
    if op == "iteration":
        return "generation step"
    if op == "result":
        return "result"
    if op == "stop":
        return "stop"
    if op == "new_list":
        return "list()"
    return f"{op} {target!r}"


def module_label(path: str) -> str:
    """``model.layers.5.mlp`` → ``model.layers[5].mlp`` (``model`` for the root, ``model[0]`` for the root's
    numbered child, as in an ``nn.Sequential``)."""
    if not path:
        return "model"
    parts: list[str] = []
    for part in path.split("."):
        if part.isdigit():
            parts = parts or ["model"]
            parts[-1] += f"[{part}]"
        else:
            parts.append(part)
    return ".".join(parts)


def _argument(value: Any) -> str:
    if isinstance(value, Node):
        return f"%{value.index}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_argument(item) for item in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"tensor{tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 24 else text[:21] + "..."


def _arguments(args: Iterable, kwargs: dict) -> str:
    parts = [_argument(item) for item in args] + [f"{key}={_argument(item)}" for key, item in kwargs.items()]
    return ", ".join(parts)


def _index(key: Any) -> str:
    items = key if isinstance(key, tuple) else (key,)
    parts = []
    for item in items:
        if isinstance(item, slice):
            parts.append(":".join("" if part is None else _argument(part)
                                  for part in (item.start, item.stop) + ((item.step,) if item.step else ())))
        elif item is Ellipsis:
            parts.append("...")
        else:
            parts.append(_argument(item))
    return ", ".join(parts)
