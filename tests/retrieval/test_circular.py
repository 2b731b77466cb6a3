"""The circular scan: searches that board a shared walk at any chunk get a batch scan's hits."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever
from ralmspec_vllm.retrieval.circular import CircularScan
from ralmspec_vllm.retrieval.flat import FlatRetriever

from .synthetic import TableEncoder


def _docs(n: int = 6000, dim: int = 48, seed: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    docs = rng.standard_normal((n, dim)).astype(np.float32)
    queries = rng.standard_normal((40, dim)).astype(np.float32)
    return docs, queries


def _ids(rows: list) -> list[list[tuple[int, float]]]:
    return [[(h.doc_id, h.score) for h in row] for row in rows]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_concurrent_staggered_searches_equal_the_batch_scan(dtype: str) -> None:
    docs, queries = _docs()
    params = {"impl": "torch", "device": "cpu", "dtype": dtype, "chunk_size": 256}
    batch = FlatRetriever(docs, **params)  # type: ignore[arg-type]
    circular = FlatRetriever(docs, scan="circular", **params)  # type: ignore[arg-type]
    # Calls of 1-4 queries, with and without prefetch, started at staggered times so they
    # board at different chunks and share matmuls with whoever is on board.
    calls = [(queries[i : i + 1 + i % 4], 1 + i % 7, 8 * (i % 3)) for i in range(0, 36, 2)]

    def run(call: tuple[np.ndarray, int, int], delay: float) -> list:
        time.sleep(delay)
        return circular.search_vectors(*call)

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(run, c, 0.002 * (i % 5)) for i, c in enumerate(calls)]
        got = [f.result() for f in futures]
    for call, rows in zip(calls, got, strict=True):
        assert _ids(rows) == _ids(batch.search_vectors(*call))
    assert circular._circular is not None and circular._circular.max_cohorts >= 2
    assert circular.info.extra["scan"] == "circular"
    circular.close()


class StartsSeen:
    """A cohort's scan state that records where each chunk it was fed starts."""

    def __init__(self) -> None:
        self.starts: list[int] = []

    def add(self, block: object, start: int) -> None:
        self.starts.append(start)


def test_a_cohort_sees_every_chunk_once_starting_wherever_the_walk_is() -> None:
    seen = [StartsSeen(), StartsSeen()]
    gate = threading.Event()

    def product(q: torch.Tensor, i: int) -> tuple[int, torch.Tensor]:
        gate.wait(5)
        time.sleep(0.02)  # slow enough for the second cohort to board mid-turn
        return i * 10, q[:, :1]

    scan = CircularScan(5, product)
    first = scan.submit(torch.zeros(1, 2), seen[0])
    time.sleep(0.05)
    gate.set()  # the walk is at chunk 0 with one cohort; the second boards later
    while scan.turns < 0.4:
        time.sleep(0.001)
    second = scan.submit(torch.zeros(2, 2), seen[1])
    first.result(5), second.result(5)
    assert seen[0].starts == [0, 10, 20, 30, 40]
    assert sorted(seen[1].starts) == [0, 10, 20, 30, 40] and seen[1].starts[0] != 0
    scan.close()


def test_a_failing_chunk_fails_those_on_board_and_the_walk_goes_on() -> None:
    fail = {"left": 1}

    class Count:
        def __init__(self) -> None:
            self.chunks = 0

        def add(self, block: object, start: int) -> None:
            self.chunks += 1

    def product(q: torch.Tensor, i: int) -> tuple[int, torch.Tensor]:
        if fail["left"]:
            fail["left"] -= 1
            raise RuntimeError("injected chunk failure")
        return i, q

    scan = CircularScan(3, product)
    with pytest.raises(RuntimeError, match="injected chunk failure"):
        scan.submit(torch.zeros(1, 1), Count()).result(5)
    ok = Count()
    assert scan.submit(torch.zeros(1, 1), ok).result(5) is ok and ok.chunks == 3
    scan.close()
    with pytest.raises(RuntimeError, match="closed"):
        scan.submit(torch.zeros(1, 1), Count())


def test_a_given_up_cohort_leaves_the_walk_at_the_next_chunk() -> None:
    seen = [StartsSeen(), StartsSeen()]

    reached, release = threading.Event(), threading.Event()

    def product(q: torch.Tensor, i: int) -> tuple[int, torch.Tensor]:
        if scan.chunks == 3:  # hold the walk at its fourth chunk until the caller has left
            reached.set()
            release.wait(5)
        return i * 10, q[:, :1]

    scan = CircularScan(40, product)
    gave_up = threading.Event()
    leaving = abandon.in_context(gave_up, scan.submit)(torch.zeros(1, 2), seen[0])
    staying = scan.submit(torch.zeros(1, 2), seen[1])
    assert reached.wait(5)
    gave_up.set()
    release.set()
    with pytest.raises(abandon.SearchAbandoned):
        leaving.result(5)
    staying.result(5)
    assert sorted(seen[1].starts) == [i * 10 for i in range(40)]  # the other: a full turn
    assert 3 <= len(seen[0].starts) <= 4  # left at the chunk after the one it was in
    assert scan.abandoned == 1 and scan.counters()["scan_abandoned"] == 1
    with pytest.raises(abandon.SearchAbandoned):  # given up before boarding: refused
        abandon.in_context(gave_up, scan.submit)(torch.zeros(1, 2), seen[0])
    scan.close()


def _slow_walk(scan: str) -> FlatRetriever:
    """200k docs in chunks of 64: a search takes ~3,000 chunks (~0.2 s on the dev machine)."""
    rng = np.random.default_rng(9)
    docs = rng.standard_normal((200_000, 48)).astype(np.float32)
    return FlatRetriever(
        docs,
        encoder=TableEncoder({}, 48),
        impl="torch",
        device="cpu",
        dtype="bfloat16",
        chunk_size=64,
        scan=scan,
    )


async def _cancel_mid_walk(flat: FlatRetriever, search: asyncio.Task[object]) -> None:
    """Cancel ``search`` once the walk is under way; wait until the walk has let it go."""
    walk = flat._circular
    assert walk is not None
    while walk.chunks < 5:
        await asyncio.sleep(0.001)
    search.cancel()
    with pytest.raises(asyncio.CancelledError):
        await search
    for _ in range(500):
        if walk.abandoned:
            break
        await asyncio.sleep(0.01)


async def test_a_cancelled_in_process_search_stops_the_walk() -> None:
    """A pipelined verification cancelled by a rollback (``InProcessAsyncRetriever``): the
    walk drops it instead of riding out its turn, and the next search is still exact."""
    flat = _slow_walk("circular")
    walk = flat._circular
    assert walk is not None
    retriever = InProcessAsyncRetriever(flat)
    try:
        await _cancel_mid_walk(flat, asyncio.ensure_future(retriever.search(["gone"], 2)))
        assert walk.abandoned == 1 and walk.chunks < walk.num_chunks
        for _ in range(500):  # the search's thread counts it once the walk let it go
            if flat.times.abandoned:
                break
            await asyncio.sleep(0.01)
        assert (flat.times.abandoned, flat.times.searches) == (1, 0)
        walked = walk.chunks
        hits = await retriever.search(["kept"], 2)
        assert walk.chunks - walked == walk.num_chunks  # a full turn, as ever
        assert hits == flat.search(["kept"], 2)
    finally:
        flat.close()


def test_a_batch_scan_given_up_stops_between_chunks() -> None:
    flat = _slow_walk("batch")
    gave_up = threading.Event()
    gave_up.set()
    with pytest.raises(abandon.SearchAbandoned):
        abandon.in_context(gave_up, flat.search)(["gone"], 2)
    assert len(flat.search(["kept"], 2)) == 1


async def test_a_cancelled_grpc_search_stops_the_walk_in_the_server() -> None:
    """Over a real gRPC service: the client gives up (its task cancelled), the server's
    handler is cancelled, the lane sees every caller gone and the walk drops the search."""
    from ralmspec_vllm.retrieval.client import RetrieverClient
    from ralmspec_vllm.retrieval.server import start_server

    flat = _slow_walk("circular")
    walk = flat._circular
    assert walk is not None
    server = await start_server(flat, "127.0.0.1", 0, warm_up=False)
    try:
        async with RetrieverClient(server.target, timeout_s=30) as client:
            await _cancel_mid_walk(flat, asyncio.ensure_future(client.search(["gone"], 2)))
            assert walk.abandoned == 1 and walk.chunks < walk.num_chunks
            assert (await client.stats()).backend["scan_abandoned"] == 1
            assert _ids(await client.search(["kept"], 2)) == _ids(flat.search(["kept"], 2))
    finally:
        await server.stop(grace=0)
        flat.close()


@pytest.mark.parametrize(
    "specs",
    [
        # (rows, count, k, chunk it boards at): counts differ, one is wider than a first chunk
        [(1, 30, 20, 0), (2, 5, 1, 0), (3, 300, 256, 1), (1, 17, 9, 2)],
        [(1, 20, 20, 0), (2, 20, 20, 0), (3, 20, 20, 1), (1, 20, 20, 2)],  # alike (one op)
    ],
)
def test_threshold_ops_merged_across_cohorts_give_each_cohort_its_own_result(
    specs: list[tuple[int, int, int, int]],
) -> None:
    from ralmspec_vllm.retrieval.flat import _ThresholdScan

    rng = np.random.default_rng(3)
    sizes = [2000, 1300, 770, 2560, 650]  # ~115 groups of 64 docs, most chunks padded
    blocks = [torch.from_numpy(rng.standard_normal((7, n)).astype(np.float32)) for n in sizes]
    blocks = [b.to(torch.bfloat16) for b in blocks]
    starts = np.cumsum([0, *sizes[:-1]]).tolist()

    def fresh() -> list[_ThresholdScan]:
        return [
            _ThresholdScan(rows, count, k, rng.uniform(0.2, 0.5, rows), "cpu")
            for rows, count, k, _ in specs
        ]

    alone, merged = fresh(), fresh()
    for s in merged:
        s.slack = alone[merged.index(s)].slack.clone()
    offsets = np.cumsum([0] + [rows for rows, *_ in specs]).tolist()
    for turn in range(len(sizes) + 2):
        chunk = turn % len(sizes)
        riding = [i for i, spec in enumerate(specs) if spec[3] <= turn < spec[3] + len(sizes)]
        if not riding:
            continue
        block = torch.cat([blocks[chunk][offsets[i] : offsets[i + 1]] for i in riding])
        _ThresholdScan.add_all([merged[i] for i in riding], block, starts[chunk])
        for i in riding:
            alone[i].add(blocks[chunk][offsets[i] : offsets[i + 1]], starts[chunk])
    for a, m in zip(alone, merged, strict=True):
        for x, y in zip(a.result(), m.result(), strict=True):
            np.testing.assert_array_equal(x, y)


def test_the_walk_counts_its_chunks_rows_and_seconds() -> None:
    docs, queries = _docs(n=1000)
    circular = FlatRetriever(docs, impl="torch", device="cpu", dtype="bfloat16", chunk_size=256)
    assert "scan_chunks" not in circular.counters()  # a batch scan has no walk
    circular = FlatRetriever(
        docs, impl="torch", device="cpu", dtype="bfloat16", chunk_size=256, scan="circular"
    )
    circular.search_vectors(queries[:3], 2)  # alone on board: one turn of 4 chunks, 3 rows
    counters = circular.counters()
    assert (counters["scan_chunks"], counters["scan_rows"], counters["scan_cohorts"]) == (4, 12, 4)
    assert counters["searches"] == 1 and counters["scan_s"] > 0
    busy, product, threshold = (counters[f"scan_{k}_s"] for k in ("busy", "product", "threshold"))
    assert product > 0 and threshold > 0 and product + threshold <= busy
    circular.close()


async def test_the_service_reports_the_walk_to_clients_and_metrics() -> None:
    """Over a real gRPC service: ``Info.backend_counters`` -> ``RetrieverClient.stats`` ->
    ``ralmspec_retriever_backend_*_total`` on the server's ``/metrics``."""
    from prometheus_client import REGISTRY, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from ralmspec_vllm import metrics
    from ralmspec_vllm.retrieval.client import RetrieverClient
    from ralmspec_vllm.retrieval.server import start_server

    docs, queries = _docs(n=1000)
    flat = FlatRetriever(
        docs, impl="torch", device="cpu", dtype="bfloat16", chunk_size=256, scan="circular"
    )
    server = await start_server(flat, "127.0.0.1", 0, warm_up=False)
    try:
        async with RetrieverClient(server.target, timeout_s=30) as client:
            await asyncio.gather(*(client.search_vectors(queries[i : i + 2], 3) for i in range(4)))
            stats = await client.stats()
    finally:
        await server.stop(grace=0)
        flat.close()
    walked = stats.backend
    assert walked["scan_chunks"] >= 4 and walked["scan_rows"] >= 8 * 4  # 8 rows x 4 chunks
    assert walked["searches"] >= 1 and walked["scan_product_s"] > 0
    metrics.set_retriever_stats(stats)
    try:
        text = generate_latest(REGISTRY).decode()
    finally:
        metrics.RETRIEVER_STATS.stats = None  # as before: no service has reported
    scraped = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    seconds = "ralmspec_retriever_backend_seconds_total"
    assert scraped[(seconds, (("phase", "scan_product"),))] == walked["scan_product_s"]
    work = "ralmspec_retriever_backend_work_total"
    assert scraped[(work, (("counter", "scan_chunks"),))] == walked["scan_chunks"]
