"""Speculation stride: fixed, or chosen online by OS3 (the paper's optimal stride scheduler).

Per request, the speculative loop asks ``next_stride()`` before each round and reports each
speculation step's latency (``record_speculation``) and each verification's latency and
outcome (``record_verification``).

OS3, with a = latest speculation-step latency, b = latest verification latency and gamma the
probability that one speculation is right:

- expected verified steps per round: (1 - gamma^s) / (1 - gamma)
- synchronous objective: (1 - gamma^s) / ((1 - gamma)(s a + b))
- asynchronous objective: (1 - gamma^s) / ((1 - gamma)[gamma^s ((s-1) a + max(a, b))
  + (1 - gamma^s)(s a + b)])
- gamma over the last ``window`` verifications = matched / (matched + rounds with a mismatch),
  capped at ``gamma_max``.
- Not in the paper: with ``confidence_z`` set, gamma may rise above the cap to the Wilson
  lower confidence bound (``confidence_z`` standard errors) of the accuracy over the last
  ``evidence_window`` verifications (or less, if the window's own upper bound is lower: the
  accuracy drifted). The cap guards against a lucky short window; the bound
  does too, but lets a request whose speculations are right 90% of the time, over enough
  trials, plan strides of 10+ instead of ~5 (at 21M docs a verification costs ~0.5-1 s, so
  each round saved is worth 25 LM steps).
- Not in the paper: a ``StrideLedger`` shared by the requests of one engine and one
  speculation config pools their outcomes (the last ``capacity`` verifications) and latest
  a and b. A scheduler with ``confidence_z`` set starts from that evidence: its lower bound
  counts the pooled trials too, and its first round can already be long, where a lone
  request starts at stride 1 and needs ~20 trials of its own to pass the cap (an answer at
  retrieval stride 4 has only ~32 steps).
- Not in the paper, with ``confidence_z`` set: the verification latency b is modelled per
  batch size (latest latency per size, linear between and beyond the measured sizes)
  instead of "the latest b whatever its size", and the stride is the objective's best
  s in 1..max_stride (b(s) can jump). An exact CPU scan of 2-16 queries costs 2-3x one
  query in fp32 (MKL gemm vs gemv) but about one query in bf16 (AMX), and FAISS below 20
  queries is linear: one number cannot stand for both a single-query step and a long
  round. On a measured 3M-doc CPU run with a random-weight LM (accuracy 0.46) the
  size-blind OS3 speculated at stride ~3-4 and ended 0.93x the baseline.
- Not in the paper: with ``depth`` > 1 (or ``None``: the whole next round) the asynchronous
  objective counts the steps speculated ahead while a verification is in flight
  (``async_objective``); the paper overlaps one step.
- s starts at 1 (until gamma, a and b are known) and is searched upward from 1 while the
  objective does not drop, up to ``max_stride``.
- Not in the paper: at stride 1, ``prefers_plain_step`` compares speculating with a plain
  retrieval step, counting the regenerated step a miss costs (the paper's objective does
  not). Without overlap plain always wins at stride 1; with overlap it wins when misses
  are frequent and an LM step costs more than a verification (e.g. approximate retrieval).
- Not in the paper, with ``confidence_z`` set: ``measured_plain_pays`` checks the models
  against the clock. ``StepCosts`` keeps the seconds per finalized token that plain steps
  and speculation actually took, pooled over the engine's requests for a minute; where
  speculation measured slower, plain steps run whatever the model says (and where the two
  are close but plain steps are barely measured, plain steps run until they are). On the
  H100 (IVF at 1M, session 23) the model's margin for speculating was ~1 ms a step, less
  than the work it leaves out (inserts, verifications beside the next step, rollbacks):
  speculating ran at 0.93x the baseline. "Slower" means by more than ``confidence_z``
  standard errors of the two figures (``StepCosts.spread``): on one noisy comparison of a few
  dozen tokens the rule held five answers plain at 1M IVF (sessions 38 and 40), where
  speculation was the faster mode. Speculation not measured for ``REMEASURE_S``
  seconds is measured again rather than judged on its old figure (and so is a miss's cost,
  which ``prefers_plain_step_early`` weighs).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

_TINY = 1e-12  # unmeasurably fast latencies: avoid dividing by zero


class StrideScheduler(Protocol):
    def next_stride(self) -> int: ...

    def record_speculation(self, latency_s: float) -> None: ...

    def record_verification(
        self, latency_s: float, matched: int, mismatched: bool, size: int | None = None
    ) -> None: ...


class FixedStride:
    """The same stride every round (S off)."""

    def __init__(self, stride: int) -> None:
        if stride < 1:
            raise ValueError(f"stride must be positive, got {stride}")
        self.stride = stride

    def next_stride(self) -> int:
        return self.stride

    def record_speculation(self, latency_s: float) -> None:
        pass

    def record_verification(
        self, latency_s: float, matched: int, mismatched: bool, size: int | None = None
    ) -> None:
        pass


def expected_steps(s: int, gamma: float) -> float:
    """Expected correctly speculated steps in a round of stride ``s``: (1 - g^s) / (1 - g)."""
    return (1.0 - gamma**s) / (1.0 - gamma)


def sync_objective(s: int, gamma: float, a: float, b: float) -> float:
    """Verified steps per second with synchronous verification."""
    return expected_steps(s, gamma) / max(s * a + b, _TINY)


def async_objective(s: int, gamma: float, a: float, b: float, depth: int | None = 1) -> float:
    """Verified steps per second when ``depth`` steps of the next round (``None``: all of
    them) are speculated while the verification is in flight. On a round whose speculations
    all hold, those d = min(depth, s) steps cost max(b, d a) together, the other s - d cost
    a each; a round with a miss pays s a + b. ``depth=1`` is the paper's formula."""
    d = s if depth is None else min(depth, s)
    gs = gamma**s
    time = gs * (max(b, d * a) + (s - d) * a) + (1.0 - gs) * (s * a + b)
    return expected_steps(s, gamma) / max(time, _TINY)


def wilson_lower_bound(successes: int, trials: int, z: float) -> float:
    """Wilson score lower bound of a success probability; 0 with no trials."""
    return _wilson(successes, trials, z, -1.0) if trials > 0 else 0.0


def wilson_upper_bound(successes: int, trials: int, z: float) -> float:
    """Wilson score upper bound of a success probability; 1 with no trials."""
    return _wilson(successes, trials, z, 1.0) if trials > 0 else 1.0


def _wilson(successes: int, trials: int, z: float, sign: float) -> float:
    p = successes / trials
    z2n = z * z / trials
    centre = p + z2n / 2.0
    spread = z * math.sqrt(p * (1.0 - p) / trials + z2n / (4.0 * trials))
    return min(1.0, max(0.0, (centre + sign * spread) / (1.0 + z2n)))


def choose_stride(
    gamma: float,
    a: float,
    b: float | Callable[[int], float],
    max_stride: int,
    asynchronous: bool,
    depth: int | None = 1,
) -> int:
    """``b`` one latency (the paper): from s = 1, increase s while the objective does not
    drop (at most ``max_stride``). ``b`` the latency of a verification of s queries: the
    best s in 1..max_stride, since b(s) can jump (a CPU gemm of 2 queries costs 2-3x one)
    and make the objective dip before it rises."""

    def objective(s: int, b_s: float) -> float:
        if asynchronous:
            return async_objective(s, gamma, a, b_s, depth)
        return sync_objective(s, gamma, a, b_s)

    if callable(b):
        values = [objective(s, b(s)) for s in range(1, max_stride + 1)]
        return 1 + max(range(len(values)), key=lambda i: (values[i], -i))
    s = 1
    current = objective(1, b)
    while s < max_stride:
        candidate = objective(s + 1, b)
        if candidate < current:
            break
        s, current = s + 1, candidate
    return s


class VerificationCost:
    """Latest verification latency per batch size; b(s) interpolates linearly between the
    measured sizes, extends the last slope beyond them (never below the largest measured
    latency) and is flat below the smallest."""

    def __init__(self) -> None:
        self.latest: dict[int, float] = {}

    def record(self, size: int, latency_s: float) -> None:
        self.latest[size] = latency_s

    def __bool__(self) -> bool:
        return bool(self.latest)

    def __call__(self, s: int) -> float:
        if s in self.latest:
            return self.latest[s]
        sizes = sorted(self.latest)
        if s < sizes[0]:
            return self.latest[sizes[0]]
        if s > sizes[-1]:
            if len(sizes) == 1:
                return self.latest[sizes[0]]
            lo, hi = sizes[-2], sizes[-1]
            slope = (self.latest[hi] - self.latest[lo]) / (hi - lo)
            return max(self.latest[hi], self.latest[hi] + slope * (s - hi))
        hi = next(n for n in sizes if n > s)
        lo = max(n for n in sizes if n < s)
        t = (s - lo) / (hi - lo)
        return self.latest[lo] + t * (self.latest[hi] - self.latest[lo])


Mode = Literal["plain", "speculation", "first"]
"""``first``: a request's first step, a plain step that is dearer than the steady ones (a
fresh query's search, the prompt's first prefill): at 1M IVF on the H100 its search took
12.4 ms against 8.9 for later ones (session 25)."""

MEASURED_MIN_TOKENS = 32
"""Finalized tokens each mode needs measured before ``measured_plain_pays`` judges by them
(8 steps at the default retrieval stride)."""
EXPLORE_MARGIN = 0.2
"""Speculation measured within this fraction of the plain cost (or above it) is close
enough for plain steps to be measured until they have ``MEASURED_MIN_TOKENS``."""
REMEASURE_S = 10.0
"""Seconds after speculation's newest measured sample when ``measured_plain_pays`` stops
trusting its figure: it forgets it, and speculation runs (and is measured) again. Plain
steps measure only plain steps, so without this a figure taken on one or two unlucky
answers held every request plain for ``StepCosts``' whole horizon: on an H100 (session 37,
IVF-SQ8 at 21M) questions 3-23 ran every step plain, at the baseline's speed, against
1.20x for the answers after them."""


@dataclass(slots=True)
class _Sums:
    """Running sums over one mode's samples (asked at every decision point, between two
    steps): seconds, tokens, and for ``StepCosts.spread`` seconds^2, seconds * tokens and
    tokens^2."""

    seconds: float = 0.0
    tokens: int = 0
    ss: float = 0.0
    st: float = 0.0
    tt: int = 0

    def add(self, seconds: float, tokens: int, sign: int = 1) -> None:
        """Count a sample in (``sign`` 1) or out (-1)."""
        self.seconds += sign * seconds
        self.tokens += sign * tokens
        self.ss += sign * seconds * seconds
        self.st += sign * seconds * tokens
        self.tt += sign * tokens * tokens


class StepCosts:
    """Seconds per finalized token, measured for plain steps and for speculation (wall
    time from a decision point to the next, over the tokens finalized meanwhile, so that
    guesses, rollbacks, waits and whatever runs beside a step all count), pooled over the
    last ``horizon_s`` seconds. Old samples lapse, so the mode not chosen lately stops
    counting and the models decide again (and measure it again)."""

    def __init__(
        self,
        horizon_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        capacity: int = 1024,
    ) -> None:
        if horizon_s <= 0:
            raise ValueError(f"horizon_s must be positive, got {horizon_s}")
        self.horizon_s = horizon_s
        self._clock = clock
        self._capacity = capacity
        modes: tuple[Mode, ...] = get_args(Mode)
        self._samples: dict[Mode, deque[tuple[float, float, int]]] = {m: deque() for m in modes}
        self._sums: dict[Mode, _Sums] = {m: _Sums() for m in modes}

    def record(self, mode: Mode, seconds: float, tokens: int) -> None:
        """``tokens`` finalized in ``seconds`` of ``mode`` (nothing for no tokens)."""
        if tokens > 0:
            if len(self._samples[mode]) == self._capacity:
                self._drop_oldest(mode)
            seconds = max(seconds, 0.0)
            self._samples[mode].append((self._clock(), seconds, tokens))
            self._sums[mode].add(seconds, tokens)

    def per_token(self, *modes: Mode) -> tuple[float, int] | None:
        """(seconds per token, tokens measured) within the horizon, over ``modes`` pooled;
        ``None`` if none."""
        for mode in modes:
            self._lapse(mode)
        tokens = sum(self._sums[m].tokens for m in modes)
        if not tokens:
            return None
        return sum(self._sums[m].seconds for m in modes) / tokens, tokens

    def spread(self, mode: Mode) -> float:
        """The standard error of ``per_token(mode)``'s figure, from how its samples (one a
        decision point) scatter about it: the ratio estimator's, sqrt(n / (n - 1) *
        sum((s_i - p t_i)^2)) / sum(t_i). 0.0 with fewer than two samples (nothing to tell
        the scatter by)."""
        self._lapse(mode)
        n, sums = len(self._samples[mode]), self._sums[mode]
        if n < 2:
            return 0.0
        p = sums.seconds / sums.tokens
        residual = max(sums.ss - 2.0 * p * sums.st + p * p * sums.tt, 0.0)  # sum((s_i-p t_i)^2)
        return math.sqrt(n / (n - 1) * residual) / sums.tokens

    def age(self, mode: Mode) -> float | None:
        """Seconds since ``mode``'s newest sample; ``None`` if it has none."""
        samples = self._samples[mode]
        return self._clock() - samples[-1][0] if samples else None

    def forget(self, mode: Mode) -> None:
        """Drop every sample of ``mode``."""
        self._samples[mode].clear()
        self._sums[mode] = _Sums()

    def _lapse(self, mode: Mode) -> None:
        """Drop ``mode``'s samples older than the horizon."""
        cutoff = self._clock() - self.horizon_s
        samples = self._samples[mode]
        while samples and samples[0][0] < cutoff:
            self._drop_oldest(mode)

    def _drop_oldest(self, mode: Mode) -> None:
        _, seconds, tokens = self._samples[mode].popleft()
        # the float sums restart at 0 with the deque, so rounding never outlives the samples
        if not self._samples[mode]:
            self._sums[mode] = _Sums()
        else:
            self._sums[mode].add(seconds, tokens, sign=-1)


def _count(outcomes: Iterable[tuple[int, bool]]) -> tuple[int, int]:
    """(matched steps, rounds with a mismatch) of ``(matched, mismatched)`` outcomes."""
    matched = mismatches = 0
    for m, bad in outcomes:
        matched += m
        mismatches += bad
    return matched, mismatches


class StrideLedger:
    """Speculation outcomes and latencies pooled over requests (one engine, one config)."""

    def __init__(self, capacity: int = 200, clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._outcomes: deque[tuple[int, bool]] = deque(maxlen=capacity)
        self.clock = clock
        self.a: float | None = None
        self.b: float | None = None
        self.miss: float | None = None
        """Early verification: the latest miss's cost (``OptimalStrideScheduler.miss``)."""
        self.miss_at: float | None = None
        """When ``miss`` was measured (``clock``)."""
        self.cost = VerificationCost()
        self.steps = StepCosts(clock=clock)
        """What plain steps and speculation measured (``measured_plain_pays``)."""

    def record(self, matched: int, mismatched: bool) -> None:
        self._outcomes.append((matched, mismatched))

    def restart_clock(self) -> None:
        """Forget what plain steps and speculation measured (``steps``) and the latest
        miss's cost, keeping the pooled outcomes and the latest a and b (which the next
        plain or speculated step replaces). For after a warm-up: its steps pay one-off
        costs (kernels compiled on first use, first captures, the first abort).
        ``measured_plain_pays`` would follow them for ``StepCosts``' whole horizon: on an
        H100 (session 35, 21M IVF) a warm-up measured speculation slower than plain steps,
        and the first 16 timed answers ran every step plain. And the warm-up's miss would
        steer ``prefers_plain_step_early`` until a timed miss replaced it, which plain steps
        never produce: in session 37 the first 8 timed answers ran plain that way (7 of them
        every step), until the pooled accuracy's lower bound had climbed enough to outweigh
        it."""
        self.steps = StepCosts(clock=self.clock)
        self.miss = self.miss_at = None

    def trials(self) -> tuple[int, int]:
        """(matched steps, rounds with a mismatch) over the pooled verifications."""
        return _count(self._outcomes)


class OptimalStrideScheduler:
    """OS3: estimates gamma, a and b online and maximises the objective."""

    def __init__(
        self,
        window: int = 5,
        gamma_max: float = 0.6,
        max_stride: int = 10,
        asynchronous: bool = False,
        confidence_z: float | None = None,
        evidence_window: int = 20,
        ledger: StrideLedger | None = None,
        depth: int | None = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``depth``: steps speculated ahead during a verification (``None``: the whole
        next round), see ``async_objective``. ``clock`` dates a miss's cost (the ledger's
        clock where there is a ledger)."""
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        if not 0.0 <= gamma_max < 1.0:
            raise ValueError(f"gamma_max must be in [0, 1), got {gamma_max}")
        if max_stride < 1:
            raise ValueError(f"max_stride must be positive, got {max_stride}")
        if confidence_z is not None and not confidence_z > 0.0:
            raise ValueError(f"confidence_z must be positive or None, got {confidence_z}")
        if evidence_window < window:
            raise ValueError(f"evidence_window must be >= window ({window}), got {evidence_window}")
        if depth is not None and depth < 1:
            raise ValueError(f"depth must be positive or None, got {depth}")
        self.depth = depth
        self.confidence_z = confidence_z
        self.gamma_max = gamma_max
        self.max_stride = max_stride
        self.asynchronous = asynchronous
        self._window = window
        self._outcomes: deque[tuple[int, bool]] = deque(maxlen=evidence_window)
        self.a: float | None = None
        self.b: float | None = None
        self.miss: float | None = None
        self._miss_at: float | None = None
        self._clock = ledger.clock if ledger is not None else clock
        # The pooled evidence counts only with the lower bound on (the paper's OS3 is alone).
        self._ledger = ledger if confidence_z is not None else None
        self._prior = (0, 0)
        # b per batch size (extended OS3 only): shared with the ledger when there is one.
        self.cost: VerificationCost | None = None
        self.steps: StepCosts | None = None
        if confidence_z is not None:
            self.cost = ledger.cost if ledger is not None else VerificationCost()
            self.steps = ledger.steps if ledger is not None else StepCosts()
        if self._ledger is not None:
            self._prior = self._ledger.trials()
            self.a, self.b, self.miss = self._ledger.a, self._ledger.b, self._ledger.miss
            self._miss_at = self._ledger.miss_at

    def _trials(self, last: int) -> tuple[int, int]:
        """(matched steps, rounds with a mismatch) over the last ``last`` verifications."""
        return _count(list(self._outcomes)[-last:])

    @property
    def accuracy(self) -> float | None:
        """Measured speculation accuracy over the window, uncapped; ``None`` before any."""
        matched, mismatches = self._trials(self._window)
        if matched + mismatches == 0:
            return None
        return matched / (matched + mismatches)

    @property
    def accuracy_lower_bound(self) -> float | None:
        """Wilson lower bound of the accuracy over the evidence window plus the ledger's
        trials from before this request (``None`` if off or without any trial)."""
        matched, mismatches = self._trials(len(self._outcomes))
        matched, mismatches = matched + self._prior[0], mismatches + self._prior[1]
        if self.confidence_z is None or matched + mismatches == 0:
            return None
        return wilson_lower_bound(matched, matched + mismatches, self.confidence_z)

    def prefers_plain_step(self) -> bool:
        """Whether a plain retrieval step beats speculating one step (stride 1).

        Per produced step, plain costs a + b. Speculating costs, without overlap,
        g (a + b) + (1 - g)(2a + b) (a miss regenerates the step), which is never less; with
        overlap, g max(a, b) + (1 - g)(2a + b): the next step hides the verification on a hit,
        a miss still pays the step, the verification and the regenerated step.
        g is ``plain_step_accuracy``.
        """
        g, a, b = self.plain_step_accuracy, self.a, self.b
        if g is None or a is None or b is None:
            return False
        hit = max(a, b) if self.asynchronous else a + b
        return g * hit + (1.0 - g) * (2.0 * a + b) > a + b

    def prefers_plain_step_early(self) -> bool:
        """``prefers_plain_step`` under early verification, where a step's search runs
        beside the step itself: a hit costs max(a, b); a miss costs m, measured
        (``record_miss``: from the guess to the end of the regenerated step, so the aborted
        call's lost work and the abort's own latency count). Plain still costs a + b.
        Before a miss has been measured, speculating is taken to pay (with a free abort a
        miss costs about a plain step). On the H200 an aborted vLLM step cost ~17 ms more
        than that (session 20, HNSW at 1M, accuracy 0.41): speculating lost 14%. The rule
        leans to plain steps: m's regenerated step always starts a new document (a full
        prefill), while a, taken mostly from hits, often continues the previous one. An m
        measured over ``REMEASURE_S`` ago counts as unmeasured (``_miss_stale``)."""
        g, a, b, m = self.plain_step_accuracy, self.a, self.b, self.miss
        if g is None or a is None or b is None or m is None or self._miss_stale():
            return False
        return g * max(a, b) + (1.0 - g) * m > a + b

    def _miss_stale(self) -> bool:
        """Whether the miss's cost was measured over ``REMEASURE_S`` ago. Only a speculated
        miss measures it, and plain steps, which this cost may be choosing, make none: an
        outlier miss would otherwise hold requests plain until the accuracy's lower bound
        outweighed it (session 37: the first timed answer's 31 steps, priced by the
        warm-up's miss; answers 24-27, by a miss a minute old). Stale, it counts as
        unmeasured, so speculation runs until a miss measures it again."""
        return self._miss_at is not None and self._clock() - self._miss_at > REMEASURE_S

    def measured_plain_pays(self) -> bool:
        """Extended OS3 only: whether the measured costs (``StepCosts``) call for a plain
        step, whatever the models say: speculation measured slower per finalized token than
        plain steps, each over at least ``MEASURED_MIN_TOKENS``, by more than
        ``confidence_z`` standard errors of the difference (``StepCosts.spread``; until
        then the models decide, and speculation is measured further); or speculation measured and
        within ``EXPLORE_MARGIN`` of (or above) what plain steps cost as far as measured,
        first steps included, while the steady plain steps are not measured enough yet (a
        request's first step is a plain step, so there is always a first figure). First
        steps only start the exploring: they cost more than the steady plain steps (a fresh
        search, the first prefill), and judged against them speculation that lost 6% to the
        baseline measured as the cheaper mode (IVF at 1M, sessions 23-25). A plain step
        risks little where the two are close; at 21M docs a plain step costs several
        speculated ones, and this never fires. A speculation figure with no sample in the
        last ``REMEASURE_S`` seconds is forgotten instead of judged, so that speculation is
        measured again: while this rule holds requests plain, nothing else re-measures it."""
        if self.steps is None:
            return False
        speculation = self.steps.per_token("speculation")
        if speculation is None or speculation[1] < MEASURED_MIN_TOKENS:
            return False
        age = self.steps.age("speculation")
        if age is not None and age > REMEASURE_S:  # not run lately: measure it again
            self.steps.forget("speculation")
            return False
        plain = self.steps.per_token("plain")
        if plain is not None and plain[1] >= MEASURED_MIN_TOKENS:
            # Slower by more than the figures' noise: a few dozen tokens of each decide
            # REMEASURE_S of steps, and at batch 1 their scatter (hits, misses, the host's
            # drift) is larger than the few percent between the two modes where they are
            # close (s38, s40b: 1M IVF held answers 2-6 plain on one noisy comparison).
            z = self.confidence_z or 0.0
            noise = math.hypot(self.steps.spread("speculation"), self.steps.spread("plain"))
            return speculation[0] > plain[0] + z * noise
        reference = self.steps.per_token("plain", "first")
        return reference is not None and speculation[0] > reference[0] * (1.0 - EXPLORE_MARGIN)

    @property
    def plain_step_accuracy(self) -> float | None:
        """The g that decides plain step against speculated step: with the extended OS3,
        the accuracy's lower bound over the request's evidence and the pooled trials (so a
        request's first steps know what its predecessors measured, and a lucky run of the
        5-step window does not tip it); the paper's OS3 uses the window's accuracy. The
        costs are lopsided: a wrong speculation loses a whole step, a needless plain step
        only its search. HNSW at 200k on the dev machine (accuracy ~0.6 against a
        break-even ~0.96) rolled back 1.33 times an answer with the window alone."""
        bound = self.accuracy_lower_bound
        return self.accuracy if bound is None else bound

    @property
    def gamma(self) -> float | None:
        """Estimated speculation accuracy; ``None`` before any verification (own or pooled).

        The paper: the window's accuracy, capped at ``gamma_max``. With ``confidence_z``:
        at least the lower bound over the evidence window and the pooled trials, unless the
        window is significantly worse (its upper bound is lower: the accuracy drifted)."""
        matched, mismatches = self._trials(self._window)
        if matched + mismatches == 0:
            matched, mismatches = self._prior  # pooled, until the request has its own
        if matched + mismatches == 0:
            return None
        capped = min(matched / (matched + mismatches), self.gamma_max)
        bound = self.accuracy_lower_bound
        if bound is None or self.confidence_z is None:
            return capped
        recent = wilson_upper_bound(matched, matched + mismatches, self.confidence_z)
        return max(capped, min(bound, recent))

    def next_stride(self) -> int:
        gamma = self.gamma
        if gamma is None or self.a is None or self.b is None:
            return 1
        b: float | VerificationCost = self.cost if self.cost else self.b
        return choose_stride(gamma, self.a, b, self.max_stride, self.asynchronous, self.depth)

    def fill_restart(self, max_stride: int) -> int | None:
        """Steps to generate before the first verification of a round that starts from
        nothing, with ``overlap_depth="fill"`` (after which rounds follow each other): those
        the LM generates in a third of a one-query verification, b(1) / 3a, in 1..max_stride.
        The verifier idles while they are generated; fewer make more, smaller rounds. In
        ``benchmarks/simulate_pipeline.py`` this was the best restart in each regime tried:
        b(1) from 0.01 to 1 s, a 20-27 ms, accuracy 0.8-0.92 (restarting with the planned
        stride instead, 10-16 at 21M docs, cost 5-12% there). ``None`` before a and b are
        known."""
        b1 = self.search_cost
        if self.a is None or b1 is None:
            return None
        return max(1, min(max_stride, round(b1 / (3.0 * max(self.a, _TINY)))))

    @property
    def search_cost(self) -> float | None:
        """b(1), a one-query search: from the cost per batch size where it is kept (extended
        OS3), else the latest verification's; ``None`` before any."""
        return self.cost(1) if self.cost else self.b

    def record_search(self, latency_s: float, size: int = 1) -> None:
        """A plain search's latency (e.g. the first retrieval): a point of b(s) only."""
        if self.cost is not None:
            self.cost.record(size, latency_s)

    def record_miss(self, latency_s: float) -> None:
        """Early verification: what the latest miss cost, from its guess to the end of
        the regenerated step (``prefers_plain_step_early``'s m)."""
        self.miss, self._miss_at = latency_s, self._clock()
        if self._ledger is not None:
            self._ledger.miss, self._ledger.miss_at = latency_s, self._miss_at

    def record_speculation(self, latency_s: float) -> None:
        self.a = latency_s
        if self._ledger is not None:
            self._ledger.a = latency_s

    def record_verification(
        self, latency_s: float, matched: int, mismatched: bool, size: int | None = None
    ) -> None:
        self.b = latency_s
        if self.cost is not None and size is not None:
            self.cost.record(size, latency_s)
        self._outcomes.append((matched, mismatched))
        if self._ledger is not None:
            self._ledger.b = latency_s
            self._ledger.record(matched, mismatched)
