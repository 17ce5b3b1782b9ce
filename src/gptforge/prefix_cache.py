"""Automatic prefix caching: the keys and values of prompt blocks already computed, reused by later prompts.

A shared system prompt, few-shot examples, or a chat resent whole each turn make most of a prompt's prefill a
recomputation. BatchEngine keeps the keys and values of every full block of BLOCK tokens it has computed
here; a new prompt whose first blocks are the same tokens gets them copied into its cache row, and only the
rest is prefilled (vLLM's automatic prefix caching, Kwon et al. 2023; SGLang's RadixAttention, Zheng et al.
2024, share the idea at other granularities).

Content-addressed by a chain: block i's key is (the id of block i-1's entry, block i's tokens), so a key stands
for every token before it too, and a dict lookup compares the tokens themselves: two prompts share an entry
only when they share the whole prefix, never by a hash collision. Bounded by an LRU in tokens: a lookup
refreshes its chain last block first, and only blocks that no other block continues are evicted, so a chain
loses its tail before its head and never keeps an unreachable block.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

import torch

from gptforge.kvcache import KVCache

BLOCK = 16  # tokens per block: a hit is a whole number of blocks


@dataclass(eq=False)
class _Entry:
    id: int
    key: tuple  # (the parent entry's id, or the root; this block's tokens)
    parts: list[torch.Tensor]  # KVCache.span of the block: (L, K, BLOCK, Hd) keys, values (and int8 scales)
    parent: _Entry | None
    children: int = 0  # entries whose parent this is: while > 0 it is not evicted


class PrefixCache:
    """The blocks of keys and values of prompts seen, at most `max_tokens` tokens of them (LRU)."""

    def __init__(self, max_tokens: int):
        self.capacity = max_tokens // BLOCK
        self.blocks: collections.OrderedDict[tuple, _Entry] = collections.OrderedDict()  # oldest first
        self._ids = itertools.count()
        self.hit_tokens = 0  # tokens handed out by lookups, in all

    @property
    def tokens(self) -> int:
        return len(self.blocks) * BLOCK

    def _chain(self, tokens: list[int], limit: int, root) -> list[_Entry]:
        """The cached entries of tokens' first blocks, up to `limit` tokens: the longest cached prefix."""
        out, parent = [], root
        for b in range(min(limit, len(tokens)) // BLOCK):
            e = self.blocks.get((parent, tuple(tokens[b * BLOCK: (b + 1) * BLOCK])))
            if e is None:
                break
            out.append(e)
            parent = e.id
        return out

    def _touch(self, chain: list[_Entry]) -> None:
        for e in reversed(chain):  # the head last: the most recently used, so evicted after its tail
            self.blocks.move_to_end(e.key)

    # `root` starts a chain: None, or a name (a string: never an entry's int id) for keys and values that
    # depend on more than the tokens, such as a LoRA adapter chosen per request.
    def match(self, tokens: list[int], limit: int, root=None) -> int:
        """How many of tokens' first tokens (at most `limit`) a lookup would find, without using them."""
        return len(self._chain(tokens, limit, root)) * BLOCK

    def lookup(self, tokens: list[int], limit: int, root=None) -> list[torch.Tensor] | None:
        """The cached keys and values of tokens' longest cached prefix of at most `limit` tokens, as
        KVCache.span's tensors (L, K, n, Hd) with n a multiple of BLOCK; None when not even one block is."""
        chain = self._chain(tokens, limit, root)
        if not chain:
            return None
        self._touch(chain)
        self.hit_tokens += len(chain) * BLOCK
        return [torch.cat(ps, dim=2) for ps in zip(*(e.parts for e in chain))]

    def insert(self, tokens: list[int], cache: KVCache, row: int, root=None) -> None:
        """Keep the keys and values of tokens' full blocks, which row `row` of `cache` holds at slots
        0..len(tokens)-1: those not cached yet are copied out (as many as the bound allows)."""
        full = len(tokens) // BLOCK
        chain = self._chain(tokens, full * BLOCK, root)
        self._touch(chain)
        new = min(full, self.capacity) - len(chain)
        if new <= 0:
            return
        while len(self.blocks) + new > self.capacity:
            self._evict_one(chain)
        first = len(chain)
        parts = cache.span(row, first * BLOCK, (first + new) * BLOCK)  # (L, K, new * BLOCK, Hd) per buffer
        parent = chain[-1] if chain else None
        for b in range(first, first + new):
            key = (root if parent is None else parent.id, tuple(tokens[b * BLOCK: (b + 1) * BLOCK]))
            at = slice((b - first) * BLOCK, (b - first + 1) * BLOCK)
            e = _Entry(next(self._ids), key, [p[:, :, at].clone() for p in parts], parent)
            self.blocks[key] = e
            if parent is not None:
                parent.children += 1
            parent = e

    def _evict_one(self, keep: list[_Entry]) -> None:
        """Drop the least recently used block that no other block continues (never one of `keep`)."""
        keep_ids = {e.id for e in keep}
        for key, e in self.blocks.items():
            if e.children == 0 and e.id not in keep_ids:
                break
        else:  # unreachable while capacity >= len(keep) + 1: an entry outside `keep` always has a leaf below it
            raise RuntimeError("prefix cache: nothing evictable")
        del self.blocks[key]
        if e.parent is not None:
            e.parent.children -= 1
