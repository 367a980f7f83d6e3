"""attn.pattern under sdpa equals eager attention's weights (Hugging Face output_attentions) within tolerance."""

from __future__ import annotations

import pytest
import torch

from language_fixtures import encode, hook_count, left_padded

PROMPTS = ["The Eiffel Tower is in", "Hello world"]


def eager_weights(model, input_ids, attention_mask):
    """Hugging Face's own attention weights: the model switched to eager attention, output_attentions=True."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        kwargs = {"position_ids": (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)}
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True,
                         **kwargs).attentions
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded batch"])
def test_the_pattern_equals_eager_attention_weights(any_lm, gpt2_tok, implementation, prompts):
    model = any_lm._module
    model.set_attn_implementation(implementation)
    with any_lm.trace(prompts):
        patterns = [any_lm.layers[index].attn.pattern.save() for index in range(2)]
    assert model.config._attn_implementation == implementation  # the model kept its kernel
    assert hook_count(model) == 0
    input_ids, attention_mask = left_padded(gpt2_tok, prompts)
    expected = eager_weights(model, input_ids, attention_mask)
    for index in range(2):
        got = patterns[index].value
        assert got.shape == expected[index].shape == (len(prompts), 4, input_ids.shape[1], input_ids.shape[1])
        real = attention_mask.bool()  # padded query rows are meaningless in both; compare the real ones
        assert torch.allclose(got[real[:, None, :, None].expand_as(got)],
                              expected[index][real[:, None, :, None].expand_as(got)], atol=1e-5)
