"""Gradients: `.grad` reads and replaces the gradient in the next `.backward()`, as tensor hooks would."""

from __future__ import annotations

import pytest
import torch

from conftest import hook_count, make_tiny


def reference_gradients(x, replace=None, retain_second=False):
    """Plain autograd on a twin model: the gradient of layer1's output (optionally replaced by a hook)."""
    twin = make_tiny()
    grads = []

    def capture(module, args, output):
        def on_grad(gradient):
            grads.append(gradient.clone())
            return replace(gradient) if replace else None
        output.register_hook(on_grad)

    handle = twin.layer1.register_forward_hook(capture)
    output = twin(x)
    output.sum().backward(retain_graph=retain_second)
    if retain_second:
        (output ** 2).sum().backward()
    handle.remove()
    return grads, twin


def test_reading_a_gradient(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        gradient = h.grad.save()
        net.output.sum().backward()
    expected, _ = reference_gradients(x)
    assert torch.equal(gradient.value, expected[0])
    assert tracer.needs_grad


def test_replacing_a_gradient_changes_what_flows_upstream(net, tiny, x):
    with net.trace(x):
        h = net.layer1.output
        original = h.grad.save()
        h.grad = h.grad * 2
        replaced = h.grad.save()
        net.output.sum().backward()
    expected, twin = reference_gradients(x, replace=lambda gradient: gradient * 2)
    assert torch.equal(original.value, expected[0]) and torch.equal(replaced.value, expected[0] * 2)
    assert torch.equal(tiny.layer1.weight.grad, twin.layer1.weight.grad)


def test_two_backward_passes_give_two_gradients(net, x):
    with net.trace(x):
        h = net.layer1.output
        out = net.output
        first = h.grad.save()
        out.sum().backward(retain_graph=True)
        second = h.grad.save()
        (out ** 2).sum().backward()
    expected, _ = reference_gradients(x, retain_second=True)
    assert torch.equal(first.value, expected[0]) and torch.equal(second.value, expected[1])
    assert not torch.equal(first.value, second.value)


def test_traces_without_backward_run_without_autograd(net, x):
    with net.trace(x) as tracer:
        out = net.output.save()
    assert not tracer.needs_grad and out.value.grad_fn is None
    with net.trace(x, grad=True):
        kept = net.output.save()
    assert kept.value.grad_fn is not None


def test_grad_without_a_backward_names_the_line(net, tiny, x):
    with pytest.raises(RuntimeError, match=r"test_gradients.py:\d+ `gradient = net.layer1.output.grad.save\(\)`.*"
                                           r"no `.backward\(\)` follows it"):
        with net.trace(x):
            gradient = net.layer1.output.grad.save()
    assert hook_count(tiny) == 0


def test_grad_of_a_value_without_autograd_history_is_explained(net, x):
    with pytest.raises(RuntimeError, match="does not require grad"):
        with net.trace(x):
            detached = net.layer1.output.detach()
            gradient = detached.grad.save()
            net.output.sum().backward()
