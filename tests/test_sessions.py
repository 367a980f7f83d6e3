"""Sessions: traces recorded, run as one unit at the end, passing values along (the Bridge)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from nnsight_magic import NNsight

from conftest import hook_count, make_tiny


def test_a_later_trace_uses_a_value_of_an_earlier_one(net, tiny):
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with net.session() as session:
        with net.trace(a):
            clean = net.layer1.output.save()
        with net.trace(b):
            net.layer1.output[:] = clean
            patched = net.output.save()
        with pytest.raises(ValueError, match="no value yet"):
            patched.value          # nothing has run inside the session block
    assert session.status == "done"
    with torch.no_grad():
        assert torch.equal(clean.value, tiny.layer1(a))
        assert torch.equal(patched.value, tiny.layer2(tiny.layer1(a)))


def test_traces_run_in_order_at_the_end_of_the_session(net, tiny):
    order = []
    with net.session():
        for index in range(3):
            with net.trace(torch.rand(1, 5)) as tracer:
                tracer.apply(order.append, index)
        assert order == []
    assert order == [0, 1, 2]


def test_python_loops_around_traces_with_a_running_value(net, tiny):
    x = torch.rand(1, 5)
    with net.session():
        with net.trace(x):
            hidden = net.layer1.output.save()
        outputs = []
        for scale in (1.0, 2.0, 3.0):
            with net.trace(x):
                net.layer1.output[:] = hidden * scale
                outputs.append(net.output.save())
    with torch.no_grad():
        h = tiny.layer1(x)
        for scale, output in zip((1.0, 2.0, 3.0), outputs):
            assert torch.equal(output.value, tiny.layer2(h * scale))


def test_an_accumulator_across_invokes_and_traces(net, tiny):
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with net.session():
        with net.trace() as tracer:
            sums = tracer.list().save()
            with tracer.invoke(a):
                sums.append(net.output.sum())
            with tracer.invoke(b):
                sums.append(net.output.sum())
        with net.trace(a):
            sums.append(net.layer1.output.sum())
    with torch.no_grad():
        batch = tiny(torch.cat([a, b]))
        expected = [batch[:1].sum(), batch[1:].sum(), tiny.layer1(a).sum()]
    assert [float(value) for value in sums.value] == [float(value) for value in expected]


def test_update_carries_a_running_total_across_traces(net, tiny):
    x = torch.rand(1, 5)
    with net.session():
        with net.trace(x):
            total = net.output.sum().save()
        for step in range(3):
            with net.trace(x):
                total.update(total + step)
    with torch.no_grad():
        assert torch.equal(total.value, tiny(x).sum() + 0 + 1 + 2)


def test_a_bridged_value_lives_exactly_until_its_last_reader(net, tiny):
    x = torch.rand(1, 5)
    refs = []
    with net.session() as session:
        with net.trace(x) as first:
            hidden = net.layer1.output * 2          # not saved: kept only for the traces that read it
            first.apply(lambda value: refs.append(weakref.ref(value)), hidden)
        with net.trace(x):
            net.layer1.output[:] = hidden
            one = net.output.save()
        with net.trace(x) as third:
            third.apply(lambda value: refs.append(sum(r() is not None for r in refs[:1])), hidden)
            net.layer1.output[:] = hidden + 1
            two = net.output.save()
    gc.collect()
    assert refs[1] == 1          # still alive while the third trace used it
    assert refs[0]() is None     # freed after its last reader
    assert session.values == {}
    with torch.no_grad():
        h = tiny.layer1(x) * 2
        assert torch.equal(one.value, tiny.layer2(h)) and torch.equal(two.value, tiny.layer2(h + 1))


def test_a_value_the_earlier_trace_never_computed_is_reported(net, tiny):
    x = torch.rand(1, 5)
    with pytest.raises(RuntimeError, match=r"layer2.output \(test_sessions.py:\d+\) from trace 0 was never computed"):
        with net.session():
            with net.trace(x) as tracer:
                tracer.stop()
                late = net.layer2.output
            with net.trace(x):
                net.layer1.output[:] = late.mean()
    assert hook_count(tiny) == 0


def test_an_unsaved_value_of_a_finished_trace_cannot_be_used_later(net):
    x = torch.rand(1, 5)
    with net.trace(x):
        hidden = net.layer1.output
    with pytest.raises(ValueError, match=r"was not saved.*call `.save\(\)`"):
        with net.trace(x):
            net.layer1.output[:] = hidden


def test_a_saved_value_of_a_finished_trace_is_just_a_value(net, tiny):
    x, y = torch.rand(1, 5), torch.rand(1, 5)
    with net.trace(x):
        hidden = net.layer1.output.save()
    with net.trace(y):
        net.layer1.output[:] = hidden
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, tiny(x))


def test_a_failing_trace_in_a_session_runs_nothing(net, tiny):
    x = torch.rand(1, 5)
    ran = []
    with pytest.raises(IndexError):
        with net.session() as session:
            with net.trace(x) as tracer:
                tracer.apply(ran.append, 1)
            with net.trace(x):
                net.layer1.output[:, 99] = 0
    assert ran == [] and session.status == "failed" and hook_count(tiny) == 0


def test_a_session_spans_several_models():
    first, second = NNsight(make_tiny()), NNsight(make_tiny())
    x = torch.rand(1, 5)
    with first.session():
        with first.trace(x):
            hidden = first.layer1.output.save()
        with second.trace(x):
            second.layer1.output[:] = hidden * 0
            out = second.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, second.layer2._module(torch.zeros(1, 10)))
