"""Devices: inputs, saved values and replacements on the model's device, a model split across devices, and scans of
models that accelerate's device hooks wrap. Tests marked ``cuda`` need a GPU and are skipped without one."""

from __future__ import annotations

import warnings

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from accelerate.hooks import AlignDevicesHook, add_hook_to_module

from nnsight_magic import NNsight
from nnsight_magic.models.language import LanguageModel

from conftest import hook_count, make_tiny
from language_fixtures import make_tiny_gpt2

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                   reason="needs a CUDA GPU: torch.cuda.is_available() is False on this machine")


def block_outputs(model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Every GPT-2 block's output, by hand-written hooks, and the logits last."""
    seen = []
    handles = [block.register_forward_hook(lambda _, __, output: seen.append(output.clone()))
               for block in model.transformer.h]
    try:
        with torch.no_grad():
            seen.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def unavailable_shapes(caught: list[warnings.WarningMessage]) -> list[str]:
    """The "shapes are unavailable" warnings among ``caught``. A warning that a model is scanned once per length
    (its code guards on a size, which depends on the torch and transformers versions) is allowed: shapes stay exact."""
    return [str(each.message) for each in caught if "shapes are unavailable" in str(each.message)]


def test_a_model_wrapped_by_accelerate_device_hooks_scans_and_traces_exactly():
    hf = make_tiny_gpt2()
    for block in hf.transformer.h:
        add_hook_to_module(block, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    lm = LanguageModel(hf)
    for length in (7, 4, 9):                  # a concrete scan, the symbolic scan, a substituted one
        ids = torch.arange(1, length + 1)[None]
        with lm.trace(ids):
            assert lm.transformer.h[1].output.shape == (1, length, 64)
            saved = lm.transformer.h[1].output.save()
        assert torch.equal(saved.value, block_outputs(hf, ids)[1])
    assert all(hasattr(block, "_hf_hook") for block in hf.transformer.h) and hook_count(hf) == 0


@pytest.mark.cuda
@requires_cuda
def test_inputs_saves_and_replacements_live_on_the_models_device():
    where = "cuda"
    module = make_tiny().to(where)
    net = NNsight(module)
    x = torch.rand(3, 5)                      # built on the CPU, as a notebook user would
    with net.trace(x):
        hidden = net.layer1.output.save()
        assert hidden.shape == (3, 10) and hidden.device.type == where   # shapes from a scan on the GPU
        net.layer1.output[:, 0] = torch.ones(3)   # a CPU replacement into a GPU value
        shifted = (net.layer1.output + torch.ones(10)).save()   # a CPU operand, moved as the run moves it
        assert shifted.shape == (3, 10) and shifted.device.type == where
        out = net.output.save()
    with torch.no_grad():
        expected_hidden = module.layer1(x.to(where))
        patched = expected_hidden.clone()
        patched[:, 0] = 1
        expected = module.layer2(patched)
    assert hidden.value.device.type == where and out.value.device.type == where
    assert torch.allclose(out.value, expected, atol=1e-6)
    assert torch.allclose(shifted.value, patched + 1, atol=1e-6)
    assert hook_count(module) == 0


@pytest.mark.cuda
@requires_cuda
def test_a_language_model_on_the_gpu_gets_shapes_from_its_scans_and_exact_values():
    hf = make_tiny_gpt2().to("cuda")
    lm = LanguageModel(hf)
    for length in (5, 8, 3):
        ids = torch.arange(1, length + 1)[None]
        with lm.trace(ids):
            assert lm.transformer.h[0].output.shape == (1, length, 64)
            saved = lm.transformer.h[0].output.save()
        assert saved.value.device.type == "cuda"
        assert torch.allclose(saved.value, block_outputs(hf, ids.cuda())[0], atol=1e-5)


@pytest.mark.cuda
@requires_cuda
def test_a_device_map_split_runs_each_part_on_its_device():
    reference = make_tiny_gpt2()
    ids = torch.arange(1, 9)[None]
    expected = block_outputs(reference, ids)
    # main_device="cpu": block 1 runs on the CPU, the rest on the GPU (with a GPU main device, accelerate would
    # offload a "cpu" part instead: keep its weights on the CPU and run it on the GPU; see the next test)
    split = dispatch_model(make_tiny_gpt2(), main_device="cpu", device_map={
        "transformer.wte": 0, "transformer.wpe": 0, "transformer.drop": 0, "transformer.h.0": 0,
        "transformer.h.1": "cpu", "transformer.ln_f": 0, "lm_head": 0})
    lm = LanguageModel(split)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with lm.trace(ids):
            assert lm.transformer.h[0].output.shape == (1, 8, 64) and lm.transformer.h[1].output.device.type == "cpu"
            first = lm.transformer.h[0].output.save()
            second = lm.transformer.h[1].output.save()
            lm.transformer.h[1].output[:] = lm.transformer.h[1].output * 1  # an edit on the CPU part
            logits = lm.lm_head.output.save()
    assert not unavailable_shapes(caught)
    assert first.value.device.type == "cuda" and second.value.device.type == "cpu"
    assert torch.allclose(first.value.cpu(), expected[0], atol=1e-5)
    assert torch.allclose(second.value, expected[1], atol=1e-5)
    assert torch.allclose(logits.value.cpu(), expected[2], atol=1e-4)
    assert hook_count(split) == 0  # ours are gone; accelerate's (its `_hf_hook`s) stay


@pytest.mark.cuda
@requires_cuda
def test_a_part_offloaded_to_the_cpu_runs_on_the_gpu_and_has_shapes():
    reference = make_tiny_gpt2()
    expected = block_outputs(reference, torch.arange(1, 9)[None])
    offloaded = dispatch_model(make_tiny_gpt2(), device_map={
        "transformer.wte": 0, "transformer.wpe": 0, "transformer.drop": 0, "transformer.h.0": 0,
        "transformer.h.1": "cpu", "transformer.ln_f": 0, "lm_head": 0})
    assert offloaded.transformer.h[1].attn.c_attn.weight.device.type == "meta"  # its weights live in the hook
    lm = LanguageModel(offloaded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in (8, 5, 9):               # a concrete scan, the symbolic scan, a substituted one
            ids = torch.arange(1, length + 1)[None]
            with lm.trace(ids):
                assert lm.transformer.h[1].output.shape == (1, length, 64)
                assert lm.transformer.h[1].output.device.type == "cuda"
                second = lm.transformer.h[1].output.save()
                logits = lm.lm_head.output.save()
            if length == 8:
                assert torch.allclose(second.value.cpu(), expected[1], atol=1e-5)
                assert torch.allclose(logits.value.cpu(), expected[2], atol=1e-4)
            assert second.value.device.type == "cuda"
    assert not unavailable_shapes(caught)
    assert offloaded.transformer.h[1].attn.c_attn.weight.device.type == "meta"  # the scans loaded nothing
    assert hook_count(offloaded) == 0


def test_a_model_offloaded_by_accelerate_scans_without_loading_a_weight_and_traces_exactly():
    reference = make_tiny_gpt2()
    offloaded = cpu_offload(make_tiny_gpt2(), execution_device="cpu")  # weights in hooks, loaded at each call
    assert all(parameter.device.type == "meta" for parameter in offloaded.parameters())
    lm = LanguageModel(offloaded)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in (8, 5, 9):
            ids = torch.arange(1, length + 1)[None]
            with lm.trace(ids):
                assert lm.transformer.h[0].output.shape == (1, length, 64)
                first = lm.transformer.h[0].output.save()
                logits = lm.lm_head.output.save()
            expected = block_outputs(reference, ids)
            assert torch.allclose(first.value, expected[0], atol=1e-6)
            assert torch.allclose(logits.value, expected[2], atol=1e-5)
    assert not unavailable_shapes(caught)
    assert all(parameter.device.type == "meta" for parameter in offloaded.parameters())
    assert hook_count(offloaded) == 0 and hasattr(offloaded.transformer.h[0].attn.c_attn, "_hf_hook")
