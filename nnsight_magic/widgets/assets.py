"""The widgets' front-end files (anywidget ES modules, CSS) and the kernelspec's files, wherever they are installed.

The sources live at the top of the repository, in ``widgets/`` and ``kernel/``. A wheel carries copies inside the
package (``nnsight_magic/_bundled/widgets``, ``.../kernel``; ``setup.py`` copies them when the wheel is built); an
editable install or a source checkout reads them from the repository itself.

In [1]: asset("widgets", "inspector.js")[:40]
Out[1]: '// The live inspector\\'s front end (anywi'
"""

from __future__ import annotations

import functools
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent.parent


def asset_path(folder: str, name: str) -> Path:
    """The file ``folder/name`` (``folder``: ``widgets`` or ``kernel``): the bundled copy, else the repository's."""
    for root in (_PACKAGE / "_bundled", _PACKAGE.parent):
        path = root / folder / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"nnsight_magic's {folder}/{name} is missing: reinstall the package "
                            "(`pip install -e .` in a checkout, or the wheel)")


@functools.cache
def asset(folder: str, name: str) -> str:
    """The text of ``folder/name`` (read once)."""
    return asset_path(folder, name).read_text(encoding="utf-8")


@functools.cache
def viewer_module(name: str) -> str:
    """The ES module of viewer ``name`` (``logit_lens``) with ``widgets/common.js`` inlined: one self-contained
    module, as anywidget loads it (a module from a string cannot import its neighbours)."""
    common = asset("widgets", "common.js").replace("export function ", "function ")
    own = "\n".join(line for line in asset("widgets", f"{name}.js").splitlines()
                    if not line.startswith("import "))
    return f"{common}\n{own}"
