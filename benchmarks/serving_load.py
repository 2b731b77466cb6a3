"""Client-side load for ``bench_serving``: streamed requests, fixed concurrency or Poisson
arrivals, and one row of statistics per cell.

``ask`` sends one streamed ``/v1/completions`` request with the official ``openai`` async
client (greedy, ``max_tokens``, the method's ``ralm`` options, usage on the last chunk) and
returns a ``RequestRecord``: time to the first verified text, end-to-end latency, the answer
text, completion tokens and the server's per-request ``ralm`` summary. ``run_closed`` keeps
``concurrency`` requests in flight until its list is done; ``run_poisson`` starts requests at
exponentially spaced times (``rate`` per second, seeded); both stop starting new requests at
``deadline`` (requests in flight finish). ``summarize`` condenses one cell's records.

A request whose connection fails before any response byte (``never_answered``: connect
refused, reset or closed without a reply; typically a pooled keep-alive connection that
the server closed just as it was reused) is sent again on a new connection, at most
``RESEND_LIMIT`` times; the record counts the resends (``resends``) and each cell's row
sums them (``connection_resends``), so they stay visible. The client is built with
``max_retries=0``: the openai client's own retries would also resend on timeouts and 5xx
answers, uncounted. Errors after the first response byte are never retried.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from benchmarks.common import percentile

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Job:
    """One request to send: which question, with which method's ``ralm`` options."""

    qid: str
    question: str
    method: str
    ralm: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What one request took and returned (``error`` set when it failed)."""

    job: Job
    start_s: float
    """Send time, relative to the cell's start."""
    e2e_s: float
    ttft_s: float | None
    text: str
    completion_tokens: int
    ralm: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    resends: int = 0
    """Times the request was sent again after its connection failed unanswered."""

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first one (``None`` for one-token answers)."""
        if self.ttft_s is None or self.completion_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.completion_tokens - 1)


RESEND_LIMIT = 2
"""Resends of one request after unanswered connection failures (then it counts as failed)."""

_UNANSWERED = ("ConnectError", "ReadError", "WriteError")
"""httpx/httpx2 transport errors raised before the response's status line arrived (the
openai client wraps them in ``APIConnectionError``), by name: either package may be in use."""


def never_answered(err: BaseException) -> bool:
    """``err`` (from ``completions.create``, before the stream starts) says the connection
    failed before any response byte: not a timeout, the server did not answer at all.

    uvicorn closes an idle keep-alive connection without reading what arrived on it, so a
    request that crossed the close was not seen by the server (which logs nothing) and
    sending it again duplicates nothing. The same errors when the server died mid-request
    are the exception; then the resend fails too and the request still counts as failed.
    """
    import openai

    cause = err.__cause__
    if not isinstance(err, openai.APIConnectionError) or isinstance(err, openai.APITimeoutError):
        return False
    if cause is None or not type(cause).__module__.startswith("httpx"):
        return False
    name = type(cause).__name__
    return name in _UNANSWERED or (
        name == "RemoteProtocolError" and "without sending a response" in str(cause)
    )


async def _send(client: Any, model: str, job: Job, max_tokens: int) -> Any:
    """The request's stream (its status line and headers have arrived)."""
    return await client.completions.create(
        model=model,
        prompt=job.question,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ralm": dict(job.ralm)},
    )


async def ask(client: Any, model: str, job: Job, max_tokens: int, t0: float) -> RequestRecord:
    """One streamed completion (see module doc); failures become records with ``error``.
    Latencies run from the first send, resends included."""
    start = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    tokens = 0
    ralm: dict[str, Any] = {}
    resends = 0
    try:
        while True:
            try:
                stream = await _send(client, model, job, max_tokens)
                break
            except Exception as err:
                if resends >= RESEND_LIMIT or not never_answered(err):
                    raise
                resends += 1
                logger.warning(
                    "request %s (%s): connection failed unanswered (%r), resend %d",
                    job.qid, job.method, err.__cause__, resends,
                )  # fmt: skip
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                if ttft is None:
                    ttft = time.perf_counter() - start
                parts.append(chunk.choices[0].text)
            extra = chunk.model_extra or {}
            if extra.get("ralm"):
                ralm = dict(extra["ralm"])
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as err:
        logger.warning("request %s (%s) failed: %r", job.qid, job.method, err)
        return RequestRecord(
            job, start - t0, time.perf_counter() - start, ttft, "".join(parts), tokens,
            ralm, error=f"{type(err).__name__}: {err}", resends=resends,
        )  # fmt: skip
    e2e = time.perf_counter() - start
    return RequestRecord(job, start - t0, e2e, ttft, "".join(parts), tokens, ralm, resends=resends)


async def run_closed(
    client: Any,
    model: str,
    jobs: Sequence[Job],
    concurrency: int,
    max_tokens: int,
    deadline: float,
    records: list[RequestRecord],
) -> float:
    """``concurrency`` workers take jobs in order until none (or the deadline) is left,
    appending to ``records`` as requests finish. Returns the cell's wall time."""
    todo = list(reversed(jobs))
    t0 = time.perf_counter()

    async def worker() -> None:
        while todo and time.monotonic() < deadline:
            records.append(await ask(client, model, todo.pop(), max_tokens, t0))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - t0


async def run_poisson(
    client: Any,
    model: str,
    jobs: Sequence[Job],
    rate: float,
    max_tokens: int,
    deadline: float,
    records: list[RequestRecord],
    seed: int = 0,
) -> float:
    """Start the jobs at Poisson arrival times (``rate`` per second), no concurrency cap;
    records are appended as requests finish. Returns the cell's wall time."""
    rng = random.Random(seed)
    t0 = time.perf_counter()
    tasks: list[asyncio.Task[None]] = []

    async def one(job: Job) -> None:
        records.append(await ask(client, model, job, max_tokens, t0))

    due = 0.0
    for job in jobs:
        due += rng.expovariate(rate)
        delay = due - (time.perf_counter() - t0)
        if delay > 0:
            await asyncio.sleep(delay)
        if time.monotonic() >= deadline:
            break
        tasks.append(asyncio.create_task(one(job)))
    await asyncio.gather(*tasks)
    return time.perf_counter() - t0


def max_in_flight(records: Sequence[RequestRecord]) -> int:
    """Largest number of requests open at once."""
    events = sorted(
        [(r.start_s, 1) for r in records] + [(r.start_s + r.e2e_s, -1) for r in records]
    )
    most = now = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def _p(values: Sequence[float], q: float) -> float | None:
    return round(percentile(values, q), 4) if values else None


def _mean(values: Sequence[float], digits: int = 4) -> float | None:
    return round(sum(values) / len(values), digits) if values else None


def summarize(records: Sequence[RequestRecord], wall_s: float) -> dict[str, Any]:
    """Throughput, latency percentiles and mean per-request RaLM numbers of one cell."""
    ok = [r for r in records if not r.error]
    e2e = [r.e2e_s for r in ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [t for r in ok if (t := r.tpot_s) is not None]
    tokens = sum(r.completion_tokens for r in ok)
    usage = [r.ralm for r in ok if r.ralm]

    def mean_of(key: str) -> float | None:
        return _mean([float(u[key]) for u in usage if u.get(key) is not None])

    hits = sum(int(u.get("speculation_hits", 0)) for u in usage)
    misses = sum(int(u.get("speculation_misses", 0)) for u in usage)
    return {
        "num_requests": len(records),
        "failed": len(records) - len(ok),
        "connection_resends": sum(r.resends for r in records),
        "duration_s": round(wall_s, 3),
        "max_in_flight": max_in_flight(records),
        "requests_per_s": round(len(ok) / wall_s, 4) if wall_s > 0 else 0.0,
        "throughput_tok_s": round(tokens / wall_s, 3) if wall_s > 0 else 0.0,
        "mean_output_tokens": _mean([float(r.completion_tokens) for r in ok], 2),
        "ttft_p50_s": _p(ttft, 50),
        "ttft_p99_s": _p(ttft, 99),
        "tpot_p50_s": _p(tpot, 50),
        "p50_s": _p(e2e, 50),
        "p99_s": _p(e2e, 99),
        "mean_s": _mean(e2e),
        "lm_time_s": mean_of("lm_time_s"),
        "retrieval_time_s": mean_of("retrieval_time_s"),
        "server_wall_time_s": mean_of("wall_time_s"),
        "lm_wait_s": _lm_waits(usage),
        "retrieval_calls": mean_of("retrieval_calls"),
        "verifications_per_request": mean_of("verifications"),
        "speculation_accuracy": round(hits / (hits + misses), 4) if hits + misses else None,
        "rollbacks": mean_of("rollbacks"),
        "tokens_discarded": mean_of("tokens_discarded"),
        "mean_stride": mean_of("mean_stride"),
        "prefix_cached_fraction": _ratio(usage, "prefix_cached_tokens", "prompt_tokens_sent"),
    }


def _lm_waits(usage: Sequence[Mapping[str, Any]]) -> dict[str, float | None] | None:
    """Mean seconds a request had no LM call in flight, by cause (``ralm.lm_wait_s``)."""
    waits = [u["lm_wait_s"] for u in usage if u.get("lm_wait_s")]
    if not waits:
        return None
    return {cause: _mean([float(w[cause]) for w in waits]) for cause in waits[0]}


def _ratio(usage: Sequence[Mapping[str, Any]], num: str, den: str) -> float | None:
    total = sum(float(u.get(den, 0)) for u in usage)
    return round(sum(float(u.get(num, 0)) for u in usage) / total, 4) if total else None
