"""Mixing: each source gets a share of the output, reached by repeating (up-sampling) or sampling (down-
sampling) whole documents with a seeded generator, so the same inputs and seed give the same mix."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from gptforge.errors import GptforgeError


def parse_mix(spec: str, names: list[str]) -> dict[str, float]:
    """Weights from `books=0.6,code=0.4` or a YAML file mapping source names to weights; normalised to sum 1.
    Every name must be one of `names` (the sources), and every source needs a weight."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml", ".json") or path.is_file():
        if not path.is_file():
            raise GptforgeError(f"--mix file not found: {spec}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise GptforgeError(f"--mix file {spec} is not valid YAML ({str(e).splitlines()[0]}); write name: weight lines") from None
        if not isinstance(raw, dict) or not raw:
            raise GptforgeError(f"--mix file {spec} must be a mapping of source name to weight, e.g. 'books: 0.6'")
        items = [(str(k), v) for k, v in raw.items()]
    else:
        items = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, eq, value = part.partition("=")
            if not eq or not name.strip():
                raise GptforgeError(f"--mix {spec!r}: {part!r} is not NAME=WEIGHT (e.g. books=0.6,code=0.4)")
            items.append((name.strip(), value.strip()))
    weights: dict[str, float] = {}
    for name, value in items:
        try:
            w = float(value)
        except (TypeError, ValueError):
            raise GptforgeError(f"--mix: the weight of {name!r} is {value!r}, not a number") from None
        if not math.isfinite(w) or w < 0:
            raise GptforgeError(f"--mix: the weight of {name!r} must be a finite number >= 0, got {value!r}")
        if name not in names:
            raise GptforgeError(f"--mix names {name!r}, which is not a source; sources: {', '.join(names)} "
                                "(name one with NAME=PATH)")
        weights[name] = w
    missing = [n for n in names if n not in weights]
    if missing:
        raise GptforgeError(f"--mix gives no weight to the source {missing[0]!r}; give every source a weight (0 drops it)")
    total = sum(weights.values())
    if total <= 0:
        raise GptforgeError("--mix: the weights sum to 0; give at least one source a positive weight")
    return {n: w / total for n, w in weights.items()}


def plan_copies(sizes: dict[str, np.ndarray], weights: dict[str, float], seed: int,
                total: float | None = None) -> dict[str, np.ndarray]:
    """How many times each document is written so that source s makes up weights[s] of `total` (default: the
    sum of all sizes) in expectation: floor(r) copies of every document, one more with probability frac(r),
    where r = target / the source's size. Sizes are in whatever unit the caller mixes by (bytes or tokens)."""
    total = float(sum(float(s.sum()) for s in sizes.values())) if total is None else float(total)
    out = {}
    for i, (name, size) in enumerate(sizes.items()):
        have = float(size.sum())
        if weights[name] > 0 and have <= 0:
            raise GptforgeError(f"--mix gives {name!r} weight {weights[name]:.3g}, but nothing of it is left after curation")
        r = weights[name] * total / have if have > 0 else 0.0
        rng = np.random.default_rng([seed, i])
        out[name] = (math.floor(r) + (rng.random(len(size)) < r - math.floor(r))).astype(np.int64)
    return out
