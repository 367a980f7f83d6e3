"""The notebook magics: ``%%trace``, ``%%session`` and ``%session`` (``%load_ext nnsight_magic``).

In [1]: %load_ext nnsight_magic
In [2]: %%trace net x
   ...: h = net.layer1.output                # a tensor in the notebook after the cell ran
In [3]: %%trace?                             # help with examples

Files: :mod:`.magics` (the Magics class and its options), :mod:`.cell_code` (compiling a cell with its own
line numbers), :mod:`.rewrite` (the AST transformers), :mod:`.runtime` (what rewritten code calls),
:mod:`.bindings` (autosave and restoring names), :mod:`.notebook_session` (the session that spans cells).
"""

from __future__ import annotations

from typing import Any

from .magics import TraceMagics
from .notebook_session import NotebookSession
from .rewrite import RUNTIME


def load_ipython_extension(shell: Any) -> None:
    """Register one :class:`TraceMagics` with ``shell`` (a second load does nothing)."""
    if "TraceMagics" in shell.magics_manager.registry:
        return
    magics = TraceMagics(shell)
    shell.register_magics(magics)
    if magics not in shell.configurables:  # IPython 9 adds every Magics instance itself; older versions do not
        shell.configurables.append(magics)


def unload_ipython_extension(shell: Any) -> None:
    """Remove the magics, their ``%config`` entry and the runtime helpers; drop an open session."""
    magics = shell.magics_manager.registry.pop("TraceMagics", None)
    if magics is None:
        return
    magics.close()
    for kind, names in magics.magics.items():
        for name in names:
            shell.magics_manager.magics[kind].pop(name, None)
    if magics in shell.configurables:
        shell.configurables.remove(magics)
    shell.user_ns.pop(RUNTIME, None)


__all__ = ["NotebookSession", "TraceMagics", "load_ipython_extension", "unload_ipython_extension"]
