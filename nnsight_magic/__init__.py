"""nnsight_magic: look inside a PyTorch model, and change it, from notebook cells or plain Python."""

from .errors import OutOfOrderError
from .models.nnsight import NNsight

__all__ = ["NNsight", "OutOfOrderError"]
