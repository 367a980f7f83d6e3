"""Aliases (rename= and each family's standard names) and module.skip(value), against plain Hugging Face runs."""

from __future__ import annotations

import pytest
import torch

from nnsight_magic import LanguageModel, NNsight
from language_fixtures import encode, hook_count
from test_cache import same


def test_standard_aliases_run_one_notebook_on_gpt2_and_llama(any_lm, gpt2_tok):
    ids = encode(gpt2_tok, "Hello world")
    with any_lm.trace("Hello world"):
        hidden = any_lm.layers[0].output.save()
        attention = any_lm.layers[1].attn.output[0].save()
        mlp = any_lm.layers[1].mlp.output.save()
        embedded = any_lm.embed.output.save()
        final = any_lm.ln_final.output.save()
        logits = any_lm.unembed.output.save()
    model = any_lm._module
    gpt2 = hasattr(model, "transformer")
    base = model.transformer if gpt2 else model.model
    blocks = base.h if gpt2 else base.layers
    recorded = {}
    modules = {"hidden": blocks[0], "attention": blocks[1].attn if gpt2 else blocks[1].self_attn,
               "mlp": blocks[1].mlp, "embedded": base.wte if gpt2 else base.embed_tokens,
               "final": base.ln_f if gpt2 else base.norm, "logits": model.lm_head}
    handles = [module.register_forward_hook(lambda m, a, out, key=key: recorded.setdefault(key, out))
               for key, module in modules.items()]
    kwargs = {} if gpt2 else {"position_ids": torch.arange(ids.shape[1])[None]}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
    for handle in handles:
        handle.remove()
    assert same(hidden.value, recorded["hidden"])
    assert torch.equal(attention.value, recorded["attention"][0])
    for proxy, key in ((mlp, "mlp"), (embedded, "embedded"), (final, "final"), (logits, "logits")):
        assert torch.equal(proxy.value, recorded[key]), key


def test_rename_adds_names_and_keeps_the_real_ones(tiny):
    net = NNsight(tiny, rename={"layer1": "first", "layer2": "second"})
    x = torch.rand(2, 5)
    with net.trace(x):
        first = net.first.output.save()
        real = net.layer1.output.save()
    assert net.first._path == "layer1" and torch.equal(first.value, real.value)
    with pytest.raises(AttributeError, match="third"):
        net.third


def test_rename_with_a_path(tiny_gpt2, gpt2_tok):
    lm = LanguageModel(tiny_gpt2, tokenizer=gpt2_tok, rename={"transformer.h": "blocks"})
    assert lm.blocks[1]._path == "transformer.h.1" and lm.transformer.h[1]._path == "transformer.h.1"
    assert lm.unembed._path == "lm_head"  # the family's other standard names stay
