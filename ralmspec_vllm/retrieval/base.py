"""The retriever protocols every backend, the gRPC client and the core agree on.

``Retriever`` is the synchronous, in-process contract a backend implements (flat, HNSW/IVF,
BM25). ``AsyncRetriever`` is what the core and the server consume: the gRPC client implements
it directly, and ``InProcessAsyncRetriever`` wraps any ``Retriever`` (running its work in a
thread so the event loop keeps generating while an index search runs).

Ranking rule everywhere: score descending, then doc id ascending (``rank_hits``).

``term_weights(doc_ids)`` (BM25 only): each document's distinct index terms and the weight
each adds to a query's score (``TermWeights``), so a client can rank a speculation cache with
exactly the knowledge base's scores without a ``score`` call per step.

``routing()`` and ``lists(doc_ids)`` (IVF only): how the index routes a query (its lists'
centroids and ``nprobe``: a search reads only the ``nprobe`` lists whose centroids score
highest) and which list holds each document, so a speculation cache can rank only the
documents the index's search can find (``IVFRouting``; ``core/cache.py``).

``search(queries, k, prefetch)``: each query's exact top-k, then up to ``prefetch`` more
hits, the best further documents the backend's search came across, ranked by their exact
scores but not a complete ranking (a document left out may outscore them). A speculation
cache needs good guesses, not exact ranks: an exact top-256 over 21M documents costs ~30%
more than a top-20 whose scan already proposes ~200 near candidates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.types import Document, Hit, RetrieverInfo, rank_key

TermWeights = tuple[list[str], np.ndarray]
"""One document's distinct index terms (first appearance order) and their float64 weights:
a query's score for the document is 0.0 plus, over the query's terms in order (repetitions
included), the weight of each term the document has."""


class DocumentStore(Protocol):
    """Random access to passages by doc id."""

    def __len__(self) -> int: ...

    def get(self, doc_ids: Sequence[int]) -> list[Document]: ...


@runtime_checkable
class Retriever(Protocol):
    """Synchronous in-process retriever.

    ``search`` and ``score`` use the same scoring function, so for any doc id in a search
    result, ``score(query, [doc_id])`` returns exactly the score the search reported.
    """

    @property
    def info(self) -> RetrieverInfo: ...

    def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        """Top-k hits per query text, ranked by ``rank_hits``'s rule, then up to
        ``prefetch`` further hits (module docstring)."""
        ...

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        """The knowledge base's own score of each doc id for ``query`` (same order as given)."""
        ...

    def documents(self, doc_ids: Sequence[int]) -> list[Document]: ...


@runtime_checkable
class DenseRetriever(Retriever, Protocol):
    """A retriever over vectors: also searches by embedding and exposes document vectors."""

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        """Query embeddings, float32, shape (len(queries), dim)."""
        ...

    def search_vectors(self, vectors: np.ndarray, k: int, prefetch: int = 0) -> list[list[Hit]]: ...

    def vectors(self, doc_ids: Sequence[int]) -> np.ndarray:
        """The documents' own index vectors, float32, shape (len(doc_ids), dim)."""
        ...


@dataclass(frozen=True, eq=False)
class IVFRouting:
    """How an IVF index routes a query: its search reads only the ``nprobe`` inverted lists
    whose centroids have the largest inner product with the query. A speculation cache that
    ranks only its documents in those lists guesses what the search can find: the best
    cached document by the exact score may sit in a list the search never reads (offline,
    1M documents, 1,024 lists, 16 probed: 22 of 33 wrong guesses; session 31)."""

    centroids: np.ndarray
    """(nlist, dim) float32, row i the centroid of list i."""
    nprobe: int

    def probed(self, query: np.ndarray) -> np.ndarray:
        """The ids of the lists a search for ``query`` reads (unordered). In float32 on the
        calling thread, like FAISS's own coarse search up to rounding: a list at the
        ``nprobe``-th place in a near tie may differ, which only costs a guess."""
        scores = float32_products(self.centroids, query)
        n = min(self.nprobe, len(scores))
        if n >= len(scores):
            return np.arange(len(scores))
        return np.argpartition(-scores, n - 1)[:n]


@runtime_checkable
class RoutedRetriever(DenseRetriever, Protocol):
    """A dense retriever whose search reads only some inverted lists (IVF)."""

    def routing(self) -> IVFRouting: ...

    def lists(self, doc_ids: Sequence[int]) -> np.ndarray:
        """The inverted list holding each document, int64, same order as given."""
        ...


@runtime_checkable
class TermWeightRetriever(Retriever, Protocol):
    """A retriever whose score is a sum of per-(document, term) weights (BM25)."""

    def term_weights(self, doc_ids: Sequence[int]) -> list[TermWeights]: ...


class AsyncRetriever(Protocol):
    """The asynchronous contract used by the core and the server (gRPC client or in-process)."""

    async def info(self) -> RetrieverInfo: ...

    async def search(
        self, queries: Sequence[str], k: int, prefetch: int = 0
    ) -> list[list[Hit]]: ...

    async def score(self, query: str, doc_ids: Sequence[int]) -> list[float]: ...

    async def documents(self, doc_ids: Sequence[int]) -> list[Document]: ...

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        """Document vectors for dense backends; ``None`` for sparse ones."""
        ...

    async def term_weights(self, doc_ids: Sequence[int]) -> list[TermWeights] | None:
        """Per-document term weights for BM25 backends; ``None`` for the others."""
        ...

    async def routing(self) -> IVFRouting | None:
        """How an IVF backend routes a query; ``None`` for the others."""
        ...

    async def lists(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        """Each document's inverted list (IVF backends); ``None`` for the others."""
        ...


class InProcessAsyncRetriever:
    """Adapts a synchronous ``Retriever`` to ``AsyncRetriever`` (work runs in a thread).

    The thread shares the process's GIL with the event loop, and re-takes it after every
    torch or numpy call: while the loop runs Python (vLLM's outputs, speculation), each
    re-take can wait a whole switch interval (5 ms by default). A bf16 scan of 1M docs for 5
    queries took 39 ms alone and 432 ms beside a busy Python thread (74 ms with
    ``sys.setswitchinterval(0.0005)``). ``serve`` therefore keeps its retriever in another
    process; embedders that overlap searches with generation should lower the interval or do
    the same."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever

    async def info(self) -> RetrieverInfo:
        return self.retriever.info

    async def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        # Cancelled (a pipelined verification after a rollback): the index stops early.
        return await abandon.abandon_on_cancel(
            lambda: asyncio.to_thread(self.retriever.search, list(queries), k, prefetch)
        )

    async def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        return await asyncio.to_thread(self.retriever.score, query, list(doc_ids))

    async def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        # In a thread like the rest: a read from a cold memory-mapped store can take seconds,
        # and the event loop meanwhile drives the LM (and other requests).
        return await asyncio.to_thread(self.retriever.documents, list(doc_ids))

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        if isinstance(self.retriever, DenseRetriever):
            return await asyncio.to_thread(self.retriever.vectors, list(doc_ids))
        return None

    async def term_weights(self, doc_ids: Sequence[int]) -> list[TermWeights] | None:
        if isinstance(self.retriever, TermWeightRetriever):
            return await asyncio.to_thread(self.retriever.term_weights, list(doc_ids))
        return None

    async def routing(self) -> IVFRouting | None:
        if isinstance(self.retriever, RoutedRetriever):
            return await asyncio.to_thread(self.retriever.routing)
        return None

    async def lists(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        if isinstance(self.retriever, RoutedRetriever):
            return await asyncio.to_thread(self.retriever.lists, list(doc_ids))
        return None

    async def reset_caches(self) -> int:
        """``reset_caches()`` of retrievers that keep caches (dense: the encoder's memo)."""
        return await asyncio.to_thread(reset_caches, self.retriever)


def reset_caches(retriever: Retriever) -> int:
    """Empty what makes a repeated query cheaper than its first asking (the dense query
    encoder's memo; BM25 keeps nothing of the kind): the entries dropped."""
    reset = getattr(retriever, "reset_caches", None)
    return int(reset()) if reset is not None else 0


def rank_hits(hits: Sequence[Hit], k: int | None = None) -> list[Hit]:
    """Sort by score descending, doc id ascending; keep the first ``k``."""
    ranked = sorted(hits, key=rank_key)
    return ranked if k is None else ranked[:k]


def float32_products(vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
    """``vectors @ query`` in float32, computed on the calling thread (numpy's einsum loop,
    not BLAS; as fast for one query: the product is memory-bound).

    OpenBLAS runs a matrix-vector product of this size on every core, and its worker threads
    then spin-wait for their next job. A product every ~30 ms (the speculation cache's
    scoring at each LM step) kept them spinning against the retriever's scan threads: on the
    H200 host's 16 cores, beside a 16,384 x 384 product every 30 ms, a 4M-doc bf16 scan took
    208 ms instead of 61 (one query) and 744 instead of 97 (eight), in another process as
    in this one; with one BLAS thread, 64 and 98 (``benchmarks/gpu/probe_contention.py``)."""
    return np.einsum("ij,j->i", vectors, query.astype(np.float32, copy=False))


def top_k_from_scores(doc_ids: np.ndarray, scores: np.ndarray, k: int) -> list[Hit]:
    """Deterministic top-k over parallel arrays (ties: lower doc id first)."""
    if len(doc_ids) == 0:
        return []
    order = np.lexsort((doc_ids, -scores))[:k]
    # tolist: one conversion per array instead of a numpy scalar per element (a top-256
    # verification of 64 queries builds 16k hits).
    ids = np.asarray(doc_ids)[order].astype(np.int64).tolist()
    values = np.asarray(scores)[order].astype(np.float64).tolist()
    return [Hit(i, s) for i, s in zip(ids, values, strict=True)]
