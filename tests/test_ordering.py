"""Ordering: reads in any order, edits in cell order, and OutOfOrderError before the model runs."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from nnsight_magic import OutOfOrderError

from conftest import hook_count, weights


def test_reads_may_come_in_any_order(net, tiny, x):
    with net.trace(x):
        second = net.layer2.output.save()
        first = net.layer1.output.save()
        model_input = net.input.save()
    with torch.no_grad():
        assert torch.equal(first.value, tiny.layer1(x))
        assert torch.equal(second.value, tiny(x))
    assert model_input.value is x


def test_a_read_written_before_an_earlier_edit_still_sees_the_edit(net, tiny, x):
    """Reading layer2 'before' zeroing layer1 in the code still sees the model's real layer2 output."""
    with net.trace(x):
        second = net.layer2.output.save()
        net.layer1.output[:] = 0
    with torch.no_grad():
        assert torch.equal(second.value, tiny.layer2(torch.zeros(3, 10)))


def test_clone_before_an_in_place_edit_keeps_the_old_value(net, tiny, x):
    with net.trace(x):
        h = net.layer1.output
        before = h.clone().save()
        h[:] = 0
        after = net.layer1.output.clone().save()
    with torch.no_grad():
        assert torch.equal(before.value, tiny.layer1(x))
    assert torch.equal(after.value, torch.zeros(3, 10))


def test_a_reader_of_a_view_waits_like_a_reader_of_the_value(net, tiny, x):
    """`row` is a view of h: summing it before the edit (in cell order) sees the unedited numbers."""
    with net.trace(x):
        h = net.layer1.output
        row = h[0]
        total = row.sum().save()
        h[:] = 1
        total_after = h[0].sum().save()
    with torch.no_grad():
        assert torch.equal(total.value, tiny.layer1(x)[0].sum())
    assert total_after.value == 10


def test_a_summary_taken_before_an_edit_combines_with_later_values(net, tiny, x):
    """`h.sum()` runs before the edit (cell order); `d` adds it to layer2's output, which sees the edit."""
    with net.trace(x):
        h = net.layer1.output
        d = (net.layer2.output.sum() + h.sum()).save()
        h[:] = 0
    with torch.no_grad():
        expected = tiny.layer2(torch.zeros(3, 10)).sum() + tiny.layer1(x).sum()
    assert torch.equal(d.value, expected)


def test_an_edit_cannot_wait_for_a_reader_that_needs_a_later_module(net, x):
    """`d` reads h itself and layer2: zeroing h must wait for d, which is only possible after layer1 ran."""
    with pytest.raises(OutOfOrderError, match=r"changes layer1.output, but it needs layer2.output"):
        with net.trace(x):
            h = net.layer1.output
            (h * net.layer2.output.mean()).save()
            h[:] = 0


def test_out_of_order_error_names_both_lines_before_running(net, tiny, x):
    before = weights(tiny)
    real_calls = []
    handle = tiny.layer1.register_forward_hook(
        lambda module, args, output: real_calls.append(1) if not isinstance(output, FakeTensor) else None)
    line = inspect.currentframe().f_lineno + 4
    with pytest.raises(OutOfOrderError) as raised:
        with net.trace(x):
            later = net.layer2.output.mean()
            net.layer1.output[:] = later
    handle.remove()
    message = str(raised.value)
    assert f"test_ordering.py:{line} `net.layer1.output[:] = later`" in message
    assert f"layer2.output (test_ordering.py:{line - 1})" in message and "changes layer1.output" in message
    assert real_calls == []  # the model never ran on real tensors (the shape scan runs it on fake ones)
    assert hook_count(tiny) == 0 and all(torch.equal(before[k], v) for k, v in weights(tiny).items())


def test_assigning_a_later_value_is_out_of_order(net, x):
    with pytest.raises(OutOfOrderError, match="changes layer1.output"):
        with net.trace(x):
            net.layer1.output = net.layer2.output.repeat(1, 5)


def test_without_shapes_the_order_is_checked_as_hooks_fire(net, tiny, x):
    with net.trace(x) as earlier:
        kept = net.layer1.output.save()
    with pytest.raises(OutOfOrderError, match="changes layer1.output"):
        with net.trace(x, validate=False):
            net.layer1.output[:] = net.layer2.output.mean()
    assert hook_count(tiny) == 0
    with torch.no_grad():
        assert torch.equal(kept.value, tiny.layer1(x))
    assert earlier.status == "done"


def test_editing_an_input_uses_values_produced_before_the_call(net, tiny, x):
    with net.trace(x):
        net.layer2.input[:, 0] = net.layer1.output[:, 1]
        out = net.output.save()
    with torch.no_grad():
        h = tiny.layer1(x)
        h[:, 0] = h[:, 1]
        assert torch.equal(out.value, tiny.layer2(h))


def test_editing_an_input_with_its_own_output_is_out_of_order(net, x):
    with pytest.raises(OutOfOrderError, match="changes layer2.inputs"):
        with net.trace(x):
            net.layer2.input[:] = net.layer2.output.sum()


def test_ties_run_in_creation_order(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        log = tracer.list().save()
        log.append("first")
        h.sum()
        log.append("second")
        log.append("third")
    assert log.value == ["first", "second", "third"]


def test_edits_of_clones_have_no_order_constraint(net, tiny, x):
    with net.trace(x):
        copy = net.layer1.output.clone()
        copy[:] = net.layer2.output.mean()
        kept = copy.save()
    with torch.no_grad():
        assert torch.equal(kept.value, torch.full((3, 10), tiny(x).mean().item()))
