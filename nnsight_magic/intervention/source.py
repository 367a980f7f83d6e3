"""``module.source``: the values inside a module's forward, by name (nnsight's ``.source``).

In [1]: print(lm.transformer.h[0].attn.source)            # the forward's source, operations marked
In [2]: with lm.trace("The Eiffel Tower is in"):
   ...:     attn = lm.transformer.h[0].attn.source
   ...:     weights = attn.attn_weights.output.save()       # a variable's value (eager attention: the probabilities)
   ...:     qkv = attn.c_attn_1.output.save()                # what `self.c_attn(hidden_states)` returned
   ...:     x = attn.c_proj_0.input                          # its first argument: editable, for this run only
   ...:     x[:, -1] = 0
In [3]: weights.shape                                        # known while building (the scan runs the rewrite)

Names: a call is named after its callee's last name and a count in source order (``view_0``, ``view_1``,
``attention_interface_0``); a variable assigned on one line by its name (``attn_weights``); a variable assigned
on several lines gets ``x_0``, ``x_1``, ... per line, and ``x`` is every assignment in the order they run (its
first, then ``.next()``). Each name is an Envoy-like value: ``.output``, ``.input``, ``.inputs``, assignment,
in-place edits, ``.skip()`` and ``.next()`` work as on a module. How the forward is rewritten is in
:mod:`.source_rewrite`; when it runs rewritten, in :mod:`.source_install`.

Attention in Hugging Face models dispatches to an implementation (``attention_interface``): the operations of
the module's forward are the same under every one, but with ``sdpa`` or a flash kernel ``attn_weights`` is
``None`` (the probabilities are never formed); with ``eager`` it is the softmax probabilities.

A call of a Python function has a ``.source`` of its own, the operations of the function it calls, to any depth:

In [4]: with lm.trace("The Eiffel Tower is in"):
   ...:     inner = lm.transformer.h[0].attn.source.attention_interface_0.source   # eager_attention_forward's
   ...:     probabilities = inner.softmax_0.output.save()

The function is known from its name when the forward names a helper (``apply_rotary_pos_emb``), or else from the
last call of the operation (the trace's fake scan runs it: ``attention_interface`` is chosen at run time).
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Callable, Iterator

import torch

from ..tracing.node import module_label, user_line
from .source_install import Operation, SourceOperations, operations_of
from .source_rewrite import SOURCE_KEY, Site, SourceUnavailable

GUTTER = 34  # columns for the operation names left of each source line


class SourceEnvoy:
    """The operations of one module's forward; ``source.NAME`` is the Envoy of operation ``NAME``.

    ``str(source)`` is the forward's source with each line's operations in the margin; ``list(source)`` the
    names; ``source["NAME"]`` also works for a name that is not an identifier-safe attribute.
    """

    def __init__(self, module: torch.nn.Module, path: str, make_envoy: Callable[[torch.nn.Module, str], Any],
                 discover: Callable[[], None] | None = None):
        try:
            try:
                holder = operations_of(module)
            except SourceUnavailable:
                if discover is None or not isinstance(module, Operation):
                    raise
                discover()  # a scan runs the forward around the call: the operation learns its function
                holder = operations_of(module)
        except SourceUnavailable as error:
            raise SourceUnavailable(f"{user_line()}: {module_label(path)}.source: {error}") from None
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_holder", holder)
        object.__setattr__(self, "_make_envoy", make_envoy)
        object.__setattr__(self, "_envoys", {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self[name]

    def __getitem__(self, name: str) -> Any:
        envoy = self._envoys.get(name)
        if envoy is not None:
            return envoy
        holder: SourceOperations = self._holder
        operation = holder._modules.get(name)
        if operation is None:
            raise AttributeError(self._unknown(name))
        prefix = f"{self._path}." if self._path else ""
        envoy = self._envoys[name] = self._make_envoy(operation, f"{prefix}{SOURCE_KEY}.{name}")
        return envoy

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{user_line()}: assign an operation's value, not the operation: "
                             f"`.source.{name}.output = value`")

    def __iter__(self) -> Iterator[str]:
        return iter(self._holder._modules)

    def __len__(self) -> int:
        return len(self._holder._modules)

    def __contains__(self, name: object) -> bool:
        return name in self._holder._modules

    def __dir__(self) -> list[str]:
        return list(self._holder._modules)

    def _unknown(self, name: str) -> str:
        names = list(self._holder._modules)
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(match) for match in close)}?" if close else ""
        return (f"{user_line()}: {module_label(self._path)}.source ({self._holder.rewrite.qualname}) has no "
                f"operation {name!r}{hint} Its operations are: {', '.join(names)}. "
                f"`print({module_label(self._path)}.source)` shows where each one is")

    def __repr__(self) -> str:
        return listing(self._holder.rewrite.sites, self._holder.rewrite, self._module, self._path)

    __str__ = __repr__


def listing(sites: list[Site], rewrite: Any, module: torch.nn.Module, path: str) -> str:
    """The forward's source, each line prefixed by the operations it holds (as ``print(module.source)`` shows)."""
    where = f"{os.path.basename(rewrite.filename)}:{rewrite.first_line}"
    header = [f"{module_label(path)}.source: {rewrite.qualname} ({where}), {len(sites)} operations; "
              "read one with `.source.NAME.output` (a call's arguments: `.input`, `.inputs`)"]
    variables = [site for site in sites if site.kind == "variable"]
    if variables:
        header.append("every assignment of a variable assigned on several lines: " + ", ".join(
            f"{site.name} (lines {', '.join(map(str, site.lines))})" for site in variables))
    config = getattr(module, "config", None)
    implementation = getattr(config, "_attn_implementation", None)
    if implementation is not None and any(site.text == "attention_interface" for site in sites):
        header.append(f"attention_interface runs {implementation!r} attention: " + (
            "attn_weights holds the softmax probabilities" if implementation == "eager" else
            "attn_weights is None (only eager attention forms the probabilities)"))
    by_line: dict[int, list[str]] = {}
    for site in sites:
        if site.kind != "variable":
            by_line.setdefault(site.line, []).append(site.name)
    rows = list(header) + [""]
    for offset, text in enumerate(rewrite.lines):
        number = rewrite.first_line + offset
        names = by_line.get(number, [])
        gutter: list[str] = []
        for name in names:
            if gutter and len(gutter[-1]) + 1 + len(name) <= GUTTER:
                gutter[-1] += f" {name}"
            else:
                gutter.append(name)
        gutter = gutter or [""]
        rows.append(f"{gutter[0]:<{GUTTER}} {number:>5}  {text.rstrip()}")
        rows.extend(f"{more:<{GUTTER}}" for more in gutter[1:])
    return "\n".join(rows)
