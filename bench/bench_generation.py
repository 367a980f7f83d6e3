"""Generating 10 tokens with a per-step save, vs Hugging Face ``generate`` with a hand-written hook.

The model is GPT-2-small-shaped (random weights), the prompt 32 random token ids. Every case generates exactly
10 tokens greedily (``min_new_tokens=10``: random weights may produce the end-of-text token early):

* ``hf``: plain ``model.generate``;
* ``hf_hook``: ``model.generate`` with a forward hook on block 6 that clones its output at every step;
* ``lm_on`` / ``lm_off``: ``LanguageModel.generate`` saving block 6's output at every step
  (``for step in tracer.iter[0:10]``) and the generated ids, with ``validate=True`` (scans cached) / ``False``.

Before timing, the traced tokens must equal HF's and each step's saved output the hook's clone.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from bench import common
from bench.models import gpt2_small, token_ids
from nnsight_magic.models.language import LanguageModel

NEW_TOKENS, BLOCK = 10, 6


def hf_generate(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=model.config.pad_token_id)


def hf_generate_hooked(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HF ``generate`` with a hook cloning block 6's output at every step (registered for this call only)."""
    hidden: list[torch.Tensor] = []
    handle = model.transformer.h[BLOCK].register_forward_hook(lambda _, __, out: hidden.append(out.clone()))
    try:
        return hf_generate(model, ids), hidden
    finally:
        handle.remove()


def traced_generate(lm: LanguageModel, ids: torch.Tensor, validate: bool) -> tuple[torch.Tensor, list]:
    with lm.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, validate=validate) as tracer:
        hidden = tracer.list().save()
        for _ in tracer.iter[0:NEW_TOKENS]:
            hidden.append(lm.transformer.h[BLOCK].output)
        tokens = tracer.result.save()
    return tokens.value, hidden.value


def cases() -> dict[str, Callable[[], Any]]:
    model = gpt2_small()
    lm, ids = LanguageModel(model), token_ids(model)
    expected_tokens, expected_hidden = hf_generate_hooked(model, ids)
    common.assert_same("HF generate with and without the hook", hf_generate(model, ids), expected_tokens)
    for validate in (True, False):
        tokens, hidden = traced_generate(lm, ids, validate)
        common.assert_same(f"generated tokens (validate={validate})", tokens, expected_tokens)
        common.assert_same(f"per-step saves of block {BLOCK} (validate={validate})", hidden, expected_hidden)
    return {"hf": lambda: hf_generate(model, ids),
            "hf_hook": lambda: hf_generate_hooked(model, ids),
            "lm_off": lambda: traced_generate(lm, ids, False),
            "lm_on": lambda: traced_generate(lm, ids, True)}


DESCRIPTIONS = {"hf": "HF generate", "hf_hook": "HF generate + hand hook clones block 6 per step",
                "lm_off": "LanguageModel.generate, save block 6 per step, validate=False",
                "lm_on": "LanguageModel.generate, save block 6 per step, validate=True"}


def main() -> None:
    print(f"## Generation: {NEW_TOKENS} tokens with a per-step save (GPT-2-small shape, prompt of 32 tokens)\n")
    timings = common.interleave(cases(), rounds=common.rounds(40), warmup=2, clock=common.timer())
    print(common.table(timings, {"hf_hook": "hf", "lm_off": "hf_hook", "lm_on": "hf_hook"}, DESCRIPTIONS), "\n")
    hooked = common.summary(timings["hf_hook"])["median_ms"]
    rows = [(f"generate 10 + per-step save vs hand-hooked HF generate, validate={mode == 'on'}",
             common.paired_difference(timings[f"lm_{mode}"], timings["hf_hook"]),
             common.paired_interval(timings[f"lm_{mode}"], timings["hf_hook"]), 0.02 * hooked,
             f"lm_{mode} − hf_hook; target ≤ 1.02× = +2 % of {hooked:.1f} ms") for mode in ("off", "on")]
    print(common.targets_table(rows), "\n")
    print("The tokens and every step's saved output were checked against HF generate and the hook's clones before "
          "timing.\n")


if __name__ == "__main__":
    common.entry_point(main)
