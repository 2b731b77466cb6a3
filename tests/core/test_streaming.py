"""Only final (verified) tokens are streamed: every delta is a prefix of the baseline."""

from __future__ import annotations

import asyncio

import pytest

from ralmspec_vllm.core.config import SpeculationConfig

from .fakes import FakeLM, ScriptedRetriever
from .world import LONG_QUESTION, baseline_and_freeze, describe, forced, make_engine, matrix


@pytest.mark.parametrize("config", list(matrix((1, 3, 8))), ids=describe)
async def test_stream_never_emits_tokens_that_get_rolled_back(config: SpeculationConfig) -> None:
    retriever = ScriptedRetriever(forced(lambda s: s % 3 == 2), latency_s=0.0005)
    engine, _ = make_engine(retriever, FakeLM(eos_probability=0.01, latency_s=0.0005))
    baseline = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    streamed: list[int] = []
    deltas = 0
    async for delta in engine.stream(LONG_QUESTION, "ralmspec", speculation=config):
        if delta.result is not None:
            assert delta.result.token_ids == baseline.token_ids
            break
        assert delta.offset == len(streamed) and delta.token_ids
        streamed += delta.token_ids
        assert tuple(streamed) == baseline.token_ids[: len(streamed)]
        deltas += 1
    assert tuple(streamed) == baseline.token_ids
    assert deltas > 1


async def test_baseline_streams_every_step_and_closing_cancels() -> None:
    retriever = ScriptedRetriever()
    lm = FakeLM(latency_s=0.001)
    engine, _ = make_engine(retriever, lm)
    offsets = [d.offset async for d in engine.stream(LONG_QUESTION, "baseline")]
    assert offsets == [*range(0, 128, 4), 128]

    calls = len(lm.calls)
    stream = engine.stream(LONG_QUESTION, "ralmspec")
    first = await anext(stream)
    assert first.offset == 0
    await stream.aclose()  # cancels the request
    await asyncio.sleep(0.02)
    assert len(lm.calls) - calls < 10
