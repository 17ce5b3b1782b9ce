"""The streaming pipeline: two passes over the sources (three with --mix), the documents read twice rather
than held, the work spread over every core in batches of about a megabyte.

  pass 1 (workers): per document, C4's line rules (if on), the quality signals and the first failing rule, the
          exact key, the MinHash signature (spilled to disk) and the hashes of its long lines (spilled to disk);
  decide (main):  exact groups, then near-duplicate groups among the documents that passed, then boilerplate
          lines among the documents still kept; all of it O(documents) memory;
  pass 2 (workers): kept documents lose their boilerplate lines and PII; the main process writes them, in input
          order, to JSONL shards and counts what each rule removed, keeping a sample of each;
  pass 3 (main, --mix only): the shards rewritten with each document repeated or dropped by the mix.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from gptforge.corpora import Document
from gptforge.curate.dedup import (LineCounter, MinHasher, exact_groups, exact_key, line_key, near_duplicate_groups,
                                   shingles, word_hashes)
from gptforge.curate.filters import c4_clean, first_failure, language, measure
from gptforge.curate.mix import plan_copies
from gptforge.curate.perplexity import PerplexityScorer
from gptforge.curate.pii import count_kinds, redact
from gptforge.curate.report import CurateReport
from gptforge.data import iter_source
from gptforge.errors import GptforgeError
from gptforge.settings import CurateConfig
from gptforge.tokenizer import Tokenizer

FORMAT = "gptforge.curated"
FORMAT_VERSION = 1
BATCH_BYTES = 1 << 20  # text per worker task: big enough to amortise pickling, small enough to bound memory
SHARD_BYTES = 256 << 20
KEPT, FILTERED, EXACT, NEAR = 0, 1, 2, 3
_NAMED = re.compile(r"^([A-Za-z_][\w.-]*)=(.+)$")


@dataclass(frozen=True)
class Source:
    """One SOURCE argument: `name` (for the report and --mix) and what data.iter_source reads."""

    name: str
    spec: str


def parse_sources(args: list[str]) -> list[Source]:
    """`NAME=PATH` names a source; a bare argument is named by itself. Names must differ."""
    if not args:
        raise GptforgeError("no sources given: name files, folders, globs, JSONL files or a bundled corpus (e.g. shakespeare)")
    out = []
    for a in args:
        m = _NAMED.match(a)
        out.append(Source(m.group(1), m.group(2)) if m and not Path(a).exists() else Source(a, a))
    names = [s.name for s in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise GptforgeError(f"two sources are named {dup!r}; name them apart with NAME=PATH")
    return out


# --- the per-document work, run in worker processes ----------------------------------------------------

_cfg: CurateConfig | None = None
_hasher: MinHasher | None = None
_scorer: PerplexityScorer | None = None
_boilerplate: dict[int, int] = {}


def _init(cfg: CurateConfig, boilerplate: dict[int, int] | None = None) -> None:
    global _cfg, _hasher, _boilerplate
    _cfg, _boilerplate = cfg, boilerplate or {}
    _hasher = MinHasher(cfg.num_perm, seed=0)


def _init_worker(cfg: CurateConfig, boilerplate: dict[int, int] | None = None) -> None:
    torch.set_num_threads(1)  # the perplexity model: one thread per worker, the pool already uses every core
    _init(cfg, boilerplate)


def _measure_one(text: str) -> tuple[str | None, dict[str, float], int, np.ndarray, np.ndarray]:
    """(failed rule or None, signals, exact key, shingles, long-line hashes) of one document."""
    global _scorer
    cfg = _cfg
    if "c4" in cfg.rules:
        cleaned = c4_clean(text, cfg)
        if cleaned is None:
            return "c4", {}, 0, np.empty(0, np.uint64), np.empty(0, np.uint64)
        text = cleaned
    signals, words, ids, vocab, lines = measure(text)
    if "language" in cfg.rules:
        lang, prob = language(text)
        signals["language_score"] = prob
        signals["language_ok"] = float(lang in cfg.languages and prob >= cfg.min_language_score)
    if "perplexity" in cfg.rules:
        if _scorer is None:
            _scorer = PerplexityScorer(cfg.perplexity_model)
        signals["perplexity"] = _scorer(text)
    failed = first_failure(signals, cfg)
    if failed is not None:
        return failed, signals, 0, np.empty(0, np.uint64), np.empty(0, np.uint64)
    long = np.empty(0, np.uint64)
    if "boilerplate" in cfg.dedup:
        keys = {line_key(ln) for ln in lines if len(ln) >= cfg.boilerplate_min_chars}
        long = np.fromiter(keys, dtype=np.uint64, count=len(keys))
    sh = shingles(word_hashes(ids, vocab), cfg.shingle_words) if "near" in cfg.dedup else np.empty(0, np.uint64)
    return None, signals, exact_key(words), sh, long


def _measure(batch: list[tuple[int, str]]) -> list[tuple]:
    results, shingle_sets = [], []
    for idx, text in batch:
        failed, signals, key, sh, lines = _measure_one(text)
        results.append((idx, failed, signals, key, lines))
        shingle_sets.append(sh)
    sigs = _hasher.signatures(shingle_sets) if "near" in _cfg.dedup else None
    return [(*r, None if sigs is None else sigs[i]) for i, r in enumerate(results)]


def _rewrite(batch: list[tuple[int, str]]) -> list[tuple[str, dict[str, int], int, int, int]]:
    """(text, PII counts, boilerplate lines removed, their bytes, bytes removed by C4's line rules) per document."""
    cfg, out = _cfg, []
    for idx, text in batch:
        c4_bytes = 0
        if "c4" in cfg.rules:
            cleaned = c4_clean(text, cfg)
            c4_bytes = len(text.encode()) - len(cleaned.encode())
            text = cleaned
        n_lines = n_bytes = 0
        if _boilerplate:
            kept = []
            for ln in text.split("\n"):
                if len(ln.strip()) >= cfg.boilerplate_min_chars and _boilerplate.get(line_key(ln), idx) != idx:
                    n_lines += 1
                    n_bytes += len(ln.encode()) + 1
                else:
                    kept.append(ln)
            text = "\n".join(kept) if n_lines else text
        text, spans = redact(text, cfg.pii, cfg.keep) if cfg.pii else (text, [])
        out.append((text, count_kinds(spans), n_lines, n_bytes, c4_bytes))
    return out


# --- running batches on every core, with a bounded queue ------------------------------------------------

def _batches(docs: Iterable[tuple[int, int, Document]], limit: int = BATCH_BYTES) -> Iterator[list[tuple[int, int, Document]]]:
    batch, size = [], 0
    for item in docs:
        batch.append(item)
        size += len(item[2].text)
        if size >= limit:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _parallel(fn: Callable, batches: Iterator[list], payload: Callable[[list], list], workers: int,
              init_args: tuple) -> Iterator[tuple[list, list]]:
    """(batch, fn(payload(batch))) in input order. At most 2 x workers batches are in flight, so memory is
    bounded whatever the corpus; one worker (or a single batch) runs in this process."""
    first = next(batches, None)
    if first is None:
        return
    second = next(batches, None)
    if workers <= 1 or second is None:
        _init(*init_args)
        for b in ([first] if second is None else [first, second]):
            yield b, fn(payload(b))
        for b in batches:
            yield b, fn(payload(b))
        return
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    # an executor, not multiprocessing.Pool: a worker that dies (killed for memory) breaks it with an error
    # where a Pool would wait forever for the lost task
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=init_args) as pool:
        pending: deque = deque()
        try:
            for b in _chain([first, second], batches):
                pending.append((b, pool.submit(fn, payload(b))))
                if len(pending) >= 2 * workers:
                    b0, r = pending.popleft()
                    yield b0, r.result()
            while pending:
                b0, r = pending.popleft()
                yield b0, r.result()
        except BrokenProcessPool:
            raise GptforgeError("a curate worker process died (killed for memory?); retry with fewer --workers") from None


def _chain(head: list, rest: Iterator) -> Iterator:
    yield from head
    yield from rest


# --- the passes ---------------------------------------------------------------------------------------------

DocStream = Callable[[], Iterator[tuple[int, Document]]]  # (source index, document), the same each call


def source_stream(sources: list[Source], text_field: str, warnings: list[str]) -> DocStream:
    """A re-readable stream of the sources' documents (empty ones skipped)."""
    def stream() -> Iterator[tuple[int, Document]]:
        for i, s in enumerate(sources):
            for doc in iter_source(s.spec, text_field, warnings):
                if doc.text:
                    yield i, doc
    return stream


def _numbered(stream: DocStream) -> Iterator[tuple[int, int, Document]]:
    for idx, (src, doc) in enumerate(stream()):
        yield idx, src, doc


@dataclass
class _Pass1:
    status: np.ndarray  # KEPT / FILTERED / EXACT / NEAR per document
    rule: list[str | None]  # the failed rule of FILTERED documents
    source: np.ndarray
    nbytes: np.ndarray
    boilerplate: dict[int, int]


def _pass1(stream: DocStream, cfg: CurateConfig, workers: int, tmp: Path, report: CurateReport) -> _Pass1:
    rules, keys, sources, sizes = [], [], [], []
    lines = LineCounter(tmp / "lines")
    sig_file = open(tmp / "signatures.bin", "wb")
    for batch, results in _parallel(_measure, _batches(_numbered(stream)), lambda b: [(i, d.text) for i, _, d in b],
                                    workers, (cfg,)):
        for (idx, src, doc), (_, failed, signals, key, line_hashes, sig) in zip(batch, results):
            rules.append(failed)
            keys.append(key)
            sources.append(src)
            sizes.append(len(doc.text.encode()))
            report.observe(signals, removed=failed is not None)
            if sig is not None:
                sig_file.write(sig.tobytes())
            if len(line_hashes):
                lines.add(np.full(len(line_hashes), idx, dtype=np.int64), line_hashes)
    sig_file.close()
    n = len(rules)
    status = np.array([KEPT if r is None else FILTERED for r in rules], dtype=np.int8)
    alive = np.flatnonzero(status == KEPT)
    if "exact" in cfg.dedup and len(alive):
        first = alive[exact_groups(np.array(keys, dtype=np.uint64)[alive])]
        status[alive[first != alive]] = EXACT
        alive = np.flatnonzero(status == KEPT)
    if "near" in cfg.dedup and len(alive) > 1:
        sig = np.memmap(tmp / "signatures.bin", dtype=np.uint32, mode="r", shape=(n, cfg.num_perm))
        labels = near_duplicate_groups(sig, cfg.jaccard, rows=alive)
        status[alive[labels != np.arange(len(alive))]] = NEAR
    boilerplate = lines.boilerplate(status == KEPT, cfg.boilerplate_min_docs) if "boilerplate" in cfg.dedup else {}
    return _Pass1(status, rules, np.array(sources, dtype=np.int32), np.array(sizes, dtype=np.int64), boilerplate)


class _ShardWriter:
    """JSONL shards `curated_00000.jsonl`, ... of at most SHARD_BYTES each (nothing when out is None)."""

    def __init__(self, out: Path | None, prefix: str = "curated"):
        self.out, self.prefix, self.shards, self._f, self._size = out, prefix, [], None, 0

    def write(self, record: dict) -> None:
        if self.out is None:
            return
        line = json.dumps(record, ensure_ascii=False) + "\n"
        if self._f is None or self._size >= SHARD_BYTES:
            self.close()
            self.shards.append({"file": f"{self.prefix}_{len(self.shards):05d}.jsonl", "documents": 0, "bytes": 0})
            self._f = open(self.out / self.shards[-1]["file"], "w", encoding="utf-8")
            self._size = 0
        self._f.write(line)
        self._size += len(line)
        self.shards[-1]["documents"] += 1
        self.shards[-1]["bytes"] += len(record["text"].encode())

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


REASON = {EXACT: "exact", NEAR: "near"}


def _pass2(stream: DocStream, sources: list[Source], cfg: CurateConfig, p1: _Pass1, workers: int,
           writer: _ShardWriter, report: CurateReport, keep_sizes: list[list[int]], tokenizer: Tokenizer | None) -> None:
    """Rewrite and write the kept documents; count what each rule removed; `keep_sizes` gets each kept
    document's size per source, in tokens when a tokenizer is given (then also each source's tokens_out)."""
    def dropped(item) -> bool:
        return p1.status[item[0]] != KEPT

    def payload(batch):
        return [(i, d.text) for i, s, d in batch if not dropped((i, s, d))]

    for batch, results in _parallel(_rewrite, _batches(_numbered(stream)), payload, workers, (cfg, p1.boilerplate)):
        it, kept = iter(results), []
        for idx, src, doc in batch:
            name, nbytes = sources[src].name, int(p1.nbytes[idx])
            if dropped((idx, src, doc)):
                status = int(p1.status[idx])
                rule = p1.rule[idx] if status == FILTERED else REASON[status]
                report.remove(rule, name, doc.name, doc.text, nbytes)
                continue
            text, pii, n_lines, n_bytes, c4_bytes = next(it)
            for k, v in pii.items():
                report.pii[k] = report.pii.get(k, 0) + v
            report.boilerplate["lines"] += n_lines
            report.boilerplate["bytes"] += n_bytes
            if c4_bytes:
                report.c4_lines["documents_changed"] += 1
                report.c4_lines["bytes"] += c4_bytes
            s = report.source(name)
            size = len(text.encode())
            s["documents_out"] += 1
            s["bytes_out"] += size
            kept.append((src, text, size))
            writer.write({"text": text, "source": name, "name": doc.name})
        counts = [len(ids) for ids in tokenizer.encode_batch([t for _, t, _ in kept])] if tokenizer and kept else None
        for k, (src, _, size) in enumerate(kept):
            if counts is not None:
                s = report.source(sources[src].name)
                s["tokens_out"] = s.get("tokens_out", 0) + counts[k]
            keep_sizes[src].append(size if counts is None else counts[k])
    report.boilerplate["distinct"] = len(p1.boilerplate)


def run(stream: DocStream, sources: list[Source], cfg: CurateConfig, out: Path | None, *, workers: int | None = None,
        mix: dict[str, float] | None = None, seed: int = 0, sink=None,
        tokenizer: Tokenizer | None = None) -> tuple[CurateReport, list[dict]]:
    """Curate the documents of `stream` into JSONL shards in `out` (None: measure only), or into `sink` (an
    object with write(record) and close(); `out` then only holds scratch files). With a tokenizer, tokens are
    counted per source and the mix is by tokens, else by bytes. Returns the report and the shard list."""
    workers = workers or len(os.sched_getaffinity(0))
    if "language" in cfg.rules:
        language("")  # fails now, not in a worker, without py3langid; the forked workers share the loaded model
    report = CurateReport(seed=seed)
    for s in sources:
        report.source(s.name)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gptforge-curate-", dir=None if out is None else out) as tmp:
        p1 = _pass1(stream, cfg, workers, Path(tmp), report)
        t1 = time.perf_counter()
        sizes: list[list[int]] = [[] for _ in sources]
        stage = Path(tmp) / "unmixed" if mix and out is not None else out
        if stage is not None:
            stage.mkdir(exist_ok=True)
        writer = sink or _ShardWriter(stage)
        _pass2(stream, sources, cfg, p1, workers, writer, report, sizes, tokenizer)
        writer.close()
        t2 = time.perf_counter()
        shards = writer.shards
        if mix:
            shards = _mix(stage, writer.shards, sources, sizes, mix, seed, out, report, "tokens" if tokenizer else "bytes")
    for src, size in zip(p1.source, p1.nbytes):
        s = report.source(sources[src].name)
        s["documents_in"] += 1
        s["bytes_in"] += int(size)
    report.seconds = {"measure": t1 - t0, "rewrite": t2 - t1, "total": time.perf_counter() - t0}
    return report, shards


def _mix(stage: Path | None, shards: list[dict], sources: list[Source], sizes: list[list[int]],
         weights: dict[str, float], seed: int, out: Path | None, report: CurateReport, unit: str) -> list[dict]:
    copies = plan_copies({s.name: np.array(z, dtype=np.int64) for s, z in zip(sources, sizes)}, weights, seed)
    total = sum(int((np.array(z) * copies[s.name]).sum()) for s, z in zip(sources, sizes))
    for s, z in zip(sources, sizes):
        got = int((np.array(z, dtype=np.int64) * copies[s.name]).sum())
        report.mix[s.name] = {"weight": weights[s.name], unit: got, "share": got / max(1, total),
                              "documents": int(copies[s.name].sum())}
    if stage is None or out is None:
        return []
    writer = _ShardWriter(out)
    seen = [0] * len(sources)
    index = {s.name: i for i, s in enumerate(sources)}
    for shard in shards:
        with open(stage / shard["file"], encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                i = index[rec["source"]]
                for _ in range(int(copies[rec["source"]][seen[i]])):
                    writer.write(rec)
                seen[i] += 1
    writer.close()
    return writer.shards


def write_meta(out: Path, sources: list[Source], cfg: CurateConfig, report: CurateReport, shards: list[dict],
               seed: int) -> None:
    """meta.json: format, the settings, per-source documents and bytes in and out, the shard list."""
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "seed": seed,
            "sources": {s.name: {"path": s.spec, **report.sources[s.name], **({"mix": report.mix[s.name]} if s.name in report.mix else {})}
                        for s in sources},
            "config": asdict(cfg), "shards": shards}
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
