"""Test plumbing for the live-widget tests: a gated model, a throwaway JupyterLab server, headless Chromium.

* :func:`gated_model_source` is notebook code for a tiny model that waits at gates (files the test creates), so a
  test decides when the model may go on and can look at the screen in between, without any timing guesses.
* :class:`JupyterLab` runs ``jupyter lab`` on a free loopback port with its own config, data and runtime folders
  (nothing of the user's is read or written) and always stops it.
* :func:`launch_chromium` starts Debian's ``/usr/bin/chromium`` through Playwright (no browser download),
  headless, and resolving no host but 127.0.0.1.

The recipes (unique workspace plus ``&reset``, waiting for the kernel through ``window.jupyterapp``, running the
cells without awaiting the command) come from the project's Jupyter research notes, where they made these tests
pass 5 runs out of 5.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

#: true once the notebook's kernel is connected and idle (JupyterLab exposes its app with expose_app_in_browser)
KERNEL_READY_JS = """() => {
  const widget = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const context = widget && widget.sessionContext;
  const kernel = context && context.session && context.session.kernel;
  return !!(context && context.isReady && kernel && kernel.connectionStatus === 'connected'
            && kernel.status === 'idle');
}"""

#: start every cell; the command's promise is not returned, so the page can be watched while the cells run
RUN_ALL_JS = "() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }"


def gated_model_source(gates: str) -> str:
    """Notebook code: ``model`` (gate1, layer1 = Linear(5, 10), gate2, layer2 = Linear(10, 2)) and ``x`` (3×5).

    ``gateN`` passes its input on once the file ``<gates>/N`` exists; shape scans (fake tensors) pass at once.
    """
    return f'''import os, time
from collections import OrderedDict
import torch
from torch._subclasses.fake_tensor import FakeTensor

class Gate(torch.nn.Module):
    """Passes its input on once the file `path` exists (the test opens the gate)."""
    def __init__(self, path):
        super().__init__()
        self.path = path
    def forward(self, x):
        while not isinstance(x, FakeTensor) and not os.path.exists(self.path):
            time.sleep(0.02)
        return x

torch.manual_seed(0)
model = torch.nn.Sequential(OrderedDict(gate1=Gate({gates!r} + "/1"), layer1=torch.nn.Linear(5, 10),
                                        gate2=Gate({gates!r} + "/2"), layer2=torch.nn.Linear(10, 2)))
x = torch.rand(3, 5)
'''


def write_notebook(path: Path, cells: list[str]) -> None:
    """A notebook of code cells with the default Python 3 kernel."""
    notebook = {
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"cell-{number}", "metadata": {},
                   "outputs": [], "source": source} for number, source in enumerate(cells)],
        "metadata": {"kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
                     "language_info": {"name": "python"}},
        "nbformat": 4, "nbformat_minor": 5,
    }
    path.write_text(json.dumps(notebook, indent=1))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class JupyterLab:
    """A JupyterLab server for one test (a context manager); see the module docstring.

    Args:
        root: the folder the server serves (notebooks live here) and where its private folders go.
    """

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = root / "jupyterlab.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "JupyterLab":
        env = dict(os.environ, OMP_NUM_THREADS="1")
        for name in ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR"):
            folder = self.root / f".{name.lower()}"
            folder.mkdir(exist_ok=True)
            env[name] = str(folder)
        page_config = self.root / ".jupyter_config_dir" / "labconfig" / "page_config.json"
        page_config.parent.mkdir(parents=True, exist_ok=True)
        no_news_toast = {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}
        page_config.write_text(json.dumps(no_news_toast))
        command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
                   "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
                   f"--ServerApp.root_dir={self.root}", "--allow-root", "--LabApp.expose_app_in_browser=True",
                   "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(command, cwd=self.root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            self._wait_until_up(timeout=90)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: Any) -> None:
        process = self.process
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
        self.process = None

    def _wait_until_up(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/api/status?token={self.token}"
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyter lab exited: {self.log()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"jupyter lab did not answer in {timeout} s: {self.log()}")

    def notebook_url(self, name: str) -> str:
        """The notebook in a fresh workspace of its own (``&reset``: nothing restored from earlier sessions)."""
        return (f"http://127.0.0.1:{self.port}/lab/workspaces/test-{uuid.uuid4().hex}/tree/{name}"
                f"?token={self.token}&reset")

    def log(self) -> str:
        """The server's output so far (for failure messages)."""
        return self.log_path.read_text()[-4000:] if self.log_path.exists() else ""


def launch_chromium(playwright: Any) -> Any:
    """Headless Debian Chromium through Playwright's own driver."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)


def set_theme_js(theme: str) -> str:
    """JavaScript that switches JupyterLab to ``theme`` (``JupyterLab Light``, ``JupyterLab Dark``) and resolves
    once the page uses it."""
    return f"""async () => {{
  await window.jupyterapp.commands.execute('apputils:change-theme', {{theme: {json.dumps(theme)}}});
  for (let i = 0; i < 100 && document.body.dataset.jpThemeName !== {json.dumps(theme)}; i++)
    await new Promise(done => setTimeout(done, 100));
  await new Promise(done => setTimeout(done, 300));
  return document.body.dataset.jpThemeName;
}}"""


#: the lowest WCAG contrast ratio between the text of the elements ``selector`` finds and what is behind it
CONTRAST_JS = """(selector) => {
  const rgb = (text) => (text.match(/[\\d.]+/g) || []).map(Number);
  const luminance = ([r, g, b]) => {
    const channel = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b);
  };
  const behind = (node) => {
    for (; node; node = node.parentElement) {
      const colour = rgb(getComputedStyle(node).backgroundColor);
      if (colour.length === 3 || (colour.length === 4 && colour[3] > 0.5)) return colour.slice(0, 3);
    }
    return [255, 255, 255];
  };
  let lowest = Infinity, worst = '';
  for (const node of document.querySelectorAll(selector)) {
    if (!node.textContent.trim() || !node.offsetParent) continue;
    const a = luminance(rgb(getComputedStyle(node).color).slice(0, 3)), b = luminance(behind(node));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < lowest) { lowest = ratio; worst = node.textContent.trim().slice(0, 40); }
  }
  return [lowest, worst];
}"""
