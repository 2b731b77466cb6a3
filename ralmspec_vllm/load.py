"""How busy the retriever and the server's event loop are, for the load-aware fallback.

Speculation trades retriever queries for waiting: a speculative request verifies several
steps in one call and, after a mismatch, verifies the replacements again, so it asks the
retriever for more queries than the baseline would (1.6x at 21M docs on the H200, session 14).
That trade pays while the retriever has room for them. Once it has none, its queries per
second cap the server, and speculation can only lose: H200, 21M docs, c=64, both methods drew
the same ~67 queries/s from the exact scan, and RaLMSpec finished 0.61x the answers.

Room is measured as utilization: the queries per second the server sends (over the last
``window_s``) times what one more query costs the retriever. That cost is calibrated once at
start-up from two searches, one query and ``CALIBRATION_QUERIES`` queries:
``(t_many - t_one) / (many - 1)``. For an exact flat scan a lone query costs a pass over
memory that a batch shares, so the difference is the arithmetic per query; for HNSW or BM25
it is about a query's own search. A slow retriever that is slow for reasons other than
queries (a CPU shared with the LM) therefore does not count as busy: on a 2-core machine,
3M docs, c=16, a slowdown-based rule gave up RaLMSpec's 1.16x although it sent no more
queries than the baseline.

``RaLMService`` runs a ``ralmspec`` request that starts while the utilization is above
``ServiceConfig.max_retriever_utilization`` as the baseline (the same answer), and requests
already speculating hold speculation (plain retrieval steps) while it is.

Busy has hysteresis (``busy``): it starts above the limit and ends only below
``RELEASE_FRACTION`` of it. A server held near the limit would otherwise flicker: H200, 21M,
c=64 and c=256 with the limit at 0.5, the utilization sat at 0.50-0.52, requests resumed
speculating at every dip, and RaLMSpec finished 0.92x and 0.80x the baseline's answers.

The rate reacts within seconds of a burst: until the window is full it is taken over the
time since the current spell of searches began (at least ``min_span_s``), not over the whole
window. Over a full window, 64 requests that arrive at once would read as ~1/5 of their rate
for the first two seconds and all start speculating (H200, 21M, c=64: 0.89x).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

RELEASE_FRACTION = 0.75
"""``busy`` ends once the utilization falls below this fraction of the limit it rose above."""

CALIBRATION_QUERIES = 64
"""Queries in the second calibration search: past the ~9 that a bf16 CPU scan answers for the
price of one on the H200 host, so the difference measures arithmetic, not memory."""


ENCODER_POLL_S = 1.0
"""How often, at most, the server reads the retriever's counters for ``observe_encoder``
(one ``Info`` call, sent as a search returns)."""

STALE_READING_S = 3.0
"""An encoder reading older than this (no search returned since) counts for nothing."""


def _still_busy(reading: float, limit: float, busy: bool) -> bool:
    """The signals' hysteresis: busy above ``limit`` (strictly); once ``busy``, until the
    reading falls to ``RELEASE_FRACTION`` of it."""
    return reading > (limit * RELEASE_FRACTION if busy else limit)


def _growth_rate(samples: deque[tuple[float, float]], min_span_s: float) -> float:
    """How fast a running total (CPU seconds, busy seconds) grew per second between the
    first and the last of its ``(when, total)`` samples; 0 while they span less than
    ``min_span_s`` (one sample spans nothing)."""
    (t0, v0), (t1, v1) = samples[0], samples[-1]
    return (v1 - v0) / (t1 - t0) if t1 - t0 >= min_span_s else 0.0


class RetrieverLoad:
    """The retriever's utilization by this server (recent queries/s x seconds per query),
    and its query encoder's busy share.

    ``observe(n)`` records a merged search of ``n`` queries when it returns. ``query_cost_s``
    comes from ``calibrate``; before it (or at cost 0: extra queries are free) the
    query-based figure is 0.

    ``observe_encoder(busy_s)`` records the retriever's ``encoder_busy_s`` counter (the
    seconds its one-at-a-time query encoder has worked since start), which the server reads
    about once a second while it searches. The calibration prices a query on an idle
    machine; where the encoder shares its cores with the LM it can cost several times that
    under load, and the encoder's busy share says so directly: 2-core box, IVF 20k docs,
    c=32, the encoder worked 20.6 s of the baseline cell's 21.2 s, ~13 ms a query against
    3.6 calibrated, while the utilization read 0.27; RaLMSpec, whose guesses and extra
    verifications all need the encoder, finished 0.77x (session 48). It has its own limit
    (``busy``'s ``encoder_limit``): an encoder answers each text alone, so a lone request
    can keep it 41% busy (c=1 on that box) and leave the rest for another. Only the encoder
    is read this way: index searches overlap (a circular scan serves many at once: 0.7-7.6
    search-seconds a second at 21M on the H100, session 32), so their share says nothing
    of room.
    """

    def __init__(
        self,
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        min_span_s: float | None = None,
    ) -> None:
        """``min_span_s``: default 2 s (or ``window_s`` if shorter)."""
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        min_span_s = min(2.0, window_s) if min_span_s is None else min_span_s
        if not 0 < min_span_s <= window_s:
            raise ValueError(f"min_span_s must be in (0, window_s], got {min_span_s}")
        self.window_s = window_s
        self.min_span_s = min_span_s
        """The shortest span a rate is taken over (a spell's first searches alone are not
        a rate)."""
        self.clock = clock
        self.query_cost_s = 0.0
        """Seconds of retriever work one more query adds (``calibrate``)."""
        self.sent: deque[tuple[float, int]] = deque()
        """(when, queries) of the searches returned within the window."""
        self._queries = 0
        """Sum of ``sent``'s queries."""
        self._spell_start = 0.0
        """When the first search since the window was last empty returned."""
        self._busy = False
        """What ``busy`` last answered for the utilization (its hysteresis)."""
        self._encoder_full = False
        """What ``busy`` last answered for the encoder."""
        self.encoder: deque[tuple[float, float]] = deque()
        """(when, the encoder's busy seconds) as read within the window."""

    def calibrate(self, one_s: float, many_s: float, many: int = CALIBRATION_QUERIES) -> float:
        """Set ``query_cost_s`` from a one-query and a ``many``-query search's durations."""
        if many < 2:
            raise ValueError(f"many must be >= 2, got {many}")
        self.query_cost_s = max(0.0, many_s - one_s) / (many - 1)
        return self.query_cost_s

    def observe(self, num_queries: int) -> None:
        now = self.clock()
        self._forget(now)
        if not self.sent:
            self._spell_start = now
        self.sent.append((now, num_queries))
        self._queries += num_queries

    def observe_encoder(self, busy_s: float) -> None:
        """A reading of the retriever's ``encoder_busy_s`` counter (a lower one than the
        last, from a restarted retriever, starts the readings over)."""
        now = self.clock()
        if self.encoder and busy_s < self.encoder[-1][1]:
            self.encoder.clear()
        self.encoder.append((now, busy_s))
        self._forget(now)

    def encoder_busy(self) -> float:
        """The encoder's busy share over the readings of the last ``window_s`` (0 until they
        span ``min_span_s``, or once the newest is ``STALE_READING_S`` old: no searches, no
        readings, no load)."""
        now = self.clock()
        self._forget(now)
        if not self.encoder or now - self.encoder[-1][0] > STALE_READING_S:
            return 0.0
        return _growth_rate(self.encoder, self.min_span_s)

    def clear(self) -> None:
        """Forget every search and encoder reading (as after a quiet window)."""
        self.sent.clear()
        self.encoder.clear()
        self._queries = 0
        self._busy = self._encoder_full = False

    def query_rate(self) -> float:
        """Queries per second over the last ``window_s``, or over the current spell of
        searches where that is shorter (but at least ``min_span_s``)."""
        now = self.clock()
        self._forget(now)
        if not self.sent:
            return 0.0
        span = min(self.window_s, max(self.min_span_s, now - self._spell_start))
        return self._queries / span

    def utilization(self) -> float:
        return self.query_rate() * self.query_cost_s

    def busy(self, limit: float | None, encoder_limit: float | None = None) -> bool:
        """The utilization above ``limit`` (strictly), or the encoder's busy share above
        ``encoder_limit``; each stays busy until it falls to ``RELEASE_FRACTION`` of its
        limit. ``None``: that reading is not consulted."""
        self._busy = limit is not None and _still_busy(self.utilization(), limit, self._busy)
        self._encoder_full = encoder_limit is not None and _still_busy(
            self.encoder_busy(), encoder_limit, self._encoder_full
        )
        return self._busy or self._encoder_full

    def _forget(self, now: float) -> None:
        while self.sent and now - self.sent[0][0] >= self.window_s:
            self._queries -= self.sent.popleft()[1]
        while self.encoder and now - self.encoder[0][0] >= self.window_s:
            self.encoder.popleft()


class LoopLoad:
    """How busy this server's event loop is: the CPU seconds its thread ran per second of
    wall time over the last ``window_s`` (``time.thread_time`` of the thread that samples).

    Speculation costs the server's own Python work as well as LM steps and retriever
    queries: a guess's ``Encode`` call, a search with a prefetch whose hits are decoded and
    whose vectors are fetched and cached, more LM calls. On a 2-core box that is ~4.8 ms of
    the server's CPU a step against the baseline's ~2.5 ms (session 47, py-spy). Every
    request shares the one event-loop thread, so once speculation fills it, every request
    waits for it: H100, IVF 1M docs, c=64, the server process ran 0.87-1.03 cores against
    the baseline's 0.47-0.50, a guess took 24-72 ms against ~4 ms alone, and RaLMSpec
    finished 0.59-0.75x the baseline's answers with the retriever 7% busy (so
    ``RetrieverLoad`` never fired).

    ``sample()`` is called from the event loop (each request start and speculation step
    asks ``busy``); samples closer than ``min_gap_s`` are skipped. Until samples span
    ``min_span_s`` the load reads 0 (a lone request's first steps are not a rate).
    """

    def __init__(
        self,
        window_s: float = 5.0,
        min_span_s: float = 1.0,
        min_gap_s: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        cpu_clock: Callable[[], float] = time.thread_time,
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if not 0 < min_span_s <= window_s:
            raise ValueError(f"min_span_s must be in (0, window_s], got {min_span_s}")
        self.window_s = window_s
        self.min_span_s = min_span_s
        self.min_gap_s = min_gap_s
        self.clock = clock
        self.cpu_clock = cpu_clock
        self.samples: deque[tuple[float, float]] = deque()
        """(wall, thread CPU) seconds, oldest first, within ``window_s`` of the newest."""
        self._thread: int | None = None
        """The thread whose CPU is sampled (the first to sample: the event loop's)."""
        self._busy = False
        self.last = 0.0
        """What ``fraction`` last read (for a gauge read off the loop)."""

    def sample(self) -> None:
        if self._thread is None:
            self._thread = threading.get_ident()
        elif threading.get_ident() != self._thread:
            return  # another thread's CPU clock says nothing about the loop's
        now = self.clock()
        if self.samples and now - self.samples[-1][0] < self.min_gap_s:
            return
        self.samples.append((now, self.cpu_clock()))
        while now - self.samples[0][0] > self.window_s:
            self.samples.popleft()

    def clear(self) -> None:
        """Forget every sample (as after the warm-up, whose one-off work is not a load)."""
        self.samples.clear()
        self._busy = False
        self.last = 0.0

    def fraction(self) -> float:
        """The loop thread's CPU share (1.0: a whole core) over the samples in the window,
        0 while they span less than ``min_span_s``."""
        self.sample()
        if not self.samples:  # asked off the loop's thread before it sampled again
            self.last = 0.0
            return 0.0
        self.last = _growth_rate(self.samples, self.min_span_s)
        return self.last

    def busy(self, limit: float) -> bool:
        """Above ``limit`` (strictly), or still above ``RELEASE_FRACTION`` of it after having
        been above it."""
        self._busy = _still_busy(self.fraction(), limit, self._busy)
        return self._busy
