"""Does an in-process search wait for the GIL while the event loop runs Python?

Times ``FlatRetriever.search_vectors`` (torch, bf16, CPU: the 21M configuration on fewer
random docs) alone and beside a Python thread that holds the GIL all the time (``busy``) or
1 ms in every 5 (``duty20``, nearer an event loop that drives vLLM), at Python's 5 ms
switch interval and at 0.5 ms. The search thread re-takes the GIL after every torch and
numpy call, so its wait grows with the number of chunks (docs / chunk size).

    python3 benchmarks/gpu/probe_gil.py --docs 4000000 --threads 12 --out probe_gil.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def random_scan(
    num_docs: int, threads: int | None, repeats: int, tag: str
) -> tuple[Any, Callable[[int], float]]:
    """The 21M configuration's scan (``FlatRetriever``, torch bf16 on the CPU) over
    ``num_docs`` random unit vectors, and ``timed(batch)``: the median ms of ``repeats``
    searches of ``batch`` queries near stored docs (top-20 + 236 further hits, PSA's shape).
    ``threads`` sets torch's (the scan's) threads."""
    import torch

    from ralmspec_vllm.retrieval.flat import FlatRetriever

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    docs = np.empty((num_docs, 384), dtype=np.float32)
    for i in range(0, num_docs, 1 << 20):
        block = rng.standard_normal((min(1 << 20, num_docs - i), 384), dtype=np.float32)
        docs[i : i + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    flat = FlatRetriever(docs, impl="torch", device="cpu", dtype="bfloat16")
    seconds = time.perf_counter() - start
    print(f"[{tag}] {num_docs} docs ready in {seconds:.1f} s, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} cpus", flush=True)  # fmt: skip
    picks = rng.choice(num_docs, 16, replace=False)
    queries = docs[picks] + 0.05 * rng.standard_normal((16, 384), dtype=np.float32)

    def timed(batch: int) -> float:
        runs = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            flat.search_vectors(queries[:batch], 20, 236)
            runs.append(time.perf_counter() - t0)
        return 1000 * statistics.median(runs)

    return flat, timed


def hold_gil(kind: str, stop: threading.Event) -> None:
    """Run Python until ``stop``: all the time (``busy``) or 1 ms in every 5 (``duty20``)."""
    while not stop.is_set():
        until = time.perf_counter() + (1.0 if kind == "busy" else 0.001)
        x = 0
        while time.perf_counter() < until and not stop.is_set():
            for i in range(200):
                x += i
        if kind == "duty20":
            time.sleep(0.004)


@contextlib.contextmanager
def gil_load(kind: str) -> Iterator[None]:
    """While inside: nothing more (``idle``) or a thread running ``hold_gil(kind)``."""
    stop = threading.Event()
    worker = None
    if kind != "idle":
        worker = threading.Thread(target=hold_gil, args=(kind, stop), daemon=True)
        worker.start()
    try:
        yield
    finally:
        stop.set()
        if worker is not None:
            worker.join()


def under_loads(intervals: Sequence[float]) -> Iterator[tuple[float, str]]:
    """Each switch interval, then each load ("idle", "duty20", "busy"): sets the interval
    and runs the load's GIL-holding thread while the caller times what it wants."""
    for interval in intervals:
        sys.setswitchinterval(interval)
        for kind in ("idle", "duty20", "busy"):
            with gil_load(kind):
                yield interval, kind


def percentiles(ms: list[float]) -> dict[str, float]:
    """p50, p90 (the nearest lower rank) and mean of ``ms``, rounded to microseconds."""
    ms = sorted(ms)
    return {
        "p50_ms": round(statistics.median(ms), 3),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def write_probe(
    out_dir: str | None, name: str, meta: dict[str, Any], results: list[dict[str, Any]]
) -> None:
    """Print ``meta``; with ``out_dir``, write ``{meta, results}`` to
    ``<out_dir>/<name>_<machine>.json``."""
    from benchmarks.common import describe_machine

    print(json.dumps(meta), flush=True)
    if out_dir:
        out = Path(out_dir) / f"{name}_{describe_machine().tag}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"wrote {out}")


def sweep(
    timed: Callable[[int], float],
    values: Sequence[int],
    name: str,
    intervals: Sequence[float],
    digits: int,
) -> list[dict[str, Any]]:
    """``timed(value)`` (ms) for each of ``values`` under every switch interval and load of
    ``under_loads``, after one settling call per load: a printed line and a result row
    (``switch_ms``, ``load``, ``name``: the value, ``p50_ms`` to ``digits``) each."""
    results = []
    for interval, load in under_loads(intervals):
        timed(values[0])  # settle
        for value in values:
            ms = timed(value)
            results.append({"switch_ms": interval * 1000, "load": load, name: value,
                            "p50_ms": round(ms, digits)})  # fmt: skip
            print(f"switch {interval * 1000:>3} ms  {load:>6}  {name} {value:>3}: {ms:7.1f} ms",
                  flush=True)  # fmt: skip
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4_000_000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--batches", default="1,5")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args()

    import torch

    flat, timed = random_scan(args.docs, args.threads, args.repeats, "probe_gil")

    batches = [int(b) for b in args.batches.split(",")]
    results = sweep(timed, batches, "batch", (0.005, 0.0005), digits=1)
    if args.out:
        meta = {"docs": args.docs, "torch_threads": torch.get_num_threads(),
                "chunk_size": flat.chunk_size}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
