"""The HTTP side: routes, auth, error answers, running a request through the scheduler, and the server's
lifecycle (binding, SIGTERM drain).

Reading order: the error handlers, the service (what each route does), one request's run (a whole answer or a
stream), the app that wires them, then `serve`, which binds the socket and runs uvicorn with a drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import signal
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gptforge.engine import BatchEngine, SeqEvent
from gptforge.errors import GptforgeError
from gptforge.finetune.lora import AdapterSet
from gptforge.generate import load
from gptforge.settings import LOAD_DEVICE, LOAD_DTYPE, ServeConfig
from gptforge.tokenizer import Tokenizer

from .adapters import load_with_adapters
from .embeddings import Embedder
from .metrics import Metrics
from .protocol import APIError, Parsed, RequestParser, Shaper, parse_body
from .scheduler import Job, Scheduler
from .tools import CallStream

CHAT_PAGE = Path(__file__).parent / "static" / "chat.html"  # the page at /: one file, inline CSS and JS
# The page may load nothing but itself and talk to nothing but this server.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
               "img-src 'self' data:; base-uri 'none'; form-action 'none'")
DRAIN_LINGER = 0.5  # seconds after SIGTERM that idle keep-alive connections still get answers (503), at least


# --- error answers: every non-2xx is OpenAI's error JSON with a code, and is counted -------------------------
def _endpoint(request: Request) -> str:
    # The route's template, not the URL: /v1/models/{name} must not mint a label per name asked for.
    return getattr(request.scope.get("route"), "path", "other")


def _error_response(metrics: Metrics, endpoint: str, e: APIError) -> Response:
    metrics.error(endpoint, e.status, e.code)
    return Response(e.json(), status_code=e.status, headers=e.headers, media_type="application/json")


def _framework_error(request: Request, e: Exception) -> APIError:
    """The framework's own errors (no route, wrong method, a path parameter of the wrong type, a client gone
    while its body was read, an unhandled exception) as APIErrors."""
    where = f"{request.method} {request.url.path}"
    if isinstance(e, StarletteHTTPException):
        if e.status_code == 405:
            allow = (e.headers or {}).get("Allow") or (e.headers or {}).get("allow", "")
            return APIError(405, f"{where}: method not allowed; use {allow or 'another method'}",
                            code="method_not_allowed", headers={"Allow": allow} if allow else None)
        if e.status_code == 404:
            return APIError(404, f"{where}: no such route; see /v1/models, /v1/completions, /v1/chat/completions",
                            code="not_found")
        return APIError(e.status_code, f"{where}: {e.detail}")
    if isinstance(e, RequestValidationError):
        first = (e.errors() or [{}])[0]
        name = ".".join(str(x) for x in first.get("loc", ()))
        return APIError(422, f"{where}: '{name}' {first.get('msg', 'is invalid')}", param=name or None,
                        code="invalid_value")
    if isinstance(e, ClientDisconnect):
        return APIError(499, "the client closed the connection while sending its body", code="client_closed")
    return APIError(500, f"internal error ({type(e).__name__}); the server logged it and keeps serving",
                    code="internal_error")


def _add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def on_api_error(request: Request, e: APIError) -> Response:
        return _error_response(metrics, _endpoint(request), e)

    async def on_framework_error(request: Request, e: Exception) -> Response:
        # Unknown routes and wrong methods keep one label, whatever the path asked for.
        endpoint = "other" if isinstance(e, StarletteHTTPException) else _endpoint(request)
        return _error_response(metrics, endpoint, _framework_error(request, e))

    app.add_exception_handler(APIError, on_api_error)
    for kind in (StarletteHTTPException, RequestValidationError, ClientDisconnect):
        app.add_exception_handler(kind, on_framework_error)
    # Starlette answers with this handler, then re-raises for uvicorn to log the traceback.
    app.add_exception_handler(Exception, on_framework_error)


# --- what the routes do ------------------------------------------------------------------------------------
class _Service:
    """The model behind the routes: auth, body reading, and running parsed requests through the scheduler."""

    def __init__(self, model, tokenizer: Tokenizer, cfg: ServeConfig, model_name: str,
                 adapters: AdapterSet | None = None):
        self.tok, self.cfg, self.name, self.adapters = tokenizer, cfg, model_name, adapters
        self.model_ids = [model_name, *(adapters.names if adapters else ())]  # what a request's `model` may name
        self.block_size = model.config.block_size
        self.metrics = Metrics()
        engine = BatchEngine(model, tokenizer, cfg.max_batch, max_prefill_tokens=cfg.max_prefill_tokens,
                             prefix_cache_tokens=cfg.prefix_cache_tokens, kv_dtype=cfg.kv_dtype,
                             adapters=adapters)
        self.scheduler = Scheduler(engine, self.metrics, cfg.max_queue)
        self.parser = RequestParser(tokenizer, self.block_size, cfg, model_name, tuple(self.model_ids[1:]))
        self.embedder = Embedder(model, tokenizer, cfg.embedding_pooling)
        self.created = int(time.time())

    def authorize(self, request: Request) -> None:
        if self.cfg.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.cfg.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(self, request: Request) -> dict:
        """The body, refused past --max-body-bytes (declared or read), then parsed within bounds."""
        limit = self.cfg.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(413, f"the request body is {int(length)} bytes; the limit is {limit} (--max-body-bytes)",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds bodies sent without a Content-Length
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"the request body exceeds the limit of {limit} bytes (--max-body-bytes)",
                               code="request_too_large")
            chunks.append(chunk)
        return parse_body(b"".join(chunks))

    def model_card(self, name: str) -> dict:
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "gptforge",
                "max_model_len": self.block_size}
        return card if name == self.name else {**card, "parent": self.name}  # a LoRA adapter of the base

    def adapter(self, index: int):
        """A context factory: forwards inside take adapter `index` (-1: the base)."""
        return (lambda: self.adapters.use(index)) if index >= 0 else contextlib.nullcontext

    async def run(self, request: Request, req: Parsed) -> dict | Response:
        if req.echo and req.adapter >= 0:
            raise APIError(400, f"'echo' is not supported for an adapter ('{req.model}'); ask the base "
                                f"'{self.name}', or without echo", param="echo", code="unsupported")
        if req.echo:
            return await self.run_echo(request, req)
        call = _Call(self, req)
        self.scheduler.submit(call.jobs)  # 429 / 503 raise here, before any response is started
        if req.stream:
            self.metrics.request(_endpoint(request), 200)
            return _EventStream(call.stream(), on_close=lambda: self.scheduler.cancel(call.jobs))
        out = await call.collect(request)
        self.metrics.request(_endpoint(request), 200)
        return out


    async def run_echo(self, request: Request, req: Parsed) -> dict:
        """`echo`: the prompts scored in one batched forward (Scheduler.score), then what is to be generated:
        nothing (max_tokens 0), the greedy next token read off that same forward (lm-eval's requests: max_tokens 1
        at temperature 0, no penalties), or the engine's run of the request."""
        scores = await self.scheduler.score(req.prompts, req.logprobs or 0)
        call = _Call(self, req)
        call.shape.echo = [s for s in scores for _ in range(req.n)]
        p = req.params[0]
        if p.max_new_tokens == 0 or (p.max_new_tokens == 1 and p.temperature == 0 and p.repetition_penalty == 1
                                     and p.presence_penalty == 0 and p.frequency_penalty == 0
                                     and req.grammar is None):
            events = [[] if p.max_new_tokens == 0 else [self._greedy_event(s.next, req)] for s in call.shape.echo]
            texts = [ev[0].text if ev else "" for ev in events]
            finish = [ev[0].finish_reason if ev else "length" for ev in events]
            out = call.shape.response(texts, finish, events, sum(len(ev) for ev in events))
        else:
            self.scheduler.submit(call.jobs)
            out = await call.collect(request)
        self.metrics.request(_endpoint(request), 200)
        return out

    def _greedy_event(self, best: list[tuple[int, float]], req: Parsed) -> SeqEvent:
        token, logprob = best[0]
        stop = token in req.stop_ids  # reported with its logprob all the same: lm-eval reads one token past the prompt
        return SeqEvent(-1, token, "" if stop else self.tok.decode([token]), logprob, best[:req.logprobs or 0],
                        "stop" if stop else "length")


class _Choice:
    """What one choice has produced so far."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[SeqEvent] = []  # every event, the stop id's included (usage counts it)
        self.finish_reason: str | None = None


class _Call:
    """One request in flight: a job per choice, the queue their tokens arrive on, what each has produced."""

    def __init__(self, svc: _Service, req: Parsed):
        self.svc, self.req = svc, req
        self.queue: asyncio.Queue = asyncio.Queue()
        now = time.monotonic()
        grammars = svc.parser.grammars
        self.jobs = [Job(prompt, req.params[i * req.n + j], req.stop_ids, i * req.n + j, self.queue,
                         now + svc.cfg.request_timeout, now,
                         constraint=None if req.grammar is None else grammars.matcher(req.grammar, req.stop_ids),
                         adapter=req.adapter)
                     for i, prompt in enumerate(req.prompts) for j in range(req.n)]
        self.choices = [_Choice() for _ in self.jobs]
        self.shape = Shaper(svc.tok, req, req.model or svc.name)

    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)

    def cached_tokens(self) -> int:
        """Prompt tokens read from the prefix cache, each prompt once (its choices' best)."""
        n = self.req.n
        cached = [c.tokens[0].cached_tokens if c.tokens else 0 for c in self.choices]
        return sum(max(cached[i:i + n]) for i in range(0, len(cached), n))

    async def collect(self, request: Request) -> dict:
        """The whole answer; a client that leaves meanwhile cancels its jobs (checked every half second)."""
        pending, checked = len(self.jobs), time.monotonic()
        try:
            while pending:
                try:
                    index, item = await asyncio.wait_for(self.queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    index, item = None, None
                if time.monotonic() - checked > 0.5:  # tokens may arrive faster than that: check by time
                    checked = time.monotonic()
                    if await request.is_disconnected():  # nginx's 499 "client closed request"
                        raise APIError(499, "the client closed the connection before the answer", code="client_closed")
                if item is None:
                    continue
                if isinstance(item, APIError):
                    raise item
                c = self.choices[index]
                c.text += item.text
                c.tokens.append(item)
                if item.finish_reason:
                    c.finish_reason = item.finish_reason
                    pending -= 1
        finally:
            self.svc.scheduler.cancel(self.jobs)  # no-op for finished jobs; frees the others on any error
        events = [[ev for ev in c.tokens if ev.token not in j.stop_ids] for c, j in zip(self.choices, self.jobs)]
        return self.shape.response([c.text for c in self.choices], [c.finish_reason for c in self.choices], events,
                                   self.completion_tokens(), self.cached_tokens())

    async def stream(self):
        """Server-sent events: one chunk per text delta, a finish chunk per choice, the usage, [DONE]."""
        for line in self.shape.opening(len(self.jobs)):
            yield line
        pending = len(self.jobs)
        held: list[list[SeqEvent]] = [[] for _ in self.jobs]  # tokens whose text has not come out yet
        tools = self.req.tools if self.req.tools is not None and self.req.tools.parses else None
        calls = [CallStream(tools) for _ in self.jobs] if tools else None  # text -> content and tool calls
        while pending:
            index, item = await self.queue.get()
            if isinstance(item, APIError):
                self.svc.metrics.error(None, item.status, item.code)
                yield self.shape.error_event(item)
                return
            c = self.choices[index]
            c.tokens.append(item)
            if item.token not in self.jobs[index].stop_ids:
                held[index].append(item)
            if item.text or item.finish_reason:
                offset = len(c.text)
                c.text += item.text
                if item.text and calls is None:
                    yield self.shape.chunk(index, item.text, None, held[index], offset)
                    held[index] = []
                elif calls is not None:
                    parts = calls[index].feed(item.text) + (calls[index].close() if item.finish_reason else [])
                    for line in self._tool_deltas(index, parts, held[index]):
                        yield line
                if item.finish_reason:
                    c.finish_reason = item.finish_reason
                    if calls is not None and calls[index].sent and c.finish_reason == "stop":
                        c.finish_reason = "tool_calls"
                    pending -= 1
                    yield self.shape.chunk(index, None if self.req.chat else "", c.finish_reason, held[index],
                                           len(c.text))
        for line in self.shape.closing(self.completion_tokens(), self.cached_tokens()):
            yield line

    def _tool_deltas(self, index: int, parts: list[tuple[str, Any]], held: list[SeqEvent]) -> list[str]:
        """The chunks of CallStream's parts: content deltas (with the logprobs held so far) and tool calls."""
        lines = []
        for kind, value in parts:
            if kind == "content":
                lines.append(self.shape.chunk(index, value, None, list(held), 0))
                held.clear()
            else:
                lines += self.shape.tool_call_chunks(index, *value)
        return lines


class _EventStream(StreamingResponse):
    """Server-sent events whose jobs are cancelled however the response ends: finished, the client gone
    (Starlette cancels the response when it sees the disconnect, possibly before the body was ever started,
    so a `finally` in the body's generator is not enough), or the server shutting down."""

    def __init__(self, body, on_close):
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


# --- the app -----------------------------------------------------------------------------------------------
class InFlight:
    """ASGI middleware: counts the HTTP requests being answered (the drain waits for them), and while the
    server drains, marks every answer `Connection: close` so that a client's keep-alive connection ends with a
    response, not in silence."""

    def __init__(self, app, scheduler: Scheduler, counter: list[int]):
        self.app, self.scheduler, self.counter = app, scheduler, counter

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.counter[0] += 1
        try:
            if self.scheduler.draining:
                send = _closing(send)
            await self.app(scope, receive, send)
        finally:
            self.counter[0] -= 1


def _closing(send):
    async def send_closing(message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)
    return send_closing


def _add_routes(app: FastAPI, svc: _Service) -> None:
    page = CHAT_PAGE.read_text(encoding="utf-8")

    @app.get("/")
    async def chat_page():
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health():
        if svc.scheduler.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": svc.name, "live": svc.scheduler.engine.live,
                "waiting": svc.scheduler.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(svc.metrics.render(svc.scheduler.queue_depth, svc.scheduler.engine.live),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        svc.authorize(request)
        svc.metrics.request("/v1/models", 200)
        return {"object": "list", "data": [svc.model_card(name) for name in svc.model_ids]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        svc.authorize(request)
        if name not in svc.model_ids:
            raise APIError(404, f"the model '{name}' does not exist; this server serves "
                                f"{', '.join(repr(m) for m in svc.model_ids)}", code="model_not_found")
        svc.metrics.request(_endpoint(request), 200)
        return svc.model_card(name)

    @app.post("/v1/completions")
    async def completions(request: Request):
        svc.authorize(request)
        return await svc.run(request, svc.parser.completion(await svc.read_json(request)))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        svc.authorize(request)
        return await svc.run(request, svc.parser.chat(await svc.read_json(request)))

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        svc.authorize(request)
        req = svc.embedder.parse(await svc.read_json(request))
        out = await svc.embedder.answer(req, svc.adapter(svc.parser.model({"model": req.model})))
        svc.metrics.request(_endpoint(request), 200)
        return out


def create_app(model, tokenizer: Tokenizer, cfg: ServeConfig, model_name: str,
               adapters: AdapterSet | None = None) -> FastAPI:
    """The FastAPI app serving `model` as `model_name`, and the LoRA adapters stacked into it (serve.adapters) each
    as the model id of its name: routes, scheduler lifecycle, error handlers.

    `app.state` holds the `scheduler`, the `metrics` and `in_flight` (a one-item list: requests being answered).
    """
    svc = _Service(model, tokenizer, cfg, model_name, adapters)

    @asynccontextmanager
    async def lifespan(app):
        svc.scheduler.start(asyncio.get_running_loop())
        yield
        svc.scheduler.stop()

    app = FastAPI(title="gptforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics, app.state.in_flight = svc.scheduler, svc.metrics, [0]
    app.add_middleware(InFlight, scheduler=svc.scheduler, counter=app.state.in_flight)
    _add_error_handlers(app, svc.metrics)
    _add_routes(app, svc)
    return app


# --- running it --------------------------------------------------------------------------------------------
class _DrainingServer(uvicorn.Server):
    """uvicorn with a drain before its shutdown: on SIGTERM stop accepting connections, keep the open ones
    answering (new requests get 503 `shutting_down` with `Connection: close`) until the requests in flight are
    done, for at least DRAIN_LINGER and at most --shutdown-timeout seconds; then cancel what is left (503 to
    each), and only then close the idle connections."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, timeout: float):
        super().__init__(config)
        self.scheduler: Scheduler = app.state.scheduler
        self.in_flight: list[int] = app.state.in_flight
        self.timeout = timeout

    def handle_exit(self, sig, frame) -> None:
        self.scheduler.draining = True  # from now on: 503 for new requests, in-flight ones run on
        super().handle_exit(sig, frame)

    async def _wait(self, until: float, linger_until: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < until and (self.in_flight[0] or loop.time() < linger_until) and not self.force_exit:
            await asyncio.sleep(0.05)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting; the connections already open stay
            server.close()
        for sock in sockets or []:
            sock.close()
        loop = asyncio.get_running_loop()
        start = loop.time()
        await self._wait(start + self.timeout, start + min(DRAIN_LINGER, self.timeout))
        if self.in_flight[0]:  # the deadline: what is still queued or decoding gets its 503 now
            await loop.run_in_executor(None, self.scheduler.stop)
            await self._wait(loop.time() + 2.0)
        await super().shutdown(sockets)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on sockets whose
    # proto says TCP. Without it Nagle holds a response's second write for the client's delayed ACK: +40 ms a request.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise GptforgeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port "
                            "(0 takes any free one)") from None
    return sock


def serve(checkpoint: str | Path, cfg: ServeConfig, *, device: str = LOAD_DEVICE, dtype: str = LOAD_DTYPE) -> None:
    """Load a checkpoint and serve it until SIGTERM / Ctrl-C (which drain in-flight requests first)."""
    name = cfg.model_name or Path(checkpoint).resolve().name
    if name in dict(cfg.adapters):
        raise GptforgeError(f"--adapter {name}: the base is already served as '{name}'; name the adapter otherwise")
    adapters = None
    if cfg.adapters:
        model, tokenizer, adapters = load_with_adapters(checkpoint, cfg.adapters, device, dtype)
    else:
        model, tokenizer = load(checkpoint, device=device, dtype=dtype)
    app = create_app(model, tokenizer, cfg, name, adapters)
    sock = _bind(cfg.host, cfg.port)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=cfg.shutdown_timeout, timeout_keep_alive=30)
    url = f"http://{'[' + host + ']' if sock.family == socket.AF_INET6 else host}:{port}"
    print(f"serving {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, context "
          f"{model.config.block_size}, batch {cfg.max_batch}) at {url}/v1"
          f"{' (API key required)' if cfg.api_key else ''}"
          f"{'; adapters ' + ', '.join(adapters.names) if adapters else ''}; Ctrl-C or SIGTERM to stop", flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place of the
    # default ones, that ends the process normally (exit 0) instead of by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _DrainingServer(config, app, cfg.shutdown_timeout).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("server stopped", flush=True)
