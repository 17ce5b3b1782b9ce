"""What curation removed and why: documents and bytes per source and per rule, PII counts, a seeded sample of
removed documents per rule, and fixed-bin histograms of the quality signals (kept vs removed; a PNG when
matplotlib is installed). All of it is bounded in size whatever the corpus."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:  # the PNG is optional (the `report` extra); the JSON carries the same counts
    plt = None

# signal -> (low, high, log10 scale?) of its 40 histogram bins
HISTOGRAMS = {
    "words": (0.0, 6.0, True), "mean_word_length": (0.0, 15.0, False), "symbol_ratio": (0.0, 0.5, False),
    "alnum_ratio": (0.0, 1.0, False), "alpha_words": (0.0, 1.0, False), "stop_words": (0.0, 8.0, False),
    "dup_line_fraction": (0.0, 1.0, False), "dup_para_fraction": (0.0, 1.0, False),
    "top_2gram": (0.0, 0.5, False), "dup_5gram": (0.0, 1.0, False), "language_score": (0.0, 1.0, False),
    "perplexity": (0.0, 5.0, True),
}
BINS = 40
SAMPLE_CHARS = 300


def _bucket() -> dict[str, int]:
    return {"documents": 0, "bytes": 0}


@dataclass
class CurateReport:
    """Counts of one curation run; `to_dict()` is what --json prints and report.json holds."""

    samples_per_rule: int = 5
    seed: int = 0
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    removed: dict[str, dict[str, int]] = field(default_factory=dict)  # rule -> documents, bytes
    removed_by_source: dict[str, dict[str, int]] = field(default_factory=dict)  # source -> rule -> documents
    boilerplate: dict[str, int] = field(default_factory=lambda: {"lines": 0, "bytes": 0, "distinct": 0})
    c4_lines: dict[str, int] = field(default_factory=lambda: {"documents_changed": 0, "bytes": 0})
    pii: dict[str, int] = field(default_factory=dict)
    samples: dict[str, list[dict]] = field(default_factory=dict)
    mix: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _seen: dict[str, int] = field(default_factory=dict, repr=False)
    _hist: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def source(self, name: str) -> dict[str, int]:
        return self.sources.setdefault(name, {"documents_in": 0, "bytes_in": 0, "documents_out": 0, "bytes_out": 0})

    def observe(self, signals: dict[str, float], removed: bool) -> None:
        """Add one document's signals to the kept (row 0) or removed (row 1) histograms."""
        for name, (lo, hi, log) in HISTOGRAMS.items():
            if name not in signals:
                continue
            v = signals[name]
            v = np.log10(max(v, 1.0)) if log else v
            b = min(BINS - 1, max(0, int((v - lo) / (hi - lo) * BINS)))
            self._hist.setdefault(name, np.zeros((2, BINS), dtype=np.int64))[int(removed), b] += 1

    def remove(self, rule: str, source: str, name: str, text: str, nbytes: int, detail: str = "") -> None:
        """Count a removed document under `rule`, and keep it in the rule's sample by reservoir sampling."""
        r = self.removed.setdefault(rule, _bucket())
        r["documents"] += 1
        r["bytes"] += nbytes
        per = self.removed_by_source.setdefault(source, {})
        per[rule] = per.get(rule, 0) + 1
        seen = self._seen.get(rule, 0)
        self._seen[rule] = seen + 1
        sample = self.samples.setdefault(rule, [])
        entry = {"name": name, "source": source, "detail": detail, "text": text[:SAMPLE_CHARS]}
        if len(sample) < self.samples_per_rule:
            sample.append(entry)
        else:
            j = int(np.random.default_rng([self.seed, seen]).integers(0, seen + 1))
            if j < self.samples_per_rule:
                sample[j] = entry

    def to_dict(self) -> dict:
        totals = {k: sum(s[k] for s in self.sources.values()) for k in ("documents_in", "bytes_in", "documents_out", "bytes_out")}
        return {"totals": totals, "sources": self.sources, "removed": self.removed,
                "removed_by_source": self.removed_by_source, "boilerplate_lines": self.boilerplate,
                "c4_lines": self.c4_lines, "pii": self.pii, "mix": self.mix, "seconds": self.seconds,
                "warnings": self.warnings, "samples": self.samples,
                "histograms": {k: {"range": HISTOGRAMS[k][:2], "log10": HISTOGRAMS[k][2], "kept": v[0].tolist(),
                                   "removed": v[1].tolist()} for k, v in self._hist.items()}}

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2))

    def write_png(self, path: Path) -> bool:
        """Histograms of the signals, kept vs removed; False (nothing written) without matplotlib."""
        if plt is None or not self._hist:
            return False
        names = list(self._hist)
        cols = 4
        rows = (len(names) + cols - 1) // cols
        fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            lo, hi, log = HISTOGRAMS[name]
            edges = np.linspace(lo, hi, BINS + 1)
            for row, label, colour in ((0, "kept", "tab:blue"), (1, "removed", "tab:red")):
                ax.stairs(self._hist[name][row], edges, label=label, color=colour, fill=row == 0, alpha=0.6)
            ax.set_title(f"log10 {name}" if log else name, fontsize=9)
            ax.tick_params(labelsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return True

    def format(self) -> str:
        """A plain-text summary: per source in/out, per rule removed, boilerplate, PII."""
        lines = [f"{'source':<28} {'docs in':>9} {'docs out':>9} {'MB in':>9} {'MB out':>9}"]
        for name, s in self.sources.items():
            lines.append(f"{name[:28]:<28} {s['documents_in']:>9,} {s['documents_out']:>9,} "
                         f"{s['bytes_in'] / 1e6:>9.2f} {s['bytes_out'] / 1e6:>9.2f}")
        if self.removed:
            lines.append(f"{'removed by rule':<28} {'docs':>9} {'MB':>9}")
            for rule, r in sorted(self.removed.items(), key=lambda kv: -kv[1]["documents"]):
                lines.append(f"  {rule:<26} {r['documents']:>9,} {r['bytes'] / 1e6:>9.2f}")
        if self.boilerplate["lines"]:
            b = self.boilerplate
            lines.append(f"boilerplate: {b['lines']:,} lines ({b['distinct']:,} distinct, {b['bytes'] / 1e6:.2f} MB) removed")
        if self.c4_lines["documents_changed"]:
            lines.append(f"c4 line rules: {self.c4_lines['bytes'] / 1e6:.2f} MB of lines removed from "
                         f"{self.c4_lines['documents_changed']:,} documents")
        if self.pii:
            lines.append("redacted: " + ", ".join(f"{k} {v:,}" for k, v in sorted(self.pii.items())))
        if self.mix:
            unit = "tokens" if "tokens" in next(iter(self.mix.values())) else "bytes"
            lines.append(f"mix (by {unit}): " + ", ".join(f"{n} {m['share']:.1%} (weight {m['weight']:.1%}, "
                                                          f"{m['documents']:,} documents)" for n, m in self.mix.items()))
        return "\n".join(lines)
