"""Persistent interventions: ``model.edit()`` records a graph once and replays it in every later trace.

In [1]: with net.edit() as edited:                  # a copy sharing the same weights; net itself is unchanged
   ...:     edited.layer1.output[:, 0] = 0
In [2]: with edited.trace(x):
   ...:     h = edited.layer1.output.save()         # sees the edit: column 0 is zero
In [3]: with net.edit(inplace=True):                # or change `net` itself
   ...:     net.layer2.output = net.layer2.output * 2
In [4]: net.clear_edits()

An edit has no input: it applies to the whole batch of each trace, before the trace's own interventions, which
see its results and compose with it. Its nodes keep the lines where the edit was written, so an error raised by
an edit names the edit's line.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..tracing.graph import Graph
from ..tracing.node import Node, map_nodes
from ..tracing.proxy import Proxy
from .parameters import ParameterValue
from .source_install import MARK as SOURCE_MARK, use_source
from .tracer import DONE, Tracer


class Edit:
    """One recorded edit: its graph and which node holds each module value at its end."""

    def __init__(self, graph: Graph, values: dict[tuple, int], entries: dict[tuple, int]):
        self.graph = graph
        self.values = values
        self.entries = entries

    def replay(self, tracer: Tracer) -> None:
        """Add this edit's nodes to ``tracer``'s graph (whole batch), so the trace's own code sees their effect."""
        replayed: dict[int, Proxy] = {}
        sections: dict[int, int] = {}
        entry_keys = {index: key for key, index in self.entries.items()}
        for node in self.graph.nodes:
            with self._context(tracer, node, replayed, sections):
                replayed[node.index] = self._replay_node(tracer, node, replayed, sections, entry_keys)
        for key, index in self.values.items():
            tracer._values[_translate(key, sections)] = replayed[index]

    @contextlib.contextmanager
    def _context(self, tracer: Tracer, node: Node, replayed: dict[int, Proxy],
                 sections: dict[int, int]) -> Iterator[None]:
        """Recreate the iteration block and branch ``node`` was created in."""
        with contextlib.ExitStack() as stack:
            if node.section is not None:
                if node.section not in sections:
                    sections[node.section] = tracer.graph.add_section(self.graph.sections[node.section].steps)
                stack.enter_context(tracer.graph.in_section(sections[node.section]))
            if node.branch is not None:
                stack.enter_context(tracer.graph.branch(replayed[node.branch[0]].node, node.branch[1]))
            yield

    def _replay_node(self, tracer: Tracer, node: Node, replayed: dict[int, Proxy], sections: dict[int, int],
                     entry_keys: dict[int, tuple]) -> Proxy:
        location = (node.filename, node.lineno)
        if node.op in ("module_output", "module_inputs"):
            key = _translate(entry_keys[node.index], sections)
            entry = tracer._entries.get(key)
            if entry is None:
                if SOURCE_MARK in node.target:  # an edit of an operation inside a forward (.source)
                    use_source(tracer, node.target)
                entry = tracer.create_proxy(node.op, node.target, (), {}, meta=dict(node.meta), location=location,
                                            fake=tracer._entry_fake(node.op, node.target, node.meta.get("call", 0), None))
                tracer._entries[key] = entry
            return entry
        if node.op == "call_function" and isinstance(node.target, ParameterValue):
            target = node.target
            return tracer.parameter_value(target.path, target.name, target.kind)
        if node.op in ("grad", "bridge", "result"):
            raise RuntimeError(f"an edit cannot use {node.describe()} ({node.location}); edits change module values")
        args = map_nodes(lambda argument: replayed[argument.index], node.args)
        kwargs = map_nodes(lambda argument: replayed[argument.index], node.kwargs)
        return tracer.create_proxy(node.op, node.target, args, kwargs, meta=dict(node.meta), location=location)


def _translate(key: tuple, sections: dict[int, int]) -> tuple:
    path, kind, call, step, section, invoke = key
    return (path, kind, call, step, None if section is None else sections[section], None)


class EditTracer(Tracer):
    """The block of ``model.edit()``: builds without input, and stores its graph on the edited model."""

    def __init__(self, model: Any):
        super().__init__(model, validate=False)

    def __enter__(self) -> Any:
        self.model._enter_tracer(self)
        return self.model

    def _finish_building(self) -> None:
        for node in self.graph.nodes:
            if node.op in ("grad", "result", "bridge", "stop"):
                raise RuntimeError(f"{node.describe()} ({node.location}) cannot be part of an edit; edits change "
                                   "module values for every later trace")

    def _dispatch(self) -> None:
        values = {key: proxy.node.index for key, proxy in self._values.items()}
        entries = {key: proxy.node.index for key, proxy in self._entries.items()}
        self.model._edits.append(Edit(self.graph, values, entries))
        self.status = DONE
        self._detach(None)
