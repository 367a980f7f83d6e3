"""``tracer.cache()``: every module's output in one pass (TransformerLens' ``run_with_cache``, nnsight 0.8's cache).

In [1]: with lm.trace("The Eiffel Tower is in") as tracer:
   ...:     cache = tracer.cache()                               # saved; every module that runs
In [2]: cache.value["transformer.h.0.attn"][0].shape            # keyed by module path
Out[2]: torch.Size([1, 6, 64])
In [3]: with lm.generate("Hello", max_new_tokens=3) as tracer:
   ...:     cache = tracer.cache(modules=["transformer.h.0"], include_inputs=True)
In [4]: len(cache.value["transformer.h.0"]), cache.value.inputs["transformer.h.0"][0]   # one value per step

The values are the very tensors the model produced (zero-copy, like ``.save()``), unless ``device=`` or
``dtype=`` asks for a converted copy. Every module that runs is cached (its first call in each forward pass);
``modules=`` names the ones wanted, by path or Envoy. In generation each entry is a list with one value per step.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from .source_install import split_path


class ModuleCache(dict):
    """``path -> output`` of every cached module; ``.inputs`` is ``path -> (args, kwargs)`` when asked for."""

    def __init__(self, outputs: dict, inputs: dict | None = None):
        super().__init__(outputs)
        self.inputs: dict = dict(inputs or {})

    def __repr__(self) -> str:
        return f"ModuleCache({len(self)} modules{', with inputs' if self.inputs else ''})"


def convert(value: Any, device: Any = None, dtype: Any = None) -> Any:
    """``value`` with every tensor moved to ``device`` / floating tensors cast to ``dtype`` (nothing: no copy)."""
    if device is None and dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        cast = dtype if dtype is not None and value.is_floating_point() else None
        return value.to(device=device, dtype=cast)
    if isinstance(value, (tuple, list)):
        items = [convert(item, device, dtype) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    if isinstance(value, dict):
        return {key: convert(item, device, dtype) for key, item in value.items()}
    return value


def gather(outputs: dict, inputs: dict, device: Any = None, dtype: Any = None) -> ModuleCache:
    """One forward pass's cache from the values read at its hooks."""
    return ModuleCache({path: convert(value, device, dtype) for path, value in outputs.items()},
                       {path: convert(value, device, dtype) for path, value in inputs.items()})


def by_step(steps: list) -> ModuleCache:
    """Generation: the per-step caches as one cache of lists (one value per step)."""
    outputs = {path: [step[path] for step in steps] for path in (steps[0] if steps else {})}
    inputs = {path: [step.inputs[path] for step in steps] for path in (steps[0].inputs if steps else {})}
    return ModuleCache(outputs, inputs)


def module_paths(tracer: Any, modules: Iterable[Any] | None) -> list[str]:
    """The paths to cache: the named ones (paths or Envoys), or every module the model calls."""
    if modules is not None:
        paths = [getattr(module, "_path", module) for module in modules]
        known = dict(tracer.model._module.named_modules())
        unknown = [path for path in paths if not isinstance(path, str) or path not in known]
        if unknown:
            raise KeyError(f"tracer.cache(modules=...): {unknown[0]!r} is not a module path of this model (e.g. "
                           f"{', '.join(repr(name) for name in list(known)[1:4])})")
        return paths
    scan = tracer._scan(None) if tracer.validate else None
    if scan is None:
        raise ValueError("tracer.cache() needs to know which modules run: name them with modules=[...] (paths or "
                         "modules), or keep shapes on (validate=True) and give the trace its input first")
    return [path for path, _ in tracer.model._module.named_modules()  # operations of `.source` are not modules
            if path and scan.calls(path) and split_path(path) is None]


def cache(tracer: Any, modules: Iterable[Any] | None = None, include_inputs: bool = False, device: Any = None,
          dtype: Any = None) -> Any:
    """Build the nodes of ``tracer.cache(...)`` and return its saved proxy (see the module docstring)."""
    paths = module_paths(tracer, modules)

    def reads() -> Any:
        outputs = {path: tracer.module_value(path, "output") for path in paths}
        inputs = {path: tracer.module_value(path, "inputs") for path in paths} if include_inputs else {}
        return tracer.apply(gather, outputs, inputs, device, dtype)

    if not tracer.run_options.get("generate"):
        return reads().save()
    steps = tracer.list()
    with tracer.all():
        steps.append(reads())
    return tracer.apply(by_step, steps).save()
