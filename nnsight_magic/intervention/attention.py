"""Attention patterns with any attention implementation: ``attn.pattern`` is recomputed from the module's input.

In [1]: lm = LanguageModel(model)                    # sdpa (the default) or eager: both work
In [2]: with lm.trace("The Eiffel Tower is in"):
   ...:     pattern = lm.layers[3].attn.pattern.save()  # (batch, heads, query, key) probabilities
In [3]: pattern.value.sum(-1)                          # every row sums to 1

``softmax(Q Kᵀ · scaling + mask)`` is computed from the attention module's own input (the hidden states, the
mask and, for rotary models, the position embeddings it is called with) and its projection weights, exactly as
eager attention computes its weights, while the model itself keeps its fast kernel (sdpa, flash). The values
are equal to eager attention's weights within float tolerance. Supported: GPT-2-style attention (``c_attn``) and
Llama-style attention (``q_proj``/``k_proj`` with rotary embeddings and grouped-query heads: Llama, SmolLM2,
Mistral, Qwen2) over one forward pass; generation steps after the first, which read keys from the cache, are
not supported yet, and neither is editing a pattern.
"""

from __future__ import annotations

from typing import Any

import torch

from .envoy import Envoy


def probabilities(query: torch.Tensor, key: torch.Tensor, mask: Any, scaling: float) -> torch.Tensor:
    """Eager attention's weights: ``softmax(query @ keyᵀ * scaling + mask)`` in float32, in the query's dtype.

    ``mask`` is what the attention module was called with: an additive float mask (eager), a boolean mask
    (``True`` = attend, sdpa), or ``None`` (causal, as sdpa and flash use then).
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scaling
    if mask is None:
        queries, keys = scores.shape[-2], scores.shape[-1]
        causal = torch.ones(queries, keys, dtype=torch.bool, device=scores.device).tril(keys - queries)
        scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
    elif mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask[..., :scores.shape[-1]], torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask[..., :scores.shape[-1]].float()
    return torch.softmax(scores, dim=-1).to(query.dtype)


def _hidden_and_mask(inputs: tuple[tuple, dict]) -> tuple[torch.Tensor, Any, dict]:
    args, kwargs = inputs
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden, kwargs.get("attention_mask"), kwargs


def gpt2_pattern(inputs: tuple[tuple, dict], weight: torch.Tensor, bias: torch.Tensor, heads: int,
                 scaling: float) -> torch.Tensor:
    """The pattern of a GPT-2 attention module (``c_attn`` is a Conv1D: ``x @ weight + bias``)."""
    hidden, mask, _ = _hidden_and_mask(inputs)
    width = hidden.shape[-1]
    query, key, _ = (hidden @ weight + bias).split(width, dim=2)
    query = query.view(*query.shape[:-1], heads, -1).transpose(1, 2)
    key = key.view(*key.shape[:-1], heads, -1).transpose(1, 2)
    return probabilities(query, key, mask, scaling)


def llama_pattern(inputs: tuple[tuple, dict], q_weight: torch.Tensor, q_bias: Any, k_weight: torch.Tensor,
                  k_bias: Any, head_dim: int, groups: int, scaling: float) -> torch.Tensor:
    """The pattern of a Llama-style attention module: rotary embeddings, ``groups`` query heads per key head."""
    hidden, mask, kwargs = _hidden_and_mask(inputs)
    shape = (*hidden.shape[:-1], -1, head_dim)
    query = torch.nn.functional.linear(hidden, q_weight, q_bias).view(shape).transpose(1, 2)
    key = torch.nn.functional.linear(hidden, k_weight, k_bias).view(shape).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query, key = query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin
    key = key.repeat_interleave(groups, dim=1)
    return probabilities(query, key, mask, scaling)


def _rotate_half(value: torch.Tensor) -> torch.Tensor:
    first, second = value.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class AttentionEnvoy(Envoy):
    """The Envoy of an attention module: ``.pattern`` (see the module docstring)."""

    @property
    def pattern(self) -> Any:
        """``(batch, heads, query, key)`` attention probabilities of this module's current call."""
        tracer = self._tracer("read .pattern")
        module = self._module
        inputs = self.inputs
        if hasattr(module, "c_attn"):
            return tracer.apply(gpt2_pattern, inputs, self.c_attn.weight, self.c_attn.bias, module.num_heads,
                                module.scaling)
        if hasattr(module, "q_proj") and hasattr(module, "k_proj"):
            q_bias = self.q_proj.bias if module.q_proj.bias is not None else None
            k_bias = self.k_proj.bias if module.k_proj.bias is not None else None
            return tracer.apply(llama_pattern, inputs, self.q_proj.weight, q_bias, self.k_proj.weight, k_bias,
                                module.head_dim, module.num_key_value_groups, module.scaling)
        raise AttributeError(f"{self._label} ({type(module).__name__}): attention patterns are recomputed for "
                             "GPT-2-style (c_attn) and Llama-style (q_proj/k_proj) attention only")


def attention_envoys() -> dict[type, type]:
    """The default ``envoys=`` of a :class:`~nnsight_magic.models.language.LanguageModel`."""
    classes: dict[type, type] = {}
    for module_name, class_name in (("gpt2", "GPT2Attention"), ("llama", "LlamaAttention"),
                                    ("mistral", "MistralAttention"), ("qwen2", "Qwen2Attention")):
        try:
            module = __import__(f"transformers.models.{module_name}.modeling_{module_name}", fromlist=[class_name])
        except ImportError:
            continue
        if hasattr(module, class_name):
            classes[getattr(module, class_name)] = AttentionEnvoy
    return classes
