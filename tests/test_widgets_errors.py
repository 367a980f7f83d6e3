"""What a student sees when a ``%%trace`` run fails or is interrupted: a traceback of the cell's own lines, a
note that says what happened, ``%tb`` with everything, and an inspector whose rows say what ran and what was saved.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from magic_shell import plain, run
from nnsight_magic import NNsight
from nnsight_magic.widgets import inspector as inspector_module


class Interrupted(torch.nn.Module):
    """Stands in for a student pressing Stop: the second layer raises ``KeyboardInterrupt``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, FakeTensor):
            return x  # the shape scan before the run goes through
        raise KeyboardInterrupt


@pytest.fixture
def shown(ip, monkeypatch) -> list:
    seen: list[Any] = []

    class Handle:
        def update(self, bundle: dict, raw: bool = False) -> None:
            pass

    monkeypatch.setattr(inspector_module, "in_notebook", lambda: True)
    monkeypatch.setattr(inspector_module, "display", lambda widget, **options: seen.append(widget) or Handle())
    run(ip, "%config TraceMagics.widget = True")
    ip.user_ns.update(net=NNsight(torch.nn.Sequential(torch.nn.Linear(4, 4), Interrupted())), x=torch.rand(2, 4))
    return seen


def cell_frames(error: BaseException) -> list[str]:
    return [frame.filename for frame in traceback.extract_tb(error.__traceback__)]


def test_an_interrupt_keeps_saved_values_as_saved_and_says_what_happened(ip, shown):
    ip.user_ns["h"] = "before"
    result = run(ip, "%%trace net x\nh = net[0].output\nout = net.output\n")
    error = result.error_in_exec
    assert isinstance(error, KeyboardInterrupt)
    assert any("nothing this cell assigns was bound" in note for note in error.__notes__)
    assert ip.user_ns["h"] == "before"                      # the name keeps its value from before the cell
    [inspector] = shown
    assert inspector.state == "interrupted"
    assert [(row.name, row.status) for row in inspector.rows] == [("h", "saved"), ("out", "not run")]
    assert inspector.error == ("interrupted (KeyboardInterrupt) during the run: 1 saved value kept from what ran; "
                               "1 node did not run")
    frames = cell_frames(error)
    assert frames[-1].endswith("magics.py")     # the model ran when the cell's trace ended: no engine, no torch
    assert any("%tb shows them" in note for note in error.__notes__)


def test_tb_shows_the_whole_traceback_after_a_trimmed_one(ip, shown):
    result = run(ip, "%%trace net x\nh = net[0].output\n")
    short = cell_frames(result.error_in_exec)
    whole = [frame.filename for frame in traceback.extract_tb(sys.last_traceback)]
    assert len(whole) > len(short) + 3 and any("torch" in name for name in whole)


def test_the_shown_traceback_starts_at_the_cells_own_line(ip, shown, capsys):
    ip.user_ns.update(wide=NNsight(torch.nn.Sequential(torch.nn.Linear(4, 3))))
    run(ip, "%%trace wide x\nh = wide[0].output\nbad = h[:, 99]\n")
    printed = plain(capsys.readouterr().out)
    assert "run_cell_magic" not in printed and "magics.py" not in printed
    cell = printed[printed.index("Cell In["):]
    assert cell.splitlines()[1:4] == ["      1 %%trace wide x", "      2 h = wide[0].output",
                                       "----> 3 bad = h[:, 99]"]
    assert "IndexError: line 3 `bad = h[:, 99]`" in printed


def test_an_interrupt_is_shown_at_the_magics_line(ip, shown, capsys):
    run(ip, "%%trace net x\nh = net[0].output\nout = net.output\n")
    printed = plain(capsys.readouterr().out)
    assert "run_cell_magic" not in printed and "with tracer" not in printed
    cell = printed[printed.index("Cell In["):]
    assert cell.splitlines()[1:4] == ["----> 1 %%trace net x", "      2 h = net[0].output", "      3 out = net.output"]
    assert "nothing this cell assigns was bound" in printed
    run(ip, "%tb")                                                    # %tb: the whole traceback again
    assert "Tracer.__exit__" in plain(capsys.readouterr().out)
