"""Cross-request retrieval batching: many concurrent ``search`` calls, one retriever call.

``BatchingRetriever`` wraps an ``AsyncRetriever`` and implements it. ``search`` calls with the
same ``k`` and ``prefetch`` that arrive within ``window_s`` of the first one of a batch are
concatenated into ONE inner ``search`` call (at most ``max_batch_queries`` queries; a full
batch goes at once), and each caller gets its own slice back. A lone call waits at most
``window_s``. Calls with different ``k`` or ``prefetch`` are never merged (an approximate
index may rank the top-1 differently under a different k, and the prefetch hits may depend
on both). ``score``, ``documents``, ``vectors`` and ``info`` pass through.

Once every caller of an inner search has been cancelled, the inner search is cancelled too
(a retriever that can stops early: ``retrieval.abandon``). ``stats`` records every inner
search once it returned, failed or was cancelled (a ``BatchRecord``: k,
number of queries, number of callers merged, the longest time a caller waited before the batch
was sent, how long the inner call took, whether it succeeded); ``on_batch``, when given, is
called with the same record right after each inner search (the server feeds its Prometheus
metrics this way), before the callers are woken. An ``on_batch`` that raises is logged and
otherwise ignored: an observer never breaks a search.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.retrieval.base import AsyncRetriever, IVFRouting, TermWeights
from ralmspec_vllm.types import Document, Hit, RetrieverInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """One inner search call."""

    k: int
    num_queries: int
    num_callers: int
    max_wait_s: float
    """Longest time one of its callers waited before the call was sent."""
    search_s: float = 0.0
    """Duration of the inner ``search`` call (until its answer or error)."""
    ok: bool = True
    """False when the inner call raised (every caller got the error) or was cancelled
    because every caller had left."""
    prefetch: int = 0
    """Hits asked for after the exact top-k."""


@dataclass(slots=True)
class _Pending:
    queries: list[str]
    future: asyncio.Future[list[list[Hit]]]
    arrived: float


@dataclass(slots=True)
class _Batch:
    entries: list[_Pending] = field(default_factory=list)
    num_queries: int = 0
    timer: asyncio.TimerHandle | None = None


class BatchingRetriever:
    """An ``AsyncRetriever`` that merges concurrent searches into batched inner calls."""

    def __init__(
        self,
        inner: AsyncRetriever,
        window_s: float = 0.001,
        max_batch_queries: int = 256,
        keep_stats: int = 100_000,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch_queries < 1:
            raise ValueError(f"max_batch_queries must be positive, got {max_batch_queries}")
        self.inner = inner
        self.window_s = window_s
        self.max_batch_queries = max_batch_queries
        self.keep_stats = keep_stats
        self.on_batch = on_batch
        self.stats: list[BatchRecord] = []
        self._batches: dict[tuple[int, int], _Batch] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        queries = list(queries)
        if not queries:
            return []
        key = (k, prefetch)
        if len(queries) >= self.max_batch_queries:  # too big to merge with anything
            alone = _Pending(queries, _future(), time.perf_counter())
            await self._send(key, [alone])
            return await alone.future
        batch = self._batches.get(key)
        if batch is not None and batch.num_queries + len(queries) > self.max_batch_queries:
            self._flush(key)
            batch = None
        if batch is None:
            batch = self._batches[key] = _Batch()
            loop = asyncio.get_running_loop()
            batch.timer = loop.call_later(self.window_s, self._flush, key)
        pending = _Pending(queries, _future(), time.perf_counter())
        batch.entries.append(pending)
        batch.num_queries += len(queries)
        if batch.num_queries >= self.max_batch_queries:
            self._flush(key)
        return await pending.future

    def _flush(self, key: tuple[int, int]) -> None:
        batch = self._batches.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._send(key, batch.entries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, key: tuple[int, int], entries: list[_Pending]) -> None:
        """One inner call for ``entries``; delivers each caller's hits (or the error)."""
        live = [e for e in entries if not e.future.done()]  # skip callers already cancelled
        if not live:
            return
        k, prefetch = key
        queries = [q for e in live for q in e.queries]
        sent = time.perf_counter()
        max_wait_s = max(sent - e.arrived for e in live)

        def record(ok: bool) -> BatchRecord:
            return BatchRecord(
                k, len(queries), len(live), max_wait_s, _since(sent), ok=ok, prefetch=prefetch
            )

        inner = asyncio.ensure_future(self.inner.search(queries, k, prefetch))
        # every caller left (rollbacks, disconnects): cancel the inner search, which a
        # retriever that can stops early
        abandon.when_all_cancelled([e.future for e in live], inner.cancel)
        try:
            await asyncio.wait([inner])
        except asyncio.CancelledError:  # this sender itself (a caller awaiting it alone)
            inner.cancel()
            raise
        if inner.cancelled():
            self._record(record(ok=False))
            return
        try:
            results = inner.result()
            if len(results) != len(queries):
                raise ValueError(f"retriever answered {len(results)} lists for {len(queries)}")
        except Exception as exc:
            logger.debug("batched search of %d queries failed: %r", len(queries), exc)
            self._record(record(ok=False))
            for e in live:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        self._record(record(ok=True))
        offset = 0
        for e in live:
            part = results[offset : offset + len(e.queries)]
            offset += len(e.queries)
            if not e.future.done():
                e.future.set_result(part)

    def _record(self, record: BatchRecord) -> None:
        if len(self.stats) < self.keep_stats:
            self.stats.append(record)
        if self.on_batch is not None:
            try:
                self.on_batch(record)
            except Exception:
                logger.exception("on_batch observer failed on %s", record)

    async def info(self) -> RetrieverInfo:
        return await self.inner.info()

    async def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        return await self.inner.score(query, doc_ids)

    async def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        return await self.inner.documents(doc_ids)

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        return await self.inner.vectors(doc_ids)

    async def term_weights(self, doc_ids: Sequence[int]) -> list[TermWeights] | None:
        return await self.inner.term_weights(doc_ids)

    async def routing(self) -> IVFRouting | None:
        return await self.inner.routing()

    async def lists(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        return await self.inner.lists(doc_ids)


def _since(start: float) -> float:
    return time.perf_counter() - start


def _future() -> asyncio.Future[list[list[Hit]]]:
    return asyncio.get_running_loop().create_future()
