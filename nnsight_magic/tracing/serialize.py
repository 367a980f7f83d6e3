"""The graph as data: JSON for nodes and constants, safetensors for tensors, never pickle, never code.

In [1]: text = tracer.graph.to_json()                 # one JSON string (tensors: a base64 safetensors blob)
In [2]: graph = Graph.from_json(text)                 # the same nodes, edges, lines and shapes
In [3]: str(graph) == str(tracer.graph)
Out[3]: True

What crosses is closed: each node's op comes from the graph's closed set (see :mod:`.node`); a callable is named
by its qualified name and must be on the :class:`AllowList` (pure torch functions and tensor methods, Python
operators, a few pure builtins, and this package's own helpers such as ``first_input``); attribute and method
names are plain public names; constants are JSON (tuples, slices, dtypes, devices and non-finite floats carry a
one-key tag such as ``{"slice": [0, 2, null]}``); tensors are entries of one safetensors blob beside the JSON;
the user's file, line, location and source text travel with each node, so an error raised where the graph runs
names the user's line. Fake values (shapes) travel as shape, stride, dtype and a storage number, so views of one
storage are views again after loading.

:func:`loads` refuses anything else with a ``ValueError`` that names what it refused: a callable off the
allow-list (``os.system``, ``builtins.eval``, a module path that does not exist), a node index out of range or
pointing forward, nesting deeper than :data:`MAX_DEPTH`, a tensor header larger than its blob, a truncated blob.
"""

from __future__ import annotations

import base64
import builtins
import importlib
import json
import math
import operator
import re
import struct
import sys
from typing import Any

import torch

from .graph import Graph, Section, StepSet
from .node import ENTRY_OPS, Node, describe_location, iter_nodes

FORMAT = "nnsight_magic.graph"
VERSION = 1
MAX_DEPTH = 32        # nesting of constants and fake values
MAX_NODES = 200_000
OPS = frozenset(ENTRY_OPS | {"call_function", "call_method", "getattr", "apply_module", "swap", "update", "log",
                             "cond", "merge", "stop", "new_list"})
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_PATH_PART = re.compile(r"[A-Za-z0-9_]+\Z")
_TAGS = ("node", "tuple", "dict", "slice", "ellipsis", "float", "dtype", "device", "size", "tensor", "marker",
         "complex")

# --------------------------------------------------------------------------------------------- the allow-list
_OPERATOR_NAMES = (
    "abs add and_ concat contains countOf eq floordiv ge getitem gt iadd iand iconcat ifloordiv ilshift imatmul "
    "imod imul index indexOf inv invert ior ipow irshift is_ is_not isub itruediv ixor le length_hint lshift lt "
    "matmul mod mul ne neg not_ or_ pos pow rshift setitem sub truediv truth xor delitem").split()
_BUILTIN_NAMES = "abs all any bool dict divmod enumerate float int len list print range reversed round slice " \
                 "str sum tuple zip".split()
# torch functions that read or write files, share memory or take callables never run next to the weights
_DENIED_TORCH = frozenset({"from_file", "save", "load", "set_", "cond", "vmap", "compile", "import_ir_module",
                           "import_ir_module_from_buffer", "resize_", "set_num_threads", "manual_seed", "seed",
                           "set_default_device", "set_default_dtype", "use_deterministic_algorithms",
                           "from_dlpack", "as_strided_", "frombuffer"})
_DENIED_METHODS = frozenset({"numpy", "storage", "untyped_storage", "share_memory_", "set_", "register_hook",
                             "register_post_accumulate_grad_hook", "apply_", "map_", "map2_", "resize_",
                             "resize_as_", "pin_memory", "data_ptr", "as_strided_", "format", "format_map",
                             "tofile", "dump", "dumps", "__reduce__", "__reduce_ex__", "__setstate__",
                             "__dlpack__", "__deepcopy__", "storage_type", "module_load"})
_OPERATOR_DUNDERS = frozenset(f"__{prefix}{name}__" for name in (
    "add sub mul truediv floordiv mod pow matmul and or xor lshift rshift div".split())
    for prefix in ("", "r", "i")) | frozenset(
    "__neg__ __pos__ __abs__ __invert__ __eq__ __ne__ __lt__ __le__ __gt__ __ge__ __getitem__ __setitem__ "
    "__contains__ __len__ __bool__ __float__ __int__ __index__".split())
_CONTAINER_METHODS = frozenset(
    "append extend insert pop remove clear index count copy reverse keys values items get update setdefault "
    "popitem to_tuple".split())
_PACKAGE_FUNCTIONS = (
    "nnsight_magic.intervention.tracer.first_input", "nnsight_magic.intervention.tracer.replace_first_input",
    "nnsight_magic.intervention.tracer.in_branch", "nnsight_magic.intervention.tracer.retain_grad",
    "nnsight_magic.intervention.attention.gpt2_pattern", "nnsight_magic.intervention.attention.llama_pattern",
    "nnsight_magic.intervention.attention.past_values", "nnsight_magic.intervention.attention.gpt2_edited_output",
    "nnsight_magic.intervention.attention.llama_edited_output", "nnsight_magic.intervention.attention.same_value",
    "nnsight_magic.magics.runtime.python_and", "nnsight_magic.magics.runtime.python_or",
    "nnsight_magic.magics.runtime.python_not", "nnsight_magic.magics.runtime.format_string",
    "nnsight_magic.intervention.cache.gather", "nnsight_magic.intervention.cache.by_step",
)
PARAMETER_KINDS = ("parameter", "buffer")


class AllowList:
    """Which callables and method names a serialized graph may name, and the name of each.

    In [1]: allow = AllowList.default()
    In [2]: allow.name_of(torch.cat), allow.resolve("operator.getitem")
    Out[2]: ('torch.cat', <built-in function getitem>)
    In [3]: allow.resolve("os.system")
    ValueError: the graph names the callable 'os.system', which is not on the allow-list ...
    """

    _default: "AllowList | None" = None

    def __init__(self) -> None:
        self.functions: dict[str, Any] = {}
        self._names: dict[int, str] = {}
        self.methods: set[str] = set(_CONTAINER_METHODS)

    @classmethod
    def default(cls) -> "AllowList":
        """The allow-list every graph is checked against (built once)."""
        if cls._default is None:
            allow = cls()
            for name in _OPERATOR_NAMES:
                allow.add(f"operator.{name}", getattr(operator, name))
            for name in _BUILTIN_NAMES:
                allow.add(f"builtins.{name}", getattr(builtins, name))
            for name in dir(torch._C._VariableFunctions):
                if not name.startswith("_") and name not in _DENIED_TORCH and hasattr(torch, name):
                    allow.add(f"torch.{name}", getattr(torch, name))
            for name in torch.functional.__all__:
                allow.add(f"torch.{name}", getattr(torch, name))
            for prefix, module in (("torch.nn.functional", torch.nn.functional), ("torch.linalg", torch.linalg),
                                   ("torch.special", torch.special), ("torch.fft", torch.fft)):
                for name in dir(module):
                    value = getattr(module, name)
                    if not name.startswith("_") and callable(value) and not isinstance(value, type) and \
                            name not in _DENIED_TORCH and getattr(value, "__module__", "") != "typing":
                        allow.add(f"{prefix}.{name}", value)
            for name in dir(torch.Tensor):
                if name in _DENIED_METHODS or (name.startswith("_") and name not in _OPERATOR_DUNDERS):
                    continue
                if callable(getattr(torch.Tensor, name, None)):
                    allow.methods.add(name)
                    allow.add(f"torch.Tensor.{name}", getattr(torch.Tensor, name))
            for qualified in _PACKAGE_FUNCTIONS:
                allow.add(qualified, None)
            cls._default = allow
        return cls._default

    def add(self, name: str, function: Any) -> None:
        """Allow ``function`` under ``name`` (``None``: import it from ``name`` when first needed)."""
        self.functions.setdefault(name, function)
        if function is not None:
            self._names.setdefault(id(function), name)

    def _load(self, name: str) -> Any:
        function = self.functions[name]
        if function is None:
            module, _, attribute = name.rpartition(".")
            function = getattr(importlib.import_module(module), attribute)
            self.functions[name] = function
            self._names.setdefault(id(function), name)
        return function

    def name_of(self, function: Any) -> str:
        """The qualified name of an allowed callable; ``ValueError`` for anything else."""
        name = self._names.get(id(function))
        if name is None:
            for lazy in [key for key, value in self.functions.items() if value is None]:
                self._load(lazy)
            name = self._names.get(id(function))
        if name is None:
            label = f"{getattr(function, '__module__', None) or '?'}.{getattr(function, '__qualname__', function)}"
            raise ValueError(f"{label} is not on the allow-list of callables a serialized graph may use (pure torch "
                             "functions and tensor methods, Python operators); compute it with those instead")
        return name

    def resolve(self, name: Any) -> Any:
        """The callable allowed under ``name``; ``ValueError`` naming it for anything else."""
        if not isinstance(name, str) or name not in self.functions:
            raise ValueError(f"the graph names the callable {name!r}, which is not on the allow-list (pure torch "
                             "functions and tensor methods, Python operators); refused")
        return self._load(name)

    def check_method(self, name: Any, op: str) -> str:
        """A method or attribute name the graph may use (public, and for methods on the allow-list)."""
        if not isinstance(name, str) or not _NAME.match(name) and name not in _OPERATOR_DUNDERS:
            raise ValueError(f"a {op} node names {name!r}, which is not a public attribute name; refused")
        if name in _DENIED_METHODS or (op == "call_method" and name not in self.methods and
                                       name not in ("backward",)):
            raise ValueError(f"a {op} node names the method {name!r}, which is not on the allow-list; refused")
        return name


# ---------------------------------------------------------------------------------------------- tensors
class TensorWriter:
    """Collects the tensors of one message; :meth:`blob` is their safetensors file (empty when there are none)."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._by_id: dict[int, str] = {}

    def add(self, tensor: torch.Tensor) -> dict:
        if tensor.is_sparse or tensor.is_quantized or tensor.layout != torch.strided:
            raise ValueError(f"a {tensor.layout} tensor cannot be serialized; make it dense first")
        name = self._by_id.get(id(tensor))
        if name is None:
            name = f"t{len(self.tensors)}"
            self._by_id[id(tensor)] = name
            self.tensors[name] = tensor.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name, "grad": bool(tensor.requires_grad)} if tensor.requires_grad else {"tensor": name}

    def blob(self) -> bytes:
        if not self.tensors:
            return b""
        from safetensors.torch import save
        return save(self.tensors)


class TensorReader:
    """The tensors of one message's safetensors blob, checked before anything is read.

    A header larger than the blob, a truncated blob, or a tensor name the blob does not hold is a ``ValueError``.
    """

    def __init__(self, blob: bytes | None, device: Any = None):
        self.device = device
        self.tensors: dict[str, torch.Tensor] = {}
        if not blob:
            return
        if len(blob) < 8:
            raise ValueError(f"the tensor blob is truncated ({len(blob)} bytes; a safetensors blob starts with an "
                             "8-byte header length)")
        (header,) = struct.unpack("<Q", blob[:8])
        if header > len(blob) - 8:
            raise ValueError(f"the tensor header claims {header} bytes, larger than its blob ({len(blob) - 8} bytes "
                             "after the length); refused")
        from safetensors import SafetensorError
        from safetensors.torch import load
        try:
            self.tensors = load(bytes(blob))
        except (SafetensorError, Exception) as error:  # safetensors reports truncation as several error types
            raise ValueError(f"the tensor blob is malformed or truncated: {error}") from None

    def get(self, reference: dict) -> torch.Tensor:
        name = reference.get("tensor")
        tensor = self.tensors.get(name) if isinstance(name, str) else None
        if tensor is None:
            raise ValueError(f"the graph refers to tensor {name!r}, which its blob does not hold")
        if self.device is not None:
            tensor = tensor.to(self.device)
        if reference.get("grad"):
            tensor = tensor.detach().requires_grad_(True)
        return tensor


# ------------------------------------------------------------------------------------------ constants
def encode_value(value: Any, tensors: TensorWriter, depth: int = 0) -> Any:
    """``value`` as JSON (nodes as ``{"node": i}``, tensors into ``tensors``); ``ValueError`` for other objects."""
    if depth > MAX_DEPTH:
        raise ValueError(f"a value is nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, Node):
        return {"node": value.index}
    if isinstance(value, torch.Tensor):
        return tensors.add(value)
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, list):
        return [encode_value(item, tensors, depth + 1) for item in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [encode_value(item, tensors, depth + 1) for item in value]}
    if type(value) is dict:
        return {"dict": [[encode_value(key, tensors, depth + 1), encode_value(item, tensors, depth + 1)]
                         for key, item in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode_value(part, tensors, depth + 1) for part in (value.start, value.stop, value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).replace("torch.", "")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    marker = _marker_name(value)
    if marker is not None:
        return {"marker": marker}
    raise ValueError(f"a {type(value).__name__} cannot be serialized: graphs carry JSON constants, tensors, "
                     "dtypes, devices and slices only")


def decode_value(data: Any, tensors: TensorReader, nodes: list[Node] | None = None, depth: int = 0) -> Any:
    """The value :func:`encode_value` encoded; ``nodes`` are the graph's nodes so far (``{"node": i}``)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"a value is nested deeper than {MAX_DEPTH} levels; refused")
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if isinstance(data, list):
        return [decode_value(item, tensors, nodes, depth + 1) for item in data]
    if not isinstance(data, dict) or len(data) not in (1, 2) or next(iter(data)) not in _TAGS:
        raise ValueError(f"unknown constant {_short(data)}; refused")
    tag, body = next(iter(data.items()))
    if tag == "node":
        if nodes is None or not isinstance(body, int) or isinstance(body, bool) or not 0 <= body < len(nodes):
            raise ValueError(f"node index {body!r} is out of range (the graph has {len(nodes or ())} nodes before "
                             "this reference); refused")
        return nodes[body]
    if tag == "tensor":
        return tensors.get(data)
    if tag in ("tuple", "slice", "dict", "size", "complex") and not isinstance(body, list):
        raise ValueError(f"malformed {tag} constant {_short(data)}; refused")
    if tag == "tuple":
        return tuple(decode_value(item, tensors, nodes, depth + 1) for item in body)
    if tag == "dict":
        pairs = [decode_value(item, tensors, nodes, depth + 1) for item in body]
        if not all(isinstance(pair, list) and len(pair) == 2 for pair in pairs):
            raise ValueError("malformed dict constant; refused")
        return {_hashable(key): item for key, item in pairs}
    if tag == "slice":
        if len(body) != 3:
            raise ValueError("a slice has three parts; refused")
        return slice(*(decode_value(item, tensors, nodes, depth + 1) for item in body))
    if tag == "ellipsis":
        return Ellipsis
    if tag == "float":
        if body not in ("inf", "-inf", "nan"):
            raise ValueError(f"unknown float {body!r}; refused")
        return float(body)
    if tag == "complex":
        return complex(*body[:2])
    if tag == "size":
        if not all(isinstance(item, int) for item in body):
            raise ValueError("a torch.Size holds ints; refused")
        return torch.Size(body)
    if tag == "dtype":
        return _dtype(body)
    if tag == "device":
        try:
            return torch.device(body)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device {body!r}; refused") from None
    return _marker(body)


def _hashable(key: Any) -> Any:
    if isinstance(key, list):
        raise ValueError("a dict key must be hashable; refused")
    return key


def _dtype(name: Any) -> torch.dtype:
    value = getattr(torch, name, None) if isinstance(name, str) and _NAME.match(name) else None
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}; refused")
    return value


def _marker_name(value: Any) -> str | None:
    from .execution import SKIPPED_VALUE, UNBOUND
    return {id(UNBOUND): "unbound", id(SKIPPED_VALUE): "skipped"}.get(id(value))


def _marker(name: Any) -> Any:
    from .execution import SKIPPED_VALUE, UNBOUND
    markers = {"unbound": UNBOUND, "skipped": SKIPPED_VALUE}
    if name not in markers:
        raise ValueError(f"unknown marker {name!r}; refused")
    return markers[name]


def _short(data: Any) -> str:
    text = json.dumps(data)[:80] if _jsonable(data) else repr(data)[:80]
    return text


def _jsonable(data: Any) -> bool:
    try:
        json.dumps(data)
        return True
    except (TypeError, ValueError, RecursionError):
        return False


# ----------------------------------------------------------------------------------------- fake values
def dynamic_cache_layers(value: Any) -> list | None:
    """``[(keys, values), ...]`` of a Hugging Face ``DynamicCache`` whose every layer is a plain dynamic layer with
    tensors (what ``generate`` makes by default); ``None`` for anything else (sliding windows, offloading: opaque)."""
    if type(value).__name__ != "DynamicCache":
        return None
    from transformers.cache_utils import DynamicCache, DynamicLayer
    layers = getattr(value, "layers", None)
    if type(value) is not DynamicCache or not isinstance(layers, list) or not all(
            type(layer) is DynamicLayer and isinstance(layer.keys, torch.Tensor) and
            isinstance(layer.values, torch.Tensor) for layer in layers):
        return None
    return [(layer.keys, layer.values) for layer in layers]


def dynamic_cache(layers: list) -> Any:
    """A ``DynamicCache`` of these ``[keys, values]`` per layer (copies); ``ValueError`` for anything else."""
    from transformers.cache_utils import DynamicCache
    cache = DynamicCache()
    for index, layer in enumerate(layers):
        if not (isinstance(layer, list) and len(layer) == 2 and all(isinstance(part, torch.Tensor) for part in layer)):
            raise ValueError("a key/value cache holds [keys, values] tensors per layer; refused")
        cache.update(*layer, index)
    return cache


class FakeEncoder:
    """Describes fake values (shapes, strides, dtypes; which storage each tensor views) as JSON."""

    def __init__(self) -> None:
        self.storages: list[int] = []
        self._storage_ids: dict[Any, int] = {}

    def encode(self, value: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            return {"opaque": "deep"}
        if isinstance(value, torch.Tensor):
            return {"fake": self._tensor(value)}
        if value is None or isinstance(value, (bool, int, str)) or \
                (isinstance(value, float) and math.isfinite(value)):
            return value
        if isinstance(value, torch.Size):
            return {"size": list(value)}
        if isinstance(value, list):
            return [self.encode(item, depth + 1) for item in value]
        if isinstance(value, tuple) and not hasattr(value, "_fields"):
            return {"tuple": [self.encode(item, depth + 1) for item in value]}
        if isinstance(value, dict):
            items = [[key, self.encode(item, depth + 1)] for key, item in value.items() if isinstance(key, str)]
            kind = type(value)
            if kind is dict:
                return {"dict": items}
            return {"output": f"{kind.__module__}.{kind.__qualname__}", "items": items}
        layers = dynamic_cache_layers(value)
        if layers is not None and all(type(size) is int for pair in layers for part in pair for size in part.shape):
            return {"kv_cache": [self.encode(list(pair), depth + 1) for pair in layers]}  # a scan's cache
        return {"opaque": type(value).__name__}

    def _tensor(self, tensor: torch.Tensor) -> list:
        try:
            storage = tensor.untyped_storage()
            from torch.multiprocessing.reductions import StorageWeakRef
            key = StorageWeakRef(storage)
            if key not in self._storage_ids:
                self._storage_ids[key] = len(self.storages)
                self.storages.append(storage.nbytes())
            number, offset, stride = self._storage_ids[key], tensor.storage_offset(), list(tensor.stride())
        except (RuntimeError, NotImplementedError):
            number, offset, stride = None, 0, None
        return [list(tensor.shape), str(tensor.dtype).replace("torch.", ""), str(tensor.device), stride, offset,
                number]


class FakeDecoder:
    """Rebuilds fake tensors from :class:`FakeEncoder` descriptions in the shared ``FakeTensorMode``.

    ``device`` overrides the device the fakes report (a notebook sees saved values on its own CPU).
    """

    def __init__(self, storages: list, device: str | None = None):
        from .shapes import shared_fake_mode
        if not isinstance(storages, list) or not all(isinstance(size, int) and size >= 0 for size in storages):
            raise ValueError("malformed storage table; refused")
        self.mode = shared_fake_mode()
        self.sizes = storages
        self.device = device
        self._bases: dict[tuple[int, str], torch.Tensor] = {}

    def decode(self, data: Any, depth: int = 0) -> Any:
        if depth > MAX_DEPTH:
            raise ValueError(f"a fake value is nested deeper than {MAX_DEPTH} levels; refused")
        if data is None or isinstance(data, (bool, int, float, str)):
            return data
        if isinstance(data, list):
            return [self.decode(item, depth + 1) for item in data]
        if not isinstance(data, dict) or not data:
            raise ValueError(f"malformed fake value {_short(data)}; refused")
        tag, body = next(iter(data.items()))
        if tag == "fake":
            return self._tensor(body)
        if tag == "tuple" and isinstance(body, list):
            return tuple(self.decode(item, depth + 1) for item in body)
        if tag == "size" and isinstance(body, list):
            return torch.Size(body)
        if tag == "dict" and isinstance(body, list):
            return {str(key): self.decode(item, depth + 1) for key, item in body}
        if tag == "output" and isinstance(data.get("items"), list):
            items = {str(key): self.decode(item, depth + 1) for key, item in data["items"]}
            return _model_output(body, items)
        if tag == "opaque":
            return opaque_value(body)
        if tag == "kv_cache" and isinstance(body, list):
            with self.mode:
                return dynamic_cache([self.decode(layer, depth + 1) for layer in body])
        raise ValueError(f"malformed fake value {_short(data)}; refused")

    def _tensor(self, body: Any) -> torch.Tensor:
        if not isinstance(body, list) or len(body) != 6:
            raise ValueError("malformed fake tensor; refused")
        shape, dtype, device, stride, offset, number = body
        if not isinstance(shape, list) or not all(isinstance(size, int) and size >= 0 for size in shape):
            raise ValueError(f"malformed fake tensor shape {shape!r}; refused")
        dtype = _dtype(dtype)
        device = self.device or (device if isinstance(device, str) else "cpu")
        with self.mode:
            try:
                if isinstance(number, int) and 0 <= number < len(self.sizes) and isinstance(stride, list):
                    base = self._bases.get((number, device))
                    if base is None:
                        base = torch.empty(self.sizes[number], dtype=torch.uint8, device=device)
                        self._bases[(number, device)] = base
                    return base.view(dtype).as_strided(shape, stride, offset)
                return torch.empty(shape, dtype=dtype, device=device)
            except (RuntimeError, TypeError, ValueError):
                return torch.empty(shape, dtype=dtype, device="cpu")


def _model_output(name: Any, items: dict) -> Any:
    """A Hugging Face ``ModelOutput`` of the class named ``name`` (only classes from ``transformers`` that are
    already imported); a plain dict otherwise."""
    module_name, _, attribute = name.rpartition(".") if isinstance(name, str) else ("", "", "")
    module = sys.modules.get(module_name) if module_name.split(".")[0] == "transformers" else None
    kind = getattr(module, attribute, None) if module is not None and _NAME.match(attribute or "-") else None
    try:
        from transformers.utils import ModelOutput
    except ImportError:
        return items
    if isinstance(kind, type) and issubclass(kind, ModelOutput):
        try:
            return kind(**items)
        except TypeError:
            pass
    return items


_OPAQUE_TYPES: dict[str, type] = {}


class OpaqueValue:
    """Stands in for a value that does not travel (a key/value cache object): only its type name is known."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: not serialized>"


def opaque_value(name: Any) -> OpaqueValue:
    """An :class:`OpaqueValue` whose type is named ``name`` (so shapes print as they did before serializing)."""
    name = name if isinstance(name, str) and _NAME.match(name) else "Opaque"
    kind = _OPAQUE_TYPES.get(name)
    if kind is None:
        kind = _OPAQUE_TYPES[name] = type(name, (OpaqueValue,), {})
    return kind()


# ------------------------------------------------------------------------------------------------ nodes
class LoadedNode(Node):
    """A node read from JSON: it keeps the location and source text of the user's line from where it was built.

    Its fake value is decoded when first read (a server running the graph never reads it: building fake tensors
    was most of the time a request's decoding took); a malformed one raises ``ValueError`` then.
    """

    __slots__ = ("_where", "_source", "_fake_data", "_fakes")

    @property
    def fake(self) -> Any:
        fakes = self._fakes
        if fakes is not None:
            self._fakes = None
            _FAKE.__set__(self, fakes.decode(self._fake_data))
        return _FAKE.__get__(self)

    @fake.setter
    def fake(self, value: Any) -> None:
        self._fakes = None
        _FAKE.__set__(self, value)

    @property
    def location(self) -> str:
        return self._where

    @property
    def source_line(self) -> str:
        return self._source


_FAKE = Node.fake  # the slot LoadedNode.fake stores its decoded value in


def _target_to_json(node: Node, allow: AllowList) -> Any:
    op, target = node.op, node.target
    parameter = _parameter_of(target) if op == "call_function" else None
    if parameter is not None:
        return {"parameter": parameter}
    if op in ("call_function", "log", "new_list", "cond"):
        return allow.name_of(target)
    if op in ("call_method", "getattr"):
        return allow.check_method(target, op)
    if op in ("module_output", "module_inputs", "apply_module"):
        return target
    if op == "bridge":
        return list(target)
    return None


def _parameter_of(target: Any) -> list | None:
    """``[path, name, kind]`` of a parameter's node target (``net.layer1.weight`` in a trace), else ``None``."""
    from ..intervention.parameters import ParameterValue
    if isinstance(target, ParameterValue):
        return [target.path, target.name, target.kind]
    return None


def _parameter_from_json(body: Any) -> Any:
    """The ``ParameterValue`` named ``[path, name, kind]`` (data: which tensor of which module; never code)."""
    from ..intervention.parameters import ParameterValue
    if not (isinstance(body, list) and len(body) == 3 and all(isinstance(part, str) for part in body)):
        raise ValueError(f"a parameter is [module path, name, kind], not {_short(body)}; refused")
    path, name, kind = body
    if (path and not all(_PATH_PART.match(part) for part in path.split("."))) or not _NAME.match(name) or \
            kind not in PARAMETER_KINDS:
        raise ValueError(f"{_short(body)} does not name a parameter or buffer of a module; refused")
    return ParameterValue(path, name, kind)


def _target_from_json(op: str, target: Any, allow: AllowList) -> Any:
    if op == "call_function" and isinstance(target, dict) and set(target) == {"parameter"}:
        return _parameter_from_json(target["parameter"])
    if op in ("call_function", "log", "new_list", "cond"):
        return allow.resolve(target)
    if op in ("call_method", "getattr"):
        return allow.check_method(target, op)
    if op in ("module_output", "module_inputs", "apply_module"):
        if not isinstance(target, str) or (target and not all(_PATH_PART.match(part) for part in target.split("."))):
            raise ValueError(f"{target!r} is not a module path; refused")
        return target
    if op == "bridge":
        if not (isinstance(target, list) and len(target) == 2 and all(isinstance(item, int) for item in target)):
            raise ValueError(f"a bridge names (trace, node), not {target!r}; refused")
        return tuple(target)
    if target is not None:
        raise ValueError(f"a {op} node has no target, but names {_short(target)}; refused")
    return None


def dumps(graph: Graph, tensors: TensorWriter | None = None, allow: AllowList | None = None) -> dict:
    """The graph as a JSON-able dict; its tensors go into ``tensors`` (see :func:`to_json` for one string)."""
    allow = allow or AllowList.default()
    tensors = tensors if tensors is not None else TensorWriter()
    fakes = FakeEncoder()
    nodes = []
    for node in graph.nodes:
        try:
            nodes.append({
                "op": node.op, "target": _target_to_json(node, allow),
                "args": encode_value(list(node.args), tensors), "kwargs": encode_value(node.kwargs, tensors),
                "file": node.filename, "line": node.lineno,
                "where": node.location if node.lineno else "", "source": node.source_line if node.lineno else "",
                "saved": node.saved, "section": node.section, "branch": list(node.branch) if node.branch else None,
                "alias": node.alias, "deps": list(node.dependencies), "meta": encode_value(node.meta, tensors),
                "fake": fakes.encode(node.fake),
            })
        except ValueError as error:
            where = f" ({node.location} `{node.source_line}`)" if node.lineno else ""
            raise ValueError(f"%{node.index} {node.describe()}{where}: {error}") from None
    return {"format": FORMAT, "version": VERSION, "nodes": nodes,
            "sections": [encode_value(section.steps.steps, tensors) for section in graph.sections],
            "writes": [[index, root] for index, root in graph.writes.items()], "storages": fakes.storages}


def loads(data: Any, tensors: TensorReader | None = None, allow: AllowList | None = None,
          fake_device: str | None = None) -> Graph:
    """The graph :func:`dumps` described, checked node by node; ``ValueError`` naming anything refused."""
    allow = allow or AllowList.default()
    tensors = tensors or TensorReader(None)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"not a serialized graph (its format must be {FORMAT!r})")
    if data.get("version") != VERSION:
        raise ValueError(f"serialized graph version {data.get('version')!r}; this version reads {VERSION}")
    raw_nodes, raw_sections = data.get("nodes"), data.get("sections", [])
    if not isinstance(raw_nodes, list) or not isinstance(raw_sections, list) or len(raw_nodes) > MAX_NODES:
        raise ValueError(f"a graph holds a list of at most {MAX_NODES} nodes; refused")
    graph = Graph()
    for steps in raw_sections:
        try:
            graph.sections.append(Section(len(graph.sections), StepSet(decode_value(steps, tensors))))
        except TypeError as error:
            raise ValueError(f"malformed iteration steps: {error}") from None
    fakes = FakeDecoder(data.get("storages", []), fake_device)
    for position, raw in enumerate(raw_nodes):
        try:
            graph.nodes.append(_load_node(position, raw, graph, tensors, allow, fakes))
        except ValueError as error:
            raise ValueError(f"node %{position}: {error}") from None
    for index, root in _pairs(data.get("writes", []), len(graph.nodes)):
        graph.writes[index] = root
    for node in graph.nodes:
        for dependency in node.dependencies:
            graph.nodes[dependency].listeners.append(node.index)
        if node.section is not None:
            graph.sections[node.section].nodes.append(node.index)
        if node.is_entry:
            graph.entry_indices.append(node.index)
        elif node.op == "swap":
            graph.swap_indices.append(node.index)
    try:
        graph.lint()
    except AssertionError as error:
        raise ValueError(f"the graph is inconsistent: {error}") from None
    return graph


def _load_node(position: int, raw: Any, graph: Graph, tensors: TensorReader, allow: AllowList,
               fakes: FakeDecoder) -> Node:
    if not isinstance(raw, dict):
        raise ValueError("a node is a JSON object; refused")
    op = raw.get("op")
    if op not in OPS:
        raise ValueError(f"unknown op {op!r} (the closed set: {', '.join(sorted(OPS))}); refused")
    target = _target_from_json(op, raw.get("target"), allow)
    args = decode_value(raw.get("args", []), tensors, graph.nodes)
    kwargs = decode_value(raw.get("kwargs", {"dict": []}), tensors, graph.nodes)
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(isinstance(key, str) for key in kwargs):
        raise ValueError("args must be a list and kwargs a dict with string keys; refused")
    filename, lineno = raw.get("file", ""), raw.get("line", 0)
    if not isinstance(filename, str) or not isinstance(lineno, int):
        raise ValueError("a node's file is a string and its line an int; refused")
    node = LoadedNode(position, op, target, tuple(args), kwargs, filename, lineno)
    where, source = raw.get("where", ""), raw.get("source", "")
    node._where = where if isinstance(where, str) and where else describe_location(filename, lineno)
    node._source = source if isinstance(source, str) else ""
    node.saved = raw.get("saved") is True
    node.section = _index_or_none(raw.get("section"), len(graph.sections), "section")
    branch = raw.get("branch")
    if branch is not None:
        if not (isinstance(branch, list) and len(branch) == 2 and isinstance(branch[1], bool)):
            raise ValueError("a branch is [cond index, taken_when]; refused")
        node.branch = (_index_or_none(branch[0], position, "branch condition"), branch[1])
    node.alias = _index_or_none(raw.get("alias"), position, "alias")
    deps = raw.get("deps", [])
    if not isinstance(deps, list):
        raise ValueError("deps must be a list; refused")
    node.dependencies = tuple(_index_or_none(index, position, "dependency") for index in deps)
    node.data_dependencies = tuple(dict.fromkeys(each.index for each in iter_nodes((node.args, node.kwargs))))
    meta = decode_value(raw.get("meta", {"dict": []}), tensors)
    if not isinstance(meta, dict):
        raise ValueError("meta must be a dict; refused")
    node.meta = meta
    node._fake_data, node._fakes = raw.get("fake"), fakes
    return node


def _index_or_none(value: Any, limit: int, what: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise ValueError(f"{what} index {value!r} is out of range (0 to {limit - 1}); refused")
    return value


def _pairs(value: Any, limit: int) -> list[tuple[int, int]]:
    if not isinstance(value, list):
        raise ValueError("writes must be a list of [node, root] pairs; refused")
    pairs = []
    for pair in value:
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError("writes must be a list of [node, root] pairs; refused")
        pairs.append((_index_or_none(pair[0], limit, "write"), _index_or_none(pair[1], limit, "write")))
    return pairs


# ----------------------------------------------------------------------------------------- one string
def to_json(graph: Graph) -> str:
    """The graph as one JSON string; its tensors are a safetensors blob, base64-encoded, under ``"blob"``."""
    tensors = TensorWriter()
    data = dumps(graph, tensors)
    blob = tensors.blob()
    if blob:
        data["blob"] = base64.b64encode(blob).decode("ascii")
    return json.dumps(data, separators=(",", ":"), allow_nan=False)


def from_json(text: str | bytes) -> Graph:
    """The graph :func:`to_json` wrote; ``ValueError`` naming whatever is refused (see the module docstring)."""
    data = parse_json(text)
    blob = data.get("blob", "") if isinstance(data, dict) else ""
    if not isinstance(blob, str):
        raise ValueError("the blob must be a base64 string; refused")
    try:
        raw = base64.b64decode(blob.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        raise ValueError("the blob is not valid base64; refused") from None
    return loads(data, TensorReader(raw))


def parse_json(text: str | bytes) -> Any:
    """``json.loads`` that answers deep nesting and bad JSON with a ``ValueError`` (never a ``RecursionError``)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply; refused") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"not valid JSON: {error}") from None
