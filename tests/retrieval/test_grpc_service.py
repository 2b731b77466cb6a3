"""The retriever service over real gRPC on 127.0.0.1 (OS-chosen ports), every backend.

World: a knowledge base built by ``index build``'s code from 160 real Wikipedia passages
(every 5th of the first 800 in gensim's test dump, given as a user JSONL corpus), opened
through the factory as FAISS flat, HNSW, IVF (all-MiniLM-L6-v2 vectors) and BM25. Every
answer over gRPC must equal the in-process retriever's answer exactly (ids, float64 scores).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ralmspec_vllm.core.batching import BatchingRetriever
from ralmspec_vllm.retrieval.base import DenseRetriever, Retriever
from ralmspec_vllm.retrieval.batching import BatchStats
from ralmspec_vllm.retrieval.bm25 import BM25Index
from ralmspec_vllm.retrieval.client import RetrieverClient
from ralmspec_vllm.retrieval.errors import RetrieverRequestError, RetrieverServerError
from ralmspec_vllm.retrieval.proto_gen import retriever_pb2 as pb
from ralmspec_vllm.retrieval.proto_gen import retriever_pb2_grpc as pb_grpc
from ralmspec_vllm.retrieval.server import RunningServer, start_server
from ralmspec_vllm.retrieval.service import SERVICE_NAME, ServiceConfig
from ralmspec_vllm.types import Document, Hit, RetrieverInfo

BACKENDS = ("flat", "hnsw", "ivf", "bm25")
DENSE = ("flat", "hnsw", "ivf")
NUM_DOCS = 160
QUERIES = [
    "who was the mother of Achilles",
    "how much sunlight does snow reflect",
    "when did Alabama become a state",
    "early signs of autism in children",
    "anarchism and the state",
]
TOPICS = ["Achilles", "Albedo", "Alabama", "Autism", "Anarchism"]  # each query's article
K = 5


# -- world --------------------------------------------------------------------------------


def write_wiki_corpus(path: Path, num_docs: int = NUM_DOCS) -> Path:
    """Every 5th of the first real Wikipedia passages as a JSONL corpus (id, title, text)."""
    from ralmspec_vllm.retrieval.corpus import wiki_passages

    with path.open("w") as f:
        for p in itertools.islice(wiki_passages(), 0, 5 * num_docs, 5):
            f.write(json.dumps({"id": p.ext_id, "title": p.title, "text": p.text}) + "\n")
    return path


@pytest.fixture(scope="module")
def kb_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from ralmspec_vllm.retrieval.kb import build_index

    tmp = tmp_path_factory.mktemp("grpc-kb")
    corpus = write_wiki_corpus(tmp / "wiki.jsonl")
    kb = build_index(tmp / "kb", sources=(), corpus=corpus, show_progress=False)
    assert len(kb) == NUM_DOCS
    return kb.path


@pytest.fixture(scope="module")
def retrievers(kb_dir: Path) -> dict[str, Retriever]:
    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever
    from ralmspec_vllm.retrieval.kb import KnowledgeBase

    kb = KnowledgeBase.open(kb_dir)
    small = RetrieverConfig(hnsw_m=16, ef_search=64, nlist=8, nprobe=2, progress=False)
    return {b: open_retriever(kb, dataclasses.replace(small, backend=b)) for b in BACKENDS}


class CountingRetriever:
    """A real retriever that records the size of every index search it is asked for."""

    def __init__(self, inner: DenseRetriever) -> None:
        self.inner = inner
        self.text_batches: list[int] = []
        self.vector_batches: list[int] = []
        self.seconds: list[float] = []  # each text search's own time

    @property
    def info(self) -> RetrieverInfo:
        return self.inner.info

    def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        self.text_batches.append(len(queries))
        start = time.perf_counter()
        time.sleep(0.02)  # a backend slow enough for its time to be told from overhead
        hits = self.inner.search(queries, k, prefetch)
        self.seconds.append(time.perf_counter() - start)
        return hits

    def search_vectors(self, vectors: np.ndarray, k: int, prefetch: int = 0) -> list[list[Hit]]:
        self.vector_batches.append(len(vectors))
        return self.inner.search_vectors(vectors, k, prefetch)

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        return self.inner.encode(queries)

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        return self.inner.score(query, doc_ids)

    def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        return self.inner.documents(doc_ids)

    def vectors(self, doc_ids: Sequence[int]) -> np.ndarray:
        return self.inner.vectors(doc_ids)


@pytest.fixture(scope="module")
async def served(retrievers: dict[str, Retriever]) -> AsyncIterator[dict[str, RunningServer]]:
    running = {name: await start_server(r, "127.0.0.1", 0) for name, r in retrievers.items()}
    yield running
    for server in running.values():
        await server.stop(grace=0)


@pytest.fixture(scope="module")
async def clients(served: dict[str, RunningServer]) -> AsyncIterator[dict[str, RetrieverClient]]:
    clients = {name: RetrieverClient(s.target, timeout_s=30) for name, s in served.items()}
    yield clients
    for client in clients.values():
        await client.close()


# -- cache reset ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_reset_caches_empties_the_query_encoders_memo(
    backend: str, clients: dict[str, RetrieverClient]
) -> None:
    """``ResetCaches`` (what the HTTP server's ``/reset_prefix_cache`` calls between
    benchmark runs): a dense backend's search leaves its query encoded in the encoder's
    memo, which the reset reports and drops; a second reset finds nothing; BM25 has no such
    cache. The answers are the same before and after."""
    client = clients[backend]
    await client.reset_caches()
    query = f"which {backend} index answers a question asked the first time"
    before = await client.search([query, query], 3)
    assert await client.reset_caches() == (0 if backend == "bm25" else 1)
    assert await client.reset_caches() == 0
    assert await client.search([query, query], 3) == before


# -- equality with the in-process retriever -----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
async def test_grpc_answers_equal_in_process(
    backend: str, retrievers: dict[str, Retriever], clients: dict[str, RetrieverClient]
) -> None:
    local, remote = retrievers[backend], clients[backend]
    expected = local.search(QUERIES, K)
    got = await remote.search(QUERIES, K)
    assert got == expected
    assert all(len(hits) == K for hits in got)
    top_docs = await remote.documents([hits[0].doc_id for hits in got])
    if backend in ("flat", "bm25"):  # exact backends find each query's article
        assert [d.title for d in top_docs] == TOPICS
    ids = [h.doc_id for h in expected[0]] + [0, 17, NUM_DOCS - 1]
    assert await remote.score(QUERIES[0], ids) == local.score(QUERIES[0], ids)
    # The search's reported scores are the knowledge base's scores (speculation cache rule).
    assert (await remote.score(QUERIES[0], ids))[:K] == [h.score for h in expected[0]]
    assert await remote.documents([3, 1, 4]) == local.documents([3, 1, 4])
    info = await remote.info()
    service_extra = {k: v for k, v in info.extra.items() if k.startswith("service.")}
    assert info == dataclasses.replace(local.info, extra=info.extra)
    assert {k: v for k, v in info.extra.items() if k not in service_extra} == local.info.extra
    assert service_extra["service.max_k"] == str(ServiceConfig().max_k)
    vectors = await remote.vectors([5, 2])
    if isinstance(local, DenseRetriever):
        assert vectors is not None
        np.testing.assert_array_equal(vectors, local.vectors([5, 2]))
    else:
        assert vectors is None
        assert info.bm25 is not None and info.bm25 == local.info.bm25


@pytest.mark.parametrize("backend", DENSE)
async def test_search_by_embedding_equals_search_by_text(
    backend: str, retrievers: dict[str, Retriever], clients: dict[str, RetrieverClient]
) -> None:
    local = retrievers[backend]
    assert isinstance(local, DenseRetriever)
    embeddings = local.encode(QUERIES)
    # The server's encoder gives the same vectors bit for bit (Encode RPC).
    np.testing.assert_array_equal(await clients[backend].encode(QUERIES), embeddings)
    by_text = await clients[backend].search(QUERIES, K)
    assert await clients[backend].search_vectors(embeddings, K) == by_text
    assert by_text == local.search_vectors(embeddings, K)
    ids = [h.doc_id for h in by_text[1]]
    by_vec = await clients[backend].score(embeddings[1], ids)
    assert by_vec == [h.score for h in by_text[1]]


async def test_embeddings_as_repeated_floats_equal_packed_bytes(
    retrievers: dict[str, Retriever], served: dict[str, RunningServer]
) -> None:
    local = retrievers["flat"]
    assert isinstance(local, DenseRetriever)
    emb = local.encode(QUERIES[:2])
    packed = pb.Embeddings(dim=emb.shape[1], float32_le=emb.astype("<f4").tobytes())
    floats = pb.Embeddings(dim=emb.shape[1], values=emb.ravel().tolist())
    async with grpc.aio.insecure_channel(served["flat"].target) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        a = await stub.Search(pb.SearchRequest(embeddings=packed, top_k=K), timeout=30)
        b = await stub.Search(pb.SearchRequest(embeddings=floats, top_k=K), timeout=30)
    assert a == b
    assert [list(r.doc_ids) for r in a.results] == [
        [h.doc_id for h in hits] for hits in local.search_vectors(emb, K)
    ]


async def test_search_returns_hit_vectors(
    retrievers: dict[str, Retriever], clients: dict[str, RetrieverClient]
) -> None:
    local = retrievers["flat"]
    assert isinstance(local, DenseRetriever)
    results = await clients["flat"].search_with_vectors(QUERIES[:2], K)
    assert [r.hits for r in results] == local.search(QUERIES[:2], K)
    for r in results:
        np.testing.assert_array_equal(r.vectors, local.vectors([h.doc_id for h in r.hits]))
    by_vec = await clients["flat"].search_with_vectors(local.encode(QUERIES[:2]), K)
    assert [r.hits for r in by_vec] == [r.hits for r in results]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_prefetch_hits_follow_the_exact_top_k_over_grpc(
    backend: str, retrievers: dict[str, Retriever], clients: dict[str, RetrieverClient]
) -> None:
    """top_k=2 with prefetch=6: the in-process answer; the first 2 are the exact top-2, the
    rest carry the knowledge base's own scores (and, with vectors, their index vectors)."""
    local, remote = retrievers[backend], clients[backend]
    got = await remote.search(QUERIES, 2, 6)
    assert got == local.search(QUERIES, 2, 6)
    assert [row[:2] for row in got] == local.search(QUERIES, 2)
    for query, row in zip(QUERIES, got, strict=True):
        assert 2 < len(row) <= 8
        assert len({h.doc_id for h in row}) == len(row)
        assert [h.score for h in row] == local.score(query, [h.doc_id for h in row])
    if backend == "bm25":  # an inverted index's prefetch hits are the exact top-(k + p)
        assert got == local.search(QUERIES, 8)
    if isinstance(local, DenseRetriever):
        assert await remote.search_vectors(local.encode(QUERIES), 2, 6) == got
        results = await remote.search_with_vectors(QUERIES[:2], 2, 6)
        assert [r.hits for r in results] == got[:2]
        for r in results:
            np.testing.assert_array_equal(r.vectors, local.vectors([h.doc_id for h in r.hits]))


# -- cross-request batching ---------------------------------------------------------------


async def concurrent_searches(
    counting: CountingRetriever, queries: list[str], ks: list[int], merge: bool | None = None
) -> tuple[list[list[list[Hit]]], BatchStats]:
    """One concurrent one-query Search call per (query, k) against a real server over
    ``counting`` with a 50 ms batching window (``merge``: ``ServiceConfig.merge_searches``);
    the answers and the server's stats after."""
    config = ServiceConfig(batch_window_ms=50.0, max_batch=256, merge_searches=merge)
    server = await start_server(counting, "127.0.0.1", 0, config, warm_up=False)
    try:
        async with RetrieverClient(server.target, timeout_s=30) as client:
            got = await asyncio.gather(
                *(client.search([q], k) for q, k in zip(queries, ks, strict=True))
            )
            return list(got), await client.stats()
    finally:
        await server.stop(grace=0)


@pytest.mark.parametrize("backend", ["flat", "hnsw"])
async def test_concurrent_searches_are_merged(
    backend: str, retrievers: dict[str, Retriever]
) -> None:
    local = retrievers[backend]
    assert isinstance(local, DenseRetriever)
    counting = CountingRetriever(local)
    queries = [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(20)]
    ks = [1 + i % 7 for i in range(20)]  # different k per call: each gets its own slice
    got, stats = await concurrent_searches(counting, queries, ks)
    # Each answer equals a lone in-process search with the call's own k.
    assert [g[0] for g in got] == [
        local.search([q], k)[0] for q, k in zip(queries, ks, strict=True)
    ]
    assert sum(counting.text_batches) == 20
    assert len(counting.text_batches) < 20, counting.text_batches
    if backend == "hnsw":  # approximate: only calls with equal k share an index search
        assert len(counting.text_batches) >= len(set(ks))
    assert stats.search_calls == 20
    assert stats.index_searches == len(counting.text_batches)
    assert stats.max_merged_calls == max(counting.text_batches) > 1
    assert sum(counting.seconds) == pytest.approx(stats.search_seconds, abs=0.05)
    assert stats.search_seconds > 0


async def test_bm25_searches_are_not_merged(retrievers: dict[str, Retriever]) -> None:
    """A BM25 batch costs the sum of its queries, so the service answers each call with its
    own index search (oldest first) instead of merging (``UNMERGED_BACKENDS``)."""
    local = retrievers["bm25"]
    counting = CountingRetriever(local)  # type: ignore[arg-type]
    queries = [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(12)]
    ks = [1 + i % 3 for i in range(12)]
    got, stats = await concurrent_searches(counting, queries, ks)
    assert got == [local.search([q], k) for q, k in zip(queries, ks, strict=True)]
    assert counting.text_batches == [1] * 12
    assert (stats.search_calls, stats.index_searches, stats.max_merged_calls) == (12, 12, 1)


@pytest.mark.parametrize(("backend", "merge"), [("flat", False), ("bm25", True)])
async def test_merge_searches_overrides_the_backend(
    backend: str, merge: bool, retrievers: dict[str, Retriever]
) -> None:
    """``ServiceConfig.merge_searches`` beats the backend's default both ways: a flat
    service that must not merge searches each call alone, a BM25 one told to merges."""
    local = retrievers[backend]
    counting = CountingRetriever(local)  # type: ignore[arg-type]
    queries = [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(12)]
    ks = [1 + i % 3 for i in range(12)]
    got, stats = await concurrent_searches(counting, queries, ks, merge=merge)
    assert got == [local.search([q], k) for q, k in zip(queries, ks, strict=True)]
    assert sum(counting.text_batches) == stats.search_calls == 12
    if merge:
        assert stats.max_merged_calls == max(counting.text_batches) > 1
        assert stats.index_searches == len(counting.text_batches) < 12
    else:
        assert counting.text_batches == [1] * 12
        assert (stats.index_searches, stats.max_merged_calls) == (12, 1)


async def test_merge_searches_off_reaches_searches_by_embedding(
    retrievers: dict[str, Retriever],
) -> None:
    """A dense service told not to merge answers each Search by vectors with its own
    index search too, not only the text ones."""
    flat = retrievers["flat"]
    assert isinstance(flat, DenseRetriever)
    counting = CountingRetriever(flat)
    config = ServiceConfig(batch_window_ms=50.0, max_batch=256, merge_searches=False)
    server = await start_server(counting, "127.0.0.1", 0, config, warm_up=False)
    embeddings = flat.encode([f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(8)])
    try:
        async with RetrieverClient(server.target, timeout_s=30) as client:
            got = await asyncio.gather(*(client.search_vectors(e, K) for e in embeddings))
    finally:
        await server.stop(grace=0)
    assert got == [flat.search_vectors(e, K) for e in embeddings]
    assert counting.vector_batches == [1] * 8


async def test_text_and_embedding_queries_batch_separately_within_max_batch(
    retrievers: dict[str, Retriever],
) -> None:
    flat = retrievers["flat"]
    assert isinstance(flat, DenseRetriever)
    counting = CountingRetriever(flat)
    server = await start_server(
        counting, "127.0.0.1", 0, ServiceConfig(batch_window_ms=50.0, max_batch=4), warm_up=False
    )
    queries = [f"{QUERIES[i % len(QUERIES)]} {i}" for i in range(12)]
    embeddings = flat.encode(queries)
    try:
        async with RetrieverClient(server.target, timeout_s=30) as client:
            calls = [client.search([q], K) for q in queries]
            calls += [client.search_vectors(e, K) for e in embeddings]
            got = await asyncio.gather(*calls)
    finally:
        await server.stop(grace=0)
    assert got[:12] == got[12:] == [flat.search([q], K) for q in queries]
    assert sum(counting.text_batches) == sum(counting.vector_batches) == 12
    assert max(counting.text_batches + counting.vector_batches) <= 4
    assert len(counting.text_batches) >= 3 and len(counting.vector_batches) >= 3


async def test_lone_request_with_zero_window(retrievers: dict[str, Retriever]) -> None:
    server = await start_server(retrievers["bm25"], "127.0.0.1", 0, ServiceConfig(0.0))
    try:
        async with RetrieverClient(server.target) as client:
            assert await client.search(QUERIES[:1], K) == retrievers["bm25"].search(QUERIES[:1], K)
    finally:
        await server.stop(grace=0)


async def test_sharded_bm25_over_grpc_under_concurrent_calls(
    retrievers: dict[str, Retriever],
) -> None:
    """BM25's parallel search behind a real server: concurrent calls (merged or not) share
    one thread pool and its score buffers; every answer equals the serial search's."""
    from ralmspec_vllm.retrieval.bm25 import BM25Retriever

    serial = retrievers["bm25"]
    assert isinstance(serial, BM25Retriever)
    sharded = BM25Retriever(_copy_index(serial))
    sharded.index.searcher.set_threads(3, shard_docs=7, min_docs=1)
    assert sharded.index.shards >= NUM_DOCS // 7
    queries = [f"{QUERIES[i % len(QUERIES)]} {TOPICS[(3 * i) % len(TOPICS)]}" for i in range(24)]
    server = await start_server(sharded, "127.0.0.1", 0, ServiceConfig(batch_window_ms=5.0))
    try:
        async with RetrieverClient(server.target, timeout_s=30) as client:
            got = await asyncio.gather(
                *(client.search(queries[i : i + 1 + i % 3], 1 + i % 9) for i in range(24))
            )
    finally:
        await server.stop(grace=0)
    expected = [serial.search(queries[i : i + 1 + i % 3], 1 + i % 9) for i in range(24)]
    assert got == expected


def _copy_index(retriever: Retriever) -> BM25Index:
    """The same BM25 weights behind a search of its own (its threads set apart)."""
    from ralmspec_vllm.retrieval.bm25 import BM25Retriever

    assert isinstance(retriever, BM25Retriever)
    i = retriever.index
    return BM25Index(i.weights, i.vocab, i.idf, i.doc_len, i.params, i.analyzer)


# -- bad input ------------------------------------------------------------------------------

_EMB_OK = pb.Embeddings(dim=384, float32_le=np.zeros((1, 384), np.float32).tobytes())
_TEXT = pb.TextQueries(texts=["a fox"])
MALFORMED: list[tuple[str, str, str, object, str]] = [
    # (id, backend, method, request, field named in the error)
    ("missing-query", "flat", "Search", pb.SearchRequest(top_k=3), "queries"),
    ("no-texts", "flat", "Search", pb.SearchRequest(text=pb.TextQueries(), top_k=3), "text.texts"),
    (
        "empty-text",
        "bm25",
        "Search",
        pb.SearchRequest(text=pb.TextQueries(texts=["ok", " "]), top_k=3),
        "text.texts[1]",
    ),
    ("k-zero", "flat", "Search", pb.SearchRequest(text=_TEXT, top_k=0), "top_k"),
    ("k-negative", "bm25", "Search", pb.SearchRequest(text=_TEXT, top_k=-2), "top_k"),
    ("k-over-limit", "flat", "Search", pb.SearchRequest(text=_TEXT, top_k=1001), "top_k"),
    (
        "too-many-queries",
        "bm25",
        "Search",
        pb.SearchRequest(text=pb.TextQueries(texts=["q"] * 1025), top_k=1),
        "text.texts",
    ),
    (
        "wrong-dim",
        "hnsw",
        "Search",
        pb.SearchRequest(embeddings=pb.Embeddings(dim=3, values=[1, 2, 3]), top_k=3),
        "embeddings.dim",
    ),
    (
        "ragged-bytes",
        "flat",
        "Search",
        pb.SearchRequest(embeddings=pb.Embeddings(dim=384, float32_le=b"\0" * 10), top_k=3),
        "embeddings.float32_le",
    ),
    (
        "nan",
        "ivf",
        "Search",
        pb.SearchRequest(embeddings=pb.Embeddings(dim=384, values=[np.nan] * 384), top_k=3),
        "embeddings",
    ),
    (
        "embedding-on-sparse",
        "bm25",
        "Search",
        pb.SearchRequest(embeddings=_EMB_OK, top_k=3),
        "embeddings",
    ),
    (
        "vectors-on-sparse",
        "bm25",
        "Search",
        pb.SearchRequest(text=_TEXT, top_k=3, return_vectors=True),
        "return_vectors",
    ),
    (
        "vectors-over-message-limit",
        "flat",
        "Search",
        pb.SearchRequest(text=pb.TextQueries(texts=["q"] * 100), top_k=1000, return_vectors=True),
        "return_vectors",
    ),
    (
        "prefetch-negative",
        "flat",
        "Search",
        pb.SearchRequest(text=_TEXT, top_k=3, prefetch=-1),
        "prefetch",
    ),
    (
        "prefetch-over-max-k",
        "bm25",
        "Search",
        pb.SearchRequest(text=_TEXT, top_k=3, prefetch=998),
        "prefetch",
    ),
    ("score-no-query", "flat", "Score", pb.ScoreRequest(doc_ids=[1]), "query"),
    ("score-empty-text", "bm25", "Score", pb.ScoreRequest(text="", doc_ids=[1]), "text"),
    (
        "score-unknown-id",
        "flat",
        "Score",
        pb.ScoreRequest(text="x", doc_ids=[1, NUM_DOCS]),
        "doc_ids",
    ),
    ("score-negative-id", "bm25", "Score", pb.ScoreRequest(text="x", doc_ids=[-1]), "doc_ids"),
    (
        "score-two-embeddings",
        "flat",
        "Score",
        pb.ScoreRequest(embedding=pb.Embeddings(dim=384, values=[0.0] * 768), doc_ids=[1]),
        "embedding",
    ),
    ("docs-unknown-id", "bm25", "GetDocuments", pb.GetDocumentsRequest(doc_ids=[999]), "doc_ids"),
    (
        "docs-too-many",
        "flat",
        "GetDocuments",
        pb.GetDocumentsRequest(doc_ids=[0] * 10_001),
        "doc_ids",
    ),
    (
        "vectors-unknown-id",
        "ivf",
        "GetVectors",
        pb.GetVectorsRequest(doc_ids=[NUM_DOCS]),
        "doc_ids",
    ),
]


@pytest.mark.parametrize(
    ("backend", "method", "request_msg", "field"),
    [m[1:] for m in MALFORMED],
    ids=[m[0] for m in MALFORMED],
)
async def test_malformed_request_is_invalid_argument_and_server_keeps_serving(
    backend: str,
    method: str,
    request_msg: object,
    field: str,
    served: dict[str, RunningServer],
    retrievers: dict[str, Retriever],
) -> None:
    async with grpc.aio.insecure_channel(served[backend].target) as channel:
        stub = pb_grpc.RetrieverStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(stub, method)(request_msg, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith(f"{field}: "), err.value.details()
        reply = await stub.Search(pb.SearchRequest(text=_TEXT, top_k=2), timeout=30)
    assert [h.doc_id for h in retrievers[backend].search(["a fox"], 2)[0]] == list(
        reply.results[0].doc_ids
    )


async def test_client_maps_invalid_argument_to_value_error(
    clients: dict[str, RetrieverClient],
) -> None:
    with pytest.raises(RetrieverRequestError, match="top_k") as err:
        await clients["flat"].search(["fox"], 0)
    assert isinstance(err.value, ValueError)
    with pytest.raises(ValueError, match=r"doc_ids: unknown doc id"):
        await clients["bm25"].documents([10_000])
    assert len(await clients["flat"].search(["fox"], 1)) == 1


async def test_concurrent_fetches_merge_into_one_rpc_and_split_back_exactly(
    clients: dict[str, RetrieverClient],
) -> None:
    """The server's ``BatchingRetriever`` sends concurrent callers' fetches as one RPC
    (duplicate and shared ids once) and gives each caller what its own call returns; a
    caller with an unknown id fails alone."""
    asks = [[3, 1, 4], [1, 5, 9, 2, 6], [4, 4], [7]]
    ivf = BatchingRetriever(clients["ivf"])
    vectors, lists, documents = await asyncio.gather(
        asyncio.gather(*(ivf.vectors(ids) for ids in asks)),
        asyncio.gather(*(ivf.lists(ids) for ids in asks)),
        asyncio.gather(*(ivf.documents(ids) for ids in asks)),
    )
    for ids, got_vectors, got_lists, got_docs in zip(asks, vectors, lists, documents, strict=True):
        want_vectors = await clients["ivf"].vectors(ids)
        assert got_vectors is not None and want_vectors is not None
        np.testing.assert_array_equal(got_vectors, want_vectors)
        assert np.array_equal(got_lists, await clients["ivf"].lists(ids))  # type: ignore[arg-type]
        assert got_docs == await clients["ivf"].documents(ids)
    sizes = ivf.fetch_sizes()
    assert sizes["vectors"] == sizes["lists"] == sizes["documents"] == [len(asks)]

    bm25 = BatchingRetriever(clients["bm25"])
    weights = await asyncio.gather(*(bm25.term_weights(ids) for ids in asks))
    for ids, got in zip(asks, weights, strict=True):
        want = await clients["bm25"].term_weights(ids)
        assert got is not None and want is not None and len(got) == len(want) == len(ids)
        for (terms, w), (want_terms, want_w) in zip(got, want, strict=True):
            assert terms == want_terms and np.array_equal(w, want_w)
    assert await bm25.vectors([1, 2]) is None and await bm25.lists([1]) is None

    unknown = 10_000
    outcomes = await asyncio.gather(
        *(ivf.documents(ids) for ids in [[1, 2], [3, unknown], [2]]), return_exceptions=True
    )
    assert isinstance(outcomes[1], RetrieverRequestError) and "unknown doc id" in str(outcomes[1])
    assert outcomes[0] == await clients["ivf"].documents([1, 2])
    assert outcomes[2] == await clients["ivf"].documents([2])


class _BrokenRetriever(CountingRetriever):
    def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        raise RuntimeError("index file vanished")


async def test_backend_failure_is_internal_and_server_keeps_serving(
    retrievers: dict[str, Retriever],
) -> None:
    flat = retrievers["flat"]
    assert isinstance(flat, DenseRetriever)
    server = await start_server(_BrokenRetriever(flat), "127.0.0.1", 0, warm_up=False)
    try:
        async with RetrieverClient(server.target, timeout_s=30) as client:
            with pytest.raises(RetrieverServerError, match=r"INTERNAL.*index file vanished"):
                await client.search(["fox"], 3)
            assert await client.score("fox", [1]) == flat.score("fox", [1])
    finally:
        await server.stop(grace=0)


# -- health and info ----------------------------------------------------------------------


async def test_health_check_serving(served: dict[str, RunningServer]) -> None:
    async with grpc.aio.insecure_channel(served["bm25"].target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    async with RetrieverClient(served["bm25"].target) as client:
        await client.wait_ready(10)


def test_service_config_validation() -> None:
    with pytest.raises(ValueError, match="batch_window_ms"):
        ServiceConfig(batch_window_ms=-1)
    with pytest.raises(ValueError, match="max_k"):
        ServiceConfig(max_k=0)
