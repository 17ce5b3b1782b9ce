"""Continuous batching (the server's decoder): sequences join and leave a running batch between decode steps.

The decode policy is the static batch's (sampling.py, text.py): this module adds only the schedule, a loop
that prefills arrivals into free rows of one KV cache (kvcache.py), samples every decoding row with its own
settings and random stream, retires the finished and feeds the rest in one forward.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from gptforge.errors import GptforgeError
from gptforge.finetune.lora import AdapterSet
from gptforge.kvcache import KVCache, resolve_kv_dtype
from gptforge.native.step import DecodeStep
from gptforge.prefix_cache import BLOCK, PrefixCache
from gptforge.sampling import (Constraint, SamplingParams, TokenPicker, exp_noise, generator, policy_groups,
                               token_logprobs)
from gptforge.text import TextRow, fit_prompts, stop_ids
from gptforge.tokenizer import Tokenizer


@dataclass
class SeqEvent:
    """What one BatchEngine step produced for one sequence."""

    seq: int  # the id `add` returned
    token: int
    text: str  # text now safe to hand out: complete UTF-8, stop strings cut off ("" mid-character)
    logprob: float | None = None  # of `token` under the model, before penalties and filters (if asked)
    top: list[tuple[int, float]] | None = None  # the most likely ids and their logprobs (if asked)
    finish_reason: str | None = None  # "stop" or "length" on a sequence's last event: its row is free again
    cached_tokens: int = 0  # of the sequence's prompt, those whose keys and values came from the prefix cache


@dataclass
class _Seq:
    id: int
    params: SamplingParams
    stop_ids: tuple[int, ...]
    gen: torch.Generator | None  # its own random stream: its draws do not depend on its batch-mates
    text: TextRow
    prompt: list[int]
    max_new: int
    length: int = 0  # tokens in its cache row: the slot its next fed token is written to
    generated: int = 0
    token: int = 0  # the last id sampled, fed at the next forward
    adapter: int = -1  # the LoRA adapter its rows take (an index into the engine's AdapterSet; -1: the base)
    constraint: Constraint | None = None  # a grammar its tokens follow (structured output, forced tool calls)
    cached: int = 0  # prompt tokens copied from the prefix cache
    fed: list[int] = field(default_factory=list)  # ids fed after the prompt: its row holds prompt + fed


class BatchEngine:
    """Continuous batching: sequences join and leave a running batch between decode steps.

    One KV cache of `max_batch` rows x the model's context. `add` prefills a new sequence into a free row;
    `step` samples one token for every decoding sequence, each with its own SamplingParams and random stream,
    retires the finished ones and feeds the rest in one batched forward; `cancel` frees a row at once.
    Decoding sequences always occupy rows 0..n-1 (a retired row takes over the last row's contents), so a step
    computes n rows, not max_batch. Unlike `generate_steps`' left-padded batch, every row writes its own slot
    (its own length), so sequences that joined at different steps need no realignment.

    Chunked prefill (`max_prefill_tokens`; Agrawal et al. 2024, "Sarathi-Serve"; vLLM's chunked prefill): with
    no limit, `add` / `add_many` prefill at once, and the decoding sequences wait for the whole prefill. With
    a limit, added sequences wait in `filling` and each `step` first prefills at most that many token
    positions of them (one right-padded forward: real prompt tokens plus padding), in arrival order; a prompt
    longer than what is left is cut into chunks over several steps, each chunk attending to the cached ones.
    So a wave of arrivals delays each decode step by about one budget's worth of prefill, not by all of it.
    When nothing is decoding, nothing waits on the prefill, and everything pending is prefilled at once.
    Only `filling[0]` can be partly prefilled; it lives in row n, just past the decoding rows.

    Prefix caching (`prefix_cache_tokens` > 0; prefix_cache.py): when a prompt starts its prefill, the keys
    and values of its longest prefix of whole blocks seen before (prompts, and what earlier sequences
    generated) are copied into its row, and only the rest is prefilled; at least its last token always is,
    for the logits its first sample needs. Slot = position, so the copied keys sit where they were computed.
    A prompt whose next blocks a prompt ahead of it in the same prefill is computing waits one forward and
    takes them from the cache (a batch of prompts sharing a system prompt prefills it once).

    A sequence's tokens do not depend on its batch-mates: a greedy or seeded sequence decodes the same text
    alone as with others (up to the float rounding of batched matmuls, as for `generate_steps`' batches), and
    the same as `complete` with the same options, however its prompt was chunked or taken from the prefix
    cache. Not thread-safe: one thread (the server's scheduler) calls it. kv_dtype: the cache's storage
    (kvcache.KVCache; auto as kvcache.resolve_kv_dtype says).
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int, max_prefill_tokens: int | None = None,
                 *, prefix_cache_tokens: int = 0, kv_dtype: str = "auto", adapters: AdapterSet | None = None):
        if max_batch < 1:
            raise GptforgeError(f"max_batch must be >= 1, got {max_batch}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise GptforgeError(f"max_prefill_tokens must be >= 1 (or None: no limit), got {max_prefill_tokens}")
        if prefix_cache_tokens < 0:
            raise GptforgeError(f"prefix_cache_tokens must be >= 0 (0: no prefix cache), got {prefix_cache_tokens}")
        cfg = model.config
        weight = next(model.parameters())
        self.model, self.tokenizer, self.max_batch, self.block_size = model, tokenizer, max_batch, cfg.block_size
        self.max_prefill_tokens = max_prefill_tokens
        self.device, self.vocab = weight.device, tokenizer.vocab_size
        self.cache = KVCache(cfg, max_batch, cfg.block_size, device=self.device, dtype=weight.dtype, static=False,
                             kv_dtype=resolve_kv_dtype(model, kv_dtype))
        # Keys and values depend on a row's adapter: each adapter's blocks form chains of their own (_root).
        self.prefix = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens >= BLOCK else None
        self.adapters = adapters  # LoRA adapters stacked into the model (finetune.lora.apply_adapters), chosen per row
        self.logits = torch.zeros(max_batch, self.vocab, device=self.device)  # each row's next-token logits
        self.picker = TokenPicker(max_batch, self.vocab, self.device)  # each row's penalty state
        self.rows: list[_Seq] = []  # decoding: rows[i] lives in cache row i
        self.filling: list[_Seq] = []  # added, prompt not fully prefilled yet (in arrival order)
        self._ids = itertools.count()
        # Each decode step as one native call where the op covers the model (native/step.py), else its forward.
        self._whole = DecodeStep.of(model) if self.device.type == "cpu" else None

    @property
    def live(self) -> int:
        """Sequences held: decoding, or waiting for (the rest of) their prefill."""
        return len(self.rows) + len(self.filling)

    @property
    def free(self) -> int:
        return self.max_batch - self.live

    def add(self, prompt_ids: list[int], params: SamplingParams, stop_ids: tuple[int, ...] = (),
            constraint: Constraint | None = None, adapter: int = -1) -> int:
        """Take a new sequence into a free row (prefilled now, or over the next steps with max_prefill_tokens);
        returns its id. It ends at any of `stop_ids` or, with params.stop_at_eos, the tokenizer's EOS (finish
        reason "stop", the id reported but never in the text), a stop string, max_new_tokens or a full context.
        With a `constraint`, every token is one its grammar allows, and the sequence also ends ("stop") when the
        grammar is complete. `adapter` picks one of the model's LoRA adapters (-1: the base)."""
        return self.add_many([(prompt_ids, params, stop_ids, constraint)], adapters=[adapter])[0]

    @torch.no_grad()
    def add_many(self, seqs: list[tuple], adapters: list[int] | None = None) -> list[int]:
        """`add` for several sequences at once, (prompt ids, params, stop ids[, constraint]) each, prefilled
        together (one right-padded forward, each row at its own slots): a wave of k arrivals stalls the running
        batch for about one prefill instead of k. `adapters`: each one's adapter (default: the base)."""
        adapters = adapters or [-1] * len(seqs)
        known = len(self.adapters.names) if self.adapters is not None else 0
        if any(not -1 <= a < known for a in adapters):
            raise GptforgeError(f"adapter index out of range: this engine holds {known} adapter(s)")
        if len(seqs) > self.free:
            raise GptforgeError(f"{len(seqs)} sequences but {self.free} of {self.max_batch} rows free; "
                                "call step() until enough are retired")
        news = []
        for ids, params, extra_stops, *constraint in seqs:  # every check first: a bad one adds none
            ids = fit_prompts([ids], params, self.block_size)[0]
            max_new = min(params.max_new_tokens, self.block_size - len(ids))
            if max_new <= 0:
                raise GptforgeError(f"nothing to generate: max_new_tokens is {params.max_new_tokens} and the "
                                    f"prompt uses {len(ids)} of the context's {self.block_size} tokens")
            news.append(_Seq(next(self._ids), params, stop_ids(self.tokenizer, params, tuple(extra_stops)),
                             generator(params, self.device), TextRow(self.tokenizer, params.stop), ids, max_new,
                             constraint=constraint[0] if constraint else None))
        for s, a in zip(news, adapters):
            s.adapter = a
        self.filling.extend(news)
        if self.max_prefill_tokens is None:
            self._prefill_all()
        return [s.id for s in news]

    def _prefill_all(self) -> None:
        while self.filling:  # one forward, unless a prompt waits for the prefix a prompt ahead computes
            self._prefill(None)

    def _prefill(self, budget: int | None) -> None:
        """One forward over the first sequences of `filling`, at most `budget` token positions (None: all of
        them); those whose prompt is then complete join the decoding rows, to be sampled by the next step."""
        take: list[tuple[_Seq, int, int]] = []  # (sequence, its first slot in this forward, chunk length)
        T = 0  # the forward's width: the longest chunk
        for s in self.filling:
            start = s.length if s.length or self.prefix is None else self._reusable(s, take)
            if start is None:  # the prompt ahead computes the next blocks of this one: take them next forward
                break
            rest = len(s.prompt) - start
            if budget is None:
                c = rest
            else:
                # Padding costs as much as a real token: every row of the forward is T wide.
                widest = budget // (len(take) + 1)
                if widest < max(T, 1):
                    break
                c = min(rest, widest)
            take.append((s, start, c))
            T = max(T, c)
            if c < rest:  # cut here; the rest of this prompt goes first at the next step
                break
        if not take:
            return
        n, k, dev = len(self.rows), len(take), self.device
        view = self.cache.rows(slice(n, n + k))
        for i, (s, start, _) in enumerate(take):
            if s.length == 0:
                view.valid[i].zero_()  # the row may still hold a retired sequence
                if start:  # the prefix cache's blocks, into its row
                    self.cache.put_span(n + i, 0, self.prefix.lookup(s.prompt, start, _root(s)))
                    s.length = s.cached = start
        starts = torch.tensor([s.length for s, _, _ in take], device=dev)  # (k,)
        chunk = torch.tensor([c for _, _, c in take], device=dev)  # (k,)
        idx = torch.tensor([s.prompt[s.length: s.length + c] + [0] * (T - c) for s, _, c in take], device=dev)  # (k, T)
        # slot = position. A padding slot is clamped to the last one: a prompt never reaches it (at least one
        # token is always left to generate), so padding never overwrites a real key; it is marked invalid.
        slots = (starts[:, None] + torch.arange(T, device=dev)).clamp(max=self.block_size - 1)  # (k, T)
        real = torch.arange(T, device=dev) < chunk[:, None]  # (k, T)
        view.prepare(slots, real, end=int(slots.max()) + 1)
        with self._adapters([s.adapter for s, _, _ in take]):
            logits = self.model(idx, slots, view, last=chunk - 1)[:, 0]  # (k, V): at each chunk's last token
        for i, (s, _, c) in enumerate(take):
            s.length += c
            if self.prefix is not None:
                self.prefix.insert(s.prompt[: s.length], self.cache, n + i, _root(s))
        done = [i for i, (s, _, _) in enumerate(take) if s.length == len(s.prompt)]  # a prefix of `take`
        if not done:
            return
        rows = torch.arange(n, n + len(done), device=dev)
        self.logits[rows] = logits[: len(done), : self.vocab].float()
        self.picker.start(n, [take[i][0].prompt for i in done])
        self.rows.extend(self.filling[: len(done)])
        del self.filling[: len(done)]

    def _reusable(self, s: _Seq, take: list[tuple[_Seq, int, int]]) -> int | None:
        """Where a new prompt's prefill starts: after its longest cached prefix, leaving at least its last token
        to compute; None when a prompt ahead in this forward computes a longer prefix of it (wait for that)."""
        limit = len(s.prompt) - 1
        hit = self.prefix.match(s.prompt, limit, _root(s))
        for t, start, c in take:
            if t.adapter == s.adapter and _common(s.prompt[:limit], t.prompt[: start + c]) // BLOCK * BLOCK > hit:
                return None
        return hit

    def _adapters(self, rows: list[int]):
        """The context of a forward whose row i takes adapter rows[i]."""
        return self.adapters.use(rows) if self.adapters is not None else contextlib.nullcontext()

    def cancel(self, seq: int) -> bool:
        """Free a sequence's row now (its client went away); False if it is not live."""
        for r, s in enumerate(self.rows):
            if s.id == seq:
                self._retire(r)
                return True
        for i, s in enumerate(self.filling):
            if s.id == seq:  # a partly prefilled row is simply overwritten by the next one
                del self.filling[i]
                return True
        return False

    def _move(self, src: int, dst: int, n: int) -> None:
        """Copy cache row `src`'s first n slots, and its per-row state, to row `dst`."""
        for kv in self.cache.layers:
            for buf in kv.buffers():  # keys and values (and int8 scales)
                buf[dst, :, :n] = buf[src, :, :n]
        for t in (self.cache.valid, self.logits):
            t[dst] = t[src]
        self.picker.move(src, dst)

    def _retire(self, r: int) -> None:
        if self.prefix is not None:  # what it generated may open a later prompt (a chat's next turn)
            s = self.rows[r]
            self.prefix.insert(s.prompt + s.fed, self.cache, r, _root(s))
        last = len(self.rows) - 1
        if r != last:  # the last row moves into the hole: the decoding rows stay 0..n-1
            self._move(last, r, self.rows[last].length)
            self.rows[r] = self.rows[last]
        self.rows.pop()
        if self.filling and self.filling[0].length:  # a partly prefilled row follows them down
            self._move(last + 1, last, self.filling[0].length)

    @torch.no_grad()
    def step(self, emit: Callable[[list[SeqEvent]], None] | None = None) -> list[SeqEvent]:
        """One token for every decoding sequence: sample, retire the finished, feed the rest in one forward.
        First, with max_prefill_tokens, a prefill of at most that many positions of the added sequences.

        emit, if given, gets the events as soon as they are sampled, before the forward: a server hands them
        to its clients then, so each token goes out one forward earlier and its delivery (another thread's
        Python work) overlaps the forward instead of following it."""
        if self.filling:
            self._prefill(self.max_prefill_tokens) if self.rows else self._prefill_all()
        n = len(self.rows)
        if n == 0:
            return []
        events = [self._event(s, tok, lp) for s, tok, lp in zip(self.rows, *self._sample(n))]
        for r in reversed([r for r, ev in enumerate(events) if ev.finish_reason]):
            self._retire(r)  # from the end, so that the row moved into a hole is never one retiring
        if emit is not None and events:
            emit(events)
        self._feed()
        return events

    def _sample(self, n: int) -> tuple[list[int], list[tuple]]:
        """The policy's choice for rows 0..n-1, each with its own settings and random stream: the ids, and per
        row the (logprob, top values, top ids) host values asked for (empty when none are)."""
        logits, params = self.logits[:n], [s.params for s in self.rows]

        def noise(rows: list[int]) -> torch.Tensor:  # each row's own stream: what a batch of one would draw
            return torch.cat([exp_noise((1, self.vocab), self.rows[r].gen, self.device) for r in rows])

        masked = [r for r, s in enumerate(self.rows) if s.constraint is not None]
        for r in masked:
            self.rows[r].constraint.fill_mask(self.picker.bitmask[r])
        ids = self.picker.pick(logits, policy_groups(params), noise, masked)
        host = [t.tolist() for t in (ids, *token_logprobs(logits, ids, params))]
        return host[0], list(zip(*host[1:])) if len(host) > 1 else [()] * n

    def _event(self, s: _Seq, tok: int, logprobs: tuple) -> SeqEvent:
        """Sequence s's event for its new id `tok`: the text it releases, and its end (stop, or length)."""
        s.generated, s.token = s.generated + 1, tok
        ev = SeqEvent(s.id, tok, "", cached_tokens=s.cached)
        if s.params.logprobs or s.params.top_logprobs:
            ev.logprob = logprobs[0]
        if s.params.top_logprobs:
            k = s.params.top_logprobs
            ev.top = list(zip(logprobs[2][:k], logprobs[1][:k]))
        ev.text, stopped = s.text.take(tok, s.stop_ids)
        if not stopped and s.constraint is not None:
            s.constraint.advance(tok)
            if s.constraint.finished:  # nothing more can follow: ending now saves a step for the stop id
                ev.text, stopped = ev.text + s.text.flush(), True
        if stopped:
            ev.finish_reason = "stop"
        elif s.generated >= s.max_new:
            ev.text, ev.finish_reason = ev.text + s.text.flush(), "length"
        return ev

    def _feed(self) -> None:
        """Forward each live row's last token at its own slot: logits for the next step."""
        n = len(self.rows)
        if n == 0:
            return
        lens = torch.tensor([[s.length] for s in self.rows], device=self.device)  # (n, 1): slot = position
        ids = torch.tensor([[s.token] for s in self.rows], device=self.device)  # (n, 1)
        view, end = self.cache.rows(slice(0, n)), max(s.length for s in self.rows) + 1
        with self._adapters([s.adapter for s in self.rows]):
            if self._whole is not None and self._whole.usable(view, n):  # marks its slots and masks itself
                self.logits[:n] = self._whole(ids, lens, view, lens, end)[:, : self.vocab].float()
            else:
                view.prepare(lens, torch.ones_like(ids, dtype=torch.bool), end=end)
                self.logits[:n] = self.model(ids, lens, view)[:, -1, : self.vocab].float()
        for s in self.rows:
            s.length += 1
            s.fed.append(s.token)


def _root(s: _Seq) -> str | None:
    """The prefix cache's chain root of a sequence's blocks: one per LoRA adapter, None for the base."""
    return None if s.adapter < 0 else f"adapter {s.adapter}"


def _common(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of a and b."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
