"""tracer.cache(): every module's output in one pass, against a full dump by hand-written hooks."""

from __future__ import annotations

import pytest
import torch

from language_fixtures import END_OF_TEXT, encode, hook_count


def hook_dump(model: torch.nn.Module, run, inputs: bool = False) -> list[dict]:
    """Run ``run()`` with a forward hook on every submodule; one ``{path: output}`` dict per forward pass."""
    passes: list[dict] = []
    handles = [model.register_forward_pre_hook(lambda *_: passes.append({}))]
    for path, module in model.named_modules():
        if not path:
            continue

        def keep(module, args, kwargs, output, path=path):
            passes[-1].setdefault(path, (output, (args, kwargs)))
        handles.append(module.register_forward_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return [{path: pair[1] if inputs else pair[0] for path, pair in each.items()} for each in passes]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b)


def test_the_cache_holds_every_modules_output(any_lm, gpt2_tok):
    ids = encode(gpt2_tok, "The Eiffel Tower is in")
    with any_lm.trace("The Eiffel Tower is in") as tracer:
        cache = tracer.cache()
    model = any_lm._module
    kwargs = {"position_ids": torch.arange(ids.shape[1])[None]} if "position_ids" in any_lm._forward_parameters else {}
    expected, = hook_dump(model, lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs))
    assert set(cache.value) == set(expected)
    for path, output in expected.items():
        assert same(cache.value[path], output), path
    assert hook_count(model) == 0


def test_named_modules_inputs_and_zero_copy(net, x):
    with net.trace(x) as tracer:
        cache = tracer.cache(modules=["layer1", net.layer2], include_inputs=True)
        hidden = net.layer1.output.save()
    assert list(cache.value) == ["layer1", "layer2"]
    assert cache.value["layer1"] is hidden.value  # the very tensor the model produced
    assert torch.equal(cache.value.inputs["layer2"][0][0], hidden.value)
    assert torch.equal(cache.value.inputs["layer1"][0][0], x)


def test_device_and_dtype_store_converted_copies(net, x):
    with net.trace(x) as tracer:
        cache = tracer.cache(dtype=torch.float16, device="cpu")
    with torch.no_grad():
        assert cache.value["layer2"].dtype == torch.float16
        assert torch.equal(cache.value["layer2"], net._module(x).half())


def test_an_unknown_module_is_named(net, x):
    with pytest.raises(KeyError, match="layer3"):
        with net.trace(x) as tracer:
            tracer.cache(modules=["layer3"])


def test_generation_caches_every_step(gpt2_lm, tiny_gpt2, gpt2_tok):
    with gpt2_lm.generate("Hello world", max_new_tokens=3) as tracer:
        cache = tracer.cache(modules=["transformer.h.0", "lm_head"], include_inputs=True)
    ids = encode(gpt2_tok, "Hello world")
    expected = hook_dump(tiny_gpt2, lambda: tiny_gpt2.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
        pad_token_id=END_OF_TEXT))
    assert len(cache.value["lm_head"]) == 3
    for step in range(3):
        assert torch.equal(cache.value["lm_head"][step], expected[step]["lm_head"])
        assert torch.equal(cache.value["transformer.h.0"][step][0], expected[step]["transformer.h.0"][0])
    assert cache.value.inputs["transformer.h.0"][1][0][0].shape[1] == 1  # a decoding step reads one token
