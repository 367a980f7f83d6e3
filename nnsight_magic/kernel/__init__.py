"""A Jupyter kernel that preloads the extension: ``%%trace`` works without ``%load_ext``.

In [1]: !python -m nnsight_magic.kernel install --user          # or --sys-prefix, --prefix DIR; --name NAME
In [2]: !jupyter kernelspec list                                 # ... nnsight  ~/.local/share/jupyter/kernels/nnsight

The kernel is the ordinary IPython kernel (ipykernel) started with ``--IPKernelApp.extensions=['nnsight_magic']``;
nothing about the kernel protocol changes, so any notebook front end runs it. Its command line names this
environment's Python, so the kernel sees the packages installed here. In any other Python kernel, a first cell
``%load_ext nnsight_magic`` does the same.
"""

from __future__ import annotations

import tempfile

from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager

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
    overrides = {"display_name": display_name or "Python 3 (nnsight_magic)"}
    with tempfile.TemporaryDirectory() as scratch:
        source = write_kernel_spec(f"{scratch}/{name}", overrides=overrides, extra_arguments=[PRELOAD])
        return KernelSpecManager().install_kernel_spec(source, name, user=user, prefix=prefix)


__all__ = ["DEFAULT_NAME", "PRELOAD", "install"]
