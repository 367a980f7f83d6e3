"""``serve(model, name=..., token=...)``: put a model in a Ray actor behind an authenticated HTTP front door.

In [1]: from nnsight_magic.remote import serve
In [2]: server = serve(lm, name="smol", token="s3cret")       # starts (or joins) a Ray cluster
In [3]: server.url
Out[3]: 'http://127.0.0.1:8737'
In [4]: serve(other_lm, name="gpt2", token="t2")              # a second model behind the same door
In [5]: server.shutdown()

The model actor gets one GPU when the cluster has one (``num_gpus``); Ray restarts it if it dies
(``max_restarts``). The model actor serves scans and runs on a port of its own (no Ray hop per request); the
front door at ``server.url`` tells clients where (``describe``). Both bind ``host``, ``127.0.0.1`` unless told
otherwise (with ``0.0.0.0`` the front door names the model's node by its IP). From a shell:
``python -m nnsight_magic.serve MODEL --name NAME --token-file F [--address RAY] [--host H] [--port P]``.
"""

from __future__ import annotations

import os
from typing import Any

from .door import Door, Limits, RayCalls, token_digest
from .worker import ModelWorker

NAMESPACE = "nnsight_magic"
_doors: dict[str, tuple[Any, int]] = {}  # host -> (door actor, port) started by this process


class Server:
    """A model being served: ``url`` to connect to, ``shutdown()`` to stop it (and the door, if it was the last).

    ``model_url`` is the model actor's own door, where clients send scans and runs (``describe`` tells them).
    """

    def __init__(self, url: str, name: str, door: Any, worker: Any, host: str, model_url: str | None = None):
        self.url = url
        self.model_url = model_url
        self.name = name
        self.door = door
        self.worker = worker
        self._host = host

    def shutdown(self) -> None:
        import ray
        if not ray.is_initialized():
            return
        left = ray.get(self.door.unregister.remote(self.name), timeout=30)
        ray.kill(self.worker, no_restart=True)
        if not left:
            try:
                ray.get(self.door.stop.remote(), timeout=30)
            finally:
                ray.kill(self.door, no_restart=True)
                if _doors.get(self._host, (None,))[0] is self.door:
                    del _doors[self._host]  # the shared door of this host is gone: the next serve starts one

    def __repr__(self) -> str:
        return f"<Server {self.name!r} at {self.url}>"


def serve(model: Any, name: str, token: str, *, host: str = "127.0.0.1", port: int | None = None,
          address: str | None = None, num_gpus: float | None = None, num_cpus: float = 0, max_restarts: int = 3,
          limits: Limits | None = None, timeout: float = 300.0, model_port: int = 0) -> Server:
    """Serve ``model`` (an ``NNsight``/``LanguageModel``, or a hub id, directory or ``"embedded"``) as ``name``.

    Args:
        token: the secret clients must send; compared as a SHA-256 digest, never stored in the clear.
        host, port: where the front door listens (a door this process started on ``host`` is reused when
            ``port`` is ``None``; a port given, ``0`` for a free one, gets a door of its own); the model's own
            door listens on ``host`` too, on ``model_port`` (``0``: a free one; a client that cannot reach it
            goes through the front door).
        address: a Ray cluster to join (``"auto"``, ``"ray://..."``); default: the running one, or a new local one.
        num_gpus: GPUs for the model actor (default: 1 when the cluster has a GPU, else 0).
        num_cpus: CPUs Ray reserves for the model actor (0: it may share a node's CPUs with others).
    """
    import ray
    if not token:
        raise ValueError("serve needs a token: clients must present it with every request")
    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(address=address, namespace=NAMESPACE, include_dashboard=False, log_to_driver=False)
    door, bound = _door(host, port, limits)
    if num_gpus is None:
        num_gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    source = ray.put(_source(model))  # held by the Server: a restarted actor rebuilds the model from it
    digest = token_digest(token)
    worker = ray.remote(ModelWorker).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts,
        max_concurrency=1).remote(source, name, door, digest, host, limits or Limits(), model_port)
    ray.get(worker.ready.remote(), timeout=timeout)
    ray.get(door.register.remote(name, RayCalls(worker), digest), timeout=30)
    server = Server(f"http://{host}:{bound}", name, door, worker, host,
                    ray.get(door.location.remote(name), timeout=30))
    server._source = source
    return server


def _door(host: str, port: int | None, limits: Limits | None) -> tuple[Any, int]:
    import ray
    if port is None and host in _doors:
        return _doors[host]
    door = ray.remote(Door).options(num_cpus=0, max_concurrency=1000).remote(limits)
    bound = ray.get(door.start.remote(host, port or 0), timeout=60)
    if port is None:
        _doors[host] = (door, bound)  # a door on a port one asked for is that server's own, never shared
    return door, bound


def _source(model: Any) -> dict:
    if isinstance(model, (str, os.PathLike)):
        return {"kind": "load", "model": os.fspath(model)}
    from ..models.nnsight import NNsight
    if not isinstance(model, NNsight):
        raise TypeError(f"serve takes an NNsight or LanguageModel (or a hub id, a directory, 'embedded'), not "
                        f"{type(model).__name__}")
    if not getattr(model, "dispatched", True):
        model.dispatch()  # a lazy LanguageModel: the actor gets the loaded weights, not the meta tree
    return {"kind": "object", "module": model._module, "tokenizer": getattr(model, "tokenizer", None),
            "language": hasattr(model, "tokenizer")}
