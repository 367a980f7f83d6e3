"""``NNsight``: look inside and change any ``torch.nn.Module``.

In [1]: from nnsight_magic import NNsight
In [2]: net = NNsight(torch.nn.Sequential(OrderedDict(layer1=nn.Linear(5, 10), layer2=nn.Linear(10, 2))))
In [3]: with net.trace(torch.rand(1, 5)) as tracer:
   ...:     h = net.layer1.output.save()
   ...:     net.layer2.output[:, 0] = 0
   ...:     out = net.output.save()
In [4]: h.value.shape, out.value[:, 0]
Out[4]: (torch.Size([1, 10]), tensor([0.]))

``net`` is the root :class:`~nnsight_magic.intervention.envoy.Envoy`: attribute access mirrors the module's
children, and calling it outside a trace calls the module. Subclasses (``LanguageModel``) change how inputs are
prepared, joined into one batch and run by overriding ``_prepare_input``, ``_join_inputs`` and ``_run``.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map_only

from ..errors import warn_at_user_line
from ..intervention.batching import batch_size_of, concatenate_batches
from ..intervention.compiled import uncompiled
from ..intervention.edit import EditTracer
from ..intervention.envoy import Envoy
from ..intervention.session import Session
from ..intervention.source_install import installed_sources
from ..intervention.tracer import Tracer
from ..tracing.shapes import ModuleScan, ScanFailed, shared_fake_mode
from ..tracing.symbolic import ConcreteScan, Roles, SymbolicScan
from .aliases import standard_aliases

SCAN_CACHE_SIZE = 8


@dataclass
class PreparedInput:
    """One invoke's input, ready to batch: positional and keyword arguments, and how many rows it has."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    batch_size: int = 1


class NNsight(Envoy):
    """Wrap ``module`` for tracing; see the module docstring.

    Args:
        module: any ``torch.nn.Module``. It is used as it is (not copied): traces hook it only while they run.
        rename: extra names for modules, ``{"transformer.h": "layers", "self_attn": "attn"}`` (see
            :mod:`~nnsight_magic.models.aliases`; Hugging Face families get a standard set: ``layers``, ``attn``,
            ``mlp``, ``embed``, ``ln_final``, ``unembed``).
        envoys: ``{module class: Envoy subclass}``: modules of that class (or a subclass) get that Envoy, for your
            own properties (nnsight's ``envoys=``), e.g. ``{torch.nn.Linear: LinearEnvoy}``.
    """

    _batching_changes_shapes = False  # concatenating tensors keeps each input's shape

    def __init__(self, module: torch.nn.Module, *, rename: dict[str, str] | None = None,
                 envoys: dict[type, type] | None = None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, not {type(module).__name__}")
        object.__setattr__(self, "_open_tracers", threading.local())
        module = uncompiled(module)
        super().__init__(module)
        object.__setattr__(self, "_aliases", {**standard_aliases(module), **(rename or {})})
        for module_class, envoy_class in (envoys or {}).items():
            if not (isinstance(envoy_class, type) and issubclass(envoy_class, Envoy)):
                raise TypeError(f"envoys={{{module_class.__name__}: {envoy_class!r}}}: the value must be an Envoy "
                                "subclass")
        object.__setattr__(self, "_envoy_classes", dict(envoys or {}))
        object.__setattr__(self, "_edits", [])
        object.__setattr__(self, "_scan_cache", collections.OrderedDict())
        object.__setattr__(self, "_scan_failures", set())
        # pattern of sizes -> the first input signature seen, then its SymbolicScan (None: none possible)
        object.__setattr__(self, "_symbolic_scans", {})
        object.__setattr__(self, "_symbolic_fallback", False)  # the model guards on sizes: concrete scans only

    # ----------------------------------------------------------------------------------------- contexts
    def trace(self, *inputs: Any, validate: bool = True, grad: bool | None = None, **kwargs: Any) -> Tracer:
        """Trace one model run on ``inputs`` (plus keyword arguments for the model's forward).

        Args:
            validate: compute shapes while building and check the order of edits before running (``False``
                skips the fake-tensor pass, for speed in tight loops).
            grad: keep autograd on during the run (default: only when the trace calls ``.backward()``).
        """
        return Tracer(self, inputs, kwargs, validate=validate, grad=grad)

    def scan(self, *inputs: Any, **kwargs: Any) -> Tracer:
        """Build and shape-check a trace without running the model: ``proxy.shape`` works, ``.value`` does not.

        The shapes come from a fake run of the model's twin (:mod:`~nnsight_magic.tracing.twin`), so a scan never
        changes the model: its buffers and the attributes its ``forward`` sets stay as they were.
        """
        return Tracer(self, inputs, kwargs, scan_only=True)

    def session(self) -> Session:
        """Several traces that run as one unit at the end of the block; later ones may use earlier values."""
        return Session()

    def edit(self, *, inplace: bool = False) -> EditTracer:
        """Interventions that apply to every later trace: of a copy of this model (default) or of this model."""
        return EditTracer(self if inplace else self._edited_copy())

    def all(self) -> Any:
        """``tracer.all()`` of the open trace or edit: a block that runs at every generation step.

        In an edit, where the block yields the model rather than a tracer, this is how a persistent change
        reaches every step: ``with lm.edit() as edited: with edited.all(): edited.model.layers[3].output[:] += v``.
        """
        return self._tracer("use .all()").all()

    @property
    def iter(self) -> Any:
        """``tracer.iter`` of the open trace or edit: ``with model.iter[1:3]:`` runs at those generation steps."""
        return self._tracer("use .iter[...]").iter

    def clear_edits(self) -> None:
        """Remove every persistent edit of this model."""
        self._edits.clear()

    @property
    def _active_tracer(self) -> Tracer | None:
        """The trace open in this thread (each thread builds its own; see :meth:`_enter_tracer`)."""
        return getattr(self._open_tracers, "tracer", None)

    @_active_tracer.setter
    def _active_tracer(self, tracer: Tracer | None) -> None:
        self._open_tracers.tracer = tracer

    def _edited_copy(self) -> "NNsight":
        clone = object.__new__(type(self))
        # the copy's child Envoys are its own (made on first read), not this model's, whose root is this model
        clone.__dict__.update({name: value for name, value in self.__dict__.items() if not isinstance(value, Envoy)})
        object.__setattr__(clone, "_children", {})
        object.__setattr__(clone, "_root", clone)
        object.__setattr__(clone, "_open_tracers", threading.local())
        object.__setattr__(clone, "_edits", list(self._edits))
        return clone

    def _enter_tracer(self, tracer: Tracer) -> None:
        """Open ``tracer`` in this thread. Traces of one model in other threads are theirs: each builds its own
        graph, and the hooks of a run act only in the thread that runs it."""
        if self._active_tracer is not None:
            raise RuntimeError("a trace of this model is already open; traces cannot be nested (use invokes to "
                               "batch inputs, or a session for several runs)")
        object.__setattr__(self, "_active_tracer", tracer)

    def _exit_tracer(self, tracer: Tracer) -> None:
        if self._active_tracer is tracer:
            object.__setattr__(self, "_active_tracer", None)

    # ------------------------------------------------------------------------- inputs, batching, running
    def _prepare_input(self, *inputs: Any, **kwargs: Any) -> PreparedInput:
        """One invoke's input as the model takes it: on a model on a GPU, tensors made on the CPU move to the
        model's device (``net.trace(torch.rand(3, 5))`` on a model moved with ``.to("cuda")``); tensors already on an
        accelerator stay where they are."""
        parameter = self._first_parameter()
        if parameter is not None and parameter.device.type not in ("cpu", "meta"):
            inputs, kwargs = tree_map_only(torch.Tensor, lambda tensor: tensor.to(parameter.device)
                                           if tensor.device.type == "cpu" else tensor, (inputs, kwargs))
        return PreparedInput(tuple(inputs), dict(kwargs), batch_size_of((inputs, kwargs)))

    def _batch_inputs(self, prepared: list[PreparedInput]) -> tuple[PreparedInput, list[tuple[int, int]]]:
        """All invokes' inputs as one batch, and each invoke's ``(start, rows)`` in it."""
        if not prepared:
            raise ValueError("this trace has no input")
        groups, start = [], 0
        for each in prepared:
            groups.append((start, each.batch_size))
            start += each.batch_size
        if len(prepared) == 1:
            return prepared[0], groups
        return self._join_inputs(prepared, start), groups

    def _join_inputs(self, prepared: list[PreparedInput], rows: int) -> PreparedInput:
        """Several invokes' inputs as one input of ``rows`` rows: tensors concatenated, other arguments equal."""
        if len({(len(each.args), tuple(each.kwargs)) for each in prepared}) != 1:
            raise ValueError("invokes batched together must pass the same arguments (tensors may differ in rows)")
        args = tuple(concatenate_batches([each.args[position] for each in prepared])
                     for position in range(len(prepared[0].args)))
        kwargs = {key: concatenate_batches([each.kwargs[key] for each in prepared]) for key in prepared[0].kwargs}
        return PreparedInput(args, kwargs, rows)

    def _run(self, prepared: PreparedInput, options: dict) -> Any:
        """Run the model on a batch (``options`` come from ``trace``/``generate``)."""
        return self._module(*prepared.args, **prepared.kwargs)

    def _returns_root_output(self, options: dict) -> bool:
        """Whether ``_run`` returns the root module's own output (one forward pass): then reads of ``model.output``
        need no hook on the root."""
        return True

    def _scan_runner(self, options: dict) -> Any:
        """The callable a fake-tensor scan runs, given the model's fake twin: one forward pass."""
        return lambda twin, *args, **kwargs: twin(*args, **kwargs)

    def _scan(self, prepared: PreparedInput, options: dict, step: int = 0) -> ModuleScan | ConcreteScan | None:
        """The fake-tensor scan for this input signature (cached), or ``None`` when the model cannot be scanned.

        ``step`` is the generation step whose module calls are wanted; one forward pass has only step 0, so the
        default ignores it (``LanguageModel`` scans a decoding step for steps after the first).
        """
        runner = self._scan_runner(options)
        return self._cached_scan(
            ("forward",), prepared, options,
            concrete=lambda: ModuleScan.run(self._module, runner, prepared.args, prepared.kwargs),
            symbolic=lambda roles: SymbolicScan.run(self._module, runner, prepared.args, prepared.kwargs,
                                                    roles=roles))

    def _symbolic_roles(self) -> Roles | None:
        """The input sizes one scan may leave symbolic (keyword -> dims), or ``None``: a plain module's inputs
        have no known batch or sequence dims, so it gets one concrete scan per input shape."""
        return None

    def _cached_scan(self, kind: tuple, prepared: PreparedInput, options: dict, *, concrete: Callable[[], Any],
                     symbolic: Callable[[Roles], SymbolicScan], quiet: bool = False) -> Any:
        """The scan of ``kind`` for ``prepared``: cached per input signature; with symbolic roles, made from the one
        symbolic scan of the model (per pattern of sizes 0 and 1) by substituting this input's sizes.

        The first input shape of a pattern gets a concrete scan (several times cheaper than a symbolic one, so a
        model's first trace starts fast); the second shape makes the symbolic scan that serves every later one.

        A model whose code depends on a symbolic size (guards) or cannot run with symbolic sizes falls back to one
        concrete scan per input shape, with one warning. A model that cannot be scanned at all has no shapes
        (warned once per model type unless ``quiet``).
        """
        # fake values belong to one thread's fake mode: a scan serves the traces of the thread that made it
        mode = id(shared_fake_mode())
        key = kind + (mode, input_signature(prepared.args), input_signature(prepared.kwargs),
                      input_signature(options), installed_sources(self._module))  # .source: scans with operations
        cache = self._scan_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        roles = self._symbolic_roles()
        symbolic_scan, reason = None, None
        pattern = None if roles is None else kind + (mode, input_signature(prepared.args),
                                                     symbolic_signature(prepared.kwargs, roles), input_signature(options),
                                                     installed_sources(self._module))
        if pattern is not None and not self._symbolic_fallback:
            first = self._symbolic_scans.setdefault(pattern, key)
            if isinstance(first, tuple) and first != key:  # a second input shape of this pattern: scan symbolically
                try:
                    self._symbolic_scans[pattern] = symbolic(roles)
                except ScanFailed as failure:
                    self._symbolic_scans[pattern], reason = None, failure
            symbolic_scan = self._symbolic_scans[pattern]
            if isinstance(symbolic_scan, tuple):
                symbolic_scan = None  # the first shape of its pattern: a concrete scan
            elif symbolic_scan is not None and symbolic_scan.guarded:
                symbolic_scan, reason = None, "its code depends on the batch size or the sequence length"
        if symbolic_scan is not None:
            scan = symbolic_scan.at(prepared.kwargs)
        else:
            try:
                scan = concrete()
                if reason is not None:
                    object.__setattr__(self, "_symbolic_fallback", True)
                    warn_at_user_line(f"{type(self._module).__name__} is scanned once per input shape, not once "
                                      f"for all lengths: {reason}. Shapes stay exact; a new length costs one fake "
                                      "forward pass.")
            except ScanFailed as failure:
                scan = None
                if not quiet and type(self._module) not in self._scan_failures:
                    self._scan_failures.add(type(self._module))
                    warn_at_user_line(f"shapes are unavailable for {type(self._module).__name__}: it could not "
                                      f"run on fake tensors ({failure}). Traces still run; order problems are found "
                                      "while they run.")
        cache[key] = scan
        if len(cache) > SCAN_CACHE_SIZE:
            cache.popitem(last=False)
        return scan

    def _on_accelerator(self) -> bool:
        parameter = self._first_parameter()
        return parameter is not None and parameter.device.type != "cpu"

    def _first_parameter(self) -> torch.nn.Parameter | None:
        """The model's first parameter (kept: ``module.to(...)`` moves a parameter's data, not the parameter)."""
        cached = self.__dict__.get("_parameter_cache")
        if cached is None or cached[0] is not self._module:
            cached = (self._module, next(self._module.parameters(), None))
            object.__setattr__(self, "_parameter_cache", cached)
        return cached[1]

    def _submodule(self, path: str) -> torch.nn.Module:
        """The module at a dotted path, looked up afresh each run (a child may have been replaced)."""
        module = self._module
        if path:
            for name in path.split("."):
                module = module._modules[name]
        return module

    # ---------------------------------------------------------------------------------------- conveniences
    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (CPU for a model without parameters)."""
        parameter = self._first_parameter()
        return parameter.device if parameter is not None else torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> "NNsight":
        """Move the model (``net.to("cuda")``); returns the wrapper."""
        self._module.to(*args, **kwargs)
        self._scan_cache.clear()
        self._symbolic_scans.clear()
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._module!r})"


def symbolic_signature(kwargs: dict, roles: Roles) -> Any:
    """:func:`input_signature` of keyword inputs with each symbolic size (2 or more, in a role's dim) as ``"*"``."""
    def pattern(name: str, value: Any) -> Any:
        if name not in roles or not isinstance(value, torch.Tensor):
            return input_signature(value)
        shape = tuple("*" if dim in roles[name] and size >= 2 else size for dim, size in enumerate(value.shape))
        return ("tensor", shape, value.dtype, value.device.type)
    return tuple((name, pattern(name, value)) for name, value in sorted(kwargs.items(), key=lambda kv: str(kv[0])))


def input_signature(value: Any) -> Any:
    """A hashable summary of an input: shapes, dtypes and devices of tensors, and other values themselves."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(input_signature(item) for item in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((key, input_signature(item)) for key, item in sorted(value.items(), key=lambda kv: str(kv[0])))
    try:
        hash(value)
        return value
    except TypeError:
        return (type(value).__name__, id(value))
