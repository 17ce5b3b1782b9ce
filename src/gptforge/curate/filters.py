"""Quality rules: each is named, reads signals measured once per document, and takes its threshold from
CurateConfig. Gopher's quality and repetition rules (Rae et al. 2021, "Scaling Language Models", appendix A),
C4's line rules (Raffel et al. 2020, section 2.2), language identification (py3langid, when installed).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from itertools import repeat

import numpy as np

from gptforge.curate.dedup import ngram_hashes, normalized_words, word_ids
from gptforge.errors import GptforgeError
from gptforge.settings import CurateConfig

try:  # language ID: langid.py's model, modernised; installed with the `curate` extra
    from py3langid.langid import MODEL_FILE, LanguageIdentifier
except ImportError:
    LanguageIdentifier = None

STOP_WORDS = frozenset(("the", "be", "to", "of", "and", "that", "have", "with"))
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "‣", "⁃", "◦", "- ", "* ", "+ ")
_PARAGRAPH = re.compile(r"\n\s*\n")
# ASCII bytes that are letters or digits; every non-ASCII byte counts as one too (mostly letters of other scripts)
_ALNUM = np.zeros(256, dtype=bool)
_ALNUM[[*range(48, 58), *range(65, 91), *range(97, 123), *range(128, 256)]] = True
_SPACE = np.zeros(256, dtype=bool)
_SPACE[[9, 10, 11, 12, 13, 32]] = True
_ALPHA = np.zeros(256, dtype=np.int32)
_ALPHA[[*range(65, 91), *range(97, 123), *range(128, 256)]] = 1


def _repeats(items: list[str]) -> tuple[float, float]:
    """Share of items that repeat an earlier one, and share of characters in those repeats."""
    if not items:
        return 0.0, 0.0
    counts = Counter(items)
    chars = sum(map(len, items))
    return (len(items) - len(counts)) / len(items), (chars - sum(map(len, counts))) / max(1, chars)


def _dup_mask(h: np.ndarray) -> np.ndarray:
    """True where a value occurs more than once in `h`."""
    order = np.argsort(h, kind="stable")
    s = h[order]
    eq = s[1:] == s[:-1]
    dup_sorted = np.zeros(len(h), dtype=bool)
    dup_sorted[1:] |= eq
    dup_sorted[:-1] |= eq
    out = np.empty(len(h), dtype=bool)
    out[order] = dup_sorted
    return out


def ngram_signals(ids: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """Gopher's n-gram repetition: the share of word characters in the most frequent 2/3/4-gram, and in all
    repeated 5..10-grams (each character counted once however many repeats cover it)."""
    total = max(1, int(lengths.sum()))
    out = {}
    for n in (2, 3, 4):
        h = ngram_hashes(ids, n)
        out[f"top_{n}gram"] = 0.0
        if len(h) < 2:
            continue
        srt = np.sort(h)
        bounds = np.flatnonzero(np.concatenate(([True], srt[1:] != srt[:-1], [True])))
        runs = np.diff(bounds)
        best = int(np.argmax(runs))
        if runs[best] > 1:
            at = int(np.argmax(h == srt[bounds[best]]))  # first occurrence, for its characters
            out[f"top_{n}gram"] = float(runs[best] * lengths[at:at + n].sum() / total)
    dup5 = _dup_mask(ngram_hashes(ids, 5)) if len(ids) >= 5 else np.zeros(0, dtype=bool)
    for n in range(5, 11):
        m = len(ids) - n + 1
        if m <= 0:
            out[f"dup_{n}gram"] = 0.0
            continue
        if n == 5:
            dup = dup5
        else:  # an n-gram repeats only if its first and last 5-grams do: hash just those positions
            cand = np.flatnonzero(dup5[:m] & dup5[n - 5:n - 5 + m])
            dup = np.zeros(m, dtype=bool)
            if len(cand):
                h = ids[cand].astype(np.uint64)
                with np.errstate(over="ignore"):
                    for k in range(1, n):
                        h = h * np.uint64(0x9E3779B97F4A7C15) + ids[cand + k].astype(np.uint64)
                dup[cand] = _dup_mask(h)
        starts = np.flatnonzero(dup)  # words [i, i + n) are covered for each repeated n-gram at i
        edges = np.zeros(len(ids) + 1, dtype=np.int32)
        edges[starts] += 1
        edges[starts + n] -= 1
        out[f"dup_{n}gram"] = float(lengths[np.cumsum(edges[:-1]) > 0].sum() / total) if len(starts) else 0.0
    return out


def _word_stats(text: str) -> tuple[int, int, int]:
    """(words, their characters, words holding a letter), words split at ASCII whitespace. Runs on the UTF-8
    bytes in numpy; a non-ASCII byte counts as part of a letter (most are)."""
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    if len(data) == 0:
        return 0, 0, 0
    inside = ~_SPACE[data]
    edges = np.diff(np.concatenate(([False], inside, [False])).view(np.int8))
    starts = np.flatnonzero(edges == 1)  # a word runs from here to the next space
    alpha = int(np.count_nonzero(np.add.reduceat(_ALPHA[data], starts))) if len(starts) else 0
    spaces = len(data) - int(np.count_nonzero(inside))  # whitespace is ASCII: as many characters as bytes
    return len(starts), len(text) - spaces, alpha


def text_signals(text: str, vocab: list[str], ids: np.ndarray, lines: list[str]) -> dict[str, float]:
    """Every signal the document rules read, measured once. `lines` are the stripped non-empty lines."""
    n_words, chars, alpha = _word_stats(text)
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    non_space = int((~_SPACE[data]).sum())
    paragraphs = [p.strip() for p in _PARAGRAPH.split(text) if p.strip()]
    dup_lines, dup_line_chars = _repeats(lines)
    dup_paras, dup_para_chars = _repeats(paragraphs)
    lengths = np.fromiter(map(len, vocab), dtype=np.int64, count=len(vocab))[ids] if len(ids) else np.zeros(0, np.int64)
    sig = {
        "words": float(n_words),
        "mean_word_length": chars / max(1, n_words),
        "symbol_ratio": (text.count("#") + text.count("...") + text.count("…")) / max(1, n_words),
        "alnum_ratio": float(_ALNUM[data].sum() / max(1, non_space)),
        "bullet_lines": sum(map(str.startswith, lines, repeat(BULLETS))) / max(1, len(lines)),
        "ellipsis_lines": sum(map(str.endswith, lines, repeat(("...", "…")))) / max(1, len(lines)),
        "alpha_words": alpha / max(1, n_words),
        "stop_words": float(len(STOP_WORDS.intersection(vocab))),
        "dup_line_fraction": dup_lines, "dup_line_chars": dup_line_chars,
        "dup_para_fraction": dup_paras, "dup_para_chars": dup_para_chars,
    }
    sig.update(ngram_signals(ids, lengths))
    return sig


def measure(text: str) -> tuple[dict[str, float], list[str], np.ndarray, list[str], list[str]]:
    """(signals, normalized words, their document-local ids, the vocabulary, the stripped non-empty lines)."""
    words = normalized_words(text)
    ids, vocab = word_ids(words)
    lines = list(filter(None, map(str.strip, text.split("\n"))))
    return text_signals(text, vocab, ids, lines), words, ids, vocab, lines


# rule -> does the document pass? (signals, config); c4, language and perplexity are measured by their own code
CHECKS: dict[str, Callable[[dict[str, float], CurateConfig], bool]] = {
    "length": lambda s, c: c.min_words <= s["words"] <= c.max_words,
    "mean_word_length": lambda s, c: c.min_mean_word_length <= s["mean_word_length"] <= c.max_mean_word_length,
    "symbol_ratio": lambda s, c: s["symbol_ratio"] <= c.max_symbol_ratio,
    "alnum_ratio": lambda s, c: s["alnum_ratio"] >= c.min_alnum_ratio,
    "bullet_lines": lambda s, c: s["bullet_lines"] <= c.max_bullet_lines,
    "ellipsis_lines": lambda s, c: s["ellipsis_lines"] <= c.max_ellipsis_lines,
    "alpha_words": lambda s, c: s["alpha_words"] >= c.min_alpha_words,
    "stop_words": lambda s, c: s["stop_words"] >= c.min_stop_words,
    "dup_lines": lambda s, c: s["dup_line_fraction"] <= c.max_dup_line_fraction and s["dup_line_chars"] <= c.max_dup_line_chars,
    "dup_paragraphs": lambda s, c: s["dup_para_fraction"] <= c.max_dup_para_fraction and s["dup_para_chars"] <= c.max_dup_para_chars,
    "top_ngrams": lambda s, c: all(s[f"top_{n}gram"] <= t for n, t in zip((2, 3, 4), c.max_top_ngram)),
    "dup_ngrams": lambda s, c: all(s[f"dup_{n}gram"] <= t for n, t in zip(range(5, 11), c.max_dup_ngram)),
    "language": lambda s, c: s.get("language_ok", 1.0) > 0,
    "perplexity": lambda s, c: s.get("perplexity", 0.0) <= c.max_perplexity,
}


def first_failure(signals: dict[str, float], cfg: CurateConfig) -> str | None:
    """The first rule of `cfg.rules` (in RULES order) that the document fails, or None."""
    for rule in cfg.rules:
        if rule != "c4" and not CHECKS[rule](signals, cfg):
            return rule
    return None


# --- C4's line rules: they rewrite the document, then judge what is left ----------------------------------

_TERMINAL = (".", "!", "?", '"', "'", "”", "’")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)")


def c4_clean(text: str, cfg: CurateConfig) -> str | None:
    """C4's rules: keep lines that end in terminal punctuation, have enough words, no word over 1,000
    characters and no 'javascript' or cookie/policy notice; drop the document if it holds 'lorem ipsum' or a
    curly brace (C4's guard against code) or fewer than `c4_min_sentences` sentences remain. None if dropped."""
    low = text.lower()
    if "lorem ipsum" in low or "{" in text:
        return None
    kept = []
    for line in text.split("\n"):
        s = line.strip()
        ls = s.lower()
        if (not s.endswith(_TERMINAL) or len(s.split()) < cfg.c4_min_line_words or "javascript" in ls
                or any(p in ls for p in _POLICY) or any(len(w) > 1000 for w in s.split())):
            continue
        kept.append(line)
    out = "\n".join(kept)
    if len(_SENTENCE_END.findall(out)) < cfg.c4_min_sentences:
        return None
    return out + ("\n" if text.endswith("\n") and out else "")


_identifier = None


def language(text: str) -> tuple[str, float]:
    """(ISO 639-1 code, probability) of the first 10,000 characters, by py3langid."""
    global _identifier
    if LanguageIdentifier is None:
        raise GptforgeError("the language rule needs py3langid: pip install 'gptforge[curate]' (or drop the rule)")
    if _identifier is None:  # loaded once per worker process
        _identifier = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, prob = _identifier.classify(text[:10_000])
    return lang, float(prob)
