"""OS3: objective values and stride choices against hand-computed numbers; gamma estimation."""

from __future__ import annotations

import math

import pytest

from ralmspec_vllm.core.stride import (
    REMEASURE_S,
    FixedStride,
    OptimalStrideScheduler,
    StepCosts,
    StrideLedger,
    VerificationCost,
    async_objective,
    choose_stride,
    expected_steps,
    sync_objective,
    wilson_lower_bound,
    wilson_upper_bound,
)


def test_expected_steps() -> None:
    assert expected_steps(1, 0.5) == pytest.approx(1.0)
    assert expected_steps(3, 0.5) == pytest.approx(1.75)  # 1 + 0.5 + 0.25


def test_sync_objective_hand_computed() -> None:
    # (1 - g^s) / ((1 - g)(s a + b)) with g = 0.5, a = 1, b = 2
    assert sync_objective(1, 0.5, 1.0, 2.0) == pytest.approx(0.5 / 1.5)
    assert sync_objective(2, 0.5, 1.0, 2.0) == pytest.approx(0.75 / 2.0)
    assert sync_objective(3, 0.5, 1.0, 2.0) == pytest.approx(0.875 / 2.5)
    assert choose_stride(0.5, 1.0, 2.0, 10, asynchronous=False) == 2


def test_async_objective_hand_computed_and_ties_keep_climbing() -> None:
    # s=1: time = .5*(0 + 2) + .5*(1 + 2) = 2.5, steps 1 -> 0.4
    assert async_objective(1, 0.5, 1.0, 2.0) == pytest.approx(0.4)
    # s=2: time = .25*(1 + 2) + .75*(2 + 2) = 3.75, steps 1.5 -> 0.4 (equal: keep going)
    assert async_objective(2, 0.5, 1.0, 2.0) == pytest.approx(0.4)
    # s=3: time = .125*(2 + 2) + .875*(3 + 2) = 4.875, steps 1.75 -> 0.359 (drops)
    assert async_objective(3, 0.5, 1.0, 2.0) == pytest.approx(1.75 / 4.875)
    assert choose_stride(0.5, 1.0, 2.0, 10, asynchronous=True) == 2


def test_async_objective_with_speculation_ahead_hand_computed() -> None:
    g, a, b = 0.5, 1.0, 2.0
    for s in (1, 2, 3):  # depth 1 is the paper's formula
        assert async_objective(s, g, a, b, depth=1) == async_objective(s, g, a, b)
    # s=3, the whole round ahead: hit time max(2, 3) = 3, miss 3 + 2 -> .125*3 + .875*5
    assert async_objective(3, g, a, b, depth=None) == pytest.approx(1.75 / 4.75)
    # depth 2 of 3: hit time max(2, 2) + 1 = 3
    assert async_objective(3, g, a, b, depth=2) == pytest.approx(1.75 / 4.75)
    # retrieval 25x an LM step (exact dense at 21M): a hit round hides all of its s steps
    # behind the verification, not one; a miss round still pays s a + b
    g, a, b = 0.9, 0.02, 0.5
    for s in range(2, 17):
        assert async_objective(s, g, a, b, None) > async_objective(s, g, a, b, 1)
    # hit 0.5, miss 0.32 + 0.5: the best stride is where misses start to dominate
    values = [async_objective(s, g, a, b, None) for s in range(1, 17)]
    assert choose_stride(g, a, b, 16, asynchronous=True, depth=None) == 14
    assert values.index(max(values)) == 13
    with pytest.raises(ValueError, match="depth"):
        OptimalStrideScheduler(depth=0)


def test_choice_is_first_drop_and_bounded() -> None:
    a, b, g = 0.01, 1.0, 0.6  # cheap speculation, slow retrieval (exact dense)
    values = [sync_objective(s, g, a, b) for s in range(1, 40)]
    first_drop = next(i for i in range(1, len(values)) if values[i] < values[i - 1])
    assert choose_stride(g, a, b, 40, asynchronous=False) == first_drop
    assert first_drop > 5
    assert choose_stride(g, a, b, 4, asynchronous=False) == 4
    assert choose_stride(0.0, a, b, 40, asynchronous=False) == 1  # never right: no speculation
    assert choose_stride(0.6, 1.0, 0.0, 40, asynchronous=False) == 1  # free retrieval
    assert choose_stride(0.6, 0.0, 0.0, 7, asynchronous=True) == 7  # unmeasurable: no crash


def test_gamma_estimation_window_and_cap() -> None:
    sched = OptimalStrideScheduler(window=2, gamma_max=0.9)
    assert sched.gamma is None
    sched.record_verification(0.1, matched=3, mismatched=False)
    assert sched.gamma == pytest.approx(0.9)  # 3 / 3 capped
    sched.record_verification(0.1, matched=1, mismatched=True)
    assert sched.gamma == pytest.approx(4 / 5)
    sched.record_verification(0.1, matched=0, mismatched=True)  # first outcome leaves
    assert sched.gamma == pytest.approx(1 / 3)


def test_scheduler_starts_at_one_and_uses_latest_measurements() -> None:
    sched = OptimalStrideScheduler(gamma_max=0.6)
    assert sched.next_stride() == 1
    sched.record_speculation(5.0)
    sched.record_speculation(1.0)  # the latest counts
    assert sched.next_stride() == 1  # no verification yet
    sched.record_verification(2.0, matched=1, mismatched=True)  # gamma 0.5, b 2
    assert sched.next_stride() == 2
    async_sched = OptimalStrideScheduler(asynchronous=True)
    async_sched.record_speculation(1.0)
    async_sched.record_verification(2.0, matched=1, mismatched=True)
    assert async_sched.next_stride() == choose_stride(0.5, 1.0, 2.0, 10, asynchronous=True)


@pytest.mark.parametrize(
    ("asynchronous", "a", "b", "matched", "plain"),
    [
        (False, 1.0, 0.5, 9, True),  # without overlap stride 1 never beats a plain step
        (False, 0.01, 1.0, 99, True),
        # overlap, mostly right, step 1 vs verification 0.5: 0.9*1 + 0.1*2.5 = 1.15 < 1.5
        (True, 1.0, 0.5, 9, False),
        # overlap, half wrong: 0.5*1 + 0.5*2.5 = 1.75 > 1.5 -> plain
        (True, 1.0, 0.5, 1, True),
        # overlap, verification dominates: 0.75*1 + 0.25*1.2 = 1.05 < 1.1
        (True, 0.1, 1.0, 3, False),
    ],
)
def test_plain_step_decision_hand_computed(
    asynchronous: bool, a: float, b: float, matched: int, plain: bool
) -> None:
    sched = OptimalStrideScheduler(asynchronous=asynchronous)
    assert not sched.prefers_plain_step()  # nothing measured: speculate to learn
    sched.record_speculation(a)
    sched.record_verification(b, matched=matched, mismatched=True)
    assert sched.accuracy == pytest.approx(matched / (matched + 1))  # not capped at 0.6
    assert sched.prefers_plain_step() is plain


@pytest.mark.parametrize(
    ("a", "b", "miss", "matched", "plain"),
    [
        # session 20's HNSW at 1M (a 22 ms step, 2.6 ms search, a miss ~38.6 ms):
        # 2 of 3 right: 0.67*22 + 0.33*38.6 = 27.5 > 24.6 -> plain
        (22.0, 2.6, 38.6, 2, True),
        (22.0, 2.6, 38.6, 9, False),  # 0.9*22 + 0.1*38.6 = 23.66 < 24.6
        # a free abort: a miss costs a + b, so any accuracy speculates
        (22.0, 2.6, 24.6, 1, False),
        # a search slower than the step: a hit costs b, a miss b + a (+ abort 5)
        (20.0, 300.0, 325.0, 1, False),  # 0.5*300 + 0.5*325 = 312.5 < 320
        (20.0, 300.0, 345.0, 1, True),  # 0.5*300 + 0.5*345 = 322.5 > 320
    ],
)
def test_early_plain_step_decision_hand_computed(
    a: float, b: float, miss: float, matched: int, plain: bool
) -> None:
    sched = OptimalStrideScheduler(asynchronous=True)
    sched.record_speculation(a)
    sched.record_verification(b, matched=matched, mismatched=True)
    assert not sched.prefers_plain_step_early()  # no miss measured: speculate
    sched.record_miss(miss)
    assert sched.prefers_plain_step_early() is plain


def test_wilson_lower_bound_against_published_values() -> None:
    # 27 of 30 at 95%: the Wilson interval is 0.744-0.965 (standard tables).
    assert wilson_lower_bound(27, 30, 1.96) == pytest.approx(0.7436, abs=5e-4)
    # by hand at z = 1.28: (0.9 + 0.02731 - 1.28 sqrt(0.003 + 0.000455)) / 1.05461
    assert wilson_lower_bound(27, 30, 1.28) == pytest.approx(0.8079, abs=5e-4)
    assert wilson_lower_bound(0, 0, 1.28) == 0.0
    assert wilson_lower_bound(0, 5, 1.28) == 0.0
    assert wilson_lower_bound(10, 10, 1.28) == pytest.approx(10 / (10 + 1.28**2))


def _feed(sched: OptimalStrideScheduler, rounds: list[tuple[int, bool]]) -> None:
    sched.record_speculation(0.02)  # exact dense at 21M docs: cheap steps, slow retrieval
    for matched, mismatched in rounds:
        sched.record_verification(1.0, matched=matched, mismatched=mismatched)


def test_evidence_lifts_gamma_above_the_cap_only_when_it_is_strong() -> None:
    good = [(9, True), (10, False), (8, True), (10, False)]  # 37 right, 2 wrong: 0.949
    paper = OptimalStrideScheduler(gamma_max=0.6, max_stride=16, asynchronous=True)
    ours = OptimalStrideScheduler(
        gamma_max=0.6, max_stride=16, asynchronous=True, confidence_z=1.28
    )
    _feed(paper, good)
    _feed(ours, good)
    assert paper.gamma == pytest.approx(0.6)
    assert ours.gamma == pytest.approx(wilson_lower_bound(37, 39, 1.28))
    assert ours.gamma > 0.85
    assert ours.next_stride() > paper.next_stride()
    assert ours.next_stride() == choose_stride(ours.gamma, 0.02, 1.0, 16, asynchronous=True)

    thin = OptimalStrideScheduler(gamma_max=0.6, confidence_z=1.28)
    _feed(thin, [(2, False)])  # 2 of 2: lower bound 0.55, below the cap
    assert thin.gamma == pytest.approx(0.6)


def test_evidence_bound_is_cut_by_a_significantly_worse_window() -> None:
    sched = OptimalStrideScheduler(window=2, gamma_max=0.6, confidence_z=1.0, evidence_window=20)
    _feed(sched, [(10, False)] * 10 + [(1, True), (1, True)])  # long good run, then two misses
    assert sched.accuracy == pytest.approx(0.5)  # the window holds the two bad rounds
    assert sched.accuracy_lower_bound is not None and sched.accuracy_lower_bound > 0.9
    # 2 of 4 cannot rule out 0.7 (upper bound 0.75): the bound is cut to that, not to 0.5
    assert sched.gamma == pytest.approx(wilson_upper_bound(2, 4, 1.0))
    assert 0.6 < sched.gamma < 0.8
    drifted = OptimalStrideScheduler(window=5, gamma_max=0.6, confidence_z=1.0)
    _feed(drifted, [(10, False)] * 10 + [(0, True)] * 5)  # five misses in a row: drifted
    assert drifted.gamma == pytest.approx(wilson_upper_bound(0, 5, 1.0))  # 1/6
    assert wilson_upper_bound(0, 5, 1.0) == pytest.approx(1 / 6)
    assert wilson_upper_bound(0, 0, 1.0) == 1.0


def test_a_ledger_seeds_new_schedulers_only_with_the_bound_on() -> None:
    ledger = StrideLedger(capacity=50)
    first = OptimalStrideScheduler(
        max_stride=16, asynchronous=True, confidence_z=1.28, ledger=ledger
    )
    assert first.next_stride() == 1 and first.gamma is None  # empty ledger: as the paper
    _feed(first, [(12, True), (16, False), (15, True)])  # 43 right, 2 wrong
    assert ledger.trials() == (43, 2) and (ledger.a, ledger.b) == (0.02, 1.0)

    seeded = OptimalStrideScheduler(
        max_stride=16, asynchronous=True, confidence_z=1.28, ledger=ledger
    )
    assert seeded.accuracy is None  # nothing of its own yet
    assert seeded.plain_step_accuracy == pytest.approx(wilson_lower_bound(43, 45, 1.28))
    assert seeded.gamma == pytest.approx(wilson_lower_bound(43, 45, 1.28))
    assert seeded.next_stride() == choose_stride(seeded.gamma, 0.02, 1.0, 16, asynchronous=True)
    assert seeded.next_stride() > 10
    seeded.record_verification(1.0, matched=0, mismatched=True)  # its own evidence counts
    assert seeded.accuracy == 0.0  # one miss can be chance: the pooled bound is only cut
    assert seeded.gamma == pytest.approx(wilson_upper_bound(0, 1, 1.28))  # to 0.62
    assert ledger.trials() == (43, 3)  # and is pooled for the next request

    paper = OptimalStrideScheduler(max_stride=16, asynchronous=True, ledger=ledger)
    assert paper.next_stride() == 1 and paper.gamma is None  # the paper's OS3 ignores it
    paper.record_verification(1.0, matched=3, mismatched=False)
    assert ledger.trials() == (43, 3)  # and does not feed it
    with pytest.raises(ValueError, match="capacity"):
        StrideLedger(capacity=0)


def test_verification_cost_per_batch_size() -> None:
    cost = VerificationCost()
    assert not cost
    cost.record(1, 0.5)
    assert cost and cost(1) == 0.5 and cost(8) == 0.5  # one size known: flat
    cost.record(4, 1.1)
    cost.record(16, 1.3)
    assert cost(2) == pytest.approx(0.5 + (1.1 - 0.5) / 3)  # between 1 and 4
    assert cost(10) == pytest.approx(1.2)  # between 4 and 16
    assert cost(28) == pytest.approx(1.5)  # beyond: the last slope (0.2 per 12)
    cost.record(32, 1.0)  # noisy: a cheaper big batch
    assert cost(64) == pytest.approx(1.0)  # never below the largest measured size's latency


def test_size_aware_choice_takes_the_best_stride_not_the_first_peak() -> None:
    gemm = VerificationCost()  # fp32 CPU exact scan: 2+ queries cost 2.1x one
    for size, latency in ((1, 0.53), (2, 1.1), (16, 1.1)):
        gemm.record(size, latency)
    # accuracy 0.5: long rounds do not pay for the jump, stride 1 (the blind OS3 says 4)
    assert choose_stride(0.5, 0.02, gemm, 16, asynchronous=True) == 1
    assert choose_stride(0.5, 0.02, 0.53, 16, asynchronous=True) == 4
    # accuracy 0.9: the objective dips at 2 (cost doubles) and rises past stride 1 later;
    # the paper's greedy search would stop at 1, the best s is the longest
    values = [async_objective(s, 0.9, 0.02, gemm(s)) for s in range(1, 17)]
    assert values[1] < values[0] < values[15]
    assert choose_stride(0.9, 0.02, gemm, 16, asynchronous=True) == 16
    sched = OptimalStrideScheduler(max_stride=16, asynchronous=True, confidence_z=1.28)
    sched.record_speculation(0.02)
    sched.record_search(0.53)
    for size in (2, 16):
        sched.record_verification(1.1, matched=1, mismatched=True, size=size)
    assert sched.accuracy == pytest.approx(0.5) and sched.next_stride() == 1
    paper = OptimalStrideScheduler(max_stride=16, asynchronous=True)
    paper.record_speculation(0.02)
    paper.record_search(0.53)  # ignored: the paper's OS3 has no b(s)
    paper.record_verification(1.1, matched=1, mismatched=True, size=2)
    assert paper.cost is None and paper.next_stride() > 1


def test_validation() -> None:
    with pytest.raises(ValueError, match="window"):
        OptimalStrideScheduler(window=0)
    with pytest.raises(ValueError, match="gamma_max"):
        OptimalStrideScheduler(gamma_max=1.0)
    with pytest.raises(ValueError, match="confidence_z"):
        OptimalStrideScheduler(confidence_z=0.0)
    with pytest.raises(ValueError, match="evidence_window"):
        OptimalStrideScheduler(window=5, evidence_window=4)
    with pytest.raises(ValueError, match="stride"):
        FixedStride(0)
    assert FixedStride(3).next_stride() == 3


def test_fill_restart_is_a_third_of_a_one_query_verification_in_lm_steps() -> None:
    scheduler = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, depth=None)
    assert scheduler.fill_restart(16) is None  # nothing measured yet
    scheduler.record_search(0.25)  # b(1): the first retrieval
    assert scheduler.fill_restart(16) is None  # a unknown
    scheduler.record_speculation(0.0204)
    assert scheduler.fill_restart(16) == 4  # 0.25 / 0.0612
    scheduler.record_verification(0.9, 8, False, size=8)  # b(8) does not move b(1)
    assert scheduler.fill_restart(16) == 4
    scheduler.record_speculation(0.2)  # the LM dominates: verify after one step
    assert scheduler.fill_restart(16) == 1
    scheduler.record_speculation(0.001)  # capped at the largest stride
    assert scheduler.fill_restart(16) == 16 and scheduler.fill_restart(5) == 5
    paper = OptimalStrideScheduler(asynchronous=True)  # no cost model: the latest b
    paper.record_speculation(0.01)
    paper.record_verification(0.12, 3, False, size=3)
    assert paper.fill_restart(16) == 4


def test_a_new_request_starts_with_plain_steps_its_predecessors_found_cheaper() -> None:
    """Before its own first verification, a request judges plain steps by the pooled
    accuracy and miss cost (session 22: each request used to speculate first and roll back,
    1.33 rollbacks an answer on HNSW at 200k, where accuracy 0.6 never pays); and a lucky
    window does not tip it while the evidence says otherwise."""
    ledger = StrideLedger()
    first = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    assert not first.prefers_plain_step() and not first.prefers_plain_step_early()  # no evidence
    _feed(first, [(1, False), (0, True)] * 10)  # accuracy 0.5, a = 0.02, b = 1.0 from _feed
    first.record_speculation(0.130)  # a 130 ms LM step against ...
    first.record_verification(0.005, 1, False)  # ... a 5 ms search
    first.record_miss(0.280)
    assert first.prefers_plain_step() and first.prefers_plain_step_early()
    second = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    assert second.miss == pytest.approx(0.280)
    assert second.prefers_plain_step() and second.prefers_plain_step_early()  # from the start
    _feed(second, [(1, False)] * 5)  # five hits in a row: the window says 1.0 ...
    second.record_speculation(0.130)
    second.record_verification(0.005, 1, False)
    assert second.accuracy == 1.0 and second.prefers_plain_step()  # ... the evidence does not
    alone = OptimalStrideScheduler(asynchronous=True)  # the paper's OS3 pools nothing
    assert alone.accuracy is None and alone.miss is None and not alone.prefers_plain_step()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_step_costs_pool_seconds_per_token_and_let_old_samples_lapse() -> None:
    clock = FakeClock()
    costs = StepCosts(horizon_s=60.0, clock=clock)
    assert costs.per_token("plain") is None and costs.per_token("speculation") is None
    costs.record("plain", 0.040, 4)
    costs.record("plain", 0.020, 0)  # nothing finalized: not a sample
    clock.now += 30
    costs.record("plain", 0.080, 4)
    costs.record("speculation", 0.300, 12)
    assert costs.per_token("plain") == (pytest.approx(0.015), 8)  # 0.12 s over 8 tokens
    assert costs.per_token("speculation") == (pytest.approx(0.025), 12)
    clock.now += 31  # the first plain sample is 61 s old now
    assert costs.per_token("plain") == (pytest.approx(0.020), 4)
    clock.now += 30
    assert costs.per_token("plain") is None and costs.per_token("speculation") is None
    with pytest.raises(ValueError, match="horizon_s"):
        StepCosts(horizon_s=0)
    assert costs.age("plain") is None
    costs.record("plain", 0.040, 4)
    clock.now += 2.5
    assert costs.age("plain") == pytest.approx(2.5)
    costs.forget("plain")
    assert costs.per_token("plain") is None and costs.age("plain") is None
    costs.record("plain", 0.080, 4)  # the sums restart from nothing
    assert costs.per_token("plain") == (pytest.approx(0.020), 4)
    full = StepCosts(clock=clock, capacity=2)  # beyond capacity the oldest sample goes
    for seconds in (0.4, 0.2, 0.1):
        full.record("speculation", seconds, 10)
    assert full.per_token("speculation") == (pytest.approx(0.015), 20)


def test_step_costs_spread_is_the_ratio_estimators_standard_error() -> None:
    """``spread``: the standard error of a mode's seconds per token, from its samples'
    scatter about the pooled figure; it follows the samples as they lapse, drop or are
    forgotten, and is 0.0 with fewer than two samples."""
    clock = FakeClock()
    costs = StepCosts(horizon_s=60.0, clock=clock, capacity=6)

    def expected(samples: list[tuple[float, int]]) -> float:
        seconds = sum(s for s, _ in samples)
        tokens = sum(t for _, t in samples)
        p = seconds / tokens
        residual = sum((s - p * t) ** 2 for s, t in samples)
        n = len(samples)
        return math.sqrt(n / (n - 1) * residual) / tokens

    assert costs.spread("plain") == 0.0
    costs.record("plain", 0.030, 4)
    assert costs.spread("plain") == 0.0  # one sample: no scatter to tell
    samples = [(0.030, 4), (0.052, 8), (0.011, 1), (0.120, 4)]
    for seconds, tokens in samples[1:]:
        costs.record("plain", seconds, tokens)
    assert costs.spread("plain") == pytest.approx(expected(samples))
    assert costs.spread("speculation") == 0.0  # each mode its own
    costs.record("plain", 0.040, 4)
    costs.record("plain", 0.041, 4)
    costs.record("plain", 0.039, 4)  # capacity 6: the first sample goes
    samples = [*samples[1:], (0.040, 4), (0.041, 4), (0.039, 4)]
    assert costs.spread("plain") == pytest.approx(expected(samples))
    clock.now += 61  # every sample lapses
    costs.record("plain", 0.040, 4)
    costs.record("plain", 0.044, 4)
    # spread drops the lapsed samples itself, asked before per_token
    assert costs.spread("plain") == pytest.approx(expected([(0.040, 4), (0.044, 4)]))
    assert costs.per_token("plain") == (pytest.approx(0.0105), 8)
    costs.forget("plain")
    costs.record("plain", 0.040, 4)
    assert costs.spread("plain") == 0.0
    same = StepCosts(clock=clock)  # samples at one cost: no scatter
    for _ in range(5):
        same.record("speculation", 0.020, 4)
    assert same.spread("speculation") == pytest.approx(0.0, abs=1e-12)


def test_measured_slower_speculation_holds_plain_only_beyond_its_noise() -> None:
    """Speculation's samples scatter (a hit's step, a miss's regenerated one): measured
    17% slower than plain steps over nine samples, a figure that noisy does not hold
    requests plain (session 40's second 1M run held answers 2-6 plain on one such comparison);
    the same mean without the scatter does, and so does the noisy figure once ten times the
    samples have narrowed it."""

    def scheduler(speculation: list[tuple[float, int]]) -> OptimalStrideScheduler:
        ledger = StrideLedger()
        for i in range(8):  # plain steps: 4.5 ms a token, +-0.25 ms a token
            ledger.steps.record("plain", 0.017 if i % 2 else 0.019, 4)
        for seconds, tokens in speculation:
            ledger.steps.record("speculation", seconds, tokens)
        return OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)

    noisy = [(0.015, 4)] * 8 + [(0.070, 4)]  # eight hits and a miss: 5.28 ms a token
    assert not scheduler(noisy).measured_plain_pays()  # 17% slower, within the noise
    steady = [(0.190 / 9, 4)] * 9  # the same mean, every step alike
    assert scheduler(steady).measured_plain_pays()
    assert scheduler(noisy * 10).measured_plain_pays()  # measured enough: slower
    cheaper = [(0.012, 4)] * 80 + [(0.060, 4)] * 10  # 4.0 ms a token: cheaper, speculate
    assert not scheduler(cheaper).measured_plain_pays()


@pytest.mark.parametrize(
    ("first", "plain", "speculation", "verdict"),
    [
        (None, None, (0.030, 64), False),  # nothing to compare with
        (None, (0.010, 64), None, False),
        (None, (0.010, 64), (0.030, 16), False),  # speculation barely measured
        (None, (0.010, 64), (0.011, 64), True),  # measured slower: plain
        (None, (0.010, 64), (0.009, 64), False),  # measured faster: the models decide
        (None, (0.010, 4), (0.009, 64), True),  # close, plain barely measured: measure it
        (None, (0.010, 4), (0.007, 64), False),  # clearly cheaper (30%): no need
        ((0.075, 4), None, (0.021, 64), False),  # the 21M regime: a first step costs 3.5x
        # first steps cost more than the steady plain steps: close to them, speculation
        # gets the steady plain steps measured (8 of them), and is then judged by those
        ((0.0118, 64), None, (0.0112, 64), True),  # IVF at 1M (s25): explore
        ((0.0118, 64), (0.0105, 32), (0.0112, 64), True),  # measured: plain is cheaper
        ((0.0118, 64), (0.0120, 32), (0.0112, 64), False),  # measured: speculation is
        ((0.0118, 64), (0.0120, 28), (0.0112, 64), True),  # not yet: still exploring
    ],
)
def test_measured_plain_pays_hand_cases(
    first: tuple[float, int] | None,
    plain: tuple[float, int] | None,
    speculation: tuple[float, int] | None,
    verdict: bool,
) -> None:
    ledger = StrideLedger()
    for mode, sample in (("first", first), ("plain", plain), ("speculation", speculation)):
        if sample is not None:
            per_token, tokens = sample
            ledger.steps.record(mode, per_token * tokens, tokens)  # type: ignore[arg-type]
    scheduler = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    assert scheduler.steps is ledger.steps  # pooled with the engine's other requests
    assert scheduler.measured_plain_pays() is verdict
    # the paper's OS3 has no such rule
    paper = OptimalStrideScheduler(asynchronous=True, ledger=ledger)
    assert paper.steps is None and not paper.measured_plain_pays()


def test_a_stale_speculation_figure_is_forgotten_not_judged() -> None:
    """Speculation measured slower (on one unlucky answer, say) holds requests plain; plain
    steps keep coming, speculation's samples do not. ``REMEASURE_S`` after its newest sample
    the rule forgets it and lets speculation run; the fresh figure is judged once it has
    ``MEASURED_MIN_TOKENS`` again."""
    clock = FakeClock()
    ledger = StrideLedger(clock=clock)
    scheduler = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    ledger.steps.record("speculation", 0.020 * 64, 64)
    ledger.steps.record("plain", 0.010 * 64, 64)
    assert scheduler.measured_plain_pays()
    for _ in range(10):  # plain steps only, for REMEASURE_S
        clock.now += REMEASURE_S / 10
        ledger.steps.record("plain", 0.010 * 4, 4)
        assert scheduler.measured_plain_pays()
    clock.now += 0.5
    assert not scheduler.measured_plain_pays()  # stale: forgotten, speculate
    assert ledger.steps.per_token("speculation") is None
    ledger.steps.record("speculation", 0.008 * 16, 16)
    assert not scheduler.measured_plain_pays()  # barely measured again
    ledger.steps.record("speculation", 0.008 * 16, 16)
    assert not scheduler.measured_plain_pays()  # measured cheaper now: the models decide
    ledger.steps.record("speculation", 0.030 * 64, 64)  # and slower again: plain
    assert scheduler.measured_plain_pays()


def test_a_stale_miss_cost_counts_as_unmeasured() -> None:
    """A costly miss holds the early rule plain; plain steps make no miss to replace it.
    ``REMEASURE_S`` after it was measured it counts as unmeasured, so speculation runs until
    a new miss prices it again; a fresh cheap miss then keeps speculating."""
    clock = FakeClock()
    ledger = StrideLedger(clock=clock)
    first = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    first.record_speculation(0.020)
    first.record_verification(0.006, matched=9, mismatched=True)
    first.record_miss(0.150)
    assert first.prefers_plain_step_early()
    clock.now += REMEASURE_S - 1
    later = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    assert later.miss == 0.150 and later.prefers_plain_step_early()  # pooled, still fresh
    clock.now += 2
    assert not first.prefers_plain_step_early() and not later.prefers_plain_step_early()
    later.record_miss(0.150)  # measured again, as costly: plain again, for every request
    fresh = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    assert later.prefers_plain_step_early() and fresh.prefers_plain_step_early()
    later.record_miss(0.030)  # cheap now: 0.72 * 20 + 0.28 * 30 < 26 ms
    assert not later.prefers_plain_step_early()
    alone = OptimalStrideScheduler(asynchronous=True, clock=clock)  # no ledger: its own
    alone.record_speculation(0.020)
    alone.record_verification(0.006, matched=1, mismatched=True)
    alone.record_miss(0.150)
    assert alone.prefers_plain_step_early()
    clock.now += REMEASURE_S + 1
    assert not alone.prefers_plain_step_early()


def test_restarting_the_clock_forgets_the_warm_ups_miss() -> None:
    """A warm-up's miss pays one-off costs (the first abort). Kept, it would hold the
    early-verification rule plain until a timed miss replaced it, which plain steps never
    make; after the restart speculating is taken to pay until a timed miss is measured."""
    ledger = StrideLedger()
    warm = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    warm.record_speculation(0.020)
    warm.record_verification(0.006, matched=9, mismatched=True)
    warm.record_miss(0.150)  # g = 9 of 10's lower bound, ~0.7: 0.7*20 + 0.3*150 > 20 + 6 ms
    assert ledger.miss == 0.150
    assert OptimalStrideScheduler(
        asynchronous=True, confidence_z=1.28, ledger=ledger
    ).prefers_plain_step_early()
    ledger.restart_clock()
    timed = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    assert timed.miss is None and not timed.prefers_plain_step_early()
    assert (timed.a, timed.b) == (0.020, 0.006)  # the latest a and b stay


def test_restarting_the_clock_forgets_the_warm_ups_step_costs_not_its_outcomes() -> None:
    """A warm-up measured speculation slower than plain steps (one-off costs): until the
    clock restarts every request would run plain; after it, the models decide, with the
    warm-up's speculation outcomes still pooled."""
    ledger = StrideLedger()
    ledger.steps.record("plain", 0.010 * 64, 64)
    ledger.steps.record("speculation", 0.020 * 64, 64)
    ledger.record(7, True)
    warm = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    assert warm.measured_plain_pays()
    ledger.restart_clock()
    timed = OptimalStrideScheduler(asynchronous=True, confidence_z=1.28, ledger=ledger)
    assert not timed.measured_plain_pays()
    assert timed.steps is ledger.steps and ledger.steps.per_token("plain") is None
    assert ledger.trials() == (7, 1)
