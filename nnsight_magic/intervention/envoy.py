"""The Envoy tree: a torch module's children, with traced ``.output`` / ``.input`` / ``.inputs``.

In [1]: net = NNsight(torch.nn.Sequential(OrderedDict(layer1=nn.Linear(5, 10), layer2=nn.Linear(10, 2))))
In [2]: net.layer1                      # an Envoy: attribute access mirrors the module's children
In [3]: with net.trace(x):
   ...:     h = net.layer1.output       # a proxy for layer1's output (its first call in this trace)
   ...:     net.layer2.input[:, 0] = 0  # an in-place edit of layer2's first positional input
   ...:     net.layer1.next()           # later reads of layer1 refer to its second call
   ...:     logits = net.layer2(h)      # call a module on a traced value; its hooks do not fire

Outside a trace an Envoy is a thin wrapper: calling it calls the module, other attributes are the module's.
Wrong names raise ``AttributeError`` listing the closest child names. A module whose own child is called
``output``, ``input`` or ``inputs`` keeps that child under the name; its traced value is ``nns_output`` (and
``nns_input``, ``nns_inputs``), as in nnsight.
"""

from __future__ import annotations

import difflib
import functools
from typing import Any, Iterator

import torch

from ..tracing.node import module_label, user_line
from .parameters import parameter_kind
from .source import SourceEnvoy
from .source_install import SourceOperations

_VALUE_NAMES = ("output", "input", "inputs")
_POSITIONS = tuple(str(index) for index in range(256))  # a ModuleList's child names, made once


def surfacing(getter: Any) -> property:
    """An Envoy property whose own ``AttributeError`` reaches the caller (``attn.pattern`` on an attention module
    without ``q_proj``): Python would answer it with ``__getattr__``, which would say the module has no such child.
    The getter leaves its error on the Envoy, and :meth:`Envoy.__getattr__` raises it unchanged."""
    @functools.wraps(getter)
    def wrapper(self: "Envoy") -> Any:
        try:
            return getter(self)
        except AttributeError as error:
            self.__dict__["_property_error"] = error
            raise
    return property(wrapper)


class Envoy:
    """One module of the tree, addressed by its dotted path (``""`` for the root)."""

    def __init__(self, module: torch.nn.Module, path: str = "", root: "Envoy | None" = None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_root", self if root is None else root)
        object.__setattr__(self, "_children", {})
        if root is None:
            object.__setattr__(self, "_active_tracer", None)

    # ------------------------------------------------------------------------------------- traced values
    @property
    def output(self) -> Any:
        """The module's output in the active trace (a proxy); a child named ``output`` wins if there is one."""
        if "output" in self._module._modules:
            return self._child("output")
        tracer = self._root._active_tracer  # nns_output, inlined: this is the most used read of all
        if tracer is None:
            return self.nns_output
        return tracer.module_value(self._path, "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._tracer("set .output").set_module_value(self._path, "output", value)

    @property
    def input(self) -> Any:
        """The first positional input of the module's call (the first keyword argument if it has none)."""
        if "input" in self._module._modules:
            return self._child("input")
        return self.nns_input

    @input.setter
    def input(self, value: Any) -> None:
        self._tracer("set .input").set_module_value(self._path, "input", value)

    @property
    def inputs(self) -> Any:
        """``(args, kwargs)`` of the module's call."""
        if "inputs" in self._module._modules:
            return self._child("inputs")
        return self.nns_inputs

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._tracer("set .inputs").set_module_value(self._path, "inputs", value)

    @property
    def nns_output(self) -> Any:
        return self._tracer("read .output").module_value(self._path, "output")

    @property
    def nns_input(self) -> Any:
        return self._tracer("read .input").module_value(self._path, "input")

    @property
    def nns_inputs(self) -> Any:
        return self._tracer("read .inputs").module_value(self._path, "inputs")

    @property
    def source(self) -> Any:
        """The operations of the module's forward, by name: ``attn.source.attn_weights.output`` (see :mod:`.source`).

        ``print(module.source)`` shows the forward's source with the operations marked. A child named ``source``
        wins if there is one.
        """
        child = self._module._modules.get("source")
        if child is not None and not isinstance(child, SourceOperations):
            return self._child("source")
        envoy = self.__dict__.get("_source_envoy")
        if envoy is None:
            tracer = self._root._active_tracer
            envoy = SourceEnvoy(self._module, self._path, lambda module, path: Envoy(module, path, self._root),
                                discover=None if tracer is None else lambda: tracer.scan_with_source(self._path))
            object.__setattr__(self, "_source_envoy", envoy)
        return envoy

    def next(self, calls: int = 1) -> "Envoy":
        """Later reads of this module in the trace refer to its next call (a module used several times)."""
        self._tracer("call .next()").advance_call(self._path, calls)
        return self

    def skip(self, value: Any) -> None:
        """Run the model without this module's next call: its forward does not run, its output is ``value``.

        In [1]: with lm.trace("Hello"):
           ...:     lm.layers[1].skip(lm.layers[1].input)      # as if block 1 were removed
        Applies to the whole batch (not inside one of several invokes).
        """
        self._tracer("call .skip()").skip_module(self._path, value)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Inside a trace: call the module on traced values (its hooks do not fire). Outside: call the module."""
        tracer = self._root._active_tracer
        if tracer is None:
            return self._module(*args, **kwargs)
        return tracer.apply_module(self._path, args, kwargs)

    # ------------------------------------------------------------------------------------------ the tree
    def _child(self, name: str) -> "Envoy":
        child = self._children.get(name)
        if child is None:
            path = f"{self._path}.{name}" if self._path else name
            module = self._module._modules[name]
            classes = self._root.__dict__.get("_envoy_classes") or {}
            envoy_class = next((classes[kind] for kind in type(module).__mro__ if kind in classes), Envoy)
            child = envoy_class(module, path, self._root)
            self._children[name] = child
            if not name.startswith("_") and not hasattr(type(self), name) and name not in self.__dict__:
                object.__setattr__(self, name, child)  # later `envoy.name` reads are plain attribute hits
        return child

    def __getattr__(self, name: str) -> Any:
        error = self.__dict__.pop("_property_error", None)
        if error is not None:
            raise error  # a property of this Envoy failed with its own AttributeError (see `surfacing`)
        if name.startswith("_") and name in ("_module", "_path", "_root", "_children", "_active_tracer"):
            raise AttributeError(name)  # not yet set (during construction or copying)
        module = self._module
        if name in module._modules:
            child = self._children.get(name)
            return child if child is not None else self._child(name)
        if name.startswith("__"):
            raise AttributeError(name)
        aliases = self._root.__dict__.get("_aliases")
        if aliases:
            names = resolve_alias(module, self._path, name, aliases)
            if names is not None:
                envoy = self
                for each in names:
                    envoy = envoy._child(each)
                return envoy
        tracer = self._root._active_tracer
        if tracer is not None:
            kind = parameter_kind(module, name)
            if kind is not None:  # a parameter or buffer in a trace: this run's value, never the model's for good
                return tracer.parameter_value(self._path, name, kind)
        try:
            return getattr(module, name)
        except AttributeError:
            pass
        children = list(module._modules)
        close = difflib.get_close_matches(name, children, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(match) for match in close)}?" if close else ""
        listing = f" Its children are: {', '.join(children[:12])}{', ...' if len(children) > 12 else ''}." \
            if children else " It has no child modules."
        raise AttributeError(f"{user_line()}: {self._label} ({type(module).__name__}) has no child or attribute "
                             f"{name!r}{hint}{listing}")

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _VALUE_NAMES and name not in self._module._modules:
            object.__setattr__(self, name, value)  # routes to the property setters above
        elif name.startswith("_"):
            object.__setattr__(self, name, value)
        elif self._root._active_tracer is not None and parameter_kind(self._module, name) is not None:
            self._root._active_tracer.set_parameter(self._path, name, parameter_kind(self._module, name), value)
        else:
            setattr(self._module, name, value)
            self._children.pop(name, None)
            self.__dict__.pop(name, None)

    def __getitem__(self, key: int | str | slice) -> Any:
        module = self._module
        if type(key) is int and isinstance(module, torch.nn.ModuleList) and 0 <= key < len(module._modules):
            child = self._children.get(_POSITIONS[key] if key < len(_POSITIONS) else str(key))  # named by position
            return child if child is not None else self._child(str(key))
        names = list(module._modules)
        if isinstance(key, slice):
            return [self._child(name) for name in names[key]]
        if isinstance(key, str):
            if key not in module._modules:
                raise KeyError(f"{self._label} has no child {key!r}; children: {', '.join(names[:12])}")
            return self._child(key)
        if not isinstance(key, int):
            raise TypeError(f"index {self._label} with an int, a name or a slice, not {type(key).__name__}")
        if not -len(names) <= key < len(names):
            raise IndexError(f"{self._label} has {len(names)} children; index {key} is out of range")
        return self._child(names[key])

    def __len__(self) -> int:
        return len(self._module._modules)

    def __iter__(self) -> Iterator["Envoy"]:
        return (self._child(name) for name in list(self._module._modules))

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(self._module._modules) | set(dir(self._module)))

    def __repr__(self) -> str:
        return f"Envoy({self._label}: {self._module!r})"

    # ---------------------------------------------------------------------------------------------- helpers
    @property
    def _label(self) -> str:
        return module_label(self._path)

    def _tracer(self, action: str) -> Any:
        tracer = self._root._active_tracer
        if tracer is None:
            raise RuntimeError(f"cannot {action} on {self._label} outside a trace: use it inside "
                               f"`with model.trace(...):` or a `%%trace` cell")
        return tracer


def resolve_alias(module: torch.nn.Module, path: str, name: str, aliases: dict[str, str]) -> list[str] | None:
    """The child names that lead from the module at ``path`` to the module aliased ``name``, or ``None``."""
    prefix = f"{path}." if path else ""
    for real, alias in aliases.items():
        if alias != name:
            continue
        if "." not in real and real in module._modules:
            return [real]
        if real.startswith(prefix) and len(real) > len(prefix):
            names = real[len(prefix):].split(".")
            current: Any = module
            for each in names:
                current = current._modules.get(each) if current is not None else None
            if current is not None:
                return names
    return None
