"""An HTTP door (uvicorn + Starlette): the front door of a server, and each model actor's own door.

In [1]: door = ray.remote(Door).options(num_cpus=0).remote(Limits())            # the front door, a Ray actor
In [2]: port = ray.get(door.start.remote("127.0.0.1", 0))
In [3]: ray.get(door.register.remote("smol", RayCalls(worker), token_digest("s3cret")))

Each model actor also runs a door of its own, for its model only, on a thread of its process
(:class:`LocalCalls`: no Ray hop per request); the front door answers ``describe`` with that door's URL, and
clients send scans and runs there. The front door still runs them, through Ray, for a client that cannot reach
the model's own door (behind a tunnel to the front door's port).

Routes (``POST``, ``Authorization: Bearer TOKEN``): ``/v1/NAME/describe``, ``/v1/NAME/scan``,
``/v1/NAME/module_scan``, ``/v1/NAME/source`` (a module's ``.source`` listing), ``/v1/NAME/run``;
``/v1/NAME/hello`` (no token) answers ``HMAC-SHA256(sha256(token), X-Challenge)``, so a client can check that a
door it was pointed to serves the model before it sends the token there.
The token is checked before the body is read (401), then the body's size (413). Requests to one model queue in
arrival order; ``run`` answers with a stream of frames (:func:`~nnsight_magic.remote.wire.frame`): the request's
place in the queue while it waits, ``running``, each generation step, then the answer (or the error). A run
that outlives the time limit by a grace period gets a ``TimeoutError`` frame, then the model actor is killed (by
the front door through Ray; by its own door, once the frame is sent, by ending its process), and Ray restarts it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import hashlib
import hmac
import json
import os
import uuid
from typing import Any, Callable

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
    def __init__(self, calls: Any, digest: str):
        self.calls = calls  # RayCalls or LocalCalls: how this door reaches the model
        self.digest = digest
        self.waiting: list[str] = []
        self.running: str | None = None
        self.runs = 0  # run requests received (a session is one)


class RayCalls:
    """The front door's way to a model actor: Ray calls to its handle ``worker``."""

    def __init__(self, worker: Any):
        self.worker = worker
        self.restarting = False  # the last run killed or lost the actor: wait until Ray has it back

    async def ask(self, action: str, body: bytes) -> bytes:
        """``describe``, ``scan``, ``module_scan`` or ``source``, waiting while Ray restarts the actor."""
        method = getattr(self.worker, action)
        return await _patiently(lambda: method.remote() if action == "describe" else method.remote(body))

    async def run(self, body: bytes, request_id: str, limits: Limits, door: "Door") -> tuple[bytes, bytes, Any]:
        """The answer frame's kind and payload, and ``None`` (what to do once it is sent: nothing)."""
        import ray
        try:
            if self.restarting:  # so the time limit counts this request's run, not Ray's restart of the actor
                await _patiently(lambda: self.worker.ready.remote())
                self.restarting = False
            return RESULT, await asyncio.wait_for(
                self.worker.run.remote(body, request_id, limits.seconds, limits.max_response_bytes),
                limits.seconds + limits.grace_seconds), None
        except asyncio.TimeoutError:
            self.restarting = True
            ray.kill(self.worker, no_restart=False)
            return ERROR, _timed_out(limits), None
        except ray.exceptions.RayActorError:
            self.restarting = True
            return ERROR, _error("RuntimeError", "the model's worker stopped while running this request (Ray is "
                                                 "restarting it); run the trace again"), None


class LocalCalls:
    """A model actor's own door's way to its model: the worker's methods, called in this process on one thread.

    ``worker`` has ``describe()``, ``scan(body)``, ``module_scan(body)`` and ``run_here(body, on_status, seconds,
    max_bytes)``; ``thread`` is the one-thread executor that every scan and run of the model goes through, so
    they stay serial (describe reads only the tree and runs beside them). A run past the time limit cannot be
    stopped in its thread: once its ``TimeoutError`` frame is sent, this process ends and Ray restarts the actor.
    """

    def __init__(self, worker: Any, thread: concurrent.futures.Executor, end: Callable[[], None] | None = None):
        self.worker = worker
        self.thread = thread
        self.end = end or (lambda: os._exit(1))

    async def ask(self, action: str, body: bytes) -> bytes:
        loop = asyncio.get_running_loop()
        if action == "describe":
            return await loop.run_in_executor(None, self.worker.describe)
        return await loop.run_in_executor(self.thread, getattr(self.worker, action), body)

    async def run(self, body: bytes, request_id: str, limits: Limits, door: "Door") -> tuple[bytes, bytes, Any]:
        """The answer frame's kind and payload, and what to do once it is sent (end this process, or nothing)."""
        loop = asyncio.get_running_loop()

        def on_status(status: dict) -> None:  # on the model's thread: queued on the loop before the answer is
            loop.call_soon_threadsafe(door.tell, request_id, status)

        work = loop.run_in_executor(self.thread, self.worker.run_here, body, on_status, limits.seconds,
                                    limits.max_response_bytes)
        try:
            return RESULT, await asyncio.wait_for(asyncio.shield(work), limits.seconds + limits.grace_seconds), None
        except asyncio.TimeoutError:
            return ERROR, _timed_out(limits), lambda: loop.call_later(0.2, self.end)


class Door:
    """See the module docstring."""

    def __init__(self, limits: Limits | None = None):
        self.limits = limits or Limits()
        self.models: dict[str, _Model] = {}
        self.streams: dict[str, asyncio.Queue] = {}
        self.locations: dict[str, str] = {}  # model name -> URL of its own door
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
            if self.server.started or self._task.done():
                break
            await asyncio.sleep(0.01)
        if not self.server.started:
            raise OSError(f"cannot listen on {host}:{port} (in use?)")
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def register(self, name: str, calls: Any, digest: str) -> None:
        """Serve model ``name``, reached through ``calls`` (:class:`RayCalls` or :class:`LocalCalls`)."""
        self.models[name] = _Model(calls, digest)

    async def unregister(self, name: str) -> int:
        self.models.pop(name, None)
        self.locations.pop(name, None)
        return len(self.models)

    async def locate(self, name: str, url: str) -> None:
        """A model actor tells the front door where its own door listens."""
        self.locations[name] = url

    async def location(self, name: str) -> str | None:
        """Where model ``name``'s own door listened (a restarted actor listens there again), or ``None``."""
        return self.locations.get(name)

    async def runs(self, name: str) -> int:
        """How many run requests model ``name`` has received (a session of several traces counts once)."""
        return self.models[name].runs

    async def names(self) -> list[str]:
        return sorted(self.models)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            await self._task

    async def status(self, request_id: str, status: dict) -> None:
        """A model actor tells the door a running request's status: a generation step, or tokens generated."""
        self.tell(request_id, status)

    def tell(self, request_id: str, status: dict) -> None:
        queue = self.streams.get(request_id)
        if queue is not None:
            queue.put_nowait(("status", status))

    # -------------------------------------------------------------------------------------------- HTTP
    async def _handle(self, request: Any) -> Any:
        from starlette.responses import Response, StreamingResponse

        name, action = request.path_params["name"], request.path_params["action"]
        model = self.models.get(name)
        if model is None:
            return _json(404, f"this server has no model named {name!r}; it serves: {', '.join(sorted(self.models))}")
        if action == "hello":  # a door proves it serves this model without seeing the token (the client checks)
            challenge = request.headers.get("x-challenge", "")[:128].encode()
            return Response(hmac.new(model.digest.encode(), challenge, "sha256").hexdigest(), media_type="text/plain")
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
        if action in ("describe", "scan", "module_scan", "source"):
            try:
                return Response(await model.calls.ask(action, body), media_type="application/octet-stream")
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
        after = None  # what to do once the answer is sent (or the client has gone)
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
            call = asyncio.ensure_future(model.calls.run(body, request_id, self.limits, self))
            while not call.done():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({call, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    event = getter.result()
                    if event is not None:
                        yield _status(event[1])
                else:
                    getter.cancel()
            while not queue.empty():  # statuses told just before the answer
                event = queue.get_nowait()
                if event is not None:
                    yield _status(event[1])
            kind, payload, after = call.result()
            yield frame(kind, payload)
        finally:
            if after is not None:
                after()
            if request_id in model.waiting:
                model.waiting.remove(request_id)
            if model.running == request_id:
                model.running = None
            self.streams.pop(request_id, None)
            for other in model.waiting:
                waiting = self.streams.get(other)
                if waiting is not None:
                    waiting.put_nowait(None)


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


def _timed_out(limits: Limits) -> bytes:
    return _error("TimeoutError", f"the request ran past the server's limit of {limits.seconds:g} s and was stopped "
                                  "(the model's worker restarts)")


def _status(data: dict) -> bytes:
    return frame(STATUS, json.dumps(data).encode())


def _error(kind: str, message: str) -> bytes:
    return json.dumps({"type": kind, "message": message, "notes": []}).encode()


def _json(status: int, message: str) -> Any:
    from starlette.responses import JSONResponse
    return JSONResponse({"error": message}, status_code=status)
