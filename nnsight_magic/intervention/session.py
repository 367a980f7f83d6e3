"""Sessions: several traces that run as one unit, later ones using values of earlier ones.

In [1]: with net.session() as session:
   ...:     with net.trace(a):
   ...:         h = net.layer1.output.save()
   ...:     for scale in (1, 2):                        # Python loops around traces work
   ...:         with net.trace(b):
   ...:             net.layer1.output[:] = h * scale    # h comes from the first trace: a bridge
   ...:             outs.append(net.output.save())
        # nothing has run yet; every trace runs here, in order
In [2]: h.value, outs[1].value

Inside a session a trace is recorded when its block ends, not run. A proxy of an earlier trace used in a later
one becomes a ``bridge`` node there. When the session runs, the source value is kept after its trace exactly
until the last trace that reads it has received it (a lock counted per reader), then freed unless it was saved.
``proxy.update(value)`` on a bridged value changes it for every later trace and for the source's saved value.

A session need not belong to one model: traces of several models can share one. ``%session start`` in a
notebook keeps a session open across cells (see :mod:`nnsight_magic.magics`).
"""

from __future__ import annotations

import contextvars
from typing import Any

from ..tracing.proxy import Proxy

_current: contextvars.ContextVar["Session | None"] = contextvars.ContextVar("nnsight_magic_session", default=None)


def current_session() -> "Session | None":
    """The session that new traces are recorded into, if one is open."""
    return _current.get()


class Session:
    """Records traces and runs them in order (see the module docstring).

    Attributes:
        tracers: the recorded traces, in order.
        status: ``"open"`` while recording, ``"done"`` after a successful run, ``"failed"`` after a failed one.
        building: the trace of this session whose block is open now, if any. ``h * 2`` on a value ``h`` of an
            earlier (recorded) trace becomes a node of this trace, reading ``h`` through a bridge.
    """

    def __init__(self) -> None:
        self.tracers: list[Any] = []
        self.status = "open"
        self.values: dict[tuple[int, int], Any] = {}
        self.building: Any = None  # the trace whose block is open: operations on earlier traces' values go there
        self._tokens: list[contextvars.Token] = []

    # -------------------------------------------------------------------------------------------- block
    def __enter__(self) -> "Session":
        self.activate()
        return self

    def __exit__(self, exc_type: Any, exc: Any, traceback: Any) -> bool:
        self.deactivate()
        if exc_type is None:
            self.run()
        else:
            self.discard()
        return False

    def activate(self) -> None:
        """Record traces built from now on into this session (until :meth:`deactivate`)."""
        if self.status != "open":
            raise RuntimeError(f"this session has already {'run' if self.status == 'done' else 'failed'}; "
                               "start a new one")
        self._tokens.append(_current.set(self))

    def deactivate(self) -> None:
        _current.reset(self._tokens.pop())

    # ----------------------------------------------------------------------------------------- recording
    def record(self, tracer: Any) -> None:
        """Add a finished trace block; it runs when the session runs."""
        tracer.session_index = len(self.tracers)
        self.tracers.append(tracer)

    def bridge(self, proxy: Proxy, tracer: Any) -> Proxy:
        """A node in ``tracer``'s graph that receives ``proxy``'s value from the earlier trace it belongs to."""
        source = proxy._tracer
        if source.session_index is None:
            raise RuntimeError(f"{proxy._label()} belongs to a trace of this session that has not ended yet; a "
                               "value can cross into a later trace only")
        key = (source.session_index, proxy.node.index)
        bridge = tracer._bridges.get(key)
        if bridge is None:
            node = proxy.node
            label = f"{node.describe()} ({node.location})" if node.lineno else node.describe()
            with tracer.graph.outside_sections():  # first read inside tracer.iter[...]: still delivered once
                bridge = tracer.create_proxy("bridge", key, (), {}, fake=node.fake, meta={"label": label})
            tracer._bridges[key] = bridge
        return bridge

    def discard(self) -> None:
        """Forget every recorded trace without running anything."""
        for tracer in self.tracers:
            tracer._detach(None)
            tracer.session = None
        self.tracers = []
        self.status = "failed"

    # ----------------------------------------------------------------------------------------------- run
    def run(self) -> None:
        """Run every recorded trace in order; later traces receive their bridged values from earlier ones."""
        from .backends import run_trace
        models = {id(tracer.model): tracer.model for tracer in self.tracers}
        runner = getattr(next(iter(models.values())), "_run_session", None) if len(models) == 1 else None
        if runner is not None:  # a model that runs elsewhere runs the whole session there (one request)
            runner(self)
            return
        readers: dict[tuple[int, int], int] = {}
        for tracer in self.tracers:
            for key in tracer._bridges:
                readers[key] = readers.get(key, 0) + 1
        self.status = "running"
        try:
            for position, tracer in enumerate(self.tracers):
                bridges = {}
                for key, proxy in tracer._bridges.items():
                    if key not in self.values:
                        raise RuntimeError(f"{proxy.node.meta['label']} from trace {key[0]} was never computed (that "
                                           "trace stopped early or skipped it), so a later trace cannot use it")
                    bridges[proxy.node.index] = self.values[key]
                    readers[key] -= 1
                    if not readers[key]:
                        del readers[key]
                keep = frozenset(node for source, node in readers if source == position)
                execution = run_trace(tracer, bridges, keep, on_update=self._updated)
                self._collect(position, tracer, execution, keep, readers)
        except BaseException:
            self.status = "failed"
            for tracer in self.tracers:
                if tracer.status == "recorded":
                    tracer._detach(None)
            raise
        finally:
            self.values.clear()
        self.status = "done"

    def _collect(self, position: int, tracer: Any, execution: Any, keep: frozenset[int],
                 readers: dict[tuple[int, int], int]) -> None:
        """Hold the values later traces read; drop bridged values no later trace reads any more."""
        from ..tracing.execution import DONE
        for node in keep:
            if execution.state[node] == DONE:
                self.values[(position, node)] = execution.values[node]
        for key in [key for key in self.values if key not in readers]:
            del self.values[key]

    def _updated(self, tracer: Any, bridge_node: Any, value: Any) -> None:
        """``proxy.update(value)`` on a bridged value: later traces, and the source's saved value, see it."""
        key = bridge_node.target
        self.values[key] = value
        source = self.tracers[key[0]]
        for proxy in source.saved_proxies(key[1]):
            object.__setattr__(proxy, "_value", value)

    def __repr__(self) -> str:
        return f"<Session {self.status}: {len(self.tracers)} trace(s)>"
