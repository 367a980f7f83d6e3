"""Invokes: several inputs in one forward pass, each seeing (and changing) only its own rows."""

from __future__ import annotations

import pytest
import torch

from nnsight_magic import NNsight

from conftest import hook_count


def batched_reference(tiny, inputs, edit=None):
    """The hand-batched ground truth: one forward over the concatenated inputs, with an optional layer1 hook."""
    handle = tiny.layer1.register_forward_hook(edit) if edit else None
    try:
        with torch.no_grad():
            return tiny(torch.cat(inputs))
    finally:
        if handle:
            handle.remove()


def test_each_invoke_sees_its_own_rows(net, tiny):
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with net.trace() as tracer:
        with tracer.invoke(a):
            first = net.layer1.output.save()
            first_out = net.output.save()
        with tracer.invoke(b):
            second = net.layer1.output.save()
            assert second.shape == (2, 10)   # known while building
        with tracer.invoke():
            everything = net.output.save()
    expected = batched_reference(tiny, [a, b])
    with torch.no_grad():
        assert torch.equal(first.value, tiny.layer1(torch.cat([a, b]))[:1])
        assert torch.equal(second.value, tiny.layer1(torch.cat([a, b]))[1:])
    assert torch.equal(first_out.value, expected[:1]) and torch.equal(everything.value, expected)


def test_invoke_values_are_views_of_the_batch_not_copies(net, tiny):
    seen = []
    handle = tiny.layer1.register_forward_hook(
        lambda module, args, output: seen.append(output) if type(output) is torch.Tensor else None)
    with net.trace() as tracer:
        for rows in (1, 2, 3):
            with tracer.invoke(torch.rand(rows, 5)):
                net.layer1.output.save()
        views = [proxy for proxy in tracer._values.values()]
    handle.remove()
    batch = seen[0]
    for proxy in views:
        assert proxy.value.untyped_storage().data_ptr() == batch.untyped_storage().data_ptr()


def test_an_in_place_edit_stays_in_its_invoke(net, tiny):
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with net.trace() as tracer:
        with tracer.invoke(a):
            net.layer1.output[:] = 0
        with tracer.invoke(b):
            untouched = net.layer1.output.save()
        with tracer.invoke():
            out = net.output.save()

    def zero_first_row(module, args, output):
        output[:1] = 0
    assert torch.equal(out.value, batched_reference(tiny, [a, b], zero_first_row))
    with torch.no_grad():
        assert torch.equal(untouched.value, tiny.layer1(torch.cat([a, b]))[1:])


def test_an_assignment_writes_only_its_invokes_rows(net, tiny):
    a, b = torch.rand(2, 5), torch.rand(1, 5)
    with net.trace() as tracer:
        with tracer.invoke(a):
            net.layer1.output = net.layer1.output * 10
        with tracer.invoke(b):
            other = net.output.save()
        with tracer.invoke():
            out = net.output.save()

    def scale_first_two_rows(module, args, output):
        return torch.cat([output[:2] * 10, output[2:]])
    expected = batched_reference(tiny, [a, b], scale_first_two_rows)
    assert torch.equal(out.value, expected) and torch.equal(other.value, expected[2:])


def test_activation_patching_from_one_invoke_to_another(net, tiny):
    clean, corrupt = torch.rand(1, 5), torch.rand(1, 5)
    with net.trace() as tracer:
        with tracer.invoke(clean):
            clean_hidden = net.layer1.output[:, :4]
        with tracer.invoke(corrupt):
            net.layer1.output[:, :4] = clean_hidden
            patched = net.output.save()

    def patch(module, args, output):
        output[1:, :4] = output[:1, :4]
    assert torch.equal(patched.value, batched_reference(tiny, [clean, corrupt], patch)[1:])


def test_an_invoke_can_use_a_value_of_a_later_invoke_at_a_later_module(net, tiny):
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with net.trace() as tracer:
        with tracer.invoke(a):
            net.layer2.output[:] = 0
        with tracer.invoke(b):
            from_b = net.layer1.output.sum()
        with tracer.invoke(a.clone()):
            net.layer2.output[:] = from_b
        with tracer.invoke():
            out = net.output.save()
    with torch.no_grad():
        expected_b = tiny.layer1(torch.cat([a, b, a]))[1].sum()  # computed inside the batch, like the trace
    assert torch.equal(out.value[0], torch.zeros(2)) and torch.equal(out.value[2], expected_b.expand(2))


def test_many_invokes_each_replacing_their_rows(net, tiny):
    inputs = [torch.rand(1, 5) for _ in range(20)]
    with net.trace() as tracer:
        for index, single in enumerate(inputs):
            with tracer.invoke(single):
                net.layer1.output = net.layer1.output * index
        with tracer.invoke():
            out = net.output.save()

    def scale_rows(module, args, output):
        return output * torch.arange(20, dtype=output.dtype)[:, None]
    assert torch.equal(out.value, batched_reference(tiny, inputs, scale_rows))


def test_invokes_cannot_be_nested(net, tiny, x):
    with pytest.raises(RuntimeError, match="invokes cannot be nested"):
        with net.trace() as tracer:
            with tracer.invoke(x):
                with tracer.invoke(x):
                    pass
    assert hook_count(tiny) == 0


def test_an_invoke_after_the_model_ran_explains_itself(net, x):
    with net.trace() as tracer:
        with tracer.invoke(x):
            kept = net.output.save()
    with pytest.raises(RuntimeError, match="already run"):
        with tracer.invoke(x):
            pass
    assert kept.value.shape == (3, 2)


def test_a_trace_given_an_input_does_not_take_invokes(net, x):
    with pytest.raises(RuntimeError, match="one `tracer.invoke\\(input\\)` per input"):
        with net.trace(x) as tracer:
            with tracer.invoke(x):
                pass


def test_invokes_must_agree_on_non_tensor_arguments():
    class Scaled(torch.nn.Module):
        def forward(self, x, scale=1.0):
            return x * scale

    net = NNsight(Scaled())
    with pytest.raises(ValueError, match="invokes disagree on a non-tensor input"):
        with net.trace() as tracer:
            with tracer.invoke(torch.ones(1, 2), scale=2.0):
                net.output.save()
            with tracer.invoke(torch.ones(1, 2), scale=3.0):
                net.output.save()
