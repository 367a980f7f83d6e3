"""The viewers: what each one sends its front end (checked against plain torch), its static rendering, and which
viewer ``view`` picks for a value."""

from __future__ import annotations

import re

import pytest
import torch

from language_fixtures import make_tiny_gpt2, tokenizer_or_skip
from nnsight_magic.models.language import LanguageModel
from nnsight_magic.widgets import AttentionHeads, GraphInspector, LogitLens, TensorView, TokenValues, view
from nnsight_magic.widgets.assets import asset_path, viewer_module


def test_the_logit_lens_shows_each_layers_top_token_and_its_trajectory():
    tokenizer = tokenizer_or_skip()
    lm = LanguageModel(make_tiny_gpt2(), tokenizer=tokenizer)
    prompt = "The Eiffel Tower is in"
    with lm.trace(prompt):
        lens = torch.stack([lm.lm_head(lm.transformer.ln_f(block.output[0])).softmax(-1)
                            for block in lm.transformer.h]).save()
    probabilities = lens.value                                       # (layers, positions, vocab)
    ids = tokenizer(prompt)["input_ids"]
    viewer = LogitLens(probabilities, tokens=ids, decode=tokenizer.decode)
    top_p, top_id = probabilities.max(-1)
    assert viewer.data["tokens"] == [tokenizer.decode(token) for token in ids]
    assert [[token for token, _ in row] for row in viewer.data["top"]] == top_id.tolist()
    assert viewer.data["top"][1][2][1] == round(top_p[1, 2].item(), 4)
    assert viewer.top_tokens(1) == [tokenizer.decode(token) for token in top_id[1].tolist()]
    token = top_id[0, 3].item()
    assert viewer.data["trajectories"][3][str(token)] == [round(p, 4) for p in probabilities[:, 3, token].tolist()]
    page = viewer._repr_mimebundle_()["text/html"]
    assert page.count("<td data-layer=") == probabilities.shape[0] * probabilities.shape[1]
    assert isinstance(view(probabilities, tokens=ids, decode=tokenizer.decode), LogitLens)


def test_attention_heads_keep_every_pattern_and_mask_the_future():
    pattern = torch.rand(1, 3, 4, 4).tril().softmax(-1)
    viewer = AttentionHeads(pattern, tokens=["a", "b", "c", "d"])
    assert viewer.data["patterns"] == [[[round(p, 3) for p in row] for row in head] for head in pattern[0].tolist()]
    page = viewer._repr_mimebundle_()["text/html"]
    assert page.count('class="head"') == 3
    assert page.count("rgba(128,128,128,0.25)") == 3 * 6          # the 6 future keys of a 4-token causal pattern
    assert isinstance(view(pattern), AttentionHeads)
    with pytest.raises(ValueError, match=r"\(heads, queries, keys\)"):
        AttentionHeads(torch.rand(3, 4, 5))


def test_token_values_colour_each_token():
    viewer = TokenValues(torch.tensor([-2.0, 0.0, 1.0]), tokens=["The", " cat", " sat"])
    assert viewer.data["values"] == [-2.0, 0.0, 1.0] and viewer.data["scale"] == 2.0
    page = viewer._repr_mimebundle_()["text/html"]
    assert re.findall(r"background:(rgb\([^)]*\))", page) == ["rgb(0,0,255)", "rgb(255,255,255)", "rgb(255,128,128)"]
    assert isinstance(view(torch.rand(3), tokens=["a", "b", "c"]), TokenValues)
    with pytest.raises(ValueError, match="one value per token"):
        TokenValues(torch.rand(2), tokens=["a", "b", "c"])


def test_tensor_view_sends_the_values_and_a_histogram():
    tensor = torch.arange(24.0).reshape(2, 3, 4)
    viewer = TensorView(tensor)
    assert viewer.data["shape"] == [2, 3, 4] and viewer.data["values"] == tensor.reshape(-1).tolist()
    assert viewer.data["histogram"] == torch.histc(tensor, bins=32).tolist()
    bundle = viewer._repr_mimebundle_()
    assert bundle["text/plain"] == "TensorView: shape (2, 3, 4) · min 0 · mean 11.5 · max 23"
    assert bundle["text/html"].count("<rect") == 12 + 32          # the first slice, then the histogram's bars
    assert "application/vnd.jupyter.widget-view+json" in bundle


def test_front_end_sources_live_at_the_top_of_the_repository_and_are_self_contained():
    assert asset_path("widgets", "logit_lens.js").parent.name == "widgets"
    for name in ("logit_lens", "attention_heads", "token_values", "tensor_view"):
        module = viewer_module(name)
        assert "export default" in module and not re.search(r"^import ", module, re.MULTILINE)


# ---------------------------------------------------------------------- viewers chosen after the run
def test_the_inspector_chooses_a_viewer_only_for_values_whose_kind_the_graph_tells():
    tokenizer = tokenizer_or_skip()
    model = make_tiny_gpt2()
    lm = LanguageModel(model, tokenizer=tokenizer)
    prompt = "The Eiffel Tower is in"
    ids = tokenizer(prompt)["input_ids"]
    with lm.trace(prompt) as tracer:
        inspector = GraphInspector(tracer)
        lens = [lm.lm_head(lm.transformer.ln_f(block.output[0, -1])).softmax(-1).save()
                for block in lm.transformer.h]                                 # a loop on one line: a lens
        stacked = torch.stack([lm.lm_head(lm.transformer.ln_f(block.output[0])).softmax(-1)
                               for block in lm.transformer.h]).save()         # a stack of lens rows: a lens
        pattern = lm.transformer.h[1].attn.pattern.save()                     # a pattern: attention heads
        norms = lm.transformer.h[0].output.norm(dim=-1).save()                # one value per token: token values
        hidden = lm.transformer.h[0].output.save()                            # shapes alone: no viewer
        final = lm.lm_head.output[0, -1].softmax(-1).save()                   # one distribution: no viewer
        top = lm.lm_head.output.argmax(-1).save()                             # (1, tokens) of ids: no viewer
    blocks: list[torch.Tensor] = []                                            # the ground truth, by hand
    hooks = [block.register_forward_hook(lambda module, args, output: blocks.append(
                 output[0] if isinstance(output, tuple) else output))
             for block in model.transformer.h]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for hook in hooks:
            hook.remove()
    with torch.no_grad():
        rows = torch.stack([model.lm_head(model.transformer.ln_f(h[0])).softmax(-1) for h in blocks])
    chosen = {(entry.kind, type(entry.viewer).__name__, len(entry.nodes)) for entry in inspector.viewers}
    assert chosen == {("logit lens", "LogitLens", 2), ("logit lens", "LogitLens", 1),
                      ("attention heads", "AttentionHeads", 1), ("token values", "TokenValues", 1)}
    loop, stack = [entry.viewer for entry in inspector.viewers if entry.kind == "logit lens"]
    assert [[token for token, _ in row] for row in loop.data["top"]] == rows[:, -1:].argmax(-1).tolist()
    assert loop.data["tokens"] == [tokenizer.decode(ids[-1])]
    assert [[token for token, _ in row] for row in stack.data["top"]] == rows.argmax(-1).tolist()
    assert stack.data["tokens"] == [tokenizer.decode(token) for token in ids]
    [heads] = [entry.viewer for entry in inspector.viewers if entry.kind == "attention heads"]
    # the pattern itself is checked against HF's eager attention in test_attention_pattern.py
    assert torch.allclose(torch.tensor(heads.data["patterns"]), pattern.value[0], atol=1e-3)  # rounded to 3 places
    [per_token] = [entry.viewer for entry in inspector.viewers if entry.kind == "token values"]
    truth = blocks[0][0].norm(dim=-1)
    assert torch.allclose(torch.tensor(per_token.data["values"]), truth, atol=1e-4)         # rounded to 4 places
    assert per_token.data["tokens"] == [tokenizer.decode(token) for token in ids]
    assert all(len(entry.nodes) <= 2 for entry in inspector.viewers)
    assert {hidden.node.index, final.node.index, top.node.index}.isdisjoint(
        index for entry in inspector.viewers for index in entry.nodes)
    assert "logit lens: LogitLens" in inspector.result_text()


def test_without_a_tokenizer_or_with_an_error_no_viewer_is_chosen():
    lm = LanguageModel(make_tiny_gpt2())
    with lm.trace(torch.tensor([[1, 2, 3]])) as tracer:
        inspector = GraphInspector(tracer)
        lm.transformer.h[0].output.norm(dim=-1).save()                        # tokens unknown: no token values
        pattern = lm.transformer.h[1].attn.pattern.save()                     # the kind is known: heads
    assert [(entry.kind, entry.nodes) for entry in inspector.viewers] == [("attention heads", [pattern.node.index])]
    with pytest.raises(IndexError):
        with lm.trace(torch.tensor([[1, 2, 3]])) as tracer:
            failed = GraphInspector(tracer)
            lm.transformer.h[1].attn.pattern.save()
            lm.transformer.h[0].output[5].save()
    assert failed.viewers == []


def test_a_decoding_steps_pattern_gets_no_heads_grid_and_the_run_still_shows():
    lm = LanguageModel(make_tiny_gpt2())
    with lm.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2) as tracer:
        inspector = GraphInspector(tracer)
        with tracer.iter[1]:
            step = lm.transformer.h[1].attn.pattern.save()        # one query row over 4 keys: not a grid
    assert step.value.shape == (1, 4, 1, 4)
    assert inspector.state == "done" and inspector.viewers == []
