"""Do concurrent BM25 searches get more done than one search at a time on every thread?

Session 25 (H100 host, 21M documents) argued BM25's >=2x target out of reach: a search on 12
threads took 49 ms against 147 ms on one, "so searches in flight share the cores and none
finishes sooner", and RaLMSpec, which needs one exact search per speculated step, could at
best hide the LM behind them (1.39x). That holds only if a search on 12 threads already gets
as much out of the cores as several searches side by side would. 3x on 12 threads is 25%
parallel efficiency: if the rest is each search's serial part (term lookups, slicing every
posting list per shard, merging the shards' candidates) rather than memory bandwidth,
searches run side by side (each on fewer threads) would answer several times as many per
second, and the pipelined verifications, which need throughput, could use that.

This probe opens a BM25 index over a real knowledge base (passages + ``--filler``) and, for
each search pool size in ``--threads``, sends ``--searches`` one-query searches from
``--concurrency`` caller threads at once (1: one after another, the baseline's way), and
reports searches per second and the latency's median and p90; every search's hits must
equal the one-at-a-time answer. Queries are RaLM-like windows: a real question followed by
words of a real passage, 16-40 words.

    python3 benchmarks/probe_bm25_concurrency.py --filler 2995355 --threads 2,1 \\
        --concurrency 1,2,4 --out benchmarks/results/probe_bm25_concurrency_cpu-2c_3m.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_metadata


def query_windows(retriever: Any, count: int) -> list[str]:
    """``count`` RaLM-like query windows: a real question, then 8-32 words of one of the
    knowledge base's first documents (its real passages)."""
    from ralmspec_vllm.questions import DATASETS, load_questions

    questions = [q.text for d in sorted(DATASETS) for q in load_questions(d, count)]
    passages = retriever.documents(list(range(min(count, retriever.info.num_docs))))
    windows = []
    for i in range(count):
        words = passages[i % len(passages)].text.split()
        windows.append(f"{questions[i % len(questions)]} {' '.join(words[: 8 + (i * 5) % 25])}")
    return windows


def run_cell(retriever: Any, queries: list[str], k: int, prefetch: int, callers: int) -> dict:
    """``queries`` as one-query searches from ``callers`` threads at once (each takes the
    next query when free): throughput, latencies and the hits in query order."""
    latencies = [0.0] * len(queries)
    hits: list[Any] = [None] * len(queries)

    def one(i: int) -> None:
        start = time.perf_counter()
        (hits[i],) = retriever.search([queries[i]], k, prefetch)
        latencies[i] = time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(callers, thread_name_prefix="probe-caller") as pool:
        list(pool.map(one, range(len(queries))))  # a pool thread takes the next when free
    elapsed = time.perf_counter() - start
    return {
        "per_s": round(len(queries) / elapsed, 2),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p90_ms": round(1000 * float(np.percentile(latencies, 90)), 2),
        "hits": hits,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filler", type=int, default=0, help="filler documents (0: default KB)")
    parser.add_argument("--threads", default="2,1", help="search pool sizes to try")
    parser.add_argument("--concurrency", default="1,2,4", help="caller threads to try")
    parser.add_argument("--searches", type=int, default=48, help="searches per cell")
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--prefetch", type=int, default=0, help="hits after the top k")
    parser.add_argument("--out", default=None, help="JSON output file")
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()

    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever
    from ralmspec_vllm.retrieval.kb import default_index, scale_index

    start = time.perf_counter()
    kb = scale_index(args.filler) if args.filler else default_index()
    retriever = open_retriever(kb, RetrieverConfig(backend="bm25", save_index=False))
    index = retriever.index  # type: ignore[attr-defined]
    queries = query_windows(retriever, args.searches)
    print(f"[probe_bm25_concurrency] {index.num_docs} docs, ready in "
          f"{time.perf_counter() - start:.1f} s", flush=True)  # fmt: skip
    results = []
    expected: list[Any] | None = None
    for threads in (int(t) for t in args.threads.split(",")):
        index.set_threads(threads)
        retriever.search(queries[:2], args.k, args.prefetch)  # warm the pool
        for callers in (int(c) for c in args.concurrency.split(",")):
            cell = run_cell(retriever, queries, args.k, args.prefetch, callers)
            hits = cell.pop("hits")
            if expected is None:
                expected = hits
            if hits != expected:
                print(f"ERROR: hits differ at threads={threads} callers={callers}", flush=True)
                return 1
            row = {"threads": index.threads, "shards": index.shards, "callers": callers, **cell}
            results.append(row)
            print(
                f"threads {row['threads']:3}  callers {callers:3}  {row['per_s']:8.1f}/s"
                f"  p50 {row['p50_ms']:8.1f} ms  p90 {row['p90_ms']:8.1f} ms",
                flush=True,
            )
    if args.out:
        meta = {
            "docs": index.num_docs,
            "searches": len(queries),
            "k": args.k,
            "prefetch": args.prefetch,
            "run": run_metadata("probe_bm25_concurrency", vars(args)),
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
