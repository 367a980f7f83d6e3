"""Traces in several threads, and models made by ``torch.compile``.

Threads meet inside the model's forward: a ``Rendezvous`` module waits until every thread has reached it, so the
runs overlap for certain (the fake shape scan passes through it without waiting).
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict

import pytest
import torch
from torch._subclasses.fake_tensor import is_fake

from conftest import hook_count, make_tiny, weights
from nnsight_magic import NNsight


class Rendezvous(torch.nn.Module):
    """Identity that blocks until ``parties`` real forward passes are inside it at once."""

    def __init__(self, parties: int):
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_fake(x) and x.device.type != "meta":
            self.barrier.wait()
        return x


def meeting_model(parties: int = 2) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(OrderedDict(layer1=torch.nn.Linear(5, 10), meet=Rendezvous(parties),
                                           layer2=torch.nn.Linear(10, 2)))


def in_threads(*jobs):
    """Run each job in its own thread; return their results, re-raising the first error."""
    results, errors = [None] * len(jobs), []

    def work(position, job):
        try:
            results[position] = job()
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            errors.append(error)
            for each in jobs:
                barrier = getattr(each, "barrier", None)
                if barrier is not None:
                    barrier.abort()

    threads = [threading.Thread(target=work, args=(position, job)) for position, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("validate", [True, False])
def test_two_threads_tracing_one_model_each_get_their_own_values(validate):
    module = meeting_model()
    net = NNsight(module)
    a, b = torch.rand(2, 5), torch.rand(3, 5)

    def trace(x, scale):
        def job():
            with net.trace(x, validate=validate):
                h = net.layer1.output.save()
                net.layer2.input = net.layer2.input * scale
                out = net.output.save()
            return h.value, out.value
        return job

    (h_a, out_a), (h_b, out_b) = in_threads(trace(a, 2.0), trace(b, -1.0))
    with torch.no_grad():
        assert torch.equal(h_a, module.layer1(a)) and torch.equal(h_b, module.layer1(b))
        assert torch.equal(out_a, module.layer2(module.layer1(a) * 2.0))
        assert torch.equal(out_b, module.layer2(module.layer1(b) * -1.0))
    assert hook_count(module) == 0


class Gate(torch.nn.Module):
    """Identity that holds the real forward pass of the thread named ``held`` until ``release`` is set."""

    def __init__(self, held: str):
        super().__init__()
        self.held, self.arrived, self.release = held, threading.Event(), threading.Event()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if threading.current_thread().name == self.held and not is_fake(x):
            self.arrived.set()
            self.release.wait(timeout=20)
        return x


def test_a_plain_forward_in_another_thread_is_never_touched_by_a_trace():
    torch.manual_seed(0)
    module = torch.nn.Sequential(OrderedDict(gate=Gate("traced"), layer1=torch.nn.Linear(5, 10),
                                             layer2=torch.nn.Linear(10, 2)))
    net = NNsight(module)
    x = torch.rand(2, 5)
    before = weights(module)
    results = {}

    def traced():
        with net.trace(x):
            net.layer1.output[:] = 0
            edited = net.output.save()
        results["edited"] = edited.value

    tracing = threading.Thread(target=traced, name="traced")
    tracing.start()
    assert module.gate.arrived.wait(timeout=20)   # the trace's hooks are on, and its run waits at the gate
    with torch.no_grad():
        untouched = module(x)               # a plain forward while the trace runs
    module.gate.release.set()
    tracing.join(timeout=20)
    with torch.no_grad():
        assert torch.equal(untouched, module.layer2(module.layer1(x)))
        assert torch.equal(results["edited"], module.layer2(torch.zeros(2, 10)))
    assert hook_count(module) == 0 and all(torch.equal(before[k], v) for k, v in weights(module).items())


def test_each_thread_builds_its_own_graph():
    net = NNsight(make_tiny())
    x = torch.rand(3, 5)
    opened, release = threading.Event(), threading.Event()

    def slow():
        with net.trace(x) as tracer:
            net.layer1.output.save()
            opened.set()
            release.wait(timeout=20)
        return len(tracer.graph.nodes)

    def quick():
        opened.wait(timeout=20)
        try:
            with net.trace(x) as tracer:       # the other thread's trace is still open: not nested, not shared
                net.layer2.output.save()
                net.output.save()
            return len(tracer.graph.nodes)
        finally:
            release.set()

    assert in_threads(slow, quick) == [1, 2]


def test_a_compiled_model_is_traced_through_its_original_module():
    module = make_tiny()
    x = torch.rand(3, 5)
    with pytest.warns(UserWarning, match="compiled with torch.compile; traces run its original module"):
        net = NNsight(torch.compile(module, backend="eager"))
    with net.trace(x):
        h = net.layer1.output.save()
        net.layer2.input = net.layer2.input + 1
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(h.value, module.layer1(x))
        assert torch.equal(out.value, module.layer2(module.layer1(x) + 1))
    assert hook_count(module) == 0


def test_a_compiled_child_is_refused_before_the_model_runs():
    module = make_tiny()
    module.layer1 = torch.compile(module.layer1, backend="eager")
    net = NNsight(module)
    x = torch.rand(3, 5)
    with net.trace(x):
        kept = net.layer1.output.save()         # the wrapper's own hooks fire: it is an ordinary module
    with torch.no_grad():
        assert torch.equal(kept.value, module.layer1._orig_mod(x))
    with pytest.raises(RuntimeError, match=r"test_threads_and_compiled.py:\d+ .*`layer1` is compiled \(torch.compile\), which contains "
                                           r"`layer1._orig_mod`.*compiled._orig_mod"):
        with net.trace(x):
            net.layer1._orig_mod.output.save()
    assert hook_count(module) == 0


def test_a_module_compiled_in_place_is_refused():
    module = make_tiny()
    module.layer2.compile(backend="eager")
    net = NNsight(module)
    with pytest.raises(RuntimeError, match=r"`layer2` is compiled \(torch.compile\): hooks cannot run"):
        with net.trace(torch.rand(3, 5)):
            net.layer2.output[:] = 0
    assert hook_count(module) == 0
    with net.trace(torch.rand(3, 5)):           # the rest of the model still traces
        h = net.layer1.output.save()
    assert h.value.shape == (3, 10)


def test_threads_scanning_at_once_each_get_shapes():
    nets = [NNsight(make_tiny()) for _ in range(2)]

    def job(net):
        def run():
            shapes = []
            with warnings.catch_warnings():
                warnings.simplefilter("error")          # "shapes are unavailable" would be a failed scan
                for rows in range(1, 30):
                    x = torch.rand(rows, 5)
                    with net.trace(x):
                        out = net.output.save()
                    shapes.append(out.shape)
                    with torch.no_grad():
                        assert torch.equal(out.value, net._module(x))
            return shapes
        return run

    for shapes in in_threads(*(job(net) for net in nets)):
        assert shapes == [torch.Size([rows, 2]) for rows in range(1, 30)]
