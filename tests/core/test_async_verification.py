"""A: verification really runs concurrently with the next speculation step; S adapts."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import numpy as np
import pytest

from ralmspec_vllm.core import stride as os3
from ralmspec_vllm.core.config import SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine, RaLMResult
from ralmspec_vllm.core.stride import MEASURED_MIN_TOKENS

from .fakes import FakeLM, FakeTokenizer, ScriptedRetriever
from .world import SHORT_QUESTION, baseline_and_freeze, forced, make_engine


async def test_next_step_runs_while_verification_is_in_flight() -> None:
    events: list[str] = []
    retriever = ScriptedRetriever(lambda step: 0, latency_s=0.01, events=events)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.002, events=events))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    events.clear()
    config = SpeculationConfig(speculation_stride=2, async_verification=True)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    overlapped = 0
    in_verification = False
    for event in events:
        if event == "search-start 2":
            in_verification = True
        elif event.startswith("search-end"):
            in_verification = False
        elif event.startswith("lm-start") and in_verification:
            overlapped += 1
    assert overlapped >= 3
    trace = result.trace
    # every verification matched: overlapped steps were all kept, no LM work wasted
    assert trace.tokens_discarded == 0 and trace.lm_aborts == 0
    assert trace.lm_calls == len(trace.spans)
    assert all(v.asynchronous for v in trace.verifications[:-1])


def overlap_windows(events: list[str]) -> list[int]:
    """LM steps started during each verification (search of 2+ queries) in ``events``."""
    windows: list[int] = []
    inside = False
    for event in events:
        if event.startswith("search-start") and event != "search-start 1":
            inside = True
            windows.append(0)
        elif event.startswith("search-end"):
            inside = False
        elif event.startswith("lm-start") and inside:
            windows[-1] += 1
    return windows


async def verifier_bound(events: list[str]) -> tuple[RaLMEngine, RaLMResult]:
    """An engine whose verification costs ~10 LM steps (20 ms against 2 ms) and whose
    speculations all hold, and its baseline; ``events`` then logs the next run's LM calls
    and searches."""
    retriever = ScriptedRetriever(lambda step: 0, latency_s=0.02, events=events)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.002, events=events))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    events.clear()
    return engine, baseline


@pytest.mark.parametrize("depth", [1, "stride"])
async def test_speculating_ahead_fills_the_verification_with_the_next_round(
    depth: int | Literal["stride"],
) -> None:
    """A verification costs ~10 LM steps and every speculation holds: the paper's overlap
    runs one step per verification; ahead-of-round overlap generates the next round (4
    steps) while the verification runs, so rounds follow each other without LM time."""
    events: list[str] = []
    engine, baseline = await verifier_bound(events)
    config = SpeculationConfig(speculation_stride=4, async_verification=True, overlap_depth=depth)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.tokens_discarded == 0 and trace.lm_aborts == 0
    assert all(v.num_steps <= v.stride for v in trace.verifications)
    windows = overlap_windows(events)
    if depth == 1:
        assert max(windows) == 1
    else:
        assert max(windows) == 4  # the whole next round, no more
        assert sum(w == 4 for w in windows) >= len(windows) - 2  # bar the last rounds
        # each round after the first starts with its steps already generated
        assert all(v.num_steps == 4 for v in trace.verifications[:-1])


@pytest.mark.parametrize("adaptive", [False, True])
async def test_fill_speculates_up_to_the_largest_stride_and_verifies_it_all(
    adaptive: bool,
) -> None:
    """A verification costs ~10 LM steps and every speculation holds: "fill" keeps the LM
    busy up to ``max_speculation_stride`` (8) steps ahead, and the next round verifies all 8
    even where the planned stride is 2."""
    events: list[str] = []
    engine, baseline = await verifier_bound(events)
    config = SpeculationConfig(
        speculation_stride="auto" if adaptive else 2,
        max_speculation_stride=8,
        async_verification=True,
        overlap_depth="fill",
    )
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.tokens_discarded == 0 and trace.lm_aborts == 0
    assert max(overlap_windows(events)) == 8  # never more than the largest stride ahead
    sizes = [v.num_steps for v in trace.verifications]
    assert all(v.num_steps <= v.stride <= 8 for v in trace.verifications)
    assert max(sizes) == 8
    assert sum(n == 8 for n in sizes) >= len(sizes) - 3  # bar the first and last rounds
    if not adaptive:
        assert sizes[0] <= 2  # a round from nothing is the fixed stride


@pytest.mark.parametrize("miss", [1, 4, 9])
async def test_fill_rolls_back_everything_after_a_miss(miss: int) -> None:
    retriever = ScriptedRetriever(forced({miss, miss + 7}), latency_s=0.02)
    lm = FakeLM(latency_s=0.002)
    engine, _ = make_engine(retriever, lm)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    lm.calls.clear()
    config = SpeculationConfig(
        speculation_stride=2, max_speculation_stride=8, async_verification=True,
        overlap_depth="fill",
    )  # fmt: skip
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.rollbacks == trace.speculation_misses == 2
    generated = sum(len(call.output) for call in lm.calls)
    assert generated == len(result.token_ids) + trace.tokens_discarded


async def test_fill_restarts_after_a_rollback_with_a_short_round() -> None:
    """After a miss nothing is pending: the next round starts after b(1) / 3a steps (~3
    here: a 20 ms verification, 2 ms LM steps), not after the planned stride (7 here)."""
    retriever = ScriptedRetriever(forced({20}), latency_s=0.02)
    lm = FakeLM(latency_s=0.002)
    engine, _ = make_engine(retriever, lm)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(
        speculation_stride="auto", max_speculation_stride=8, async_verification=True,
        overlap_depth="fill",
    )  # fmt: skip
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    verifications = result.trace.verifications
    (bad,) = [i for i, v in enumerate(verifications) if v.mismatch_step is not None]
    assert bad + 1 < len(verifications)
    assert 1 <= verifications[bad + 1].num_steps <= 4


async def test_mismatch_discards_every_step_speculated_ahead() -> None:
    retriever = ScriptedRetriever(forced({6}), latency_s=0.02)
    lm = FakeLM(latency_s=0.002)
    engine, _ = make_engine(retriever, lm)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    lm.calls.clear()
    config = SpeculationConfig(
        speculation_stride=4, async_verification=True, overlap_depth="stride"
    )
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    (bad,) = [v for v in trace.verifications if v.mismatch_step is not None]
    assert trace.rollbacks == 1
    # the round's steps from the mismatch on, and the next round generated ahead
    assert trace.tokens_discarded >= 4 * (bad.num_steps - bad.mismatch_step + 1)
    generated = sum(len(call.output) for call in lm.calls)
    assert generated == len(result.token_ids) + trace.tokens_discarded


@pytest.mark.parametrize("depth", [1, "stride"])
async def test_mismatch_aborts_the_in_flight_step(depth: int | Literal["stride"]) -> None:
    retriever = ScriptedRetriever(forced(lambda s: s % 3 == 2), latency_s=0.001)
    lm = FakeLM(latency_s=0.02)
    engine, _ = make_engine(retriever, lm)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(speculation_stride=2, async_verification=True, overlap_depth=depth)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    assert result.trace.lm_aborts >= 1  # (every mismatch round, unless the loop stalls)
    assert set(lm.cancelled) == set(lm.aborted)  # cancelled mid-flight and aborted by id
    assert len(lm.aborted) == result.trace.lm_aborts


async def test_mismatch_after_overlap_finished_discards_its_tokens() -> None:
    retriever = ScriptedRetriever(forced({2}), latency_s=0.02)
    engine, _ = make_engine(retriever)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(speculation_stride=2, async_verification=True)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.rollbacks == 1 and trace.lm_aborts == 0
    assert trace.tokens_discarded == 8  # step 2 (wrong doc) + the overlapped step 3
    assert trace.verifications[0].mismatch_step == 1


@pytest.mark.parametrize("asynchronous", [False, True])
async def test_scheduler_grows_stride_when_retrieval_is_slow(asynchronous: bool) -> None:
    retriever = ScriptedRetriever(forced(lambda s: s % 7 == 3), latency_s=0.01)
    engine, _ = make_engine(retriever)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(
        speculation_stride="auto", max_speculation_stride=6, async_verification=asynchronous
    )
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    if asynchronous:  # overlap makes stride 1 worth speculating while OS3 measures
        assert trace.strides[0] == 1 and trace.plain_steps == 0
    else:  # stride 1 without overlap runs as a plain (measuring) step instead
        assert trace.plain_steps >= 1 and trace.strides[0] > 1
    assert max(trace.strides) > 2
    assert len(trace.strides) == len(trace.verifications)


async def test_sync_scheduler_retrieves_plainly_when_the_lm_dominates() -> None:
    """LM steps far slower than searches: OS3 stays at stride 1, which without overlap it
    runs as plain retrieval steps: no speculation, no rollback, nothing discarded. Stride 2
    would pay only for a search above a (1 - g) / g, 20-27 ms here (g 0.6-0.67): with a
    10 ms step, one 0.5 ms sleep that a loaded CI machine woke 7 ms late tipped it (the CI
    run of cccdc8b)."""
    retriever = ScriptedRetriever(forced(lambda s: s % 3 == 2), latency_s=0.0005)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.04))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(speculation_stride="auto")
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.plain_steps == len(trace.spans) - 1  # every step after the first
    assert trace.strides == () and trace.rollbacks == 0 and trace.tokens_discarded == 0
    assert trace.step_doc_ids == baseline.trace.step_doc_ids


async def test_async_scheduler_retrieves_plainly_when_misses_cost_more_than_overlap_saves() -> None:
    """Overlap hides a 0.5 ms search behind a 10 ms step, but every other speculation is
    wrong and each miss regenerates a step: OS3 switches to plain steps once it has measured
    that, and keeps identity."""
    retriever = ScriptedRetriever(forced(lambda s: s % 2 == 1), latency_s=0.0005)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.01))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(speculation_stride="auto", async_verification=True)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.plain_steps > len(trace.spans) // 2
    assert trace.rollbacks <= 3  # only while OS3 was still measuring


def max_searches_in_flight(events: list[str]) -> int:
    in_flight = peak = 0
    for event in events:
        if event.startswith("search-start"):
            in_flight += 1
            peak = max(peak, in_flight)
        elif event.startswith("search-end"):
            in_flight -= 1
    return peak


@pytest.mark.parametrize("depth", [4, 1])
async def test_pipeline_verifies_each_step_alone_without_waiting_for_the_last(depth: int) -> None:
    """A verification costs ~10 LM steps and every speculation holds: each step's search
    starts as soon as the step exists, so up to the depth (the fixed stride, 4; or 1: one
    step at a time) searches are in flight at once, each of one query, and with depth 4 the
    LM never waits for a round."""
    events: list[str] = []
    engine, baseline = await verifier_bound(events)
    config = SpeculationConfig(
        speculation_stride=depth, async_verification=True, overlap_depth="pipeline"
    )
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert max_searches_in_flight(events) == depth
    assert {e for e in events if e.startswith("search-start")} == {"search-start 1"}
    assert all(v.num_steps == 1 and v.matched == 1 for v in trace.verifications)
    assert len(trace.verifications) == trace.speculation_hits == len(trace.spans) - 1
    assert trace.tokens_discarded == 0 and trace.lm_aborts == 0 and trace.rollbacks == 0


async def pipeline_missing_step_3(
    lm: FakeLM, search_s: float, events: list[str] | None = None
) -> RaLMResult:
    """A 16-deep pipelined run whose step 3 misses, checked token for token against the
    baseline; ``events`` then holds the run's LM calls and searches only."""
    retriever = ScriptedRetriever(forced({3}), latency_s=search_s, events=events)
    engine, _ = make_engine(retriever, lm)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    if events is not None:
        events.clear()
    config = SpeculationConfig(
        speculation_stride=16, async_verification=True, overlap_depth="pipeline"
    )
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    return result


async def test_pipeline_mismatch_cancels_the_searches_behind_it() -> None:
    """Step 3 misses while the steps after it are being verified (a search costs ~10 LM
    steps): their searches are cancelled (started, never answered), and the rollback
    regenerates step 3 with the true document; the output is the baseline's."""
    events: list[str] = []
    lm = FakeLM(latency_s=0.002, events=events)
    result = await pipeline_missing_step_3(lm, search_s=0.02, events=events)
    trace = result.trace
    assert trace.rollbacks == 1 and trace.speculation_misses == 1
    started = sum(e.startswith("search-start") for e in events)
    ended = sum(e.startswith("search-end") for e in events)
    assert started - ended >= 2  # the searches behind the miss were cancelled
    assert trace.tokens_discarded >= 8  # the wrong step and at least one after it
    assert [v.mismatch_step for v in trace.verifications].count(0) == 1
    assert set(lm.cancelled) == set(lm.aborted)


async def test_pipeline_mismatch_aborts_the_step_in_flight() -> None:
    """An LM step costs 5 searches: step 3's search answers (a miss) 10 ms into the 50 ms
    of step 4, which is cancelled and aborted by id; the output is the baseline's."""
    lm = FakeLM(latency_s=0.05)
    result = await pipeline_missing_step_3(lm, search_s=0.01)
    trace = result.trace
    assert trace.rollbacks == 1 and trace.lm_aborts == 1
    assert set(lm.cancelled) == set(lm.aborted) and len(lm.aborted) == 1


def early(stride: int | Literal["auto"] = 16) -> SpeculationConfig:
    return SpeculationConfig(
        speculation_stride=stride,
        max_speculation_stride=16,
        async_verification=True,
        overlap_depth="pipeline",
        early_verification=True,
    )


async def test_early_verification_searches_each_step_before_generating_it() -> None:
    """Every speculated step's search starts before the step's LM call, and a 10 ms search
    answers within the 20 ms step: the LM never waits for a verification, so an answer
    takes its LM steps alone (no search ends after the next step started and before the
    step it verifies ended)."""
    events: list[str] = []
    retriever = ScriptedRetriever(lambda step: 0, latency_s=0.01, events=events)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.02, events=events))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    events.clear()
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=early(1))
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.rollbacks == 0 and trace.plain_steps == 0
    # depth 1: one step at a time, each as search-start, lm-start, search-end, lm-end
    steps = [e.split()[0] for e in events[4:]]  # after the first (plain) retrieval step
    assert steps == ["search-start", "lm-start", "search-end", "lm-end"] * (len(steps) // 4)
    assert len(steps) == 4 * (len(trace.spans) - 1)


async def test_early_miss_aborts_the_step_it_verifies() -> None:
    """A 5 ms search against a 50 ms LM step: step 3's miss is found while step 3 itself is
    generating, so that very call is cancelled and aborted, nothing it would have produced
    is appended (no tokens discarded), and step 3 is regenerated with the true document."""
    lm = FakeLM(latency_s=0.05)
    retriever = ScriptedRetriever(forced({3}), latency_s=0.005)
    engine, _ = make_engine(retriever, lm)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    lm.calls.clear()
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=early())
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.rollbacks == 1 and trace.speculation_misses == 1
    assert trace.lm_aborts == 1 and lm.aborted == lm.cancelled
    assert trace.tokens_discarded == 0
    assert trace.step_doc_ids == baseline.trace.step_doc_ids
    # every completed LM call produced a kept step: the aborted one never completed
    assert len(lm.calls) == len(trace.spans)


async def test_early_verification_keeps_speculating_where_the_late_pipeline_stops() -> None:
    """Where the late pipeline's OS3 prefers plain steps (every other speculation wrong, a
    20 ms search behind a 40 ms step: a late miss costs step, search and step again),
    early verification keeps speculating: with a free abort a miss costs about a plain
    step and a hit saves the 20 ms search. Its measured advantage is close enough that
    plain steps are measured too (``measured_plain_pays``), at most until they fill
    ``MEASURED_MIN_TOKENS``. The model itself may add a plain step or two. Early on it
    judges with few trials, whose accuracy bound g is low (~0.2 after one hit and one
    miss), and a miss measured only g b / (1 - g) slower than step plus search (5 ms here)
    tips it until later scored guesses raise the bound. A loaded machine's late wake-ups
    are that large: with a 10 ms step and a 5 ms search (a 1.3 ms margin) CI failed here
    once in session 37 (one plain step from the model), and under three busy loops on 2
    cores 1 run in 12 failed (7 in 16 before session 37's fixes). Scaled up 4x and allowing
    2 such steps: 0 in 16 under the same load. Same answer either way."""
    retriever = ScriptedRetriever(forced(lambda s: s % 2 == 1), latency_s=0.02)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.04))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    late = SpeculationConfig(
        speculation_stride="auto", async_verification=True, overlap_depth="pipeline"
    )
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=late)
    assert result.token_ids == baseline.token_ids and result.trace.plain_steps > 0
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=early("auto"))
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.measured_plain_steps <= MEASURED_MIN_TOKENS // 4
    assert trace.plain_steps - trace.measured_plain_steps <= 2  # the model's, if any
    assert trace.rollbacks > 2
    assert trace.lm_aborts == trace.rollbacks  # each miss was caught while its step ran


async def test_early_verification_falls_back_to_plain_steps_when_aborts_cost() -> None:
    """An 8 ms search beside a 10 ms step, and an abort that takes 15 ms to return (an
    engine that finishes its forward pass first; on the H200 an aborted step cost ~17 ms).
    A hit saves the 8 ms search, a miss loses the 15 ms abort: at accuracy 0.5 OS3
    measures that speculating loses and runs plain steps (each still scoring the cache's
    guess). At 90% accuracy it keeps speculating. Same answer both ways."""
    lm = FakeLM(latency_s=0.01, abort_latency_s=0.015)
    retriever = ScriptedRetriever(forced(lambda s: s % 2 == 1), latency_s=0.008)
    engine, _ = make_engine(retriever, lm)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=early("auto"))
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.plain_steps > len(trace.spans) // 2
    assert trace.rollbacks <= 3  # only while OS3 was still measuring

    retriever = ScriptedRetriever(forced(lambda s: s % 10 == 9), latency_s=0.008)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.01, abort_latency_s=0.015))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=early("auto"))
    assert result.token_ids == baseline.token_ids
    assert result.trace.rollbacks > 0 and result.trace.plain_steps <= 2


@pytest.mark.parametrize("miss_every", [2, 3, 5])
@pytest.mark.parametrize(("search_s", "lm_s"), [(0.0, 0.0), (0.004, 0.001), (0.001, 0.004)])
async def test_early_verification_keeps_the_baseline_answer_under_forced_misses(
    miss_every: int, search_s: float, lm_s: float
) -> None:
    """Forced misses at chosen steps, with searches faster, slower and as fast as an LM
    step (a miss then settles before, after or while its step generates): token for token
    the baseline's."""
    retriever = ScriptedRetriever(forced(lambda s: s % miss_every == 1), latency_s=search_s)
    engine, _ = make_engine(retriever, FakeLM(latency_s=lm_s))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    for stride in (1, 3, "auto"):
        result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=early(stride))
        assert result.token_ids == baseline.token_ids, stride
        assert result.trace.step_doc_ids == baseline.trace.step_doc_ids, stride
        assert result.trace.rollbacks > 0, stride


class LateReadingScorer:
    """Ranks the cache with the retriever's exact score, but reads the cache only after
    ``delay_s`` (as the dense scorer does after its query embedding) and logs what it saw."""

    needs_vectors = False
    needs_terms = False

    def __init__(self, retriever: ScriptedRetriever, delay_s: float, events: list[str]) -> None:
        self.retriever, self.delay_s, self.events = retriever, delay_s, events
        self.seen: list[tuple[str, list[int]]] = []

    async def top1(self, cache: Any, query: str, recorder: Any) -> int | None:
        self.events.append("score-start")
        await asyncio.sleep(self.delay_s)
        ids = cache.scored_ids()
        self.events.append("score-read")
        self.seen.append((query, ids.tolist()))
        if len(ids) == 0:
            return None
        scores = await self.retriever.score(query, ids.tolist())
        return int(cache.best(np.asarray(scores, dtype=np.float64), ids))


async def test_a_plain_step_scores_its_guess_beside_its_step_on_the_cache_before_it() -> None:
    """A plain step's guess only feeds OS3, so it is scored once the step's search has
    answered (nothing competes with the search, and its query is encoded by then), beside
    the step's LM work, which does not wait for it: here the guess reads the cache 40 ms
    in, and the step has started by then. It ranks the cache as it was: every step's truth
    is a fresh document, so a guess that read the cache after this step's own search
    results went in would find it."""
    events: list[str] = []
    retriever = ScriptedRetriever(forced(lambda s: s >= 1), latency_s=0.02, events=events)
    scorer = LateReadingScorer(retriever, delay_s=0.04, events=events)
    lm = FakeLM(latency_s=0.05, events=events)
    engine = RaLMEngine(lm, FakeTokenizer(), retriever, scorer=scorer)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    events.clear()
    config = SpeculationConfig(speculation_stride="auto")
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    assert result.trace.plain_steps == len(result.trace.spans) - 1
    starts = [i for i, event in enumerate(events) if event == "score-start"]
    assert len(starts) == result.trace.plain_steps
    for i in starts:  # the step's search has answered whenever scoring starts
        searches = [j for j in range(i) if events[j].startswith("search-")]
        answered = searches[-1]
        assert events[answered] == "search-end 1", events
        read = events.index("score-read", i)
        assert any(e.startswith("lm-start") for e in events[answered:read]), events  # no wait
    assert len(scorer.seen) == result.trace.plain_steps
    for query, ids in scorer.seen:
        assert retriever.truth(query) not in ids  # the cache before this step's insert


PIPELINE = SpeculationConfig(
    speculation_stride="auto", async_verification=True, overlap_depth="pipeline"
)


@pytest.mark.parametrize("abort_s", [0.15, 0.0])
async def test_measured_costs_overrule_a_model_that_speculates_at_a_loss(abort_s: float) -> None:
    """The pipelined model prices a miss as a regenerated step (2a + b) and takes the abort
    of the step in flight as free. Here, an 8 ms search beside a 10 ms step and every tenth
    speculation wrong: the model speculates (it expects ~12 ms a step against 18 ms for a
    plain step). With 150 ms aborts speculating really costs ~27 ms a step: the engine's
    pooled measurements (``StepCosts``) catch it in its first request, and later requests
    run plain steps. With free aborts speculation is measured cheaper and stays. The same
    answer every time."""
    retriever = ScriptedRetriever(forced(lambda s: s % 10 == 9), latency_s=0.008)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.01, abort_latency_s=abort_s))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    traces = []
    for _ in range(3):
        result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=PIPELINE)
        assert result.token_ids == baseline.token_ids
        traces.append(result.trace)
    assert traces[0].rollbacks > 0  # the first request speculated, as the model says
    steps = len(traces[-1].spans)
    if abort_s:
        assert traces[-1].measured_plain_steps == traces[-1].plain_steps == steps - 1
        assert traces[-1].rollbacks == 0
    else:
        assert all(t.measured_plain_steps == 0 for t in traces)
        assert traces[-1].rollbacks > 0


@pytest.mark.parametrize("remeasure_s", [0.2, 60.0])
async def test_speculation_is_measured_again_once_its_figure_is_stale(
    monkeypatch: pytest.MonkeyPatch, remeasure_s: float
) -> None:
    """Costly aborts get the engine's requests running plain (as above); then the aborts
    become free. Plain steps measure only plain steps, so only a fresh measurement of
    speculation can show it: once speculation has not run for ``REMEASURE_S`` its figure
    is forgotten and the next request speculates again, and stays (``REMEASURE_S`` is
    0.2 s there, after 0.3 s without speculation). With the figure still trusted (60 s,
    within the pool's horizon) the next request stays plain: the H100's session 37 lost 21
    answers that way. The same answer every time."""
    monkeypatch.setattr(os3, "REMEASURE_S", 60.0)  # held plain throughout, first
    retriever = ScriptedRetriever(forced(lambda s: s % 10 == 9), latency_s=0.008)
    lm = FakeLM(latency_s=0.01, abort_latency_s=0.15)
    engine, _ = make_engine(retriever, lm)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)

    async def answer() -> Any:
        result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=PIPELINE)
        assert result.token_ids == baseline.token_ids
        return result.trace

    for _ in range(3):
        held = await answer()
    steps = len(held.spans)
    assert held.measured_plain_steps == held.plain_steps == steps - 1  # held plain
    lm.abort_latency_s = 0.0  # speculating pays now, but nothing measures it
    monkeypatch.setattr(os3, "REMEASURE_S", remeasure_s)
    await asyncio.sleep(0.3)
    resumed = await answer()
    if remeasure_s < 0.3:
        assert resumed.rollbacks > 0 and resumed.measured_plain_steps == 0
        again = await answer()  # measured cheaper: it keeps speculating
        assert again.rollbacks > 0 and again.measured_plain_steps == 0
    else:
        assert resumed.measured_plain_steps == resumed.plain_steps == steps - 1


async def test_every_finalized_token_is_measured_once_as_plain_or_speculation() -> None:
    """``StepCosts`` gets each answer token once: the first step as first, plain steps as
    plain, the rest as speculation segments closed at decision points (rollbacks included),
    in the pipeline and in rounds."""
    for config in (
        PIPELINE,
        SpeculationConfig(speculation_stride="auto", async_verification=True),
        SpeculationConfig(speculation_stride="auto"),
    ):
        retriever = ScriptedRetriever(forced(lambda s: s % 3 == 2), latency_s=0.002)
        engine, _ = make_engine(retriever, FakeLM(latency_s=0.001))
        baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
        result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
        assert result.token_ids == baseline.token_ids
        costs = engine.stride_ledgers[config].steps
        measured = costs.per_token("first", "plain", "speculation")
        assert measured is not None and measured[1] == len(result.token_ids), config
        first = costs.per_token("first")
        assert first is not None and first[1] == 4  # the first step: one stride
        assert result.trace.rollbacks > 0 or result.trace.plain_steps > 0


async def _plain_run(
    search_s: float, config: SpeculationConfig
) -> tuple[Any, list[tuple[tuple[int, int], int]]]:
    """Every guess misses, so OS3 runs (nearly) every step plain: the second request's trace
    (it knows a and b(1) from its first steps on) and its searches as (shape, prefetch),
    each request's answer checked against the baseline's."""
    retriever = ScriptedRetriever(forced(lambda s: True), latency_s=search_s)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.012))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    for _ in range(2):
        retriever.search_calls.clear()
        retriever.prefetches.clear()
        result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
        assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.plain_steps >= len(trace.spans) - 3  # nearly all plain
    return trace, list(zip(retriever.search_calls, retriever.prefetches, strict=True))


@pytest.mark.parametrize(("search_s", "beside"), [(0.001, True), (0.03, False)])
async def test_a_plain_step_prefetches_beside_its_step_where_searches_are_cheap(
    search_s: float, beside: bool
) -> None:
    """Every guess misses, so OS3 runs plain steps. Where a search costs at most half an LM
    step (``PREFETCH_BESIDE_RATIO``), a plain step's search is the baseline's own (the
    exact top-1, no prefetch) and the cache's prefetch comes from a second search beside
    the step; where searches are slow, one search with the prefetch. The same answer either
    way, and a prefetch search for every plain step (what fills the cache). Opt-in
    (``plain_prefetch=True``) since session 30."""
    config = SpeculationConfig(speculation_stride="auto", prefetch_k=4, plain_prefetch=True)
    trace, calls = await _plain_run(search_s, config)
    purposes = [c.purpose for c in trace.retrieval_calls if c.kind == "search"]
    lean = calls.count(((1, 1), 0))  # the baseline's search: one query, top-1
    prefetching = [c for c in calls if c != ((1, 1), 0)]
    if beside:
        # each plain step: the baseline's search, then the prefetch's beside the step
        assert lean >= trace.plain_steps - 2 and purposes.count("prefetch") == lean
        assert len(prefetching) == len(calls) - lean
    else:
        assert lean == 0 and "prefetch" not in purposes
        assert len(prefetching) == len(calls)
    assert all(c == ((1, 4), 0) for c in prefetching)  # prefetch_k exact hits


@pytest.mark.parametrize("search_s", [0.001, 0.03])
async def test_plain_steps_without_prefetch_search_as_the_baseline_does(search_s: float) -> None:
    """``plain_prefetch=False`` (the default): every plain step is the baseline's search (one
    query, the exact top-1) and nothing more, whether searches are cheap or slow; the first
    step still fills the cache with the prefetch. The same answer."""
    config = SpeculationConfig(speculation_stride="auto", prefetch_k=4)
    assert not config.plain_prefetch
    trace, calls = await _plain_run(search_s, config)
    purposes = [c.purpose for c in trace.retrieval_calls if c.kind == "search"]
    assert "prefetch" not in purposes
    assert calls.count(((1, 1), 0)) >= trace.plain_steps  # the baseline's search
    assert calls[0] == ((1, 4), 0)  # the first step's prefetch


async def test_a_plain_run_probes_only_every_so_many_steps() -> None:
    """``plain_probe_every=3``: of a run of plain steps only every third (the run's first
    included) scores the cache's guess (a ``score`` call here) for OS3's evidence; the two
    between are the baseline's steps (its search and nothing else: ``quiet_steps``). The
    same answer either way. With every step probing (the default), no quiet steps and a
    scoring at every plain step."""
    runs = {}
    for every in (1, 3):
        config = SpeculationConfig(speculation_stride="auto", prefetch_k=4, plain_probe_every=every)
        trace, calls = await _plain_run(0.001, config)
        scores = [c for c in trace.retrieval_calls if c.kind == "score"]
        runs[every] = trace, scores, calls
    trace, scores, _ = runs[1]
    assert trace.quiet_steps == 0 and len(scores) >= trace.plain_steps
    trace, scores, calls = runs[3]
    probes = trace.plain_steps - trace.quiet_steps
    assert probes >= 1 and trace.quiet_steps >= 2 * (probes - 1)
    speculated = len(trace.spans) - 1 - trace.plain_steps  # the first step scores nothing
    assert len(scores) <= probes + speculated < trace.plain_steps
    assert calls.count(((1, 1), 0)) >= trace.plain_steps  # each the baseline's search


def test_plain_probe_every_must_be_positive() -> None:
    with pytest.raises(ValueError, match="plain_probe_every"):
        SpeculationConfig(plain_probe_every=0)


@pytest.mark.parametrize("capacity", [5, 64])
async def test_the_trace_reports_the_most_documents_the_cache_held(capacity: int) -> None:
    """``cache_peak``: every step's true document is fresh, so the cache grows by one or more
    documents a verification until its capacity stops it (5), or holds every document
    inserted (64: more than 5, fewer than 64); the baseline has no cache."""
    retriever = ScriptedRetriever(forced(lambda s: True))
    engine, _ = make_engine(retriever, FakeLM())
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    assert baseline.trace.cache_peak == 0
    config = SpeculationConfig(speculation_stride=2, prefetch_k=4, cache_capacity=capacity)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    if capacity == 5:
        assert result.trace.cache_peak == 5
    else:
        assert 5 < result.trace.cache_peak < 64
