"""Query embeddings for dense speculation: one call per query, or batched across requests.

Every speculative step of a dense request embeds its query with the knowledge base's encoder
(``QueryEncoder``: texts -> float32 (n, dim)). ``ThreadEmbedder`` runs each call off the
event loop; ``AsyncEmbedder`` awaits an async encoder (the retriever service's ``Encode``
RPC), merging the queries that arrive while a call is in flight into the next.
``BatchingEmbedder`` merges the calls of concurrent requests that arrive within
``window_s`` of the first into ONE encoder call (at most ``max_batch`` texts), as
``BatchingRetriever`` does for searches: a transformer encoder embeds 64 queries in little
more time than one (unless it is batch-invariant by encoding one text at a time). A lone
call waits at most ``window_s``.

Embeddings only choose the speculated document; a batch-dependent last bit can change how
often speculation is right, never the answer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import numpy as np

logger = logging.getLogger(__name__)

QueryEncoder = Callable[[Sequence[str]], np.ndarray]
"""Query texts -> float32 embeddings of shape (n, dim); the knowledge base's own encoder."""


class QueryEmbedder(Protocol):
    async def embed(self, query: str) -> np.ndarray:
        """The query's embedding, float32, shape (dim,)."""
        ...


def _rows(out: object, n: int) -> np.ndarray:
    array = np.asarray(out, dtype=np.float32)
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"encoder returned shape {array.shape} for {n} queries")
    return array


async def _answer(
    batch: list[tuple[str, asyncio.Future[np.ndarray]]],
    encode: Callable[[list[str]], Awaitable[np.ndarray]],
    batch_sizes: list[int],
) -> None:
    """Encode the queries of ``batch``'s callers still waiting in one call (its size goes
    to ``batch_sizes``) and give each its row, or the call's error; a caller gone
    meanwhile gets nothing."""
    live = [(q, f) for q, f in batch if not f.done()]  # skip cancelled callers
    if not live:
        return
    batch_sizes.append(len(live))
    try:
        out = _rows(await encode([q for q, _ in live]), len(live))
    except Exception as exc:
        logger.debug("encode of %d queries failed: %r", len(live), exc)
        for _, future in live:
            if not future.done():
                future.set_exception(exc)
        return
    for row, (_, future) in zip(out, live, strict=True):
        if not future.done():
            future.set_result(row)


class ThreadEmbedder:
    """One encoder call per query, in a worker thread (or inline for cheap encoders)."""

    def __init__(self, encoder: QueryEncoder, in_thread: bool = True) -> None:
        self.encoder = encoder
        self.in_thread = in_thread

    async def embed(self, query: str) -> np.ndarray:
        if self.in_thread:
            out = await asyncio.to_thread(self.encoder, [query])
        else:
            out = self.encoder([query])
        return _rows(out, 1)[0]


class AsyncEmbedder:
    """Embeds through an async encode function, e.g. the gRPC retriever client's ``encode``
    (the server's own encoder: embeddings bit-identical to the ones its search uses).

    One call in flight at a time: the queries that arrive while it runs go together in the
    next call (at most ``max_batch``), so concurrent requests' guesses cost one RPC between
    them instead of one each, and a lone query is sent at once (no window to wait out).
    Each RPC costs the server's one event-loop thread ~0.4 ms of Python (py-spy, session
    47), and a speculating request sends one a guess. The retriever's query encoders embed
    each text alone (``encoder.QueryEncoder``: batch invariant), so a merged call returns
    the vectors separate calls would."""

    def __init__(
        self, encode: Callable[[Sequence[str]], Awaitable[np.ndarray]], max_batch: int = 64
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.encode = encode
        self.max_batch = max_batch
        self.batch_sizes: list[int] = []
        """Texts per encode call, in order (for tests and metrics)."""
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def embed(self, query: str) -> np.ndarray:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._pending.append((query, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        """Send what is pending, one call at a time, until nothing is. Cancelled (the loop
        shutting down), it cancels its callers' futures rather than leave them waiting."""
        batch: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        try:
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                await _answer(batch, self.encode, self.batch_sizes)
        finally:
            self._sender = None
            for _, future in [*batch, *self._pending]:  # only if cancelled mid-way
                if not future.done():
                    future.cancel()
            self._pending.clear()


class BatchingEmbedder:
    """Merges concurrent ``embed`` calls into batched encoder calls (in a worker thread)."""

    def __init__(self, encoder: QueryEncoder, window_s: float = 0.001, max_batch: int = 64) -> None:
        if window_s < 0:
            raise ValueError(f"window_s must be >= 0, got {window_s}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.encoder = encoder
        self.window_s = window_s
        self.max_batch = max_batch
        self.batch_sizes: list[int] = []
        """Texts per encoder call, in order (for tests and metrics)."""
        self._pending: list[tuple[str, asyncio.Future[np.ndarray]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def embed(self, query: str) -> np.ndarray:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._pending.append((query, future))
        if len(self._pending) >= self.max_batch:
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.window_s, self._flush)
        return await future

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._encode(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _encode(self, batch: list[tuple[str, asyncio.Future[np.ndarray]]]) -> None:
        await _answer(batch, lambda texts: asyncio.to_thread(self.encoder, texts), self.batch_sizes)
