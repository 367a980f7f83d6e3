"""attn.pattern under sdpa equals eager attention's weights (Hugging Face output_attentions) within tolerance,
over one forward pass and at every generation step (later steps attend over the key/value cache)."""

from __future__ import annotations

import pytest
import torch

from language_fixtures import END_OF_TEXT, encode, hook_count, left_padded

PROMPTS = ["The Eiffel Tower is in", "Hello world"]
NEW_TOKENS = 3


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


def eager_generation_weights(model, input_ids, attention_mask):
    """Hugging Face ``generate`` with eager attention and ``output_attentions=True``: ``(sequences, attentions)``.

    ``attentions[step][layer]`` is ``(batch, heads, query, key)``: the prompt at step 0, one query over the
    cache and the new token at every later step.
    """
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=END_OF_TEXT, output_attentions=True,
                                 return_dict_in_generate=True)
        return out.sequences, out.attentions
    finally:
        model.set_attn_implementation(previous)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS], ids=["one", "padded batch"])
def test_decoding_step_patterns_equal_eager_generate_weights(any_lm, gpt2_tok, implementation, prompts):
    model = any_lm._module
    model.set_attn_implementation(implementation)
    with any_lm.generate(prompts, max_new_tokens=NEW_TOKENS) as tracer:
        patterns = [tracer.list().save() for _ in range(2)]
        with tracer.all():
            for index in range(2):
                patterns[index].append(any_lm.layers[index].attn.pattern)
        result = tracer.result.save()
    assert model.config._attn_implementation == implementation
    assert hook_count(model) == 0
    input_ids, attention_mask = left_padded(gpt2_tok, prompts)
    sequences, expected = eager_generation_weights(model, input_ids, attention_mask)
    assert torch.equal(result.value, sequences)  # the same tokens, so the same caches
    width = input_ids.shape[1]
    real = attention_mask.bool()[:, None, :, None]
    for index in range(2):
        assert len(patterns[index].value) == NEW_TOKENS
        for step, got in enumerate(patterns[index].value):
            want = expected[step][index]
            queries = width if step == 0 else 1
            assert got.shape == want.shape == (len(prompts), 4, queries, width + step)
            if step == 0:  # padded query rows are meaningless in both
                got, want = got[real.expand_as(got)], want[real.expand_as(want)]
            assert torch.allclose(got, want, atol=1e-5), (index, step)


def test_a_decoding_step_pattern_read_with_next(any_lm, gpt2_tok):
    attn = any_lm.layers[1].attn
    with any_lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS):
        first = attn.pattern.save()
        second = attn.next().pattern.save()
        third = attn.next().pattern.save()
    input_ids = encode(gpt2_tok, PROMPTS[0])
    _, expected = eager_generation_weights(any_lm._module, input_ids, torch.ones_like(input_ids))
    for step, got in enumerate([first, second, third]):
        assert torch.allclose(got.value, expected[step][1], atol=1e-5)
    assert third.value.shape[-2:] == (1, input_ids.shape[1] + 2)


def test_decoding_step_patterns_of_each_invoke(any_lm, gpt2_tok):
    patterns = {}
    with any_lm.generate(max_new_tokens=NEW_TOKENS) as tracer:
        for prompt in PROMPTS:
            with tracer.invoke(prompt):
                patterns[prompt] = tracer.list().save()
                with tracer.iter[1:]:
                    patterns[prompt].append(any_lm.layers[1].attn.pattern)
    input_ids, attention_mask = left_padded(gpt2_tok, PROMPTS)
    _, expected = eager_generation_weights(any_lm._module, input_ids, attention_mask)
    for row, prompt in enumerate(PROMPTS):  # each invoke's rows of the batch's cache
        assert len(patterns[prompt].value) == NEW_TOKENS - 1
        for step, got in enumerate(patterns[prompt].value, start=1):
            assert got.shape == (1, 4, 1, input_ids.shape[1] + step)
            assert torch.allclose(got, expected[step][1][row:row + 1], atol=1e-5)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_pattern_has_its_shape_while_building(any_lm, gpt2_tok, implementation):
    any_lm._module.set_attn_implementation(implementation)
    width = encode(gpt2_tok, PROMPTS[0]).shape[1]
    with any_lm.trace(PROMPTS):
        padded = left_padded(gpt2_tok, PROMPTS)[0].shape[1]
        building = any_lm.layers[1].attn.pattern.shape
        one_head = any_lm.layers[1].attn.pattern[:, 2].save()
    assert building == (2, 4, padded, padded) and one_head.value.shape == (2, padded, padded)
    with any_lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS) as tracer:
        with tracer.iter[0]:
            prompt = any_lm.layers[0].attn.pattern.shape
        with tracer.iter[1]:
            step = any_lm.layers[0].attn.pattern
            step_shape = step.shape
            saved = step.save()
    assert prompt == (1, 4, width, width) and step_shape == saved.value.shape == (1, 4, 1, width + 1)


def test_a_pattern_index_out_of_range_is_caught_before_the_model_runs(any_lm):
    reached = []
    with pytest.raises(IndexError) as caught:
        with any_lm.trace(PROMPTS[0]):
            any_lm.layers[0].attn.pattern[:, 9].save()               # 4 heads: raised at this line, while building
            reached.append("the next line")
    assert "test_attention_pattern.py" in str(caught.value) and "size 4" in str(caught.value) and reached == []
    assert hook_count(any_lm._module) == 0


def test_a_module_pattern_cannot_be_recomputed_for_says_why_at_the_line():
    from conftest import make_tiny
    from nnsight_magic import NNsight
    from nnsight_magic.intervention.attention import AttentionEnvoy
    net = NNsight(make_tiny(), envoys={torch.nn.Linear: AttentionEnvoy})   # a Linear is no attention module
    with pytest.raises(AttributeError, match=r"test_attention_pattern.py:\d+ .*layer1 \(Linear\): attention patterns "
                                             r"are recomputed for GPT-2-style \(c_attn\) and Llama-style"):
        with net.trace(torch.ones(1, 5)):
            net.layer1.pattern.save()
    assert hook_count(net._module) == 0
