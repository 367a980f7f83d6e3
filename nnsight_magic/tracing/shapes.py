"""Shapes before running: a fake-tensor scan of the model, and fake values for every node.

A :class:`ModuleScan` runs the model's fake twin (:mod:`.twin`: the same modules, fake tensors, no state shared
with the model, so a scan never changes the model) once under ``FakeTensorMode`` (no real compute, no real
memory) with hooks on every module, recording each module call's fake inputs and output and the order in which calls start and end.
A concrete scan runs each repeated block once: later calls of a module with the same structure and input shapes
are replayed from the first (:mod:`.replay`), so a 30-layer model's scan costs about one layer's fake ops.
:class:`ShapeInference` then gives every node its fake value by running the node's op on its arguments' fake
values, so ``proxy.shape`` is a real ``torch.Size`` while the cell is still being built, and a bad index or a
mismatched assignment raises its usual error at the user's line, before the model runs.

In [1]: scan = ModuleScan.run(net, lambda twin, x: twin(x), (torch.rand(1, 5),), {})
In [2]: scan.output("layer1", 0).shape, scan.order[("layer1", "output", 0)]
Out[2]: (torch.Size([1, 10]), 2)
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import warnings
from typing import Any, Callable, Iterator

import torch
from torch._subclasses import fake_tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import annotate
from .graph import written_node
from .interpreter import Interpreter, move_to_accelerator
from .node import Node, map_nodes
from .replay import CallReplay
from .twin import TwinFailed, fake_twin

_FAKE_LIMITATIONS = (
    fake_tensor.DataDependentOutputException, fake_tensor.DynamicOutputShapeException,
    fake_tensor.UnsupportedOperatorException, fake_tensor.UnsupportedFakeTensorException,
    NotImplementedError,
)
_FAKE_WORDS = ("meta", "fake", "data-dependent", "data dependent", "symbolic", "FakeTensor", "_local_scalar_dense")
_fake_logger = logging.getLogger("torch._subclasses.fake_tensor")


@contextlib.contextmanager
def quiet_fake_errors() -> Iterator[None]:
    """Silence FakeTensorMode's own error log while we run ops that may legitimately fail on fake values."""
    previous = _fake_logger.disabled
    _fake_logger.disabled = True
    try:
        yield
    finally:
        _fake_logger.disabled = previous


_modes = threading.local()


def shared_fake_mode() -> fake_tensor.FakeTensorMode:
    """The ``FakeTensorMode`` every scan and every shape inference of this thread uses.

    One mode means fake values of different scans (several invokes, several models in a session) can meet in
    one operation. It remembers the fake copy of each real tensor (weakly: parameters are converted once). A
    ``FakeTensorMode`` must not be entered by two threads at once, so each thread has its own (and scans are
    cached per mode: see ``NNsight._scan``).
    """
    mode = getattr(_modes, "mode", None)
    if mode is None:
        mode = _modes.mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    return mode


class InferenceMemo:
    """Fake values already inferred, keyed by the op and the very fake objects (and constants) it was applied to.

    A key holds its fake arguments alive, so no other object can take their ``id``; the memo keeps the most recent
    ``size`` results. Arguments that are not hashable and not tensors (a user object) make a node unmemoized.
    """

    def __init__(self, size: int = 4096):
        self.size = size
        self.entries: collections.OrderedDict[tuple, tuple[Any, list]] = collections.OrderedDict()

    def key(self, node: Node, args: tuple, kwargs: dict) -> tuple | None:
        keep: list[Any] = []
        try:
            parts = (node.op, node.target if node.op != "call_function" else id(node.target),
                     _memo_part(args, keep), _memo_part(kwargs, keep))
            hash(parts)
        except TypeError:
            return None
        return parts + (_Kept(keep),)

    def __contains__(self, key: tuple) -> bool:
        return key in self.entries

    def get(self, key: tuple) -> Any:
        self.entries.move_to_end(key)
        return self.entries[key]

    def put(self, key: tuple, fake: Any) -> None:
        self.entries[key] = fake
        if len(self.entries) > self.size:
            self.entries.popitem(last=False)


class _Kept:
    """The objects a memo key refers to by ``id``: kept alive with the key, ignored when keys are compared."""

    __slots__ = ("objects",)

    def __init__(self, objects: list):
        self.objects = objects

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Kept)

    def __hash__(self) -> int:
        return 0


def _memo_part(value: Any, keep: list) -> Any:
    """A hashable stand-in for an argument: fake tensors by identity (kept alive with the key), real tensors by
    what a fake result depends on (shape, stride, dtype, device, requires_grad; never kept), containers item by
    item."""
    if isinstance(value, fake_tensor.FakeTensor):
        keep.append(value)
        return ("fake", id(value))
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(_memo_part(item, keep) for item in value)
    if isinstance(value, dict):
        return ("dict",) + tuple((key, _memo_part(item, keep)) for key, item in value.items())
    if isinstance(value, slice):
        return ("slice", _memo_part(value.start, keep), _memo_part(value.stop, keep), _memo_part(value.step, keep))
    if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype, torch.device, type(...))):
        return (type(value).__name__, value)
    raise TypeError("not memoizable")


_memo = InferenceMemo()


class ScanFailed(RuntimeError):
    """The model could not run on fake tensors (data-dependent control flow, unsupported ops)."""


class ModuleScan:
    """The fake run of a model: every module call's fake inputs and output, in order.

    Attributes:
        fake_mode: the ``FakeTensorMode`` the fake values belong to; later shape inference runs inside it.
        outputs: ``path -> [fake output of call 0, call 1, ...]``.
        inputs: ``path -> [(fake args, fake kwargs) of call 0, ...]``.
        order: ``(path, "input" | "output", call) -> position`` in the sequence of hook events; a value written
            into a module call can only depend on events at or before that call's own position.
        result: the fake value the run returned.
        twin: the model's fake twin the scan ran (see :mod:`~nnsight_magic.tracing.twin`).
        fake_inputs: the fake ``(args, kwargs)`` it ran on (a decoding step's scan continues from them).
    """

    def __init__(self, fake_mode: fake_tensor.FakeTensorMode):
        self.fake_mode = fake_mode
        self.outputs: dict[str, list[Any]] = {}
        self.inputs: dict[str, list[tuple[tuple, dict]]] = {}
        self.order: dict[tuple[str, str, int], int] = {}
        self.result: Any = None
        self.twin: torch.nn.Module | None = None
        self.fake_inputs: tuple[tuple, dict] = ((), {})
        self.log: list[tuple[str, str, Any]] = []
        self.replayed = 0

    @classmethod
    def run(cls, root: torch.nn.Module, runner: Callable[..., Any], args: tuple, kwargs: dict, *,
            twin: torch.nn.Module | None = None,
            fake_mode: fake_tensor.FakeTensorMode | None = None) -> "ModuleScan":
        """Run ``runner(twin, *args, **kwargs)`` on fake copies of the inputs, recording every module call.

        ``twin`` is a :func:`~nnsight_magic.tracing.twin.fake_twin` of ``root`` (made here when not given; a
        decoding-step scan passes the twin of its prompt's scan): the scan never touches ``root`` itself, so
        its buffers and attributes stay as they are. The twin keeps the model's hooks (Hugging Face records
        ``hidden_states`` through them), so a hook of yours also runs once per scan, on the twin's module and
        fake tensors; ``isinstance(output, torch._subclasses.fake_tensor.FakeTensor)`` tells it apart.
        ``fake_mode`` is the shared one unless given (a symbolic scan's mode, see :mod:`.symbolic`); inputs that
        are already fake tensors of it are used as they are. Raises :class:`ScanFailed` (with the reason) when
        the model cannot run on fake tensors.
        """
        scan = cls(fake_mode or shared_fake_mode())
        try:
            scan.twin = twin if twin is not None else fake_twin(root, scan.fake_mode, _input_device((args, kwargs)))
        except TwinFailed as error:
            raise ScanFailed(str(error)) from error
        handles = scan._hook(scan.twin)
        replay = CallReplay(scan.twin, scan.fake_mode, scan.log, scan._record, {handle.id for handle in handles})
        if scan.fake_mode.shape_env is None:   # sizes are plain ints: repeated calls are replayed
            replay.install()
        try:
            with scan.fake_mode, torch.no_grad(), quiet_fake_errors(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fake_args = tree_map(scan._to_fake, args)
                fake_kwargs = tree_map(scan._to_fake, kwargs)
                scan.fake_inputs = (fake_args, fake_kwargs)
                scan.result = runner(scan.twin, *fake_args, **fake_kwargs)
        except Exception as error:  # any failure means "no shapes", never a failed trace
            raise ScanFailed(f"{type(error).__name__}: {error}") from error
        finally:
            replay.remove()
            for handle in handles:
                handle.remove()
        scan.replayed = replay.replayed
        return scan

    def _hook(self, root: torch.nn.Module) -> list:
        """Recording hooks on every module of ``root`` (a module reachable by several paths records each)."""
        paths: dict[int, list[str]] = {}
        for path, module in root.named_modules(remove_duplicate=False):
            paths.setdefault(id(module), []).append(path)
        handles = []
        seen_modules: set[int] = set()
        for module in root.modules():
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            module_paths = paths[id(module)]
            handles.append(module.register_forward_pre_hook(self._recorder(module_paths, "input"), with_kwargs=True))
            handles.append(module.register_forward_hook(self._recorder(module_paths, "output"), with_kwargs=True))
        return handles

    def _to_fake(self, value: Any) -> Any:
        if not isinstance(value, torch.Tensor) or \
                (isinstance(value, fake_tensor.FakeTensor) and value.fake_mode is self.fake_mode):
            return value
        return self.fake_mode.from_tensor(value)

    def _recorder(self, paths: list[str], kind: str) -> Callable:
        owner = threading.get_ident()  # a forward pass of the same model in another thread is not this scan's

        def record(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any = None) -> None:
            if threading.get_ident() != owner:
                return
            value = output if kind == "output" else (args, dict(kwargs))
            for path in paths:
                self._record(path, kind, value)
        if kind == "input":
            return lambda module, args, kwargs: record(module, args, kwargs)
        return record

    def _record(self, path: str, kind: str, value: Any) -> None:
        calls = self.outputs if kind == "output" else self.inputs
        values = calls.setdefault(path, [])
        self.order[(path, kind, len(values))] = len(self.order)
        values.append(value)
        self.log.append((path, kind, value))

    def output(self, path: str, call: int) -> Any:
        """The fake output of call ``call`` of the module at ``path``, or ``None`` if that call never happened."""
        calls = self.outputs.get(path, ())
        return calls[call] if call < len(calls) else None

    def input(self, path: str, call: int) -> Any:
        """The fake ``(args, kwargs)`` of call ``call`` of the module at ``path``, or ``None``."""
        calls = self.inputs.get(path, ())
        return calls[call] if call < len(calls) else None

    def calls(self, path: str) -> int:
        """How many times the module at ``path`` ran in one model run."""
        return len(self.outputs.get(path, ()))


def _input_device(inputs: Any) -> torch.device:
    """Where a model's meta-device weights will be when it runs on ``inputs``: their first tensor's device."""
    for leaf in tree_flatten(inputs)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.device.type != "meta":
            return leaf.device
    return torch.device("cpu")


class ShapeInference(Interpreter):
    """Gives each new node its fake value by running its op on fake arguments.

    Errors that the real run would raise too (an index out of range, shapes that cannot broadcast, a wrong
    method name) are raised at once, keep their type, and name the user's line. Failures that only mean "not
    knowable without real data" (``.item()``, ``nonzero``, a user function that needs real numbers) leave the
    node's fake value unknown (``None``) instead.
    """

    def __init__(self, root: torch.nn.Module | None, fake_mode: fake_tensor.FakeTensorMode | None = None):
        super().__init__(root)
        self.fake_mode = fake_mode or shared_fake_mode()

    def infer(self, node: Node) -> Any:
        """The fake value of ``node``, ``None`` when unknown; raises the user's error for real mistakes.

        Results are remembered (:class:`InferenceMemo`): a trace repeated in a loop, whose module values come from
        the same cached scan, gets every fake value from the memo instead of running fake ops again.
        """
        if node.op in ("log", "stop") or (node.op == "call_method" and node.target == "backward"):
            return None  # side effects only; nothing to know about their value
        if node.op == "call_function" and not _library_function(node.target):
            return None  # a user's function runs once, on real values: never on fake ones while building
        unknown = False

        def fake_of(argument: Node) -> Any:
            nonlocal unknown
            if argument.fake is None:
                unknown = True
            return argument.fake

        args = map_nodes(fake_of, node.args)
        kwargs = map_nodes(fake_of, node.kwargs)
        if unknown:
            return self.cond_check(node, args) if node.op == "cond" else None
        writes = written_node(node) is not None
        # an edit of a list or dict (``append``) must run on every build: its effect is the container's fake value
        memoized = node.op not in ("new_list", "apply_module") and not (writes and not isinstance(args[0], torch.Tensor))
        key = _memo.key(node, args, kwargs) if memoized else None
        if key is not None and key in _memo:
            return _memo.get(key)
        if writes and isinstance(args[0], torch.Tensor):
            with self.fake_mode:
                args = (args[0].clone(),) + tuple(args[1:])   # never change a fake value others share
        try:
            with self.fake_mode, quiet_fake_errors(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                args, kwargs = move_to_accelerator(args, kwargs)  # as the run does (tracing/execution.py)
                fake = self.run_node(node, args, kwargs)
        except _FAKE_LIMITATIONS:
            fake = None
        except Exception as error:
            if not self._trustworthy(node, error):
                return None
            raise annotate(error, node)
        if key is not None:
            _memo.put(key, fake)
        return fake

    @staticmethod
    def _trustworthy(node: Node, error: Exception) -> bool:
        """True when ``error`` would happen on real tensors too, so the user should see it now."""
        return not any(word in str(error) for word in _FAKE_WORDS)

    # ------------------------------------------------------------------- ops whose meaning depends on the run
    def swap(self, node: Node, args: tuple, kwargs: dict) -> Any:
        return args[1]

    def update(self, node: Node, args: tuple, kwargs: dict) -> Any:
        return args[1]

    def merge(self, node: Node, args: tuple, kwargs: dict) -> Any:
        return args[1] if args[1] is not None else args[2]

    def cond(self, node: Node, args: tuple, kwargs: dict) -> Any:
        return self.cond_check(node, args)

    @staticmethod
    def cond_check(node: Node, args: tuple) -> None:
        """A condition must be one truth value: a tensor with several elements is the user's mistake."""
        condition = args[0]
        if isinstance(condition, torch.Tensor) and condition.numel() != 1:
            raise annotate(RuntimeError(
                f"the condition is a tensor of shape {tuple(condition.shape)} ({condition.numel()} values); "
                "reduce it to one value first, e.g. `(...).any()`, `(...).all()` or `x[0, -1] > 0`"), node)
        return None

    @staticmethod
    def alias(value: Any, base: Any) -> bool:
        """True when the fake ``value`` shares storage with ``base`` or with a tensor inside it (a view, or an
        element of a module's ``(args, kwargs)`` or tuple output)."""
        base_storages = {_storage(tensor) for tensor in _tensors(base)} - {None}
        return any(_storage(tensor) in base_storages for tensor in _tensors(value))


_PURE_BUILTINS = frozenset({getattr, len, abs, min, max, sum, round, divmod, pow, isinstance, tuple, list, dict,
                            slice, range, zip, sorted, reversed, enumerate, int, float})


def _library_function(function: Any) -> bool:
    """Functions of torch and ``operator``, pure builtins, and functions marked ``function.pure = True`` (this
    library's own torch-only helpers, such as the attention pattern's): free of side effects, safe on fake values."""
    if function in _PURE_BUILTINS or getattr(function, "pure", False) is True:
        return True
    module = getattr(function, "__module__", None) or getattr(getattr(function, "__objclass__", None),
                                                             "__module__", "") or ""
    return module.startswith(("torch", "_operator", "operator")) or \
        getattr(function, "__self__", None) is torch._C._VariableFunctions


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _tensors(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors(item)]
    return []


def _storage(tensor: torch.Tensor) -> StorageWeakRef | None:
    try:
        return StorageWeakRef(tensor.untyped_storage())
    except (RuntimeError, NotImplementedError):
        return None
