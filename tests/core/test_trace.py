"""Trace accounting: spans, discarded tokens, hits/misses, strides, cached tokens."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest

from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.runner import RaLMResult
from ralmspec_vllm.core.trace import TraceRecorder

from .fakes import FakeLM, ScriptedRetriever
from .world import LONG_QUESTION, SHORT_QUESTION, baseline_and_freeze, forced, make_engine


def assert_spans_cover(result: RaLMResult, stride: int) -> None:
    spans = result.trace.spans
    assert spans[0].start == 0 and spans[-1].end == len(result.token_ids)
    for prev, nxt in itertools.pairwise(spans):
        assert prev.end == nxt.start and prev.end - prev.start == stride
    assert 0 < spans[-1].end - spans[-1].start <= stride


CONFIGS = [
    SpeculationConfig(speculation_stride=3),
    SpeculationConfig(speculation_stride=8, prefetch_k=20),
    SpeculationConfig(speculation_stride=2, async_verification=True),
    SpeculationConfig.preset("PSA"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.label)
async def test_discarded_tokens_are_exactly_the_generated_and_thrown_away(
    config: SpeculationConfig,
) -> None:
    retriever = ScriptedRetriever(forced(lambda s: s % 4 == 2), latency_s=0.001)
    engine, _ = make_engine(retriever, config=RaLMConfig(max_new_tokens=50))
    baseline = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    lm = FakeLM(latency_s=0.003)
    engine.lm = lm
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=config)
    trace = result.trace
    assert result.token_ids == baseline.token_ids
    generated = sum(len(call.output) for call in lm.calls)  # completed calls only
    assert generated == len(result.token_ids) + trace.tokens_discarded
    assert trace.tokens_discarded > 0
    assert trace.lm_calls == len(lm.calls)  # completed calls; aborted ones in lm_aborts
    assert trace.rollbacks == trace.speculation_misses
    assert trace.rollbacks == sum(v.mismatch_step is not None for v in trace.verifications)
    assert trace.speculation_hits == sum(v.matched for v in trace.verifications)
    assert len(trace.strides) == len(trace.verifications)
    assert all(v.num_steps <= v.stride for v in trace.verifications)
    assert_spans_cover(result, 4)
    summary = trace.summary()
    assert summary["rollbacks"] == trace.rollbacks and summary["steps"] == len(trace.spans)
    assert json.loads(json.dumps(trace.to_dict()))["spans"][0]["start"] == 0
    assert trace.num_prompt_tokens == sum(len(c.prompt) for c in lm.calls)
    assert trace.num_cached_tokens == sum(c.num_cached_tokens for c in lm.calls)


async def test_baseline_trace_and_prefix_reuse() -> None:
    retriever = ScriptedRetriever(lambda step: 0)  # same document throughout
    engine, lm = make_engine(retriever, config=RaLMConfig(max_new_tokens=30))
    result = await engine.generate(SHORT_QUESTION, "baseline")
    trace = result.trace
    assert len(result.token_ids) == 30 and not result.finished
    assert_spans_cover(result, 4)
    assert trace.num_calls("search") == 8 and trace.num_calls("documents") == 1
    assert all(c.k == 1 for c in trace.retrieval_calls if c.kind == "search")
    assert trace.verifications == () and trace.tokens_discarded == 0
    # same document each step: each prompt extends the last one, so its prefix is cached
    for prev, call in itertools.pairwise(lm.calls):
        assert call.num_cached_tokens >= len(prev.prompt) - lm.block_size
    assert trace.num_cached_tokens > 0
    assert trace.call_counts() == {"search": 8, "documents": 1}


async def test_first_retrieval_is_real_and_prefetches() -> None:
    retriever = ScriptedRetriever(forced({1}))
    engine, _ = make_engine(retriever, config=RaLMConfig(max_new_tokens=12))
    await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    result = await engine.generate(
        SHORT_QUESTION, "ralmspec", speculation=SpeculationConfig(prefetch_k=20)
    )
    calls = [c for c in result.trace.retrieval_calls if c.kind == "search"]
    assert (calls[0].purpose, calls[0].k, calls[0].num_queries) == ("retrieve", 20, 1)
    assert all(c.k == 20 for c in calls)
    assert calls[1].purpose == "verify"
    assert result.trace.speculation_misses == 1


async def test_empty_question_answer_and_eos_at_first_token() -> None:
    retriever = ScriptedRetriever()
    engine, _ = make_engine(retriever, FakeLM(eos_at_length=0))
    for mode in ("baseline", "ralmspec"):
        result = await engine.generate(SHORT_QUESTION, mode)  # type: ignore[arg-type]
        assert result.finished and len(result.token_ids) == 1 and result.text == ""
        assert result.trace.step_doc_ids == (result.trace.spans[0].doc_id,)


async def test_mode_validation() -> None:
    engine, _ = make_engine(ScriptedRetriever())
    with pytest.raises(ValueError, match="mode"):
        await engine.generate("q", "fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="oracle_doc_ids"):
        await engine.generate("q", "oracle")
    with pytest.raises(ValueError, match="oracle needs a document"):
        await engine.generate("q", "oracle", oracle_doc_ids=[0])


async def test_per_request_config() -> None:
    engine, _ = make_engine(ScriptedRetriever())
    result = await engine.generate(
        SHORT_QUESTION, "ralmspec", config=RaLMConfig(retrieval_stride=3, max_new_tokens=10)
    )
    assert len(result.token_ids) == 10
    assert [s.end - s.start for s in result.trace.spans] == [3, 3, 3, 1]
    with pytest.raises(ValueError, match="query_window"):
        await engine.generate(SHORT_QUESTION, config=RaLMConfig(query_window=5))


async def test_lm_returning_nothing_is_an_error_not_a_hang() -> None:
    class Stuck(FakeLM):  # fault injection: an LM that silently produces nothing
        async def generate(self, prompt_token_ids, max_tokens, request_id, **kw):  # type: ignore[no-untyped-def]
            gen = await super().generate(prompt_token_ids, max_tokens, request_id, **kw)
            return replace(gen, token_ids=())

    engine, _ = make_engine(ScriptedRetriever(), Stuck())
    for mode in ("baseline", "ralmspec"):
        with pytest.raises(RuntimeError, match="no tokens"):
            await engine.generate(SHORT_QUESTION, mode)  # type: ignore[arg-type]


def test_lm_waits_split_the_time_no_lm_call_was_in_flight() -> None:
    recorder = TraceRecorder("x")
    recorder.lm_spans += [(10.0, 11.0), (12.0, 13.0), (10.5, 10.8)]  # nested: one busy span
    recorder.guess_spans += [(11.0, 11.5)]
    recorder.call_spans += [(11.2, 12.5), (14.5, 15.0)]  # the last ends past the window
    guess, retrieval, other = recorder.lm_waits(10.0, 4.7)  # [10, 14.7]
    # idle: [11, 12] and [13, 14.7]; [11, 11.5] guessing, [11.5, 12] and [14.5, 14.7] calling
    assert guess == pytest.approx(0.5)
    assert retrieval == pytest.approx(0.7)
    assert other == pytest.approx(1.5)
    trace = recorder.freeze((), 4.7, started=10.0)
    assert (trace.lm_wait_guess_s, trace.lm_wait_retrieval_s) == (guess, retrieval)
    assert trace.summary()["lm_wait_other_s"] == other
    assert recorder.freeze((), 4.7).lm_wait_other_s == 0.0  # no start: not computed


async def test_lm_waits_say_what_the_lm_waited_for() -> None:
    """The baseline waits on its searches, the oracle on nothing, RaLMSpec on its guesses
    (a scripted retriever's ``score``) and on what a miss leaves exposed; with one LM call at
    a time, the waits and the LM's time add up to the wall time."""
    retriever = ScriptedRetriever(forced({3}), latency_s=0.02)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.01), RaLMConfig(max_new_tokens=24))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    oracle = await engine.generate(
        SHORT_QUESTION, "oracle", oracle_doc_ids=baseline.trace.step_doc_ids
    )
    spec = await engine.generate(
        SHORT_QUESTION, "ralmspec", speculation=SpeculationConfig(speculation_stride=2)
    )
    assert spec.token_ids == baseline.token_ids == oracle.token_ids
    steps = len(baseline.trace.spans)
    base = baseline.trace
    assert base.lm_wait_guess_s == 0.0
    assert base.lm_wait_retrieval_s >= 0.9 * steps * 0.02  # every search before its step
    assert oracle.trace.lm_wait_guess_s == oracle.trace.lm_wait_retrieval_s == 0.0
    assert oracle.trace.lm_wait_other_s < 0.5 * steps * 0.01
    assert spec.trace.lm_wait_guess_s > 0.0  # each guess scores the cache first
    for trace in (base, oracle.trace, spec.trace):
        waited = trace.lm_wait_guess_s + trace.lm_wait_retrieval_s + trace.lm_wait_other_s
        if trace is not spec.trace:  # one LM call at a time: LM time + waits = wall
            assert waited + trace.lm_time_s == pytest.approx(trace.wall_time_s, abs=2e-3)
        assert waited <= trace.wall_time_s
