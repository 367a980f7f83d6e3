"""Early stop and conditional blocks, against eager ground truth."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from nnsight_magic.tracing.execution import FREED, SKIPPED

from conftest import hook_count
from test_memory import Recorder


def real_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda mod, args, output: None if isinstance(output, FakeTensor) else calls.append(1))
    return calls


# ------------------------------------------------------------------------------------------------ early stop
def test_stop_ends_the_forward_pass_once_earlier_nodes_ran(net, tiny, x):
    layer2_calls = real_calls(tiny.layer2)
    with net.trace(x) as tracer:
        h = net.layer1.output.save()
        doubled = (h * 2).save()
        tracer.stop()
        after = net.layer2.output.save()
    tiny.layer2._forward_hooks.clear()
    with torch.no_grad():
        assert torch.equal(h.value, tiny.layer1(x)) and torch.equal(doubled.value, tiny.layer1(x) * 2)
    assert layer2_calls == []
    with pytest.raises(ValueError, match="saved but never computed"):
        after.value
    assert hook_count(tiny) == 0


def test_nodes_after_a_stop_never_run_and_their_inputs_are_freed(net, x):
    produced = []
    with net.trace(x) as tracer:
        h = net.layer1.output
        tripled = h * 3
        tracer.apply(lambda value: produced.append(weakref.ref(value)), tripled)
        tracer.stop()
        late = (tripled + net.layer1.output).save()
    del tracer, tripled, h
    gc.collect()
    assert produced and produced[0]() is None
    with pytest.raises(ValueError):
        late.value


def test_a_stop_waits_for_reads_of_later_modules_written_before_it(net, tiny, x):
    with net.trace(x) as tracer:
        out = net.output.save()
        tracer.stop()
    with torch.no_grad():
        assert torch.equal(out.value, tiny(x))


def test_a_stop_inside_a_condition_that_is_never_taken_lets_the_model_finish(net, tiny, x):
    layer2_calls = real_calls(tiny.layer2)
    with net.trace(x) as tracer:
        h = net.layer1.output
        with tracer.cond(h.sum() > 1e9):
            tracer.stop()
        out = net.output.save()
    tiny.layer2._forward_hooks.clear()
    assert layer2_calls == [1]
    with torch.no_grad():
        assert torch.equal(out.value, tiny(x))


def test_a_stop_inside_a_condition_that_is_taken_stops(net, tiny, x):
    layer2_calls = real_calls(tiny.layer2)
    with net.trace(x) as tracer:
        h = net.layer1.output.save()
        with tracer.cond(h.sum() < 1e9):
            tracer.stop()
        net.output.save()
    tiny.layer2._forward_hooks.clear()
    assert layer2_calls == [] and h.value.shape == (3, 10)


# ------------------------------------------------------------------------------------------------ conditions
def test_a_true_condition_runs_its_block(net, tiny, x):
    with net.trace(x) as tracer:
        with tracer.cond(net.layer1.output.sum() > -1e9):
            net.layer1.output[:] = 1
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, tiny.layer2(torch.ones(3, 10)))


def test_a_false_condition_skips_its_block_and_runs_else(net, tiny, x):
    with net.trace(x) as tracer:
        condition = tracer.cond(net.layer1.output.sum() > 1e9)
        with condition:
            net.layer1.output[:] = 1
            never = net.layer1.output.clone().save()
        with condition.else_():
            net.layer1.output[:] = 2
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, tiny.layer2(torch.full((3, 10), 2.0)))
    with pytest.raises(ValueError, match="never computed"):
        never.value


@pytest.mark.parametrize("threshold, expected_layer", [(-1e9, 1.0), (1e9, 0.0)])
def test_a_tensor_valued_condition(net, tiny, x, threshold, expected_layer):
    with net.trace(x) as tracer:
        flag = net.layer1.output.max() > threshold
        with tracer.cond(flag):
            net.layer2.output[:] = 1
        out = net.output.save()
    with torch.no_grad():
        expected = torch.ones(3, 2) if expected_layer else tiny(x)
    assert torch.equal(out.value, expected)


def test_nested_and_dependent_conditions(net, tiny, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        with tracer.cond(h.sum() > -1e9):          # true
            h[:] = 1
            with tracer.cond(h[:, 0].sum() == 3):   # true, because of the edit just above
                net.layer2.output[:] = 3
            with tracer.cond(h[:, 0].sum() == 4):   # false
                net.layer2.output[:] = 4
        out = net.output.save()
    assert torch.equal(out.value, torch.full((3, 2), 3.0))


def test_an_assignment_in_a_branch_holds_after_it_only_if_the_branch_ran(net, tiny, x):
    for threshold, factor in ((1e9, 1.0), (-1e9, 5.0)):
        with net.trace(x) as tracer:
            with tracer.cond(net.layer1.output.sum() > threshold):
                net.layer1.output = net.layer1.output * 5
            seen = net.layer1.output.save()
        with torch.no_grad():
            assert torch.equal(seen.value, tiny.layer1(x) * factor)


def test_merge_gives_a_name_the_value_of_the_branch_that_ran(net, tiny, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        condition = tracer.cond(h.mean() > 1e9)
        with condition:
            big = h * 100
        with condition.else_():
            small = h / 100
        chosen = tracer.merge(condition, big, small).save()
    with torch.no_grad():
        assert torch.equal(chosen.value, tiny.layer1(x) / 100)


def test_a_skipped_branch_frees_what_only_it_used(net, x):
    recorder = Recorder()
    with net.trace(x) as tracer:
        tracer.observers.append(recorder)
        h = net.layer1.output
        only_for_branch = h * 2
        with tracer.cond(h.sum() > 1e9):
            in_branch = (only_for_branch + 1).save()
        net.layer2.output.save()
    changes = recorder.changes
    skipped = changes.index((in_branch.node.index, SKIPPED))
    freed = changes.index((only_for_branch.node.index, FREED))
    layer2_done = max(position for position, (index, status) in enumerate(changes)
                      if index == len(tracer.graph.nodes) - 1)
    assert skipped < freed < layer2_done


def test_using_a_value_from_a_branch_that_was_not_taken_names_both_lines(net, x):
    with pytest.raises(RuntimeError, match=r"test_stop_and_conditionals.py:\d+ `later = \(inside \+ 1\).save\(\)`"
                                           r".*not computed because its branch was not taken"):
        with net.trace(x) as tracer:
            with tracer.cond(net.layer1.output.sum() > 1e9):
                inside = net.layer1.output * 2
            later = (inside + 1).save()


def test_a_plain_python_condition_still_works(net, tiny, x):
    with net.trace(x) as tracer:
        with tracer.cond(True):
            net.layer2.output[:] = 7
        out = net.output.save()
    assert torch.equal(out.value, torch.full((3, 2), 7.0))
