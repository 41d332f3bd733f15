"""The OpenAI-compatible HTTP server: FastAPI routes over the engine running in its own thread.

    app = build_app(model, tokenizer, model_name="quickstart")      # then uvicorn.run(app, ...)

Routes: POST /v1/completions and /v1/chat/completions (`stream: true` sends server-sent
events ending in `data: [DONE]`), GET /v1/models, /health, /metrics (Prometheus text) and
/ (the chat page). Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}},
so the official clients raise their usual exceptions.

Threads: the engine is not thread-safe, so one thread owns it (`EngineThread`): handlers
post requests and aborts to it and await the tokens it sends back through the event loop.
A stream whose client goes away is cancelled by Starlette; its `finally` aborts the
request, which frees its blocks at the engine's next step.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

from llmstack.serve.engine import Engine, StepOutput

try:  # the `serve` extra
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, ValidationError
except ImportError as e:  # pragma: no cover
    raise ImportError("the server needs FastAPI and uvicorn: pip install 'llmstack[serve]'") from e


@dataclass
class Limits:
    """What one request may ask for, and how many may wait. Past them: a 400 (413 for the body,
    429 with Retry-After for a full queue)."""

    max_body_bytes: int = 1 << 20
    max_n: int = 8
    max_tokens: Optional[int] = None  # default: the model's context
    max_stop: int = 4
    max_logprobs: int = 5
    max_pending: int = 256  # requests (choices) queued or running
    retry_after_s: int = 1


# --------------------------------------------------------------------------- metrics


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, their sum and count."""

    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            total += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {total}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass
class Metrics:
    ttft: Histogram = field(default_factory=lambda: Histogram(
        "llmstack_time_to_first_token_seconds", "Arrival to first token.", LATENCY_BUCKETS))
    itl: Histogram = field(default_factory=lambda: Histogram(
        "llmstack_inter_token_latency_seconds", "Time between two tokens of one request.", LATENCY_BUCKETS))
    requests: dict = field(default_factory=dict)  # finish reason -> count
    token_times: list = field(default_factory=list)  # (time, tokens) of recent steps, for tokens/s

    def tokens_per_s(self, window: float = 10.0) -> float:
        now = time.perf_counter()
        recent = [(t, n) for t, n in self.token_times if now - t <= window]
        self.token_times = recent
        return sum(n for _, n in recent) / window


# --------------------------------------------------------------------------- the engine's thread


@dataclass
class Event:
    """One choice's news, sent from the engine thread to a handler."""

    index: int
    text: str = ""
    token: Optional[int] = None
    logprob: Optional[dict] = None
    finished: bool = False
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: Optional[str] = None
    error_status: int = 400  # 400: the engine refused the request; 500: it failed while running it


class QueueFull(Exception):
    pass


class EngineThread:
    """Owns the engine: takes submissions and aborts from any thread, steps while there is work,
    and hands each request's outputs to the asyncio queue of the handler that asked."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.metrics = Metrics()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = False
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int]] = {}
        self._lock = threading.Lock()
        self.pending = 0  # choices submitted and not yet finished
        self._previous_token_at: dict[str, float] = {}
        self.thread = threading.Thread(target=self._run, name="llmstack-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self.thread.join(timeout=10)

    def submit(self, prompts: list[list[int]], kwargs: list[dict], out: asyncio.Queue) -> list[str]:
        """Queue one engine request per choice; raise QueueFull past the limit."""
        with self._lock:
            if self.pending + len(prompts) > self.limits.max_pending:
                raise QueueFull
            self.pending += len(prompts)
        loop = asyncio.get_running_loop()
        ids = []
        for index, (prompt, kw) in enumerate(zip(prompts, kwargs)):
            rid = f"{uuid.uuid4().hex}"
            self._routes[rid] = (loop, out, index)
            self._inbox.put(("add", rid, prompt, kw))
            ids.append(rid)
        self._wake.set()
        return ids

    def abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._inbox.put(("abort", rid, None, None))
        self._wake.set()

    def _send(self, rid: str, event: Event) -> None:
        route = self._routes.get(rid)
        if route is None:
            return
        loop, out, index = route
        event.index = index
        if event.finished:
            del self._routes[rid]
            with self._lock:
                self.pending -= 1
        try:
            loop.call_soon_threadsafe(out.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass

    def _run(self) -> None:
        while not self._stop:
            while True:
                try:
                    kind, rid, prompt, kw = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    try:
                        self.engine.add_request(prompt, request_id=rid, **kw)
                    except ValueError as e:
                        self._send(rid, Event(0, finished=True, error=str(e)))
                else:
                    req = self.engine.abort(rid)
                    self._previous_token_at.pop(rid, None)
                    if req is not None:
                        self._count(req.finish_reason)
                        self._send(rid, Event(0, finished=True, finish_reason="abort"))
            if not self.engine.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # a bug or out of memory: fail the running requests, keep serving
                for req in [*self.engine.running, *self.engine.waiting]:
                    self.engine.abort(req.id)
                    self._send(req.id, Event(0, finished=True, error=f"engine error: {type(e).__name__}: {e}",
                                             error_status=500))
                continue
            now = time.perf_counter()
            self.metrics.token_times.append((now, sum(o.token is not None for o in outputs)))
            for o in outputs:
                self._record(o)
                self._send(o.request.id, self._event(o))

    def _record(self, o: StepOutput) -> None:
        req = o.request
        if len(req.output) == 1:
            self.metrics.ttft.observe(req.first_token_at - req.arrival)
        elif req.id in self._previous_token_at:
            self.metrics.itl.observe(req.last_token_at - self._previous_token_at[req.id])
        self._previous_token_at[req.id] = req.last_token_at
        if o.finished:
            self._previous_token_at.pop(req.id, None)
            self._count(req.finish_reason)

    def _count(self, reason: Optional[str]) -> None:
        self.metrics.requests[reason] = self.metrics.requests.get(reason, 0) + 1

    @staticmethod
    def _event(o: StepOutput) -> Event:
        req = o.request
        return Event(0, o.text, o.token, o.logprob, o.finished, req.finish_reason if o.finished else None,
                     len(req.prompt), len(req.output))

    def render_metrics(self) -> str:
        e, m = self.engine, self.metrics
        gauges = [
            ("llmstack_queue_length", "Requests waiting to be admitted.", len(e.waiting)),
            ("llmstack_running_sequences", "Sequences in the running batch.", len(e.running)),
            ("llmstack_kv_blocks_used", "KV blocks held by sequences.", e.pool.num_used),
            ("llmstack_kv_blocks_total", "KV blocks in the pool.", e.pool.usable),
            ("llmstack_kv_waste_ratio", "Allocated but unfilled KV slots of the running sequences.", e.kv_waste()),
            ("llmstack_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache.", e.pool.hit_rate),
            ("llmstack_tokens_per_second", "Generated tokens per second over the last 10 s.", m.tokens_per_s()),
        ]
        lines = []
        for name, help, value in gauges:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} gauge", f"{name} {value}"]
        counters = [("llmstack_generated_tokens_total", "Tokens generated.", e.stats.generated_tokens),
                    ("llmstack_preemptions_total", "Sequences preempted for recompute.", e.stats.preemptions)]
        for name, help, value in counters:
            lines += [f"# HELP {name} {help}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += ["# HELP llmstack_requests_total Finished requests by finish reason.",
                  "# TYPE llmstack_requests_total counter"]
        lines += [f'llmstack_requests_total{{finish_reason="{k}"}} {v}' for k, v in sorted(m.requests.items())]
        lines += m.ttft.render() + m.itl.render()
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- request bodies


class _Body(BaseModel):
    # strict: "5" is not 5 and true is not 1; unknown fields are an error, as with OpenAI
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=1)
    min_p: Optional[float] = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: Optional[dict[str, bool]] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=0, lt=2**63)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    repetition_penalty: float = Field(default=1.0, gt=0, le=10)
    user: Optional[str] = None


class CompletionBody(_Body):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)
    logprobs: Optional[int] = Field(default=None, ge=0)
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]]]
    name: Optional[str] = None


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, type=self.type, param=self.param, code=self.code,
                              headers=self.headers)


def error_response(status: int, message: str, *, type: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _validation_message(e: ValidationError) -> tuple[str, Optional[str]]:
    err = e.errors()[0]
    param = ".".join(str(p) for p in err["loc"]) or None
    if err["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    return f"{param}: {err['msg']}" if param else err["msg"], param


# --------------------------------------------------------------------------- the app


def build_app(model, tokenizer, *, model_name: str = "llmstack", api_key: Optional[str] = None,
              limits: Optional[Limits] = None, engine: Optional[Engine] = None, **engine_kwargs) -> FastAPI:
    """The FastAPI app serving `model`. The engine thread starts and stops with the app (its lifespan)."""
    from contextlib import asynccontextmanager

    from llmstack.serve.page import CHAT_PAGE

    limits = limits or Limits()
    engine = engine or Engine(model, tokenizer, **engine_kwargs)
    context = model.config.max_seq_len
    max_tokens_limit = limits.max_tokens or context
    worker = EngineThread(engine, limits)

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="llmstack", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return error_response(404, f"no route {request.method} {request.url.path}", code="not_found")

    @app.exception_handler(405)
    async def _not_allowed(request, exc):
        return error_response(405, f"method {request.method} not allowed on {request.url.path}")

    @app.exception_handler(Exception)
    async def _internal(request, exc):
        return error_response(500, f"internal error: {type(exc).__name__}", type="server_error")

    def check_key(request: HTTPRequest) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect API key provided", type="authentication_error", code="invalid_api_key")

    async def read_body(request: HTTPRequest, schema):
        check_key(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise APIError(413, f"request body of {declared} bytes is over the limit of {limits.max_body_bytes}",
                           code="request_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > limits.max_body_bytes:
                raise APIError(413, f"request body is over the limit of {limits.max_body_bytes} bytes",
                               code="request_too_large")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the body must be a JSON object")
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            message, param = _validation_message(e)
            raise APIError(400, message, param=param) from None

    def sampling(body: _Body, max_tokens: Optional[int], prompt_len: int) -> list[dict]:
        if body.n > limits.max_n:
            raise APIError(400, f"n must be at most {limits.max_n}, got {body.n}", param="n")
        if prompt_len >= context:
            raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has "
                           f"{prompt_len} tokens (no room for new ones)", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = context - prompt_len
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens must be at most {max_tokens_limit}, got {max_tokens}", param="max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > limits.max_stop or any(not s for s in stop):
            raise APIError(400, f"stop must be at most {limits.max_stop} non-empty strings", param="stop")
        kw = dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p if body.top_p < 1 else None,
                  top_k=body.top_k, min_p=body.min_p, presence_penalty=body.presence_penalty,
                  frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
                  stop_strings=stop)
        if body.top_k is not None and body.top_k > model.config.vocab_size:
            raise APIError(400, f"top_k must be at most {model.config.vocab_size}", param="top_k")
        return [{**kw, "seed": None if body.seed is None else (body.seed + i) % 2**63} for i in range(body.n)]

    def token_text(token: int) -> str:
        return tokenizer.decode([token])

    async def run(request: HTTPRequest, prompts: list[list[int]], kwargs: list[dict], stream_fn, final_fn,
                  stream: bool):
        out: asyncio.Queue = asyncio.Queue()
        try:
            ids = worker.submit(prompts, kwargs, out)
        except QueueFull:
            raise APIError(429, "the server is busy: too many requests are queued; retry later",
                           type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(limits.retry_after_s)}) from None
        if stream:
            async def events():
                live = set(range(len(ids)))
                try:
                    while live:
                        event = await out.get()
                        if event.error is not None:
                            yield f"data: {json.dumps(error_body(event.error, event.error_status))}\n\n"
                            live.discard(event.index)
                            continue
                        if event.finished:
                            live.discard(event.index)
                        chunk = stream_fn(event)
                        if chunk is not None:
                            yield f"data: {json.dumps(chunk)}\n\n"
                    tail = final_fn(None)
                    if tail is not None:
                        yield f"data: {json.dumps(tail)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    if live:  # the client went away (or the server is stopping): free the blocks
                        worker.abort([ids[i] for i in live])
            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        live = set(range(len(ids)))
        events = []
        try:
            while live:
                try:
                    event = await asyncio.wait_for(out.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        break
                    continue
                if event.error is not None:
                    raise APIError(event.error_status, event.error,
                                   type="invalid_request_error" if event.error_status < 500 else "server_error")
                events.append(event)
                if event.finished:
                    live.discard(event.index)
        finally:
            if live:
                worker.abort([ids[i] for i in live])
        return JSONResponse(final_fn(events))

    def error_body(message: str, status: int) -> dict:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}

    def usage(prompt_tokens: list[int], completion: dict[int, int]) -> dict:
        p = sum(prompt_tokens)
        c = sum(completion.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": len(engine.running), "waiting": len(engine.waiting),
                "kv_blocks_used": engine.pool.num_used}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(worker.render_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: HTTPRequest):
        check_key(request)
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "llmstack", "max_model_len": context}]}

    @app.get("/")
    async def page():
        return HTMLResponse(CHAT_PAGE.replace("{{MODEL}}", model_name))

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await read_body(request, CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, str):
            texts = [prompt]
        elif prompt and all(isinstance(p, str) for p in prompt):
            texts = prompt
        elif prompt and all(isinstance(p, int) for p in prompt):
            texts = [prompt]
        elif prompt and all(isinstance(p, list) for p in prompt):
            texts = prompt
        else:
            raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")
        if len(texts) * body.n > limits.max_n:
            raise APIError(400, f"prompts x n must be at most {limits.max_n}", param="n")
        if body.logprobs is not None and body.logprobs > limits.max_logprobs:
            raise APIError(400, f"logprobs must be at most {limits.max_logprobs}", param="logprobs")
        encoded = [tokenizer.encode(t) if isinstance(t, str) else list(t) for t in texts]
        prompts, kwargs, prompt_lens = [], [], []
        for ids in encoded:
            if not ids:
                raise APIError(400, "the prompt is empty", param="prompt")
            if any(not 0 <= t < model.config.vocab_size for t in ids):
                raise APIError(400, "a prompt token id is outside the vocabulary", param="prompt")
            for kw in sampling(body, body.max_tokens, len(ids)):
                prompts.append(ids)
                kwargs.append({**kw, "logprobs": body.logprobs})
                prompt_lens.append(len(ids))
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        counts: dict[int, int] = {}

        def logprobs_of(event: Event) -> Optional[dict]:
            if event.logprob is None:
                return None
            lp = event.logprob
            return {"tokens": [token_text(lp["token"])], "token_logprobs": [lp["logprob"]],
                    "top_logprobs": [{token_text(t): v for t, v in lp["top"]}], "text_offset": [0]}

        def chunk(event: Event) -> Optional[dict]:
            counts[event.index] = event.completion_tokens
            if not event.text and not event.finished:
                return None
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": event.index, "text": event.text, "logprobs": logprobs_of(event),
                                 "finish_reason": event.finish_reason}]}

        def final(events: Optional[list[Event]]) -> Optional[dict]:
            if events is None:  # the end of a stream: usage when asked for
                if body.stream_options and body.stream_options.get("include_usage"):
                    return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                            "choices": [], "usage": usage(prompt_lens, counts)}
                return None
            choices = []
            for i in range(len(prompts)):
                mine = [e for e in events if e.index == i]
                text = "".join(e.text for e in mine)
                if body.echo:
                    text = tokenizer.decode(prompts[i]) + text
                lps = None
                if body.logprobs is not None:
                    got = [e.logprob for e in mine if e.logprob is not None]
                    lps = {"tokens": [token_text(g["token"]) for g in got],
                           "token_logprobs": [g["logprob"] for g in got],
                           "top_logprobs": [{token_text(t): v for t, v in g["top"]} for g in got],
                           "text_offset": []}
                counts[i] = mine[-1].completion_tokens if mine else 0
                choices.append({"index": i, "text": text, "logprobs": lps,
                                "finish_reason": mine[-1].finish_reason if mine else None})
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage(prompt_lens, counts)}

        return await run(request, prompts, kwargs, chunk, final, body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await read_body(request, ChatBody)
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # content parts: only text ones here
                if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in content):
                    raise APIError(400, "only text content parts are supported", param="messages")
                content = "".join(p["text"] for p in content)
            messages.append({"role": m.role, "content": content})
        if body.top_logprobs is not None and body.top_logprobs > limits.max_logprobs:
            raise APIError(400, f"top_logprobs must be at most {limits.max_logprobs}", param="top_logprobs")
        try:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        kwargs = [{**kw, "logprobs": (body.top_logprobs or 0) if body.logprobs else None}
                  for kw in sampling(body, max_tokens, len(ids))]
        prompts = [ids] * len(kwargs)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        counts: dict[int, int] = {}
        started: set[int] = set()

        def chat_logprobs(got: list[dict]) -> dict:
            def entry(t, v):
                s = token_text(t)
                return {"token": s, "logprob": v, "bytes": list(s.encode())}
            return {"content": [{**entry(g["token"], g["logprob"]),
                                 "top_logprobs": [entry(t, v) for t, v in g["top"]]} for g in got]}

        def chunk(event: Event) -> Optional[dict]:
            counts[event.index] = event.completion_tokens
            delta = {}
            if event.index not in started:
                started.add(event.index)
                delta["role"] = "assistant"
            if event.text:
                delta["content"] = event.text
            if not delta and not event.finished:
                return None
            if not event.finished and "content" not in delta:
                delta["content"] = ""
            lps = chat_logprobs([event.logprob]) if event.logprob is not None else None
            return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                    "choices": [{"index": event.index, "delta": delta, "logprobs": lps,
                                 "finish_reason": event.finish_reason}]}

        def final(events: Optional[list[Event]]) -> Optional[dict]:
            if events is None:
                if body.stream_options and body.stream_options.get("include_usage"):
                    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                            "choices": [], "usage": usage([len(ids)] * len(prompts), counts)}
                return None
            choices = []
            for i in range(len(prompts)):
                mine = [e for e in events if e.index == i]
                counts[i] = mine[-1].completion_tokens if mine else 0
                lps = chat_logprobs([e.logprob for e in mine if e.logprob is not None]) if body.logprobs else None
                choices.append({"index": i, "message": {"role": "assistant", "content": "".join(e.text for e in mine)},
                                "logprobs": lps, "finish_reason": mine[-1].finish_reason if mine else None})
            return {"id": cid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": choices, "usage": usage([len(ids)] * len(prompts), counts)}

        return await run(request, prompts, kwargs, chunk, final, body.stream)

    return app


def serve(checkpoint: str, *, host: str = "127.0.0.1", port: int = 8000, api_key: Optional[str] = None,
          model_name: Optional[str] = None, device=None, dtype=None, limits: Optional[Limits] = None,
          **engine_kwargs) -> None:
    """Load a checkpoint and serve it until interrupted (what `scripts/serve.py` runs)."""
    from pathlib import Path

    import uvicorn

    from llmstack.finetune.loading import from_pretrained
    from llmstack.interop import load_tokenizer

    model = from_pretrained(checkpoint, device=device, dtype=dtype)
    tokenizer = load_tokenizer(checkpoint)
    app = build_app(model, tokenizer, model_name=model_name or Path(checkpoint).name, api_key=api_key,
                    limits=limits, **engine_kwargs)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listen(host, port)])


def listen(host: str = "127.0.0.1", port: int = 0):
    """A listening socket with TCP_NODELAY, which its connections inherit. Without it, a response's
    header and body (and each streamed event after the first) are separate small writes, and
    Nagle's algorithm holds each one until the client's delayed ACK: 40 ms per request or token."""
    import socket

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(2048)
    return sock
