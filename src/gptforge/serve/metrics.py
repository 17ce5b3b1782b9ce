"""The server's Prometheus metrics, in the text exposition format written by hand (a few counters and
histograms need no client library)."""

from __future__ import annotations

import collections
import math
import threading


class Histogram:
    """A cumulative-bucket histogram, as Prometheus renders one."""

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


def _family(name: str, kind: str, help: str, samples: list[str]) -> list[str]:
    return [f"# HELP gptforge_{name} {help}", f"# TYPE gptforge_{name} {kind}"] + samples


class Metrics:
    """Counters and histograms updated by the scheduler thread and the HTTP handlers (under one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: collections.Counter = collections.Counter()  # (endpoint, status) -> count
        self.errors: collections.Counter = collections.Counter()  # (status, code) -> error answers
        self.finished: collections.Counter = collections.Counter()  # finish reason -> sequences
        self.prompt_tokens = self.completion_tokens = self.steps = 0
        self.cached_tokens = 0  # prompt tokens whose keys and values came from the prefix cache
        self.ttft = Histogram("gptforge_time_to_first_token_seconds", "Arrival to first generated token.",
                              [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30])
        self.itl = Histogram("gptforge_inter_token_latency_seconds", "Time between a sequence's successive tokens.",
                             [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1])
        self.batch = Histogram("gptforge_batch_size", "Sequences decoded by each step.", [1, 2, 4, 8, 16, 32, 64, 128])

    def request(self, endpoint: str, status: int) -> None:
        with self.lock:
            self.requests[(endpoint, status)] += 1

    def error(self, endpoint: str | None, status: int, code: str) -> None:
        """One error answer: an error response (counted under its endpoint too), or, with endpoint None, an
        error event ending a stream whose 200 status was already counted."""
        with self.lock:
            if endpoint is not None:
                self.requests[(endpoint, status)] += 1
            self.errors[(status, code)] += 1

    def render(self, queue_depth: int, live: int) -> str:
        with self.lock:
            out = _family("requests_total", "counter", "HTTP requests by endpoint and status.",
                          [f'gptforge_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                           for (e, s), n in sorted(self.requests.items())])
            out += _family("errors_total", "counter", "Error answers (responses and stream error events) by "
                           "status and OpenAI error code.",
                           [f'gptforge_errors_total{{status="{s}",code="{c}"}} {n}'
                            for (s, c), n in sorted(self.errors.items())])
            out += _family("sequences_finished_total", "counter", "Sequences (choices) ended, by reason.",
                           [f'gptforge_sequences_finished_total{{reason="{r}"}} {n}'
                            for r, n in sorted(self.finished.items())])
            for name, help, v in [("prompt_tokens_total", "Prompt tokens admitted.", self.prompt_tokens),
                                  ("prompt_tokens_cached_total", "Prompt tokens read from the prefix cache, not "
                                   "prefilled (each sequence's).", self.cached_tokens),
                                  ("completion_tokens_total", "Tokens generated.", self.completion_tokens),
                                  ("decode_steps_total", "Batched decode steps run.", self.steps)]:
                out += _family(name, "counter", help, [f"gptforge_{name} {v}"])
            for name, help, v in [("queue_depth", "Sequences waiting for a batch row.", queue_depth),
                                  ("batch_live", "Sequences in the running batch now.", live)]:
                out += _family(name, "gauge", help, [f"gptforge_{name} {v}"])
            for h in (self.ttft, self.itl, self.batch):
                out += h.lines()
        return "\n".join(out) + "\n"
