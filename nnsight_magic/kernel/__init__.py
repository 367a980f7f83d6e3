"""A Jupyter kernel that preloads the extension: ``%%trace`` works without ``%load_ext``.

In [1]: !python -m nnsight_magic.kernel install --user          # or --sys-prefix, --prefix DIR; --name NAME
In [2]: !jupyter kernelspec list                                 # ... nnsight  ~/.local/share/jupyter/kernels/nnsight

The kernel is the ordinary IPython kernel (ipykernel) started with ``--IPKernelApp.extensions=['nnsight_magic']``
(the template ``kernel/kernel.json`` at the top of the repository, with the logos next to it, bundled into the
wheel);
nothing about the kernel protocol changes, so any notebook front end runs it. Its command line names this
environment's Python, so the kernel sees the packages installed here. In any other Python kernel, a first cell
``%load_ext nnsight_magic`` does the same.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from jupyter_client.kernelspec import KernelSpecManager

from ..widgets.assets import asset, asset_path

DEFAULT_NAME = "nnsight"
PRELOAD = "--IPKernelApp.extensions=['nnsight_magic']"


def install(name: str = DEFAULT_NAME, user: bool = False, prefix: str | None = None,
            display_name: str | None = None) -> str:
    """Install the kernelspec ``name`` and return the directory it was written to.

    Args:
        name: the kernel's name (``jupyter kernelspec list``, notebook metadata).
        user: install for the current user (``~/.local/share/jupyter``, or ``$JUPYTER_DATA_DIR``).
        prefix: install under ``PREFIX/share/jupyter/kernels`` (``sys.prefix`` for this environment).
        display_name: what front ends show; default ``Python 3 (nnsight_magic)``.
    """
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / name
        source.mkdir()
        (source / "kernel.json").write_text(json.dumps(kernel_json(display_name), indent=1))
        for logo in LOGOS:
            shutil.copy(asset_path("kernel", logo), source / logo)
        return KernelSpecManager().install_kernel_spec(str(source), name, user=user, prefix=prefix)


LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


def kernel_json(display_name: str | None = None) -> dict:
    """The kernelspec of this environment: the template with this Python and the display name filled in.

    In [1]: kernel_json()["argv"][:3]
    Out[1]: ['/path/to/.venv/bin/python', '-m', 'ipykernel_launcher']
    """
    spec = json.loads(asset("kernel", "kernel.json"))
    spec["argv"] = [sys.executable if part == "{python}" else part for part in spec["argv"]]
    spec["display_name"] = display_name or "Python 3 (nnsight_magic)"
    return spec


__all__ = ["DEFAULT_NAME", "LOGOS", "PRELOAD", "install", "kernel_json"]
