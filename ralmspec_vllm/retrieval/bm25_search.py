"""Exact BM25 top-k over every document, from the index's CSC postings (``bm25.BM25Index``).

A query is its known terms' ids in order, repetitions kept; a document's score is
``0.0 + w[d, t1] + w[d, t2] + ...`` in that order. Two ways to compute every score, the
same floats bit for bit:

- one ``np.bincount`` over the query terms' concatenated posting lists (small indexes);
- from ``PARALLEL_MIN_DOCS`` documents, doc-id shards of at most ``SHARD_DOCS`` on a thread
  pool: for each query term one ``searchsorted`` over its posting list (sorted by doc id)
  finds every shard's slice; each shard concatenates its slices in query order and adds
  them with one ``bincount`` over its own documents (a shard's scores stay in cache where
  one scatter over N doubles does not), selects its own top k, and the shards' candidates
  are merged by (score desc, doc id asc). A shard makes a handful of numpy calls, not a few
  per query term: each call that releases the GIL must take it back, and beside threads
  that run Python (the event loop driving vLLM, cache fetches) each take can wait a switch
  interval. Adding term by term into a reused buffer, a 3M search took 36 ms beside a
  GIL-holding thread on 2 cores against 3.8 ms alone (one ``bincount`` per shard: 21 ms;
  `benchmarks/probe_bm25_gil.py`), and a 21M search 300 ms while RaLMSpec speculated on the
  H200 against 44 ms in the baseline (session 24).

Per document the same additions happen in the same order either way, so the hits are the
same. At 21M documents the serial scatter cost 359 ms a search on the H200 host (session
20); ``benchmarks/bench_retrieval.py --bm25-threads 1,0`` measures both in one run.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.types import Hit

SHARD_DOCS = 1 << 20
"""Documents per shard of a parallel search, at most: 8 MB of float64 scores, which a core's
share of the last-level cache mostly holds while the posting slices are added into it."""
PARALLEL_MIN_DOCS = 1 << 19
"""Below this many documents a search is one ``bincount`` (parallel dispatch costs more)."""


class PostingsSearch:
    """Scores and exact top-k of every document for queries of term ids."""

    def __init__(
        self, indptr: np.ndarray, rows: np.ndarray, data: np.ndarray, num_docs: int
    ) -> None:
        self._indptr, self._rows, self._data = indptr, rows, data
        self.num_docs = num_docs
        self._pool: ThreadPoolExecutor | None = None
        self.threads = 1
        self._bounds = np.array([0, num_docs], dtype=np.int64)

    def set_threads(
        self,
        threads: int | None,
        *,
        shard_docs: int = SHARD_DOCS,
        min_docs: int = PARALLEL_MIN_DOCS,
    ) -> None:
        """Search on ``threads`` threads (``None``: every core this process may use), the
        documents cut into shards of at most ``shard_docs`` (a multiple of ``threads``
        shards, so the threads finish together). One thread, or fewer than ``min_docs``
        documents, searches serially. Call it while no search runs (it replaces the pool)."""
        for name, value in (("threads", threads), ("shard_docs", shard_docs)):
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        threads = threads or len(os.sched_getaffinity(0))
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.threads = threads
        n = self.num_docs
        if threads == 1 or n < min_docs:
            self._bounds = np.array([0, n], dtype=np.int64)
            return
        shards = -(-n // shard_docs)
        shards = min(n, threads * -(-shards // threads))
        self._bounds = np.linspace(0, n, shards + 1).astype(np.int64)
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="bm25-search")

    @property
    def shards(self) -> int:
        """How many doc-id shards a search is cut into (1: serial)."""
        return len(self._bounds) - 1

    def scores_all(self, term_ids: Sequence[int]) -> np.ndarray:
        """Scores of every document (float64, shape (N,)), terms added in query order."""
        if not term_ids:
            return np.zeros(self.num_docs, dtype=np.float64)
        spans = [(self._indptr[t], self._indptr[t + 1]) for t in term_ids]
        rows = np.concatenate([self._rows[lo:hi] for lo, hi in spans])
        weights = np.concatenate([self._data[lo:hi] for lo, hi in spans])
        # bincount adds weights[i] into out[rows[i]] for i = 0, 1, ... in order, starting
        # from 0.0: per document, the terms' weights are summed in query order.
        return np.bincount(rows, weights=weights, minlength=self.num_docs)

    def top_k_many(self, queries: Sequence[Sequence[int]], k: int) -> list[list[Hit]]:
        """Exact top-k (score desc, doc id asc) for each query (term ids); on a sharded
        index every (query, shard) pair is one task on the pool, so a batch keeps every
        thread busy. A search given up (``abandon.current()`` set) skips the shards not yet
        started and raises ``SearchAbandoned``."""
        if self._pool is None:
            hits = []
            for term_ids in queries:
                scores = self.scores_all(term_ids)
                chosen = top_k_indices(scores, k)
                hits.append([Hit(int(d), float(scores[d])) for d in chosen])
            return hits
        # Needles of the lists' own dtype: for int64 ones numpy would first cast each whole
        # int32 posting list to int64 (2.8 ms for 5M postings).
        bounds = self._bounds.astype(self._rows.dtype)
        abandoned = abandon.current()
        tasks = []
        for term_ids in queries:
            # Where each shard's slice of each posting list starts: one search per term.
            spans = [
                (int(self._indptr[t]), np.searchsorted(self.rows_of(t), bounds).tolist())
                for t in term_ids
            ]
            tasks.append(
                [
                    self._pool.submit(self._shard_top_k, spans, j, k, abandoned)
                    for j in range(len(bounds) - 1)
                ]
            )
        try:
            return [merge_shards([t.result() for t in shard_tasks], k) for shard_tasks in tasks]
        except abandon.SearchAbandoned:
            for shard_tasks in tasks:
                for task in shard_tasks:
                    task.cancel()
            raise

    def rows_of(self, term: int) -> np.ndarray:
        """The doc ids of ``term``'s posting list, ascending."""
        return self._rows[self._indptr[term] : self._indptr[term + 1]]

    def _shard_top_k(
        self,
        spans: list[tuple[int, list[int]]],
        shard: int,
        k: int,
        abandoned: threading.Event | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """One shard's docs: their scores, added term by term in query order (as
        ``scores_all`` adds them: one ``bincount`` over the terms' slices, concatenated in
        query order), and their top k as (doc ids, scores). ``spans``: per query term, where
        its posting list starts and each shard's offset into it."""
        abandon.check(abandoned)
        lo, hi = int(self._bounds[shard]), int(self._bounds[shard + 1])
        cuts = [(start + offsets[shard], start + offsets[shard + 1]) for start, offsets in spans]
        # The empty slices first: a query with no known terms scores every doc 0.0.
        rows = np.concatenate([self._rows[:0], *(self._rows[a:b] for a, b in cuts)])
        weights = np.concatenate([self._data[:0], *(self._data[a:b] for a, b in cuts)])
        scores = np.bincount(rows - lo, weights=weights, minlength=hi - lo)
        chosen = top_k_indices(scores, k)
        return chosen + lo, scores[chosen]


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best scores (desc), ties by index asc.

    A strided sample's k-th largest value is a lower bound of the whole array's, so every
    member of the top k (ties included) scores at least that much: one comparison pass
    leaves a small candidate set for the exact selection.
    """
    n = len(scores)
    stride = n // (k * 64)
    if k < n and stride >= 4:
        sample = scores[::stride]
        floor = np.partition(sample, len(sample) - k)[len(sample) - k]
        candidates = np.flatnonzero(scores >= floor)
        if len(candidates) < n // 2:
            return candidates[select_top_k(scores[candidates], k)]
    return select_top_k(scores, k)


def merge_shards(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[Hit]:
    """The best k of the shards' own top-k lists (score desc, doc id asc)."""
    ids = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    order = np.lexsort((ids, -scores))[:k]
    return [Hit(int(ids[i]), float(scores[i])) for i in order]


def select_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k selection in O(n) plus O(k log k); ties by index asc."""
    n = len(scores)
    if k >= n:
        return np.lexsort((np.arange(n), -scores))
    kth = np.partition(scores, n - k)[n - k]
    above = np.flatnonzero(scores > kth)
    tied = np.flatnonzero(scores == kth)[: k - len(above)]
    chosen = np.concatenate([above, tied])
    return chosen[np.lexsort((chosen, -scores[chosen]))]
