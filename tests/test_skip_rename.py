"""Aliases (rename= and each family's standard names) and module.skip(value), against plain Hugging Face runs."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

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


class Counting(torch.nn.Linear):
    """A Linear that counts how often its forward really runs (on real tensors)."""

    runs = 0

    def forward(self, value):
        Counting.runs += 0 if isinstance(value, FakeTensor) else 1
        return super().forward(value)


@pytest.mark.parametrize("validate", [True, False])
def test_skip_replaces_the_output_without_running_the_module(x, validate):
    torch.manual_seed(0)
    tiny = torch.nn.Sequential(Counting(5, 10), torch.nn.Linear(10, 2))
    net = NNsight(tiny)
    Counting.runs = 0
    with net.trace(x, validate=validate):
        net[0].skip(torch.ones(3, 10))
        out = net.output.save()
    assert Counting.runs == 0
    with torch.no_grad():
        assert torch.equal(out.value, tiny[1](torch.ones(3, 10)))
        assert Counting.runs == 0
        tiny(x)
    assert Counting.runs == 1 and hook_count(tiny) == 0 and "forward" not in tiny[0].__dict__


def test_skipping_a_block_equals_the_model_with_the_block_removed(any_lm, gpt2_tok):
    model = any_lm._module
    with any_lm.trace("The Eiffel Tower is in"):
        any_lm.layers[1].skip(any_lm.layers[1].input)
        logits = any_lm.output.logits.save()
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    removed = blocks[1]
    del blocks[1]
    try:
        ids = encode(gpt2_tok, "The Eiffel Tower is in")
        kwargs = {} if hasattr(model, "transformer") else {"position_ids": torch.arange(ids.shape[1])[None]}
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs).logits
    finally:
        blocks.append(removed)
    assert torch.allclose(logits.value, expected, atol=1e-6)
    assert "forward" not in removed.__dict__ and hook_count(model) == 0
