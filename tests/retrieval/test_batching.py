"""``SearchLane`` in-process: merging, max_batch, per-request k, cancellation, failures.

The search function is a deterministic stand-in for an index (query text -> ranked hits),
which records every batch it is asked for.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.retrieval.batching import BatchStats, SearchLane
from ralmspec_vllm.types import Hit


class RecordingIndex:
    """hits(q, k) = k hits with ids len(q)+0..k-1; every call's (queries, k) is recorded."""

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.calls: list[tuple[list[str], int]] = []
        self.prefetches: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def __call__(self, queries: list[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        self.calls.append((list(queries), k))
        self.prefetches.append(prefetch)
        return [[Hit(len(q) + i, float(-i)) for i in range(k + prefetch)] for q in queries]


def _concat(parts: list[list[str]]) -> list[str]:
    return [q for part in parts for q in part]


def expected(q: str, k: int) -> list[Hit]:
    return [Hit(len(q) + i, float(-i)) for i in range(k)]


async def test_concurrent_requests_merge_into_one_call_with_max_k() -> None:
    index = RecordingIndex()
    lane = SearchLane("text", index, _concat, window_s=0.5, max_batch=100)
    requests = [(["a" * (i + 1), "b"], 1 + i % 4) for i in range(10)]
    try:
        got = await asyncio.gather(*(lane.submit(q, len(q), k) for q, k in requests))
    finally:
        await lane.close()
    assert len(index.calls) == 1
    assert index.calls[0] == (_concat([q for q, _ in requests]), 4)
    assert got == [[expected(q, k) for q in qs] for qs, k in requests]
    assert dataclasses.replace(lane.stats, search_seconds=0.0) == BatchStats(10, 1, 20, 10, 20)
    # The index's own time: the 0.5 s batching window the requests waited is not in it.
    assert 0 < lane.stats.search_seconds < 0.25


async def test_max_batch_flushes_without_waiting_for_the_window() -> None:
    index = RecordingIndex()
    # A window far longer than the test's timeout: only max_batch can dispatch these.
    lane = SearchLane("text", index, _concat, window_s=60.0, max_batch=3)
    try:
        async with asyncio.timeout(10):
            got = await asyncio.gather(*(lane.submit([f"q{i}"], 1, 2) for i in range(6)))
    finally:
        await lane.close()
    assert [len(qs) for qs, _ in index.calls] == [3, 3]
    assert got == [[expected(f"q{i}", 2)] for i in range(6)]


async def test_requests_queue_while_a_search_runs() -> None:
    gate = threading.Event()
    index = RecordingIndex(gate)
    lane = SearchLane("text", index, _concat, window_s=0.0, max_batch=100)
    try:
        first = asyncio.ensure_future(lane.submit(["first"], 1, 1))
        await asyncio.to_thread(index.entered.wait, 10)  # first search blocked in its thread
        rest = [asyncio.ensure_future(lane.submit([f"r{i}"], 1, 1)) for i in range(5)]
        await asyncio.sleep(0)  # let the submits queue
        gate.set()
        await asyncio.gather(first, *rest)
    finally:
        await lane.close()
    assert [qs for qs, _ in index.calls] == [["first"], [f"r{i}" for i in range(5)]]


async def test_unmerged_lane_searches_one_request_at_a_time_oldest_first() -> None:
    """``merging=False`` (BM25): the queued requests are not merged, so the oldest one's
    answer comes back after its own search, not after everyone's; and no window is waited
    (60 s here: only its absence lets this finish in time)."""
    gate = threading.Event()
    index = RecordingIndex(gate)
    lane = SearchLane("text", index, _concat, window_s=60.0, max_batch=100, merging=False)
    answered: list[str] = []

    async def tracked(name: str, queries: list[str], k: int) -> list[list[Hit]]:
        hits = await lane.submit(queries, len(queries), k)
        answered.append(name)
        return hits

    try:
        async with asyncio.timeout(10):
            first = asyncio.ensure_future(tracked("first", ["first"], 1))
            await asyncio.to_thread(index.entered.wait, 10)
            rest = [
                asyncio.ensure_future(tracked(f"r{i}", [f"r{i}", "x"], 1 + i % 2)) for i in range(4)
            ]
            await asyncio.sleep(0)
            gate.set()
            got = await asyncio.gather(first, *rest)
    finally:
        await lane.close()
    assert index.calls == [(["first"], 1)] + [([f"r{i}", "x"], 1 + i % 2) for i in range(4)]
    # One request per search, so each was answered by its own search, in arrival order.
    assert answered == ["first", "r0", "r1", "r2", "r3"]
    assert got[0] == [expected("first", 1)]
    assert got[1:] == [[expected(f"r{i}", 1 + i % 2), expected("x", 1 + i % 2)] for i in range(4)]
    assert lane.stats.max_merged_calls == 1


async def test_cancelled_request_is_dropped_before_the_search() -> None:
    gate = threading.Event()
    index = RecordingIndex(gate)
    lane = SearchLane("text", index, _concat, window_s=0.0, max_batch=100)
    try:
        first = asyncio.ensure_future(lane.submit(["first"], 1, 1))
        await asyncio.to_thread(index.entered.wait, 10)
        gone = asyncio.ensure_future(lane.submit(["gone"], 1, 1))
        kept = asyncio.ensure_future(lane.submit(["kept"], 1, 1))
        await asyncio.sleep(0)
        gone.cancel()
        gate.set()
        assert await kept == [expected("kept", 1)]
        await first
    finally:
        await lane.close()
    assert [qs for qs, _ in index.calls] == [["first"], ["kept"]]


async def test_a_running_search_is_abandoned_only_once_every_merged_caller_left() -> None:
    """The search's thread sees ``abandon.current()`` set when the last of its callers is
    cancelled (an RPC the client gave up), not before: a merged caller still waits."""
    gate = threading.Event()
    seen: list[threading.Event | None] = []

    def search(queries: list[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        seen.append(abandon.current())
        gate.wait(10)
        abandon.check(abandon.current())  # as an index does between chunks
        return [[Hit(len(q), 0.0)] for q in queries]

    lane = SearchLane("text", search, _concat, window_s=0.05, max_batch=100)
    try:
        # two callers merged into one search: one leaves, the other still gets its hits
        stays = asyncio.ensure_future(lane.submit(["stays"], 1, 1))
        leaves = asyncio.ensure_future(lane.submit(["leaves"], 1, 1))
        while not seen:
            await asyncio.sleep(0.005)
        leaves.cancel()
        await asyncio.sleep(0.01)
        assert seen[0] is not None and not seen[0].is_set()
        gate.set()
        assert await stays == [[Hit(5, 0.0)]]
        # a lone caller leaves: its search is told at once, and the lane goes on
        gate.clear()
        gone = asyncio.ensure_future(lane.submit(["gone"], 1, 1))
        while len(seen) < 2:
            await asyncio.sleep(0.005)
        gone.cancel()
        await asyncio.sleep(0.01)
        assert seen[1] is not None and seen[1].is_set()
        gate.set()
        assert await lane.submit(["after"], 1, 1) == [[Hit(5, 0.0)]]
    finally:
        gate.set()
        await lane.close()


async def test_search_failure_reaches_every_merged_caller_and_lane_recovers() -> None:
    calls = 0

    def flaky(queries: list[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return [[Hit(0, 1.0)] for _ in queries]

    lane = SearchLane("text", flaky, _concat, window_s=0.2, max_batch=100)
    try:
        results = await asyncio.gather(
            *(lane.submit([f"q{i}"], 1, 1) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        assert await lane.submit(["again"], 1, 1) == [[Hit(0, 1.0)]]
    finally:
        await lane.close()


async def test_close_cancels_queued_requests() -> None:
    lane = SearchLane("text", RecordingIndex(), _concat, window_s=60.0, max_batch=100)
    pending = asyncio.ensure_future(lane.submit(["q"], 1, 1))
    await asyncio.sleep(0)
    await lane.close()
    with pytest.raises(asyncio.CancelledError):
        await pending


async def test_without_mixed_k_a_batch_only_merges_equal_k() -> None:
    index = RecordingIndex()
    lane = SearchLane("vector", index, _concat, window_s=0.5, max_batch=100, mixed_k=False)
    ks = [3, 5, 3, 5, 1]
    try:
        got = await asyncio.gather(*(lane.submit([f"q{i}"], 1, k) for i, k in enumerate(ks)))
    finally:
        await lane.close()
    assert index.calls == [(["q0", "q2"], 3), (["q1", "q3"], 5), (["q4"], 1)]
    assert got == [[expected(f"q{i}", k)] for i, k in enumerate(ks)]


async def test_prefetch_requests_merge_only_with_the_same_k_and_prefetch() -> None:
    """The prefetch hits may depend on k: such a request never shares a search with another
    k or prefetch, even where plain requests of any k merge; each gets k + prefetch hits."""
    index = RecordingIndex()
    lane = SearchLane("text", index, _concat, window_s=0.3, max_batch=100)
    asks = [(["a"], 2, 5), (["bb"], 2, 5), (["ccc"], 3, 5), (["d"], 2, 0), (["ee"], 4, 0)]
    try:
        answers = await asyncio.gather(*(lane.submit(q, 1, k, p) for q, k, p in asks))
    finally:
        await lane.close()
    for (queries, k, prefetch), rows in zip(asks, answers, strict=True):
        assert rows == [expected(queries[0], k + prefetch)]
    batches = sorted(zip(index.calls, index.prefetches, strict=True))
    assert batches == [
        ((["a", "bb"], 2), 5),
        ((["ccc"], 3), 5),
        ((["d", "ee"], 4), 0),
    ]
