"""Interleaving: hooks only where needed, always removed, values per call, replacements returned to the model."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from nnsight_magic import NNsight

from conftest import hook_count, weights, wraps_forward


class Recurrent(torch.nn.Module):
    """One module used three times per forward: calls are addressed by index."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cell = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        for _ in range(3):
            x = torch.tanh(self.cell(x))
        return self.head(x)


def hooked_modules(module: torch.nn.Module) -> list[str]:
    return [name for name, each in module.named_modules()
            if each._forward_hooks or each._forward_pre_hooks or each._forward_hooks_with_kwargs
            or wraps_forward(each)]


def test_hooks_sit_only_on_touched_modules_and_only_during_the_run():
    torch.manual_seed(0)
    module = torch.nn.Sequential(OrderedDict(a=torch.nn.Linear(4, 4), b=torch.nn.Linear(4, 4),
                                             c=torch.nn.Linear(4, 4)))
    net = NNsight(module)
    with net.trace(torch.rand(2, 4)) as tracer:
        net.b.output.save()
        net.c.input.save()
        during = tracer.apply(hooked_modules, module).save()
    assert during.value == ["b", "c"]
    assert hook_count(module) == 0


def test_hooks_are_removed_when_a_node_fails_and_saved_values_survive(net, tiny, x):
    before = weights(tiny)

    def explode(value):
        raise ValueError("boom")

    with pytest.raises(ValueError, match=r"test_interleaving.py:\d+ `tracer.apply\(explode, h\)`: boom"):
        with net.trace(x) as tracer:
            h = net.layer1.output.save()
            tracer.apply(explode, h)
    assert hook_count(tiny) == 0
    with torch.no_grad():
        assert torch.equal(h.value, tiny.layer1(x))  # computed before the failure: still there
    assert all(torch.equal(before[key], value) for key, value in weights(tiny).items())


def test_hooks_are_removed_on_keyboard_interrupt(net, tiny, x):
    def interrupt(value):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with net.trace(x) as tracer:
            tracer.apply(interrupt, net.layer1.output)
    assert hook_count(tiny) == 0


def test_an_error_inside_the_model_removes_hooks_and_keeps_its_type(net, tiny):
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied"):
        with net.trace(torch.rand(2, 7), validate=False):
            net.layer2.output.save()
    assert hook_count(tiny) == 0


def test_the_hook_returns_the_replacement_to_the_model(net, tiny, x):
    replacement = torch.ones(3, 10)
    with net.trace(x):
        net.layer1.output = replacement
        out = net.output.save()
        seen = net.layer1.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, tiny.layer2(replacement))
    assert seen.value is replacement


def test_the_models_own_output_can_be_replaced(net, x):
    with net.trace(x):
        net.output = net.output * 0 + 3
        out = net.output.save()
    assert torch.equal(out.value, torch.full((3, 2), 3.0))


def test_inputs_and_their_setters(net, tiny, x):
    with net.trace(x):
        args, kwargs = net.layer2.inputs[0], net.layer2.inputs[1]
        first = net.layer2.input.save()
        all_args = args.save()
        no_kwargs = kwargs.save()
        net.layer2.input = net.layer2.input * 2
        doubled = net.layer2.input.save()
        out = net.output.save()
    with torch.no_grad():
        h = tiny.layer1(x)
        assert torch.equal(first.value, h) and torch.equal(all_args.value[0], h) and no_kwargs.value == {}
        assert torch.equal(doubled.value, h * 2)
        assert torch.equal(out.value, tiny.layer2(h * 2))


def test_setting_inputs_as_a_pair(net, tiny, x):
    new_input = torch.rand(3, 10)
    with net.trace(x):
        net.layer2.inputs = ((new_input,), {})
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, tiny.layer2(new_input))


def test_a_module_called_several_times_is_addressed_by_call_index():
    module = Recurrent()
    net = NNsight(module)
    x = torch.rand(2, 4)
    seen = []
    handle = module.cell.register_forward_hook(lambda mod, args, output: seen.append(output.clone()))
    with torch.no_grad():
        expected = module(x)
    handle.remove()
    with net.trace(x):
        first = net.cell.output.save()
        second = net.cell.next().output.save()
        third = net.cell.next().output.save()
        net.cell.output[:] = 0               # the third call, zeroed
        out = net.output.save()
    assert torch.equal(first.value, seen[0]) and torch.equal(second.value, seen[1])
    assert torch.equal(third.value, torch.zeros(2, 4))
    with torch.no_grad():
        assert torch.equal(out.value, module.head(torch.tanh(torch.zeros(2, 4))))
    assert not torch.equal(out.value, expected)


def test_a_call_that_never_happens_is_reported_not_ignored():
    net = NNsight(Recurrent())
    with pytest.raises(RuntimeError, match=r"cell.output \(call 5\) was never produced: the model did not call "
                                           r"this module a 6th time"):
        with net.trace(torch.rand(2, 4), validate=False):
            net.cell.next(5).output.save()


def test_an_unused_module_is_reported():
    class Unused(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    net = NNsight(Unused())
    with pytest.raises(RuntimeError, match="unused.output was never produced: the model never called this module"):
        with net.trace(torch.rand(1, 2)):
            net.unused.output[:] = 0


def test_module_values_follow_the_model_onto_its_device(net, tiny, x):
    with net.trace(x):
        device = net.layer1.output.device
    assert device == torch.device("cpu") == net.device


def test_reading_the_models_output_needs_no_hook_on_the_model(net, tiny, x):
    with net.trace(x) as tracer:
        during = tracer.apply(hooked_modules, tiny).save()
        out = net.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, tiny(x))
    assert "" not in during.value


def test_a_module_value_nobody_reads_during_the_run_is_only_stored(net, tiny, x):
    with net.trace(x):
        kept = net.layer1.output.save()
        also = net.layer2.output.save()
    with torch.no_grad():
        assert torch.equal(kept.value, tiny.layer1(x)) and torch.equal(also.value, tiny(x))
