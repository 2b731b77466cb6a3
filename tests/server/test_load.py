"""``RetrieverLoad``: the load signal of the server's retriever fallback (fake clock)."""

from __future__ import annotations

import pytest

from ralmspec_vllm.load import RetrieverLoad


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_calibration_prices_a_query_by_the_difference_of_two_searches() -> None:
    load = RetrieverLoad()
    # The H200's 21M bf16 scan: one query 0.27 s, 64 queries ~0.9 s.
    assert load.calibrate(0.27, 0.9, 64) == pytest.approx(0.01)
    assert load.calibrate(0.27, 0.25, 64) == 0.0  # a batch as cheap as one: queries are free
    with pytest.raises(ValueError, match="many"):
        load.calibrate(0.1, 0.2, 1)


def test_utilization_is_recent_query_rate_times_query_cost() -> None:
    clock = Clock()
    load = RetrieverLoad(window_s=10.0, clock=clock)
    assert load.utilization() == 0.0  # nothing sent
    for n in (4, 4, 12):  # no cost calibrated yet: not busy, however many
        load.observe(n)
    # a spell that has just begun is a rate over the shortest span (2 s), not the window
    assert load.query_rate() == pytest.approx(10.0) and load.utilization() == 0.0
    load.calibrate(0.27, 0.9, 64)  # 10 ms a query
    for _ in range(20):  # c=64's baseline at 21M: 68 queries/s, for 20 s
        clock.now += 1.0
        load.observe(68)
    assert load.query_rate() == pytest.approx(68.0)  # only the last 10 s count
    assert load.utilization() == pytest.approx(0.68)
    clock.now += 5.0
    assert load.utilization() == pytest.approx(0.34)  # half the window has gone quiet
    clock.now += 5.0
    assert load.utilization() == 0.0 and not load.sent


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        RetrieverLoad(window_s=0)


def test_a_burst_reads_as_its_rate_within_seconds_not_a_window_later() -> None:
    """64 requests arrive at once after a quiet spell (H200, 21M, c=64): their first
    searches return within a second, and the rate is taken over the time since, so the
    signal reaches ~0.6 at once instead of ~1/5 of it until the window fills."""
    clock = Clock()
    load = RetrieverLoad(window_s=10.0, clock=clock)
    load.calibrate(0.27, 0.9, 64)  # 10 ms a query
    load.observe(5)
    clock.now = 100.0  # quiet for longer than the window: a new spell
    assert load.utilization() == 0.0
    clock.now += 0.5
    load.observe(64)
    assert load.query_rate() == pytest.approx(32.0)  # over the 2 s shortest span
    clock.now += 1.5
    load.observe(64)
    assert load.utilization() == pytest.approx(0.64)
    clock.now += 2.0
    load.observe(128)
    assert load.query_rate() == pytest.approx(256 / 3.5)  # since the first returned
    clock.now += 20.0
    assert load.query_rate() == 0.0
    load.observe(10)  # the next spell starts afresh
    assert load.query_rate() == pytest.approx(5.0)
    load.clear()
    assert load.query_rate() == 0.0 and not load.sent


def test_spans_must_be_positive_and_fit_the_window() -> None:
    with pytest.raises(ValueError, match="min_span_s"):
        RetrieverLoad(window_s=10.0, min_span_s=0)
    with pytest.raises(ValueError, match="min_span_s"):
        RetrieverLoad(window_s=1.0, min_span_s=2.0)
    assert RetrieverLoad(window_s=1.0).min_span_s == 1.0


def test_busy_starts_above_the_limit_and_ends_below_three_quarters_of_it() -> None:
    """Hysteresis: a server held near its limit must not flicker between holding and
    speculating (H200, 21M, limit 0.5: utilization 0.50-0.52, 0.92x at c=64)."""
    clock = Clock()
    load = RetrieverLoad(window_s=10.0, clock=clock)
    load.calibrate(0.0, 0.63, 64)  # 10 ms a query
    load.observe(50)  # 50 queries over the shortest span (2 s): 0.25
    assert load.utilization() == pytest.approx(0.25) and not load.busy(0.4)
    load.observe(40)  # 0.45: above the limit
    assert load.busy(0.4)
    clock.now = 2.5  # 90 queries over 2.5 s: 0.36, below the limit, above 0.3
    assert load.utilization() == pytest.approx(0.36) and load.busy(0.4)
    clock.now = 3.2  # 0.28: below three quarters of the limit
    assert load.utilization() == pytest.approx(90 / 3.2 * 0.01) and not load.busy(0.4)
    load.observe(10)  # 0.31: between the two, and released: stays not busy
    assert load.utilization() == pytest.approx(100 / 3.2 * 0.01) and not load.busy(0.4)
    load.observe(40)  # 0.44: busy again
    assert load.busy(0.4)
    load.clear()  # a cleared window starts released
    assert not load.busy(0.4)
