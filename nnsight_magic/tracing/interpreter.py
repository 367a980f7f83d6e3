"""What each op of a graph computes, shared by every way of running a graph.

In the style of ``torch.fx.Interpreter``: :meth:`Interpreter.run_node` dispatches on ``node.op`` to a method of
the same name, and ways of running a graph are subclasses, never ``if mode ==`` flags:

* :class:`~nnsight_magic.tracing.shapes.ShapeInference` runs each node on fake tensors while the graph is
  built (shapes before any compute);
* :class:`~nnsight_magic.tracing.execution.Execution` runs nodes on real tensors as the model produces them.

In [1]: interpreter = Interpreter(root_module)
In [2]: interpreter.run_node(node, (x, 1), {})   # for a call_function node of torch.add: torch.add(x, 1)
"""

from __future__ import annotations

from typing import Any

import torch


class Interpreter:
    """Op semantics for the ops that compute a value from their arguments.

    Subclasses implement the ops whose meaning depends on how the graph runs: the entry ops, ``swap``,
    ``update``, ``cond``, ``merge``, ``stop`` and ``log``.

    Args:
        root: the model (``torch.nn.Module``) whose submodules ``apply_module`` nodes call; may be ``None`` for
            graphs that call no module.
    """

    def __init__(self, root: torch.nn.Module | None = None):
        self.root = root

    def run_node(self, node: Any, args: tuple, kwargs: dict) -> Any:
        """Compute ``node``'s value from its resolved arguments."""
        return getattr(self, node.op)(node, args, kwargs)

    def call_function(self, node: Any, args: tuple, kwargs: dict) -> Any:
        return node.target(*args, **kwargs)

    def call_method(self, node: Any, args: tuple, kwargs: dict) -> Any:
        return getattr(args[0], node.target)(*args[1:], **kwargs)

    def getattr(self, node: Any, args: tuple, kwargs: dict) -> Any:
        return getattr(args[0], node.target)

    def apply_module(self, node: Any, args: tuple, kwargs: dict) -> Any:
        """Call the module's ``forward`` directly, so neither its hooks nor ours fire (the logit lens)."""
        return self.module(node.target).forward(*args, **kwargs)

    def new_list(self, node: Any, args: tuple, kwargs: dict) -> list:
        return []

    def module(self, path: str) -> torch.nn.Module:
        """The submodule at ``path`` (``""`` is the root)."""
        if self.root is None:
            raise RuntimeError("this graph calls a module but was given no model to run against")
        return self.root.get_submodule(path) if path else self.root


def move_to_accelerator(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Move CPU tensors in one call's arguments to the accelerator its other tensors live on (a replacement made with
    ``torch.ones(3)`` for a value of a model on a GPU); arguments on one device are returned as they are.

    In [1]: move_to_accelerator((gpu_value, torch.ones(3)), {})[0][1].device
    Out[1]: device(type='cuda', index=0)
    """
    devices = {value.device for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor)}
    if len(devices) < 2:
        return args, kwargs
    accelerators = [device for device in devices if device.type != "cpu"]
    if not accelerators:
        return args, kwargs
    target = accelerators[0]

    def move(value: Any) -> Any:
        return value.to(target) if isinstance(value, torch.Tensor) and value.device.type == "cpu" else value

    return tuple(move(value) for value in args), {key: move(value) for key, value in kwargs.items()}
