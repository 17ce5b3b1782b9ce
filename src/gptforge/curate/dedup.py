"""Deduplication: exact (a hash of the normalised text), near (MinHash + LSH, verified on the signatures) and
repeated long lines across documents (boilerplate). Which copy stays is always the first in input order.

Only compact per-document state is kept: an 8-byte exact key, a MinHash signature (num_perm x 4 bytes, spilled
to a file on disk) and the hashes of long lines (spilled to 16 partition files, counted one partition at a time),
so memory grows with the number of documents and not with their bytes (the datatrove / NeMo Curator layout).
"""

from __future__ import annotations

import hashlib
import string
import zlib
from pathlib import Path

import numpy as np

try:  # MinHash in Rust: ~30x our numpy permutations on the same shingles (benchmarks/curate.py)
    import rensa
except ImportError:  # the `curate` extra is optional; the numpy MinHash below gives the same kind of signature
    rensa = None

_PUNCT = str.maketrans({c: " " for c in string.punctuation})
_MIX = np.uint64(0x9E3779B97F4A7C15)
U64 = np.uint64


def normalized_words(text: str) -> list[str]:
    """Lower-case words with punctuation removed: what dedup and the repetition rules compare."""
    return text.lower().translate(_PUNCT).split()


def exact_key(words: list[str]) -> int:
    """64-bit hash of a document's normalized_words: copies differing only in case, punctuation or whitespace
    are exact duplicates."""
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "little")


def word_ids(words: list[str]) -> tuple[np.ndarray, list[str]]:
    """Document-local ids of `words` (first seen = 0) and the vocabulary in id order."""
    vocab = list(dict.fromkeys(words))  # first-seen order, in C
    index = dict(zip(vocab, range(len(vocab))))
    return np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words)), vocab


def word_hashes(ids: np.ndarray, vocab: list[str]) -> np.ndarray:
    """A hash per word that is the same in every process and run (CRC-32 of its UTF-8; Python's hash() is
    salted per process)."""
    table = np.fromiter(map(zlib.crc32, map(str.encode, vocab)), dtype=np.uint64, count=len(vocab))
    return table[ids]


def _finalize(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: spreads every input bit over the output, so band slices are uniform."""
    h = h ^ (h >> U64(30))
    h = h * U64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> U64(27))
    h = h * U64(0x94D049BB133111EB)
    return h ^ (h >> U64(31))


def ngram_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """One uint64 per run of n consecutive values of `h` (a polynomial hash, wrapping mod 2^64)."""
    m = len(h) - n + 1
    if m <= 0:
        return np.empty(0, dtype=np.uint64)
    out = h[:m].astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        for k in range(1, n):
            out = out * _MIX + h[k:k + m].astype(np.uint64, copy=False)
    return out


def shingles(hashes: np.ndarray, n: int) -> np.ndarray:
    """The word n-gram shingles of a document; a document shorter than n words is one shingle."""
    if len(hashes) == 0:
        return np.empty(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _finalize(ngram_hashes(hashes, min(n, len(hashes))))


class MinHasher:
    """num_perm MinHash values per document from its shingle hashes; 'rensa' (Rust) when installed, else numpy
    with the universal multiply-shift family h(x) = (a x + b) >> 32 over uint64."""

    def __init__(self, num_perm: int = 128, seed: int = 0, backend: str = "auto"):
        if backend == "auto":
            backend = "rensa" if rensa is not None else "numpy"
        if backend == "rensa" and rensa is None:
            raise ImportError("rensa is not installed: pip install 'gptforge[curate]'")
        self.num_perm, self.seed, self.backend = num_perm, seed, backend
        rng = np.random.default_rng([seed, 0x5EED])
        self._a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | U64(1)
        self._b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)

    def signatures(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """(documents, num_perm) uint32. An empty set gets the all-ones signature."""
        if not shingle_sets:
            return np.empty((0, self.num_perm), dtype=np.uint32)
        if self.backend == "rensa":
            return self._rensa(shingle_sets)
        return np.stack([self._numpy(s) for s in shingle_sets])

    def _rensa(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        sizes = np.fromiter((len(s) for s in shingle_sets), dtype=np.uint64, count=len(shingle_sets))
        offsets = np.concatenate([np.zeros(1, np.uint64), np.cumsum(sizes, dtype=np.uint64)])
        flat = np.concatenate(shingle_sets) if int(offsets[-1]) else np.empty(0, np.uint64)
        m = rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets, self.num_perm, self.seed)
        sig = np.asarray(m.to_rows(), dtype=np.uint32).reshape(len(shingle_sets), self.num_perm)
        sig[sizes == 0] = np.iinfo(np.uint32).max
        return sig

    def _numpy(self, s: np.ndarray) -> np.ndarray:
        sig = np.full(self.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for i in range(0, len(s), 8192):  # blocks keep the (num_perm, block) product in cache
                v = np.multiply.outer(self._a, s[i:i + 8192])
                v += self._b[:, None]
                v >>= U64(32)
                np.minimum(sig, v.min(axis=1), out=sig)
        return np.minimum(sig, np.iinfo(np.uint32).max).astype(np.uint32)


def lsh_shape(num_perm: int, jaccard: float) -> tuple[int, int]:
    """(bands, rows): the most rows per band that still makes a pair 0.05 below the threshold a candidate with
    probability >= 0.999, so recall is decided by the signature check, not by LSH (false candidates only cost
    a comparison)."""
    for rows in range(num_perm, 0, -1):
        bands = num_perm // rows
        if 1 - (1 - max(jaccard - 0.05, 0.01) ** rows) ** bands >= 0.999:
            return bands, rows
    return num_perm, 1


def _band_keys(cols: np.ndarray, band: int) -> np.ndarray:
    """One uint64 per row of a band's signature columns."""
    cols = cols.astype(np.uint64)
    key = np.full(len(cols), U64(band) + U64(1), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(cols.shape[1]):
            key = _finalize(key * _MIX + cols[:, j])
    return key


def near_duplicate_groups(sig: np.ndarray, jaccard: float, rows: np.ndarray | None = None) -> np.ndarray:
    """For the documents `rows` of `sig` (all by default; in input order), the position in `rows` of the
    document each is grouped with: its own if it is kept, else the first document of its group (the
    connected components of `similar_pairs`)."""
    n = len(sig) if rows is None else len(rows)
    u, v = similar_pairs(sig, jaccard, rows)
    return _components(np.arange(n, dtype=np.int64), u, v)


def similar_pairs(sig: np.ndarray, jaccard: float, rows: np.ndarray | None = None,
                  block: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (positions in `rows`) whose signatures agree on at least `jaccard` of the positions, among the
    pairs that share an LSH bucket: each bucket member is checked against the bucket's first document and its
    predecessor. `sig` may be a memory map: one band of columns is read at a time."""
    rows = np.arange(len(sig)) if rows is None else np.asarray(rows)
    us, vs = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    if len(rows) < 2:
        return us[0], vs[0]
    bands, width = lsh_shape(sig.shape[1], jaccard)
    for band in range(bands):
        key = _band_keys(np.asarray(sig[rows, band * width:(band + 1) * width]), band)
        order = np.argsort(key, kind="stable")  # stable: within a bucket, input order
        k = key[order]
        same = np.flatnonzero(k[1:] == k[:-1]) + 1  # sorted positions whose bucket began earlier
        if len(same) == 0:
            continue
        starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
        head = order[starts[np.searchsorted(starts, same, side="right") - 1]]
        for a in (head, order[same - 1]):
            b = order[same]
            for i in range(0, len(b), block):
                a_i, b_i = a[i:i + block], b[i:i + block]
                agree = (np.asarray(sig[rows[a_i]]) == np.asarray(sig[rows[b_i]])).mean(axis=1)
                ok = agree >= jaccard
                us.append(a_i[ok])
                vs.append(b_i[ok])
    return np.concatenate(us), np.concatenate(vs)


def _components(labels: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Connected components by min-label propagation: every group is labelled by its first member."""
    if len(u) == 0:
        return labels
    while True:
        m = np.minimum(labels[u], labels[v])
        before = labels.copy()
        np.minimum.at(labels, u, m)
        np.minimum.at(labels, v, m)
        labels = labels[labels]  # pointer jumping: labels[x] <= x, so this only lowers
        if np.array_equal(labels, before):
            return labels


def exact_groups(keys: np.ndarray) -> np.ndarray:
    """For each exact key, the index of its first occurrence."""
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    return first[inverse].astype(np.int64)


def line_key(line: str) -> int:
    """64-bit hash of a line without its surrounding whitespace."""
    return int.from_bytes(hashlib.blake2b(line.strip().encode(), digest_size=8).digest(), "little")


class LineCounter:
    """(document, line hash) pairs spilled to 16 partition files by the hash's top bits, then counted one
    partition at a time: memory is 1/16 of the pairs, and the pairs are 16 bytes per long line."""

    PARTS = 16

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._files = [open(folder / f"lines_{p:02d}.bin", "wb") for p in range(self.PARTS)]

    def add(self, docs: np.ndarray, hashes: np.ndarray) -> None:
        part = (hashes >> U64(60)).astype(np.int64)
        pairs = np.stack([docs.astype(np.uint64), hashes], axis=1)
        for p in np.unique(part):
            self._files[p].write(pairs[part == p].tobytes())

    def boilerplate(self, kept: np.ndarray, min_docs: int) -> dict[int, int]:
        """Line hash -> the first kept document holding it, for lines in at least `min_docs` kept documents."""
        for f in self._files:
            f.close()
        out: dict[int, int] = {}
        for p in range(self.PARTS):
            pairs = np.fromfile(self.folder / f"lines_{p:02d}.bin", dtype=np.uint64).reshape(-1, 2)
            pairs = pairs[kept[pairs[:, 0].astype(np.int64)]]
            if not len(pairs):
                continue
            order = np.lexsort((pairs[:, 0], pairs[:, 1]))  # by hash, then document
            h, d = pairs[order, 1], pairs[order, 0]
            uniq, first, counts = np.unique(h, return_index=True, return_counts=True)
            for i in np.flatnonzero(counts >= min_docs):
                out[int(uniq[i])] = int(d[first[i]])
        return out
