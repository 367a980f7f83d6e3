"""The shape scan never changes the model: it runs a fake twin (tracing/twin.py), so buffers updated in place and
attributes set in ``forward`` change exactly as often as the model really runs."""

from __future__ import annotations

import copy

import torch

from nnsight_magic import NNsight
from nnsight_magic.models.language import LanguageModel

from conftest import hook_count
from language_fixtures import PROMPTS, encode, make_tiny_gpt2, tokenizer_or_skip


class Stateful(torch.nn.Module):
    """A forward that changes its module: a counter attribute, the last input kept, a buffer counter, a list,
    and a BatchNorm whose running statistics move in train mode."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 3)
        self.norm = torch.nn.BatchNorm1d(3)
        self.register_buffer("steps", torch.zeros(()))
        self.calls = 0
        self.last = None
        self.seen: list[tuple] = []

    def forward(self, x):
        self.calls += 1
        self.last = x
        self.seen.append(tuple(x.shape))
        self.steps.add_(1)
        return self.norm(self.layer(x))


def state(module: Stateful) -> dict:
    """Everything a forward of :class:`Stateful` may change, as plain values."""
    return {"calls": module.calls, "seen": list(module.seen), "steps": module.steps.item(),
            "last": None if module.last is None else module.last.clone(),
            **{f"buffer {name}": buffer.clone() for name, buffer in module.norm.named_buffers()}}


def assert_same_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        if isinstance(expected[key], torch.Tensor):
            assert type(got[key]) is torch.Tensor and torch.equal(got[key], expected[key]), key
        else:
            assert got[key] == expected[key], key


def test_scan_leaves_buffers_and_attributes_as_they_were():
    module = Stateful().train()
    net = NNsight(module)
    before = state(module)
    with net.scan(torch.rand(5, 4)):
        assert net.layer.output.shape == (5, 3)
        assert net.output.shape == (5, 3)
    with net.scan(torch.rand(2, 4)):
        assert net.norm.output.shape == (2, 3)
    assert_same_state(state(module), before)
    assert module.last is None and hook_count(module) == 0


def test_one_trace_changes_the_model_exactly_as_one_eager_forward():
    module = Stateful().train()
    eager = copy.deepcopy(module)
    net = NNsight(module)
    x = torch.rand(6, 4)
    with net.trace(x):                      # first trace of this shape: a scan, then the real run
        out = net.output.save()
    with torch.no_grad():
        expected = eager(x)
    assert_same_state(state(module), state(eager))
    assert module.calls == 1 and module.norm.num_batches_tracked.item() == 1
    assert torch.equal(out.value, expected)
    with net.trace(x * 2):                   # a second trace (cached scan) is one more forward
        net.output.save()
    with torch.no_grad():
        eager(x * 2)
    assert_same_state(state(module), state(eager))


def test_the_users_hook_runs_on_the_twin_during_the_scan():
    module = Stateful()
    seen = []
    handle = module.layer.register_forward_hook(
        lambda layer, args, output: seen.append((layer is module.layer,
                                                 isinstance(output, torch._subclasses.fake_tensor.FakeTensor))))
    net = NNsight(module)
    with net.trace(torch.rand(2, 4)):
        net.layer.output.save()
    handle.remove()
    assert seen == [(False, True), (True, False)]  # the scan (the twin's module, fake), then the real run


def test_generation_runs_the_model_once_per_step_and_the_scans_never():
    tokenizer = tokenizer_or_skip()
    hf = make_tiny_gpt2()
    counter = CallCounter(hf.transformer.h[0].mlp)
    hf.transformer.h[0].mlp = counter
    lm = LanguageModel(hf, tokenizer=tokenizer)
    with lm.generate(PROMPTS[1], max_new_tokens=3) as tracer:
        first = lm.transformer.h[0].mlp.output.save()
        with tracer.iter[1:]:
            later = lm.transformer.h[0].mlp.output.shape   # known while building
        tokens = tracer.result.save()
    assert counter.calls == 3                 # one real forward per generated token, nothing for the scans
    ids = encode(tokenizer, PROMPTS[1])
    assert first.value.shape == (1, ids.shape[1], 64) and later == torch.Size([1, 1, 64])
    counter.calls = 0
    expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=tokenizer.eos_token_id)
    assert counter.calls == 3 and torch.equal(tokens.value, expected)


class CallCounter(torch.nn.Module):
    """Wraps a module and counts its calls in an attribute (as a user's instrumentation might)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)
