"""Many concurrent requests give the same outputs as one at a time (also when batched)."""

from __future__ import annotations

import pytest

from ralmspec_vllm.core.batching import BatchingRetriever
from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine

from .fakes import FakeLM, FakeTokenizer, ScriptedRetriever

QUESTIONS = [f"question {i} about topic {i % 3} " + "filler " * (i * 5) for i in range(8)]
CONFIG = RaLMConfig(max_new_tokens=40)


@pytest.mark.parametrize("preset", ["B", "PSA", "A", "PS"])
async def test_concurrent_batched_equals_sequential(preset: str) -> None:
    inner = ScriptedRetriever(latency_s=0.002)
    tok = FakeTokenizer()
    sequential = RaLMEngine(FakeLM(eos_probability=0.01), tok, inner, CONFIG)
    expected = [await sequential.generate(q, "baseline") for q in QUESTIONS]

    batching = BatchingRetriever(inner, window_s=0.002)
    lm = FakeLM(eos_probability=0.01, latency_s=0.001)
    engine = RaLMEngine(lm, tok, batching, CONFIG, SpeculationConfig.preset(preset))
    for mode in ("baseline", "ralmspec"):
        results = await engine.generate_many(QUESTIONS, mode)  # type: ignore[arg-type]
        for want, got in zip(expected, results, strict=True):
            assert got.token_ids == want.token_ids, (mode, got.question)
            assert got.trace.step_doc_ids == want.trace.step_doc_ids
        assert len({r.request_id for r in results}) == len(QUESTIONS)
    assert max(record.num_callers for record in batching.stats) > 1  # really merged
    oracle = await engine.generate_many(
        QUESTIONS, "oracle", oracle_doc_ids=[r.trace.step_doc_ids for r in expected]
    )
    assert [r.token_ids for r in oracle] == [r.token_ids for r in expected]


async def test_concurrency_limit() -> None:
    inner = ScriptedRetriever()
    engine = RaLMEngine(FakeLM(), FakeTokenizer(), inner, CONFIG)
    results = await engine.generate_many(QUESTIONS[:3], "ralmspec", max_concurrency=1)
    assert [r.question for r in results] == QUESTIONS[:3]
    with pytest.raises(ValueError, match="max_concurrency"):
        await engine.generate_many(QUESTIONS, max_concurrency=0)
    with pytest.raises(ValueError, match="one sequence per question"):
        await engine.generate_many(QUESTIONS, "oracle", oracle_doc_ids=[[0]])
