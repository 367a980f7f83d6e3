"""An IPython shell with the extension loaded, for driving cells through ``run_cell`` (no kernel).

Import the fixture into a test module with ``from magic_shell import ip``. ``run(ip, source)`` runs one cell as a
notebook does (input transformers, ``In[N]`` numbering, traceback display) and returns the ``ExecutionResult``;
``ok(ip, source)`` also fails the test if the cell raised.
"""

from __future__ import annotations

import atexit
import re

import pytest
import torch
from IPython.core.interactiveshell import InteractiveShell
from traitlets.config import Config

from conftest import make_tiny
from nnsight_magic import NNsight

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def ip():
    config = Config()
    config.HistoryAccessor.enabled = False
    shell = InteractiveShell.instance(config=config)
    shell.run_line_magic("load_ext", "nnsight_magic")
    shell.run_line_magic("config", "TraceMagics.widget = False")
    yield shell
    shell.run_line_magic("unload_ext", "nnsight_magic")
    InteractiveShell.clear_instance()
    # each shell registers its exit cleanup (a namespace reset and a full gc.collect()): with one shell per test,
    # the interpreter's exit took minutes, and every shell's namespace (models, tensors) stayed alive until then
    atexit.unregister(shell.atexit_operations)
    shell.user_ns.clear()


def run(shell: InteractiveShell, source: str):
    return shell.run_cell(source, store_history=True)


def ok(shell: InteractiveShell, source: str):
    result = run(shell, source)
    result.raise_error()
    return result


def plain(text: str) -> str:
    """Printed text without terminal colours."""
    return _ANSI.sub("", text)


def module_values(module: torch.nn.Module, x: torch.Tensor, edits: dict | None = None) -> dict[str, torch.Tensor]:
    """Ground truth with plain PyTorch hooks: each child's output (after ``edits[name](output)``) and the output."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, child in module.named_children():
        def hook(_module, _inputs, output, name=name):
            if edits and name in edits:
                output = edits[name](output.clone())
            seen[name] = output
            return output
        handles.append(child.register_forward_hook(hook))
    try:
        with torch.no_grad():
            seen["output"] = module(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def with_net(shell: InteractiveShell, x: torch.Tensor | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """Put ``net`` (an NNsight of the tiny model), ``x`` (3×5) and ``torch`` into the notebook namespace."""
    module = make_tiny()
    if x is None:
        torch.manual_seed(1)
        x = torch.rand(3, 5)
    shell.user_ns.update(net=NNsight(module), x=x, torch=torch)
    return module, x


def snapshot(namespace: dict) -> dict:
    """The notebook's names (not ``_``-names nor IPython's history ``In``/``Out``), each with its object and, for
    lists and dicts, their items."""
    return {name: (value, list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict)
                   else None) for name, value in namespace.items()
            if not name.startswith("_") and name not in ("In", "Out")}


def assert_unchanged(namespace: dict, before: dict) -> None:
    """The same names as in ``before``, bound to the same objects; lists and dicts hold the same items."""
    after = snapshot(namespace)
    assert after.keys() == before.keys()
    for name, (value, contents) in before.items():
        assert after[name][0] is value, name
        if isinstance(contents, list):
            assert [item is other for item, other in zip(after[name][1], contents)] == [True] * len(contents) and \
                len(after[name][1]) == len(contents), name
        elif isinstance(contents, dict):
            assert after[name][1].keys() == contents.keys(), name
            assert all(after[name][1][key] is item for key, item in contents.items()), name
