"""A seeded synthetic dense corpus with known nearest neighbours (shared by retrieval tests).

``SyntheticCorpus``: N unit vectors in a small dimension, with planted exact duplicates (so
ties at the top and at the k boundary are guaranteed), plus queries that are noisy copies of
chosen documents (so each query's nearest neighbour is known). ``TableEncoder`` maps query
texts to those vectors (any other text gets a deterministic hash-seeded vector), and
``ListDocumentStore`` serves ``Document`` records: together they stand in for a knowledge
base's encoder and passages in tests that must not load a real model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ralmspec_vllm.types import Document

NUM_DOCS = 600
DIM = 24
# Docs DUP_OF's copies: DUP_IDS all hold exactly the vector of doc DUP_OF.
DUP_OF = 7
DUP_IDS = (7, 120, 121, 250, 251, 252, 400, 599)


class ListDocumentStore:
    """``DocumentStore`` over an in-memory list (doc id = position)."""

    def __init__(self, docs: Sequence[Document]) -> None:
        self._docs = list(docs)

    def __len__(self) -> int:
        return len(self._docs)

    def get(self, doc_ids: Sequence[int]) -> list[Document]:
        return [self._docs[i] for i in doc_ids]


class TableEncoder:
    """Deterministic text -> unit vector: a lookup table, else a hash-seeded random vector."""

    def __init__(self, table: dict[str, np.ndarray], dim: int) -> None:
        self._table = table
        self.dim = dim
        self.name = "table-encoder"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self._one(t) for t in texts]).astype(np.float32)

    def _one(self, text: str) -> np.ndarray:
        if text in self._table:
            return self._table[text]
        seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(self.dim)
        return (v / np.linalg.norm(v)).astype(np.float32)


@dataclass
class SyntheticCorpus:
    vectors: np.ndarray
    """(NUM_DOCS, DIM) float32 unit vectors; rows DUP_IDS are identical."""
    documents: ListDocumentStore
    encoder: TableEncoder
    queries: list[str]
    """Query texts known to the encoder."""
    query_vectors: np.ndarray
    nearest: list[int]
    """Each query's planted nearest neighbour (lowest id among duplicates)."""


def make_corpus(seed: int = 7) -> SyntheticCorpus:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((NUM_DOCS, DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors.astype(np.float32)
    vectors[list(DUP_IDS)] = vectors[DUP_OF]
    targets = [3, 42, 99, 310, 555, DUP_OF, 17, 480, 230, 5, 64, 333]
    qv = vectors[targets] + 0.05 * rng.standard_normal((len(targets), DIM)).astype(np.float32)
    qv /= np.linalg.norm(qv, axis=1, keepdims=True)
    qv = qv.astype(np.float32)
    # One query sits exactly on the duplicated vector: a tie across all of DUP_IDS at the top.
    qv[targets.index(DUP_OF)] = vectors[DUP_OF]
    queries = [f"query about doc {t}" for t in targets]
    encoder = TableEncoder(dict(zip(queries, qv, strict=True)), DIM)
    docs = [Document(i, f"title {i}", f"text of synthetic document {i}") for i in range(NUM_DOCS)]
    return SyntheticCorpus(vectors, ListDocumentStore(docs), encoder, queries, qv, targets)


def brute_force(queries: np.ndarray, vectors: np.ndarray, k: int) -> list[list[int]]:
    """Reference top-k ids by plain numpy float64 (score desc, id asc)."""
    scores = np.sum(queries.astype(np.float64)[:, None, :] * vectors.astype(np.float64), axis=-1)
    ids = np.arange(len(vectors))
    return [np.lexsort((ids, -row))[:k].tolist() for row in scores]
