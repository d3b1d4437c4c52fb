"""The OpenAI-compatible server end to end: a real uvicorn server on loopback, driven by the official openai client.

The main server is ``falconspec serve`` in a subprocess (the CLI path); the queue-full test runs a second app in a
thread with a queue of one. Greedy and seeded answers must equal offline ``SpeculativeGenerator.generate`` on the
same tiny model directory, token for token, with the same speculative statistics.
"""

import concurrent.futures
import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from falconspec import SpeculativeGenerator
from falconspec.drafters import make_drafter
from falconspec.models import load_target
from falconspec.server import create_app
from falconspec.testing import save_tiny_model

MODEL = "tiny-llama"
CONTEXT = 2048
LONG = 1500  # a generation far longer than any test waits for: only cancellation ends it early
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


# -------------------------------------------------------------------- servers and helpers
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("server") / "tiny", max_positions=CONTEXT)


@pytest.fixture(scope="module")
def offline(model_dir):
    return SpeculativeGenerator(load_target(str(model_dir)), make_drafter("pld"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """``falconspec serve`` in a subprocess; yields its base URL."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server-log") / "serve.log"
    cmd = [sys.executable, "-c", "import sys; from falconspec.cli import main; sys.exit(main())", "serve",
           "--model", str(model_dir), "--drafter", "pld", "--served-model-name", MODEL, "--host", "127.0.0.1",
           "--port", str(port), "--max-queue", "8", "--log-level", "warning"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            pytest.fail(f"falconspec serve exited with {proc.returncode}:\n{log_path.read_text()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                break
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"falconspec serve did not come up in 120 s:\n{log_path.read_text()}")
        time.sleep(0.2)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


@contextlib.contextmanager
def thread_server(model_dir, max_queue):
    """The app in a uvicorn thread of this process, on a free loopback port."""
    generator = SpeculativeGenerator(load_target(str(model_dir)), make_drafter("pld"))
    app = create_app(generator, model_name=MODEL, max_queue=max_queue)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the in-thread server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()


def client(base) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)


@dataclass
class Answer:
    text: str
    finish_reason: str
    usage: dict
    speculative: dict


def ask(base, kind, content, stream, **params) -> Answer:
    """One request through the openai client; streaming answers are reassembled from their chunks."""
    api = client(base)
    if kind == "chat":
        call = api.chat.completions.create
        request = {"messages": [{"role": "user", "content": content}]}
    else:
        call = api.completions.create
        request = {"prompt": content}
    extra = {k: params.pop(k) for k in ("top_k", "ignore_eos") if k in params}
    response = call(model=MODEL, stream=stream, extra_body=extra or None, **request, **params)
    if not stream:
        choice = response.choices[0]
        text = choice.message.content if kind == "chat" else choice.text
        return Answer(text, choice.finish_reason, response.usage.model_dump(include={"prompt_tokens",
                      "completion_tokens", "total_tokens"}), response.model_extra["speculative"])
    pieces, final, ids = [], None, set()
    for chunk in response:
        ids.add(chunk.id)
        choice = chunk.choices[0]
        piece = choice.delta.content if kind == "chat" else choice.text
        pieces.append(piece or "")
        if choice.finish_reason is not None:
            assert final is None, "one final chunk"
            final = chunk
    assert final is not None and len(ids) == 1
    return Answer("".join(pieces), final.choices[0].finish_reason,
                  final.usage.model_dump(include={"prompt_tokens", "completion_tokens", "total_tokens"}),
                  final.model_extra["speculative"])


def offline_answer(offline, kind, content, **params):
    source = {"messages": [{"role": "user", "content": content}]} if kind == "chat" else {"prompt": content}
    return offline.generate(**source, **params)


def assert_same(got: Answer, want) -> None:
    assert got.text == want.text
    assert got.finish_reason == want.finish_reason
    stats = want.stats
    assert got.usage == {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.new_tokens,
                         "total_tokens": stats.prompt_tokens + stats.new_tokens}
    for key in ("new_tokens", "cycles", "drafted_tokens", "accepted_tokens", "target_forwards"):
        assert got.speculative[key] == getattr(stats, key), key
    histogram = got.speculative["accepted_histogram"]
    assert sum(histogram) == stats.cycles
    assert sum(a * n for a, n in enumerate(histogram)) == stats.accepted_tokens


def metrics(base) -> dict:
    """Prometheus samples as {(name, sorted label items): value}."""
    text = httpx.get(base + "/metrics", timeout=30).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def health(base) -> dict:
    return httpx.get(base + "/health", timeout=30).json()


def wait_idle(base, timeout=120) -> None:
    deadline = time.monotonic() + timeout
    while (state := health(base))["running"] or state["waiting"]:
        assert time.monotonic() < deadline, f"server still busy: {state}"
        time.sleep(0.1)


# -------------------------------------------------------------------- answers
def test_models_health_and_retrieve(server):
    api = client(server)
    assert [m.id for m in api.models.list().data] == [MODEL]
    card = api.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == CONTEXT and card.model_extra["drafter"] == "pld"
    assert health(server) == {"status": "ok", "model": MODEL, "running": 0, "waiting": 0, "max_queue": 8}


@pytest.mark.parametrize("kind", ["chat", "completion"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_greedy_answers_equal_offline_generation(server, offline, kind, stream):
    content = "abcabcabc, abcabc: hello hello"
    got = ask(server, kind, content, stream, max_tokens=24, temperature=0)
    assert_same(got, offline_answer(offline, kind, content, max_new_tokens=24, temperature=0))


@pytest.mark.parametrize("kind,stream", [("chat", True), ("completion", False)])
def test_seeded_sampling_equals_offline_generation(server, offline, kind, stream):
    params = {"temperature": 0.9, "top_p": 0.9, "seed": 1234}
    got = ask(server, kind, "sample me", stream, max_tokens=16, top_k=20, **params)
    assert_same(got, offline_answer(offline, kind, "sample me", max_new_tokens=16, top_k=20, **params))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_stop_strings_and_finish_reasons(server, offline, stream):
    base = offline_answer(offline, "completion", "stop here", max_new_tokens=20, temperature=0, ignore_eos=True)
    assert len(base.text) >= 12 and base.finish_reason == "length"
    stop = base.text[8:10]  # occurs in the greedy text, so the answer must end just before it
    got = ask(server, "completion", "stop here", stream, max_tokens=20, temperature=0, ignore_eos=True, stop=stop)
    want = offline_answer(offline, "completion", "stop here", max_new_tokens=20, temperature=0, ignore_eos=True,
                          stop=[stop])
    assert_same(got, want)
    assert got.finish_reason == "stop" and got.text == base.text[:base.text.find(stop)]


@pytest.mark.parametrize("path,kind", [(CHAT, "chat.completion.chunk"), (COMPLETIONS, "text_completion")])
def test_sse_wire_format(server, path, kind):
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"})
    with httpx.stream("POST", server + path, json=body, timeout=120) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["object"] for c in chunks} == {kind}
    if path == CHAT:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    final = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["speculative"]["new_tokens"] == final[0]["usage"]["completion_tokens"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == final[0]["usage"]  # the include_usage chunk


# -------------------------------------------------------------------- bad input
GOOD = {CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        COMPLETIONS: {"model": MODEL, "prompt": "hi", "max_tokens": 3}}
DROP = object()


def body(path, **changes):
    out = {**GOOD[path], **changes}
    return {k: v for k, v in out.items() if v is not DROP}


BAD_REQUESTS = {  # name: (path, body or raw text, status, param, code)
    "malformed json": (CHAT, '{"model": "tiny-llama", "messages": [', 400, None, "invalid_json"),
    "body not an object": (CHAT, "[1, 2]", 400, None, "invalid_body"),
    "NaN temperature": (CHAT, json.dumps(body(CHAT, temperature=float("nan"))), 400, "temperature", None),
    "missing messages": (CHAT, body(CHAT, messages=DROP), 400, "messages", "missing_field"),
    "missing model": (COMPLETIONS, body(COMPLETIONS, model=DROP), 400, "model", "missing_field"),
    "missing prompt": (COMPLETIONS, body(COMPLETIONS, prompt=DROP), 400, "prompt", "missing_field"),
    "messages not a list": (CHAT, body(CHAT, messages="hi"), 400, "messages", None),
    "message without role": (CHAT, body(CHAT, messages=[{"content": "hi"}]), 400, "messages", None),
    "role not a string": (CHAT, body(CHAT, messages=[{"role": 5, "content": "hi"}]), 400, "messages", None),
    "temperature as string": (CHAT, body(CHAT, temperature="0.5"), 400, "temperature", "invalid_type"),
    "max_tokens as float": (COMPLETIONS, body(COMPLETIONS, max_tokens=2.5), 400, "max_tokens", "invalid_type"),
    "max_tokens as bool": (COMPLETIONS, body(COMPLETIONS, max_tokens=True), 400, "max_tokens", "invalid_type"),
    "stream not a bool": (CHAT, body(CHAT, stream="yes"), 400, "stream", "invalid_type"),
    "stop not a string": (COMPLETIONS, body(COMPLETIONS, stop=5), 400, "stop", None),
    "unknown model": (CHAT, body(CHAT, model="gpt-4o"), 404, "model", "model_not_found"),
    "max_tokens zero": (CHAT, body(CHAT, max_tokens=0), 400, "max_tokens", None),
    "max_tokens negative": (COMPLETIONS, body(COMPLETIONS, max_tokens=-3), 400, "max_tokens", None),
    "max_completion_tokens zero": (CHAT, body(CHAT, max_completion_tokens=0), 400, "max_completion_tokens", None),
    "max_tokens beyond context": (COMPLETIONS, body(COMPLETIONS, max_tokens=CONTEXT), 400, "max_tokens",
                                  "context_length_exceeded"),
    "negative temperature": (CHAT, body(CHAT, temperature=-0.1), 400, "temperature", None),
    "top_p zero": (CHAT, body(CHAT, top_p=0), 400, "top_p", None),
    "top_p above one": (COMPLETIONS, body(COMPLETIONS, top_p=1.5), 400, "top_p", None),
    "negative top_k": (COMPLETIONS, body(COMPLETIONS, top_k=-5), 400, "top_k", None),
    "prompt longer than context": (COMPLETIONS, body(COMPLETIONS, prompt="x" * (CONTEXT + 5)), 400, "prompt",
                                   "context_length_exceeded"),
    "messages longer than context": (CHAT, body(CHAT, messages=[{"role": "user", "content": "x" * CONTEXT}]), 400,
                                     "messages", "context_length_exceeded"),
    "empty messages": (CHAT, body(CHAT, messages=[]), 400, "messages", None),
    "empty prompt": (COMPLETIONS, body(COMPLETIONS, prompt="  "), 400, "prompt", None),
    "several prompts": (COMPLETIONS, body(COMPLETIONS, prompt=["a", "b"]), 400, "prompt", None),
    "token id out of range": (COMPLETIONS, body(COMPLETIONS, prompt=[5, 10**6]), 400, "prompt", None),
    "n above one": (CHAT, body(CHAT, n=2), 400, "n", None),
    "empty stop string": (CHAT, body(CHAT, stop=[""]), 400, "stop", None),
    "seed out of range": (COMPLETIONS, body(COMPLETIONS, seed=2**70), 400, "seed", None),
    "logprobs": (CHAT, body(CHAT, logprobs=True), 400, "logprobs", "unsupported_parameter"),
    "presence penalty": (COMPLETIONS, body(COMPLETIONS, presence_penalty=0.5), 400, "presence_penalty",
                         "unsupported_parameter"),
    "image content": (CHAT, body(CHAT, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]), 400, "messages", None),
    "bad streaming request": (CHAT, body(CHAT, stream=True, temperature=-1), 400, "temperature", None),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(server, name):
    path, payload, status, param, code = BAD_REQUESTS[name]
    if isinstance(payload, str):
        resp = httpx.post(server + path, content=payload, headers={"content-type": "application/json"}, timeout=60)
    else:
        resp = httpx.post(server + path, json=payload, timeout=60)
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    if code is not None:
        assert error["code"] == code
    assert health(server)["status"] == "ok"


@pytest.mark.parametrize("method,path,status", [("GET", "/v1/nothing", 404), ("GET", CHAT, 405),
                                                ("DELETE", "/v1/models", 405)])
def test_unknown_routes_get_openai_errors(server, method, path, status):
    resp = httpx.request(method, server + path, timeout=30)
    assert resp.status_code == status and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_openai_client_sees_typed_errors(server):
    api = client(server)
    with pytest.raises(openai.BadRequestError) as err:
        api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-model")
    assert ask(server, "chat", "still there?", False, max_tokens=3, temperature=0).usage["completion_tokens"] >= 0


# -------------------------------------------------------------------- disconnects, load, queue, metrics
@pytest.mark.parametrize("stream", [True, False], ids=["sse", "json"])
def test_client_disconnect_stops_generation_and_frees_the_slot(server, stream):
    wait_idle(server)
    before = metrics(server)
    request = body(CHAT, max_tokens=LONG, temperature=0, ignore_eos=True, stream=stream)
    if stream:
        with httpx.stream("POST", server + CHAT, json=request, timeout=120) as resp:
            assert resp.status_code == 200
            events = 0
            for line in resp.iter_lines():
                events += line.startswith("data: ")
                if events == 4:  # the role opener and three text chunks: generation is under way
                    break
        # leaving the block closes the connection mid-stream
    else:  # a raw socket, closed as soon as the generation runs
        payload = json.dumps(request).encode()
        host, port = server.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            deadline = time.monotonic() + 60
            while health(server)["running"] == 0:
                assert time.monotonic() < deadline, "the request never started"
                time.sleep(0.05)
    wait_idle(server)
    after = metrics(server)
    cancelled = ("falconspec_requests_finished_total", (("outcome", "cancelled"),))
    assert after[cancelled] - before.get(cancelled, 0) == 1
    tokens = ("falconspec_generation_tokens_total", ())
    assert after[tokens] - before[tokens] < LONG, "the generation ran on after the client left"
    assert ask(server, "completion", "next", True, max_tokens=4, temperature=0).finish_reason in ("stop", "length")


def test_load_60_requests_from_6_clients(server, offline):
    """No lost, mixed-up or corrupted answers under concurrency; every greedy answer equals offline generation."""
    cases = [(kind, f"{i}: {'xyz' * (i % 4)} prompt {i}", stream)
             for i, (kind, stream) in enumerate([(k, s) for k in ("chat", "completion") for s in (False, True)] * 3)]
    expected = {case: offline_answer(offline, case[0], case[1], max_new_tokens=8, temperature=0) for case in cases}
    jobs = [cases[i % len(cases)] for i in range(60)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(ask, server, kind, content, stream, max_tokens=8, temperature=0)
                   for kind, content, stream in jobs]
        done, pending = concurrent.futures.wait(futures, timeout=600)
    assert not pending, f"{len(pending)} requests did not finish"
    for case, future in zip(jobs, futures):
        assert_same(future.result(), expected[case])


def test_full_queue_answers_429_and_recovers(model_dir):
    with thread_server(model_dir, max_queue=1) as base:
        long = body(CHAT, max_tokens=LONG, temperature=0, ignore_eos=True, stream=True)
        pool = concurrent.futures.ThreadPoolExecutor(1)
        with httpx.stream("POST", base + CHAT, json=long, timeout=120) as running:
            lines = running.iter_lines()  # keep the iterator: dropping it would close the connection
            events = 0
            while events < 2:  # the role opener and a first text chunk: the long request is generating
                events += next(lines).startswith("data: ")
            assert health(base)["running"] == 1
            waiting = pool.submit(ask, base, "completion", "waiting", False, max_tokens=4, temperature=0)
            deadline = time.monotonic() + 60
            while health(base)["waiting"] != 1:
                assert time.monotonic() < deadline and not waiting.done()
                time.sleep(0.05)
            resp = httpx.post(base + COMPLETIONS, json=body(COMPLETIONS), timeout=30)
            assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["type"] == "rate_limit_error" and resp.json()["error"]["code"] == "queue_full"
            with pytest.raises(openai.RateLimitError):
                client(base).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        # the long stream is closed: it is cancelled and the waiting request runs
        assert waiting.result(timeout=120).finish_reason in ("stop", "length")
        pool.shutdown()
        wait_idle(base)
        samples = metrics(base)
        assert samples[("falconspec_requests_total", (("endpoint", CHAT), ("status", "429")))] == 1
        assert samples[("falconspec_requests_total", (("endpoint", COMPLETIONS), ("status", "429")))] == 1
        assert samples[("falconspec_requests_finished_total", (("outcome", "cancelled"),))] == 1


def test_metrics_count_a_request(server, offline):
    wait_idle(server)
    before = metrics(server)
    got = ask(server, "chat", "count me, count me", False, max_tokens=20, temperature=0)
    httpx.post(server + CHAT, json=body(CHAT, max_tokens=0), timeout=30)
    after = metrics(server)
    offline_result = offline_answer(offline, "chat", "count me, count me", max_new_tokens=20, temperature=0)
    assert_same(got, offline_result)
    want = offline_result.stats

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("falconspec_requests_total", endpoint=CHAT, status="200") == 1
    assert delta("falconspec_requests_total", endpoint=CHAT, status="400") == 1
    assert delta("falconspec_requests_finished_total", outcome=got.finish_reason) == 1
    assert delta("falconspec_generation_tokens_total") == want.new_tokens
    assert delta("falconspec_prompt_tokens_total") == want.prompt_tokens
    assert delta("falconspec_target_forwards_total") == want.target_forwards
    assert delta("falconspec_spec_decode_cycles_total") == want.cycles
    assert delta("falconspec_spec_decode_drafted_tokens_total") == want.drafted_tokens
    assert delta("falconspec_spec_decode_accepted_tokens_total") == want.accepted_tokens
    assert delta("falconspec_spec_decode_accepted_length_count") == want.cycles
    assert delta("falconspec_spec_decode_accepted_length_sum") == want.cycles + want.accepted_tokens
    assert delta("falconspec_generation_seconds_total", phase="verify") > 0
    assert delta("falconspec_request_duration_seconds_count") == 1
    assert after[("falconspec_model_info", (("drafter", "pld"), ("model", MODEL)))] == 1
    assert after[("falconspec_requests_running", ())] == 0
