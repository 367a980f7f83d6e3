"""What a trace will hold in memory, from its fake shapes, before anything runs.

``saved`` is what the saved values will hold after the run: a saved view (``logits[0, -1]``) keeps the whole
tensor it views alive, so it counts the storage it points into, once however many views share it.
``largest`` is the largest single value the run keeps alive at some point (a module output the graph reads, a
stacked cache of every layer). Values from generation steps count once per node: a list that grows every step
holds more.

In [1]: forecast = memory_forecast(tracer.graph)
In [2]: forecast.describe()
Out[2]: 'saves 4.6 MB · largest value 2.3 MB'
In [3]: parse_bytes("2GB")
Out[3]: 2000000000
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from ..tracing.graph import Graph

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


@dataclass(frozen=True)
class MemoryForecast:
    """Bytes the saved values will hold, and the largest value alive during the run (both from fake shapes)."""

    saved: int
    largest: int
    largest_label: str = ""

    def describe(self) -> str:
        text = f"saves {format_bytes(self.saved)} · largest value {format_bytes(self.largest)}"
        return text + (f" ({self.largest_label})" if self.largest_label else "")

    def warning(self, threshold: int | None) -> str:
        """A warning when the saved values or the largest value exceed ``threshold`` bytes (``""`` otherwise)."""
        if threshold is None or max(self.saved, self.largest) <= threshold:
            return ""
        return (f"memory: this trace will hold {format_bytes(max(self.saved, self.largest))}, above "
                f"{format_bytes(threshold)} (%config TraceMagics.memory_warning); save fewer or smaller values "
                f"(index before saving: `x[0, -1]` keeps only a view, `.clone()` it to free the rest)")


def memory_forecast(graph: Graph, labels: list[str] | None = None) -> MemoryForecast:
    """The forecast of ``graph`` (see the module docstring); ``labels`` name nodes for the largest value."""
    nodes = graph.nodes
    sizes = [fake_bytes(node.fake) for node in nodes]
    saved_roots = {node.storage_root for node in nodes if node.saved}
    saved = sum(sizes[root] for root in saved_roots)
    largest, where = 0, ""
    for node in nodes:
        size = sizes[node.storage_root]
        if size > largest:
            largest = size
            where = labels[node.storage_root] if labels else ""
    return MemoryForecast(saved, largest, where)


def fake_bytes(fake: Any) -> int:
    """The bytes a value of this fake (a tensor, or tuples/lists/dicts of them) will take."""
    if isinstance(fake, torch.Tensor):
        return fake.numel() * fake.element_size()
    if isinstance(fake, (tuple, list)):
        return sum(fake_bytes(item) for item in fake)
    if isinstance(fake, dict):
        return sum(fake_bytes(item) for item in fake.values())
    return 0


def parse_bytes(text: str) -> int:
    """``"2GB"`` → 2_000_000_000; ``"512MiB"``, ``"1.5 gb"`` and plain numbers of bytes too."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size: write it like '2GB', '512MiB' or '1e9'")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(count: int) -> str:
    """``4.6 MB``: decimal units, three digits."""
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"
