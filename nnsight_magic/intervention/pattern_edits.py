"""Edited attention patterns: assigning ``attn.pattern``, or editing it in place, changes what the module outputs.

In [1]: with lm.trace("The Eiffel Tower is in"):
   ...:     attn = lm.layers[0].attn
   ...:     attn.pattern[:, :, :, 0] = 0                 # no attention to the first token, in every head
   ...:     logits = lm.output.logits.save()
In [2]: with lm.trace("The Eiffel Tower is in"):
   ...:     attn.pattern = attn.pattern * 0.5            # or assign a new (batch, heads, query, key) pattern

For that call of that module, its output becomes what eager attention computes with the edited probabilities
(see :func:`~nnsight_magic.intervention.attention.gpt2_edited_output`); later reads of ``attn.pattern`` in the
trace see the edit. An in-place edit must be made on the ``.pattern`` value itself (``attn.pattern[...] = x``);
an edit of a value derived from it (``attn.pattern[0][1] = x``) changes only that value, as everywhere in a trace.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

from ..tracing.proxy import Proxy

Reroute = Callable[[Any], None]  # makes the module's output use the pattern it is given (see AttentionEnvoy)

_PATTERNS: "weakref.WeakKeyDictionary[Any, dict[tuple, Proxy]]" = weakref.WeakKeyDictionary()


class PatternProxy(Proxy):
    """The proxy of ``attn.pattern``: an in-place edit of it also makes the module use the edited pattern."""

    __slots__ = ("_reroute",)

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        self._reroute(self)  # created after the edit, so the module's new output reads the edited pattern


def current_pattern(tracer: Any, key: tuple, read: Callable[[], Proxy], reroute: Reroute) -> Proxy:
    """The pattern that reads of ``key`` (a module call) see: the last one assigned, else ``read()`` (once)."""
    patterns = _PATTERNS.setdefault(tracer, {})
    proxy = patterns.get(key)
    if proxy is None:
        proxy = patterns[key] = _editable(tracer, read(), reroute)
    return proxy


def assign_pattern(tracer: Any, key: tuple, value: Any, reroute: Reroute) -> None:
    """``attn.pattern = value``: the module's output uses ``value``; later reads of the pattern see it."""
    proxy = value if isinstance(value, Proxy) else tracer.apply(_same, value)
    reroute(proxy)
    _PATTERNS.setdefault(tracer, {})[key] = _editable(tracer, proxy, reroute)


def _editable(tracer: Any, proxy: Proxy, reroute: Reroute) -> PatternProxy:
    editable = PatternProxy(proxy.node, tracer)
    object.__setattr__(editable, "_reroute", reroute)
    tracer.adopt(editable)  # detached after the run like every proxy of the trace
    return editable


def _same(value: Any) -> Any:
    """A plain value assigned as a pattern, as a node of the graph."""
    return value
