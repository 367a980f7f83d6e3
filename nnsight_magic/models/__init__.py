"""Model wrappers: any ``torch.nn.Module`` (``NNsight``) and Hugging Face causal language models."""

from .nnsight import NNsight

__all__ = ["NNsight"]
