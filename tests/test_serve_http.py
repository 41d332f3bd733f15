"""The OpenAI-compatible server, over loopback HTTP, with the official `openai` package as the client:
completions, chat, streaming, errors and limits, and the reliability runs of the serving issue
(concurrent streams, malformed requests, clients that disconnect). Every server is started and
stopped here, every loop is bounded."""
import asyncio
import contextlib
import json
import random
import threading
import time
from http.client import HTTPConnection

import pytest
import torch

import llmstack
from llmstack.model import ModelConfig, Transformer
from llmstack.tokenizer import Tokenizer

openai = pytest.importorskip("openai")
try:  # the HTTP client the installed openai package is built on
    import httpx
except ImportError:
    httpx = pytest.importorskip("httpx2")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

from llmstack.serve.server import Limits, build_app, listen  # noqa: E402  (needs fastapi)

TEXT = ("def add(a, b):\n    return a + b\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n"
        "        self.y = y\n\nimport os\nprint(os.path.join('a', 'b'))\n") * 4
KEY = "test-key"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([TEXT], 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128))
    m.init_weights()
    return m.eval()


@contextlib.contextmanager
def running(app):
    """Serve `app` on a free loopback port in a thread; yield its base URL; stop it after."""
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(500):  # up to ~10 s
        if server.started:
            break
        time.sleep(0.02)
    assert server.started, "the server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()


@pytest.fixture(scope="module")
def server(model, tok):
    app = build_app(model, tok, model_name="tiny", api_key=KEY, max_batch_tokens=64, max_running=16)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def wait_idle(app, rounds=500):
    """Poll until the engine has nothing left (aborts are handled at its next step); bounded."""
    engine = app.state.engine
    for _ in range(rounds):
        if not engine.has_work() and app.state.worker.pending == 0:
            return
        time.sleep(0.02)
    raise AssertionError("the engine did not become idle")


def test_models_health_and_metrics(server, client):
    url, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(url + "/health").json()["status"] == "ok"
    text = httpx.get(url + "/metrics").text
    for name in ("llmstack_queue_length", "llmstack_running_sequences", "llmstack_kv_blocks_used",
                 "llmstack_tokens_per_second", "llmstack_time_to_first_token_seconds_bucket",
                 "llmstack_inter_token_latency_seconds_count", "llmstack_prefix_cache_hit_rate"):
        assert name in text


def test_completion_equals_generate(server, client, model, tok):
    prompt = "def add(a, b):"
    want = llmstack.generate_text(model, tok, prompt, 12, temperature=0)
    got = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.prompt_tokens == len(tok.encode(prompt))
    assert got.usage.completion_tokens == 12 and got.choices[0].finish_reason == "length"
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_equals_llmstack_chat_streamed_and_not(server, client, model, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "class Point"}]
    want = llmstack.chat(model, tok, messages, 15, temperature=0)
    got = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == 15 and chunks[-1].usage.prompt_tokens == got.usage.prompt_tokens


def test_stream_ends_with_done(server):
    url, _ = server
    with httpx.stream("POST", url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "import os", "max_tokens": 5, "stream": True, "temperature": 0}) as r:
        body = r.read().decode()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert body.endswith("data: [DONE]\n\n")
    events = [json.loads(line[6:]) for line in body.split("\n\n") if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_n_seed_stop_and_logprobs(server, client, model, tok):
    a = client.completions.create(model="tiny", prompt="print(", max_tokens=10, temperature=1.0, n=3, seed=5)
    b = client.completions.create(model="tiny", prompt="print(", max_tokens=10, temperature=1.0, n=3, seed=5)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeds make sampling repeatable
    assert [c.index for c in a.choices] == [0, 1, 2] and a.usage.completion_tokens == 30
    free = llmstack.generate_text(model, tok, "self", 20, temperature=0)
    stop = free[5:8]
    got = client.completions.create(model="tiny", prompt="self", max_tokens=20, temperature=0, stop=[stop])
    assert got.choices[0].text == free[:free.index(stop)] and got.choices[0].finish_reason == "stop"
    lp = client.completions.create(model="tiny", prompt="self", max_tokens=4, temperature=0, logprobs=2)
    assert len(lp.choices[0].logprobs.token_logprobs) == 4
    assert all(v <= 0 for v in lp.choices[0].logprobs.token_logprobs)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    assert len(chat.choices[0].logprobs.content) == 3 and len(chat.choices[0].logprobs.content[0].top_logprobs) == 2


def test_errors_are_openai_errors(server, client):
    with pytest.raises(openai.BadRequestError, match="Unrecognized request argument"):
        client.completions.create(model="tiny", prompt="x", extra_body={"bogus": 1})
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="x", max_tokens=10**6)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt=[5] * 200)
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="n must be at most"):
        client.completions.create(model="tiny", prompt="x", n=100)
    bad_key = openai.OpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad_key.models.list()
    r = httpx.post(server[0] + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_full_queue_answers_429_with_retry_after(model, tok):
    app = build_app(model, tok, limits=Limits(max_pending=2))
    with running(app) as url:
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 3})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 2}).status_code == 200


# --------------------------------------------------------------------------- reliability


def test_64_concurrent_streams_equal_their_single_outputs(server, model, tok):
    url, app = server
    rng = random.Random(0)
    words = TEXT.split()
    prompts = [" ".join(rng.choice(words) for _ in range(rng.randrange(1, 12))) for _ in range(64)]
    lengths = [rng.randrange(1, 16) for _ in prompts]
    want = [llmstack.generate_text(model, tok, p, n, temperature=0) for p, n in zip(prompts, lengths)]

    async def one(client, prompt, n):
        stream = await client.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                 stream=True)
        return "".join([c.choices[0].text async for c in stream])

    async def main():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, p, n) for p, n in zip(prompts, lengths)))

    assert asyncio.run(main()) == want
    wait_idle(app)
    assert app.state.engine.pool.num_used == 0


def malformed_requests(n, seed=0):
    """(path, raw body) pairs that must each be refused with a 4xx."""
    rng = random.Random(seed)
    good_c = {"prompt": "x", "max_tokens": 2}
    good_chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    bad_values = [
        ("max_tokens", -1), ("max_tokens", 0), ("max_tokens", 10**9), ("max_tokens", "5"), ("max_tokens", 1.5),
        ("max_tokens", True), ("temperature", -0.5), ("temperature", 1e9), ("temperature", "hot"),
        ("top_p", 0), ("top_p", 2), ("n", 0), ("n", 1000), ("n", -3), ("seed", -1), ("seed", "x"),
        ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("stop", 5), ("stream", "yes"),
        ("logprobs", 100), ("logprobs", -1), ("presence_penalty", 9), ("top_k", 0), ("top_k", 10**6),
        ("unknown_field", 1), ("repetition_penalty", 0),
    ]
    bad_chat = [[], [{"role": "wizard", "content": "x"}], [{"role": "user"}], [{"content": "x"}], "hello",
                [{"role": "user", "content": 5}], [{"role": "user", "content": [{"type": "image_url"}]}],
                [{"role": "user", "content": "x", "extra": 1}], [None]]
    bad_prompts = ["", [], [-1], [10**6], [[]], [1, "a"], {"a": 1}, None, 5, [5] * 200, "word " * 300]
    bad_raw = [b"", b"{", b"not json", b"[1, 2]", b'"a string"', b"null", b"\xff\xfe", b'{"prompt": "x",}']
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            field, value = rng.choice(bad_values)
            body = dict(good_c if rng.random() < 0.5 else good_chat, **{field: value})
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            out.append((path, json.dumps(body).encode()))
        elif kind == 1:
            out.append(("/v1/chat/completions", json.dumps({**good_chat, "messages": rng.choice(bad_chat)}).encode()))
        elif kind == 2:
            out.append(("/v1/completions", json.dumps({**good_c, "prompt": rng.choice(bad_prompts)}).encode()))
        elif kind == 3:
            out.append((rng.choice(["/v1/completions", "/v1/chat/completions"]), rng.choice(bad_raw)))
        else:
            out.append(("/v1/completions", b'{"prompt": "' + b"a" * ((1 << 20) + rng.randrange(10)) + b'"}')
                       if rng.random() < 0.2 else ("/v1/nowhere", b"{}"))
    return out


def test_1000_malformed_requests_all_4xx_and_no_leak(server):
    url, app = server
    statuses = {}
    # The standard library's client: httpx's keep-alive requests each wait out a 40 ms delayed ACK here.
    http = HTTPConnection(*url.removeprefix("http://").split(":"), timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    try:
        for path, body in malformed_requests(1000):
            http.request("POST", path, body=body, headers=headers)
            r = http.getresponse()
            answer = r.read()
            assert 400 <= r.status < 500, (path, body[:200], r.status, answer[:200])
            error = json.loads(answer)["error"]
            assert error["message"] and error["type"], (path, body[:200])
            statuses[r.status] = statuses.get(r.status, 0) + 1
            if r.getheader("connection") == "close":
                http.close()
    finally:
        http.close()
    assert httpx.get(url + "/health").json()["status"] == "ok"
    ok = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 3}, headers=headers)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    wait_idle(app)
    assert app.state.engine.pool.num_used == 0
    assert set(statuses) <= {400, 404, 413} and sum(statuses.values()) == 1000


def test_100_clients_disconnecting_mid_stream(server):
    url, app = server

    async def leave_early(http, i):
        async with http.stream("POST", "/v1/completions", json={"prompt": "import os " * (1 + i % 7),
                                                                "max_tokens": 100, "stream": True}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    break  # one token seen: hang up

    async def main():
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            for start in range(0, 100, 25):
                await asyncio.gather(*(leave_early(http, i) for i in range(start, start + 25)))

    asyncio.run(main())
    wait_idle(app)
    engine = app.state.engine
    assert engine.pool.num_used == 0 and not engine.running and not engine.waiting
    assert app.state.worker.metrics.requests.get("abort", 0) >= 50  # most were cut short (100 tokens each)
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_an_engine_failure_fails_its_requests_and_the_server_keeps_serving(server, client):
    url, app = server
    engine = app.state.engine
    real_step = engine.step

    def failing_step():
        engine.step = real_step  # fail once
        real_step()  # blocks get allocated, then the step "crashes"
        raise RuntimeError("simulated failure")

    engine.step = failing_step
    with pytest.raises(openai.InternalServerError, match="simulated failure"):
        client.completions.create(model="tiny", prompt="def", max_tokens=5, temperature=0)
    wait_idle(app)
    assert engine.pool.num_used == 0
    assert client.completions.create(model="tiny", prompt="def", max_tokens=5).usage.completion_tokens == 5


def test_serve_script_serves_a_checkpoint(model, tok, tmp_path):
    """scripts/serve.py as a user runs it: a checkpoint directory, a port, an API key; stopped after."""
    import subprocess
    import sys
    from pathlib import Path

    from llmstack.interop import save_pretrained

    save_pretrained(model, tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt" / "tokenizer.json")
    probe = listen("127.0.0.1", 0)
    port = probe.getsockname()[1]
    probe.close()
    script = Path(__file__).resolve().parent.parent / "scripts" / "serve.py"
    proc = subprocess.Popen([sys.executable, str(script), "--checkpoint", str(tmp_path / "ckpt"), "--port", str(port),
                             "--api-key", KEY, "--threads", "1", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):  # up to ~60 s to import and load
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.1)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["ckpt"]
        got = c.completions.create(model="ckpt", prompt="def add", max_tokens=6, temperature=0)
        assert got.choices[0].text == llmstack.generate_text(model, tok, "def add", 6, temperature=0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_batched_prompts_streamed_choices_and_echo(server, client, model, tok):
    prompts = ["import os", "class Point"]
    want = [llmstack.generate_text(model, tok, p, 6, temperature=0) for p in prompts]
    got = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    assert [c.text for c in got.choices] == want and [c.index for c in got.choices] == [0, 1]
    stream = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, stream=True)
    texts = ["", ""]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == want
    echoed = client.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0, echo=True)
    assert echoed.choices[0].text == prompts[0] + want[0]
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                            n=2, seed=3, temperature=1.0, stream=True)
    replies, roles = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            replies[c.index] += c.delta.content or ""
            roles[c.index] = roles[c.index] or c.delta.role
    again = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=5,
                                           n=2, seed=3, temperature=1.0)
    assert replies == [c.message.content for c in again.choices] and roles == ["assistant", "assistant"]
