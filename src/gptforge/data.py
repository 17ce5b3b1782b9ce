"""Corpus -> token shards, and the memory-mapped reader and batch sampler that training reads them with.

A prepared directory holds `meta.json` (format version, dtype, token counts, tokenizer fingerprint, shards),
`tokenizer.json`, and raw little-endian token files `train_00000.bin`, `val_00000.bin`, ... Each document
is followed by the EOS token, so documents never run into each other unmarked.
"""

from __future__ import annotations

import fnmatch
import glob as globlib
import gzip
import io
import json
import os
import re
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # optional (the `zstd` extra): .zst inputs
    import zstandard
except ImportError:
    zstandard = None

from gptforge.corpora import CORPORA, Document, load_corpus
from gptforge.errors import GptforgeError, not_one_string
from gptforge.outputs import check_out, staged
from gptforge.settings import PrepareConfig
from gptforge.tokenizer import Tokenizer

FORMAT = "gptforge.tokens"
FORMAT_VERSION = 1
META_FILE = "meta.json"


# --- reading sources ------------------------------------------------------------------------------------

# What a folder contributes without --include: text, JSONL and parquet files, and compressed text and JSONL.
COMPRESSED = (".gz", ".zst")
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".jsonl"}
FOLDER_SUFFIXES = TEXT_SUFFIXES | {".parquet"} | {s + c for s in TEXT_SUFFIXES for c in COMPRESSED}
STDIN = "-"
_CORRUPT = (OSError, EOFError, zlib.error) + ((zstandard.ZstdError,) if zstandard is not None else ())


def _kind(path: Path) -> tuple[str, str]:
    """(format, compression) of a file by its name: format is "jsonl", "parquet" or "text"; compression is
    ".gz", ".zst" or ""."""
    suffixes = path.suffixes[-2:] or [""]
    compression = suffixes[-1] if suffixes[-1] in COMPRESSED else ""
    inner = suffixes[-2] if compression and len(suffixes) == 2 else ("" if compression else suffixes[-1])
    return {".jsonl": "jsonl", ".parquet": "parquet"}.get(inner, "text"), compression


def _open_binary(path: Path, compression: str) -> io.BufferedIOBase:
    """A binary stream of the file's bytes, decompressed as it is read (never the whole file in memory)."""
    if compression == ".gz":
        return gzip.open(path, "rb")
    if compression == ".zst":
        if zstandard is None:
            raise GptforgeError(f"{path}: reading .zst files needs the zstandard package: pip install 'gptforge[zstd]'")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True))
    return open(path, "rb")


def _decoded_lines(stream: io.BufferedIOBase, name: str, warnings: list[str]) -> Iterator[str]:
    """The stream's lines as UTF-8 text. Invalid bytes become U+FFFD (the replacement character), always, and
    the file is named in a warning with the count: a corpus is rarely worth refusing for a few bad bytes, but it
    is worth knowing. (A newline byte is never inside a UTF-8 sequence, so decoding by line equals decoding the
    whole file.)"""
    bad = 0
    for raw in stream:
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            bad += line.count("\ufffd") - raw.count("\ufffd".encode())
            yield line
    if bad:
        warnings.append(f"{name}: not valid UTF-8; {bad} invalid byte sequence(s) replaced with U+FFFD")


def _json_lines(lines: Iterator[str], name: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; a line that is not JSON is an error naming file:line."""
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise GptforgeError(f"{name}:{lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove the line") from None


def _read_jsonl(lines: Iterator[str], name: str, text_field: str) -> Iterator[Document]:
    """One document per line, read a line at a time (a JSONL file may be larger than memory)."""
    for lineno, record in _json_lines(lines, name):
        if not isinstance(record, dict) or text_field not in record:
            raise GptforgeError(f"{name}:{lineno}: no {text_field!r} field; choose the field with --text-field")
        if not isinstance(record[text_field], str):
            raise GptforgeError(f"{name}:{lineno}: field {text_field!r} is not a string")
        yield Document(f"{name}:{lineno}", record[text_field])


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    """One document per row of the `text_field` column, a row group at a time (iter_batches), so a shard is never
    whole in memory. A null is an empty document (left out and counted like an empty file)."""
    # pyarrow is optional (the `parquet` extra) and slow to import (0.5 s), so only a parquet source loads it
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError:
        raise GptforgeError(f"{path}: reading parquet needs pyarrow: pip install 'gptforge[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as e:
        raise GptforgeError(f"{path}: not a readable parquet file ({e})") from None
    columns = pf.schema_arrow.names
    if text_field not in columns:
        raise GptforgeError(f"{path}: no column {text_field!r}; columns: {', '.join(columns)}; choose one with --text-field")
    kind = pf.schema_arrow.field(text_field).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise GptforgeError(f"{path}: column {text_field!r} holds {kind}, not text; choose another with --text-field ({', '.join(columns)})")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            yield Document(f"{path}:{row}", text or "")
            row += 1


def _read_file(path: Path, text_field: str, warnings: list[str]) -> Iterator[Document]:
    """A file's documents by its format: JSONL and parquet a record each, anything else one document; .gz and
    .zst files are decompressed as they are read. A corrupt compressed file is an error naming it."""
    fmt, compression = _kind(path)
    if fmt == "parquet":
        yield from _read_parquet(path, text_field)
        return
    try:
        with _open_binary(path, compression) as stream:
            lines = _decoded_lines(stream, str(path), warnings)
            if fmt == "jsonl":
                yield from _read_jsonl(lines, str(path), text_field)
            else:
                yield Document(str(path), "".join(lines))
    except _CORRUPT as e:
        what = {".gz": "gzip", ".zst": "zstandard"}.get(compression, "readable")
        raise GptforgeError(f"{path}: not a valid {what} file ({e}); re-create or remove it") from None


def _read_stdin(warnings: list[str]) -> Iterator[Document]:
    """`-`: standard input as one text document (its bytes when it has them, so bad UTF-8 is counted)."""
    stream = getattr(sys.stdin, "buffer", None)
    text = "".join(_decoded_lines(stream, "<stdin>", warnings)) if stream is not None else sys.stdin.read()
    yield Document("<stdin>", text)


def _wanted(rel: Path, include: tuple[str, ...] | list[str] | None) -> bool:
    """Does a folder contribute this file? Not when hidden; with --include patterns, when one matches its name (or,
    for a pattern with a '/', its path below the folder); else when it has a known suffix."""
    if any(part.startswith(".") for part in rel.parts):
        return False
    if include:
        return any(fnmatch.fnmatch(rel.as_posix() if "/" in pat else rel.name, pat) for pat in include)
    return rel.name.endswith(tuple(FOLDER_SUFFIXES))


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, dict]]:
    """(line number, record) of every non-blank line of a JSONL file of objects (chat and classification data,
    benchmark tasks); a bad line is an error naming file:line. `what` names the file in the not-found error."""
    p = Path(path)
    if not p.is_file():
        raise GptforgeError(f"{what} file not found: {p}")
    out = []
    with open(p, encoding="utf-8", errors="replace") as f:
        for lineno, rec in _json_lines(f, str(p)):
            if not isinstance(rec, dict):
                raise GptforgeError(f"{p}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            out.append((lineno, rec))
    if not out:
        raise GptforgeError(f"{p} holds no records")
    return out


def iter_source(source: str, text_field: str, warnings: list[str],
                include: tuple[str, ...] | list[str] | None = None) -> Iterator[Document]:
    """The documents of one source (a file, folder, glob, JSONL or parquet file, `-` for standard input, or a
    bundled corpus name), read lazily, one file at a time. `include`: fnmatch patterns choosing a folder's files
    (default: FOLDER_SUFFIXES). A source that does not exist (or matches no files) is an error here, before any
    reading."""
    path = Path(source)
    if source == STDIN:
        return _read_stdin(warnings)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _wanted(p.relative_to(path), include))
        if not files:
            if include:
                raise GptforgeError(f"folder {path} holds no files matching --include {' '.join(include)}")
            raise GptforgeError(f"folder {path} holds no text files ({', '.join(sorted(FOLDER_SUFFIXES))}); "
                                "choose others with --include PATTERN")
    elif any(c in source for c in "*?["):
        files = sorted(Path(m) for m in globlib.glob(source, recursive=True) if Path(m).is_file())
        if not files:
            raise GptforgeError(f"glob {source!r} matches no files")
    elif source in CORPORA:
        return iter(load_corpus(source))
    else:
        raise GptforgeError(f"source not found: {source!r} is neither a file, a folder, a glob, nor a bundled corpus ({', '.join(CORPORA)})")
    return (doc for f in files for doc in _read_file(f, text_field, warnings))


def read_sources(sources: list[str], text_field: str = "text",
                 include: tuple[str, ...] | list[str] | None = None) -> tuple[list[Document], list[str]]:
    """Documents from files, folders (files found recursively), globs, JSONL, parquet, `-` (stdin) and bundled
    corpus names.

    A text file is one document; a JSONL line or parquet row is one document (its `text_field`); .gz and .zst
    files are read through decompression; a bundled corpus names its own documents. `include` chooses a folder's
    files by fnmatch pattern. Returns the documents and warnings (files with invalid UTF-8).
    """
    docs, warnings, _ = _read_sources(sources, text_field, include)
    return docs, warnings


def _read_sources(sources: list[str], text_field: str,
                  include: tuple[str, ...] | list[str] | None = None) -> tuple[list[Document], list[str], int]:
    """read_sources, and how many empty documents it left out (named in a warning, counted in the summary)."""
    not_one_string(sources, "sources")
    if not sources:
        raise GptforgeError("no sources given: name files, folders, globs, JSONL or parquet files, - (stdin) or a bundled corpus (e.g. shakespeare)")
    docs: list[Document] = []
    warnings: list[str] = []
    for source in sources:
        docs.extend(iter_source(source, text_field, warnings, include))
    empty = [d.name for d in docs if not d.text]
    docs = [d for d in docs if d.text]
    if not docs:
        raise GptforgeError(f"empty corpus: the sources {sources} hold no text")
    if empty:
        warnings.append(f"{len(empty)} empty document(s) left out: {', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}")
    return docs, warnings, len(empty)


# --- splitting and tokenizing ---------------------------------------------------------------------------

def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: the same documents and seed always give the same split.

    At least one document goes to each split when val_fraction > 0. A corpus of a single document is first
    cut at blank lines into about 100 pieces, so that it can still be split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise GptforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return docs, []
    if len(docs) == 1:
        docs = _cut_at_blank_lines(docs[0], pieces=100)
        if len(docs) < 2:
            raise GptforgeError(f"{docs[0].name}: one document without blank lines cannot be split; add more documents or use --val-fraction 0")
    n_val = min(len(docs) - 1, max(1, round(val_fraction * len(docs))))
    order = np.random.default_rng(seed).permutation(len(docs))
    val_idx = set(order[:n_val].tolist())
    train = [d for i, d in enumerate(docs) if i not in val_idx]
    val = [d for i, d in enumerate(docs) if i in val_idx]
    return train, val


def _cut_at_blank_lines(doc: Document, pieces: int) -> list[Document]:
    paragraphs = re.split(r"(?<=\n\n)", doc.text)
    target = max(1, len(doc.text) // pieces)
    out, buf = [], ""
    for para in paragraphs:
        buf += para
        if len(buf) >= target:
            out.append(buf)
            buf = ""
    if buf:
        out.append(buf)
    return [Document(f"{doc.name}#{i}", t) for i, t in enumerate(out)]


# A newline between two non-space characters is a pre-token boundary for byte-level BPE (GPT-2's split
# pattern never joins "\n" to a neighbour that is not whitespace), so cutting there encodes identically.
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


def _chunks(text: str, size: int) -> list[str]:
    """Cut text at safe boundaries into pieces of about `size` characters, so one long document can be
    encoded by many threads at once."""
    if len(text) <= size:
        return [text]
    out, start = [], 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        out.append(text[start:m.end()])
        start = m.end()
    out.append(text[start:])
    return out


def tokenize_documents(tokenizer: Tokenizer, docs: list[Document], *, batch_chars: int = 1 << 20,
                       chunk_chars: int = 8192, on_progress=None) -> Iterator[np.ndarray]:
    """Yield one int64 array per document (its tokens then EOS), encoding in parallel batches."""
    from tokenizers import pre_tokenizers

    cut = isinstance(tokenizer.hf.pre_tokenizer, pre_tokenizers.ByteLevel)
    pending: list[tuple[int, list[str]]] = []  # (doc index, chunks)
    pending_chars = 0

    def flush() -> Iterator[np.ndarray]:
        flat = [c for _, chunks in pending for c in chunks]
        encoded = tokenizer.encode_batch(flat)
        k = 0
        for _, chunks in pending:
            ids = [i for piece in encoded[k:k + len(chunks)] for i in piece]
            k += len(chunks)
            ids.append(tokenizer.eos_id)
            yield np.asarray(ids, dtype=np.int64)
        if on_progress is not None:
            on_progress(sum(len(c.encode()) for c in flat))

    for i, doc in enumerate(docs):
        chunks = _chunks(doc.text, chunk_chars) if cut else [doc.text]
        pending.append((i, chunks))
        pending_chars += len(doc.text)
        if pending_chars >= batch_chars:
            yield from flush()
            pending, pending_chars = [], 0
    if pending:
        yield from flush()


# --- writing shards -------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits (halves the bytes read per token), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to `{split}_{i:05d}.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.dtype, self.shard_tokens = out, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._file = open(self.out / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while len(ids):
            if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self.close()
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._file.write(ids[:room].tobytes())
            self.shards[-1]["tokens"] += len(ids[:room])
            ids = ids[room:]

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


@dataclass
class PrepareStats:
    documents: dict[str, int]
    tokens: dict[str, int]
    bytes: int
    seconds: float  # tokenizing and writing, not reading or tokenizer training
    tokenizer_seconds: float
    warnings: list[str]
    empty_documents: int = 0  # files (or JSONL lines) with no text, left out

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, sum(self.tokens.values()))

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def prepare(sources: list[str], out: str | Path, *, tokenizer: str | Path | None = None,
            vocab_size: int = PrepareConfig.vocab_size, val_fraction: float = PrepareConfig.val_fraction,
            seed: int = PrepareConfig.seed, text_field: str = PrepareConfig.text_field,
            shard_tokens: int = PrepareConfig.shard_tokens, include: tuple[str, ...] = PrepareConfig.include,
            progress: bool = True, overwrite: bool = False,
            curate: Callable[[list[Document]], tuple[list[Document], dict]] | None = None) -> PrepareStats:
    """Read sources, train (or load) the tokenizer, split by document, tokenize in parallel, write shards.
    The settings' defaults are PrepareConfig's (`gptforge prepare`'s flags).

    `curate`, when given, maps the documents read to the documents kept and a summary stored in meta.json
    (`gptforge prepare --curate` passes gptforge.curate's steps; they sit above this module, so they come in).

    `out` is checked before any reading (outputs.check_out: not a file, not a source, not a non-empty folder
    unless `overwrite` and it is an earlier prepare's); everything is written to a temporary sibling that
    replaces `out` only when complete."""
    not_one_string(sources, "sources")
    if shard_tokens < 1:  # 0 would open empty shard files forever
        raise GptforgeError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    out = check_out(out, "data", overwrite=overwrite,
                    inputs=[s for s in sources if Path(s).exists()] + ([tokenizer] if tokenizer else []))
    docs, warnings, empty = _read_sources(sources, text_field, include)
    curated = None
    if curate is not None:
        docs, curated = curate(docs)
        if not docs:
            raise GptforgeError("curation removed every document; see `gptforge curate SOURCE --dry-run` for why")
    train_docs, val_docs = split_documents(docs, val_fraction, seed)

    t0 = time.perf_counter()
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else Tokenizer.train((d.text for d in train_docs), vocab_size)
    tokenizer_seconds = time.perf_counter() - t0

    dtype = token_dtype(tok.vocab_size)
    total_bytes = sum(len(d.text.encode()) for d in train_docs + val_docs)
    with staged(out, "prepared data") as tmp:
        splits, seconds = _write_shards(tmp, tok, dtype, train_docs, val_docs, shard_tokens, total_bytes, progress)
        tok.save(tmp / "tokenizer.json")
        meta = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "dtype": dtype.name,
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "tokenizer": "tokenizer.json",
            "tokenizer_fingerprint": tok.fingerprint,
            "seed": seed,
            "val_fraction": val_fraction,
            "sources": list(sources),
            "splits": splits,
            **({"curate": curated} if curated is not None else {}),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return PrepareStats(
        documents={s: splits[s]["documents"] for s in splits},
        tokens={s: splits[s]["tokens"] for s in splits},
        bytes=total_bytes, seconds=seconds, tokenizer_seconds=tokenizer_seconds, warnings=warnings,
        empty_documents=empty,
    )


def _write_shards(out: Path, tok: Tokenizer, dtype: np.dtype, train_docs: list[Document], val_docs: list[Document],
                  shard_tokens: int, total_bytes: int, progress: bool) -> tuple[dict[str, Any], float]:
    """Tokenize both splits into shard files in `out`; their meta.json entries and the seconds it took."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    splits: dict[str, Any] = {}
    t1 = time.perf_counter()
    columns = [TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("tokenizing", total=total_bytes)
        for split, split_docs in (("train", train_docs), ("val", val_docs)):
            writer = ShardWriter(out, split, dtype, shard_tokens)
            try:
                for ids in tokenize_documents(tok, split_docs, on_progress=lambda n: bar.advance(task, n)):
                    writer.write(ids)
            finally:
                writer.close()
            splits[split] = {
                "documents": len(split_docs),
                "tokens": sum(s["tokens"] for s in writer.shards),
                "bytes": sum(len(d.text.encode()) for d in split_docs),
                "shards": writer.shards,
            }
    return splits, time.perf_counter() - t1


# --- reading shards -------------------------------------------------------------------------------------

class TokenData:
    """A prepared directory: its metadata, tokenizer and memory-mapped shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META_FILE
        if not meta_path.is_file():
            raise GptforgeError(f"{self.path} is not a prepared data directory (no {META_FILE}); run: gptforge prepare SOURCE --out {self.path}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise GptforgeError(f"{meta_path}: not valid JSON ({e}); re-run gptforge prepare") from None
        if self.meta.get("format") != FORMAT or self.meta.get("version") != FORMAT_VERSION:
            raise GptforgeError(f"{meta_path}: format {self.meta.get('format')} v{self.meta.get('version')} is not {FORMAT} v{FORMAT_VERSION}; re-run gptforge prepare")
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")

    @property
    def fingerprint(self) -> str:
        return self.meta["tokenizer_fingerprint"]

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.path / self.meta["tokenizer"])

    def shards(self, split: str) -> list[np.ndarray]:
        if split not in self.meta["splits"]:
            raise GptforgeError(f"{self.path} has no {split!r} split; splits: {', '.join(self.meta['splits'])}")
        arrays = []
        for shard in self.meta["splits"][split]["shards"]:
            f = self.path / shard["file"]
            expected = shard["tokens"] * self.dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                raise GptforgeError(f"shard {f} is missing or truncated (expected {expected} bytes); re-run gptforge prepare")
            arrays.append(np.memmap(f, dtype=self.dtype, mode="r", shape=(shard["tokens"],)))
        return arrays


class BatchSampler:
    """Random windows of seq_len+1 tokens from memory-mapped shards, reproducible from (seed, position).

    Batch k depends only on the seed and k, so a sampler restored from `state_dict()` continues with exactly
    the batches an uninterrupted one would have drawn.
    """

    def __init__(self, shards: list[np.ndarray], batch_size: int, seq_len: int, seed: int = 0):
        self.shards, self.batch_size, self.seq_len, self.seed = shards, batch_size, seq_len, seed
        self.position = 0
        starts = np.array([max(0, len(s) - seq_len) for s in shards], dtype=np.int64)  # windows per shard
        if starts.sum() == 0:
            longest = max((len(s) for s in shards), default=0)
            raise GptforgeError(f"the split has {longest} tokens in its longest shard, fewer than seq_len+1 = {seq_len + 1}; use a smaller --train.seq_len or more data")
        self._ends = np.cumsum(starts)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number k: inputs and next-token targets, each (batch_size, seq_len) int64."""
        rng = np.random.default_rng([self.seed, k])
        picks = rng.integers(0, self._ends[-1], size=self.batch_size)
        shard_ids = np.searchsorted(self._ends, picks, side="right")
        offsets = picks - np.concatenate(([0], self._ends))[shard_ids]
        rows = np.stack([self.shards[s][o:o + self.seq_len + 1].astype(np.int64) for s, o in zip(shard_ids, offsets)])
        rows = torch.from_numpy(rows)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self) -> BatchSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.batch(self.position)
        self.position += 1
        return x, y

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "position": self.position, "batch_size": self.batch_size, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["batch_size"], state["seq_len"]) != (self.batch_size, self.seq_len):
            raise GptforgeError(f"sampler state was saved for batch_size={state['batch_size']}, seq_len={state['seq_len']}; this run uses {self.batch_size}, {self.seq_len}")
        self.seed, self.position = state["seed"], state["position"]
