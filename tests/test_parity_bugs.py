"""Bugs a researcher coming from nnsight hits first (issue 14, item 1), each against a plain-PyTorch ground truth."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from language_fixtures import END_OF_TEXT, StepHooks, encode


# ------------------------------------------------------------------------------------- tracer.cond branches
@pytest.mark.parametrize("validate", [True, False])
def test_a_value_saved_in_a_branch_not_taken_has_no_value(net, x, validate):
    with net.trace(x, validate=validate) as tracer:
        outside = net.layer1.output.save()
        with tracer.cond(net.layer1.output.sum() > 1e9):             # never true
            inside = net.layer1.output.save()
        with tracer.cond(net.layer2.output.sum() > -1e9):            # always true; decided after layer1 ran
            late = net.layer1.output.save()
    expected = net._module.layer1(x)
    assert torch.equal(outside.value, expected) and torch.equal(late.value, expected)
    with pytest.raises(ValueError, match="never computed"):
        inside.value


def test_a_branch_that_is_not_taken_after_the_value_arrived_also_has_no_value(net, x):
    with net.trace(x) as tracer:
        with tracer.cond(net.layer2.output.sum() > 1e9):             # decided after layer1's value arrived
            early = net.layer1.output.save()
        with tracer.cond(net.layer2.output.sum() > 1e9):
            pass
        with tracer.cond(net.layer2.output.sum() > 1e9).else_():
            taken = net.layer1.output.save()
    with pytest.raises(ValueError, match="never computed"):
        early.value
    assert torch.equal(taken.value, net._module.layer1(x))


def test_an_edit_in_a_branch_still_edits_the_module_value(net, x):
    with net.trace(x) as tracer:
        with tracer.cond(net.layer1.output.sum() > -1e9):
            net.layer1.output[:, 0] = 0
        out = net.output.save()
    hidden = net._module.layer1(x)
    hidden[:, 0] = 0
    assert torch.equal(out.value, net._module.layer2(hidden))


# --------------------------------------------------------------------------------------------- retain_grad
@pytest.mark.parametrize("validate", [True, False])
def test_retain_grad_works_with_shapes_on(net, x, validate):
    with net.trace(x, validate=validate):
        hidden = net.layer1.output.save()
        hidden.retain_grad()
        net.output.sum().backward()
    module = net._module
    module.zero_grad()
    expected_hidden = module.layer1(x)
    expected_hidden.retain_grad()
    module.layer2(expected_hidden).sum().backward()
    assert torch.equal(hidden.value.grad, expected_hidden.grad)


# ---------------------------------------------------------------------------------------------- .input
def test_input_has_a_shape_while_building_and_a_bad_index_is_caught_before_the_run(net, x):
    calls = []
    real_call = lambda module, args, output: calls.append(1) if not isinstance(output, FakeTensor) else None
    handle = net._module.layer1.register_forward_hook(real_call)
    try:
        with pytest.raises(IndexError, match="index 99 is out of bounds"):
            with net.trace(x):
                assert net.layer2.input.shape == torch.Size([3, 10])
                assert net.layer2.inputs[0][0].shape == torch.Size([3, 10])
                net.layer2.input[:, 99]
    finally:
        handle.remove()
    assert calls == []  # the model never ran


def test_an_assigned_input_keeps_its_shape(net, x):
    with net.trace(x):
        net.layer2.input = net.layer2.input * 2
        assert net.layer2.input.shape == torch.Size([3, 10])
        out = net.output.save()
    assert torch.equal(out.value, net._module.layer2(net._module.layer1(x) * 2))


# ------------------------------------------------------------------------------------ module.next() steps
@pytest.mark.parametrize("with_iteration_block", [False, True])
def test_module_next_means_the_next_generation_step_with_or_without_iteration_blocks(gpt2_lm, tiny_gpt2, gpt2_tok,
                                                                                      with_iteration_block):
    with gpt2_lm.generate("Hello world", max_new_tokens=3) as tracer:
        first = gpt2_lm.transformer.h[0].output[0].save()
        gpt2_lm.transformer.h[0].next()
        second = gpt2_lm.transformer.h[0].output[0].save()
        if with_iteration_block:
            with tracer.iter[2]:
                gpt2_lm.lm_head.output.save()
    ids = encode(gpt2_tok, "Hello world")
    with StepHooks(tiny_gpt2) as hooks:
        expected = hooks.record("transformer.h.0", lambda output: output[0])
        tiny_gpt2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=END_OF_TEXT)
    assert torch.equal(first.value, expected[0]) and torch.equal(second.value, expected[1])


def test_module_next_after_tracer_next_counts_from_that_step(gpt2_lm, tiny_gpt2, gpt2_tok):
    with gpt2_lm.generate("Hello world", max_new_tokens=3) as tracer:
        tracer.next()
        gpt2_lm.transformer.h[0].next()
        third = gpt2_lm.transformer.h[0].output[0].save()
    ids = encode(gpt2_tok, "Hello world")
    with StepHooks(tiny_gpt2) as hooks:
        expected = hooks.record("transformer.h.0", lambda output: output[0])
        tiny_gpt2.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=END_OF_TEXT)
    assert torch.equal(third.value, expected[2])


def test_module_next_past_the_last_step_is_caught_at_its_line(gpt2_lm):
    with pytest.raises(IndexError, match="max_new_tokens=2"):
        with gpt2_lm.generate("Hello world", max_new_tokens=2):
            gpt2_lm.transformer.h[0].next(2)
            gpt2_lm.transformer.h[0].output.save()


# ---------------------------------------------------------------------------------------------- edit()
def test_edit_arguments_are_keyword_only(net):
    with pytest.raises(TypeError):
        net.edit("a")
    with pytest.raises(TypeError):
        net.edit(True)
    assert net._edits == []
