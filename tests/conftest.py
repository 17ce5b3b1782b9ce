"""Shared fixtures: a small slice of the bundled corpus, prepared once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gptforge.corpora import load_corpus
from gptforge.data import prepare


@pytest.fixture(scope="session")
def plays_dir(tmp_path_factory) -> Path:
    """Four real plays from the bundled corpus, written as files (about 0.5 MB)."""
    d = tmp_path_factory.mktemp("plays")
    for doc in load_corpus("shakespeare")[:4]:
        (d / Path(doc.name).name).write_text(doc.text, encoding="utf-8")
    return d


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, plays_dir) -> Path:
    """plays_dir tokenized with a freshly trained 512-token BPE, half the plays held out for validation."""
    out = tmp_path_factory.mktemp("data")
    prepare([str(plays_dir)], out, vocab_size=512, val_fraction=0.5, seed=0, progress=False)
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
