"""The README's demo command, end to end: ``python -m nnsight_magic.demo`` (what ``make demo`` runs).

Both tests run the real command in a subprocess. The kernelspec goes into a temporary prefix (``--prefix``) and
Jupyter's data, config and runtime folders are temporary too, so nothing of the user's is read or written.
``--headless`` runs ``examples/01_first_trace.ipynb`` and writes an HTML page; without it the command serves
JupyterLab, prints the notebook's address, and stops the server on Ctrl+C.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from nnsight_magic import demo
from test_examples import needs_embedded_model


@pytest.fixture
def demo_environment(tmp_path) -> dict:
    """Environment variables that keep the demo's Jupyter files under ``tmp_path``."""
    return {**os.environ, "JUPYTER_DATA_DIR": str(tmp_path / "data"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
            "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


@needs_embedded_model
def test_headless_demo_runs_the_first_notebook_and_writes_html_with_the_inspectors(tmp_path, demo_environment):
    page = tmp_path / "demo.html"
    completed = subprocess.run([sys.executable, "-m", "nnsight_magic.demo", "--headless", "--prefix",
                                str(tmp_path / "prefix"), "--output", str(page)],
                               capture_output=True, text=True, env=demo_environment, timeout=900)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert f"Wrote {page}" in completed.stdout.splitlines()
    assert (tmp_path / "prefix" / "share" / "jupyter" / "kernels" / "nnsight" / "kernel.json").is_file()
    text = page.read_text(encoding="utf-8")
    assert "All checks passed." in text, "the notebook ran to its last cell, whose checks passed"
    assert re.search(r"P\(' Paris'\) is 0\.\d{3} normally", text), "the executed cells' printed output is there"
    # every inspector is its static HTML: the page needs no kernel, no widget state and no CDN to show the tables
    assert text.count('class="nnsight-inspector nnsight-inspector-static"') >= 3, "one inspector per %%trace cell"
    assert "lm_head.output" in text and "Error displaying widget" not in text


def test_demo_serves_jupyterlab_on_the_first_notebook_with_the_kernel_and_stops_on_ctrl_c(tmp_path,
                                                                                         demo_environment):
    command = [sys.executable, "-m", "nnsight_magic.demo", "--no-browser", "--port", str(demo.free_port()),
               "--prefix", str(tmp_path / "prefix"), "--output", str(tmp_path / "demo.html")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=demo_environment)
    try:
        url = printed_address(process)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/lab/tree/01_first_trace\.ipynb\?token=\w+", url)
        base, token = url.split("/lab/")[0], url.split("token=")[1]
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.status == 200 and "JupyterLab" in response.read().decode()
        notebook = get_json(f"{base}/api/contents/01_first_trace.ipynb?token={token}")
        kernel_name = notebook["content"]["metadata"]["kernelspec"]["name"]
        kernelspecs = get_json(f"{base}/api/kernelspecs?token={token}")["kernelspecs"]
        assert kernel_name == "nnsight" and kernel_name in kernelspecs, "the notebook opens with the demo's kernel"
        argv = kernelspecs["nnsight"]["spec"]["argv"]
        assert argv[0] == sys.executable and argv[-1] == "--IPKernelApp.extensions=['nnsight_magic']"
        assert (tmp_path / "prefix" / "share" / "jupyter" / "kernels" / "nnsight" / "kernel.json").is_file()
        process.send_signal(signal.SIGINT)  # Ctrl+C in the terminal
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert "Stopping JupyterLab" in output
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{base}/api/status", timeout=5)
    finally:
        stop_everything(process, tmp_path / "runtime")


def printed_address(process: subprocess.Popen) -> str:
    """The first indented ``http://`` line the demo prints (it blocks until JupyterLab answers)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("    http://"):
            return line.strip()
    raise AssertionError(f"the demo printed no address:\n{''.join(lines)}")


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def stop_everything(process: subprocess.Popen, runtime: Path) -> None:
    """Stop the demo, and the JupyterLab server it started if the demo could not (its pid is in the runtime dir)."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for server_file in runtime.glob("jpserver-*.json"):
        pid = json.loads(server_file.read_text())["pid"]
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def test_without_the_repositorys_examples_the_demo_says_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "EXAMPLES", tmp_path / "site-packages" / "examples")  # an installed copy has none
    with pytest.raises(SystemExit, match=r"examples/01_first_trace\.ipynb.*Clone the repository and run `make demo`"):
        demo.main(["--headless", "--prefix", str(tmp_path / "prefix")])
    assert not (tmp_path / "prefix").exists(), "nothing is installed before the notebook is found"
