"""Parameters and buffers are traced values: read, save and edit them for one run; the model never changes."""

from __future__ import annotations

import copy

import pytest
import torch

from nnsight_magic import NNsight
from nnsight_magic.errors import OutOfOrderError
from language_fixtures import END_OF_TEXT, assert_weights_equal, encode, hook_count, weights


def test_a_parameter_read_in_a_trace_is_the_parameter_itself(net, x):
    with net.trace(x):
        weight = net.layer1.weight
        assert weight.shape == torch.Size([10, 5])
        weight = weight.save()
        bias = net.layer1.bias.save()
    assert weight.value.data_ptr() == net._module.layer1.weight.data_ptr()  # zero-copy
    assert torch.equal(weight.value, net._module.layer1.weight) and torch.equal(bias.value, net._module.layer1.bias)


@pytest.mark.parametrize("grad_mode", [torch.no_grad, torch.enable_grad])
def test_an_in_place_edit_applies_to_this_run_only(net, tiny, x, grad_mode):
    before = weights(tiny)
    with grad_mode():
        with net.trace(x):
            net.layer2.weight[:, 0] = 0
            edited = net.layer2.weight.save()
            out = net.output.save()
        with net.trace(x):
            again = net.output.save()
    assert_weights_equal(tiny, before)
    assert tiny.layer2.weight.__class__ is torch.nn.Parameter and hook_count(tiny) == 0
    weight = before["layer2.weight"].clone()
    weight[:, 0] = 0
    with torch.no_grad():
        assert torch.equal(edited.value, weight)
        assert torch.equal(out.value, torch.nn.functional.linear(tiny.layer1(x), weight, tiny.layer2.bias))
        assert torch.equal(again.value, tiny(x))


def test_assigning_a_parameter_in_a_trace_changes_this_run_only(net, tiny, x):
    before = weights(tiny)
    with torch.no_grad():
        with net.trace(x):
            net.layer1.bias = torch.ones(10)
            net.layer1.weight *= 2
            hidden = net.layer1.output.save()
        assert torch.equal(hidden.value, torch.nn.functional.linear(x, before["layer1.weight"] * 2, torch.ones(10)))
    assert_weights_equal(tiny, before)


def test_a_buffer_is_a_traced_value_too(x):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4)).eval()
    model[1].running_mean.copy_(torch.arange(4.0))
    net = NNsight(model)
    before = weights(model)
    with torch.no_grad():
        with net.trace(x):
            mean = net[1].running_mean.save()
            net[1].running_mean[:] = 0
            out = net.output.save()
        reference = copy.deepcopy(model)
        reference[1].running_mean.zero_()
        assert torch.equal(out.value, reference(x))
    assert torch.equal(mean.value, torch.zeros(4))  # the run's copy, as edited
    assert_weights_equal(model, before)


def test_gradients_flow_to_the_parameter_through_the_runs_copy(net, tiny, x):
    tiny.zero_grad()
    with net.trace(x):
        net.layer2.weight[:, 0] = 0
        net.output.sum().backward()
    got = tiny.layer2.weight.grad.clone()
    reference = copy.deepcopy(tiny)
    reference.zero_grad()
    weight = reference.layer2.weight.clone()
    weight[:, 0] = 0
    torch.nn.functional.linear(reference.layer1(x), weight, reference.layer2.bias).sum().backward()
    assert torch.equal(got, reference.layer2.weight.grad)


@pytest.mark.parametrize("validate", [True, False])
def test_an_edit_that_needs_a_later_value_is_out_of_order_and_changes_nothing(net, tiny, x, validate):
    before = weights(tiny)
    with pytest.raises(OutOfOrderError, match="layer1.weight"):
        with net.trace(x, validate=validate):
            net.layer1.weight[:] = net.layer2.output.mean()
    assert_weights_equal(tiny, before)
    assert tiny.layer1.weight.__class__ is torch.nn.Parameter and hook_count(tiny) == 0


def test_a_failed_run_gives_the_module_its_own_parameter_back(net, tiny, x):
    original = tiny.layer2.weight
    with pytest.raises(IndexError):
        with net.trace(x, validate=False):
            net.layer2.weight[:] = 0
            net.layer2.output[:, 99].save()
    assert tiny.layer2.weight is original and hook_count(tiny) == 0


def test_a_persistent_edit_of_a_parameter_repeats_in_every_trace_and_keeps_the_weights(net, tiny, x):
    before = weights(tiny)
    with net.edit() as edited:
        edited.layer1.weight[:] = 0
    with torch.no_grad():
        with edited.trace(x):
            seen = edited.layer1.weight.save()
            out = edited.output.save()
        assert torch.equal(seen.value, torch.zeros(10, 5))
        assert torch.equal(out.value, tiny.layer2(tiny.layer1.bias.expand(3, 10)))
    assert_weights_equal(tiny, before)


def test_zeroing_a_language_models_weight_under_no_grad_is_for_one_run(gpt2_lm, tiny_gpt2, gpt2_tok):
    before = weights(tiny_gpt2)
    ids = encode(gpt2_tok, "Hello world")
    with torch.no_grad():
        with gpt2_lm.generate("Hello world", max_new_tokens=3) as tracer:
            gpt2_lm.transformer.h[0].mlp.c_proj.weight[:] = 0
            tokens = tracer.result.save()
        reference = copy.deepcopy(tiny_gpt2)
        reference.transformer.h[0].mlp.c_proj.weight.zero_()
        expected = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                      do_sample=False, pad_token_id=END_OF_TEXT)
    assert torch.equal(tokens.value, expected)
    assert_weights_equal(tiny_gpt2, before)
