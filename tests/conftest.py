"""Shared fixtures: tiny models built in code, and their plain-PyTorch twins for ground truth."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from nnsight_magic import NNsight

pytest_plugins = ["language_fixtures", "magic_shell"]  # tiny language models; an IPython shell with the extension


def make_tiny() -> torch.nn.Sequential:
    """The two-layer model nnsight's own tests use: Linear(5, 10) then Linear(10, 2)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(layer1=torch.nn.Linear(5, 10), layer2=torch.nn.Linear(10, 2)))


@pytest.fixture
def tiny() -> torch.nn.Sequential:
    return make_tiny()


@pytest.fixture
def net(tiny: torch.nn.Sequential) -> NNsight:
    return NNsight(tiny)


@pytest.fixture
def x() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.rand(3, 5)


def hook_count(module: torch.nn.Module) -> int:
    """Every forward hook and pre-hook registered anywhere in ``module``, and every wrapped ``forward``."""
    return sum(len(each._forward_hooks) + len(each._forward_pre_hooks) + len(each._forward_hooks_with_kwargs)
               + wraps_forward(each) for each in module.modules())


def wraps_forward(module: torch.nn.Module) -> bool:
    """Whether a trace's wrapper of ``module.forward`` (which runs its hooks without torch hooks) is in place."""
    return getattr(module.__dict__.get("forward"), "__module__", None) == "nnsight_magic.intervention.interleaver"


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}
