"""The fault matrix of the Python API: a fault in every phase, odd module outputs, nesting and re-entry.

Every case runs after a good trace whose saved value must survive, raises its fault, and is then checked the same
way: the error keeps its type and names the line marked ``# FAULT`` in the case (``test_fault_matrix.py:N``), no
hook is left on any module (every hook dictionary, torch's global hooks too), weights and buffers are unchanged,
the earlier saved value is the same tensor with the same contents, and the next trace computes exactly what
hand-written forward hooks compute. The magics' half is ``test_fault_matrix_magics.py``.

Phases: ``build`` (the trace body raises), ``shapes`` (fake tensors find the problem while building), ``check``
(the finished graph is checked before the model runs), ``run`` (the model runs), ``bind`` (saved values are
handed to their proxies after the run).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from fault_harness import Clean, OddModel, ground_truth, line_named, message_of, zero_first_column
from nnsight_magic import NNsight, OutOfOrderError
from nnsight_magic.intervention import tracer as tracer_module
from nnsight_magic.intervention.tracer import Tracer


@dataclass
class Case:
    """A fault: ``run(net, x)`` raises ``error``; ``marked``: the case's ``# FAULT`` line must be named."""

    run: Callable[..., Any]
    error: type[BaseException]
    marked: bool = True
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    at: int | None = None  # the line to name, when it is not the case's own `# FAULT` line (a lambda's)

    def fault_line(self) -> int:
        if self.at is not None:
            return self.at
        lines, first = inspect.getsourcelines(self.run)
        return first + next(number for number, text in enumerate(lines) if "# FAULT" in text)


CASES: dict[str, Case] = {}


def case(name: str, error: type[BaseException], marked: bool = True, patch: Any = None,
         at: int | None = None) -> Callable:
    def register(run: Callable) -> Callable:
        assert name not in CASES, name
        CASES[name] = Case(run, error, marked, patch, at)
        return run
    return register


def raise_(error: BaseException) -> Callable:
    def function(*_: Any, **__: Any) -> Any:
        raise error
    return function


def on_real(error: type[BaseException]) -> Callable:
    """A function that raises ``error`` when it sees real tensors (while the model runs), not fake ones."""
    def function(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor):
            raise error("real values are refused")
        return value
    return function


# --------------------------------------------------------------------------------- errors in each phase
BUILD_ERRORS = (ValueError, TypeError, KeyError, RuntimeError, ZeroDivisionError, KeyboardInterrupt)
for kind in BUILD_ERRORS:
    @case(f"build-{kind.__name__}-raised-in-the-body", kind, marked=False)
    def _(net, x, kind=kind):
        with net.trace(x):
            net.layer1.output.save()
            raise kind("from the body")  # FAULT

    @case(f"build-{kind.__name__}-after-an-edit", kind, marked=False)
    def _(net, x, kind=kind):
        with net.trace(x):
            net.layer1.output[:, 0] = 5
            raise kind("from the body")  # FAULT

    @case(f"build-{kind.__name__}-in-an-invoke", kind, marked=False)
    def _(net, x, kind=kind):
        with net.trace() as tracer:
            with tracer.invoke(x):
                net.layer1.output.save()
                raise kind("from the body")  # FAULT

    @case(f"build-{kind.__name__}-in-a-condition", kind, marked=False)
    def _(net, x, kind=kind):
        with net.trace(x) as tracer:
            with tracer.cond(net.layer1.output.sum() > 0):
                raise kind("from the body")  # FAULT

SHAPE_FAULTS = {
    "index-out-of-range": (IndexError, lambda net: net.layer1.output[:, 99]),
    "matmul-mismatch": (RuntimeError, lambda net: net.layer1.output @ torch.ones(3, 3)),
    "add-mismatch": (RuntimeError, lambda net: net.layer1.output + torch.ones(7)),
    "view-mismatch": (RuntimeError, lambda net: net.layer1.output.view(7, 7)),
    "cat-mismatch": (RuntimeError, lambda net: torch.cat([net.layer1.output, torch.ones(3, 3, 3)])),
    "tuple-index": (IndexError, lambda net: net.pair.output[5]),
    "dict-key": (KeyError, lambda net: net.mapping.output["missing"]),
    "nested-index": (IndexError, lambda net: net.nested.output[1]["k"][9]),
    "nested-key": (KeyError, lambda net: net.nested.output[1]["q"]),
    "tensor-method-on-dict": (AttributeError, lambda net: net.mapping.output.sum()),
    "index-a-none": (TypeError, lambda net: net.nothing.output[0]),
    "index-an-int": (TypeError, lambda net: net.count.output[0]),
    "bad-dim": (IndexError, lambda net: net.layer2.output.sum(dim=5)),
}
for name, (kind, make) in SHAPE_FAULTS.items():
    @case(f"shapes-{name}", kind, at=make.__code__.co_firstlineno)
    def _(net, x, make=make):
        with net.trace(x):
            net.layer1.output.save()
            make(net).save()  # FAULT

    @case(f"shapes-{name}-saved-later", kind, at=make.__code__.co_firstlineno)
    def _(net, x, make=make):
        with net.trace(x):
            value = make(net)  # FAULT
            net.output.save()
            value.save()


@case("check-out-of-order-edit", OutOfOrderError)
def _(net, x):
    with net.trace(x):
        late = net.layer2.output
        net.layer1.output[:, :2] = late[:, :2]  # FAULT


@case("check-out-of-order-replacement", OutOfOrderError)
def _(net, x):
    with net.trace(x):
        net.pair.output = (net.layer2.output, net.layer2.output)  # FAULT


@case("check-grad-without-backward", RuntimeError)
def _(net, x):
    with net.trace(x):
        net.layer1.output.grad.save()  # FAULT


@case("check-no-input", ValueError, marked=False)
def _(net, x):
    with net.trace():
        net.layer1.output.save()  # FAULT (a trace without input names no line)


@case("check-interrupt", KeyboardInterrupt, marked=False,
      patch=lambda monkeypatch: monkeypatch.setattr(tracer_module, "check_order", raise_(KeyboardInterrupt())))
def _(net, x):
    with net.trace(x):
        net.layer1.output.save()  # FAULT


@case("check-error-in-checker", RuntimeError, marked=False,
      patch=lambda monkeypatch: monkeypatch.setattr(tracer_module, "check_order", raise_(RuntimeError("checker"))))
def _(net, x):
    with net.trace(x):
        net.layer1.output.save()  # FAULT


for kind in (ValueError, TypeError, RuntimeError, KeyError, ArithmeticError):
    @case(f"run-{kind.__name__}-in-apply", kind)
    def _(net, x, kind=kind):
        with net.trace(x) as tracer:
            h = net.layer1.output
            tracer.apply(on_real(kind), h)  # FAULT
            net.output.save()

    @case(f"run-{kind.__name__}-in-apply-on-a-tuple-output", kind)
    def _(net, x, kind=kind):
        with net.trace(x) as tracer:
            tracer.apply(on_real(kind), net.pair.output[0])  # FAULT

    @case(f"run-{kind.__name__}-in-apply-without-shapes", kind)
    def _(net, x, kind=kind):
        with net.trace(x, validate=False) as tracer:
            tracer.apply(raise_(kind("refused")), net.layer1.output)  # FAULT


@case("run-interrupt-in-apply", KeyboardInterrupt, marked=False)
def _(net, x):
    with net.trace(x) as tracer:
        tracer.apply(on_real(KeyboardInterrupt), net.layer1.output)  # FAULT


@case("run-interrupt-in-a-later-module", KeyboardInterrupt, marked=False)
def _(net, x):
    with net.trace(x) as tracer:
        net.layer1.output[:, 0] = 1
        tracer.apply(on_real(KeyboardInterrupt), net.layer2.output)  # FAULT


@case("run-never-produced-call", RuntimeError)
def _(net, x):
    with net.trace(x):
        net.layer1.next().output.save()  # FAULT


@case("run-edit-of-a-later-call", RuntimeError)
def _(net, x):
    with net.trace(x):
        net.layer2.next().output[:] = 0  # FAULT


@case("run-error-in-a-condition", ValueError)
def _(net, x):
    with net.trace(x) as tracer:
        with tracer.cond(net.layer1.output.sum() > -1e9):
            tracer.apply(on_real(ValueError), net.layer2.output)  # FAULT


for kind in (RuntimeError, KeyboardInterrupt):
    def _bind_patch(monkeypatch: pytest.MonkeyPatch, kind=kind) -> None:
        original = Tracer._detach

        def detach(self: Tracer, execution: Any) -> None:
            original(self, execution)
            if execution is not None:
                raise kind("while binding")

        monkeypatch.setattr(Tracer, "_detach", detach)

    @case(f"bind-{kind.__name__}-after-the-run", kind, marked=False, patch=_bind_patch)
    def _(net, x):
        with net.trace(x):
            net.layer1.output[:, 0] = 2
            net.output.save()  # FAULT


# -------------------------------------------------------------------------------- nesting and re-entry
@case("reentry-value-before-the-run", ValueError)
def _(net, x):
    with net.trace(x):
        net.layer1.output.value  # FAULT


@case("nesting-session-body-fails", ZeroDivisionError, marked=False)
def _(net, x):
    with net.session():
        with net.trace(x):
            net.layer1.output.save()
        1 / 0  # FAULT


@case("nesting-session-trace-fails-to-build", IndexError)
def _(net, x):
    with net.session():
        with net.trace(x):
            h = net.layer1.output.save()
        with net.trace(x):
            h[:, 99].save()  # FAULT


@case("nesting-session-second-trace-fails-to-run", ValueError)
def _(net, x):
    with net.session() as session:
        with net.trace(x):
            h = net.layer1.output.save()
        with net.trace(x) as second:
            second.apply(on_real(ValueError), h)  # FAULT


@case("nesting-session-interrupt", KeyboardInterrupt, marked=False)
def _(net, x):
    with net.session():
        with net.trace(x) as tracer:
            tracer.apply(on_real(KeyboardInterrupt), net.layer1.output)  # FAULT


@case("nesting-edit-body-fails", ValueError, marked=False)
def _(net, x):
    with net.edit():
        raise ValueError("in the edit")  # FAULT


@case("nesting-edit-shape-error", IndexError)
def _(net, x):
    with net.edit() as edited:
        edited.layer1.output[:, 99] = 0  # FAULT
    with edited.trace(x):
        edited.output.save()


@case("nesting-edit-error-at-run", ValueError)
def _(net, x):
    with net.edit() as edited:
        edited.layer1.output[:] = edited.layer1.output  # keeps the model the same
    with edited.trace(x) as tracer:
        tracer.apply(on_real(ValueError), edited.layer2.output)  # FAULT


@case("nesting-scan-shape-error", IndexError)
def _(net, x):
    with net.scan(x):
        net.layer1.output[:, 99]  # FAULT


# -------------------------------------------------------------------------------------------- the runner
@pytest.fixture
def model():
    module = OddModel()
    net = NNsight(module)
    torch.manual_seed(1)
    x = torch.rand(3, 5)
    with net.trace(x):
        earlier = net.layer1.output.save()
    return module, net, x, earlier, earlier.value.clone()


def assert_clean_and_correct(module, net, x, clean, earlier, kept) -> None:
    clean.check()
    assert torch.equal(earlier.value, kept)
    with net.trace(x):
        net.layer1.output[:, 0] = 0
        pair = net.pair.output.save()
        mapping = net.mapping.output.save()
        nested = net.nested.output.save()
        count = net.count.output.save()
        out = net.output.save()
    truth = ground_truth(module, x, {"layer1": zero_first_column})
    assert [torch.equal(a, b) for a, b in zip(pair.value, truth["pair"])] == [True, True]
    assert mapping.value.keys() == truth["mapping"].keys()
    assert all(torch.equal(mapping.value[key], truth["mapping"][key]) for key in truth["mapping"])
    assert torch.equal(nested.value[1]["k"][0], truth["nested"][1]["k"][0])
    assert count.value == truth["count"] == 3
    assert torch.equal(out.value, truth["output"])
    clean.check()


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, model, monkeypatch):
    module, net, x, earlier, kept = model
    fault = CASES[name]
    clean = Clean(module)
    with monkeypatch.context() as patched:
        if fault.patch is not None:
            fault.patch(patched)
        with pytest.raises(BaseException) as raised:
            fault.run(net, x)
    assert type(raised.value) is fault.error, message_of(raised.value)
    if fault.marked:
        assert line_named(message_of(raised.value), fault.fault_line(), "test_fault_matrix.py"), \
            message_of(raised.value)
    assert_clean_and_correct(module, net, x, clean, earlier, kept)


# ------------------------------------------------------------------------------------ odd outputs that work
ODD_READS = {
    "tuple-item": (lambda net: net.pair.output[1], lambda truth: truth["pair"][1]),
    "dict-item": (lambda net: net.mapping.output["b"], lambda truth: truth["mapping"]["b"]),
    "nested-item": (lambda net: net.nested.output[1]["k"][1], lambda truth: truth["nested"][1]["k"][1]),
    "int-output": (lambda net: net.count.output, lambda truth: truth["count"]),
    "none-output": (lambda net: net.nothing.output, lambda truth: truth["nothing"]),
    "nothing-input": (lambda net: net.nothing.input, lambda truth: truth["layer1"]),
}


@pytest.mark.parametrize("name", list(ODD_READS))
def test_odd_outputs_read_what_hooks_see(name, model):
    module, net, x, earlier, kept = model
    clean = Clean(module)
    read, expected = ODD_READS[name]
    with net.trace(x):
        value = read(net).save()
    truth = expected(ground_truth(module, x))
    if isinstance(truth, torch.Tensor):
        assert torch.equal(value.value, truth)
    else:
        assert value.value == truth
    assert_clean_and_correct(module, net, x, clean, earlier, kept)


ODD_EDITS = {
    "tuple-item-in-place": (lambda net: net.pair.output[0].__setitem__((slice(None), 0), 0),
                            {"pair": lambda out: (zero_first_column(out[0]), out[1])}),
    "dict-item-in-place": (lambda net: net.mapping.output["a"].__setitem__((slice(None), 0), 0),
                           {"mapping": lambda out: {**out, "a": zero_first_column(out["a"])}}),
    "whole-tuple": (lambda net: setattr(net.pair, "output", (net.pair.output[1], net.pair.output[0])),
                    {"pair": lambda out: (out[1], out[0])}),
}


@pytest.mark.parametrize("name", list(ODD_EDITS))
def test_odd_outputs_edited_as_hooks_edit(name, model):
    module, net, x, earlier, kept = model
    clean = Clean(module)
    edit, edits = ODD_EDITS[name]
    with net.trace(x):
        edit(net)
        out = net.output.save()
    assert torch.equal(out.value, ground_truth(module, x, edits)["output"])
    assert_clean_and_correct(module, net, x, clean, earlier, kept)
