"""A faster encoder for byte-level BPE tokenizers: the same ids through tiktoken's encoder.

A byte-level BPE (GPT-2's scheme, which `gptforge prepare` trains) is fully described by its split pattern, its
vocabulary as byte strings and the order of its merges. tiktoken takes exactly that (a regex and "mergeable ranks":
bytes -> rank) and encodes several times faster than HF `tokenizers`, releasing the GIL so that threads use every
core. nanochat trains with one library and encodes with tiktoken this way.

The two agree when a merge's rank is the id of the token it makes (HF merges the adjacent pair listed first;
tiktoken the adjacent pair whose concatenation has the lowest rank) and every multi-byte token is some merge's
result. `fast_encoder` checks that and everything else that shapes the ids (no normalizer, GPT-2's pre-tokenizer,
no dropout or byte fallback, special tokens matched anywhere), and returns None for any other tokenizer (a
SentencePiece one, say), whose callers keep HF `tokenizers`. `agrees` compares the two on a sample of real text.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

try:  # optional (the `prepare` extra)
    import tiktoken
except ImportError:
    tiktoken = None

from gptforge.tokenizer import Tokenizer

# GPT-2's split pattern: HF's ByteLevel(use_regex=True) and tiktoken's "gpt2" encoding both use it.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Byte-level BPE writes each byte as a printable character (GPT-2's table); this is its inverse."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


class FastEncoder:
    """Encodes like the Tokenizer it was built from (same ids, special tokens matched in the text as HF matches
    added tokens), with tiktoken, on `threads` threads."""

    def __init__(self, encoding, threads: int):
        self.encoding = encoding
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def encode(self, text: str) -> np.ndarray:
        """One text's ids as a uint32 array."""
        return self.encoding.encode_to_numpy(text, allowed_special="all")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Each text's ids, in order; the texts are spread over the threads, a run of them per task (a task per
        text would cost more in handing over than in encoding for short texts)."""
        if self._pool is None or len(texts) < 2:
            return [self.encode(t) for t in texts]
        runs = _runs(texts, self.threads * 4)
        return [ids for part in self._pool.map(self._encode_run, runs) for ids in part]

    def _encode_run(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _runs(texts: list[str], n: int) -> list[list[str]]:
    """texts in at most n consecutive runs of about equal characters."""
    target = max(1, sum(len(t) for t in texts) // n)
    runs, run, size = [], [], 0
    for t in texts:
        run.append(t)
        size += len(t)
        if size >= target:
            runs.append(run)
            run, size = [], 0
    return runs + ([run] if run else [])


def _why_not(spec: dict) -> str | None:
    """Why tiktoken could encode differently from this tokenizer.json, or None when it encodes identically."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if model.get("type") != "BPE":
        return f"model is {model.get('type')}, not BPE"
    if spec.get("normalizer") is not None:
        return "it has a normalizer"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return "its pre-tokenizer is not GPT-2's ByteLevel split"
    if model.get("dropout") or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return "its BPE uses dropout, byte fallback or subword affixes"
    added = [t["content"] for t in spec.get("added_tokens", [])]
    for t in spec.get("added_tokens", []):
        if t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return f"added token {t['content']!r} strips or matches whole words only"
    # HF matches added tokens longest first; tiktoken tries them in no set order: fine unless one holds another
    if any(a != b and a in b for a in added for b in added):
        return "one added token holds another"
    return None


def _ranks(spec: dict) -> dict[bytes, int] | None:
    """The mergeable ranks (token bytes -> id) when merge order is id order and every multi-byte token is made by
    a merge; else None."""
    to_byte = _unicode_to_byte()
    added = {t["content"] for t in spec.get("added_tokens", [])}
    vocab = {tok: i for tok, i in spec["model"]["vocab"].items() if tok not in added}
    try:
        ranks = {bytes(to_byte[c] for c in tok): i for tok, i in vocab.items()}
    except KeyError:  # a character outside the byte alphabet: not a byte-level vocabulary
        return None
    if len(ranks) != len(vocab) or sum(len(b) == 1 for b in ranks) != 256:
        return None
    made, last = set(), -1
    for merge in spec["model"]["merges"]:
        a, b = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank = vocab.get(a + b)
        if rank is None or rank <= last or a not in vocab or b not in vocab:
            return None
        made.add(rank)
        last = rank
    if made != {i for tok, i in ranks.items() if len(tok) > 1}:
        return None
    return ranks


def fast_encoder(tok: Tokenizer, threads: int | None = None) -> FastEncoder | None:
    """A FastEncoder equal to `tok` by construction, or None (tiktoken missing, or a tokenizer whose ids tiktoken
    cannot reproduce). `threads` defaults to every core this process may run on."""
    if tiktoken is None or not hasattr(tiktoken.Encoding, "encode_to_numpy"):  # tiktoken < 0.8
        return None
    spec = json.loads(tok.hf.to_str())
    if _why_not(spec) is not None:
        return None
    ranks = _ranks(spec)
    if ranks is None:
        return None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    if set(specials.values()) & set(ranks.values()):
        return None
    encoding = tiktoken.Encoding(f"gptforge-{tok.fingerprint}", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens=specials)
    return FastEncoder(encoding, threads or _cores())


def _cores() -> int:
    """The cores this process may run on (taskset, cgroup cpusets), where the OS says; else every core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def agrees(tok: Tokenizer, fast: FastEncoder, texts: list[str]) -> bool:
    """Do `tok` (HF tokenizers) and `fast` give the same ids for every text?"""
    return all(fast.encode(t).tolist() == ids for t, ids in zip(texts, tok.encode_batch(texts)))
