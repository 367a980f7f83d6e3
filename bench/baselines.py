"""The hand-written PyTorch hooks each traced case is compared with.

In [1]: output, saved = save_with_hooks(model, [model.transformer.h[i] for i in range(12)], ids)
In [2]: output = ablate_with_hook(model, model.transformer.h[5], ids)      # block 5's output zeroed in place

Hooks are registered for one call and removed after it, as the engine does, and the forward runs under
``torch.no_grad()``, the grad mode the engine uses for traces that do not call ``.backward()``. A saving hook
clones, as people write it (a later in-place edit must not change what was saved); the engine's saves are
zero-copy instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def hooked_forward(model: torch.nn.Module, hooks: list[tuple[torch.nn.Module, Callable]], *inputs: Any) -> Any:
    """``model(*inputs)`` under ``no_grad`` with forward ``hooks`` (module, hook) registered for this call only."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    try:
        with torch.no_grad():
            return model(*inputs)
    finally:
        for handle in handles:
            handle.remove()


def save_with_hooks(model: torch.nn.Module, modules: list[torch.nn.Module], *inputs: Any) -> tuple[Any, list]:
    """The model's output and a clone of each module's output."""
    saved: list[torch.Tensor] = []
    output = hooked_forward(model, [(module, lambda _, __, out: saved.append(out.clone())) for module in modules],
                            *inputs)
    return output, saved


def ablate_with_hook(model: torch.nn.Module, module: torch.nn.Module, *inputs: Any) -> Any:
    """The model's output with ``module``'s output set to zero in place."""
    return hooked_forward(model, [(module, lambda _, __, out: out.zero_())], *inputs)
