"""The decode policy's choice of each next token, written once for both schedules (the static batch of
generate.py and the continuous BatchEngine of engine.py): penalties, temperature, top-k, top-p, min-p, a
draw, and the log-probabilities reported with it. Every row carries its own SamplingParams; rows whose
settings are equal are processed as one (n, V) batch.

Every function here works on (B, V) fp32 logits with tensor ops only, so a CUDA decode loop runs without
waiting for the host (no .item(), no data-dependent Python branches).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from gptforge.settings import SamplingParams

__all__ = ["Constraint", "SamplingParams", "TokenPicker", "apply_penalties", "apply_token_bitmask", "exp_noise",
           "generator", "min_p_filter", "policy_groups", "sample", "sampling_probs", "token_logprobs", "top_k_filter",
           "top_p_filter"]

# Exp(1) draws (len(rows), V) for the given rows of a step: the static batch draws them from one stream,
# BatchEngine from each row's own.
Noise = Callable[[list[int]], torch.Tensor]


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


def sample(logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next ids (B,) from processed logits: greedy at temperature 0, else temperature, top-k, top-p, min-p and
    a draw with Exp(1) `noise` (B, V), drawn from `gen` when not given."""
    if p.temperature == 0:
        return logits.argmax(dim=-1)
    probs = sampling_probs(logits, p)
    if noise is None:
        noise = exp_noise(probs.shape, gen, probs.device)
    # argmax(probs / E) with E ~ Exp(1) draws from probs (the exponential race, as in gpt-fast): unlike
    # torch.multinomial it never synchronises with the host.
    return (probs / noise).argmax(dim=-1)


def exp_noise(shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Exp(1) draws as -log(U), U ~ U[0, 1): the same distribution as Tensor.exponential_, which measured ~5x
    slower on CPU (210 vs 42 us per 4096-vocab row, the largest cost of a sampled batch step). U = 0 gives
    +inf, whose token then scores 0: never a NaN, never a pick of a zero-probability token."""
    return torch.rand(shape, generator=gen, device=device).log_().neg_()


def generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """The random stream of one sequence or batch (None when greedy): seeded, or from fresh OS entropy."""
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def policy_groups(params: Sequence[SamplingParams]) -> list[tuple[SamplingParams, list[int]]]:
    """The rows (indices into `params`) of each distinct sampling setting, with that setting."""
    groups: dict[tuple, tuple[SamplingParams, list[int]]] = {}
    for r, p in enumerate(params):
        groups.setdefault(p.policy, (p, []))[1].append(r)
    return list(groups.values())


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor,
                   params: Sequence[SamplingParams]) -> tuple[torch.Tensor, ...]:
    """What the rows asked to see of the model's own distribution (before penalties and filters): () if no row
    asks; else the logprob of each chosen id (B,), and, if a row asks for alternatives, the top values and ids
    (B, k) for the largest k asked (each row keeps its own first k)."""
    k = max(p.top_logprobs for p in params)
    if not (k or any(p.logprobs for p in params)):
        return ()
    logp = logits.log_softmax(dim=-1)
    out: tuple[torch.Tensor, ...] = (logp.gather(1, ids[:, None])[:, 0],)
    if k:
        out += tuple(torch.topk(logp, min(k, logits.shape[-1]), dim=-1))
    return out


class Constraint(Protocol):
    """A grammar that a row's tokens must follow (serve/grammar.py's llguidance matcher is the one in use): the
    schedule asks it for the ids allowed next before each pick and tells it the id picked."""

    def fill_mask(self, out: torch.Tensor) -> None:
        """Write the ids allowed next into `out`, (ceil(V / 32),) int32: bit i % 32 of word i // 32."""

    def advance(self, token: int) -> None:
        """The row took `token` (always one the last mask allowed)."""

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows no further token: the row ends here."""


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits (k, V) with -inf where `bitmask` (k, ceil(V / 32)) int32, in host memory, has a 0 bit (bit i % 32
    of word i // 32). NumPy unpacks the bits (little-endian words: byte order is bit order): ~5x faster than
    shifting them out with tensor ops (11 vs 76 us for one row of 4096)."""
    V = logits.shape[-1]
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=-1, count=V, bitorder="little")  # (k, V)
    return logits.masked_fill(torch.from_numpy(bits == 0).to(logits.device), float("-inf"))


class TokenPicker:
    """The per-row state of the policy (generated-token counts and seen tokens, for the penalties) of up to
    `rows` rows, and the choice of their next tokens. Both schedules keep one: the static batch for its B
    rows, BatchEngine for its max_batch rows (moving a row's state with `move` when rows are compacted)."""

    def __init__(self, rows: int, vocab: int, device: torch.device):
        self.counts = torch.zeros(rows, vocab, device=device)  # generated ids, for presence/frequency penalties
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool, device=device)  # prompt + generated: repetition
        # Rows with a Constraint write their allowed ids here before a pick (host memory: the grammar library
        # writes it); refilled at every step, so `move` leaves it alone.
        self.bitmask = torch.zeros(rows, (vocab + 31) // 32, dtype=torch.int32)

    def start(self, first: int, prompts: Sequence[Sequence[int]]) -> None:
        """Rows first.. begin new sequences with these prompts."""
        rows = slice(first, first + len(prompts))
        self.counts[rows] = 0
        self.seen[rows] = False
        for r, ids in enumerate(prompts, start=first):
            self.seen[r, list(ids)] = True

    def move(self, src: int, dst: int) -> None:
        """Row src's state becomes row dst's."""
        self.counts[dst] = self.counts[src]
        self.seen[dst] = self.seen[src]

    def pick(self, logits: torch.Tensor, groups: list[tuple[SamplingParams, list[int]]], noise: Noise,
             masked: Sequence[int] = ()) -> torch.Tensor:
        """Next ids (n,) of rows 0..n-1 from their fp32 logits (n, V); `groups` (policy_groups) gives each row's
        settings; the rows in `masked` draw only among the ids their `bitmask` row allows (a copy of the logits
        is masked: the caller's stay the model's, for the logprobs). A penalty's bookkeeping runs only while
        some row has a penalty on (the demo model decoded 7% faster without it)."""
        n = logits.shape[0]
        if len(masked) == n:  # every row constrained: no gather, no scatter
            logits = apply_token_bitmask(logits, self.bitmask[:n])
        elif masked:
            rows = torch.tensor(masked, device=logits.device)
            logits = logits.index_put((rows,), apply_token_bitmask(logits[rows], self.bitmask[list(masked)]))
        counts, seen = (self.counts, self.seen) if n == self.counts.shape[0] else (self.counts[:n], self.seen[:n])
        if len(groups) == 1:  # the static batch always, BatchEngine often: no gather, no scatter
            p, rows = groups[0]
            ids = sample(apply_penalties(logits, counts, seen, p), p, None, _noise(p, rows, noise))
        else:
            ids = torch.empty(n, dtype=torch.long, device=logits.device)
            for p, rows in groups:
                sel = torch.tensor(rows, device=logits.device)
                lg = apply_penalties(logits[sel], counts[sel], seen[sel], p)
                ids[sel] = sample(lg, p, None, _noise(p, rows, noise))
        if any(p.penalized for p, _ in groups):
            counts.scatter_add_(1, ids[:, None], torch.ones_like(counts[:, :1]))
            seen.scatter_(1, ids[:, None], True)
        return ids


def _noise(p: SamplingParams, rows: list[int], noise: Noise) -> torch.Tensor | None:
    return None if p.temperature == 0 else noise(rows)
