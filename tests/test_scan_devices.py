"""Devices: inputs, saved values and replacements on the model's device, a model split across devices, and scans of
models that accelerate's device hooks wrap. Tests marked ``cuda`` need a GPU and are skipped without one."""

from __future__ import annotations

import pytest
import torch
from accelerate import dispatch_model
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
        assert hidden.shape == (3, 10)
        net.layer1.output[:, 0] = torch.ones(3)   # a CPU replacement into a GPU value
        out = net.output.save()
    with torch.no_grad():
        expected_hidden = module.layer1(x.to(where))
        patched = expected_hidden.clone()
        patched[:, 0] = 1
        expected = module.layer2(patched)
    assert hidden.value.device.type == where and out.value.device.type == where
    assert torch.allclose(out.value, expected, atol=1e-6)


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
    split = dispatch_model(make_tiny_gpt2(), device_map={
        "transformer.wte": 0, "transformer.wpe": 0, "transformer.drop": 0, "transformer.h.0": 0,
        "transformer.h.1": "cpu", "transformer.ln_f": 0, "lm_head": 0})
    lm = LanguageModel(split)
    with lm.trace(ids):
        first = lm.transformer.h[0].output.save()
        second = lm.transformer.h[1].output.save()
        lm.transformer.h[1].output[:] = lm.transformer.h[1].output * 1  # an edit on the CPU part
        logits = lm.lm_head.output.save()
    assert first.value.device.type == "cuda" and second.value.device.type == "cpu"
    assert torch.allclose(first.value.cpu(), expected[0], atol=1e-5)
    assert torch.allclose(second.value, expected[1], atol=1e-5)
    assert torch.allclose(logits.value.cpu(), expected[2], atol=1e-4)
