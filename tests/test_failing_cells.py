"""A failing ``%%trace`` / ``%%session`` cell restores everything it bound; traced values put into containers
from earlier cells become real tensors (or go away with a failing cell) — never a dead proxy.

Each failing cell is checked against a snapshot of the notebook namespace taken before it: the same names, bound
to the very same objects, the same list/dict contents, and no hooks on the model. Values are compared with
plain-PyTorch hooks (``module_values``).
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from conftest import hook_count
from magic_shell import assert_unchanged, module_values, ok, run, snapshot, with_net
from nnsight_magic.tracing.proxy import Proxy

BINDINGS = {
    "del": "del old\n",
    "import as": "import json as keep\n",
    "from import": "from json import dumps as old\n",
    "import dotted": "import os.path\n",
    "for": "for i in range(3):\n    pass\n",
    "for over traced": "for row in net.layer1.output:\n    pass\n",
    "with as": "import contextlib\nwith contextlib.nullcontext(5) as keep:\n    pass\n",
    "def": "def f():\n    return 1\n",
    "class": "class C:\n    pass\n",
    "walrus": "(old := net.layer1.output)\n",
    "assign": "old = net.layer1.output\n",
    "augmented": "i += 1\n",
    "unpack": "first, *rest = [1, 2, 3]\n",
    "global in a function": "def g():\n    global keep\n    keep = 2\ng()\n",
    "tracer name": "",
    "traced if": "if net.layer1.output.sum() > 0:\n    old = 1\nelse:\n    keep = 2\n",
    "star import": "from json import *\n",
    "a name set by an earlier function": "bump()\n",
}

FAILURES = {
    "build": "undefined_name + 1\n",
    "shapes": "bad = net.layer1.output[:, 99]\n",
    "run": "tracer.apply(explode, net.layer1.output)\n",
    "interrupt": "tracer.apply(interrupt, net.layer1.output)\n",
}


def _explode(value):
    raise ValueError("no")


def _interrupt(value):
    raise KeyboardInterrupt


@pytest.fixture
def notebook(ip):
    """Names earlier cells bound; returns the plain module, the input and a snapshot of the namespace."""
    module, x = with_net(ip)
    ip.run_cell("def bump():\n    global counter\n    counter = counter + 1\n")
    ip.user_ns.update(old="old", keep="keep", i=10, f="f", C="C", first="first", rest="rest", row="row",
                      g="g", dumps="dumps", loads="loads", os="os", counter=0, tracer="an earlier tracer",
                      explode=_explode, interrupt=_interrupt, lst=[1], d={"runs": [2]})
    return module, x


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("binding", list(BINDINGS))
def test_a_failing_cell_restores_every_name_it_bound(ip, notebook, binding, failure):
    module, _ = notebook
    before = snapshot(ip.user_ns)
    body = BINDINGS[binding] + "lst.append(net.layer1.output)\nd['runs'].append((net.output, 1))\n"
    result = run(ip, f"%%trace net x\n{body}{FAILURES[failure]}")
    expected = {"build": NameError, "shapes": IndexError, "run": ValueError, "interrupt": KeyboardInterrupt}
    assert type(result.error_in_exec) is expected[failure]
    assert_unchanged(ip.user_ns, before)
    assert ip.user_ns["lst"] == [1] and ip.user_ns["d"] == {"runs": [2]}
    assert hook_count(module) == 0


def test_a_failing_session_cell_restores_names_and_containers(ip, notebook):
    module, _ = notebook
    before = snapshot(ip.user_ns)
    result = run(ip, "%%session\ndel old\nimport json as keep\nwith net.trace(x):\n    lst.append(net.output)\n"
                     "    d['runs'].append(net.layer1.output)\nundefined_name\n")
    assert type(result.error_in_exec) is NameError
    assert_unchanged(ip.user_ns, before)
    assert hook_count(module) == 0


# ---------------------------------------------------------------------------------- containers: success
def test_a_traced_value_appended_to_an_earlier_list_becomes_the_tensor(ip):
    module, x = with_net(ip)
    ok(ip, "results = [1]\nlog = {'runs': []}\nstate = types.SimpleNamespace(h=None)\n")
    results, log = ip.user_ns["results"], ip.user_ns["log"]
    ok(ip, """%%trace net x
results.append(net.layer1.output)
log["runs"].append((net.output, "out"))
log["new"] = [net.layer1.output * 2]
state.h = net.layer1.output
""")
    truth = module_values(module, x)
    assert ip.user_ns["results"] is results and results[0] == 1 and torch.equal(results[1], truth["layer1"])
    assert ip.user_ns["log"] is log and torch.equal(log["runs"][0][0], truth["output"]) and log["runs"][0][1] == "out"
    assert torch.equal(log["new"][0], truth["layer1"] * 2)
    assert torch.equal(ip.user_ns["state"].h, truth["layer1"])
    assert hook_count(module) == 0


@pytest.fixture(autouse=True)
def _types_in_notebook(ip):
    ip.user_ns["types"] = types


def test_a_function_from_an_earlier_cell_that_stores_a_traced_value(ip):
    module, x = with_net(ip)
    ok(ip, "store = []\ndef keep(value):\n    store.append(value)\n")
    ok(ip, "class Recorder:\n    def __init__(self):\n        self.seen = []\n"
           "    def add(self, value):\n        self.seen.append(value)\nrecorder = Recorder()\n")
    ok(ip, "%%trace net x\nkeep(net.layer1.output)\nrecorder.add(net.output)\n")
    truth = module_values(module, x)
    assert torch.equal(ip.user_ns["store"][0], truth["layer1"])
    assert torch.equal(ip.user_ns["recorder"].seen[0], truth["output"])
    result = run(ip, "%%trace net x\nkeep(net.layer1.output)\nrecorder.add(net.output)\nundefined_name\n")
    assert type(result.error_in_exec) is NameError
    assert len(ip.user_ns["store"]) == 1 and len(ip.user_ns["recorder"].seen) == 1
    assert hook_count(module) == 0


def test_a_value_the_run_never_computed_warns_with_the_line(ip):
    module, x = with_net(ip)
    ok(ip, "results = []\n")
    with pytest.warns(UserWarning, match=r"line 3 `results.append\(net.layer1.output \* 2\)`: `results\[0\]` "
                                         r"holds .* which the run never computed"):
        ok(ip, "%%trace net x\nif net.layer1.output.sum() < -1e9:\n    results.append(net.layer1.output * 2)\n"
               "out = net.output\n")
    assert isinstance(ip.user_ns["results"][0], Proxy)
    with pytest.raises(ValueError, match="saved but never computed"):
        ip.user_ns["results"][0].value
    assert torch.equal(ip.user_ns["out"], module_values(module, x)["output"])


def test_a_computed_value_in_a_container_does_not_warn(ip):
    with_net(ip)
    ok(ip, "results = []\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok(ip, "%%trace net x\nresults.append(net.layer1.output)\n")
    assert isinstance(ip.user_ns["results"][0], torch.Tensor)


def test_no_autosave_leaves_proxies_in_containers(ip):
    module, x = with_net(ip)
    ok(ip, "results = []\n")
    ok(ip, "%%trace net x --no-autosave\nresults.append(net.layer1.output.save())\n")
    assert isinstance(ip.user_ns["results"][0], Proxy)
    assert torch.equal(ip.user_ns["results"][0].value, module_values(module, x)["layer1"])


def test_a_module_defined_in_the_notebook_is_never_treated_as_a_container(ip):
    ok(ip, "import torch\nclass Tiny(torch.nn.Module):\n    def __init__(self):\n        super().__init__()\n"
           "        self.layer1 = torch.nn.Linear(5, 3)\n    def forward(self, x):\n        return self.layer1(x)\n"
           "from nnsight_magic import NNsight\ntorch.manual_seed(0)\nmodule = Tiny()\nnet = NNsight(module)\n"
           "x = torch.rand(2, 5)\n")
    module = ip.user_ns["module"]
    modules_before = dict(module._modules)
    result = run(ip, "%%trace net x\nh = net.layer1.output\nmodule.extra = h\nundefined_name\n")
    assert type(result.error_in_exec) is NameError
    assert dict(module._modules) == modules_before and hook_count(module) == 0


# ------------------------------------------------------------------------------------------- sessions
def test_a_session_across_cells_fills_and_restores_containers(ip):
    module, x = with_net(ip)
    ok(ip, "results = []\n")
    ok(ip, "%session start")
    ok(ip, "%%trace net x\nresults.append(net.layer1.output)\n")
    assert isinstance(ip.user_ns["results"][0], Proxy)  # recorded, not run yet
    ok(ip, "%session discard")
    assert ip.user_ns["results"] == []
    ok(ip, "%session start")
    ok(ip, "%%trace net x\nresults.append(net.layer1.output)\n")
    ok(ip, "%session run")
    assert torch.equal(ip.user_ns["results"][0], module_values(module, x)["layer1"])
    assert hook_count(module) == 0
