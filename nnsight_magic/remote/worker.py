"""The model's side of a server: one Ray actor holds the model and answers describe, scan and run requests.

In [1]: worker = ray.remote(ModelWorker).options(max_restarts=3, max_concurrency=1).remote(
   ...:     source, "smol", door, token_digest("s3cret"), "127.0.0.1", Limits())
In [2]: ray.get(worker.describe.remote())        # the model's tree, config, tokenizer, and "url": its own door
In [3]: ray.get(worker.run.remote(request_bytes, "request-id", 60.0, 1 << 28))   # the answer's bytes

Given a token digest, the actor serves HTTP itself: a :class:`~nnsight_magic.remote.door.Door` on a thread of its
process, for this model only, calling its methods in-process (no Ray hop per request). A restarted actor
listens on the port its first life had (the front door remembers it). Scans and runs, from either door, go
through one thread, so they run one at a time.

``source`` says where the model comes from: a wrapped model handed over by :func:`~nnsight_magic.remote.serve`
(Ray keeps the argument, so a restarted actor rebuilds the same model), or a hub id, a local directory or
``"embedded"`` to load inside the actor, next to its GPU. Every request is bytes in and bytes out
(:mod:`~nnsight_magic.remote.wire`); nothing from a client is unpickled or executed.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import tempfile
import threading
from typing import Any, Callable

import torch

from ..intervention.attention import ATTENTION_SETTINGS, attention_envoys, dropout_rate
from ..intervention.source_install import SourceUse, describe_operations, operations_of, split_path
from ..intervention.source_rewrite import SourceUnavailable
from ..tracing import serialize
from ..tracing.serialize import FakeDecoder, FakeEncoder, TensorReader, TensorWriter, decode_value
from .door import Door, Limits, LocalCalls
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
    tree = {"type": type(module).__name__, "list": isinstance(module, torch.nn.ModuleList),
            "extra": module.extra_repr(), "repr": "" if module._modules else repr(module), "tensors": tensors,
            "training": module.training,
            "children": [[name, module_tree(child)] for name, child in module._modules.items() if child is not None]}
    settings = attention_settings(module)
    if settings is not None:
        tree["attention"] = settings
    return tree


def attention_settings(module: torch.nn.Module) -> dict | None:
    """What ``attn.pattern`` reads of an attention module besides its weights (numbers only), or ``None``."""
    if not isinstance(module, tuple(attention_envoys())):
        return None
    settings = {name: getattr(module, name) for name in ATTENTION_SETTINGS if hasattr(module, name)}
    settings["attention_dropout"] = dropout_rate(module)
    return {name: value for name, value in settings.items() if isinstance(value, (bool, int, float, type(None)))}


class ModelWorker:
    """Holds one model; see the module docstring.

    Args:
        door: the front door (a Ray actor handle): told each generation step of a run it sent, and where this
            actor's own door listens.
        digest, host, limits, port: this actor's own door's token digest, address, limits and port (no digest:
            no door; port ``0``: a free one).
    """

    def __init__(self, source: dict, name: str, door: Any = None, digest: str | None = None,
                 host: str = "127.0.0.1", limits: Limits | None = None, port: int = 0):
        self.name = name
        self.door = door
        self.model = load_model(source)
        self._twins: dict[int, torch.nn.Module] = {}  # fake mode id -> the model's fake twin (module scans)
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
        self._own: Door | None = None
        self.url: str | None = None
        if digest is not None:
            self._listen(digest, host, limits or Limits(), port)

    def _listen(self, digest: str, host: str, limits: Limits, port: int) -> None:
        """Start this actor's own door on a thread with its own event loop; tell the front door its URL."""
        import ray
        previous = ray.get(self.door.location.remote(self.name), timeout=60) if self.door is not None else None
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="door", daemon=True).start()
        own = Door(limits)
        for wanted in dict.fromkeys(([int(previous.rsplit(":", 1)[1])] if previous else []) + [port, 0]):
            try:
                port = asyncio.run_coroutine_threadsafe(own.start(host, wanted), loop).result(60)
                break
            except OSError:
                if wanted == 0:
                    raise
        asyncio.run_coroutine_threadsafe(own.register(self.name, LocalCalls(self, self._thread), digest),
                                         loop).result(60)
        shown = ray.util.get_node_ip_address() if host in ("0.0.0.0", "::", "") else host
        self._own = own
        self.url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}"
        if self.door is not None:
            ray.get(self.door.locate.remote(self.name, self.url), timeout=60)

    def ready(self) -> str:
        return self.name

    def pid(self) -> int:
        return os.getpid()

    def runs(self) -> int:
        """How many run requests this actor's own door has received (since this actor last started)."""
        own = self._own
        return own.models[self.name].runs if own is not None else 0

    def describe(self) -> bytes:
        """The model's tree, config and tokenizer files: what a client needs to build traces without weights."""
        model = self.model
        module = model._module
        header: dict = {"name": self.name, "url": self.url, "tree": module_tree(module),
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
        return self._on_model_thread(self._scan, body)

    def module_scan(self, body: bytes) -> bytes:
        """The fake result of calling one module on fake arguments (``lm.lm_head(h)`` in a client's trace).

        The body holds the module's path and its arguments as :class:`FakeEncoder` describes them; the call runs on
        a fake twin of the model (no real weight is touched, no real memory used), so only shapes come back.
        """
        return self._on_model_thread(self._module_scan, body)

    def source(self, body: bytes) -> bytes:
        """The operations of one module's forward (``remote.layers[0].attn.source``), or of the function a call
        in a forward calls (``...attn.source.attention_interface_0``: known once a scan or run has called it):
        names, kinds, lines and the source text, as ``describe_operations`` gives them."""
        return self._on_model_thread(self._source, body)

    def _source(self, body: bytes) -> bytes:
        try:
            header, _ = unpack(body)
            path = header.get("path")
            if not isinstance(path, str):
                raise ValueError("a source request names a module's or an operation's path; refused")
            parts = split_path(path)
            try:
                with SourceUse(self.model, [parts[0]] if parts else []):  # an operation exists while installed
                    return pack({"operations": describe_operations(operations_of(self.model._submodule(path)))})
            except (KeyError, AttributeError):
                raise ValueError(f"this model has no module or operation {path!r}; refused") from None
        except (ValueError, SourceUnavailable) as error:
            return pack({"error": encode_error(error)})

    def run(self, body: bytes, request_id: str, seconds: float, max_bytes: int) -> bytes:
        """Run one request the front door sent (a trace, or a session's traces); the answer's bytes."""
        door = self.door

        def on_status(status: dict) -> None:
            if door is not None:  # waited for, so the client hears every status before the answer
                import ray
                try:
                    ray.get(door.status.remote(request_id, status), timeout=5)
                except ray.exceptions.RayError:
                    pass

        return self._on_model_thread(self.run_here, body, on_status, seconds, max_bytes)

    def _on_model_thread(self, method: Callable, *args: Any) -> bytes:
        """``method(*args)`` on the thread every scan and run goes through (a Ray call waits its turn there)."""
        if threading.current_thread().name.startswith("model"):
            return method(*args)
        return self._thread.submit(method, *args).result()

    def _scan(self, body: bytes) -> bytes:
        try:
            header, blob = unpack(body)
            tensors = TensorReader(blob)
            (prepared,) = decode_inputs([header.get("invoke")], tensors)
            options = decode_value(header.get("options", {"dict": []}), tensors)
            step, sources = header.get("step", 0), header.get("sources", [])
            if not isinstance(options, dict) or not isinstance(step, int) or not isinstance(sources, list) or \
                    not all(isinstance(path, str) for path in sources):
                raise ValueError("a scan request holds options (a dict), a step (an int) and sources (module "
                                 "paths); refused")
            with SourceUse(self.model, sources):
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

    def _module_scan(self, body: bytes) -> bytes:
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

    def run_here(self, body: bytes, on_status: Callable[[dict], None], seconds: float, max_bytes: int) -> bytes:
        """Run one request on this thread, telling ``on_status`` each generation step (and the tokens of a
        trace whose client streams them); the answer's bytes."""
        try:
            header, blob = unpack(body)
        except ValueError as error:
            return pack({"traces": [], "printed": "", "error": encode_error(error)})
        return execute(self.model, header, blob, seconds=seconds, on_status=on_status, max_bytes=max_bytes)


def encode_scan_request(prepared: Any, options: dict, step: int, sources: tuple[str, ...] = ()) -> bytes:
    """The body of a scan request for one prepared input; ``sources``: the modules whose forwards run rewritten
    (the trace reads their ``.source`` operations, whose shapes the scan then records too)."""
    from .wire import encode_inputs
    tensors = TensorWriter()
    (invoke,) = encode_inputs([prepared], tensors)
    return pack({"invoke": invoke, "options": serialize.encode_value(options, tensors), "step": step,
                 "sources": list(sources)}, tensors.blob())
