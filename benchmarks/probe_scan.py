"""Probe: search latency of the torch flat scan, batch vs circular, alone and staggered.

Random unit vectors (no knowledge base needed): ``--docs`` rows of ``--dim``. For each scan
it times one query alone (b(1)), one call of ``--batch`` queries (b(n)), and a pipelined
verification's load: a new single-query search every ``--interval-ms`` from one thread each,
at most ``--depth`` in flight, reporting the latencies' median and p90. A batch scan runs
the staggered searches side by side (each walks the matrix); a circular scan boards them on
one walk; ``circular-percohort`` is the circular scan with its threshold ops run cohort by
cohort (as before they were merged). ``--busy-duty`` adds a Python thread that holds the GIL
that fraction of the time, in 2 ms bursts (an event loop driving vLLM in-process), and
``--switch-ms`` sets the GIL switch interval; ``--scans`` picks which of the three run (a
row also holds the walk's ``scan_*`` counters over the staggered searches: chunks, cohorts,
seconds in products and threshold ops) and ``--chunk-size`` sets the scan's chunk.
``--give-up-every N --give-up-after-ms T``: every N-th staggered search's caller leaves T ms
after sending it (a pipelined verification cancelled by a rollback), freeing its slot; only
the kept searches' latencies count. The ``circular`` scan then drops the search
(``retrieval.abandon``); ``circular-ridealong`` lets it ride out its turn, as before session
26. Writes JSON to ``--out`` when given.

    python benchmarks/probe_scan.py --docs 2000000 --dtype bfloat16 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.retrieval.flat import FlatRetriever

logger = logging.getLogger("probe_scan")


def _timed(fn, *args) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def staggered(retriever: FlatRetriever, queries: np.ndarray, interval_s: float, depth: int,
              k: int, give_up_every: int = 0, give_up_after_s: float = 0.0,
              honour_give_up: bool = True) -> list[float]:  # fmt: skip
    """One search per query, started every ``interval_s`` (at most ``depth`` in flight);
    every ``give_up_every``-th is given up ``give_up_after_s`` after it started (its slot
    freed; the search told so if ``honour_give_up``). The kept searches' latencies."""
    latencies: list[float] = []
    slots = threading.Semaphore(depth)
    lock = threading.Lock()

    def one(vector: np.ndarray, gives_up: bool) -> None:
        left = threading.Event()
        if gives_up:

            def give_up() -> None:
                if honour_give_up:
                    left.set()
                slots.release()

            threading.Timer(give_up_after_s, give_up).start()
        try:
            search = abandon.in_context(left, retriever.search_vectors)
            seconds = _timed(search, vector[None], k)
            if not gives_up:
                with lock:
                    latencies.append(seconds)
        except abandon.SearchAbandoned:
            pass
        finally:
            if not gives_up:
                slots.release()

    threads = []
    for i, vector in enumerate(queries):
        slots.acquire()
        gives_up = give_up_every > 0 and i % give_up_every == give_up_every - 1
        thread = threading.Thread(target=one, args=(vector, gives_up))
        thread.start()
        threads.append(thread)
        time.sleep(interval_s)
    for thread in threads:
        thread.join()
    return latencies


def busy(duty: float, stop: threading.Event) -> None:
    """Hold the GIL ``duty`` of the time in 2 ms bursts of pure Python."""
    burst = 0.002
    while not stop.is_set():
        end = time.perf_counter() + burst
        while time.perf_counter() < end:
            pass
        time.sleep(burst * (1 - duty) / duty)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2_000_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--chunk-size", type=int, default=1 << 20)
    parser.add_argument("--batch", type=int, default=7)
    parser.add_argument("--interval-ms", type=float, default=30.0)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--searches", type=int, default=40)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--busy-duty", type=float, default=0.0)
    parser.add_argument("--switch-ms", type=float, default=None)
    parser.add_argument("--give-up-every", type=int, default=0)
    parser.add_argument("--give-up-after-ms", type=float, default=0.0)
    parser.add_argument("--scans", default="batch,circular-percohort,circular")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    logger.info("making %d x %d random vectors", args.docs, args.dim)
    vectors = np.empty((args.docs, args.dim), dtype=np.float32)
    for start in range(0, args.docs, 1 << 20):
        block = rng.standard_normal((min(1 << 20, args.docs - start), args.dim), np.float32)
        vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    queries = rng.standard_normal((max(args.searches, args.batch), args.dim), np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if args.switch_ms is not None:
        sys.setswitchinterval(args.switch_ms / 1000)
    stop = threading.Event()
    if args.busy_duty > 0:
        threading.Thread(target=busy, args=(args.busy_duty, stop), daemon=True).start()
    for scan in args.scans.split(","):
        retriever = FlatRetriever(vectors, impl="torch", device=args.device, dtype=args.dtype,
                                  chunk_size=args.chunk_size, scan=scan.split("-")[0])  # fmt: skip
        if scan == "circular-percohort":
            assert retriever._circular is not None
            retriever._circular._add_all = None
        search = retriever.search_vectors
        search(queries[:1], args.k)  # warm
        b1 = [_timed(search, queries[:1], args.k) for _ in range(args.repeats)]
        bn = [_timed(search, queries[: args.batch], args.k) for _ in range(args.repeats)]
        before = retriever.counters()
        lat = staggered(retriever, queries[: args.searches], args.interval_ms / 1000, args.depth,
                        args.k, args.give_up_every, args.give_up_after_ms / 1000,
                        honour_give_up=scan != "circular-ridealong")  # fmt: skip
        after = retriever.counters()
        row = {
            "b1_s": statistics.median(b1),
            f"b{args.batch}_s": statistics.median(bn),
            "staggered_median_s": statistics.median(lat),
            "staggered_p90_s": float(np.percentile(lat, 90)),
            # the circular walk's work over the staggered searches (products, threshold ops)
            **{k: round(after[k] - before.get(k, 0.0), 4) for k in after if k.startswith("scan_")},
        }
        out[scan] = row
        logger.info("%s: %s", scan, {k: round(v, 4) for k, v in row.items()})
        retriever.close()
    stop.set()
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
