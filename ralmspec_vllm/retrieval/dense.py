"""The dense scoring function and the search loop every dense backend shares.

``inner_product`` is the knowledge base's one dense scoring function: for float32 query and
document vectors it returns ``((p_0 + p_1) + p_2) + ... + p_{d-1}`` in float64 with
``p_j = float64(q_j) * float64(x_j)``. Each product of two float32 values is exact in float64,
and the sum runs in a fixed order, so the result depends only on the two vectors: not on
batch shape, BLAS kernel, thread count or machine. ``score`` and the speculation cache use
it directly; search results report it too.

``DenseIndexRetriever.search_vectors`` asks the backend's index (FAISS flat, torch matmul,
HNSW, IVF) for ``k + margin`` candidates by its own fast, approximate-in-the-last-bits float
scores, drops those a float32 score proves cannot reach the top-k (``screen_candidates``),
re-scores the rest with ``inner_product`` and ranks them by (score desc, doc id asc).
For exact backends the index scores come with an error bound: if the ceiling on the index
scores of the docs left out (the lowest candidate's index score, or lower when the backend
proposes extra candidates), plus the bound, is not strictly below the k-th exact score, a document
outside the candidates could still beat or tie it, so the candidate set doubles and the
query is searched again. The result is then the exact top-k under ``inner_product``,
ties included, and every reported score equals ``score(query, [doc_id])`` bit for bit.
Approximate backends (HNSW, IVF) skip the widening: their recall is what their parameters
give, but their reported scores are still exact and identical to ``score``.

With ``prefetch`` the index proposes ``k + max(margin, prefetch)`` candidates (the torch
scan: its usual ones, every near-tie of the k-th included), the screen keeps those that can
reach the candidates' top ``k + prefetch``, and the hits after the exact top-k are the best
of the rest by ``inner_product``: good guesses for a speculation cache, not a complete
ranking. The widening only ever concerns the top-k.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Protocol

import numpy as np

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.retrieval.base import DocumentStore, float32_products, top_k_from_scores
from ralmspec_vllm.retrieval.validation import (
    check_doc_ids,
    check_k,
    check_prefetch,
    check_queries,
    check_query,
    check_vectors,
)
from ralmspec_vllm.types import Document, Hit, RetrieverInfo

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 18
_PARALLEL_RANK_MIN = 2048
"""Candidates in one search call from which queries are ranked on several threads (numpy
releases the GIL in the products and sums): a 16-query verification with a 512-document
prefetch re-scores ~8,000 candidates exactly, tens of ms on one core."""
_rank_pool: ThreadPoolExecutor | None = None
_rank_pool_lock = threading.Lock()


def _ranking_threads() -> ThreadPoolExecutor:
    global _rank_pool
    with _rank_pool_lock:
        if _rank_pool is None:
            workers = max(1, min(8, os.cpu_count() or 1))
            _rank_pool = ThreadPoolExecutor(workers, thread_name_prefix="dense-rank")
        return _rank_pool


class TextEncoder(Protocol):
    """What a dense retriever needs from the query encoder (``encoder.QueryEncoder``)."""

    @property
    def dim(self) -> int: ...

    @property
    def name(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def inner_product(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The knowledge base's dense score, float64, reproducible bit for bit (module docstring).

    ``queries``: (n, d) float32. ``docs``: (m, d) shared by all queries, or (n, m, d) one set
    per query. Returns (n, m) float64.
    """
    q = np.asarray(queries, dtype=np.float32)
    x = np.asarray(docs, dtype=np.float32)
    if q.ndim != 2 or x.ndim not in (2, 3) or x.shape[-1] != q.shape[1]:
        raise ValueError(f"vectors: incompatible shapes {q.shape} and {x.shape}")
    q64 = q.astype(np.float64).T[:, :, None]  # (d, n, 1)
    n, m, d = q.shape[0], x.shape[-2], q.shape[1]
    out = np.empty((n, m), dtype=np.float64)
    step = max(1, _CHUNK_ELEMENTS // max(1, n * d))  # temporaries stay cache-sized
    for start in range(0, m, step):
        block = x[..., start : start + step, :]
        # (d, n or 1, docs): dimension j's values for every (query, doc) pair in one slab.
        per_dim = np.moveaxis(block if block.ndim == 3 else block[None], -1, 0)
        products = q64 * per_dim.astype(np.float64)  # exact: float32 x float32 fits float64
        # accumulate along axis 0 is a running sum over j = 0, 1, ..., d-1: a fixed order.
        np.add.accumulate(products, axis=0, out=products)
        out[:, start : start + step] = products[-1]
    return out


def screen_candidates(
    query: np.ndarray, vectors: np.ndarray, k: int, max_norm: float
) -> np.ndarray:
    """Which of one query's candidates can still be in its exact top-``k``: a float32 screen.

    Scores the (m, d) candidate ``vectors`` in float32 (any summation order):
    ``|s32 - s| <= e = float32_relative_error(d) |q| max|x|`` (+ an underflow allowance),
    where s is ``inner_product``'s score. With t the k-th best s32, k candidates have
    s >= t - e, so the k-th exact score is >= t - e, and a candidate with s32 < t - 2e has
    s < t - e: strictly below it, never in the top-k, ties included. Returns the mask of the
    others (all of them when m <= k). A bfloat16 scan proposes hundreds of near-ties per
    query; this leaves about k of them for the float64 re-scoring, ~10x dearer per candidate.
    """
    m, d = vectors.shape
    if m <= k:
        return np.ones(m, dtype=bool)
    approx = float32_products(vectors, query).astype(np.float64)
    kth = np.partition(approx, m - k)[m - k]
    q_norm = float(np.linalg.norm(query.astype(np.float64)))
    e = float32_relative_error(d) * q_norm * max_norm + d * 2.0**-126 + 1e-30
    return approx >= kth - 2.0 * e


@dataclass
class PhaseTimes:
    """Seconds a dense retriever spent, summed over calls (threads included): the index's
    candidate search (``scan_s``: for the torch scan the matmul and threshold), the exact
    re-scoring (``rank_s``), the query encoding of text searches (``encode_s``: ``search``,
    not ``encode``) and ``vectors``/``documents`` reads; ``searches`` counts
    ``search_vectors`` calls that finished, ``abandoned`` those given up midway (their
    caller left: ``abandon``; the scan time they took is in ``scan_s``). A benchmark
    subtracts two ``snapshot``s to split a run's awaited search time into work inside the
    retriever and waiting outside it."""

    searches: int = 0
    abandoned: int = 0
    encode_s: float = 0.0
    scan_s: float = 0.0
    rank_s: float = 0.0
    vectors_s: float = 0.0
    documents_s: float = 0.0

    def snapshot(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


class DenseIndexRetriever(ABC):
    """A ``DenseRetriever`` whose index only proposes candidates; ``inner_product`` ranks them."""

    backend: str = "dense"

    def __init__(
        self,
        vectors: np.ndarray,
        documents: DocumentStore | None,
        encoder: TextEncoder | None,
        *,
        candidate_margin: int = 16,
        index_dir: str = "",
    ) -> None:
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors: expected a non-empty (N, dim) matrix, got {vectors.shape}")
        if candidate_margin < 0:
            raise ValueError(f"candidate_margin: must be >= 0, got {candidate_margin}")
        if documents is not None and len(documents) != vectors.shape[0]:
            raise ValueError(
                f"documents: store has {len(documents)} docs, vectors have {vectors.shape[0]}"
            )
        if encoder is not None and encoder.dim != vectors.shape[1]:
            raise ValueError(f"encoder: dim {encoder.dim} != vector dim {vectors.shape[1]}")
        self._vectors = vectors if vectors.dtype == np.float32 else vectors.astype(np.float32)
        self._documents = documents
        self._encoder = encoder
        self.candidate_margin = candidate_margin
        self.index_dir = index_dir
        self.num_docs, self.dim = (int(s) for s in vectors.shape)
        # Counters for benchmarks and tests: candidates the index proposed and those re-scored
        # exactly after the float32 screen (all rounds), and query searches repeated with a
        # doubled candidate set.
        self.rescored = 0
        self.rescored_exact = 0
        self.widened = 0
        self.times = PhaseTimes()
        self._times_lock = threading.Lock()
        self._max_norm = float(
            max(np.linalg.norm(c.astype(np.float64), axis=1).max() for c in _chunks(vectors))
        )

    # ------------------------------------------------------------- backend hooks
    @abstractmethod
    def _candidates(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``count`` candidate ids per query (int64, -1 padded) and their index scores."""

    def _bounded_candidates(
        self, queries: np.ndarray, count: int, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``_candidates`` plus, per query, a ceiling on the index score of every doc left out.

        The default proposes the top ``count`` by index score, so the lowest proposed score
        is the ceiling. A backend may propose more (every doc within the error bound of the
        k-th score, so that one scan suffices) and report a lower ceiling.
        """
        ids, approx = self._candidates(queries, count)
        valid = ids >= 0
        ceiling = np.where(valid, approx, np.inf).min(axis=1, initial=np.inf)
        return ids, approx, ceiling

    def _candidate_count(self, k: int, prefetch: int = 0) -> int:
        """How many candidates the index proposes for a top-``k`` search (+ ``prefetch``)."""
        return min(self.num_docs, k + max(self.candidate_margin, prefetch))

    def _relative_error(self) -> float | None:
        """Bound on |index score - exact score| / (|q| max|x|); ``None`` for approximate."""
        return None

    def _extra_info(self) -> dict[str, str]:
        return {}

    # ------------------------------------------------------------- Retriever API
    @property
    def info(self) -> RetrieverInfo:
        extra = {"candidate_margin": str(self.candidate_margin), **self._extra_info()}
        if self._encoder is not None:
            extra["encoder"] = self._encoder.name
        return RetrieverInfo(
            backend=self.backend,
            num_docs=self.num_docs,
            dim=self.dim,
            metric="inner_product",
            index_dir=self.index_dir,
            extra=extra,
        )

    def reset_caches(self) -> int:
        """Empty the query encoder's memo (``encoder.QueryEncoder.clear_memo``); the
        encodings dropped (0 for an encoder without one)."""
        clear = getattr(self._encoder, "clear_memo", None)
        return int(clear()) if clear is not None else 0

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        texts = check_queries(queries)
        if self._encoder is None:
            raise RuntimeError("encoder: this retriever has no query encoder (search by vector)")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return check_vectors(self._encoder.encode(texts), self.dim, "encoder output")

    def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        check_k(k)
        check_prefetch(prefetch)
        start = time.perf_counter()
        vectors = self.encode(queries)
        self._add_times(encode_s=time.perf_counter() - start)
        return self.search_vectors(vectors, k, prefetch)

    def search_vectors(self, vectors: np.ndarray, k: int, prefetch: int = 0) -> list[list[Hit]]:
        k = min(check_k(k), self.num_docs)
        prefetch = min(check_prefetch(prefetch), self.num_docs - k)
        queries = check_vectors(vectors, self.dim)
        results: list[list[Hit]] = [[] for _ in range(len(queries))]
        pending = np.arange(len(queries))
        count = self._candidate_count(k, prefetch)
        rel_err = self._relative_error()
        while len(pending):
            start = time.perf_counter()
            try:
                ids, _, ceiling = self._bounded_candidates(queries[pending], count, k)
            except abandon.SearchAbandoned:
                self._add_times(scan_s=time.perf_counter() - start, abandoned=1)
                raise
            scanned = time.perf_counter()
            proposed = (ids >= 0).sum(axis=1)
            ranked = self._rank(queries[pending], ids, k + prefetch)
            self._add_times(scan_s=scanned - start, rank_s=time.perf_counter() - scanned)
            self.rescored += int(proposed.sum())
            retry = []
            for row, qi in enumerate(pending.tolist()):
                hits = results[qi] = ranked[row]
                complete = count >= self.num_docs or int(proposed[row]) >= self.num_docs
                if rel_err is None or complete or len(hits) < k:
                    continue
                q_norm = float(np.linalg.norm(queries[qi].astype(np.float64)))
                bound = rel_err * q_norm * self._max_norm + 1e-30
                # Every doc left out has index score <= ceiling, so exact score < ceiling + bound.
                if not float(ceiling[row]) + bound < hits[k - 1].score:
                    retry.append(qi)
            if retry:
                self.widened += len(retry)
                logger.debug("widening %d queries from %d candidates", len(retry), count)
            pending = np.asarray(retry, dtype=np.int64)
            count = min(self.num_docs, 2 * count)
        self._add_times(searches=1)
        return results

    def counters(self) -> dict[str, float]:
        """This retriever's work since start (``PhaseTimes``), for the service's ``Info``;
        with a ``QueryEncoder``, also ``encoder_busy_s`` (its ``busy_s``: searches' and
        ``Encode`` calls' passes alike)."""
        with self._times_lock:
            out = self.times.snapshot()
        busy = getattr(self._encoder, "busy_s", None)
        if isinstance(busy, float):
            out["encoder_busy_s"] = busy
        return out

    def _add_times(self, **seconds: float) -> None:
        with self._times_lock:
            for name, value in seconds.items():
                setattr(self.times, name, getattr(self.times, name) + value)

    def _rank(self, queries: np.ndarray, ids: np.ndarray, k: int) -> list[list[Hit]]:
        """Every query's exact top-k among its candidates (``ids``, -1 padded):
        ``screen_candidates`` drops those that cannot reach it, ``inner_product`` scores the
        rest, ties break by doc id. Only the valid candidates' vectors are read. Queries are
        independent, so many candidates are ranked on several threads (same results)."""
        rows = [row[row >= 0] for row in ids]
        if len(rows) > 1 and sum(len(r) for r in rows) >= _PARALLEL_RANK_MIN:
            pool = _ranking_threads()
            done = list(pool.map(self._rank_one, queries, rows, [k] * len(rows)))
        else:
            done = [self._rank_one(q, r, k) for q, r in zip(queries, rows, strict=True)]
        self.rescored_exact += sum(n for _, n in done)
        return [hits for hits, _ in done]

    def _rank_one(self, query: np.ndarray, doc_ids: np.ndarray, k: int) -> tuple[list[Hit], int]:
        """One query's exact top-k among ``doc_ids``, and how many were re-scored exactly."""
        vectors = self._vectors[doc_ids]
        keep = screen_candidates(query, vectors, k, self._max_norm)
        exact = inner_product(query[None], vectors[keep])[0]
        return top_k_from_scores(doc_ids[keep], exact, k), int(keep.sum())

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        check_query(query)
        ids = check_doc_ids(doc_ids, self.num_docs)
        return self.score_vector(self.encode([query])[0], ids)

    def score_vector(self, vector: np.ndarray, doc_ids: Sequence[int] | np.ndarray) -> list[float]:
        """``score`` for an already-encoded query."""
        q = check_vectors(vector, self.dim, "vector")
        ids = check_doc_ids(doc_ids, self.num_docs)
        return inner_product(q, self._vectors[ids])[0].tolist()

    def vectors(self, doc_ids: Sequence[int]) -> np.ndarray:
        ids = check_doc_ids(doc_ids, self.num_docs)
        start = time.perf_counter()
        out = np.array(self._vectors[ids], dtype=np.float32)
        self._add_times(vectors_s=time.perf_counter() - start)
        return out

    def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        ids = check_doc_ids(doc_ids, self.num_docs)
        if self._documents is None:
            raise RuntimeError("documents: this retriever has no document store")
        start = time.perf_counter()
        out = self._documents.get(ids.tolist())
        self._add_times(documents_s=time.perf_counter() - start)
        return out


def _chunks(vectors: np.ndarray, size: int = 65536) -> list[np.ndarray]:
    return [vectors[i : i + size] for i in range(0, len(vectors), size)]


def float32_relative_error(dim: int) -> float:
    """Twice the classic bound d*u/(1-d*u) on a float32 dot product's relative error."""
    u = 2.0**-24
    return 2.0 * dim * u / (1.0 - dim * u)
