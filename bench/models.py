"""The models and inputs every benchmark uses: random-weight GPT-2s, seeded, so runs are comparable.

In [1]: model = tiny_gpt2()                # 2 blocks of width 64, vocabulary 1024: the forward takes ~1 ms,
                                          # so a trace's fixed cost is visible
In [2]: ids = token_ids(model, seq=32)     # a (1, 32) tensor of random token ids

The tiny model's vocabulary is 1024 rather than GPT-2's 50257: a 64×50257 output layer would swamp the fixed
cost being measured. ``gpt2_small`` has GPT-2 small's real shape (12 blocks of width 768, 50257 tokens).
Models are in eval mode; nothing here downloads anything.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel


def tiny_gpt2(n_layer: int = 2) -> GPT2LMHeadModel:
    """A GPT-2 of width 64 (4 heads), vocabulary 1024, with ``n_layer`` blocks."""
    return _build(GPT2Config(n_layer=n_layer, n_embd=64, n_head=4, vocab_size=1024, n_positions=1024,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0))


def gpt2_small() -> GPT2LMHeadModel:
    """A GPT-2-small-shaped model (12 blocks, width 768, 12 heads, vocabulary 50257) with random weights."""
    return _build(GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, pad_token_id=50256))


def token_ids(model: GPT2LMHeadModel, seq: int = 32, batch: int = 1, seed: int = 1) -> torch.Tensor:
    """Random token ids of shape ``(batch, seq)`` for ``model``'s vocabulary (never the end-of-text token)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, model.config.vocab_size - 1, (batch, seq), generator=generator)


def _build(config: GPT2Config) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval()
