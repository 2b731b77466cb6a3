"""Prometheus metrics of the RaLM server, on prometheus_client's default registry.

vLLM registers its own ``vllm:*`` metrics on the same default registry, so one ``/metrics``
endpoint exposes both. Metric objects are module-level singletons (created at import, once per
process). Data flows in two ways:

- ``record_request(trace, ...)``: once per finished request, from its ``RequestTrace``
  (speculation hits/misses, rollbacks, discarded tokens, verification batches and latency,
  retrieval latency per purpose, chosen strides, prefix-cache hits).
- ``observe_batch(calls, queries, wait_s)``: from the server's cross-request
  ``BatchingRetriever`` each time it sends one merged retriever call.
- ``watch_retriever_utilization(fn)``, ``watch_loop_cpu(fn)``: the load signals of the server's
  fallback, per scrape.
- ``set_retriever_stats(stats)``: the retriever service's own counters (its index searches
  and the seconds its backend spent in them), fetched by ``/metrics`` before each scrape, so
  a reader can tell a slow index from slow RPCs or a busy event loop.

Speculation accuracy is ``hits / (hits + misses)``, computed by the reader from
``ralmspec_speculation_steps_total``; a per-request accuracy histogram is kept as well.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ralmspec_vllm.core.trace import RequestTrace
    from ralmspec_vllm.retrieval.batching import BatchStats

_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_STRIDE_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 16, 32)
_RATIO_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

REQUESTS = Counter(
    "ralmspec_requests",
    "Finished RaLM requests by method (baseline, ralmspec-PSA, ...) and outcome (ok, error,"
    " aborted: the client went away).",
    ["method", "outcome"],
)
REQUEST_LATENCY = Histogram(
    "ralmspec_request_latency_seconds",
    "End-to-end latency of a RaLM request (runner wall time).",
    ["method"],
    buckets=_LATENCY_BUCKETS,
)
GENERATED_TOKENS = Counter(
    "ralmspec_generated_tokens", "Verified answer tokens returned to clients.", ["method"]
)
SPECULATION_STEPS = Counter(
    "ralmspec_speculation_steps",
    "Speculated retrieval steps by verification outcome (hit: speculated doc was right).",
    ["outcome"],
)
SPECULATION_ACCURACY = Histogram(
    "ralmspec_speculation_accuracy",
    "Per-request speculation accuracy (hits / verified steps).",
    buckets=_RATIO_BUCKETS,
)
ROLLBACKS = Counter("ralmspec_rollbacks", "Rollbacks to the first mismatching step.")
TOKENS_DISCARDED = Counter(
    "ralmspec_tokens_discarded", "Generated tokens thrown away by rollbacks or aborted work."
)
LM_ABORTS = Counter("ralmspec_lm_aborts", "In-flight speculative LM calls cancelled.")
LOAD_FALLBACKS = Counter(
    "ralmspec_load_fallbacks",
    "ralmspec requests run as the baseline (the same answer) under load, by reason:"
    " speculating (max_speculating others were), retriever (busier than"
    " max_retriever_utilization) or server (its event loop busier than max_loop_cpu).",
    ["reason"],
)
for _reason in ("speculating", "retriever", "server"):
    LOAD_FALLBACKS.labels(_reason)  # exposed at 0 from the start
HELD_STEPS = Counter(
    "ralmspec_held_steps",
    "Steps of speculating requests run as plain retrieval because the retriever was busier"
    " than max_retriever_utilization or this server's event loop than max_loop_cpu"
    " (speculation held; the same answer).",
)
MEASURED_PLAIN_STEPS = Counter(
    "ralmspec_measured_plain_steps",
    "Steps of speculating requests run as plain retrieval because speculation measured"
    " slower per finalized token than plain steps, or too close to tell (the same answer).",
)
QUIET_STEPS = Counter(
    "ralmspec_quiet_steps",
    "Plain steps run as the baseline's, between two probes of a plain run"
    " (--plain-probe-every; the same answer).",
)
ROUTED_GUESSES = Counter(
    "ralmspec_routed_guesses",
    "Guesses ranked only among the cached documents the query's IVF search can reach"
    " (--route-guesses); changed: the exact best was unreachable (the same answer).",
    ["changed"],
)
LM_WAIT = Counter(
    "ralmspec_lm_wait_seconds",
    "Seconds a request had no LM call in flight (the critical path beside the LM), by what"
    " ran meanwhile: a guess, else a retriever call, else neither (bookkeeping).",
    ["cause"],
)
for _cause in ("guess", "retrieval", "other"):
    LM_WAIT.labels(_cause)  # exposed at 0 from the start
RETRIEVER_UTILIZATION = Gauge(
    "ralmspec_retriever_utilization",
    "How busy this server keeps the retriever: queries/s sent over the last 10 s x the"
    " seconds one more query costs it (calibrated at start); above max_retriever_utilization,"
    " ralmspec requests run as the baseline.",
)
ENCODER_BUSY = Gauge(
    "ralmspec_retriever_encoder_busy",
    "Share of the last 10 s the retriever's query encoder (one pass at a time) was busy, as"
    " read from its counters about once a second while searches return; above"
    " max_encoder_busy, ralmspec requests run as the baseline.",
)
LOOP_CPU = Gauge(
    "ralmspec_loop_cpu",
    "CPU share of a core this server's event-loop thread ran over the last 5 s (as last"
    " read); above max_loop_cpu, ralmspec requests run as the baseline.",
)
RETRIEVER_CALLS = Counter(
    "ralmspec_retriever_calls",
    "Calls this server sent to the retriever service, by RPC (Search, Encode, GetVectors,"
    " GetLists, GetDocuments, ...; a retried call counts once).",
    ["method"],
)
VERIFICATION_STEPS = Histogram(
    "ralmspec_verification_steps",
    "Speculated steps checked by one verification of one request.",
    buckets=_SIZE_BUCKETS,
)
VERIFICATION_LATENCY = Histogram(
    "ralmspec_verification_latency_seconds",
    "Latency of one batched verification, as seen by the request.",
    ["asynchronous"],
    buckets=_LATENCY_BUCKETS,
)
RETRIEVAL_LATENCY = Histogram(
    "ralmspec_retrieval_latency_seconds",
    "Latency of retriever calls by kind (search, score, documents, vectors) and purpose.",
    ["kind", "purpose"],
    buckets=_LATENCY_BUCKETS,
)
SPECULATION_STRIDE = Histogram(
    "ralmspec_speculation_stride",
    "Speculation stride chosen for each round (fixed or by the OS3 scheduler).",
    buckets=_STRIDE_BUCKETS,
)
PROMPT_TOKENS = Counter("ralmspec_lm_prompt_tokens", "Prompt tokens sent to the LM (all calls).")
PREFIX_CACHE_HIT_TOKENS = Counter(
    "ralmspec_prefix_cache_hit_tokens", "Prompt tokens the LM served from its prefix cache."
)
BATCH_CALLS = Histogram(
    "ralmspec_retriever_batch_calls",
    "Search calls from concurrent requests merged into one retriever RPC.",
    buckets=_SIZE_BUCKETS,
)
BATCH_QUERIES = Histogram(
    "ralmspec_retriever_batch_queries",
    "Queries in one merged retriever RPC.",
    buckets=_SIZE_BUCKETS,
)
BATCH_WAIT = Histogram(
    "ralmspec_retriever_batch_wait_seconds",
    "Time the oldest call of a merged batch waited before the RPC was sent.",
    buckets=_LATENCY_BUCKETS,
)

LM_SESSION_EVENTS = Counter(
    "ralmspec_lm_session_events",
    "Scheduler-hook LM sessions (lm_path=sessions) by event: opened, resumed (a paused"
    " sequence continued), rewound (a resume that truncated it: a rollback), closed.",
    ["event"],
)
LM_CHUNK_FIRST_OUTPUT = Histogram(
    "ralmspec_lm_chunk_first_output_seconds",
    "Scheduler-hook LM sessions: time from sending a chunk (open or resume) to its first"
    " output, i.e. pause/resume overhead plus prefill of the new tokens.",
    buckets=_LATENCY_BUCKETS,
)

METRIC_NAMES: tuple[str, ...] = (
    "ralmspec_requests_total",
    "ralmspec_request_latency_seconds",
    "ralmspec_generated_tokens_total",
    "ralmspec_speculation_steps_total",
    "ralmspec_speculation_accuracy",
    "ralmspec_rollbacks_total",
    "ralmspec_tokens_discarded_total",
    "ralmspec_lm_aborts_total",
    "ralmspec_load_fallbacks_total",
    "ralmspec_held_steps_total",
    "ralmspec_measured_plain_steps_total",
    "ralmspec_quiet_steps_total",
    "ralmspec_routed_guesses_total",
    "ralmspec_lm_wait_seconds_total",
    "ralmspec_retriever_utilization",
    "ralmspec_verification_steps",
    "ralmspec_verification_latency_seconds",
    "ralmspec_retrieval_latency_seconds",
    "ralmspec_speculation_stride",
    "ralmspec_lm_prompt_tokens_total",
    "ralmspec_prefix_cache_hit_tokens_total",
    "ralmspec_retriever_batch_calls",
    "ralmspec_retriever_batch_queries",
    "ralmspec_retriever_batch_wait_seconds",
)
"""Names as they appear in the exposition (counters get ``_total``)."""


def record_request(trace: RequestTrace, num_tokens: int) -> None:
    """Fold one finished request's trace into the metrics."""
    REQUESTS.labels(trace.mode, "ok").inc()
    REQUEST_LATENCY.labels(trace.mode).observe(trace.wall_time_s)
    GENERATED_TOKENS.labels(trace.mode).inc(num_tokens)
    SPECULATION_STEPS.labels("hit").inc(trace.speculation_hits)
    SPECULATION_STEPS.labels("miss").inc(trace.speculation_misses)
    accuracy = trace.speculation_accuracy
    if accuracy is not None:
        SPECULATION_ACCURACY.observe(accuracy)
    ROLLBACKS.inc(trace.rollbacks)
    TOKENS_DISCARDED.inc(trace.tokens_discarded)
    LM_ABORTS.inc(trace.lm_aborts)
    HELD_STEPS.inc(trace.held_steps)
    MEASURED_PLAIN_STEPS.inc(trace.measured_plain_steps)
    QUIET_STEPS.inc(trace.quiet_steps)
    ROUTED_GUESSES.labels("no").inc(trace.routed_guesses - trace.rerouted_guesses)
    ROUTED_GUESSES.labels("yes").inc(trace.rerouted_guesses)
    LM_WAIT.labels("guess").inc(trace.lm_wait_guess_s)
    LM_WAIT.labels("retrieval").inc(trace.lm_wait_retrieval_s)
    LM_WAIT.labels("other").inc(trace.lm_wait_other_s)
    for verification in trace.verifications:
        VERIFICATION_STEPS.observe(verification.num_steps)
        label = "true" if verification.asynchronous else "false"
        VERIFICATION_LATENCY.labels(label).observe(verification.latency_s)
    for call in trace.retrieval_calls:
        RETRIEVAL_LATENCY.labels(call.kind, call.purpose).observe(call.latency_s)
    for stride in trace.strides:
        SPECULATION_STRIDE.observe(stride)
    PROMPT_TOKENS.inc(trace.num_prompt_tokens)
    PREFIX_CACHE_HIT_TOKENS.inc(trace.num_cached_tokens)


def record_load_fallback(reason: str) -> None:
    """A ``ralmspec`` request that runs as the baseline under load (``speculating``,
    ``retriever``, ``server``: see ``RaLMService.fallback_reason``)."""
    LOAD_FALLBACKS.labels(reason).inc()


def watch_retriever_utilization(utilization: Callable[[], float]) -> None:
    """``ralmspec_retriever_utilization`` reads ``utilization()`` at each scrape (the latest
    service's, where a process builds several)."""
    RETRIEVER_UTILIZATION.set_function(utilization)


def watch_encoder_busy(share: Callable[[], float]) -> None:
    """``ralmspec_retriever_encoder_busy`` reads ``share()`` at each scrape."""
    ENCODER_BUSY.set_function(share)


def watch_loop_cpu(fraction: Callable[[], float]) -> None:
    """``ralmspec_loop_cpu`` reads ``fraction()`` at each scrape."""
    LOOP_CPU.set_function(fraction)


def count_retriever_call(method: str) -> None:
    """One call to the retriever service (``RetrieverClient.on_call``)."""
    RETRIEVER_CALLS.labels(method).inc()


def record_failure(method: str, outcome: str) -> None:
    """A request that ended without a trace (``error`` or ``aborted`` by its client)."""
    REQUESTS.labels(method, outcome).inc()


def observe_batch(calls: int, queries: int, wait_s: float) -> None:
    """One merged retriever RPC sent by the cross-request batcher."""
    BATCH_CALLS.observe(calls)
    BATCH_QUERIES.observe(queries)
    BATCH_WAIT.observe(wait_s)


class _RetrieverStats(Collector):
    """``ralmspec_retriever_*_total``: the retriever service's batch counters as of the
    last ``set_retriever_stats`` (absent until then)."""

    def __init__(self) -> None:
        self.stats: BatchStats | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        for name, doc, value in (
            ("search_calls", "Search RPCs the retriever service admitted.", s.search_calls),
            ("index_searches", "Index searches it ran for them (merged).", s.index_searches),
            ("queries", "Queries those index searches answered.", s.queries),
            ("search_seconds", "Seconds its backend spent in those index searches (the "
             "index's own work: no queueing, batching window or RPC).", s.search_seconds),
        ):  # fmt: skip
            yield CounterMetricFamily(f"ralmspec_retriever_{name}", doc, value=value)
        if not s.backend:
            return
        seconds = CounterMetricFamily(
            "ralmspec_retriever_backend_seconds",
            "Seconds the retriever's backend spent per phase (InfoResponse.backend_counters:"
            " encode, scan, rank, ...; scan_product/threshold/busy: a circular scan's walk).",
            labels=["phase"],
        )
        work = CounterMetricFamily(
            "ralmspec_retriever_backend_work",
            "Counts the retriever's backend keeps (searches; a circular scan's chunks walked"
            " and the query rows and cohorts on board summed over them).",
            labels=["counter"],
        )
        for key, value in sorted(s.backend.items()):
            if key.endswith("_s"):
                seconds.add_metric([key[:-2]], value)
            else:
                work.add_metric([key], value)
        yield seconds
        yield work


RETRIEVER_STATS = _RetrieverStats()
REGISTRY.register(RETRIEVER_STATS)


def set_retriever_stats(stats: BatchStats) -> None:
    """The retriever service's counters, for the next scrape."""
    RETRIEVER_STATS.stats = stats
