"""Text generation: a static KV cache, prefill in one forward, one-token decode steps, sampling, batches, streaming.

Decoding one token of a batch-1 request reads every weight once, so its speed is bound by memory bandwidth.
The engine therefore does as little else as it can per step: the keys and values of earlier tokens live in a
cache allocated once for (batch, prompt + new tokens) and are never recomputed; a step feeds one token per row.

Reading order: the sampling options, the cache, the sampling math (each filter a small function), the token
loop (prefill, decode steps, stops), then text (stop strings, UTF-8-safe streaming), the public functions, and
BatchEngine: continuous batching for the server (sequences join and leave a running batch between steps).

Batches are left-padded: every row writes its next token to the same cache slot, so one decode step has the
same shapes for the whole batch; each row's positions start at 0 at its first real token, and padded slots
are masked out of attention. Shapes: B batch, T prompt length (the longest), S cache length, V vocab.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptforge import gemv
from gptforge.errors import GptforgeError
from gptforge.tokenizer import Tokenizer


# --- options ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token, and when to stop. Names follow the OpenAI / Hugging Face ones."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 is greedy decoding
    top_k: int | None = None  # keep the k most likely tokens
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (Holtzman et al. 2019)
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one (Nguyen et al. 2024)
    repetition_penalty: float = 1.0  # CTRL's (Keskar et al. 2019): logits of tokens seen, prompt included
    presence_penalty: float = 0.0  # OpenAI's: minus this for every token generated at least once
    frequency_penalty: float = 0.0  # OpenAI's: minus this times how often the token was generated
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end a sequence (matched on decoded text, left out of it)
    stop_at_eos: bool = True
    logprobs: bool = False  # log-probabilities of the chosen tokens...
    top_logprobs: int = 0  # ...and of this many most likely alternatives at each step
    truncate_prompt: bool = False  # keep the end of a too-long prompt instead of raising

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> GptforgeError:
            return GptforgeError(f"{name} must be {rule}, got {getattr(self, name)!r}")

        if self.max_new_tokens < 0:
            raise bad("max_new_tokens", ">= 0")
        if self.temperature < 0:
            raise bad("temperature", ">= 0 (0 is greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise bad("top_k", ">= 1 (or None for no limit)")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "in (0, 1] (1 keeps every token)")
        if not 0.0 <= self.min_p < 1.0:
            raise bad("min_p", "in [0, 1) (0 keeps every token)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "> 0 (1 is no penalty)")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise bad("presence_penalty", "in [-2, 2], as in the OpenAI API")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise bad("frequency_penalty", "in [-2, 2], as in the OpenAI API")
        if isinstance(self.stop, str):  # a bare string would be taken as a tuple of its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not s for s in self.stop):
            raise GptforgeError("stop strings must not be empty")
        if self.top_logprobs < 0:
            raise bad("top_logprobs", ">= 0")


# --- the static KV cache -----------------------------------------------------------------------------------
class KVCache:
    """Keys and values of every layer for B rows of S positions, allocated once for the whole generation.

    `prepare(slots, real)` is called before each forward: it records which slots this forward writes and
    builds the attention mask, which each layer's `update` hands to SDPA with the full key/value buffers.
    With `static=True` attention always spans all S slots (unwritten ones masked), so every decode step has
    the same shapes and can be captured once as a CUDA graph; otherwise it spans only the slots written so
    far, which reads less memory per step in eager mode.
    """

    def __init__(self, cfg, batch: int, length: int, *, device: torch.device, dtype: torch.dtype, static: bool):
        shape = (batch, cfg.kv_heads, length, cfg.head_dim)
        self.layers = [_LayerKV(self, torch.zeros(shape, device=device, dtype=dtype),
                                torch.zeros(shape, device=device, dtype=dtype)) for _ in range(cfg.n_layer)]
        self.valid = torch.zeros(batch, length, dtype=torch.bool, device=device)  # slot holds a real token
        self.length, self.static, self.dtype = length, static, dtype
        self.native = device.type == "cpu" and not static and gemv.available()  # csrc/attention.cpp, block.cpp
        self.slots = torch.zeros(1, dtype=torch.long, device=device)
        self._zero = torch.zeros((), dtype=dtype, device=device)
        self.mask = self.valid[:, None, None, :]
        self.end = length
        if static and device.type == "cuda":
            # Buffers at fixed addresses are what lets a CUDA graph replay write into them (HF StaticCache does
            # the same); without this, cudagraph trees would copy them on every step or refuse to capture.
            for t in [self.valid] + [b for kv in self.layers for b in (kv.k, kv.v)]:
                torch._dynamo.mark_static_address(t)

    def prepare(self, slots: torch.Tensor, real: torch.Tensor | None, end: int | None = None) -> None:
        """This forward writes slots (T,) for every row, or slots (B, T) of its own for each row (continuous
        batching: rows at different lengths); real (B, T) says which of them hold real tokens (not padding),
        None that all do. `end` (eager only) is one past the last slot written."""
        self.slots = slots
        self.end = self.length if self.static or end is None else end
        if real is None and slots.shape == (1,) and not self.static:
            # An eager decode step (the caller's slot is end - 1): one real token per row, which sees every valid
            # slot. Three ops instead of the general mask's dozen; with the penalty bookkeeping skipped when no
            # penalty is on, the demo model decoded 7% faster.
            self.valid.index_fill_(1, slots, True)
            self.mask = torch.where(self.valid[:, None, None, : self.end], self._zero, float("-inf"))
            return
        if real is None:
            real = torch.ones(self.valid.shape[0], slots.shape[-1], dtype=torch.bool, device=slots.device)
        if slots.dim() == 1:
            self.valid.index_copy_(1, slots, real)
        else:
            self.valid.scatter_(1, slots, real)
        s = torch.arange(self.end, device=slots.device)
        causal = s <= slots[..., None]  # (T, end) or (B, T, end)
        # A padding query may see only itself: a row of all-masked keys would make SDPA return NaN, and the
        # NaN would reach real tokens through 0 * NaN in the next layer's attention over the cached values.
        allowed = (self.valid[:, None, : self.end] & causal) | (s == slots[..., None])  # (B, T, end)
        # An additive float mask: CPU SDPA measured 2-4x faster with it than with a boolean one at decode shapes.
        self.mask = torch.where(allowed, self._zero, float("-inf"))[:, None]  # (B, 1, T, end): the same for every head

    def rows(self, r: slice) -> KVCache:
        """A view of rows `r` sharing this cache's storage: a forward over it reads and writes only those rows
        (BatchEngine prefills a new sequence into its row this way, and decodes only the occupied rows)."""
        view = KVCache.__new__(KVCache)
        view.layers = [_LayerKV(view, kv.k[r], kv.v[r]) for kv in self.layers]
        view.valid = self.valid[r]
        view.length, view.static, view.dtype, view.native = self.length, self.static, self.dtype, self.native
        view._zero = self._zero
        view.slots, view.mask, view.end = self.slots, view.valid[:, None, None, :], self.end
        return view


class _LayerKV:
    """One layer's view of the cache: what CausalSelfAttention calls `kv.attend(q, k, v)` on."""

    def __init__(self, cache: KVCache, k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write this call's k, v (B, K, T, Hd) at the cache's slots; attention of q (B, H, T, Hd) over the
        cached keys and values up to `cache.end`, under its mask: (B, H, T, Hd)."""
        c = self.cache
        if c.native and q.shape[2] == 1 and not torch.compiler.is_compiling():
            # A CPU decode step: one native op (csrc/attention.cpp) for the cache writes and the attention.
            return torch.ops.gptforge_attn.decode_attention(q, k, v, self.k, self.v, c.slots, c.mask)
        k, v = self.update(k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=c.mask, enable_gqa=q.shape[1] != k.shape[1])

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, K, T, Hd) at the cache's slots; the cached keys and values up to `cache.end`."""
        c = self.cache
        if c.slots.dim() == 1:
            self.k.index_copy_(2, c.slots, k)  # (B, K, S, Hd) <- (B, K, T, Hd) at slots
            self.v.index_copy_(2, c.slots, v)
        else:  # each row at its own slots (B, T)
            at = c.slots[:, None, :, None].expand_as(k)  # (B, K, T, Hd)
            self.k.scatter_(2, at, k)
            self.v.scatter_(2, at, v)
        return self.k[:, :, : c.end], self.v[:, :, : c.end]


# --- sampling ----------------------------------------------------------------------------------------------
# Every function here works on (B, V) fp32 logits with tensor ops only, so a CUDA decode loop runs without
# waiting for the host (no .item(), no data-dependent Python branches).
def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """counts (B, V): times each token was generated; seen (B, V): in the prompt or generated."""
    if p.repetition_penalty != 1.0:
        # CTRL divides positive logits and multiplies negative ones, so a penalty > 1 always lowers the token.
        penalized = torch.where(logits > 0, logits / p.repetition_penalty, logits * p.repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if p.presence_penalty:
        logits = logits - p.presence_penalty * (counts > 0)
    if p.frequency_penalty:
        logits = logits - p.frequency_penalty * counts
    return logits


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf below the k-th largest logit of each row (ties at the k-th are kept)."""
    if k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # (B, V): probability of the tokens ranked above each one
    drop_sorted = mass_before >= p  # the first token has mass_before 0, so it always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # (B, V) back in vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times that of the most likely token."""
    if min_p <= 0.0:
        return logits
    # p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed.
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)  # (B, 1)
    return logits.masked_fill(logits < threshold, float("-inf"))


def sampling_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Probabilities (B, V) to draw from (temperature > 0): temperature, then top-k, top-p, min-p."""
    logits = logits / p.temperature
    if p.top_k is not None:
        logits = top_k_filter(logits, p.top_k)
    logits = min_p_filter(top_p_filter(logits, p.top_p), p.min_p)
    return logits.softmax(dim=-1)


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None) -> torch.Tensor:
    """Next ids (B,) from processed logits: greedy at temperature 0, else temperature, top-k, top-p, min-p."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, p)
    # argmax(probs / E) with E ~ Exp(1) draws from probs (the exponential race, as in gpt-fast): unlike
    # torch.multinomial it never synchronises with the host.
    return (probs / exp_noise(probs.shape, gen, probs.device)).argmax(dim=-1)


def exp_noise(shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Exp(1) draws as -log(U), U ~ U[0, 1): the same distribution as Tensor.exponential_, which measured ~5x
    slower on CPU (210 vs 42 us per 4096-vocab row, the largest cost of a sampled batch step). U = 0 gives
    +inf, whose token then scores 0: never a NaN, never a pick of a zero-probability token."""
    return torch.rand(shape, generator=gen, device=device).log_().neg_()


# --- the token loop ----------------------------------------------------------------------------------------
@dataclass
class Step:
    """One decode step of a batch: the chosen id per row (None once a row has finished)."""

    ids: list[int | None]
    logprobs: list[float | None] | None = None  # of the chosen ids, under the model's own distribution
    top: list[list[tuple[int, float]] | None] | None = None  # the most likely ids and their logprobs


def _fit_prompts(prompts: list[list[int]], p: SamplingParams, block_size: int) -> list[list[int]]:
    out = []
    for i, ids in enumerate(prompts):
        if not ids:
            raise GptforgeError(f"prompt {i} encodes to no tokens")
        if len(ids) > block_size:
            if not p.truncate_prompt:
                raise GptforgeError(f"prompt {i} is {len(ids)} tokens but the model's context is {block_size}; "
                                    "shorten it, or pass truncate_prompt=True (--truncate-prompt) to keep its end")
            # Leave room for the new tokens too, as long as at least one prompt token remains.
            ids = ids[-max(1, block_size - p.max_new_tokens):]
        out.append(list(ids))
    return out


def _decode_step(model: nn.Module, cache: KVCache, ids: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                 end: int | None = None) -> torch.Tensor:
    """Logits (B, V) of one new token per row: ids, pos (B, 1), written at cache slot (1,)."""
    cache.prepare(slot, None, end)
    return model(ids, pos, cache)[:, -1]


_compiled_step = None


def _static_step(device: torch.device):
    """The decode step compiled once per process for fixed shapes: CUDA graphs on CUDA (torch.compile
    "reduce-overhead"), inductor's fused kernels elsewhere (CUDA graphs do not exist there)."""
    global _compiled_step
    if _compiled_step is None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        _compiled_step = torch.compile(_decode_step, mode=mode, fullgraph=True, dynamic=False)
    return _compiled_step


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The random stream of one sequence (None when greedy): seeded, or from fresh OS entropy."""
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


@torch.no_grad()
def generate_steps(model: nn.Module, prompts: list[list[int]], params: SamplingParams, *, vocab_size: int,
                   stop_ids: tuple[int, ...] = (), finished: list[bool] | None = None,
                   compile: bool | None = None) -> Iterator[Step]:
    """Prefill the prompts (token ids) in one forward, then decode one token per row per step.

    A row finishes after any id in `stop_ids`; the caller may also finish rows by setting `finished[i]`
    (a list it passes in), which is how text-level stops end a row. Yields one Step per decode step until
    every row has finished, `max_new_tokens` are out, or the context (block_size) is full.

    compile: run the decode step with static shapes through torch.compile (CUDA graphs on CUDA). None: on
    CUDA only. On CPU the eager step on the native kernels (decode_layout) measured faster than the compiled
    one (the demo shape: 823 vs 756 tokens/s), and each new (batch, cache length) costs ~30 s of compilation
    on 2 cores (docs/BENCHMARKS.md).
    """
    cfg = model.config
    prompts = _fit_prompts(prompts, params, cfg.block_size)
    B, T = len(prompts), max(len(p) for p in prompts)
    lens = [len(p) for p in prompts]
    max_new = min(params.max_new_tokens, cfg.block_size - T)  # positions never exceed the trained context
    finished = [False] * B if finished is None else finished
    if max_new <= 0 or all(finished):
        return
    weight = next(model.parameters())
    device, dtype = weight.device, weight.dtype
    static = device.type == "cuda" if compile is None else compile
    # CUDA: sync with the host only every few steps; the rows that finished in between just run on.
    sync_every = 8 if device.type == "cuda" else 1
    S = T + max_new
    if static:
        S = min(cfg.block_size, -(-S // 64) * 64)  # a few cache lengths, so a few graph captures, not one per call
    gen = _generator(params, device)

    # Prefill: left-pad to T; each row's positions count from its first real token.
    pad = torch.tensor([T - n for n in lens], device=device)  # (B,)
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # (B, T)
    cols = torch.arange(T, device=device)
    real = cols[None, :] >= pad[:, None]  # (B, T)
    pos = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
    cache = KVCache(cfg, B, S, device=device, dtype=dtype, static=static)
    cache.prepare(cols, real, end=T)
    logits = model(idx, pos, cache, last=torch.full((B,), T - 1, device=device))[:, 0]  # (B, V)

    counts = torch.zeros(B, vocab_size, device=device)  # generated tokens, for presence/frequency penalties
    # Prompt + generated, for the repetition penalty; padding goes to an extra column that is then dropped.
    seen = torch.zeros(B, vocab_size + 1, dtype=torch.bool, device=device)
    seen = seen.scatter_(1, torch.where(real, idx, vocab_size), True)[:, :vocab_size].contiguous()  # (B, V)
    next_pos = torch.tensor(lens, device=device)[:, None]  # (B, 1)
    slot_table = torch.arange(T, S, device=device)  # (S - T,): the cache slot of each decode step
    step = _static_step(device) if static else _decode_step
    want_top = params.top_logprobs > 0
    penalized = params.repetition_penalty != 1.0 or params.presence_penalty != 0 or params.frequency_penalty != 0
    pending: list[tuple[torch.Tensor, ...]] = []
    for n in range(max_new):
        logits = logits[:, :vocab_size].float()  # rows above the tokenizer's size are padding: never sampled
        ids = sample(apply_penalties(logits, counts, seen, params), params, gen)  # (B,)
        if penalized:
            counts.scatter_add_(1, ids[:, None], torch.ones_like(counts[:, :1]))
            seen.scatter_(1, ids[:, None], True)
        out: tuple[torch.Tensor, ...] = (ids,)
        if params.logprobs or want_top:
            logp = logits.log_softmax(dim=-1)  # the model's distribution, before penalties and filters
            out += (logp.gather(1, ids[:, None])[:, 0],)
            if want_top:
                out += torch.topk(logp, min(params.top_logprobs, vocab_size), dim=-1)
        pending.append(out)
        last = n == max_new - 1
        if len(pending) == sync_every or last:
            for host in [[t.tolist() for t in o] for o in pending]:  # one host transfer per block
                yield _step_out(host, finished, stop_ids, params)
                if all(finished):
                    return
            pending = []
        if last:
            return
        slot = slot_table[n : n + 1]  # a view: no host-to-device copy inside the loop
        if static:
            logits = step(model, cache, ids[:, None], next_pos + n, slot).clone()  # clone: graph outputs are reused
        else:
            logits = step(model, cache, ids[:, None], next_pos + n, slot, T + n + 1)


def _step_out(host: list, finished: list[bool], stop_ids: tuple[int, ...], p: SamplingParams) -> Step:
    """A Step from one step's host lists (ids, then chosen logprobs and top values/indices if asked)."""
    ids = [None if f else i for i, f in zip(host[0], finished)]
    s = Step(ids)
    if p.logprobs or p.top_logprobs:
        s.logprobs = [None if i is None else lp for i, lp in zip(ids, host[1])]
    if p.top_logprobs:
        s.top = [None if i is None else list(zip(ix, v)) for i, v, ix in zip(ids, host[2], host[3])]
    for r, i in enumerate(ids):
        if i is not None and i in stop_ids:
            finished[r] = True
    return s


def generate_tokens(model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int, vocab_size: int,
                    temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                    stop_ids: tuple[int, ...] = (), **options) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing one prompt, the stop id included when one ends it."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed, **options)
    for s in generate_steps(model, [prompt_ids], params, vocab_size=vocab_size, stop_ids=stop_ids):
        yield s.ids[0]


# --- text: stop strings and streaming ----------------------------------------------------------------------
class _TextRow:
    """The decoded text of one row as its ids arrive: complete UTF-8 only, stop strings cut off.

    Byte-level BPE decodes a sequence to the concatenation of its parts' bytes, so ids are decoded in pieces
    from the last point where the text was whole (no dangling UTF-8 byte), not from the start every time.
    """

    def __init__(self, tokenizer: Tokenizer, stops: tuple[str, ...]):
        self.tok, self.stops = tokenizer, stops
        self.text = ""  # decoded so far, complete characters only
        self.piece: list[int] = []  # ids not yet decoded to complete characters
        self.emitted = 0  # characters of text handed out
        self.stopped = False

    def add(self, i: int) -> str:
        """Take one id; return the text that is now safe to hand out."""
        self.piece.append(i)
        piece = self.tok.decode(self.piece)
        if piece.endswith("\ufffd"):  # the id ended inside a multi-byte character: wait for the rest
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self.stops), default=0))
        self.text += piece
        self.piece = []
        hits = [j for j in (self.text.find(s, start) for s in self.stops) if j >= 0]
        if hits:  # a stop string may straddle ids: it is searched for in the text, not in the ids
            self.text, self.stopped = self.text[: min(hits)], True
            return self.flush()
        # Hold back a tail that could still grow into a stop string.
        hold = next((k for k in range(min(len(self.text), max((len(s) for s in self.stops), default=1) - 1), 0, -1)
                     if any(s.startswith(self.text[-k:]) for s in self.stops)), 0)
        safe = len(self.text) - hold
        out, self.emitted = self.text[self.emitted: safe], max(self.emitted, safe)
        return out

    def flush(self) -> str:
        """The rest of the text, once the row has finished."""
        if self.piece and not self.stopped:  # ended inside a character: the replacement char is the truth
            self.text += self.tok.decode(self.piece)
            self.piece = []
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out


@dataclass
class Completion:
    """One prompt's result."""

    text: str
    token_ids: list[int]  # every id generated, the EOS or the one completing a stop string included
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens or the context is full)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _prompt_ids(tokenizer: Tokenizer, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):  # already token ids (a chat rendered by Tokenizer.encode_chat)
        return prompt
    # An empty prompt starts a new document: the model saw EOS before every document in training.
    return tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]


def _run(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams,
         results: list[Completion], compile: bool | None = None) -> Iterator[tuple[int, str]]:
    """Yield (row, text delta) as rows decode; fill `results` with one Completion per prompt."""
    rows = [_TextRow(tokenizer, params.stop) for _ in prompts]
    results[:] = [Completion("", [], "length", [] if params.logprobs else None,
                             [] if params.top_logprobs else None) for _ in prompts]
    finished = [False] * len(prompts)
    eos = (tokenizer.eos_id,) if params.stop_at_eos else ()
    steps = generate_steps(model, [_prompt_ids(tokenizer, p) for p in prompts], params,
                           vocab_size=tokenizer.vocab_size, stop_ids=eos, finished=finished, compile=compile)
    for s in steps:
        for r, i in enumerate(s.ids):
            if i is None:
                continue
            res = results[r]
            res.token_ids.append(i)
            if s.logprobs is not None and res.logprobs is not None:
                res.logprobs.append(s.logprobs[r])
            if s.top is not None:
                res.top_logprobs.append(s.top[r])
            if i in eos:
                res.finish_reason = "stop"
                delta = rows[r].flush()
            else:
                delta = rows[r].add(i)
                if rows[r].stopped:
                    finished[r], res.finish_reason = True, "stop"
            if delta:
                yield r, delta
    for r, row in enumerate(rows):
        if delta := row.flush():
            yield r, delta
        results[r].text = row.text


def _params(kwargs: dict) -> SamplingParams:
    names = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise GptforgeError(f"unknown generation option(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    return SamplingParams(**kwargs)


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], *, compile: bool | None = None,
           **options) -> Iterator[str]:
    """Yield the continuation of `prompt` (text, or token ids) as text deltas, each valid UTF-8, as it is generated.

    options are the fields of SamplingParams (max_new_tokens, temperature, top_k, top_p, min_p, penalties,
    seed, stop, stop_at_eos, truncate_prompt). A stop string is never yielded, not even in part.
    """
    results: list[Completion] = []
    for _, delta in _run(model, tokenizer, [prompt], _params(options), results, compile):
        yield delta


def stream_batch(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], *, compile: bool | None = None,
                 **options) -> Iterator[tuple[int, str]]:
    """Like `stream` for several prompts decoded together: yields (prompt index, text delta)."""
    results: list[Completion] = []
    yield from _run(model, tokenizer, list(prompts), _params(options), results, compile)


def complete(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], *, compile: bool | None = None,
             **options) -> list[Completion]:
    """Completions (text, ids, finish reason, logprobs when asked) of prompts decoded as one batch."""
    results: list[Completion] = []
    for _ in _run(model, tokenizer, list(prompts), _params(options), results, compile):
        pass
    return results


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[str], **options) -> str | list[str]:
    """The continuation of `prompt` (a string), or of each prompt of a list, decoded as one batch."""
    if isinstance(prompt, str):
        return complete(model, tokenizer, [prompt], **options)[0].text
    return [c.text for c in complete(model, tokenizer, prompt, **options)]


# --- continuous batching -----------------------------------------------------------------------------------
@dataclass
class SeqEvent:
    """What one BatchEngine step produced for one sequence."""

    seq: int  # the id `add` returned
    token: int
    text: str  # text now safe to hand out: complete UTF-8, stop strings cut off ("" mid-character)
    logprob: float | None = None  # of `token` under the model, before penalties and filters (if asked)
    top: list[tuple[int, float]] | None = None  # the most likely ids and their logprobs (if asked)
    finish_reason: str | None = None  # "stop" or "length" on a sequence's last event: its row is free again


@dataclass
class _Seq:
    id: int
    params: SamplingParams
    stop_ids: tuple[int, ...]
    gen: torch.Generator | None  # its own random stream: its draws do not depend on its batch-mates
    text: _TextRow
    prompt: list[int]
    max_new: int
    length: int = 0  # tokens in its cache row: the slot its next fed token is written to
    generated: int = 0
    token: int = 0  # the last id sampled, fed at the next forward


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

    A sequence's tokens do not depend on its batch-mates: a greedy or seeded sequence decodes the same text
    alone as with others (up to the float rounding of batched matmuls, as for `generate_steps`' batches), and
    the same as `complete` with the same options, however its prompt was chunked. Not thread-safe: one thread
    (the server's scheduler) calls it.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, max_batch: int, max_prefill_tokens: int | None = None):
        if max_batch < 1:
            raise GptforgeError(f"max_batch must be >= 1, got {max_batch}")
        if max_prefill_tokens is not None and max_prefill_tokens < 1:
            raise GptforgeError(f"max_prefill_tokens must be >= 1 (or None: no limit), got {max_prefill_tokens}")
        cfg = model.config
        weight = next(model.parameters())
        self.model, self.tokenizer, self.max_batch, self.block_size = model, tokenizer, max_batch, cfg.block_size
        self.max_prefill_tokens = max_prefill_tokens
        self.device, self.vocab = weight.device, tokenizer.vocab_size
        self.cache = KVCache(cfg, max_batch, cfg.block_size, device=self.device, dtype=weight.dtype, static=False)
        self.logits = torch.zeros(max_batch, self.vocab, device=self.device)  # each row's next-token logits
        self.counts = torch.zeros(max_batch, self.vocab, device=self.device)  # generated ids, for penalties
        self.seen = torch.zeros(max_batch, self.vocab, dtype=torch.bool, device=self.device)  # prompt + generated
        self.rows: list[_Seq] = []  # decoding: rows[i] lives in cache row i
        self.filling: list[_Seq] = []  # added, prompt not fully prefilled yet (in arrival order)
        self._ids = itertools.count()

    @property
    def live(self) -> int:
        """Sequences held: decoding, or waiting for (the rest of) their prefill."""
        return len(self.rows) + len(self.filling)

    @property
    def free(self) -> int:
        return self.max_batch - self.live

    def add(self, prompt_ids: list[int], params: SamplingParams, stop_ids: tuple[int, ...] = ()) -> int:
        """Take a new sequence into a free row (prefilled now, or over the next steps with max_prefill_tokens);
        returns its id. It ends at any of `stop_ids` (finish reason "stop", the id reported but never in the
        text), a stop string, max_new_tokens or a full context."""
        return self.add_many([(prompt_ids, params, stop_ids)])[0]

    @torch.no_grad()
    def add_many(self, seqs: list[tuple[list[int], SamplingParams, tuple[int, ...]]]) -> list[int]:
        """`add` for several sequences at once, prefilled together (one right-padded forward, each row at its
        own slots): a wave of k arrivals stalls the running batch for about one prefill instead of k."""
        if len(seqs) > self.free:
            raise GptforgeError(f"{len(seqs)} sequences but {self.free} of {self.max_batch} rows free; "
                                "call step() until enough are retired")
        news = []
        for prompt_ids, params, stop_ids in seqs:  # every check first: a bad one adds none
            ids = _fit_prompts([prompt_ids], params, self.block_size)[0]
            max_new = min(params.max_new_tokens, self.block_size - len(ids))
            if max_new <= 0:
                raise GptforgeError(f"nothing to generate: max_new_tokens is {params.max_new_tokens} and the "
                                    f"prompt uses {len(ids)} of the context's {self.block_size} tokens")
            news.append(_Seq(next(self._ids), params, tuple(stop_ids), _generator(params, self.device),
                             _TextRow(self.tokenizer, params.stop), ids, max_new))
        self.filling.extend(news)
        if self.max_prefill_tokens is None:
            self._prefill(None)
        return [s.id for s in news]

    def _prefill(self, budget: int | None) -> None:
        """One forward over the first sequences of `filling`, at most `budget` token positions (None: all of
        them); those whose prompt is then complete join the decoding rows, to be sampled by the next step."""
        take: list[tuple[_Seq, int]] = []  # (sequence, chunk length)
        T = 0  # the forward's width: the longest chunk
        for s in self.filling:
            rest = len(s.prompt) - s.length
            if budget is None:
                c = rest
            else:
                # Padding costs as much as a real token: every row of the forward is T wide.
                widest = budget // (len(take) + 1)
                if widest < max(T, 1):
                    break
                c = min(rest, widest)
            take.append((s, c))
            T = max(T, c)
            if c < rest:  # cut here; the rest of this prompt goes first at the next step
                break
        if not take:
            return
        n, k, dev = len(self.rows), len(take), self.device
        starts = torch.tensor([s.length for s, _ in take], device=dev)  # (k,)
        chunk = torch.tensor([c for _, c in take], device=dev)  # (k,)
        idx = torch.tensor([s.prompt[s.length: s.length + c] + [0] * (T - c) for s, c in take], device=dev)  # (k, T)
        # slot = position. A padding slot is clamped to the last one: a prompt never reaches it (at least one
        # token is always left to generate), so padding never overwrites a real key; it is marked invalid.
        slots = (starts[:, None] + torch.arange(T, device=dev)).clamp(max=self.block_size - 1)  # (k, T)
        real = torch.arange(T, device=dev) < chunk[:, None]  # (k, T)
        view = self.cache.rows(slice(n, n + k))
        for i, (s, _) in enumerate(take):
            if s.length == 0:
                view.valid[i].zero_()  # the row may still hold a retired sequence
        view.prepare(slots, real, end=int(slots.max()) + 1)
        logits = self.model(idx, slots, view, last=chunk - 1)[:, 0]  # (k, V): at each chunk's last token
        for s, c in take:
            s.length += c
        done = [i for i, (s, _) in enumerate(take) if s.length == len(s.prompt)]  # a prefix of `take`
        if not done:
            return
        rows = torch.arange(n, n + len(done), device=dev)
        self.logits[rows] = logits[: len(done), : self.vocab].float()
        self.counts[rows] = 0
        self.seen[rows] = False
        for i in done:
            self.seen[n + i, take[i][0].prompt] = True
        self.rows.extend(self.filling[: len(done)])
        del self.filling[: len(done)]

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
            kv.k[dst, :, :n] = kv.k[src, :, :n]
            kv.v[dst, :, :n] = kv.v[src, :, :n]
        for t in (self.cache.valid, self.logits, self.counts, self.seen):
            t[dst] = t[src]

    def _retire(self, r: int) -> None:
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
            self._prefill(self.max_prefill_tokens if self.rows else None)
        n = len(self.rows)
        if n == 0:
            return []
        logits, counts, seen = self.logits[:n], self.counts[:n], self.seen[:n]
        ids = torch.empty(n, dtype=torch.long, device=self.device)
        groups: dict[tuple, list[int]] = {}
        for r, s in enumerate(self.rows):  # rows with the same settings are processed as one (B, V) batch
            p = s.params
            key = (p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty,
                   p.frequency_penalty)
            groups.setdefault(key, []).append(r)
        for rows in groups.values():
            p = self.rows[rows[0]].params
            sel = slice(0, n) if len(rows) == n else torch.tensor(rows, device=self.device)
            lg = apply_penalties(logits[sel], counts[sel], seen[sel], p)
            if p.temperature == 0:
                ids[sel] = lg.argmax(dim=-1)
            else:
                probs = sampling_probs(lg, p)
                # Each row draws from its own stream, the same numbers `sample` draws for a batch of one.
                noise = torch.cat([exp_noise((1, self.vocab), self.rows[r].gen, self.device) for r in rows])
                ids[sel] = (probs / noise).argmax(dim=-1)
        counts.scatter_add_(1, ids[:, None], torch.ones_like(counts[:, :1]))
        seen.scatter_(1, ids[:, None], True)
        host = ids.tolist()
        chosen = top_v = top_i = None
        if any(s.params.logprobs or s.params.top_logprobs for s in self.rows):
            logp = logits.log_softmax(dim=-1)
            chosen = logp.gather(1, ids[:, None])[:, 0].tolist()
            k = min(max(s.params.top_logprobs for s in self.rows), self.vocab)
            if k:
                top_v, top_i = (t.tolist() for t in torch.topk(logp, k, dim=-1))

        events, done = [], []
        for r, s in enumerate(self.rows):
            tok = host[r]
            s.generated, s.token = s.generated + 1, tok
            ev = SeqEvent(s.id, tok, "")
            if s.params.logprobs or s.params.top_logprobs:
                ev.logprob = chosen[r]
            if s.params.top_logprobs:
                k = s.params.top_logprobs
                ev.top = list(zip(top_i[r][:k], top_v[r][:k]))
            if tok in s.stop_ids:
                ev.text, ev.finish_reason = s.text.flush(), "stop"
            else:
                ev.text = s.text.add(tok)
                if s.text.stopped:
                    ev.finish_reason = "stop"
                elif s.generated >= s.max_new:
                    ev.text, ev.finish_reason = ev.text + s.text.flush(), "length"
            if ev.finish_reason:
                done.append(r)
            events.append(ev)
        for r in reversed(done):  # from the end, so that the row moved into a hole is never one retiring
            self._retire(r)
        if emit is not None and events:
            emit(events)
        self._feed()
        return events

    def _feed(self) -> None:
        """Forward each live row's last token at its own slot: logits for the next step."""
        n = len(self.rows)
        if n == 0:
            return
        lens = torch.tensor([[s.length] for s in self.rows], device=self.device)  # (n, 1): slot = position
        ids = torch.tensor([[s.token] for s in self.rows], device=self.device)  # (n, 1)
        view = self.cache.rows(slice(0, n))
        view.prepare(lens, torch.ones_like(ids, dtype=torch.bool), end=max(s.length for s in self.rows) + 1)
        self.logits[:n] = self.model(ids, lens, view)[:, -1, : self.vocab].float()
        for s in self.rows:
            s.length += 1


# --- loading -----------------------------------------------------------------------------------------------
def decode_layout(model: nn.Module) -> nn.Module:
    """Route the CPU decode steps of `model` through the few-row kernels of `gemv.py`: each nn.Linear becomes a
    `gemv.DecodeLinear` (same parameters) and the tied token table the head multiplies by a `gemv.DecodeWeight`
    (same values, same shape); their products with up to 16 rows run the kernels, with more PyTorch's GEMM.

    The gain is largest where PyTorch's GEMM is weakest, a few rows over a matrix out of cache (`gpt2` at batch
    8) and bf16 weights; docs/BENCHMARKS.md has the figures. Applied by `load` on CPU only: it is for
    inference (the parameters are replaced, so an optimizer built before would no longer see them).
    """
    linears = [(parent, name, m) for parent in model.modules() for name, m in parent.named_children()
               if type(m) is nn.Linear]
    if not gemv.available():
        # PyTorch's GEMM then: a transposed (in, out)-contiguous weight (HF GPT-2's Conv1D layout) ran 8 rows
        # 2.3x faster than the (out, in) one on the CI CPU, and 1 row no slower.
        for _, _, mod in linears:
            mod.weight = nn.Parameter(mod.weight.detach().t().contiguous().t(), requires_grad=False)
        return model
    for parent, name, mod in linears:
        setattr(parent, name, gemv.DecodeLinear.of(mod))
    if getattr(model, "lm_head", None) is None and isinstance(getattr(model, "tok_emb", None), nn.Embedding):
        model.tok_emb.weight = gemv.DecodeWeight.wrap(model.tok_emb.weight)
    for i, block in enumerate(getattr(model, "blocks", [])):
        model.blocks[i] = gemv.DecodeBlock.of(block)  # a block's decode step in one native call
    return model


def load(path: str | Path, device: str = "auto", dtype: str = "auto") -> tuple[nn.Module, Tokenizer]:
    """Model (eval mode) and tokenizer of a checkpoint folder or run directory, ready to generate.

    dtype auto: bf16 on CUDA (decoding is bound by the bytes read per token), fp32 elsewhere (on CPUs without
    AMX, bf16 matmuls are slower; docs/BENCHMARKS.md).
    """
    from gptforge.checkpoint import load_checkpoint
    from gptforge.train import resolve_device

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GptforgeError(f"device {device!r} asked for but no CUDA device is available; use --device cpu (or auto)")
    dev = resolve_device(device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    if dtype not in dtypes:
        raise GptforgeError(f"unknown dtype {dtype!r}; use auto, {', '.join(dtypes)}")
    model, tokenizer, _ = load_checkpoint(path, device=dev)
    model = model.to(dtypes[dtype])
    return (decode_layout(model) if dev.type == "cpu" else model), tokenizer
