"""One symbolic scan serves every prompt length (tracing/symbolic.py): shapes exact for each length, values unchanged,
and a model that branches on the length falls back to one scan per length with one warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from nnsight_magic.models.language import LanguageModel
from nnsight_magic.tracing.shapes import ModuleScan
from nnsight_magic.tracing.symbolic import SymbolicScan

from language_fixtures import make_tiny_gpt2, make_tiny_llama

LENGTHS = [3, 9, 5, 12, 2, 7]


@pytest.fixture
def scans(monkeypatch) -> dict[str, int]:
    """Counts of fake forward passes (``ModuleScan.run``) and of symbolic scans (``SymbolicScan.run``)."""
    counts = {"fake passes": 0, "symbolic": 0}
    module_run, symbolic_run = ModuleScan.run.__func__, SymbolicScan.run.__func__

    def count_module(cls, *args, **kwargs):
        counts["fake passes"] += 1
        return module_run(cls, *args, **kwargs)

    def count_symbolic(cls, *args, **kwargs):
        counts["symbolic"] += 1
        return symbolic_run(cls, *args, **kwargs)

    monkeypatch.setattr(ModuleScan, "run", classmethod(count_module))
    monkeypatch.setattr(SymbolicScan, "run", classmethod(count_symbolic))
    return counts


def ids_of(length: int, rows: int = 1) -> torch.Tensor:
    return torch.arange(1, rows * length + 1).reshape(rows, length) * 37 % 50000


def block_output_by_hook(model: torch.nn.Module, block: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    seen = []
    handle = block.register_forward_hook(lambda module, args, output: seen.append(output.clone()))
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama], ids=["gpt2", "llama"])
def test_every_prompt_length_gets_exact_shapes_from_one_symbolic_scan(make, scans):
    hf = make()
    lm = LanguageModel(hf)
    blocks = hf.transformer.h if hasattr(hf, "transformer") else hf.model.layers
    envoy_blocks = lm.transformer.h if hasattr(hf, "transformer") else lm.model.layers
    for length in LENGTHS:
        with lm.trace(ids_of(length)):
            h = envoy_blocks[1].output
            assert h.shape == (1, length, 64)
            assert lm.lm_head.output.shape == (1, length, 50257)
            assert h[:, -1].softmax(-1).shape == (1, 64)
            saved = h.save()
        assert torch.equal(saved.value, block_output_by_hook(hf, blocks[1], ids_of(length)))
    # the first length: one concrete fake pass; the second: the symbolic scan (itself one fake pass); then none
    assert scans == {"fake passes": 2, "symbolic": 1}


def test_batch_sizes_of_two_and_more_share_the_symbolic_scan(scans):
    lm = LanguageModel(make_tiny_gpt2())
    for rows, length in [(2, 4), (3, 6), (5, 3), (2, 11)]:
        with lm.scan(ids_of(length, rows)):
            assert lm.transformer.h[0].output.shape == (rows, length, 64)
            assert lm.output.logits.shape == (rows, length, 50257)
    assert scans["symbolic"] == 1 and scans["fake passes"] == 2


def test_a_length_that_equals_the_batch_size_keeps_its_own_symbols():
    lm = LanguageModel(make_tiny_gpt2())
    for rows, length in [(2, 5), (3, 3), (4, 2)]:
        with lm.scan(ids_of(length, rows)):
            assert lm.transformer.h[0].output.shape == (rows, length, 64)
            assert lm.transformer.h[0].attn.output[0].shape == (rows, length, 64)   # (output, weights)
            assert lm.transformer.h[0].attn.inputs[1]["attention_mask"].shape[-2:] == (length, length)


class LengthBranch(torch.nn.Module):
    """Wraps a block's MLP and branches on the sequence length (as a model may): symbolic sizes cannot follow."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, hidden):
        if hidden.shape[1] % 2 == 0:
            return self.inner(hidden)
        return self.inner(hidden) * 1.0


def test_a_model_that_branches_on_the_length_gets_one_scan_per_length_and_one_warning(scans):
    hf = make_tiny_gpt2()
    hf.transformer.h[0].mlp = LengthBranch(hf.transformer.h[0].mlp)
    lm = LanguageModel(hf)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for length in LENGTHS:
            with lm.trace(ids_of(length)):
                assert lm.transformer.h[0].mlp.output.shape == (1, length, 64)
                saved = lm.transformer.h[1].output.save()
            assert torch.equal(saved.value, block_output_by_hook(hf, hf.transformer.h[1], ids_of(length)))
    messages = [str(each.message) for each in caught]
    assert len(messages) == 1 and "scanned once per input shape" in messages[0]
    assert "depends on the batch size or the sequence length" in messages[0]
    # one concrete pass per length, plus the symbolic attempt that found the branch
    assert scans == {"fake passes": len(LENGTHS) + 1, "symbolic": 1}


@pytest.mark.parametrize("make", [make_tiny_gpt2, make_tiny_llama], ids=["gpt2", "llama"])
def test_decoding_step_shapes_for_every_prompt_length_from_one_scan(make, scans):
    hf = make()
    lm = LanguageModel(hf)
    path = lm.transformer.h[0] if hasattr(hf, "transformer") else lm.model.layers[0]
    for length in [4, 7, 3, 10]:
        with lm.generate(ids_of(length), max_new_tokens=2) as tracer:
            assert path.output.shape == (1, length, 64)
            with tracer.iter[1]:
                assert path.output.shape == (1, 1, 64)
                assert lm.lm_head.output.shape == (1, 1, 50257)
            tokens = tracer.result.save()
            assert tokens.shape == (1, length + 2)
        expected = hf.generate(ids_of(length), attention_mask=torch.ones_like(ids_of(length)), max_new_tokens=2,
                               do_sample=False, pad_token_id=50256)
        assert torch.equal(tokens.value, expected)
    # prompt pass and decoding step: each one concrete scan, then one symbolic scan (the decoding step's has
    # two fake passes: the prompt, then the step)
    assert scans["symbolic"] == 2
    assert scans["fake passes"] == 1 + 2 + 1 + 2
