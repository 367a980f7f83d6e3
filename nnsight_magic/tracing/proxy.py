"""A thin stand-in for a value the model has not produced yet.

A :class:`Proxy` holds a node and the tracer that builds the graph. Every operation on it — operators
(including in-place and reflected ones), indexing, attribute access, method calls, and ``torch.*`` / ``F.*``
functions through ``__torch_function__`` — goes through one funnel, ``tracer.create_proxy``, and returns a new
proxy for the new node.

In [1]: with net.trace(x) as tracer:
   ...:     h = net.layer1.output            # Proxy of a module_output node
   ...:     print(h.shape)                   # torch.Size([1, 10]): known now, from fake tensors
   ...:     y = torch.relu(h) @ W + 1        # three more nodes
   ...:     y.save()
In [2]: y.value                              # the real tensor, after the run

Python cannot defer ``bool()``, ``iter()`` or ``len()``: they must return a real value now, so on a proxy they
raise a ``TypeError`` that names the fix (``tracer.cond`` in Python, or a ``%%trace`` cell, which rewrites ``if``).
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import torch

from ..errors import user_location
from .node import Node, describe_fake

_NOT_SET = object()

_CONTROL_FLOW_HELP = (
    "A traced value has no real value while the cell is being built, so Python cannot {what}. "
    "In a `%%trace` cell, write a plain `if`/`for` and the magic turns it into graph code; in Python use "
    "`with tracer.cond(value):` for conditions, index explicitly (`out[0]`, `out[1]`) instead of unpacking or "
    "iterating, and use `proxy.shape` for sizes."
)


def _surfacing(getter: Any) -> property:
    """A property whose ``AttributeError`` reaches the caller.

    Python answers an ``AttributeError`` raised inside a property by calling ``__getattr__``, which on a proxy
    would quietly build another traced attribute instead of showing the user's error (``out.shape`` on a traced
    tuple). The getter leaves its error on the proxy, and ``Proxy.__getattr__`` raises that error, unchanged.
    """
    @functools.wraps(getter)
    def wrapper(self: "Proxy") -> Any:
        try:
            return getter(self)
        except AttributeError as error:
            object.__setattr__(self, "_error", error)
            raise
    return property(wrapper)


class Proxy:
    """A value in the intervention graph; see the module docstring.

    Attributes (all read-only for users):
        node: the :class:`Node` this proxy stands for.
        tracer: the tracer that builds the graph, until the graph has run (then ``None``).
    """

    __slots__ = ("_node", "_tracer", "_value", "_error", "__weakref__")

    def __init__(self, node: Node, tracer: Any):
        _set_node(self, node)  # the slots' own setters: `Proxy.__setattr__` refuses every name
        _set_tracer(self, tracer)
        _set_value(self, _NOT_SET)

    # ------------------------------------------------------------------------------------ the public surface
    @_surfacing
    def node(self) -> Node:
        return self._node

    @_surfacing
    def tracer(self) -> Any:
        return self._tracer

    def save(self) -> "Proxy":
        """Keep this value after the run (zero-copy: the very tensor the model produced). Returns ``self``."""
        if self._tracer is None:
            self._builder("save")  # raises: the trace has run
        (self._node or self.node).saved = True  # an attribute proxy makes its node on first use
        return self

    @property
    def value(self) -> Any:
        """The real value after the run; a clear error before it, or for a value that was not saved.

        A plain property: it raises only ``ValueError``, never the ``AttributeError`` that ``_surfacing`` is for.
        """
        if self._value is not _NOT_SET:
            return self._value
        node = self.node
        if self._tracer is not None:
            raise ValueError(f"{self._label()} has no value yet: the model runs when the trace block ends "
                             "(read `.value` after the `with` block)")
        if node.saved:
            raise ValueError(f"{self._label()} was saved but never computed: the run ended before it (an early "
                             "`tracer.stop()`, a failed run, or a branch that was not taken)")
        raise ValueError(f"{self._label()} was not saved, so its value was freed after the run; "
                         f"call `.save()` on it inside the trace ({node.location})")

    @_surfacing
    def shape(self) -> Any:
        """The value's shape (a real ``torch.Size`` while building when shapes are known)."""
        return self._metadata("shape")

    @_surfacing
    def dtype(self) -> Any:
        return self._metadata("dtype")

    @_surfacing
    def device(self) -> Any:
        return self._metadata("device")

    @_surfacing
    def ndim(self) -> Any:
        return self._metadata("ndim")

    def size(self, dim: Any = None) -> Any:
        """``x.size()`` / ``x.size(d)``: real sizes while building when shapes are known."""
        fake = self.node.fake
        if isinstance(fake, torch.Tensor) and not isinstance(dim, Proxy):
            return fake.size() if dim is None else fake.size(dim)
        return self.__getattr__("size")() if dim is None else self.__getattr__("size")(dim)

    def dim(self) -> Any:
        fake = self.node.fake
        return fake.dim() if isinstance(fake, torch.Tensor) else self.__getattr__("dim")()

    @property
    def grad(self) -> "Proxy":
        """The gradient of this value in the next ``.backward()`` traced after this line."""
        return self._builder("read .grad").grad_of(self)

    @grad.setter
    def grad(self, value: Any) -> None:
        self._builder("set .grad").set_grad(self, value)

    def update(self, value: Any) -> "Proxy":
        """Make this value ``value`` from here on (accumulators across invokes, steps and traces)."""
        return self._builder("update").update(self, value)

    # -------------------------------------------------------------------------------------------- internals
    def _builder(self, action: str) -> Any:
        tracer = self._tracer
        if tracer is None:
            raise RuntimeError(f"cannot {action} {self._label()}: its trace has already run. Use `.value` for the "
                               "saved result, or do this inside the trace")
        return tracer

    def _label(self) -> str:
        node = self.node
        return f"{node.describe()} ({node.location})" if node.lineno else node.describe()

    def _metadata(self, name: str) -> Any:
        fake = self.node.fake
        if isinstance(fake, torch.Tensor):
            return getattr(fake, name)  # a fake tensor reports the device the real value will live on
        if self._value is not _NOT_SET and hasattr(self._value, name):
            return getattr(self._value, name)
        return self.__getattr__(name)

    def _create(self, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> "Proxy":
        return self._builder("compute with").create_proxy(op, target, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        error = _take_error(self)
        if error is not None:
            raise error  # a property of this proxy failed with the user's own AttributeError (see _surfacing)
        if name.startswith("_"):  # dunders, and display probes such as IPython's `_repr_html_`
            raise AttributeError(name)
        attribute = Attribute(self, name)
        self._builder(f"read .{name} of").adopt(attribute)
        return attribute

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad":
            Proxy.grad.fset(self, value)
            return
        raise AttributeError(f"cannot set attribute {name!r} on a traced value; assign to a module's "
                             "`.output`/`.input`, or edit in place (`x[:] = ...`)")

    def __setitem__(self, key: Any, value: Any) -> None:
        self._create("call_function", operator.setitem, (self, key, value))

    def __getitem__(self, key: Any) -> "Proxy":
        return self._create("call_function", operator.getitem, (self, key))

    def __call__(self, *args: Any, **kwargs: Any) -> "Proxy":
        return self._create("call_function", operator.call, (self, *args), kwargs)

    @classmethod
    def __torch_function__(cls, function: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        proxy = _first_proxy((args, kwargs or {}))
        return proxy._create("call_function", function, tuple(args), dict(kwargs or {}))

    def __bool__(self) -> bool:
        raise TypeError(f"bool() of {self._label()}: " + _CONTROL_FLOW_HELP.format(what="decide an `if` or `while` on it"))

    def __iter__(self) -> Any:
        raise TypeError(f"iter() of {self._label()}: " + _CONTROL_FLOW_HELP.format(what="loop over it or unpack it"))

    def __len__(self) -> int:
        raise TypeError(f"len() of {self._label()}: " + _CONTROL_FLOW_HELP.format(what="know its length yet"))

    def __index__(self) -> int:
        raise TypeError(f"{self._label()} used as a Python int: " + _CONTROL_FLOW_HELP.format(what="use it as a number"))

    __int__ = __float__ = __complex__ = __index__

    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(f"{self._label()} cannot become a NumPy array while the cell is being built; "
                        "convert its `.value` after the run")

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        if self._value is not _NOT_SET:
            return f"Proxy({self._label()}) = {self._value!r}"
        shape = describe_fake(self.node.fake)
        return f"Proxy({self._label()}{', ' + shape if shape else ''})"

    def __format__(self, spec: str) -> str:
        return repr(self)


_set_node, _set_tracer, _set_value = Proxy._node.__set__, Proxy._tracer.__set__, Proxy._value.__set__


class Attribute(Proxy):
    """``proxy.name`` before we know whether it is read (``x.logits``) or called (``x.sum()``).

    The node is created on first use: a ``call_method`` node when called, a ``getattr`` node otherwise, so
    ``x.sum()`` is one node, not two (torch.fx does the same). Either way the node names the line where the
    attribute was written, even if its first use is elsewhere (``pair = (out.logits, h)``, saved later).
    """

    __slots__ = ("_parent", "_name", "_location")

    def __init__(self, parent: Proxy, name: str):
        object.__setattr__(self, "_parent", parent)
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_tracer", parent._tracer)
        object.__setattr__(self, "_value", _NOT_SET)
        object.__setattr__(self, "_node", None)
        object.__setattr__(self, "_location", user_location())

    @_surfacing
    def node(self) -> Node:
        if self._node is None:
            proxy = self._parent._builder("read an attribute of").create_proxy(
                "getattr", self._name, (self._parent,), {}, location=self._location)
            object.__setattr__(self, "_node", proxy.node)
        return self._node

    def __call__(self, *args: Any, **kwargs: Any) -> Proxy:
        return self._parent._builder("call a method of").call_method(self._parent, self._name, args, kwargs,
                                                                     location=self._location)


def _take_error(proxy: Proxy) -> AttributeError | None:
    """The ``AttributeError`` a property of ``proxy`` just raised, if any (cleared once taken)."""
    try:
        error = object.__getattribute__(proxy, "_error")
    except AttributeError:
        return None
    object.__delattr__(proxy, "_error")
    return error


def _first_proxy(value: Any) -> Proxy:
    if isinstance(value, Proxy):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_proxy(item)
            if found is not None:
                return found
    if isinstance(value, dict):
        for item in value.values():
            found = _first_proxy(item)
            if found is not None:
                return found
    return None


def _binary(operation: Any) -> Any:
    def method(self: Proxy, other: Any) -> Proxy:
        return self._create("call_function", operation, (self, other))
    method.__name__ = f"__{operation.__name__.strip('_')}__"
    return method


def _reflected(operation: Any) -> Any:
    def method(self: Proxy, other: Any) -> Proxy:
        return self._create("call_function", operation, (other, self))
    return method


def _unary(operation: Any) -> Any:
    def method(self: Proxy) -> Proxy:
        return self._create("call_function", operation, (self,))
    return method


_BINARY = {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul, "truediv": operator.truediv,
    "floordiv": operator.floordiv, "mod": operator.mod, "pow": operator.pow, "matmul": operator.matmul,
    "and": operator.and_, "or": operator.or_, "xor": operator.xor, "lshift": operator.lshift,
    "rshift": operator.rshift,
}
_INPLACE = {
    "add": operator.iadd, "sub": operator.isub, "mul": operator.imul, "truediv": operator.itruediv,
    "floordiv": operator.ifloordiv, "mod": operator.imod, "pow": operator.ipow, "matmul": operator.imatmul,
    "and": operator.iand, "or": operator.ior, "xor": operator.ixor, "lshift": operator.ilshift,
    "rshift": operator.irshift,
}
_COMPARISONS = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
                "ge": operator.ge}

for _name, _operation in _BINARY.items():
    setattr(Proxy, f"__{_name}__", _binary(_operation))
    setattr(Proxy, f"__r{_name}__", _reflected(_operation))
    setattr(Proxy, f"__i{_name}__", _binary(_INPLACE[_name]))
for _name, _operation in _COMPARISONS.items():
    setattr(Proxy, f"__{_name}__", _binary(_operation))
for _name, _operation in {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs,
                          "invert": operator.invert}.items():
    setattr(Proxy, f"__{_name}__", _unary(_operation))
