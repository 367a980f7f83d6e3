"""Which viewer a saved value gets after the run: only when the trace's graph says what the value is.

The inspector shows a viewer under its table for a saved value whose *graph* tells what it is; a value that only
happens to have a fitting shape gets none (``view(value)`` or ``TensorView(value)`` show any tensor on request):

* **attention heads** (:class:`~nnsight_magic.widgets.viewers.AttentionHeads`): a saved ``.pattern`` of an
  attention module (the node applies the engine's pattern recomputation), batch row 0, the prompt's tokens on
  both axes;
* **logit lens** (:class:`~nnsight_magic.widgets.viewers.LogitLens`): two or more saved ``softmax`` over the last
  axis of the model's *unembedding* (its ``get_output_embeddings()`` module, e.g. ``lm_head``) called inside the
  trace, on one cell line (a loop or a comprehension over the layers), in the order they ran; or a saved
  ``torch.stack`` of such values. Each one is a layer's row of the lens;
* **token values** (:class:`~nnsight_magic.widgets.viewers.TokenValues`): a saved floating-point tensor with one
  value per prompt token (shape ``(1, tokens)`` or ``(tokens,)``) when the model has a tokenizer and the trace
  one prompt: the tokens are what the trace ran on.

In [1]: %%trace lm "The Eiffel Tower is in the city of"
   ...: lens = [lm.lm_head(lm.model.norm(block.output[0])).softmax(-1) for block in lm.model.layers]
   ...: pattern = lm.model.layers[3].self_attn.pattern
(the inspector, then a logit lens of the 30 layers and the heads of layer 3, each with the prompt's tokens)
In [2]: [(chosen.kind, chosen.nodes[:2]) for chosen in choose_viewers(tracer, values)]
Out[2]: [('logit lens', [4, 9]), ('attention heads', [152])]
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..intervention.attention import gpt2_pattern, llama_pattern
from ..tracing.graph import Graph
from ..tracing.node import Node
from .viewers import AttentionHeads, LogitLens, TokenValues, Viewer

_PATTERNS = (gpt2_pattern, llama_pattern)
_SOFTMAX = (torch.softmax, torch.nn.functional.softmax, torch.Tensor.softmax)


@dataclass
class ChosenViewer:
    """A viewer the inspector shows: ``kind`` (``logit lens``, ``attention heads``, ``token values``), the saved
    nodes it shows, and the viewer."""

    kind: str
    nodes: list[int]
    viewer: Viewer


def choose_viewers(tracer: Any, values: list[Any]) -> list[ChosenViewer]:
    """The viewers of a finished run (see the module docstring); ``values`` are the run's values by node."""
    graph: Graph = tracer.graph
    saved = [node for node in graph.nodes if node.saved and isinstance(values[node.index], torch.Tensor)]
    if not saved:
        return []
    tokens, decode = prompt_tokens(tracer)
    chosen: list[ChosenViewer] = []
    shown: set[int] = set()
    unembedding = _unembedding_path(tracer.model) if any(_is_softmax(node) or node.target is torch.stack
                                                         for node in saved) else None
    if unembedding is not None:
        for nodes, stacked in _lenses(graph, saved, unembedding):
            probabilities = values[nodes[0]] if stacked else torch.stack([values[index] for index in nodes])
            if probabilities.dim() == 3 and probabilities.shape[1] == 1:
                probabilities = probabilities[:, 0]  # one batch row of one position each
            if probabilities.dim() not in (2, 3):
                continue
            viewer = LogitLens(probabilities, tokens=tokens, decode=decode)
            chosen.append(ChosenViewer("logit lens", nodes, viewer))
            shown.update(nodes)
    for node in saved:
        if node.index in shown:
            continue
        value = values[node.index]
        if node.op == "call_function" and node.target in _PATTERNS and value.dim() == 4 \
                and value.shape[-1] == value.shape[-2]:  # a decoding step's pattern (one query row) gets none
            chosen.append(ChosenViewer("attention heads", [node.index],
                                       AttentionHeads(value[0], tokens=tokens, decode=decode)))
        elif tokens is not None and _per_token(value, len(tokens)):
            chosen.append(ChosenViewer("token values", [node.index],
                                       TokenValues(value.reshape(-1), tokens, decode=decode)))
    return sorted(chosen, key=lambda entry: entry.nodes[0])  # in the order of the cell


def prompt_tokens(tracer: Any) -> tuple[list[int] | None, Callable[[int], str] | None]:
    """The token ids the trace ran on and the tokenizer's ``decode``, when there is one prompt (one invoke of
    one row) and a tokenizer; else ``(None, None)``. Padding (attention mask 0) is left out."""
    decode = getattr(getattr(tracer.model, "tokenizer", None), "decode", None)
    if decode is None or len(tracer.invokes) != 1:
        return None, None
    kwargs = getattr(tracer.invokes[0], "kwargs", {}) or {}
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] != 1:
        return None, None
    mask = kwargs.get("attention_mask")
    row = ids[0] if not isinstance(mask, torch.Tensor) else ids[0][mask[0].bool()]
    return [int(token) for token in row.tolist()], decode


def _unembedding_path(model: Any) -> str | None:
    """The module path of the model's unembedding (``lm_head``), if the model names one (a walk of the module
    tree: asked only when a saved value could be a lens row)."""
    module = getattr(model, "_module", None)
    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return None
    return next((name for name, each in module.named_modules() if each is head), None)


def _lenses(graph: Graph, saved: list[Node], unembedding: str) -> list[tuple[list[int], bool]]:
    """Each lens as ``(nodes, stacked)``: a saved stack of lens rows, or the saved lens rows of one cell line."""
    lenses: list[tuple[list[int], bool]] = []
    in_stacks: set[int] = set()
    for node in saved:
        if node.op == "call_function" and node.target is torch.stack and node.args and \
                isinstance(node.args[0], (list, tuple)) and len(node.args[0]) >= 2 and \
                all(isinstance(item, Node) and _lens_row(item, unembedding) for item in node.args[0]):
            lenses.append(([node.index], True))
            in_stacks.update(item.index for item in node.args[0])
    by_line: dict[int, list[int]] = {}
    for node in saved:
        if node.index not in in_stacks and _lens_row(node, unembedding):
            by_line.setdefault(node.lineno, []).append(node.index)
    lenses.extend((rows, False) for rows in by_line.values() if len(rows) >= 2)
    return lenses


def _is_softmax(node: Node) -> bool:
    """``x.softmax(...)``, ``torch.softmax(x, ...)`` or ``F.softmax(x, ...)``."""
    return (node.op == "call_method" and node.target == "softmax") or \
        (node.op == "call_function" and node.target in _SOFTMAX and bool(node.args))


def _lens_row(node: Node, unembedding: str) -> bool:
    """``softmax(-1)`` of the unembedding called inside the trace (through indexing: ``lm_head(h)[0, -1]``)."""
    if not _is_softmax(node):
        return False
    source, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    fake = node.fake
    if dim != -1 and not (isinstance(fake, torch.Tensor) and dim == fake.dim() - 1):
        return False
    while isinstance(source, Node) and source.op == "call_function" and source.target is operator.getitem:
        source = source.args[0]
    return isinstance(source, Node) and source.op == "apply_module" and source.target == unembedding


def _per_token(value: torch.Tensor, count: int) -> bool:
    """One floating-point value per prompt token: shape ``(count,)`` or ``(1, count)``, two tokens or more."""
    return count >= 2 and value.is_floating_point() and tuple(value.shape) in ((count,), (1, count))
