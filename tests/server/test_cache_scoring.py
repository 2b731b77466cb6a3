"""Where speculation ranks a request's cache (``ServiceConfig.cache_scoring``): the choice
``serve`` makes from the retriever it talks to, over real gRPC retriever services (the
small MiniLM flat index and a BM25 index of a few sentences) on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import pytest_asyncio

from ralmspec_vllm.core.cache import (
    DenseCacheScorer,
    RetrieverCacheScorer,
    SpeculationCache,
    TermWeightCacheScorer,
)
from ralmspec_vllm.core.encoding import AsyncEmbedder
from ralmspec_vllm.core.trace import TraceRecorder
from ralmspec_vllm.retrieval.bm25 import BM25Retriever
from ralmspec_vllm.retrieval.client import RetrieverClient
from ralmspec_vllm.retrieval.errors import RetrieverRequestError
from ralmspec_vllm.retrieval.server import start_server
from ralmspec_vllm.service import ServiceConfig, local_cache_scoring
from ralmspec_vllm.types import Document

TEXTS = [
    "Achilles was the son of the nymph Thetis and Peleus, king of Phthia.",
    "Albedo is the fraction of sunlight that is diffusely reflected by a body.",
    "Montgomery is the capital city of the U.S. state of Alabama.",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def dense_client(small_index: Path) -> AsyncIterator[RetrieverClient]:
    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever

    retriever = open_retriever(small_index, RetrieverConfig(backend="flat", progress=False))
    running = await start_server(retriever, "127.0.0.1", 0)
    async with RetrieverClient(running.target, timeout_s=30.0) as client:
        yield client
    await running.stop(grace=0)


class Passages:
    """The TEXTS as a document store (what ``GetTermWeights`` analyzes)."""

    def __len__(self) -> int:
        return len(TEXTS)

    def get(self, doc_ids: Sequence[int]) -> list[Document]:
        return [Document(d, "", TEXTS[d]) for d in doc_ids]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bm25_client() -> AsyncIterator[RetrieverClient]:
    texts = [Document(d, "", t).contents for d, t in enumerate(TEXTS)]
    running = await start_server(BM25Retriever.from_texts(texts, Passages()), "127.0.0.1", 0)
    async with RetrieverClient(running.target, timeout_s=30.0) as client:
        yield client
    await running.stop(grace=0)


@pytest.mark.asyncio(loop_scope="module")
async def test_dense_and_bm25_retrievers_are_scored_here_unless_told_otherwise(
    dense_client: RetrieverClient, bm25_client: RetrieverClient
) -> None:
    for scoring in ("auto", "local"):
        dense = await local_cache_scoring(dense_client, scoring)
        assert isinstance(dense.embedder, AsyncEmbedder) and dense.scorer is None
        assert dense.describe() == "local (dense)"
        bm25 = await local_cache_scoring(bm25_client, scoring)  # BM25: term weights
        assert isinstance(bm25.scorer, TermWeightCacheScorer) and bm25.embedder is None
        assert bm25.describe() == "local (BM25 term weights)"
    for client in (dense_client, bm25_client):
        remote = await local_cache_scoring(client, "retriever")
        assert remote.embedder is None and remote.scorer is None
        assert remote.describe() == "the retriever's Score"
    with pytest.raises(ValueError, match="cache_scoring"):
        await local_cache_scoring(dense_client, "nearby")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cache_scoring"):
        ServiceConfig(cache_scoring="nearby")  # type: ignore[arg-type]


@pytest.mark.asyncio(loop_scope="module")
async def test_a_dense_retriever_without_query_embeddings_is_scored_by_the_retriever(
    small_index: Path,
) -> None:
    """In-process, a dense retriever serves no ``encode`` coroutine: "auto" falls back to its
    ``Score``; "local" is refused with the reason."""
    from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever
    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever

    dense = InProcessAsyncRetriever(
        open_retriever(small_index, RetrieverConfig(backend="flat", progress=False))
    )
    auto = await local_cache_scoring(dense, "auto")
    assert auto.embedder is None and auto.scorer is None
    with pytest.raises(ValueError, match="needs a dense retriever that serves query embeddings"):
        await local_cache_scoring(dense, "local")


@pytest.mark.asyncio(loop_scope="module")
async def test_local_and_retriever_scoring_pick_the_same_document(
    dense_client: RetrieverClient,
) -> None:
    """The local ranking (retriever's embedding, cached vectors, exact re-scoring) and the
    retriever's Score give the same top-1 for every query over a cache of the whole index,
    near-ties included: both are the knowledge base's exact score, ties to the lower id."""
    info = await dense_client.info()
    ids = list(range(info.num_docs))
    cache = SpeculationCache(capacity=len(ids))
    vectors = await dense_client.vectors(ids)
    assert vectors is not None
    cache.insert(ids, dict(zip(ids, vectors, strict=True)))
    embedder = (await local_cache_scoring(dense_client, "local")).embedder
    assert embedder is not None
    local, remote = DenseCacheScorer(embedder=embedder), RetrieverCacheScorer(dense_client)
    queries = [f"{t} {w}" for t in ("Achilles", "albedo of snow", "Alabama capital", "")
               for w in ("history", "science", "")]  # fmt: skip
    picked = []
    for query in [q for q in queries if q.strip()]:
        recorder = TraceRecorder("ralmspec")
        here = await local.top1(cache, query, recorder)
        there = await remote.top1(cache, query, recorder)
        assert here == there, query
        picked.append(here)
    assert len(set(picked)) > 1  # the queries do not all land on one document


@pytest.mark.asyncio(loop_scope="module")
async def test_bm25_term_weights_over_grpc_rank_like_the_retrievers_score(
    dense_client: RetrieverClient, bm25_client: RetrieverClient
) -> None:
    """``GetTermWeights`` on a real BM25 service: the cache ranked here from them gives
    every document the same float as the retriever's ``Score``, hence the same top-1; a
    dense service has none to give (``None``); a bad id is the caller's error."""
    ids = list(range(len(TEXTS)))
    weights = await bm25_client.term_weights(ids)
    assert weights is not None and all(len(t) == len(w) > 3 for t, w in weights)
    cache = SpeculationCache(capacity=len(ids))
    cache.insert(ids, terms=dict(zip(ids, weights, strict=True)))
    scorer = (await local_cache_scoring(bm25_client, "auto")).scorer
    assert scorer is not None
    remote = RetrieverCacheScorer(bm25_client)
    for query in ("Achilles son of Thetis", "capital of Alabama", "sunlight reflected body",
                  "Thetis Thetis albedo", "the of and", "unknownword"):  # fmt: skip
        here = cache.term_scores(scorer.analyzer(query))
        there = await bm25_client.score(query, cache.doc_ids.tolist())
        assert here.tolist() == there, query
        recorder = TraceRecorder("ralmspec")
        assert await scorer.top1(cache, query, recorder) == await remote.top1(
            cache, query, recorder
        )
    assert await dense_client.term_weights([0, 1]) is None
    assert await bm25_client.term_weights([]) == []
    with pytest.raises(RetrieverRequestError, match="doc_ids"):
        await bm25_client.term_weights([len(TEXTS)])
