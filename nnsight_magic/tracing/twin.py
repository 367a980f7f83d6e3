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
the module tree costs about 25 ms for a GPT-2-small-sized model; the tensors cost nothing.
"""

from __future__ import annotations

import copy

import torch
from torch._subclasses import fake_tensor


class TwinFailed(RuntimeError):
    """The model could not be copied (an attribute that refuses ``copy.deepcopy``)."""


def fake_twin(root: torch.nn.Module, fake_mode: fake_tensor.FakeTensorMode) -> torch.nn.Module:
    """A deep copy of ``root`` whose tensors are fake tensors of ``fake_mode`` (shapes, dtypes, devices kept).

    Tied weights stay tied (one fake per real tensor). Raises :class:`TwinFailed` when the copy fails.
    """
    memo: dict[int, object] = {}
    for module in root.modules():
        for value in _tensors_of(module):
            if id(value) not in memo:
                memo[id(value)] = _fake_of(value, fake_mode)
    try:
        return copy.deepcopy(root, memo)
    except Exception as error:  # an attribute that cannot be copied: the caller reports "no shapes"
        raise TwinFailed(f"the model could not be copied for the scan ({type(error).__name__}: {error})") \
            from error


def _tensors_of(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's own parameters, buffers and plain tensor attributes."""
    own = [value for value in module._parameters.values() if value is not None]
    own += [value for value in module._buffers.values() if value is not None]
    own += [value for value in vars(module).values() if isinstance(value, torch.Tensor)]
    return own


def _fake_of(value: torch.Tensor, fake_mode: fake_tensor.FakeTensorMode) -> torch.Tensor:
    """The fake copy of a real tensor with its exact (static) shape; a fake tensor of this mode stays itself."""
    if isinstance(value, fake_tensor.FakeTensor) and value.fake_mode is fake_mode:
        return value
    return fake_mode.from_tensor(value, static_shapes=True)
