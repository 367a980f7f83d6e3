"""lm.generate: every step of Hugging Face ``generate``, compared with hand-written hooks on the plain model."""

from __future__ import annotations

import warnings

import pytest
import torch

from language_fixtures import (
    CONTEXT, END_OF_TEXT, PROMPTS, StepHooks, assert_weights_equal, encode, hook_count, left_padded, line_of, weights)

NEW_TOKENS = 3


def layer(lm, index: int):
    """Decoder block ``index`` through the wrapper: ``transformer.h[i]`` (GPT-2) or ``model.layers[i]`` (Llama)."""
    return lm.transformer.h[index] if hasattr(lm._module, "transformer") else lm.model.layers[index]


def layer_path(lm, index: int) -> str:
    return f"transformer.h.{index}" if hasattr(lm._module, "transformer") else f"model.layers.{index}"


def hf_generate(model, input_ids, attention_mask=None, max_new_tokens=NEW_TOKENS, **kwargs):
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    return model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          do_sample=False, pad_token_id=END_OF_TEXT, **kwargs)


# ------------------------------------------------------------------------------------------ results, steps
def test_the_result_equals_hf_generate(any_lm, gpt2_tok):
    with any_lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS) as tracer:
        single = tracer.result.save()
    with any_lm.generate(PROMPTS, max_new_tokens=NEW_TOKENS) as tracer:
        batch = tracer.result.save()
    assert torch.equal(single.value, hf_generate(any_lm._module, encode(gpt2_tok, PROMPTS[1])))
    assert torch.equal(batch.value, hf_generate(any_lm._module, *left_padded(gpt2_tok, PROMPTS)))
    assert hook_count(any_lm._module) == 0


def test_decoding_is_greedy_unless_asked_to_sample(gpt2_lm, tiny_gpt2, gpt2_tok):
    tiny_gpt2.generation_config.do_sample = True  # the model's own default would sample
    with gpt2_lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS) as tracer:
        greedy = tracer.result.save()
    torch.manual_seed(7)
    with gpt2_lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, do_sample=True) as tracer:
        sampled = tracer.result.save()
    torch.manual_seed(7)
    expected_sample = tiny_gpt2.generate(encode(gpt2_tok, PROMPTS[0]), max_new_tokens=NEW_TOKENS, do_sample=True,
                                         pad_token_id=END_OF_TEXT)
    assert torch.equal(greedy.value, hf_generate(tiny_gpt2, encode(gpt2_tok, PROMPTS[0])))
    assert torch.equal(sampled.value, expected_sample)
    assert not torch.equal(sampled.value, greedy.value)  # a random model's near-uniform distribution


@pytest.mark.parametrize("validate", [True, False])
def test_every_step_reads_what_hooks_see(any_lm, gpt2_tok, validate):
    with any_lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, validate=validate) as tracer:
        logits, hidden = tracer.list().save(), tracer.list().save()
        with tracer.all():
            logits.append(any_lm.lm_head.output[:, -1])
            hidden.append(layer(any_lm, 0).output)
    with StepHooks(any_lm._module) as hooks:
        expected_logits = hooks.record("lm_head", lambda output: output[:, -1])
        expected_hidden = hooks.record(layer_path(any_lm, 0))
        hf_generate(any_lm._module, encode(gpt2_tok, PROMPTS[1]))
    assert len(logits.value) == len(expected_logits) == NEW_TOKENS
    for got, want in zip(logits.value + hidden.value, expected_logits + expected_hidden):
        assert torch.equal(got, want)
    assert hidden.value[0].shape[1] == encode(gpt2_tok, PROMPTS[1]).shape[1]  # step 0 reads the prompt ...
    assert hidden.value[1].shape[1] == 1                                       # ... later steps one token


@pytest.mark.parametrize("steps, chosen", [
    (1, {1}), (slice(1, 3), {1, 2}), ([0, 2], {0, 2}), (slice(None), {0, 1, 2}), (slice(1, 10), {1, 2}),
])
def test_an_iteration_block_edits_exactly_its_steps(any_lm, gpt2_tok, steps, chosen):
    past_the_end = isinstance(steps, slice) and (steps.stop or 0) > NEW_TOKENS
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with any_lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS) as tracer:
            logits = tracer.list().save()
            with tracer.all():
                logits.append(any_lm.lm_head.output[:, -1])
            with tracer.iter[steps]:
                layer(any_lm, 0).output[:] *= 0.5
            ids = tracer.result.save()
    # a slice past max_new_tokens runs at the steps that exist, and says so (at the user's line)
    assert [str(w.message).split(": the block")[0] for w in caught] == (
        ["tracer.iter[1:10] names steps up to 9, but max_new_tokens=3 runs steps 0 to 2"] if past_the_end else [])
    assert all(w.filename == __file__ for w in caught)
    with StepHooks(any_lm._module) as hooks:
        hooks.on_output(layer_path(any_lm, 0), lambda step, output: output * 0.5 if step in chosen else None)
        expected_logits = hooks.record("lm_head", lambda output: output[:, -1])
        expected_ids = hf_generate(any_lm._module, encode(gpt2_tok, PROMPTS[1]))
    assert torch.equal(ids.value, expected_ids)
    for got, want in zip(logits.value, expected_logits):
        assert torch.equal(got, want)
    assert hook_count(any_lm._module) == 0


def test_a_for_loop_over_steps_gives_the_step_number(gpt2_lm):
    # nodes reading the step number used to wait forever (Execution._arm reset their count after delivering it)
    with gpt2_lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS) as tracer:
        seen = tracer.list().save()
        for step in tracer.iter[0:2]:
            seen.append(step)
    assert seen.value == [0, 1]


def test_next_moves_reads_and_edits_to_the_next_step(gpt2_lm, tiny_gpt2, gpt2_tok):
    with gpt2_lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS) as tracer:
        first = gpt2_lm.lm_head.output.save()
        tracer.next()
        second = gpt2_lm.lm_head.output.save()
        tracer.next()
        gpt2_lm.transformer.h[1].output[:] = 0
        ids = tracer.result.save()
    with StepHooks(tiny_gpt2) as hooks:
        logits = hooks.record("lm_head")
        hooks.on_output("transformer.h.1", lambda step, output: output * 0 if step == 2 else None)
        expected_ids = hf_generate(tiny_gpt2, encode(gpt2_tok, PROMPTS[1]))
    assert first.value.shape == (1, 1, 50257)  # HF generate computes logits for the last position only
    assert torch.equal(first.value, logits[0]) and torch.equal(second.value, logits[1])
    assert torch.equal(ids.value, expected_ids)


def test_a_value_from_step_0_is_kept_for_every_later_step(any_lm, gpt2_tok):
    with any_lm.generate(PROMPTS[1], max_new_tokens=4) as tracer:
        first = layer(any_lm, 0).output[:, -1].clone()    # step 0, outside any block
        with tracer.iter[1:]:
            layer(any_lm, 0).output[:, -1] = first        # read again at steps 1, 2 and 3
        ids = tracer.result.save()
    kept = {}

    def replay(step, output):
        if step == 0:
            kept["value"] = output[:, -1].clone()
            return None
        output = output.clone()
        output[:, -1] = kept["value"]
        return output

    with StepHooks(any_lm._module) as hooks:
        hooks.on_output(layer_path(any_lm, 0), replay)
        expected = hf_generate(any_lm._module, encode(gpt2_tok, PROMPTS[1]), max_new_tokens=4)
    assert torch.equal(ids.value, expected)


def test_a_value_from_an_earlier_trace_of_a_session_is_kept_for_every_step(gpt2_lm, tiny_gpt2, gpt2_tok):
    with gpt2_lm.session():
        with gpt2_lm.trace(PROMPTS[0]):
            donor = gpt2_lm.transformer.h[0].output[:, -1].save()
        with gpt2_lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS) as tracer:
            with tracer.all():
                # first read inside the block: the bridge used to be re-armed (and lost) at every step
                gpt2_lm.transformer.h[0].output[:, -1] = donor
            ids = tracer.result.save()
    with torch.no_grad():
        expected_donor = tiny_gpt2(encode(gpt2_tok, PROMPTS[0]), output_hidden_states=True).hidden_states[1][:, -1]

    def transplant(step, output):
        output = output.clone()
        output[:, -1] = expected_donor
        return output

    with StepHooks(tiny_gpt2) as hooks:
        hooks.on_output("transformer.h.0", transplant)
        expected = hf_generate(tiny_gpt2, encode(gpt2_tok, PROMPTS[1]))
    assert torch.equal(donor.value, expected_donor)
    assert torch.equal(ids.value, expected)


def test_code_after_an_open_ended_block_runs_after_the_last_step(gpt2_lm, tiny_gpt2, gpt2_tok):
    with gpt2_lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS) as tracer:
        tokens = tracer.list().save()
        with tracer.all():
            logits = gpt2_lm.lm_head.output[0, -1]
            tokens.append(logits.argmax())
        count = tracer.apply(len, tokens).save()     # after tracer.all(): runs once, when generation ended
        tokens.append(433)                            # once, not once per step (nnsight 0.4 replayed it)
        last = logits.argmax().save()                 # sees the last step's value
        ids = tracer.result.save()
    assert count.value == NEW_TOKENS
    assert [int(token) for token in tokens.value] == ids.value[0, -NEW_TOKENS:].tolist() + [433]
    assert int(last.value) == int(ids.value[0, -1])


# ------------------------------------------------------------------------------------------------ batches
def test_invokes_generate_as_one_batch_and_edits_stay_in_their_invoke(any_lm, gpt2_tok):
    with any_lm.generate(max_new_tokens=NEW_TOKENS) as tracer:
        with tracer.invoke(PROMPTS[0]):
            with tracer.all():
                layer(any_lm, 0).output[:] *= 0
        with tracer.invoke(PROMPTS[1]):
            step0 = any_lm.lm_head.output.save()
        ids = tracer.result.save()
    with StepHooks(any_lm._module) as hooks:
        def zero_row_0(step, output):
            output = output.clone()
            output[0] = 0
            return output

        hooks.on_output(layer_path(any_lm, 0), zero_row_0)
        logits = hooks.record("lm_head")
        expected = hf_generate(any_lm._module, *left_padded(gpt2_tok, PROMPTS[:2]))
    assert torch.equal(ids.value, expected)
    assert torch.equal(step0.value, logits[0][1:])
    assert hook_count(any_lm._module) == 0


def test_batching_does_not_change_what_a_prompt_generates(any_lm):
    with any_lm.generate(PROMPTS, max_new_tokens=NEW_TOKENS) as tracer:
        steps = tracer.list().save()
        with tracer.all():
            steps.append(any_lm.lm_head.output[:, -1])
        batch = tracer.result.save()
    for row, text in enumerate(PROMPTS):
        with any_lm.generate(text, max_new_tokens=NEW_TOKENS) as tracer:
            first = any_lm.lm_head.output[:, -1].save()
            alone = tracer.result.save()
        # another batch shape sums the matrix products in another order: logits agree to rounding ...
        torch.testing.assert_close(steps.value[0][row], first.value[0], atol=1e-5, rtol=1e-5)
        # ... and the tokens, the prompt's result, are the same (its padding aside)
        assert batch.value[row, -alone.value.shape[1]:].tolist() == alone.value[0].tolist()


# --------------------------------------------------------------------------------------------------- shapes
def test_shapes_before_running_match_the_run(gpt2_lm, gpt2_tok):
    length = encode(gpt2_tok, PROMPTS[1]).shape[1]
    with gpt2_lm.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS) as tracer:
        hidden = gpt2_lm.transformer.h[0].output.save()
        logits = gpt2_lm.lm_head.output.save()
        ids = tracer.result.save()
        shapes = hidden.shape, logits.shape, ids.shape
    assert shapes == ((1, length, 64), (1, 1, 50257), (1, length + NEW_TOKENS))
    assert (hidden.value.shape, logits.value.shape, ids.value.shape) == shapes


def test_later_steps_have_the_shapes_of_a_decoding_step(any_lm, gpt2_tok):
    length = len(gpt2_tok(PROMPTS[1])["input_ids"])
    with any_lm.generate([PROMPTS[0], PROMPTS[1]], max_new_tokens=NEW_TOKENS) as tracer:
        with tracer.iter[1:]:
            later = layer(any_lm, 1).output.view(2, 64).save()   # valid for one new token per step only
            later_shape = later.shape
        with tracer.all():
            every = layer(any_lm, 1).output.save()
            every_shape = every.shape                             # shown as at its first step
        tracer.next()
        step1 = layer(any_lm, 0).output.save()
        step1_shape = step1.shape
    assert later_shape == (2, 64) and later.value.shape == (2, 64)
    assert every_shape == (2, length, 64) and every.value.shape == (2, 1, 64)  # the value of the last step
    assert step1_shape == step1.value.shape == (2, 1, 64)


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("steps, words", [
    (3, "names step 3, but max_new_tokens=3 runs steps 0 to 2"),
    ([0, 5], "names step 5"),
    (slice(4, None), "names step 4"),
])
def test_a_step_past_the_end_is_refused_before_running(gpt2_lm, tiny_gpt2, steps, words):
    before = weights(tiny_gpt2)
    with pytest.raises(IndexError) as caught:
        with gpt2_lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS) as tracer:
            with tracer.iter[steps]:  # the step past the end
                gpt2_lm.lm_head.output.save()
    assert str(caught.value).startswith(line_of(__file__, "# the step past the end"))
    assert words in str(caught.value)
    assert hook_count(tiny_gpt2) == 0
    assert_weights_equal(tiny_gpt2, before)


def test_a_read_after_next_past_the_end_is_refused(gpt2_lm, tiny_gpt2):
    with pytest.raises(IndexError) as caught:
        with gpt2_lm.generate(PROMPTS[0], max_new_tokens=2) as tracer:
            for _ in range(3):
                gpt2_lm.lm_head.output.save()  # the read after next
                tracer.next()
    assert str(caught.value).startswith(line_of(__file__, "# the read after next"))
    assert "tracer.next() moved to step 2" in str(caught.value)
    assert hook_count(tiny_gpt2) == 0


def test_steps_that_generation_never_reaches_are_reported_after_the_run(gpt2_lm, tiny_gpt2, gpt2_tok):
    first_token = int(hf_generate(tiny_gpt2, encode(gpt2_tok, PROMPTS[0]), max_new_tokens=1)[0, -1])
    before = weights(tiny_gpt2)
    with pytest.raises(RuntimeError) as caught:
        # generation stops after its first token, which is the end-of-text token here
        with gpt2_lm.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS, eos_token_id=first_token) as tracer:
            with tracer.iter[2]:
                late = gpt2_lm.lm_head.output.save()  # the unreached step
    message = str(caught.value)
    assert line_of(__file__, "# the unreached step") in message
    assert "the model ran only 1 step" in message
    assert hook_count(tiny_gpt2) == 0
    assert_weights_equal(tiny_gpt2, before)
    with pytest.raises(ValueError):
        late.value


@pytest.mark.parametrize("max_new_tokens, error, words", [
    (0, ValueError, "max_new_tokens=0 generates nothing"),
    (-2, ValueError, "max_new_tokens=-2 generates nothing"),
    ("3", TypeError, "must be an int"),
])
def test_max_new_tokens_must_be_a_positive_int(gpt2_lm, max_new_tokens, error, words):
    with pytest.raises(error) as caught:
        gpt2_lm.generate(PROMPTS[0], max_new_tokens=max_new_tokens)  # the bad max_new_tokens
    assert str(caught.value).startswith(line_of(__file__, "# the bad max_new_tokens"))
    assert words in str(caught.value)


def test_the_prompt_and_new_tokens_must_fit_the_context(gpt2_lm, tiny_gpt2):
    prompt = "word" + " word" * (CONTEXT - 11)  # 118 tokens
    with pytest.raises(ValueError) as caught:
        with gpt2_lm.generate(prompt, max_new_tokens=20):  # the long generation
            pass
    assert str(caught.value).startswith(line_of(__file__, "# the long generation"))
    assert "the prompt has 118 tokens and max_new_tokens=20" in str(caught.value)
    assert f"lower max_new_tokens to {CONTEXT - 118}" in str(caught.value)
    assert hook_count(tiny_gpt2) == 0


def test_a_persistent_edit_reaches_every_generation_step(gpt2_lm):
    """`edited.all()` in an edit: the change applies at every step of every later generation."""
    prompt = "The Eiffel Tower is in"
    with gpt2_lm.edit() as edited:
        with edited.all():
            edited.transformer.h[0].output[:] *= 0.0
    with edited.generate(prompt, max_new_tokens=3) as tracer:
        tokens = tracer.result.save()
    hf = gpt2_lm._module
    handle = hf.transformer.h[0].register_forward_hook(lambda module, args, output: output * 0.0)
    try:
        ids = gpt2_lm.tokenizer(prompt, return_tensors="pt")
        expected = hf.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=END_OF_TEXT)
    finally:
        handle.remove()
    assert torch.equal(tokens.value, expected)
    with gpt2_lm.generate(prompt, max_new_tokens=3) as tracer:
        plain = tracer.result.save()
    assert not torch.equal(plain.value, expected)


def test_the_models_output_at_each_step_is_the_forward_output_not_the_generated_ids(gpt2_lm):
    with gpt2_lm.generate("The Eiffel Tower is in", max_new_tokens=2) as tracer:
        first = gpt2_lm.output.logits.save()
        tracer.next()
        second = gpt2_lm.output.logits.save()
        tokens = tracer.result.save()
    assert first.value.shape[1] == second.value.shape[1] == 1   # logits of the last position, per step
    assert torch.equal(first.value[0, -1].argmax(), tokens.value[0, -2])
    assert torch.equal(second.value[0, -1].argmax(), tokens.value[0, -1])
