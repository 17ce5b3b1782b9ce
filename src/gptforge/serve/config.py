"""The server's settings: one typed dataclass, one field per `gptforge serve` flag."""

from __future__ import annotations

from dataclasses import dataclass

from gptforge.errors import GptforgeError


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
