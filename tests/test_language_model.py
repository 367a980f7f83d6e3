"""LanguageModel: inputs, left-padded batches, HF module paths, loading, devices and bad input.

Ground truth is the plain Hugging Face model: its own forward pass and hand-written hooks on it.
"""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from language_fixtures import (
    CONTEXT, END_OF_TEXT, PROMPTS, assert_weights_equal, encode, hf_positions, hook_count, left_padded, line_of, weights)
from nnsight_magic.intervention.envoy import Envoy
from nnsight_magic.models.language import LanguageModel


# ------------------------------------------------------------------------------------------- module paths
def test_module_paths_are_the_hugging_face_ones(gpt2_lm, tiny_gpt2, llama_lm, tiny_llama):
    assert isinstance(gpt2_lm.transformer.h[1], Envoy)
    assert gpt2_lm.transformer.h[1]._module is tiny_gpt2.transformer.h[1]
    assert gpt2_lm.lm_head._module is tiny_gpt2.lm_head
    assert llama_lm.model.layers[1].mlp._module is tiny_llama.model.layers[1].mlp
    assert gpt2_lm.config is tiny_gpt2.config
    assert gpt2_lm.tokenizer("Hello world")["input_ids"] == [15496, 995]


def test_a_string_traces_exactly_like_the_plain_forward_pass(gpt2_lm, tiny_gpt2, gpt2_tok):
    input_ids = encode(gpt2_tok, PROMPTS[1])
    with gpt2_lm.trace(PROMPTS[1]):
        hidden = gpt2_lm.transformer.h[0].output.save()
        logits = gpt2_lm.lm_head.output.save()
    captured = []
    handle = tiny_gpt2.transformer.h[0].register_forward_hook(lambda module, args, output: captured.append(output))
    with torch.no_grad():
        expected = tiny_gpt2(input_ids).logits
    handle.remove()
    assert torch.equal(logits.value, expected)  # a plain trace gives logits for every position
    assert torch.equal(hidden.value, captured[0])
    assert hook_count(tiny_gpt2) == 0


def test_every_input_form_gives_the_same_logits(gpt2_lm, gpt2_tok):
    text = PROMPTS[1]
    ids = encode(gpt2_tok, text)
    forms = [text, [text], ids, ids[0], ids[0].tolist(), [ids[0].tolist()], gpt2_tok(text, return_tensors="pt"),
             dict(gpt2_tok(text))]
    results = []
    for form in forms:
        with gpt2_lm.trace(form):
            results.append(gpt2_lm.lm_head.output.save())
    with gpt2_lm.trace(input_ids=ids, attention_mask=torch.ones_like(ids)):
        results.append(gpt2_lm.lm_head.output.save())
    assert len(results) == 9
    for result in results:
        assert torch.equal(result.value, results[0].value)


def test_a_right_padded_tokenizer_output_is_repadded_on_the_left(gpt2_lm, gpt2_tok):
    input_ids = torch.tensor([[15496, 995, 0, 0], [464, 3139, 286, 4881]])      # row 0 padded on the right
    attention_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    with gpt2_lm.trace({"input_ids": input_ids, "attention_mask": attention_mask}):
        batched = gpt2_lm.lm_head.output[:, -1].save()
        inputs = gpt2_lm.inputs.save()
    with gpt2_lm.trace("Hello world"):
        alone = gpt2_lm.lm_head.output[:, -1].save()
    model_kwargs = inputs.value[1]
    assert model_kwargs["input_ids"][0].tolist() == [END_OF_TEXT, END_OF_TEXT, 15496, 995]
    assert model_kwargs["attention_mask"][0].tolist() == [0, 0, 1, 1]
    # the batched matrix products add up in another order than a single row's, hence a tolerance
    torch.testing.assert_close(batched.value[0], alone.value[0], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- batching
def test_batching_never_changes_a_prompts_logits(any_lm, gpt2_tok):
    with any_lm.trace(PROMPTS):
        logits = any_lm.lm_head.output.save()
    width = logits.value.shape[1]
    assert width == max(len(gpt2_tok(text)["input_ids"]) for text in PROMPTS)
    for row, text in enumerate(PROMPTS):
        ids = encode(gpt2_tok, text)
        with torch.no_grad():
            alone = any_lm._module(ids).logits[0]
        # rows of a batch go through matrix products of another shape (another summation order): a tolerance
        torch.testing.assert_close(logits.value[row, width - ids.shape[1]:], alone, atol=1e-5, rtol=1e-5)


def test_invokes_batch_like_a_list_of_prompts(any_lm):
    with any_lm.trace(PROMPTS):
        together = any_lm.lm_head.output[:, -1].save()
    with any_lm.trace() as tracer:
        parts = []
        for text in PROMPTS:
            with tracer.invoke(text):
                parts.append(any_lm.lm_head.output[:, -1].save())
        with tracer.invoke():
            whole = any_lm.lm_head.output[:, -1].save()
    assert torch.equal(torch.cat([part.value for part in parts]), together.value)
    assert torch.equal(whole.value, together.value)


def test_the_model_sees_left_padding_a_mask_and_position_ids_from_each_prompts_start(any_lm, gpt2_tok):
    with any_lm.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            pass
        with tracer.invoke([PROMPTS[2], PROMPTS[1]]):
            pass
        with tracer.invoke():
            inputs = any_lm.inputs.save()
    expected_ids, expected_mask = left_padded(gpt2_tok, [PROMPTS[0], PROMPTS[2], PROMPTS[1]])
    kwargs = inputs.value[1]
    assert torch.equal(kwargs["input_ids"], expected_ids)
    assert torch.equal(kwargs["attention_mask"], expected_mask)
    assert torch.equal(kwargs["position_ids"], hf_positions(expected_mask))


def test_an_edit_in_one_invoke_equals_a_hook_on_its_row(gpt2_lm, tiny_gpt2, gpt2_tok):
    with gpt2_lm.trace() as tracer:
        with tracer.invoke(PROMPTS[0]):
            untouched = gpt2_lm.lm_head.output.save()
        with tracer.invoke(PROMPTS[1]):
            gpt2_lm.transformer.h[0].output[:, -1] = 0
            edited = gpt2_lm.lm_head.output.save()
    input_ids, attention_mask = left_padded(gpt2_tok, PROMPTS[:2])

    def zero_last_of_row_1(module, args, output):
        output = output.clone()
        output[1, -1] = 0
        return output

    handle = tiny_gpt2.transformer.h[0].register_forward_hook(zero_last_of_row_1)
    with torch.no_grad():
        expected = tiny_gpt2(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=hf_positions(attention_mask)).logits
    handle.remove()
    assert torch.equal(untouched.value[0], expected[0])
    assert torch.equal(edited.value[0], expected[1])


def test_forward_options_reach_the_model(gpt2_lm, tiny_gpt2, gpt2_tok):
    with gpt2_lm.trace(PROMPTS[0], output_hidden_states=True):
        states = gpt2_lm.output.hidden_states.save()
    with torch.no_grad():
        expected = tiny_gpt2(encode(gpt2_tok, PROMPTS[0]), output_hidden_states=True).hidden_states
    assert len(states.value) == len(expected) == 3
    for got, want in zip(states.value, expected):
        assert torch.equal(got, want)


def test_shapes_are_known_while_building(gpt2_lm, gpt2_tok):
    tokens = len(gpt2_tok(PROMPTS[1])["input_ids"])
    with gpt2_lm.scan(PROMPTS[1]):
        shape = gpt2_lm.transformer.h[1].output.shape
        logits_shape = gpt2_lm.lm_head.output.shape
    assert shape == (1, tokens, 64)
    assert logits_shape == (1, tokens, 50257)


# ---------------------------------------------------------------------------------------- loading, devices
def test_a_local_directory_loads_with_from_pretrained_keywords(tmp_path, gpt2_tok, tiny_gpt2):
    tiny_gpt2.save_pretrained(tmp_path)
    gpt2_tok.save_pretrained(tmp_path)
    for keywords in ({}, {"device_map": "cpu"}, {"device_map": "auto"}, {"dtype": torch.float64}):
        lm = LanguageModel(str(tmp_path), **keywords)
        assert lm.tokenizer("Hello world")["input_ids"] == [15496, 995]
        assert lm.device == torch.device("cpu")
        assert next(lm._module.parameters()).dtype == keywords.get("dtype", torch.float32)
        with lm.trace(PROMPTS[1]):
            logits = lm.lm_head.output.save()
        with torch.no_grad():
            expected = tiny_gpt2.double()(encode(gpt2_tok, PROMPTS[1])).logits if "dtype" in keywords else \
                tiny_gpt2(encode(gpt2_tok, PROMPTS[1])).logits
        tiny_gpt2.float()
        assert torch.equal(logits.value, expected)


def test_inputs_go_to_the_device_of_the_input_embeddings(gpt2_lm, tiny_gpt2, monkeypatch):
    assert gpt2_lm.device == tiny_gpt2.transformer.wte.weight.device
    # no GPU here: pretend the embeddings live on the "meta" device and check that every input tensor follows
    monkeypatch.setattr(LanguageModel, "device", property(lambda self: torch.device("meta")))
    first = gpt2_lm._prepare_input(torch.tensor([15496, 995], dtype=torch.int32))
    second = gpt2_lm._prepare_input(["Hello world", "A B C"])
    batch, groups = gpt2_lm._batch_inputs([first, second])
    for prepared in (first, second, batch):
        assert {tensor.device.type for tensor in prepared.kwargs.values()} == {"meta"}
    assert first.kwargs["input_ids"].dtype == torch.long
    assert batch.kwargs["input_ids"].shape == (3, 3) and groups == [(0, 1), (1, 2)]


def test_a_repo_id_that_cannot_be_loaded_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network in a test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError) as caught:
        LanguageModel("nnsight-magic-tests/not-a-model", cache_dir=str(tmp_path))  # the offline load line
    message = str(caught.value)
    assert message.startswith(line_of(__file__, "# the offline load line"))
    assert "'nnsight-magic-tests/not-a-model'" in message
    assert "load_embedded_model()" in message and "local directory" in message


def test_from_pretrained_keywords_need_a_name(tiny_gpt2):
    with pytest.raises(TypeError, match="device_map"):
        LanguageModel(tiny_gpt2, device_map="auto")


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("prompt, expected_error, words", [
    ("", ValueError, "zero tokens"),
    (["Hello", ""], ValueError, "prompt 1 has zero tokens"),
    ([], ValueError, "list of prompts is empty"),
    ("word" + " word" * CONTEXT, ValueError, f"{CONTEXT + 1} tokens, but the model reads at most {CONTEXT}"),
    (torch.zeros(1, 3), TypeError, "must be integers"),
    (torch.zeros(1, 1, 3, dtype=torch.long), ValueError, "1-D (one prompt) or 2-D"),
    (3.5, TypeError, "not float"),
])
def test_bad_input_is_a_clear_error_at_the_users_line(gpt2_lm, tiny_gpt2, prompt, expected_error, words):
    before = weights(tiny_gpt2)
    with pytest.raises(expected_error) as caught:
        with gpt2_lm.trace(prompt):  # the bad input line
            gpt2_lm.lm_head.output.save()
    assert str(caught.value).startswith(line_of(__file__, "# the bad input line"))
    assert words in str(caught.value)
    assert hook_count(tiny_gpt2) == 0
    assert_weights_equal(tiny_gpt2, before)
    with gpt2_lm.trace("Hello"):  # the model is usable again: no trace was left open
        gpt2_lm.lm_head.output.save()


def test_a_bad_invoke_names_its_line(gpt2_lm, tiny_gpt2):
    with pytest.raises(ValueError) as caught:
        with gpt2_lm.trace() as tracer:
            with tracer.invoke("Hello"):
                pass
            with tracer.invoke(""):  # the empty invoke
                pass
    assert str(caught.value).startswith(line_of(__file__, "# the empty invoke"))
    assert hook_count(tiny_gpt2) == 0


def test_text_without_a_tokenizer_asks_for_one(tiny_gpt2):
    lm = LanguageModel(tiny_gpt2)
    with pytest.raises(TypeError, match="no tokenizer"):
        with lm.trace("Hello"):
            pass
    with lm.trace(torch.tensor([[15496, 995]])):  # token ids need no tokenizer
        logits = lm.lm_head.output.save()
    assert logits.value.shape == (1, 2, 50257)


def test_an_invoke_refuses_model_options(gpt2_lm):
    with pytest.raises(TypeError, match="output_attentions"):
        with gpt2_lm.trace() as tracer:
            with tracer.invoke("Hello", output_attentions=True):
                pass


def test_hidden_states_recorded_by_hf_hooks_are_known_while_building(gpt2_lm):
    """Hugging Face collects hidden states with forward hooks; the shape scan keeps them working."""
    with gpt2_lm.trace(PROMPTS[0], output_hidden_states=True):
        third = gpt2_lm.output.hidden_states[2]
        assert third.shape[-1] == 64
        kept = third.save()
    with gpt2_lm.trace(PROMPTS[0], output_hidden_states=True):
        again = gpt2_lm.output.hidden_states[2].save()
    assert torch.equal(kept.value, again.value)
