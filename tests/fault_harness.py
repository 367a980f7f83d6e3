"""What every fault-matrix case checks after its fault: the model and the earlier values are as before.

``Clean(module)`` takes a snapshot of every hook dictionary of every submodule (and torch's global module hooks),
of the weights and buffers; ``clean.check()`` asserts they are unchanged. ``OddModel`` is a tiny model whose
submodules return a tensor, a tuple, a dict, ``None``, an int and a nested structure, with a buffer;
``ground_truth`` computes its values with hand-written forward hooks (the reference for the next trace).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch.nn.modules import module as torch_module

HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
              "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
              "_load_state_dict_post_hooks")
GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                "_global_backward_pre_hooks", "_global_forward_hooks_with_kwargs", "_global_forward_hooks_always_called")


class Pair(torch.nn.Module):
    def forward(self, h):
        return h * 2, h + 1


class Mapping(torch.nn.Module):
    def forward(self, h):
        return {"a": h * 3, "b": h - 1}


class Nothing(torch.nn.Module):
    def forward(self, h):
        return None


class Count(torch.nn.Module):
    def forward(self, h):
        return 3


class Nested(torch.nn.Module):
    def forward(self, h):
        return h, {"k": [h * 2, h + 2]}


class OddModel(torch.nn.Module):
    """layer1 → pair → mapping → nothing → count → nested → layer2, times a buffer, plus the count."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer1 = torch.nn.Linear(5, 10)
        self.pair = Pair()
        self.mapping = Mapping()
        self.nothing = Nothing()
        self.count = Count()
        self.nested = Nested()
        self.layer2 = torch.nn.Linear(10, 2)
        self.register_buffer("scale", torch.tensor(1.5))

    def forward(self, x):
        h = self.layer1(x)
        doubled, shifted = self.pair(h)
        mapped = self.mapping(doubled)
        self.nothing(h)
        count = self.count(h)
        _, inner = self.nested(mapped["a"] + shifted)
        return self.layer2(inner["k"][0]) * self.scale + count


CHILDREN = ("layer1", "pair", "mapping", "nothing", "count", "nested", "layer2")


def ground_truth(module: torch.nn.Module, x: torch.Tensor, edits: dict | None = None) -> dict[str, Any]:
    """Each child's output (after ``edits[name](output)``) and the model's output, with plain forward hooks."""
    seen: dict[str, Any] = {}
    handles = []
    for name in CHILDREN:
        def hook(_module, _inputs, output, name=name):
            if edits and name in edits:
                output = edits[name](output)
            seen[name] = output
            return output
        handles.append(getattr(module, name).register_forward_hook(hook))
    try:
        with torch.no_grad():
            seen["output"] = module(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def zero_first_column(output: torch.Tensor) -> torch.Tensor:
    output = output.clone()
    output[:, 0] = 0
    return output


class Clean:
    """A snapshot of hooks, weights and buffers; :meth:`check` asserts nothing changed."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.hooks = self._hooks()
        self.state = {name: value.detach().clone() for name, value in module.state_dict().items()}

    def _hooks(self) -> dict:
        found = {name: {**{kind: dict(getattr(each, kind, {}) or {}) for kind in HOOK_DICTS},
                        "forward": each.__dict__.get("forward")}  # a trace may wrap a module's forward
                 for name, each in self.module.named_modules()}
        found["<global>"] = {kind: dict(getattr(torch_module, kind, {}) or {}) for kind in GLOBAL_HOOKS}
        return found

    def check(self) -> None:
        assert self._hooks() == self.hooks, "hooks were left on the model"
        state = self.module.state_dict()
        assert state.keys() == self.state.keys()
        for name, value in state.items():
            assert torch.equal(value, self.state[name]), f"{name} changed"


def message_of(error: BaseException) -> str:
    """The error's text with its notes (PEP 678)."""
    return "\n".join([str(error), *getattr(error, "__notes__", [])])


def line_named(text: str, line: int, filename: str | None = None) -> bool:
    """``text`` names ``line N`` (a notebook cell) or ``file.py:N`` (a file)."""
    pattern = rf"line {line}\b" if filename is None else rf"{re.escape(filename)}:{line}\b"
    return re.search(pattern, text) is not None
