"""Speculation cache: eviction rules, deterministic ties, and KB-consistent ranking."""

from __future__ import annotations

import numpy as np
import pytest

from ralmspec_vllm.core.cache import (
    DenseCacheScorer,
    RetrieverCacheScorer,
    RoutingGate,
    SpeculationCache,
    exact_candidates,
)
from ralmspec_vllm.core.trace import TraceRecorder

from .fakes import ScriptedRetriever, SyntheticDenseRetriever


def ids(cache: SpeculationCache) -> set[int]:
    return {int(d) for d in cache.doc_ids}


def test_ties_break_by_lower_doc_id() -> None:
    cache = SpeculationCache(8)
    cache.insert([9, 4, 7])
    order = cache.doc_ids  # slot order, not id order
    scores = np.array([{9: 1.0, 4: 1.0, 7: 0.5}[int(d)] for d in order])
    assert cache.best(scores) == 4
    assert cache.best(np.array([0.2, 0.1]), np.array([5, 3])) == 5
    assert SpeculationCache(2).best(np.array([])) is None


def test_lru_evicts_least_recently_used() -> None:
    cache = SpeculationCache(3, "lru")
    for d in (1, 2, 3):
        cache.insert([d])
    cache.touch(1)  # speculated: a use
    cache.insert([4])
    assert ids(cache) == {1, 3, 4}
    cache.insert([3])  # re-verified: a use
    cache.insert([5])
    assert ids(cache) == {3, 4, 5}
    assert cache.evictions == 2


def test_fifo_evicts_oldest_insert() -> None:
    cache = SpeculationCache(3, "fifo")
    for d in (1, 2, 3):
        cache.insert([d])
    cache.touch(1)
    cache.insert([1])
    cache.insert([4])
    assert ids(cache) == {2, 3, 4}


def test_insert_keeps_best_ranked_when_over_capacity() -> None:
    cache = SpeculationCache(2)
    cache.insert([5, 6, 7])  # best first
    assert ids(cache) == {5, 6}
    assert len(cache) == 2 and 5 in cache and 7 not in cache
    assert cache.missing([7, 5, 7, 8]) == [7, 8]


def test_vectors_follow_their_documents_through_eviction() -> None:
    cache = SpeculationCache(2)
    vec = {d: np.full(3, float(d), dtype=np.float32) for d in range(1, 5)}
    for d in (1, 2, 3, 4):
        cache.insert([d], vec)
    assert cache.vectors is not None
    for d, row in zip(cache.doc_ids, cache.vectors, strict=True):
        assert np.array_equal(row, vec[int(d)])
    cache.insert([7], {})  # no vector at hand: not inserted, nothing evicted
    assert ids(cache) == {3, 4}


def test_vector_matrix_grows_with_the_cache() -> None:
    cache = SpeculationCache(512)
    vec = {d: np.full(4, float(d), dtype=np.float32) for d in range(100)}
    for d in range(100):
        cache.insert([d], vec)
    vectors = cache.vectors
    assert vectors is not None and vectors.shape == (100, 4)
    assert cache._vectors is not None and 100 <= len(cache._vectors) < 512
    assert np.array_equal(vectors[:, 0], cache.doc_ids.astype(np.float32))
    with pytest.raises(ValueError, match="vectors"):  # would misalign dense scoring
        cache.insert([1000])
    cache.insert([5])  # already cached: only a use, no vector needed


def test_capacity_validated() -> None:
    with pytest.raises(ValueError, match="capacity"):
        SpeculationCache(0)


async def test_dense_cache_puts_kb_top1_first_when_cached() -> None:
    kb = SyntheticDenseRetriever(num_docs=50)
    scorer = DenseCacheScorer(kb.encode, in_thread=False)
    recorder = TraceRecorder("t")
    for query in ("alpha beta gamma", "delta", "a b c d e f", "moby dick whale"):
        (hits,) = kb.search([query], 20)
        cache = SpeculationCache(64)
        top = [h.doc_id for h in hits]
        cache.insert(top[::-1][:10], dict(zip(top, kb.vectors(top), strict=True)))
        cache.insert(top, dict(zip(top, kb.vectors(top), strict=True)))
        assert await scorer.top1(cache, query, recorder) == hits[0].doc_id
    assert recorder.retrieval_calls == []


async def test_retriever_scorer_uses_kb_scores() -> None:
    kb = ScriptedRetriever(script=lambda step: 3)
    scorer = RetrieverCacheScorer(kb)
    recorder = TraceRecorder("t")
    cache = SpeculationCache(8)
    assert await scorer.top1(cache, "q", recorder) is None  # empty: no call
    cache.insert([0, 1, 3, 5])
    assert await scorer.top1(cache, "some query", recorder) == 3
    assert recorder.retrieval_calls[0].kind == "score"
    assert kb.score_calls == 1


def test_scored_ids_are_the_most_recently_used() -> None:
    cache = SpeculationCache(8, score_recent=3)
    cache.insert([4, 9])
    assert cache.scored_ids().tolist() == [4, 9]  # fewer than the limit: all
    cache.insert([7, 2, 5])  # in rank order: 7 gets the newest use, then 2, then 5
    assert cache.scored_ids().tolist() == [2, 5, 7]
    cache.touch(4)  # the speculated top-1 counts as a use
    assert cache.scored_ids().tolist() == [2, 4, 7]  # 5 (inserted last-ranked) drops
    assert SpeculationCache(8).scored_ids().tolist() == []
    with pytest.raises(ValueError, match="score_recent"):
        SpeculationCache(8, score_recent=0)


async def test_retriever_scorer_sends_only_the_recent_ids() -> None:
    kb = ScriptedRetriever(script=lambda step: 3)
    scorer = RetrieverCacheScorer(kb)
    recorder = TraceRecorder("t")
    cache = SpeculationCache(8, score_recent=2)
    cache.insert([3, 1, 0, 5])  # 3 is used last, 1 before it
    assert await scorer.top1(cache, "some query", recorder) == 3
    assert recorder.retrieval_calls[0].k == 2  # two ids scored, not four
    cache.insert([0, 5])
    assert await scorer.top1(cache, "some query", recorder) in (0, 5)  # 3 not scored


def test_exact_candidates_find_the_exact_best_among_near_ties() -> None:
    from ralmspec_vllm.retrieval.dense import inner_product

    rng = np.random.default_rng(5)
    for trial in range(50):
        base = rng.standard_normal((1, 64)).astype(np.float32)
        # near-duplicates one ulp apart, plus exact duplicates and unrelated rows
        near = base + rng.integers(-1, 2, (20, 64)) * np.spacing(base)
        rows = np.concatenate([near, base, base, rng.standard_normal((30, 64))]).astype(np.float32)
        ids = rng.permutation(1000)[: len(rows)].astype(np.int64)
        q = (base[0] + 0.01 * rng.standard_normal(64)).astype(np.float32)
        cache = SpeculationCache(len(rows))
        cache.insert(ids.tolist(), dict(zip(ids.tolist(), rows, strict=True)))
        exact = inner_product(q[None, :], cache.vectors)[0]  # type: ignore[arg-type]
        top = exact.max()
        want = int(cache.doc_ids[exact == top].min())
        cand, scores = exact_candidates(q, cache.vectors, cache.max_vector_norm)  # type: ignore[arg-type]
        assert cache.best_exact(cand, scores) == want, trial


def test_term_weights_drop_evicted_documents_and_stay_bounded() -> None:
    """Churn through a 4-document cache: an evicted document's weights stop counting at
    once, and the entry list never holds more than twice the live entries (stale ones are
    dropped when they are half of it)."""
    cache = SpeculationCache(4)
    for doc in range(200):
        terms = [f"t{doc % 7}", f"u{doc}", "common"]
        weights = np.array([1.0 + doc, 0.5, 0.25])
        cache.insert([doc], terms={doc: (terms, weights)})
        scores = cache.term_scores(["common", f"u{doc}", "common"])
        cached = cache.doc_ids.tolist()
        assert sorted(cached) == list(range(max(0, doc - 3), doc + 1))
        expected = [0.25 + (0.5 if d == doc else 0.0) + 0.25 for d in cached]
        assert scores.tolist() == expected
        assert cache.best(cache.term_scores([f"t{doc % 7}"])) == max(
            d for d in cached if d % 7 == doc % 7
        )
        assert cache._terms is not None and len(cache._terms) <= 2 * 3 * len(cached)
    with pytest.raises(ValueError, match="term scoring needs"):
        SpeculationCache(4).term_scores(["x"])
    with pytest.raises(ValueError, match="2 terms but 1 weights"):
        SpeculationCache(4).insert([1], terms={1: (["a", "b"], np.array([1.0]))})


def test_lists_follow_their_documents_and_a_cache_takes_all_or_none() -> None:
    """IVF lists (routed guesses) live per slot like vectors, through evictions; a cache
    holds every document with its list or none with one."""
    cache = SpeculationCache(3)
    vec = {d: np.full(4, d, dtype=np.float32) for d in range(10)}
    cache.insert([1, 2, 3], vec, lists={1: 10, 2: 20, 3: 30})
    cache.insert([4], vec, lists={4: 40})  # evicts the least recently used: 3
    assert cache.lists is not None
    assert dict(zip(cache.doc_ids.tolist(), cache.lists.tolist(), strict=True)) == {
        1: 10,
        2: 20,
        4: 40,
    }
    with pytest.raises(ValueError, match="all with lists or all without"):
        cache.insert([5], vec)
    unlisted = SpeculationCache(3)
    unlisted.insert([1], vec)
    assert unlisted.lists is None
    with pytest.raises(ValueError, match="all with lists or all without"):
        unlisted.insert([2], vec, lists={2: 20})


def test_routing_gate_routes_while_unreachable_guesses_outweigh_the_probe() -> None:
    """``route_guesses="auto"``: every guess is probed through the warm-up; then routing
    stays on while (unreachable share) x (LM step) beats the probe's time, and off it
    probes only 1 guess in ``sample_every``, which is enough to turn it back on."""
    gate = RoutingGate(warmup=8, sample_every=4, window=16)
    step_s, probe_s = 0.020, 0.001  # routing pays above a 5% unreachable share
    for _ in range(8):
        assert gate.wants_probe()
        gate.record(False, probe_s, step_s)  # nothing unreachable: routing cannot help
    assert not gate.routing and gate.unreachable_share == 0.0
    probed = [gate.wants_probe() for _ in range(12)]
    assert probed == [False, False, False, True] * 3  # sampled, 1 in 4
    for _ in range(16):  # the knowledge base changes: half the exact bests unreachable
        gate.record(True, probe_s, step_s)
    assert gate.routing and all(gate.wants_probe() for _ in range(10))
    for _ in range(15):  # 1 of 16 unreachable: 6.25% x 20 ms = 1.25 ms, within hysteresis
        gate.record(False, probe_s, step_s)
    assert gate.routing and gate.unreachable_share == 1 / 16
    for i in range(16):  # the same share, a slower probe (4 ms): 1.25 ms < 0.8 x ~3.4 ms
        gate.record(i == 0, 0.004, step_s)
        assert gate.unreachable_share == 1 / 16
    assert not gate.routing and gate.probe_s is not None and gate.probe_s > 0.003


def _one_by_one(cache: SpeculationCache, ids: list[int], **fetched: object) -> None:
    """The per-document insert (``_insert_one``, lowest priority first) for any room."""
    for doc_id in reversed(ids):
        cache._insert_one(doc_id, **fetched)  # type: ignore[arg-type]
    if cache._terms is not None:
        cache._terms.flush()


@pytest.mark.parametrize("eviction", ["lru", "fifo"])
@pytest.mark.parametrize("kind", ["vectors", "lists", "terms"])
def test_an_insert_with_room_leaves_the_state_one_by_one_inserts_leave(
    eviction: str, kind: str
) -> None:
    """Where every id has room, ``insert`` writes the arrays once for all: the slots, ticks,
    vectors, norms, lists and term weights are those of inserting one by one, with repeated
    ids, ids already cached and ids whose vectors (lists, weights) are not at hand."""
    rng = np.random.default_rng(7)
    fast = SpeculationCache(400, eviction)  # type: ignore[arg-type]
    slow = SpeculationCache(400, eviction)  # type: ignore[arg-type]
    vectors = {d: rng.standard_normal(8).astype(np.float32) for d in range(200)}
    for _ in range(12):
        ids = rng.integers(0, 250, size=int(rng.integers(1, 30))).tolist()  # repeats too
        at_hand = {d for d in ids if d < 200 and rng.random() < 0.9}
        fetched: dict[str, object] = {"vectors": None, "terms": None, "lists": None}
        if kind == "vectors":
            fetched["vectors"] = {d: vectors[d] for d in at_hand}
        elif kind == "lists":
            fetched["lists"] = {d: d % 7 for d in at_hand}
        else:
            fetched["terms"] = {
                d: ([f"t{d % 5}", f"u{d % 3}"], np.array([1.0, 0.5 + d])) for d in at_hand
            }
        assert len(fast) + len(ids) <= fast.capacity  # the path under test
        fast.insert(ids, **fetched)  # type: ignore[arg-type]
        if kind == "lists" and slow._lists is None:
            slow._lists = np.empty(slow.capacity, dtype=np.int64)
        if kind == "terms" and slow._terms is None:
            from ralmspec_vllm.core.cache import CachedTermWeights

            slow._terms = CachedTermWeights(slow.capacity)
        _one_by_one(slow, ids, **fetched)
        n = len(slow)
        assert len(fast) == n and fast._clock == slow._clock and fast._slot == slow._slot
        assert np.array_equal(fast.doc_ids, slow.doc_ids)
        assert np.array_equal(fast._ticks[:n], slow._ticks[:n])
        if kind == "vectors":
            assert fast.vectors is not None and slow.vectors is not None
            assert np.array_equal(fast.vectors, slow.vectors)
            np.testing.assert_allclose(fast._norms[:n], slow._norms[:n], rtol=1e-13)
            assert np.all(
                fast._norms[:n] >= np.linalg.norm(fast.vectors.astype(np.float64), axis=1)
            )
        if kind == "lists":
            assert np.array_equal(fast.lists, slow.lists)  # type: ignore[arg-type]
        if kind == "terms":
            for query in (["t1"], ["u2", "t4"], ["t0", "u0", "zz"]):
                assert np.array_equal(fast.term_scores(query), slow.term_scores(query))


def test_a_failed_insert_with_room_leaves_the_cache_as_it_was() -> None:
    cache = SpeculationCache(16)
    cache.insert([1, 2], {1: np.ones(4, np.float32), 2: np.ones(4, np.float32)})
    with pytest.raises(ValueError, match="all with vectors or all without"):
        cache.insert([3, 4])  # no vectors for a dense cache
    assert sorted(cache.doc_ids) == [1, 2] and 3 not in cache and 4 not in cache
    assert len(cache) == 2 and cache._slot == {2: 0, 1: 1}
