"""The typed settings of `gptforge curate` (and `prepare --curate`): every rule's threshold, once.

Each field's metadata holds its help text; the CLI builds one flag per field from it (`min_words` ->
`--min-words`), so a default lives here and nowhere else. The thresholds are the published ones: Gopher's
quality and repetition rules (Rae et al. 2021, appendix A) and C4's line rules (Raffel et al. 2020, section 2.2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from gptforge.errors import GptforgeError

# Document rules, in the order they run: a removed document is counted under the first rule it fails.
RULES = ("length", "mean_word_length", "symbol_ratio", "alnum_ratio", "bullet_lines", "ellipsis_lines",
         "alpha_words", "stop_words", "dup_lines", "dup_paragraphs", "top_ngrams", "dup_ngrams",
         "c4", "language", "perplexity")
# Off by default: c4 rewrites lines (and drops code, verse and lists), language and perplexity need a library
# or a checkpoint, and alnum_ratio is not one of the published rules.
DEFAULT_RULES = tuple(r for r in RULES if r not in ("c4", "language", "perplexity", "alnum_ratio"))
DEDUP_STEPS = ("exact", "near", "boilerplate")


def _f(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class CurateConfig:
    """What `curate` does and with which thresholds. Build it from flags with `from_flags` (validated)."""

    rules: tuple[str, ...] = _f(DEFAULT_RULES, "quality rules to run: a list replaces the default set; "
                                "+name/-name adds to or removes from it (e.g. +c4,-dup_ngrams)", flag=False)
    dedup: tuple[str, ...] = _f(DEDUP_STEPS, "dedup steps to run", flag=False)
    # dedup
    jaccard: float = _f(0.8, "near-duplicate threshold: documents whose word 5-gram sets overlap at least this much "
                        "(Jaccard, estimated by MinHash) are one group, the first is kept")
    num_perm: int = _f(128, "MinHash permutations (more is a finer Jaccard estimate, slower)")
    shingle_words: int = _f(5, "words per shingle for near-duplicate detection")
    boilerplate_min_chars: int = _f(60, "a line this long or longer seen in --boilerplate-min-docs documents is "
                                    "boilerplate: kept where first seen, removed from the others")
    boilerplate_min_docs: int = _f(3, "documents a long line must appear in to count as boilerplate")
    # Gopher quality
    min_words: int = _f(50, "length: fewest words in a document")
    max_words: int = _f(100_000, "length: most words in a document")
    min_mean_word_length: float = _f(3.0, "mean_word_length: lower bound (characters)")
    max_mean_word_length: float = _f(10.0, "mean_word_length: upper bound (characters)")
    max_symbol_ratio: float = _f(0.1, "symbol_ratio: most '#' and '...' per word")
    min_alnum_ratio: float = _f(0.5, "alnum_ratio: least share of non-space characters that are letters or digits")
    max_bullet_lines: float = _f(0.9, "bullet_lines: most share of lines starting with a bullet")
    max_ellipsis_lines: float = _f(0.3, "ellipsis_lines: most share of lines ending with an ellipsis")
    min_alpha_words: float = _f(0.8, "alpha_words: least share of words holding a letter")
    min_stop_words: int = _f(2, "stop_words: fewest distinct English stop words (the, be, to, of, and, that, have, with)")
    # Gopher repetition
    max_dup_line_fraction: float = _f(0.3, "dup_lines: most share of lines that are repeats")
    max_dup_line_chars: float = _f(0.2, "dup_lines: most share of characters in repeated lines")
    max_dup_para_fraction: float = _f(0.3, "dup_paragraphs: most share of paragraphs that are repeats")
    max_dup_para_chars: float = _f(0.2, "dup_paragraphs: most share of characters in repeated paragraphs")
    max_top_ngram: tuple[float, ...] = _f((0.20, 0.18, 0.16), "top_ngrams: most share of characters in the most "
                                          "frequent 2-, 3- and 4-gram (three numbers)")
    max_dup_ngram: tuple[float, ...] = _f((0.15, 0.14, 0.13, 0.12, 0.11, 0.10), "dup_ngrams: most share of "
                                          "characters in repeated 5- to 10-grams (six numbers)")
    # C4
    c4_min_line_words: int = _f(3, "c4: fewest words in a kept line")
    c4_min_sentences: int = _f(3, "c4: fewest sentences in a kept document")
    # language and perplexity
    languages: tuple[str, ...] = _f(("en",), "language: ISO 639-1 codes to keep")
    min_language_score: float = _f(0.65, "language: least probability of the detected language")
    perplexity_model: str | None = _f(None, "perplexity: a gptforge checkpoint to score documents with")
    max_perplexity: float = _f(1000.0, "perplexity: most perplexity per token under --perplexity-model")
    # privacy
    pii: tuple[str, ...] = _f(("email", "phone", "ip", "key"), "PII kinds to redact", flag=False)
    keep: tuple[str, ...] = _f((), "strings never redacted (false positives)", flag=False)

    def __post_init__(self):
        unknown = [r for r in self.rules if r not in RULES]
        if unknown:
            raise GptforgeError(f"unknown rule {unknown[0]!r}; rules: {', '.join(RULES)}")
        bad = [d for d in self.dedup if d not in DEDUP_STEPS]
        if bad:
            raise GptforgeError(f"unknown dedup step {bad[0]!r}; steps: {', '.join(DEDUP_STEPS)} (or none)")
        if not 0.0 < self.jaccard <= 1.0:
            raise GptforgeError(f"--jaccard must be in (0, 1], got {self.jaccard}")
        if len(self.max_top_ngram) != 3 or len(self.max_dup_ngram) != 6:
            raise GptforgeError("--max-top-ngram takes 3 numbers (n=2,3,4) and --max-dup-ngram 6 (n=5..10)")
        if self.num_perm < 16 or self.num_perm % 8:
            raise GptforgeError(f"--num-perm must be a multiple of 8 and >= 16, got {self.num_perm}")
        if self.shingle_words < 1:
            raise GptforgeError(f"--shingle-words must be >= 1, got {self.shingle_words}")
        if "perplexity" in self.rules and not self.perplexity_model:
            raise GptforgeError("the perplexity rule needs a model: add --perplexity-model CKPT")


def parse_rules(spec: str | None, default: tuple[str, ...] = DEFAULT_RULES, what: str = "rule",
                known: tuple[str, ...] = RULES) -> tuple[str, ...]:
    """`a,b` is exactly those; `+a,-b` edits `default`; `none` is the empty set. Unknown names are an error."""
    if spec is None:
        return default
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if items == ["none"]:
        return ()
    signed = [s[0] in "+-" for s in items]
    if any(signed) and not all(signed):
        raise GptforgeError(f"{spec!r}: give either {what}s by name (the whole set) or +name/-name edits, not both")
    for s in items:
        name = s.lstrip("+-")
        if name not in known:
            raise GptforgeError(f"unknown {what} {name!r}; {what}s: {', '.join(known)}")
    if not all(signed):
        return tuple(n for n in known if n in items)
    chosen = set(default) | {s[1:] for s in items if s[0] == "+"}
    chosen -= {s[1:] for s in items if s[0] == "-"}
    return tuple(n for n in known if n in chosen)


def threshold_fields() -> list:
    """The fields that become one CLI flag each (`--min-words`, ...)."""
    return [f for f in fields(CurateConfig) if f.metadata.get("flag", True)]
