"""``RemoteModel``: trace a model that lives on a server as if it were here (no weights, no Ray: HTTP only).

In [1]: from nnsight_magic.remote import RemoteModel
In [2]: remote = RemoteModel("http://127.0.0.1:8737", "smol", token="s3cret")
In [3]: with remote.trace("The Eiffel Tower is in"):
   ...:     h = remote.model.layers[5].output.save()         # shapes known while building, from the server
In [4]: h.value                                              # a tensor on this machine's CPU (or device=)

The server sends the module tree (class names and children, no weights), the config, the tokenizer files and,
per new input shape, a fake-tensor scan, so building a trace here is the local code: the same graph, the same
errors at the same lines. When the block ends, the graph goes to the server as data; its answer binds the saved
values. Invokes, ``generate`` with steps, ``.grad``, ``stop``, edits and ``%%trace remote "prompt"`` work
unchanged; a session (``with remote.session():``, ``%%session``, ``%session run``) is one request. A module
called on a traced value (``remote.lm_head(h)``) gets its shape from the server (a ``module_scan`` on a fake
twin); the tree's parameters are weightless placeholders, so ``remote.layer1.weight`` in a trace has its shape.
Attention modules carry the settings ``attn.pattern`` reads; ``module.source`` lists what the server describes
(``source``), and the server runs the forward rewritten for its scans and runs. A ``streamer=`` given to
``generate`` gets the tokens as the server relays them. Observers of a trace hear
``request_status("queued", place)``, ``request_status("running", None)`` and ``step_started(step)``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import os
import secrets
import select
import tempfile
import threading
import time
import urllib.parse
from collections import OrderedDict
from typing import Any

import torch

from ..intervention.session import Session
from ..intervention.tracer import DONE, FAILED, RUNNING
from ..intervention.attention import AttentionEnvoy
from ..intervention.source_install import DescribedOperations, installed_sources
from ..models.language import LanguageModel
from ..models.nnsight import SCAN_CACHE_SIZE, NNsight, input_signature
from ..tracing.serialize import FakeDecoder, FakeEncoder
from ..tracing.shapes import ModuleScan
from .executor import decode_answer, encode_request
from .wire import ERROR, RESULT, STATUS, decode_error, pack, read_frame, unpack
from .worker import encode_scan_request


class Connection:
    """HTTP to one model of a server over kept-alive connections (one per thread).

    ``describe`` goes to the server's front door (``url``); its answer names the model's own door (``direct``),
    where scans and runs go, with no hop between the two processes. Each new connection to it first checks that it
    serves this model (``hello``: an HMAC keyed by the token's digest), so the token goes nowhere else (a
    tunnelled ``127.0.0.1`` port may belong to anything on this machine). A direct door that cannot be reached is
    looked up again through the front door (a restarted model actor, or a restarted server); if it still cannot
    be reached (the front door is behind a tunnel), requests go to the front door, which forwards them.
    A connection idle for less than :attr:`REUSE_SECONDS` is reused (the doors keep them 30 s) unless its server
    has closed it. A request that got no answer's headers is sent again (a door sends them before it begins a
    run, so the run never started): on a new connection, or, from a model's own door that broke it (its actor
    ending), once the front door has told where the restarted actor listens. A run that broke after its headers
    is never sent again (it may have run): it fails with a ``RuntimeError``.
    """

    REUSE_SECONDS = 10.0

    def __init__(self, url: str, name: str, token: str | None, timeout: float, max_answer_bytes: int):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"a server URL looks like http://HOST:PORT, not {url!r}")
        self.url, self.name, self.token = url, name, token or ""
        self.direct: str | None = None  # the model's own door, from describe
        self.timeout = timeout
        self.max_answer_bytes = max_answer_bytes
        self._local = threading.local()

    def _open(self, url: str) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection to ``url`` and whether it is a reused one (connected either way)."""
        kept, last = getattr(self._local, "connection", None), getattr(self._local, "last", 0.0)
        self._local.connection = None
        if kept is not None and kept.url == url and time.monotonic() - last < self.REUSE_SECONDS and \
                _open_and_quiet(kept):
            return kept, True
        if kept is not None:
            kept.close()
        parsed = urllib.parse.urlsplit(url)
        kind = http.client.HTTPSConnection if parsed.scheme == "https" else http.client.HTTPConnection
        connection = kind(parsed.hostname, parsed.port, timeout=self.timeout)
        connection.url, connection.prefix = url, parsed.path.rstrip("/")
        try:
            connection.connect()
            if url != self.url:
                self._check(connection)
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise _Unreachable(str(error)) from error
        return connection, False

    def _check(self, connection: http.client.HTTPConnection) -> None:
        """``ConnectionError`` unless the door at the other end proves it knows this model's token digest."""
        challenge = secrets.token_hex(16)
        connection.request("POST", f"{connection.prefix}/v1/{urllib.parse.quote(self.name, safe='')}/hello",
                           body=b"", headers={"X-Challenge": challenge})
        response = connection.getresponse()
        answer = response.read()
        key = hashlib.sha256(self.token.encode()).hexdigest().encode()
        expected = hmac.new(key, challenge.encode(), "sha256").hexdigest().encode()
        if response.status != 200 or response.will_close or not hmac.compare_digest(answer, expected):
            raise ConnectionError(f"{connection.url} does not prove it serves model {self.name!r}")

    def _keep(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        """Keep ``connection`` for the next request once ``response`` is read to its end."""
        if response.isclosed() and not response.will_close:
            self._local.connection, self._local.last = connection, time.monotonic()
        else:
            connection.close()

    def post(self, action: str, body: bytes) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        for attempt in range(3):
            url = self.url if action == "describe" or self.direct is None else self.direct
            try:
                connection, response = self._post(url, action, body)
                break
            except _Unreachable as error:
                if url == self.url:
                    raise ConnectionError(f"cannot reach the model server at {self.url}: {error}") from None
                if attempt == 0:
                    self.locate()        # waits while Ray restarts the model's actor
                else:
                    self.direct = None   # not reachable from here: through the front door
        if response.status != 200:
            text = response.read()
            connection.close()
            try:
                message = json.loads(text)["error"]
            except (ValueError, KeyError, TypeError):
                message = text[:200].decode(errors="replace")
            kind = {401: PermissionError, 404: LookupError, 413: ValueError}.get(response.status, ConnectionError)
            raise kind(f"the model server at {self.url} refused: {message}")
        return connection, response

    def _post(self, url: str, action: str, body: bytes) -> tuple[http.client.HTTPConnection,
                                                                   http.client.HTTPResponse]:
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/octet-stream"}
        while True:
            connection, reused = self._open(url)
            try:
                connection.request("POST", f"{connection.prefix}/v1/{urllib.parse.quote(self.name, safe='')}/"
                                           f"{action}", body=body, headers=headers)
                return connection, connection.getresponse()
            except (OSError, http.client.HTTPException) as error:
                connection.close()  # no answer's headers: the door never began this request (it sends them first)
                if reused:
                    continue  # the door closed the idle connection: send again on a new one
                if url != self.url:
                    raise _Unreachable(str(error)) from error  # a model actor ending or restarting: locate it again
                raise ConnectionError(f"cannot reach the model server at {url}: {error}") from error

    def locate(self) -> dict:
        """Describe the model through the front door; remember where its own door is. The description."""
        header, _ = self.call("describe")
        self.direct = header.get("url") if isinstance(header.get("url"), str) else None
        return header

    def call(self, action: str, body: bytes = b"") -> tuple[dict, bytes]:
        connection, response = self.post(action, body)
        try:
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            raise ConnectionError(f"the model server at {self.url} stopped answering: {error}") from error
        self._keep(connection, response)
        header, blob = unpack(data)
        if "error" in header:
            raise decode_error(header["error"])
        return header, blob

    def run(self, body: bytes, observers: list, streamers: list | None = None) -> bytes:
        """Send a run request; tell ``observers`` its queue place, start and steps, and ``streamers`` (one per
        trace, or ``None``) the tokens generated; return the answer's bytes."""
        connection, response = self.post("run", body)
        try:
            while True:
                try:
                    kind, payload = read_frame(response, self.max_answer_bytes)
                except (OSError, http.client.HTTPException) as error:
                    raise RuntimeError("the model's worker stopped (or the connection to it broke) while running "
                                       f"this request ({error}); run the trace again") from None
                if kind == STATUS:
                    _tell(observers, json.loads(payload), streamers)
                elif kind == RESULT:
                    response.read()  # the end of the stream, so the connection can carry the next request
                    self._keep(connection, response)
                    return payload
                elif kind == ERROR:
                    raise decode_error(json.loads(payload))
                else:
                    raise ConnectionError(f"the server sent an unknown frame {kind!r}")
        except BaseException:
            connection.close()
            raise


class _Unreachable(Exception):
    """No connection could be opened (nothing was sent)."""


def _open_and_quiet(connection: http.client.HTTPConnection) -> bool:
    """True when a kept connection's socket is still open and has nothing unread (a closed one reads as ready)."""
    sock = connection.sock
    if sock is None:
        return False
    try:
        return not select.select([sock], [], [], 0)[0]
    except (OSError, ValueError):
        return False


def _tell(observers: list, status: dict, streamers: list | None = None) -> None:
    if status.get("status") == "tokens":  # a generation's new tokens, for the streamer its trace was given
        trace = status.get("trace")
        streamer = streamers[trace] if streamers and isinstance(trace, int) and 0 <= trace < len(streamers) \
            else None
        if streamer is not None:
            streamer.put(torch.tensor(status.get("ids", []), dtype=torch.long))
        return
    for observer in observers:
        if status.get("status") == "step":
            observer.step_started(int(status["step"]))
        else:
            told = getattr(observer, "request_status", None)
            if told is not None:
                told(status.get("status"), status.get("place"))


class _Skeleton(torch.nn.Module):
    """A module of the server's model without weights: its class name, ``extra_repr``, children, and placeholders
    of its parameters and buffers (right shape and dtype, one element of memory: the values live on the server)."""

    def __init__(self, description: dict):
        super().__init__()
        self._type_name = description["type"]
        self._extra = description.get("extra", "")
        self._leaf_repr = description.get("repr", "")
        _add_placeholders(self, description)
        for name, child in description["children"]:
            self.add_module(name, skeleton(child))
        self.training = bool(description.get("training", False))  # its own flag only, as the server has it
        for name, value in description.get("attention", {}).items():
            setattr(self, name, value)  # what `attn.pattern` reads: heads, scaling, layer index, dropout

    def _get_name(self) -> str:
        return self._type_name

    def extra_repr(self) -> str:
        return self._extra

    def __repr__(self) -> str:
        return self._leaf_repr or super().__repr__()

    def described_operations(self) -> Any:
        """The operations of the server module's forward (``remote.h[0].attn.source``), as the server describes
        them (:meth:`RemoteModel.source_of`, asked once)."""
        return self.__dict__["_remote"].source_of(self.__dict__["_path"])

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """On fake tensors (building a trace: ``lm.lm_head(h)``), the server's fake result; else an error."""
        remote = self.__dict__.get("_remote")
        if remote is None or not _all_fake((args, kwargs)):
            raise NotImplementedError(f"{self._type_name}'s weights live on the server; call it inside a trace")
        return remote.module_scan(self.__dict__["_path"], args, kwargs)


class _SkeletonList(torch.nn.ModuleList, _Skeleton):
    def __init__(self, description: dict):
        torch.nn.Module.__init__(self)
        self._type_name = description["type"]
        self._extra = self._leaf_repr = ""
        self.training = bool(description.get("training", False))
        _add_placeholders(self, description)
        for name, child in description["children"]:
            self.add_module(name, skeleton(child))


def _all_fake(value: Any) -> bool:
    """True when every tensor in ``value`` is a fake tensor (and there is one)."""
    from torch._subclasses.fake_tensor import FakeTensor
    tensors = [item for item in torch.utils._pytree.tree_leaves(value) if isinstance(item, torch.Tensor)]
    return bool(tensors) and all(isinstance(item, FakeTensor) for item in tensors)


def _add_placeholders(module: torch.nn.Module, description: dict) -> None:
    """Parameters and buffers of the right shape and dtype that hold no weights (a zero-stride view of one zero),
    so a trace here gives ``module.weight`` the server's shape; reading their values outside a trace is
    meaningless, and inside one the server's own tensors are used."""
    from ..tracing.serialize import _dtype
    for name, kind, shape, dtype, grad in description.get("tensors", ()):
        placeholder = torch.zeros((), dtype=_dtype(dtype)).expand(*shape)
        if kind == "parameter":
            module.register_parameter(name, torch.nn.Parameter(placeholder, requires_grad=bool(grad)))
        else:
            module.register_buffer(name, placeholder)


class _AttentionSkeleton(_Skeleton):
    """An attention module of the server's model (GPT-2- or Llama-style): its Envoy has ``.pattern``."""


def skeleton(description: dict) -> torch.nn.Module:
    """The weightless module tree the server described."""
    if description.get("list"):
        return _SkeletonList(description)
    return (_AttentionSkeleton if "attention" in description else _Skeleton)(description)


class RemoteModel(NNsight):
    """A model on a server, traced here; see the module docstring.

    Args:
        url: the server (``server.url``).
        name: the model's name on the server.
        token: the server's token for this model (a wrong or missing one raises ``PermissionError``).
        device: where saved values arrive (default: this machine's CPU).
        timeout: seconds to wait for the server (queue and run included).
    """

    def __new__(cls, url: str, name: str, token: str | None = None, **options: Any) -> "RemoteModel":
        connection = Connection(url, name, token, options.get("timeout", 600.0),
                                options.get("max_answer_bytes", 1 << 30))
        description = connection.locate()
        kind = RemoteLanguageModel if description.get("language") else cls
        instance = object.__new__(kind)
        object.__setattr__(instance, "_pending", (connection, description))
        return instance

    def __init__(self, url: str, name: str, token: str | None = None, *, device: Any = None,
                 timeout: float = 600.0, max_answer_bytes: int = 1 << 30):
        connection, description = self.__dict__.pop("_pending")
        module = skeleton(description["tree"])
        _attach_configs(module, description)
        if isinstance(self, LanguageModel):
            LanguageModel.__init__(self, module, tokenizer=_tokenizer(description.get("tokenizer")),
                                   envoys={_AttentionSkeleton: AttentionEnvoy})
            object.__setattr__(self, "_forward_parameters", set(description.get("forward_parameters", ())))
        else:
            NNsight.__init__(self, module)
        object.__setattr__(self, "_connection", connection)
        object.__setattr__(self, "_module_scans", OrderedDict())
        object.__setattr__(self, "_sources_described", {})  # module or operation path -> its operations
        for path, child in module.named_modules():
            child.__dict__.update(_remote=self, _path=path)  # plain attributes: the skeleton asks for its shapes
        object.__setattr__(self, "_result_device", device)
        object.__setattr__(self, "_server_device", description.get("device"))

    # ------------------------------------------------------------------------------------------ hooks
    def _run_session(self, session: Session) -> None:
        """Run a session of this model's traces (``with remote.session():``, ``%%session``, ``%session run``)
        on the server as one request, later traces reading earlier values there."""
        session.status = "running"
        try:
            self._send(session.tracers, encode_request(session.tracers))
        except BaseException:
            session.status = "failed"
            raise
        session.status = "done"

    def _scan(self, prepared: Any, options: dict, step: int = 0) -> ModuleScan | None:
        """The server's fake-tensor scan of this input (cached per input signature)."""
        step = step if options.get("generate") else 0
        sources = installed_sources(self._module)  # `.source` read in the trace: the server scans them too
        key = ("remote", step, input_signature(prepared.args), input_signature(prepared.kwargs),
               input_signature(options), sources)
        cache = self._scan_cache
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        header, _ = self._connection.call("scan", encode_scan_request(prepared, options, step, sources))
        cache[key] = scan = _rebuild_scan(header)
        if len(cache) > SCAN_CACHE_SIZE:
            cache.popitem(last=False)
        return scan

    def module_scan(self, path: str, args: tuple, kwargs: dict) -> Any:
        """The fake result of the module at ``path`` on fake ``args`` (from the server, cached per signature)."""
        key = (path, input_signature(args), input_signature(kwargs))
        cache = self._module_scans
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        fakes = FakeEncoder()
        body = pack({"path": path, "args": fakes.encode(tuple(args)), "kwargs": fakes.encode(dict(kwargs)),
                     "storages": fakes.storages})
        header, _ = self._connection.call("module_scan", body)
        cache[key] = result = FakeDecoder(header.get("storages", []), device="cpu").decode(header.get("fake"))
        if len(cache) > SCAN_CACHE_SIZE:
            cache.popitem(last=False)
        return result

    def source_of(self, path: str) -> DescribedOperations:
        """The operations of the forward of the server's module at ``path`` (or of the function the call at an
        operation's path calls), as the server describes them; each asked once."""
        described = self._sources_described.get(path)
        if described is None:
            header, _ = self._connection.call("source", pack({"path": path}))
            described = DescribedOperations(header.get("operations"),
                                            lambda name: self.source_of(f"{path}.source.{name}"))
            self._sources_described[path] = described
        return described

    def _run_elsewhere(self, tracer: Any, bridges: dict | None, keep: frozenset, on_update: Any) -> Any:
        """Run ``tracer`` on the server (``run_trace`` hands remote traces here)."""
        request = encode_request([tracer], bridges=[bridges or {}], keep=[sorted(keep)])
        (answer,) = self._send([tracer], request)
        return answer

    def _send(self, tracers: list, request: bytes) -> list:
        observers = [observer for tracer in tracers for observer in tracer.observers]
        for tracer in tracers:
            tracer.status = RUNNING
        answers: list = []
        error: BaseException | None = None
        try:
            streamers = [tracer.run_options.get("streamer") for tracer in tracers]
            data = self._connection.run(request, observers, streamers)
            answers, printed, error = decode_answer([tracer.graph for tracer in tracers], data, self._result_device)
            if printed:
                print(printed, end="")
            for streamer in streamers:
                if streamer is not None and error is None:
                    streamer.end()  # as generate ends its streamer: every token has arrived
        except BaseException as exception:
            error = exception
        for position, tracer in enumerate(tracers):
            answer = answers[position] if position < len(answers) else None
            tracer.status = FAILED if error is not None else DONE
            tracer._detach(answer)
            for observer in tracer.observers:
                if answer is not None:
                    observer.run_finished(tracer, answer, error)
        if error is not None:
            raise error
        return answers

    def __repr__(self) -> str:
        return f"RemoteModel({self._connection.name!r} at {self._connection.url}: {self._module!r})"


class RemoteLanguageModel(RemoteModel, LanguageModel):
    """A remote Hugging Face causal LM: ``trace``, ``generate`` and the tokenizer, as :class:`LanguageModel`."""


def _attach_configs(module: torch.nn.Module, description: dict) -> None:
    config = description.get("config")
    if config is not None:
        from transformers import AutoConfig, PretrainedConfig
        try:
            values = dict(config)
            module.config = AutoConfig.for_model(values.pop("model_type"), **values)
        except (KeyError, ValueError, TypeError):
            module.config = PretrainedConfig(**config)
    generation = description.get("generation_config")
    if generation is not None:
        from transformers import GenerationConfig
        module.generation_config = GenerationConfig.from_dict(generation)


def _tokenizer(files: dict | None) -> Any:
    if not files:
        return None
    from transformers import AutoTokenizer
    with tempfile.TemporaryDirectory() as directory:
        for name, content in files.items():
            if os.path.basename(name) != name or name.startswith("."):
                raise ValueError(f"the server sent a tokenizer file named {name!r}; refused")
            with open(os.path.join(directory, name), "wb") as file:
                file.write(base64.b64decode(content))
        return AutoTokenizer.from_pretrained(directory)


def _rebuild_scan(header: dict) -> ModuleScan | None:
    described = header.get("scan")
    if described is None:
        return None
    fakes = FakeDecoder(header.get("storages", []), device="cpu")
    scan = ModuleScan(fakes.mode)
    scan.outputs = {path: [fakes.decode(value) for value in values] for path, values in described["outputs"]}
    scan.inputs = {path: [tuple(fakes.decode(value)) for value in values] for path, values in described["inputs"]}
    scan.order = {(path, kind, call): position for path, kind, call, position in described["order"]}
    scan.result = fakes.decode(described["result"])
    return scan
