"""Attention patterns with any attention implementation: ``attn.pattern`` is recomputed from the module's input.

In [1]: lm = LanguageModel(model)                    # sdpa (the default) or eager: both work
In [2]: with lm.trace("The Eiffel Tower is in"):
   ...:     pattern = lm.layers[3].attn.pattern.save()  # (batch, heads, query, key) probabilities
In [3]: pattern.value.sum(-1)                          # every row sums to 1
In [4]: with lm.generate("The Eiffel Tower is in", max_new_tokens=3) as tracer:
   ...:     with tracer.iter[1]:
   ...:         step = lm.layers[3].attn.pattern.save()  # (batch, heads, 1, prompt + 1): over the cache too
   ...:         lm.layers[3].attn.pattern[:, 0] = 0     # an edit: head 0 attends nowhere at this step

``softmax(Q Kᵀ · scaling + mask)`` is computed from the attention module's own input (the hidden states, the
mask and, for rotary models, the position embeddings it is called with) and its projection weights, exactly as
eager attention computes its weights, while the model itself keeps its fast kernel (sdpa, flash). The values
are equal to eager attention's weights within float tolerance. Supported: GPT-2-style attention (``c_attn``) and
Llama-style attention (``q_proj``/``k_proj`` with rotary embeddings and grouped-query heads: Llama, SmolLM2,
Mistral, Qwen2). At a generation step after the first the query is the new token's and the keys are this layer's
cached keys (read from the ``cache=`` the module is called with, before it adds its own) followed by the new
key. A cache that no longer holds every earlier position (a sliding window once it is full) raises at the
user's line. Nothing runs unless a pattern is read: no hook, no extra computation.

Like every traced value, a pattern has its shape while building (``pattern.shape``; ``pattern[:, 99]`` raises at
its line before the model runs), computed from the fake scan; at a generation step after the first (a block
starting there, ``.next()`` twice) its key length grows with the cache, and the shape is left unknown (also on
a remote model whose cache is not a plain ``DynamicCache``: its scan's cache does not travel).

Assigning ``attn.pattern = value``, or editing it in place (``attn.pattern[...] = x``), changes that call of
that module: its output becomes what eager attention computes with the edited probabilities, ``pattern @ V``
(``V`` from the module's input and value projection, after the cached values at decoding steps), heads merged,
through the output projection, without dropout (the model must be in ``eval()`` mode or have attention dropout
0). Later reads of ``attn.pattern`` in the trace see the edit. The model is not changed: it keeps its kernel
(``config._attn_implementation``), every other module runs as usual, and no hook or setting outlives the run,
also when it fails. The module's own kernel still runs (its result is replaced), so an edited pattern costs one
extra attention. An in-place edit must be made on the ``.pattern`` value itself: an edit of a value derived from
it (``attn.pattern[0][1] = x``) changes only that value, as everywhere in a trace. Reads see the edits made in
the same block: a read after a ``tracer.cond`` branch, or in a trace of a ``model.edit()`` copy, is recomputed
from the module's input (the module itself still uses the branch's or the persistent edit's pattern).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor

from ..tracing.node import user_line
from ..tracing.proxy import Proxy
from ..tracing.serialize import OpaqueValue
from .envoy import Envoy, surfacing


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


def cached(inputs: tuple[tuple, dict], layer: int, part: str, rows: slice) -> torch.Tensor | None:
    """This layer's cached ``keys`` or ``values`` before the current call (``None`` when nothing is cached yet).

    ``rows``: the batch rows of the value (one invoke's rows of the whole batch the cache holds).

    Read when the module is called (its input hook), before the module adds this call's keys to the cache.
    Hugging Face passes the cache as ``cache=`` (``past_key_values=`` / ``past_key_value=`` in earlier versions).
    """
    kwargs = inputs[1]
    cache = next((kwargs[name] for name in ("cache", "past_key_values", "past_key_value") if name in kwargs), None)
    if cache is None:
        return None
    if isinstance(cache, OpaqueValue):  # a remote model's scan whose cache did not travel: no shape here
        raise NotImplementedError("the key/value cache of a remote model's scan is not known in the notebook")
    cache = getattr(cache, "self_attention_cache", cache)  # an encoder-decoder cache: the self-attention part
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"attention patterns at decoding steps read the key/value cache by layer, which a "
                        f"{type(cache).__name__} does not offer; generate with the default dynamic cache")
    if layer >= len(layers) or not getattr(layers[layer], "is_initialized", True):
        return None
    entry = layers[layer]
    length = entry.get_seq_length()
    stored = getattr(entry, part, None)
    if length == 0 or stored is None:
        return None
    if stored.shape[-2] < length:
        raise ValueError(f"this layer's {type(entry).__name__} cache keeps {stored.shape[-2]} of the {length} earlier "
                         "positions (a sliding window or a quantized cache), so the pattern over all of them cannot "
                         "be recomputed; generate with the default dynamic cache, or read steps before the window "
                         "fills")
    if isinstance(stored, FakeTensor) and stored.shape[0] < rows.stop:
        rows = slice(0, rows.stop - rows.start)  # shapes while building: an invoke's scan holds only its rows
    if stored.shape[0] < rows.stop:
        raise ValueError(f"the key/value cache holds {stored.shape[0]} rows, not the rows {rows.start} to "
                         f"{rows.stop - 1} of this value")
    return stored[rows, :, :length]


def _with_past(inputs: tuple[tuple, dict], layer: int, part: str, new: torch.Tensor, start: int) -> torch.Tensor:
    past = cached(inputs, layer, part, slice(start, start + new.shape[0]))
    if isinstance(past, FakeTensor):  # shapes while building: the scan's cache already holds this call's keys
        past = past[..., :past.shape[-2] - new.shape[-2], :] if past.shape[-2] > new.shape[-2] else None
    return _joined(past, new)


def gpt2_pattern(inputs: tuple[tuple, dict], weight: torch.Tensor, bias: torch.Tensor, heads: int,
                 scaling: float, layer: int = 0, start: int = 0) -> torch.Tensor:
    """The pattern of a GPT-2 attention module (``c_attn`` is a Conv1D: ``x @ weight + bias``).

    ``layer``: the module's index in the key/value cache; ``start``: the first batch row of ``inputs`` in it.
    """
    hidden, mask, _ = _hidden_and_mask(inputs)
    width = hidden.shape[-1]
    query, key = (hidden @ weight[:, :2 * width] + bias[:2 * width]).split(width, dim=2)
    query = query.view(*query.shape[:-1], heads, -1).transpose(1, 2)
    key = _with_past(inputs, layer, "keys", key.view(*key.shape[:-1], heads, -1).transpose(1, 2), start)
    return probabilities(query, key, mask, scaling)


def llama_pattern(inputs: tuple[tuple, dict], q_weight: torch.Tensor, q_bias: Any, k_weight: torch.Tensor,
                  k_bias: Any, head_dim: int, groups: int, scaling: float, layer: int = 0,
                  start: int = 0) -> torch.Tensor:
    """The pattern of a Llama-style attention module: rotary embeddings, ``groups`` query heads per key head."""
    hidden, mask, kwargs = _hidden_and_mask(inputs)
    shape = (*hidden.shape[:-1], -1, head_dim)
    query = torch.nn.functional.linear(hidden, q_weight, q_bias).view(shape).transpose(1, 2)
    key = torch.nn.functional.linear(hidden, k_weight, k_bias).view(shape).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    query, key = query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin
    key = _with_past(inputs, layer, "keys", key, start).repeat_interleave(groups, dim=1)
    return probabilities(query, key, mask, scaling)


gpt2_pattern.pure = llama_pattern.pure = True  # torch operations only: run on fake values, so `.pattern.shape` is known


def past_values(inputs: tuple[tuple, dict], layer: int, start: int) -> torch.Tensor | None:
    """This layer's cached values before the current call (read at its input hook, before the cache grows)."""
    hidden, _, _ = _hidden_and_mask(inputs)
    return cached(inputs, layer, "values", slice(start, start + hidden.shape[0]))


def gpt2_edited_output(inputs: tuple[tuple, dict], past: Any, pattern: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor, out_weight: torch.Tensor, out_bias: torch.Tensor,
                       heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A GPT-2 attention module's output ``(attn_output, pattern)`` when its probabilities are ``pattern``."""
    hidden, _, _ = _hidden_and_mask(inputs)
    width = hidden.shape[-1]
    value = hidden @ weight[:, 2 * width:] + bias[2 * width:]
    value = _joined(past, value.view(*value.shape[:-1], heads, -1).transpose(1, 2))
    return _mix(pattern, value, hidden.shape[-2]) @ out_weight + out_bias, pattern


def llama_edited_output(inputs: tuple[tuple, dict], past: Any, pattern: torch.Tensor, weight: torch.Tensor,
                        bias: Any, out_weight: torch.Tensor, out_bias: Any, head_dim: int,
                        groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A Llama-style attention module's output ``(attn_output, pattern)`` when its probabilities are ``pattern``."""
    hidden, _, _ = _hidden_and_mask(inputs)
    value = torch.nn.functional.linear(hidden, weight, bias).view(*hidden.shape[:-1], -1, head_dim).transpose(1, 2)
    value = _joined(past, value).repeat_interleave(groups, dim=1)
    return torch.nn.functional.linear(_mix(pattern, value, hidden.shape[-2]), out_weight, out_bias), pattern


def _joined(past: Any, new: torch.Tensor) -> torch.Tensor:
    return new if past is None else torch.cat([past.to(new.dtype), new], dim=-2)


def _mix(pattern: torch.Tensor, value: torch.Tensor, queries: int) -> torch.Tensor:
    """``pattern @ value`` with the heads merged back: ``(batch, query, heads * head_dim)``.

    ``pattern`` has the shape of ``.pattern``; its batch or heads size may be 1 (the same for every row or head).
    """
    expected = (value.shape[0], value.shape[1], queries, value.shape[-2])
    if not isinstance(pattern, torch.Tensor) or pattern.dim() != 4 or pattern.shape[2:] != expected[2:] or \
            any(size not in (1, want) for size, want in zip(pattern.shape[:2], expected[:2])):  # 1: broadcast
        shape = tuple(pattern.shape) if isinstance(pattern, torch.Tensor) else type(pattern).__name__
        raise ValueError(f"the pattern assigned has shape {shape}, but this call's pattern is (batch, heads, query, "
                         f"key) = {expected}: give it the shape of `.pattern`")
    mixed = torch.matmul(pattern.to(value.dtype), value).transpose(1, 2)
    return mixed.reshape(*mixed.shape[:2], -1)


def _rotate_half(value: torch.Tensor) -> torch.Tensor:
    first, second = value.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


# ------------------------------------------------------------------------------------------ edited patterns
Reroute = Callable[[Any], None]  # makes the module's output use the pattern it is given (see AttentionEnvoy)

_PATTERNS: "weakref.WeakKeyDictionary[Any, dict[tuple, Proxy]]" = weakref.WeakKeyDictionary()


class PatternProxy(Proxy):
    """The proxy of ``attn.pattern``: an in-place edit of it also makes the module use the edited pattern."""

    __slots__ = ("_reroute",)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._reroute(self)  # created after the edit, so the module's new output reads the edited pattern


def current_pattern(tracer: Any, key: tuple, read: Callable[[], Proxy], reroute: Reroute) -> Proxy:
    """The pattern that reads of ``key`` (a module call) see: the last one assigned, else ``read()`` (once)."""
    patterns = _PATTERNS.setdefault(tracer, {})
    proxy = patterns.get(key)
    if proxy is None:
        proxy = patterns[key] = _editable(tracer, read(), reroute)
    return proxy


def assign_pattern(tracer: Any, key: tuple, value: Any, reroute: Reroute) -> None:
    """``attn.pattern = value``: the module's output uses ``value``; later reads of the pattern see it."""
    proxy = value if isinstance(value, Proxy) else tracer.apply(same_value, value)
    reroute(proxy)
    _PATTERNS.setdefault(tracer, {})[key] = _editable(tracer, proxy, reroute)


def _editable(tracer: Any, proxy: Proxy, reroute: Reroute) -> PatternProxy:
    editable = PatternProxy(proxy.node, tracer)
    object.__setattr__(editable, "_reroute", reroute)
    tracer.adopt(editable)  # detached after the run like every proxy of the trace
    return editable


def same_value(value: Any) -> Any:
    """A plain value assigned as a pattern, as a node of the graph."""
    return value


class AttentionEnvoy(Envoy):
    """The Envoy of an attention module: ``.pattern``, read and edited (see the module docstring)."""

    @surfacing
    def pattern(self) -> Any:
        """``(batch, heads, query, key)`` attention probabilities of this module's current call."""
        tracer = self._tracer("read .pattern")
        return current_pattern(tracer, self._pattern_key(tracer), self._read_pattern, self._use_pattern)

    @pattern.setter
    def pattern(self, value: Any) -> None:
        tracer = self._tracer("set .pattern")
        assign_pattern(tracer, self._pattern_key(tracer), value, self._use_pattern)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "pattern" and "pattern" not in self._module._modules:
            object.__setattr__(self, name, value)  # the property setter above
        else:
            super().__setattr__(name, value)

    def _read_pattern(self) -> Any:
        tracer, module = self._tracer("read .pattern"), self._module
        layer = getattr(module, "layer_idx", None) or 0
        if self._style() == "gpt2":
            pattern = tracer.apply(gpt2_pattern, self.inputs, self.c_attn.weight, self.c_attn.bias,
                                   module.num_heads, module.scaling, layer, self._first_row(tracer))
        else:
            pattern = tracer.apply(llama_pattern, self.inputs, self.q_proj.weight, self._bias("q_proj"),
                                   self.k_proj.weight, self._bias("k_proj"), module.head_dim,
                                   module.num_key_value_groups, module.scaling, layer, self._first_row(tracer))
        if (tracer.first_step(tracer.call_key(self._path, "pattern")) or 0) > 1:
            pattern.node.fake = None  # a step's fake cache is the first decoding step's: its keys would be too few
        return pattern

    def _style(self) -> str:
        """``"gpt2"`` (``c_attn``) or ``"llama"`` (``q_proj``/``k_proj``/``v_proj``/``o_proj``); else an error."""
        module = self._module
        if getattr(module, "is_cross_attention", False):
            raise NotImplementedError(f"{user_line()}: {self._label} is cross-attention; attention patterns are "
                                      "recomputed for self-attention only")
        if hasattr(module, "c_attn") and hasattr(module, "c_proj"):
            return "gpt2"
        if all(hasattr(module, name) for name in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return "llama"
        raise AttributeError(f"{user_line()}: {self._label} ({type(module).__name__}): attention patterns are "
                             "recomputed for GPT-2-style (c_attn) and Llama-style (q_proj/k_proj) attention only")

    def _use_pattern(self, pattern: Any) -> None:
        """This call's output becomes eager attention's output with ``pattern`` (see the module docstring)."""
        tracer, module = self._tracer("set .pattern"), self._module
        rate = dropout_rate(module)
        if module.training and rate:
            raise RuntimeError(f"{user_line()}: {self._label} is in training mode with attention dropout {rate}; an "
                               "edited pattern is applied without dropout: call `model.eval()` first")
        style, layer, inputs = self._style(), getattr(module, "layer_idx", None) or 0, self.inputs
        past = tracer.apply(past_values, inputs, layer, self._first_row(tracer))  # runs before the cache grows
        if style == "gpt2":
            output = tracer.apply(gpt2_edited_output, inputs, past, pattern, self.c_attn.weight, self.c_attn.bias,
                                  self.c_proj.weight, self.c_proj.bias, module.num_heads)
        else:
            output = tracer.apply(llama_edited_output, inputs, past, pattern, self.v_proj.weight,
                                  self._bias("v_proj"), self.o_proj.weight, self._bias("o_proj"), module.head_dim,
                                  module.num_key_value_groups)
        self.output = output

    def _pattern_key(self, tracer: Any) -> tuple:
        """This module call's pattern: its call, step, block and invoke, and the ``tracer.cond`` branches open."""
        return (*tracer.call_key(self._path, "pattern"), tracer.graph.open_branches)

    @staticmethod
    def _first_row(tracer: Any) -> int:
        """The first batch row of the values this trace reads here: the current invoke's, or 0 (the whole batch)."""
        invoke = tracer.call_key("", "pattern")[-1]
        return 0 if invoke is None else sum(prepared.batch_size for prepared in tracer.invokes[:invoke])

    def _bias(self, name: str) -> Any:
        return getattr(self, name).bias if getattr(getattr(self._module, name), "bias", None) is not None else None


def dropout_rate(module: torch.nn.Module) -> float:
    """The attention dropout of a GPT-2-style (``attn_dropout``) or Llama-style (``attention_dropout``) module."""
    dropout = getattr(module, "attn_dropout", None)
    return dropout.p if isinstance(dropout, torch.nn.Dropout) else float(getattr(module, "attention_dropout", 0.0))


ATTENTION_SETTINGS = ("layer_idx", "num_heads", "scaling", "head_dim", "num_key_value_groups", "is_cross_attention")
"""The attributes of an attention module that ``.pattern`` reads (a remote model's tree carries them)."""


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
