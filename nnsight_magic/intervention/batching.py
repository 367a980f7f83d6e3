"""Several invokes share one forward pass: each sees its own rows of every batched value.

In [1]: batch_groups = [(0, 1), (1, 2)]             # invoke 0 owns row 0, invoke 1 rows 1-2, of a batch of 3
In [2]: narrow(activation, 1, 2, batch_size=3)       # a *view* of rows 1-2: no copy, in-place edits reach the model
In [3]: compose(activation, [((1, 2), new_rows)], 3) # one new tensor: rows 0 from activation, 1-2 from new_rows

Only tensors whose first dimension is the batch size are narrowed; everything else (a KV cache object, a
scalar) is shared by all invokes. Values are walked through tuples, lists, dicts and Hugging Face
``ModelOutput`` objects, which keep their type. Replacing the rows of several invokes in one module call makes
exactly one copy of the activation, however many invokes there are (nnsight #396 made one per invoke).
"""

from __future__ import annotations

from typing import Any, Callable

import torch


def map_tensors(function: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """Apply ``function`` to every tensor inside ``value``; containers keep their types."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple):
        items = [map_tensors(function, item) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [map_tensors(function, item) for item in value]
    if isinstance(value, dict):
        mapped = {key: map_tensors(function, item) for key, item in value.items()}
        if type(value) is dict:
            return mapped
        try:
            return type(value)(**mapped)  # transformers' ModelOutput and other dataclass-like dicts
        except TypeError:
            return type(value)(mapped)
    return value


def narrow(value: Any, start: int, size: int, batch_size: int) -> Any:
    """Rows ``start:start+size`` of every batched tensor in ``value``, as views."""
    def rows(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dim() and tensor.shape[0] == batch_size:
            return tensor.narrow(0, start, size)
        return tensor
    return map_tensors(rows, value)


def compose(original: Any, replacements: list[tuple[tuple[int, int], Any]], batch_size: int) -> Any:
    """``original`` with the rows of each ``(start, size)`` group replaced by that group's new value.

    A replacement of the whole batch is returned as it is. Otherwise every batched tensor is rebuilt once from
    its untouched rows and the new rows; a replacement must have the structure of the value it replaces.
    """
    if len(replacements) == 1 and replacements[0][0] == (0, batch_size):
        return replacements[0][1]
    replacements = sorted(replacements, key=lambda item: item[0][0])
    return _compose(original, [(group, value) for group, value in replacements], batch_size)


def _compose(original: Any, replacements: list[tuple[tuple[int, int], Any]], batch_size: int) -> Any:
    if isinstance(original, torch.Tensor):
        if not original.dim() or original.shape[0] != batch_size:
            return replacements[-1][1]  # shared by all invokes: the last write wins, as in eager code
        pieces, position = [], 0
        for (start, size), value in replacements:
            if not isinstance(value, torch.Tensor) or value.shape[:1] != (size,):
                raise ValueError(f"the replacement for batch rows {start}:{start + size} has shape "
                                 f"{tuple(getattr(value, 'shape', ()))}; it must have {size} rows like the value it "
                                 "replaces")
            if start > position:
                pieces.append(original[position:start])
            pieces.append(value.to(device=original.device))
            position = start + size
        if position < batch_size:
            pieces.append(original[position:])
        return torch.cat(pieces)
    if isinstance(original, (tuple, list)):
        items = [_compose(item, [(group, _part(value, index)) for group, value in replacements], batch_size)
                 for index, item in enumerate(original)]
        if isinstance(original, list):
            return items
        return type(original)(*items) if hasattr(original, "_fields") else tuple(items)
    if isinstance(original, dict):
        mapped = {key: _compose(item, [(group, _part(value, key)) for group, value in replacements], batch_size)
                  for key, item in original.items()}
        if type(original) is dict:
            return mapped
        try:
            return type(original)(**mapped)
        except TypeError:
            return type(original)(mapped)
    return replacements[-1][1]


def _part(value: Any, key: Any) -> Any:
    try:
        return value[key]
    except (KeyError, IndexError, TypeError) as error:
        raise ValueError(f"a replacement for one invoke's rows must have the structure of the value it replaces "
                         f"(missing {key!r})") from error


def concatenate_batches(values: list[Any]) -> Any:
    """Join several invokes' inputs into one batch: tensors along dim 0, other values must agree."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([value.to(first.device) for value in values])
    if isinstance(first, (tuple, list)):
        joined = [concatenate_batches([value[index] for value in values]) for index in range(len(first))]
        return type(first)(joined)
    if isinstance(first, dict):
        return type(first)({key: concatenate_batches([value[key] for value in values]) for key in first})
    for value in values[1:]:
        if value is not first and value != first:
            raise ValueError(f"invokes disagree on a non-tensor input ({first!r} vs {value!r}); only tensors can "
                             "differ between invokes batched together")
    return first


def batch_size_of(value: Any) -> int:
    """The first dimension of the first tensor in ``value`` (1 when there is none)."""
    if type(value) is tuple and value and type(value[0]) is tuple and value[0] and \
            type(value[0][0]) is torch.Tensor and value[0][0].dim():
        return value[0][0].shape[0]  # the common case: (args, kwargs) whose first argument is a tensor
    if isinstance(value, torch.Tensor):
        return value.shape[0] if value.dim() else 1
    if isinstance(value, (tuple, list)):
        for item in value:
            if _has_tensor(item):
                return batch_size_of(item)
    if isinstance(value, dict):
        for item in value.values():
            if _has_tensor(item):
                return batch_size_of(item)
    return 1


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(item) for item in value)
    if isinstance(value, dict):
        return any(_has_tensor(item) for item in value.values())
    return False
