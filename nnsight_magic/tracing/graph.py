"""The intervention graph: an ordered list of nodes, built through one funnel.

In [1]: with net.trace(x) as tracer:
   ...:     h = net.layer1.output
   ...:     h[:, 0] = 0
   ...:     out = net.output.save()
In [2]: print(tracer.graph)
%0 = layer1.output                     line 2  (1, 10) float32
%1 = %0[:, 0] = 0                      line 3
%2 = model.output                      line 4  (1, 2) float32   saved

Everything that builds a graph goes through :meth:`Graph.create_node`, which records the user's line, asks the
shape inference for the node's fake value (raising the user's error at the user's line), finds which storage the
value lives in, and adds the ordering edges that make in-place edits behave as they would eagerly:

* an edit waits for every earlier node that reads the same storage (write-after-read), and for the previous edit
  (write-after-write);
* a read waits for the latest earlier edit of the storage it reads (read-after-write).

Blocks opened while building change what a node belongs to: :meth:`Graph.iteration` (generation steps),
:meth:`Graph.branch` (a condition), and a ``stop`` node makes every later node wait for it.
"""

from __future__ import annotations

import contextlib
import operator
from typing import Any, Iterator

from .node import ENTRY_OPS, Node, contains_node, describe_fake, iter_nodes

_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior, operator.ixor,
    operator.ilshift, operator.irshift,
})
_MUTATING_CONTAINER_METHODS = frozenset({
    "append", "extend", "insert", "pop", "remove", "clear", "update", "setdefault", "add", "discard",
    "popitem", "sort", "reverse", "__setitem__", "__delitem__",
})
_VIEW_METHODS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "transpose", "t", "permute", "narrow", "select", "unsqueeze",
    "squeeze", "flatten", "unflatten", "expand", "expand_as", "unfold", "diagonal", "as_strided", "detach",
    "contiguous", "split", "chunk", "unbind", "tensor_split", "movedim", "moveaxis", "swapaxes", "swapdims",
    "real", "imag", "T", "mT", "H", "mH", "data", "__getitem__",
})


def _dependency_indices(args: tuple, kwargs: dict) -> tuple[int, ...]:
    """Indices of the nodes in ``args`` and ``kwargs``, in order, without repeats (flat arguments are fast)."""
    found: list[int] = []
    for value in args:
        if type(value) is Node:
            if value.index not in found:
                found.append(value.index)
        elif isinstance(value, (tuple, list, dict, slice)):
            found.extend(index for index in dict.fromkeys(each.index for each in iter_nodes(value))
                         if index not in found)
    if kwargs:
        found.extend(index for index in dict.fromkeys(each.index for each in iter_nodes(kwargs)) if index not in found)
    return tuple(found)


def written_node(node: Node) -> int | None:
    """The index of the node whose value ``node`` edits in place (setitem, ``add_``, ``+=``, ``append``), or None."""
    if not node.args or not isinstance(node.args[0], Node):
        return None
    base = node.args[0]
    op, target = node.op, node.target
    if op == "update":
        return base.index
    if op == "call_function" and target in _INPLACE_OPERATORS:
        if target is operator.setitem or base.fake is None or hasattr(base.fake, "shape") or \
                isinstance(base.fake, (list, dict)):
            return base.index
        return None
    name = target if op == "call_method" else getattr(target, "__name__", "") if op == "call_function" else ""
    if not isinstance(name, str) or not name:
        return None
    if name.endswith("_") and not name.endswith("__") and (
            op == "call_method" or getattr(target, "__module__", "").startswith("torch")):
        return base.index
    if op == "call_method" and name in _MUTATING_CONTAINER_METHODS and not hasattr(base.fake, "shape"):
        return base.index
    return None


class StepSet:
    """Which generation steps an iteration block runs in: an ``int``, a list of ints, or a slice.

    In [1]: StepSet(slice(1, None)).contains(5), StepSet([0, 2]).last
    Out[1]: (True, 2)
    """

    def __init__(self, steps: int | list[int] | slice):
        if isinstance(steps, bool) or not isinstance(steps, (int, list, tuple, slice)):
            raise TypeError(f"iteration steps must be an int, a list of ints or a slice, not {steps!r}")
        if isinstance(steps, (list, tuple)):
            steps = sorted(set(int(step) for step in steps))
            if not steps:
                raise ValueError("tracer.iter[[]] names no generation step")
        if isinstance(steps, slice) and (steps.step or 1) <= 0:
            raise ValueError("tracer.iter[...] needs a positive slice step")
        if any(step < 0 for step in self._bounds(steps)):
            raise ValueError(f"tracer.iter[{steps!r}]: steps count from 0; negative steps are not supported")
        self.steps = steps

    @staticmethod
    def _bounds(steps: Any) -> list[int]:
        if isinstance(steps, int):
            return [steps]
        if isinstance(steps, list):
            return steps
        return [value for value in (steps.start, steps.stop) if value is not None]

    def contains(self, step: int) -> bool:
        """True if the block runs at generation step ``step``."""
        steps = self.steps
        if isinstance(steps, int):
            return step == steps
        if isinstance(steps, list):
            return step in steps
        start, stop, stride = steps.start or 0, steps.stop, steps.step or 1
        return step >= start and (stop is None or step < stop) and (step - start) % stride == 0

    @property
    def first(self) -> int:
        """The first step the block runs in."""
        steps = self.steps
        return steps if isinstance(steps, int) else steps[0] if isinstance(steps, list) else steps.start or 0

    @property
    def last(self) -> int | None:
        """The last step the block runs in, or ``None`` when the block runs until generation ends."""
        steps = self.steps
        if isinstance(steps, int):
            return steps
        if isinstance(steps, list):
            return steps[-1]
        if steps.stop is None:
            return None
        start, stride = steps.start or 0, steps.step or 1
        if steps.stop <= start:
            return None
        return start + ((steps.stop - 1 - start) // stride) * stride

    @property
    def is_empty(self) -> bool:
        """True for a slice that names no step at all (``iter[3:3]``)."""
        steps = self.steps
        return isinstance(steps, slice) and steps.stop is not None and steps.stop <= (steps.start or 0)

    def __repr__(self) -> str:
        steps = self.steps
        if isinstance(steps, slice):
            text = f"{steps.start if steps.start is not None else ''}:{steps.stop if steps.stop is not None else ''}"
            return f"[{text}{':' + str(steps.step) if steps.step else ''}]"
        return f"[{steps}]"


class Section:
    """An iteration block: the nodes that run once in every generation step of ``steps``."""

    __slots__ = ("index", "steps", "nodes")

    def __init__(self, index: int, steps: StepSet):
        self.index = index
        self.steps = steps
        self.nodes: list[int] = []

    def __repr__(self) -> str:
        return f"Section({self.index}, steps={self.steps}, {len(self.nodes)} nodes)"


class Graph:
    """An ordered list of :class:`Node` s with one funnel to create them.

    Attributes:
        nodes: every node, in creation order (which is also a valid execution order).
        sections: iteration blocks, indexed by ``Node.section``.
        shape_inference: an object with ``infer(node) -> fake`` and ``alias(node) -> index | None``, set while
            shapes are being checked; ``None`` when the trace runs with ``validate=False``.
        writes: for each node that edits a value in place, the index of the node whose storage it edits.
        entry_indices, swap_indices: the entry nodes and the assignments, in creation order.
    """

    def __init__(self, shape_inference: Any = None):
        self.nodes: list[Node] = []
        self.sections: list[Section] = []
        self.shape_inference = shape_inference
        self.writes: dict[int, int] = {}
        self.entry_indices: list[int] = []
        self.swap_indices: list[int] = []
        self._section_stack: list[int] = []
        self._branch_stack: list[tuple[int, bool]] = []
        self._stop: int | None = None
        self._readers: dict[int, list[int]] = {}
        self._last_write: dict[int, int] = {}

    # ----------------------------------------------------------------------------------------------- building
    def create_node(self, op: str, target: Any, args: tuple = (), kwargs: dict | None = None, *,
                    filename: str = "", lineno: int = 0, meta: dict | None = None,
                    fake: Any = None, after: tuple = ()) -> Node:
        """Create, check and append one node; raise the user's error before anything is appended.

        ``fake`` gives entry nodes their fake value directly; every other node gets it from
        ``shape_inference`` (which raises shape and index errors here, while the user's line is running).
        ``after`` lists extra nodes that must run first (a ``stop`` waits for everything before it).
        """
        node = Node(len(self.nodes), op, target, tuple(args), kwargs or {}, filename, lineno)
        if meta:
            node.meta.update(meta)
        node.section = self._section_stack[-1] if self._section_stack else None
        data = _dependency_indices(node.args, node.kwargs) if args or kwargs else ()
        node.data_dependencies = data
        is_entry = op in ENTRY_OPS
        if self.shape_inference is not None:
            node.fake = fake if is_entry else self.shape_inference.infer(node)
        elif fake is not None:
            node.fake = fake
        if is_entry:
            control: list[int] = list(after)
            if data:
                control.extend(self._ordering_edges(node))
            self.entry_indices.append(node.index)
        else:
            node.alias = self._alias(node)
            control = list(after)
            if self._branch_stack:
                node.branch = self._branch_stack[-1]
                control.append(node.branch[0])
            if self._stop is not None:
                control.append(self._stop)
            control.extend(self._ordering_edges(node))
            if op == "swap":
                self.swap_indices.append(node.index)
        node.dependencies = tuple(sorted(set(data).union(control))) if control else data
        self.nodes.append(node)
        nodes = self.nodes
        for dependency in node.dependencies:
            nodes[dependency].listeners.append(node.index)
        if node.section is not None:
            self.sections[node.section].nodes.append(node.index)
        if op == "stop":
            self._stop = node.index
        return node

    def _alias(self, node: Node) -> int | None:
        """Index of the node whose storage ``node``'s value shares, following views back to their base."""
        if node.is_entry or not node.args or not isinstance(node.args[0], Node):
            return None
        base = node.args[0]
        op = node.op
        if op == "swap":
            return node.args[1].storage_root if isinstance(node.args[1], Node) else None
        if op in ("update", "merge", "cond", "log", "stop", "apply_module"):
            return None
        if written_node(node) is not None:
            return base.storage_root
        if self.shape_inference is not None and node.fake is not None and base.fake is not None:
            return base.storage_root if self.shape_inference.alias(node.fake, base.fake) else None
        if getattr(node.target, "returns_view", False):
            return base.storage_root
        name = node.target if op in ("call_method", "getattr") else getattr(node.target, "__name__", "")
        if op == "call_function" and node.target is operator.getitem:
            name = "__getitem__"
        return base.storage_root if name in _VIEW_METHODS else None

    def _ordering_edges(self, node: Node) -> list[int]:
        """Read/write ordering edges for ``node`` (see the module docstring) and the bookkeeping behind them."""
        if not node.data_dependencies:
            return []
        edges: list[int] = []
        read_roots = list(dict.fromkeys(self.nodes[index].storage_root for index in node.data_dependencies))
        written = written_node(node)
        if written is not None:
            root = self.nodes[written].storage_root
            self.writes[node.index] = root
            edges.extend(index for index in self._readers.get(root, ()) if index != node.index)
            if root in self._last_write:
                edges.append(self._last_write[root])
        for root in read_roots:
            last = self._last_write.get(root)
            if last is not None and last != node.index:
                edges.append(last)
        if written is not None:
            root = self.writes[node.index]
            self._last_write[root] = node.index
            self._readers[root] = []
            read_roots = [other for other in read_roots if other != root]
        for root in read_roots:
            self._readers.setdefault(root, []).append(node.index)
        return edges

    def iteration(self, steps: StepSet) -> contextlib.AbstractContextManager[Section]:
        """A new block whose nodes run once per generation step in ``steps`` (a context manager)."""
        if self._section_stack:
            raise RuntimeError("iteration blocks cannot be nested: close the outer tracer.iter[...] block first")
        return self.in_section(self.add_section(steps))

    def add_section(self, steps: StepSet) -> int:
        """Add an empty iteration block and return its index."""
        self.sections.append(Section(len(self.sections), steps))
        return len(self.sections) - 1

    @contextlib.contextmanager
    def in_section(self, index: int) -> Iterator[Section]:
        """Create nodes inside the existing iteration block ``index``."""
        self._section_stack.append(index)
        try:
            yield self.sections[index]
        finally:
            self._section_stack.pop()

    @contextlib.contextmanager
    def outside_sections(self) -> Iterator[None]:
        """Create nodes outside every iteration block: values that exist once per run (a session's bridges)."""
        stack, self._section_stack = self._section_stack, []
        try:
            yield
        finally:
            self._section_stack = stack

    @contextlib.contextmanager
    def branch(self, cond: Node, taken_when: bool) -> Iterator[None]:
        """Nodes created inside this block run only if ``cond``'s value is ``taken_when``."""
        if cond.op != "cond":
            raise TypeError("Graph.branch needs a node created by a cond op")
        self._branch_stack.append((cond.index, taken_when))
        try:
            yield
        finally:
            self._branch_stack.pop()

    @property
    def open_branches(self) -> tuple[tuple[int, bool], ...]:
        """The ``(cond index, taken when)`` of every branch block open now, outermost first."""
        return tuple(self._branch_stack)

    @property
    def current_section(self) -> int | None:
        """The iteration block nodes are being created in, or ``None``."""
        return self._section_stack[-1] if self._section_stack else None

    # ---------------------------------------------------------------------------------------------- as data
    def to_json(self) -> str:
        """This graph as JSON, tensors in a safetensors blob inside it (see :mod:`.serialize`)."""
        from .serialize import to_json
        return to_json(self)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Graph":
        """The graph :meth:`to_json` wrote; refuses anything off the allow-list with a ``ValueError``."""
        from .serialize import from_json
        return from_json(text)

    # --------------------------------------------------------------------------------------------- inspection
    def entries(self) -> Iterator[Node]:
        """Every node whose value comes from outside the graph."""
        return (self.nodes[index] for index in self.entry_indices)

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __str__(self) -> str:
        if not self.nodes:
            return "<empty graph>"
        rows = []
        for node in self.nodes:
            flags = []
            if node.saved:
                flags.append("saved")
            if node.section is not None:
                flags.append(f"steps {self.sections[node.section].steps}")
            if node.branch is not None:
                flags.append(f"if %{node.branch[0]} is {node.branch[1]}")
            if node.index in self.writes:
                flags.append(f"edits %{self.writes[node.index]}")
            head = f"%{node.index} = {node.describe()}"
            rows.append((head, node.location if node.lineno else "", describe_fake(node.fake), ", ".join(flags)))
        width = min(max(len(row[0]) for row in rows), 60)
        return "\n".join(f"{head:<{width}}  {where:<9} {shape:<22} {flags}".rstrip()
                         for head, where, shape, flags in rows)

    def lint(self) -> None:
        """Check the graph's invariants; raise ``AssertionError`` naming the first broken one.

        Indices match positions, every edge points backwards (creation order is an execution order), listener
        lists mirror dependency lists, data dependencies are the nodes in the arguments, and sections and
        branches refer to existing nodes of the right kind.
        """
        for position, node in enumerate(self.nodes):
            assert node.index == position, f"node at position {position} has index {node.index}"
            args_nodes = {dependency.index for dependency in iter_nodes((node.args, node.kwargs))}
            assert set(node.data_dependencies) == args_nodes, f"%{position}: data dependencies differ from args"
            assert set(node.data_dependencies) <= set(node.dependencies), f"%{position}: data edge missing"
            for dependency in node.dependencies:
                assert dependency < position, f"%{position} depends on later node %{dependency}"
                assert position in self.nodes[dependency].listeners, \
                    f"%{dependency} does not list %{position} as a listener"
            for listener in node.listeners:
                assert position in self.nodes[listener].dependencies, \
                    f"%{position} lists %{listener}, which does not depend on it"
            if node.is_entry:
                assert not contains_node(node.kwargs), f"entry %{position} has node kwargs"
            if node.branch is not None:
                assert self.nodes[node.branch[0]].op == "cond", f"%{position} is conditioned on a non-cond node"
            if node.section is not None:
                assert position in self.sections[node.section].nodes, f"%{position} missing from its section"
            if node.alias is not None:
                assert node.alias < position and self.nodes[node.alias].alias is None, \
                    f"%{position} aliases %{node.alias}, which is not a storage root before it"
        for section in self.sections:
            for index in section.nodes:
                assert self.nodes[index].section == section.index, f"section {section.index} lists %{index}"

