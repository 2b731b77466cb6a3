"""Held speculation: while ``speculation_held`` answers True a speculating request runs plain
retrieval steps, and the answer stays the baseline's token for token, in every overlap mode,
whenever the hold starts and ends (the server holds while its retriever is busy)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ralmspec_vllm.core.config import SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.core.trace import RequestTrace

from .fakes import FakeLM, ScriptedRetriever
from .world import LONG_QUESTION, OVERLAPS, baseline_and_freeze, forced, make_engine

SCRIPTS = {
    "natural": None,
    "miss-step-3": forced({3}),
    "miss-every-third": forced(lambda s: s % 3 == 1),
}


def hold_by_lm_calls(lm: FakeLM, held: Callable[[int], bool]) -> Callable[[], bool]:
    """A hold that answers ``held(LM calls made so far)``: chosen points of the run."""
    return lambda: held(len(lm.calls))


HOLDS: dict[str, Callable[[int], bool]] = {
    "always": lambda calls: True,
    "from-call-4": lambda calls: calls >= 4,  # lifts never: speculated steps drain, then plain
    "calls-3-to-8": lambda calls: 3 <= calls < 8,  # starts and lifts mid-answer
    "alternating": lambda calls: calls % 2 == 1,  # flips at every step
}


def configs() -> list[SpeculationConfig]:
    out = []
    for asynchronous, depth, early in OVERLAPS:
        for adaptive in (False, True):
            out.append(
                SpeculationConfig(
                    speculation_stride="auto" if adaptive else 3,
                    max_speculation_stride=4,
                    prefetch_k=20,
                    async_verification=asynchronous,
                    overlap_depth=depth,
                    early_verification=early,
                )
            )
    return out


async def engine_and_baseline(script_name: str) -> tuple[RaLMEngine, FakeLM, tuple[int, ...]]:
    retriever = ScriptedRetriever(SCRIPTS[script_name])
    engine, lm = make_engine(retriever, FakeLM())
    baseline = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    return engine, lm, baseline.token_ids


@pytest.mark.parametrize("hold", sorted(HOLDS))
@pytest.mark.parametrize("script_name", sorted(SCRIPTS))
async def test_held_speculation_keeps_the_baseline_answer(script_name: str, hold: str) -> None:
    engine, lm, want = await engine_and_baseline(script_name)
    for spec in configs():
        lm.calls.clear()
        engine.speculation_held = hold_by_lm_calls(lm, HOLDS[hold])
        result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
        label = f"{hold} {spec.label} depth={spec.overlap_depth} early={spec.early_verification}"
        assert result.token_ids == want, label
        trace = result.trace
        assert trace.held_steps > 0, label
        assert trace.held_steps <= trace.plain_steps, label
        # every step is the first retrieval, a verified speculation or a plain step
        steps = 1 + trace.speculation_hits + trace.speculation_misses + trace.plain_steps
        assert steps >= len(trace.spans), label


async def test_a_hold_from_the_start_speculates_nothing() -> None:
    """Held throughout: every step after the first retrieval is plain; the retriever sees the
    baseline's searches, one query per step, and nothing is verified or rolled back."""
    engine, _, want = await engine_and_baseline("miss-every-third")
    for spec in configs():
        engine.speculation_held = lambda: True
        result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
        trace = result.trace
        assert result.token_ids == want
        assert not trace.verifications and trace.rollbacks == trace.tokens_discarded == 0
        assert trace.held_steps == trace.plain_steps == len(trace.spans) - 1
        searched = [c.num_queries for c in trace.retrieval_calls if c.kind == "search"]
        assert searched == [1] * len(trace.spans)
        assert set(trace.call_counts()) == {"search"}  # no cache scoring


async def test_a_held_step_asks_the_retriever_what_the_baseline_asks() -> None:
    """A held step's search is the baseline's: one query, the exact top-1, no prefetch, and
    no document vectors or cache scoring, whatever the request's prefetch settings: the hold
    is on because the retriever has no room for more. Only the first retrieval (before the
    hold is asked) seeds the cache with the request's own search."""
    retriever = ScriptedRetriever(SCRIPTS["miss-every-third"])
    engine, _ = make_engine(retriever, FakeLM())
    want = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    for prefetch_k, exact_k in ((20, 0), (256, 20)):
        spec = SpeculationConfig.preset("PSA", prefetch_k=prefetch_k, exact_k=exact_k)
        retriever.search_calls.clear()
        retriever.prefetches.clear()
        engine.speculation_held = lambda: True
        result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
        assert result.token_ids == want.token_ids
        steps = len(result.trace.spans)
        assert retriever.search_calls == [(1, spec.search_k)] + [(1, 1)] * (steps - 1)
        assert retriever.prefetches == [spec.search_prefetch] + [0] * (steps - 1)
        assert set(result.trace.call_counts()) == {"search"}


async def run_held(
    stride: int, asynchronous: bool, depth: int | str, hold: str, early: bool = False
) -> RequestTrace:
    """One fixed-stride run on the natural script under ``HOLDS[hold]``, checked against
    the baseline token for token; its trace."""
    engine, lm, want = await engine_and_baseline("natural")
    spec = SpeculationConfig(
        speculation_stride=stride,
        async_verification=asynchronous,
        overlap_depth=depth,  # type: ignore[arg-type]
        early_verification=early,
    )
    lm.calls.clear()
    engine.speculation_held = hold_by_lm_calls(lm, HOLDS[hold])
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
    assert result.token_ids == want
    return result.trace


@pytest.mark.parametrize(("asynchronous", "depth", "early"), OVERLAPS)
async def test_speculation_resumes_when_the_hold_lifts(
    asynchronous: bool, depth: int | str, early: bool
) -> None:
    """Held for LM calls 3..7 only: steps are speculated before it and again after it."""
    trace = await run_held(3, asynchronous, depth, "calls-3-to-8", early)
    assert 0 < trace.held_steps < len(trace.spans) - 1
    # Before the hold at most the steps of LM calls 2-4 were speculated (call 1 is the
    # first retrieval's, and a step in flight finishes); the rest came after it lifted.
    assert trace.speculation_hits + trace.speculation_misses > 3
    assert len(trace.spans) - 1 - trace.plain_steps > 3


async def test_no_hold_is_the_default() -> None:
    engine, _, want = await engine_and_baseline("natural")
    assert engine.speculation_held is None
    result = await engine.generate(LONG_QUESTION, "ralmspec")
    assert result.token_ids == want and result.trace.held_steps == 0
    assert result.trace.speculation_hits + result.trace.speculation_misses > 0


@pytest.mark.parametrize(("asynchronous", "depth"), [(False, 1), (True, "stride")])
async def test_a_hold_mid_round_verifies_what_was_speculated(
    asynchronous: bool, depth: int | str
) -> None:
    """Rounds of 8: a hold that starts at LM call 4 ends the round there (3 speculated steps
    are verified at once) instead of speculating 5 more that the retriever must verify."""
    trace = await run_held(8, asynchronous, depth, "from-call-4")
    assert [v.num_steps for v in trace.verifications] == [3]
    assert trace.held_steps == trace.plain_steps > 0
