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
from tokenizers import pre_tokenizers

try:  # optional (the `zstd` extra): .zst inputs
    import zstandard
except ImportError:
    zstandard = None

from gptforge.corpora import CORPORA, Document, load_corpus
from gptforge.errors import GptforgeError, not_one_string
from gptforge.fastencode import agrees, fast_encoder
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
    """(format, compression) of a file by its name: format is "jsonl", "parquet", "arrow" or "text"; compression
    is ".gz", ".zst" or ""."""
    suffixes = path.suffixes[-2:] or [""]
    compression = suffixes[-1] if suffixes[-1] in COMPRESSED else ""
    inner = suffixes[-2] if compression and len(suffixes) == 2 else ("" if compression else suffixes[-1])
    return {".jsonl": "jsonl", ".parquet": "parquet", ".arrow": "arrow"}.get(inner, "text"), compression


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
    bad = [0]
    for raw in stream:
        yield _decode(raw, bad)
    _warn_bad_utf8(name, bad[0], warnings)


def _decode(raw: bytes, bad: list[int]) -> str:
    """raw as UTF-8, invalid sequences replaced with U+FFFD and counted in bad[0]."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        bad[0] += text.count("\ufffd") - raw.count("\ufffd".encode())
        return text


def _warn_bad_utf8(name: str, bad: int, warnings: list[str]) -> None:
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


def _pyarrow(path: Path, what: str):
    """pyarrow, imported on first use: it is optional (the `parquet` extra) and slow to import (0.5 s)."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (the submodule, for pyarrow.parquet.ParquetFile)
    except ImportError:
        raise GptforgeError(f"{path}: reading {what} needs pyarrow: pip install 'gptforge[parquet]'") from None
    return pyarrow


def _text_column(pa, path: Path, schema, text_field: str) -> int:
    """The index of the text column in `schema`; a missing or non-text column is an error naming the choices."""
    columns = schema.names
    if text_field not in columns:
        raise GptforgeError(f"{path}: no column {text_field!r}; columns: {', '.join(columns)}; choose one with --text-field")
    kind = schema.field(text_field).type
    if not any(check(kind) for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                                         pa.types.is_large_binary)):
        raise GptforgeError(f"{path}: column {text_field!r} holds {kind}, not text; choose another with --text-field ({', '.join(columns)})")
    return columns.index(text_field)


def _rows(pa, path: Path, batches: Iterator, warnings: list[str]) -> Iterator[Document]:
    """One document per value of a one-column record-batch stream. Values are read as bytes and decoded here, so
    that invalid UTF-8 (in a binary column, or a string column a careless writer filled) is replaced and counted
    in a warning as for text files; a null is an empty document (left out and counted like an empty file)."""
    bad, row = [0], 0
    for column in batches:
        for raw in column.cast(pa.large_binary()).to_pylist():
            yield Document(f"{path}:{row}", _decode(raw, bad) if raw else "")
            row += 1
    _warn_bad_utf8(str(path), bad[0], warnings)


def _read_parquet(path: Path, text_field: str, warnings: list[str]) -> Iterator[Document]:
    """One document per row of the `text_field` column, a row group at a time (iter_batches), so a shard is never
    whole in memory."""
    pa = _pyarrow(path, "parquet")
    try:
        pf = pa.parquet.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise GptforgeError(f"{path}: not a readable parquet file ({e})") from None
    _text_column(pa, path, pf.schema_arrow, text_field)
    yield from _rows(pa, path, (b.column(0) for b in pf.iter_batches(columns=[text_field])), warnings)


def _read_arrow(path: Path, text_field: str, warnings: list[str]) -> Iterator[Document]:
    """One document per row of the `text_field` column of an Arrow IPC file: the stream format that `datasets`
    writes (`data-00000-of-00001.arrow`), or the random-access file format (Feather v2). Read a record batch at a
    time from a plain file (not a memory map, whose touched pages would count against memory)."""
    pa = _pyarrow(path, "arrow files")
    with pa.OSFile(str(path)) as f:
        try:
            reader = pa.ipc.open_stream(f)
            batches = iter(reader)
        except pa.ArrowInvalid:
            try:
                f.seek(0)
                reader = pa.ipc.open_file(f)
            except pa.ArrowInvalid as e:
                raise GptforgeError(f"{path}: not a readable Arrow IPC file ({e})") from None
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        column = _text_column(pa, path, reader.schema, text_field)
        try:
            yield from _rows(pa, path, (b.column(column) for b in batches), warnings)
        except pa.ArrowInvalid as e:
            raise GptforgeError(f"{path}: not a readable Arrow IPC file ({e})") from None


# `datasets`' save_to_disk: a Dataset folder holds state.json (its arrow files under "_data_files"), a DatasetDict
# folder holds dataset_dict.json ({"splits": [...]}) and one Dataset folder per split.
DATASET_STATE, DATASET_DICT = "state.json", "dataset_dict.json"


def _dataset_files(folder: Path, split: str) -> list[Path]:
    """The arrow files of a `save_to_disk` folder, in order; for a DatasetDict, those of `split`."""
    if (folder / DATASET_DICT).is_file():
        try:
            splits = json.loads((folder / DATASET_DICT).read_text())["splits"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise GptforgeError(f"{folder / DATASET_DICT}: not a datasets DatasetDict file ({e})") from None
        if split not in splits:
            raise GptforgeError(f"{folder} is a datasets DatasetDict without a {split!r} split; splits: "
                                f"{', '.join(splits)}; choose one with --dataset-split")
        folder = folder / split
    try:
        state = json.loads((folder / DATASET_STATE).read_text())
        files = [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise GptforgeError(f"{folder / DATASET_STATE}: not a datasets save_to_disk folder ({e})") from None
    for f in files:
        if not f.is_file():
            raise GptforgeError(f"{folder}: the dataset's file {f.name} is missing; save the dataset again")
    return files


def _is_dataset(folder: Path) -> bool:
    return (folder / DATASET_DICT).is_file() or (folder / DATASET_STATE).is_file()


def _read_file(path: Path, text_field: str, warnings: list[str]) -> Iterator[Document]:
    """A file's documents by its format: JSONL, parquet and arrow a record each, anything else one document; .gz and
    .zst files are decompressed as they are read. A corrupt compressed file is an error naming it."""
    fmt, compression = _kind(path)
    if fmt in ("parquet", "arrow"):
        yield from (_read_parquet if fmt == "parquet" else _read_arrow)(path, text_field, warnings)
        return
    try:
        with _open_binary(path, compression) as stream:
            if fmt == "jsonl":
                yield from _read_jsonl(_decoded_lines(stream, str(path), warnings), str(path), text_field)
            else:  # one document: decoded whole, 10x faster than by line (and the same text and count)
                bad = [0]
                text = _decode(stream.read(), bad)
                _warn_bad_utf8(str(path), bad[0], warnings)
                yield Document(str(path), text)
    except _CORRUPT as e:
        what = {".gz": "gzip", ".zst": "zstandard"}.get(compression, "readable")
        raise GptforgeError(f"{path}: not a valid {what} file ({e}); re-create or remove it") from None


def _read_stdin(warnings: list[str]) -> Iterator[Document]:
    """`-`: standard input as one text document (its bytes when it has them, so bad UTF-8 is counted)."""
    stream = getattr(sys.stdin, "buffer", None)
    text = "".join(_decoded_lines(stream, "<stdin>", warnings)) if stream is not None else sys.stdin.read()
    yield Document("<stdin>", text)


def _wanted(rel: str, include: tuple[str, ...] | list[str] | None) -> bool:
    """Does a folder contribute this file (`rel`: its path below the folder, with '/')? Not when hidden; with
    --include patterns, when one matches its name (or, for a pattern with a '/', its path below the folder); else
    when it has a known suffix."""
    parts = rel.split("/")
    if any(part.startswith(".") for part in parts):
        return False
    if include:
        return any(fnmatch.fnmatch(rel if "/" in pat else parts[-1], pat) for pat in include)
    return rel.endswith(tuple(FOLDER_SUFFIXES))


def _folder_files(folder: Path, include: tuple[str, ...] | list[str] | None) -> list[Path]:
    """The files a folder contributes, found recursively (hidden folders not entered, symlinked folders not
    followed, as Path.rglob), in Path order. os.walk and plain strings: prepare walks a folder once per pass, and
    pathlib's walk cost as much as reading a folder of small files."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        below = os.path.relpath(dirpath, folder).replace(os.sep, "/")
        for name in filenames:
            rel = name if below == "." else f"{below}/{name}"
            if _wanted(rel, include) and os.path.isfile(os.path.join(dirpath, name)):
                found.append(rel)
    return [folder / rel for rel in sorted(found, key=lambda rel: rel.split("/"))]


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
                include: tuple[str, ...] | list[str] | None = None,
                dataset_split: str = PrepareConfig.dataset_split) -> Iterator[Document]:
    """The documents of one source (a file, folder, glob, JSONL, parquet or arrow file, a `datasets` save_to_disk
    folder, `-` for standard input, or a bundled corpus name), read lazily, one file at a time. `include`: fnmatch
    patterns choosing a folder's files (default: FOLDER_SUFFIXES); `dataset_split`: the split of a DatasetDict
    folder. A source that does not exist (or matches no files) is an error here, before any reading."""
    path = Path(source)
    if source == STDIN:
        return _read_stdin(warnings)
    if path.is_file():
        files = [path]
    elif path.is_dir() and _is_dataset(path):
        files = _dataset_files(path, dataset_split)
    elif path.is_dir():
        files = _folder_files(path, include)
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


def read_sources(sources: list[str], text_field: str = "text", include: tuple[str, ...] | list[str] | None = None,
                 dataset_split: str = PrepareConfig.dataset_split) -> tuple[list[Document], list[str]]:
    """Documents from files, folders (files found recursively), globs, JSONL, parquet and arrow files, `datasets`
    save_to_disk folders, `-` (stdin) and bundled corpus names, as a list (prepare itself streams them).

    A text file is one document; a JSONL line or parquet/arrow row is one document (its `text_field`); .gz and .zst
    files are read through decompression; a bundled corpus names its own documents. `include` chooses a folder's
    files by fnmatch pattern. Returns the documents and warnings (files with invalid UTF-8, empty documents).
    """
    docs, warnings, _ = _read_sources(sources, text_field, include, dataset_split)
    return docs, warnings


def _read_sources(sources: list[str], text_field: str, include: tuple[str, ...] | list[str] | None = None,
                  dataset_split: str = PrepareConfig.dataset_split) -> tuple[list[Document], list[str], int]:
    """read_sources, and how many empty documents it left out (named in a warning, counted in the summary)."""
    corpus = _Corpus(sources, text_field, include, dataset_split)
    docs = list(corpus.documents(survey=True))
    corpus.finish_survey()
    return docs, corpus.warnings, corpus.empty


class _Corpus:
    """The non-empty documents of the sources, to be read as often as needed: prepare reads them once to count
    them, once to train a tokenizer and once to tokenize, so that it never holds the corpus (standard input, one
    document, is read once and kept). The counting pass (`survey`) collects the warnings and the empty documents."""

    def __init__(self, sources: list[str], text_field: str, include: tuple[str, ...] | list[str] | None,
                 dataset_split: str):
        not_one_string(sources, "sources")
        if not sources:
            raise GptforgeError("no sources given: name files, folders, globs, JSONL, parquet or arrow files, datasets "
                                "folders, - (stdin) or a bundled corpus (e.g. shakespeare)")
        self.sources, self.text_field, self.include, self.split = list(sources), text_field, include, dataset_split
        for s in self.sources:  # a missing source is an error before any reading
            if s != STDIN and not (s in CORPORA and not Path(s).exists()):  # (a bundled corpus would load here)
                iter_source(s, text_field, [], include, dataset_split)
        self.warnings: list[str] = []
        self.count = self.bytes = self.empty = 0
        self._stdin: list[Document] | None = None

    def _all(self, warnings: list[str]) -> Iterator[Document]:
        for s in self.sources:
            if s == STDIN:
                if self._stdin is None:
                    self._stdin = list(_read_stdin(warnings))
                yield from self._stdin
            else:
                yield from iter_source(s, self.text_field, warnings, self.include, self.split)

    def documents(self, survey: bool = False) -> Iterator[Document]:
        """The non-empty documents in order. With `survey`, also count them, their UTF-8 bytes and the empty ones,
        and keep the readers' warnings (later passes would only repeat them)."""
        empty: list[str] = []
        for doc in self._all(self.warnings if survey else []):
            if not doc.text:
                if survey:
                    self.empty += 1
                    empty += [doc.name][:3 - len(empty)]
                continue
            if survey:
                self.count += 1
                self.bytes += len(doc.text.encode())
            yield doc
        if survey and self.empty:
            self.warnings.append(f"{self.empty} empty document(s) left out: {', '.join(empty)}{', ...' if self.empty > 3 else ''}")

    def finish_survey(self) -> None:
        if not self.count:
            raise GptforgeError(f"empty corpus: the sources {self.sources} hold no text")


# --- splitting and tokenizing ---------------------------------------------------------------------------

# A stream of documents that can be read again, the same each call (the sources re-read, or a list held).
DocStream = Callable[[], Iterator[Document]]


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Deterministic split by document: the same documents and seed always give the same split.

    At least one document goes to each split when val_fraction > 0. A corpus of a single document is first
    cut at blank lines into about 100 pieces, so that it can still be split.
    """
    stream, val = _split_plan(lambda: iter(docs), len(docs), val_fraction, seed)
    pieces = list(stream())
    return [d for d, v in zip(pieces, val) if not v], [d for d, v in zip(pieces, val) if v]


def _split_plan(stream: DocStream, n: int, val_fraction: float, seed: int) -> tuple[DocStream, np.ndarray]:
    """The documents to split (a single document cut into pieces) and, for document i, whether it goes to val.
    Only the count is needed up front, so the split streams: `round(val_fraction * n)` documents (at least one,
    at most n - 1) drawn by a permutation seeded with `seed` go to val; n bytes of mask, not the corpus."""
    if not 0.0 <= val_fraction < 1.0:
        raise GptforgeError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return stream, np.zeros(n, dtype=bool)
    if n == 1:
        pieces = _cut_at_blank_lines(next(stream()), pieces=100)
        if len(pieces) < 2:
            raise GptforgeError(f"{pieces[0].name}: one document without blank lines cannot be split; add more documents or use --val-fraction 0")
        stream, n = (lambda: iter(pieces)), len(pieces)
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    val = np.zeros(n, dtype=bool)
    val[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return stream, val


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


# Pre-token boundaries of GPT-2's split pattern, where cutting a text encodes identically: after a newline that
# sits between two non-space characters (the pattern never joins "\n" to a neighbour that is not whitespace), and
# before a single space between two printable ASCII characters (the space always opens the next pre-token, the
# character before it always closes one). The space rule lets a huge single line be encoded in parallel too.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)|(?<=[!-~])(?= [!-~])")


def _iter_chunks(text: str, size: int) -> Iterator[str]:
    """Cut text at safe boundaries into pieces of about `size` characters, so that one long document is encoded by
    many threads at once (and never held twice)."""
    start = 0
    while len(text) - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        yield text[start:m.start()]
        start = m.start()
    yield text[start:]


def _chunks(text: str, size: int) -> list[str]:
    return list(_iter_chunks(text, size))


def _cuttable(tokenizer: Tokenizer) -> bool:
    """Does this tokenizer split text with GPT-2's pattern and nothing before it (so that _SAFE_CUT is safe)?"""
    pre = tokenizer.hf.pre_tokenizer
    return (isinstance(pre, pre_tokenizers.ByteLevel) and pre.use_regex and not pre.add_prefix_space
            and tokenizer.hf.normalizer is None)


class _Encoder:
    """`encode_batch` of a tokenizer as uint32 arrays: through fastencode's tiktoken path when the tokenizer is one
    it reproduces by construction and the two agree on the first batch's text, else through HF tokenizers."""

    PROBE_CHARS = 1 << 14  # HF encodes this much of the first batch again: a check, not a cost

    def __init__(self, tok: Tokenizer, fast: bool = True):
        self.tok = tok
        self.fast = fast_encoder(tok) if fast else None
        self.name = "tiktoken" if self.fast is not None else "tokenizers"
        self.warning: str | None = None
        self._checked = False

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        if self.fast is not None and not self._checked:
            self._checked = True
            probe, size = [], 0
            for t in texts:
                probe.append(t[:self.PROBE_CHARS - size])
                size += len(probe[-1])
                if size >= self.PROBE_CHARS:
                    break
            if not agrees(self.tok, self.fast, probe):
                self.fast.close()
                self.fast, self.name = None, "tokenizers"
                self.warning = "tiktoken's ids differed from the tokenizer's on the first documents; encoded with HF tokenizers (slower)"
        if self.fast is not None:
            return self.fast.encode_batch(texts)
        return [np.asarray(ids, dtype=np.uint32) for ids in self.tok.encode_batch(texts)]

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()


def _encode_stream(encode: _Encoder, items: Iterator[tuple[Any, Document]], *, batch_chars: int = 1 << 20,
                   chunk_chars: int = 8192, on_progress: Callable[[int], None] | None = None) -> Iterator[tuple[Any, np.ndarray]]:
    """(tag, ids) for tagged documents, in order: each document's start (BOS, for tokenizers that start a sequence
    with one), its tokens, then EOS. The ids of one batch come out as one array per tag (first-seen order), so a
    tag's arrays concatenate to its documents' ids in order. A long document is cut at safe boundaries and may span
    batches: memory is a batch and the current document."""
    eos = np.array([encode.tok.eos_id], dtype=np.uint32)
    start = [np.array(encode.tok.start_ids, dtype=np.uint32)] if encode.tok.start_ids else []
    cut = _cuttable(encode.tok)
    pending: list[tuple[Any, str, bool]] = []  # (tag, text, last piece of its document)
    size = 0
    after_last = True  # the next piece starts a document

    def flush() -> Iterator[tuple[Any, np.ndarray]]:
        nonlocal after_last
        out: dict[Any, list[np.ndarray]] = {}
        for (tag, _, last), ids in zip(pending, encode([t for _, t, _ in pending])):
            out.setdefault(tag, []).extend([*(start if after_last else []), ids, *([eos] if last else [])])
            after_last = last
        if on_progress is not None:
            on_progress(sum(len(t.encode()) for _, t, _ in pending))
        for tag, arrays in out.items():
            yield tag, np.concatenate(arrays)

    for tag, doc in items:
        pieces = _iter_chunks(doc.text, chunk_chars) if cut else iter([doc.text])
        piece = next(pieces)
        for following in pieces:
            pending.append((tag, piece, False))
            size, piece = size + len(piece), following
            if size >= batch_chars:
                yield from flush()
                pending, size = [], 0
        pending.append((tag, piece, True))
        size += len(piece)
        if size >= batch_chars:
            yield from flush()
            pending, size = [], 0
    if pending:
        yield from flush()


def tokenize_documents(tokenizer: Tokenizer, docs: list[Document], *, batch_chars: int = 1 << 20,
                       chunk_chars: int = 8192, on_progress=None, fast: bool = True) -> Iterator[np.ndarray]:
    """Yield one int64 array per document (its start ids, its tokens, then EOS), encoding in parallel batches
    (tiktoken's encoder when it reproduces the tokenizer, see fastencode; `fast=False`: HF tokenizers always)."""
    encode = _Encoder(tokenizer, fast)
    held, parts = None, []
    try:
        for i, ids in _encode_stream(encode, enumerate(docs), batch_chars=batch_chars, chunk_chars=chunk_chars,
                                     on_progress=on_progress):
            if i != held and parts:
                yield np.concatenate(parts).astype(np.int64)
                parts = []
            held = i
            parts.append(ids)
        if parts:
            yield np.concatenate(parts).astype(np.int64)
    finally:
        encode.close()


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
    encoder: str = "tokenizers"  # what encoded: "tiktoken" (fastencode) or "tokenizers"

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(1, sum(self.tokens.values()))

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


# A tokenizer is trained on the training documents in order, up to this many characters: enough for any
# vocabulary gptforge trains (BPE statistics settle long before), and a bound on the trainer's time and memory.
TOKENIZER_SAMPLE_CHARS = 1 << 30


def _training_texts(stream: DocStream, val: np.ndarray) -> Iterator[str]:
    size = 0
    for is_val, doc in zip(val, stream()):
        if not is_val:
            yield doc.text
            size += len(doc.text)
            if size >= TOKENIZER_SAMPLE_CHARS:
                return


def prepare(sources: list[str], out: str | Path, *, tokenizer: str | Path | None = None,
            vocab_size: int = PrepareConfig.vocab_size, val_fraction: float = PrepareConfig.val_fraction,
            seed: int = PrepareConfig.seed, text_field: str = PrepareConfig.text_field,
            dataset_split: str = PrepareConfig.dataset_split, shard_tokens: int = PrepareConfig.shard_tokens,
            include: tuple[str, ...] = PrepareConfig.include, progress: bool = True, overwrite: bool = False,
            curate: Callable[[list[Document]], tuple[list[Document], dict]] | None = None,
            fast: bool = True) -> PrepareStats:
    """Read sources, train (or load) the tokenizer, split by document, tokenize in parallel, write shards.
    The settings' defaults are PrepareConfig's (`gptforge prepare`'s flags).

    The corpus streams: it is read once to count documents, once to train a tokenizer (when none is given) and
    once to tokenize, each shard written as tokens come, so memory does not grow with the corpus. `fast=False`
    encodes with HF tokenizers even where tiktoken's encoder reproduces the tokenizer (fastencode).

    `curate`, when given, maps the documents read to the documents kept and a summary stored in meta.json
    (`gptforge prepare --curate` passes gptforge.curate's steps; they sit above this module, so they come in);
    its steps compare documents with each other, so the corpus is then held in memory.

    `out` is checked before any reading (outputs.check_out: not a file, not a source, not a non-empty folder
    unless `overwrite` and it is an earlier prepare's); everything is written to a temporary sibling that
    replaces `out` only when complete."""
    not_one_string(sources, "sources")
    if shard_tokens < 1:  # 0 would open empty shard files forever
        raise GptforgeError(f"--shard-tokens must be >= 1, got {shard_tokens}")
    out = check_out(out, "data", overwrite=overwrite,
                    inputs=[s for s in sources if Path(s).exists()] + ([tokenizer] if tokenizer else []))
    stream, n, corpus, curated = _survey(sources, text_field, include, dataset_split, curate)
    stream, val = _split_plan(stream, n, val_fraction, seed)

    t0 = time.perf_counter()
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else Tokenizer.train(_training_texts(stream, val), vocab_size)
    tokenizer_seconds = time.perf_counter() - t0

    dtype = token_dtype(tok.vocab_size)
    encode = _Encoder(tok, fast)
    try:
        with staged(out, "prepared data") as tmp:
            splits, seconds = _write_shards(tmp, encode, dtype, stream, val, shard_tokens, corpus.bytes, progress)
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
    finally:
        encode.close()
    return PrepareStats(
        documents={s: splits[s]["documents"] for s in splits},
        tokens={s: splits[s]["tokens"] for s in splits},
        bytes=sum(splits[s]["bytes"] for s in splits), seconds=seconds, tokenizer_seconds=tokenizer_seconds,
        warnings=corpus.warnings + ([encode.warning] if encode.warning else []),
        empty_documents=corpus.empty, encoder=encode.name,
    )


def _survey(sources: list[str], text_field: str, include, dataset_split: str,
            curate: Callable[[list[Document]], tuple[list[Document], dict]] | None) -> tuple[DocStream, int, _Corpus, dict | None]:
    """Read the sources once: the stream of their documents, how many there are, the corpus (its warnings and
    empty count) and the curation summary. Curation, and a corpus of one document, hold their documents."""
    corpus = _Corpus(sources, text_field, include, dataset_split)
    if curate is not None:
        docs = list(corpus.documents(survey=True))
        corpus.finish_survey()
        docs, curated = curate(docs)
        if not docs:
            raise GptforgeError("curation removed every document; see `gptforge curate SOURCE --dry-run` for why")
        corpus.bytes = sum(len(d.text.encode()) for d in docs)
        return (lambda: iter(docs)), len(docs), corpus, curated
    first = None
    for doc in corpus.documents(survey=True):
        first = doc if corpus.count == 1 else None  # a one-document corpus is cut for the split: keep it
    corpus.finish_survey()
    if corpus.count == 1:
        return (lambda: iter([first])), 1, corpus, None
    return corpus.documents, corpus.count, corpus, None


def _write_shards(out: Path, encode: _Encoder, dtype: np.dtype, stream: DocStream, val: np.ndarray,
                  shard_tokens: int, total_bytes: int, progress: bool) -> tuple[dict[str, Any], float]:
    """Tokenize the documents into train and val shard files in `out` as they stream; their meta.json entries and
    the seconds it took."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    writers = {split: ShardWriter(out, split, dtype, shard_tokens) for split in ("train", "val")}
    counts = {split: {"documents": 0, "bytes": 0} for split in writers}

    def tagged() -> Iterator[tuple[str, Document]]:
        seen = 0
        for i, doc in enumerate(stream()):
            if i >= len(val):
                break
            split = "val" if val[i] else "train"
            counts[split]["documents"] += 1
            counts[split]["bytes"] += len(doc.text.encode())
            seen = i + 1
            yield split, doc
        if seen != len(val):
            raise GptforgeError("the sources changed while prepare read them (a different number of documents); run again")

    t1 = time.perf_counter()
    columns = [TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=True) as bar:
        task = bar.add_task("tokenizing", total=total_bytes)
        try:
            for split, ids in _encode_stream(encode, tagged(), on_progress=lambda n: bar.advance(task, n)):
                writers[split].write(ids)
        finally:
            for w in writers.values():
                w.close()
    splits = {split: {"documents": counts[split]["documents"], "tokens": sum(s["tokens"] for s in w.shards),
                      "bytes": counts[split]["bytes"], "shards": w.shards} for split, w in writers.items()}
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
