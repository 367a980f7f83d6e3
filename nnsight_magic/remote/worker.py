"""The model's side of a server: one Ray actor holds the model and answers describe, scan and run requests.

In [1]: worker = ray.remote(ModelWorker).options(max_restarts=3, max_concurrency=1).remote(source, "smol", door)
In [2]: ray.get(worker.run.remote(request_bytes, "request-id", 60.0, 1 << 28))   # the answer's bytes

``source`` says where the model comes from: a wrapped model handed over by :func:`~nnsight_magic.remote.serve`
(Ray keeps the argument, so a restarted actor rebuilds the same model), or a hub id, a local directory or
``"embedded"`` to load inside the actor, next to its GPU. Every request is bytes in and bytes out
(:mod:`~nnsight_magic.remote.wire`); nothing from a client is unpickled or executed.
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from typing import Any

import torch

from ..tracing import serialize
from ..tracing.serialize import FakeDecoder, FakeEncoder, TensorReader, TensorWriter, decode_value
from .executor import execute
from .wire import decode_inputs, encode_error, pack, unpack


def load_model(source: dict) -> Any:
    """The wrapped model ``source`` names (see the module docstring), on the GPU when this actor has one."""
    from ..models.language import LanguageModel
    from ..models.nnsight import NNsight
    if source["kind"] == "object":
        module, tokenizer, language = source["module"], source.get("tokenizer"), source.get("language")
        if torch.cuda.is_available() and not getattr(module, "hf_device_map", None):
            module = module.to("cuda")
        return LanguageModel(module, tokenizer=tokenizer) if language else NNsight(module)
    name = source["model"]
    if name == "embedded":
        from ..models.embedded import load_embedded_model
        model = load_embedded_model()
        return model.to("cuda") if torch.cuda.is_available() else model
    options = {"device_map": "auto"} if torch.cuda.device_count() > 1 else {}
    model = LanguageModel(name, dispatch=True, **options)  # the weights now: a server runs traces directly
    return model.to("cuda") if torch.cuda.is_available() and not options else model


def module_tree(module: torch.nn.Module) -> dict:
    """The module tree without weights: each module's class name, ``extra_repr``, children, and the shape, dtype
    and kind of its own parameters and buffers (so ``net.layer1.weight`` in a client's trace has a shape)."""
    tensors = [[name, kind, list(tensor.shape), str(tensor.dtype).replace("torch.", ""), bool(tensor.requires_grad)]
               for kind, table in (("parameter", module._parameters), ("buffer", module._buffers))
               for name, tensor in table.items() if tensor is not None]
    return {"type": type(module).__name__, "list": isinstance(module, torch.nn.ModuleList),
            "extra": module.extra_repr(), "repr": "" if module._modules else repr(module), "tensors": tensors,
            "children": [[name, module_tree(child)] for name, child in module._modules.items() if child is not None]}


class ModelWorker:
    """Holds one model; see the module docstring. ``door`` is told each generation step of a running request."""

    def __init__(self, source: dict, name: str, door: Any = None):
        self.name = name
        self.door = door
        self.model = load_model(source)
        self._twins: dict[int, torch.nn.Module] = {}  # fake mode id -> the model's fake twin (module scans)

    def ready(self) -> str:
        return self.name

    def pid(self) -> int:
        return os.getpid()

    def describe(self) -> bytes:
        """The model's tree, config and tokenizer files: what a client needs to build traces without weights."""
        model = self.model
        module = model._module
        header: dict = {"name": self.name, "tree": module_tree(module),
                        "language": hasattr(model, "tokenizer"), "device": str(model.device)}
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_json_string"):
            header["config"] = json.loads(config.to_json_string(use_diff=False))
        generation = getattr(module, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_string"):
            header["generation_config"] = json.loads(generation.to_json_string(use_diff=False))
        if header["language"]:
            header["forward_parameters"] = sorted(model._forward_parameters)
            tokenizer = model.tokenizer
            if tokenizer is not None:
                with tempfile.TemporaryDirectory() as directory:
                    tokenizer.save_pretrained(directory)
                    header["tokenizer"] = {name: base64.b64encode(open(os.path.join(directory, name), "rb").read())
                                           .decode("ascii") for name in sorted(os.listdir(directory))}
        return pack(header)

    def scan(self, body: bytes) -> bytes:
        """The fake-tensor scan of one input: every module call's shapes, as :class:`FakeEncoder` describes them."""
        try:
            header, blob = unpack(body)
            tensors = TensorReader(blob)
            (prepared,) = decode_inputs([header.get("invoke")], tensors)
            options = decode_value(header.get("options", {"dict": []}), tensors)
            step = header.get("step", 0)
            if not isinstance(options, dict) or not isinstance(step, int):
                raise ValueError("a scan request holds options (a dict) and a step (an int); refused")
            scan = self.model._scan(prepared, options, step)
        except Exception as error:
            return pack({"error": encode_error(error)})
        if scan is None:
            return pack({"scan": None})
        fakes = FakeEncoder()
        described = {
            "outputs": [[path, [fakes.encode(value) for value in values]] for path, values in scan.outputs.items()],
            "inputs": [[path, [fakes.encode(value) for value in values]] for path, values in scan.inputs.items()],
            "order": [[path, kind, call, position] for (path, kind, call), position in scan.order.items()],
            "result": fakes.encode(scan.result),
        }
        return pack({"scan": described, "storages": fakes.storages})

    def module_scan(self, body: bytes) -> bytes:
        """The fake result of calling one module on fake arguments (``lm.lm_head(h)`` in a client's trace).

        The body holds the module's path and its arguments as :class:`FakeEncoder` describes them; the call runs on
        a fake twin of the model (no real weight is touched, no real memory used), so only shapes come back.
        """
        from ..tracing.twin import fake_twin
        try:
            header, _ = unpack(body)
            path = header.get("path")
            self.model._submodule(path)      # a path this model has, else an error naming it
            fakes = FakeDecoder(header.get("storages", []), device=str(self.model.device))
            args, kwargs = fakes.decode(header.get("args")), fakes.decode(header.get("kwargs"))
            if not isinstance(args, tuple) or not isinstance(kwargs, dict):
                raise ValueError("a module scan holds args (a tuple) and kwargs (a dict); refused")
            mode = fakes.mode
            twin = self._twins.get(id(mode))
            if twin is None:
                twin = self._twins[id(mode)] = fake_twin(self.model._module, mode)
            with mode:
                result = (twin.get_submodule(path) if path else twin).forward(*args, **kwargs)
        except Exception as error:
            return pack({"error": encode_error(error)})
        encoder = FakeEncoder()
        return pack({"fake": encoder.encode(result), "storages": encoder.storages})

    def run(self, body: bytes, request_id: str, seconds: float, max_bytes: int) -> bytes:
        """Run one request (a trace, or a session's traces) and return the answer's bytes."""
        try:
            header, blob = unpack(body)
        except ValueError as error:
            return pack({"traces": [], "printed": "", "error": encode_error(error)})
        door = self.door

        def on_step(step: int) -> None:
            if door is not None:  # waited for, so the client hears every step before the answer
                import ray
                try:
                    ray.get(door.step.remote(request_id, step), timeout=5)
                except ray.exceptions.RayError:
                    pass

        return execute(self.model, header, blob, seconds=seconds, on_step=on_step, max_bytes=max_bytes)


def encode_scan_request(prepared: Any, options: dict, step: int) -> bytes:
    """The body of a scan request for one prepared input."""
    from .wire import encode_inputs
    tensors = TensorWriter()
    (invoke,) = encode_inputs([prepared], tensors)
    return pack({"invoke": invoke, "options": serialize.encode_value(options, tensors), "step": step},
                tensors.blob())
