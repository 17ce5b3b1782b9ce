"""The scheduler: the one thread that drives the engine, and the hand-over of its tokens to the HTTP side.

It loops admit -> step -> deliver. New sequences join the running batch at step boundaries and finished ones
leave it (continuous batching, Yu et al. 2022, "Orca"), so concurrent requests share every decode step.
Requests wait in a bounded queue; when it is full the answer is 429 with Retry-After, not an unbounded backlog.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from gptforge.engine import BatchEngine, SeqEvent
from gptforge.errors import GptforgeError
from gptforge.eval import PromptScores, prompt_logprobs
from gptforge.sampling import SamplingParams

from .metrics import Metrics
from .protocol import APIError


@dataclass
class Job:
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
    constraint: Any = None  # a sampling.Constraint its tokens follow (structured output, forced tool calls)
    adapter: int = -1  # the LoRA adapter it decodes with (the engine's AdapterSet index), -1: the base


@dataclass
class ScoreJob:
    """Prompts to score (a request with `echo`): one forward over them, no decoding."""

    prompts: list[list[int]]
    top: int  # alternatives per position
    queue: asyncio.Queue
    index: int = 0
    done: bool = False


class Scheduler:
    """Admit -> step -> deliver, in a loop on its own thread: the engine's only caller.

    Admission happens at step boundaries, so a request arriving mid-generation joins the batch at the next
    step instead of waiting for the batch to drain. Handlers talk to it through `submit` and `cancel` only.
    """

    def __init__(self, engine: BatchEngine, metrics: Metrics, max_queue: int):
        self.engine, self.metrics, self.max_queue = engine, metrics, max_queue
        self.cond = threading.Condition()
        self.waiting: collections.deque[Job] = collections.deque()
        self.cancels: list[Job] = []
        self.scoring: list[ScoreJob] = []  # taken all at once, between two steps, into one batched forward
        self.live: dict[int, Job] = {}  # engine seq id -> job
        self.draining = self.stopped = False
        self.step_seconds = 0.05  # a running mean, for Retry-After
        self.loop: asyncio.AbstractEventLoop | None = None  # the HTTP side's event loop, set by start()
        # Hand-overs waiting for the loop, and whether a wake-up of the loop to drain them is already pending.
        self.outbox: collections.deque[list[tuple[Job, Any]]] = collections.deque()
        self.outbox_lock = threading.Lock()
        self.wake_pending = False
        self.thread = threading.Thread(target=self._run, name="gptforge-scheduler", daemon=True)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread.start()

    def _send(self, items: list[tuple[Job, Any]]) -> None:
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
        """End the loop; what is still queued or decoding gets a 503 `shutting_down`. Safe to call twice."""
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    def submit(self, jobs: list[Job]) -> None:
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

    def cancel(self, jobs: list[Job]) -> None:
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
            admit: list[Job] = []
            with self.cond:
                while not (self.waiting or self.cancels or self.stopped or self.live or self.scoring):
                    self.cond.wait(timeout=1.0)
                if self.stopped:
                    break
                cancels, self.cancels = self.cancels, []
                now = time.monotonic()
                for j in [j for j in self.waiting if j.deadline <= now]:  # expired while queued
                    self.waiting.remove(j)
                    self._expire(j)
            try:
                self._score()
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
        left = [j for j in list(self.live.values()) + list(self.waiting) + self.scoring if not j.done]  # stopped: cancel the rest
        for j in left:
            j.done = True
        self._send([(j, APIError(503, "the server shut down before this request finished", code="shutting_down"))
                    for j in left])

    async def score(self, prompts: list[list[int]], top: int) -> list[PromptScores]:
        """Each prompt's token logprobs (eval.prompt_logprobs), computed on the scheduler's thread between steps
        together with every other scoring request then waiting."""
        job = ScoreJob(prompts, top, asyncio.Queue())
        with self.cond:
            if self.draining or self.stopped:
                raise APIError(503, "the server is shutting down; retry against another instance", code="shutting_down")
            self.scoring.append(job)
            self.cond.notify()
        _, item = await job.queue.get()
        if isinstance(item, APIError):
            raise item
        return item

    def _score(self) -> None:
        with self.cond:
            jobs, self.scoring = self.scoring, []
        if not jobs:
            return
        try:
            flat = prompt_logprobs(self.engine.model, [p for j in jobs for p in j.prompts],
                                   vocab_size=self.engine.vocab, top=max(j.top for j in jobs))
        except Exception as e:  # a bug: fail these requests, keep serving
            traceback.print_exc()
            self._send([(j, APIError(500, f"internal error while scoring: {e!r}")) for j in jobs])
            return
        out, k = [], 0
        for j in jobs:
            mine = [PromptScores(s.logprobs, [t[:j.top] for t in s.top], s.next) for s in flat[k:k + len(j.prompts)]]
            k += len(j.prompts)
            j.done = True
            out.append((j, mine))
        with self.metrics.lock:
            self.metrics.prompt_tokens += sum(len(p) for j in jobs for p in j.prompts)
        self._send(out)

    def _expire(self, j: Job) -> None:
        j.done = True
        self._count("timeout")
        self._send([(j, APIError(504, "the request did not finish within the server's --request-timeout",
                                 code="timeout"))])

    def _retire(self, cancels: list[Job]) -> None:
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

    def _admit_and_step(self, admit: list[Job]) -> None:
        m, engine = self.metrics, self.engine
        if admit:
            try:  # prefilled by the next steps: at most max_prefill_tokens positions per step
                seqs = [(j.prompt, j.params, j.stop_ids, j.constraint) for j in admit]
                for j, seq in zip(admit, engine.add_many(seqs, adapters=[j.adapter for j in admit])):
                    j.seq = seq
            except GptforgeError:  # requests are validated before; this is a last line of defence
                for j in admit:
                    try:
                        j.seq = engine.add(j.prompt, j.params, j.stop_ids, j.constraint, adapter=j.adapter)
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
                    m.cached_tokens += ev.cached_tokens
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
