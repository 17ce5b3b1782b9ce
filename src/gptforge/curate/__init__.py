"""`gptforge curate`: deduplicate, filter, scrub and mix a corpus before it is tokenized, and say what was
removed and why.

    from gptforge.curate import CurateConfig, curate
    report = curate(["books=data/books", "code=src/"], "data/curated", CurateConfig(jaccard=0.8),
                    mix="books=0.6,code=0.4")

The steps live in their own modules (dedup, filters, pii, mix, report); pipeline.py streams the sources through
them on every core. `curate_documents` runs the same steps on documents already in memory (prepare's hook).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from gptforge.corpora import Document
from gptforge.curate.mix import parse_mix
from gptforge.curate.pipeline import Source, parse_sources, run, source_stream, write_meta
from gptforge.curate.report import CurateReport
from gptforge.outputs import check_out, staged
from gptforge.settings import (CURATE_SEED, DEDUP_STEPS, DEFAULT_RULES, RULES, TEXT_FIELD, CurateConfig, parse_rules,
                               threshold_fields)
from gptforge.tokenizer import Tokenizer

__all__ = ["CurateConfig", "CurateReport", "RULES", "DEFAULT_RULES", "DEDUP_STEPS", "curate", "curate_documents",
           "parse_rules", "threshold_fields"]


def curate(sources: list[str], out: str | Path | None, cfg: CurateConfig | None = None, *, mix: str | None = None,
           seed: int = CURATE_SEED, text_field: str = TEXT_FIELD, workers: int | None = None, overwrite: bool = False,
           png: bool = True, tokenizer: str | Path | None = None) -> CurateReport:
    """Curate `sources` (files, folders, globs, JSONL, bundled corpora; `NAME=PATH` names one) into `out`:
    JSONL shards `curated_*.jsonl` ({"text", "source", "name"} per line; `gptforge prepare OUT` reads them),
    meta.json, report.json and signals.png. `out=None` is a dry run: everything is measured, nothing written.
    With `tokenizer` (a tokenizer.json or a folder holding one) each source's kept tokens are counted and
    `mix` weights are shares of tokens; without, of bytes."""
    cfg = cfg or CurateConfig()
    srcs = parse_sources(sources)
    weights = parse_mix(mix, [s.name for s in srcs]) if mix else None
    warnings: list[str] = []
    stream = source_stream(srcs, text_field, warnings)
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else None
    if out is None:
        report, _ = run(stream, srcs, cfg, None, workers=workers, mix=weights, seed=seed, tokenizer=tok)
    else:
        out = check_out(out, "curated", overwrite=overwrite,
                        inputs=[s.spec for s in srcs if Path(s.spec).exists()] + ([tokenizer] if tokenizer else []))
        with staged(out, "curated documents") as tmp:
            report, shards = run(stream, srcs, cfg, tmp, workers=workers, mix=weights, seed=seed, tokenizer=tok)
            report.warnings = list(dict.fromkeys(warnings))
            write_meta(tmp, srcs, cfg, report, shards, seed)
            report.write_json(tmp / "report.json")
            if png:
                report.write_png(tmp / "signals.png")
    report.warnings = list(dict.fromkeys(warnings))  # the sources are read twice: each warning once
    return report


def curate_documents(docs: list[Document], cfg: CurateConfig | None = None, *, workers: int | None = None,
                     seed: int = 0) -> tuple[list[Document], CurateReport]:
    """The same steps over documents in memory (`gptforge prepare --curate`): the kept documents, in order."""
    cfg = cfg or CurateConfig()
    src = [Source("input", "input")]
    kept: list[Document] = []

    class Sink:
        shards: list = []

        def write(self, record: dict) -> None:
            kept.append(Document(record["name"], record["text"]))

        def close(self) -> None:
            pass

    with tempfile.TemporaryDirectory(prefix="gptforge-curate-") as tmp:
        report, _ = run(lambda: ((0, d) for d in docs if d.text), src, cfg, Path(tmp), workers=workers, seed=seed,
                        sink=Sink())
    return kept, report
