"""An OpenAI-compatible HTTP server over the inference engine: `gptforge serve CKPT`.

The official `openai` client, curl and tools built on them work unchanged against `/v1/completions`,
`/v1/chat/completions` and `/v1/models`. The decoding is generate.py's BatchEngine; this module adds only
what a server needs around it:

- scheduling: one thread owns the engine and loops admit -> step -> deliver. New sequences join the running
  batch at step boundaries and finished ones leave it (continuous batching, Yu et al. 2022, "Orca"), so
  concurrent requests share every decode step. Requests wait in a bounded queue; when it is full the answer is
  429 with Retry-After, not an unbounded backlog.
- validation: every field is type- and range-checked here, and a bad one is a 400 in OpenAI's error shape
  naming the field, before anything reaches the engine.
- accounting and limits: usage per response, Prometheus metrics at /metrics, an optional API key, prompt and
  completion limits checked against the context, a body size limit, a per-request deadline, and cancellation
  of a sequence whose client went away.
- graceful shutdown: on SIGTERM new requests get 503, in-flight ones finish (or are cancelled at the deadline).

Reading order: config, metrics, errors, the scheduler (the engine's only caller), request parsing, the HTTP
app (responses, streaming), then `serve`, which binds the socket and runs uvicorn.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import math
import signal
import socket
import threading
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptforge.errors import GptforgeError
from gptforge.generate import BatchEngine, SamplingParams, SeqEvent, _prompt_ids
from gptforge.tokenizer import Tokenizer


# --- configuration -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeConfig:
    """The server's settings: `gptforge serve` flags, one field each."""

    host: str = "127.0.0.1"  # loopback only unless asked: an open port on all interfaces is a decision
    port: int = 8000  # 0: any free port (the one bound is printed)
    model_name: str | None = None  # the id clients pass as `model` (default: the checkpoint folder's name)
    api_key: str | None = None  # when set, every /v1 request needs `Authorization: Bearer KEY`
    max_batch: int = 16  # sequences decoded together (KV-cache rows)
    # Prompt token positions prefilled between two decode steps while sequences decode (chunked prefill): a
    # wave of new requests then delays each running stream's next token by one such prefill, not by all of
    # them. None: no limit (each wave is prefilled at once).
    max_prefill_tokens: int | None = 64
    max_queue: int = 64  # sequences waiting for a row; beyond this, 429
    max_prompt_tokens: int | None = None  # default: the context minus one
    max_tokens: int | None = None  # most completion tokens one choice may ask for (default: the context)
    max_n: int = 16  # most choices per request
    max_body_bytes: int = 1_000_000
    request_timeout: float = 600.0  # seconds from arrival to the last token, queueing included
    shutdown_timeout: float = 30.0  # seconds in-flight requests get to finish after SIGTERM

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> GptforgeError:  # named as the field and as its flag
            return GptforgeError(f"{name} (--{name.replace('_', '-')}) must be {rule}, got {getattr(self, name)}")

        for name, low in [("max_batch", 1), ("max_queue", 1), ("max_n", 1), ("max_body_bytes", 1)]:
            if getattr(self, name) < low:
                raise bad(name, f">= {low}")
        for name in ("max_prompt_tokens", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise bad(name, ">= 1 (or unset: the model's context)")
        if self.max_prefill_tokens is not None and self.max_prefill_tokens < 1:
            raise bad("max_prefill_tokens", ">= 1 (or None: no limit)")
        if self.request_timeout <= 0:
            raise bad("request_timeout", "> 0 seconds")
        if self.shutdown_timeout < 0:
            raise bad("shutdown_timeout", ">= 0 seconds")
        if not 0 <= self.port <= 65535:
            raise bad("port", "in 0..65535 (0: any free port)")


# --- metrics (Prometheus text exposition format, written by hand: a few counters and histograms) -------------
class _Histogram:
    def __init__(self, name: str, help: str, buckets: list[float]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if v <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for b, c in zip(self.buckets + [math.inf], self.counts):
            total += c
            out.append(f'{self.name}_bucket{{le="{"+Inf" if b == math.inf else b}"}} {total}')
        return out + [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]


class Metrics:
    """Counters and histograms updated by the scheduler thread and the HTTP handlers (under one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> count
        self.finished: collections.Counter = collections.Counter()  # finish reason -> sequences
        self.prompt_tokens = self.completion_tokens = self.steps = 0
        self.ttft = _Histogram("gptforge_time_to_first_token_seconds", "Arrival to first generated token.",
                               [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.itl = _Histogram("gptforge_inter_token_latency_seconds", "Time between a sequence's successive tokens.",
                              [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1])
        self.batch = _Histogram("gptforge_batch_size", "Sequences decoded by each step.",
                                [1, 2, 4, 8, 16, 32, 64, 128])

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def render(self, queue_depth: int, live: int) -> str:
        with self.lock:
            out = ["# HELP gptforge_requests_total HTTP requests by endpoint and status.",
                   "# TYPE gptforge_requests_total counter"]
            out += [f'gptforge_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP gptforge_sequences_finished_total Sequences (choices) ended, by reason.",
                    "# TYPE gptforge_sequences_finished_total counter"]
            out += [f'gptforge_sequences_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            for name, help, v in [("prompt_tokens_total", "Prompt tokens admitted.", self.prompt_tokens),
                                  ("completion_tokens_total", "Tokens generated.", self.completion_tokens),
                                  ("decode_steps_total", "Batched decode steps run.", self.steps)]:
                out += [f"# HELP gptforge_{name} {help}", f"# TYPE gptforge_{name} counter", f"gptforge_{name} {v}"]
            for name, help, v in [("queue_depth", "Sequences waiting for a batch row.", queue_depth),
                                  ("batch_live", "Sequences in the running batch now.", live)]:
                out += [f"# HELP gptforge_{name} {help}", f"# TYPE gptforge_{name} gauge", f"gptforge_{name} {v}"]
            for h in (self.ttft, self.itl, self.batch):
                out += h.lines()
        return "\n".join(out) + "\n"


# --- errors in OpenAI's shape ------------------------------------------------------------------------------
_ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
                504: "timeout"}


class APIError(Exception):
    """An HTTP error answered as {"error": {"message", "type", "param", "code"}}, as the OpenAI API does."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


# --- the scheduler: the one thread that drives the engine ----------------------------------------------------
@dataclass
class _Job:
    """One sequence (a choice of a request) on its way through the queue and the batch."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: tuple[int, ...]
    index: int  # the choice's index in the response
    queue: asyncio.Queue  # the request handler's: (index, SeqEvent | APIError) items arrive here
    deadline: float  # time.monotonic() by which the last token must be out
    arrived: float
    seq: int | None = None  # the engine's id, once admitted
    done: bool = False
    last: float | None = None  # when its previous token came out


class Scheduler:
    """Admit -> step -> deliver, in a loop on its own thread: the engine's only caller.

    Admission happens at step boundaries, so a request arriving mid-generation joins the batch at the next
    step instead of waiting for the batch to drain. Handlers talk to it through `submit` and `cancel` only.
    """

    def __init__(self, engine: BatchEngine, metrics: Metrics, max_queue: int):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.cond = threading.Condition()
        self.waiting: collections.deque[_Job] = collections.deque()
        self.cancels: list[_Job] = []
        self.live: dict[int, _Job] = {}  # engine seq id -> job
        self.draining = self.stopped = False
        self.step_seconds = 0.05  # a running mean, for Retry-After
        self.loop: asyncio.AbstractEventLoop | None = None  # the HTTP side's event loop, set by start()
        # Hand-overs waiting for the loop, and whether a wake-up of the loop to drain them is already pending.
        self.outbox: collections.deque[list[tuple[_Job, Any]]] = collections.deque()
        self.outbox_lock = threading.Lock()
        self.wake_pending = False
        self.thread = threading.Thread(target=self._run, name="gptforge-scheduler", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def _send(self, items: list[tuple[_Job, Any]]) -> None:
        """Hand items to their handlers: at most one wake-up of the event loop per step, not one per sequence,
        and none while an earlier wake-up is still pending (the loop then drains both hand-overs at once).

        A wake-up is a write to the loop's self-pipe: a system call, across which the GIL is released and the
        woken loop thread often takes it, so the engine thread then waits for the loop to give it back before
        its next forward (~0.1-3 ms a step on 2 shared cores, 1-14% of the scheduler's time under 16 streaming
        clients). Skipping the redundant ones saves that wait whenever the loop falls behind."""
        if not items:
            return
        with self.outbox_lock:
            self.outbox.append(items)
            if self.wake_pending:
                return
            self.wake_pending = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        """On the event loop: put every handed-over item into its handler's queue, in the order sent."""
        with self.outbox_lock:
            batches = list(self.outbox)
            self.outbox.clear()
            self.wake_pending = False
        for items in batches:
            for j, item in items:
                j.queue.put_nowait((j.index, item))

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify()
        self.thread.join(timeout=10)

    def submit(self, jobs: list[_Job]) -> None:
        with self.cond:
            if self.draining or self.stopped:
                raise APIError(503, "the server is shutting down; retry against another instance", code="shutting_down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                # A rough wait: the queue ahead drains about a batch per generation.
                retry = max(1, math.ceil(self.step_seconds * 16))
                raise APIError(429, f"the server's queue is full ({len(self.waiting)} sequences waiting, at most "
                                    f"{self.max_queue}); retry after {retry} s", code="queue_full",
                               headers={"Retry-After": str(retry)})
            self.waiting.extend(jobs)
            self.cond.notify()

    def cancel(self, jobs: list[_Job]) -> None:
        """Drop jobs that are not done (their client left or timed out): from the queue, or from the batch."""
        with self.cond:
            for j in jobs:
                if j.done:
                    continue
                if j in self.waiting:
                    self.waiting.remove(j)
                    j.done = True
                    self._count("cancelled")
                else:
                    self.cancels.append(j)
            self.cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    def _count(self, reason: str, n: int = 1) -> None:
        with self.metrics.lock:
            self.metrics.finished[reason] += n

    def _run(self) -> None:
        while True:
            admit: list[_Job] = []
            with self.cond:
                while not (self.waiting or self.cancels or self.stopped or self.live):
                    self.cond.wait(timeout=1.0)
                if self.stopped:
                    break
                cancels, self.cancels = self.cancels, []
                now = time.monotonic()
                for j in [j for j in self.waiting if j.deadline <= now]:  # expired while queued
                    self.waiting.remove(j)
                    self._expire(j)
            try:
                self._retire(cancels)
                with self.cond:  # rows freed above are filled now, at the step boundary
                    admit = [self.waiting.popleft() for _ in range(min(len(self.waiting), self.engine.free))]
                self._admit_and_step(admit)
            except Exception as e:  # a bug: fail what is in flight, keep serving
                traceback.print_exc()
                failed = [j for j in list(self.live.values()) + admit if not j.done]
                for j in failed:
                    j.done = True
                self._send([(j, APIError(500, f"internal error in the decode loop: {e!r}")) for j in failed])
                for seq in list(self.live):
                    self.engine.cancel(seq)
                self.live.clear()
        left = [j for j in list(self.live.values()) + list(self.waiting) if not j.done]  # stopped: cancel the rest
        for j in left:
            j.done = True
        self._send([(j, APIError(503, "the server shut down before this request finished", code="shutting_down"))
                    for j in left])

    def _expire(self, j: _Job) -> None:
        j.done = True
        self._count("timeout")
        self._send([(j, APIError(504, "the request did not finish within the server's --request-timeout",
                                 code="timeout"))])

    def _retire(self, cancels: list[_Job]) -> None:
        """Free the rows of cancelled sequences and of those past their deadline."""
        engine = self.engine
        for j in cancels:
            if not j.done and j.seq is not None and engine.cancel(j.seq):
                self.live.pop(j.seq, None)
                j.done = True
                self._count("cancelled")
        now = time.monotonic()
        for seq, j in list(self.live.items()):
            if j.deadline <= now:
                engine.cancel(seq)
                del self.live[seq]
                self._expire(j)

    def _admit_and_step(self, admit: list[_Job]) -> None:
        m, engine = self.metrics, self.engine
        if admit:
            try:  # prefilled by the next steps: at most max_prefill_tokens positions per step
                for j, seq in zip(admit, engine.add_many([(j.prompt, j.params, j.stop_ids) for j in admit])):
                    j.seq = seq
            except GptforgeError:  # requests are validated before; this is a last line of defence
                for j in admit:
                    try:
                        j.seq = engine.add(j.prompt, j.params, j.stop_ids)
                    except GptforgeError as e:
                        j.done = True
                        self._send([(j, APIError(400, str(e)))])
            for j in admit:
                if j.seq is not None:
                    self.live[j.seq] = j
                    with m.lock:
                        m.prompt_tokens += len(j.prompt)
        if not self.live:
            return
        t0 = time.monotonic()
        engine.step(emit=self._deliver)  # tokens go out as soon as they are sampled, before the step's forward
        self.step_seconds = 0.9 * self.step_seconds + 0.1 * (time.monotonic() - t0)
        with m.lock:
            m.steps += 1

    def _deliver(self, events: list[SeqEvent]) -> None:
        """Account for one step's events and hand them to their handlers (BatchEngine.step's emit)."""
        m, now = self.metrics, time.monotonic()
        with m.lock:
            m.completion_tokens += len(events)
            m.batch.observe(len(events))  # the rows decoded (the ones still prefilling are not)
            for ev in events:
                j = self.live[ev.seq]
                if j.last is None:
                    m.ttft.observe(now - j.arrived)
                else:
                    m.itl.observe(now - j.last)
                j.last = now
                if ev.finish_reason:
                    m.finished[ev.finish_reason] += 1
        out = []
        for ev in events:
            j = self.live[ev.seq]
            if ev.finish_reason:
                del self.live[ev.seq]
                j.done = True
            out.append((j, ev))
        self._send(out)


# --- requests: validation into engine jobs ------------------------------------------------------------------
_MISSING = object()
_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
               dict: "an object"}


def _field(body: dict, name: str, kinds: tuple, default: Any = None, check=None, rule: str = "") -> Any:
    """body[name] if present (null counts as absent), checked for type and range; 400 naming it otherwise."""
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    # bool is an int in Python, but `true` is not a valid max_tokens.
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        want = " or ".join(_TYPE_NAMES[k] for k in kinds if k in _TYPE_NAMES)
        raise APIError(400, f"'{name}' must be {want}, got {json.dumps(v)[:60]}", param=name, code="invalid_type")
    if check is not None and not check(v):
        raise APIError(400, f"'{name}' must be {rule}, got {json.dumps(v)[:60]}", param=name, code="invalid_value")
    return v


_NUM = (int, float)
_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "n", "seed", "stream",
                  "stream_options", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
                  "user", "ignore_eos"}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "top_logprobs", "max_completion_tokens"}


@dataclass
class _Parsed:
    """A validated request: its prompts (token ids) and what each of its choices decodes with."""

    prompts: list[list[int]]
    n: int
    params: list[SamplingParams]  # one per choice: choice i * n + j is prompt i's j-th
    stop_ids: tuple[int, ...]
    stream: bool
    include_usage: bool
    logprobs: int | None  # completions: top alternatives per token; chat: top_logprobs (None: no logprobs)
    user: str | None = None


class _Parser:
    """Turns a request body into a _Parsed against this model's tokenizer, context and the server's limits."""

    def __init__(self, tokenizer: Tokenizer, block_size: int, cfg: ServeConfig, model_name: str):
        self.tok, self.block, self.cfg, self.name = tokenizer, block_size, cfg, model_name
        self.max_prompt = min(cfg.max_prompt_tokens or block_size - 1, block_size - 1)
        self.max_tokens = min(cfg.max_tokens or block_size, block_size)

    def model(self, body: dict) -> None:
        name = _field(body, "model", (str,))
        if name is None:
            raise APIError(400, "'model' is required", param="model", code="missing_field")
        if name != self.name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{self.name}'",
                           param="model", code="model_not_found")

    def completion(self, body: dict) -> _Parsed:
        self._known(body, _COMPLETION_FIELDS)
        self.model(body)
        prompt = body.get("prompt", _MISSING)
        if prompt is _MISSING or prompt is None:
            raise APIError(400, "'prompt' is required", param="prompt", code="missing_field")
        prompts = self._prompts(prompt)
        if _field(body, "echo", (bool,), False):
            raise APIError(400, "'echo' is not supported", param="echo", code="unsupported")
        if _field(body, "suffix", (str,)) is not None:
            raise APIError(400, "'suffix' is not supported (no fill-in-the-middle)", param="suffix", code="unsupported")
        logprobs = _field(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "in 0..20")
        n = self._n(body)
        if _field(body, "best_of", (int,), n) != n:
            raise APIError(400, "'best_of' other than n is not supported", param="best_of", code="unsupported")
        stop_ids = () if _field(body, "ignore_eos", (bool,), False) else (self.tok.eos_id,)
        return self._finish(body, prompts, n, stop_ids, logprobs, default_max=16)

    def chat(self, body: dict) -> _Parsed:
        self._known(body, _CHAT_FIELDS)
        self.model(body)
        messages = body.get("messages", _MISSING)
        if messages is _MISSING or messages is None:
            raise APIError(400, "'messages' is required", param="messages", code="missing_field")
        if not self.tok.has_chat_template:
            raise APIError(400, f"the model '{self.name}' has no chat template (its tokenizer lacks the "
                                "<|im_start|>/<|im_end|> tokens); use /v1/completions, or fine-tune it for chat",
                           param="messages", code="no_chat_template")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", param="messages")
        flat = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object", param=f"messages[{i}]")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise APIError(400, f"messages[{i}].content: only text parts are supported",
                                   param=f"messages[{i}].content")
                content = "".join(p["text"] for p in content)
            flat.append({"role": m.get("role"), "content": content})
        try:
            ids, _ = self.tok.encode_chat(flat, add_generation_prompt=True)
        except GptforgeError as e:
            raise APIError(400, str(e), param="messages") from None
        if _field(body, "logprobs", (bool,), False):
            logprobs = _field(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "in 0..20")
        else:
            if _field(body, "top_logprobs", (int,)) is not None:
                raise APIError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
            logprobs = None
        if body.get("max_completion_tokens") is not None:
            body = {**body, "max_tokens": _field(body, "max_completion_tokens", (int,))}
        ignore_eos = _field(body, "ignore_eos", (bool,), False)
        stop_ids = () if ignore_eos else (self.tok.im_end_id, self.tok.eos_id)
        return self._finish(body, [ids], self._n(body), stop_ids, logprobs, default_max=None)

    def _known(self, body: dict, allowed: set[str]) -> None:
        extra = sorted(k for k, v in body.items() if k not in allowed and v is not None)
        if extra:
            raise APIError(400, f"unsupported parameter(s): {', '.join(extra)}", param=extra[0], code="unsupported")

    def _n(self, body: dict) -> int:
        return _field(body, "n", (int,), 1, lambda v: 1 <= v <= self.cfg.max_n, f"in 1..{self.cfg.max_n}")

    def _prompts(self, prompt: Any) -> list[list[int]]:
        vocab = self.tok.vocab_size
        if isinstance(prompt, str):
            return [_prompt_ids(self.tok, prompt)]
        if isinstance(prompt, list) and prompt:
            if all(isinstance(p, str) for p in prompt):
                return [_prompt_ids(self.tok, p) for p in prompt]
            if all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in prompt):
                return [list(prompt)]
            if all(isinstance(p, list) and p and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab
                                                     for i in p) for p in prompt):
                return [list(p) for p in prompt]
        raise APIError(400, f"'prompt' must be a string, an array of strings, or token ids in 0..{vocab - 1} "
                            "(an array, or an array of arrays)", param="prompt", code="invalid_type")

    def _finish(self, body: dict, prompts: list[list[int]], n: int, stop_ids: tuple[int, ...],
                logprobs: int | None, default_max: int | None) -> _Parsed:
        longest = max(len(p) for p in prompts)
        if longest > self.max_prompt:
            raise APIError(400, f"the prompt is {longest} tokens; this server accepts at most {self.max_prompt} "
                                f"(the model's context is {self.block})", param="prompt",
                           code="context_length_exceeded")
        room = self.block - longest
        max_tokens = _field(body, "max_tokens", (int,), None, lambda v: v >= 1, ">= 1")
        if max_tokens is None:
            max_tokens = min(default_max or room, room, self.max_tokens)
        elif max_tokens > self.max_tokens:
            raise APIError(400, f"'max_tokens' is {max_tokens}; this server allows at most {self.max_tokens}",
                           param="max_tokens", code="invalid_value")
        elif max_tokens > room:
            raise APIError(400, f"this model's maximum context length is {self.block} tokens, but you requested "
                                f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} for the completion); "
                                "shorten the prompt or lower max_tokens", param="max_tokens",
                           code="context_length_exceeded")
        if len(prompts) * n > self.cfg.max_queue:
            raise APIError(400, f"{len(prompts) * n} choices in one request; this server queues at most "
                                f"{self.cfg.max_queue}", param="n")
        stop = _field(body, "stop", (str, list), ())
        stop = (stop,) if isinstance(stop, str) else stop
        if len(stop) > 16 or not all(isinstance(s, str) and s for s in stop):
            raise APIError(400, "'stop' must be a non-empty string or an array of at most 16 of them",
                           param="stop", code="invalid_value")
        seed = _field(body, "seed", (int,), None, lambda v: -2**63 <= v < 2**64, "a 64-bit integer")
        stream_options = _field(body, "stream_options", (dict,), {})
        base = dict(
            max_new_tokens=max_tokens,
            temperature=float(_field(body, "temperature", _NUM, 1.0, lambda v: 0 <= v <= 2, "in [0, 2]")),
            top_p=float(_field(body, "top_p", _NUM, 1.0, lambda v: 0 < v <= 1, "in (0, 1]")),
            top_k=_field(body, "top_k", (int,), None, lambda v: v >= 1, ">= 1"),
            min_p=float(_field(body, "min_p", _NUM, 0.0, lambda v: 0 <= v < 1, "in [0, 1)")),
            presence_penalty=float(_field(body, "presence_penalty", _NUM, 0.0, lambda v: -2 <= v <= 2, "in [-2, 2]")),
            frequency_penalty=float(_field(body, "frequency_penalty", _NUM, 0.0, lambda v: -2 <= v <= 2, "in [-2, 2]")),
            repetition_penalty=float(_field(body, "repetition_penalty", _NUM, 1.0, lambda v: v > 0, "> 0")),
            stop=tuple(stop), stop_at_eos=False,  # stop ids are passed to the engine explicitly
            logprobs=logprobs is not None, top_logprobs=logprobs or 0,
        )
        params = []
        for _ in prompts:
            for j in range(n):
                # Choice j of a seeded request draws from seed + j: n different samples, reproducible together.
                params.append(SamplingParams(**base, seed=None if seed is None else (seed + j) % 2**64))
        return _Parsed(prompts, n, params, stop_ids, _field(body, "stream", (bool,), False),
                       _field(stream_options, "include_usage", (bool,), False), logprobs,
                       _field(body, "user", (str,)))


# --- the HTTP app -------------------------------------------------------------------------------------------
class _Choice:
    """What one choice has produced so far."""

    def __init__(self) -> None:
        self.text = ""
        self.tokens: list[SeqEvent] = []  # every event, the stop id's included (usage counts it)
        self.finish_reason: str | None = None


def create_app(model, tokenizer: Tokenizer, cfg: ServeConfig, model_name: str):
    """The FastAPI app serving `model` as `model_name`: routes, scheduler lifecycle, error handlers."""
    metrics = Metrics()
    engine = BatchEngine(model, tokenizer, cfg.max_batch, max_prefill_tokens=cfg.max_prefill_tokens)
    scheduler = Scheduler(engine, metrics, cfg.max_queue)
    parser = _Parser(tokenizer, model.config.block_size, cfg, model_name)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start(asyncio.get_running_loop())
        yield
        scheduler.stop()

    app = FastAPI(title="gptforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler, app.state.metrics = scheduler, metrics

    def error_response(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def endpoint(request: Request) -> str:
        # The route's template, not the URL: /v1/models/{name} must not mint a label per name asked for.
        route = request.scope.get("route")
        return getattr(route, "path", "other")

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        metrics.request(endpoint(request), e.status)
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):  # unknown route, wrong method
        metrics.request("other", e.status_code)
        return error_response(APIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}"))

    def authorize(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of a guessed key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), cfg.api_key.encode()):
            raise APIError(401, "missing or invalid API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cfg.max_body_bytes:
            raise APIError(413, f"the request body is {int(length)} bytes; the limit is {cfg.max_body_bytes}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds bodies sent without a Content-Length
            size += len(chunk)
            if size > cfg.max_body_bytes:
                raise APIError(413, f"the request body exceeds the limit of {cfg.max_body_bytes} bytes",
                               code="request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_json")
        return body

    @app.get("/health")
    async def health():
        if scheduler.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok", "model": model_name, "live": scheduler.engine.live, "waiting": scheduler.queue_depth}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(scheduler.queue_depth, scheduler.engine.live),
                                 media_type="text/plain; version=0.0.4")

    def model_card() -> dict:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "gptforge",
                "max_model_len": model.config.block_size}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        metrics.request("/v1/models", 200)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str, request: Request):
        authorize(request)
        if name != model_name:
            raise APIError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           code="model_not_found")
        metrics.request(endpoint(request), 200)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await run(request, parser.completion(await read_json(request)), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        return await run(request, parser.chat(await read_json(request)), chat=True)

    # --- running a request ---------------------------------------------------------------------------------
    def logprob_entry(tok_id: int, lp: float, top) -> dict:
        text = tokenizer.decode([tok_id])
        return {"token": text, "logprob": lp, "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := tokenizer.decode([i])), "logprob": v, "bytes": list(t.encode())}
                                 for i, v in top or []]}

    def legacy_logprobs(events: list[SeqEvent], offset: int) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for ev in events:
            text = tokenizer.decode([ev.token])
            out["tokens"].append(text)
            out["token_logprobs"].append(ev.logprob)
            out["top_logprobs"].append({tokenizer.decode([i]): v for i, v in (ev.top or [])})
            out["text_offset"].append(offset)
            offset += len(text)
        return out

    async def run(request: Request, req: _Parsed, chat: bool):
        path = endpoint(request)
        queue: asyncio.Queue = asyncio.Queue()
        now = time.monotonic()
        jobs = [_Job(prompt, req.params[i * req.n + j], req.stop_ids, i * req.n + j, queue,
                     now + cfg.request_timeout, now)
                for i, prompt in enumerate(req.prompts) for j in range(req.n)]
        scheduler.submit(jobs)  # 429 / 503 raise here, before any response is started
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        usage = {"prompt_tokens": sum(len(p) for p in req.prompts), "completion_tokens": 0, "total_tokens": 0}
        choices = [_Choice() for _ in jobs]
        obj = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "created": int(time.time()), "model": model_name}

        def finish_usage() -> dict:
            usage["completion_tokens"] = sum(len(c.tokens) for c in choices)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            return usage

        if not req.stream:
            try:
                pending, checked = len(jobs), time.monotonic()
                while pending:
                    try:
                        index, item = await asyncio.wait_for(queue.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        index, item = None, None
                    if time.monotonic() - checked > 0.5:  # tokens may arrive faster than that: check by time
                        checked = time.monotonic()
                        if await request.is_disconnected():
                            metrics.request(path, 499)  # nginx's "client closed request"; `finally` cancels
                            return PlainTextResponse("", status_code=499)
                    if item is None:
                        continue
                    if isinstance(item, APIError):
                        raise item
                    c = choices[index]
                    c.text += item.text
                    c.tokens.append(item)
                    if item.finish_reason:
                        c.finish_reason = item.finish_reason
                        pending -= 1
            finally:
                scheduler.cancel(jobs)  # no-op for finished jobs; frees the others on any error
            out = []
            for i, c in enumerate(choices):
                events = [ev for ev in c.tokens if ev.token not in jobs[i].stop_ids]
                if chat:
                    ch = {"index": i, "message": {"role": "assistant", "content": c.text},
                          "logprobs": None if req.logprobs is None else
                          {"content": [logprob_entry(ev.token, ev.logprob, ev.top)
                                       for ev in events]},
                          "finish_reason": c.finish_reason}
                else:
                    ch = {"index": i, "text": c.text, "finish_reason": c.finish_reason,
                          "logprobs": None if req.logprobs is None else legacy_logprobs(events, 0)}
                out.append(ch)
            metrics.request(path, 200)
            return {**head, "object": obj, "choices": out, "usage": finish_usage()}

        # Streaming: server-sent events, one chunk per text delta, then a finish chunk per choice, then [DONE].
        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def sse(payload: dict) -> str:
            return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

        def chunk(index: int, text: str | None, finish: str | None, events: list[SeqEvent], offset: int) -> str:
            if chat:
                delta = {} if text is None else {"content": text}
                ch = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
                if req.logprobs is not None and events:
                    ch["logprobs"] = {"content": [logprob_entry(ev.token, ev.logprob, ev.top)
                                                  for ev in events]}
            else:
                ch = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
                if req.logprobs is not None and events:
                    ch["logprobs"] = legacy_logprobs(events, offset)
            payload = {**head, "object": chunk_obj, "choices": [ch]}
            if req.include_usage:
                payload["usage"] = None
            return sse(payload)

        async def events_stream():
            if chat:
                for i in range(len(jobs)):
                    yield sse({**head, "object": chunk_obj, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
            pending = len(jobs)
            held: list[list[SeqEvent]] = [[] for _ in jobs]  # tokens whose text has not come out yet
            while pending:
                index, item = await queue.get()
                if isinstance(item, APIError):  # the status is already sent: an error event, as OpenAI does
                    yield sse(item.body())
                    return
                c = choices[index]
                c.tokens.append(item)
                if item.token not in jobs[index].stop_ids:
                    held[index].append(item)
                if item.text or item.finish_reason:
                    offset = len(c.text)
                    c.text += item.text
                    if item.text:
                        yield chunk(index, item.text, None, held[index], offset)
                        held[index] = []
                    if item.finish_reason:
                        c.finish_reason = item.finish_reason
                        pending -= 1
                        yield chunk(index, None if chat else "", item.finish_reason, held[index], len(c.text))
            if req.include_usage:
                yield sse({**head, "object": chunk_obj, "choices": [], "usage": finish_usage()})
            yield "data: [DONE]\n\n"

        metrics.request(path, 200)
        return _EventStream(events_stream(), on_close=lambda: scheduler.cancel(jobs))

    return app


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


# --- running it ---------------------------------------------------------------------------------------------
def serve(checkpoint: str | Path, cfg: ServeConfig, *, device: str = "auto", dtype: str = "auto") -> None:
    """Load a checkpoint and serve it until SIGTERM / Ctrl-C (which drain in-flight requests first)."""
    import uvicorn

    from gptforge.generate import load

    model, tokenizer = load(checkpoint, device=device, dtype=dtype)
    name = cfg.model_name or Path(checkpoint).resolve().name
    app = create_app(model, tokenizer, cfg, name)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise GptforgeError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror}); pick another --port "
                            "(0 takes any free one)") from None
    host, port = sock.getsockname()[:2]
    scheduler: Scheduler = app.state.scheduler

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            scheduler.draining = True  # from now on: 503 for new requests, in-flight ones run on
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=cfg.shutdown_timeout, timeout_keep_alive=30)
    url = f"http://{'[' + host + ']' if family == socket.AF_INET6 else host}:{port}"
    print(f"serving {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, context "
          f"{model.config.block_size}, batch {cfg.max_batch}) at {url}/v1"
          f"{' (API key required)' if cfg.api_key else ''}; Ctrl-C or SIGTERM to stop", flush=True)
    # uvicorn re-raises the signal it caught once it has shut down; with these handlers in place of the
    # default ones, that ends the process normally (exit 0) instead of by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        Server(config).run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("server stopped", flush=True)
