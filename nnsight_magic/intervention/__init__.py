"""The model-specific layer: the Envoy tree, tracers, interleaving with hooks, sessions and edits."""

from .envoy import Envoy
from .session import Session
from .tracer import Tracer

__all__ = ["Envoy", "Session", "Tracer"]
