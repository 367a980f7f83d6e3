"""Memory: values are freed as soon as their last reader ran; after a run only saved values remain."""

from __future__ import annotations

import gc
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor

from nnsight_magic import NNsight
from nnsight_magic.tracing.execution import DONE, FREED

from conftest import make_tiny


class Recorder:
    """An observer that keeps the finished execution and every status change."""

    def __init__(self):
        self.changes: list[tuple[int, int]] = []
        self.execution = None

    def graph_built(self, tracer):
        pass

    def node_status(self, index, status):
        self.changes.append((index, status))

    def step_started(self, step):
        pass

    def run_finished(self, tracer, execution, error):
        self.execution = execution


def test_after_a_run_only_saved_nodes_hold_values(net, x):
    recorder = Recorder()
    with net.trace(x) as tracer:
        tracer.observers.append(recorder)
        h = net.layer1.output
        doubled = (h * 2).save()
        (h + 1).sum()
        net.layer2.output[:, 0] = h.mean()
        out = net.output.save()
    execution = recorder.execution
    holding = [index for index, value in enumerate(execution.values) if value is not None]
    assert holding == [doubled.node.index, out.node.index]
    assert all(execution.state[index] in (DONE, FREED) for index in range(len(execution.values)))


def test_a_value_is_freed_as_soon_as_its_last_reader_ran(net, x):
    recorder = Recorder()
    with net.trace(x) as tracer:
        tracer.observers.append(recorder)
        h = net.layer1.output
        a = h + 1
        b = a * 2
        c = b.sum().save()
        net.layer2.output.save()
    changes = recorder.changes
    freed_a = changes.index((a.node.index, FREED))
    done_b = changes.index((b.node.index, DONE))
    done_layer2 = next(position for position, (index, status) in enumerate(changes)
                       if index == 4 and status == DONE)
    assert done_b < freed_a < done_layer2  # `a` is gone before the model even reaches layer2
    assert (c.node.index, FREED) not in changes


def test_saving_is_zero_copy(net, tiny, x):
    seen = []
    handle = tiny.layer1.register_forward_hook(lambda module, args, output: seen.append(output))
    with net.trace(x):
        h = net.layer1.output.save()
    handle.remove()
    real = [output for output in seen if not isinstance(output, FakeTensor)]  # the shape scan saw a fake one
    assert len(real) == 1 and h.value is real[0]


def test_nothing_keeps_the_model_the_tracer_or_unsaved_values_alive():
    module = make_tiny()
    net = NNsight(module)
    produced = []
    with net.trace(torch.rand(2, 5)) as tracer:
        h = net.layer1.output
        tracer.apply(lambda value: produced.append(weakref.ref(value)), h)
        kept = (h * 2).save()
    tracer_ref, module_ref, net_ref = weakref.ref(tracer), weakref.ref(module), weakref.ref(net)
    unsaved_ref = produced[0]
    del tracer, h
    gc.collect()
    assert unsaved_ref() is None and tracer_ref() is None
    value = kept.value
    del net, module
    gc.collect()
    assert net_ref() is None and module_ref() is None
    assert kept.value is value  # the saved value outlives everything else


def test_a_thousand_traces_leave_no_live_tensors_behind():
    net = NNsight(make_tiny())
    x = torch.rand(2, 5)

    def one_trace():
        with net.trace(x) as tracer:
            h = net.layer1.output
            h[:, 0] = 0
            (h.softmax(-1) * 2).sum()
            net.output.save()
        return tracer

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter, FakeTensor))

    for _ in range(20):  # warm the scan cache and the fake-tensor converter
        one_trace()
    before = live_tensors()
    for _ in range(1000):
        one_trace()
    assert live_tensors() == before


def test_a_failed_run_frees_its_values(net, x):
    produced = []

    def fail(value):
        raise ValueError("stop here")

    try:
        with net.trace(x) as tracer:
            h = net.layer1.output
            tracer.apply(lambda value: produced.append(weakref.ref(value)), h * 3)
            tracer.apply(fail, h)
    except ValueError:
        pass
    del tracer, h
    gc.collect()
    assert produced and produced[0]() is None
