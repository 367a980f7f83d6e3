"""A real kernel: the inspector's updates reach the client while the cell is still running.

The model in the kernel waits at two gates (files this test creates). The test opens the first gate only after it
has received the inspector's rows, and the second only after it has received the update that shows the first
layer done and the second still pending. The cell cannot finish before both gates are open, so every one of those
messages provably arrived while the cell was running; if updates were held back until the cell ended, the test
would never open a gate and would fail at its deadline instead.
"""

from __future__ import annotations

import json
import queue
import re
import sys
import time
from pathlib import Path

import pytest
from jupyter_client.manager import start_new_kernel

from lab_harness import gated_model_source

TRACE_CELL = """
from nnsight_magic import NNsight
from nnsight_magic.widgets import GraphInspector
net = NNsight(model)
with net.trace(x) as tracer:
    GraphInspector(tracer)
    h = net.layer1.output.save()
    out = net.output.save()
print("h", h.value.min().item(), h.value.mean().item(), h.value.max().item())
"""

_ROW = re.compile(r'data-node="(\d+)" data-status="([^"]*)"')
DEADLINE_SECONDS = 90


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("JUPYTER_RUNTIME_DIR", "JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    manager, client = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        yield client
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


class TableState:
    """The row statuses the client would show, from the inspector's messages in arrival order: the whole table
    (the widget's ``value``), a live patch (a custom message with the rows that changed), or the static rendering
    that replaces the display when the run ends (``update_display_data``)."""

    def __init__(self):
        self.statuses: dict[int, str] = {}
        self.html: list[str] = []   # every table or row HTML received, latest last

    def update(self, message: dict) -> list[str] | None:
        """The statuses after ``message`` if it is one of the inspector's, else ``None``."""
        kind, content = message["msg_type"], message["content"]
        if kind in ("comm_open", "comm_msg"):
            data = content.get("data", {})
            value = data.get("state", {}).get("value")
            if isinstance(value, str) and 'class="nnsight-rows"' in value:
                return self._whole(value)
            patch = data.get("content") if data.get("method") == "custom" else None
            if isinstance(patch, dict) and "rows" in patch:
                for node, row in patch["rows"]:
                    self.statuses.update({int(index): status for index, status in _ROW.findall(row)})
                    self.html.append(row)
                return self.current()
        if kind == "update_display_data":
            value = content.get("data", {}).get("text/html", "")
            if 'class="nnsight-rows"' in value:
                return self._whole(value)
        return None

    def _whole(self, value: str) -> list[str]:
        self.statuses = {int(index): status for index, status in _ROW.findall(value)}
        self.html.append(value)
        return self.current()

    def current(self) -> list[str]:
        return [self.statuses[index] for index in sorted(self.statuses)]


def test_updates_arrive_while_the_cell_is_still_running(kernel, tmp_path: Path):
    gates = tmp_path / "gates"
    gates.mkdir()
    setup = kernel.execute_interactive(gated_model_source(str(gates)), timeout=120)
    assert setup["content"]["status"] == "ok", setup["content"]

    events: list[tuple[str, object, str]] = []          # (what, detail, the kernel's time stamp) in arrival order
    tables = TableState()
    printed: list[str] = []
    shown_text = ""
    msg_id = kernel.execute(TRACE_CELL)
    reply = None
    deadline = time.monotonic() + DEADLINE_SECONDS
    try:
        while reply is None:
            assert time.monotonic() < deadline, f"no live update in {DEADLINE_SECONDS} s; got {events}"
            try:
                message = kernel.get_iopub_msg(timeout=0.05)
            except queue.Empty:
                message = None
            if message is not None and message["parent_header"].get("msg_id") == msg_id:
                stamp = str(message["header"]["date"])
                state = tables.update(message)
                if state is not None:
                    events.append(("table", state, stamp))
                elif message["msg_type"] == "display_data":
                    data = message["content"]["data"]
                    if "application/vnd.jupyter.widget-view+json" in data:
                        shown_text = data["text/plain"]
                        events.append(("displayed", None, stamp))
                elif message["msg_type"] == "stream":
                    printed.append(message["content"]["text"])
                shown = [detail for what, detail, _ in events if what in ("table", "displayed")]
                latest = next((detail for detail in reversed(shown) if detail is not None), None)
                if None in shown and latest == ["pending", "pending"] and not (gates / "1").exists():
                    (gates / "1").touch()   # the widget is on screen with every row pending: let the model start
                    events.append(("opened gate 1", None, ""))
                if latest == ["saved", "pending"] and not (gates / "2").exists():
                    (gates / "2").touch()
                    events.append(("opened gate 2", None, ""))
            try:
                candidate = kernel.get_shell_msg(timeout=0)
            except queue.Empty:
                continue
            if candidate["parent_header"].get("msg_id") == msg_id:
                reply = candidate
                events.append(("reply", candidate["content"]["status"], str(candidate["header"]["date"])))
    finally:
        for gate in ("1", "2"):
            (gates / gate).touch()
    while True:  # the output printed after the trace may come after the reply
        try:
            message = kernel.get_iopub_msg(timeout=5)
        except queue.Empty:
            break
        if message["parent_header"].get("msg_id") == msg_id and message["msg_type"] == "stream":
            printed.append(message["content"]["text"])
        if message["msg_type"] == "status" and message["content"]["execution_state"] == "idle" and \
                message["parent_header"].get("msg_id") == msg_id:
            break

    order = [what if what != "table" else f"table {detail}" for what, detail, _ in events]
    steps = ["displayed", "opened gate 1", "table ['saved', 'pending']", "opened gate 2",
             "table ['saved', 'saved']", "reply"]
    positions = [order.index(step) for step in steps]
    assert positions == sorted(positions), order
    assert events[-1][:2] == ("reply", "ok")
    first_table = next(detail for what, detail, _ in events if what == "table" and detail)
    assert first_table == ["pending", "pending"]       # the rows came before anything ran
    stamps = {what if what != "table" else str(detail): stamp for what, detail, stamp in events if stamp}
    assert stamps["['saved', 'pending']"] < stamps["reply"]       # kernel time stamps agree with the arrival order

    assert shown_text.startswith("Sequential · cpu · 1 input (3 rows)")
    columns = [re.split(r"\s{2,}", line.strip()) for line in shown_text.splitlines()[2:4]]
    assert [row[2:6] for row in columns] == [["layer1.output", "(3, 10)", "float32", "pending"],
                                             ["model.output", "(3, 2)", "float32", "pending"]]
    minimum, mean, maximum = (float(value) for value in "".join(printed).split()[1:4])
    assert f"min {minimum:.3g}  mean {mean:.3g}  max {maximum:.3g}" in tables.html[-1]


def test_the_kernelspec_comes_from_the_top_level_kernel_folder(tmp_path: Path):
    from nnsight_magic.kernel import LOGOS, PRELOAD, install

    installed = Path(install("nnsight-test", prefix=str(tmp_path), display_name="nnsight test"))
    spec = json.loads((installed / "kernel.json").read_text())
    assert spec["argv"][:3] == [sys.executable, "-m", "ipykernel_launcher"] and PRELOAD in spec["argv"]
    assert spec["display_name"] == "nnsight test"
    repository = Path(__file__).resolve().parents[1] / "kernel"
    for logo in LOGOS:
        assert (installed / logo).read_bytes() == (repository / logo).read_bytes()
