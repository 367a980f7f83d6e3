"""The graph as data: every kind of trace round-trips exactly through JSON, and anything else is refused."""

from __future__ import annotations

import base64
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nnsight_magic import LanguageModel, NNsight
from nnsight_magic.magics.runtime import python_and
from nnsight_magic.remote.executor import decode_answer, encode_request, execute
from nnsight_magic.remote.wire import tensors_equal, unpack
from nnsight_magic.tracing.graph import Graph
from nnsight_magic.tracing.serialize import from_json, to_json

from conftest import make_tiny
from language_fixtures import make_tiny_gpt2

STEERING = torch.linspace(-1, 1, 10)
KEPT: list = []  # the saved proxies of the traces built below, alive until the test ends


def keep(proxy):
    KEPT.append(proxy)
    return proxy


@pytest.fixture(autouse=True)
def forget_kept():
    yield
    KEPT.clear()


# -------------------------------------------------------------------------------- traces, as the suite builds them
def save_two(net, x):
    with net.trace(x) as tracer:
        keep(net.layer1.output.save())
        keep(net.output.save())
    return [tracer]


def edit_in_place(net, x):
    with net.trace(x) as tracer:
        net.layer1.output[:, 0] = 0
        net.layer1.output[..., 1:3] += STEERING[:2]
        keep(net.output.save())
    return [tracer]


def assign_and_input(net, x):
    with net.trace(x) as tracer:
        net.layer2.input = net.layer1.output * 2
        keep(net.layer2.input.save())
        keep(net.layer1.inputs.save())
        keep(net.output.save())
    return [tracer]


def operators_and_functions(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        keep((h @ torch.eye(10) - 1 / (h + 3)).save())
        keep(torch.cat([h, STEERING.expand(3, 10)], dim=1).save())
        keep(F.softmax(h, dim=-1).save())
        keep(h.T.save())
        keep(h.sum(dim=-1, keepdim=True).save())
        keep(h.to(torch.float64).clamp(max=float("inf")).save())
        keep((h > 0).any().save())
        keep(h[1:, ::2].save())
        keep(tracer.apply(torch.relu, h).save())
        keep(tracer.apply(python_and, h.sum() > 0, h.mean()).save())
        h.shape  # known while building
        net.output.size(0)
    return [tracer]


def unvalidated(net, x):
    with net.trace(x, validate=False) as tracer:
        net.layer1.output[:, 2] = 1.5
        keep(net.output.save())
    return [tracer]


def conditional(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        with tracer.cond(h.sum() > 0) as condition:
            net.layer1.output[:] = 0
        with condition.else_():
            net.layer1.output[:] = 1
        tracer.log("sum", h.sum())
        keep(net.output.save())
    return [tracer]


def gradient(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        keep(h.grad.save())
        h.grad = h.grad * 2
        net.output.sum().backward()
    return [tracer]


def stop_early(net, x):
    with net.trace(x) as tracer:
        keep(net.layer1.output.save())
        tracer.stop()
    return [tracer]


def session(net, x):
    with net.session():
        with net.trace(x) as first:
            h = keep(net.layer1.output.save())
        with net.trace(x * 2) as second:
            net.layer1.output[:] = h
            keep(net.output.save())
    return [first, second]


def edited(net, x):
    with net.edit() as changed:
        changed.layer1.output[:, 0] = 5
    with changed.trace(x) as tracer:
        keep(changed.output.save())
    return [tracer]


def parameters(net, x):
    with net.trace(x) as tracer:
        keep(net.layer1.weight.save())                       # read: the model's own tensor
        net.layer2.weight[:, 0] = 0                          # edited: this run's copy
        net.layer2.bias *= 2
        keep(net.output.save())
    return [tracer]


def cached(net, x):
    with net.trace(x) as tracer:
        keep(tracer.cache(include_inputs=True))
        keep(tracer.cache(modules=["layer1"], dtype=torch.float64))
    return [tracer]


def invokes(lm, _):
    with lm.trace() as tracer:
        with tracer.invoke("The Eiffel Tower is in"):
            clean = lm.transformer.h[0].output[:, -1]
        with tracer.invoke("Rome is"):
            lm.transformer.h[0].output[:, -1] = clean
            keep(lm.lm_head.output[:, -1].save())
    return [tracer]


def logit_lens(lm, _):
    with lm.trace("Hello world") as tracer:
        hidden = lm.transformer.h[0].output[0]
        keep(lm.lm_head(lm.transformer.ln_f(hidden)).save())
        keep(lm.output.logits.save())
    return [tracer]


def generation(lm, _):
    with lm.generate("Hello", max_new_tokens=3) as tracer:
        steps = keep(tracer.list().save())
        with tracer.all():
            steps.append(lm.lm_head.output[0, -1].argmax())
        with tracer.iter[1:]:
            lm.transformer.h[0].output[0][:] *= 0.5
        keep(tracer.result.save())
    return [tracer]


def generation_cache(lm, _):
    with lm.generate("Hello", max_new_tokens=2) as tracer:
        keep(tracer.cache(modules=["transformer.h.0", lm.lm_head]))
    return [tracer]


NET_CASES = [save_two, edit_in_place, assign_and_input, operators_and_functions, unvalidated, conditional,
             gradient, stop_early, session, edited, parameters, cached]
LM_CASES = [invokes, logit_lens, generation, generation_cache]


def build(case, gpt2_tok):
    if case in LM_CASES:
        model = LanguageModel(make_tiny_gpt2(), tokenizer=gpt2_tok)
    else:
        model = NNsight(make_tiny())
    torch.manual_seed(1)
    return model, case(model, torch.rand(3, 5))


def saved_values(tracer):
    return {node.index: proxy.value for node in tracer.graph.nodes if node.saved
            for proxy in tracer.saved_proxies(node.index)[:1]}


@pytest.mark.parametrize("case", NET_CASES + LM_CASES, ids=lambda case: case.__name__)
def test_round_trip_is_exact(case, gpt2_tok):
    model, tracers = build(case, gpt2_tok)
    for tracer in tracers:
        text = tracer.graph.to_json()
        graph = Graph.from_json(text)
        graph.lint()
        assert str(graph) == str(tracer.graph)
        assert [node.location for node in graph.nodes] == [node.location for node in tracer.graph.nodes]
        assert [node.source_line for node in graph.nodes] == [node.source_line for node in tracer.graph.nodes]
        assert graph.writes == tracer.graph.writes and graph.entry_indices == tracer.graph.entry_indices
        assert [node.dependencies for node in graph.nodes] == [node.dependencies for node in tracer.graph.nodes]
        assert to_json(graph) == text


@pytest.mark.parametrize("case", NET_CASES + LM_CASES, ids=lambda case: case.__name__)
def test_a_rebuilt_graph_gives_the_same_values(case, gpt2_tok, capsys):
    model, tracers = build(case, gpt2_tok)
    request = encode_request(tracers)
    answers, printed, error = decode_answer([tracer.graph for tracer in tracers], execute(model, *unpack(request)))
    assert error is None
    assert any(tracer.graph.nodes for tracer in tracers)
    for tracer, answer in zip(tracers, answers):
        expected = saved_values(tracer)
        assert expected and set(answer.saved) >= set(expected)
        for index, value in expected.items():
            assert tensors_equal(value, answer.saved[index]), f"%{index} {tracer.graph.nodes[index].describe()}"
    if case is conditional:
        assert printed.startswith("sum tensor(")


# ---------------------------------------------------------------------------------------------- refusals
def graph_text(net, x):
    with net.trace(x) as tracer:
        h = net.layer1.output
        (h + torch.ones(10)).sum(dim=-1).save()
    return json.loads(tracer.graph.to_json())


def tampered(data, change):
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize("change, refused", [
    (lambda data: data["nodes"][1].update(op="exec"), "unknown op 'exec'"),
    (lambda data: data["nodes"][1].update(op="call_function", target="os.system"), "'os.system'"),
    (lambda data: data["nodes"][1].update(op="call_function", target="builtins.eval"), "'builtins.eval'"),
    (lambda data: data["nodes"][1].update(op="call_function", target="torch.nonexistent.path"),
     "'torch.nonexistent.path'"),
    (lambda data: data["nodes"][1].update(op="call_method", target="__class__"), "'__class__'"),
    (lambda data: data["nodes"][1].update(op="getattr", target="__globals__"), "'__globals__'"),
    (lambda data: data["nodes"][2].update(op="call_method", target="numpy"), "'numpy'"),
    (lambda data: data["nodes"][1]["args"].__setitem__(0, {"node": 7}), "node index 7 is out of range"),
    (lambda data: data["nodes"][0].update(target="layer1; import os"), "not a module path"),
    (lambda data: data["nodes"][1]["args"].__setitem__(1, {"code": "__import__('os')"}), "unknown constant"),
    (lambda data: data["nodes"][2].update(deps=[5]), "dependency index 5 is out of range"),
    (lambda data: data.update(format="pickle"), "not a serialized graph"),
    (lambda data: data["nodes"][1].update(target={"parameter": ["layer1", "__dict__", "parameter"]}),
     "does not name a parameter"),
    (lambda data: data["nodes"][1].update(target={"parameter": ["layer1", "weight", "module"]}),
     "does not name a parameter"),
])
def test_from_json_refuses_what_is_off_the_allow_list(net, x, change, refused):
    with pytest.raises(ValueError, match=refused.replace("(", r"\(").replace("[", r"\[")):
        from_json(tampered(graph_text(net, x), change))


def test_a_parameter_the_model_does_not_have_is_refused_before_the_run(net, x):
    with net.trace(x) as tracer:
        net.layer1.weight.save()
    data = json.loads(tracer.graph.to_json())
    data["nodes"][0]["target"]["parameter"][1] = "secret"
    header, blob = unpack(encode_request([tracer]))
    header["traces"][0]["graph"] = data
    answers, _, error = decode_answer([tracer.graph], execute(NNsight(make_tiny()), header, blob))
    assert isinstance(error, ValueError) and "the parameter 'layer1.secret', which this model does not have" in \
        str(error)


def test_deep_nesting_is_refused(net, x):
    deep: object = 1
    for _ in range(100):
        deep = [deep]
    with pytest.raises(ValueError, match="nested deeper"):
        from_json(tampered(graph_text(net, x), lambda data: data["nodes"][1]["args"].__setitem__(1, deep)))
    with pytest.raises(ValueError, match="nested too deeply"):
        from_json("[" * 100_000 + "]" * 100_000)


def test_a_tensor_header_larger_than_its_blob_and_a_truncated_blob_are_refused(net, x):
    data = graph_text(net, x)
    blob = base64.b64decode(data["blob"])
    giant = struct.pack("<Q", 1 << 40) + blob[8:]
    with pytest.raises(ValueError, match="larger than its blob"):
        from_json(tampered(dict(data), lambda each: each.update(blob=base64.b64encode(giant).decode())))
    with pytest.raises(ValueError, match="truncated"):
        from_json(tampered(dict(data), lambda each: each.update(blob=base64.b64encode(blob[:-8]).decode())))
    with pytest.raises(ValueError, match="tensor 't9'"):
        from_json(tampered(graph_text(net, x), lambda each: each["nodes"][1]["args"].__setitem__(1, {"tensor": "t9"})))


def test_a_user_function_cannot_be_serialized(net, x):
    def secret(value):
        return value * 2
    with net.trace(x) as tracer:
        tracer.apply(secret, net.layer1.output).save()   # marker: secret
    with pytest.raises(ValueError, match="secret is not on the allow-list") as caught:
        tracer.graph.to_json()
    assert "tracer.apply(secret" in str(caught.value)



def test_the_remote_client_needs_no_ray():
    code = "import sys, nnsight_magic.remote.client; assert 'ray' not in sys.modules, 'ray was imported'"
    root = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": root})
    assert done.returncode == 0, done.stderr
