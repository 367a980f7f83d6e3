"""The fault matrix of the magics: failing ``%%trace`` / ``%%session`` cells in every phase, interrupts, odd
module outputs in cells, bad magic arguments, nesting and re-entry of sessions.

Every case runs in a notebook whose earlier cell saved a value, fails, and is then checked: the error keeps its
type and names the cell line marked ``# FAULT`` (in its message, or as the cell frame of its traceback for plain
Python errors), no hook is left on any module, weights and buffers are unchanged, every notebook name is bound to
the same object as before (lists and dicts hold the same items), the earlier value is the same tensor with the
same contents, and the next ``%%trace`` cell computes exactly what hand-written forward hooks compute.
"""

from __future__ import annotations

import pytest
import torch
from IPython.core.error import UsageError

from fault_harness import Clean, OddModel, ground_truth, line_named, message_of, zero_first_column
from magic_shell import assert_unchanged, ok, run, snapshot
from nnsight_magic import NNsight, OutOfOrderError
from nnsight_magic.magics import bindings


def _explode(value):
    raise ValueError("refused")


def _interrupt(value):
    raise KeyboardInterrupt


@pytest.fixture
def notebook(ip):
    """``net`` (an OddModel), ``x``, an earlier saved value ``earlier``; returns (module, x, earlier, its copy)."""
    module = OddModel()
    torch.manual_seed(1)
    x = torch.rand(3, 5)
    ip.user_ns.update(net=NNsight(module), x=x, a=x[:1], b=x[1:2], torch=torch, explode=_explode,
                      interrupt=_interrupt, h="from an earlier cell", results=[1], log={"runs": []})
    ok(ip, "%%trace net x\nearlier = net.layer1.output\n")
    return module, x, ip.user_ns["earlier"], ip.user_ns["earlier"].clone()


def cell_line(error: BaseException, line: int) -> bool:
    """The error names cell line ``line`` in its message, or its traceback has a cell frame at that line."""
    if line_named(message_of(error), line):
        return True
    entry = error.__traceback__
    while entry is not None:
        if entry.tb_lineno == line and "ipython-input" in entry.tb_frame.f_code.co_filename or \
                entry.tb_lineno == line and entry.tb_frame.f_code.co_filename.startswith("/tmp/ipykernel"):
            return True
        entry = entry.tb_next
    return False


def fault_line(source: str) -> int | None:
    return next((number for number, text in enumerate(source.splitlines(), 1) if "# FAULT" in text), None)


def check_after(ip, module, x, clean, before, earlier, kept) -> None:
    clean.check()
    assert_unchanged(ip.user_ns, before)
    assert ip.user_ns["earlier"] is earlier and torch.equal(earlier, kept)
    ok(ip, "%%trace net x\nnet.layer1.output[:, 0] = 0\nout = net.output\npair = net.pair.output\n")
    truth = ground_truth(module, x, {"layer1": zero_first_column})
    assert torch.equal(ip.user_ns["out"], truth["output"])
    assert [torch.equal(a, b) for a, b in zip(ip.user_ns["pair"], truth["pair"])] == [True, True]
    clean.check()


def run_fault(ip, notebook, source: str, error: type[BaseException], named: bool) -> BaseException:
    module, x, earlier, kept = notebook
    clean = Clean(module)
    before = snapshot(ip.user_ns)
    result = run(ip, source)
    raised = result.error_in_exec
    assert type(raised) is error, message_of(raised) if raised is not None else "no error"
    if named:
        assert cell_line(raised, fault_line(source)), message_of(raised)
    check_after(ip, module, x, clean, before, earlier, kept)
    return raised


# ------------------------------------------------------------------------------------ phases × cell kinds
PHASES = {
    "build": ("undefined_name + 1  # FAULT", NameError, True),
    "build-interrupt": ("interrupt(None)  # FAULT", KeyboardInterrupt, False),
    "shapes": ("bad = net.layer1.output[:, 99]  # FAULT", IndexError, True),
    "shapes-dict-key": ("bad = net.mapping.output['missing']  # FAULT", KeyError, True),
    "shapes-tuple-index": ("bad = net.pair.output[7]  # FAULT", IndexError, True),
    "check": ("net.layer1.output[:, :2] = net.layer2.output  # FAULT", OutOfOrderError, True),
    "run": ("checked = tracer.apply(explode, net.layer1.output)  # FAULT", ValueError, True),
    "run-interrupt": ("tracer.apply(interrupt, net.layer1.output)  # FAULT", KeyboardInterrupt, False),
    "run-never-produced": ("late = net.layer1.next().output  # FAULT", RuntimeError, True),
}

CELLS = {
    "trace": "%%trace net x\nh = net.layer1.output\nresults.append(net.output)\n{fault}\n",
    "trace-invokes": "%%trace net\nwith tracer.invoke(a):\n    h = net.layer1.output\n    results.append(h)\n"
                     "    {fault}\n",
    "trace-branch": "%%trace net x\nif net.layer1.output.sum() > -1e9:\n    h = net.layer1.output\n"
                    "    {fault}\n",
    "session-cell": "%%session\nwith net.trace(x) as tracer:\n    h = net.layer1.output\n    log['runs'].append(h)\n"
                    "    {fault}\n",
}


@pytest.mark.parametrize("phase", list(PHASES))
@pytest.mark.parametrize("kind", list(CELLS))
def test_a_failing_cell(ip, notebook, kind, phase):
    fault, error, named = PHASES[phase]
    run_fault(ip, notebook, CELLS[kind].format(fault=fault), error, named)


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
@pytest.mark.parametrize("kind", ["trace", "session-cell"])
def test_a_fault_while_binding_names(ip, notebook, monkeypatch, kind, error):
    calls = []

    def failing(value):  # the first binding fails; the next cell's bindings work again
        calls.append(value)
        if len(calls) == 1:
            raise error("while binding")
        return original(value)

    original = bindings.resolve

    monkeypatch.setattr(bindings, "resolve", failing)
    run_fault(ip, notebook, CELLS[kind].format(fault="out = net.output"), error, named=False)


# -------------------------------------------------------------------------------- a session across cells
SESSION_FAULTS = {
    "build": ("undefined_name  # FAULT", NameError, True, False),
    "shapes": ("bad = h[:, 99]  # FAULT", IndexError, True, False),
    "run": ("tracer.apply(explode, h)  # FAULT", ValueError, True, True),
    "run-interrupt": ("tracer.apply(interrupt, h)  # FAULT", KeyboardInterrupt, False, True),
}


@pytest.mark.parametrize("phase", list(SESSION_FAULTS))
def test_a_session_across_cells(ip, notebook, phase):
    """A recorded cell that fails while built is not recorded; a run that fails keeps the cells that ran."""
    fault, error, named, at_run = SESSION_FAULTS[phase]
    module, x, earlier, kept = notebook
    clean = Clean(module)
    before_session = snapshot(ip.user_ns)
    ok(ip, "%session start")
    ok(ip, "%%trace net a\nh = net.layer1.output\n")
    second = f"%%trace net b\nnet.layer1.output[:] = h\nresults.append(net.output)\n{fault}\n"
    if at_run:
        ok(ip, second)
        raised = run(ip, "%session run").error_in_exec
        assert any("while `%session run` ran the trace of cell In[" in note for note in raised.__notes__)
    else:
        before = snapshot(ip.user_ns)
        raised = run(ip, second).error_in_exec
    assert type(raised) is error
    if named:
        assert cell_line(raised, fault_line(second)), message_of(raised)
    if not at_run:
        assert_unchanged(ip.user_ns, before)
        ok(ip, "%session run")  # the first cell is still recorded; the failed one was not
    assert ip.user_ns["results"] == [1]
    with torch.no_grad():
        assert torch.equal(ip.user_ns["h"], module.layer1(x[:1]))  # the first cell ran
    for rebound in ("h", "tracer"):  # bound by the cells that ran, as they should be
        ip.user_ns[rebound] = before_session[rebound][0]
    check_after(ip, module, x, clean, before_session, earlier, kept)


# ----------------------------------------------------------------------------------- odd outputs in cells
ODD_CELLS = {
    "unpack-a-tuple": ("first, second = net.pair.output\n", lambda truth: {"first": truth["pair"][0],
                                                                             "second": truth["pair"][1]}),
    "loop-over-a-tuple": ("parts = []\nfor part in net.pair.output:\n    parts.append(part)\n",
                          lambda truth: {"parts": list(truth["pair"])}),
    "dict-item": ("b_item = net.mapping.output['b']\n", lambda truth: {"b_item": truth["mapping"]["b"]}),
    "nested-item": ("deep = net.nested.output[1]['k'][1]\n", lambda truth: {"deep": truth["nested"][1]["k"][1]}),
    "int-output": ("count = net.count.output\n", lambda truth: {"count": truth["count"]}),
    "none-output": ("nothing = net.nothing.output\n", lambda truth: {"nothing": truth["nothing"]}),
    "print-an-int": ("print('count', net.count.output)\n", lambda truth: {}),
}


@pytest.mark.parametrize("name", list(ODD_CELLS))
def test_odd_outputs_in_a_cell(ip, notebook, name):
    module, x, earlier, kept = notebook
    clean = Clean(module)
    body, expected = ODD_CELLS[name]
    ok(ip, f"%%trace net x\n{body}")
    for key, truth in expected(ground_truth(module, x)).items():
        value = ip.user_ns[key]
        if isinstance(truth, list):
            assert [torch.equal(a, b) for a, b in zip(value, truth)] == [True] * len(truth)
        elif isinstance(truth, torch.Tensor):
            assert torch.equal(value, truth)
        else:
            assert value == truth
    clean.check()


ODD_FAULTS = {
    "unpack-too-many": ("one, two, three = net.pair.output  # FAULT", ValueError),
    "loop-over-an-int": ("for item in net.count.output:  # FAULT\n    pass", TypeError),
    "unpack-an-int": ("one, two = net.count.output  # FAULT", TypeError),
    "index-a-none": ("bad = net.nothing.output[0]  # FAULT", TypeError),
    "tensor-method-on-a-dict": ("bad = net.mapping.output.sum()  # FAULT", AttributeError),
    "while-on-a-traced-value": ("while net.layer1.output.sum() > 0:  # FAULT\n    pass", TypeError),
    "break-in-a-traced-if": ("for i in range(2):\n    if net.layer1.output.sum() > 0:\n        break  # FAULT",
                             TypeError),
    "await": ("await something  # FAULT", SyntaxError),
}


@pytest.mark.parametrize("name", list(ODD_FAULTS))
def test_odd_faults_in_a_cell(ip, notebook, name):
    body, error = ODD_FAULTS[name]
    run_fault(ip, notebook, f"%%trace net x\nh = net.layer1.output\nresults.append(h)\n{body}\n", error, True)


# ---------------------------------------------------------------------------------------- bad arguments
BAD_ARGUMENTS = {
    "no-model": ("", UsageError),
    "not-a-model": ("results x", UsageError),
    "undefined-model": ("missing x", NameError),
    "undefined-input": ("net missing", NameError),
    "bad-tracer-name": ("net x --tracer 2nd", UsageError),
    "tokens-without-generate": ("net x --max-new-tokens 3", UsageError),
    "generate-without-a-generator": ("net x --generate", UsageError),
    "scan-and-generate": ("net x --scan --generate", UsageError),
    "unknown-option": ("net x --bogus", UsageError),
    "unterminated-string": ('net "unterminated', UsageError),
    "not-a-number": ("net x --generate --max-new-tokens many", UsageError),
    "input-raises": ("net x[99]", IndexError),
}


@pytest.mark.parametrize("name", list(BAD_ARGUMENTS))
def test_bad_magic_arguments(ip, notebook, name):
    line, error = BAD_ARGUMENTS[name]
    run_fault(ip, notebook, f"%%trace {line}\nh = net.layer1.output\nresults.append(h)\n", error, named=False)


# -------------------------------------------------------------------------------------- nesting, re-entry
NESTING = {
    "session-cell-in-an-open-session": (["%session start"], "%%session\nwith net.trace(x):\n    h = 1\n", UsageError),
    "second-session-start": (["%session start"], "%session start", UsageError),
    "run-without-a-session": ([], "%session run", UsageError),
    "discard-without-a-session": ([], "%session discard", UsageError),
    "unknown-session-command": ([], "%session bogus", UsageError),
    "a-proxy-of-a-finished-cell": (["%%trace net x --no-autosave\nold = net.layer1.output\n"],
                                   "%%trace net x\nh = old * 2  # FAULT\n", RuntimeError),
}


@pytest.mark.parametrize("name", list(NESTING))
def test_nesting_and_reentry(ip, notebook, name):
    setup, source, error = NESTING[name]
    for each in setup:
        ok(ip, each)
    magics = ip.magics_manager.registry["TraceMagics"]
    open_session = magics.notebook_session
    run_fault(ip, notebook, source, error, named=False) if open_session is None else None
    if open_session is not None:
        raised = run(ip, source).error_in_exec
        assert type(raised) is error and magics.notebook_session is open_session
        ok(ip, "%session discard")
        module, x, earlier, kept = notebook
        clean = Clean(module)
        check_after(ip, module, x, clean, snapshot(ip.user_ns), earlier, kept)
