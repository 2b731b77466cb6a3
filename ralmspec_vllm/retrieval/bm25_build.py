"""Counting a corpus's terms for ``BM25Index``: from texts, or straight from synthetic filler.

``Postings`` collects, document by document in id order, each document's distinct terms with
their frequencies, its length, and the vocabulary (term ids in order of first appearance, as
rank-bm25's dicts have them; the idf average sums in that order). ``finish`` turns that into
the index's statistics and its CSC weight matrix, with rank-bm25's expressions.

Two ways in, with the same result bit for bit (``tests/retrieval/test_bm25_build.py``):

- ``add_texts``: the analyzer over each text, one Python loop per token (187 s for 3M
  100-word documents on the dev machine: ~22 minutes at the paper's 21M).
- ``add_filler``: ``FillerText`` documents without making their text. A filler document is
  ``"synthetic-<id>\\n" + " ".join(words)`` with words drawn from the real passages' own
  whitespace words, so its terms are the title's terms followed by each word's terms
  (``\\w+`` runs never cross a space, and lowercasing a word alone equals lowercasing it in
  place, final sigma included, since a space ends its context). Each word's terms are looked
  up once, the word draws are counted in numpy row by row (sort each row, count the runs),
  chunks run on every core. The title's number is a new term per document (unless some real
  text has it), assigned ids in doc id order.
  Where a word has a term the vocabulary lacks or a title does not analyse as expected,
  ``add_filler`` raises ``FillerNotCountable`` before it changes anything; the caller falls
  back to the texts.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from ralmspec_vllm.retrieval.analyzer import Analyzer
from ralmspec_vllm.types import BM25Params

if TYPE_CHECKING:
    from ralmspec_vllm.retrieval.corpus import FillerText

FILLER_CHUNK = 32768
"""Filler documents counted per task (~60 MB of working arrays each)."""
_EMPTY = np.zeros(0, dtype=np.int32)


class FillerNotCountable(ValueError):
    """The filler's terms cannot be counted without its text (see the module doc)."""


class Postings:
    """Per-document term counts of a corpus, added in doc id order."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.num_docs = 0
        self._docs: list[np.ndarray] = []  # int32 doc ids, one array per batch
        self._terms: list[np.ndarray] = []  # int32 term ids
        self._tfs: list[np.ndarray] = []  # int32 term frequencies
        self._lengths: list[np.ndarray] = []  # int64 terms per document

    def _append(self, docs: np.ndarray, terms: np.ndarray, tfs: np.ndarray, lengths: np.ndarray):
        self._docs.append(docs.astype(np.int32, copy=False))
        self._terms.append(terms.astype(np.int32, copy=False))
        self._tfs.append(tfs.astype(np.int32, copy=False))
        self._lengths.append(lengths.astype(np.int64, copy=False))
        self.num_docs += len(lengths)

    def add_texts(self, texts: Sequence[str], analyzer: Analyzer) -> None:
        """The next ``len(texts)`` documents, analysed one token at a time."""
        vocab = self.vocab
        token_ids: list[int] = []
        lengths = np.zeros(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = [vocab.setdefault(t, len(vocab)) for t in analyzer(text)]
            lengths[i] = len(ids)
            token_ids.extend(ids)
        width = max(len(vocab), 1)
        local_doc = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
        key = local_doc * width + np.asarray(token_ids, dtype=np.int64)
        uniq, counts = np.unique(key, return_counts=True)
        self._append(uniq // width + self.num_docs, uniq % width, counts, lengths)

    def add_text_batches(
        self,
        batches: Iterable[Sequence[str]],
        analyzer: Analyzer,
        on_batch: Callable[[int], object] | None = None,
    ) -> None:
        """``add_texts`` for each batch; ``on_batch(len(batch))`` after each (progress)."""
        for batch in batches:
            self.add_texts(batch, analyzer)
            if on_batch is not None:
                on_batch(len(batch))

    def add_filler(
        self,
        filler: FillerText,
        stop: int,
        analyzer: Analyzer,
        *,
        threads: int | None = None,
        chunk: int = FILLER_CHUNK,
        on_chunk: Callable[[int], object] | None = None,
    ) -> None:
        """Filler documents ``num_docs .. stop-1`` (doc ids), counted without their text.

        ``FillerNotCountable`` (nothing added) where that cannot be exact. ``on_chunk(n)``
        after each chunk of ``n`` documents, in order (for a progress bar)."""
        start = self.num_docs
        if stop <= start:
            return
        word_ptr, word_terms = self._word_table(filler, analyzer)
        head = self._title_head(filler, analyzer, start, stop)
        # The first filler document's title brings the head terms (if new), then the numbers.
        head_ids = np.array([self.vocab.setdefault(t, len(self.vocab)) for t in head])
        numbers = self._number_ids(start, stop)
        per_word = np.diff(word_ptr)

        def count(lo: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
            hi = min(lo + chunk, stop)
            words = filler.word_indices(np.arange(lo, hi))
            return _count_rows(
                words,
                word_ptr,
                word_terms,
                per_word,
                head_ids,
                numbers[lo - start : hi - start],
                lo,
            )

        with ThreadPoolExecutor(_workers(threads), thread_name_prefix="bm25-filler") as pool:
            for docs, terms, tfs, lengths in pool.map(count, range(start, stop, chunk)):
                self._append(docs, terms, tfs, lengths)
                if on_chunk is not None:
                    on_chunk(len(lengths))

    def _word_table(self, filler: FillerText, analyzer: Analyzer) -> tuple[np.ndarray, np.ndarray]:
        """CSR of each filler word's term ids; every term must already be in the vocabulary."""
        lengths = np.zeros(len(filler.words) + 1, dtype=np.int64)
        flat: list[int] = []
        for i, word in enumerate(filler.words):
            terms = analyzer(word)
            for t in terms:
                tid = self.vocab.get(t)
                if tid is None:
                    raise FillerNotCountable(
                        f"filler word {word!r}: term {t!r} is not in the vocabulary"
                    )
                flat.append(tid)
            lengths[i + 1] = len(terms)
        return np.cumsum(lengths), np.asarray(flat, dtype=np.int64)

    @staticmethod
    def _title_head(filler: FillerText, analyzer: Analyzer, start: int, stop: int) -> list[str]:
        """The title's terms before its number, the same for every id in [start, stop)."""
        heads = []
        for doc_id in sorted({start, stop - 1}):
            terms = analyzer(filler.title(doc_id))
            if not terms or terms[-1] != str(doc_id):
                raise FillerNotCountable(f"title {filler.title(doc_id)!r} analyses as {terms}")
            heads.append(terms[:-1])
        if any(h != heads[0] for h in heads):
            raise FillerNotCountable(f"titles analyse to different heads: {heads}")
        return heads[0]

    def _number_ids(self, start: int, stop: int) -> np.ndarray:
        """Term ids of ``str(d)`` for d in [start, stop): existing ids where the vocabulary has
        the number already, else new ids in increasing d (their order of first appearance)."""
        taken = sorted(
            n
            for n in (
                int(t) for t in self.vocab if t.isascii() and t.isdigit() and str(int(t)) == t
            )
            if start <= n < stop
        )
        taken_arr = np.asarray(taken, dtype=np.int64)
        base = len(self.vocab)
        docs = np.arange(start, stop, dtype=np.int64)
        ids = base + (docs - start) - np.searchsorted(taken_arr, docs)
        for n in taken:
            ids[n - start] = self.vocab[str(n)]
        fresh = np.ones(stop - start, dtype=bool)
        fresh[taken_arr - start] = False
        new = docs[fresh]
        self.vocab.update(zip(map(str, new.tolist()), range(base, base + len(new)), strict=True))
        return ids

    def finish(
        self, params: BM25Params, threads: int | None = None
    ) -> tuple[sp.csc_matrix, np.ndarray, np.ndarray]:
        """(weights (docs x terms, CSC), idf, doc lengths), rank-bm25's numbers.

        The CSC matrix is filled straight from the collected batches, on ``threads`` threads
        (default: every core this process may use): the batches are cut into one run of
        consecutive batches per thread; each thread counts its run's terms, and from all the
        counts each run gets its own start in every term's column, so the runs fill their
        parts of the columns at once, each batch's postings stably sorted by term (docs stay
        ascending within a column). The same matrix as SciPy's COO-to-CSC conversion of the
        concatenated postings, which runs on one core after a copy of everything. 3M docs on
        the dev machine: 24.4 s on 1 thread, 13.1 s on 2; SciPy's way took 13.5 s, 8.4 s of
        it in its one-core conversion, which at 21M is ~1 minute however many cores there
        are. The batches are freed as they are used."""
        if self.num_docs == 0:
            raise ValueError("corpus: BM25 needs at least one document")
        if not self.vocab:
            raise ValueError("corpus: no document has any term after analysis")
        n, width = self.num_docs, len(self.vocab)
        docs, terms, tfs = self._docs, self._terms, self._tfs
        sizes = np.array([len(t) for t in terms], dtype=np.int64)
        nnz = int(sizes.sum())
        index_dtype = np.int32 if max(nnz, n, width) < np.iinfo(np.int32).max else np.int64
        workers = _workers(threads)
        runs = _runs(sizes, workers)
        doc_len = np.concatenate(self._lengths)  # one int64 per document: small
        self._lengths.clear()
        with ThreadPoolExecutor(workers, thread_name_prefix="bm25-finish") as pool:

            def count(run: range) -> np.ndarray:
                # Not a bincount per batch: its O(width) output is ~170 MB per batch at 21M
                # docs' vocabulary.
                out = np.zeros(width, dtype=np.int64)
                for i in run:
                    np.add.at(out, terms[i], 1)
                return out

            counts = list(pool.map(count, runs))
            df = np.sum(counts, axis=0)
            idf = rank_bm25_idf(df, n, params)
            avgdl = float(doc_len.sum()) / n
            indptr = np.zeros(width + 1, dtype=index_dtype)
            np.cumsum(df, out=indptr[1:])
            # Each run's next free slot in every column: the column's start plus the
            # postings the earlier runs put there (the counts become the starts in place).
            start = indptr[:-1].astype(np.int64)
            for run_counts in counts:
                following = start + run_counts
                run_counts[:] = start
                start = following
            indices = np.empty(nnz, dtype=index_dtype)
            data = np.empty(nnz, dtype=np.float64)

            def fill(run: range, free: np.ndarray) -> None:
                for i in run:
                    term = terms[i]
                    weights = bm25_weights(
                        tfs[i].astype(np.float64), doc_len[docs[i]], idf[term], avgdl, params
                    )
                    order = np.argsort(term, kind="stable")
                    by_term = term[order]
                    ids, per = _term_runs(by_term)
                    rank = np.arange(len(by_term)) - np.repeat(np.cumsum(per) - per, per)
                    slots = free[by_term] + rank
                    indices[slots] = docs[i][order]
                    data[slots] = weights[order]
                    free[ids] += per
                    docs[i] = terms[i] = tfs[i] = _EMPTY  # freed as it goes

            for done in [
                pool.submit(fill, run, free) for run, free in zip(runs, counts, strict=True)
            ]:
                done.result()
        for parts in (docs, terms, tfs):
            parts.clear()
        matrix = sp.csc_matrix((data, indices, indptr), shape=(n, width))
        return matrix, idf, doc_len


def _term_runs(sorted_terms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct terms, how often each occurs) of a sorted term array."""
    first = np.ones(len(sorted_terms), dtype=bool)
    first[1:] = sorted_terms[1:] != sorted_terms[:-1]
    heads = np.flatnonzero(first)
    return sorted_terms[heads], np.diff(np.append(heads, len(sorted_terms)))


def _runs(sizes: np.ndarray, parts: int) -> list[range]:
    """Cut batches ``0..len(sizes)-1`` into at most ``parts`` runs of consecutive batches
    with about equal postings each."""
    bounds = np.searchsorted(np.cumsum(sizes), np.linspace(0, sizes.sum(), parts + 1)[1:-1])
    edges = [0, *sorted(set((bounds + 1).tolist()) - {0}), len(sizes)]
    return [range(a, b) for a, b in itertools.pairwise(edges) if a < b]


def _count_rows(
    words: np.ndarray,
    word_ptr: np.ndarray,
    word_terms: np.ndarray,
    per_word: np.ndarray,
    head_ids: np.ndarray,
    numbers: np.ndarray,
    first_doc: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(doc, term, tf, lengths) of filler rows: title head, number, then the words' terms."""
    rows = len(words)
    counts = per_word[words]  # terms per word draw, (rows, words)
    fixed = len(head_ids) + 1
    lengths = counts.sum(axis=1) + fixed
    width = int(lengths.max())
    sentinel = np.iinfo(np.int64).max
    matrix = np.full((rows, width), sentinel, dtype=np.int64)
    matrix[:, : len(head_ids)] = head_ids
    matrix[:, fixed - 1] = numbers
    # Ragged gather: every word draw's terms, laid out after the row's fixed terms.
    flat_counts = counts.ravel()
    total = int(flat_counts.sum())
    ends = np.cumsum(flat_counts)
    within = np.arange(total) - np.repeat(ends - flat_counts, flat_counts)
    terms = word_terms[np.repeat(word_ptr[words.ravel()], flat_counts) + within]
    row_of = np.repeat(np.arange(rows), lengths - fixed)
    row_starts = np.cumsum(lengths - fixed) - (lengths - fixed)
    col = fixed + np.arange(total) - row_starts[row_of]
    matrix[row_of, col] = terms
    matrix.sort(axis=1)
    valid = matrix != sentinel
    first = np.empty_like(valid)
    first[:, 0] = True
    first[:, 1:] = matrix[:, 1:] != matrix[:, :-1]
    first &= valid
    run_row, run_col = np.nonzero(first)
    pos = run_row * width + run_col
    ends_at = np.empty_like(pos)
    ends_at[:-1] = pos[1:]
    last = np.ones(len(pos), dtype=bool)
    last[:-1] = run_row[1:] != run_row[:-1]
    ends_at[last] = run_row[last] * width + lengths[run_row[last]]
    return run_row + first_doc, matrix[run_row, run_col], ends_at - pos, lengths


def _workers(threads: int | None) -> int:
    return max(1, threads or len(os.sched_getaffinity(0)))


def rank_bm25_idf(df: np.ndarray, num_docs: int, params: BM25Params) -> np.ndarray:
    """rank-bm25's idf, bit for bit: ``math.log`` per document frequency, the raw idfs summed
    one after another in vocabulary order (``np.cumsum`` is that sequential sum, not numpy's
    pairwise one), then the epsilon floor. ``math.log`` runs once per distinct frequency."""
    values, inverse = np.unique(df, return_inverse=True)
    logs = np.array([math.log(num_docs - n + 0.5) - math.log(n + 0.5) for n in values.tolist()])
    idf = logs[inverse.reshape(-1)]
    average_idf = float(np.cumsum(idf)[-1]) / len(idf)
    idf[idf < 0] = params.epsilon * average_idf
    return idf


def bm25_weights(
    tf: np.ndarray, doc_len: np.ndarray, idf: np.ndarray, avgdl: float, params: BM25Params
) -> np.ndarray:
    """Per-posting weights with rank-bm25's expression and operation order."""
    k1, b = params.k1, params.b
    norm = (1 - b) + b * doc_len.astype(np.float64) / avgdl
    return idf * (tf * (k1 + 1) / (tf + k1 * norm))
