"""A tiny seeded JSONL corpus and its knowledge base, shared by the benchmark smoke tests.

``build_tiny_kb`` writes ``root/corpus.jsonl`` (``num_docs`` passages of ``doc_words`` words
drawn from ``words`` with the caller's generator) and builds ``root/kb`` from it. The caller
passes its own ``rng`` and keeps drawing from it afterwards (questions, queries), so each
test's world stays exactly what it was when every test wrote its own corpus.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

WORDS = (
    "river",
    "mountain",
    "king",
    "queen",
    "city",
    "battle",
    "music",
    "painter",
    "novel",
    "ocean",
    "island",
    "war",
)
"""The default vocabulary: a few topics that questions about kings and rivers can hit."""


def write_corpus(
    path: Path,
    rng: np.random.Generator,
    words: Sequence[str] = WORDS,
    num_docs: int = 40,
    doc_words: int = 30,
) -> None:
    """Write ``num_docs`` passages ``{"id": "d<i>", "title": "Doc <i>", "text": ...}``."""
    with path.open("w") as f:
        for i in range(num_docs):
            text = " ".join(rng.choice(list(words), size=doc_words))
            f.write(json.dumps({"id": f"d{i}", "title": f"Doc {i}", "text": text}) + "\n")


def build_tiny_kb(
    root: Path,
    rng: np.random.Generator,
    words: Sequence[str] = WORDS,
    num_docs: int = 40,
) -> Path:
    """Write ``root/corpus.jsonl`` with ``write_corpus``, build ``root/kb`` and return it."""
    # Imported here so that collecting the tests does not load the encoder stack.
    from ralmspec_vllm.retrieval.kb import build_index

    write_corpus(root / "corpus.jsonl", rng, words, num_docs=num_docs)
    build_index(root / "kb", sources=(), corpus=root / "corpus.jsonl", show_progress=False)
    return root / "kb"
