"""One scan for every prompt length: a fake-tensor scan with symbolic sizes, made concrete per trace.

A :class:`SymbolicScan` runs the model's twin once on inputs whose batch and sequence sizes are symbols
(``torch.fx.experimental.symbolic_shapes.ShapeEnv``), so every recorded module value has shapes such as
``(s0, s1, 768)``. :meth:`SymbolicScan.at` gives the values for one trace's sizes by substituting them: a
:class:`ConcreteScan` with ordinary fake tensors (of the shared fake mode), made lazily, value by value, with views
and their bases still sharing storage. A model whose Python branches on a symbolic size leaves *guards* in the
shape environment; such a scan is not valid for other sizes, and :attr:`SymbolicScan.guarded` says so (the model
then gets one concrete scan per input shape).

In [1]: ids = torch.zeros(1, 7, dtype=torch.long)
In [2]: symbolic = SymbolicScan.run(gpt2, lambda twin, input_ids: twin(input_ids=input_ids), (), {"input_ids": ids},
   ...:                             roles={"input_ids": (0, 1)})          # dim 0 is the batch, dim 1 the length
In [3]: symbolic.output("transformer.h.0", 0).shape      # the batch of 1 stays concrete; s26 is the length
Out[3]: torch.Size([1, s26, 768])
In [4]: symbolic.at({"input_ids": torch.zeros(1, 12, dtype=torch.long)}).output("transformer.h.0", 0).shape
Out[4]: torch.Size([1, 12, 768])

Sizes 0 and 1 stay concrete in the scan (symbolic shapes assume a size is at least 2), so a batch of one and a
batch of three use two scans; every length of two tokens or more uses the same one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import sympy
import torch
from torch._subclasses import fake_tensor
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_map

from .shapes import ModuleScan, ScanFailed, shared_fake_mode

Roles = dict[str, tuple[int, ...]]  # keyword argument -> its dims that are symbolic (dim i has role i)


def _symbolic_attention(kwargs: dict) -> Any:
    """On a GPU, ``scaled_dot_product_attention`` limited to its math kernel for the scan: the fused CUDA kernels'
    shape rules need concrete sizes (``SymIntArrayRef expected to contain only concrete integers``), the math
    kernel's do not, and every kernel gives an output of the same shape. A fake scan computes no numbers, so the
    choice changes nothing else; on the CPU the default kernels already take symbolic sizes."""
    if any(isinstance(value, torch.Tensor) and value.device.type not in ("cpu", "meta") for value in kwargs.values()):
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


def _size(tensor: torch.Tensor, dim: int) -> int:
    return int(tensor.shape[dim])


class SymbolicScan:
    """A scan whose values have symbolic sizes; see the module docstring.

    Attributes:
        scan: the :class:`ModuleScan` of the symbolic run (its ``fake_mode`` has a ``ShapeEnv``).
        symbols: ``(keyword, dim) -> sympy symbol`` of each symbolic size of the inputs.
        guarded: the model's code decided something from a symbolic size, so the scan holds only for the sizes
            it was run with.
    """

    def __init__(self, scan: ModuleScan, symbols: dict[tuple[str, int], sympy.Symbol], shape_env: ShapeEnv):
        self.scan = scan
        self.symbols = symbols
        self.shape_env = shape_env
        ours = set(symbols.values())
        self.guarded = any(guard.expr.free_symbols & ours for guard in shape_env.guards) or \
            any(symbol in shape_env.replacements for symbol in ours)

    @classmethod
    def run(cls, root: torch.nn.Module, runner: Callable[..., Any], args: tuple, kwargs: dict, *, roles: Roles,
            then: Callable[[ModuleScan], ModuleScan] | None = None) -> "SymbolicScan":
        """Scan ``runner(twin, *args, **kwargs)`` with the sizes named by ``roles`` symbolic.

        ``then`` continues from the first scan (a decoding step after the prompt's pass, in the same fake mode
        and twin) and its scan is the one kept. Raises :class:`ScanFailed` when the model cannot run this way.
        """
        shape_env = ShapeEnv()
        mode = fake_tensor.FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
        sizes: dict[int, torch.SymInt] = {}
        symbols: dict[tuple[str, int], sympy.Symbol] = {}
        fake_kwargs = dict(kwargs)
        try:
            for name, dims in roles.items():
                value = kwargs.get(name)
                if isinstance(value, torch.Tensor):
                    fake_kwargs[name] = _symbolic_tensor(mode, value, dims, sizes, symbols, name)
            with _symbolic_attention(kwargs):
                scan = ModuleScan.run(root, runner, args, fake_kwargs, fake_mode=mode)
                if then is not None:
                    scan = then(scan)
        except ScanFailed:
            raise
        except Exception as error:  # a size the shape environment cannot represent: no symbolic scan
            raise ScanFailed(f"{type(error).__name__}: {error}") from error
        return cls(scan, symbols, shape_env)

    def output(self, path: str, call: int) -> Any:
        """The symbolic fake output of a module call (for inspection; traces use :meth:`at`)."""
        return self.scan.output(path, call)

    def bindings(self, kwargs: dict) -> dict[sympy.Symbol, int]:
        """Each symbol's value for these inputs."""
        return {symbol: _size(kwargs[name], dim) for (name, dim), symbol in self.symbols.items()}

    def at(self, kwargs: dict) -> "ConcreteScan":
        """The scan for the sizes of ``kwargs``: every value with those sizes substituted."""
        return ConcreteScan(self, self.bindings(kwargs))


def _symbolic_tensor(mode: fake_tensor.FakeTensorMode, value: torch.Tensor, dims: tuple[int, ...],
                     sizes: dict[int, torch.SymInt], symbols: dict, name: str) -> torch.Tensor:
    """A fake of ``value`` whose dims in ``dims`` (sizes 2 and more) are the symbols of their roles.

    One symbol per role (dim index), shared by every input: ``input_ids`` and ``attention_mask`` have the same
    length. Each role's hint differs from the others' so that the batch and the length are never taken as equal.
    """
    shape: list[Any] = list(value.shape)
    for dim in dims:
        if dim >= value.dim() or shape[dim] < 2:
            continue
        if dim not in sizes:
            hint = shape[dim]
            while hint in {int(size.node.hint) for size in sizes.values()}:
                hint += 1
            probe = mode.from_tensor(torch.empty(hint, dtype=torch.uint8), symbolic_context=StatelessSymbolicContext(
                dynamic_sizes=[DimDynamic.DYNAMIC]))
            sizes[dim] = probe.shape[0]
        shape[dim] = sizes[dim]
        symbols[(name, dim)] = sizes[dim].node.expr
    with mode:
        return torch.empty(shape, dtype=value.dtype, device=value.device)


class ConcreteScan:
    """A :class:`SymbolicScan` at one trace's sizes: the interface of :class:`ModuleScan`, values made on demand.

    Every value is a fake tensor of the shared fake mode with the substituted sizes, strides and offset; tensors
    that shared storage in the symbolic run share one storage here too (so views stay views). A value that cannot
    be substituted (a size that is not a function of the inputs' sizes) is unknown (``None``).
    """

    def __init__(self, symbolic: SymbolicScan, bindings: dict[sympy.Symbol, int]):
        self.symbolic = symbolic
        self.bindings = bindings
        self.fake_mode = shared_fake_mode()
        self.order = symbolic.scan.order
        self.twin = symbolic.scan.twin
        self._values: dict[tuple, Any] = {}
        self._storages: dict[tuple, torch.Tensor] = {}

    def output(self, path: str, call: int) -> Any:
        return self._concrete(("output", path, call), lambda: self.symbolic.scan.output(path, call))

    def input(self, path: str, call: int) -> Any:
        return self._concrete(("input", path, call), lambda: self.symbolic.scan.input(path, call))

    def calls(self, path: str) -> int:
        return self.symbolic.scan.calls(path)

    @property
    def result(self) -> Any:
        return self._concrete(("result",), lambda: self.symbolic.scan.result)

    @property
    def outputs(self) -> dict[str, list[Any]]:
        """Every call's output, as :attr:`ModuleScan.outputs` (all made now; a trace reads only what it needs)."""
        recorded = self.symbolic.scan.outputs
        return {path: [self.output(path, call) for call in range(len(calls))] for path, calls in recorded.items()}

    @property
    def inputs(self) -> dict[str, list[Any]]:
        """Every call's ``(args, kwargs)``, as :attr:`ModuleScan.inputs`."""
        recorded = self.symbolic.scan.inputs
        return {path: [self.input(path, call) for call in range(len(calls))] for path, calls in recorded.items()}

    def _concrete(self, key: tuple, symbolic: Callable[[], Any]) -> Any:
        if key not in self._values:
            try:
                self._values[key] = tree_map(self._substitute, symbolic())
            except (TypeError, ValueError, RuntimeError):
                self._values[key] = None
        return self._values[key]

    def _int(self, value: Any) -> Any:
        if not isinstance(value, torch.SymInt):
            return value
        expression = self.symbolic.shape_env.replace(value.node.expr).xreplace(self.bindings)
        if not isinstance(expression, sympy.Integer):
            expression = sympy.simplify(expression)
        if not isinstance(expression, sympy.Integer):
            raise ValueError(f"the size {value} does not follow from the inputs' sizes")
        return int(expression)

    def _substitute(self, value: Any) -> Any:
        if isinstance(value, torch.SymInt):
            return self._int(value)
        if not isinstance(value, fake_tensor.FakeTensor) or value.fake_mode is not self.symbolic.scan.fake_mode:
            return value
        shape = [self._int(size) for size in value.shape]
        stride = [self._int(step) for step in value.stride()]
        offset = self._int(value.storage_offset())
        storage = value.untyped_storage()
        key = (StorageWeakRef(storage), value.dtype)
        if key not in self._storages:
            with self.fake_mode:
                self._storages[key] = torch.empty(self._int(storage.nbytes()) // value.element_size(),
                                                  dtype=value.dtype, device=value.device)
        with self.fake_mode:
            return self._storages[key].as_strided(shape, stride, offset)  # scans run under no_grad: no autograd
