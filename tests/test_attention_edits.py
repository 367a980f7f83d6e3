"""Editing attn.pattern: the module's output is eager attention's with the edited probabilities, for that run only.

The ground truth is the plain Hugging Face model switched to eager attention, with a forward hook written here by
hand on one attention module: it takes the probabilities eager attention returns (``output[1]``), edits them,
multiplies them with the values the layer's cache holds after the call (all values, the new one included) and
applies the output projection, replacing the module's output.
"""

from __future__ import annotations

import pytest
import torch

from language_fixtures import END_OF_TEXT, encode, hook_count, left_padded, line_of
from magic_shell import ip, ok  # noqa: F401  (the fixture)

PROMPTS = ["The Eiffel Tower is in", "Hello world"]
NEW_TOKENS = 3


def zero_first_key(pattern: torch.Tensor) -> torch.Tensor:
    edited = pattern.clone()
    edited[:, :, :, 0] = 0
    return edited


class EagerEdit:
    """The plain model with eager attention and one hand-written hook that edits one layer's probabilities.

    ``edit(weights)`` returns the edited probabilities; ``steps`` (a set) limits it to those forward calls of the
    model. ``outputs`` receives the (edited) attention output of every call of that layer.
    """

    def __init__(self, model, layer: int, edit, steps=None):
        self.model, self.layer, self.edit, self.steps = model, layer, edit, steps
        self.module = model.transformer.h[layer].attn if hasattr(model, "transformer") \
            else model.model.layers[layer].self_attn
        self.step, self.outputs, self.handles = -1, [], []

    def __enter__(self) -> "EagerEdit":
        self.previous = self.model.config._attn_implementation
        self.model.set_attn_implementation("eager")
        self.handles = [self.model.register_forward_pre_hook(self._count),
                        self.module.register_forward_hook(self._replace, with_kwargs=True)]
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self.handles:
            handle.remove()
        self.model.set_attn_implementation(self.previous)

    def _count(self, module, args) -> None:
        self.step += 1

    def _replace(self, module, args, kwargs, output):
        if self.steps is not None and self.step not in self.steps:
            self.outputs.append(output[0].detach().clone())
            return None
        values = kwargs["cache"].layers[module.layer_idx].values  # after this call: every value, the new one too
        groups = getattr(module, "num_key_value_groups", 1)
        values = values.repeat_interleave(groups, dim=1)
        weights = self.edit(output[1])
        mixed = (weights @ values).transpose(1, 2)
        mixed = mixed.reshape(*mixed.shape[:2], -1)
        projection = module.c_proj if hasattr(module, "c_proj") else module.o_proj
        result = projection(mixed)
        self.outputs.append(result.detach().clone())
        return (result, weights)


def eager_logits(model, input_ids, attention_mask, layer, edit):
    with EagerEdit(model, layer, edit) as hooked, torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask,
                       position_ids=(attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)).logits
    return logits, hooked.outputs[0]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded batch"])
def test_an_in_place_edit_of_the_pattern_is_what_the_module_uses(any_lm, gpt2_tok, prompts, implementation):
    model = any_lm._module
    model.set_attn_implementation(implementation)
    with any_lm.trace(prompts):
        attn = any_lm.layers[1].attn
        attn.pattern[:, :, :, 0] = 0
        seen = attn.pattern.save()       # later reads see the edit
        output = attn.output[0].save()
        logits = any_lm.output.logits.save()
    input_ids, attention_mask = left_padded(gpt2_tok, prompts)
    expected_logits, expected_output = eager_logits(model, input_ids, attention_mask, 1, zero_first_key)
    real = attention_mask.bool()
    assert torch.all(seen.value[:, :, :, 0] == 0)
    assert torch.allclose(output.value[real], expected_output[real], atol=1e-5)
    assert torch.allclose(logits.value[real], expected_logits[real], atol=1e-5)
    assert model.config._attn_implementation == implementation and hook_count(model) == 0


def test_assigning_a_plain_pattern(any_lm, gpt2_tok):
    model = any_lm._module
    input_ids = encode(gpt2_tok, PROMPTS[0])
    width = input_ids.shape[1]
    causal = torch.ones(width, width).tril()
    uniform = (causal / causal.sum(-1, keepdim=True)).expand(1, 4, width, width)  # every earlier token alike
    with any_lm.trace(PROMPTS[0]):
        any_lm.layers[0].attn.pattern = uniform
        output = any_lm.layers[0].attn.output[0].save()
        logits = any_lm.output.logits.save()
    expected_logits, expected_output = eager_logits(model, input_ids, torch.ones_like(input_ids), 0,
                                                    lambda weights: uniform)
    assert torch.allclose(output.value, expected_output, atol=1e-5)
    assert torch.allclose(logits.value, expected_logits, atol=1e-5)


def test_assigning_a_computed_pattern(any_lm, gpt2_tok):
    model = any_lm._module
    with any_lm.trace(PROMPTS[0]):
        attn = any_lm.layers[0].attn
        attn.pattern = attn.pattern.flip(1)  # the heads' patterns in reverse order
        logits = any_lm.output.logits.save()
    input_ids = encode(gpt2_tok, PROMPTS[0])
    expected, _ = eager_logits(model, input_ids, torch.ones_like(input_ids), 0, lambda weights: weights.flip(1))
    assert torch.allclose(logits.value, expected, atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_pattern_assigned_to_itself_changes_nothing(any_lm, gpt2_tok, implementation):
    model = any_lm._module
    model.set_attn_implementation(implementation)
    with any_lm.trace(PROMPTS):
        base = any_lm.output.logits.save()
    with any_lm.trace(PROMPTS):
        for index in range(2):
            attn = any_lm.layers[index].attn
            attn.pattern = attn.pattern
        same = any_lm.output.logits.save()
    real = left_padded(gpt2_tok, PROMPTS)[1].bool()  # padded query rows are meaningless in both
    assert torch.allclose(same.value[real], base.value[real], atol=1e-5)
    assert model.config._attn_implementation == implementation and hook_count(model) == 0


def test_nothing_is_left_changed_after_an_edit_or_a_failed_one(any_lm, gpt2_tok):
    model = any_lm._module
    with any_lm.trace(PROMPTS[0]):
        base = any_lm.output.logits.save()
    with any_lm.trace(PROMPTS[0]):
        any_lm.layers[0].attn.pattern[:, 0] = 0
    with pytest.raises(ValueError, match="give it the shape of `.pattern`") as caught:
        with any_lm.trace(PROMPTS[0]):
            any_lm.layers[0].attn.pattern = torch.ones(1, 4, 2, 2)  # wrong shape
    assert line_of(__file__, "# wrong shape") in str(caught.value)
    assert model.config._attn_implementation == "sdpa" and hook_count(model) == 0
    with any_lm.trace(PROMPTS[0]):
        after = any_lm.output.logits.save()
    assert torch.equal(after.value, base.value)


@pytest.mark.parametrize("validate", [True, False])
def test_an_edit_at_one_generation_step(any_lm, gpt2_tok, validate):
    model = any_lm._module
    with any_lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, validate=validate) as tracer:
        logits = tracer.list().save()
        with tracer.iter[1]:
            attn = any_lm.layers[1].attn
            attn.pattern[:, :, :, 0] = 0
            output = attn.output[0].save()
        with tracer.all():
            logits.append(any_lm.lm_head.output[:, -1])
        result = tracer.result.save()
    input_ids = encode(gpt2_tok, PROMPTS[0])
    step_logits = []
    with EagerEdit(model, 1, zero_first_key, steps={1}) as hooked, torch.no_grad():
        handle = model.lm_head.register_forward_hook(lambda _, args, out: step_logits.append(out[:, -1].clone()))
        try:
            sequences = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                       max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=END_OF_TEXT)
        finally:
            handle.remove()
    assert torch.equal(result.value, sequences)
    assert output.value.shape[1] == 1 and torch.allclose(output.value, hooked.outputs[1], atol=1e-5)
    assert len(logits.value) == len(step_logits) == NEW_TOKENS
    for got, want in zip(logits.value, step_logits):
        assert torch.allclose(got, want, atol=1e-5)
    with torch.no_grad():  # and the edit made a difference at step 1 only
        plain = model(input_ids=sequences[:, :input_ids.shape[1] + 1]).logits[:, -1]
    assert not torch.allclose(logits.value[1], plain, atol=1e-3)
    assert model.config._attn_implementation == "sdpa" and hook_count(model) == 0


def test_a_pattern_edit_in_training_mode_with_dropout_is_refused(gpt2_lm):
    gpt2_lm._module.train()
    with pytest.raises(RuntimeError, match="call `model.eval\\(\\)` first"):
        with gpt2_lm.trace(PROMPTS[0]):
            gpt2_lm.layers[0].attn.pattern[:, 0] = 0
    assert hook_count(gpt2_lm._module) == 0


def test_two_in_place_edits_both_count(any_lm, gpt2_tok):
    with any_lm.trace(PROMPTS[0]):
        attn = any_lm.layers[0].attn
        attn.pattern[:, :, :, 0] = 0
        attn.pattern[:, 1] = attn.pattern[:, 1] * 2
        logits = any_lm.output.logits.save()

    def both(weights):
        edited = zero_first_key(weights)
        edited[:, 1] *= 2
        return edited

    input_ids = encode(gpt2_tok, PROMPTS[0])
    expected, _ = eager_logits(any_lm._module, input_ids, torch.ones_like(input_ids), 0, both)
    assert torch.allclose(logits.value, expected, atol=1e-5)


def test_an_edit_in_one_invoke_changes_only_its_rows(any_lm, gpt2_tok):
    with any_lm.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = any_lm.output.logits.save()
        with tracer.invoke(PROMPTS[1]):
            attn = any_lm.layers[0].attn
            attn.pattern[:, 1] = attn.pattern[:, 1] * 2
            second = any_lm.output.logits.save()

    def second_row(weights):
        edited = weights.clone()
        edited[1, 1] *= 2
        return edited

    input_ids, attention_mask = left_padded(gpt2_tok, PROMPTS)
    expected, _ = eager_logits(any_lm._module, input_ids, attention_mask, 0, second_row)
    real = attention_mask.bool()
    assert torch.allclose(first.value[real[:1]], expected[:1][real[:1]], atol=1e-5)
    assert torch.allclose(second.value[real[1:]], expected[1:][real[1:]], atol=1e-5)


def test_a_pattern_edit_in_a_trace_cell(ip, gpt2_lm, gpt2_tok):
    ip.user_ns["lm"] = gpt2_lm
    ok(ip, f"""%%trace lm "{PROMPTS[0]}"
attn = lm.layers[1].attn
attn.pattern[:, :, :, 0] = 0
logits = lm.output.logits
""")
    input_ids = encode(gpt2_tok, PROMPTS[0])
    expected, _ = eager_logits(gpt2_lm._module, input_ids, torch.ones_like(input_ids), 1, zero_first_key)
    assert torch.allclose(ip.user_ns["logits"], expected, atol=1e-5)
    assert hook_count(gpt2_lm._module) == 0


def test_a_persistent_pattern_edit(any_lm, gpt2_tok):
    with any_lm.edit() as edited:
        edited.layers[1].attn.pattern[:, :, :, 0] = 0
    with edited.trace(PROMPTS[0]):
        logits = edited.output.logits.save()
    with any_lm.trace(PROMPTS[0]):
        unedited = any_lm.output.logits.save()
    input_ids = encode(gpt2_tok, PROMPTS[0])
    expected, _ = eager_logits(any_lm._module, input_ids, torch.ones_like(input_ids), 1, zero_first_key)
    assert torch.allclose(logits.value, expected, atol=1e-5)
    assert not torch.allclose(unedited.value, expected, atol=1e-3)  # the original model is not edited
    assert hook_count(any_lm._module) == 0


@pytest.mark.parametrize("taken", [True, False])
def test_a_pattern_edit_in_a_condition_branch(any_lm, gpt2_tok, taken):
    with any_lm.trace(PROMPTS[0]) as tracer:
        attn = any_lm.layers[1].attn
        with tracer.cond(any_lm.layers[0].output[0].sum() * 0 == (0 if taken else 1)):
            attn.pattern[:, :, :, 0] = 0
        pattern = attn.pattern.save()  # read outside the branch: recomputed, so it has a value either way
        logits = any_lm.output.logits.save()
    input_ids = encode(gpt2_tok, PROMPTS[0])
    edit = zero_first_key if taken else (lambda weights: weights)
    expected, _ = eager_logits(any_lm._module, input_ids, torch.ones_like(input_ids), 1, edit)
    assert torch.allclose(logits.value, expected, atol=1e-5)
    assert torch.all(pattern.value[:, :, 1:, 0] > 0)
