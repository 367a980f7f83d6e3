"""Parameters and buffers as traced values: read, save and edit them for one run, never for good.

In [1]: with net.trace(x):
   ...:     w = net.layer1.weight.save()            # a proxy of the parameter (zero-copy when only read)
   ...:     net.layer2.weight[:, 0] = 0             # this run uses a copy with column 0 zeroed ...
   ...:     out = net.output.save()
In [2]: net._module.layer2.weight[:, 0]             # ... and the model's own weights are unchanged
Out[2]: tensor([ 0.1437, -0.2147], grad_fn=...)

A parameter (or buffer) read in a trace is one node per parameter, created outside iteration blocks, whose
value is the parameter itself when nothing edits it. When the trace edits it in place (``w[:] = 0``, ``w *= 2``,
``net.layer1.weight = value``, which becomes ``w[...] = value``), the node's value is a copy made at the start of
the run; the module that owns the parameter uses that copy in every call of this run (a forward pre-hook puts it
in, a forward hook takes it out again), and its edits must have happened before that call, else
:class:`~nnsight_magic.errors.OutOfOrderError`. After the run, and after an error, the module holds its own
parameter again. To change weights for good, change them outside a trace (``net._module.layer1.weight``); a
``model.edit()`` that edits a parameter repeats the edit in every later trace and leaves the weights alone too.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import OutOfOrderError


class ParameterValue:
    """The target of a parameter's node: which tensor of which module (``kind`` is ``"parameter"``/``"buffer"``).

    The graph runs it through :class:`~nnsight_magic.intervention.interleaver.ModelExecution`, which knows the
    model; calling it directly is an error.
    """

    def __init__(self, path: str, name: str, kind: str):
        self.path = path
        self.name = name
        self.kind = kind
        self.__name__ = self.__qualname__ = f"{path}.{name}" if path else name  # how its node is described

    def tensor(self, root: torch.nn.Module) -> torch.Tensor:
        """The model's own tensor."""
        module = root.get_submodule(self.path) if self.path else root
        table = module._parameters if self.kind == "parameter" else module._buffers
        return table[self.name]

    def __call__(self, *args: Any) -> Any:
        raise RuntimeError(f"the parameter {self.__name__} can only be read while the model runs a trace")

    def __repr__(self) -> str:
        return f"ParameterValue({self.__name__!r})"


def parameter_kind(module: torch.nn.Module, name: str) -> str | None:
    """``"parameter"`` or ``"buffer"`` when ``name`` is one of ``module``'s own tensors, else ``None``."""
    if module._parameters.get(name) is not None:
        return "parameter"
    if module._buffers.get(name) is not None:
        return "buffer"
    return None


class ParameterSwaps:
    """The edited parameters of one run: each owning module uses this run's copy while it runs.

    Args:
        execution: the run; ``execution.values`` holds each copy once its node ran.
        edited: ``node index -> ParameterValue`` of every parameter node the graph edits.
        writes: ``node index -> indices of the nodes that edit it``.
    """

    def __init__(self, execution: Any, edited: dict[int, ParameterValue], writes: dict[int, list[int]]):
        self.execution = execution
        self.edited = edited
        self.writes = writes
        self.copies: dict[int, torch.Tensor] = {}
        self.installed: list[tuple[dict, str, torch.Tensor]] = []

    def keep(self, index: int, value: torch.Tensor) -> None:
        """Remember node ``index``'s copy (the graph may free its node's value once the edits ran)."""
        self.copies[index] = value

    def register(self, root: torch.nn.Module, handles: list) -> None:
        """Hooks on every module that owns an edited parameter."""
        by_module: dict[int, tuple[torch.nn.Module, list[int]]] = {}
        for index, target in self.edited.items():
            module = root.get_submodule(target.path) if target.path else root
            by_module.setdefault(id(module), (module, []))[1].append(index)
        for module, indices in by_module.values():
            handles.append(module.register_forward_pre_hook(self._put_in(module, indices), prepend=True))
            handles.append(module.register_forward_hook(self._take_out(len(indices)), always_call=True))

    def _put_in(self, module: torch.nn.Module, indices: list[int]) -> Callable:
        def hook(_: torch.nn.Module, args: tuple) -> None:
            if self.execution.interleaver is not None and self.execution.interleaver.paused:
                return
            for index in indices:
                self._check_ready(index)
                target = self.edited[index]
                table = module._parameters if target.kind == "parameter" else module._buffers
                self.installed.append((table, target.name, table[target.name]))
                table[target.name] = self.copies[index]
        return hook

    def _take_out(self, count: int) -> Callable:
        def hook(*_: Any) -> None:
            for _ in range(min(count, len(self.installed))):
                table, name, original = self.installed.pop()
                table[name] = original
        return hook

    def _check_ready(self, index: int) -> None:
        state = self.execution.state
        pending = [write for write in self.writes.get(index, ()) if state[write] == 0]
        if index not in self.copies or pending:
            node = self.execution.nodes[pending[0] if pending else index]
            raise OutOfOrderError(
                f"{node.location} `{node.source_line}` edits {self.edited[index].__name__}, but it needs a value the "
                "model computes only after that module has used the parameter; compute the new value in an earlier "
                "trace of a session (`with model.session():`)")

    def restore(self) -> None:
        """Give every module its own tensors back (after the run, also after an error)."""
        while self.installed:
            table, name, original = self.installed.pop()
            table[name] = original
