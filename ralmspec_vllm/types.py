"""Small immutable messages passed between components.

Nothing here imports numpy, vLLM or gRPC: these are the project's own types, and the gRPC
client maps proto messages onto them so no generated type leaks into the core.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Hit:
    """One retrieved document: its stable integer id and the knowledge base's score for it."""

    doc_id: int
    score: float


@dataclass(frozen=True, slots=True)
class Document:
    """A knowledge-base passage. ``text`` excludes the title; prompts use ``title + text``."""

    doc_id: int
    title: str
    text: str

    @property
    def contents(self) -> str:
        """The passage as it is placed in front of the prompt."""
        return f"{self.title}\n{self.text}" if self.title else self.text


@dataclass(frozen=True, slots=True)
class BM25Params:
    """Okapi BM25 parameters, identical in meaning to rank-bm25's ``BM25Okapi``."""

    k1: float = 1.5
    b: float = 0.75
    epsilon: float = 0.25


@dataclass(frozen=True, slots=True)
class RetrieverInfo:
    """What a retriever serves: backend name, corpus size, vector dimension (0 for sparse)."""

    backend: str
    num_docs: int
    dim: int
    metric: str
    bm25: BM25Params | None = None
    index_dir: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def rank_key(hit: Hit) -> tuple[float, int]:
    """The one tie-break rule used everywhere: score descending, then doc id ascending."""
    return (-hit.score, hit.doc_id)
