"""The notebook names one traced cell binds: remembered before, saved while building, real values after.

In [1]: results = []
In [2]: %%trace net x
   ...: h = net.layer1.output               # a Proxy while the cell builds ...
   ...: parts = [h[:, 0], h[:, 1]]          # containers of proxies work too
   ...: results.append(net.output)          # ... and so does a list from an earlier cell
In [3]: type(h), type(parts[0]), type(results[0])     # real tensors once the model ran
Out[3]: (torch.Tensor, torch.Tensor, torch.Tensor)

:class:`CellBindings` takes a snapshot of the notebook namespace before the cell runs (every name: a cell can
bind names by assignment, ``for``, ``with … as``, ``import``, ``def``, ``class``, or remove them with ``del``),
and of the lists, dicts and notebook-defined objects reachable from the names the cell mentions (and from the
global names of the notebook functions it mentions). Just before the trace block ends it saves every top-level
name whose value is traced (a proxy, or a list/tuple/dict holding proxies) and every proxy the cell put into one
of those containers. After the model ran, :meth:`CellBindings.bind` replaces each saved name that still holds
what the cell left there with its real value, and each proxy in a container in place (``results[0]`` becomes
the tensor, ``results`` stays the same list); a value the run never computed (after an early ``tracer.stop()``,
or in a branch that did not run) stays a proxy that explains itself, with a warning that names the line. If the
cell fails, :meth:`CellBindings.restore` puts every name back as it was and gives every container that received
a traced value its items from before the cell, so no dead proxy is left anywhere and earlier cells' values stay
untouched.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable, Iterable, Iterator

import torch

from ..tracing.execution import UNBOUND
from ..tracing.proxy import Proxy

_ABSENT = object()
_DEPTH = 4  # how deep containers are searched: results["run"][3] is depth 2


class CellBindings:
    """The names and containers of one cell in one namespace; see the module docstring.

    Args:
        namespace: the notebook's ``user_ns``.
        referenced: the names the cell mentions; containers reachable from them are watched.

    Attributes:
        saved: name → the traced value (a proxy or a container of proxies) saved for it while building.
    """

    def __init__(self, namespace: dict, referenced: Iterable[str] = ()):
        self.namespace = namespace
        self.before = dict(namespace)
        self.roots = _root_names(namespace, referenced)
        self.saved: dict[str, Any] = {}
        self._contents = {id(container): (container, _contents(container)) for container, _ in self._containers()}
        self._holders: list[tuple[Any, str]] = []  # containers the cell put traced values into, with their paths
        self._escaped: dict[int, Proxy] = {}
        self._settled = False

    def save_traced(self, names: list[str], belongs: Callable[[Proxy], bool], containers: bool = True) -> None:
        """Call ``.save()`` on each proxy (``belongs(proxy)``) held by one of ``names`` or (with ``containers``)
        put into a watched container; remember the value and where it is."""
        for name in names:
            value = self.namespace.get(name, _ABSENT)
            proxies = [proxy for proxy in _proxies(value) if belongs(proxy)]
            if not proxies:
                continue
            for proxy in proxies:
                proxy.save()
            self.saved[name] = value
        for container, path in self._containers() if containers else ():
            found = [proxy for item in _items(container) for proxy in _proxies(item, immutable_only=True)
                     if belongs(proxy)]
            if not found:
                continue
            for proxy in found:
                proxy.save()
                self._escaped[id(proxy)] = proxy
            self._holders.append((container, path))

    def bind(self) -> None:
        """Replace every saved name that still holds the cell's value with its real value, and every saved proxy
        in a container with its real value in place. If that fails (an interrupt), the names and containers go
        back to what they were before the cell."""
        try:
            self._bind()
        except BaseException:
            if self._settled:
                self.unbind_saved()
            else:
                self.restore()
            raise

    def _bind(self) -> None:
        for name, value in self.saved.items():
            if self.namespace.get(name, _ABSENT) is not value:
                continue  # rebound since (a later cell): leave it
            real = resolve(value)
            if real is UNBOUND:
                del self.namespace[name]
            else:
                self.namespace[name] = real
        for container, path in self._holders:
            for key, item in list(_entries(container)):
                if not any(id(proxy) in self._escaped for proxy in _proxies(item, immutable_only=True)):
                    continue
                real = resolve(item)
                _set(container, key, real)
                for proxy in _proxies(real, immutable_only=True):
                    _warn_never_computed(proxy, f"{path}{_key_text(container, key)}")

    def unbind_saved(self) -> None:
        """Give every saved name that still holds the cell's value its binding from before the cell, and every
        container that received a traced value its items from before the cell."""
        for name, value in self.saved.items():
            if self.namespace.get(name, _ABSENT) is value:
                self._put_back(name)
        for container, _ in self._holders:
            self._refill(container)

    def restore(self) -> None:
        """Put every name back as it was before the cell, and every container that now holds a traced value the
        cell made back to its items from before the cell (the cell failed)."""
        for name in set(self.namespace) - set(self.before):
            del self.namespace[name]
        self.namespace.update(self.before)
        for container, _ in self._containers():
            if id(container) in self._contents and self._new_proxies(container):
                self._refill(container)

    def settle(self) -> None:
        """The cell was recorded into a session: keep only what :meth:`bind` and :meth:`unbind_saved` need (the
        session keeps the bindings of every recorded cell; the snapshot must not keep earlier values alive)."""
        self._settled = True
        self.before = {name: self.before.get(name, _ABSENT) for name in self.saved}
        holders = {id(container) for container, _ in self._holders}
        self._contents = {key: entry for key, entry in self._contents.items() if key in holders}

    def _put_back(self, name: str) -> None:
        previous = self.before.get(name, _ABSENT)
        if previous is _ABSENT:
            self.namespace.pop(name, None)
        else:
            self.namespace[name] = previous

    def _refill(self, container: Any) -> None:
        entry = self._contents.get(id(container))
        if entry is None or entry[0] is not container:
            return
        if isinstance(container, list):
            container[:] = entry[1]
        else:
            target = container if isinstance(container, dict) else vars(container)
            target.clear()
            target.update(entry[1])

    def _new_proxies(self, container: Any) -> bool:
        """``container`` holds a proxy (directly, in tuples, or in containers the cell made) it did not hold."""
        old = {id(item) for item in _items(self._contents[id(container)][1])}
        for item in _items(container):
            if id(item) in old:
                continue
            if id(item) not in self._contents and _proxies(item):
                return True
        return False

    def _containers(self) -> Iterator[tuple[Any, str]]:
        """Every mutable container reachable from the watched names, each once, with a path (``d["k"]``)."""
        seen: set[int] = set()
        stack = [(self.namespace[name], name, 0) for name in self.roots if name in self.namespace]
        while stack:
            value, path, depth = stack.pop()
            if id(value) in seen or depth > _DEPTH:
                continue
            seen.add(id(value))
            if _is_container(value):
                yield value, path
            elif not isinstance(value, tuple):
                continue
            for key, item in _entries(value):
                if _is_container(item) or isinstance(item, tuple):
                    stack.append((item, f"{path}{_key_text(value, key)}", depth + 1))


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


def _proxies(value: Any, depth: int = 0, immutable_only: bool = False) -> list[Proxy]:
    """The proxies inside ``value``; with ``immutable_only`` only through tuples (lists and dicts are watched
    containers of their own)."""
    if isinstance(value, Proxy):
        return [value]
    if depth > _DEPTH:
        return []
    if isinstance(value, tuple) or (not immutable_only and isinstance(value, list)):
        return [proxy for item in value for proxy in _proxies(item, depth + 1, immutable_only)]
    if isinstance(value, dict) and not immutable_only:
        return [proxy for item in value.values() for proxy in _proxies(item, depth + 1)]
    return []


# ------------------------------------------------------------------------------------------- containers
def _is_container(value: Any) -> bool:
    """Lists, dicts and objects of classes defined in the notebook (or ``SimpleNamespace``): what a cell can
    put a traced value into."""
    if isinstance(value, (list, dict, types.SimpleNamespace)):
        return True
    return type(value).__module__ == "__main__" and not isinstance(value, (type, torch.nn.Module)) and \
        isinstance(getattr(value, "__dict__", None), dict)


def _entries(container: Any) -> Iterator[tuple[Any, Any]]:
    if isinstance(container, (list, tuple)):
        return iter(enumerate(container))
    if isinstance(container, dict):
        return iter(container.items())
    return iter(vars(container).items())


def _items(container: Any) -> list[Any]:
    return [item for _, item in _entries(container)]


def _contents(container: Any) -> Any:
    return list(container) if isinstance(container, list) else dict(
        container if isinstance(container, dict) else vars(container))


def _set(container: Any, key: Any, value: Any) -> None:
    if isinstance(container, (list, dict)):
        container[key] = value
    else:
        vars(container)[key] = value


def _key_text(container: Any, key: Any) -> str:
    return f"[{key!r}]" if isinstance(container, (list, tuple, dict)) else f".{key}"


def _root_names(namespace: dict, referenced: Iterable[str]) -> list[str]:
    """``referenced``, and the global names used by the notebook functions and methods among them (two levels:
    a cell calling ``keep(h)``, where ``keep`` appends to ``store``, watches ``store``)."""
    names = dict.fromkeys(referenced)
    frontier = list(names)
    for _ in range(2):
        found: list[str] = []
        for name in frontier:
            for code in _codes(namespace.get(name), namespace):
                found += [each for each in code.co_names if each not in names]
        names.update(dict.fromkeys(found))
        frontier = found
    return [name for name in names if not name.startswith("__")]


def _codes(value: Any, namespace: dict) -> list[types.CodeType]:
    functions = [value] if isinstance(value, types.FunctionType) else []
    kind = value if isinstance(value, type) else type(value)
    if kind.__module__ == "__main__":
        functions += [each for each in vars(kind).values() if isinstance(each, types.FunctionType)]
    codes = [function.__code__ for function in functions if function.__globals__ is namespace]
    for code in list(codes):
        codes += [const for const in code.co_consts if isinstance(const, types.CodeType)]
    return codes


def _warn_never_computed(proxy: Proxy, where: str) -> None:
    node = proxy.node
    source = node.source_line
    prefix = f"{node.location} `{source}`" if source else node.location
    message = (f"{prefix}: `{where}` holds {node.describe()}, which the run never computed (an early "
               "`tracer.stop()`, or a traced `if` whose branch did not run); it stays a proxy whose `.value` "
               "says why")
    warnings.warn_explicit(message, UserWarning, node.filename or "<cell>", node.lineno or 1)
