"""What happened while answering one question: ``RequestTrace`` and its mutable builder.

A request's code records into a ``TraceRecorder`` (plain counters and lists, no per-token
work); ``freeze`` turns it into an immutable ``RequestTrace`` of frozen dataclasses: which
document produced each token span, every retrieval-side call, every verification, the strides
chosen, rollbacks, discarded tokens, and where the time went.

Time accounting: ``lm_time_s`` sums the wall time of LM calls, ``retrieval_time_s`` that of
retriever calls (search, score, documents, vectors), ``speculation_time_s`` the local cache
ranking (query encoding + scoring). With asynchronous verification these overlap, so they can
add up to more than ``wall_time_s``; ``other_time_s`` is what none of them covers.
"""

from __future__ import annotations

from collections import Counter
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

    def retrieval(
        self, kind: CallKind, purpose: CallPurpose, num_queries: int, k: int, latency_s: float
    ) -> None:
        self.retrieval_calls.append(RetrievalCall(kind, purpose, num_queries, k, latency_s))
        self.retrieval_time_s += latency_s

    def lm(self, num_prompt_tokens: int, num_cached_tokens: int, latency_s: float) -> None:
        self.lm_calls += 1
        self.lm_time_s += latency_s
        self.num_prompt_tokens += num_prompt_tokens
        self.num_cached_tokens += num_cached_tokens

    def freeze(self, spans: tuple[TokenSpan, ...], wall_time_s: float) -> RequestTrace:
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
        )
