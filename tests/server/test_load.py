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
    assert load.query_rate() == pytest.approx(2.0) and load.utilization() == 0.0
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
