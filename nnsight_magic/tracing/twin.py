"""A twin of a model for fake-tensor scans: the same modules and code, sharing no state with the model.

A scan runs the model's own Python, and a model's ``forward`` may change it: a buffer updated in place
(``self.steps.add_(1)``, BatchNorm's running statistics in train mode) or a Python attribute
(``self.calls += 1``, ``self.last = x``). :func:`fake_twin` makes a deep copy of the module tree in which every
parameter, buffer and tensor attribute is replaced by its fake copy (no data, no memory), so a scan of the twin
changes only the twin, and the twin is thrown away with the scan.

In [1]: twin = fake_twin(net, shared_fake_mode())
In [2]: twin.layer1.weight.shape, type(twin.layer1.weight).__name__, twin is not net
Out[2]: (torch.Size([10, 5]), 'FakeTensor', True)

The twin keeps the model's hooks. Hooks are functions, which a deep copy shares, so the hooks Hugging Face uses to
record ``hidden_states`` work on the twin, and a hook of yours runs during a scan too: it gets the twin's module
and fake tensors (``isinstance(output, torch._subclasses.fake_tensor.FakeTensor)`` tells a scan apart). Copying
the module tree costs about 25 ms for SmolLM2-135M (a plain walk of the tree; each tensor is made on the meta device,
with no data). A block with a hook of yours is never replayed (see :mod:`.replay`), so the hook sees every call.

A model that accelerate offloads (``device_map`` with ``"cpu"`` or ``"disk"`` parts, ``cpu_offload``) keeps the
offloaded weights outside the module tree and loads them in a hook before each call. Its twin's weights are fakes
on the device the hook runs the module on, and the twin's hooks only move inputs and outputs: a scan never loads
(or copies) an offloaded weight.
"""

from __future__ import annotations

import collections
import copy
import sys
from typing import Any

import torch
from torch._subclasses import fake_tensor
from torch.multiprocessing.reductions import StorageWeakRef


class TwinFailed(RuntimeError):
    """The model could not be copied (an attribute that refuses ``copy.deepcopy``)."""


def fake_twin(root: torch.nn.Module, fake_mode: fake_tensor.FakeTensorMode,
              meta_device: torch.device | str = "cpu") -> torch.nn.Module:
    """A deep copy of ``root`` whose tensors are fake tensors of ``fake_mode`` (shapes, dtypes, devices kept).

    Tied weights stay tied (one fake per real tensor; tensors sharing storage share it as fakes too). A tensor on
    the meta device (a model whose weights load on its first run) becomes a fake on ``meta_device``, where its
    weights will be: the scan passes its inputs' device. Raises :class:`TwinFailed` when the copy fails.
    """
    memo: dict[int, object] = {}
    storages: dict[StorageWeakRef, Any] = {}
    modules = list(root.modules())
    run_devices = _offloaded(modules, memo)
    meta_device = torch.device(meta_device)
    for module in modules:
        for value in _tensors_of(module):
            if id(value) not in memo:
                memo[id(value)] = _fake_of(value, fake_mode, storages, run_devices.get(id(module), meta_device))
    try:
        if all(_plainly_copied(type(module)) for module in modules):
            return _copy_tree(modules, memo)
        return copy.deepcopy(root, memo)
    except Exception as error:  # an attribute that cannot be copied: the caller reports "no shapes"
        raise TwinFailed(f"the model could not be copied for the scan ({type(error).__name__}: {error})") \
            from error


_COPY_HOOKS = ("__deepcopy__", "__reduce_ex__", "__reduce__", "__getstate__", "__setstate__", "__getnewargs__",
               "__getnewargs_ex__")
_IMMUTABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _plainly_copied(cls: type) -> bool:
    """True when ``copy.deepcopy`` would copy a module of ``cls`` as any ``nn.Module``: a new object, its
    ``__dict__`` deep-copied (no copy hook of its own)."""
    return all(getattr(cls, name, None) is getattr(torch.nn.Module, name, None) for name in _COPY_HOOKS) and \
        not hasattr(cls, "__slots__")


def _copy_tree(modules: list[torch.nn.Module], memo: dict[int, object]) -> torch.nn.Module:
    """What ``copy.deepcopy(modules[0], memo)`` makes, several times faster: every module is created first, then
    each ``__dict__`` is filled: parameters, buffers and children from ``memo``, empty containers (most of a
    module's hook dicts) new, immutable values shared, everything else deep-copied with the same ``memo`` (a
    config shared by all modules is copied once, a hook bound to a module binds to its twin)."""
    for module in modules:
        memo[id(module)] = object.__new__(type(module))
    for module in modules:
        state = {}
        for name, value in module.__dict__.items():
            if name in ("_parameters", "_buffers", "_modules"):
                state[name] = {key: None if item is None else memo[id(item)] for key, item in value.items()}
            elif isinstance(value, _IMMUTABLE):
                state[name] = value
            elif type(value) in (dict, collections.OrderedDict, set, list) and not value:
                state[name] = type(value)()
            else:
                state[name] = copy.deepcopy(value, memo)
        memo[id(module)].__dict__.update(state)
    return memo[id(modules[0])]


def _offloaded(modules: list[torch.nn.Module], memo: dict[int, object]) -> dict[int, torch.device]:
    """accelerate's offloading hooks among ``modules``: put in ``memo`` a twin of each that moves inputs and outputs
    but loads no weight, and return where each offloaded module's weights are when it runs (``id`` -> device)."""
    hooks = sys.modules.get("accelerate.hooks")  # a model has accelerate's hooks only if accelerate is imported
    if hooks is None:
        return {}
    devices: dict[int, torch.device] = {}
    for module in modules:
        hook = module.__dict__.get("_hf_hook")
        for each in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
            if not isinstance(each, hooks.AlignDevicesHook) or not each.offload:
                continue
            twin_hook = copy.copy(each)
            twin_hook.offload, twin_hook.weights_map, twin_hook.tied_params_map = False, None, None
            memo[id(each)] = twin_hook
            if each.execution_device is not None:
                device = torch.device(each.execution_device)
                for placed in module.modules() if each.place_submodules else (module,):
                    devices[id(placed)] = device
    return devices


def _tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's own parameters, buffers and plain tensor attributes."""
    own = [value for value in module._parameters.values() if value is not None]
    own += [value for value in module._buffers.values() if value is not None]
    own += [value for value in vars(module).values() if isinstance(value, torch.Tensor)]
    return own


def _fake_of(value: torch.Tensor, fake_mode: fake_tensor.FakeTensorMode, storages: dict,
             meta_device: torch.device) -> torch.Tensor:
    """The fake copy of a real tensor with its exact (static) shape; a fake tensor of this mode stays itself.

    A plain dense tensor is made directly on the meta device (``empty_strided``/``set_`` on a meta storage of the
    same size, shared with the other tensors of its storage), several times cheaper than
    ``FakeTensorMode.from_tensor``, which the others (sparse, quantized, subclasses) still use.
    """
    if isinstance(value, fake_tensor.FakeTensor) and value.fake_mode is fake_mode:
        return value
    if type(value) not in (torch.Tensor, torch.nn.Parameter) or value.layout != torch.strided or \
            value.is_quantized or value.is_nested:
        return fake_mode.from_tensor(value, static_shapes=True)
    with fake_tensor.unset_fake_temporarily():
        real_storage = value.untyped_storage()
        key = StorageWeakRef(real_storage)
        storage = storages.get(key)
        if storage is None:
            storage = storages[key] = torch.empty(real_storage.nbytes(), dtype=torch.uint8,
                                                  device="meta").untyped_storage()
        meta = torch.empty(0, dtype=value.dtype, device="meta").set_(storage, value.storage_offset(), value.shape,
                                                                      value.stride())
        device = meta_device if value.device.type == "meta" else value.device
        fake = fake_mode.fake_tensor_converter.from_meta_and_device(fake_mode, meta, device)
    if value.requires_grad:
        fake.requires_grad_(True)
    return fake
