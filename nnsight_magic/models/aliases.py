"""Module aliases: one notebook for GPT-2 and Llama-style models (``rename=``, nnsight's spelling).

In [1]: lm = LanguageModel(gpt2)                    # or a Llama / SmolLM2 / Mistral / Qwen2 model
In [2]: lm.layers[0].attn, lm.layers[0].mlp        # transformer.h[0].attn  |  model.layers[0].self_attn
In [3]: lm.embed, lm.ln_final, lm.unembed          # transformer.wte, transformer.ln_f, lm_head  |  model.embed_tokens, ...
In [4]: net = NNsight(module, rename={"transformer.h": "layers", "self_attn": "attn"})

A key with dots is a module path from the root (``"transformer.h"``); a key without dots is a child name that
any module may have (``"self_attn"``). The alias is one more name: the real names keep working, values read
through an alias are the real module's (``lm.layers[0].output`` is ``transformer.h[0].output``).
"""

from __future__ import annotations

import torch

_GPT2_STYLE = {"transformer.h": "layers", "transformer.wte": "embed", "transformer.ln_f": "ln_final",
               "lm_head": "unembed"}
_LLAMA_STYLE = {"model.layers": "layers", "model.embed_tokens": "embed", "model.norm": "ln_final",
                "lm_head": "unembed", "self_attn": "attn"}
FAMILIES = {"gpt2": _GPT2_STYLE, "llama": _LLAMA_STYLE, "mistral": _LLAMA_STYLE, "qwen2": _LLAMA_STYLE,
            "qwen3": _LLAMA_STYLE, "gemma": _LLAMA_STYLE, "gemma2": _LLAMA_STYLE, "phi3": _LLAMA_STYLE,
            "olmo": _LLAMA_STYLE, "olmo2": _LLAMA_STYLE}


def standard_aliases(module: torch.nn.Module) -> dict[str, str]:
    """The aliases of ``module``'s architecture family (by ``config.model_type``), only for paths it has."""
    model_type = getattr(getattr(module, "config", None), "model_type", None)
    aliases = FAMILIES.get(model_type, {})
    paths = dict(module.named_modules())
    return {real: alias for real, alias in aliases.items() if "." not in real or real in paths}
