"""The notebook names one traced cell binds: remembered before, saved while building, real values after.

In [1]: %%trace net x
   ...: h = net.layer1.output               # a Proxy while the cell builds ...
   ...: parts = [h[:, 0], h[:, 1]]          # containers of proxies work too
In [2]: type(h), type(parts[0])             # ... real tensors once the model ran
Out[2]: (torch.Tensor, torch.Tensor)

:class:`CellBindings` takes a snapshot of the names a cell assigns at its top level before it runs. Just before
the trace block ends it saves every such name whose value is traced (a proxy, or a list/tuple/dict holding
proxies). After the model ran, :meth:`CellBindings.bind` replaces each one that still holds what the cell left
there with its real value; a name merged with ``UNBOUND`` (assigned on one side of a traced ``if`` only, and
that side did not run) is unbound. If the cell fails, :meth:`CellBindings.restore` puts every name back as it
was, so earlier cells' values stay untouched.
"""

from __future__ import annotations

from typing import Any, Callable

from ..tracing.execution import UNBOUND
from ..tracing.proxy import Proxy

_ABSENT = object()


class CellBindings:
    """Names of one cell in one namespace; see the module docstring.

    Args:
        namespace: the notebook's ``user_ns``.
        names: the names the cell may bind (its top-level assignments, the tracer's name, helper names).

    Attributes:
        saved: name → the traced value (a proxy or a container of proxies) saved for it while building.
    """

    def __init__(self, namespace: dict, names: list[str]):
        self.namespace = namespace
        self.names = list(dict.fromkeys(names))
        self.before = {name: namespace.get(name, _ABSENT) for name in self.names}
        self.saved: dict[str, Any] = {}

    def save_traced(self, names: list[str], belongs: Callable[[Proxy], bool]) -> None:
        """Call ``.save()`` on each proxy (``belongs(proxy)``) held by one of ``names``; remember the value."""
        for name in names:
            value = self.namespace.get(name, _ABSENT)
            proxies = [proxy for proxy in _proxies(value) if belongs(proxy)]
            if not proxies:
                continue
            for proxy in proxies:
                proxy.save()
            self.saved[name] = value

    def bind(self) -> None:
        """Replace every saved name that still holds the cell's value with its real value."""
        for name, value in self.saved.items():
            if self.namespace.get(name, _ABSENT) is not value:
                continue  # rebound since (a later cell): leave it
            real = resolve(value)
            if real is UNBOUND:
                del self.namespace[name]
            else:
                self.namespace[name] = real

    def unbind_saved(self) -> None:
        """Give every saved name that still holds the cell's value its binding from before the cell."""
        for name, value in self.saved.items():
            if self.namespace.get(name, _ABSENT) is value:
                self._put_back(name)

    def restore(self) -> None:
        """Put every name back as it was before the cell (the cell failed)."""
        for name in self.names:
            self._put_back(name)

    def _put_back(self, name: str) -> None:
        previous = self.before[name]
        if previous is _ABSENT:
            self.namespace.pop(name, None)
        else:
            self.namespace[name] = previous


def resolve(value: Any) -> Any:
    """``value`` with every proxy that has a real value replaced by it (in lists, tuples and dicts too).

    A proxy that was never computed (after an early ``tracer.stop()``) stays a proxy: its ``.value`` says why.
    """
    if isinstance(value, Proxy):
        try:
            return value.value
        except ValueError:
            return value
    if isinstance(value, list):
        return [resolve(item) for item in value]
    if isinstance(value, tuple):
        items = [resolve(item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return type(value)((key, resolve(item)) for key, item in value.items())
    return value


def _proxies(value: Any, depth: int = 0) -> list[Proxy]:
    if isinstance(value, Proxy):
        return [value]
    if depth > 4:
        return []
    if isinstance(value, (list, tuple)):
        return [proxy for item in value for proxy in _proxies(item, depth + 1)]
    if isinstance(value, dict):
        return [proxy for item in value.values() for proxy in _proxies(item, depth + 1)]
    return []
