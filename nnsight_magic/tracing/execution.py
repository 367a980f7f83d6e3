"""Run a graph on real values as they arrive: dataflow, in creation order, freeing what nobody needs.

An :class:`Execution` holds the run-time state of one graph (values, how many dependencies each node still
waits for, how many readers each value still has). Values enter through :meth:`Execution.deliver` (the
interleaver's hooks call it with a module's real output); :meth:`Execution.run_ready` then runs every node whose
inputs are all there, lowest index first, so whenever the order is free the user's own order wins. A value is
dropped as soon as its last reader ran, unless the node is saved, so after a run only saved values remain.

In [1]: execution = Execution(graph, root=model)
In [2]: execution.start()                       # run what needs no model value
In [3]: execution.deliver(3, layer_output)      # a hook fired: node %3 now has its value ...
In [4]: execution.run_ready()                   # ... and everything waiting only on it runs
In [5]: execution.finish()                      # close iteration blocks; report nodes that never ran

A ``tracer.stop()`` in an iteration block waits only for what ran before it in the same step: the earlier
nodes of its own block and of the other blocks armed in that step (an open-ended ``tracer.all()`` before it).

Iteration blocks (generation steps) are re-armed at :meth:`begin_step` and closed after their last step, when
the nodes after the block see the last step's values. A ``cond`` node skips the branch it did not take; the
skipped nodes release what only they would have read.
"""

from __future__ import annotations

import heapq
from typing import Any, Protocol

import torch

from ..errors import annotate
from .graph import Graph
from .interpreter import Interpreter, move_to_accelerator
from .node import ENTRY_OPS, Node, map_nodes

PENDING, DONE, FREED, SKIPPED = 0, 1, 2, 3
STATUS_NAMES = {PENDING: "pending", DONE: "done", FREED: "freed", SKIPPED: "skipped"}


class _Marker:
    """A named sentinel value (``SKIPPED_VALUE``, ``UNBOUND``)."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


SKIPPED_VALUE = _Marker("<not computed: branch not taken>")
UNBOUND = _Marker("<unbound>")


class EarlyStop(Exception):
    """Raised by a ``stop`` node to end the model run; the interleaver catches it."""


class ExecutionObserver(Protocol):
    """What a live view (the inspector widget) hears while a graph runs."""

    def node_status(self, index: int, status: int) -> None: ...

    def step_started(self, step: int) -> None: ...


class Execution(Interpreter):
    """The run-time state of one graph; see the module docstring for the life cycle.

    Args:
        graph: the graph to run.
        root: the model, for ``apply_module`` nodes.
        observer: told about every status change (optional; costs nothing when ``None``).
        align_devices: move CPU tensors in a node's arguments to the device of its other tensors (set when
            the model lives on an accelerator).
        keep: nodes whose values must outlive the run although nothing in the graph reads them any more (values
            a later trace of a session reads).
    """

    def __init__(self, graph: Graph, root: torch.nn.Module | None = None, observer: ExecutionObserver | None = None,
                 align_devices: bool = False, keep: frozenset[int] = frozenset()):
        super().__init__(root)
        nodes = graph.nodes
        count = len(nodes)
        self.graph = graph
        self.nodes = nodes
        self.values: list[Any] = [None] * count
        self.state = [PENDING] * count
        self.waiting = [len(node.dependencies) for node in nodes]
        self.readers_total = [0] * count
        for node in nodes:
            for dependency in node.data_dependencies:
                self.readers_total[dependency] += 1
        self.readers = list(self.readers_total)
        self.ready: list[int] = []
        self.swaps: dict[int, Any] = {}
        self.swapped_by: dict[int, int] = {}  # entry -> the swap node whose replacement it received last
        self.observer = observer
        self.align_devices = align_devices
        self.keep = keep
        self.step = 0
        self.armed = [False] * len(graph.sections)
        self.finalized = [False] * len(graph.sections)
        self.steps_run: set[int] = set()
        self.stopped_by: int | None = None
        self.failed_at: int | None = None  # the node whose operation raised, for live views

    # ------------------------------------------------------------------------------------------- life cycle
    def start(self) -> None:
        """Queue every node outside iteration blocks that waits for nothing (constants, ``tracer.list()``)."""
        waiting, ready = self.waiting, self.ready
        for node in self.nodes:
            if not waiting[node.index] and node.op not in ENTRY_OPS and node.section is None:
                heapq.heappush(ready, node.index)

    def deliver(self, index: int, value: Any) -> None:
        """Give entry node ``index`` its value (from a hook) and tell whoever waits on it."""
        if self.state[index] != PENDING:
            return
        self._set(index, value)
        self._release_dependencies(self.nodes[index])
        self._notify(index)
        self._free_if_unread(index)

    def store(self, index: int, value: Any) -> None:
        """:meth:`deliver` for an entry that nothing in the graph reads (a plain ``.save()``): keep the value if
        it is saved or kept, else drop it; there is no one to tell."""
        state = self.state
        if state[index] != PENDING:
            return
        observer = self.observer
        if self.nodes[index].saved or index in self.keep:
            self.values[index] = value
            state[index] = DONE
            if observer is not None:
                observer.node_status(index, DONE)
        else:
            state[index] = FREED
            if observer is not None:
                observer.node_status(index, DONE)
                observer.node_status(index, FREED)

    def run_ready(self, limit: int | None = None) -> None:
        """Run ready nodes, lowest index first; with ``limit``, only nodes created before node ``limit``."""
        ready, state = self.ready, self.state
        while ready:
            index = ready[0]
            if limit is not None and index >= limit:
                return
            heapq.heappop(ready)
            if state[index] == PENDING:
                self._execute(index)

    def begin_step(self, step: int) -> None:
        """A new generation step starts: re-arm the iteration blocks that run in it."""
        self.step = step
        self.steps_run.add(step)
        if self.observer is not None:
            self.observer.step_started(step)
        for section in self.graph.sections:
            if not self.finalized[section.index] and section.steps.contains(step):
                self._arm(section.index)

    def end_step(self, step: int) -> None:
        """Generation step ``step`` ended: close the blocks whose last step it was."""
        self.run_ready()
        for section in self.graph.sections:
            if self.armed[section.index]:
                self.armed[section.index] = False
                if section.steps.last == step:
                    self._finalize(section.index)

    def finish(self) -> None:
        """The model run ended: close every open iteration block and run what that made ready."""
        for section in self.graph.sections:
            self.armed[section.index] = False
            if not self.finalized[section.index]:
                self._finalize(section.index)
        self.run_ready()

    def pending(self) -> list[Node]:
        """Nodes that never ran (and were not skipped), excluding those after an early stop."""
        nodes = [node for node in self.nodes if self.state[node.index] == PENDING]
        if self.stopped_by is not None:
            nodes = [node for node in nodes if node.index < self.stopped_by]
        return nodes

    # -------------------------------------------------------------------------------------------- internals
    def _execute(self, index: int) -> None:
        node = self.nodes[index]
        args, kwargs = node.args, node.kwargs
        if node.data_dependencies:
            resolve = self._argument_value
            args = map_nodes(lambda dependency: resolve(dependency, node), args)
            if kwargs:
                kwargs = map_nodes(lambda dependency: resolve(dependency, node), kwargs)
            if self.align_devices:
                args, kwargs = move_to_accelerator(args, kwargs)
        try:
            value = self.run_node(node, args, kwargs)
        except EarlyStop:
            self.stopped_by = index
            raise
        except Exception as error:
            self.failed_at = index
            raise annotate(error, node)
        self._set(index, value)
        self._release_dependencies(node)
        self._notify(index)
        self._free_if_unread(index)

    def _argument_value(self, dependency: Node, reader: Node) -> Any:
        state = self.state[dependency.index]
        if state == DONE:
            return self.values[dependency.index]
        if state == SKIPPED:
            if reader.op == "merge":
                return SKIPPED_VALUE
            raise annotate(RuntimeError(
                f"this uses %{dependency.index} ({dependency.describe()}, {dependency.location}), which was not "
                "computed because its branch was not taken; give it a value on both branches or move this "
                "line inside the branch"), reader)
        raise RuntimeError(f"internal error: %{reader.index} read %{dependency.index} after it was "
                           f"{STATUS_NAMES[state]}")

    def _set(self, index: int, value: Any) -> None:
        self.values[index] = value
        self.state[index] = DONE
        if self.observer is not None:
            self.observer.node_status(index, DONE)

    def _notify(self, index: int) -> None:
        """Tell ``index``'s listeners it finished; skip a ``cond``'s branch that was not taken."""
        node = self.nodes[index]
        section = node.section
        taken = bool(self.values[index]) if node.op == "cond" and self.state[index] == DONE else None
        waiting, state, nodes, armed = self.waiting, self.state, self.nodes, self.armed
        for listener in node.listeners:
            target = nodes[listener]
            if section is not None and target.section != section and \
                    not (target.op == "stop" and target.section is not None and armed[target.section]):
                continue  # readers outside an iteration block wait for its last step (see _finalize)
            if taken is not None and target.branch is not None and target.branch[0] == index \
                    and target.branch[1] != taken:
                self._skip(listener)
                continue
            waiting[listener] -= 1
            if not waiting[listener] and state[listener] == PENDING and not target.is_entry and \
                    (target.section is None or armed[target.section]):
                heapq.heappush(self.ready, listener)

    def _skip(self, index: int) -> None:
        if self.state[index] != PENDING:
            return
        node = self.nodes[index]
        self.state[index] = SKIPPED
        if self.observer is not None:
            self.observer.node_status(index, SKIPPED)
        self._release_dependencies(node)
        if node.op == "cond":
            for listener in node.listeners:
                branch = self.nodes[listener].branch
                if branch is not None and branch[0] == index:
                    self._skip(listener)
        self._notify(index)

    def _release_dependencies(self, node: Node) -> None:
        """``node`` no longer needs its inputs: drop each input whose last reader this was."""
        section = node.section
        nodes, readers = self.nodes, self.readers
        for dependency in node.data_dependencies:
            if section is not None and nodes[dependency].section != section:
                continue  # values from outside an iteration block stay until its last step
            readers[dependency] -= 1
            self._free_if_unread(dependency)

    def _free_if_unread(self, index: int) -> None:
        if self.readers[index] <= 0 and self.state[index] == DONE and not self.nodes[index].saved \
                and index not in self.keep:
            self.values[index] = None
            self.state[index] = FREED
            if self.observer is not None:
                self.observer.node_status(index, FREED)

    def _arm(self, section_index: int) -> None:
        """Reset a block's nodes for a new step and queue those that wait for nothing inside it."""
        self.armed[section_index] = True
        nodes, state = self.nodes, self.state
        section_nodes = self.graph.sections[section_index].nodes
        for index in section_nodes:
            node = nodes[index]
            state[index] = PENDING
            self.values[index] = None
            self.waiting[index] = sum(1 for dependency in node.dependencies
                                      if nodes[dependency].section == section_index or state[dependency] == PENDING)
            self.readers[index] = self.readers_total[index]
        # every count is reset before the step number is delivered, so its readers' counts are not reset after it
        free = [index for index in section_nodes
                if not self.waiting[index] and not nodes[index].is_entry and nodes[index].op != "iteration"]
        for index in section_nodes:
            if nodes[index].op == "iteration":
                self.deliver(index, self.step)
        for index in free:
            heapq.heappush(self.ready, index)

    def _finalize(self, section_index: int) -> None:
        """A block ran its last step: readers after it see the last values; inputs from before it are freed."""
        self.finalized[section_index] = True
        nodes = self.nodes
        for index in self.graph.sections[section_index].nodes:
            node = nodes[index]
            finished = self.state[index] != PENDING
            for listener in node.listeners:
                target = nodes[listener]
                if target.section == section_index or not finished:
                    continue
                self.waiting[listener] -= 1
                if not self.waiting[listener] and self.state[listener] == PENDING and not target.is_entry and \
                        (target.section is None or self.armed[target.section]):
                    heapq.heappush(self.ready, listener)
            for dependency in node.data_dependencies:
                if nodes[dependency].section != section_index:
                    self.readers[dependency] -= 1
                    self._free_if_unread(dependency)

    # -------------------------------------------------------------------- ops whose meaning is run-specific
    def swap(self, node: Node, args: tuple, kwargs: dict) -> Any:
        """Remember the replacement for entry ``args[0]``; the hook returns it to the model."""
        entry, value = node.args[0], args[1]
        original = args[0]
        if value is None:
            raise TypeError(f"{entry.describe()} cannot be replaced by None (the model would silently keep its "
                            "value); give it a tensor")
        if isinstance(value, torch.Tensor) and isinstance(original, torch.Tensor) and value.device != original.device:
            value = value.to(original.device)
        self.swaps[entry.index] = value
        self.swapped_by[entry.index] = node.index
        return value

    def update(self, node: Node, args: tuple, kwargs: dict) -> Any:
        """Make the node ``args[0]`` hold ``args[1]`` from now on."""
        self.values[node.args[0].index] = args[1]
        return args[1]

    def log(self, node: Node, args: tuple, kwargs: dict) -> None:
        print(*args, **kwargs)

    def cond(self, node: Node, args: tuple, kwargs: dict) -> bool:
        return bool(args[0])

    def merge(self, node: Node, args: tuple, kwargs: dict) -> Any:
        return args[1] if args[0] else args[2]

    def stop(self, node: Node, args: tuple, kwargs: dict) -> None:
        raise EarlyStop()
