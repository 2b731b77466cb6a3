"""How busy the retriever is, for the server's load-aware fallback.

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
``ServiceConfig.max_retriever_utilization`` as the baseline (the same answer).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

CALIBRATION_QUERIES = 64
"""Queries in the second calibration search: past the ~9 that a bf16 CPU scan answers for the
price of one on the H200 host, so the difference measures arithmetic, not memory."""


class RetrieverLoad:
    """The retriever's utilization by this server: recent queries/s x seconds per query.

    ``observe(n)`` records a merged search of ``n`` queries when it returns. ``query_cost_s``
    comes from ``calibrate``; before it (or at cost 0: extra queries are free) the
    utilization is 0.
    """

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        self.window_s = window_s
        self.clock = clock
        self.query_cost_s = 0.0
        """Seconds of retriever work one more query adds (``calibrate``)."""
        self.sent: deque[tuple[float, int]] = deque()
        """(when, queries) of the searches sent within the window."""

    def calibrate(self, one_s: float, many_s: float, many: int = CALIBRATION_QUERIES) -> float:
        """Set ``query_cost_s`` from a one-query and a ``many``-query search's durations."""
        if many < 2:
            raise ValueError(f"many must be >= 2, got {many}")
        self.query_cost_s = max(0.0, many_s - one_s) / (many - 1)
        return self.query_cost_s

    def observe(self, num_queries: int) -> None:
        now = self.clock()
        self.sent.append((now, num_queries))
        self._forget(now)

    def query_rate(self) -> float:
        """Queries per second sent over the last ``window_s``."""
        self._forget(self.clock())
        return sum(n for _, n in self.sent) / self.window_s

    def utilization(self) -> float:
        return self.query_rate() * self.query_cost_s

    def _forget(self, now: float) -> None:
        while self.sent and now - self.sent[0][0] >= self.window_s:
            self.sent.popleft()
