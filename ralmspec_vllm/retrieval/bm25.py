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

The exhaustive top-k (one scatter, or doc-id shards on a thread pool for large indexes) is
``bm25_search.PostingsSearch``; term weights for a speculation cache are recomputed from a
document's text (``term_weights``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp
from tqdm import tqdm

from ralmspec_vllm.retrieval.analyzer import Analyzer
from ralmspec_vllm.retrieval.base import DocumentStore, TermWeights
from ralmspec_vllm.retrieval.bm25_build import FillerNotCountable, Postings, bm25_weights
from ralmspec_vllm.retrieval.bm25_search import PostingsSearch
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
        self.searcher = PostingsSearch(self._indptr, self._rows, self._data, self.num_docs)
        self.searcher.set_threads(None)

    def set_threads(self, threads: int | None) -> None:
        """Search on ``threads`` threads, ``None``: every core (``PostingsSearch.set_threads``
        also sets the shard size and the smallest corpus searched in parallel)."""
        self.searcher.set_threads(threads)

    @property
    def threads(self) -> int:
        return self.searcher.threads

    @property
    def shards(self) -> int:
        """How many doc-id shards a search is cut into (1: serial)."""
        return self.searcher.shards

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
        return self.searcher.scores_all(term_ids)

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
        rows = self.searcher.rows_of(columns[rarest])
        at = int(np.searchsorted(rows, rows.dtype.type(doc_id)))
        if at == len(rows) or rows[at] != doc_id:
            raise ValueError(f"doc {doc_id}: term {terms[rarest]!r} is not indexed for it")

    def top_k(self, term_ids: Sequence[int], k: int) -> list[Hit]:
        """Exact top-k over the whole corpus (score desc, doc id asc)."""
        return self.searcher.top_k_many([term_ids], k)[0]

    def top_k_many(self, queries: Sequence[Sequence[int]], k: int) -> list[list[Hit]]:
        """``top_k`` for each query (term ids), on the search's threads."""
        return self.searcher.top_k_many(queries, k)

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
