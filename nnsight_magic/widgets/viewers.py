"""Viewers for what interpretability work looks at: a logit lens, attention heads, values per token, any tensor.

Each viewer is an anywidget (its front end in the repository's ``widgets/`` folder: hover, pin, sliders) and also
carries a static rendering in its mime bundle (``text/html``, ``text/plain``), which nbconvert HTML, GitHub and VS
Code show without a kernel. Data is copied out of the tensors once (rounded), so a viewer keeps no tensor alive.

In [1]: from nnsight_magic.widgets import LogitLens, AttentionHeads, TokenValues, TensorView, view
In [2]: LogitLens(probabilities, tokens=prompt_tokens, decode=lm.tokenizer.decode)   # (layers, positions, vocab)
In [3]: AttentionHeads(pattern[0], tokens=prompt_tokens)                              # (heads, queries, keys)
In [4]: TokenValues(scores, tokens=prompt_tokens)                                     # one value per token
In [5]: TensorView(h5)                                                                # any tensor
In [6]: view(value, tokens=prompt_tokens, decode=lm.tokenizer.decode)                 # the viewer that fits
"""

from __future__ import annotations

import html
from typing import Any, Callable, Sequence

import anywidget
import torch
import traitlets

from .assets import asset, viewer_module

TOP_LIMIT = 48  # positions a lens shows (the last ones); heads, tokens and cells are bounded the same way
CELL_LIMIT = 40_000  # TensorView sends at most this many numbers; larger tensors are shown in their first slices


def _blues(p: float) -> str:
    t = max(0.0, min(1.0, p))
    return f"rgb({round(247 - 222 * t)},{round(251 - 148 * t)},{round(255 - 90 * t)})"


def _diverging(value: float, scale: float) -> str:
    t = max(-1.0, min(1.0, value / scale if scale else 0.0))
    fade = round(255 * (1 - abs(t)))
    return f"rgb({fade},{fade},255)" if t < 0 else f"rgb(255,{fade},{fade})"


def _ink(p: float) -> str:
    return "#fff" if p > 0.55 else "#111"


class Viewer(anywidget.AnyWidget):
    """What every viewer shares: ``data`` for its front end, a static rendering, a text form."""

    _css = asset("widgets", "viewers.css")
    data = traitlets.Dict().tag(sync=True)

    def static_html(self) -> str:
        """The viewer as self-contained HTML (no script): what a page without a kernel shows."""
        raise NotImplementedError

    def text(self) -> str:
        return self.data.get("title", type(self).__name__)

    def _repr_mimebundle_(self, **kwargs: Any) -> dict | None:
        bundle = super()._repr_mimebundle_(**kwargs)
        if isinstance(bundle, tuple):
            bundle = bundle[0]
        if bundle is not None:
            bundle["text/html"] = (f'<div class="nnsight-viewer nnsight-static"><style>{self._css}</style>'
                                   f'{self.static_html()}</div>')
            bundle["text/plain"] = self.text()
        return bundle


def _strings(tokens: Sequence[Any] | None, count: int, decode: Callable | None) -> list[str]:
    if tokens is None:
        return [str(position) for position in range(count)]
    return [decode(int(token)) if decode is not None and not isinstance(token, str) else str(token)
            for token in tokens]


class LogitLens(Viewer):
    """Layers × positions: each cell the top-1 token of the lens, coloured by its probability.

    Hover a cell to see that token's probability at every layer of its position; click to pin it.

    Args:
        probabilities: ``(layers, positions, vocab)`` (or ``(layers, vocab)`` for one position), e.g.
            ``torch.stack([lm.lm_head(lm.model.norm(block.output[0])).softmax(-1) for block in lm.model.layers])``.
        tokens: the input tokens (strings, or ids with ``decode``) along the positions.
        decode: a tokenizer's ``decode``, to show token ids as text.
    """

    _esm = viewer_module("logit_lens")

    def __init__(self, probabilities: torch.Tensor, tokens: Sequence[Any] | None = None,
                 decode: Callable[[int], str] | None = None, title: str = "logit lens: top token per layer"):
        super().__init__()
        probabilities = probabilities.detach().float()
        if probabilities.dim() == 2:
            probabilities = probabilities[:, None]
        if probabilities.dim() != 3:
            raise ValueError(f"LogitLens needs probabilities of shape (layers, positions, vocab), not "
                             f"{tuple(probabilities.shape)}")
        probabilities = probabilities[:, -TOP_LIMIT:]
        layers, positions, _ = probabilities.shape
        top_p, top_id = probabilities.max(-1)
        vocab: dict[int, str] = {}
        trajectories: list[dict[int, list[float]]] = []
        for position in range(positions):
            ids = sorted(set(top_id[:, position].tolist()))
            trajectories.append({token: [round(p, 4) for p in probabilities[:, position, token].tolist()]
                                 for token in ids})
        for token in top_id.unique().tolist():
            vocab[token] = decode(token) if decode is not None else str(token)
        shown_tokens = list(tokens)[-positions:] if tokens is not None else None
        self.data = {
            "title": title, "layers": list(range(layers)),
            "tokens": _strings(shown_tokens, positions, decode),
            "top": [[[int(token), round(float(p), 4)] for token, p in zip(top_id[layer].tolist(),
                                                                       top_p[layer].tolist())]
                    for layer in range(layers)],
            "vocab": {str(key): value for key, value in vocab.items()},
            "trajectories": [{str(key): value for key, value in each.items()} for each in trajectories],
        }

    def top_tokens(self, layer: int) -> list[str]:
        """The lens's top token at each position of ``layer`` (as text)."""
        return [self.data["vocab"][str(token)] for token, _ in self.data["top"][layer]]

    def static_html(self) -> str:
        data, escape = self.data, html.escape
        head = "".join(f"<th>{escape(repr(token))}</th>" for token in data["tokens"])
        rows = []
        for layer in range(len(data["top"]) - 1, -1, -1):
            cells = "".join(
                f'<td data-layer="{layer}" data-position="{position}" style="background:{_blues(p)};'
                f'color:{_ink(p)}" title="{escape(repr(data["vocab"][str(token)]))} p={p:.3f}">'
                f'{escape(data["vocab"][str(token)])}</td>'
                for position, (token, p) in enumerate(data["top"][layer]))
            rows.append(f"<tr><th>{layer}</th>{cells}</tr>")
        return (f'<div class="title">{escape(data["title"])}</div><table class="lens"><tr><th>layer</th>{head}</tr>'
                f'{"".join(rows)}</table>')

    def text(self) -> str:
        last = self.top_tokens(len(self.data["top"]) - 1)
        return f"LogitLens: {len(self.data['top'])} layers × {len(last)} positions; last layer: {last}"


class AttentionHeads(Viewer):
    """One small attention pattern per head; hover to preview it with the tokens on both axes, click to lock.

    Args:
        pattern: ``(heads, queries, keys)`` (a batch of one: ``(1, heads, q, k)`` is accepted too), each row a
            distribution over keys, e.g. ``outputs.attentions[layer][0]`` from Hugging Face with
            ``output_attentions=True``.
        tokens: the tokens along both axes.
        causal: grey out the keys after each query (a decoder's mask).
    """

    _esm = viewer_module("attention_heads")

    def __init__(self, pattern: torch.Tensor, tokens: Sequence[Any] | None = None,
                 decode: Callable[[int], str] | None = None, causal: bool = True, title: str = "attention heads"):
        super().__init__()
        pattern = pattern.detach().float()
        if pattern.dim() == 4 and pattern.shape[0] == 1:
            pattern = pattern[0]
        if pattern.dim() != 3 or pattern.shape[1] != pattern.shape[2]:
            raise ValueError(f"AttentionHeads needs a pattern of shape (heads, queries, keys) with as many queries "
                             f"as keys, not {tuple(pattern.shape)}")
        pattern = pattern[:, -TOP_LIMIT:, -TOP_LIMIT:]
        self.data = {"title": title, "causal": causal, "tokens": _strings(tokens, pattern.shape[1], decode),
                     "patterns": [[[round(p, 3) for p in row] for row in head] for head in pattern.tolist()]}

    def static_html(self) -> str:
        data = self.data
        parts = [f'<div class="title">{html.escape(data["title"])}</div><div class="heads">']
        for head, pattern in enumerate(data["patterns"]):
            size = max(2, 64 // len(pattern))
            rects = "".join(
                f'<rect x="{k * size}" y="{q * size}" width="{size}" height="{size}" '
                f'fill="{"rgba(128,128,128,0.25)" if data["causal"] and k > q else _blues(p)}"/>'
                for q, row in enumerate(pattern) for k, p in enumerate(row))
            side = size * len(pattern)
            parts.append(f'<div class="head" data-head="{head}"><svg width="{side}" height="{side}">{rects}</svg>'
                         f'<div>head {head}</div></div>')
        parts.append("</div>")
        return "".join(parts)

    def text(self) -> str:
        return f"AttentionHeads: {len(self.data['patterns'])} heads over {len(self.data['tokens'])} tokens"


class TokenValues(Viewer):
    """A value per token, shown as the tokens coloured by it (blue below zero, red above; hover for the value)."""

    _esm = viewer_module("token_values")

    def __init__(self, values: torch.Tensor | Sequence[float], tokens: Sequence[Any],
                 decode: Callable[[int], str] | None = None, title: str = "value per token"):
        super().__init__()
        values = torch.as_tensor(values).detach().float().reshape(-1)
        words = _strings(tokens, len(values), decode)
        if len(words) != len(values):
            raise ValueError(f"TokenValues got {len(values)} values for {len(words)} tokens: give one value per token")
        numbers = [round(value, 4) for value in values.tolist()]
        self.data = {"title": title, "tokens": words, "values": numbers,
                     "scale": max((abs(value) for value in numbers), default=0.0)}

    def static_html(self) -> str:
        data = self.data
        spans = "".join(
            f'<span class="token" data-position="{i}" title="{html.escape(repr(token))}: {value}" '
            f'style="background:{_diverging(value, data["scale"])};'
            f'color:{_ink(abs(value) / data["scale"] if data["scale"] else 0)}">{html.escape(token)}</span>'
            for i, (token, value) in enumerate(zip(data["tokens"], data["values"])))
        return f'<div class="title">{html.escape(data["title"])}</div><div class="tokens">{spans}</div>'

    def text(self) -> str:
        return "TokenValues: " + " ".join(f"{token!r}={value:.3g}" for token, value in
                                          zip(self.data["tokens"], self.data["values"]))


class TensorView(Viewer):
    """Any tensor: its last two axes as a heatmap, a slider per other axis, a histogram of all its values."""

    _esm = viewer_module("tensor_view")

    def __init__(self, tensor: torch.Tensor, title: str | None = None):
        super().__init__()
        tensor = tensor.detach().float().cpu()
        while tensor.dim() < 2:
            tensor = tensor[None]
        histogram = torch.histc(tensor[torch.isfinite(tensor)], bins=32).tolist() if tensor.numel() else []
        shown = tensor
        while shown.numel() > CELL_LIMIT and shown.dim() > 2:
            shown = shown[: max(1, shown.shape[0] // 2)]
        if shown.numel() > CELL_LIMIT:
            rows = max(1, CELL_LIMIT // shown.shape[-1])
            shown = shown[..., :rows, : CELL_LIMIT // rows]
        finite = tensor[torch.isfinite(tensor)]
        stats = (f"shape {tuple(tensor.shape)} · min {finite.min():.3g} · mean {finite.mean():.3g} · "
                 f"max {finite.max():.3g}" if finite.numel() else f"shape {tuple(tensor.shape)}")
        self.data = {"title": title or f"tensor {tuple(tensor.shape)}", "shape": list(shown.shape),
                     "values": [round(value, 4) for value in shown.reshape(-1).tolist()],
                     "scale": float(finite.abs().max()) if finite.numel() else 0.0,
                     "histogram": histogram, "stats": stats}

    def static_html(self) -> str:
        data = self.data
        rows, cols = data["shape"][-2:]
        size = max(3, min(16, 480 // max(rows, cols)))
        values = data["values"][: rows * cols]
        rects = "".join(f'<rect x="{(i % cols) * size}" y="{(i // cols) * size}" width="{size}" height="{size}" '
                        f'fill="{_diverging(value, data["scale"])}"/>' for i, value in enumerate(values))
        tallest = max(data["histogram"], default=1) or 1
        bars = "".join(f'<rect x="{i * 7.5}" y="{60 - 60 * count / tallest}" width="6.5" height="{60 * count / tallest}"'
                       f' fill="var(--jp-brand-color1, #1976d2)"/>' for i, count in enumerate(data["histogram"]))
        return (f'<div class="title">{html.escape(data["title"])}</div>'
                f'<svg width="{cols * size}" height="{rows * size}">{rects}</svg>'
                f'<div class="muted">{html.escape(data["stats"])}</div><svg width="240" height="60">{bars}</svg>')

    def text(self) -> str:
        return f"TensorView: {self.data['stats']}"


def view(value: Any, tokens: Sequence[Any] | None = None, decode: Callable[[int], str] | None = None) -> Viewer:
    """The viewer that fits ``value``: a lens for stacked next-token distributions, heads for an attention
    pattern, coloured tokens for one value per token, else a heatmap.

    In [1]: view(torch.stack(lens))           # (layers, vocab) or (layers, positions, vocab) probabilities
    Out[1]: LogitLens(...)
    """
    tensor = torch.as_tensor(value).detach()
    count = len(tokens) if tokens is not None else None
    if tensor.is_floating_point() and tensor.dim() in (2, 3) and tensor.shape[-1] > 256 and _distributions(tensor):
        return LogitLens(tensor, tokens=tokens, decode=decode)
    square = tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2]
    if tensor.is_floating_point() and square and tensor.dim() in (3, 4) and _distributions(tensor):
        return AttentionHeads(tensor, tokens=tokens, decode=decode)
    if count is not None and tensor.numel() == count:
        return TokenValues(tensor, tokens, decode=decode)
    return TensorView(tensor)


def _distributions(tensor: torch.Tensor) -> bool:
    """Every row is a probability distribution (non-negative, sums to 1)."""
    sums = tensor.float().sum(-1)
    return bool((tensor >= 0).all()) and bool(torch.allclose(sums, torch.ones_like(sums), atol=1e-3))
