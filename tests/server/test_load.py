"""``RetrieverLoad``: the load signal of the server's retriever fallback (fake clock)."""

from __future__ import annotations

import pytest

from ralmspec_vllm.load import RetrieverLoad


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_slowdown_is_the_recent_median_over_the_fastest_search() -> None:
    load = RetrieverLoad(window=4, clock=Clock())
    assert load.slowdown() == 1.0  # nothing seen: not loaded
    for s in (0.3, 0.28, 0.31):  # an idle 21M scan
        load.observe(s)
    assert load.fastest == 0.28
    assert load.slowdown() == pytest.approx(0.3 / 0.28)
    for s in (5.6, 5.2, 6.0):  # the same scan, arithmetic-bound (session 14, c=64)
        load.observe(s)
    assert load.recent_median() == pytest.approx((5.2 + 5.6) / 2)  # of 0.31, 5.6, 5.2, 6.0
    assert load.slowdown() == pytest.approx(5.4 / 0.28)
    load.observe(5.5)
    assert load.slowdown() > 15  # the window holds the last 4: all slow


def test_failed_searches_are_not_load() -> None:
    load = RetrieverLoad(clock=Clock())
    load.observe(0.2)
    load.observe(0.001, ok=False)  # an error can come back at once: not the fastest search
    load.observe(float("nan"))
    assert load.fastest == 0.2 and len(load.recent) == 1


def test_old_searches_age_out_and_jitter_is_not_load() -> None:
    clock = Clock()
    load = RetrieverLoad(max_age_s=30.0, min_excess_s=0.01, clock=clock)
    load.observe(0.1)
    load.observe(1.0)
    load.observe(1.0)
    assert load.slowdown() == pytest.approx(10.0)
    clock.now = 31.0  # nothing searched for 31 s: whatever was slow then is not load now
    assert load.recent_median() is None and load.slowdown() == 1.0
    fast = RetrieverLoad(min_excess_s=0.01, clock=clock)
    for s in (0.001, 0.004, 0.005):  # 4-5x the fastest, but only 3-4 ms more
        fast.observe(s)
    assert fast.slowdown() == 1.0
    for _ in range(4):  # now most recent searches are 29 ms slower: load
        fast.observe(0.03)
    assert fast.slowdown() == pytest.approx(30.0)


def test_window_must_hold_a_search() -> None:
    with pytest.raises(ValueError, match="window"):
        RetrieverLoad(window=0)
