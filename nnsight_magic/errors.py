"""Errors that name the user's line.

Every error raised while building or running a graph keeps its original type (an ``IndexError`` stays an
``IndexError``, so ``except IndexError`` works) and gets the location and text of the user's line that created
the failing node in front of its message:

In [3]: %%trace net x
   ...: h = net.layer1.output[:, 999]
IndexError: line 2 `h = net.layer1.output[:, 999]`: index 999 is out of bounds for dimension 1 with size 10

The one new type is :class:`OutOfOrderError`: an intervention needs a value the model produces only later.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from typing import Any

import torch

_LOCATED = "_nnsight_magic_location"


class OutOfOrderError(RuntimeError):
    """An intervention needs a value that the model produces only after the value it changes.

    In [1]: with net.trace(x):
       ...:     net.layer1.output[:] = net.layer2.output     # layer2 runs after layer1
    OutOfOrderError: line 2 `net.layer1.output[:] = net.layer2.output` changes layer1.output, but needs
    layer2.output (line 2), which the model computes later. Move the change to a module that runs after ...

    Raised before the model runs when shapes are checked (the default), otherwise as soon as the hook of the
    changed module returns without the change applied. The model is left without hooks and unchanged.
    """


def annotate(error: BaseException, node: Any) -> BaseException:
    """Put ``node``'s location and source text in front of ``error``'s message; return the same object.

    The exception keeps its type and identity. Errors whose message is not simply their one string argument
    (``KeyError``, ``OSError(errno, text)``) get a note (PEP 678) instead, so their arguments stay intact.
    """
    if getattr(error, _LOCATED, False):
        return error
    where = node.location if getattr(node, "lineno", 0) else ""
    if not where:
        return error
    source = node.source_line
    prefix = f"{where} `{source}`" if source else where
    if len(error.args) == 1 and isinstance(error.args[0], str) and str(error) == error.args[0]:
        error.args = (f"{prefix}: {error.args[0]}",)  # the message is its one argument: prefix it
    else:
        error.add_note(f"raised by {prefix}")
    try:
        setattr(error, _LOCATED, True)
    except AttributeError:  # exceptions with __slots__ cannot carry the marker; annotating twice is harmless
        pass
    return error


def is_annotated(error: BaseException) -> bool:
    """True when ``error`` already names the user's line."""
    return bool(getattr(error, _LOCATED, False))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_SKIPPED_DIRS = (_PACKAGE_DIR, os.path.dirname(torch.__file__) + os.sep, os.path.dirname(contextlib.__file__) + os.sep
                 + "contextlib.py")


def user_location() -> tuple[str, int]:
    """``(filename, line)`` of the innermost frame that belongs to the user's code.

    Frames of this package, of torch (``torch.cat`` reaching ``Proxy.__torch_function__``) and of contextlib are
    passed over. Only ``f_code.co_filename`` and ``f_lineno`` are read: no frame is changed. A notebook cell's
    code is compiled with the cell's own filename, so this is the cell line the user sees.
    """
    frame = sys._getframe(1)
    internal = _INTERNAL_FILES
    while frame is not None:
        filename = frame.f_code.co_filename
        skip = internal.get(filename)
        if skip is None:
            skip = internal[filename] = filename.startswith(_SKIPPED_DIRS)
        if not skip:
            return filename, frame.f_lineno
        frame = frame.f_back
    return "", 0


_INTERNAL_FILES: dict[str, bool] = {}  # filename -> is it ours (or torch's, or contextlib's)?


def warn_at_user_line(message: str, category: type[Warning] = UserWarning,
                      location: tuple[str, int] | None = None) -> None:
    """Warn with the user's line as the warning's place (not a file of this package).

    In [1]: warn_at_user_line("tracer.iter[1:10] names steps 3 to 9, ...")
    <ipython-input-3>:2: UserWarning: tracer.iter[1:10] names steps 3 to 9, ...

    ``location`` is a ``(filename, line)`` already known (a node's); by default the innermost user frame.
    """
    filename, lineno = location or user_location()
    if not filename:
        warnings.warn(message, category, stacklevel=2)
        return
    warnings.warn_explicit(message, category, filename, lineno)
