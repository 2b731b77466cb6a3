"""A model, not a measurement: batch-1 RaLMSpec time per answer under a verification schedule.

Used to decide what to measure on the GPU (session 9 notes,
``benchmarks/results/gpu/h200_session9_notes.md``). An answer is ``--steps`` retrieval steps;
the first is a plain search (b(1)) and a final LM step (a). Each speculation holds with
probability ``--gamma``. A verification of n queries costs b(n) (``--costs``):

- ``s8``: the multi-query costs measured in session 8's 21M run (OpenBLAS contention included);
- ``clean``: b(1) = 0.25 s and b(8) = 1.59 b(1) (the isolated probe's ratio), +1% a query beyond.

Policies (asynchronous verification, the LM speculating while a verification runs):

- ``stride S``: rounds of S steps, at most S speculated ahead (``overlap_depth="stride"`` with a
  fixed stride);
- ``fill``: up to ``--max-stride`` ahead, and the next round verifies all of it
  (``overlap_depth="fill"``); after a miss, S steps are generated before the first verification.

A miss costs the correction step. Cache scoring, contention and the LM step in flight when a
verification ends are left out. Given s8's costs, the model gives 3.44 s for stride 6, and s8
measured 3.49 s. Prints the mean time, the speed-up over the baseline (steps x (b(1) + a)) and
the rounds per answer.

    python benchmarks/simulate_pipeline.py --costs clean --a 0.0204 --gamma 0.915
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
from collections.abc import Callable

S8_COSTS = {1: 0.25, 2: 0.337, 3: 0.347, 4: 0.392, 5: 0.464, 6: 0.477, 7: 0.515, 8: 0.507}


def s8_cost(n: int) -> float:
    return S8_COSTS.get(n, S8_COSTS[8] + (n - 8) * 0.03)


def clean_cost(n: int) -> float:
    return 0.25 * (1 + 0.59 * min(n - 1, 7) / 7 + max(0, n - 8) * 0.01)


def answer_time(
    fill: bool,
    stride: int,
    max_stride: int,
    b: Callable[[int], float],
    a: float,
    gamma: float,
    steps: int,
    rng: random.Random,
) -> tuple[float, int]:
    """(seconds, verification rounds) for one simulated answer."""
    t = b(1) + a  # the first retrieval step is plain
    verified, pending, rounds = 1, 0, 0
    while verified < steps:
        if pending == 0:  # from nothing: generate the planned stride first
            pending = min(stride, steps - verified)
            t += pending * a
        n = min(pending, max_stride if fill else stride, steps - verified)
        duration = b(n)
        rounds += 1
        miss = next((i for i in range(n) if rng.random() > gamma), None)
        rest = pending - n
        room = max(0, (max_stride if fill else stride) - rest)
        ahead = min(room, max(1, math.ceil(duration / a)), max(0, steps - verified - pending))
        if miss is None:
            t += max(duration, ahead * a)
            verified, pending = verified + n, rest + ahead
        else:
            t += duration + a  # the regenerated step
            verified, pending = verified + miss + 1, 0
    return t, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--costs", choices=("s8", "clean"), default="clean")
    parser.add_argument("--a", type=float, default=0.0204, help="LM step, seconds")
    parser.add_argument("--gamma", type=float, default=0.915)
    parser.add_argument("--steps", type=int, default=27)
    parser.add_argument("--max-stride", type=int, default=16)
    parser.add_argument("--answers", type=int, default=4000)
    args = parser.parse_args()
    b = s8_cost if args.costs == "s8" else clean_cost
    baseline = args.steps * (b(1) + args.a)
    print(f"baseline {baseline:.2f} s ({args.costs} costs, a {1000 * args.a:.1f} ms, "
          f"gamma {args.gamma})")  # fmt: skip
    policies = [(False, s) for s in (4, 6, 8)] + [(True, s) for s in (1, 2, 4, 8, 16)]
    for fill, stride in policies:
        rng = random.Random(1)
        runs = [
            answer_time(fill, stride, args.max_stride, b, args.a, args.gamma, args.steps, rng)
            for _ in range(args.answers)
        ]
        mean = statistics.mean(t for t, _ in runs)
        name = f"fill, restart {stride}" if fill else f"stride {stride}"
        print(f"{name:<18} {mean:5.2f} s  {baseline / mean:5.2f}x  "
              f"{statistics.mean(r for _, r in runs):5.2f} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
