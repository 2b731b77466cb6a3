"""Micro-measurement of the BM25 and exact flat backends at scale (default 1M documents).

Not a test and not the full retrieval benchmark (``bench_retrieval.py`` covers batch sizes,
gRPC and every backend): this times the backends' own ``search`` in-process, without a
knowledge base on disk, so it runs anywhere in a few minutes.

- BM25: the real Wikipedia passages (gensim) plus synthetic filler passages drawn from the
  real unigram distribution (``corpus.FillerText``) up to ``--num-docs``; queries are real
  32-word and 6-word windows of real passages (RaLM's sliding-window queries look like this).
- Flat: ``--num-docs`` random unit vectors of dimension 384 (MiniLM's), queries are noisy
  copies of corpus vectors; FAISS IndexFlatIP and the torch matmul path on ``--device``.

Prints a fixed-width table and writes JSON (``--out``) with the machine and parameters.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ralmspec_vllm.retrieval.analyzer import Analyzer
from ralmspec_vllm.retrieval.bm25 import BM25Index, BM25Retriever
from ralmspec_vllm.retrieval.flat import FlatRetriever

logger = logging.getLogger(__name__)


def _percentiles(seconds: list[float], batch: int = 1) -> dict[str, float]:
    """Latency of one call (a batch of ``batch`` queries) and the same per query."""
    ms = np.asarray(seconds) * 1e3
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    return {"p50_ms": p50, "p99_ms": p99, "p50_ms_per_query": p50 / batch, "calls": len(ms)}


def _time(fn: Callable[[Any], object], args: list[Any]) -> list[float]:
    """Seconds of ``fn(a)`` for each ``a``."""
    out = []
    for a in args:
        t = time.perf_counter()
        fn(a)
        out.append(time.perf_counter() - t)
    return out


def _real_texts(path: Path | None) -> list[str]:
    """The real passages' ``Document.contents``: from gensim, or a KB's ``docs.jsonl``."""
    if path is None:
        from ralmspec_vllm.retrieval.corpus import wiki_passages

        return [f"{p.title}\n{p.text}" for p in wiki_passages()]
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [f"{r['title']}\n{r['text']}" if r["title"] else r["text"] for r in records]


def bench_bm25(
    num_docs: int, num_queries: int, k: int, texts_path: Path | None
) -> list[dict[str, Any]]:
    from ralmspec_vllm.retrieval.corpus import FillerText

    real = _real_texts(texts_path)
    filler = FillerText.from_texts(real, seed=0, num_words=100)

    def batches() -> Any:
        yield real
        for start in range(len(real), num_docs, 20_000):
            yield filler.texts(np.arange(start, min(start + 20_000, num_docs)))

    t0 = time.perf_counter()
    index = BM25Index.build(batches(), analyzer=Analyzer(), total=num_docs)
    build_s = time.perf_counter() - t0
    retriever = BM25Retriever(index)
    rng = np.random.default_rng(0)
    queries = []
    for n, i in enumerate(rng.choice(len(real), size=num_queries, replace=False).tolist()):
        words = real[i].split()
        queries.append(" ".join(words[: 32 if n % 2 else 6]))
    rows = []
    for batch in (1, 16):
        groups = [queries[i : i + batch] for i in range(0, len(queries), batch)]
        seconds = _time(lambda g: retriever.search(g, k), groups)
        rows.append({"backend": "bm25", "batch": batch, **_percentiles(seconds, batch)})
    ids = list(range(0, num_docs, max(1, num_docs // 1000)))
    score_s = _time(lambda q: retriever.score(q, ids), queries[:20])
    rows.append({"backend": "bm25-score-1k-ids", "batch": 1, **_percentiles(score_s)})
    for row in rows:
        row.update(build_s=build_s, postings=int(index.weights.nnz), vocab=len(index.vocab))
    return rows


def bench_flat(
    num_docs: int,
    num_queries: int,
    k: int,
    device: str,
    impls: str,
    dtypes: str = "float32",
    batches: tuple[int, ...] = (1, 16),
) -> list[dict[str, Any]]:
    rng = np.random.default_rng(0)
    dim = 384
    vectors = np.empty((num_docs, dim), dtype=np.float32)
    for start in range(0, num_docs, 100_000):
        block = rng.standard_normal((min(100_000, num_docs - start), dim), dtype=np.float32)
        vectors[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    picks = rng.choice(num_docs, size=num_queries, replace=False)
    queries = vectors[picks] + 0.05 * rng.standard_normal((num_queries, dim), dtype=np.float32)
    rows: list[dict[str, Any]] = []
    variants: list[tuple[str, dict[str, Any]]] = []
    if "faiss" in impls:
        variants.append(("faiss-cpu", {"impl": "faiss", "device": "cpu"}))
    if "torch" in impls:
        for dtype in dtypes.split(","):
            variants.append(
                (f"torch-{device}-{dtype}", {"impl": "torch", "device": device, "dtype": dtype})
            )
    reference: list[Any] | None = None
    for name, params in variants:
        retriever = FlatRetriever(vectors, **params)
        hits = retriever.search_vectors(queries, k)  # warm-up, and the equality check
        reference = hits if reference is None else reference
        for batch in batches:
            groups = [queries[i : i + batch] for i in range(0, min(len(queries), 8 * batch), batch)]
            seconds = _time(functools.partial(retriever.search_vectors, k=k), groups)
            row = {
                "backend": f"flat-{name}",
                "batch": batch,
                "same_hits_as_first": hits == reference,
            }
            rows.append({**row, **_percentiles(seconds, batch)})
        raw = _raw_candidates_time(retriever, queries[:8], k)
        rows.append({"backend": f"flat-{name}-index-only", "batch": 1, **_percentiles(raw)})
        del retriever
    return rows


def _raw_candidates_time(retriever: FlatRetriever, queries: np.ndarray, k: int) -> list[float]:
    """The index search alone (no exact re-scoring), to show the re-scoring overhead."""
    count = k + retriever.candidate_margin
    return _time(lambda q: retriever._candidates(q[None], count), list(queries))


def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-docs", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=64)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--backends", default="bm25,flat")
    parser.add_argument("--device", default="cpu", help="torch flat device")
    parser.add_argument("--flat-impls", default="faiss,torch")
    parser.add_argument("--flat-dtypes", default="float32", help="torch flat matrix dtypes")
    parser.add_argument("--batches", default="1,16", help="queries per search call")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--real-texts", type=Path, default=None, help="a KB's docs.jsonl instead of gensim"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows: list[dict[str, Any]] = []
    if "bm25" in args.backends:
        rows += bench_bm25(args.num_docs, args.queries, args.k, args.real_texts)
    if "flat" in args.backends:
        batches = tuple(int(b) for b in args.batches.split(","))
        rows += bench_flat(
            args.num_docs, args.queries, args.k, args.device, args.flat_impls,
            args.flat_dtypes, batches,
        )  # fmt: skip
    print(f"{'backend':<32}{'batch':>6}{'p50 ms':>10}{'p99 ms':>10}{'p50 ms/query':>14}  same")
    for r in rows:
        print(
            f"{r['backend']:<32}{r['batch']:>6}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
            f"{r['p50_ms_per_query']:>14.2f}  {r.get('same_hits_as_first', '')}"
        )
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.processor()}",
        "python": sys.version.split()[0],
        "num_docs": args.num_docs,
        "k": args.k,
        "queries": args.queries,
        "gpu": _gpu_name() if args.device != "cpu" else "",
        "note": "p50/p99 per search call (one batch); flat uses random unit vectors",
    }
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
