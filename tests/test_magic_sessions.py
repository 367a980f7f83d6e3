"""``%%session`` and the session that spans cells (``%session start`` / ``run`` / ``discard`` / ``%session``).

Values are compared with plain PyTorch (the tiny model's layers called by hand); failures must keep the earlier
cells' names and recorded traces, leave no hooks, and name the cell that failed.
"""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError
from torch._subclasses.fake_tensor import FakeTensor

from conftest import hook_count, make_tiny
from magic_shell import ok, plain, run, with_net
from nnsight_magic import NNsight
from nnsight_magic.intervention.session import Session
from nnsight_magic.magics import NotebookSession, TraceMagics
from nnsight_magic.tracing.proxy import Proxy


@pytest.fixture
def two_inputs(ip):
    """``net``, and inputs ``a`` and ``b`` (1×5 each) in the notebook; returns the plain module, a, b."""
    module, x = with_net(ip)
    a, b = x[:1], x[1:2]
    ip.user_ns.update(a=a, b=b)
    return module, a, b


def real_forwards(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_pre_hook(lambda _, inputs: None if isinstance(inputs[0], FakeTensor) else calls.append(1))
    return calls


def magics_of(ip) -> TraceMagics:
    return ip.magics_manager.registry["TraceMagics"]


# ------------------------------------------------------------------------------- the engine change it needs
def test_an_operation_on_an_earlier_traces_value_becomes_part_of_the_trace_being_built():
    """``h * 2`` in a later trace of a session (no magic involved): a node of that trace, reading ``h`` by bridge."""
    module = make_tiny()
    net = NNsight(module)
    a, b = torch.rand(1, 5), torch.rand(1, 5)
    with net.session():
        with net.trace(a):
            h = net.layer1.output.save()
        with net.trace(b) as second:
            doubled = h * 2
            net.layer1.output[:] = doubled
            out = net.output.save()
    assert doubled.node.op == "call_function" and [node.op for node in second.graph.nodes][:2] == \
        ["bridge", "call_function"]
    with torch.no_grad():
        assert torch.equal(out.value, module.layer2(module.layer1(a) * 2))


# --------------------------------------------------------------------------------------------- %%session
def test_session_cell_runs_traces_and_loops_as_one_unit(ip, two_inputs, capsys):
    module, a, b = two_inputs
    ok(ip, """%%session
with net.trace(a):
    h = net.layer1.output
outs = []
for scale in (1, 2):
    with net.trace(b):
        net.layer1.output[:] = h * scale
        outs.append(net.output)
        print("scale", scale, net.output.sum())
""")
    with torch.no_grad():
        hidden = module.layer1(a)
        expected = [module.layer2(hidden * scale) for scale in (1, 2)]
    assert torch.equal(ip.user_ns["h"], hidden)
    assert [torch.equal(out, truth) for out, truth in zip(ip.user_ns["outs"], expected)] == [True, True]
    assert capsys.readouterr().out == f"scale 1 {expected[0].sum()!s}\nscale 2 {expected[1].sum()!s}\n"
    assert hook_count(module) == 0


def test_session_cell_with_a_shape_error_runs_nothing_and_changes_nothing(ip, two_inputs):
    module, a, b = two_inputs
    forwards = real_forwards(module)
    ip.user_ns["h"] = "from an earlier cell"
    result = run(ip, """%%session
with net.trace(a):
    h = net.layer1.output
with net.trace(b):
    net.layer1.output[:] = h[:, 99]
""")
    error = result.error_in_exec
    assert type(error) is IndexError and str(error).startswith("line 5 `net.layer1.output[:] = h[:, 99]`")
    assert forwards == [] and ip.user_ns["h"] == "from an earlier cell"
    assert hook_count(module) == 1  # real_forwards' own hook


def test_session_cell_failing_while_running_restores_names(ip, two_inputs):
    module, a, b = two_inputs

    def explode(value):
        raise ValueError("boom")

    ip.user_ns.update(explode=explode, h="from an earlier cell")
    result = run(ip, """%%session
with net.trace(a):
    h = net.layer1.output
with net.trace(b) as second:
    net.layer1.output[:] = h
    failed = net.output
    second.apply(explode, failed)
""")
    error = result.error_in_exec
    assert type(error) is ValueError and str(error) == "line 7 `second.apply(explode, failed)`: boom"
    assert ip.user_ns["h"] == "from an earlier cell" and "failed" not in ip.user_ns
    assert hook_count(module) == 0


def test_session_cell_is_refused_while_a_cross_cell_session_is_open(ip, two_inputs):
    ok(ip, "%session start")
    result = run(ip, "%%session\nwith net.trace(a):\n    h = net.layer1.output\n")
    assert isinstance(result.error_in_exec, UsageError) and "%session run" in str(result.error_in_exec)


# ------------------------------------------------------------------------------------- cross-cell session
THREE_CELLS = [
    "%%trace net a\nh = net.layer1.output\n",
    "%%trace net b\nnet.layer1.output[:] = h * 2\nmid = net.output\n",
    "%%trace net a\nboth = net.output + mid\n",
]


def expected_three_cells(module, a, b):
    with torch.no_grad():
        hidden = module.layer1(a)
        mid = module.layer2(hidden * 2)
        return {"h": hidden, "mid": mid, "both": module(a) + mid}


def test_three_cells_recorded_then_run_in_order(ip, two_inputs, capsys):
    module, a, b = two_inputs
    forwards = real_forwards(module)
    ok(ip, "%session start")
    for cell in THREE_CELLS:
        ok(ip, cell)
    assert forwards == []  # recorded, not run
    assert all(isinstance(ip.user_ns[name], Proxy) for name in ("h", "mid", "both"))
    assert ip.user_ns["h"].shape == torch.Size([1, 10])  # shapes are known while recording
    capsys.readouterr()
    ok(ip, "%session")
    shown = capsys.readouterr().out
    assert "nnsight session (3 cells) — open" in shown
    assert "In[2]: h" in shown and "In[3]: mid" in shown and "In[4]: both" in shown and "1 from earlier cells" in shown

    ok(ip, "%session run")
    assert len(forwards) == 3
    expected = expected_three_cells(module, a, b)
    for name, value in expected.items():
        assert torch.equal(ip.user_ns[name], value), name
    assert hook_count(module) == 1  # real_forwards' own hook
    assert magics_of(ip).notebook_session is None
    ok(ip, "%session")
    assert "no session is open; the last one:" in capsys.readouterr().out


def test_a_failing_cell_is_not_recorded_and_earlier_cells_stay(ip, two_inputs):
    module, a, b = two_inputs
    ok(ip, "%session start")
    ok(ip, THREE_CELLS[0])
    ip.user_ns["mid"] = "from before the session"
    result = run(ip, "%%trace net b\nnet.layer1.output[:] = h[:, 99]\nmid = net.output\n")
    assert type(result.error_in_exec) is IndexError and "line 2" in str(result.error_in_exec)
    assert ip.user_ns["mid"] == "from before the session" and isinstance(ip.user_ns["h"], Proxy)
    session = magics_of(ip).notebook_session
    assert [cell.number for cell in session.cells] == [2] and len(session.session.tracers) == 1
    ok(ip, "%%trace net b\nnet.layer1.output[:] = h * 2\nmid = net.output\n")
    ok(ip, THREE_CELLS[2])
    ok(ip, "%session run")
    expected = expected_three_cells(module, a, b)
    for name, value in expected.items():
        assert torch.equal(ip.user_ns[name], value), name
    assert hook_count(module) == 0


def test_discard_drops_the_cells_and_restores_their_names(ip, two_inputs):
    module, a, b = two_inputs
    forwards = real_forwards(module)
    ip.user_ns["h"] = "from before the session"
    ok(ip, "%session start")
    ok(ip, THREE_CELLS[0])
    ok(ip, THREE_CELLS[1])
    ok(ip, "%session discard")
    assert ip.user_ns["h"] == "from before the session" and "mid" not in ip.user_ns
    assert forwards == [] and hook_count(module) == 1
    assert magics_of(ip).last_session.status == "failed"
    ok(ip, "%session start")  # a new session can start
    ok(ip, THREE_CELLS[0])
    ok(ip, "%session run")
    with torch.no_grad():
        assert torch.equal(ip.user_ns["h"], module.layer1(a))


def test_a_failing_run_keeps_the_cells_that_ran_and_names_the_failing_cell(ip, two_inputs):
    module, a, b = two_inputs

    def explode(value):
        raise ValueError("boom")

    ip.user_ns.update(explode=explode, late="from before the session")
    ok(ip, "%session start")
    ok(ip, THREE_CELLS[0])
    ok(ip, "%%trace net b\nchecked = tracer.apply(explode, h)\nlate = net.output\n")
    ok(ip, THREE_CELLS[2].replace("+ mid", "* 1"))
    result = run(ip, "%session run")
    error = result.error_in_exec
    assert type(error) is ValueError and str(error) == "line 2 `checked = tracer.apply(explode, h)`: boom"
    assert "while `%session run` ran the trace of cell In[3]" in error.__notes__
    with torch.no_grad():
        assert torch.equal(ip.user_ns["h"], module.layer1(a))  # cell 2 ran: its names are bound
    assert ip.user_ns["late"] == "from before the session"  # cell 3 failed: back to its earlier value
    assert "checked" not in ip.user_ns and "both" not in ip.user_ns  # cell 4 never ran
    assert hook_count(module) == 0


def test_a_scan_cell_in_a_session_reads_earlier_values_and_is_not_recorded(ip, two_inputs):
    module, a, b = two_inputs
    ok(ip, "%session start")
    ok(ip, THREE_CELLS[0])
    result = ok(ip, "%%trace net b --scan\n(net.layer1.output + h).shape\n")
    assert result.result == torch.Size([1, 10])
    assert len(magics_of(ip).notebook_session.cells) == 1


@pytest.mark.parametrize("commands, message", [
    (["%session run"], "no session is open"),
    (["%session discard"], "no session is open"),
    (["%session start", "%session start"], "a session is already open"),
    (["%session bogus"], "unknown command `bogus`"),
])
def test_session_usage_errors(ip, commands, message):
    for command in commands[:-1]:
        ok(ip, command)
    result = run(ip, commands[-1])
    assert isinstance(result.error_in_exec, UsageError) and message in str(result.error_in_exec)


def test_no_session_shows_how_to_start_one(ip, capsys):
    ok(ip, "%session")
    assert capsys.readouterr().out == "no session is open: `%session start` opens one\n"


# ------------------------------------------------------------------------ the contract for the session view
def test_the_session_object_reports_cells_and_every_change(ip, two_inputs):
    module, a, b = two_inputs
    ok(ip, "%session start")
    notebook_session = magics_of(ip).notebook_session
    assert isinstance(notebook_session, NotebookSession) and isinstance(notebook_session.session, Session)
    heard: list[tuple[str, int]] = []
    notebook_session.add_listener(lambda changed: heard.append((changed.status, len(changed.cells))))
    ok(ip, THREE_CELLS[0])
    ok(ip, THREE_CELLS[1])
    cell = notebook_session.cells[1]
    assert (cell.number, cell.source) == (3, THREE_CELLS[1])
    assert cell.tracer is ip.user_ns["tracer"] and list(cell.names) == ["mid"]
    assert isinstance(cell.names["mid"], Proxy)
    ok(ip, "%session run")
    assert heard == [("open", 1), ("open", 2), ("running", 2), ("done", 2)]
    assert torch.equal(cell.names["mid"].value, ip.user_ns["mid"])


def test_session_display_includes_the_session_view_when_widgets_are_on(ip, two_inputs, capsys, monkeypatch):
    from nnsight_magic.magics import magics as magics_module
    from nnsight_magic.widgets import SessionView
    shown: list = []
    monkeypatch.setattr(magics_module, "display", shown.append)
    ok(ip, "%session start")
    ok(ip, "%%trace net a\nh = net.layer1.output\n")
    ok(ip, "%session")
    assert shown == []  # widgets are off in these tests
    assert plain(capsys.readouterr().out).endswith("nnsight session (1 cell) — open: `%%trace` cells are recorded; "
                                                   "`%session run` runs them, `%session discard` drops them\n"
                                                   "  In[2]: h  (1 node; recorded)\n")
    ok(ip, "%config TraceMagics.widget = True")
    ok(ip, "%session")
    assert [type(each) for each in shown] == [SessionView]
    assert shown[0].status == "open" and [row.number for row in shown[0].cells] == [2]
