"""Every rewrite of a ``%%trace`` cell, driven through ``InteractiveShell.run_cell`` against plain-PyTorch truth.

Ground truth comes from hand-written forward hooks on the plain module (``module_values``); each test checks the
values the cell bound in the notebook, what it printed, and that plain Python in the cell stayed plain Python.
"""

from __future__ import annotations

import ast

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from conftest import hook_count
from magic_shell import module_values, ok, plain, run, with_net
from nnsight_magic.magics.rewrite import autosave_names, rewrite_cell
from nnsight_magic.tracing.proxy import Proxy


# ----------------------------------------------------------------------------------------------- autosave
def test_top_level_traced_names_become_real_values(ip):
    module, x = with_net(ip)
    ok(ip, """%%trace net x
h = net.layer1.output
out = net.output
pair = (h[:, 0], out)
columns = [h[:, i] for i in range(2)]
by_name = {"hidden": h, "count": 3}
for i in range(2):
    last = net.output[:, i]
_private = net.layer1.output * 2
n = 7
""")
    truth = module_values(module, x)
    ns = ip.user_ns
    assert torch.equal(ns["h"], truth["layer1"]) and torch.equal(ns["out"], truth["output"])
    assert isinstance(ns["pair"], tuple) and torch.equal(ns["pair"][0], truth["layer1"][:, 0])
    assert [column.tolist() for column in ns["columns"]] == [truth["layer1"][:, i].tolist() for i in range(2)]
    assert torch.equal(ns["by_name"]["hidden"], truth["layer1"]) and ns["by_name"]["count"] == 3
    assert torch.equal(ns["last"], truth["output"][:, 1])
    assert ns["n"] == 7
    assert isinstance(ns["_private"], Proxy)  # `_` names are not saved ...
    with pytest.raises(ValueError, match="not saved"):
        ns["_private"].value                  # ... so their values were freed
    assert hook_count(module) == 0
    assert not [name for name in ns if name.startswith("_nm_")]


def test_names_inside_functions_are_not_saved_but_explicit_save_works(ip):
    module, x = with_net(ip)
    ok(ip, """%%trace net x
def first_layer():
    inner = net.layer1.output
    return inner.save()
kept = first_layer()
""")
    assert torch.equal(ip.user_ns["kept"], module_values(module, x)["layer1"])
    assert "inner" not in ip.user_ns


def test_an_assigned_attribute_gets_its_node_at_its_own_line(ip):
    module, x = with_net(ip)
    ok(ip, "%%trace net x\nh = net.layer1.output\nflipped = h.T\nlast = net.output\n")
    transposed = [node for node in ip.user_ns["tracer"].graph.nodes if node.op == "getattr"]
    assert [(node.target, node.lineno) for node in transposed] == [("T", 3)]
    assert torch.equal(ip.user_ns["flipped"], module_values(module, x)["layer1"].T)


def test_autosave_names_are_the_module_level_bindings():
    tree = ast.parse("a = 1\nb, *c = d\nfor e in f: g = 2\nwith h as i: pass\nif (j := 3): pass\n"
                     "def k():\n    global m\n    local = 1\nclass L: inside = 1\n_hidden = 1\n"
                     "[comprehended for comprehended in range(3)]\n")
    assert sorted(autosave_names(tree)) == sorted(["a", "b", "c", "e", "g", "i", "j", "k", "L", "m"])


# ------------------------------------------------------------------------------------------------ if / else
@pytest.mark.parametrize("threshold, expected", [(-100.0, "above"), (100.0, "below")])
def test_if_on_a_traced_value_is_decided_by_the_model(ip, capsys, threshold, expected):
    module, x = with_net(ip)
    ip.user_ns["threshold"] = threshold
    ok(ip, """%%trace net x
total = net.layer1.output.sum()
if total > threshold:
    label = "above"
    net.layer2.output[:] = 0
    print("took the if branch")
else:
    label = "below"
    print("took the else branch")
out = net.output
""")
    edits = {"layer2": lambda output: output * 0} if expected == "above" else None
    truth = module_values(module, x, edits)
    assert ip.user_ns["label"] == expected
    assert torch.equal(ip.user_ns["out"], truth["output"])
    printed = capsys.readouterr().out
    assert ("took the if branch" in printed) == (expected == "above")
    assert ("took the else branch" in printed) == (expected == "below")
    assert hook_count(module) == 0


@pytest.mark.parametrize("threshold, expected", [(-100.0, "high"), (0.0, None), (100.0, "low")])
def test_elif_chains_pick_one_branch(ip, threshold, expected):
    module, x = with_net(ip)
    total = module_values(module, x)["layer1"].sum().item()
    ip.user_ns["threshold"] = threshold if expected is not None else total - 1e-3
    ok(ip, """%%trace net x
total = net.layer1.output.sum()
if total > threshold + 50:
    level = "high"
elif total < threshold:
    level = "low"
else:
    level = "middle"
""")
    assert ip.user_ns["level"] == (expected or "middle")


@pytest.mark.parametrize("taken", [True, False])
def test_a_name_assigned_on_one_side_only_is_bound_only_if_that_side_ran(ip, taken):
    module, x = with_net(ip)
    ip.user_ns["threshold"] = -100.0 if taken else 100.0
    ok(ip, """%%trace net x
total = net.layer1.output.sum()
if total > threshold:
    only_then = total * 2
""")
    truth = module_values(module, x)["layer1"].sum() * 2
    if taken:
        assert torch.equal(ip.user_ns["only_then"], truth)
    else:
        assert "only_then" not in ip.user_ns
    ip.user_ns["kept"] = "from an earlier cell"
    ok(ip, """%%trace net x
if net.layer1.output.sum() > threshold:
    kept = "changed"
""")
    assert ip.user_ns["kept"] == ("changed" if taken else "from an earlier cell")


def test_if_on_plain_values_stays_python(ip):
    with_net(ip)
    ok(ip, """%%trace net x
seen = []
for i in range(4):
    if i % 2 == 0:
        seen.append(i)
    elif i == 3:
        seen.append("three")
    else:
        continue
if x.sum() > 0:
    sign = "positive"
else:
    sign = "negative"
""")
    assert ip.user_ns["seen"] == [0, 2, "three"]
    assert ip.user_ns["sign"] == ("positive" if ip.user_ns["x"].sum() > 0 else "negative")


def test_if_inside_a_function_defined_in_the_cell(ip):
    module, x = with_net(ip)
    ok(ip, """%%trace net x
def clip(value, limit):
    if value.max() > limit:
        value = value.clamp(max=limit)
    return value
clipped = clip(net.layer1.output, 0.1)
""")
    assert torch.equal(ip.user_ns["clipped"], module_values(module, x)["layer1"].clamp(max=0.1))
    ok(ip, "plain = clip(torch.tensor([5.0, -1.0]), 1.0)")  # a later, plain cell: the function is plain Python
    assert ip.user_ns["plain"].tolist() == [1.0, -1.0]


@pytest.mark.parametrize("jump", ["break", "continue", "raise ValueError('no')"])
def test_leaving_a_loop_from_a_traced_if_is_a_clear_error(ip, jump):
    module, x = with_net(ip)
    ip.user_ns["h"] = "from an earlier cell"
    result = run(ip, f"""%%trace net x
h = net.layer1.output
for i in range(3):
    if h.sum() > 0:
        {jump}
""")
    error = result.error_in_exec
    assert isinstance(error, TypeError)
    keyword = jump.split()[0]
    assert str(error).startswith(f"line 5 `{jump}`: `{keyword}` inside an `if` on a traced value (the `if` on line 4)")
    assert ip.user_ns["h"] == "from an earlier cell"
    assert hook_count(module) == 0


def test_jumps_under_plain_conditions_and_inside_inner_loops_still_work(ip):
    module, x = with_net(ip)
    ok(ip, """%%trace net x
h = net.layer1.output
found = []
for i in range(5):
    if i == 2:
        break
    found.append(i)
if h.sum() > 0:
    for j in range(3):
        if j == 1:
            break
        found.append(j)
""")
    assert ip.user_ns["found"] == [0, 1, 0]


@pytest.mark.parametrize("outer, inner, expected", [(-100.0, -100.0, "very"), (-100.0, 100.0, "some"),
                                                    (100.0, -100.0, "none")])
def test_nested_ifs_on_traced_values(ip, capsys, outer, inner, expected):
    module, x = with_net(ip)
    ip.user_ns.update(outer=outer, inner=inner)
    ok(ip, """%%trace net x
total = net.layer1.output.sum()
if total > outer:
    if total > inner:
        level = "very"
    else:
        level = "some"
    print("outer branch")
else:
    level = "none"
""")
    assert ip.user_ns["level"] == expected
    assert capsys.readouterr().out == ("outer branch\n" if expected != "none" else "")


def test_an_if_on_a_tensor_with_many_values_fails_at_its_line_before_running(ip):
    module, x = with_net(ip)
    result = run(ip, "%%trace net x\nh = net.layer1.output\nif h > 0:\n    print('positive')\n")
    error = result.error_in_exec
    assert type(error) is RuntimeError
    assert str(error).startswith("line 3 `if h > 0:`: the condition is a tensor of shape (3, 10) (30 values)")
    assert "h" not in ip.user_ns and hook_count(module) == 0


@pytest.mark.parametrize("low, high, expected", [(-100.0, 100.0, "inside"), (50.0, 100.0, "outside"),
                                                 (-100.0, -50.0, "outside")])
def test_and_or_not_on_traced_values(ip, low, high, expected):
    module, x = with_net(ip)
    ip.user_ns.update(low=low, high=high)
    ok(ip, """%%trace net x
total = net.layer1.output.sum()
if total > low and total < high:
    where = "inside"
else:
    where = "outside"
either = total < low or total > high
negated = not total > low
""")
    total = module_values(module, x)["layer1"].sum()
    assert ip.user_ns["where"] == expected
    assert bool(ip.user_ns["either"]) == (expected == "outside")
    assert ip.user_ns["negated"] is (not total > low)


def test_and_or_not_on_plain_values_short_circuit_as_in_python(ip):
    with_net(ip)
    ok(ip, """%%trace net x
missing = None
guarded = missing is not None and missing.anything
fallback = missing or "default"
chained = 1 and 2 and 0 and missing.anything
flipped = not []
""")
    ns = ip.user_ns
    assert (ns["guarded"], ns["fallback"], ns["chained"], ns["flipped"]) == (False, "default", 0, True)


# ---------------------------------------------------------------------------------------------- printing
def test_print_shows_real_values_while_the_model_runs(ip, capsys):
    module, x = with_net(ip)
    truth = module_values(module, x)
    def announce(_module, inputs):
        if not isinstance(inputs[0], FakeTensor):  # the shape scan runs the module on fake tensors first
            print("layer2 starts")

    handle = module.layer2.register_forward_pre_hook(announce)
    try:
        ok(ip, """%%trace net x
print("before")
print("layer1 sum", net.layer1.output.sum())
print("output", net.output[0])
print("after")
""")
    finally:
        handle.remove()
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["before", f"layer1 sum {truth['layer1'].sum()!s}", "layer2 starts",
                     f"output {truth['output'][0]!s}", "after"]


def test_prints_keep_cell_order_even_when_the_model_produces_values_the_other_way(ip, capsys):
    module, x = with_net(ip)
    truth = module_values(module, x)
    ok(ip, """%%trace net x
print("out", net.output.sum())
print("layer1", net.layer1.output.sum())
print("done")
""")
    assert capsys.readouterr().out.splitlines() == [f"out {truth['output'].sum()!s}",
                                                     f"layer1 {truth['layer1'].sum()!s}", "done"]


def test_f_strings_format_real_values(ip, capsys):
    module, x = with_net(ip)
    truth = module_values(module, x)
    ok(ip, """%%trace net x
width = 8
total = net.layer1.output.sum()
print(f"sum={total.item():.3f} first={net.output[0, 0].item()!r:>{width}} {total.item()=:.1f}")
message = f"argmax {net.output[0].argmax().item()}"
""")
    total = truth["layer1"].sum().item()
    first = truth["output"][0, 0].item()
    assert capsys.readouterr().out == f"sum={total:.3f} first={first!r:>8} total.item()={total:.1f}\n"
    assert ip.user_ns["message"] == f"argmax {truth['output'][0].argmax().item()}"


def test_print_and_f_strings_outside_a_trace_are_plain(ip, capsys):
    with_net(ip)
    ok(ip, """%%trace net x
def describe(value):
    print(f"value {value}")
""")
    ok(ip, "describe(3)")
    assert capsys.readouterr().out == "value 3\n"


# ------------------------------------------------------------------------------------- loops and unpacking
def test_loops_over_traced_values_yield_their_items(ip):
    module, x = with_net(ip)
    ok(ip, """%%trace net x
best = []
for row in net.output:
    best.append(row.argmax())
sizes = [len(range(3)) for _ in range(2)]
""")
    truth = module_values(module, x)["output"]
    assert [value.item() for value in ip.user_ns["best"]] == truth.argmax(dim=1).tolist()
    assert ip.user_ns["sizes"] == [3, 3]


def test_a_loop_over_a_value_of_unknown_length_names_the_line(ip):
    module, x = with_net(ip)
    result = run(ip, """%%trace net x
as_list = tracer.apply(lambda tensor: tensor.tolist(), net.output)
for item in as_list:
    pass
""")
    assert isinstance(result.error_in_exec, TypeError)
    assert "its length is unknown while the cell is built" in str(result.error_in_exec)
    assert "line 2" in str(result.error_in_exec)
    assert hook_count(module) == 0


def test_tracer_iter_and_all_are_iteration_blocks_without_a_rewrite(ip):
    module, x = with_net(ip)
    ok(ip, """%%trace net x
for step in tracer.iter[0]:
    first = net.layer1.output
for step in tracer.all():
    every = net.output
""")
    truth = module_values(module, x)
    assert torch.equal(ip.user_ns["first"], truth["layer1"]) and torch.equal(ip.user_ns["every"], truth["output"])


def test_unpacking_traced_values(ip):
    module, x = with_net(ip)
    ok(ip, """%%trace net x
a, b, c = net.output
head, *rest = net.layer1.output
[first, second] = net.output[:2]
twice, thrice = tracer.apply(lambda value: (value * 2, value * 3), net.output)   # length unknown: 2 targets
""")
    truth = module_values(module, x)
    ns = ip.user_ns
    assert [torch.equal(ns[name], truth["output"][row]) for row, name in enumerate("abc")] == [True] * 3
    assert torch.equal(ns["head"], truth["layer1"][0])
    assert isinstance(ns["rest"], list) and [torch.equal(r, truth["layer1"][i + 1]) for i, r in enumerate(ns["rest"])] \
        == [True, True]
    assert torch.equal(ns["first"], truth["output"][0]) and torch.equal(ns["second"], truth["output"][1])
    assert torch.equal(ns["twice"], truth["output"] * 2) and torch.equal(ns["thrice"], truth["output"] * 3)


class Halves(torch.nn.Module):
    def forward(self, hidden):
        return hidden[:, :2], hidden[:, 2:]


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Linear(5, 4)
        self.heads = Halves()

    def forward(self, x):
        left, right = self.heads(self.body(x))
        return left * right


def test_unpacking_a_module_that_returns_a_tuple(ip):
    """nnsight #353: ``left, right = net.heads.output`` unpacks a traced tuple."""
    from nnsight_magic import NNsight
    module = TwoHeads()
    x = torch.rand(2, 5)
    ip.user_ns.update(net=NNsight(module), x=x)
    ok(ip, """%%trace net x
left, right = net.heads.output
""")
    with torch.no_grad():
        hidden = module.body(x)
    assert torch.equal(ip.user_ns["left"], hidden[:, :2]) and torch.equal(ip.user_ns["right"], hidden[:, 2:])


def test_unpacking_plain_values_and_generators_is_plain(ip):
    with_net(ip)
    ok(ip, """%%trace net x
one, two = (value for value in (1, 2))
key, = {"only": 1}
""")
    assert (ip.user_ns["one"], ip.user_ns["two"], ip.user_ns["key"]) == (1, 2, "only")


# ------------------------------------------------------------------------------------ rejected constructs
def test_while_on_a_traced_value_is_a_clear_error(ip):
    module, x = with_net(ip)
    result = run(ip, """%%trace net x
h = net.layer1.output
while h.sum() > 0:
    h = h - 1
""")
    assert isinstance(result.error_in_exec, TypeError)
    assert "`while` on" in str(result.error_in_exec) and "(line 3)" in str(result.error_in_exec)
    assert "h" not in ip.user_ns and hook_count(module) == 0


def test_while_on_plain_values_works(ip):
    with_net(ip)
    ok(ip, """%%trace net x
count = 0
while count < 3:
    count += 1
""")
    assert ip.user_ns["count"] == 3


@pytest.mark.parametrize("statement", ["await later()", "async for item in items(): pass",
                                       "async with lock: pass", "values = [v async for v in items()]"])
def test_await_in_the_body_is_rejected_at_its_line(ip, capsys, statement):
    module, x = with_net(ip)
    result = run(ip, f"""%%trace net x
h = net.layer1.output
{statement}
""")
    error = result.error_in_exec
    assert isinstance(error, SyntaxError)
    assert error.lineno == 3 and "cannot be used in a %%trace cell" in error.msg
    assert "h" not in ip.user_ns and hook_count(module) == 0
    assert "line 3" in plain(capsys.readouterr().out)


def test_async_functions_defined_in_the_cell_are_fine():
    tree = ast.parse("async def fetch():\n    await other()\n")
    assert rewrite_cell(tree).assigned == ["fetch"]


def test_syntax_errors_name_the_cell_line(ip, capsys):
    with_net(ip)
    result = run(ip, "%%trace net x\nh = net.layer1.output\nif :\n    pass\n")
    error = result.error_in_exec
    assert isinstance(error, SyntaxError) and error.lineno == 3 and error.text.strip() == "if :"
    assert "Cell In[1], line 3" in plain(capsys.readouterr().out)

