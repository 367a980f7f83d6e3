"""Run serialized traces next to the weights, with the same backend and interleaver as a local run.

In [1]: request = encode_request([tracer])              # on the notebook: graphs, inputs, options
In [2]: answer = execute(model, *unpack(request))       # on the server: rebuild, check, run, collect
In [3]: header, blob = unpack(answer)                   # saved values (safetensors), node statuses, prints

A request holds one trace, or several: the traces of one session, which run in order as a
:class:`~nnsight_magic.intervention.session.Session`, later ones reading earlier values through their bridges.
Each graph is rebuilt with :func:`~nnsight_magic.tracing.serialize.loads` (refusing anything off the allow-list)
and its module paths are checked against this model before anything runs. A :class:`ServedTrace` is what
:func:`~nnsight_magic.intervention.backends.run_trace` needs of a tracer, so the run is the local one.
"""

from __future__ import annotations

import contextlib
import io
import time
from typing import Any, Callable

import torch

from ..intervention.backends import run_trace
from ..intervention.parameters import ParameterValue, parameter_kind
from ..intervention.session import Session
from ..intervention.source_install import MARK as SOURCE_MARK, release_sources, use_source
from ..tracing import serialize
from ..tracing.execution import DONE, Execution
from ..tracing.graph import Graph
from ..tracing.proxy import Proxy
from ..tracing.serialize import TensorReader, TensorWriter, decode_value, encode_value
from .wire import decode_error, decode_inputs, decode_result, encode_error, encode_inputs, encode_result, pack, unpack

REQUEST_VERSION = 1


def _travelling_options(options: dict) -> dict:
    """The run options as they travel: a ``streamer=`` stays here, and the request asks for the tokens instead."""
    travelling = {key: value for key, value in options.items() if key != "streamer"}
    if "streamer" in options:
        travelling["stream"] = True
    return travelling


class ServedTrace:
    """A trace rebuilt on the server: what ``run_trace`` and ``Session.run`` use of a tracer, and nothing more.

    Attributes:
        saved: ``node index -> Proxy`` holding each saved value after the run (``Session`` updates them in place
            when a later trace calls ``.update`` on a bridged value).
        execution: the finished execution state (``None`` before the run).
    """

    def __init__(self, model: Any, graph: Graph, invokes: list, run_options: dict, grad: bool,
                 bridges: dict[tuple[int, int], int], keep: list[int]):
        self.model = model
        self.graph = graph
        self.invokes = invokes
        self.run_options = run_options
        self.needs_grad = grad
        self.observers: list[Any] = []
        self.status = "recorded"
        self.session: Any = None
        self.session_index: int | None = None
        self._bridges = {key: Proxy(graph.nodes[index], None) for key, index in bridges.items()}
        self.keep = keep
        self.saved: dict[int, Proxy] = {}
        self.execution: Execution | None = None
        self._sources: list[tuple[str, Any]] = []  # modules running rewritten for `.source` paths (see use_sources)
        self._scans: dict = {}

    def use_sources(self) -> None:
        """Run rewritten the forwards whose operations the graph reads (``h.0.attn.source.attn_weights``) until
        :meth:`release_sources`; ``ValueError`` for a path that names no module of this model."""
        for node in self.graph.nodes:
            if node.op in ("module_output", "module_inputs") and isinstance(node.target, str) and \
                    SOURCE_MARK in node.target:
                try:
                    use_source(self, node.target)
                except (AttributeError, KeyError, TypeError) as error:
                    raise ValueError(f"node %{node.index} reads the operation {node.target!r}, which this model's "
                                     f"forwards do not have ({error}); refused") from None

    def release_sources(self) -> None:
        release_sources(self)

    def _detach(self, execution: Execution | None) -> None:
        if execution is None:
            return
        self.execution = execution
        for node in self.graph.nodes:
            if (node.saved or node.index in self.keep) and execution.state[node.index] == DONE:
                proxy = Proxy(node, None)
                object.__setattr__(proxy, "_value", execution.values[node.index])
                self.saved[node.index] = proxy

    def saved_proxies(self, index: int) -> list[Proxy]:
        return [self.saved[index]] if index in self.saved else []


class TokenRelay:
    """The streamer a served generation gets when its client passed one: each ``put`` is told to the client as a
    ``tokens`` status (``ids``: the token ids, one list per row; ``trace``: which trace of the request), where the
    client's own streamer receives them."""

    def __init__(self, on_status: Callable[[dict], None], trace: int):
        self.on_status = on_status
        self.trace = trace

    def put(self, value: torch.Tensor) -> None:
        self.on_status({"status": "tokens", "trace": self.trace, "ids": value.reshape(value.shape[0] if value.dim()
                                                                                     else 1, -1).tolist()})

    def end(self) -> None:
        pass


class Deadline:
    """An observer that ends a run (``TimeoutError``) once it has taken longer than ``seconds``."""

    def __init__(self, seconds: float, on_status: Callable[[dict], None] | None = None):
        self.seconds = seconds
        self.end = time.monotonic() + seconds
        self.on_status = on_status

    def graph_built(self, tracer: Any) -> None: ...

    def node_status(self, index: int, status: int) -> None:
        if time.monotonic() > self.end:
            raise TimeoutError(f"the request ran longer than the server's limit of {self.seconds:g} s per request; "
                               "ask for fewer steps or a shorter input")

    def step_started(self, step: int) -> None:
        self.node_status(-1, 0)
        if self.on_status is not None:
            self.on_status({"status": "step", "step": step})

    def run_finished(self, tracer: Any, execution: Any, error: BaseException | None) -> None: ...


# ------------------------------------------------------------------------------------------- client side
def encode_request(tracers: list, bridges: list[dict] | None = None, keep: list[list[int]] | None = None) -> bytes:
    """The request that runs ``tracers`` (one trace, or a session's traces in order) on the server.

    A ``streamer=`` (the inspector's token stream, or the user's) does not travel: the request asks for the
    tokens (``stream``), the server relays them as ``tokens`` statuses while it generates (:class:`TokenRelay`),
    and the client hands them to the streamer here.
    ``bridges`` gives each trace's bridge nodes their values when the earlier trace ran elsewhere (a plain
    ``Session`` that runs trace by trace); ``keep`` the nodes whose values must come back although unsaved.
    """
    tensors = TensorWriter()
    traces = []
    for position, tracer in enumerate(tracers):
        given = (bridges or [{}] * len(tracers))[position]
        traces.append({
            "graph": serialize.dumps(tracer.graph, tensors),
            "invokes": encode_inputs(tracer.invokes, tensors),
            "options": encode_value(_travelling_options(tracer.run_options), tensors),
            "grad": bool(tracer.needs_grad),
            "bridges": [[key[0], key[1], proxy.node.index] for key, proxy in tracer._bridges.items()
                        if proxy.node.index not in given],
            "given": [[index, encode_value(value, tensors)] for index, value in given.items()],
            "keep": list((keep or [[]] * len(tracers))[position]),
        })
    return pack({"version": REQUEST_VERSION, "traces": traces}, tensors.blob())


class TraceAnswer:
    """One trace's part of an answer: what ``run_finished`` observers and ``tracer._detach`` read of an execution.

    Attributes:
        values: ``node index -> value`` for saved (and kept) nodes; as a list in ``values_list`` by position.
        state: the final status of every node (``DONE``, ``FREED``, ``SKIPPED``, ``PENDING``).
    """

    def __init__(self, graph: Graph, raw: dict, tensors: TensorReader):
        count = len(graph.nodes)
        self.graph = graph
        self.saved = {index: decode_result(value, tensors) for index, value in raw.get("values", [])}
        self.values = [self.saved.get(index) for index in range(count)]
        state = raw.get("state")
        self.state = list(state) if isinstance(state, list) and len(state) == count else [0] * count
        self.steps_run = set(raw.get("steps", []))
        self.status = raw.get("status")
        self.failed_at = None


def decode_answer(graphs: list[Graph], data: bytes, device: Any = None) -> tuple[list[TraceAnswer], str,
                                                                                  BaseException | None]:
    """The answer to :func:`encode_request`: each trace's values and statuses, what it printed, its error."""
    header, blob = unpack(data)
    tensors = TensorReader(blob, device)
    raw = header.get("traces", [])
    answers = [TraceAnswer(graph, part, tensors) for graph, part in zip(graphs, raw)]
    error = decode_error(header["error"]) if "error" in header else None
    return answers, str(header.get("printed", "")), error


# ------------------------------------------------------------------------------------------- server side
def decode_request(model: Any, header: dict, blob: bytes,
                   served: list[tuple[ServedTrace, dict]] | None = None) -> list[tuple[ServedTrace, dict]]:
    """The traces of a request, rebuilt and checked against ``model``; ``ValueError`` for anything refused.

    ``served`` receives each trace as it is rebuilt (so a caller can release what a trace installed when a
    later one is refused)."""
    if header.get("version") != REQUEST_VERSION or not isinstance(header.get("traces"), list) or \
            not header["traces"]:
        raise ValueError(f"a request holds a version ({REQUEST_VERSION}) and a non-empty list of traces; refused")
    tensors = TensorReader(blob)
    served = [] if served is None else served
    for raw in header["traces"]:
        if not isinstance(raw, dict):
            raise ValueError("a trace is a JSON object; refused")
        graph = serialize.loads(raw.get("graph"), tensors)
        options = decode_value(raw.get("options", {"dict": []}), tensors)
        if not isinstance(options, dict) or not all(isinstance(key, str) for key in options):
            raise ValueError("run options must be a dict with string keys; refused")
        bridges = {}
        for item in raw.get("bridges", []):
            if not (isinstance(item, list) and len(item) == 3 and all(isinstance(part, int) for part in item)):
                raise ValueError("a bridge is [trace, node, bridge node]; refused")
            if not (0 <= item[2] < len(graph.nodes) and graph.nodes[item[2]].op == "bridge" and
                    0 <= item[0] < len(served)):
                raise ValueError(f"bridge {item} does not name an earlier trace and a bridge node; refused")
            bridges[(item[0], item[1])] = item[2]
        given = {}
        for item in raw.get("given", []):
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) and
                    0 <= item[0] < len(graph.nodes) and graph.nodes[item[0]].op == "bridge"):
                raise ValueError("a given value is [bridge node, value]; refused")
            given[item[0]] = decode_value(item[1], tensors)
        keep = raw.get("keep", [])
        if not isinstance(keep, list) or not all(isinstance(index, int) and 0 <= index < len(graph.nodes)
                                                 for index in keep):
            raise ValueError("keep lists node indices; refused")
        trace = ServedTrace(model, graph, decode_inputs(raw.get("invokes"), tensors), options,
                            raw.get("grad") is True, bridges, keep)
        served.append((trace, given))
        trace.use_sources()  # before the paths are checked: `.source` paths exist while installed
        check_paths(model, graph)
    return served


def check_paths(model: Any, graph: Graph) -> None:
    """Every module path and parameter the graph names exists in this model (else ``ValueError`` naming it)."""
    for node in graph.nodes:
        if isinstance(node.target, ParameterValue):
            try:
                module = model._submodule(node.target.path)
            except (KeyError, AttributeError):
                module = None
            if module is None or parameter_kind(module, node.target.name) != node.target.kind:
                raise ValueError(f"node %{node.index} names the {node.target.kind} {node.target.__name__!r}, which "
                                 "this model does not have; refused")
        if node.op in ("module_output", "module_inputs", "apply_module"):
            try:
                model._submodule(node.target)
            except (KeyError, AttributeError):
                raise ValueError(f"node %{node.index} names the module {node.target!r}, which this model does not "
                                 "have; refused") from None


def run_request(model: Any, served: list[tuple[ServedTrace, dict]], observer: Any = None) -> None:
    """Run the traces: one with ``run_trace``, several as a session (the local code either way)."""
    for trace, _ in served:
        if observer is not None:
            trace.observers.append(observer)
    if len(served) == 1:
        trace, given = served[0]
        run_trace(trace, given, frozenset(trace.keep))
        return
    session = Session()
    for trace, _ in served:
        session.record(trace)
        trace.session = session
    session.run()


def execute(model: Any, header: dict, blob: bytes, seconds: float = 60.0,
            on_status: Callable[[dict], None] | None = None, max_bytes: int = 1 << 30) -> bytes:
    """Decode, check and run a request; the answer (results, or the error with values saved before it).

    ``on_status`` is told each generation step, and the tokens of a generation whose client streams them."""
    printed = io.StringIO()
    served: list[tuple[ServedTrace, dict]] = []
    error: BaseException | None = None
    try:
        served = decode_request(model, header, blob, served)
        for position, (trace, _) in enumerate(served):
            if trace.run_options.pop("stream", None) is True and on_status is not None:
                trace.run_options["streamer"] = TokenRelay(on_status, position)
        with contextlib.redirect_stdout(printed):
            run_request(model, served, Deadline(seconds, on_status))
    except Exception as exception:  # the client raises it again, with its type and the user's line
        error = exception
    finally:
        for trace, _ in served:
            trace.release_sources()
    answer = encode_answer([trace for trace, _ in served], printed.getvalue(), error)
    if len(answer) > max_bytes:
        return encode_answer([], printed.getvalue(), ValueError(
            f"the saved values take {len(answer)} bytes, over the server's limit of {max_bytes} bytes per answer; "
            "save fewer or smaller values (e.g. one position: `x[:, -1].save()`)"))
    return answer


def encode_answer(traces: list[ServedTrace], printed: str, error: BaseException | None) -> bytes:
    tensors = TensorWriter()
    results = []
    for trace in traces:
        execution = trace.execution
        results.append({
            "values": [[index, encode_result(proxy._value, tensors)] for index, proxy in trace.saved.items()],
            "state": list(execution.state) if execution is not None else None,
            "steps": sorted(execution.steps_run) if execution is not None else [],
            "status": trace.status,
        })
    header: dict = {"traces": results, "printed": printed}
    if error is not None:
        header["error"] = encode_error(error)
    return pack(header, tensors.blob())
