"""The generic core: the create_node funnel, the graph's listing and lint, and every proxy operator."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F

from nnsight_magic import NNsight
from nnsight_magic.tracing.graph import Graph, StepSet
from nnsight_magic.tracing.node import Node, module_label


def test_graph_records_ops_lines_shapes_and_edges(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output          # line A
        s = h.sum(dim=-1)              # line A + 1
        out = net.output.save()
    graph = tracer.graph
    graph.lint()
    ops = [node.op for node in graph.nodes]
    assert ops == ["module_output", "call_method", "module_output"]
    entry, total, model_out = graph.nodes
    assert total.lineno == entry.lineno + 1
    assert total.data_dependencies == (entry.index,) and entry.listeners == [total.index]
    assert total.target == "sum" and total.kwargs == {"dim": -1}
    assert tuple(entry.fake.shape) == (3, 10) and tuple(total.fake.shape) == (3,)
    assert model_out.saved and not entry.saved
    listing = str(graph).splitlines()
    assert listing[0].startswith("%0 = layer1.output") and "(3, 10) float32" in listing[0]
    assert "%1 = %0.sum(dim=-1)" in listing[1] and "(3,) float32" in listing[1]
    assert listing[2].endswith("saved")
    assert h.node is entry and s.node is total and out.node is model_out


def test_every_operator_matches_eager_torch(net, tiny, x):
    other = torch.rand(3, 10)
    binary = [operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod,
              operator.pow, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge]
    with net.trace(x):
        h = net.layer1.output
        results = [op(h, other).save() for op in binary]
        reflected = [op(other, h).save() for op in binary]
        unary = [(-h).save(), (+h).save(), abs(h).save(), (~(h > 0)).save()]
        bitwise = [((h > 0) & (h < 1)).save(), ((h > 0) | (h < -1)).save(), ((h > 0) ^ (h < 1)).save()]
        matmul = (h @ other.T).save()
        rmatmul = (other.T @ h).save()
        indexed = h[1:, ::2].save()
        method = h.softmax(-1).save()
        function = F.gelu(h).save()
        torch_function = torch.cat([h, other], dim=1).save()
        attribute = h.T.save()
    with torch.no_grad():
        expected = tiny.layer1(x)
    for op, result, reflected_result in zip(binary, results, reflected):  # exact; pow of negatives gives NaN
        torch.testing.assert_close(result.value, op(expected, other), rtol=0, atol=0, equal_nan=True)
        torch.testing.assert_close(reflected_result.value, op(other, expected), rtol=0, atol=0, equal_nan=True)
    assert [torch.equal(a.value, b) for a, b in zip(unary, [-expected, +expected, abs(expected),
                                                               ~(expected > 0)])] == [True] * 4
    assert torch.equal(bitwise[0].value, (expected > 0) & (expected < 1))
    assert torch.equal(bitwise[1].value, (expected > 0) | (expected < -1))
    assert torch.equal(bitwise[2].value, (expected > 0) ^ (expected < 1))
    assert torch.equal(matmul.value, expected @ other.T)
    assert torch.equal(rmatmul.value, other.T @ expected)
    assert torch.equal(indexed.value, expected[1:, ::2])
    assert torch.equal(method.value, expected.softmax(-1))
    assert torch.equal(function.value, F.gelu(expected))
    assert torch.equal(torch_function.value, torch.cat([expected, other], dim=1))
    assert torch.equal(attribute.value, expected.T)


def test_in_place_operators_edit_the_model_value(net, tiny, x):
    with net.trace(x):
        h = net.layer1.output
        h += 1
        h *= 2
        h -= 0.5
        h /= 4
        edited = net.layer1.output.save()
        out = net.output.save()
    with torch.no_grad():
        expected = (((tiny.layer1(x) + 1) * 2) - 0.5) / 4
        assert torch.equal(edited.value, expected)
        assert torch.equal(out.value, tiny.layer2(expected))


def test_shape_dtype_device_are_real_while_building(net, x):
    with net.trace(x):
        h = net.layer1.output
        assert h.shape == torch.Size([3, 10])
        assert h.dtype == torch.float32 and h.device == torch.device("cpu")
        assert h.ndim == 2 and h.size(-1) == 10 and h.size() == (3, 10) and h.dim() == 2
        zeros = torch.zeros(h.shape[0], 4)
        joined = torch.cat([h, zeros], dim=1).save()
        assert joined.shape == (3, 14)
    assert joined.value.shape == (3, 14)


@pytest.mark.parametrize("action, what", [(bool, "bool()"), (iter, "iter()"), (len, "len()")])
def test_python_control_flow_on_a_proxy_teaches_the_fix(net, x, action, what):
    with pytest.raises(TypeError) as raised:
        with net.trace(x):
            action(net.layer1.output)
    message = str(raised.value)
    assert message.startswith(what) and "tracer.cond" in message and "%%trace" in message
    assert "layer1.output" in message


def test_if_on_a_proxy_raises_the_teaching_error(net, x):
    with pytest.raises(TypeError, match="tracer.cond"):
        with net.trace(x):
            if net.layer1.output.sum() > 0:
                pass


def test_lint_catches_a_broken_graph():
    graph = Graph()
    first = graph.create_node("call_function", torch.ones, (2,))
    second = graph.create_node("call_method", "sum", (first,))
    graph.lint()
    second.data_dependencies = ()
    with pytest.raises(AssertionError, match="data dependencies"):
        graph.lint()


def test_module_labels_and_step_sets():
    assert module_label("model.layers.5.mlp") == "model.layers[5].mlp"
    assert module_label("") == "model"
    assert module_label("0") == "model[0]" and module_label("0.1.weight") == "model[0][1].weight"
    steps = StepSet(slice(1, 7, 2))
    assert [step for step in range(10) if steps.contains(step)] == [1, 3, 5]
    assert steps.first == 1 and steps.last == 5
    assert StepSet(slice(None)).last is None and StepSet([2, 0]).steps == [0, 2]
    with pytest.raises(ValueError):
        StepSet(-1)
    with pytest.raises(TypeError):
        StepSet(1.5)


def test_node_describe_reads_like_code(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        h[:, 0] = 0
        _ = (h + 1).mean()
    described = [node.describe() for node in tracer.graph.nodes]
    assert described[0] == "layer1.output"
    assert described[1] == "%0[:, 0] = 0"
    assert described[2] == "%0 + 1"
    assert described[3] == "%2.mean()"
    assert isinstance(tracer.graph.nodes[0], Node)


def test_proxy_repr_shows_line_and_shape_then_the_value(net, x):
    with net.trace(x):
        h = net.layer1.output.save()
        building = repr(h)
    assert "layer1.output" in building and "(3, 10) float32" in building
    assert repr(h).endswith(repr(h.value))


def test_value_errors_before_the_run_and_for_unsaved_values(net, x):
    with net.trace(x):
        h = net.layer1.output
        with pytest.raises(ValueError, match="no value yet"):
            h.value
    with pytest.raises(ValueError, match=r"was not saved.*call `.save\(\)`"):
        h.value


def test_operations_after_the_run_name_the_fix(net, x):
    with net.trace(x):
        h = net.layer1.output.save()
    with pytest.raises(RuntimeError, match="already run"):
        h + 1


def test_display_probes_do_not_create_nodes(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        assert not hasattr(h, "_repr_html_")
        assert not hasattr(h, "__array_interface__")
    assert len(tracer.graph.nodes) == 1


def test_wrapping_something_that_is_not_a_module_fails_clearly():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        NNsight(lambda x: x)


def test_an_attribute_names_the_line_where_it_was_written(net, x):
    with net.trace(x) as tracer:
        pair = (net.layer1.output.T, 1)            # the node is made later, when it is first used
        line = pair[0]._location[1]
        (pair[0] * 2).save()
    getattr_node = next(node for node in tracer.graph.nodes if node.op == "getattr")
    assert getattr_node.lineno == line and getattr_node.source_line.startswith("pair = (net.layer1.output.T, 1)")


def test_an_attribute_error_inside_a_proxy_property_reaches_the_user():
    """`out.shape` on a traced tuple: the user sees "tuple has no attribute", never a recursion."""
    class Pair(torch.nn.Module):
        def forward(self, x):
            return x * 2, x + 1

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pair = Pair()

        def forward(self, x):
            first, second = self.pair(x)
            return first + second

    net = NNsight(Net())
    with pytest.raises(AttributeError, match=r"`shape = out.shape`.*'tuple' object has no attribute 'shape'"):
        with net.trace(torch.rand(2, 3)):
            out = net.pair.output
            assert out[0].shape == (2, 3)
            shape = out.shape
            repr(shape)
