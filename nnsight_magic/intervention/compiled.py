"""Models made by ``torch.compile``: trace the module it wraps, and refuse to hook inside compiled code.

In [1]: fast = torch.compile(model)
In [2]: net = NNsight(fast)          # UserWarning: traces run the original module, `fast._orig_mod`, eagerly
In [3]: with net.trace(x):
   ...:     h = net.layer1.output.save()          # the hooks fire: the original module runs them

Hooks cannot run inside compiled code: a compiled function calls its submodules without their hooks (with
``backend="eager"``) or crashes the process while compiling them (the default backend). So ``NNsight`` wraps the
original module of a ``torch.compile``-d model, and a trace that would hook a module inside a compiled part
(a child replaced by ``torch.compile(child)``, or a module compiled in place by ``module.compile()``) is refused
before the model runs, with the way out in the message.
"""

from __future__ import annotations

import torch

from ..errors import warn_at_user_line


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs compiled code: a ``torch.compile`` wrapper, or ``module.compile()`` done."""
    return _is_wrapper(module) or getattr(module, "_compiled_call_impl", None) is not None


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module to trace for ``module``: the original of a ``torch.compile`` wrapper (with a warning)."""
    if not _is_wrapper(module):
        return module
    original = module._orig_mod
    warn_at_user_line(f"this model was compiled with torch.compile; traces run its original module "
                      f"({type(original).__name__}) eagerly, because hooks cannot run inside compiled code. "
                      "Use the compiled model outside traces for speed.")
    return original


def compiled_part(root: torch.nn.Module, path: str) -> str | None:
    """The dotted path of a compiled module that contains the module at ``path`` (itself included), if any.

    A ``torch.compile`` wrapper's own hooks still fire (it is an ordinary module around compiled code), so a
    wrapper counts only when the module at ``path`` lies inside it.
    """
    module, walked = root, []
    if getattr(root, "_compiled_call_impl", None) is not None:
        return ""
    for name in path.split(".") if path else ():
        if _is_wrapper(module):
            return ".".join(walked)
        module = module._modules[name]
        walked.append(name)
        if getattr(module, "_compiled_call_impl", None) is not None:
            return ".".join(walked)
    return None


def compiled_error(path: str, part: str) -> RuntimeError:
    """The error for a hook on ``path`` inside the compiled module at ``part``."""
    where = f"`{part}`" if part else "the model"
    inside = "" if part == path else f", which contains `{path}`"
    return RuntimeError(
        f"{where} is compiled (torch.compile){inside}: hooks cannot run inside compiled code, so this trace could "
        "neither see nor change it. Trace the module before compiling it (keep the uncompiled module, or use "
        "`compiled._orig_mod`), and compile it again for runs outside traces")


def _is_wrapper(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "OptimizedModule" and "_orig_mod" in module._modules
