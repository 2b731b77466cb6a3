"""Query embedders: per-call and batched across concurrent requests."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from ralmspec_vllm.core.encoding import AsyncEmbedder, BatchingEmbedder, ThreadEmbedder
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever

from .fakes import FakeLM, FakeTokenizer, SyntheticDenseRetriever

QUERIES = [f"query {i} about things" for i in range(6)]


async def test_concurrent_embeds_share_one_encoder_call() -> None:
    kb = SyntheticDenseRetriever()
    calls: list[int] = []

    def encoder(texts: Sequence[str]) -> np.ndarray:
        calls.append(len(texts))
        return kb.encode(texts)

    embedder = BatchingEmbedder(encoder, window_s=0.05)
    rows = await asyncio.gather(*(embedder.embed(q) for q in QUERIES))
    assert calls == [6] and embedder.batch_sizes == [6]
    for q, row in zip(QUERIES, rows, strict=True):
        assert np.array_equal(row, kb.encode([q])[0])


async def test_full_batch_is_sent_at_once_and_errors_reach_callers() -> None:
    kb = SyntheticDenseRetriever()
    embedder = BatchingEmbedder(kb.encode, window_s=60.0, max_batch=3)
    await asyncio.wait_for(asyncio.gather(*(embedder.embed(q) for q in QUERIES)), 5.0)
    assert embedder.batch_sizes == [3, 3]

    def broken(texts: Sequence[str]) -> np.ndarray:
        return np.zeros((len(texts) + 1, 4), dtype=np.float32)

    with pytest.raises(ValueError, match="shape"):
        await BatchingEmbedder(broken, window_s=0.0).embed("q")
    with pytest.raises(ValueError, match="shape"):
        await ThreadEmbedder(broken, in_thread=False).embed("q")
    with pytest.raises(ValueError, match="window_s"):
        BatchingEmbedder(kb.encode, window_s=-1.0)


async def test_engine_with_batched_embedding_is_identical() -> None:
    dense = SyntheticDenseRetriever()
    retriever = InProcessAsyncRetriever(dense)
    questions = [f"question {i} " + "word " * i for i in range(6)]
    plain = RaLMEngine(FakeLM(), FakeTokenizer(), retriever, encoder=dense.encode)
    expected = await plain.generate_many(questions, "baseline")
    engine = RaLMEngine(
        FakeLM(), FakeTokenizer(), retriever, encoder=dense.encode, encode_batch_window_s=0.002
    )
    results = await engine.generate_many(questions, "ralmspec")
    assert [r.token_ids for r in results] == [r.token_ids for r in expected]
    embedder = engine.scorer.embedder  # type: ignore[attr-defined]
    assert max(embedder.batch_sizes) > 1


async def test_async_embedder_engine_is_identical() -> None:
    dense = SyntheticDenseRetriever()
    retriever = InProcessAsyncRetriever(dense)

    async def remote_encode(texts: Sequence[str]) -> np.ndarray:  # like client.encode
        await asyncio.sleep(0)
        return dense.encode(texts)

    engine = RaLMEngine(FakeLM(), FakeTokenizer(), retriever, embedder=AsyncEmbedder(remote_encode))
    baseline = await engine.generate(QUERIES[0], "baseline")
    result = await engine.generate(QUERIES[0], "ralmspec")
    assert result.token_ids == baseline.token_ids
    assert result.trace.speculation_hits > 0 and result.trace.num_calls("score") == 0
    with pytest.raises(ValueError, match="one of encoder, embedder and scorer"):
        both = ThreadEmbedder(dense.encode)
        RaLMEngine(FakeLM(), FakeTokenizer(), retriever, encoder=dense.encode, embedder=both)
