"""Shapes before running: the fake-tensor scan, its cache, and errors raised while building."""

from __future__ import annotations

import inspect

import pytest
import torch

from nnsight_magic import NNsight
from nnsight_magic.tracing.shapes import ModuleScan

from conftest import hook_count, weights


class Counting(torch.nn.Module):
    """Counts real forward calls, so tests can prove nothing real ran while building."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 6)
        self.real_calls = 0

    def forward(self, x):
        if not isinstance(x, torch._subclasses.fake_tensor.FakeTensor):
            self.real_calls += 1
        return self.layer(x).relu()


def test_every_module_call_gets_its_fake_output_and_position(tiny):
    scan = ModuleScan.run(tiny, lambda twin, x: twin(x), (torch.rand(2, 5),), {})
    assert scan.output("layer1", 0).shape == (2, 10) and scan.output("layer2", 0).shape == (2, 2)
    assert scan.output("", 0).shape == (2, 2) and scan.output("layer1", 1) is None
    assert scan.input("layer2", 0)[0][0].shape == (2, 10)
    order = scan.order
    assert order[("", "input", 0)] < order[("layer1", "input", 0)] < order[("layer1", "output", 0)] \
        < order[("layer2", "input", 0)] < order[("layer2", "output", 0)] < order[("", "output", 0)]
    assert scan.calls("layer1") == 1


def test_shapes_are_known_before_any_real_compute():
    module = Counting()
    net = NNsight(module)
    with net.scan(torch.rand(3, 4)):
        h = net.layer.output
        assert h.shape == (3, 6)
        assert (h[:, :2] * 2).sum(0).shape == (2,)
    assert module.real_calls == 0
    with pytest.raises(ValueError, match="no value|not saved"):
        h.value


def test_scan_is_cached_per_input_signature(monkeypatch):
    module = Counting()
    net = NNsight(module)
    runs = []
    original = ModuleScan.run.__func__
    monkeypatch.setattr(ModuleScan, "run", classmethod(lambda cls, *a, **k: runs.append(1) or original(cls, *a, **k)))
    for _ in range(3):
        with net.trace(torch.rand(3, 4)):
            net.layer.output.save()
    assert len(runs) == 1
    with net.trace(torch.rand(5, 4)):
        net.layer.output.save()
    assert len(runs) == 2
    with net.trace(torch.rand(3, 4), validate=False):
        net.layer.output.save()
    assert len(runs) == 2 and module.real_calls == 5


def test_index_error_is_raised_at_the_users_line_before_running(net, tiny, x):
    before = weights(tiny)
    line = inspect.currentframe().f_lineno + 3
    with pytest.raises(IndexError) as raised:
        with net.trace(x):
            net.layer1.output[:, 999]
    message = str(raised.value)
    assert f"test_shapes.py:{line}" in message and "net.layer1.output[:, 999]" in message
    assert "out of bounds" in message
    assert hook_count(tiny) == 0 and all(torch.equal(before[k], v) for k, v in weights(tiny).items())


def test_mismatched_assignment_is_raised_while_building(net, x):
    with pytest.raises(RuntimeError, match=r"test_shapes.py:\d+ `net.layer1.output\[:, :3\] = torch.ones\(4\)`"):
        with net.trace(x):
            net.layer1.output[:, :3] = torch.ones(4)


def test_a_wrong_method_name_is_an_attribute_error_at_its_line(net, x):
    with pytest.raises(AttributeError, match=r"test_shapes.py:\d+ `net.layer1.output.nonexistent_method\(\)`"):
        with net.trace(x):
            net.layer1.output.nonexistent_method()


def test_data_dependent_values_stay_unknown_and_still_run(net, tiny, x):
    with net.trace(x):
        h = net.layer1.output
        index = h[0].argmax().item()
        assert index.node.fake is None
        positive = h[h > 0].save()
        picked = tiny.layer1.weight[index].save()
    with torch.no_grad():
        expected = tiny.layer1(x)
    assert torch.equal(positive.value, expected[expected > 0])
    assert torch.equal(picked.value, tiny.layer1.weight[expected[0].argmax().item()])


def test_user_functions_that_need_real_numbers_are_not_reported_while_building(net, tiny, x):
    def to_list(tensor):
        return tensor.tolist()
    with net.trace(x) as tracer:
        values = tracer.apply(to_list, net.layer1.output).save()
    with torch.no_grad():
        assert values.value == tiny.layer1(x).tolist()


def test_validate_false_builds_without_shapes(net, tiny, x):
    with net.trace(x, validate=False) as tracer:
        h = net.layer1.output.save()
        shape = h.shape.save()
    assert tracer.graph.nodes[0].fake is None
    assert shape.value == torch.Size([3, 10]) and h.value.shape == (3, 10)


def test_a_model_that_cannot_run_on_fake_tensors_still_traces():
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3, 3)

        def forward(self, x):
            if x.sum().item() > 0:   # needs a real number: the scan fails
                return self.layer(x)
            return -self.layer(x)

    module = DataDependent()
    net = NNsight(module)
    x = torch.ones(1, 3)
    with pytest.warns(UserWarning, match="shapes are unavailable for DataDependent"):
        with net.trace(x) as tracer:
            out = net.output.save()
    assert tracer.graph.nodes[0].fake is None
    with torch.no_grad():
        assert torch.equal(out.value, module(x))


def test_a_condition_on_a_tensor_with_several_values_fails_while_building(net, x):
    with pytest.raises(RuntimeError, match=r"condition is a tensor of shape \(3, 10\)"):
        with net.trace(x) as tracer:
            with tracer.cond(net.layer1.output > 0):
                pass


def test_a_repeated_trace_takes_its_shapes_from_the_memo(net, x, monkeypatch):
    from nnsight_magic.tracing.shapes import ShapeInference

    def ablate_and_read():
        with net.trace(x):
            h = net.layer1.output
            h[:, 0] = 0
            return (h.softmax(-1)[:, 1:] * 2).save()

    first = ablate_and_read()
    fake_runs = []
    original = ShapeInference.run_node
    monkeypatch.setattr(ShapeInference, "run_node",
                        lambda self, node, args, kwargs: fake_runs.append(node.op) or original(self, node, args, kwargs))
    second = ablate_and_read()
    assert fake_runs == []
    assert second.node.fake.shape == first.node.fake.shape == (3, 9)
    assert torch.equal(second.value, first.value)


def test_the_memo_keeps_no_real_tensor_alive(net, x):
    import gc
    import weakref
    steering = torch.rand(10)
    with net.trace(x):
        (net.layer1.output + steering).save()
    reference = weakref.ref(steering)
    del steering
    gc.collect()
    assert reference() is None


def test_a_list_filled_by_appends_has_the_same_fake_value_in_every_identical_build(tiny):
    """Appends edit the list's fake value; a remembered append must not be skipped on the next build."""
    model, x = NNsight(tiny), torch.rand(2, 5)
    graphs, values = [], []
    for _ in range(2):
        with model.trace(x) as tracer:
            seen = tracer.list().save()
            seen.append(model.layer1.output)
            seen.append(model.layer2.output)
            joined = torch.cat(seen, dim=1).save()
            assert joined.shape == (2, 12)
        graphs.append(str(tracer.graph))
        values.append(joined.value)
    assert graphs[0] == graphs[1]
    expected = torch.cat([tiny.layer1(x), tiny(x)], dim=1)
    assert torch.equal(values[0], values[1]) and torch.allclose(values[0], expected, atol=1e-6)
