"""BM25: identical to rank-bm25 on the real Wikipedia passages, exact scores, ties, save/load.

The parity tests open the real knowledge base (gensim's Wikipedia excerpt, ~4,600 passages,
built once into the cache dir) and compare against ``rank_bm25.BM25Okapi`` fed the same
analyzer's tokens: every document's score for every query, and the top-k lists.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from rank_bm25 import BM25Okapi

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.retrieval.analyzer import ENGLISH_STOPWORDS, Analyzer
from ralmspec_vllm.retrieval.base import DenseRetriever, Retriever
from ralmspec_vllm.retrieval.bm25 import BM25Index, BM25Retriever
from ralmspec_vllm.retrieval.bm25_search import top_k_indices
from ralmspec_vllm.retrieval.kb import KnowledgeBase, default_index
from ralmspec_vllm.types import BM25Params

QUERIES_PER_RUN = 60


@pytest.fixture(scope="module")
def kb() -> KnowledgeBase:
    return default_index(show_progress=False)


@pytest.fixture(scope="module")
def wiki_texts(kb: KnowledgeBase) -> list[str]:
    return [text for batch in kb.iter_texts(2048) for text in batch]


def _queries(texts: list[str]) -> list[str]:
    """Real queries: passage snippets (as RaLM's sliding-window queries are), some mixed-case
    keyword queries, a query of only stopwords and one of unknown words."""
    rng = np.random.default_rng(0)
    picks = rng.choice(len(texts), size=QUERIES_PER_RUN - 4, replace=False)
    out = []
    for n, i in enumerate(picks.tolist()):
        words = texts[i].split()
        start = int(rng.integers(0, max(1, len(words) - 32)))
        out.append(" ".join(words[start : start + (32 if n % 2 else 6)]))
    return [*out, "The History of ANARCHISM", "Aristotle's logic", "the of and to", "qqzx wvvb"]


@pytest.mark.parametrize(
    "params",
    [BM25Params(), BM25Params(k1=0.9, b=0.4, epsilon=0.1)],
    ids=["defaults", "k1=0.9-b=0.4-eps=0.1"],
)
@pytest.mark.parametrize("stopwords", [True, False], ids=["stop", "nostop"])
def test_equals_rank_bm25_on_real_wiki_passages(
    kb: KnowledgeBase, wiki_texts: list[str], params: BM25Params, stopwords: bool
) -> None:
    analyzer = Analyzer(stopwords=stopwords)
    index = BM25Index.build(kb.iter_texts(1000), params, analyzer, progress=False)
    retriever = BM25Retriever(index, kb.documents)
    reference = BM25Okapi(
        [analyzer(t) for t in wiki_texts], k1=params.k1, b=params.b, epsilon=params.epsilon
    )
    assert len(wiki_texts) == len(kb) > 4000
    assert index.avgdl == reference.avgdl
    if not stopwords:  # the epsilon floor must have fired for words in > half the passages
        assert any(
            reference.idf[w] == params.epsilon * reference.average_idf for w in ("the", "of")
        )
    all_ids = list(range(len(wiki_texts)))
    queries = _queries(wiki_texts)
    hits = retriever.search(queries, 10)
    for query, row in zip(queries, hits, strict=True):
        expected = reference.get_scores(analyzer(query))
        mine = np.asarray(retriever.score(query, all_ids))
        np.testing.assert_allclose(mine, expected, rtol=0, atol=1e-6)
        order = np.lexsort((np.arange(len(expected)), -expected))[:10]
        assert [h.doc_id for h in row] == order.tolist(), query
        np.testing.assert_allclose([h.score for h in row], expected[order], rtol=0, atol=1e-6)
        assert [h.score for h in row] == retriever.score(query, [h.doc_id for h in row])


def test_search_scores_equal_score_and_batch_is_per_query(wiki_texts: list[str]) -> None:
    retriever = BM25Retriever.from_texts(wiki_texts)
    queries = _queries(wiki_texts)
    batched = retriever.search(queries, 25)
    for query, row in zip(queries, batched, strict=True):
        assert retriever.search([query], 25)[0] == row
        assert [h.score for h in row] == retriever.score(query, [h.doc_id for h in row])


def test_ties_break_by_doc_id() -> None:
    texts = ["red apple", "green pear", "red apple", "blue sky", "red apple", "red red apple"]
    retriever = BM25Retriever.from_texts(texts)
    hits = retriever.search(["red apple"], 3)[0]
    scores = retriever.score("red apple", range(len(texts)))
    assert scores[0] == scores[2] == scores[4] > 0
    expected = sorted(range(len(texts)), key=lambda d: (-scores[d], d))[:3]
    assert [h.doc_id for h in hits] == expected
    # A query without known terms scores every document 0: the lowest ids come first.
    zero = retriever.search(["unknown words only"], 4)[0]
    assert [(h.doc_id, h.score) for h in zero] == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)]
    # Fewer positive documents than k: the zero-score rest follows by doc id.
    sky = retriever.search(["sky"], 3)[0]
    assert [h.doc_id for h in sky] == [3, 0, 1] and sky[0].score > 0 == sky[1].score


@pytest.mark.parametrize(("threads", "shard_docs"), [(2, 1000), (3, 300), (4, 97)])
def test_sharded_search_equals_the_serial_search_bit_for_bit(
    wiki_texts: list[str], threads: int, shard_docs: int
) -> None:
    """The parallel path (doc-id shards, per-shard top k, merged) against the one-bincount
    path: the same hits and the same float scores, for real passage queries, batches, k
    from 1 to past a shard's size, and duplicated passages tied across shards."""
    texts = [*wiki_texts, *wiki_texts[:50]]  # docs n..n+49 tie with docs 0..49
    serial = BM25Retriever.from_texts(texts)
    serial.index.set_threads(1)
    sharded = BM25Retriever.from_texts(texts)
    sharded.index.searcher.set_threads(threads, shard_docs=shard_docs, min_docs=1)
    shards = sharded.index.shards
    assert shards % threads == 0 and shards >= len(texts) / shard_docs and serial.index.shards == 1
    queries = [*_queries(wiki_texts), wiki_texts[3], f"{wiki_texts[7]} {wiki_texts[7]}"]
    for k in (1, 10, shard_docs + 5):
        expected = [serial.search([q], k)[0] for q in queries]
        assert sharded.search(queries, k) == expected
        assert [sharded.search([q], k)[0] for q in queries] == expected
    tied = sharded.search([wiki_texts[3]], 2)[0]
    assert [h.doc_id for h in tied] == [3, len(wiki_texts) + 3] and tied[0].score == tied[1].score


def test_sharded_search_on_a_tiny_corpus_keeps_the_tie_and_zero_rules() -> None:
    texts = ["red apple", "green pear", "red apple", "blue sky", "red apple", "red red apple"]
    retriever = BM25Retriever.from_texts(texts)
    retriever.index.searcher.set_threads(4, shard_docs=1, min_docs=1)
    assert retriever.index.shards == len(texts)  # never more shards than documents
    scores = retriever.score("red apple", range(len(texts)))
    hits = retriever.search(["red apple"], 4)[0]
    assert [h.doc_id for h in hits] == [5, 0, 2, 4] and scores[0] == scores[2] == scores[4]
    zero = retriever.search(["unknown words only"], 4)[0]
    assert [(h.doc_id, h.score) for h in zero] == [(0, 0.0), (1, 0.0), (2, 0.0), (3, 0.0)]
    sky = retriever.search(["sky"], 3)[0]
    assert [h.doc_id for h in sky] == [3, 0, 1] and sky[0].score > 0 == sky[1].score
    with pytest.raises(ValueError, match="threads: must be >= 1"):
        retriever.index.set_threads(0)
    with pytest.raises(ValueError, match="shard_docs: must be >= 1"):
        retriever.index.searcher.set_threads(2, shard_docs=0)


def test_a_sharded_search_given_up_raises_and_the_pool_goes_on(wiki_texts: list[str]) -> None:
    """A search whose caller left (``abandon``: a cancelled verification) skips its shards;
    the shared pool then serves the next search as before."""
    retriever = BM25Retriever.from_texts(wiki_texts)
    retriever.index.searcher.set_threads(2, shard_docs=97, min_docs=1)
    expected = retriever.search(["the river"], 5)
    gave_up = threading.Event()
    gave_up.set()
    with pytest.raises(abandon.SearchAbandoned):
        abandon.in_context(gave_up, retriever.search)(["the river", "a city"], 5)
    assert retriever.search(["the river"], 5) == expected


def test_repeated_query_terms_count_with_repetition() -> None:
    texts = ["alpha beta", "beta gamma", "gamma delta", "delta alpha", "epsilon"]
    retriever = BM25Retriever.from_texts(texts)
    reference = BM25Okapi([Analyzer()(t) for t in texts])
    for query in ("alpha alpha beta", "beta beta beta gamma", "delta"):
        expected = reference.get_scores(Analyzer()(query)).tolist()
        assert retriever.score(query, range(len(texts))) == expected


def test_save_load_round_trip(wiki_texts: list[str], tmp_path: Path) -> None:
    index = BM25Index.build([wiki_texts[:1500], wiki_texts[1500:]], progress=False)
    index.save(tmp_path / "bm25")
    loaded = BM25Index.load(tmp_path / "bm25")
    assert loaded.vocab == index.vocab and loaded.params == index.params
    assert loaded.analyzer == index.analyzer and loaded.avgdl == index.avgdl
    queries = _queries(wiki_texts)
    a, b = BM25Retriever(index), BM25Retriever(loaded)
    assert a.search(queries, 10) == b.search(queries, 10)
    assert a.score(queries[0], [1, 2, 3]) == b.score(queries[0], [1, 2, 3])
    # Batches do not change the index: one batch gives the same weights.
    single = BM25Index.build([wiki_texts], progress=False)
    assert single.vocab == index.vocab
    assert np.array_equal(single.weights.data, index.weights.data)


def test_from_kb_builds_once_then_loads(kb: KnowledgeBase) -> None:
    first = BM25Retriever.from_kb(kb, progress=False)
    json_path = Path(first.info.index_dir) / "bm25.json"
    stamp = json_path.stat().st_mtime_ns
    second = BM25Retriever.from_kb(kb, progress=False)
    assert json_path.stat().st_mtime_ns == stamp
    assert second.search(["Aristotle philosophy"], 5) == first.search(["Aristotle philosophy"], 5)
    hit = second.search(["Aristotle philosophy"], 1)[0][0]
    assert "aristotle" in second.documents([hit.doc_id])[0].contents.lower()


def test_info_and_protocol(wiki_texts: list[str]) -> None:
    retriever = BM25Retriever.from_texts(wiki_texts[:200], params=BM25Params(k1=1.2))
    assert isinstance(retriever, Retriever) and not isinstance(retriever, DenseRetriever)
    info = retriever.info
    assert (info.backend, info.num_docs, info.dim, info.metric) == ("bm25", 200, 0, "bm25")
    assert info.bm25 == BM25Params(k1=1.2)
    assert info.extra["analyzer"] == "word-lower-stop-en"


def test_term_weights_rebuild_every_score_bit_for_bit(kb: KnowledgeBase) -> None:
    """Over the real passages: a document's term weights, added for a query's terms in
    order, give exactly the float ``score`` gives, for real sliding-window queries (and
    repeated, stopword-only and unknown ones). The text comes from the document store, so
    these are what ``GetTermWeights`` serves."""
    retriever = BM25Retriever.from_kb(kb, progress=False)
    texts = [doc.contents for doc in retriever.documents(list(range(400)))]
    ids = list(range(0, 400, 3))
    weights = dict(zip(ids, retriever.term_weights(ids), strict=True))
    analyzer = retriever.analyzer
    for query in [*_queries(texts), "aristotle aristotle logic aristotle"]:
        expected = retriever.score(query, ids)
        for doc_id, want in zip(ids, expected, strict=True):
            terms, w = weights[doc_id]
            lookup = dict(zip(terms, w.tolist(), strict=True))
            got = 0.0
            for term in analyzer(query):
                if term in lookup:
                    got += lookup[term]
            assert got.hex() == want.hex(), (query, doc_id)
    terms, _ = weights[0]
    assert len(terms) == len(set(terms)) > 5  # distinct, in first appearance order
    assert terms == list(dict.fromkeys(t for t in analyzer(texts[0]) if t in terms))


def test_term_weights_refuse_a_text_that_was_not_indexed(wiki_texts: list[str]) -> None:
    index = BM25Retriever.from_texts(wiki_texts[:50]).index
    # the same length (75 terms each) and known terms: the rarest term gives it away
    with pytest.raises(ValueError, match=r"doc 1: term .* is not indexed for it"):
        index.term_weights([0, 1], [wiki_texts[0], wiki_texts[2]])
    with pytest.raises(ValueError, match=r"doc 0: this text was not indexed for it \(74 terms"):
        index.term_weights([0], [wiki_texts[0] + " aristotle"])
    first = Analyzer()(wiki_texts[0])[0]  # one word swapped for an unknown one
    swapped = re.sub(rf"\b{re.escape(first)}\b", "qqzxw", wiki_texts[0], count=1, flags=re.I)
    with pytest.raises(ValueError, match="doc 0: term 'qqzxw' is not indexed for it"):
        index.term_weights([0], [swapped])
    with pytest.raises(RuntimeError, match="no document store"):
        BM25Retriever.from_texts(wiki_texts[:50]).term_weights([0])


def test_analyzer_from_its_name() -> None:
    for analyzer in (Analyzer(), Analyzer(stopwords=False), Analyzer(lowercase=False)):
        assert Analyzer.from_name(analyzer.name) == analyzer
    with pytest.raises(ValueError, match="unknown analyzer"):
        Analyzer.from_name("stemmed")


def test_analyzer() -> None:
    assert Analyzer()("The Café's crème-brûlée, 2x_FAST!") == [
        "café",
        "s",
        "crème",
        "brûlée",
        "2x_fast",
    ]
    assert Analyzer(stopwords=False)("The end. THE END") == ["the", "end", "the", "end"]
    assert Analyzer(lowercase=False, stopwords=False)("Hi there") == ["Hi", "there"]
    assert Analyzer()("東京 is in Japan") == ["東京", "japan"]
    assert "the" in ENGLISH_STOPWORDS and len(ENGLISH_STOPWORDS) == 33
    assert Analyzer.from_dict(Analyzer(stopwords=False).to_dict()) == Analyzer(stopwords=False)


def test_idf_matches_rank_bm25_formula() -> None:
    texts = ["a b", "b c", "c d", "b e"]  # b: in 3 of 4 docs -> negative idf -> floor
    index = BM25Index.build([texts], analyzer=Analyzer(stopwords=False), progress=False)
    raw = {
        t: math.log(4 - n + 0.5) - math.log(n + 0.5)
        for t, n in zip("abcde", [1, 3, 2, 1, 1], strict=True)
    }
    total = 0.0
    for value in raw.values():  # sequential, as rank-bm25 (Python 3.12's sum() compensates)
        total += value
    floor = 0.25 * total / 5
    for term, value in raw.items():
        assert index.idf[index.vocab[term]] == (floor if value < 0 else value)


@pytest.mark.parametrize(
    ("call", "error", "field"),
    [
        (lambda r: r.search(["x"], 0), ValueError, "k"),
        (lambda r: r.search(["x"], 2, -1), ValueError, "prefetch"),
        (lambda r: r.search(["x", ""], 2), ValueError, "queries[1]"),
        (lambda r: r.score("   ", [0]), ValueError, "query"),
        (lambda r: r.score("x", [0, 3]), KeyError, "doc_ids"),
        (lambda r: r.documents([-1]), KeyError, "doc_ids"),
    ],
)
def test_bad_input_names_the_field(call, error, field: str) -> None:
    retriever = BM25Retriever.from_texts(["one doc", "two docs", "three"])
    with pytest.raises(error, match=f"^'?{__import__('re').escape(field)}:"):
        call(retriever)


def test_empty_corpus_rejected() -> None:
    with pytest.raises(ValueError, match=r"^corpus:"):
        BM25Index.build([[]], progress=False)
    with pytest.raises(ValueError, match=r"^corpus:"):
        BM25Index.build([["the of", "and"]], progress=False)


def _random_scores(rng: np.random.Generator, kind: str, n: int) -> np.ndarray:
    if kind == "distinct":
        return rng.random(n)
    if kind == "ties":
        return rng.integers(0, 4, n).astype(np.float64)
    if kind == "mostly-zero":
        return np.where(rng.random(n) < 0.0005, rng.random(n), 0.0)
    return -rng.random(n)


@pytest.mark.parametrize("kind", ["distinct", "ties", "mostly-zero", "negative"])
def test_top_k_selection_equals_full_sort(kind: str) -> None:
    rng = np.random.default_rng(len(kind))
    for _ in range(20):
        n, k = int(rng.integers(1, 100_000)), int(rng.integers(1, 40))
        scores = _random_scores(rng, kind, n)
        expected = np.lexsort((np.arange(n), -scores))[:k]
        assert np.array_equal(top_k_indices(scores, k), expected)
