"""Interleave a graph with the model's forward pass through hooks on the modules the graph touches.

In [1]: execution = ModelExecution(graph, model)
In [2]: with Interleaver(execution, model, groups=[(0, 1)], batch_size=1):   # hooks on, only where needed
   ...:     execution.start()
   ...:     output = model(x)                                               # hooks feed the graph
   ...:     execution.finish()
        # every hook is removed here, also after an exception or a KeyboardInterrupt

A hook for call *k* of a module gives the value to the entry nodes waiting for that call (narrowed to each
invoke's rows), runs every node that became ready, checks that every edit of that value has happened (else
:class:`~nnsight_magic.errors.OutOfOrderError`), and returns the replacement when an entry was assigned.
Calls are counted per module, and per generation step when the graph has iteration blocks or reads later steps.

Where nothing would run after it, a module's hooks run from a wrapper of its ``forward`` set on the module for the
run (no torch hook path, about 9 µs less per hooked module); a module with forward hooks of its own, a replaced
``forward``, a ``.skip()`` or global forward hooks gets torch hooks, registered last (see ``Interleaver.__enter__``).

The hooks act only in the thread that entered the interleaver: a forward pass of the same model in another
thread (a plain call, or another thread's trace with hooks of its own) passes through them untouched.
"""

from __future__ import annotations

from threading import get_ident
from typing import Any, Callable

import torch

from ..errors import OutOfOrderError, annotate
from ..tracing.execution import PENDING, Execution, ExecutionObserver
from ..tracing.graph import Graph
from ..tracing.node import Node
from .batching import compose, narrow
from .compiled import compiled_error, is_compiled
from .parameters import ParameterSwaps, ParameterValue

_VALUE_KIND = {"module_output": "output", "module_inputs": "input"}


class EntryPoint:
    """Where a hook delivers one entry node: which call, which step, which rows."""

    __slots__ = ("index", "call", "step", "section", "group")

    def __init__(self, node: Node, group: tuple[int, int] | None):
        self.index = node.index
        self.call = node.meta.get("call", 0)
        self.step = node.meta.get("step", 0)
        self.section = node.section
        self.group = group


class ModelExecution(Execution):
    """An :class:`~nnsight_magic.tracing.execution.Execution` that knows about the model: module calls made by
    the graph pause the hooks, and ``.backward()`` nodes deliver gradients to ``.grad`` nodes."""

    def __init__(self, graph: Graph, root: torch.nn.Module, observer: ExecutionObserver | None = None,
                 align_devices: bool = False, keep: frozenset[int] = frozenset()):
        super().__init__(graph, root, observer, align_devices, keep)
        self.interleaver: Interleaver | None = None
        self.on_bridge_update: Callable[[Node, Any], None] | None = None
        self.grads_by_backward: dict[int, list[Node]] = {}
        for node in graph.nodes:
            if node.op == "grad":
                self.grads_by_backward.setdefault(node.meta["backward"], []).append(node)

    def apply_module(self, node: Node, args: tuple, kwargs: dict) -> Any:
        interleaver = self.interleaver
        if interleaver is None:
            return super().apply_module(node, args, kwargs)
        interleaver.paused += 1
        try:
            return super().apply_module(node, args, kwargs)
        finally:
            interleaver.paused -= 1

    def call_function(self, node: Node, args: tuple, kwargs: dict) -> Any:
        target = node.target
        if not isinstance(target, ParameterValue):
            return super().call_function(node, args, kwargs)
        tensor = target.tensor(self.root)
        swaps = self.interleaver.parameter_swaps if self.interleaver is not None else None
        if swaps is None or node.index not in swaps.edited:
            return tensor if torch.is_grad_enabled() else tensor.detach()  # zero-copy: only read
        copy = tensor.clone() if torch.is_grad_enabled() else tensor.detach().clone()  # this run's own copy
        swaps.keep(node.index, copy)
        return copy

    def update(self, node: Node, args: tuple, kwargs: dict) -> Any:
        target = node.args[0]
        if target.op == "bridge" and self.on_bridge_update is not None:
            self.on_bridge_update(target, args[1])
        return super().update(node, args, kwargs)

    def call_method(self, node: Node, args: tuple, kwargs: dict) -> Any:
        if "backward" not in node.meta:
            return super().call_method(node, args, kwargs)
        handles = []
        try:
            for grad_node in self.grads_by_backward.get(node.meta["backward"], ()):
                tensor = self.values[grad_node.args[0].index]
                if not isinstance(tensor, torch.Tensor) or not tensor.requires_grad:
                    raise annotate(RuntimeError(
                        f"{grad_node.args[0].describe()} does not require grad, so it has no gradient; read .grad "
                        "of values computed from the model's parameters (or call `.requires_grad_()` first)"),
                        grad_node)
                handles.append(tensor.register_hook(self._gradient_hook(grad_node, node.index)))
            return super().call_method(node, args, kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _gradient_hook(self, grad_node: Node, backward_index: int) -> Callable[[torch.Tensor], Any]:
        def hook(gradient: torch.Tensor) -> Any:
            self.deliver(grad_node.index, gradient)
            self.run_ready(limit=backward_index)
            if self.interleaver is not None:
                self.interleaver.check_writes((grad_node.index,))
            return self.swaps.pop(grad_node.index, None)
        return hook


class Interleaver:
    """Registers the hooks one run needs and removes them on exit (context manager).

    Args:
        execution: the run-time state the hooks feed.
        root: the model.
        groups: ``(start, size)`` rows of each invoke in the batch.
        batch_size: rows in the whole batch.
    """

    def __init__(self, execution: ModelExecution, root: torch.nn.Module, groups: list[tuple[int, int]],
                 batch_size: int, find_module: Callable[[str], torch.nn.Module] | None = None,
                 result_is_root_output: bool = False):
        self.execution = execution
        self.result_is_root_output = result_is_root_output
        self.root_output_points: list[EntryPoint] | None = None
        self.root = root
        self.find_module = find_module or (lambda path: root.get_submodule(path) if path else root)
        self.batch_size = batch_size
        self.paused = 0
        self.thread = get_ident()
        self.last_replacement: int | None = None  # the swap node whose value the model received last
        self.step = 0
        self.root_calls = 0
        self.counts: dict[int, int] = {}
        self.handles: list[Any] = []
        graph = execution.graph
        nodes = graph.nodes
        whole_batch = len(groups) <= 1
        self.tables: dict[tuple[str, str], dict[int, list[EntryPoint]]] = {}
        self.steps_matter = bool(graph.sections)
        for index in graph.entry_indices:
            node = nodes[index]
            kind = _VALUE_KIND.get(node.op)
            if kind is None:
                continue
            invoke = node.meta.get("invoke")
            point = EntryPoint(node, None if invoke is None or whole_batch else groups[invoke])
            self.steps_matter = self.steps_matter or point.step != 0
            self.tables.setdefault((node.target, kind), {}).setdefault(point.call, []).append(point)
        self.writes_on: dict[int, list[int]] = {}
        for write, root_index in graph.writes.items():
            if nodes[root_index].is_entry:
                self.writes_on.setdefault(root_index, []).append(write)
        for index in graph.swap_indices:
            self.writes_on.setdefault(nodes[index].args[0].index, []).append(index)
        edited = {node.index: node.target for node in nodes if node.meta.get("edited_parameter")}
        self.parameter_swaps = ParameterSwaps(execution, edited, {
            root_index: [write for write, root in graph.writes.items() if root == root_index]
            for root_index in edited}) if edited else None
        self.skipped_forwards: list[tuple[torch.nn.Module, Any]] = []
        self.wrapped: list[torch.nn.Module] = []  # modules whose `forward` this run wraps (see _wrap_forward)
        execution.interleaver = self

    def _skipped_paths(self) -> set[str]:
        """The modules that ``.skip()`` replaces in this run (they keep torch hooks: see :meth:`_install_skips`)."""
        nodes = self.execution.nodes
        return {nodes[index].args[0].target for index in self.execution.graph.swap_indices
                if nodes[index].meta.get("skip")}

    def _wrap_forward(self, module: torch.nn.Module, inputs: dict[int, list[EntryPoint]],
                      outputs: dict[int, list[EntryPoint]]) -> None:
        """Run ``module``'s hooks of this trace from a wrapper of its ``forward`` (an instance attribute, removed
        on exit) instead of registering torch hooks.

        The wrapper is called where torch calls ``forward``, after the module's pre-hooks and before its forward
        hooks, so it sees what a hook registered last would see only when the module has no forward hooks (what
        :meth:`__enter__` checks; a plain ``.save()`` gets :meth:`_storing_forward` instead). It saves torch's
        hook path (a handle made and removed, and the slow ``_call_impl`` branch), which is most of what one more
        saved module output costs. A call of ``module.forward`` that bypasses ``module(...)`` happens only from
        ``apply_module`` nodes, which pause the interleaver.
        """
        forward = module.forward
        input_hook = self._input_hook(inputs) if inputs else None
        output_hook = self._output_hook(outputs) if outputs else None
        if input_hook is None:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                output = forward(*args, **kwargs)
                replacement = output_hook(module, args, output)
                return output if replacement is None else replacement
        else:
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                replaced = input_hook(module, args, kwargs)
                if replaced is not None:
                    args, kwargs = replaced
                output = forward(*args, **kwargs)
                if output_hook is None:
                    return output
                replacement = output_hook(module, args, output)
                return output if replacement is None else replacement

        wrapper.__wrapped__ = forward  # inspect.signature(module.forward) still shows the real parameters
        module.__dict__["forward"] = wrapper
        self.wrapped.append(module)

    def _install_skips(self) -> None:
        """``module.skip(value)``: for the run, the module's forward returns nothing at the skipped calls, and its
        output hook puts ``value`` in place (its other calls run as usual)."""
        nodes = self.execution.nodes
        by_path: dict[str, list[EntryPoint]] = {}
        for index in self.execution.graph.swap_indices:
            if not nodes[index].meta.get("skip"):
                continue
            entry = nodes[index].args[0]
            point = next(point for point in self.tables[(entry.target, "output")][entry.meta.get("call", 0)]
                         if point.index == entry.index)
            if point.group is not None:
                raise annotate(ValueError("`.skip()` skips the module for the whole batch; call it outside the "
                                          "invokes (or in an invoke without input)"), nodes[index])
            by_path.setdefault(entry.target, []).append(point)
        for path, points in by_path.items():
            module = self.find_module(path)
            previous = module.__dict__.get("forward")
            self.skipped_forwards.append((module, previous))
            module.__dict__["forward"] = self._skipping_forward(module, previous or module.forward, points)

    def _skipping_forward(self, module: torch.nn.Module, forward: Callable, points: list[EntryPoint]) -> Callable:
        def skipping(*args: Any, **kwargs: Any) -> Any:
            call = self.counts.get(id(module), 0)  # the output hook counts this call after forward returns
            if not self.paused and any(point.call == call and (
                    self.execution.armed[point.section] if point.section is not None else point.step == self.step)
                    for point in points):
                return None
            return forward(*args, **kwargs)
        return skipping

    # -------------------------------------------------------------------------------------------- hooks
    def __enter__(self) -> "Interleaver":
        root = self.root
        try:
            if self.steps_matter:
                self.handles.append(root.register_forward_pre_hook(self._begin_step, prepend=True))
            by_module: dict[int, tuple[torch.nn.Module, dict, dict, str]] = {}
            for (path, kind), table in self.tables.items():
                if (path, kind) == ("", "output") and self._root_output_from_result(table):
                    continue
                module, part = _module_at(root, path)
                if part is not None:
                    first = min((point for points in table.values() for point in points), key=lambda p: p.index)
                    raise annotate(compiled_error(path, part), self.execution.nodes[first.index])
                _, outputs, inputs, _ = by_module.setdefault(id(module), (module, {}, {}, path))
                merged = outputs if kind == "output" else inputs
                for call, points in table.items():
                    merged.setdefault(call, []).extend(points)
            skipped = self._skipped_paths()
            global_hooks = _global_forward_hooks()
            for module, outputs, inputs, path in by_module.values():
                for table in (outputs, inputs):
                    for points in table.values():
                        if len(points) > 1:
                            points.sort(key=lambda point: point.index)
                if module is not root and path not in skipped and not global_hooks and not module._forward_hooks \
                        and "forward" not in module.__dict__ and not isinstance(module, torch.jit.ScriptModule):
                    # wrappable: no forward hook of its own (nor a global one) would run after a wrapper of its
                    # `forward`, and no one else has replaced that `forward` (see _wrap_forward)
                    store = None if inputs else self._only_stored(outputs)
                    if store is not None:  # a plain `.save()`: the cheapest wrapper, the most common case
                        module.__dict__["forward"] = self._storing_forward(module.forward, *store)
                        self.wrapped.append(module)
                    else:
                        self._wrap_forward(module, inputs, outputs)
                    continue
                input_hook = self._input_hook(inputs) if inputs else None
                output_hook = self._output_hook(outputs) if outputs else None
                if input_hook is not None:
                    self.handles.append(module.register_forward_pre_hook(input_hook, with_kwargs=True))
                if output_hook is not None:
                    self.handles.append(module.register_forward_hook(output_hook))
            if self.steps_matter:
                self.handles.append(root.register_forward_hook(self._end_step))
            if self.parameter_swaps is not None:
                self.parameter_swaps.register(root, self.handles)
            self._install_skips()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.wrapped:
            module.__dict__.pop("forward", None)
        self.wrapped.clear()
        if self.parameter_swaps is not None:
            self.parameter_swaps.restore()
        for module, previous in self.skipped_forwards:
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        self.skipped_forwards.clear()
        self.execution.interleaver = None

    def _begin_step(self, module: torch.nn.Module, args: tuple) -> None:
        if self.paused or get_ident() != self.thread:
            return
        self.step = self.root_calls
        self.root_calls += 1
        self.counts.clear()
        self.execution.begin_step(self.step)
        self.execution.run_ready()

    def _end_step(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        if not self.paused and get_ident() == self.thread:
            self.execution.end_step(self.step)

    def _root_output_from_result(self, table: dict[int, list[EntryPoint]]) -> bool:
        """Whether reads of the model's own output can take the run's return value instead of a root hook.

        That holds when the run returns the root module's output (one forward pass), the output is only read
        (nothing replaces or edits it), the whole batch is read, and no generation steps are counted.
        """
        if not self.result_is_root_output or self.steps_matter or set(table) != {0}:
            return False
        points = table[0]
        if any(point.group is not None or point.index in self.writes_on for point in points):
            return False
        self.root_output_points = sorted(points, key=lambda point: point.index)
        return True

    def deliver_result(self, result: Any) -> None:
        """Give the run's return value to the reads of the model's output that have no hook (see above)."""
        if self.root_output_points is not None:
            self._deliver(self.root_output_points, result)

    def _storing_forward(self, forward: Callable, call: int, index: int) -> Callable:
        """A wrapper of ``forward`` that only keeps the output of call ``call`` in entry ``index`` (a ``.save()``
        that nothing else reads; see :meth:`_wrap_forward` and :meth:`_only_stored`)."""
        store, thread = self.execution.store, self.thread
        calls = 0

        def storing(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            output = forward(*args, **kwargs)
            if not self.paused and get_ident() == thread:
                if calls == call:
                    store(index, output)
                calls += 1
            return output
        storing.__wrapped__ = forward
        return storing

    def _only_stored(self, table: dict[int, list[EntryPoint]]) -> tuple[int, int] | None:
        """``(call, index)`` when the hook of ``table`` only has to keep one value: one whole-batch read that
        nothing in the graph waits on (a plain ``.save()``)."""
        if len(table) != 1 or self.steps_matter:
            return None
        (call, points), = table.items()
        if len(points) != 1:
            return None
        point = points[0]
        index = point.index
        if point.group is None and point.section is None and point.step == 0 and \
                not self.execution.nodes[index].listeners and index not in self.writes_on:
            return call, index
        return None

    def _output_hook(self, table: dict[int, list[EntryPoint]]) -> Callable:
        store = self._only_stored(table)
        if store is not None:
            return self._storing_hook(*store)

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> Any:
            if self.paused or get_ident() != self.thread:
                return None
            points = table.get(self._count_call(id(module)))
            return None if points is None else self._deliver(points, output)
        return hook

    def _count_call(self, key: int) -> int:
        """The index of this call of a module (within the current step when steps are counted)."""
        call = self.counts.get(key, 0)
        self.counts[key] = call + 1
        return call

    def _storing_hook(self, call: int, index: int) -> Callable:
        """The fast hook of a value that is only kept (``.save()``): store it on its call, nothing else."""
        execution = self.execution

        def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
            if not self.paused and get_ident() == self.thread and self._count_call(id(module)) == call:
                execution.store(index, output)
        return hook

    def _input_hook(self, table: dict[int, list[EntryPoint]]) -> Callable:
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
            if self.paused or get_ident() != self.thread:
                return None
            points = table.get(self._count_call(-id(module) - 1))  # input calls are counted apart from outputs
            return None if points is None else self._deliver(points, (args, kwargs))
        return hook

    def _deliver(self, points: list[EntryPoint], value: Any) -> Any:
        """Give ``value`` to the waiting entries, in rounds, and return the model's replacement value (or None).

        Entries are taken in creation order; consecutive entries that see the whole batch (persistent edits,
        invokes without input) or that see single invokes' rows form one round. After each round, the nodes it
        made ready run and its assignments are composed into the value the next round sees, with one copy per
        round however many invokes it holds.
        """
        execution, step = self.execution, self.step
        current, replaced = value, False
        round_points: list[EntryPoint] = []
        for point in points:
            if point.section is not None:
                if not execution.armed[point.section]:
                    continue
            elif point.step != step:
                continue
            whole = point.group is None
            if round_points and whole != (round_points[0].group is None):
                current, replaced = self._finish_round(round_points, current, replaced)
                round_points = []
            execution.deliver(point.index, current if whole else narrow(current, *point.group, self.batch_size))
            round_points.append(point)
        if round_points:
            current, replaced = self._finish_round(round_points, current, replaced)
        return current if replaced else None

    def _finish_round(self, points: list[EntryPoint], current: Any, replaced: bool) -> tuple[Any, bool]:
        self.execution.run_ready()
        self.check_writes([point.index for point in points])
        swaps = self.execution.swaps
        if not swaps:
            return current, replaced
        replacements = [(point.group or (0, self.batch_size), swaps.pop(point.index))
                        for point in points if point.index in swaps]
        if not replacements:
            return current, replaced
        self.last_replacement = max(self.execution.swapped_by[point.index] for point in points
                                    if point.index in self.execution.swapped_by)
        return compose(current, replacements, self.batch_size), True

    # ------------------------------------------------------------------------------------- order check
    def check_writes(self, entries: Any) -> None:
        """Every edit of a value the model just produced must have happened before the model moves on."""
        if not self.writes_on:
            return
        state = self.execution.state
        for entry in entries:
            for write in self.writes_on.get(entry, ()):
                if state[write] == PENDING:
                    raise out_of_order(self.execution.graph, write, entry, self.execution)


def _module_at(root: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str | None]:
    """The module at the dotted ``path`` and, in the same walk, :func:`~.compiled.compiled_part` of it."""
    module = root
    if getattr(root, "_compiled_call_impl", None) is not None:
        return root, ""
    if not path:
        return root, None
    names = path.split(".")
    for depth, name in enumerate(names):
        # is_compiled(module), with its cheap half first: a torch.compile wrapper is an OptimizedModule
        if type(module).__name__ == "OptimizedModule" and is_compiled(module):
            return module, ".".join(names[:depth])
        module = module._modules[name]
        if getattr(module, "_compiled_call_impl", None) is not None:
            return module, ".".join(names[:depth + 1])
    return module, None


def _global_forward_hooks() -> bool:
    """Whether forward hooks for every module are registered (``register_module_forward_hook``)."""
    modules = torch.nn.modules.module
    return bool(getattr(modules, "_global_forward_hooks", True)) or \
        bool(getattr(modules, "_global_forward_hooks_always_called", None))


def out_of_order(graph: Graph, write: int, entry: int, execution: Execution | None = None,
                 blocker: Node | None = None) -> OutOfOrderError:
    """The error for an edit of ``entry``'s value that needs something the model produces later."""
    nodes = graph.nodes
    if blocker is None and execution is not None:
        blocker = _pending_source(nodes, write, execution)
    changed = nodes[entry].describe()
    written = nodes[write]
    needs = f", but it needs {blocker.describe()} ({blocker.location})" if blocker is not None else ""
    message = (f"{written.location} `{written.source_line}` changes {changed}{needs}, which the model computes "
               f"only after {changed}. A change can only use values the model has produced by then: read the value "
               "from a module that runs earlier, or compute it in one trace and use it in a later trace of a "
               "session (`with model.session():`)")
    return OutOfOrderError(message)


def _pending_source(nodes: list[Node], index: int, execution: Execution) -> Node | None:
    """Follow the latest pending dependency from node ``index`` back to the entry that holds it up."""
    current = nodes[index]
    while True:
        pending = [dependency for dependency in current.dependencies if execution.state[dependency] == PENDING]
        if not pending:
            return current if current.index != index else None
        current = nodes[max(pending)]
        if current.is_entry:
            return current
