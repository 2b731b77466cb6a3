"""``RetrieverLoad`` and ``LoopLoad``: the load signals of the server's fallback (fake clocks)."""

from __future__ import annotations

import pytest

from ralmspec_vllm.load import LoopLoad, RetrieverLoad


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


def test_the_encoders_busy_share_is_its_own_reading_with_its_own_limit() -> None:
    """The dev box's c=32 cell (session 48): the encoder worked ~0.97 s of every second
    while the calibrated price put the queries at 0.27 of the retriever (0.4 here)."""
    clock = Clock()
    load = RetrieverLoad(window_s=10.0, clock=clock)
    load.calibrate(0.0036, 0.0036 + 63 * 0.0036, 64)  # 3.6 ms a query
    busy = 100.0  # the counter runs from the retriever's start, warm-up included
    load.observe_encoder(busy)
    assert load.encoder_busy() == 0.0  # one reading is no share
    for _ in range(3):
        clock.now += 1.0
        busy += 0.97
        load.observe(75)
        load.observe_encoder(busy)
    assert load.encoder_busy() == pytest.approx(0.97)
    assert load.query_rate() * load.query_cost_s == pytest.approx(0.405)  # 112.5 q/s
    assert load.utilization() == pytest.approx(0.405)  # the queries' figure alone
    assert not load.busy(0.5) and not load.busy(None, None)
    assert load.busy(0.5, 0.8) and load.busy(None, 0.8)  # the encoder is full
    busy += 0.7  # a quieter second: 0.97+0.97+0.7 over 3 s is 0.88, still busy
    clock.now += 1.0
    load.observe_encoder(busy)
    assert load.busy(None, 0.8)
    for _ in range(12):  # the window keeps only its last 10 s: the encoder went quiet
        clock.now += 1.0
        busy += 0.05
        load.observe_encoder(busy)
    assert load.encoder_busy() == pytest.approx(0.05)
    assert not load.busy(None, 0.8)  # below 0.6 (three quarters of 0.8): released
    clock.now += 3.5  # no search returned, so nobody read the encoder: no load
    assert load.encoder_busy() == 0.0


def test_encoder_readings_need_a_span_and_start_over_after_a_restart() -> None:
    clock = Clock()
    load = RetrieverLoad(window_s=10.0, clock=clock, min_span_s=2.0)
    load.observe_encoder(50.0)
    clock.now += 1.0
    load.observe_encoder(51.0)
    assert load.encoder_busy() == 0.0  # 1 s spans less than the shortest rate
    clock.now += 1.0
    load.observe_encoder(0.5)  # a restarted retriever: its counter began again
    assert list(load.encoder) == [(2.0, 0.5)] and load.encoder_busy() == 0.0
    for _ in range(2):
        clock.now += 1.0
        load.observe_encoder(load.encoder[-1][1] + 0.5)
    assert load.encoder_busy() == pytest.approx(0.5)
    load.clear()  # the warm-up's readings are forgotten with its queries
    assert not load.encoder and load.utilization() == 0.0


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


class CpuClock(Clock):
    """A thread CPU clock the test advances alongside the wall clock."""


def test_loop_load_is_the_loop_threads_cpu_share_over_the_window() -> None:
    wall, cpu = Clock(), CpuClock()
    load = LoopLoad(window_s=5.0, min_span_s=1.0, min_gap_s=0.05, clock=wall, cpu_clock=cpu)
    assert load.fraction() == 0.0  # one sample: no rate yet
    for _ in range(5):  # 0.2 s apart, 0.15 s of CPU each: 75% of a core
        wall.now += 0.2
        cpu.now += 0.15
        load.sample()
    assert load.fraction() == pytest.approx(0.75) and load.last == pytest.approx(0.75)
    for _ in range(30):  # 6 s at 20%: the busy second has left the 5 s window
        wall.now += 0.2
        cpu.now += 0.04
        load.sample()
    assert load.fraction() == pytest.approx(0.2)
    kept = len(load.samples)
    assert kept in (25, 26)  # 5 s of samples 0.2 s apart
    wall.now += 0.01  # closer than min_gap_s: no new sample, the same reading
    cpu.now += 0.01
    assert load.fraction() == pytest.approx(0.2) and len(load.samples) == kept


def test_loop_load_reads_zero_until_samples_span_the_shortest_rate() -> None:
    """A lone request's first busy steps are not a load: nothing until ``min_span_s``."""
    wall, cpu = Clock(), CpuClock()
    load = LoopLoad(min_span_s=1.0, clock=wall, cpu_clock=cpu)
    load.sample()
    wall.now, cpu.now = 0.9, 0.9  # a whole core for 0.9 s
    assert load.fraction() == 0.0 and not load.busy(0.6)
    wall.now, cpu.now = 1.1, 1.1
    assert load.fraction() == pytest.approx(1.0) and load.busy(0.6)
    wall.now = 30.0  # quiet for longer than the window: one sample left, no rate
    assert load.fraction() == 0.0 and len(load.samples) == 1


def test_loop_load_busy_has_hysteresis() -> None:
    """Busy starts above the limit and ends only below RELEASE_FRACTION of it, so a server
    held near the limit does not flicker between speculating and not."""
    wall, cpu = Clock(), CpuClock()
    load = LoopLoad(window_s=1.0, min_span_s=0.5, min_gap_s=0.0, clock=wall, cpu_clock=cpu)
    load.sample()

    def run(share: float) -> bool:
        for _ in range(10):  # a whole 1 s window at this share
            wall.now += 0.1
            cpu.now += 0.1 * share
            load.sample()
        return load.busy(0.6)

    assert not run(0.55)  # below the limit
    assert run(0.65)  # above it: busy
    assert run(0.5)  # below the limit, above 0.75 of it: still busy
    assert not run(0.4)  # below 0.45: released
    assert not run(0.55)


def test_loop_load_samples_only_the_thread_that_sampled_first() -> None:
    """Another thread's CPU clock says nothing about the event loop's: its samples are
    ignored (a gauge read off the loop reads ``last`` instead)."""
    import threading

    wall, cpu = Clock(), CpuClock()
    load = LoopLoad(clock=wall, cpu_clock=cpu)
    load.sample()
    wall.now = 1.0
    worker = threading.Thread(target=load.sample)
    worker.start()
    worker.join()
    assert len(load.samples) == 1


def test_loop_load_checks_its_spans() -> None:
    with pytest.raises(ValueError, match="window_s"):
        LoopLoad(window_s=0)
    with pytest.raises(ValueError, match="min_span_s"):
        LoopLoad(window_s=1.0, min_span_s=2.0)
