"""Persistent edits: recorded once, applied to every later trace, composed with the trace's own code."""

from __future__ import annotations

import pytest
import torch

from conftest import hook_count, weights


def test_an_edited_copy_applies_its_edit_and_leaves_the_original_alone(net, tiny, x):
    before = weights(tiny)
    with net.edit() as edited:
        edited.layer1.output[:, 0] = 0
    for _ in range(2):  # every later trace
        with edited.trace(x):
            seen = edited.layer1.output.save()
            out = edited.output.save()
        with torch.no_grad():
            expected = tiny.layer1(x)
            expected[:, 0] = 0
            assert torch.equal(seen.value, expected) and torch.equal(out.value, tiny.layer2(expected))
    with net.trace(x):
        plain = net.output.save()
    with torch.no_grad():
        assert torch.equal(plain.value, tiny(x))
    assert hook_count(tiny) == 0 and all(torch.equal(before[k], v) for k, v in weights(tiny).items())


def test_an_in_place_edit_changes_the_model_itself_until_cleared(net, tiny, x):
    with net.edit(inplace=True):
        net.layer2.output = net.layer2.output * 2
    with net.trace(x):
        doubled = net.output.save()
    net.clear_edits()
    with net.trace(x):
        plain = net.output.save()
    with torch.no_grad():
        assert torch.equal(doubled.value, tiny(x) * 2) and torch.equal(plain.value, tiny(x))


def test_an_edit_and_a_traces_own_interventions_compose(net, tiny, x):
    with net.edit() as edited:
        edited.layer1.output = edited.layer1.output + 1
    with edited.trace(x):
        edited.layer1.output[:, 1] = 5          # on top of the edit
        out = edited.output.save()
    with torch.no_grad():
        expected = tiny.layer1(x) + 1
        expected[:, 1] = 5
        assert torch.equal(out.value, tiny.layer2(expected))


def test_edits_stack_on_an_edited_copy(net, tiny, x):
    with net.edit() as first:
        first.layer1.output[:, 0] = 0
    with first.edit() as second:
        second.layer1.output[:, 1] = 0
    with second.trace(x):
        both = second.layer1.output.save()
    with first.trace(x):
        one = first.layer1.output.save()
    assert torch.equal(both.value[:, :2], torch.zeros(3, 2)) and not torch.equal(one.value[:, 1], torch.zeros(3))


def test_clearing_the_edits_of_a_copy(net, tiny, x):
    with net.edit() as edited:
        edited.layer2.output[:] = 0
    edited.clear_edits()
    with edited.trace(x):
        out = edited.output.save()
    with torch.no_grad():
        assert torch.equal(out.value, tiny(x))


def test_an_edit_applies_to_every_invoke(net, tiny):
    a, b = torch.rand(1, 5), torch.rand(2, 5)
    with net.edit() as edited:
        edited.layer1.output[:] = 1
    with edited.trace() as tracer:
        with tracer.invoke(a):
            first = edited.output.save()
        with tracer.invoke(b):
            second = edited.layer1.output.save()
    with torch.no_grad():                        # the batch of both invokes (3 rows), as the trace runs it
        assert torch.equal(first.value, tiny.layer2(torch.ones(3, 10))[:1])
    assert torch.equal(second.value, torch.ones(2, 10))


def test_an_error_in_an_edit_names_the_edits_line(net, x):
    with net.edit() as edited:
        edited.layer1.output[:, 0] = edited.layer1.output[:, 0].log() * 0 + torch.tensor(float("nan"))
    with edited.trace(x):
        out = edited.layer1.output.save()
    assert torch.isnan(out.value[:, 0]).all()

    with net.edit() as broken:
        broken.layer1.output[:, 99] = 0          # no input, so no shapes: found when a trace runs
    with pytest.raises(IndexError, match=r"test_edits.py:\d+ `broken.layer1.output\[:, 99\] = 0`"):
        with broken.trace(x):
            broken.output.save()


def test_edits_cannot_read_gradients(net):
    with pytest.raises(RuntimeError, match="cannot be part of an edit"):
        with net.edit() as edited:
            edited.layer1.output.grad.save()
            edited.output.sum().backward()
