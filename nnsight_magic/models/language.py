"""``LanguageModel``: trace and generate with a Hugging Face causal language model and its tokenizer.

In [1]: from nnsight_magic import LanguageModel
In [2]: lm = LanguageModel("openai-community/gpt2")          # or LanguageModel(hf_model, tokenizer=tok)
In [3]: with lm.trace(["The Eiffel Tower is in", "Rome is in"]):
   ...:     hidden = lm.transformer.h[5].output.save()        # HF module paths: transformer.h[5], model.layers[5]
   ...:     last = lm.lm_head.output[:, -1].save()           # -1 is every prompt's last token (left padding)
In [4]: with lm.generate("Hello", max_new_tokens=5) as tracer:
   ...:     with tracer.all():
   ...:         lm.transformer.h[0].output[:] *= 0.5          # at every generation step
   ...:     ids = tracer.result.save()
In [5]: lm.tokenizer.decode(ids.value[0])

Inputs: a string, a list of strings, token ids (a 1-D or 2-D integer tensor, a list of ints), or a tokenizer
output (``{"input_ids": ..., "attention_mask": ...}``; positions where the mask is 0 are padding and dropped).
Several prompts, in one list or in several ``tracer.invoke(...)`` blocks, run as one batch: each prompt is
padded on the left, with an attention mask and position ids that start at 0 at the prompt's first token, so
batching does not change any prompt's result (up to float rounding of the batched matrix products).

A model given by name is lazy by default (``dispatch=False``, as in nnsight): its module tree is built on the meta
device from the config, so ``lm.scan(...)``, shapes while building, ``%%trace --scan`` and ``print(lm)`` read no
weights; the first real run (``lm.trace``, ``lm.generate``, calling ``lm(...)``, or ``lm.dispatch()``) loads them
with ``from_pretrained`` into the same Envoys (:mod:`nnsight_magic.models.loading`). ``dispatch=True`` loads at once.

Inputs are moved to the device of the input embeddings, so a model on a GPU, or split over several with
``device_map``, takes prompts and token ids built on the CPU. Generation is in
:mod:`nnsight_magic.models.generation`; the offline default model in :mod:`nnsight_magic.models.embedded`.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch

from ..intervention.attention import attention_envoys
from ..intervention.tracer import Tracer
from ..tracing.symbolic import Roles
from .generation import GENERATE, GenerationTracer, decode_step_scan, first_step_runner, generation_options, \
    hf_generate_kwargs, user_line
from .loading import SHARED_LOADING_KEYWORDS, LazyWeights, build_on_meta, load_model, load_tokenizer, move_envoys
from .nnsight import NNsight, PreparedInput

INPUT_KEYWORDS = ("input_ids", "attention_mask")
DEFAULT_NEW_TOKENS = 20


class LanguageModel(NNsight):
    """A Hugging Face causal LM (plus tokenizer) for tracing and generation; see the module docstring.

    Args:
        model: a loaded model (``GPT2LMHeadModel``, ``LlamaForCausalLM``, ...), or a hub repo id or local
            directory to load with ``AutoModelForCausalLM.from_pretrained``.
        tokenizer: the tokenizer, or a repo id / directory to load it from. When ``model`` is a name it defaults
            to that name's tokenizer. Without one, inputs must be token ids.
        dispatch: with a name, load the weights now (``True``) or at the first real run (``False``, the default:
            until then the parameters are on the meta device, and scans and shapes work without them).
        rename: extra module names (``{"transformer.h": "layers"}``), on top of the family's standard ones
            (``lm.layers[0].attn``, ``lm.embed``, ``lm.ln_final``, ``lm.unembed``; see :mod:`.aliases`).
        envoys: ``{module class: Envoy subclass}`` (see :class:`~nnsight_magic.models.nnsight.NNsight`).
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``device_map="auto"``, ``dtype=...``, ``revision=``);
            only with a name.
    """

    _batching_changes_shapes = True  # invokes are padded to the longest prompt

    def __init__(self, model: torch.nn.Module | str | os.PathLike, tokenizer: Any = None, *,
                 rename: dict[str, str] | None = None, envoys: dict[type, type] | None = None,
                 dispatch: bool = False, **from_pretrained_kwargs: Any):
        lazy = None
        if isinstance(model, (str, os.PathLike)):
            name = os.fspath(model)
            if dispatch:
                model = load_model(name, from_pretrained_kwargs)
            else:
                model, lazy = build_on_meta(name, from_pretrained_kwargs), LazyWeights(name, from_pretrained_kwargs)
            tokenizer = _tokenizer_for(name, tokenizer, from_pretrained_kwargs)
        elif from_pretrained_kwargs:
            raise TypeError(f"{user_line()}: keyword arguments ({', '.join(from_pretrained_kwargs)}) are for "
                            "from_pretrained; pass them with a repo id or directory, not with a loaded model")
        elif isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = load_tokenizer(os.fspath(tokenizer), {})
        super().__init__(model, rename=rename, envoys={**attention_envoys(), **(envoys or {})})
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_lazy", lazy)  # shared with edited copies: the weights load once
        object.__setattr__(self, "_forward_parameters", set(inspect.signature(model.forward).parameters))

    # ------------------------------------------------------------------------------------------- contexts
    def trace(self, *inputs: Any, validate: bool = True, grad: bool | None = None, **kwargs: Any) -> Tracer:
        """Trace one forward pass over the prompt(s); keyword arguments other than ``input_ids`` and
        ``attention_mask`` go to the model's forward (``output_attentions=True``)."""
        self.dispatch()
        input_kwargs, forward_kwargs = _split_inputs(kwargs)
        return Tracer(self, inputs, input_kwargs, validate=validate, grad=grad, run_options=forward_kwargs)

    def scan(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """Build and shape-check a trace without running the model (see :meth:`trace`); a lazy model stays
        unloaded."""
        input_kwargs, forward_kwargs = _split_inputs(kwargs)
        return Tracer(self, inputs, input_kwargs, run_options=forward_kwargs, scan_only=True)

    def generate(self, *inputs: Any, max_new_tokens: int | None = None, validate: bool = True,
                 grad: bool | None = None, **kwargs: Any) -> GenerationTracer:
        """Trace Hugging Face ``generate``: every step is a forward pass that ``tracer.iter[...]`` can address.

        Args:
            max_new_tokens: how many tokens to generate, which is the number of steps (default: the model's
                ``generation_config.max_new_tokens``, else 20).
            **kwargs: ``input_ids=`` / ``attention_mask=`` as the input, everything else for HF ``generate``
                (``do_sample=True``, ``temperature=``, ...). Decoding is greedy unless ``do_sample`` is given.
        """
        self.dispatch()
        input_kwargs, generate_kwargs = _split_inputs(kwargs)
        if max_new_tokens is None and "max_length" not in generate_kwargs:
            configured = getattr(getattr(self._module, "generation_config", None), "max_new_tokens", None)
            max_new_tokens = configured or DEFAULT_NEW_TOKENS
        options = generation_options(max_new_tokens, generate_kwargs)
        return GenerationTracer(self, inputs, input_kwargs, run_options=options, context=self.context_length,
                                validate=validate, grad=grad)

    # ------------------------------------------------------------------------------------------ loading
    def dispatch(self) -> "LanguageModel":
        """Load a lazy model's weights now (``from_pretrained`` with the keywords it was created with); the Envoys
        (``lm.transformer.h[0]``) stay the same objects. Does nothing when the weights are loaded. Returns ``lm``."""
        lazy = self.__dict__.get("_lazy")
        if lazy is not None and self._module is not lazy.module:
            move_envoys(self, lazy.load())
            object.__setattr__(self, "_forward_parameters", set(inspect.signature(self._module.forward).parameters))
            self._scan_cache.clear()  # scans of the meta tree: inputs and weights may now be on another device
            self._symbolic_scans.clear()
        return self

    @property
    def dispatched(self) -> bool:
        """Whether the weights are loaded (``False`` for a lazy model until its first real run)."""
        lazy = self.__dict__.get("_lazy")
        return lazy is None or self._module is lazy.module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Outside a trace, call the model (loading a lazy model first); inside, as any Envoy."""
        if self._active_tracer is None:
            self.dispatch()
        return super().__call__(*args, **kwargs)

    def to(self, *args: Any, **kwargs: Any) -> "LanguageModel":
        """Move the model (``lm.to("cuda")``), loading a lazy model first; returns ``lm``."""
        self.dispatch()
        return super().to(*args, **kwargs)

    # ------------------------------------------------------------------------- inputs, batching, running
    def _prepare_input(self, *inputs: Any, **kwargs: Any) -> PreparedInput:
        """One invoke's prompt(s) as left-padded ``input_ids`` and ``attention_mask`` on the input device."""
        rows = self._token_rows(inputs, kwargs)
        context = self.context_length
        for number, row in enumerate(rows):
            which = f"prompt {number} " if len(rows) > 1 else "the prompt "
            if row.numel() == 0:
                raise ValueError(f"{user_line()}: {which}has zero tokens; a language model needs at least one token "
                                 "to predict from")
            if context is not None and row.numel() > context:
                raise ValueError(f"{user_line()}: {which}has {row.numel()} tokens, but the model reads at most "
                                 f"{context}; shorten it, e.g. lm.tokenizer(text, truncation=True, "
                                 f"max_length={context})")
        input_ids, attention_mask = left_pad(rows, self._pad_token_id())
        device = self.device
        return PreparedInput((), {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)},
                             len(rows))

    def _token_rows(self, inputs: tuple, kwargs: dict) -> list[torch.Tensor]:
        """Every prompt of one input as a 1-D tensor of token ids, without padding."""
        if kwargs:
            unknown = sorted(set(kwargs) - set(INPUT_KEYWORDS))
            if unknown:
                raise TypeError(f"{user_line()}: an invoke takes a prompt (or input_ids=, attention_mask=), not "
                                f"{', '.join(unknown)}; options for the model go to lm.trace(...) / lm.generate(...)")
            if inputs or "input_ids" not in kwargs:
                raise TypeError(f"{user_line()}: give the prompt positionally or as input_ids= (with an optional "
                                "attention_mask=), not both")
            inputs = (kwargs,)
        if len(inputs) != 1:
            raise TypeError(f"{user_line()}: give one input (a string, a list of strings, token ids or a tokenizer "
                            f"output), not {len(inputs)}; batch several with one tracer.invoke(...) each")
        value = inputs[0]
        if isinstance(value, str):
            return [self._encode(value)]
        if isinstance(value, torch.Tensor):
            return _tensor_rows(value, None)
        if isinstance(value, Mapping):
            if "input_ids" not in value:
                raise TypeError(f"{user_line()}: a dict input needs 'input_ids' (a tokenizer's output)")
            mask = value.get("attention_mask")
            return _tensor_rows(torch.as_tensor(value["input_ids"]), None if mask is None else torch.as_tensor(mask))
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError(f"{user_line()}: the list of prompts is empty")
            if all(isinstance(item, str) for item in value):
                return [self._encode(item) for item in value]
            if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
                return _tensor_rows(torch.tensor(value), None)
            if all(isinstance(item, (list, tuple, torch.Tensor)) for item in value):
                return [row for item in value for row in _tensor_rows(torch.as_tensor(item), None)]
        raise TypeError(f"{user_line()}: a LanguageModel takes a string, a list of strings, token ids or a tokenizer "
                        f"output, not {type(value).__name__}")

    def _encode(self, text: str) -> torch.Tensor:
        if self._tokenizer is None:
            raise TypeError(f"{user_line()}: this LanguageModel has no tokenizer, so it cannot read text; pass "
                            "tokenizer= when you create it, or give token ids")
        return torch.tensor(self._tokenizer(text)["input_ids"], dtype=torch.long)

    def _join_inputs(self, prepared: list[PreparedInput], rows: int) -> PreparedInput:
        """Every invoke's prompts in one batch, left-padded to the longest prompt."""
        width = max(each.kwargs["input_ids"].shape[1] for each in prepared)
        pad = self._pad_token_id()
        input_ids = torch.cat([_pad_left(each.kwargs["input_ids"], width, pad) for each in prepared])
        attention_mask = torch.cat([_pad_left(each.kwargs["attention_mask"], width, 0) for each in prepared])
        return PreparedInput((), {"input_ids": input_ids, "attention_mask": attention_mask}, rows)

    def _run(self, prepared: PreparedInput, options: dict) -> Any:
        """One forward pass, or HF ``generate`` when ``options`` come from :meth:`generate`."""
        if not self.dispatched:
            raise RuntimeError(f"{user_line()}: this LanguageModel's weights are not loaded (it was created by "
                               "name, lazily, and this run did not start from lm.trace or lm.generate); call "
                               "lm.dispatch() first")
        input_ids, attention_mask = prepared.kwargs["input_ids"], prepared.kwargs["attention_mask"]
        if options.get(GENERATE):
            return self._module.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         **hf_generate_kwargs(options, self._pad_token_id()))
        return self._forward(input_ids, attention_mask, options)

    def _returns_root_output(self, options: dict) -> bool:
        """A forward pass returns the model's output; ``generate`` returns token ids."""
        return not options.get(GENERATE)

    def _scan(self, prepared: PreparedInput, options: dict, step: int = 0) -> Any:
        """The prompt's scan; for generation steps after the first, a decoding step's scan (both cached, and both
        symbolic in the batch size and the prompt length: one scan serves every prompt)."""
        if not step or not options.get(GENERATE):
            return super()._scan(prepared, options)
        decode = functools.partial(decode_step_scan, self._module, self._forward, self._forward_parameters,
                                   prepared.kwargs)
        return self._cached_scan(("decoding step",), prepared, options, concrete=decode, symbolic=decode, quiet=True)

    def _symbolic_roles(self) -> Roles:
        """Token ids and the attention mask are ``(batch, length)``: both sizes may be symbolic."""
        return {"input_ids": (0, 1), "attention_mask": (0, 1)}

    def _scan_runner(self, options: dict) -> Any:
        """The fake-tensor scan runs one forward pass: of the prompt, called as generation's step 0 calls it."""
        if options.get(GENERATE):
            return first_step_runner(self._forward, self._forward_parameters, options)
        return lambda twin, input_ids, attention_mask: self._forward(input_ids, attention_mask, options, twin)

    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, extra: dict,
                 module: torch.nn.Module | None = None) -> Any:
        """Call the model (or its scan twin); position ids count from each prompt's first real token (as HF
        ``generate`` does)."""
        kwargs = dict(extra)
        if "position_ids" in self._forward_parameters and "position_ids" not in kwargs:
            kwargs["position_ids"] = position_ids(attention_mask)
        return (module or self._module)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    # ---------------------------------------------------------------------------------------- conveniences
    @property
    def tokenizer(self) -> Any:
        """The tokenizer (``None`` when the model was given without one)."""
        return self._tokenizer

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (the first part of a model split with device_map)."""
        embeddings = self._module.get_input_embeddings() if hasattr(self._module, "get_input_embeddings") else None
        weight = getattr(embeddings, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
        first = super().device
        return first if first.type != "meta" else torch.device("cpu")

    @property
    def context_length(self) -> int | None:
        """The most tokens the model reads (``config.max_position_embeddings``), or ``None`` if it does not say."""
        length = getattr(getattr(self._module, "config", None), "max_position_embeddings", None)
        return length if isinstance(length, int) else None

    def _pad_token_id(self) -> int:
        """The id that fills padding: the tokenizer's pad token, else its end-of-text token, else the config's."""
        tokenizer = self._tokenizer
        config = getattr(self._module, "config", None)
        generation = getattr(self._module, "generation_config", None)
        for owner, name in ((tokenizer, "pad_token_id"), (tokenizer, "eos_token_id"), (generation, "pad_token_id"),
                            (config, "pad_token_id"), (generation, "eos_token_id"), (config, "eos_token_id")):
            candidate = getattr(owner, name, None) if owner is not None else None
            if isinstance(candidate, (list, tuple)):
                candidate = candidate[0] if candidate else None
            if isinstance(candidate, int):
                return candidate
        return 0


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... from each row's first unmasked token; 0 on padding (the rule HF ``generate`` uses)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


def left_pad(rows: list[torch.Tensor], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack 1-D token rows into ``(input_ids, attention_mask)``, padding each row on the left."""
    width = max(row.numel() for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row.numel():
            input_ids[index, width - row.numel():] = row
            attention_mask[index, width - row.numel():] = 1
    return input_ids, attention_mask


def _pad_left(tensor: torch.Tensor, width: int, value: int) -> torch.Tensor:
    missing = width - tensor.shape[1]
    if not missing:
        return tensor
    return torch.cat([tensor.new_full((tensor.shape[0], missing), value), tensor], dim=1)


def _tensor_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """The prompts in a tensor of token ids (1-D: one prompt, 2-D: one per row), padding dropped by the mask."""
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"{user_line()}: token ids must be integers, not {input_ids.dtype}")
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"{user_line()}: token ids must be 1-D (one prompt) or 2-D (one prompt per row), not "
                         f"{input_ids.dim()}-D")
    input_ids = input_ids.long().cpu().reshape(-1, input_ids.shape[-1])
    if attention_mask is None:
        return list(input_ids)
    attention_mask = attention_mask.cpu().reshape(input_ids.shape).bool()
    return [row[keep] for row, keep in zip(input_ids, attention_mask)]


def _split_inputs(kwargs: dict) -> tuple[dict, dict]:
    """``input_ids`` / ``attention_mask`` (the input) apart from the options for the model."""
    inputs = {key: value for key, value in kwargs.items() if key in INPUT_KEYWORDS}
    return inputs, {key: value for key, value in kwargs.items() if key not in INPUT_KEYWORDS}


def _tokenizer_for(name: str, tokenizer: Any, kwargs: dict) -> Any:
    """The tokenizer of a model loaded by ``name``: the given one, loaded from a name, or ``name``'s own."""
    shared = {key: kwargs[key] for key in SHARED_LOADING_KEYWORDS if key in kwargs}
    if tokenizer is None:
        return load_tokenizer(name, shared)
    if isinstance(tokenizer, (str, os.PathLike)):
        return load_tokenizer(os.fspath(tokenizer), shared)
    return tokenizer
