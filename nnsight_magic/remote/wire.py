"""What travels between a notebook and a model server: framed JSON plus one safetensors blob, both ways.

In [1]: body = pack({"kind": "run", ...}, blob)          # b"NNM1" + header length + JSON + safetensors
In [2]: header, blob = unpack(body)                     # checks the frame before anything is parsed

A trace travels as its graph (:mod:`nnsight_magic.tracing.serialize`), its invokes' inputs, its run options and
whether it needs autograd; results travel as the saved values (tensors in the blob, Hugging Face outputs by
class name, a ``DynamicCache`` as its keys and values per layer, anything else that cannot travel as a named
placeholder), the final status of every node, and what
the run printed. An error travels as its type name, message and notes; the client raises the same type when it
is a builtin exception (or ``OutOfOrderError``), else a ``RuntimeError`` naming the type.
"""

from __future__ import annotations

import builtins
import json
import struct
from typing import Any

import torch

from ..errors import OutOfOrderError
from ..intervention.cache import ModuleCache
from ..intervention.source_rewrite import SourceUnavailable
from ..tracing import serialize
from ..tracing.serialize import TensorReader, TensorWriter, decode_value, encode_value, opaque_value, parse_json

MAGIC = b"NNM1"
STATUS, RESULT, ERROR = b"s", b"r", b"e"   # kinds of the frames of a streamed answer
_ERROR_TYPES = {name: getattr(builtins, name) for name in (
    "ArithmeticError", "AssertionError", "AttributeError", "BufferError", "EOFError", "FloatingPointError",
    "ImportError", "IndexError", "KeyError", "LookupError", "MemoryError", "NameError", "NotImplementedError",
    "OSError", "OverflowError", "PermissionError", "RecursionError", "RuntimeError", "StopIteration",
    "TimeoutError", "TypeError", "UnboundLocalError", "ValueError", "ZeroDivisionError", "ConnectionError")}
_ERROR_TYPES["OutOfOrderError"] = OutOfOrderError
_ERROR_TYPES["SourceUnavailable"] = SourceUnavailable


# --------------------------------------------------------------------------------------------- frames
def pack(header: dict, blob: bytes = b"") -> bytes:
    """One message: ``NNM1``, the JSON header's length (4 bytes, little-endian), the header, the blob."""
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + struct.pack("<I", len(text)) + text + blob


def unpack(data: bytes) -> tuple[dict, bytes]:
    """The header and blob of a :func:`pack` message; ``ValueError`` for anything malformed."""
    if len(data) < 8 or data[:4] != MAGIC:
        raise ValueError("not an nnsight_magic message (it must start with NNM1 and a header length)")
    (length,) = struct.unpack("<I", data[4:8])
    if length > len(data) - 8:
        raise ValueError(f"the message header claims {length} bytes, more than the message holds; refused")
    header = parse_json(data[8:8 + length])
    if not isinstance(header, dict):
        raise ValueError("the message header must be a JSON object; refused")
    return header, data[8 + length:]


def frame(kind: bytes, payload: bytes) -> bytes:
    """One frame of a streamed answer: its kind (1 byte), its length (4 bytes), its payload."""
    return kind + struct.pack("<I", len(payload)) + payload


def read_frame(stream: Any, limit: int) -> tuple[bytes, bytes]:
    """The next frame of a streamed answer from a file-like ``stream``; ``ConnectionError`` if it ends early."""
    head = _read_exactly(stream, 5)
    kind, (length,) = head[:1], struct.unpack("<I", head[1:])
    if length > limit:
        raise ValueError(f"the server's answer is {length} bytes, over this client's limit of {limit}")
    return kind, _read_exactly(stream, length)


def _read_exactly(stream: Any, count: int) -> bytes:
    parts, missing = [], count
    while missing:
        chunk = stream.read(missing)
        if not chunk:
            raise ConnectionError("the server closed the connection before its answer was complete")
        parts.append(chunk)
        missing -= len(chunk)
    return b"".join(parts)


# -------------------------------------------------------------------------------------------- values
def encode_result(value: Any, tensors: TensorWriter, depth: int = 0) -> Any:
    """A saved value as JSON: like constants, plus Hugging Face outputs and placeholders for what cannot travel."""
    if depth > serialize.MAX_DEPTH:
        return {"opaque": "deep"}
    if isinstance(value, list):
        return {"list": [encode_result(item, tensors, depth + 1) for item in value]}
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return {"tuple": [encode_result(item, tensors, depth + 1) for item in value]}
    if isinstance(value, ModuleCache):  # tracer.cache(): path -> output, and .inputs
        return {"cache": encode_result(dict(value), tensors, depth + 1),
                "inputs": encode_result(value.inputs, tensors, depth + 1)}
    layers = serialize.dynamic_cache_layers(value)
    if layers is not None:  # a key/value cache: its keys and values per layer
        return {"kv_cache": [[encode_value(keys, tensors), encode_value(values, tensors)] for keys, values in layers]}
    if isinstance(value, dict):
        items = [[key, encode_result(item, tensors, depth + 1)] for key, item in value.items()
                 if isinstance(key, (str, int))]
        if type(value) is dict:
            return {"dict": items}
        kind = type(value)
        return {"output": f"{kind.__module__}.{kind.__qualname__}", "items": items}
    try:
        return encode_value(value, tensors)
    except ValueError:
        return {"opaque": type(value).__name__}


def decode_result(data: Any, tensors: TensorReader, depth: int = 0) -> Any:
    """The value :func:`encode_result` encoded."""
    if depth > serialize.MAX_DEPTH:
        raise ValueError("a result is nested too deeply; refused")
    if isinstance(data, dict) and len(data) in (1, 2):
        tag, body = next(iter(data.items()))
        if tag == "list" and isinstance(body, list):
            return [decode_result(item, tensors, depth + 1) for item in body]
        if tag == "tuple" and isinstance(body, list):
            return tuple(decode_result(item, tensors, depth + 1) for item in body)
        if tag == "dict" and isinstance(body, list):
            return {key: decode_result(item, tensors, depth + 1) for key, item in body}
        if tag == "output":
            items = {str(key): decode_result(item, tensors, depth + 1) for key, item in data.get("items", [])}
            return serialize._model_output(body, items)
        if tag == "opaque":
            return opaque_value(body)
        if tag == "kv_cache" and isinstance(body, list):
            return serialize.dynamic_cache([decode_value(layer, tensors) for layer in body])
        if tag == "cache":
            outputs, inputs = (decode_result(part, tensors, depth + 1) for part in (body, data.get("inputs")))
            if not isinstance(outputs, dict) or not isinstance(inputs, dict):
                raise ValueError("a module cache holds two dicts; refused")
            return ModuleCache(outputs, inputs)
    return decode_value(data, tensors)


def encode_inputs(invokes: list, tensors: TensorWriter) -> list:
    """Each invoke's prepared input (``args``, ``kwargs``, rows)."""
    return [{"args": encode_value(list(each.args), tensors), "kwargs": encode_value(each.kwargs, tensors),
             "rows": each.batch_size} for each in invokes]


def decode_inputs(data: Any, tensors: TensorReader) -> list:
    from ..models.nnsight import PreparedInput
    if not isinstance(data, list):
        raise ValueError("invokes must be a list; refused")
    invokes = []
    for each in data:
        if not isinstance(each, dict):
            raise ValueError("an invoke is a JSON object; refused")
        args, kwargs, rows = decode_value(each.get("args", []), tensors), decode_value(each.get("kwargs"), tensors), \
            each.get("rows")
        if not isinstance(args, list) or not isinstance(kwargs, dict) or not isinstance(rows, int):
            raise ValueError("an invoke holds args (a list), kwargs (a dict) and rows (an int); refused")
        invokes.append(PreparedInput(tuple(args), kwargs, rows))
    return invokes


# -------------------------------------------------------------------------------------------- errors
def encode_error(error: BaseException) -> dict:
    """An exception as JSON: type name, message, notes."""
    message = error.args[0] if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    return {"type": type(error).__name__, "message": message, "notes": list(getattr(error, "__notes__", []))}


def decode_error(data: Any) -> BaseException:
    """The exception :func:`encode_error` described: the same type when it is a known one."""
    if not isinstance(data, dict):
        return RuntimeError(f"the server failed without saying why: {data!r}"[:300])
    name, message = str(data.get("type", "RuntimeError")), str(data.get("message", ""))
    kind = _ERROR_TYPES.get(name)
    error = kind(message) if kind is not None else RuntimeError(f"{name} on the server: {message}")
    for note in data.get("notes", []) or []:
        error.add_note(str(note))
    return error


def tensors_equal(first: Any, second: Any) -> bool:
    """Exact equality of nested values (tensors by ``torch.equal``); for tests and benchmarks."""
    if isinstance(first, torch.Tensor):
        return isinstance(second, torch.Tensor) and first.dtype == second.dtype and torch.equal(first, second)
    if isinstance(first, (list, tuple)):
        return type(first) is type(second) and len(first) == len(second) and \
            all(tensors_equal(a, b) for a, b in zip(first, second))
    if isinstance(first, dict):
        return list(first) == list(second) and all(tensors_equal(first[key], second[key]) for key in first)
    return first == second
