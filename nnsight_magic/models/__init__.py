"""Model wrappers: any ``torch.nn.Module`` (``NNsight``) and Hugging Face causal language models."""

from .embedded import gpt2_tokenizer, load_embedded_model
from .language import LanguageModel
from .nnsight import NNsight

__all__ = ["LanguageModel", "NNsight", "gpt2_tokenizer", "load_embedded_model"]
