"""Okapi BM25 over the whole knowledge base, scoring exactly like rank-bm25's ``BM25Okapi``.

Build: ``Analyzer`` turns each document into terms; ``BM25Index.build`` counts term
frequencies batch by batch (term ids in order of first appearance, as rank-bm25's dicts do),
then computes corpus-wide statistics (document frequencies, rank-bm25's idf with its epsilon
floor, average length) and precomputes one float64 weight per (doc, term) pair::

    idf[t] = log(N - n_t + 0.5) - log(n_t + 0.5)       (math.log, as rank-bm25)
    idf[t] = epsilon * mean(idf)  where idf[t] < 0     (mean over the raw idfs)
    w[d, t] = idf[t] * (tf * (k1 + 1) / (tf + k1 * ((1 - b) + b * len_d / avgdl)))

with the same floating-point operations in the same order as rank-bm25, stored in a SciPy CSC
matrix (rows = docs, columns = terms). Serve: a query's score for doc d is
``0.0 + w[d, t1] + w[d, t2] + ...`` over the query's terms in order, repetitions included,
unknown terms contributing nothing. ``search`` scatters those columns into a dense score
vector and selects the top k (score desc, doc id asc) in O(N); ``score`` gathers the same
weights for given doc ids in the same order, so both agree bit for bit (and with rank-bm25's
``get_scores``). Saved as ``bm25.npz`` + ``bm25.json`` (vocabulary, parameters, analyzer).

Large indexes search in parallel: the doc ids are cut into shards of about a million
documents, each shard's slice of every posting list (they are sorted by doc id) is added into
that shard's own score buffer on a thread pool (numpy's fancy-index add releases the GIL; a
shard's buffer stays in cache, where one scatter over N doubles does not), each shard selects
its own top k, and the shards' candidates are merged by (score desc, doc id asc). Per
document the same additions happen in the same order as in the single scatter, so the scores
and the ranking are the same bit for bit; at 21M documents one search takes a fraction of the
serial time (``benchmarks/bench_retrieval.py`` measures it).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from ralmspec_vllm.retrieval.analyzer import Analyzer
from ralmspec_vllm.retrieval.base import DocumentStore, TermWeights
from ralmspec_vllm.retrieval.bm25_build import FillerNotCountable, Postings, bm25_weights
from ralmspec_vllm.retrieval.validation import (
    check_doc_ids,
    check_k,
    check_prefetch,
    check_queries,
    check_query,
)
from ralmspec_vllm.types import BM25Params, Document, Hit, RetrieverInfo

if TYPE_CHECKING:
    from ralmspec_vllm.retrieval.kb import KnowledgeBase

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
DISK_HEADROOM_BYTES = 2 << 30
"""Free disk space ``from_kb`` leaves beyond what a saved index takes."""
SHARD_DOCS = 1 << 20
"""Documents per shard of a parallel search, at most: 8 MB of float64 scores, which a core's
share of the last-level cache mostly holds while the posting slices are added into it."""
PARALLEL_MIN_DOCS = 1 << 19
"""Below this many documents a search is one ``bincount`` (parallel dispatch costs more)."""


class BM25Index:
    """Precomputed BM25 weights plus the vocabulary and statistics they came from."""

    def __init__(
        self,
        weights: sp.csc_matrix,
        vocab: dict[str, int],
        idf: np.ndarray,
        doc_len: np.ndarray,
        params: BM25Params,
        analyzer: Analyzer,
        *,
        threads: int | None = None,
    ) -> None:
        weights.sort_indices()
        self.weights = weights
        self.vocab = vocab
        self.idf = idf
        self.doc_len = doc_len
        self.params = params
        self.analyzer = analyzer
        self.num_docs = int(weights.shape[0])
        self.avgdl = float(doc_len.sum()) / self.num_docs
        # Raw CSC arrays: slicing them directly is much faster than indexing the matrix.
        self._indptr = weights.indptr.astype(np.int64, copy=False)
        self._rows = weights.indices
        self._data = weights.data
        self._pool: ThreadPoolExecutor | None = None
        self._buffers: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self.set_threads(threads)

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
        self._buffers = queue.SimpleQueue()
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

    # ----------------------------------------------------------------- build
    @classmethod
    def build(
        cls,
        text_batches: Iterable[Sequence[str]],
        params: BM25Params | None = None,
        analyzer: Analyzer | None = None,
        *,
        total: int | None = None,
        progress: bool = True,
    ) -> BM25Index:
        """Index documents given as batches of texts (doc ids = position in the stream)."""
        params = params or BM25Params()
        analyzer = analyzer or Analyzer()
        postings = Postings()
        bar = tqdm(total=total, unit="doc", desc="bm25 index", disable=not progress)
        postings.add_text_batches(text_batches, analyzer, bar.update)
        bar.close()
        return cls._finish(postings, params, analyzer, None)

    @classmethod
    def build_kb(
        cls,
        kb: KnowledgeBase,
        params: BM25Params | None = None,
        analyzer: Analyzer | None = None,
        *,
        batch_size: int = 4096,
        threads: int | None = None,
        progress: bool = True,
    ) -> BM25Index:
        """Index a knowledge base: its real passages as text, its synthetic filler counted
        straight from the filler's word draws on ``threads`` threads (default: every core
        this process may use). The same index bit for bit as ``build`` over
        ``kb.iter_texts()``; at 3M docs on 2 cores 39 s instead of 187 s, and the counting
        scales with cores (``bm25_build``). Falls back to the text where that cannot be exact."""
        params = params or BM25Params()
        analyzer = analyzer or Analyzer()
        postings = Postings()
        m = kb.manifest
        bar = tqdm(total=len(kb), unit="doc", desc="bm25 index", disable=not progress)
        postings.add_text_batches(kb.iter_texts(batch_size, filler=False), analyzer, bar.update)
        if m.num_filler_docs:
            assert kb.filler is not None
            try:
                postings.add_filler(
                    kb.filler, m.num_docs, analyzer, threads=threads, on_chunk=bar.update
                )
            except FillerNotCountable as exc:
                logger.warning("BM25 index: counting the filler from its text (%s)", exc)
                postings.add_text_batches(kb.iter_filler_texts(batch_size), analyzer, bar.update)
        bar.close()
        return cls._finish(postings, params, analyzer, threads)

    @classmethod
    def _finish(
        cls, postings: Postings, params: BM25Params, analyzer: Analyzer, threads: int | None
    ) -> BM25Index:
        matrix, idf, doc_len = postings.finish(params, threads)
        logger.info(
            "BM25 index: %d docs, %d terms, %d postings, avgdl %.1f",
            matrix.shape[0],
            matrix.shape[1],
            matrix.nnz,
            float(doc_len.sum()) / matrix.shape[0],
        )
        return cls(matrix, postings.vocab, idf, doc_len, params, analyzer)

    # ----------------------------------------------------------------- scoring
    def term_ids(self, query: str) -> list[int]:
        """The query's known terms as ids, in order, repetitions kept."""
        vocab = self.vocab
        return [vocab[t] for t in self.analyzer(query) if t in vocab]

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

    def scores_for(self, term_ids: Sequence[int], doc_ids: np.ndarray) -> np.ndarray:
        """Scores of the given docs, computed exactly as ``scores_all`` computes them."""
        scores = np.zeros(len(doc_ids), dtype=np.float64)
        # In the posting lists' dtype: searchsorted would copy a whole int32 list to int64
        # to search it for int64 ids (2.8 ms for 5M postings, per term).
        doc_ids = np.asarray(doc_ids).astype(self._rows.dtype, copy=False)
        for t in term_ids:
            lo, hi = self._indptr[t], self._indptr[t + 1]
            rows = self._rows[lo:hi]
            if len(rows) == 0:
                continue
            pos = np.minimum(np.searchsorted(rows, doc_ids), len(rows) - 1)
            found = rows[pos] == doc_ids
            scores[found] += self._data[lo + pos[found]]
        return scores

    def term_weights(self, doc_ids: Sequence[int], contents: Sequence[str]) -> list[TermWeights]:
        """Each document's distinct indexed terms (first appearance in its ``contents``, the
        text it was indexed from) and their weights w[d, t]: exactly what ``scores_for``
        adds for each. Recomputed from the text (each term's count, the document's length)
        with the build's own formula and operation order (``bm25_weights``), so equal bit
        for bit to the stored weights, without a random read per (document, term) into the
        postings (6 GB at 21M documents). ``ValueError`` if a text cannot be the one indexed
        for its document: another length, a term the index does not know, or its rarest
        term not listed for the document (one binary search in the shortest list). A
        different text passing all three would only blur a speculation's guess, never an
        answer."""
        vocab = self.vocab
        per_doc: list[list[str]] = []
        columns: list[int] = []
        tfs: list[int] = []
        for doc_id, text in zip(doc_ids, contents, strict=True):
            tokens = self.analyzer(text)
            if len(tokens) != self.doc_len[doc_id]:
                raise ValueError(
                    f"doc {doc_id}: this text was not indexed for it ({len(tokens)} terms,"
                    f" the index counted {int(self.doc_len[doc_id])})"
                )
            counts = Counter(tokens)  # first appearance order
            terms = list(counts)
            ids = [vocab.get(t, -1) for t in terms]
            if -1 in ids:
                unknown = terms[ids.index(-1)]
                raise ValueError(f"doc {doc_id}: term {unknown!r} is not indexed for it")
            self._check_indexed(doc_id, terms, ids)
            per_doc.append(terms)
            columns.extend(ids)
            tfs.extend(counts.values())
        sizes = [len(terms) for terms in per_doc]
        weights = bm25_weights(
            np.asarray(tfs, dtype=np.float64),
            self.doc_len[np.repeat(np.asarray(doc_ids, dtype=np.int64), sizes)],
            self.idf[np.asarray(columns, dtype=np.int64)],
            self.avgdl,
            self.params,
        )
        return list(zip(per_doc, np.split(weights, np.cumsum(sizes)[:-1]), strict=True))

    def _check_indexed(self, doc_id: int, terms: list[str], columns: list[int]) -> None:
        """``ValueError`` unless the document's rarest term (shortest posting list) lists it."""
        if not columns:
            return
        ids = np.asarray(columns, dtype=np.int64)
        rarest = int(np.argmin(self._indptr[ids + 1] - self._indptr[ids]))
        rows = self._rows_of(columns[rarest])
        at = int(np.searchsorted(rows, rows.dtype.type(doc_id)))
        if at == len(rows) or rows[at] != doc_id:
            raise ValueError(f"doc {doc_id}: term {terms[rarest]!r} is not indexed for it")

    def top_k(self, term_ids: Sequence[int], k: int) -> list[Hit]:
        """Exact top-k over the whole corpus (score desc, doc id asc)."""
        return self.top_k_many([term_ids], k)[0]

    def top_k_many(self, queries: Sequence[Sequence[int]], k: int) -> list[list[Hit]]:
        """``top_k`` for each query (term ids); on a sharded index every (query, shard)
        pair is one task on the pool, so a batch keeps every thread busy."""
        if self._pool is None:
            hits = []
            for term_ids in queries:
                scores = self.scores_all(term_ids)
                chosen = _top_k_indices(scores, k)
                hits.append([Hit(int(d), float(scores[d])) for d in chosen])
            return hits
        bounds = self._bounds.astype(self._rows.dtype)  # see scores_for: no int64 copies
        tasks = []
        for term_ids in queries:
            # Where each shard's slice of each posting list starts: one search per term.
            spans = [
                (int(self._indptr[t]), np.searchsorted(self._rows_of(t), bounds).tolist())
                for t in term_ids
            ]
            tasks.append(
                [self._pool.submit(self._shard_top_k, spans, j, k) for j in range(len(bounds) - 1)]
            )
        return [_merge_shards([task.result() for task in shard_tasks], k) for shard_tasks in tasks]

    def _rows_of(self, term: int) -> np.ndarray:
        return self._rows[self._indptr[term] : self._indptr[term + 1]]

    def _shard_top_k(
        self, spans: list[tuple[int, list[int]]], shard: int, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One shard's docs: their scores, added term by term in query order (as
        ``scores_all`` adds them), and their top k as (doc ids, scores). ``spans``: per
        query term, where its posting list starts and each shard's offset into it."""
        lo, hi = int(self._bounds[shard]), int(self._bounds[shard + 1])
        try:
            buffer = self._buffers.get_nowait()
        except queue.Empty:
            buffer = np.empty(int(np.diff(self._bounds).max()), dtype=np.float64)
        try:
            scores = buffer[: hi - lo]
            scores.fill(0.0)
            for start, cuts in spans:
                a, b = start + cuts[shard], start + cuts[shard + 1]
                if a < b:  # a posting list holds each doc once: no index repeats here
                    scores[self._rows[a:b] - lo] += self._data[a:b]
            chosen = _top_k_indices(scores, k)
            return chosen + lo, scores[chosen]  # fancy indexing copies out of the buffer
        finally:
            self._buffers.put(buffer)

    # ----------------------------------------------------------------- persistence
    def saved_bytes(self) -> int:
        """About what ``save`` writes: the CSC arrays, idf, lengths and the vocabulary."""
        w = self.weights
        arrays = w.data.nbytes + w.indices.nbytes + w.indptr.nbytes
        return arrays + self.idf.nbytes + self.doc_len.nbytes + 16 * len(self.vocab)

    def save(self, directory: Path) -> None:
        """Write ``bm25.npz`` + ``bm25.json`` atomically (a temp dir renamed into place)."""
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".", dir=directory.parent))
        try:
            np.savez(
                tmp / "bm25.npz",
                indptr=self.weights.indptr,
                indices=self.weights.indices,
                data=self.weights.data,
                idf=self.idf,
                doc_len=self.doc_len,
            )
            terms = list(self.vocab)  # built and loaded vocabularies are in id order
            ids = np.fromiter(self.vocab.values(), dtype=np.int64, count=len(terms))
            if not np.array_equal(ids, np.arange(len(terms))):  # 21M terms: sort only if needed
                terms = sorted(self.vocab, key=self.vocab.__getitem__)
            meta = {
                "format_version": FORMAT_VERSION,
                "num_docs": self.num_docs,
                "params": asdict(self.params),
                "analyzer": self.analyzer.to_dict(),
                "vocab": terms,
            }
            (tmp / "bm25.json").write_text(json.dumps(meta, ensure_ascii=False))
            if directory.exists():
                shutil.rmtree(directory)
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def load(cls, directory: Path) -> BM25Index:
        directory = Path(directory)
        meta = json.loads((directory / "bm25.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"index_dir: unsupported BM25 format in {directory}")
        arrays = np.load(directory / "bm25.npz")
        vocab = {t: i for i, t in enumerate(meta["vocab"])}
        shape = (int(meta["num_docs"]), len(vocab))
        matrix = sp.csc_matrix((arrays["data"], arrays["indices"], arrays["indptr"]), shape=shape)
        return cls(
            matrix,
            vocab,
            arrays["idf"],
            arrays["doc_len"],
            BM25Params(**meta["params"]),
            Analyzer.from_dict(meta["analyzer"]),
        )

    @staticmethod
    def artifact_name(params: BM25Params, analyzer: Analyzer) -> str:
        return f"bm25-k1_{params.k1:g}-b_{params.b:g}-eps_{params.epsilon:g}-{analyzer.name}"


def _top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
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
            return candidates[_select_top_k(scores[candidates], k)]
    return _select_top_k(scores, k)


def _merge_shards(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> list[Hit]:
    """The best k of the shards' own top-k lists (score desc, doc id asc)."""
    ids = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    order = np.lexsort((ids, -scores))[:k]
    return [Hit(int(ids[i]), float(scores[i])) for i in order]


def _select_top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k selection in O(n) plus O(k log k); ties by index asc."""
    n = len(scores)
    if k >= n:
        return np.lexsort((np.arange(n), -scores))
    kth = np.partition(scores, n - k)[n - k]
    above = np.flatnonzero(scores > kth)
    tied = np.flatnonzero(scores == kth)[: k - len(above)]
    chosen = np.concatenate([above, tied])
    return chosen[np.lexsort((chosen, -scores[chosen]))]


class BM25Retriever:
    """``Retriever`` over a ``BM25Index`` (sparse: no vectors)."""

    backend = "bm25"

    def __init__(
        self,
        index: BM25Index,
        documents: DocumentStore | None = None,
        *,
        index_dir: str = "",
    ) -> None:
        if documents is not None and len(documents) != index.num_docs:
            raise ValueError(
                f"documents: store has {len(documents)} docs, index has {index.num_docs}"
            )
        self.index = index
        self._documents = documents
        self._index_dir = index_dir

    @classmethod
    def from_texts(
        cls,
        texts: Sequence[str],
        documents: DocumentStore | None = None,
        *,
        params: BM25Params | None = None,
        analyzer: Analyzer | None = None,
    ) -> BM25Retriever:
        """Index an in-memory list of texts (doc id = position); for tests and small corpora."""
        index = BM25Index.build([texts], params, analyzer, total=len(texts), progress=False)
        return cls(index, documents)

    @classmethod
    def from_kb(
        cls,
        kb: KnowledgeBase,
        *,
        params: BM25Params | None = None,
        analyzer: Analyzer | None = None,
        rebuild: bool = False,
        batch_size: int = 4096,
        progress: bool = True,
        save: bool = True,
        threads: int | None = None,
    ) -> BM25Retriever:
        """Load the knowledge base's BM25 index for these settings, building it once (and
        saving it, unless ``save`` is off or the disk lacks the room); searches run on
        ``threads`` threads (``BM25Index.set_threads``)."""
        params = params or BM25Params()
        analyzer = analyzer or Analyzer()
        directory = Path(kb.artifact_dir(BM25Index.artifact_name(params, analyzer)))
        index: BM25Index | None = None
        if not rebuild and (directory / "bm25.json").exists():
            index = BM25Index.load(directory)
            if index.num_docs != len(kb):
                logger.warning("stale BM25 index in %s (%d docs); rebuilding", directory, len(kb))
                index = None
        if index is None:
            logger.info("building BM25 index over %d docs into %s", len(kb), directory)
            started = time.perf_counter()
            index = BM25Index.build_kb(
                kb, params, analyzer, batch_size=batch_size, progress=progress
            )
            logger.info("BM25 index built in %.1f s", time.perf_counter() - started)
            if save:
                _save_if_room(index, directory)
            else:
                logger.info("BM25 index not saved (save_index off)")
        index.set_threads(threads)
        logger.info("BM25 search: %d shards on %d threads", index.shards, index.threads)
        return cls(index, kb.documents, index_dir=str(directory))

    @property
    def analyzer(self) -> Analyzer:
        """The analyzer queries and documents go through (the speculation cache uses it too)."""
        return self.index.analyzer

    @property
    def info(self) -> RetrieverInfo:
        index = self.index
        return RetrieverInfo(
            backend=self.backend,
            num_docs=index.num_docs,
            dim=0,
            metric="bm25",
            bm25=index.params,
            index_dir=self._index_dir,
            extra={
                "analyzer": index.analyzer.name,
                "vocab_size": str(len(index.vocab)),
                "avgdl": repr(index.avgdl),
            },
        )

    def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        """Top-k per query; the ``prefetch`` hits after it are exact too (the top-(k+p)):
        an inverted index pays little for a longer list."""
        n = check_k(k) + check_prefetch(prefetch)
        texts = check_queries(queries)
        return self.index.top_k_many([self.index.term_ids(q) for q in texts], n)

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        check_query(query)
        ids = check_doc_ids(doc_ids, self.index.num_docs)
        return self.index.scores_for(self.index.term_ids(query), ids).tolist()

    def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        ids = check_doc_ids(doc_ids, self.index.num_docs)
        if self._documents is None:
            raise RuntimeError("documents: this retriever has no document store")
        return self._documents.get(ids.tolist())

    def term_weights(self, doc_ids: Sequence[int]) -> list[TermWeights]:
        """Each document's distinct terms and weights (``BM25Index.term_weights``), from
        the stored text; needs the document store."""
        ids = check_doc_ids(doc_ids, self.index.num_docs)
        if self._documents is None:
            raise RuntimeError("term_weights: this retriever has no document store")
        docs = self._documents.get(ids.tolist())
        return self.index.term_weights(ids.tolist(), [doc.contents for doc in docs])


def _save_if_room(index: BM25Index, directory: Path) -> None:
    """Save ``index`` into ``directory`` if the disk keeps its headroom after it."""
    needed, free = index.saved_bytes(), shutil.disk_usage(directory).free
    if needed + DISK_HEADROOM_BYTES <= free:
        index.save(directory)
    else:  # e.g. 21M docs (~19 GB) beside a 21M dense knowledge base on a 64 GB disk
        logger.warning(
            "BM25 index not saved: it needs %.1f GB and %s has %.1f GB free;"
            " it will be built again next time",
            needed / 1e9,
            directory,
            free / 1e9,
        )
