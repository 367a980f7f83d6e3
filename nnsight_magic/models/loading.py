"""Loading a Hugging Face causal LM by name: at once, or lazily (the module tree on the meta device, weights later).

In [1]: lm = LanguageModel("openai-community/gpt2", device_map="auto")     # lazy: config and tokenizer only
In [2]: lm.dispatched, lm.transformer.h[0].mlp.c_fc.weight.device
Out[2]: (False, device(type='meta'))
In [3]: with lm.scan("Hello"):                          # shapes need no weights (a fake run of the meta tree)
   ...:     print(lm.transformer.h[0].output.shape)
torch.Size([1, 1, 768])
In [4]: layer = lm.transformer.h[0]
In [5]: with lm.trace("Hello"):                         # the first real run loads: from_pretrained(name, **kwargs)
   ...:     hidden = layer.output.save()
In [6]: lm.dispatched, layer is lm.transformer.h[0]
Out[6]: (True, True)

A lazy model is built from its config alone (``AutoConfig`` + ``AutoModelForCausalLM.from_config`` under
accelerate's ``init_empty_weights``, else ``torch.device("meta")``), with the dtype, ``attn_implementation`` and
``trust_remote_code`` of the ``from_pretrained`` keywords, so its tree, shapes and dtypes are the loaded model's.
Loading calls ``from_pretrained`` with the user's keywords (``device_map``, quantization and offloading work as
they do there) and moves every Envoy onto the loaded model's module at the same path: the Envoy objects the user
holds stay valid, and the loaded model is exactly what ``from_pretrained`` returned.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import torch

from ..intervention.envoy import Envoy
from ..tracing.node import user_line

# keyword arguments of ``from_pretrained`` that the config and the tokenizer need too
SHARED_LOADING_KEYWORDS = ("revision", "trust_remote_code", "token", "cache_dir", "local_files_only")
# keyword arguments of ``from_pretrained`` that change the tree ``from_config`` builds
_BUILDING_KEYWORDS = ("trust_remote_code", "attn_implementation")


class LazyWeights:
    """Where a lazily built model's weights come from, and the loaded model once it is loaded (one load, shared by
    a model and its edited copies)."""

    def __init__(self, name: str, kwargs: dict):
        self.name, self.kwargs = name, dict(kwargs)
        self.module: torch.nn.Module | None = None
        self._lock = threading.Lock()  # traces in two threads load once

    def load(self) -> torch.nn.Module:
        """The loaded model: ``from_pretrained(name, **kwargs)`` the first time."""
        with self._lock:
            if self.module is None:
                self.module = load_model(self.name, self.kwargs)
        return self.module


def load_model(name: str, kwargs: dict) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name, **kwargs)`` in eval mode; a failure names the user's line."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs).eval()
    except OSError as error:
        raise loading_error(name, error) from error


def build_on_meta(name: str, kwargs: dict) -> torch.nn.Module:
    """The model ``from_pretrained(name, **kwargs)`` would load, with its parameters on the meta device (no
    weights read: only the config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shared = {key: kwargs[key] for key in SHARED_LOADING_KEYWORDS if key in kwargs}
    try:
        config = AutoConfig.from_pretrained(name, **shared)
    except OSError as error:
        raise loading_error(name, error) from error
    options = {key: kwargs[key] for key in _BUILDING_KEYWORDS if key in kwargs}
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if dtype is not None and dtype != "auto":
        options["dtype"] = dtype
    with _empty_weights():
        return AutoModelForCausalLM.from_config(config, **options).eval()


def load_tokenizer(name: str, kwargs: dict) -> Any:
    """``AutoTokenizer.from_pretrained(name, **kwargs)``; a failure names the user's line."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, **kwargs)
    except OSError as error:
        raise loading_error(name, error) from error


def move_envoys(root: Envoy, module: torch.nn.Module) -> None:
    """Point ``root`` and every Envoy made under it at the module of the same path in ``module`` (an Envoy whose
    path ``module`` lacks is forgotten, and made afresh if asked for again)."""
    pending = [(root, module)]
    while pending:
        envoy, target = pending.pop()
        object.__setattr__(envoy, "_module", target)
        envoy.__dict__.pop("_source_envoy", None)  # made again from the new module when .source is read
        for name, child in list(envoy._children.items()):
            if name in target._modules:
                pending.append((child, target._modules[name]))
            else:
                del envoy._children[name]
                envoy.__dict__.pop(name, None)  # its cached attribute (see Envoy._child)


def _empty_weights() -> Any:
    """accelerate's ``init_empty_weights`` (parameters on meta, buffers real), else ``torch.device("meta")``."""
    try:
        from accelerate import init_empty_weights
    except ImportError:
        return torch.device("meta")
    return init_empty_weights()


def loading_error(name: str, error: OSError) -> OSError:
    """The ``OSError`` to raise when ``name`` cannot be loaded: the user's line, the cause, and what to do."""
    if os.path.isdir(name):
        return OSError(f"{user_line()}: the directory {name!r} does not hold a loadable model: {error}")
    return OSError(
        f"{user_line()}: cannot load {name!r}: it is not a local directory, and from_pretrained failed ({error}). "
        "Without network access a repo id loads only from the Hugging Face cache: download it once where the hub "
        f"is reachable (`hf download {name}`), pass a local directory or a loaded model, or use "
        "nnsight_magic.load_embedded_model(), which needs no hub")
