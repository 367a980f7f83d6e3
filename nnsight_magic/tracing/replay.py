"""Replaying repeated module calls in a scan: 30 identical decoder layers are scanned once, not 30 times.

A fake forward costs per operation, not per FLOP, so a deep model's scan is dominated by running the same block's
code again and again on inputs of the same shapes. :class:`CallReplay` watches the scan: the first call of a
module whose *structure* (class, attributes, parameter and buffer shapes, and the same for every submodule) and
*input signature* (shapes, strides, dtypes, devices and aliasing of the tensors, the other arguments' values) were
seen before is run normally and becomes a template; every later call with the same structure and signature is
replayed: its submodules' recorded calls and its output are made from the template's as fresh fake tensors
(``empty_strided`` on the meta device, so no fake dispatch at all), the tensors it was given keep their identity,
and a Hugging Face cache passed in receives the template's ``update`` calls at this module's ``layer_idx``.

In [1]: scan = ModuleScan.run(model, runner, (), {"input_ids": ids})     # replays layers 1.. from layer 0
In [2]: scan.output("model.layers.7.mlp", 0).shape
Out[2]: torch.Size([1, 32, 576])

Replay is sound when a module's output shapes follow from its structure and its inputs' shapes; calls it cannot
vouch for run normally: a module (or a submodule) with hooks other than the scan's, or whose ``forward`` changes
its own attributes; an argument that is neither a tensor, a plain value nor a cache; an output that aliases an
input or a parameter; symbolic scans (sizes are ``SymInt``s). ``layer_idx`` is the one attribute allowed to differ
(it only says which layer of the cache a block writes).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from torch._subclasses import fake_tensor
from torch.multiprocessing.reductions import StorageWeakRef

_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, type(...))
_FREE_ATTRIBUTES = frozenset({"layer_idx", "forward"}) | frozenset(vars(torch.nn.Module()))  # hooks: checked apart


class _CannotReplay(Exception):
    """A call that must run normally."""


class CallReplay:
    """Runs the first call of each (structure, input signature) and replays the later ones (see the module doc).

    ``record(path, kind, value)`` is the scan's recorder; :meth:`install` patches the twin's repeated modules,
    :meth:`remove` restores them. ``replayed`` counts the calls that did not run.
    """

    def __init__(self, root: torch.nn.Module, fake_mode: fake_tensor.FakeTensorMode, log: list,
                 record: Callable[[str, str, Any], None], own_hooks: set[int]):
        self.fake_mode = fake_mode
        self.log = log
        self.record = record
        self.own_hooks = own_hooks
        self.templates: dict[tuple, _Template | None] = {}
        self.recorders: list[list] = []
        self.replayed = 0
        self.patched: list[torch.nn.Module] = []
        self.watched: list[Any] = []
        self.paths: dict[int, str] = {}
        counts: dict[int, int] = {}
        for path, module in root.named_modules(remove_duplicate=False):
            counts[id(module)] = counts.get(id(module), 0) + 1
            self.paths.setdefault(id(module), path)
        self.single = {key for key, count in counts.items() if count == 1}
        self.root = root
        self.structures: dict[int, int | None] = {}   # id(module) -> its structure's number, None: not replayable
        self.numbers: dict[tuple, int] = {}

    def install(self) -> None:
        if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
            return
        groups: dict[int, list[torch.nn.Module]] = {}
        self._structure(self.root, first=True)
        for module in self.root.modules():
            structure = self.structures.get(id(module))
            if module is not self.root and structure is not None:
                groups.setdefault(structure, []).append(module)
        for modules in groups.values():
            if len(modules) < 2:
                continue
            for module in modules:
                self.patched.append(module)
                module.__dict__["forward"] = self._replaying(module)

    def remove(self) -> None:
        for module in self.patched:
            del module.__dict__["forward"]
        for cache in self.watched:
            cache.__dict__.pop("update", None)
        self.patched.clear()
        self.watched.clear()

    # ----------------------------------------------------------------------------------- the patched forward
    def _replaying(self, module: torch.nn.Module) -> Callable:
        original = type(module).forward.__get__(module)
        prefix = self.paths[id(module)]

        def forward(*args: Any, **kwargs: Any) -> Any:
            structure = self.structures.get(id(module))
            if structure is None:   # it changed since the scan began (a hook added, say): it runs
                return original(*args, **kwargs)
            try:
                key = (structure, _signature((args, kwargs)))
            except _CannotReplay:
                return original(*args, **kwargs)
            template = self.templates.get(key, _MISSING)
            if template is _MISSING:
                return self._template(key, module, prefix, original, args, kwargs)
            if template is None:
                return original(*args, **kwargs)
            try:
                with fake_tensor.unset_fake_temporarily():   # fresh values are made on the meta device directly
                    output = template.replay(self, module, prefix, args, kwargs)
            except _CannotReplay:
                return original(*args, **kwargs)
            self.replayed += 1
            return output
        return forward

    def _template(self, key: tuple, module: torch.nn.Module, prefix: str, original: Callable,
                  args: tuple, kwargs: dict) -> Any:
        self.templates[key] = None   # until it is known to be replayable
        start = len(self.log)
        updates: list = []
        self.recorders.append(updates)
        for cache in _caches((args, kwargs)):
            self._watch(cache)
        try:
            output = original(*args, **kwargs)
        finally:
            self.recorders.pop()   # templates nest: the innermost ends first
        try:
            if self._structure(module) != key[0]:
                raise _CannotReplay("its forward changed its attributes")
            self.templates[key] = _Template(module, prefix, (args, kwargs), self.log[start:], output, updates)
        except _CannotReplay:
            pass
        return output

    def _watch(self, cache: Any) -> None:
        """Record the ``update`` calls a template makes on a Hugging Face cache (the cache is the scan's own)."""
        if "update" in cache.__dict__:
            return
        update = cache.update
        recorders = self.recorders
        self.watched.append(cache)

        def watched(*args: Any, **kwargs: Any) -> Any:
            for updates in recorders:
                updates.append((cache, args, kwargs))
            return update(*args, **kwargs)
        cache.__dict__["update"] = watched

    # ------------------------------------------------------------------------------------------- structure
    def _structure(self, module: torch.nn.Module, first: bool = False) -> int | None:
        """The number of what a module's output shapes may depend on besides its inputs: its class, attributes
        (but ``layer_idx``), parameter and buffer shapes, and its children's structures; ``None`` when it cannot
        be replayed (a hook that is not the scan's, a module reachable by several paths, or, on the ``first``
        look, a ``forward`` set on the instance). Computed bottom-up, remembered in :attr:`structures`."""
        children, replayable = [], id(module) in self.single
        for name, child in module._modules.items():
            number = None if child is None else self._structure(child, first)
            replayable &= child is None or number is not None
            children.append((name, number))
        replayable &= all(handle in self.own_hooks for table in _hooks(module) for handle in table)
        replayable &= not (first and "forward" in module.__dict__)
        number = None
        if replayable:
            try:
                attributes = tuple((name, _attribute(value)) for name, value in module.__dict__.items()
                                   if name not in _FREE_ATTRIBUTES)
                tensors = tuple((name, _tensor_signature(value)) for name, value in
                                list(module._parameters.items()) + list(module._buffers.items()))
                part = (type(module), attributes, tensors, tuple(children))
                number = self.numbers.setdefault(part, len(self.numbers))
            except _CannotReplay:
                pass
        self.structures[id(module)] = number
        return number


_MISSING = object()


class _Template:
    """One call that ran: its inputs, its submodules' recorded calls, its output and its cache updates."""

    def __init__(self, module: torch.nn.Module, prefix: str, inputs: tuple,
                 events: list, output: Any, updates: list):
        head = prefix + "."
        self.events = []
        for path, kind, value in events:
            if not path.startswith(head):
                raise _CannotReplay("a call outside the module")
            self.events.append((path[len(head):], kind, value))
        self.inputs = inputs
        self.output = output
        self.updates = updates
        self.layers = _layer_indices(module)
        input_storages = {_storage(tensor) for tensor in _leaves(inputs) if isinstance(tensor, torch.Tensor)}
        parameter_storages = {_storage(tensor) for tensor in module.parameters()}
        parameter_storages |= {_storage(tensor) for tensor in module.buffers()}
        if not all(_plain_containers(value) for value in (output, inputs, *(value for _, _, value in events))):
            raise _CannotReplay("a container that is not a tuple, list or dict")
        for tensor in _leaves(output):
            if isinstance(tensor, torch.Tensor):
                if _storage(tensor) in input_storages | parameter_storages:
                    raise _CannotReplay("the output aliases an input or a parameter")
            elif not isinstance(tensor, _PLAIN) and not _is_cache(tensor):
                raise _CannotReplay("an output that is not tensors and plain values")

    def replay(self, replay: CallReplay, module: torch.nn.Module, prefix: str, args: tuple, kwargs: dict) -> Any:
        copier = _Copier(replay.fake_mode)
        copier.bind(self.inputs, (args, kwargs))
        layers = dict(zip(self.layers, _layer_indices(module)))
        events = [(f"{prefix}.{path}", kind, copier.copy(value)) for path, kind, value in self.events]
        output = copier.copy(self.output)
        updates = [(copier.objects.get(id(cache), cache), copier.copy(update_args), copier.copy(update_kwargs))
                   for cache, update_args, update_kwargs in self.updates]
        for path, kind, value in events:
            replay.record(path, kind, value)
        for cache, update_args, update_kwargs in updates:
            if len(update_args) > 2 and update_args[2] in layers:
                update_args = update_args[:2] + (layers[update_args[2]],) + update_args[3:]
            if update_kwargs.get("layer_idx") in layers:
                update_kwargs = dict(update_kwargs, layer_idx=layers[update_kwargs["layer_idx"]])
            with replay.fake_mode:
                cache.update(*update_args, **update_kwargs)
        return output


class _Copier:
    """Fresh fake copies of a template's values: same shapes, strides, dtypes, devices and aliasing; the template's
    inputs stand for this call's inputs."""

    def __init__(self, fake_mode: fake_tensor.FakeTensorMode):
        self.fake_mode = fake_mode
        self.objects: dict[int, Any] = {}
        self.storages: dict[Any, torch.Tensor] = {}

    def bind(self, template: Any, actual: Any) -> None:
        for old, new in zip(_leaves(template), _leaves(actual)):
            if isinstance(old, torch.Tensor) or _is_cache(old):
                self.objects[id(old)] = new
            if isinstance(old, torch.Tensor):
                self.storages.setdefault(_storage(old), new)

    def copy(self, value: Any) -> Any:
        if id(value) in self.objects:
            return self.objects[id(value)]
        if isinstance(value, torch.Tensor):
            fresh = self._tensor(value)
            self.objects[id(value)] = fresh
            return fresh
        if isinstance(value, (tuple, list)):
            return type(value)(self.copy(item) for item in value)
        if isinstance(value, dict):
            return type(value)((key, self.copy(item)) for key, item in value.items())
        return value

    def _tensor(self, value: torch.Tensor) -> torch.Tensor:
        storage = _storage(value)
        base = self.storages.get(storage)
        if base is not None:
            meta = torch.empty(0, dtype=value.dtype, device="meta").set_(
                base.untyped_storage(), value.storage_offset(), value.shape, value.stride())
        else:
            meta = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
        fresh = self.fake_mode.fake_tensor_converter.from_meta_and_device(self.fake_mode, meta, value.device)
        fresh.requires_grad_(value.requires_grad)
        if base is None and storage is not None:
            self.storages[storage] = fresh
        return fresh


def _signature(value: Any) -> tuple:
    """The input signature of a call: what its output shapes may depend on (raises :class:`_CannotReplay`)."""
    storages: dict[Any, int] = {}
    parts = []
    for leaf in _leaves(value, structure=parts):
        if isinstance(leaf, torch.Tensor):
            if not isinstance(leaf, fake_tensor.FakeTensor):
                raise _CannotReplay("a real tensor")
            storage = _storage(leaf)
            parts.append(_tensor_signature(leaf) + (leaf.storage_offset(), storages.setdefault(storage, len(storages))))
        elif _is_cache(leaf):
            parts.append(("cache", type(leaf)))
        elif isinstance(leaf, _PLAIN):
            parts.append(leaf)
        else:
            raise _CannotReplay(f"an argument of type {type(leaf).__name__}")
    return tuple(parts)


def _leaves(value: Any, structure: list | None = None) -> list:
    """Tensors, caches and plain values inside tuples, lists and dicts, depth first (``structure`` gets markers)."""
    if isinstance(value, (tuple, list)):
        if structure is not None:
            structure.append((type(value), len(value)))
        return [leaf for item in value for leaf in _leaves(item, structure)]
    if isinstance(value, dict):
        if structure is not None:
            structure.append((type(value), tuple(value)))
        return [leaf for item in value.values() for leaf in _leaves(item, structure)]
    return [value]


def _plain_containers(value: Any) -> bool:
    if isinstance(value, (tuple, list, dict)):
        if type(value) not in (tuple, list, dict):
            return False
        return all(_plain_containers(item) for item in (value.values() if isinstance(value, dict) else value))
    return True


def _tensor_signature(value: Any) -> tuple:
    if value is None:
        return (None,)
    if any(not isinstance(size, int) for size in value.shape):
        raise _CannotReplay("symbolic sizes")
    return (tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)


def _hooks(module: torch.nn.Module) -> tuple:
    """The module's hook tables whose hooks run when it is called (forward and backward, pre and post)."""
    return tuple(table for table in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                                     module._backward_pre_hooks) if table)


def _attribute(value: Any, depth: int = 0) -> Any:
    """What one attribute of a module adds to its structure.

    Plain values count as themselves and tensors by their signature; tuples, lists and dicts item by item; a
    module held in an attribute rather than as a child (Hugging Face kernels give every attention layer its own
    ``_kernel_funcs = {"rotary_pos_emb": Func()}``) by its class and attributes, when it has no children, tensors or
    hooks; anything else (a config, a function) by identity, so layers sharing the very same object match.

    In [1]: _attribute({"helper": torch.nn.Identity()}) == _attribute({"helper": torch.nn.Identity()})
    Out[1]: True
    """
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return _tensor_signature(value)
    if depth < 3:
        if type(value) in (tuple, list):
            return (type(value), tuple(_attribute(item, depth + 1) for item in value))
        if type(value) is dict:
            return (dict, tuple((key, _attribute(item, depth + 1)) for key, item in value.items()))
        if isinstance(value, torch.nn.Module) and not (value._modules or value._parameters or value._buffers) \
                and not _hooks(value):
            return (type(value), tuple((name, _attribute(item, depth + 1)) for name, item in vars(value).items()
                                       if name not in _FREE_ATTRIBUTES))
    return ("object", id(value))   # a config or a function: the very same object


def _layer_indices(module: torch.nn.Module) -> list:
    return [sub.__dict__["layer_idx"] for sub in module.modules() if isinstance(sub.__dict__.get("layer_idx"), int)]


def _is_cache(value: Any) -> bool:
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(value, cache_utils.Cache) and \
        not isinstance(value, cache_utils.EncoderDecoderCache)


def _caches(value: Any) -> list:
    return [leaf for leaf in _leaves(value) if _is_cache(leaf)]


def _storage(tensor: torch.Tensor) -> Any:
    try:
        return StorageWeakRef(tensor.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None
