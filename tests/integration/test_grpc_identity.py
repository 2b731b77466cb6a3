"""The core over the real gRPC retriever service on loopback (no vLLM: the fake LM).

The same questions answered with an in-process retriever and through ``RetrieverClient``
(plain and wrapped in ``BatchingRetriever``, many requests at once) give identical answers
in every mode; dense speculation can embed with the server's own encoder (``Encode`` RPC).
"""

from __future__ import annotations

import pytest
from core.fakes import FakeLM, FakeTokenizer
from core.test_real_retrievers import BagOfWords, bm25_retriever, flat_retriever

from ralmspec_vllm.core.batching import BatchingRetriever
from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.encoding import AsyncEmbedder
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever, Retriever
from ralmspec_vllm.retrieval.client import RetrieverClient
from ralmspec_vllm.retrieval.server import start_server
from ralmspec_vllm.service import local_cache_scoring

CONFIG = RaLMConfig(max_new_tokens=40)
QUESTIONS = [f"question {i} about g{i} g{2 * i} and " + "more words " * i for i in range(8)]


@pytest.mark.parametrize("name", ["flat", "bm25", "bm25-term-weights"])
async def test_grpc_retriever_gives_identical_answers(name: str) -> None:
    """bm25-term-weights: the cache ranked here from term weights fetched by
    ``GetTermWeights``, with no ``Score`` call."""
    retriever: Retriever = flat_retriever() if name == "flat" else bm25_retriever()  # type: ignore[assignment]
    local = InProcessAsyncRetriever(retriever)
    encoder = BagOfWords().encode if name == "flat" else None
    reference = RaLMEngine(FakeLM(), FakeTokenizer(), local, CONFIG, encoder=encoder)
    expected = [await reference.generate(q, "baseline") for q in QUESTIONS]

    server = await start_server(retriever, "127.0.0.1", 0)
    client = RetrieverClient(server.target)
    try:
        embedder = AsyncEmbedder(client.encode) if name == "flat" else None
        scoring = await local_cache_scoring(client, "auto")
        scorer = scoring.scorer if name == "bm25-term-weights" else None
        for remote in (client, BatchingRetriever(client, window_s=0.002)):
            engine = RaLMEngine(
                FakeLM(latency_s=0.001),
                FakeTokenizer(),
                remote,
                CONFIG,
                SpeculationConfig.preset("PSA"),
                embedder=embedder,
                scorer=scorer,
            )
            for mode in ("baseline", "ralmspec"):
                results = await engine.generate_many(QUESTIONS, mode)  # type: ignore[arg-type]
                assert [r.token_ids for r in results] == [r.token_ids for r in expected], mode
            spec = await engine.generate_many(
                QUESTIONS, speculation=SpeculationConfig(speculation_stride=3)
            )
            assert [r.token_ids for r in spec] == [r.token_ids for r in expected]
            assert sum(r.trace.speculation_hits for r in spec) > 0
            kinds = {c.kind for r in spec for c in r.trace.retrieval_calls}
            if name == "bm25-term-weights":
                assert "term_weights" in kinds and "score" not in kinds
            elif name == "bm25":
                assert "score" in kinds and "term_weights" not in kinds
    finally:
        await client.close()
        await server.stop(grace=0)
