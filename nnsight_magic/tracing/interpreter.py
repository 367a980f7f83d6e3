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
