"""Cross-request retrieval batching: many concurrent ``search`` calls, one retriever call.

``BatchingRetriever`` wraps an ``AsyncRetriever`` and implements it. ``search`` calls with the
same ``k`` and ``prefetch`` that arrive within ``window_s`` of the first one of a batch are
concatenated into ONE inner ``search`` call (at most ``max_batch_queries`` queries; a full
batch goes at once), and each caller gets its own slice back. A lone call waits at most
``window_s``. Calls with different ``k`` or ``prefetch`` are never merged (an approximate
index may rank the top-1 differently under a different k, and the prefetch hits may depend
on both). ``documents``, ``vectors``, ``lists`` and ``term_weights`` go through a
``FetchCoalescer`` each (one call in flight, the doc ids asked for meanwhile merged into the
next); ``score``, ``routing`` and ``info`` pass through.

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.retrieval.base import AsyncRetriever, IVFRouting, TermWeights
from ralmspec_vllm.types import Document, Hit, RetrieverInfo

logger = logging.getLogger(__name__)

R = TypeVar("R")


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
        max_fetch_ids: int = 4096,
    ) -> None:
        """``max_fetch_ids``: the most doc ids one merged fetch asks for (a lone caller's
        are never split). Below the retriever service's ``max_doc_ids`` (10,000), and 4,096
        vectors of 1,024 floats are 16 MiB, a quarter of its message limit."""
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
        self._documents = FetchCoalescer(inner.documents, _take_documents, max_fetch_ids)
        self._vectors = FetchCoalescer(inner.vectors, _take_rows, max_fetch_ids)
        self._lists = FetchCoalescer(inner.lists, _take_rows, max_fetch_ids)
        self._term_weights = FetchCoalescer(inner.term_weights, _take_items, max_fetch_ids)

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
        return await self._documents.fetch(doc_ids)

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        return await self._vectors.fetch(doc_ids)

    async def term_weights(self, doc_ids: Sequence[int]) -> list[TermWeights] | None:
        return await self._term_weights.fetch(doc_ids)

    async def routing(self) -> IVFRouting | None:
        return await self.inner.routing()

    async def lists(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        return await self._lists.fetch(doc_ids)

    def fetch_sizes(self) -> dict[str, list[int]]:
        """Callers merged into each inner fetch, by kind, in order (tests and probes)."""
        return {
            "documents": self._documents.batch_sizes,
            "vectors": self._vectors.batch_sizes,
            "lists": self._lists.batch_sizes,
            "term_weights": self._term_weights.batch_sizes,
        }


@dataclass(slots=True)
class _Fetch(Generic[R]):
    doc_ids: list[int]
    future: asyncio.Future[R]


class FetchCoalescer(Generic[R]):
    """Fetches by doc id (documents, vectors, lists, term weights) with one inner call in
    flight: the callers that arrive while it runs go together in the next call, their doc
    ids deduplicated (at most ``max_ids``, but never fewer than one caller's), and each gets
    its own ids' part back. A lone caller is sent at once with its ids as given, so nothing
    changes at low load. Under load a speculating request asks for the vectors and lists of
    each verified step's new documents and the token cache for each step's document: at
    c=16 on the 2-core box the server made 3.5x the baseline's RPCs, and each cost the one
    event-loop thread ~0.4 ms of Python (py-spy, session 47).

    A merged call that fails on its input (``ValueError``: the service's INVALID_ARGUMENT;
    ``LookupError``: an in-process retriever's unknown id) is sent again for each caller
    alone, so one caller's bad id fails only that caller; other errors (a retriever down
    after its retry budget) reach every caller of the call. A caller cancelled meanwhile is
    skipped; once every caller of a call in flight has gone, the call is cancelled."""

    def __init__(
        self,
        inner: Callable[[list[int]], Awaitable[R]],
        take: Callable[[R, list[int], list[int]], R],
        max_ids: int = 4096,
    ) -> None:
        """``take(result, unique_ids, positions)``: the part of a merged ``result`` (for
        ``unique_ids``, in that order) that one caller asked for, ``positions`` indexing
        ``unique_ids``."""
        if max_ids < 1:
            raise ValueError(f"max_ids must be positive, got {max_ids}")
        self.inner = inner
        self.take = take
        self.max_ids = max_ids
        self.batch_sizes: list[int] = []
        """Callers per inner call, in order (resends of a failed merged call not counted)."""
        self._pending: list[_Fetch[R]] = []
        self._sender: asyncio.Task[None] | None = None

    async def fetch(self, doc_ids: Sequence[int]) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append(_Fetch(list(doc_ids), future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await future

    def _next_batch(self) -> list[_Fetch[R]]:
        """The waiting callers that go in the next call (gone ones dropped)."""
        self._pending = [p for p in self._pending if not p.future.done()]
        batch: list[_Fetch[R]] = []
        seen: set[int] = set()
        while self._pending:
            new = seen.union(self._pending[0].doc_ids)
            if batch and len(new) > self.max_ids:
                break
            batch.append(self._pending.pop(0))
            seen = new
        return batch

    async def _send(self) -> None:
        """Send what is pending, one call at a time, until nothing is. Cancelled (the loop
        shutting down), it cancels its callers' futures rather than leave them waiting."""
        batch: list[_Fetch[R]] = []
        try:
            while batch := self._next_batch():
                self.batch_sizes.append(len(batch))
                await self._answer(batch)
        finally:
            self._sender = None
            for waiting in [*batch, *self._pending]:  # only if cancelled mid-way
                if not waiting.future.done():
                    waiting.future.cancel()
            self._pending.clear()

    async def _answer(self, batch: list[_Fetch[R]]) -> None:
        if len(batch) == 1:  # alone: its ids as given, the result as it comes
            await self._alone(batch[0])
            return
        unique = list(dict.fromkeys(d for b in batch for d in b.doc_ids))
        where = {d: i for i, d in enumerate(unique)}

        def split(result: R) -> list[R]:
            return [self.take(result, unique, [where[d] for d in b.doc_ids]) for b in batch]

        if await self._call(unique, [b.future for b in batch], split):  # whose input?
            await asyncio.gather(*(self._alone(b) for b in batch))

    async def _alone(self, caller: _Fetch[R]) -> None:
        """One call for one caller: its ids as given, the result as it comes."""
        await self._call(caller.doc_ids, [caller.future], lambda result: [result])

    async def _call(
        self,
        doc_ids: list[int],
        futures: list[asyncio.Future[R]],
        split: Callable[[R], list[R]],
    ) -> bool:
        """One inner call; its result split among ``futures``, or its error given to them.
        True, with nobody answered, when a call for several callers failed on its input
        (which caller's? the caller resends each alone). A cancelled inner call (every
        caller gone) gives nothing."""
        if all(f.done() for f in futures):
            return False
        inner: asyncio.Future[R] = asyncio.ensure_future(self.inner(doc_ids))
        abandon.when_all_cancelled(futures, inner.cancel)
        try:
            await asyncio.wait([inner])
        except asyncio.CancelledError:
            inner.cancel()
            raise
        if inner.cancelled():
            return False
        try:
            parts = split(inner.result())
        except Exception as exc:
            if len(futures) > 1 and isinstance(exc, (ValueError, LookupError)):
                return True
            logger.debug("fetch of %d doc ids failed: %r", len(doc_ids), exc)
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return False
        for part, future in zip(parts, futures, strict=True):
            if not future.done():
                future.set_result(part)
        return False


def _take_rows(result: Any, unique: list[int], positions: list[int]) -> Any:
    """Rows of an array answer (vectors, lists); ``None`` (not served) stays ``None``."""
    return None if result is None else result[np.asarray(positions, dtype=np.intp)]


def _take_items(result: Any, unique: list[int], positions: list[int]) -> Any:
    """Items of a list answer (term weights); ``None`` (not served) stays ``None``."""
    return None if result is None else [result[p] for p in positions]


def _take_documents(result: list[Document], unique: list[int], positions: list[int]) -> Any:
    """The documents a caller asked for, in its order; an id the retriever did not answer
    stays missing (the caller names it)."""
    by_id = {doc.doc_id: doc for doc in result}
    return [by_id[unique[p]] for p in positions if unique[p] in by_id]


def _since(start: float) -> float:
    return time.perf_counter() - start


def _future() -> asyncio.Future[list[list[Hit]]]:
    return asyncio.get_running_loop().create_future()
