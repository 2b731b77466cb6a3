"""The pipeline model (benchmarks/simulate_pipeline.py) against hand-computed answers."""

from __future__ import annotations

import random

import pytest

from benchmarks.simulate_pipeline import answer_time, clean_cost, s8_cost


def flat(n: int) -> float:
    return 0.2


@pytest.mark.parametrize(
    ("fill", "stride", "gamma", "seconds", "rounds"),
    [
        # first step 0.22; 4 steps (0.08) then a round of 4 (0.2) while 5 more are generated
        # (0.1, hidden); a round of those 5 (0.2)
        (True, 4, 1.0, 0.70, 2),
        # rounds of 3: 3 steps (0.06), then three rounds of 0.2, the next 3 hidden in each
        (False, 3, 1.0, 0.88, 3),
        # every speculation wrong, restart 1: each later step is a + b + the regenerated a
        (True, 1, 0.0, 0.22 + 9 * 0.24, 9),
    ],
)
def test_answer_time_hand_computed(
    fill: bool, stride: int, gamma: float, seconds: float, rounds: int
) -> None:
    t, r = answer_time(fill, stride, 16, flat, 0.02, gamma, 10, random.Random(0))
    assert t == pytest.approx(seconds) and r == rounds


def test_cost_curves_are_the_measured_points() -> None:
    assert s8_cost(1) == 0.25 and s8_cost(5) == 0.464 and s8_cost(10) == pytest.approx(0.567)
    assert clean_cost(1) == 0.25 and clean_cost(8) == pytest.approx(0.3975)
