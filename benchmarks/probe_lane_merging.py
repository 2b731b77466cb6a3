"""Does merging concurrent BM25 searches into one batch help or hurt their latency?

Session 25 (H100, 21M documents, the retriever in its own process as ``serve`` runs it):
RaLMSpec's pipelined verifications, ~8 in flight, took 880 ms each against the baseline's
84 ms. The service's search lane merged the queued ones into one index search, and a BM25
batch costs the sum of its queries (each already searched on every thread), so every
request waited for the whole batch. This probe serves a real BM25 index over gRPC on
loopback and sends bursts of concurrent one-query searches (the first sent a moment ahead,
as the oldest verification is), with the lane merging (as before) and not merging
(BM25's default since, ``UNMERGED_BACKENDS``; ``--merge-searches`` of ``retriever serve``
picks either), and reports each request's latency, the first one's, and the
burst's.

    python3 benchmarks/probe_lane_merging.py --filler 2995355 --threads 2 \
        --out benchmarks/results/probe_lane_merging_cpu-2c_3m.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_metadata
from benchmarks.probe_bm25_gil import QUERIES


async def burst(client, queries: list[str], k: int, prefetch: int) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    """Send ``queries`` as concurrent one-query searches, the first 1 ms ahead; each one's
    latency (s) and the burst's."""
    start = time.perf_counter()

    async def one(i: int, query: str) -> float:
        if i:
            await asyncio.sleep(0.001)
        t0 = time.perf_counter()
        await client.search([query], k, prefetch)
        return time.perf_counter() - t0

    latencies = await asyncio.gather(*(one(i, q) for i, q in enumerate(queries)))
    return list(latencies), time.perf_counter() - start


async def measure(retriever, merging: bool, args: argparse.Namespace) -> dict:  # type: ignore[no-untyped-def]
    from ralmspec_vllm.retrieval.client import RetrieverClient
    from ralmspec_vllm.retrieval.server import start_server
    from ralmspec_vllm.retrieval.service import ServiceConfig

    config = ServiceConfig(batch_window_ms=args.window_ms, merge_searches=merging)
    server = await start_server(retriever, "127.0.0.1", 0, config)
    firsts, each, bursts = [], [], []
    try:
        async with RetrieverClient(server.target, timeout_s=120) as client:
            for r in range(args.repeats):
                queries = [f"{QUERIES[(r + i) % len(QUERIES)]} {i}" for i in range(args.burst)]
                latencies, total = await burst(client, queries, args.k, args.prefetch)
                firsts.append(latencies[0])
                each.extend(latencies)
                bursts.append(total)
            stats = await client.stats()
    finally:
        await server.stop(grace=0)
    row = {
        "merging": merging,
        "first_ms": round(1000 * statistics.median(firsts), 2),
        "mean_ms": round(1000 * statistics.mean(each), 2),
        "burst_ms": round(1000 * statistics.median(bursts), 2),
        "index_searches": stats.index_searches,
        "max_merged_calls": stats.max_merged_calls,
    }
    print(
        f"merging={merging!s:5}  first {row['first_ms']:7.1f} ms  each {row['mean_ms']:7.1f} ms"
        f"  burst {row['burst_ms']:7.1f} ms  ({stats.index_searches} index searches,"
        f" up to {stats.max_merged_calls} calls merged)",
        flush=True,
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filler", type=int, default=0, help="filler documents (0: default KB)")
    parser.add_argument("--threads", type=int, default=2, help="BM25 search threads")
    parser.add_argument("--burst", type=int, default=8, help="concurrent searches per burst")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=0, help="hits after the top k")
    parser.add_argument("--window-ms", type=float, default=2.0, help="the lane's window")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args()

    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever
    from ralmspec_vllm.retrieval.kb import default_index, scale_index

    kb = scale_index(args.filler) if args.filler else default_index()
    retriever = open_retriever(kb, RetrieverConfig(backend="bm25"))
    retriever.index.set_threads(args.threads)  # type: ignore[attr-defined]
    rows = [asyncio.run(measure(retriever, merging, args)) for merging in (True, False)]
    if args.out:
        meta = {
            "docs": retriever.index.num_docs,  # type: ignore[attr-defined]
            "threads": args.threads,
            "burst": args.burst,
            "k": args.k,
            "prefetch": args.prefetch,
            "window_ms": args.window_ms,
            "repeats": args.repeats,
            "run": run_metadata("probe_lane_merging", vars(args)),
        }
        Path(args.out).write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
