"""Remote models on a real local Ray cluster: remote equals local bit for bit, refusals, faults, queues.

One Ray cluster (loopback only, bounded memory, its own short temp dir) serves a tiny GPT-2 and the tiny
two-layer net behind one front door for the whole module, and is always shut down. Clients send scans and runs
to each model actor's own door (its URL comes with describe); the raw requests below go there too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import http.client
import json
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import urllib.parse

import pytest
import torch

from nnsight_magic import LanguageModel, NNsight
from nnsight_magic.remote import RemoteModel, serve
from nnsight_magic.remote.executor import encode_request
from nnsight_magic.remote.wire import pack, tensors_equal, unpack

from conftest import make_tiny
from language_fixtures import make_tiny_gpt2, tokenizer_or_skip
from magic_shell import ok
from test_serialize import LM_CASES, NET_CASES, saved_values

# read by Ray when it is imported: loopback binds, no usage reports, token auth with a per-run token (never
# ~/.ray), and patience for a busy machine (its agents may take half a minute to start on 2 shared cores)
os.environ.update(RAY_USAGE_STATS_ENABLED="0", RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token",
                  RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_agent_register_timeout_ms="120000",
                  RAY_raylet_start_wait_time_s="120", RAY_enable_metrics_collection="0")
ray = pytest.importorskip("ray", reason="the remote tests need Ray: pip install 'ray[serve]'")
TOKEN = "s3cret-" + secrets.token_hex(4)


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    for attempt in range(2):  # on a busy machine Ray's agents sometimes miss the raylet's 30 s start window
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 << 20,
                     _temp_dir=temp, namespace="nnsight_magic_tests")
            break
        except Exception:
            ray.shutdown()
            if attempt:
                raise
    tokenizer = tokenizer_or_skip()
    servers = {"gpt2": serve(LanguageModel(make_tiny_gpt2(), tokenizer=tokenizer), name="gpt2", token=TOKEN),
               "net": serve(NNsight(make_tiny()), name="net", token=TOKEN)}
    try:
        yield servers
    finally:
        for server in servers.values():
            server.shutdown()
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The local ground truth runs on one thread, as the model actor does (Ray gives an actor OMP_NUM_THREADS=1):
    a matmul split over another number of threads differs in the last bits on some CPUs (seen on AMD EPYC)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def remote_lm(cluster):
    return RemoteModel(cluster["gpt2"].url, "gpt2", token=TOKEN)


@pytest.fixture(scope="module")
def remote_net(cluster):
    return RemoteModel(cluster["net"].url, "net", token=TOKEN)


def run_case(case, model):
    torch.manual_seed(1)
    return case(model, torch.rand(3, 5))


def test_one_door_serves_several_models_with_their_trees_and_tokenizer(cluster, remote_lm, remote_net):
    assert cluster["gpt2"].url == cluster["net"].url and cluster["gpt2"].url.startswith("http://127.0.0.1:")
    assert str(remote_net._module) == str(make_tiny())
    assert repr(remote_lm._module) == repr(make_tiny_gpt2())
    assert remote_lm.tokenizer("Hello world")["input_ids"] == tokenizer_or_skip()("Hello world")["input_ids"]
    assert remote_lm.context_length == 128 and len(remote_lm.transformer.h) == 2
    shapes = [(name, tensor.shape) for name, tensor in remote_lm._module.named_parameters(remove_duplicate=False)]
    assert shapes == [(name, tensor.shape) for name, tensor in make_tiny_gpt2().named_parameters(remove_duplicate=False)]
    assert all(tensor.untyped_storage().nbytes() <= 8 for tensor in remote_lm._module.parameters())  # no weights


@pytest.mark.parametrize("case", NET_CASES + LM_CASES, ids=lambda case: case.__name__)
def test_remote_equals_local_bit_for_bit(case, remote_lm, remote_net, gpt2_tok, capsys):
    local = LanguageModel(make_tiny_gpt2(), tokenizer=gpt2_tok) if case in LM_CASES else NNsight(make_tiny())
    remote = remote_lm if case in LM_CASES else remote_net
    local_tracers = run_case(case, local)
    expected = [saved_values(tracer) for tracer in local_tracers]
    remote_tracers = run_case(case, remote)
    got = [saved_values(tracer) for tracer in remote_tracers]
    assert [set(values) for values in got] == [set(values) for values in expected] and any(expected)
    for mine, theirs in zip(got, expected):
        for index in theirs:
            assert tensors_equal(mine[index], theirs[index])
    # the same graph, shapes included (a module called on a traced value, the logit lens, gets its from the server)
    assert [str(tracer.graph) for tracer in remote_tracers] == [str(tracer.graph) for tracer in local_tracers]


def test_wrong_or_missing_token_is_refused(cluster):
    with pytest.raises(PermissionError, match="wrong or missing token"):
        RemoteModel(cluster["net"].url, "net", token="nope")
    with pytest.raises(PermissionError):
        RemoteModel(cluster["net"].url, "net")
    with pytest.raises(LookupError, match="no model named 'other'"):
        RemoteModel(cluster["net"].url, "other", token=TOKEN)


def test_errors_keep_their_type_and_the_users_line(remote_net, x):
    with pytest.raises(IndexError, match=r"test_remote.py:\d+ `remote_net.layer1.output\[:, 99\].save\(\)`"):
        with remote_net.trace(x, validate=False):
            remote_net.layer1.output[:, 99].save()
    with remote_net.trace(x) as tracer:                           # the server still serves
        out = remote_net.output.save()
    assert torch.equal(out.value, make_tiny()(x).detach()) and tracer.status == "done"


def direct(remote) -> str:
    """The URL of the model actor's own door, where ``remote`` sends its scans and runs."""
    url = remote._connection.direct
    assert url is not None and url != remote._connection.url
    return url


def raw_run(url: str, body: bytes, token: str = TOKEN):
    parsed = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    connection.request("POST", "/v1/net/run", body=body, headers={"Authorization": f"Bearer {token}"})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, data


def good_request(net, x):
    with net.scan(x) as tracer:
        net.output.save()
    return encode_request([tracer])


def malicious(body: bytes, change) -> bytes:
    header, blob = unpack(body)
    return change(header, blob)


def tamper_graph(change):
    def apply(header, blob):
        change(header["traces"][0]["graph"])
        return pack(header, blob)
    return apply


def deep(header, blob):
    value: object = 1
    for _ in range(200):
        value = [value]
    header["traces"][0]["graph"]["nodes"][0]["meta"] = value
    return pack(header, blob)


def answer_error(data: bytes) -> dict:
    frames, position = [], 0
    while position < len(data):
        kind, (length,) = data[position:position + 1], struct.unpack("<I", data[position + 1:position + 5])
        frames.append((kind, data[position + 5:position + 5 + length]))
        position += 5 + length
    kind, payload = frames[-1]
    return unpack(payload)[0].get("error") if kind == b"r" else json.loads(payload)


@pytest.mark.parametrize("change, refused", [
    (tamper_graph(lambda graph: graph["nodes"][0].update(op="exec")), "unknown op"),
    (tamper_graph(lambda graph: graph["nodes"][0].update(op="call_function", target="builtins.eval",
                                                          args=["__import__('os').system('true')"])),
     "'builtins.eval'"),
    (tamper_graph(lambda graph: graph["nodes"][0].update(target="os.path")), "does not have"),
    (deep, "nested"),
    (lambda header, blob: pack(header, struct.pack("<Q", 1 << 40) + b"{}"), "larger than its blob"),
    (lambda header, blob: pack({**header, "traces": [{**header["traces"][0], "invokes": [
        {"args": [{"tensor": "t0"}], "kwargs": {"dict": []}, "rows": 3}]}]}, blob[:-7]), "truncated"),
])
def test_malicious_payloads_are_refused_and_the_server_serves_on(cluster, remote_net, x, change, refused):
    status, data = raw_run(direct(remote_net), malicious(good_request(remote_net, x), change))
    assert status == 200
    error = answer_error(data)
    assert error["type"] == "ValueError" and refused in error["message"]
    with remote_net.trace(x):
        out = remote_net.output.save()
    assert torch.equal(out.value, make_tiny()(x).detach())


def test_a_request_over_the_size_limit_and_a_wrong_token_are_refused_before_parsing(cluster, remote_net):
    for url in (cluster["net"].url, direct(remote_net)):                  # the front door and the model's own
        status, data = raw_run(url, b"x" * 10, token="wrong")
        assert status == 401
        status, data = raw_run(url, b"not even a frame")
        assert answer_error(data)["type"] == "ValueError"


class StatusLog:
    def __init__(self):
        self.events = []

    def graph_built(self, tracer): ...

    def node_status(self, index, status): ...

    def request_status(self, status, place):
        self.events.append((status, place))

    def step_started(self, step):
        self.events.append(("step", step))

    def run_finished(self, tracer, execution, error):
        self.events.append(("finished", error))


def test_generation_streams_its_steps_and_the_status(remote_lm):
    log = StatusLog()
    with remote_lm.generate("Hello", max_new_tokens=3) as tracer:
        tracer.observers.append(log)
        with tracer.all():
            remote_lm.lm_head.output[0, -1].argmax()
        tokens = tracer.result.save()
    assert ("running", None) in log.events and [event for event in log.events if event[0] == "step"] == \
        [("step", 0), ("step", 1), ("step", 2)] and log.events[-1] == ("finished", None)
    assert tokens.value.shape == (1, 4)


def test_trace_magic_runs_remote_models_unchanged(ip, remote_net, x):
    ip.user_ns.update(remote=remote_net, x=x)
    ok(ip, "%%trace remote x\nh = remote.layer1.output\nremote.layer2.output[:, 0] = 0\nout = remote.output")
    twin = make_tiny()
    assert torch.equal(ip.user_ns["h"], twin.layer1(x).detach())
    assert torch.equal(ip.user_ns["out"][:, 1], twin(x).detach()[:, 1]) and (ip.user_ns["out"][:, 0] == 0).all()


def test_two_clients_hammering_one_model_get_every_answer_right(cluster, x):
    twin = make_tiny()
    expected = [twin(x * number).detach() for number in range(100)]
    results: list = []
    errors: list = []

    def client():
        try:
            net = RemoteModel(cluster["net"].url, "net", token=TOKEN)
            for number in range(100):
                with net.trace(x * number):
                    out = net.output.save()
                results.append(torch.equal(out.value, expected[number]))
        except Exception as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)

    threads = [threading.Thread(target=client) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    assert len(results) == 200 and all(results)


def test_a_client_that_disconnects_mid_request_does_not_stop_the_server(cluster, remote_net, x):
    parsed = urllib.parse.urlsplit(direct(remote_net))
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=10)
    connection.request("POST", "/v1/net/run", body=good_request(remote_net, x),
                       headers={"Authorization": f"Bearer {TOKEN}"})
    connection.close()
    with remote_net.trace(x):
        out = remote_net.output.save()
    assert torch.equal(out.value, make_tiny()(x).detach())


class StepSignal(StatusLog):
    def __init__(self):
        super().__init__()
        self.started = threading.Event()

    def step_started(self, step):
        self.started.set()


def long_generation(lm, signal, failure):
    """A 100-token generation that tells ``signal`` its steps (for tests that act while it runs); an error it
    raises goes to ``failure``."""
    try:
        with lm.generate("Hello", max_new_tokens=100) as tracer:
            tracer.observers.append(signal)
            with tracer.all():
                lm.transformer.h[0].output.sum()
    except BaseException as error:
        failure.append(error)


def test_a_killed_model_actor_fails_its_request_clearly_and_restarts(cluster, remote_lm):
    failure: list = []
    signal = StepSignal()

    url, pid = direct(remote_lm), ray.get(cluster["gpt2"].worker.pid.remote())
    thread = threading.Thread(target=long_generation, args=(remote_lm, signal, failure))
    thread.start()
    assert signal.started.wait(timeout=60)
    ray.kill(cluster["gpt2"].worker, no_restart=False)
    thread.join(timeout=60)
    assert failure and isinstance(failure[0], RuntimeError) and "worker stopped" in str(failure[0])
    with remote_lm.trace("Hello world"):
        h = remote_lm.transformer.h[1].output.save()
    # the restarted actor (a new process) listens where the first one did
    assert ray.get(cluster["gpt2"].worker.pid.remote()) != pid and direct(remote_lm) == url
    local = LanguageModel(make_tiny_gpt2(), tokenizer=remote_lm.tokenizer)
    with local.trace("Hello world"):
        expected = local.transformer.h[1].output.save()
    assert torch.equal(h.value, expected.value)


def test_a_server_restarted_between_requests_is_reached_again(cluster, x):
    server = serve(NNsight(make_tiny()), name="net", token="t2", port=0)
    net = RemoteModel(server.url, "net", token="t2")
    with net.trace(x):
        first = net.output.save()
    port = int(server.url.rsplit(":", 1)[1])
    server.shutdown()
    with pytest.raises(ConnectionError):
        with net.trace(x):
            net.output.save()
    server = serve(NNsight(make_tiny()), name="net", token="t2", port=port)
    try:
        with net.trace(x):
            second = net.output.save()
    finally:
        server.shutdown()
    assert torch.equal(first.value, second.value)
    shared = serve(NNsight(make_tiny()), name="net2", token="t2")  # no port: the host's shared door, still there
    try:
        assert shared.url == cluster["net"].url
    finally:
        shared.shutdown()


def test_the_inspector_shows_the_requests_place_its_steps_and_done(remote_lm, capsys):
    from nnsight_magic.widgets.inspector import GraphInspector

    class Recording(GraphInspector):
        headers: list = []

        def request_status(self, status, place=None):
            super().request_status(status, place)
            self.headers.append(self._header_text())

        def step_started(self, step):
            super().step_started(step)
            self.headers.append(self._header_text())

    with remote_lm.generate("Hello", max_new_tokens=2) as tracer:
        inspector = Recording(tracer)
        inspector.request_status("queued", 2)        # what a client behind another one hears first
        with tracer.all():
            remote_lm.lm_head.output[0, -1].argmax()
        tokens = tracer.result.save()
    assert inspector.headers[0].startswith("queued (place 2) · ")
    assert any("· running on the server · " in header and "step 2/2" in header for header in inspector.headers)
    assert inspector.state == "done" and "on the server" not in inspector._header_text()
    first_line, generated = inspector._header_text().split("\n")
    assert first_line.endswith("— done") and "2 tokens" in first_line   # streamed from the server as they came
    assert generated == f"generated: {remote_lm.tokenizer.decode(tokens.value[0, 1:])!r}"
    assert tokens.value.shape == (1, 3)


def test_a_session_is_one_request_in_python_and_in_the_session_magic(cluster, remote_net, ip, x):
    worker = cluster["net"].worker

    def runs():  # run requests the model actor's own door received
        return ray.get(worker.runs.remote())

    twin = make_tiny()
    expected = twin.layer2(twin.layer1(x)).detach()  # the second trace runs on the first one's layer1 output
    before = runs()
    with remote_net.session():
        with remote_net.trace(x):
            h = remote_net.layer1.output.save()
        with remote_net.trace(x * 2):
            remote_net.layer1.output[:] = h
            out = remote_net.output.save()
    assert runs() == before + 1 and torch.equal(out.value, expected)
    ip.user_ns.update(remote=remote_net, x=x)
    ok(ip, "%%session\nwith remote.trace(x):\n    h = remote.layer1.output\nwith remote.trace(x * 2):\n"
           "    remote.layer1.output[:] = h\n    out = remote.output")
    assert runs() == before + 2 and torch.equal(ip.user_ns["out"], expected)
    assert torch.equal(ip.user_ns["h"], twin.layer1(x).detach())


def test_a_module_called_on_a_traced_value_has_its_shape_from_the_server(remote_lm, cluster):
    with remote_lm.trace("Hello world"):
        hidden = remote_lm.transformer.h[0].output[0]
        lens = remote_lm.lm_head(remote_lm.transformer.ln_f(hidden))
        assert lens.shape == (2, 50257) and lens.dtype == torch.float32         # known while building
        with pytest.raises(IndexError, match=r"test_remote.py:\d+ `lens\[:, 60000\]`"):
            lens[:, 60000]                                                   # ... so mistakes show at once
        top = lens.argmax(-1).save()
    local = LanguageModel(make_tiny_gpt2(), tokenizer=tokenizer_or_skip())
    with local.trace("Hello world"):
        expected = local.lm_head(local.transformer.ln_f(local.transformer.h[0].output[0])).argmax(-1).save()
    assert torch.equal(top.value, expected.value)


def test_runs_reach_the_model_actor_without_the_front_door(cluster, x):
    server = cluster["net"]
    net = RemoteModel(server.url, "net", token=TOKEN)
    url = direct(net)
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1" and url == server.model_url != server.url
    front, own = ray.get(server.door.runs.remote("net")), ray.get(server.worker.runs.remote())
    with net.trace(x * 3):
        out = net.output.save()
    assert torch.equal(out.value, make_tiny()(x * 3).detach())
    assert ray.get(server.door.runs.remote("net")) == front and ray.get(server.worker.runs.remote()) == own + 1


def test_a_client_that_cannot_reach_the_model_actors_door_goes_through_the_front_door(cluster, x):
    server = cluster["net"]
    net = RemoteModel(server.url, "net", token=TOKEN)
    connection = net._connection
    connection.direct = "http://127.0.0.1:1"                        # stale: looked up again through the front door
    with net.trace(x):
        first = net.output.save()
    assert connection.direct == direct(net) != "http://127.0.0.1:1"
    connection.direct = "http://127.0.0.1:1"
    connection.locate = lambda: setattr(connection, "direct", "http://127.0.0.1:1")   # say, behind a tunnel
    front = ray.get(server.door.runs.remote("net"))
    with net.trace(x * 2):
        second = net.output.save()
    assert connection.direct is None and ray.get(server.door.runs.remote("net")) == front + 1
    twin = make_tiny()
    assert torch.equal(first.value, twin(x).detach()) and torch.equal(second.value, twin(x * 2).detach())


def test_a_door_that_cannot_prove_it_serves_the_model_never_sees_the_token(cluster, x):
    seen, ready = [], threading.Event()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def impostor():  # answers every request with a wrong proof, recording what it was sent
        ready.set()
        client, _ = listener.accept()
        with client:
            seen.append(client.recv(65536))
            client.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnope")
            client.recv(65536)

    thread = threading.Thread(target=impostor, daemon=True)
    thread.start()
    ready.wait(10)
    net = RemoteModel(cluster["net"].url, "net", token=TOKEN)
    connection = net._connection
    connection.direct = f"http://127.0.0.1:{port}"                   # e.g. a tunnelled port that is something else
    try:
        with net.trace(x):
            out = net.output.save()
    finally:
        listener.close()
    assert torch.equal(out.value, make_tiny()(x).detach()) and connection.direct == direct(net)
    assert seen and b"/v1/net/hello" in seen[0] and TOKEN.encode() not in b"".join(seen)


def test_a_second_client_hears_its_place_in_the_model_actors_queue(cluster, remote_lm):
    other = RemoteModel(cluster["gpt2"].url, "gpt2", token=TOKEN)
    with other.trace("Hello"):                                     # its scan now, so only its run waits below
        other.transformer.h[1].output.save()
    signal, failure = StepSignal(), []

    thread = threading.Thread(target=long_generation, args=(remote_lm, signal, failure))
    thread.start()
    assert signal.started.wait(timeout=60)
    log = StatusLog()
    with other.trace("Hello") as tracer:
        tracer.observers.append(log)
        h = other.transformer.h[1].output.save()
    thread.join(timeout=60)
    assert not failure and log.events[:2] == [("queued", 1), ("running", None)]
    local = LanguageModel(make_tiny_gpt2(), tokenizer=other.tokenizer)
    with local.trace("Hello"):
        expected = local.transformer.h[1].output.save()
    assert torch.equal(h.value, expected.value)


class Stuck:
    """A model worker whose run never ends on its own (until ``release``)."""

    def __init__(self):
        self.release = threading.Event()

    def describe(self):
        return pack({})

    def run_here(self, body, on_status, seconds, max_bytes):
        on_status({"status": "step", "step": 0})
        self.release.wait(30)
        return pack({"traces": [], "printed": ""})


def test_a_run_past_the_time_limit_gets_its_timeout_frame_before_the_model_process_ends():
    from nnsight_magic.remote.door import Door, Limits, LocalCalls, token_digest
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def wait(coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(30)

    stuck, ended, thread = Stuck(), threading.Event(), concurrent.futures.ThreadPoolExecutor(1)
    door = Door(Limits(seconds=0.2, grace_seconds=0.1))
    port = wait(door.start("127.0.0.1", 0))
    try:
        wait(door.register("stuck", LocalCalls(stuck, thread, end=ended.set), token_digest("t")))
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("POST", "/v1/stuck/run", body=b"x", headers={"Authorization": "Bearer t"})
        data = connection.getresponse().read()
        connection.close()
        assert ended.wait(10)                                       # the process would end now, the frame sent
        frames = []
        while data:
            length = struct.unpack("<I", data[1:5])[0]
            frames.append((data[:1], json.loads(data[5:5 + length])))
            data = data[5 + length:]
        assert frames[:2] == [(b"s", {"status": "running"}), (b"s", {"status": "step", "step": 0})]
        assert frames[2][0] == b"e" and frames[2][1]["type"] == "TimeoutError" and len(frames) == 3
    finally:
        stuck.release.set()
        wait(door.stop())
        thread.shutdown()
        loop.call_soon_threadsafe(loop.stop)


def test_a_lazy_language_model_and_a_directory_are_served_with_their_weights(cluster, tmp_path, gpt2_tok):
    model = make_tiny_gpt2()
    model.save_pretrained(tmp_path)
    gpt2_tok.save_pretrained(tmp_path)
    lazy = LanguageModel(str(tmp_path), dispatch=False)          # only the meta tree until something runs it
    servers = [serve(lazy, name="lazy", token=TOKEN), serve(str(tmp_path), name="directory", token=TOKEN)]
    try:
        with torch.no_grad():
            expected = model(torch.tensor([gpt2_tok("Hello world")["input_ids"]])).logits
        for name in ("lazy", "directory"):
            remote = RemoteModel(cluster["gpt2"].url, name, token=TOKEN)
            with remote.trace("Hello world"):
                logits = remote.lm_head.output.save()
            assert torch.equal(logits.value, expected), name
    finally:
        for server in servers:
            server.shutdown()


def test_attention_patterns_read_and_edited_remotely_equal_local(remote_lm):
    local = LanguageModel(make_tiny_gpt2(), tokenizer=remote_lm.tokenizer)
    results = {}
    for name, lm in (("remote", remote_lm), ("local", local)):
        with lm.trace("Hello world, again") as tracer:
            shape = lm.transformer.h[0].attn.pattern.shape               # known while building, remotely too
            pattern = lm.transformer.h[0].attn.pattern.save()
            lm.transformer.h[1].attn.pattern[:, 1] = 0                   # head 1 of block 1 attends nowhere
            logits = lm.lm_head.output.save()
        with lm.generate("Hello world", max_new_tokens=2) as tracer:
            with tracer.iter[1]:
                step_shape = lm.transformer.h[1].attn.pattern.shape
                step = lm.transformer.h[1].attn.pattern.save()
        results[name] = (pattern.value, logits.value, step.value, shape, step_shape)
    (pattern, logits, step, shape, step_shape), (*expected, local_shape, local_step_shape) = \
        results["remote"], results["local"]
    assert shape == local_shape == pattern.shape and pattern.shape[1] == 4
    assert step_shape == local_step_shape == step.shape and step.shape[-2] == 1
    for got, want in zip((pattern, logits, step), expected):
        assert torch.equal(got, want)
    with remote_lm.trace("Hello world, again"):
        plain = remote_lm.lm_head.output.save()
    assert not torch.equal(plain.value, logits)  # the edit changed the remote run, and only that run


def test_a_saved_key_value_cache_comes_back_as_a_cache_equal_to_local(remote_lm):
    from transformers import DynamicCache
    local = LanguageModel(make_tiny_gpt2(), tokenizer=remote_lm.tokenizer)
    outputs = {}
    for name, lm in (("remote", remote_lm), ("local", local)):
        with lm.trace("Hello world, again"):
            outputs[name] = lm.output.save()
    remote_cache, local_cache = (outputs[name].value.past_key_values for name in ("remote", "local"))
    assert type(remote_cache) is DynamicCache and len(remote_cache.layers) == len(local_cache.layers) == 2
    assert remote_cache.get_seq_length() == local_cache.get_seq_length() > 0
    for mine, theirs in zip(remote_cache.layers, local_cache.layers):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
    assert torch.equal(outputs["remote"].value.logits, outputs["local"].value.logits)


@pytest.mark.parametrize("body", [[[1, 2]], [["keys only"]], "layers", [[{"dict": []}, {"dict": []}]]])
def test_a_malformed_key_value_cache_in_an_answer_is_refused(body):
    from nnsight_magic.remote.wire import decode_result
    from nnsight_magic.tracing.serialize import TensorReader
    with pytest.raises(ValueError):
        decode_result({"kv_cache": body}, TensorReader(b""))


class Collect:
    """A streamer that records what ``generate`` hands it (``put`` per step, then ``end``)."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended = True


def test_a_streamer_receives_the_remote_tokens_as_they_are_generated(remote_lm):
    local = LanguageModel(make_tiny_gpt2(), tokenizer=remote_lm.tokenizer)
    streams, log = {}, StatusLog()
    for name, lm in (("remote", remote_lm), ("local", local)):
        streams[name] = Collect()
        with lm.generate("Hello world", max_new_tokens=3, streamer=streams[name]) as tracer:
            if name == "remote":
                tracer.observers.append(log)
            result = tracer.result.save()
        streams[name].result = result.value
    remote, here = streams["remote"], streams["local"]
    assert remote.ended and here.ended and len(remote.puts) == len(here.puts) == 4   # the prompt, then 3 tokens
    assert [torch.tensor(put).flatten().tolist() for put in remote.puts] == \
        [torch.tensor(put).flatten().tolist() for put in here.puts]
    assert torch.equal(remote.result, here.result)
    assert log.events == [("running", None), ("finished", None)]


def test_source_operations_read_and_edited_remotely_equal_local(remote_lm):
    local = LanguageModel(make_tiny_gpt2(), tokenizer=remote_lm.tokenizer)
    remote_attn, local_attn = remote_lm.transformer.h[0].attn, local.transformer.h[0].attn
    assert list(remote_attn.source) == list(local_attn.source)           # the server's listing of its forward
    assert "GPT2Attention.forward (modeling_gpt2.py:" in str(remote_attn.source)
    results = {}
    for name, lm in (("remote", remote_lm), ("local", local)):
        with lm.trace("Hello world, again"):
            qkv = lm.transformer.h[0].attn.source.c_attn_1.output.save()
            shape = qkv.shape                                              # known while building, remotely too
            lm.transformer.h[1].mlp.source.act_0.output[:] = 0             # an edit inside block 1's MLP
            logits = lm.lm_head.output.save()
        results[name] = (shape, qkv.value, logits.value)
    (shape, qkv, logits), (local_shape, local_qkv, local_logits) = results["remote"], results["local"]
    assert shape == local_shape == qkv.shape
    assert torch.equal(qkv, local_qkv) and torch.equal(logits, local_logits)
    assert "source" not in remote_attn._module._modules                   # nothing stays installed here


def test_source_requests_for_what_the_model_does_not_have_are_refused(remote_lm):
    with pytest.raises(ValueError, match="no module or operation 'transformer.h.7'"):
        remote_lm._connection.call("source", pack({"path": "transformer.h.7"}))
    with pytest.raises(ValueError, match="no module or operation 'transformer.h.0.attn.source.nothing_0'"):
        remote_lm._connection.call("source", pack({"path": "transformer.h.0.attn.source.nothing_0"}))
    with pytest.raises(TypeError, match="self.c_proj"):                   # SourceUnavailable keeps its type
        remote_lm._connection.call("source", pack({"path": "transformer.h.0.attn.source.c_proj_0"}))
    with remote_lm.trace("Hello"):                                        # the server still serves
        out = remote_lm.lm_head.output.save()
    assert out.value.shape[:2] == (1, 1)


def test_operations_inside_a_called_function_remotely_equal_local(remote_lm):
    local = LanguageModel(make_tiny_gpt2(), tokenizer=remote_lm.tokenizer)
    results = {}
    for name, lm in (("remote", remote_lm), ("local", local)):
        with lm.trace("Hello world, again"):
            inner = lm.transformer.h[1].attn.source.attention_interface_0.source   # the sdpa function's operations
            kernel = inner.scaled_dot_product_attention_0
            shape = kernel.output.shape
            mixed = kernel.output.save()
            kernel.output[:, 0] = 0                                             # head 0 of block 1 adds nothing
            logits = lm.lm_head.output.save()
        results[name] = (list(inner), shape, mixed.value, logits.value)
    (names, shape, mixed, logits), (local_names, local_shape, local_mixed, local_logits) = \
        results["remote"], results["local"]
    assert names == local_names and "scaled_dot_product_attention_0" in names
    assert shape == local_shape == mixed.shape
    assert torch.equal(mixed, local_mixed) and torch.equal(logits, local_logits)
