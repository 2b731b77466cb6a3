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

import math
import os
from collections.abc import Callable, Sequence
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
_WEIGHT_CHUNK = 1 << 22
"""Postings weighted per step in ``finish`` (bounds its temporaries)."""


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

    def add_filler(
        self,
        filler: FillerText,
        stop: int,
        analyzer: Analyzer,
        *,
        threads: int | None = None,
        chunk: int = FILLER_CHUNK,
        on_chunk: Callable[[int], None] | None = None,
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

        Frees the collected counts as it goes (at 21M documents they are ~18 GB); copies and
        weights on ``threads`` threads (default: every core this process may use)."""
        if self.num_docs == 0:
            raise ValueError("corpus: BM25 needs at least one document")
        if not self.vocab:
            raise ValueError("corpus: no document has any term after analysis")
        n = self.num_docs
        with ThreadPoolExecutor(_workers(threads), thread_name_prefix="bm25-finish") as pool:
            doc_len = _take_concat(self._lengths, pool)
            doc = _take_concat(self._docs, pool)
            term = _take_concat(self._terms, pool)
            tf = _take_concat(self._tfs, pool)
            idf = rank_bm25_idf(np.bincount(term, minlength=len(self.vocab)), n, params)
            avgdl = float(doc_len.sum()) / n
            weights = np.empty(len(tf), dtype=np.float64)
            steps = [
                pool.submit(
                    _weigh,
                    weights,
                    slice(a, a + _WEIGHT_CHUNK),
                    tf,
                    doc,
                    term,
                    doc_len,
                    idf,
                    avgdl,
                    params,
                )
                for a in range(0, len(tf), _WEIGHT_CHUNK)
            ]
            for step in steps:
                step.result()
        del tf
        matrix = sp.csc_matrix((weights, (doc, term)), shape=(n, len(self.vocab)))
        return matrix, idf, doc_len


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


def _weigh(
    out: np.ndarray,
    part: slice,
    tf: np.ndarray,
    doc: np.ndarray,
    term: np.ndarray,
    doc_len: np.ndarray,
    idf: np.ndarray,
    avgdl: float,
    params: BM25Params,
) -> None:
    """``out[part]``: the weights of postings ``part`` (one thread's share of ``finish``)."""
    out[part] = bm25_weights(
        tf[part].astype(np.float64), doc_len[doc[part]], idf[term[part]], avgdl, params
    )


def _take_concat(parts: list[np.ndarray], pool: ThreadPoolExecutor) -> np.ndarray:
    """Concatenate ``parts`` on the pool's threads, then empty the list (so they can be freed).
    One thread alone spends most of its time faulting in the new pages."""
    if not parts:
        return np.zeros(0, dtype=np.int64)
    out = np.empty(sum(len(p) for p in parts), dtype=parts[0].dtype)
    starts = np.cumsum([0] + [len(p) for p in parts])

    def copy(i: int) -> None:
        out[starts[i] : starts[i + 1]] = parts[i]

    list(pool.map(copy, range(len(parts))))
    parts.clear()
    return out


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
