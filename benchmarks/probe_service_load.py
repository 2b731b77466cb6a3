"""Probe: a retriever service child under closed-loop load shaped like the baseline's or
RaLMSpec's, at two GIL switch intervals. Where does a search's time go?

Serving at 21M (sessions 16-17, H200) found RaLMSpec's searches 1.8x slower inside the
retriever than the baseline's at about the same merge size. This starts a real ``retriever
serve`` child per configuration (``--switch-interval-ms``), keeps ``--callers`` clients busy
for ``--seconds``, and reads the child's own counters (``InfoResponse.backend_counters``):

- ``baseline``: one query a call, the exact top-1 (a baseline step);
- ``ralmspec``: a verification of 1-4 queries (top-20 + 236 prefetch hits with their
  vectors, as PSA asks), each preceded by the ``Encode`` of its speculative steps (the
  server's local cache scoring).

Queries are real questions with a tag and a counter appended: no text repeats, in a load
or across loads, so the server's encoder runs for every one (its memo never hits).

    python benchmarks/probe_service_load.py --index DIR --threads 2 --out probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving_server import scan_chunk
from ralmspec_vllm.questions import load_questions
from ralmspec_vllm.retrieval.client import RetrieverClient
from ralmspec_vllm.retrieval.server import ServerProcess


async def _load(
    target: str, shape: str, callers: int, seconds: float, texts: list[str]
) -> dict[str, Any]:
    counter = itertools.count()
    latencies: list[float] = []
    queries = 0

    tag = f"{shape}{time.monotonic_ns()}"  # no text repeats across loads: the encoder runs

    def text() -> str:
        n = next(counter)
        return f"{texts[n % len(texts)]} {tag}-{n}"

    async with RetrieverClient(target, timeout_s=120) as client:
        await client.wait_ready(120)
        await client.search([text()], 1)  # warm
        before = await client.stats()
        deadline = time.monotonic() + seconds

        async def caller(index: int) -> None:
            nonlocal queries
            rounds = itertools.count(index)
            while time.monotonic() < deadline:
                start = time.perf_counter()
                if shape == "baseline":
                    await client.search([text()], 1)
                    queries += 1
                else:
                    batch = [text() for _ in range(1 + next(rounds) % 4)]
                    for q in batch:
                        await client.encode([q])  # the speculative step's cache scoring
                    await client.search_with_vectors(batch, 20, 236)
                    queries += len(batch)
                latencies.append(time.perf_counter() - start)

        started = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        wall = time.perf_counter() - started
        after = await client.stats()
    work = {k: after.backend.get(k, 0.0) - before.backend.get(k, 0.0) for k in after.backend}
    searches = after.index_searches - before.index_searches
    return {
        "queries_per_s": round(queries / wall, 2),
        "calls": len(latencies),
        "call_mean_s": round(sum(latencies) / max(1, len(latencies)), 4),
        "index_searches": searches,
        "queries_per_index_search": round((after.queries - before.queries) / max(1, searches), 2),
        "index_search_mean_s": round(
            (after.search_seconds - before.search_seconds) / max(1, searches), 4
        ),
        "scan_chunk": {
            **(scan_chunk(work) or {}),
            "busy_fraction": round(work.get("scan_busy_s", 0.0) / wall, 3),
        },
        "rank_s_per_search": round(work.get("rank_s", 0.0) / max(1, searches), 4),
        "encode_s": round(work.get("encode_s", 0.0), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", required=True, help="knowledge-base folder")
    parser.add_argument("--threads", type=int, default=2, help="the scan's threads")
    parser.add_argument("--callers", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--intervals-ms", default="5,0.5", help="switch intervals to try")
    parser.add_argument("--shapes", default="baseline,ralmspec")
    parser.add_argument(
        "--child-arg",
        action="append",
        default=[],
        help="extra flag for the child 'retriever serve' (repeatable)",
    )
    parser.add_argument("--out", default=None, help="write JSON here")
    args = parser.parse_args(argv)
    texts = [q.text for ds in ("nq", "triviaqa", "webquestions") for q in load_questions(ds, 40)]
    results: list[dict[str, Any]] = []
    for interval in args.intervals_ms.split(","):
        child = [
            "--index", args.index, "--backend", "flat", "--flat-impl", "torch",
            "--device", "cpu", "--dtype", "bfloat16", "--flat-scan", "circular",
            "--threads", str(args.threads), "--port", "0", "--no-progress",
            "--switch-interval-ms", interval, *args.child_arg,
        ]  # fmt: skip
        with ServerProcess.spawn(child, timeout_s=600) as proc:
            for shape in args.shapes.split(","):
                row = asyncio.run(_load(proc.target, shape, args.callers, args.seconds, texts))
                row = {"switch_interval_ms": float(interval), "shape": shape, **row}
                print(json.dumps(row), flush=True)
                results.append(row)
    if args.out:
        meta = {"index": args.index, "threads": args.threads, "callers": args.callers,
                "seconds": args.seconds, "child_args": args.child_arg}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
