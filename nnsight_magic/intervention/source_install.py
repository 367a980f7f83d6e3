"""The operations of a module's forward as tiny modules, installed on one module only while a trace uses them.

In [1]: with lm.trace("Hello"):
   ...:     w = lm.transformer.h[0].attn.source.attn_weights.output.save()
        # while this trace exists: h[0].attn runs its rewritten forward (see .source_rewrite), and its child
        # "source" (a SourceOperations) holds one module per operation: transformer.h.0.attn.source.attn_weights
        # after it (also after an error): the module's own forward and children again, no hooks

Each operation is an :class:`Operation` (a call: it calls the function the forward was about to call) or an
:class:`AssignedValue` (a variable's new value: it returns it). Because they are modules under the traced
module's path, everything a trace does with a module works on them unchanged: hooks read and replace their
inputs and outputs, the fake scan records their shapes (the scan's twin is a copy of the model with the
operations installed), calls are counted per generation step, ``.skip()`` and ``.next()`` work.

:func:`use_source` installs for one trace (counted, so traces of a session share an install) and
:func:`release_sources` removes what that trace installed. :func:`installed_sources` is the part of a model's
scan-cache key that tells scans with operations from scans without.
"""

from __future__ import annotations

import builtins
import functools
import threading
import types
import weakref
from typing import Any, Callable

import torch

from .source_rewrite import SOURCE_KEY, ForwardRewrite, Site, SourceUnavailable, holder_stack

MARK = f"{SOURCE_KEY}."  # in every operation's path: "transformer.h.0.attn.source.attn_weights", "source.y_0"
_calling = threading.local()  # the functions being called through operations, per thread (innermost last)


def _functions() -> list:
    stack = getattr(_calling, "stack", None)
    if stack is None:
        stack = _calling.stack = []
    return stack


class Callee:
    """What an operation called last (its function) and where its name is looked up (the forward's globals).

    Shared, never copied, by the fake twin of a scan (``__deepcopy__`` returns it), so a scan tells the model's
    own operation which function it calls: ``attention_interface`` is only known once the forward has run.
    """

    def __init__(self, names: dict):
        self.names = names
        self.function: Any = None
        self.described: Callable[[], Any] | None = None  # a remote model's call: its server describes the callee

    def __deepcopy__(self, memo: dict) -> "Callee":
        return self

    def resolved(self, text: str) -> Any:
        """The function the call calls: the one it called last, else ``text`` (``eager_attention_forward``,
        ``torch.nn.functional.softmax``) looked up in the forward's globals; ``None`` when not known yet."""
        if self.function is not None:
            return self.function
        first, *rest = text.split(".")
        if not first.isidentifier() or first == "self":
            return None
        value = self.names.get(first, getattr(builtins, first, None))
        for name in rest:
            value = getattr(value, name, None)
        return value


class NoSource:
    """What an operation remembers of a callee without Python source of its own: a module, or a builtin."""

    def __init__(self, function: Any):
        self.module = isinstance(function, torch.nn.Module)
        self.name = type(function).__name__ if self.module else getattr(function, "__qualname__",
                                                                            type(function).__name__)


def plain_function(callee: Any) -> Any:
    """``callee``, or the plain function behind it when it is a function that the ``kernels`` library turned into a
    module (``@use_kernel_forward_from_hub`` on a function, as transformers ≥ 5.25 does to Llama's
    ``apply_rotary_pos_emb``): such a module's forward only calls that function (or a kernel that replaces it),
    so its operations are the function's. A traced read inside it runs the function itself, rewritten, not a
    kernel.

    In [1]: plain_function(transformers.models.llama.modeling_llama.apply_rotary_pos_emb)
    Out[1]: <function apply_rotary_pos_emb at 0x...>
    """
    if not isinstance(callee, torch.nn.Module):
        return callee
    forward = type(callee).forward
    names = getattr(getattr(forward, "__code__", None), "co_freevars", ())
    if not getattr(forward, "__module__", "").startswith("kernels.") or "func" not in names:
        return callee
    function = forward.__closure__[names.index("func")].cell_contents  # the function its forward calls
    return function if isinstance(function, types.FunctionType) else callee


def _remembered(function: Any) -> Any:
    """What an operation keeps of the function it called: a Python function (a bound method's own function, the
    function behind a :func:`plain_function` module), or else a :class:`NoSource`, so that nothing it keeps holds
    a tensor (``hidden.view``) or a module alive."""
    if isinstance(function, types.MethodType):
        function = function.__func__
    function = plain_function(function)
    return function if isinstance(function, types.FunctionType) else NoSource(function)


class Operation(torch.nn.Module):
    """One call in a forward: its inputs are the call's arguments, its output what the function returned.

    While a trace reads operations inside the called function (``attn.source.attention_interface_0.source``), the
    operation has a child ``source`` (that function's operations) and calls the function rewritten.
    """

    def __init__(self, site: Site, names: dict):
        super().__init__()
        self.site = site
        self.callee = Callee(names)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        function = _functions()[-1]  # read before anything else runs: nested calls push their own
        self.callee.function = _remembered(function)
        inner = self._modules.get(SOURCE_KEY)
        if inner is None or inner.rewrite.function is not self.callee.function:
            return function(*args, **kwargs)
        if hasattr(function, "__func__"):  # a bound method: its object is the first argument
            args = (function.__self__, *args)
        holders = holder_stack()
        holders.append(inner)
        try:
            return inner.rewrite.forward(*args, **kwargs)
        finally:
            holders.pop()

    def extra_repr(self) -> str:
        return f"{self.site.text}(...) at line {self.site.line}"


class AssignedValue(torch.nn.Module):
    """One assignment to a variable (or every assignment of it): input and output are the assigned value."""

    def __init__(self, site: Site):
        super().__init__()
        self.site = site

    def forward(self, value: Any) -> Any:
        return value

    def extra_repr(self) -> str:
        return f"{self.site.text} = ... at line {self.site.line}"


class SourceOperations(torch.nn.Module):
    """The operations of one module's forward, as children named by operation (what the rewrite calls)."""

    def __init__(self, rewrite: ForwardRewrite):
        super().__init__()
        self.rewrite = rewrite
        names = getattr(_innermost(rewrite.function), "__globals__", {})
        describe_call = getattr(rewrite, "describe_call", None)
        for site in rewrite.sites:
            self.add_module(site.name, Operation(site, names) if site.kind == "call" else AssignedValue(site))
            if describe_call is not None and site.kind == "call":
                self._modules[site.name].callee.described = functools.partial(describe_call, site.name)

    def call(self, name: str, function: Callable, /, *args: Any, **kwargs: Any) -> Any:
        stack = _functions()
        stack.append(function)
        try:
            return self._modules[name](*args, **kwargs)
        finally:
            stack.pop()

    def assigned(self, site: str, variable: str | None, value: Any) -> Any:
        value = self._modules[site](value)
        return value if variable is None else self._modules[variable](value)


_holders: "weakref.WeakKeyDictionary[torch.nn.Module, SourceOperations]" = weakref.WeakKeyDictionary()
_counts: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_by_root: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, int]]" = weakref.WeakKeyDictionary()


def _innermost(function: Any) -> Any:
    while hasattr(function, "__wrapped__"):
        function = function.__wrapped__
    return function


def operations_of(module: torch.nn.Module) -> SourceOperations:
    """The operations of ``module``'s forward (made once per module and forward; never stored on the module), or
    of the function an :class:`Operation` calls.

    Raises :class:`SourceUnavailable` when the forward cannot be rewritten, or when the module has a child of
    its own named ``source``.
    """
    if isinstance(module, Operation):
        return _called_operations(module)
    described = getattr(module, "described_operations", None)
    if described is not None:  # a remote model's module: its server describes the operations
        return _holder(module, described())
    existing = module._modules.get(SOURCE_KEY)
    if existing is not None and not isinstance(existing, SourceOperations):
        raise SourceUnavailable(f"{type(module).__name__} has a child module named {SOURCE_KEY!r}; its operations "
                                "cannot be addressed as `.source`")
    if "forward" in module.__dict__ and _counts.get(module, 0) == 0 and _slot(module) != "_old_forward":
        raise SourceUnavailable(f"this {type(module).__name__} has its own `forward` attribute "
                                f"({module.__dict__['forward']!r}), set by another library; `.source` rewrites the "
                                "class's forward only")
    return _holder(module, ForwardRewrite.of(type(module).forward))


def _called_operations(operation: Operation) -> SourceOperations:
    """The operations of the function ``operation`` calls (see :class:`Callee` for how it is known)."""
    if operation.callee.described is not None:  # a remote model's call: as its server describes the function
        return _holder(operation, operation.callee.described())
    function = operation.callee.resolved(operation.site.text)
    if function is None:
        raise SourceUnavailable(f"`{operation.site.text}` is only known once the forward calls it: read the "
                                "operation's `.source` inside a trace that computes shapes (the default), of an input "
                                "for which this line runs")
    function = plain_function(getattr(function, "__func__", function))
    if isinstance(function, torch.nn.Module) or (isinstance(function, NoSource) and function.module):
        raise SourceUnavailable(f"`{operation.site.text}` is a module: read its own `.source`, or its `.output` here")
    if isinstance(function, NoSource):
        raise SourceUnavailable(f"`{operation.site.text}` calls {function.name}, which has no Python source")
    return _holder(operation, ForwardRewrite.of_function(function))


def _holder(module: torch.nn.Module, rewrite: Any) -> SourceOperations:
    """``module``'s operations holder for ``rewrite``: the one made before while the rewrite is the same."""
    holder = _holders.get(module)
    if holder is None or holder.rewrite is not rewrite:
        holder = _holders[module] = SourceOperations(rewrite)
    return holder


def describe_operations(holder: SourceOperations) -> dict:
    """The operations of a module's forward as JSON, for a remote model's client (:class:`DescribedOperations`)."""
    rewrite = holder.rewrite
    return {"qualname": rewrite.qualname, "filename": rewrite.filename, "first_line": rewrite.first_line,
            "lines": list(rewrite.lines),
            "sites": [[site.name, site.kind, site.line, site.text, list(site.lines)] for site in rewrite.sites]}


class DescribedOperations:
    """The operations of a module's forward as its server described them (:func:`describe_operations`): names,
    kinds, lines and the source text to print; no function (the forward runs rewritten on the server only).

    Raises ``ValueError`` for a description that is not made of those parts.
    """

    function = None
    forward = None

    def __init__(self, data: Any, describe_call: Callable[[str], "DescribedOperations"] | None = None):
        self.describe_call = describe_call  # the description of the function a call site calls, by site name
        try:
            self.qualname, self.filename, self.first_line = str(data["qualname"]), str(data["filename"]), \
                int(data["first_line"])
            self.lines = [str(line) for line in data["lines"]]
            self.sites = [Site(str(name), str(kind), int(line), str(text), tuple(int(each) for each in lines))
                          for name, kind, line, text, lines in data["sites"]]
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"a malformed description of a module's operations ({error}); refused") from None
        if any(not site.name.isidentifier() or site.kind not in ("call", "assignment", "variable")
               for site in self.sites):
            raise ValueError("an operation of a described forward has a bad name or kind; refused")


def split_path(path: str) -> tuple[str, str] | None:
    """``"h.0.attn.source.attn_weights"`` → ``("h.0.attn", "attn_weights")``; ``None`` for other paths."""
    parts = path.split(".")
    if len(parts) < 2 or parts[-2] != SOURCE_KEY:
        return None
    return ".".join(parts[:-2]), parts[-1]


def _slot(module: torch.nn.Module) -> str:
    """Where the module's forward is called from: its class (``forward``), or accelerate's hook, which keeps the
    class's forward as ``module._old_forward`` and calls it from its own ``module.forward``."""
    kept = module.__dict__.get("_old_forward")
    if "forward" in module.__dict__ and getattr(kept, "__func__", None) is type(module).forward and \
            getattr(kept, "__self__", None) is module:
        return "_old_forward"
    return "forward"


_previous: "weakref.WeakKeyDictionary[torch.nn.Module, tuple[str, Any]]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()  # traces of one model built in several threads install and release one at a time


def _install(module: torch.nn.Module) -> None:
    count = _counts.get(module, 0)
    if count == 0:
        holder = operations_of(module)
        module._modules[SOURCE_KEY] = holder
        # an operation calls its function rewritten itself; a remote model's module only needs the paths here
        if not isinstance(module, Operation) and holder.rewrite.forward is not None:
            slot = _slot(module)
            _previous[module] = (slot, module.__dict__.get(slot))
            module.__dict__[slot] = holder.rewrite.forward.__get__(module, type(module))
    _counts[module] = count + 1


def _uninstall(module: torch.nn.Module) -> None:
    count = _counts.get(module, 0) - 1
    if count > 0:
        _counts[module] = count
        return
    _counts.pop(module, None)
    if isinstance(module._modules.get(SOURCE_KEY), SourceOperations):
        del module._modules[SOURCE_KEY]
    kept = _previous.pop(module, None)
    if kept is None:  # its forward was never replaced (an operation, a remote model's module)
        return
    slot, previous = kept
    if previous is None:
        module.__dict__.pop(slot, None)
    else:
        module.__dict__[slot] = previous


def use_source(tracer: Any, path: str) -> None:
    """Before a trace's first value of an operation at ``path``: run that module's forward rewritten (for the
    trace's scans and its run) until :func:`release_sources`. Scans made before now have no operations, so the
    trace forgets them."""
    parts = split_path(path)
    if parts is not None:
        install_for(tracer, parts[0])


def install_for(tracer: Any, module_path: str) -> None:
    """Run the forward of the module at ``module_path`` rewritten for ``tracer`` (see :func:`use_source`)."""
    if any(installed == module_path for installed, _ in tracer._sources):
        return
    use_source(tracer, module_path)  # an operation inside a called function: first the forward that calls it
    root = tracer.model._module
    module = root.get_submodule(module_path) if module_path else root
    if isinstance(module._modules.get(SOURCE_KEY), torch.nn.Module) and \
            not isinstance(module._modules[SOURCE_KEY], SourceOperations):
        return  # a real child called "source": an ordinary module path
    with _lock:
        _install(module)
        tracer._sources.append((module_path, module))
        paths = _by_root.setdefault(root, {})
        paths[module_path] = paths.get(module_path, 0) + 1
    tracer._scans.clear()


def release_sources(tracer: Any) -> None:
    """Give back every module ``tracer`` installed operations on (after its run, a failure or a discard)."""
    root = tracer.model._module
    with _lock:
        paths = _by_root.get(root, {})
        while tracer._sources:
            module_path, module = tracer._sources.pop()
            _uninstall(module)
            paths[module_path] -= 1
            if not paths[module_path]:
                del paths[module_path]


class SourceUse:
    """Operations installed for something other than a trace being built: a server's scan for a remote client
    whose trace reads ``.source`` paths.

    In [1]: with SourceUse(model, ["transformer.h.0.attn"]):
       ...:     scan = model._scan(prepared, options)      # records the operations of h.0.attn's forward too
    """

    def __init__(self, model: Any, module_paths: list[str]):
        self.model = model
        self.module_paths = module_paths
        self._sources: list[tuple[str, Any]] = []
        self._scans: dict = {}

    def __enter__(self) -> "SourceUse":
        try:
            for path in self.module_paths:
                install_for(self, path)
        except BaseException:
            release_sources(self)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        release_sources(self)


def installed_sources(root: torch.nn.Module) -> tuple[str, ...]:
    """The paths of ``root``'s modules that run rewritten now (``()`` almost always): part of a scan's key."""
    paths = _by_root.get(root)
    return tuple(sorted(paths)) if paths else ()

