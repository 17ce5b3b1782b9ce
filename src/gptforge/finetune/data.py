"""Chat and classification JSONL as data sources for the one training loop.

`train(cfg, source=...)` reads batches from `source.samplers(...)` exactly as it reads token shards through
data.BatchSampler: `batch(k)` depends only on (seed, k), so runs are reproducible. A batch is (x, y) with y the
targets (-100 where nothing is learned); x is a small tensor bundle with a `.to(device)` (PackedBatch,
ClassifyBatch) that the matching loss in run.py unpacks.

Chat: each conversation becomes ids and an assistant mask (Tokenizer.encode_chat: the model's own chat template,
rendered as transformers renders it, the mask exact for any template); targets are the next token where that
token is assistant-written, else -100. Short conversations are packed, in order, into rows
of seq_len tokens; each token carries its conversation's id (`doc`) and its position within it (`pos`), so
the model attends only within a conversation and positions restart at 0 (no cross-contamination; see
Krell et al. 2021, "Efficient Sequence Packing without Cross-contamination").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.data import read_jsonl
from gptforge.errors import GptforgeError
from gptforge.tokenizer import Tokenizer

IGNORE_INDEX = -100


def split_records(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random split; at least one record each side when there are two or more."""
    if not 0.0 <= val_fraction < 1.0:
        raise GptforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(records))
    n_val = min(len(records) - 1, max(1, round(val_fraction * len(records)))) if val_fraction > 0 else 0
    val = sorted(order[:n_val].tolist())
    train = sorted(order[n_val:].tolist())
    return [records[i] for i in train], [records[i] for i in val]


class EpochSampler:
    """Batch k of `batch_size` items out of `n`: item j = k*batch_size + i is item perm_e[j mod n] of epoch
    e = j // n, with perm_e a permutation seeded by (seed, e). Every item is seen once per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int, make):
        self.n, self.batch_size, self.seed, self.make = n, batch_size, seed, make
        self.position = 0
        self._perms: dict[int, np.ndarray] = {}

    def indices(self, k: int) -> list[int]:
        out = []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            e = j // self.n
            if e not in self._perms:
                self._perms = {e: np.random.default_rng([self.seed, e]).permutation(self.n)}
            out.append(int(self._perms[e][j % self.n]))
        return out

    def batch(self, k: int):
        return self.make(self.indices(k))

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "position": self.position, "batch_size": self.batch_size, "seq_len": 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed, self.position = state["seed"], state["position"]


# --- chat ---------------------------------------------------------------------------------------------------

@dataclass
class PackedBatch:
    """Token ids, per-token positions and per-token conversation ids, each (B, T) int64."""

    idx: torch.Tensor
    pos: torch.Tensor
    doc: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        return PackedBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.idx, self.pos, self.doc)))


def chat_example(tokenizer: Tokenizer, messages: Any, where: str, tools: Any = None) -> tuple[list[int], list[int]]:
    """Inputs and targets of one conversation: targets[i] = ids[i+1] where ids[i+1] is assistant-written.
    `tools` (the record's JSON schemas, as OpenAI's fine-tuning format carries them) go to the template."""
    if not isinstance(messages, list):
        raise GptforgeError(f"{where}: \"messages\" must be a list of {{\"role\", \"content\"}} objects")
    try:
        ids, mask = tokenizer.encode_chat(messages, tools=tools)
    except GptforgeError as e:
        raise GptforgeError(f"{where}: {e}") from None
    if not any(mask):
        raise GptforgeError(f"{where}: the conversation has no assistant message, so nothing to learn from")
    targets = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return ids[:-1], targets


def read_chat(path: str | Path, tokenizer: Tokenizer) -> list[tuple[str, list[int], list[int]]]:
    """(file:line, inputs, targets) per conversation of an OpenAI-style chat JSONL."""
    out = []
    for lineno, rec in read_jsonl(path, "chat data"):
        where = f"{path}:{lineno}"
        if "messages" not in rec:
            raise GptforgeError(f"{where}: no \"messages\" field; each line is {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}")
        out.append((where, *chat_example(tokenizer, rec["messages"], where, rec.get("tools"))))
    return out


def pack(examples: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """Pack examples in order into rows of seq_len tokens (first fit on the current row; an example longer
    than seq_len is cut to its first seq_len tokens). Returns idx, targets, pos, doc arrays (rows, seq_len).

    Padding tokens form their own document (id -1): they attend only to each other and have no targets.
    """
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for ids, tgt in examples:
        ids, tgt = ids[:seq_len], tgt[:seq_len]
        if used + len(ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, tgt))
        used += len(ids)
    n = len(rows)
    idx = np.full((n, seq_len), pad_id, dtype=np.int64)
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((n, seq_len), dtype=np.int64)
    doc = np.full((n, seq_len), -1, dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for d, (ids, tgt) in enumerate(row):
            k = len(ids)
            idx[r, at:at + k], targets[r, at:at + k] = ids, tgt
            pos[r, at:at + k], doc[r, at:at + k] = np.arange(k), d
            at += k
        pos[r, at:] = np.arange(seq_len - at)
    return idx, targets, pos, doc


class _JsonlSource:
    """What train() reads of a data source, for the JSONL ones: the tokenizer and its fingerprint, and a train
    and a val sampler (None for an empty split) over the batches a subclass's `_batches` makes."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.fingerprint = tokenizer.fingerprint
        self.splits: dict[str, list] = {}

    def tokenizer(self) -> Tokenizer:
        return self.tok

    def _batches(self, split: str, seq_len: int):
        """(number of items, make(rows) -> (x, y)) of one split."""
        raise NotImplementedError

    def samplers(self, batch_size: int, seq_len: int, seed: int, eval_seed: int):
        out = []
        for split, s in (("train", seed), ("val", eval_seed)):
            if self.splits[split]:
                n, make = self._batches(split, seq_len)
                out.append(EpochSampler(n, batch_size, s, make))
            else:
                out.append(None)
        return tuple(out)


class ChatData(_JsonlSource):
    """A chat JSONL (train, and val from --val-data or a held-out fraction) as a source for train()."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, *, val_path: str | Path | None = None,
                 val_fraction: float = 0.1, seed: int = 0):
        super().__init__(tokenizer)
        train = read_chat(path, tokenizer)
        if val_path is not None:
            val = read_chat(val_path, tokenizer)
        else:
            train, val = split_records(train, val_fraction, seed)
        self.splits = {"train": train, "val": val}

    def packed(self, split: str, seq_len: int) -> tuple[np.ndarray, ...]:
        examples = [(i, t) for _, i, t in self.splits[split]]
        return pack(examples, seq_len, self.tok.eos_id)

    def _batches(self, split: str, seq_len: int):
        arrays = [torch.from_numpy(a) for a in self.packed(split, seq_len)]

        def make(rows):
            idx, tgt, pos, doc = (t[rows] for t in arrays)
            return PackedBatch(idx, pos, doc), tgt

        return len(arrays[0]), make


# --- classification -----------------------------------------------------------------------------------------

@dataclass
class ClassifyBatch:
    """Right-padded token ids (B, T) and the index of each row's last real token (B,)."""

    idx: torch.Tensor
    last: torch.Tensor

    def to(self, device, non_blocking: bool = False) -> ClassifyBatch:
        return ClassifyBatch(self.idx.to(device, non_blocking=non_blocking), self.last.to(device, non_blocking=non_blocking))


def encode_text(tokenizer: Tokenizer, text: str, seq_len: int) -> list[int]:
    """The text's ids, cut to seq_len - 1, then EOS: the head reads the state at that closing EOS, which has
    seen the whole text (GPT-1's "extract" token, Radford et al. 2018)."""
    return tokenizer.encode(text)[:seq_len - 1] + [tokenizer.eos_id]


def collate(rows: list[list[int]], pad_id: int) -> ClassifyBatch:
    t = max(len(r) for r in rows)
    idx = torch.full((len(rows), t), pad_id, dtype=torch.int64)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r)
    return ClassifyBatch(idx, torch.tensor([len(r) - 1 for r in rows]))


def read_labelled(path: str | Path, labels: list[str] | None = None) -> tuple[list[tuple[str, str, str | None]], list[str]]:
    """(file:line, text, label or None) per line of a {"text", "label"} JSONL, and the sorted label set.

    With `labels` (the training set's), a label outside it is an error naming file:line."""
    out = []
    for lineno, rec in read_jsonl(path, "classification data"):
        where = f"{path}:{lineno}"
        if not isinstance(rec.get("text"), str):
            raise GptforgeError(f"{where}: needs a string \"text\" field")
        label = rec.get("label")
        if label is not None:
            if not isinstance(label, (str, int)) or isinstance(label, bool):
                raise GptforgeError(f"{where}: \"label\" must be a string or an integer, got {label!r}")
            label = str(label)
            if labels is not None and label not in labels:
                raise GptforgeError(f"{where}: label {label!r} was not seen in training; known labels: {', '.join(labels)}")
        out.append((where, rec["text"], label))
    found = sorted({lab for _, _, lab in out if lab is not None})
    return out, (labels if labels is not None else found)


class ClassifyData(_JsonlSource):
    """Labelled text JSONL as a source for train(): x a ClassifyBatch, y the label ids (B,)."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, *, val_path: str | Path | None = None,
                 val_fraction: float = 0.1, seed: int = 0):
        super().__init__(tokenizer)
        records, labels = read_labelled(path)
        missing = [w for w, _, lab in records if lab is None]
        if missing:
            raise GptforgeError(f"{missing[0]}: no \"label\" field; training needs one on every line")
        if len(labels) < 2:
            raise GptforgeError(f"{path}: {len(labels)} distinct label(s); classification needs at least 2")
        self.labels = labels
        if val_path is not None:
            val, _ = read_labelled(val_path, labels)
            if any(lab is None for _, _, lab in val):
                raise GptforgeError(f"{val_path}: every validation line needs a \"label\"")
            self.splits = {"train": records, "val": val}
        else:
            train, val = split_records(records, val_fraction, seed)
            self.splits = {"train": train, "val": val}

    def examples(self, split: str, seq_len: int) -> tuple[list[list[int]], list[int]]:
        recs = self.splits[split]
        return ([encode_text(self.tok, t, seq_len) for _, t, _ in recs], [self.labels.index(lab) for _, _, lab in recs])

    def _batches(self, split: str, seq_len: int):
        ids, ys = self.examples(split, seq_len)

        def make(rows):
            return collate([ids[r] for r in rows], self.tok.eos_id), torch.tensor([ys[r] for r in rows])

        return len(ids), make


def eval_batches_for(n_items: int, batch_size: int) -> int:
    return max(1, math.ceil(n_items / batch_size))
