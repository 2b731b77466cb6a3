"""Randomised identity check over the whole configuration space (seeded, deterministic).

Each case draws a RaLM shape (stride, window, document cap, length), a speculation setup
(stride or OS3, prefetch, async, tiny or large cache, eviction rule), a retrieval script
(which steps must miss) and an EOS rate, then requires RaLMSpec's answer, documents and
streamed tokens to equal the baseline's.
"""

from __future__ import annotations

import random

import pytest

from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig

from .fakes import FakeLM, ScriptedRetriever
from .world import LONG_QUESTION, SHORT_QUESTION, baseline_and_freeze, forced, make_engine


def draw(rng: random.Random) -> tuple[RaLMConfig, SpeculationConfig, set[int], float, str]:
    ralm = RaLMConfig(
        retrieval_stride=rng.randint(1, 6),
        query_window=rng.randint(1, 40),
        max_doc_tokens=rng.randint(1, 50),
        max_new_tokens=rng.randint(1, 60),
    )
    spec = SpeculationConfig(
        speculation_stride=rng.choice(["auto", 1, 2, 3, 5, 8]),
        max_speculation_stride=rng.randint(1, 8),
        prefetch_k=rng.choice([1, 1, 2, 5, 20]),
        async_verification=rng.random() < 0.5,
        cache_capacity=rng.choice([1, 2, 3, 8, 512]),
        eviction=rng.choice(["lru", "fifo"]),
    )
    misses = {s for s in range(1, 61) if rng.random() < rng.choice([0.0, 0.1, 0.5, 1.0])}
    eos = rng.choice([0.0, 0.0, 0.02, 0.1])
    question = rng.choice([SHORT_QUESTION, LONG_QUESTION, "x"])
    return ralm, spec, misses, eos, question


async def check_case(rng: random.Random, timed: bool) -> None:
    ralm, spec, misses, eos, question = draw(rng)
    delays = [0.0, 0.0005, 0.002] if timed else [0.0]
    retriever = ScriptedRetriever(
        forced(misses), doc_length=rng.randint(1, 60), latency_s=rng.choice(delays)
    )
    lm = FakeLM(eos_probability=eos, latency_s=rng.choice(delays))
    engine, _ = make_engine(retriever, lm, ralm)
    baseline = await baseline_and_freeze(engine, retriever, question)
    streamed: list[int] = []
    result = await engine.generate(
        question,
        "ralmspec",
        speculation=spec,
        on_final=lambda _offset, tokens: streamed.extend(tokens),
    )
    case = f"{ralm} {spec} misses={sorted(misses)[:5]} eos={eos}"
    assert result.token_ids == baseline.token_ids, case
    assert result.trace.step_doc_ids == baseline.trace.step_doc_ids, case
    assert tuple(streamed) == baseline.token_ids, case
    assert result.trace.speculation_misses == result.trace.rollbacks


@pytest.mark.parametrize("seed", range(150))
async def test_random_configurations_are_identical(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(4):
        await check_case(rng, timed=False)


@pytest.mark.parametrize("seed", range(1000, 1015))
async def test_random_configurations_with_real_concurrency(seed: int) -> None:
    """Millisecond latencies: async verification really races the overlapped step."""
    await check_case(random.Random(seed), timed=True)
