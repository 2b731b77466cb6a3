"""Does a BM25 search wait for the GIL while other threads run Python?

Session 24 (H200, 21M documents, 12 search threads): a search took 44 ms in the baseline
and 300 ms on average while RaLMSpec speculated, with fetches (term weights, Python) and the
event loop driving vLLM running in the same process. This probe times
``BM25Index.top_k_many`` on a real knowledge base (passages + filler) alone and beside a
thread that holds the GIL all the time (``busy``) or 1 ms in every 5 (``duty20``), at the
switch interval the benchmarks use (0.5 ms) and Python's default (5 ms). Every search thread
re-takes the GIL after each numpy call that released it, so the wait grows with the number
of numpy calls a search makes.

    python3 benchmarks/probe_bm25_gil.py --filler 3000000 --threads 2 \
        --out benchmarks/results/probe_bm25_gil_cpu-2c_3m.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import run_metadata
from benchmarks.gpu.probe_gil import sweep

QUERIES = (
    "who wrote the song what a wonderful world and when was it released",
    "the capital city of australia is canberra which was chosen as a compromise between",
    "the first man to walk on the moon was neil armstrong during the apollo 11 mission in"
    " july with buzz aldrin and michael collins orbiting above in the command module",
)
"""Query windows of the lengths RaLMSpec sends (the last 32 tokens of question + answer)."""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filler", type=int, default=3_000_000, help="filler documents")
    parser.add_argument("--threads", type=int, default=2, help="BM25 search threads")
    parser.add_argument("--ks", default="1,256", help="top-k values (256: PSA's prefetch)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="JSON output file")
    args = parser.parse_args()

    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever
    from ralmspec_vllm.retrieval.kb import default_index, scale_index

    start = time.perf_counter()
    kb = scale_index(args.filler) if args.filler else default_index()
    index = open_retriever(kb, RetrieverConfig(backend="bm25")).index  # type: ignore[attr-defined]
    index.set_threads(args.threads)
    terms = [index.term_ids(q) for q in QUERIES]
    ready = time.perf_counter() - start
    print(f"[probe_bm25_gil] {index.num_docs} docs, {index.threads} threads, "
          f"{index.shards} shards, ready in {ready:.1f} s", flush=True)  # fmt: skip

    def timed(k: int) -> float:
        runs = []
        for _ in range(args.repeats):
            for query in terms:
                t0 = time.perf_counter()
                index.top_k_many([query], k)
                runs.append(time.perf_counter() - t0)
        return 1000 * statistics.median(runs)

    ks = [int(k) for k in args.ks.split(",")]
    results = sweep(timed, ks, "k", (0.0005, 0.005), digits=3)
    if args.out:
        meta = {"docs": index.num_docs, "threads": index.threads, "shards": index.shards,
                "query_terms": [len(t) for t in terms],
                "run": run_metadata("probe_bm25_gil", vars(args))}  # fmt: skip
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
