"""The HTTP front door: one async Ray actor runs uvicorn + Starlette and routes requests to model actors.

In [1]: door = ray.remote(Door).options(num_cpus=0).remote(Limits())
In [2]: port = ray.get(door.start.remote("127.0.0.1", 0))
In [3]: ray.get(door.register.remote("smol", worker, token_digest("s3cret")))

Routes (``POST``, ``Authorization: Bearer TOKEN``): ``/v1/NAME/describe``, ``/v1/NAME/scan``, ``/v1/NAME/run``.
The token is checked before the body is read (401), then the body's size (413). Requests to one model queue in
arrival order; ``run`` answers with a stream of frames (:func:`~nnsight_magic.remote.wire.frame`): the request's
place in the queue while it waits, ``running``, each generation step, then the answer (or the error). A run
that outlives the time limit by a grace period makes the door kill the model actor, which Ray restarts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import uuid
from typing import Any

from .wire import ERROR, RESULT, STATUS, frame


@dataclasses.dataclass
class Limits:
    """What one request may take: body bytes in, answer bytes out, seconds of running."""

    max_request_bytes: int = 64 << 20
    max_response_bytes: int = 256 << 20
    seconds: float = 120.0
    grace_seconds: float = 10.0


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class _Model:
    def __init__(self, worker: Any, digest: str):
        self.worker = worker
        self.digest = digest
        self.waiting: list[str] = []
        self.running: str | None = None
        self.runs = 0  # run requests received (a session is one)
        self.restarting = False  # the last run killed or lost the actor: wait until Ray has it back


class Door:
    """See the module docstring."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.models: dict[str, _Model] = {}
        self.streams: dict[str, asyncio.Queue] = {}
        self.server: Any = None

    async def start(self, host: str, port: int) -> int:
        """Serve HTTP on ``host:port`` (0: a free port) from this actor's event loop; return the port."""
        import uvicorn
        from starlette.applications import Starlette
        from starlette.routing import Route

        app = Starlette(routes=[Route("/v1/{name}/{action}", self._handle, methods=["POST"])])
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                                lifespan="off", timeout_keep_alive=30)
        self.server = uvicorn.Server(config)
        self._task = asyncio.get_running_loop().create_task(self.server.serve())
        for _ in range(1000):
            if self.server.started:
                break
            await asyncio.sleep(0.01)
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def register(self, name: str, worker: Any, digest: str) -> None:
        self.models[name] = _Model(worker, digest)

    async def unregister(self, name: str) -> int:
        self.models.pop(name, None)
        return len(self.models)

    async def runs(self, name: str) -> int:
        """How many run requests model ``name`` has received (a session of several traces counts once)."""
        return self.models[name].runs

    async def names(self) -> list[str]:
        return sorted(self.models)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            await self._task

    async def step(self, request_id: str, step: int) -> None:
        """A model actor tells the door that a request reached a generation step."""
        queue = self.streams.get(request_id)
        if queue is not None:
            queue.put_nowait(("step", step))

    # -------------------------------------------------------------------------------------------- HTTP
    async def _handle(self, request: Any) -> Any:
        from starlette.responses import Response, StreamingResponse

        name, action = request.path_params["name"], request.path_params["action"]
        model = self.models.get(name)
        if model is None:
            return _json(404, f"this server has no model named {name!r}; it serves: {', '.join(sorted(self.models))}")
        given = request.headers.get("authorization", "")
        token = given[7:] if given.startswith("Bearer ") else ""
        if not hmac.compare_digest(token_digest(token), model.digest):
            return _json(401, f"wrong or missing token for model {name!r}")
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return _json(411, "a request must say its length (Content-Length)")
        if int(length) > self.limits.max_request_bytes:
            return _json(413, f"the request is {length} bytes, over this server's limit of "
                              f"{self.limits.max_request_bytes} bytes")
        body = await request.body()
        if len(body) > self.limits.max_request_bytes:
            return _json(413, "the request is over this server's size limit")
        try:
            if action == "describe":
                return Response(await _patiently(lambda: model.worker.describe.remote()),
                                media_type="application/octet-stream")
            if action == "scan":
                return Response(await _patiently(lambda: model.worker.scan.remote(body)),
                                media_type="application/octet-stream")
            if action == "module_scan":
                return Response(await _patiently(lambda: model.worker.module_scan.remote(body)),
                                media_type="application/octet-stream")
        except Exception as error:  # the model actor died for good
            return _json(503, f"the model's worker is unavailable ({type(error).__name__}); try again")
        if action == "run":
            model.runs += 1
            return StreamingResponse(self._run(model, body), media_type="application/octet-stream")
        return _json(404, f"unknown action {action!r}; use describe, scan, module_scan or run")

    async def _run(self, model: _Model, body: bytes) -> Any:
        request_id = uuid.uuid4().hex
        queue: asyncio.Queue = asyncio.Queue()
        self.streams[request_id] = queue
        model.waiting.append(request_id)
        try:
            place = None
            while True:
                position = model.waiting.index(request_id) + (model.running is not None)
                if position == 0:
                    break
                if position != place:
                    place = position
                    yield _status({"status": "queued", "place": position})
                await queue.get()
            model.waiting.remove(request_id)
            model.running = request_id
            yield _status({"status": "running"})
            call = asyncio.ensure_future(self._call(model, body, request_id))
            while not call.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({call, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    event = getter.result()
                    if event is not None:
                        yield _status({"status": "step", "step": event[1]})
                else:
                    getter.cancel()
            kind, payload = call.result()
            yield frame(kind, payload)
        finally:
            if request_id in model.waiting:
                model.waiting.remove(request_id)
            if model.running == request_id:
                model.running = None
            self.streams.pop(request_id, None)
            for other in model.waiting:
                waiting = self.streams.get(other)
                if waiting is not None:
                    waiting.put_nowait(None)

    async def _call(self, model: _Model, body: bytes, request_id: str) -> tuple[bytes, bytes]:
        import ray
        limits = self.limits
        try:
            if model.restarting:  # so the time limit counts this request's run, not Ray's restart of the actor
                await _patiently(lambda: model.worker.ready.remote())
                model.restarting = False
            return RESULT, await asyncio.wait_for(
                model.worker.run.remote(body, request_id, limits.seconds, limits.max_response_bytes),
                limits.seconds + limits.grace_seconds)
        except asyncio.TimeoutError:
            model.restarting = True
            ray.kill(model.worker, no_restart=False)
            return ERROR, _error("TimeoutError", f"the request ran past the server's limit of {limits.seconds:g} s "
                                                 "and was stopped (the model's worker restarts)")
        except ray.exceptions.RayActorError:
            model.restarting = True
            return ERROR, _error("RuntimeError", "the model's worker stopped while running this request (Ray is "
                                                 "restarting it); run the trace again")


async def _patiently(call: Any, seconds: float = 60.0) -> Any:
    """``await call()``, calling again while Ray restarts the actor (``ActorUnavailableError``), for ``seconds``."""
    import ray
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while True:
        try:
            return await call()
        except ray.exceptions.ActorUnavailableError:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.2)


def _status(data: dict) -> bytes:
    return frame(STATUS, json.dumps(data).encode())


def _error(kind: str, message: str) -> bytes:
    return json.dumps({"type": kind, "message": message, "notes": []}).encode()


def _json(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse
    return JSONResponse({"error": message}, status_code=status)
