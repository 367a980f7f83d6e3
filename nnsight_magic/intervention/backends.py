"""Who runs a built trace, and how a local run goes.

When a trace block ends, :func:`dispatch` hands the checked graph to one of:

* a scan (``model.scan``): nothing runs; the proxies keep their shapes;
* the open session: the trace is recorded and runs when the session does;
* the local backend, :func:`run_trace`: right now, in this process, on whatever device the model is on.

A local run turns autograd on only when the graph needs it, puts hooks on the touched modules for the duration
of one model run (they are removed on success, on error and on ``KeyboardInterrupt``), binds every saved value
to its proxy even when the run fails halfway, and then reports anything the trace asked for that the model
never produced — a silent no-op is never the result.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from ..errors import OutOfOrderError, annotate, is_annotated, warn_at_user_line
from ..tracing.execution import EarlyStop, Execution
from ..tracing.node import Node, module_label
from .interleaver import Interleaver, ModelExecution
from .source_install import split_path
from .tracer import DONE, FAILED, RECORDED, RUNNING, Tracer


class TraceObserver(Protocol):
    """What a live view (the inspector widget) hears about one trace; add it to ``tracer.observers``.

    ``graph_built`` comes once the graph is built and checked (every node has its fake value), before the model
    runs; ``node_status`` for every change of a node's status while it runs (``PENDING``, ``DONE``, ``FREED``,
    ``SKIPPED`` from :mod:`nnsight_magic.tracing.execution`); ``step_started`` at each generation step;
    ``run_finished`` at the end, with the execution state (saved values in ``execution.values``) and the error,
    if the run failed. A recorded (session) or scanned trace hears only ``graph_built``.
    """

    def graph_built(self, tracer: Tracer) -> None: ...

    def node_status(self, index: int, status: int) -> None: ...

    def step_started(self, step: int) -> None: ...

    def run_finished(self, tracer: Tracer, execution: Execution, error: BaseException | None) -> None: ...


def dispatch(tracer: Tracer) -> None:
    """Run, record or keep the finished graph of ``tracer`` (see the module docstring)."""
    for observer in tracer.observers:
        observer.graph_built(tracer)
    if tracer.scan_only:
        tracer.status = DONE
        tracer._detach(None)
        return
    if tracer.session is not None:
        tracer.session.record(tracer)
        tracer.status = RECORDED
        return
    run_trace(tracer)


def run_trace(tracer: Tracer, bridges: dict[int, Any] | None = None, keep: frozenset[int] = frozenset(),
              on_update: Callable[[Tracer, Node, Any], None] | None = None) -> Execution:
    """Run the model once with ``tracer``'s graph interleaved; return the finished execution state.

    Args:
        bridges: values for the graph's ``bridge`` nodes (from earlier traces of a session).
        keep: nodes whose values must survive the run although nothing in this graph reads them any more
            (values that later traces of a session read).
        on_update: told when ``proxy.update(value)`` changes a bridged value (the session keeps it).
    """
    model = tracer.model
    elsewhere = getattr(type(model), "_run_elsewhere", None)
    if elsewhere is not None:  # a model that lives on a server (nnsight_magic.remote) runs the graph there
        return elsewhere(model, tracer, bridges, keep, on_update)
    prepared, groups = model._batch_inputs(tracer.invokes)
    observer = _fan_out(tracer.observers)
    execution = ModelExecution(tracer.graph, model._module, observer, align_devices=model._on_accelerator(),
                               keep=keep)
    if on_update is not None:
        execution.on_bridge_update = lambda node, value: on_update(tracer, node, value)
    tracer.status = RUNNING
    error: BaseException | None = None
    try:
        grad_mode = torch.enable_grad() if tracer.needs_grad else torch.no_grad()
        interleaver = Interleaver(execution, model._module, groups, prepared.batch_size, model._submodule,
                                  result_is_root_output=model._returns_root_output(tracer.run_options))
        with interleaver, grad_mode:
            try:
                for index, value in (bridges or {}).items():
                    execution.deliver(index, value)
                execution.start()
                execution.run_ready()
                try:
                    result = model._run(prepared, tracer.run_options)
                except Exception as failure:
                    raise blame_user_line(failure, tracer, interleaver)
                interleaver.deliver_result(result)
                nodes = tracer.graph.nodes
                for index in tracer.graph.entry_indices:
                    if nodes[index].op == "result":
                        execution.deliver(index, result)
                execution.run_ready()
            except EarlyStop:
                pass
            execution.finish()
        missing = execution.pending()
        if missing:
            raise never_produced(tracer, execution, missing)
        warn_unreached_steps(tracer, execution)
    except BaseException as exception:
        error = exception
        tracer.status = FAILED
        raise
    finally:
        tracer._detach(execution)
        for each in tracer.observers:
            each.run_finished(tracer, execution, error)
    tracer.status = DONE
    return execution


def blame_user_line(error: Exception, tracer: Tracer, interleaver: Interleaver) -> Exception:
    """An error the model's own forward raised, named after the user's line that caused it (same object).

    Errors of the trace's own nodes already name their line. Otherwise the cause is the replacement the model
    received last (a whole-output assignment of the wrong shape or dtype), or, without one, the trace's input.
    """
    if is_annotated(error) or isinstance(error, OutOfOrderError):
        return error
    nodes = tracer.graph.nodes
    if interleaver.last_replacement is not None:
        swap = nodes[interleaver.last_replacement]
        annotate(error, swap)
        error.add_note(f"raised inside the model's forward after {swap.location} replaced "
                       f"{swap.args[0].describe()}: check the replacement's shape and dtype against the original's")
        return error
    origin = getattr(tracer, "origin", None)  # a trace rebuilt on a server has no user line of its own
    if origin is None or not origin.lineno:
        return error
    annotate(error, origin)
    error.add_note("raised inside the model's forward on this trace's input: check the input's type and shape")
    return error


def never_produced(tracer: Tracer, execution: Execution, missing: list[Node]) -> RuntimeError:
    """The error for nodes that never ran: name the values the model never produced, and why."""
    causes: list[Node] = []
    for node in missing:
        if node.is_entry and node.op != "iteration" and node not in causes:
            causes.append(node)
    if not causes:
        causes = missing[:1]
    steps = sorted(execution.steps_run) or [0]
    lines = []
    for node in causes[:5]:
        if node.section is not None:
            section = tracer.graph.sections[node.section]
            reason = (f"it belongs to tracer.iter{section.steps}, but the model ran only {len(steps)} "
                      f"step{'s' if len(steps) != 1 else ''} (0 to {steps[-1]})")
        elif node.op in ("module_output", "module_inputs") and split_path(node.target) is not None \
                and not node.meta.get("call", 0):  # an operation of `.source` whose line the forward never reached
            owner = module_label(split_path(node.target)[0])
            reason = (f"the forward of {owner} never reached this operation's line (a branch not taken?); "
                      f"`print({owner}.source)` shows where each operation is")
        elif node.op in ("module_output", "module_inputs"):
            call, step = node.meta.get("call", 0), node.meta.get("step", 0)
            reason = (f"the model did not call this module {'a ' + _ordinal(call + 1) + ' time' if call else ''}"
                      f"{' in step ' + str(step) if step else ''}" if call or step else
                      "the model never called this module with this input")
        elif node.op == "grad":
            reason = f"{node.args[0].describe()} is not part of what the `.backward()` differentiated"
        else:
            reason = "a value it waits for never arrived"
        lines.append(f"{node.location} `{node.source_line}`: {node.describe()} was never produced: {reason}")
    waiting = [node for node in missing if node not in causes and node.op != "iteration"]
    if waiting:
        saved = sum(1 for node in waiting if node.saved)
        lines.append(f"({len(waiting)} operation{'s' if len(waiting) != 1 else ''} waiting on "
                     f"{'it' if len(causes) == 1 else 'them'} did not run{f', {saved} of them saved' if saved else ''})")
    # the first cause leads, so the message starts with the user's line like every other error
    rest = "".join(f"\n  {line}" for line in lines[1:])
    return RuntimeError(f"{lines[0]} (the model run finished without it){rest}")


def warn_unreached_steps(tracer: Tracer, execution: Execution) -> None:
    """Warn at its line about an iteration block whose named steps the run partly never reached.

    A block that ran at some of its steps has values (from its last step that ran), so this is a warning, not an
    error: ``tracer.iter[[0, 3]]`` when generation met an end-of-text token at step 1. Steps past
    ``max_new_tokens`` were already refused or warned about while the block was built.
    """
    if not tracer.graph.sections or not execution.steps_run:
        return
    ran = execution.steps_run
    limit = getattr(tracer, "max_new_tokens", None)
    for section in tracer.graph.sections:
        last = section.steps.last
        if last is None:
            continue
        named = [step for step in range(section.steps.first, last + 1) if section.steps.contains(step)]
        unreached = [step for step in named if step not in ran and (limit is None or step < limit)]
        if not unreached or len(unreached) == len(named):
            continue  # nothing missing, or nothing ran at all (then its nodes never ran: an error above)
        node = tracer.graph.nodes[section.nodes[0]]
        warn_at_user_line(f"tracer.iter{section.steps} names step{'s' if len(unreached) > 1 else ''} "
                          f"{', '.join(map(str, unreached))}, but the run ended after step {max(ran)} (generation "
                          "stopped early, e.g. at an end-of-text token): the block ran only at steps "
                          f"{', '.join(str(step) for step in named if step in ran)}",
                          location=(node.filename, node.lineno))


def _ordinal(number: int) -> str:
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


class _Observers:
    """Several observers heard as one."""

    def __init__(self, observers: list[Any]):
        self.observers = observers

    def node_status(self, index: int, status: int) -> None:
        for observer in self.observers:
            observer.node_status(index, status)

    def step_started(self, step: int) -> None:
        for observer in self.observers:
            observer.step_started(step)


def _fan_out(observers: list[Any]) -> Any:
    if not observers:
        return None
    return observers[0] if len(observers) == 1 else _Observers(observers)

