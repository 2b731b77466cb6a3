"""Cross-request batching: concurrent Search calls merged into one index search.

A ``SearchLane`` owns one kind of query (text or embeddings). ``submit`` queues a request
and awaits its slice of the answer. The lane's task takes the oldest queued request, waits
until ``window_s`` after it arrived (or until ``max_batch`` queries are queued), then runs ONE
index search over everything queued, with k = the largest requested k, in a worker thread so
the event loop keeps accepting calls. Each request gets its own rows, cut to its own k.

While a search runs, new requests keep queuing; when it ends, requests whose window has
already passed are dispatched at once. So a lone request waits at most the window (plus any
search already running), and under load batches grow by themselves. A lane with
``merging=False`` (BM25, whose batch costs the sum of its queries) searches one request at
a time, oldest first, without the window.

Mixed k: cutting a top-max(k) list to a smaller k equals a top-k search only for backends
whose answer is exact (flat with exact re-scoring, BM25; ties break by doc id). An ANN
backend's candidate pool can depend on k, so with ``mixed_k=False`` a batch only merges
requests with the same k as its oldest request (the others wait for the next batch), which
keeps every answer independent of what it was batched with. Requests with ``prefetch``
(hits wanted after the exact top-k, whose choice may depend on k) merge only with requests
of the same k and prefetch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.types import Hit

logger = logging.getLogger(__name__)

P = TypeVar("P")  # a batch payload: list[str] or a (n, dim) float32 array


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Counters since start: Search calls, index searches made for them, merge sizes, and
    the seconds the backend spent in those searches (timed in the worker thread: the index's
    own work, without queueing, batching windows or RPC overhead). ``backend``: the
    backend's own work counters where it keeps them (``InfoResponse.backend_counters``);
    the service sets them, a lane's counters have none."""

    search_calls: int = 0
    index_searches: int = 0
    queries: int = 0
    max_merged_calls: int = 0
    max_merged_queries: int = 0
    search_seconds: float = 0.0
    backend: Mapping[str, float] = field(default_factory=dict)

    def add(self, calls: int, queries: int, seconds: float = 0.0) -> BatchStats:
        return BatchStats(
            search_calls=self.search_calls + calls,
            index_searches=self.index_searches + 1,
            queries=self.queries + queries,
            max_merged_calls=max(self.max_merged_calls, calls),
            max_merged_queries=max(self.max_merged_queries, queries),
            search_seconds=self.search_seconds + seconds,
        )

    def __add__(self, other: BatchStats) -> BatchStats:
        return BatchStats(
            search_calls=self.search_calls + other.search_calls,
            index_searches=self.index_searches + other.index_searches,
            queries=self.queries + other.queries,
            max_merged_calls=max(self.max_merged_calls, other.max_merged_calls),
            max_merged_queries=max(self.max_merged_queries, other.max_merged_queries),
            search_seconds=self.search_seconds + other.search_seconds,
            backend={**self.backend, **other.backend},
        )


class _Request(Generic[P]):
    __slots__ = ("arrived", "future", "k", "n", "payload", "prefetch")

    def __init__(
        self, payload: P, n: int, k: int, prefetch: int, future: asyncio.Future[list[list[Hit]]]
    ):
        self.payload = payload
        self.n = n
        self.k = k
        self.prefetch = prefetch
        self.future = future
        self.arrived = future.get_loop().time()


class SearchLane(Generic[P]):
    """Merges concurrent requests of one query kind into single ``search_fn`` calls."""

    def __init__(
        self,
        name: str,
        search_fn: Callable[[P, int, int], list[list[Hit]]],
        concat: Callable[[list[P]], P],
        *,
        window_s: float,
        max_batch: int,
        executor: Executor | None = None,
        mixed_k: bool = True,
        overlapping: bool = False,
        merging: bool = True,
    ) -> None:
        """``overlapping``: start a batch while earlier ones still run (for a backend whose
        searches share one walk of the index, ``CircularScan``: a batch that waited for the
        one before would wait a whole turn for nothing). ``executor`` then needs a thread per
        batch in flight.

        ``merging=False``: one request per search, oldest first, no window. For a backend
        whose batch costs the sum of its queries' searches, each already on every core (BM25:
        ``PostingsSearch`` shards one query over all its threads), a merged batch answers
        every request when its last query is done: the same throughput, and each request
        waits for the whole batch. Session 25 (H100, 21M BM25, the retriever in its own
        process): pipelined verifications, ~8 in flight, took 880 ms each against the
        baseline's 84 ms on the same questions, and the LM waited on the oldest."""
        self.name = name
        self.overlapping = overlapping
        self.merging = merging
        self._running: set[asyncio.Task[None]] = set()
        self.mixed_k = mixed_k
        self.stats = BatchStats()
        self._search_fn = search_fn
        self._concat = concat
        self._window_s = window_s
        self._max_batch = max_batch
        self._executor = executor
        self._queue: deque[_Request[P]] = deque()
        self._queued = 0  # queries in _queue
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def submit(self, payload: P, n: int, k: int, prefetch: int = 0) -> list[list[Hit]]:
        """Top-k (+ ``prefetch``) hits for the ``n`` queries in ``payload``, searched together
        with others."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name=f"search-lane-{self.name}")
        request = _Request(payload, n, k, prefetch, loop.create_future())
        self._queue.append(request)
        self._queued += n
        self._changed.set()
        return await request.future

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for task in list(self._running):
            task.cancel()
        await asyncio.gather(*self._running, return_exceptions=True)
        for request in self._queue:
            if not request.future.done():
                request.future.cancel()
        self._queue.clear()
        self._queued = 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._changed.clear()
                await self._changed.wait()
                continue
            deadline = self._queue[0].arrived + self._window_s
            while (
                self.merging
                and self._queued < self._max_batch
                and (delay := deadline - loop.time()) > 0
            ):
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), delay)
                except TimeoutError:
                    break
            batch = self._take()
            if batch and self.overlapping:
                task = loop.create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            elif batch:
                await self._execute(batch)

    def _take(self) -> list[_Request[P]]:
        """Pop queued requests up to max_batch queries (at least one, oldest first); drop
        cancelled ones; only those ``_mergeable`` with the oldest."""
        batch: list[_Request[P]] = []
        kept: deque[_Request[P]] = deque()
        size = 0
        while self._queue:
            request = self._queue.popleft()
            if request.future.done():  # the caller gave up (deadline, cancellation)
                self._queued -= request.n
                continue
            if batch and (
                not self.merging
                or size + request.n > self._max_batch
                or not self._mergeable(batch[0], request)
            ):
                kept.append(request)
                if not self.merging or size + request.n > self._max_batch:
                    break
                continue
            self._queued -= request.n
            batch.append(request)
            size += request.n
        kept.extend(self._queue)
        self._queue = kept
        return batch

    def _mergeable(self, first: _Request[P], other: _Request[P]) -> bool:
        """Whether ``other`` gets the same answer in ``first``'s batch as alone."""
        if first.prefetch or other.prefetch or not self.mixed_k:
            return (first.k, first.prefetch) == (other.k, other.prefetch)
        return True

    def _timed_search(self, payload: P, k: int, prefetch: int) -> tuple[list[list[Hit]], float]:
        start = time.perf_counter()
        results = self._search_fn(payload, k, prefetch)
        return results, time.perf_counter() - start

    async def _execute(self, batch: list[_Request[P]]) -> None:
        payload = self._concat([r.payload for r in batch])
        k = max(r.k for r in batch)
        prefetch = batch[0].prefetch  # all equal where any is set (_mergeable)
        total = sum(r.n for r in batch)
        loop = asyncio.get_running_loop()
        # Once every caller of the batch gave up (a cancelled RPC: a rollback, a deadline),
        # the index stops early (``abandon``) instead of searching for nobody.
        abandoned = threading.Event()
        abandon.when_all_cancelled([r.future for r in batch], abandoned.set)
        try:
            results, seconds = await loop.run_in_executor(
                self._executor,
                abandon.in_context(abandoned, self._timed_search),
                payload,
                k,
                prefetch,
            )
            if len(results) != total:
                raise RuntimeError(f"backend returned {len(results)} result lists for {total}")
        except asyncio.CancelledError:
            abandoned.set()
            for request in batch:
                request.future.cancel()
            raise
        except Exception as exc:
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            return
        self.stats = self.stats.add(len(batch), total, seconds)
        logger.debug("%s lane: %d call(s), %d queries, k=%d", self.name, len(batch), total, k)
        offset = 0
        for request in batch:
            rows = results[offset : offset + request.n]
            offset += request.n
            if not request.future.done():
                request.future.set_result([hits[: request.k + prefetch] for hits in rows])
