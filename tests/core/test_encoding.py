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


class _SlowEncode:
    """An async encode (like ``RetrieverClient.encode``) that holds each call until told."""

    def __init__(self) -> None:
        self.kb = SyntheticDenseRetriever()
        self.calls: list[list[str]] = []
        self.release = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return self.kb.encode(texts)


async def test_async_embedder_merges_what_arrives_while_a_call_is_in_flight() -> None:
    """A lone query goes at once; the queries that arrive while it is in flight go
    together in ONE next call (at most ``max_batch``), each getting its own vector."""
    encode = _SlowEncode()
    embedder = AsyncEmbedder(encode, max_batch=4)
    first = asyncio.create_task(embedder.embed(QUERIES[0]))
    await asyncio.sleep(0.01)
    assert encode.calls == [[QUERIES[0]]]  # sent without waiting for company
    rest = [asyncio.create_task(embedder.embed(q)) for q in QUERIES[1:]]
    await asyncio.sleep(0.01)
    assert len(encode.calls) == 1  # still one in flight: the five wait for it
    encode.release.set()
    rows = await asyncio.wait_for(asyncio.gather(first, *rest), 5.0)
    assert encode.calls[1:] == [QUERIES[1:5], QUERIES[5:]] and embedder.batch_sizes == [1, 4, 1]
    for q, row in zip(QUERIES, rows, strict=True):
        assert np.array_equal(row, encode.kb.encode([q])[0])
    assert embedder._sender is None  # idle again: the next query is sent at once


async def test_async_embedder_failures_and_cancellations_reach_only_their_callers() -> None:
    encode = _SlowEncode()
    embedder = AsyncEmbedder(encode)
    lone = asyncio.create_task(embedder.embed("lone"))
    await asyncio.sleep(0.01)
    gone = asyncio.create_task(embedder.embed("a caller that leaves"))
    kept = asyncio.create_task(embedder.embed("a caller that stays"))
    await asyncio.sleep(0.01)
    gone.cancel()  # its client disconnected: the next call leaves it out
    encode.fail = ConnectionError("injected: retriever down")
    encode.release.set()
    for task in (lone, kept):  # the failure reaches every caller of the failed calls
        with pytest.raises(ConnectionError, match="injected"):
            await asyncio.wait_for(task, 5.0)
    assert gone.cancelled() and encode.calls[1] == ["a caller that stays"]
    encode.fail = None  # and the embedder keeps working after a failure
    row = await asyncio.wait_for(embedder.embed("after"), 5.0)
    assert np.array_equal(row, encode.kb.encode(["after"])[0])
    with pytest.raises(ValueError, match="max_batch"):
        AsyncEmbedder(encode, max_batch=0)


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
