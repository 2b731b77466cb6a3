"""The core over the project's real in-process retrievers (FAISS flat, BM25): identical
outputs, and cache rankings that agree with the knowledge base bit for bit (ties included).

Also checks the core's import boundary: no vLLM, torch, FAISS or gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from ralmspec_vllm.core.cache import (
    DenseCacheScorer,
    RetrieverCacheScorer,
    RoutingGate,
    SpeculationCache,
    TermWeightCacheScorer,
)
from ralmspec_vllm.core.config import SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine, RaLMResult
from ralmspec_vllm.core.trace import TraceRecorder
from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever
from ralmspec_vllm.types import Document, Hit

from .fakes import FakeLM, FakeTokenizer, crc, doc_text
from .world import LONG_QUESTION, SHORT_QUESTION, assert_speculated, describe, matrix

faiss = pytest.importorskip("faiss")
flat = pytest.importorskip("ralmspec_vllm.retrieval.flat")
bm25 = pytest.importorskip("ralmspec_vllm.retrieval.bm25")

DIM = 16
NUM_DOCS = 60


class Store:
    def __init__(self, docs: list[Document]) -> None:
        self.docs = docs

    def __len__(self) -> int:
        return len(self.docs)

    def get(self, doc_ids: Sequence[int]) -> list[Document]:
        return [self.docs[d] for d in doc_ids]


class BagOfWords:
    """A deterministic text encoder: sum of seeded random word vectors."""

    dim = DIM
    name = "bag-of-words"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), DIM), dtype=np.float32)
        for i, text in enumerate(texts):
            for word in text.split():
                out[i] += np.random.default_rng(crc(word)).standard_normal(DIM, np.float32)
        return out


def corpus() -> list[Document]:
    """Passages over the fake LM's output words, so generated text matches them unevenly."""
    words = [
        " ".join(f"g{(d * 7 + j * j * 13) % 64}" for j in range(d % 5 + 3)) for d in range(NUM_DOCS)
    ]
    return [Document(d, f"t{d}", f"{words[d]} {doc_text(d, 4)}") for d in range(NUM_DOCS)]


def flat_retriever() -> object:
    vectors = np.random.default_rng(1).standard_normal((NUM_DOCS, DIM)).astype(np.float32)
    vectors[31] = vectors[30]  # exact ties: the lower doc id must win everywhere
    vectors[45] = vectors[12]
    return flat.FlatRetriever(vectors, Store(corpus()), BagOfWords(), impl="faiss", device="cpu")


def ivf_retriever(nlist: int = 8, nprobe: int = 2, num_docs: int = NUM_DOCS) -> Any:
    """IVF-Flat over the flat retriever's kind of vectors: with 2 of 8 lists probed, the
    exact best document is often in a list the search does not read."""
    from ralmspec_vllm.retrieval.ann import IVFFlatRetriever

    vectors = np.random.default_rng(1).standard_normal((num_docs, DIM)).astype(np.float32)
    docs = corpus() if num_docs == NUM_DOCS else None
    store = Store(docs) if docs is not None else None
    return IVFFlatRetriever(
        vectors, store, BagOfWords(), nlist=nlist, nprobe=nprobe, progress=False, save=False
    )


def bm25_retriever() -> object:
    texts = [doc.contents for doc in corpus()]
    return bm25.BM25Retriever.from_texts(texts, Store(corpus()))


async def test_dense_cache_top1_equals_kb_top1_including_ties() -> None:
    kb = flat_retriever()
    scorer = DenseCacheScorer(BagOfWords().encode, in_thread=False)
    queries = [f"g{i} d{i}w1 g{3 * i}" for i in range(40)]
    for query, hits in zip(queries, kb.search(queries, NUM_DOCS), strict=True):  # type: ignore[attr-defined]
        ids = [h.doc_id for h in hits]
        cache = SpeculationCache(NUM_DOCS)
        cache.insert(ids[::-1], dict(zip(ids, kb.vectors(ids), strict=True)))  # type: ignore[attr-defined]
        assert await scorer.top1(cache, query, TraceRecorder("t")) == ids[0]


async def test_a_routed_ivf_guess_is_the_searchs_top1_and_an_unrouted_one_often_not() -> None:
    """Over IVF-Flat, a cache holding every document, each with its list, ranked only
    within the query's probed lists (``route_guesses``) names exactly the search's top-1
    for every query; ranked over all of them (the exact best), it names a document the
    search cannot reach for many queries."""
    kb = ivf_retriever(nlist=24, nprobe=3, num_docs=1000)
    ids = list(range(1000))
    routed = DenseCacheScorer(BagOfWords().encode, in_thread=False)
    routed.routing = kb.routing()
    plain = DenseCacheScorer(BagOfWords().encode, in_thread=False)
    listed, unlisted = SpeculationCache(1000), SpeculationCache(1000)
    vectors = dict(zip(ids, kb.vectors(ids), strict=True))
    listed.insert(ids, vectors, lists=dict(zip(ids, kb.lists(ids).tolist(), strict=True)))
    unlisted.insert(ids, vectors)
    queries = [f"g{i} d{i}w1 g{3 * i} g{i % 7}" for i in range(60)]
    differ = 0
    for query, (top,) in zip(queries, kb.search(queries, 1), strict=True):
        recorder = TraceRecorder("t")
        assert await routed.top1(listed, query, recorder) == top.doc_id
        differ += await plain.top1(listed, query, recorder) != top.doc_id
        assert await routed.top1(unlisted, query, recorder) == await plain.top1(
            unlisted, query, recorder
        )  # a cache without lists is ranked as before
    assert differ >= 10


async def test_routed_guesses_miss_less_over_ivf_with_identical_answers() -> None:
    """End to end over IVF (2 of 8 lists probed, fixed stride 3, top-20 prefetch): the
    engine hands the scorer the index's routing, requests fetch their documents' lists
    with their vectors, and guesses ranked within the probed lists miss several times less
    often than guesses ranked over the whole cache; every answer is the baseline's. With
    ``route_guesses=False`` no list is fetched; with ``"auto"`` lists are fetched and the
    engine's gate measures the guesses (what it then decides rests on timings, so only the
    answers are asserted)."""
    kb = ivf_retriever()
    engine = RaLMEngine(
        FakeLM(), FakeTokenizer(), InProcessAsyncRetriever(kb), encoder=BagOfWords().encode
    )
    misses: dict[bool | str, int] = {True: 0, False: 0, "auto": 0}
    for question in (SHORT_QUESTION, LONG_QUESTION, "what is g3 and g17", "tell me about g40"):
        baseline = await engine.generate(question, "baseline")
        for route in (True, False, "auto"):
            spec = SpeculationConfig(speculation_stride=3, prefetch_k=20, route_guesses=route)
            result = await engine.generate(question, "ralmspec", speculation=spec)
            assert result.token_ids == baseline.token_ids
            trace = result.trace
            assert (trace.num_calls("lists") > 0) == (route is not False)
            assert (trace.routed_guesses > 0) == (route is not False)
            if route is True:  # every guess routed, some changed by it
                assert trace.rerouted_guesses > 0
            misses[route] += trace.speculation_misses
    assert misses[True] * 3 <= misses[False], misses
    gate = engine.scorer.gate  # type: ignore[union-attr]
    assert gate.unreachable_share is not None and gate.unreachable_share > 0.1
    assert gate.probe_s is not None and gate.step_s is not None


async def test_auto_routing_switches_off_where_every_list_is_probed() -> None:
    """``route_guesses="auto"`` over IVF with every list probed: no exact best is ever
    unreachable, so after its 32 warm-up probes the gate stops routing and probes only 1
    guess in 16; every answer stays the baseline's. A fresh engine per answer shares one
    gate (``routing_gate``), as ``bench_latency``'s per-run engines do."""
    kb = ivf_retriever(nlist=8, nprobe=8)
    gate = RoutingGate()

    def engine() -> RaLMEngine:
        retriever = InProcessAsyncRetriever(kb)
        encoder = BagOfWords().encode
        return RaLMEngine(FakeLM(), FakeTokenizer(), retriever, encoder=encoder, routing_gate=gate)

    spec = SpeculationConfig(speculation_stride=3, prefetch_k=20, route_guesses="auto")
    questions = [SHORT_QUESTION, LONG_QUESTION, "what is g3 and g17", "tell me about g40"]
    assert engine().scorer.gate is gate  # type: ignore[attr-defined]
    guesses = routed = 0
    for question in questions * 3:
        baseline = await engine().generate(question, "baseline")
        warm = gate.warm
        result = await engine().generate(question, "ralmspec", speculation=spec)
        assert result.token_ids == baseline.token_ids
        assert result.trace.rerouted_guesses == 0
        if warm:  # the gate had decided before this request started
            guesses += result.trace.speculation_hits + result.trace.speculation_misses
            routed += result.trace.routed_guesses
    assert not gate.routing and gate.unreachable_share == 0.0
    # 1 in 16 of all guesses (those a rollback discarded included: not in ``guesses``)
    assert guesses >= 32 and 1 <= routed <= guesses // 10, (guesses, routed)


def test_ivf_lists_and_routing_are_the_index_own() -> None:
    """``lists`` names the list FAISS stored each document in (its quantizer's nearest
    centroid); ``routing().probed`` the lists FAISS's coarse search picks."""
    kb = ivf_retriever(nlist=16, nprobe=4, num_docs=700)
    index = kb._index
    vectors = kb.vectors(list(range(700)))
    _, nearest = index.quantizer.search(vectors, 1)
    assert kb.lists(list(range(700))).tolist() == nearest[:, 0].tolist()
    assert kb.lists([7, 3, 7]).tolist() == [nearest[7, 0], nearest[3, 0], nearest[7, 0]]
    routing = kb.routing()
    assert routing.centroids.shape == (16, DIM) and routing.nprobe == 4
    queries = BagOfWords().encode([f"g{i} g{2 * i} d{i}w2" for i in range(40)])
    _, coarse = index.quantizer.search(queries, 4)
    for q, lists in zip(queries, coarse, strict=True):
        assert sorted(routing.probed(q).tolist()) == sorted(lists.tolist())
    with pytest.raises(KeyError, match="unknown doc ids"):
        kb.lists([700])


async def test_bm25_cache_uses_corpus_statistics() -> None:
    kb = bm25_retriever()
    scorer = RetrieverCacheScorer(InProcessAsyncRetriever(kb))  # type: ignore[arg-type]
    for i in range(20):
        query = f"g{i} g{2 * i} g{i + 5} d{i}w1"
        (hits,) = kb.search([query], 10)  # type: ignore[attr-defined]
        cache = SpeculationCache(16)
        cache.insert([h.doc_id for h in hits][::-1])
        assert await scorer.top1(cache, query, TraceRecorder("t")) == hits[0].doc_id


@pytest.mark.parametrize("capacity", [8, 24])
async def test_bm25_term_weight_scores_are_the_retrievers_bit_for_bit(capacity: int) -> None:
    """The cache ranked from term weights gives every cached document exactly the float
    the retriever's ``score`` gives (the same additions in the same order), through
    evictions (capacity 8: nearly every insert evicts), repeated and unknown query terms;
    hence the same top-1 as ``RetrieverCacheScorer``."""
    kb = bm25_retriever()
    local = TermWeightCacheScorer(kb.analyzer)  # type: ignore[attr-defined]
    remote = RetrieverCacheScorer(InProcessAsyncRetriever(kb))  # type: ignore[arg-type]
    cache = SpeculationCache(capacity)
    index = kb.index  # type: ignore[attr-defined]
    for i in range(60):
        query = f"g{i % 64} g{(5 * i) % 64} the g{i % 64} d{i}w1 unknownword{i} g{(i * i) % 64}"
        (hits,) = kb.search([query], 6, 10)  # type: ignore[attr-defined]
        ranked = [h.doc_id for h in hits]
        missing = cache.missing(ranked)
        cache.insert(ranked, terms=dict(zip(missing, kb.term_weights(missing), strict=True)))  # type: ignore[attr-defined]
        for q in (query, f"g{i % 7} g{i % 7} g{i % 7}", "nothing indexed here"):
            here = cache.term_scores(kb.analyzer(q))  # type: ignore[attr-defined]
            there = index.scores_for(index.term_ids(q), cache.doc_ids)
            assert here.tobytes() == there.tobytes(), (i, q)
            recorder = TraceRecorder("t")
            assert await local.top1(cache, q, recorder) == await remote.top1(cache, q, recorder)
    assert cache.evictions > 0


@pytest.mark.parametrize("backend", ["flat", "ivf", "bm25", "bm25-term-weights"])
@pytest.mark.parametrize("config", list(matrix((1, 3))), ids=describe)
async def test_identical_outputs_over_real_retrievers(
    backend: str, config: SpeculationConfig
) -> None:
    kbs = {"flat": flat_retriever, "ivf": ivf_retriever}
    kb = kbs.get(backend, bm25_retriever)()
    retriever = InProcessAsyncRetriever(kb)  # type: ignore[arg-type]
    encoder = BagOfWords().encode if backend in kbs else None
    scorer = TermWeightCacheScorer(kb.analyzer) if backend == "bm25-term-weights" else None  # type: ignore[attr-defined]
    engine = RaLMEngine(FakeLM(), FakeTokenizer(), retriever, encoder=encoder, scorer=scorer)
    for question in (SHORT_QUESTION, LONG_QUESTION):
        baseline = await engine.generate(question, "baseline")
        assert len(set(baseline.trace.step_doc_ids)) >= 3  # the document really changes
        result = await engine.generate(question, "ralmspec", speculation=config)
        assert result.token_ids == baseline.token_ids
        assert result.trace.step_doc_ids == baseline.trace.step_doc_ids
        assert_speculated(result.trace, config)


async def test_engine_takes_one_way_of_scoring_the_cache() -> None:
    """One scorer per engine; term-weight scoring over a retriever without term weights
    (dense) fails the request with a clear error."""
    kb = bm25_retriever()
    scorer = TermWeightCacheScorer(kb.analyzer)  # type: ignore[attr-defined]
    retriever = InProcessAsyncRetriever(kb)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="one of encoder, embedder and scorer"):
        RaLMEngine(FakeLM(), FakeTokenizer(), retriever, encoder=BagOfWords().encode, scorer=scorer)
    assert RaLMEngine(FakeLM(), FakeTokenizer(), retriever, scorer=scorer).scorer is scorer
    dense = InProcessAsyncRetriever(flat_retriever())  # type: ignore[arg-type]
    engine = RaLMEngine(FakeLM(), FakeTokenizer(), dense, scorer=scorer)
    with pytest.raises(ValueError, match="needs a retriever that serves term_weights"):
        await engine.generate(SHORT_QUESTION, "ralmspec")


def test_core_imports_no_heavy_framework() -> None:
    code = (
        "import sys, ralmspec_vllm.core.runner, ralmspec_vllm.core.batching\n"
        "bad = {'vllm', 'torch', 'faiss', 'grpc'} & {m.split('.')[0] for m in sys.modules}\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("ef_search", "searched_k"), [(16, 16), (128, 20)])
async def test_prefetch_is_capped_at_the_hnsw_beam(ef_search: int, searched_k: int) -> None:
    """Above ef_search FAISS widens HNSW's beam, which may change the top-1: speculation
    then prefetches ef_search documents, and the answer stays the baseline's."""
    ann = pytest.importorskip("ralmspec_vllm.retrieval.ann")
    vectors = np.random.default_rng(2).standard_normal((NUM_DOCS, DIM)).astype(np.float32)
    kb = ann.HNSWRetriever(vectors, Store(corpus()), BagOfWords(), m=8, ef_search=ef_search)
    engine = RaLMEngine(FakeLM(), FakeTokenizer(), InProcessAsyncRetriever(kb))
    assert await engine.prefetch_limit() == ef_search
    baseline = await engine.generate(LONG_QUESTION, "baseline")
    spec = SpeculationConfig.preset("PSA", prefetch_k=20)
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
    assert result.token_ids == baseline.token_ids
    searches = [c for c in result.trace.retrieval_calls if c.kind == "search"]
    # k=1: a plain step's own search, the baseline's, where it prefetches beside the step
    # (``PREFETCH_BESIDE_RATIO``: timing decides it); every other search is capped
    assert {c.k for c in searches} - {1} == {searched_k}
    assert sum(c.k == 1 for c in searches) <= result.trace.plain_steps
    flat = RaLMEngine(FakeLM(), FakeTokenizer(), InProcessAsyncRetriever(flat_retriever()))  # type: ignore[arg-type]
    assert await flat.prefetch_limit() is None


async def test_the_prefetch_cap_is_logged_once_a_process(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A benchmark makes an engine per question and method: the cap is one line, not one a
    question (session 30's log had it ~30 times a question)."""
    import ralmspec_vllm.core.runner as runner_module

    ann = pytest.importorskip("ralmspec_vllm.retrieval.ann")
    monkeypatch.setattr(runner_module, "_CAPPED_LOGGED", set())
    vectors = np.random.default_rng(2).standard_normal((NUM_DOCS, DIM)).astype(np.float32)
    kb = ann.HNSWRetriever(vectors, Store(corpus()), BagOfWords(), m=8, ef_search=16)
    spec = SpeculationConfig.preset("PSA", prefetch_k=20)
    with caplog.at_level(logging.INFO, logger="ralmspec_vllm.core.runner"):
        for _ in range(3):
            engine = RaLMEngine(FakeLM(), FakeTokenizer(), InProcessAsyncRetriever(kb))
            await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
    capped = [r for r in caplog.records if "capped at HNSW" in r.getMessage()]
    assert len(capped) == 1
    assert "prefetch_k=20 capped at HNSW's ef_search (16)" in capped[0].getMessage()


class RecordingRetriever(InProcessAsyncRetriever):
    """Records every search's (k, prefetch) and the longest answer it got."""

    def __init__(self, retriever: object) -> None:
        super().__init__(retriever)  # type: ignore[arg-type]
        self.asked: set[tuple[int, int]] = set()
        self.longest = 0

    async def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        self.asked.add((k, prefetch))
        hits = await super().search(queries, k, prefetch)
        self.longest = max(self.longest, *(len(row) for row in hits))
        return hits


def torch_bf16_retriever() -> object:
    vectors = np.random.default_rng(1).standard_normal((NUM_DOCS, DIM)).astype(np.float32)
    return flat.FlatRetriever(
        vectors, Store(corpus()), BagOfWords(), impl="torch", device="cpu", dtype="bfloat16"
    )


@pytest.mark.parametrize("backend", ["flat", "flat-torch-bf16", "bm25"])
@pytest.mark.parametrize("exact_k", [1, 3])
@pytest.mark.parametrize("preset", ["PSA", "P"])
async def test_prefetch_beyond_the_exact_top_k_keeps_outputs_identical(
    backend: str, exact_k: int, preset: str
) -> None:
    """``exact_k``: each retrieval asks for the exact top-``exact_k`` plus the index's further
    hits; the cache fills from both and only the top-1 decides, so outputs stay the
    baseline's."""
    kb = {"flat": flat_retriever, "flat-torch-bf16": torch_bf16_retriever, "bm25": bm25_retriever}
    retriever = RecordingRetriever(kb[backend]())
    encoder = None if backend == "bm25" else BagOfWords().encode
    engine = RaLMEngine(FakeLM(), FakeTokenizer(), retriever, encoder=encoder)
    spec = SpeculationConfig.preset(preset, prefetch_k=20, exact_k=exact_k)
    for question in (SHORT_QUESTION, LONG_QUESTION):
        baseline = await engine.generate(question, "baseline")
        result = await engine.generate(question, "ralmspec", speculation=spec)
        assert result.token_ids == baseline.token_ids
        assert result.trace.step_doc_ids == baseline.trace.step_doc_ids
        assert_speculated(result.trace, spec)
    assert retriever.asked == {(1, 0), (exact_k, 20 - exact_k)}  # baseline's, speculation's
    assert retriever.longest > exact_k


async def test_in_process_reads_run_off_the_event_loop() -> None:
    """``documents`` and ``vectors`` run in a worker thread like searches: a read from a cold
    memory-mapped 21M-doc store must not stall the LM, which the same event loop drives."""
    import threading

    seen: dict[str, int] = {}

    class Watched(flat.FlatRetriever):  # type: ignore[misc,name-defined]
        def documents(self, doc_ids: Sequence[int]) -> list[Document]:
            seen["documents"] = threading.get_ident()
            return super().documents(doc_ids)

        def vectors(self, doc_ids: Sequence[int]) -> np.ndarray:
            seen["vectors"] = threading.get_ident()
            return super().vectors(doc_ids)

    vectors = np.random.default_rng(1).standard_normal((NUM_DOCS, DIM)).astype(np.float32)
    adapter = InProcessAsyncRetriever(Watched(vectors, Store(corpus()), BagOfWords()))
    docs = await adapter.documents([4, 2])
    got = await adapter.vectors([4, 2])
    assert [d.doc_id for d in docs] == [4, 2]
    assert got is not None and np.array_equal(got, vectors[[4, 2]])
    loop_thread = threading.get_ident()
    assert seen.keys() == {"documents", "vectors"}
    assert loop_thread not in seen.values()


class FetchHook(InProcessAsyncRetriever):
    """Runs ``before_fetch(fetcher)`` before each vectors / term-weights fetch, ``fetcher``
    being the qualified name of the coroutine that fetches."""

    async def before_fetch(self, fetcher: str) -> None:
        raise NotImplementedError

    async def _hook(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        await self.before_fetch(task.get_coro().__qualname__)  # type: ignore[union-attr]

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        await self._hook()
        return await super().vectors(doc_ids)

    async def term_weights(self, doc_ids: Sequence[int]) -> list[Any] | None:
        await self._hook()
        return await super().term_weights(doc_ids)


class FetchWatcher(FetchHook):
    """Records which coroutine each vectors / term-weights fetch ran in; the first fetch
    waits until the LM has started a step (it would wait forever if the first step's
    generation waited for it)."""

    def __init__(self, retriever: object, lm_started: asyncio.Event) -> None:
        super().__init__(retriever)  # type: ignore[arg-type]
        self.lm_started = lm_started
        self.fetchers: list[str] = []

    async def before_fetch(self, fetcher: str) -> None:
        self.fetchers.append(fetcher)
        if len(self.fetchers) == 1:
            await asyncio.wait_for(self.lm_started.wait(), 2.0)


class StartSignallingLM(FakeLM):
    def __init__(self, started: asyncio.Event) -> None:
        super().__init__(latency_s=0.002)
        self.started = started

    async def generate(
        self, prompt_token_ids: Sequence[int], max_tokens: int, request_id: str, **kw
    ):  # type: ignore[no-untyped-def]
        self.started.set()
        return await super().generate(prompt_token_ids, max_tokens, request_id, **kw)


@pytest.mark.parametrize("backend", ["flat", "bm25"])
@pytest.mark.parametrize("early", [False, True], ids=["late", "early"])
async def test_cache_fetches_stay_off_the_critical_path(backend: str, early: bool) -> None:
    """What the local cache scoring needs for new documents (vectors, term weights) is
    fetched while the first step generates, and, pipelined, by a task each step's search
    starts as it answers: never by the loop that launches the next step. Same outputs."""
    started = asyncio.Event()
    kb = flat_retriever() if backend == "flat" else bm25_retriever()
    retriever = FetchWatcher(kb, started)
    scoring: dict[str, Any] = (
        {"encoder": BagOfWords().encode}
        if backend == "flat"
        else {"scorer": TermWeightCacheScorer(kb.analyzer)}  # type: ignore[attr-defined]
    )
    engine = RaLMEngine(StartSignallingLM(started), FakeTokenizer(), retriever, **scoring)
    name = "PSA:overlap_depth=pipeline:prefetch_k=20"
    spec = SpeculationConfig.parse(name + (":early_verification=true" if early else ""))
    baseline = await engine.generate(LONG_QUESTION, "baseline")
    started.clear()
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
    assert result.token_ids == baseline.token_ids
    assert result.trace.verifications, "nothing was speculated"
    assert retriever.fetchers[0] == "SpeculativeRequest._insert"  # beside the first step
    assert "SpeculativeRequest._fetch_for" in retriever.fetchers
    assert set(retriever.fetchers) <= {
        "SpeculativeRequest._insert",  # the first step's and plain steps' inserts
        "SpeculativeRequest._fetch_for",  # started by a pipelined search
        "SpeculativeRequest._insert_in_turn",  # a document evicted before its insert
    }


class TimedFetches(InProcessAsyncRetriever):
    """Vectors and lists fetches take ``delay_s`` each; records when each ran."""

    def __init__(self, retriever: object, delay_s: float) -> None:
        super().__init__(retriever)  # type: ignore[arg-type]
        self.delay_s = delay_s
        self.spans: dict[str, list[tuple[float, float]]] = {"vectors": [], "lists": []}

    async def _timed(self, kind: str, fetch: Any) -> Any:
        """``await fetch()`` after the delay (made then: a fetch cancelled in its delay, by a
        rollback, leaves no coroutine behind unawaited)."""
        start = time.perf_counter()
        await asyncio.sleep(self.delay_s)
        out = await fetch()
        self.spans[kind].append((start, time.perf_counter()))
        return out

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        return await self._timed("vectors", lambda: super(TimedFetches, self).vectors(doc_ids))

    async def lists(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        return await self._timed("lists", lambda: super(TimedFetches, self).lists(doc_ids))


@pytest.mark.parametrize("overlap", ["1", "pipeline"])
async def test_a_routed_cache_fetches_vectors_and_lists_at_once(overlap: str) -> None:
    """Over IVF a new document needs its vector and its list: both fetches go out
    together, so a step's insert waits one fetch's time, not two in a row. Same output."""
    retriever = TimedFetches(ivf_retriever(), delay_s=0.02)
    engine = RaLMEngine(FakeLM(), FakeTokenizer(), retriever, encoder=BagOfWords().encode)
    spec = SpeculationConfig.parse(f"PSA:prefetch_k=20:route_guesses=true:overlap_depth={overlap}")
    baseline = await engine.generate(LONG_QUESTION, "baseline")
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
    assert result.token_ids == baseline.token_ids
    vectors, lists = retriever.spans["vectors"], retriever.spans["lists"]
    assert len(lists) == len(vectors) > 1
    for start, _ in lists:  # each began while a vectors fetch was still out
        assert any(v_start <= start < v_end for v_start, v_end in vectors)


class SlowSearchFetches(FetchHook):
    """Fetches for a pipelined search's hits take ``delay_s``; each records how many LM
    steps started meanwhile."""

    def __init__(self, retriever: object, lm: FakeLM, delay_s: float) -> None:
        super().__init__(retriever)  # type: ignore[arg-type]
        self.lm, self.delay_s = lm, delay_s
        self.lm_steps_during: list[int] = []

    async def before_fetch(self, fetcher: str) -> None:
        # not the first step's (or a plain step's) insert: a pipelined search's fetch
        if fetcher != "SpeculativeRequest._insert":
            before = len(self.lm.calls)
            await asyncio.sleep(self.delay_s)
            self.lm_steps_during.append(len(self.lm.calls) - before)


async def pipelined_with_slow_fetches(
    delay_s: float, options: str, early: bool
) -> tuple[SlowSearchFetches, RaLMResult]:
    """LONG_QUESTION on a flat retriever whose search-started fetches take ``delay_s``, with
    pipelined PSA (``options`` added; early verification or late), checked token for token
    against the baseline; the retriever (what it recorded) and the speculative result."""
    lm = FakeLM(latency_s=0.002)
    retriever = SlowSearchFetches(flat_retriever(), lm, delay_s)
    engine = RaLMEngine(lm, FakeTokenizer(), retriever, encoder=BagOfWords().encode)
    name = f"PSA:overlap_depth=pipeline:{options}"
    spec = SpeculationConfig.parse(name + (":early_verification=true" if early else ""))
    baseline = await engine.generate(LONG_QUESTION, "baseline")
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
    assert result.token_ids == baseline.token_ids
    return retriever, result


@pytest.mark.parametrize("early", [False, True], ids=["late", "early"])
async def test_a_pipelined_step_settles_before_its_fetch_ends(early: bool) -> None:
    """A step settles on its search's hits; only its cache insert waits for the fetch. With
    two steps at most unsettled, the LM could start at most two more steps during a fetch
    if settling waited for it (session 24: a 17-40 ms fetch of term weights at 21M BM25
    documents delayed every verdict); here it keeps going. Same outputs."""
    retriever, result = await pipelined_with_slow_fetches(
        0.1, "prefetch_k=20:speculation_stride=2", early
    )
    assert result.trace.verifications, "nothing was speculated"
    assert retriever.lm_steps_during and max(retriever.lm_steps_during) > 3


class SlowFetches(InProcessAsyncRetriever):
    """Vectors fetches take ``delay_s``: every one, or with ``first_only`` the first since
    ``fetches`` was last set to 0 (a request's cache seeding, beside its first step).
    ``fetches`` counts them."""

    def __init__(self, retriever: object, delay_s: float, first_only: bool = False) -> None:
        super().__init__(retriever)  # type: ignore[arg-type]
        self.delay_s, self.first_only, self.fetches = delay_s, first_only, 0

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        self.fetches += 1
        if self.fetches == 1 or not self.first_only:
            await asyncio.sleep(self.delay_s)
        return await super().vectors(doc_ids)


async def test_the_first_steps_plain_figure_leaves_out_the_cache_seeding() -> None:
    """The first step is the first figure of a plain step's cost (``StepCosts``' first), up to the
    end of its generation: the wait for the cache's seeding, which every request pays
    whatever mode follows, would price plain steps above what they cost (here 300 ms over
    4 tokens against ~1 ms a token)."""
    lm = FakeLM(latency_s=0.001)
    retriever = SlowFetches(flat_retriever(), delay_s=0.3, first_only=True)
    engine = RaLMEngine(lm, FakeTokenizer(), retriever, encoder=BagOfWords().encode)
    spec = SpeculationConfig.parse("PSA:overlap_depth=pipeline:prefetch_k=20")
    baseline = await engine.generate(SHORT_QUESTION, "baseline")
    retriever.fetches = 0
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=spec)
    assert result.token_ids == baseline.token_ids
    assert result.trace.wall_time_s > 0.3  # the seeding was waited for, by the request
    first = engine.stride_ledgers[spec].steps.per_token("first")
    assert first is not None and first[1] == 4
    assert first[0] < 0.3 / 4 / 3


@pytest.mark.parametrize(
    "method",
    ["PSA", "PSA:overlap_depth=pipeline", "PSA:overlap_depth=pipeline:early_verification=true"],
    ids=["rounds", "pipeline", "early"],
)
@pytest.mark.parametrize("steps", [1, 2])
async def test_a_finished_answer_does_not_wait_to_fill_the_cache(method: str, steps: int) -> None:
    """Once the answer is complete and verified no guess reads the cache again, so the
    request returns without inserting its last search's documents (here each fetch of their
    vectors takes 0.5 s): an answer that ends with its first step waits for no fetch (a
    quarter of Qwen's answers at 21M were one token, session 42), one of two steps for the
    first step's only. Same tokens, no task left behind."""
    from ralmspec_vllm.core.config import RaLMConfig

    delay = 0.5
    config = RaLMConfig(max_new_tokens=4 * steps, ignore_eos=True)
    retriever = SlowFetches(flat_retriever(), delay)
    engine = RaLMEngine(FakeLM(latency_s=0.001), FakeTokenizer(), retriever,
                        encoder=BagOfWords().encode)  # fmt: skip
    spec = SpeculationConfig.parse(f"{method}:prefetch_k=20")
    baseline = await engine.generate(LONG_QUESTION, "baseline", config=config)
    before = asyncio.all_tasks()
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec, config=config)
    assert result.token_ids == baseline.token_ids
    assert len(result.token_ids) == 4 * steps
    assert retriever.fetches >= 1  # the first step's seeding was started
    assert result.trace.wall_time_s < (steps - 1) * delay + 0.4
    assert tasks_left_since(before) == []


def tasks_left_since(before: set[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
    """Tasks started since ``before`` was taken that are still running. Tasks that were
    already there are left out: the loop is shared with earlier tests, whose long-lived
    engines (a vLLM client's output task, a gRPC server) keep tasks of their own."""
    me = asyncio.current_task()
    return [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]


@pytest.mark.parametrize("early", [False, True], ids=["late", "early"])
async def test_a_pipelined_request_leaves_no_task_behind(early: bool) -> None:
    """Fetches and cache inserts now run as tasks of their own: when a request returns,
    rollbacks included, none is left running (the fetches of discarded steps are cancelled
    with their searches; the inserts still queued at the end are cancelled)."""
    before = asyncio.all_tasks()
    _, result = await pipelined_with_slow_fetches(0.03, "prefetch_k=3:speculation_stride=3", early)
    assert result.trace.rollbacks > 0, "nothing was rolled back"
    assert tasks_left_since(before) == []


async def test_a_rollback_cancels_the_fetches_of_the_steps_it_discards() -> None:
    """The unsettled steps a rollback discards: searches still out are cancelled, and so are
    the fetches that answered searches started (a fetch would otherwise outlive its step)."""
    from ralmspec_vllm.core.speculative import SpeculativeStep, _cancel_searches, _Unsettled

    hanging = asyncio.Event()

    async def fetch() -> bool:
        await hanging.wait()
        return True

    async def answered() -> tuple[list[Hit], float, asyncio.Task[bool]]:
        return [Hit(1, 1.0)], 0.01, asyncio.create_task(fetch())

    async def pending() -> tuple[list[Hit], float, asyncio.Task[bool]]:
        await hanging.wait()
        raise AssertionError("never answers")

    step = SpeculativeStep(0, 4, "q", 1)
    before = asyncio.all_tasks()
    done, out = asyncio.create_task(answered()), asyncio.create_task(pending())
    await asyncio.sleep(0)  # the first search answers, its fetch starts
    assert done.done()
    unsettled = [_Unsettled(step, done, generating=False), _Unsettled(step, out, False)]
    await _cancel_searches(unsettled)
    assert out.cancelled() and done.result()[2].cancelled()
    assert tasks_left_since(before) == []


class FillerStore(Store):
    """The corpus's passages, then a plain passage for every filler id up to ``size``."""

    def __init__(self, docs: list[Document], size: int) -> None:
        super().__init__(docs)
        self.size = size

    def __len__(self) -> int:
        return self.size

    def get(self, doc_ids: Sequence[int]) -> list[Document]:
        return [
            self.docs[d] if d < len(self.docs) else Document(d, f"t{d}", doc_text(d, 4))
            for d in doc_ids
        ]


@pytest.mark.parametrize("early", [False, True], ids=["late", "early"])
async def test_pipelined_rollbacks_over_a_slow_circular_scan_abandon_searches(
    early: bool,
) -> None:
    """The 21M headline's retriever in miniature: a bf16 torch flat scan on the circular walk,
    slow enough (~1,500 chunks a turn) that a rollback catches later verifications still on
    the walk. Those are dropped (``retrieval.abandon``) and every answer stays the
    baseline's."""
    real = np.random.default_rng(1).standard_normal((NUM_DOCS, DIM)).astype(np.float32)
    filler = np.random.default_rng(2).standard_normal((48_000, DIM)).astype(np.float32)
    vectors = np.concatenate([real, 1e-3 * filler])  # filler never outranks a matching doc
    store = FillerStore(corpus(), len(vectors))
    kb = flat.FlatRetriever(vectors, store, BagOfWords(), impl="torch", device="cpu",
                            dtype="bfloat16", chunk_size=32, scan="circular")  # fmt: skip
    walk = kb._circular
    assert walk is not None
    engine = RaLMEngine(FakeLM(), FakeTokenizer(), InProcessAsyncRetriever(kb),
                        encoder=BagOfWords().encode)  # fmt: skip
    config = SpeculationConfig(
        # a fixed stride keeps up to 4 steps' searches on the walk at once; with OS3
        # ("auto", as the headline runs) the steps it timed as plain have none behind them,
        # and once in a full CI run (early) every rollback found nothing left to abandon
        speculation_stride=4,
        prefetch_k=1,  # the cache knows only documents already used: each new one misses
        async_verification=True,
        overlap_depth="pipeline",
        early_verification=early,
    )
    rollbacks = 0
    try:
        for question in (SHORT_QUESTION, LONG_QUESTION):
            baseline = await engine.generate(question, "baseline")
            result = await engine.generate(question, "ralmspec", speculation=config)
            assert result.token_ids == baseline.token_ids
            assert result.trace.step_doc_ids == baseline.trace.step_doc_ids
            rollbacks += result.trace.rollbacks
    finally:
        kb.close()
    assert rollbacks > 0, "nothing was rolled back"
    assert walk.abandoned > 0 and kb.times.abandoned > 0
