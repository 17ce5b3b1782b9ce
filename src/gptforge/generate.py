"""Text generation as a static batch: prefill in one forward, then one-token decode steps over a KV cache, every
row writing the same slot per step (CUDA-graph friendly); and the library's functions over it (generate,
stream, stream_batch, complete, generate_tokens, load).

The decode policy lives beside it, written once for this loop and BatchEngine's (engine.py): sampling.py
picks each row's next token (penalties, temperature, top-k/top-p/min-p, logprobs), text.py fits prompts and
turns ids into text (UTF-8-safe streaming, stop ids, stop strings); kvcache.py holds the cache. Every sampling
default is a field of SamplingParams, set once (config.py).

Batches are left-padded: every row writes its next token to the same cache slot, so one decode step has the
same shapes for the whole batch; each row's positions start at 0 at its first real token, and padded slots
are masked out of attention. Shapes: B batch, T prompt length (the longest), S cache length, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from gptforge.errors import GptforgeError
from gptforge.hardware import resolve_device
from gptforge.kvcache import KVCache, resolve_kv_dtype
from gptforge.loader import load_checkpoint
from gptforge.native import decode_layout
from gptforge.native.step import DecodeStep
from gptforge.sampling import SamplingParams, TokenPicker, exp_noise, generator, policy_groups, token_logprobs
from gptforge.settings import KV_DTYPE, LOAD_DEVICE, LOAD_DTYPE
from gptforge.text import TextRow, fit_prompts, prompt_ids, prompt_list, stop_ids
from gptforge.tokenizer import Tokenizer

__all__ = ["Completion", "KVCache", "SamplingParams", "Step", "complete", "decode_layout", "generate",
           "generate_steps", "generate_tokens", "load", "stream", "stream_batch"]


# --- the token loop ----------------------------------------------------------------------------------------
@dataclass
class Step:
    """One decode step of a batch: the chosen id per row (None once a row has finished)."""

    ids: list[int | None]
    logprobs: list[float | None] | None = None  # of the chosen ids, under the model's own distribution
    top: list[list[tuple[int, float]] | None] | None = None  # the most likely ids and their logprobs


def _decode_step(model: nn.Module, cache: KVCache, ids: torch.Tensor, pos: torch.Tensor, slot: torch.Tensor,
                 end: int | None = None) -> torch.Tensor:
    """Logits (B, V) of one new token per row: ids, pos (B, 1), written at cache slot (1,)."""
    cache.prepare(slot, None, end)
    return model(ids, pos, cache)[:, -1]


@functools.cache
def compiled_step(device_type: str) -> Callable[..., torch.Tensor]:
    """The decode step compiled for fixed shapes, one per device type: CUDA graphs on CUDA (torch.compile
    "reduce-overhead"), inductor's fused kernels elsewhere (CUDA graphs do not exist there)."""
    mode = "reduce-overhead" if device_type == "cuda" else "default"
    return torch.compile(_decode_step, mode=mode, fullgraph=True, dynamic=False)


def _prefill(model: nn.Module, prompts: list[list[int]], length: int, static: bool,
             kv_dtype: str = KV_DTYPE) -> tuple[KVCache, torch.Tensor]:
    """A cache of `length` slots per row (keys and values stored as kv_dtype) holding the prompts, left-padded to
    the longest (T), and the logits (B, V) of each prompt's last token. Each row's positions count from its
    first real token."""
    weight = next(model.parameters())
    device = weight.device
    B, T = len(prompts), max(len(p) for p in prompts)
    pad = torch.tensor([T - len(p) for p in prompts], device=device)  # (B,)
    idx = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)  # (B, T)
    cols = torch.arange(T, device=device)
    real = cols[None, :] >= pad[:, None]  # (B, T)
    pos = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
    cache = KVCache(model.config, B, length, device=device, dtype=weight.dtype, static=static,
                    kv_dtype=resolve_kv_dtype(model, kv_dtype))
    cache.prepare(cols, real, end=T)
    return cache, model(idx, pos, cache, last=torch.full((B,), T - 1, device=device))[:, 0]


@torch.no_grad()
def generate_steps(model: nn.Module, prompts: list[list[int]], params: SamplingParams, *, vocab_size: int,
                   stop_ids: tuple[int, ...] = (), finished: list[bool] | None = None,
                   compile: bool | None = None, kv_dtype: str = KV_DTYPE) -> Iterator[Step]:
    """Prefill the prompts (token ids) in one forward, then decode one token per row per step.

    A row finishes after any id in `stop_ids`; the caller may also finish rows by setting `finished[i]`
    (a list it passes in), which is how text-level stops end a row. Yields one Step per decode step until
    every row has finished, `max_new_tokens` are out, or the context (block_size) is full.

    compile: run the decode step with static shapes through torch.compile (CUDA graphs on CUDA). None: on
    CUDA only. On CPU the eager step on the native kernels (decode_layout) measured faster than the compiled
    one (the demo shape: 823 vs 756 tokens/s), and each new (batch, cache length) costs ~30 s of compilation
    on 2 cores (docs/BENCHMARKS.md).

    kv_dtype: how the KV cache stores keys and values (settings.KV_DTYPES; kvcache.KVCache): auto is the
    weights' dtype, bf16 for a quantized model computing in fp32 (kvcache.resolve_kv_dtype); bf16 or int8 take
    less memory at long context and batch, read back as the weights' dtype.
    """
    cfg = model.config
    prompts = fit_prompts(prompt_list(prompts), params, cfg.block_size)
    B, T = len(prompts), max(len(p) for p in prompts)
    max_new = min(params.max_new_tokens, cfg.block_size - T)  # positions never exceed the trained context
    finished = [False] * B if finished is None else finished
    if max_new <= 0 or all(finished):
        return
    device = next(model.parameters()).device
    static = device.type == "cuda" if compile is None else compile
    S = T + max_new
    if static:
        S = min(cfg.block_size, -(-S // 64) * 64)  # a few cache lengths, so a few graph captures, not one per call
    cache, logits = _prefill(model, prompts, S, static, kv_dtype)
    picker = TokenPicker(B, vocab_size, device)
    picker.start(0, prompts)
    groups = policy_groups([params] * B)  # one setting for every row
    gen = generator(params, device)  # one stream for the batch: its rows draw different numbers
    noise = lambda rows: exp_noise((len(rows), vocab_size), gen, device)  # noqa: E731
    step = compiled_step(device.type) if static else _decode_step
    # The whole eager step as one native call where the op covers the model (native/step.py), else its forward.
    whole = None if static else DecodeStep.of(model)
    if whole is not None and not whole.usable(cache, B):
        whole = None
    # CUDA: sync with the host only every few steps; the rows that finished in between just run on.
    sync_every = 8 if device.type == "cuda" else 1
    next_pos = torch.tensor([len(p) for p in prompts], device=device)[:, None]  # (B, 1)
    # the native step's positions, (max_new, B): a row per step, selected without an add inside the loop
    positions = (next_pos.T + torch.arange(max_new, device=device)[:, None]) if whole is not None else None
    slot_table = torch.arange(T, S, device=device)  # (S - T,): the cache slot of each decode step
    pending: list[tuple[torch.Tensor, ...]] = []
    for n in range(max_new):
        # Columns above the tokenizer's size are padding, never sampled. Each tensor op here costs 10-30 us on CPU
        # after the step has streamed the weights through the caches: skip the ones that would change nothing.
        if logits.shape[-1] != vocab_size:
            logits = logits[:, :vocab_size]
        if logits.dtype != torch.float32:
            logits = logits.float()
        ids = picker.pick(logits, groups, noise)  # (B,)
        pending.append((ids, *token_logprobs(logits, ids, (params,))))
        last = n == max_new - 1
        if len(pending) == sync_every or last:
            for host in [[t.tolist() for t in o] for o in pending]:  # one host transfer per block
                yield _step_out(host, finished, stop_ids, params)
                if all(finished):
                    return
            pending = []
        if last:
            return
        if whole is not None:  # the op writes slot T + n (end - 1), marks it and masks itself: no cache.prepare
            logits = whole(ids, positions[n], cache, None, T + n + 1)
            continue
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


def generate_tokens(model: nn.Module, prompt_ids: Sequence[int], *, vocab_size: int, stop_ids: tuple[int, ...] = (),
                    **options) -> Iterator[int]:
    """Yield the ids continuing one prompt (a list of token ids), the stop id included when one ends it.
    options are SamplingParams' fields, with its defaults (max_new_tokens, temperature, ...)."""
    for s in generate_steps(model, [prompt_ids], _params(options), vocab_size=vocab_size, stop_ids=stop_ids):
        yield s.ids[0]


# --- text ----------------------------------------------------------------------------------------------------
@dataclass
class Completion:
    """One prompt's result."""

    text: str
    token_ids: list[int]  # every id generated, the EOS or the one completing a stop string included
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens or the context is full)
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


def _run(model: nn.Module, tokenizer: Tokenizer, prompts: list, params: SamplingParams,
         results: list[Completion], compile: bool | None = None, kv_dtype: str = KV_DTYPE) -> Iterator[tuple[int, str]]:
    """Yield (row, text delta) as rows decode; fill `results` with one Completion per prompt."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    rows = [TextRow(tokenizer, params.stop) for _ in prompts]
    results[:] = [Completion("", [], "length", [] if params.logprobs else None,
                             [] if params.top_logprobs else None) for _ in prompts]
    finished = [False] * len(prompts)
    stops = stop_ids(tokenizer, params)
    steps = generate_steps(model, ids, params, vocab_size=tokenizer.vocab_size, stop_ids=stops, finished=finished,
                           compile=compile, kv_dtype=kv_dtype)
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
            delta, stopped = rows[r].take(i, stops)
            if stopped:
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


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str | Sequence[int], *, compile: bool | None = None,
           kv_dtype: str = KV_DTYPE, **options) -> Iterator[str]:
    """Yield the continuation of one `prompt` (text, or token ids) as text deltas, each valid UTF-8, as it is
    generated.

    options are the fields of SamplingParams (max_new_tokens, temperature, top_k, top_p, min_p, penalties,
    seed, stop, stop_at_eos, truncate_prompt), with its defaults. A stop string is never yielded, not even in part.
    kv_dtype: the KV cache's storage (generate_steps).
    """
    results: list[Completion] = []
    for _, delta in _run(model, tokenizer, [prompt], _params(options), results, compile, kv_dtype):
        yield delta


def stream_batch(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[str | Sequence[int]], *,
                 compile: bool | None = None, kv_dtype: str = KV_DTYPE, **options) -> Iterator[tuple[int, str]]:
    """Like `stream` for a list of prompts decoded together: yields (prompt index, text delta). A single string
    is refused (it is not a list of prompts; use `stream`)."""
    results: list[Completion] = []
    yield from _run(model, tokenizer, prompt_list(prompts), _params(options), results, compile, kv_dtype)


def complete(model: nn.Module, tokenizer: Tokenizer, prompts: str | Sequence[str | Sequence[int]], *,
             compile: bool | None = None, kv_dtype: str = KV_DTYPE, **options) -> Completion | list[Completion]:
    """Completions (text, ids, finish reason, logprobs when asked) of a list of prompts decoded as one batch:
    one Completion per prompt. A single string is one prompt, and gets one Completion (not a list)."""
    results: list[Completion] = []
    batch = [prompts] if isinstance(prompts, str) else prompt_list(prompts)
    for _ in _run(model, tokenizer, batch, _params(options), results, compile, kv_dtype):
        pass
    return results[0] if isinstance(prompts, str) else results


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str | Sequence[str | Sequence[int]],
             **options) -> str | list[str]:
    """The continuation of `prompt` (a string), or of each prompt of a list (strings or token-id lists),
    decoded as one batch: a string for a string, a list for a list."""
    if isinstance(prompt, str):
        return complete(model, tokenizer, prompt, **options).text
    return [c.text for c in complete(model, tokenizer, prompt, **options)]


# --- loading -----------------------------------------------------------------------------------------------
def load(path: str | Path, device: str = LOAD_DEVICE, dtype: str = LOAD_DTYPE) -> tuple[nn.Module, Tokenizer]:
    """Model (eval mode) and tokenizer of a checkpoint folder or run directory, ready to generate.

    dtype auto: bf16 on CUDA (decoding is bound by the bytes read per token), fp32 elsewhere (gptforge.loader).
    """
    dev = resolve_device(device)
    model, tokenizer, _ = load_checkpoint(path, device=dev, dtype=dtype)
    return (decode_layout(model) if dev.type == "cpu" else model), tokenizer
