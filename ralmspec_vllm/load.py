"""How loaded the retriever is, for the server's load-aware fallback.

Speculation trades retriever queries for waiting: a speculative request verifies several
steps in one call and, after a mismatch, verifies the replacements again, so it asks the
retriever for more queries than the baseline would (1.6x at 21M docs on the H200, session 14).
That trade pays while an extra query is nearly free: an exact flat scan is bound by memory
while few queries share it, so a search of 8 queries takes about as long as a search of 1.
Once the scan is bound by arithmetic instead, every extra query slows every search, the
retriever's queries per second become the server's limit, and speculation can only lose
(c=64: both methods drew the same ~67 queries/s, RaLMSpec finished 0.61x the requests).

The signal is how much slower the recent searches are than the fastest one seen: the
fastest is a search that had the retriever to itself, and a search that takes several times
as long shares it with a lot of arithmetic. ``RetrieverLoad`` keeps both from the batched
retriever's records; ``RaLMService`` runs a ``ralmspec`` request that starts while the
slowdown is above ``ServiceConfig.max_retriever_slowdown`` as the baseline (the same answer).
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable


class RetrieverLoad:
    """The slowdown of the retriever's recent searches against the fastest one seen.

    ``observe`` takes each merged search's duration (failed searches are ignored: an error
    can return at once). ``slowdown`` is the median of the last ``window`` searches, those no
    older than ``max_age_s``, divided by the fastest search so far; 1.0 with no recent
    search (an idle retriever is not loaded) and whenever the recent median is within
    ``min_excess_s`` of the fastest (a few milliseconds of jitter on a fast index are not
    load, and speculation saves little there anyway).
    """

    def __init__(
        self,
        window: int = 16,
        max_age_s: float = 30.0,
        min_excess_s: float = 0.01,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.max_age_s = max_age_s
        self.min_excess_s = min_excess_s
        self.clock = clock
        self.fastest = math.inf
        self.recent: deque[tuple[float, float]] = deque(maxlen=window)
        """(when, seconds) of the last searches."""

    def observe(self, search_s: float, ok: bool = True) -> None:
        if not ok or not search_s >= 0:
            return
        self.fastest = min(self.fastest, search_s)
        self.recent.append((self.clock(), search_s))

    def recent_median(self) -> float | None:
        """Median duration of the recent searches; None when there are none."""
        now = self.clock()
        times = [s for when, s in self.recent if now - when <= self.max_age_s]
        return statistics.median(times) if times else None

    def slowdown(self) -> float:
        median = self.recent_median()
        if median is None or median - self.fastest <= self.min_excess_s:
            return 1.0
        return median / self.fastest if self.fastest > 0 else math.inf
