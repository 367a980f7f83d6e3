"""A short, fixed-size summary of a value: shape, dtype, min/mean/max, and a small picture of its distribution.

The inspector shows one for every saved value once the model has run. It keeps only numbers and strings, never
the tensor, so a displayed widget does not keep activations alive.

In [1]: summary = summarize(torch.tensor([[0.5, -1.0], [2.0, 0.0]]))
In [2]: summary.describe()
Out[2]: 'min -1  mean 0.375  max 2  std 1.25'
In [3]: summary.picture, summary.bins                 # four values: a heat-strip of the values themselves
Out[3]: ('strip', (0.5, -1.0, 2.0, 0.0))
In [4]: summarize(torch.randn(1000)).picture          # more values: a histogram
Out[4]: 'histogram'
"""

from __future__ import annotations

import dataclasses
import html
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .theme import ACCENT

INTEGER_LIMIT = 8  # integer tensors up to this many elements show every value (and its token)
STRIP_LIMIT = 64  # values up to this many elements are drawn one cell per element
HISTOGRAM_BINS = 24
_SPARKS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class ValueSummary:
    """What the inspector shows about one real value.

    Attributes:
        kind: ``tensor``, ``scalar`` (a Python number or bool), ``list`` or ``other``.
        shape: the tensor's shape, ``(len,)`` for a list, ``None`` otherwise.
        dtype: ``float32`` ...; the type name for values that are not tensors.
        minimum, mean, maximum, std: torch's own statistics of the tensor (``None`` when empty or complex; ``std``
            also for a single element).
        nonfinite: how many elements are NaN or infinite.
        picture: ``histogram`` (``bins`` are counts over ``[low, high]``), ``strip`` (``bins`` are the values
            themselves, row-major) or ``""``.
        text: a short description for values that are not tensors (``list of 5 tensors (1,) int64``, ``3``).
    """

    kind: str
    shape: tuple[int, ...] | None = None
    dtype: str = ""
    minimum: float | None = None
    mean: float | None = None
    maximum: float | None = None
    std: float | None = None
    nonfinite: int = 0
    picture: str = ""
    bins: tuple[float, ...] = ()
    low: float = 0.0
    high: float = 0.0
    text: str = ""
    integers: tuple[int, ...] = ()
    tokens: tuple[str, ...] = ()

    def describe(self) -> str:
        """``min -1  mean 0.375  max 2  std 1.25`` for tensors, the short text otherwise."""
        if self.kind != "tensor":
            return self.text
        if self.minimum is None:
            return self.text
        if self.integers:
            shown = str(self.integers[0]) if self.shape == () else f"[{', '.join(map(str, self.integers))}]"
            tokens = " ".join(repr(token) for token in self.tokens)
            return f"= {shown}" + (f"  {tokens}" if tokens else "")
        if self.shape == ():
            return f"= {_number(self.minimum)}"
        whole = _integer if self.is_integer else _number
        parts = [f"min {whole(self.minimum)}", f"mean {_number(self.mean)}", f"max {whole(self.maximum)}"]
        if self.std is not None:
            parts.append(f"std {_number(self.std)}")
        if self.nonfinite:
            parts.append(f"{self.nonfinite} non-finite")
        return "  ".join(parts)

    @property
    def is_integer(self) -> bool:
        return self.kind == "tensor" and (self.dtype.startswith(("int", "uint")) or self.dtype == "bool")

    def sparkline(self) -> str:
        """The picture as text: ``▁▃█▅▂`` (histogram counts, or the strip's values)."""
        if not self.bins:
            return ""
        low = 0.0 if self.picture == "histogram" else min(self.bins)
        high = max(self.bins)
        span = (high - low) or 1.0
        return "".join(_SPARKS[min(len(_SPARKS) - 1, int((value - low) / span * (len(_SPARKS) - 1) + 0.5))]
                       for value in self.bins)

    def svg(self, width: int = 120, height: int = 18) -> str:
        """The picture as a small inline SVG: blue bars for a histogram, a blue-white-red strip for values."""
        if not self.bins:
            return ""
        count = len(self.bins)
        cell = width / count
        title = html.escape(f"{self.picture} over [{_number(self.low)}, {_number(self.high)}]")
        parts = [f'<svg class="nnsight-picture" data-picture="{self.picture}" width="{width}" height="{height}" '
                 f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg"><title>{title}</title>']
        if self.picture == "histogram":
            tallest = max(self.bins) or 1.0
            parts.append(f'<g fill="{ACCENT}">')
            for position, value in enumerate(self.bins):
                bar = height * value / tallest
                parts.append(f'<rect x="{position * cell:.4g}" y="{height - bar:.4g}" '
                             f'width="{max(cell - 0.5, 0.5):.4g}" height="{bar:.4g}"/>')
            parts.append("</g>")
        else:
            scale = max(abs(self.low), abs(self.high)) or 1.0
            for position, value in enumerate(self.bins):
                parts.append(f'<rect x="{position * cell:.1f}" y="0" width="{cell + 0.1:.1f}" height="{height}" '
                             f'fill="{_diverging(value / scale)}"/>')
        parts.append("</svg>")
        return "".join(parts)


def summarize(value: object, decode: Callable[[int], str] | None = None) -> ValueSummary:
    """The summary of one real value (see the module docstring).

    An integer tensor of at most :data:`INTEGER_LIMIT` elements shows its values as integers; with ``decode`` (a
    tokenizer's ``decode``) also as tokens, when every value is a token id (``0 <= id < vocabulary``):

    In [5]: summarize(torch.tensor(7042), tokenizer.decode).describe()
    Out[5]: "= 7042  ' Paris'"
    """
    if isinstance(value, torch.Tensor):
        summary = _tensor_summary(value)
        if summary.is_integer and summary.minimum is not None and value.numel() <= INTEGER_LIMIT:
            integers = tuple(int(item) for item in value.detach().reshape(-1).cpu().tolist())
            tokens: tuple[str, ...] = ()
            if decode is not None and value.dtype in (torch.int64, torch.int32) and min(integers) >= 0:
                try:
                    tokens = tuple(decode(item) for item in integers)
                except (IndexError, KeyError, ValueError, TypeError, OverflowError):
                    tokens = ()  # not token ids of this tokenizer: show the numbers only
            summary = dataclasses.replace(summary, integers=integers, tokens=tokens)
        return summary
    if isinstance(value, (bool, int, float)):
        return ValueSummary("scalar", dtype=type(value).__name__, text=repr(value))
    if isinstance(value, (list, tuple)):
        return ValueSummary("list", shape=(len(value),), dtype=type(value).__name__, text=_sequence_text(value))
    text = repr(value)
    return ValueSummary("other", dtype=type(value).__name__, text=text if len(text) <= 60 else text[:57] + "...")


def _tensor_summary(tensor: torch.Tensor) -> ValueSummary:
    """min/mean/max/std and a picture in few passes: when min and max are finite every element is (NaN and inf
    propagate into them), so the mask of finite values is built only for tensors that have some."""
    tensor = tensor.detach()
    shape, dtype = tuple(tensor.shape), str(tensor.dtype).replace("torch.", "")
    if tensor.numel() == 0 or tensor.is_complex() or tensor.is_meta:
        reason = "empty" if tensor.numel() == 0 else "complex" if tensor.is_complex() else "no data"
        return ValueSummary("tensor", shape, dtype, text=reason)
    numbers = tensor if tensor.is_floating_point() else tensor.double()
    smallest, largest = torch.aminmax(numbers)
    minimum, maximum, mean = smallest.item(), largest.item(), numbers.mean().item()
    std = numbers.std().item() if numbers.numel() > 1 else None
    nonfinite = 0
    finite = numbers.reshape(-1)
    if not (math.isfinite(minimum) and math.isfinite(maximum)):
        finite_mask = torch.isfinite(finite)
        finite = finite[finite_mask]
        nonfinite = numbers.numel() - finite.numel()
    if finite.numel() == 0 or numbers.dim() == 0:
        return ValueSummary("tensor", shape, dtype, minimum, mean, maximum, std, nonfinite)
    low, high = (minimum, maximum) if not nonfinite else (finite.min().item(), finite.max().item())
    if numbers.numel() <= STRIP_LIMIT:
        values = tuple(float(item) for item in numbers.reshape(-1).float().cpu().tolist())
        return ValueSummary("tensor", shape, dtype, minimum, mean, maximum, std, nonfinite, "strip", values, low, high)
    bins = histogram(finite, low, high)
    return ValueSummary("tensor", shape, dtype, minimum, mean, maximum, std, nonfinite, "histogram", bins, low, high)


def histogram(values: torch.Tensor, low: float, high: float, count: int = HISTOGRAM_BINS) -> tuple[float, ...]:
    """Counts of ``values`` (finite, 1-d) in ``count`` equal bins over ``[low, high]``; ``high`` goes in the last.

    The bin of ``v`` is ``floor((v - low) / (high - low) * count)``: one subtraction, one multiplication and a
    ``bincount``, about a third of ``torch.histc``'s time. All values equal: every one in the middle bin.

    In [1]: histogram(torch.tensor([0.0, 0.5, 1.0]), 0.0, 1.0, count=2)
    Out[1]: (1.0, 2.0)
    """
    if low == high:
        counts = [0.0] * count
        counts[count // 2] = float(values.numel())
        return tuple(counts)
    scaled = (values.double() - low) * (count / (high - low))
    index = scaled.long().clamp_(0, count - 1)
    return tuple(float(item) for item in torch.bincount(index, minlength=count).tolist())


def _sequence_text(value: list | tuple) -> str:
    name = type(value).__name__
    if not value:
        return f"empty {name}"
    first = value[0]
    if all(isinstance(item, torch.Tensor) for item in value):
        shapes = {tuple(item.shape) for item in value}
        shape = f" {tuple(first.shape)}" if len(shapes) == 1 else ""
        return f"{name} of {len(value)} tensor{'s' if len(value) != 1 else ''}{shape} " \
               f"{str(first.dtype).replace('torch.', '')}"
    items = ", ".join(_number(item) if isinstance(item, float) else repr(item) for item in value[:4])
    return f"{name} of {len(value)}: [{items}{', ...' if len(value) > 4 else ''}]"


def _number(value: float | None) -> str:
    if value is None:
        return "?"
    if isinstance(value, bool):
        return str(value)
    return f"{value:.3g}"


def _integer(value: float | None) -> str:
    return "?" if value is None else str(int(value))


def _diverging(fraction: float) -> str:
    """Blue for -1, white for 0, red for +1 (``fraction`` is clamped to [-1, 1]; NaN is grey)."""
    if fraction != fraction:
        return "#999999"
    fraction = max(-1.0, min(1.0, fraction))
    fade = int(255 * (1 - abs(fraction)))
    return f"#{fade:02x}{fade:02x}ff" if fraction < 0 else f"#ff{fade:02x}{fade:02x}"
