"""What happened while answering one question: ``RequestTrace`` and its mutable builder.

A request's code records into a ``TraceRecorder`` (plain counters and lists, no per-token
work); ``freeze`` turns it into an immutable ``RequestTrace`` of frozen dataclasses: which
document produced each token span, every retrieval-side call, every verification, the strides
chosen, rollbacks, discarded tokens, and where the time went.

Time accounting: ``lm_time_s`` sums the wall time of LM calls, ``retrieval_time_s`` that of
retriever calls (search, score, documents, vectors), ``speculation_time_s`` the local cache
ranking (query encoding + scoring). With asynchronous verification these overlap, so they can
add up to more than ``wall_time_s``; ``other_time_s`` is what none of them covers.

The critical path: ``lm_wait_*_s`` split the wall time during which the request had no LM
call in flight (the LM waited on it) by what was running meanwhile: a guess (query encoding
and cache ranking, or the retriever's ``score`` of the cache), else a retriever call, else
neither (bookkeeping, the event loop, preparing a rollback). The oracle's are ~0; the
baseline's are its searches; RaLMSpec's say what its speculation left exposed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

CallKind = Literal["search", "score", "documents", "vectors", "term_weights", "lists"]
CallPurpose = Literal["retrieve", "verify", "speculate", "prefetch"]


@dataclass(frozen=True, slots=True)
class TokenSpan:
    """Answer tokens ``[start, end)`` were generated with document ``doc_id`` in front."""

    start: int
    end: int
    doc_id: int | None


@dataclass(frozen=True, slots=True)
class RetrievalCall:
    """One call to the retriever (or the query encoder's cache-side equivalent)."""

    kind: CallKind
    purpose: CallPurpose
    num_queries: int
    k: int
    latency_s: float


@dataclass(frozen=True, slots=True)
class VerificationRecord:
    """One batched verification of ``num_steps`` speculated retrieval points."""

    stride: int
    """The speculation stride chosen for the round."""
    num_steps: int
    """Steps verified (fewer than ``stride`` when EOS or the length limit came first)."""
    matched: int
    """Steps before the first mismatch."""
    mismatch_step: int | None
    """Index within the round of the first wrong speculation; ``None`` when all matched."""
    latency_s: float
    asynchronous: bool


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """The immutable record of one request."""

    mode: str
    spans: tuple[TokenSpan, ...]
    retrieval_calls: tuple[RetrievalCall, ...]
    verifications: tuple[VerificationRecord, ...]
    strides: tuple[int, ...]
    speculation_hits: int
    speculation_misses: int
    rollbacks: int
    tokens_discarded: int
    """Tokens generated and then thrown away (rollbacks, discarded overlapped steps)."""
    lm_calls: int
    """Completed LM calls (each generates one step)."""
    lm_aborts: int
    """Speculative steps cancelled in flight because their verification failed (their LM
    call aborted); not counted in ``lm_calls``."""
    lm_time_s: float
    retrieval_time_s: float
    speculation_time_s: float
    wall_time_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    plain_steps: int = 0
    """Steps OS3 ran as plain retrieval (retrieve, then generate) because speculating at
    stride 1 without overlap can only cost time, or because the server held speculation
    while the retriever was busy (``held_steps``); not counted in ``strides``."""
    held_steps: int = 0
    """Of ``plain_steps``: those run plainly because the server held speculation
    (``RequestContext.speculation_held``: its retriever was busy)."""
    measured_plain_steps: int = 0
    """Of ``plain_steps``: those run plainly because speculation measured slower (or too
    close to tell) per finalized token (``OptimalStrideScheduler.measured_plain_pays``)."""
    quiet_steps: int = 0
    """Of ``plain_steps``: those run as the baseline's steps between two probes of a plain
    run (``SpeculationConfig.plain_probe_every``): no cache scoring, no cache insert."""
    routed_guesses: int = 0
    """Guesses ranked only among the cached documents the query's IVF search can reach
    (``SpeculationConfig.route_guesses``: every guess with ``True``, those the engine's
    ``RoutingGate`` picks with ``"auto"``)."""
    rerouted_guesses: int = 0
    """Of ``routed_guesses``: those whose exact best cached document was unreachable, so
    routing named another (or, with nothing reachable cached, kept a sure miss)."""
    cache_peak: int = 0
    """The most documents the request's speculation cache held (what a guess ranks: its
    scoring cost grows with it)."""
    lm_wait_guess_s: float = 0.0
    """Wall time with no LM call in flight while a guess ran (module docstring)."""
    lm_wait_retrieval_s: float = 0.0
    """Wall time with no LM call in flight while a retriever call ran (and no guess)."""
    lm_wait_other_s: float = 0.0
    """Wall time with no LM call in flight, no guess and no retriever call."""

    @property
    def step_doc_ids(self) -> tuple[int | None, ...]:
        """The document of each retrieval step, in order (what oracle mode takes)."""
        return tuple(span.doc_id for span in self.spans)

    @property
    def other_time_s(self) -> float:
        busy = self.lm_time_s + self.retrieval_time_s + self.speculation_time_s
        return max(0.0, self.wall_time_s - busy)

    @property
    def speculation_accuracy(self) -> float | None:
        total = self.speculation_hits + self.speculation_misses
        return self.speculation_hits / total if total else None

    @property
    def mean_stride(self) -> float | None:
        return sum(self.strides) / len(self.strides) if self.strides else None

    def num_calls(self, kind: CallKind | None = None) -> int:
        """Retriever calls of one kind (all kinds when ``None``)."""
        return sum(1 for c in self.retrieval_calls if kind is None or c.kind == kind)

    def call_counts(self) -> dict[str, int]:
        return dict(Counter(c.kind for c in self.retrieval_calls))

    def summary(self) -> dict[str, Any]:
        """Flat JSON-ready numbers (no per-call lists): for benchmarks and logs."""
        return {
            "mode": self.mode,
            "steps": len(self.spans),
            "wall_time_s": self.wall_time_s,
            "lm_time_s": self.lm_time_s,
            "retrieval_time_s": self.retrieval_time_s,
            "speculation_time_s": self.speculation_time_s,
            "other_time_s": self.other_time_s,
            "retrieval_calls": self.call_counts(),
            "verifications": len(self.verifications),
            "speculation_hits": self.speculation_hits,
            "speculation_misses": self.speculation_misses,
            "speculation_accuracy": self.speculation_accuracy,
            "mean_stride": self.mean_stride,
            "plain_steps": self.plain_steps,
            "held_steps": self.held_steps,
            "measured_plain_steps": self.measured_plain_steps,
            "quiet_steps": self.quiet_steps,
            "routed_guesses": self.routed_guesses,
            "rerouted_guesses": self.rerouted_guesses,
            "cache_peak": self.cache_peak,
            "lm_wait_guess_s": self.lm_wait_guess_s,
            "lm_wait_retrieval_s": self.lm_wait_retrieval_s,
            "lm_wait_other_s": self.lm_wait_other_s,
            "rollbacks": self.rollbacks,
            "tokens_discarded": self.tokens_discarded,
            "lm_calls": self.lm_calls,
            "lm_aborts": self.lm_aborts,
            "num_prompt_tokens": self.num_prompt_tokens,
            "num_cached_tokens": self.num_cached_tokens,
        }

    def to_dict(self) -> dict[str, Any]:
        """Everything, including spans, retrieval calls and verifications (JSON-ready)."""
        return asdict(self)


@dataclass(slots=True)
class TraceRecorder:
    """Mutable builder of a ``RequestTrace``; owned by one request."""

    mode: str
    retrieval_calls: list[RetrievalCall] = field(default_factory=list)
    verifications: list[VerificationRecord] = field(default_factory=list)
    strides: list[int] = field(default_factory=list)
    speculation_hits: int = 0
    speculation_misses: int = 0
    rollbacks: int = 0
    tokens_discarded: int = 0
    lm_calls: int = 0
    lm_aborts: int = 0
    lm_time_s: float = 0.0
    retrieval_time_s: float = 0.0
    speculation_time_s: float = 0.0
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    plain_steps: int = 0
    held_steps: int = 0
    measured_plain_steps: int = 0
    quiet_steps: int = 0
    routed_guesses: int = 0
    rerouted_guesses: int = 0
    cache_peak: int = 0
    lm_spans: list[tuple[float, float]] = field(default_factory=list)
    """``time.perf_counter()`` (start, end) of every LM call, aborted ones included."""
    guess_spans: list[tuple[float, float]] = field(default_factory=list)
    call_spans: list[tuple[float, float]] = field(default_factory=list)
    """Retriever calls other than a guess's (whose go to ``guess_spans``)."""

    def retrieval(
        self, kind: CallKind, purpose: CallPurpose, num_queries: int, k: int, latency_s: float
    ) -> None:
        """A retriever call of ``latency_s`` that ended just now."""
        self.retrieval_calls.append(RetrievalCall(kind, purpose, num_queries, k, latency_s))
        self.retrieval_time_s += latency_s
        now = time.perf_counter()
        spans = self.guess_spans if purpose == "speculate" else self.call_spans
        spans.append((now - latency_s, now))

    def lm(self, num_prompt_tokens: int, num_cached_tokens: int, latency_s: float) -> None:
        self.lm_calls += 1
        self.lm_time_s += latency_s
        self.num_prompt_tokens += num_prompt_tokens
        self.num_cached_tokens += num_cached_tokens

    def guessed(self, start: float) -> None:
        """A guess that began at ``start`` (``time.perf_counter()``) ended just now."""
        now = time.perf_counter()
        self.speculation_time_s += now - start
        self.guess_spans.append((start, now))

    def lm_waits(self, started: float, wall_time_s: float) -> tuple[float, float, float]:
        """(guess, retrieval, other) seconds of ``[started, started + wall_time_s]`` with no
        LM call in flight (``RequestTrace.lm_wait_guess_s`` and the two after it)."""
        lo, hi = started, started + wall_time_s
        idle = _complement(_union(self.lm_spans, lo, hi), lo, hi)
        guessing = _intersect(idle, _union(self.guess_spans, lo, hi))
        calling = _intersect(idle, _union(self.call_spans, lo, hi))
        guess = _length(guessing)
        retrieval = _length(calling) - _length(_intersect(calling, guessing))
        return guess, retrieval, max(0.0, _length(idle) - guess - retrieval)

    def freeze(
        self, spans: tuple[TokenSpan, ...], wall_time_s: float, started: float | None = None
    ) -> RequestTrace:
        """The immutable trace; with ``started`` (the request's ``time.perf_counter()``
        start) also the LM's waits (``lm_waits``)."""
        waits = (0.0, 0.0, 0.0) if started is None else self.lm_waits(started, wall_time_s)
        return RequestTrace(
            mode=self.mode,
            spans=spans,
            retrieval_calls=tuple(self.retrieval_calls),
            verifications=tuple(self.verifications),
            strides=tuple(self.strides),
            speculation_hits=self.speculation_hits,
            speculation_misses=self.speculation_misses,
            rollbacks=self.rollbacks,
            tokens_discarded=self.tokens_discarded,
            lm_calls=self.lm_calls,
            lm_aborts=self.lm_aborts,
            lm_time_s=self.lm_time_s,
            retrieval_time_s=self.retrieval_time_s,
            speculation_time_s=self.speculation_time_s,
            wall_time_s=wall_time_s,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
            plain_steps=self.plain_steps,
            held_steps=self.held_steps,
            measured_plain_steps=self.measured_plain_steps,
            quiet_steps=self.quiet_steps,
            routed_guesses=self.routed_guesses,
            rerouted_guesses=self.rerouted_guesses,
            cache_peak=self.cache_peak,
            lm_wait_guess_s=waits[0],
            lm_wait_retrieval_s=waits[1],
            lm_wait_other_s=waits[2],
        )


Intervals = list[tuple[float, float]]


def _union(spans: Iterable[tuple[float, float]], lo: float, hi: float) -> Intervals:
    """``spans`` clipped to ``[lo, hi]``, sorted and merged where they overlap."""
    merged: Intervals = []
    for start, end in sorted(spans):
        start, end = max(start, lo), min(end, hi)
        if end <= start:
            continue
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _complement(merged: Intervals, lo: float, hi: float) -> Intervals:
    """``[lo, hi]`` minus the sorted, disjoint ``merged``."""
    gaps: Intervals = []
    at = lo
    for start, end in merged:
        if start > at:
            gaps.append((at, start))
        at = max(at, end)
    if hi > at:
        gaps.append((at, hi))
    return gaps


def _intersect(a: Intervals, b: Intervals) -> Intervals:
    """The intersection of two sorted, disjoint interval lists."""
    out: Intervals = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _length(intervals: Intervals) -> float:
    return sum(end - start for start, end in intervals)
