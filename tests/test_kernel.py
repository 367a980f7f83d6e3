"""The kernel that preloads the extension: installing its kernelspec, starting it, running notebooks in it.

Every kernelspec goes into a temporary directory (``--prefix`` or ``$JUPYTER_DATA_DIR``), never into the user's
real Jupyter directories; jupyter_client and nbclient find it through ``$JUPYTER_PATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

from nnsight_magic.kernel import PRELOAD

NOTEBOOKS = Path(__file__).parent / "notebooks"
KERNEL = "nnsight"


def install(*arguments: str, env: dict | None = None) -> str:
    completed = subprocess.run([sys.executable, "-m", "nnsight_magic.kernel", "install", *arguments],
                               capture_output=True, text=True, env=env, check=True, timeout=120)
    return completed.stdout


@pytest.fixture
def kernel_home(tmp_path, monkeypatch) -> Path:
    """A prefix with the kernelspec installed, which jupyter_client and nbclient search (and nothing else)."""
    install("--prefix", str(tmp_path), "--name", KERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "share" / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return tmp_path


def test_install_writes_a_kernelspec_that_preloads_the_extension(kernel_home):
    spec = json.loads((kernel_home / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json").read_text())
    assert spec["argv"][0] == sys.executable and spec["argv"][1:3] == ["-m", "ipykernel_launcher"]
    assert spec["argv"][-1] == PRELOAD == "--IPKernelApp.extensions=['nnsight_magic']"
    assert spec["display_name"] == "Python 3 (nnsight_magic)" and spec["language"] == "python"
    listed = subprocess.run([sys.executable, "-m", "jupyter", "kernelspec", "list"], capture_output=True, text=True,
                            check=True, timeout=120).stdout
    assert any(line.split()[:2] == [KERNEL, str(kernel_home / "share" / "jupyter" / "kernels" / KERNEL)]
               for line in listed.splitlines())


def test_install_for_the_user_honours_jupyter_data_dir(tmp_path):
    env = {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "data")}
    printed = install("--user", "--name", "nnsight-user", "--display-name", "Tracing", env=env)
    kernel_json = tmp_path / "data" / "kernels" / "nnsight-user" / "kernel.json"
    assert printed.strip() == f"Installed kernelspec nnsight-user in {kernel_json.parent}"
    assert json.loads(kernel_json.read_text())["display_name"] == "Tracing"


def test_the_kernel_runs_a_trace_cell_without_load_ext(kernel_home):
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=KernelSpecManager())
    manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        client.wait_for_ready(timeout=120)
        setup = ("import torch\nfrom collections import OrderedDict\nfrom nnsight_magic import NNsight\n"
                 "torch.manual_seed(0)\nmodule = torch.nn.Sequential(OrderedDict(layer1=torch.nn.Linear(5, 10), "
                 "layer2=torch.nn.Linear(10, 2)))\nnet = NNsight(module)\nx = torch.rand(3, 5)\n")
        assert run_in_kernel(client, setup) == ("ok", "")
        status, printed = run_in_kernel(client, "%%trace net x --no-widget\nh = net.layer1.output\n"
                                                "print('traced', h.sum() == h.sum())\n")
        assert (status, printed) == ("ok", "traced tensor(True)\n")
        status, printed = run_in_kernel(client, "print(type(h).__name__, torch.equal(h, module.layer1(x)))")
        assert (status, printed) == ("ok", "Tensor True\n")
        status, printed = run_in_kernel(client, "%%trace net x --no-widget\nbad = net.layer1.output[:, 99]\n")
        assert status == "error" and "IndexError: line 2 `bad = net.layer1.output[:, 99]`" in printed
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def run_in_kernel(client, code: str) -> tuple[str, str]:
    """Run ``code``; return the reply status and what it printed (stdout, then the error's name and value)."""
    printed: list[str] = []

    def collect(message):
        content = message["content"]
        if message["msg_type"] == "stream" and content["name"] == "stdout":
            printed.append(content["text"])
        elif message["msg_type"] == "error":
            printed.append(f"{content['ename']}: {content['evalue']}")

    reply = client.execute_interactive(code, output_hook=collect, timeout=120)
    return reply["content"]["status"], "".join(printed)


def test_end_to_end_notebook_runs_in_the_kernel(kernel_home):
    notebook = nbformat.read(NOTEBOOKS / "end_to_end.ipynb", as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name=KERNEL, resources={"metadata": {"path": str(kernel_home)}}
                   ).execute()
    outputs = [cell.get("outputs", []) for cell in notebook.cells]
    text = ["".join(output.get("text", "") for output in cell_outputs) for cell_outputs in outputs]
    # the live inspector, replaced by its static table once the run ends (what a saved notebook keeps)
    inspectors = [output for output in outputs[2] if "nnsight-inspector-static" in output.get("data", {}).get(
        "text/html", "")]
    assert inspectors, "the %%trace cell shows the inspector by default"
    assert "done" in inspectors[0]["data"]["text/plain"]
    assert text[3].startswith("total ")
    errors = [output for output in outputs[4] if output["output_type"] == "error"]
    assert errors and errors[0]["ename"] == "IndexError" and errors[0]["evalue"].startswith("line 2 `broken = ")
    assert "nnsight session (3 cells) — open" in text[9]
    assert text[10] == "session ran: 3 cell(s)\n"
    assert text[-1].endswith("end to end: all checks passed\n")
