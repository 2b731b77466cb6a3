"""The BM25 build's filler path: counted from the word draws, equal to the text path bit for bit.

A small knowledge base from a JSONL corpus (real MiniLM encoder, synthetic filler) whose real
text has what can go wrong: numbers that are also filler doc ids (the title's number term then
already exists), the word "synthetic" (the title's first term), words with several terms
(``U.S.``, ``co-op``), words with none (stopwords, a dash), case changes that change length
(``İstanbul``) and a final sigma.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from ralmspec_vllm.retrieval import bm25 as bm25_mod
from ralmspec_vllm.retrieval.analyzer import Analyzer
from ralmspec_vllm.retrieval.bm25 import BM25Index, BM25Retriever
from ralmspec_vllm.retrieval.bm25_build import (
    FillerNotCountable,
    Postings,
    _runs,
    bm25_weights,
    rank_bm25_idf,
)
from ralmspec_vllm.retrieval.corpus import FillerText
from ralmspec_vllm.retrieval.kb import KnowledgeBase, build_index
from ralmspec_vllm.types import BM25Params

NUM_REAL = 12
NUM_FILLER = 700
WORDS = (
    "The synthetic U.S. co-op in İstanbul — ΟΔΟΣ naïve x_y 007 of and volcano violin glacier"
    " tram chess bread coral satellite Aristotle's logic 2nd"
)


def _corpus(path: Path) -> Path:
    lines = []
    for i in range(NUM_REAL):
        # Filler doc ids run from NUM_REAL: some of them appear in the text as numbers.
        numbers = f"{NUM_REAL + 3 * i} {NUM_REAL + 500 + i} {10 * i}"
        text = f"{WORDS.split()[i]} passage {i}: {WORDS} {numbers}."
        lines.append({"id": f"doc-{i}", "title": f"Topic {i}", "text": text})
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines))
    return path


@pytest.fixture(scope="module")
def kb(tmp_path_factory: pytest.TempPathFactory) -> KnowledgeBase:
    corpus = _corpus(tmp_path_factory.mktemp("corpus") / "tricky.jsonl")
    out = tmp_path_factory.mktemp("kb") / "index"
    return build_index(
        out,
        sources=(),
        corpus=corpus,
        synthetic_filler=NUM_FILLER,
        passage_words=40,
        show_progress=False,
    )


def _assert_same(a: BM25Index, b: BM25Index) -> None:
    assert list(a.vocab.items()) == list(b.vocab.items())  # ids in first-appearance order
    for name in ("indptr", "indices", "data"):
        x, y = getattr(a.weights, name), getattr(b.weights, name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name
    assert a.idf.tobytes() == b.idf.tobytes()
    assert np.array_equal(a.doc_len, b.doc_len) and a.avgdl == b.avgdl


def test_the_corpus_has_the_cases_the_filler_path_must_get_right(kb: KnowledgeBase) -> None:
    vocab = BM25Index.build(kb.iter_texts(64, filler=False), progress=False).vocab
    ids = range(NUM_REAL, NUM_REAL + NUM_FILLER)
    assert "synthetic" in vocab
    assert sum(str(i) in vocab for i in ids) >= 10
    analyzer = Analyzer()
    assert kb.filler is not None
    assert {len(analyzer(w)) for w in kb.filler.words} >= {0, 1, 2}


@pytest.mark.parametrize("stopwords", [True, False], ids=["stop", "nostop"])
@pytest.mark.parametrize("params", [BM25Params(), BM25Params(k1=0.9, b=0.4, epsilon=0.1)])
def test_build_kb_equals_the_text_build_bit_for_bit(
    kb: KnowledgeBase, stopwords: bool, params: BM25Params
) -> None:
    analyzer = Analyzer(stopwords=stopwords)
    fast = BM25Index.build_kb(kb, params, analyzer, threads=2, progress=False)
    slow = BM25Index.build(kb.iter_texts(100), params, analyzer, progress=False)
    _assert_same(fast, slow)
    assert fast.num_docs == NUM_REAL + NUM_FILLER


@pytest.mark.parametrize("params", [BM25Params(), BM25Params(k1=0.9, b=0.4, epsilon=0.1)])
def test_term_weights_recomputed_from_the_text_equal_the_stored_weights(
    kb: KnowledgeBase, params: BM25Params
) -> None:
    """``term_weights`` recomputes w[d, t] from a document's text; over real and filler
    documents (the filler's index counted from its word draws, not its text) every weight
    is the stored one bit for bit, and a text's terms are exactly the document's postings."""
    index = BM25Index.build_kb(kb, params, Analyzer(), threads=2, progress=False)
    ids = [*range(0, NUM_REAL, 7), *range(NUM_REAL, NUM_REAL + NUM_FILLER, 97)]
    texts = [d.contents for d in kb.documents.get(ids)]
    stored = index.weights.tocsr()
    for doc_id, (terms, weights) in zip(ids, index.term_weights(ids, texts), strict=True):
        row = stored[doc_id]
        expected = dict(zip(row.indices.tolist(), row.data.tolist(), strict=True))
        got = {index.vocab[t]: w for t, w in zip(terms, weights.tolist(), strict=True)}
        assert got.keys() == expected.keys(), doc_id
        assert all(got[c].hex() == expected[c].hex() for c in got), doc_id


@pytest.mark.parametrize(("chunk", "threads"), [(1, 1), (7, 3), (4096, 2)])
def test_filler_chunks_and_threads_do_not_change_the_counts(
    kb: KnowledgeBase, chunk: int, threads: int
) -> None:
    analyzer = Analyzer()
    postings = Postings()
    for batch in kb.iter_texts(5, filler=False):
        postings.add_texts(batch, analyzer)
    seen: list[int] = []
    assert kb.filler is not None
    postings.add_filler(
        kb.filler, len(kb), analyzer, threads=threads, chunk=chunk, on_chunk=seen.append
    )
    assert sum(seen) == NUM_FILLER and postings.num_docs == len(kb)
    matrix, idf, doc_len = postings.finish(BM25Params())
    fast = BM25Index(matrix, postings.vocab, idf, doc_len, BM25Params(), analyzer)
    _assert_same(fast, BM25Index.build(kb.iter_texts(64), progress=False))


def test_filler_part_way_in_and_in_two_calls(kb: KnowledgeBase) -> None:
    """Start after some filler documents went in as text; finish in two filler calls."""
    analyzer = Analyzer()
    postings = Postings()
    assert kb.filler is not None
    batches = kb.iter_texts(NUM_REAL + 50)
    postings.add_texts(next(batches), analyzer)  # the real docs and 50 filler docs
    postings.add_filler(kb.filler, NUM_REAL + 400, analyzer, chunk=33)
    postings.add_filler(kb.filler, len(kb), analyzer, chunk=64)
    matrix, idf, doc_len = postings.finish(BM25Params())
    fast = BM25Index(matrix, postings.vocab, idf, doc_len, BM25Params(), analyzer)
    _assert_same(fast, BM25Index.build(kb.iter_texts(64), progress=False))


def test_a_word_missing_from_the_vocabulary_falls_back_to_the_text(
    kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert kb.filler is not None
    words = [*kb.filler.words, "Zyzzyva"]  # not in any real passage
    odd = FillerText(words, [*kb.filler.counts, 50], kb.filler.seed, kb.filler.num_words)
    monkeypatch.setattr(kb, "filler", odd)
    postings = Postings()
    for batch in kb.iter_texts(64, filler=False):
        postings.add_texts(batch, Analyzer())
    before = (dict(postings.vocab), postings.num_docs)
    with pytest.raises(FillerNotCountable, match="zyzzyva"):
        postings.add_filler(odd, len(kb), Analyzer())
    assert (postings.vocab, postings.num_docs) == before  # nothing was added
    with caplog.at_level(logging.WARNING, logger="ralmspec_vllm.retrieval.bm25"):
        fast = BM25Index.build_kb(kb, progress=False)
    assert "counting the filler from its text" in caplog.text
    _assert_same(fast, BM25Index.build(kb.iter_texts(64), progress=False))
    assert "zyzzyva" in fast.vocab


def test_a_title_that_does_not_end_in_its_number_term_is_refused(
    kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert kb.filler is not None
    monkeypatch.setattr(FillerText, "title", staticmethod(lambda doc_id: f"synthetic_{doc_id}"))
    postings = Postings()
    for batch in kb.iter_texts(64, filler=False):
        postings.add_texts(batch, Analyzer())
    with pytest.raises(FillerNotCountable, match="analyses as"):
        postings.add_filler(kb.filler, len(kb), Analyzer())


def test_idf_equals_rank_bm25s_sequential_sum() -> None:
    """rank-bm25 adds the idfs one by one; numpy's ``sum`` is pairwise and differs."""
    rng = np.random.default_rng(3)
    num_docs = 1_000_003
    params = BM25Params()
    df = rng.integers(1, num_docs, size=20_000)
    df[:5000] = rng.integers(1, 4, size=5000)  # many repeats: one log per distinct value
    raw = [math.log(num_docs - n + 0.5) - math.log(n + 0.5) for n in df.tolist()]
    total = 0.0
    for value in raw:
        total += value
    expected = np.array(raw)
    expected[expected < 0] = params.epsilon * (total / len(raw))
    assert rank_bm25_idf(df, num_docs, params).tobytes() == expected.tobytes()
    assert float(np.sum(raw)) != total  # the test would catch a pairwise sum


def test_from_kb_keeps_the_index_in_memory_when_the_disk_is_short(
    kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Usage:
        free = 1 << 20

    monkeypatch.setattr(bm25_mod.shutil, "disk_usage", lambda path: Usage())
    with caplog.at_level(logging.WARNING, logger="ralmspec_vllm.retrieval.bm25"):
        retriever = BM25Retriever.from_kb(kb, rebuild=True, progress=False)
    assert "BM25 index not saved" in caplog.text
    assert not (Path(retriever.info.index_dir) / "bm25.json").exists()
    hits = retriever.search(["volcano glacier passage"], 3)[0]
    assert len(hits) == 3 and hits[0].score >= hits[-1].score


@pytest.mark.parametrize("threads", [1, 3, 64])
def test_finish_equals_scipys_conversion_of_the_concatenated_postings(
    kb: KnowledgeBase, threads: int
) -> None:
    """The CSC matrix filled in parallel runs equals SciPy's COO-to-CSC conversion (what
    ``finish`` did before), array for array, dtypes included."""
    params = BM25Params(k1=1.2, b=0.7, epsilon=0.2)
    postings = Postings()
    for batch in kb.iter_texts(37):  # 20 batches of uneven postings, more threads than that
        postings.add_texts(batch, Analyzer())
    doc, term, tf, lengths = (
        np.concatenate(parts)
        for parts in (postings._docs, postings._terms, postings._tfs, postings._lengths)
    )
    matrix, idf, doc_len = postings.finish(params, threads)
    assert postings._docs == [] and postings._terms == [] and postings._tfs == []  # freed
    expected_idf = rank_bm25_idf(np.bincount(term, minlength=matrix.shape[1]), len(kb), params)
    weights = bm25_weights(
        tf.astype(np.float64), lengths[doc], expected_idf[term], lengths.sum() / len(kb), params
    )
    expected = sp.csc_matrix((weights, (doc, term)), shape=matrix.shape)
    for name in ("indptr", "indices", "data"):
        got, want = getattr(matrix, name), getattr(expected, name)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    assert idf.tobytes() == expected_idf.tobytes() and np.array_equal(doc_len, lengths)


def test_runs_cut_batches_into_consecutive_runs_of_about_equal_postings() -> None:
    assert _runs(np.array([5, 5, 5, 5]), 2) == [range(0, 2), range(2, 4)]
    assert _runs(np.array([100, 1, 1, 1]), 3) == [range(0, 1), range(1, 4)]
    assert _runs(np.array([3, 0, 3]), 8) == [range(0, 1), range(1, 3)]  # fewer runs than asked
    assert _runs(np.array([7]), 4) == [range(0, 1)]
    runs = _runs(np.arange(1, 50), 6)
    assert [i for r in runs for i in r] == list(range(49)) and len(runs) == 6


def test_from_kb_with_saving_off_builds_in_memory(
    kb: KnowledgeBase, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="ralmspec_vllm.retrieval.bm25"):
        retriever = BM25Retriever.from_kb(kb, rebuild=True, progress=False, save=False)
    assert "save_index off" in caplog.text
    assert not (Path(retriever.info.index_dir) / "bm25.json").exists()
    assert retriever.search(["volcano glacier passage"], 2)[0]


def test_save_writes_the_vocabulary_in_id_order_whatever_the_dict_order(tmp_path: Path) -> None:
    """``save`` lists the terms in dict order when that is id order (a 21M vocabulary is
    too big to sort) and sorts them by id otherwise."""
    index = BM25Index.build([["alpha beta", "beta gamma", "delta alpha"]], progress=False)
    for vocab in (dict(index.vocab), dict(reversed(list(index.vocab.items())))):
        index.vocab = vocab
        index.save(tmp_path / "index")
        loaded = BM25Index.load(tmp_path / "index")
        assert loaded.vocab == vocab and list(loaded.vocab.values()) == [0, 1, 2, 3]
        assert loaded.top_k(loaded.term_ids("alpha"), 2) == index.top_k(index.term_ids("alpha"), 2)
