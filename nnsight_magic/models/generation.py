"""Generation steps: ``lm.generate(...)`` traces every forward pass of Hugging Face ``generate``.

In [1]: with lm.generate("The Eiffel Tower is in", max_new_tokens=3) as tracer:
   ...:     tokens = tracer.list().save()
   ...:     with tracer.all():                                   # once per step: steps 0, 1 and 2
   ...:         tokens.append(lm.lm_head.output[0, -1].argmax())
   ...:     with tracer.iter[1:]:                                # steps 1 and 2 only
   ...:         lm.transformer.h[0].output[:] *= 0.5
   ...:     sequences = tracer.result.save()                     # prompt + new tokens, as HF returns them
In [2]: sequences.value.shape
Out[2]: torch.Size([1, 8])

Each call of the model's forward is one step. Step 0 reads the whole prompt; every later step reads the one
token generated before it (the key/value cache holds the rest), so ``lm.lm_head.output`` has sequence length
1 at every step (Hugging Face computes logits for the last position only while generating). Code outside an
iteration block refers to step 0; ``tracer.next()`` moves later reads to the next step.

``generate`` decodes greedily (``do_sample=False``) unless told otherwise, and passes the pad token id, so a
padded batch generates without warnings. :class:`GenerationTracer` knows how many steps will run
(``max_new_tokens``) and refuses a step past the last one while the block is being built, at the user's line.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..errors import warn_at_user_line
from ..intervention.contexts import IterationBlock, IterationIndexer
from ..intervention.tracer import Tracer
from ..tracing.graph import StepSet
from ..tracing.node import user_line
from ..tracing.shapes import ModuleScan, ScanFailed
from ..tracing.symbolic import Roles, SymbolicScan

GENERATE = "generate"  # the run option that makes a LanguageModel run ``generate`` instead of one forward pass


def generation_options(max_new_tokens: int | None, generate_kwargs: dict) -> dict:
    """The run options of ``lm.generate``: checked ``max_new_tokens`` plus the keyword arguments for HF ``generate``."""
    if max_new_tokens is not None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise TypeError(f"{user_line()}: max_new_tokens must be an int, not {type(max_new_tokens).__name__}")
        if max_new_tokens < 1:
            raise ValueError(f"{user_line()}: max_new_tokens={max_new_tokens} generates nothing; ask for at least "
                             "1 new token, or use `lm.trace(...)` for one forward pass over the prompt")
        generate_kwargs = {**generate_kwargs, "max_new_tokens": max_new_tokens}
    return {GENERATE: True, **generate_kwargs}


def hf_generate_kwargs(options: dict, pad_token_id: int | None) -> dict:
    """The keyword arguments for HF ``generate``: greedy and with a pad token id unless the user chose otherwise."""
    kwargs = {key: value for key, value in options.items() if key != GENERATE}
    kwargs.setdefault("do_sample", False)
    if pad_token_id is not None:
        kwargs.setdefault("pad_token_id", pad_token_id)
    return kwargs


def first_step_runner(forward: Callable[..., Any], accepts: set[str], options: dict) -> Callable[..., Any]:
    """What a fake-tensor scan of ``generate`` runs: the prompt's forward pass, called the way step 0 calls it.

    HF ``generate`` calls the model with the KV cache on and ``logits_to_keep=1``, so the scan does the same to give
    step 0's values their real shapes. It returns a fake ``(rows, prompt + max_new_tokens)`` tensor of token ids
    for ``tracer.result`` (the longest the result can be: generation may stop early at an end-of-text token).
    """
    new_tokens = None if options.get("return_dict_in_generate") else options.get("max_new_tokens")
    sequences = options.get("num_return_sequences") or 1
    step_kwargs = {key: value for key, value in (("use_cache", True), ("logits_to_keep", 1)) if key in accepts}

    def run(twin: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        forward(input_ids, attention_mask, step_kwargs, twin)
        if new_tokens is None:
            return None  # the result's shape is unknown: a dict of outputs, or a length HF derives from max_length
        return input_ids.new_zeros((input_ids.shape[0] * sequences, input_ids.shape[1] + new_tokens))

    return run


def decode_step_scan(root: torch.nn.Module, forward: Callable[..., Any], accepts: set[str], inputs: dict,
                     roles: Roles | None = None) -> ModuleScan | SymbolicScan:
    """The fake-tensor scan of a decoding step (step 1 and later); raises :class:`ScanFailed` when there is none.

    A fake prompt pass fills a fake key/value cache; then one decoding step runs on a new token, with the cache,
    the mask one position longer and the next position id, as HF ``generate`` calls it, on the same twin. Its
    module values have sequence length 1, so shapes shown for later steps are the real ones (the cache grows from
    step to step; values that span it, such as attention weights, are shown at their step-1 size). With ``roles``
    the prompt's batch and length are symbolic (a :class:`SymbolicScan`): the cache length is then symbolic too,
    and one scan serves every prompt length.
    """
    cache_keyword = next((name for name in ("cache", "past_key_values") if name in accepts), None)
    if cache_keyword is None:
        raise ScanFailed("the model's forward takes no key/value cache")
    step_kwargs = {key: value for key, value in (("use_cache", True), ("logits_to_keep", 1)) if key in accepts}

    def prompt(twin: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return forward(input_ids, attention_mask, step_kwargs, twin)

    def decode_after(prompt_scan: ModuleScan) -> ModuleScan:
        cache = getattr(prompt_scan.result, "cache", None) or getattr(prompt_scan.result, "past_key_values", None)
        if cache is None:
            raise ScanFailed("the prompt's pass returned no key/value cache")

        def decode(twin: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
            token = input_ids.new_zeros((input_ids.shape[0], 1))
            mask = torch.cat([attention_mask, attention_mask.new_ones((attention_mask.shape[0], 1))], dim=1)
            kwargs = {**step_kwargs, cache_keyword: cache}
            if "position_ids" in accepts:
                kwargs["position_ids"] = mask.long().sum(-1, keepdim=True) - 1  # the new token's position
            return forward(token, mask, kwargs, twin)

        return ModuleScan.run(root, decode, *prompt_scan.fake_inputs, twin=prompt_scan.twin,  # its fake cache
                              fake_mode=prompt_scan.fake_mode)

    if roles:
        return SymbolicScan.run(root, prompt, (), inputs, roles=roles, then=decode_after)
    return decode_after(ModuleScan.run(root, prompt, (), inputs))


class GenerationTracer(Tracer):
    """The tracer of ``lm.generate``: a :class:`Tracer` that knows how many steps generation runs.

    Args:
        model: the :class:`~nnsight_magic.models.language.LanguageModel`.
        inputs, input_kwargs, validate, grad: as for :class:`Tracer`.
        run_options: from :func:`generation_options`.
        context: the model's context length, or ``None`` when unknown.

    A step past the last one (``tracer.iter[5]`` with ``max_new_tokens=3``, or a read after ``tracer.next()``
    moved past it) raises ``IndexError`` at its line, and a prompt whose tokens plus ``max_new_tokens`` do not
    fit the context raises ``ValueError``, both before the model runs. Generation that ends early at an
    end-of-text token is found while running: the steps it never reached are reported after the run.
    """

    def __init__(self, model: Any, inputs: tuple, input_kwargs: dict, *, run_options: dict,
                 context: int | None, validate: bool = True, grad: bool | None = None):
        super().__init__(model, inputs, input_kwargs, validate=validate, grad=grad, run_options=run_options)
        self.max_new_tokens: int | None = run_options.get("max_new_tokens")
        self.context = context

    @property
    def iter(self) -> IterationIndexer:
        """``tracer.iter[2]``, ``[1:4]``, ``[[0, 2]]``: blocks that run at those generation steps (checked)."""
        return _CheckedIndexer(self)

    def check_steps(self, steps: StepSet) -> None:
        """Raise ``IndexError`` if ``steps`` names a step that generation never reaches."""
        if self.max_new_tokens is None:
            return
        named = [steps.steps] if isinstance(steps.steps, int) else steps.steps if isinstance(steps.steps, list) \
            else [steps.first]
        past = [step for step in named if step >= self.max_new_tokens]
        if past:
            raise IndexError(f"{user_line()}: tracer.iter{steps} names step {past[0]}, but "
                             f"max_new_tokens={self.max_new_tokens} runs steps 0 to {self.max_new_tokens - 1}")
        last = steps.last
        if isinstance(steps.steps, slice) and last is not None and last >= self.max_new_tokens:
            warn_at_user_line(f"tracer.iter{steps} names steps up to {last}, but max_new_tokens="
                              f"{self.max_new_tokens} runs steps 0 to {self.max_new_tokens - 1}: the block runs only at "
                              f"its steps below {self.max_new_tokens}")

    def module_value(self, path: str, kind: str) -> Any:
        self._check_cursor()
        return super().module_value(path, kind)

    def _key(self, path: str, kind: str, invoke: Any = "current") -> tuple:
        """``module.next()`` outside an iteration block moves to the module's next call across steps: its call in
        the next generation step for a module called once per forward pass (so the same step whether or not the
        trace also has ``tracer.iter`` blocks, which make calls count per step)."""
        path, kind, call, step, section, invoke = super()._key(path, kind, invoke)
        if section is None and call:
            per_step = self._calls_per_step(path)
            step, call = step + call // per_step, call % per_step
            if self.max_new_tokens is not None and step >= self.max_new_tokens:
                raise IndexError(f"{user_line()}: .next() moved {path or 'the model'} to generation step {step}, but "
                                 f"max_new_tokens={self.max_new_tokens} runs steps 0 to {self.max_new_tokens - 1}")
        return path, kind, call, step, section, invoke

    def _calls_per_step(self, path: str) -> int:
        """How often the module at ``path`` runs in one forward pass (from the prompt's scan; 1 when unknown)."""
        scan = self._scan(None) if self.validate else None
        return max(scan.calls(path), 1) if scan is not None else 1

    def set_module_value(self, path: str, kind: str, value: Any) -> None:
        self._check_cursor()
        super().set_module_value(path, kind, value)

    def _check_cursor(self) -> None:
        steps = self.max_new_tokens
        if steps is not None and self.graph.current_section is None and self._step_cursor >= steps:
            raise IndexError(f"{user_line()}: tracer.next() moved to step {self._step_cursor}, but "
                             f"max_new_tokens={steps} runs steps 0 to {steps - 1}")

    def _open_invoke(self, inputs: tuple, kwargs: dict) -> int | None:
        index = super()._open_invoke(inputs, kwargs)
        steps = self.max_new_tokens
        if index is not None and steps is not None and self.context is not None:
            length = self.invokes[index].kwargs["input_ids"].shape[1]
            if length + steps > self.context:
                self.invokes.pop()
                self._close_invoke()
                raise ValueError(f"{user_line()}: the prompt has {length} tokens and max_new_tokens={steps}, "
                                 f"but the model reads at most {self.context} tokens; lower max_new_tokens to "
                                 f"{max(self.context - length, 0)} or shorten the prompt")
        return index


class _CheckedIndexer(IterationIndexer):
    """``tracer.iter[...]`` of a :class:`GenerationTracer`: the steps are checked against ``max_new_tokens``."""

    def __getitem__(self, steps: int | list[int] | slice) -> IterationBlock:
        block = super().__getitem__(steps)
        self.tracer.check_steps(block.steps)
        return block
