"""Lazy loading: ``LanguageModel(directory)`` builds its tree on the meta device and loads at the first real run.

Ground truth: the same saved tiny GPT-2 / Llama loaded eagerly (``dispatch=True``) and the plain Hugging Face model
that was saved, run on the same input. ``from_pretrained`` is counted, so "no weights read" is exact.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from language_fixtures import PROMPTS, encode, gpt2_tok, line_of, make_tiny_gpt2, make_tiny_llama  # noqa: F401
from magic_shell import ip, ok  # noqa: F401  (the ip fixture)
from nnsight_magic.intervention.tracer import Tracer
from nnsight_magic.models import loading
from nnsight_magic.models.language import LanguageModel

MAKERS = {"gpt2": make_tiny_gpt2, "llama": make_tiny_llama}
LAYERS = {"gpt2": "transformer.h", "llama": "model.layers"}


@pytest.fixture(params=sorted(MAKERS))
def saved(request, tmp_path, gpt2_tok):
    """``(family, directory, the plain HF model that was saved there)``; the GPT-2 tokenizer saved beside it."""
    model = MAKERS[request.param]()
    model.save_pretrained(tmp_path)
    gpt2_tok.save_pretrained(tmp_path)
    return request.param, str(tmp_path), model


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The names ``AutoModelForCausalLM.from_pretrained`` is called with from now on."""
    calls: list[str] = []
    original = AutoModelForCausalLM.from_pretrained

    def counting(name, *args, **kwargs):
        calls.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    return calls


def layers_of(lm: LanguageModel, family: str):
    envoy = lm
    for name in LAYERS[family].split("."):
        envoy = getattr(envoy, name)
    return envoy


def hf_layer_output(model: torch.nn.Module, family: str, layer: int, input_ids: torch.Tensor) -> tuple:
    """``(output of block ``layer``, logits)`` of the plain HF model, read with a hand-written hook."""
    block = model.get_submodule(LAYERS[family])[layer]
    seen = []
    handle = block.register_forward_hook(lambda _, __, output: seen.append(output[0] if isinstance(output, tuple)
                                                                            else output))
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits
    finally:
        handle.remove()
    return seen[0], logits


def test_a_lazy_model_is_on_meta_and_scans_with_the_right_shapes_without_loading(saved, loads, gpt2_tok):
    family, directory, model = saved
    lm = LanguageModel(directory, dispatch=False)
    assert not lm.dispatched
    assert {parameter.device.type for parameter in lm._module.parameters()} == {"meta"}
    ids = encode(gpt2_tok, PROMPTS[1])
    with lm.scan(PROMPTS[1]):
        hidden = layers_of(lm, family)[1].output.save()
        shapes = (tuple(hidden.shape), tuple(lm.lm_head.output.shape), lm.lm_head.output.dtype)
    expected_hidden, expected_logits = hf_layer_output(model, family, 1, ids)
    assert shapes == (tuple(expected_hidden.shape), tuple(expected_logits.shape), torch.float32)
    assert type(lm._module).__name__ in repr(lm) and "meta" not in repr(lm).lower()  # print(lm) needs no weights
    assert loads == [] and not lm.dispatched


def test_the_first_trace_loads_into_the_same_envoys_and_matches_the_eager_model(saved, gpt2_tok):
    family, directory, model = saved
    eager = LanguageModel(directory, dispatch=True)
    assert eager.dispatched and next(eager._module.parameters()).device.type == "cpu"
    lm = LanguageModel(directory)  # lazy is the default for a name, as in nnsight
    block, head, layers = layers_of(lm, family)[0], lm.lm_head, layers_of(lm, family)
    values = {}
    for each in (lm, eager):
        with each.trace(PROMPTS[1]):
            hidden = layers_of(each, family)[0].output.save()
            logits = each.lm_head.output.save()
        values[id(each)] = (hidden.value, logits.value)
    assert lm.dispatched
    assert layers_of(lm, family)[0] is block and lm.lm_head is head and layers_of(lm, family) is layers
    assert block._module is lm._module.get_submodule(LAYERS[family])[0]
    assert next(lm._module.parameters()).device.type == "cpu"
    for got, want in zip(values[id(lm)], values[id(eager)]):
        assert torch.equal(got, want)
    expected_hidden, expected_logits = hf_layer_output(model, family, 0, encode(gpt2_tok, PROMPTS[1]))
    assert torch.equal(values[id(lm)][0], expected_hidden) and torch.equal(values[id(lm)][1], expected_logits)


def test_weights_load_once_at_the_first_real_run_and_never_again(saved, loads):
    family, directory, _ = saved
    lm = LanguageModel(directory)
    with lm.scan("Hello world"):
        layers_of(lm, family)[0].output.shape
    assert loads == []
    for _ in range(2):
        with lm.trace("Hello world"):
            layers_of(lm, family)[0].output.save()
    with lm.generate("Hello", max_new_tokens=2):
        pass
    lm.dispatch()
    assert loads == [directory]


def test_generation_on_a_lazy_model_matches_hugging_face(saved, gpt2_tok):
    _, directory, model = saved
    lm = LanguageModel(directory)
    with lm.generate(PROMPTS[0], max_new_tokens=4) as tracer:
        ids = tracer.result.save()
    with torch.no_grad():
        expected = model.generate(encode(gpt2_tok, PROMPTS[0]), max_new_tokens=4, do_sample=False,
                                  pad_token_id=gpt2_tok.eos_token_id)
    assert torch.equal(ids.value, expected)


def test_dispatch_true_loads_at_construction(saved, loads):
    _, directory, _ = saved
    lm = LanguageModel(directory, dispatch=True)
    assert loads == [directory] and lm.dispatched
    assert {parameter.device.type for parameter in lm._module.parameters()} == {"cpu"}


def test_dispatch_and_calling_the_model_load_it(saved, loads, gpt2_tok):
    family, directory, model = saved
    lm = LanguageModel(directory)
    block = layers_of(lm, family)[1]
    assert lm.dispatch() is lm and lm.dispatched and layers_of(lm, family)[1] is block
    other = LanguageModel(directory)
    ids = encode(gpt2_tok, PROMPTS[2])
    with torch.no_grad():
        assert torch.equal(other(input_ids=ids).logits, model(input_ids=ids).logits)  # a plain call loads too
    assert loads == [directory, directory]


def test_from_pretrained_keywords_shape_the_meta_tree_and_the_load(saved, gpt2_tok):
    family, directory, model = saved
    for keywords in ({"device_map": "cpu"}, {"device_map": "auto"}, {"dtype": torch.float64}):
        lm = LanguageModel(directory, **keywords)
        dtype = keywords.get("dtype", torch.float32)
        assert {(p.device.type, p.dtype) for p in lm._module.parameters()} == {("meta", dtype)}
        with lm.scan(PROMPTS[1]):
            scanned = lm.lm_head.output.dtype
        with lm.trace(PROMPTS[1]):
            logits = lm.lm_head.output.save()
        assert scanned == logits.value.dtype == dtype and lm.device == torch.device("cpu")
        with torch.no_grad():
            expected = model.to(dtype)(encode(gpt2_tok, PROMPTS[1])).logits
        model.float()
        assert torch.equal(logits.value, expected)


def test_an_edited_copy_made_before_loading_shares_the_one_load(saved, loads, gpt2_tok):
    family, directory, model = saved
    lm = LanguageModel(directory)
    with lm.edit() as edited:
        layers_of(edited, family)[0].output[:] = 0
    with edited.trace(PROMPTS[0]):
        zeroed = layers_of(edited, family)[0].output.save()
    with lm.trace(PROMPTS[0]):
        plain = layers_of(lm, family)[0].output.save()
    assert loads == [directory]
    assert torch.equal(zeroed.value, torch.zeros_like(zeroed.value))
    assert torch.equal(plain.value, hf_layer_output(model, family, 0, encode(gpt2_tok, PROMPTS[0]))[0])


def test_a_model_whose_weights_cannot_load_fails_at_the_users_trace_line(tmp_path, gpt2_tok):
    model = make_tiny_gpt2()
    model.save_pretrained(tmp_path)
    gpt2_tok.save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()  # the config is there, the weights are not
    lm = LanguageModel(str(tmp_path))
    with lm.scan("Hello"):
        shape = lm.transformer.h[0].output.shape
    assert shape == (1, 1, 64)
    with pytest.raises(OSError) as caught:
        with lm.trace("Hello"):  # the trace that needs weights
            lm.transformer.h[0].output.save()
    message = str(caught.value)
    assert message.startswith(line_of(__file__, "# the trace that needs weights"))
    assert str(tmp_path) in message and not lm.dispatched


def test_trace_scan_magic_on_a_lazy_model_needs_no_weights(ip, tmp_path, gpt2_tok, loads):  # noqa: F811
    make_tiny_gpt2().save_pretrained(tmp_path)
    gpt2_tok.save_pretrained(tmp_path)
    ip.user_ns["lm"] = LanguageModel(str(tmp_path))
    result = ok(ip, "%%trace lm 'Hello world' --scan\nh = lm.transformer.h[1].output\nh.shape\n")
    assert result.result == torch.Size([1, 2, 64])
    assert loads == [] and not ip.user_ns["lm"].dispatched


def test_moving_a_lazy_model_loads_it_first(saved, loads):
    _, directory, _ = saved
    lm = LanguageModel(directory)
    assert lm.to(torch.float64) is lm and loads == [directory]
    assert {parameter.dtype for parameter in lm._module.parameters()} == {torch.float64}


def test_a_run_that_did_not_start_from_trace_says_to_dispatch(saved, loads):
    family, directory, _ = saved
    lm = LanguageModel(directory)
    with pytest.raises(RuntimeError, match=r"weights are not loaded.*lm\.dispatch\(\) first"):
        with Tracer(lm, ("Hello world",), {}):  # a tracer made by hand, not by lm.trace: nothing loaded it
            layers_of(lm, family)[0].output.save()
    assert loads == [] and not lm.dispatched


def test_without_accelerate_the_tree_is_built_under_the_meta_device(saved, monkeypatch, gpt2_tok):
    family, directory, model = saved
    monkeypatch.setattr(loading, "_empty_weights", lambda: torch.device("meta"))  # as if accelerate were missing
    lm = LanguageModel(directory)
    assert {tensor.device.type for tensor in [*lm._module.parameters(), *lm._module.buffers()]} == {"meta"}
    ids = encode(gpt2_tok, PROMPTS[2])
    with lm.scan(PROMPTS[2]):
        shape = layers_of(lm, family)[1].output.shape
    with lm.trace(PROMPTS[2]):
        hidden = layers_of(lm, family)[1].output.save()
    expected, _ = hf_layer_output(model, family, 1, ids)
    assert shape == expected.shape and torch.equal(hidden.value, expected)
