"""Does the LM side's CPU work (cache scoring, query encoding) slow the retriever's scan?

Session 9 (21M docs, exact bf16 CPU scan in a child process, fill overlap): a round's
verification cost 0.44 s when the request's speculation cache held ~512 documents (the first
round) and 0.70-0.77 s once it held 5,000-16,000 (rounds 2-3), for about as many queries.
The scan runs in another process, so it is not the GIL. Suspect: the speculation loop's
``vectors @ q`` over the cache is a numpy (OpenBLAS) product; above a size OpenBLAS runs it
on every core, and its worker threads spin-wait after each call, so a product every ~30 ms
keeps them spinning against the scan's threads.

This times ``FlatRetriever.search_vectors`` (torch bf16 CPU, the 21M configuration on fewer
random docs) alone and beside a load that repeats, every ``--period-ms``:

- ``gemv-R``: the cache scoring, ``(R x 384 float32) @ q``, in a child process, with
  OpenBLAS's default threads or ``OPENBLAS_NUM_THREADS=1``;
- ``encode``: MiniLM-sized torch products (6 layers of a 32-token query) in a child
  process, with 12 torch threads or 1;
- ``gemv-R-thread``: the cache scoring in a thread of this process (the in-process layout).

    python3 benchmarks/gpu/probe_contention.py --docs 4000000 --threads 12 --out probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def load_loop(kind: str, rows: int, period_s: float, stop: threading.Event | None = None) -> None:
    """Repeat one speculation step's CPU work every ``period_s`` until stopped (or killed)."""
    rng = np.random.default_rng(1)
    if kind == "gemv":
        vectors = rng.standard_normal((rows, 384), dtype=np.float32)
        q = rng.standard_normal(384, dtype=np.float32)

        def step() -> None:
            scores = vectors @ q
            scores.max()

    else:
        import torch

        x = torch.randn(32, 384)
        weights = [(torch.randn(384, 1536), torch.randn(1536, 384)) for _ in range(6)]

        def step() -> None:
            h = x
            for up, down in weights:
                h = torch.relu(h @ up) @ down

    while stop is None or not stop.is_set():
        start = time.perf_counter()
        step()
        time.sleep(max(0.0, period_s - (time.perf_counter() - start)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4_000_000)
    parser.add_argument("--threads", type=int, default=None, help="the scan's torch threads")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--period-ms", type=float, default=30.0)
    parser.add_argument("--out", default=None, help="JSON output file")
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)  # child: gemv|encode
    parser.add_argument("--rows", type=int, default=16384, help=argparse.SUPPRESS)
    args = parser.parse_args()
    period_s = args.period_ms / 1000
    if args.load:
        load_loop(args.load, args.rows, period_s)
        return 0

    import torch

    from benchmarks.gpu.probe_gil import random_scan

    _, timed = random_scan(args.docs, args.threads, args.repeats, "probe_contention")

    def child(kind: str, rows: int, threads: int | None) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if threads is not None:
            env.update(OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
        cmd = [sys.executable, __file__, "--load", kind, "--rows", str(rows),
               "--period-ms", str(args.period_ms)]  # fmt: skip
        return subprocess.Popen(cmd, env=env)

    conditions: list[tuple[str, str, int, int | None, str]] = [
        ("idle", "", 0, None, ""),
        ("gemv-512", "gemv", 512, None, "process"),
        ("gemv-16384", "gemv", 16384, None, "process"),
        ("gemv-16384-1thread", "gemv", 16384, 1, "process"),
        ("encode", "encode", 0, None, "process"),
        ("encode-1thread", "encode", 0, 1, "process"),
        ("gemv-16384-thread", "gemv", 16384, None, "thread"),
    ]
    batches = [int(b) for b in args.batches.split(",")]
    results = []
    for name, kind, rows, threads, where in conditions:
        proc, stop, worker = None, threading.Event(), None
        if where == "process":
            proc = child(kind, rows, threads)
            time.sleep(2.0)  # the child imports numpy/torch and starts its loop
        elif where == "thread":
            worker = threading.Thread(target=load_loop, args=(kind, rows, period_s, stop))
            worker.start()
        timed(batches[0])  # settle
        for batch in batches:
            ms = timed(batch)
            results.append({"load": name, "batch": batch, "p50_ms": round(ms, 1)})
            print(f"{name:>20}  batch {batch:>2}: {ms:7.1f} ms", flush=True)
        if proc is not None:
            proc.kill()
            proc.wait()
        stop.set()
        if worker is not None:
            worker.join()
    if args.out:
        meta = {"docs": args.docs, "scan_threads": torch.get_num_threads(),
                "cpus": os.cpu_count(), "period_ms": args.period_ms}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
