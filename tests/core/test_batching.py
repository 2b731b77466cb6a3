"""BatchingRetriever: concurrent searches merge into one inner call, results split back."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest

from ralmspec_vllm.core.batching import BatchingRetriever, BatchRecord, FetchCoalescer, _take_rows

from .fakes import ScriptedRetriever

QUERIES = [f"query number {i}" for i in range(12)]


async def test_concurrent_searches_become_one_call_with_correct_slices() -> None:
    inner = ScriptedRetriever(latency_s=0.001)
    direct = await inner.search(QUERIES, 5)
    inner.search_calls.clear()
    batching = BatchingRetriever(inner, window_s=0.05)
    parts = [QUERIES[0:1], QUERIES[1:4], QUERIES[4:5], QUERIES[5:12]]
    results = await asyncio.gather(*(batching.search(p, 5) for p in parts))
    assert [hit for part in results for hit in part] == direct
    assert [len(r) for r in results] == [1, 3, 1, 7]
    assert inner.search_calls == [(12, 5)]
    (record,) = batching.stats
    assert (record.num_queries, record.num_callers, record.k) == (12, 4, 5)


async def test_full_batch_goes_without_waiting_for_the_window() -> None:
    inner = ScriptedRetriever()
    batching = BatchingRetriever(inner, window_s=60.0, max_batch_queries=4)
    calls = [batching.search([q], 1) for q in QUERIES[:8]]
    results = await asyncio.wait_for(asyncio.gather(*calls), timeout=5.0)
    assert len(results) == 8
    assert inner.search_calls == [(4, 1), (4, 1)]
    big = await asyncio.wait_for(batching.search(QUERIES, 1), timeout=5.0)  # over max: alone
    assert len(big) == 12 and inner.search_calls[-1] == (12, 1)


async def test_different_k_are_not_merged() -> None:
    inner = ScriptedRetriever()
    batching = BatchingRetriever(inner, window_s=0.01)
    a, b = await asyncio.gather(batching.search(QUERIES[:2], 1), batching.search(QUERIES[2:3], 3))
    assert sorted(inner.search_calls) == [(1, 3), (2, 1)]
    assert len(a) == 2 and len(b) == 1 and len(b[0]) == 3


async def test_errors_reach_every_caller_and_cancelled_callers_are_skipped() -> None:
    class Failing(ScriptedRetriever):
        async def search(self, queries, k, prefetch=0):  # type: ignore[no-untyped-def]
            raise RuntimeError("index offline")

    batching = BatchingRetriever(Failing(), window_s=0.01)
    outcomes = await asyncio.gather(
        batching.search(["a"], 1), batching.search(["b"], 1), return_exceptions=True
    )
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    with pytest.raises(RuntimeError, match="offline"):  # the unbatched path too
        await BatchingRetriever(Failing(), max_batch_queries=1).search(["a"], 1)

    inner = ScriptedRetriever()
    batching = BatchingRetriever(inner, window_s=0.02)
    doomed = asyncio.create_task(batching.search(["gone"], 1))
    kept = asyncio.create_task(batching.search(["kept"], 1))
    await asyncio.sleep(0)
    doomed.cancel()
    assert len(await kept) == 1
    assert inner.search_calls == [(1, 1)]
    with pytest.raises(asyncio.CancelledError):
        await doomed


async def test_passthrough_and_validation() -> None:
    inner = ScriptedRetriever()
    batching = BatchingRetriever(inner)
    assert (await batching.info()).backend == "scripted"
    assert len(await batching.documents([1, 2])) == 2
    assert await batching.vectors([1]) is None
    assert await batching.search([], 3) == []
    with pytest.raises(ValueError, match="window_s"):
        BatchingRetriever(inner, window_s=-1)
    with pytest.raises(ValueError, match="max_batch_queries"):
        BatchingRetriever(inner, max_batch_queries=0)


async def test_on_batch_sees_each_inner_search_after_it_returns() -> None:
    inner = ScriptedRetriever(latency_s=0.02)
    seen: list[tuple[BatchRecord, list[tuple[int, int]]]] = []
    batching = BatchingRetriever(
        inner, window_s=0.01, on_batch=lambda r: seen.append((r, list(inner.search_calls)))
    )
    await asyncio.gather(batching.search(QUERIES[:2], 3), batching.search(QUERIES[2:5], 3))
    await batching.search(QUERIES[5:6], 1)
    assert [record for record, _ in seen] == batching.stats
    first, second = (record for record, _ in seen)
    assert (first.k, first.num_queries, first.num_callers, first.ok) == (3, 5, 2, True)
    assert (second.k, second.num_queries, second.num_callers) == (1, 1, 1)
    assert seen[0][1] == [(5, 3)]  # called once the inner search had run
    assert first.search_s >= 0.015 and 0 <= first.max_wait_s < 1.0


async def test_on_batch_records_failures_and_its_own_errors_never_break_a_search(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(record: BatchRecord) -> None:
        raise RuntimeError("observer bug")

    batching = BatchingRetriever(ScriptedRetriever(), window_s=0.001, on_batch=broken)
    with caplog.at_level(logging.ERROR, logger="ralmspec_vllm.core.batching"):
        hits = await batching.search(QUERIES[:3], 2)
    assert len(hits) == 3 and all(len(h) == 2 for h in hits)
    assert "on_batch observer failed" in caplog.text and len(batching.stats) == 1

    class Failing(ScriptedRetriever):
        async def search(self, queries, k, prefetch=0):  # type: ignore[no-untyped-def]
            raise RuntimeError("index offline")

    seen: list[BatchRecord] = []
    batching = BatchingRetriever(Failing(), window_s=0.001, on_batch=seen.append)
    with pytest.raises(RuntimeError, match="offline"):
        await batching.search(QUERIES[:2], 1)
    (record,) = seen
    assert (record.ok, record.num_queries, record.num_callers) == (False, 2, 1)


async def test_an_inner_search_is_cancelled_once_every_caller_left() -> None:
    """Callers cancelled (pipelined verifications after a rollback, clients gone): while one
    of a merged batch still waits the inner search runs on; once none does, it is cancelled,
    so a retriever that can stops early (``retrieval.abandon``)."""
    release = asyncio.Event()
    started: list[int] = []
    cancelled: list[int] = []

    class Slow(ScriptedRetriever):
        async def search(self, queries, k, prefetch=0):  # type: ignore[no-untyped-def]
            started.append(len(queries))
            try:
                await release.wait()
            except asyncio.CancelledError:
                cancelled.append(len(queries))
                raise
            return await super().search(queries, k, prefetch)

    seen: list[BatchRecord] = []
    batching = BatchingRetriever(Slow(), window_s=0.01, on_batch=seen.append)
    stays = asyncio.ensure_future(batching.search(QUERIES[:1], 1))
    leaves = asyncio.ensure_future(batching.search(QUERIES[1:3], 1))
    while not started:
        await asyncio.sleep(0.002)
    leaves.cancel()
    await asyncio.sleep(0.01)
    assert cancelled == []
    release.set()
    assert len(await stays) == 1
    release.clear()
    gone = [asyncio.ensure_future(batching.search([q], 1)) for q in QUERIES[3:5]]
    while len(started) < 2:
        await asyncio.sleep(0.002)
    for task in gone:
        task.cancel()
    await asyncio.gather(*gone, return_exceptions=True)
    for _ in range(100):
        if cancelled and len(seen) == 2:
            break
        await asyncio.sleep(0.002)
    assert started == [3, 2] and cancelled == [2]
    assert [r.ok for r in seen] == [True, False]


class Fetches:
    """An inner fetch that records its calls and answers each id's row (``id * 10``)."""

    def __init__(self, delay_s: float = 0.01, fail: Exception | None = None) -> None:
        self.calls: list[list[int]] = []
        self.delay_s = delay_s
        self.fail = fail
        self.cancelled = 0

    async def __call__(self, doc_ids: list[int]) -> np.ndarray:
        self.calls.append(list(doc_ids))
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail
        if any(d < 0 for d in doc_ids):
            raise ValueError(f"doc_ids: unknown doc id {min(doc_ids)}")
        return np.asarray(doc_ids, dtype=np.int64) * 10


def coalescer(inner: Fetches, max_ids: int = 4096) -> FetchCoalescer[np.ndarray]:
    return FetchCoalescer(inner, _take_rows, max_ids)


async def test_a_lone_fetch_goes_at_once_with_its_ids_as_given() -> None:
    inner = Fetches()
    fetch = coalescer(inner)
    assert (await fetch.fetch([5, 5, 2])).tolist() == [50, 50, 20]
    assert inner.calls == [[5, 5, 2]] and fetch.batch_sizes == [1]


async def test_fetches_arriving_meanwhile_share_the_next_call() -> None:
    inner = Fetches()
    fetch = coalescer(inner)
    first = asyncio.create_task(fetch.fetch([1]))
    await asyncio.sleep(0.002)  # the first call is in flight
    rest = await asyncio.gather(fetch.fetch([2, 3]), fetch.fetch([3, 2, 2]), fetch.fetch([4]))
    assert (await first).tolist() == [10]
    assert [r.tolist() for r in rest] == [[20, 30], [30, 20, 20], [40]]
    assert inner.calls == [[1], [2, 3, 4]] and fetch.batch_sizes == [1, 3]


async def test_a_merged_call_holds_at_most_max_ids_but_one_caller_is_never_split() -> None:
    inner = Fetches(delay_s=0)
    fetch = coalescer(inner, max_ids=4)
    asks = [[1, 2], [2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    got = await asyncio.gather(*(fetch.fetch(ids) for ids in asks))
    assert [g.tolist() for g in got] == [[d * 10 for d in ids] for ids in asks]
    assert inner.calls == [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]


async def test_a_bad_id_fails_only_its_caller_and_other_errors_reach_all() -> None:
    inner = Fetches(delay_s=0)
    fetch = coalescer(inner)
    good, bad, other = await asyncio.gather(
        fetch.fetch([1]), fetch.fetch([2, -7]), fetch.fetch([3]), return_exceptions=True
    )
    assert isinstance(bad, ValueError) and "-7" in str(bad)
    assert isinstance(good, np.ndarray) and good.tolist() == [10]
    assert isinstance(other, np.ndarray) and other.tolist() == [30]
    assert inner.calls == [[1, 2, -7, 3], [1], [2, -7], [3]]

    down = Fetches(delay_s=0, fail=RuntimeError("retriever unavailable"))
    fetch = coalescer(down)
    outcomes = await asyncio.gather(fetch.fetch([1]), fetch.fetch([2]), return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert down.calls == [[1, 2]]  # not resent: the retriever, not an id, failed


async def test_gone_callers_are_skipped_and_a_call_nobody_waits_for_is_cancelled() -> None:
    inner = Fetches(delay_s=0.05)
    fetch = coalescer(inner)
    first = asyncio.create_task(fetch.fetch([1]))
    await asyncio.sleep(0.005)
    gone = asyncio.create_task(fetch.fetch([2]))
    kept = asyncio.create_task(fetch.fetch([3]))
    await asyncio.sleep(0.005)
    gone.cancel()
    first.cancel()  # its call in flight has no other caller: cancelled
    assert (await kept).tolist() == [30]
    assert inner.calls == [[1], [3]] and inner.cancelled == 1
    for task in (first, gone):
        with pytest.raises(asyncio.CancelledError):
            await task
    assert fetch._sender is None and not fetch._pending
