"""Searches whose callers gave up: a flag the index checks as it works, so it stops early.

A search runs in a worker thread. When the coroutine awaiting it is cancelled (a pipelined
verification after a rollback, a gRPC client that hung up or ran out of its deadline), the
thread ran on to the end before: on the circular flat scan a cancelled search rode its whole
turn. At 21M documents a pipelined answer made 53 searches, half of them cancelled by
rollbacks, and with up to 16 on the walk a search took 411 ms instead of 264 (session 26).

Whoever knows the caller left sets an ``threading.Event``; the index reads the current one
with ``current()`` in its worker thread and raises ``SearchAbandoned`` at its next check
(the circular scan drops the search's cohort before the next chunk, a batch scan stops
between chunks, BM25 skips the shards not yet started). The event travels in a context
variable, which ``asyncio.to_thread`` carries into the thread; an executor call made with
``run_in_executor`` carries it through ``in_context``. Nothing waits on an abandoned search,
so its exception only ends its thread's work.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

T = TypeVar("T")

_current: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "search_abandoned", default=None
)


class SearchAbandoned(Exception):
    """Raised in a search's worker thread once its caller gave up."""


def current() -> threading.Event | None:
    """The event that says this thread's search was given up (None: nobody can give up)."""
    return _current.get()


def check(event: threading.Event | None) -> None:
    """Raise ``SearchAbandoned`` if ``event`` is set."""
    if event is not None and event.is_set():
        raise SearchAbandoned("the caller gave up on this search")


def in_context(event: threading.Event, fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` run in a copy of this context where ``current()`` is ``event`` (for
    ``loop.run_in_executor``, which does not carry the context into the thread)."""
    context = contextvars.copy_context()
    context.run(_current.set, event)
    return lambda *args: context.run(fn, *args)


def when_all_cancelled(futures: Sequence[asyncio.Future[Any]], action: Callable[[], Any]) -> None:
    """Call ``action`` once every one of ``futures`` (the callers of one search) has been
    cancelled; never if any of them gets a result or an error."""

    def gave_up(_: asyncio.Future[Any]) -> None:
        if all(f.cancelled() for f in futures):
            action()

    for future in futures:
        future.add_done_callback(gave_up)


async def abandon_on_cancel(thread_call: Callable[[], Awaitable[T]]) -> T:
    """Await ``thread_call()`` (e.g. ``lambda: asyncio.to_thread(...)``) with a fresh event
    as ``current()``, set if this coroutine is cancelled meanwhile."""
    event = threading.Event()
    token = _current.set(event)
    try:
        return await thread_call()
    except asyncio.CancelledError:
        event.set()
        raise
    finally:
        _current.reset(token)
