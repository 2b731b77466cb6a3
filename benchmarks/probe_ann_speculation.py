"""Probe: how often can a cache speculate an approximate retriever's answer, and why not?

No LM: each question's "generated" text is the exact top-1 passage for the question (an LM
answering from its document copies much of it), and a query is the last ``query_window``
tokens every ``retrieval_stride`` tokens (``RaLMConfig``'s defaults). The probe searches the
backend (top-1 with PSA's prefetch; HNSW keeps it within its efSearch beam) and the exact
flat index, keeps a cache of every list the backend returned, and speculates the cached
document with the best exact inner product, ties to the lower doc id (``SpeculationCache``
and ``exact_candidates``, as ``DenseCacheScorer`` does). Each step then
counts as a hit or as one of two misses:

- ``truth_not_cached``: the backend's top-1 was in none of the earlier lists;
- ``truth_outranked``: it was cached, but another cached document scores higher, for
  example the exact nearest neighbour, which the backend's search missed (``spec_is_exact``).

``ann_is_exact`` is the backend's recall@1 against the exact search on the same queries.
Session 16 (200k docs, SmolLM2's tokenizer, 30 questions, 810 steps): HNSW at efSearch 128
0.50 accuracy with recall@1 0.54, at 512 0.65 / 0.75, IVF-Flat 0.75 / 0.93. The synthetic
filler is noisy copies of the real passages, so a query faces a cluster of near-equal
candidates, among which HNSW's top-1 is close to arbitrary.

    python benchmarks/probe_ann_speculation.py --filler 200000 --backend hnsw --ef-search 512
    python benchmarks/probe_ann_speculation.py --filler 3000000 --backend ivf --nlist 4096 \
        --nprobe 64 --ivf-codec sq8
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ralmspec_vllm.core.cache import SpeculationCache, exact_candidates
from ralmspec_vllm.core.config import PSA_PREFETCH_K, RaLMConfig
from ralmspec_vllm.retrieval.ann import IVF_CODECS


def replay(
    ann: Any,
    exact: Any,
    tokenizer: Any,
    questions: Sequence[str],
    prefetch: int,
    steps: int = 28,
    stride: int = RaLMConfig().retrieval_stride,
    window: int = RaLMConfig().query_window,
) -> Counter[str]:
    """Replay every question's query windows against ``ann`` and ``exact``; the counts."""
    counts: Counter[str] = Counter()
    for question in questions:
        first = exact.search([question], 1)[0][0].doc_id
        text = question + "\n" + exact.documents([first])[0].text
        ids = tokenizer(text)["input_ids"]
        start = len(tokenizer(question + "\n")["input_ids"])
        cache = SpeculationCache(capacity=steps * (1 + prefetch))  # never evicts
        for step in range(steps):
            end = start + stride * step
            if end > len(ids):
                break
            # One encoding for all three uses: both indexes share the knowledge base's encoder.
            q = ann.encode([tokenizer.decode(ids[max(0, end - window) : end])])
            hits = ann.search_vectors(q, 1, prefetch)[0]
            truth = hits[0].doc_id
            nearest = exact.search_vectors(q, 1)[0][0].doc_id
            if len(cache):
                counts["steps"] += 1
                counts["ann_is_exact"] += truth == nearest
                vectors = cache.vectors
                assert vectors is not None
                spec = cache.best_exact(*exact_candidates(q[0], vectors, cache.max_vector_norm))
                if spec == truth:
                    counts["hit"] += 1
                else:
                    counts["truth_outranked" if truth in cache else "truth_not_cached"] += 1
                    counts["spec_is_exact"] += spec == nearest
            new = cache.missing([h.doc_id for h in hits])
            if new:
                cache.insert(new, dict(zip(new, ann.vectors(new), strict=True)))
    return counts


def summary(counts: Counter[str]) -> dict[str, Any]:
    steps = max(1, counts["steps"])
    return {
        **counts,
        "accuracy": counts["hit"] / steps,
        "ann_recall_at_1": counts["ann_is_exact"] / steps,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from transformers import AutoTokenizer

    from benchmarks.corpora import filler_corpus
    from ralmspec_vllm.engine.models import smollm2_tokenizer
    from ralmspec_vllm.questions import load_questions
    from ralmspec_vllm.retrieval.factory import RetrieverConfig, open_retriever
    from ralmspec_vllm.retrieval.kb import default_index

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--filler", type=int, default=200000, help="docs in all (default 200000)")
    p.add_argument("--backend", choices=("hnsw", "ivf"), default="hnsw")
    defaults = RetrieverConfig()
    p.add_argument("--ef-search", type=int, default=defaults.ef_search, help="HNSW efSearch")
    p.add_argument("--nlist", type=int, help="IVF lists (default ~4 sqrt(docs))")
    p.add_argument("--nprobe", type=int, default=defaults.nprobe, help="IVF lists probed")
    p.add_argument("--ivf-codec", choices=IVF_CODECS, default="flat", help="IVF storage")
    p.add_argument("--questions-per-dataset", type=int, default=10)
    p.add_argument("--out", help="write the counts as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    kb, _ = filler_corpus(default_index(), args.filler)
    ann_config = RetrieverConfig(
        backend=args.backend,
        ef_search=args.ef_search,
        nlist=args.nlist,
        nprobe=args.nprobe,
        ivf_codec=args.ivf_codec,
    )
    ann = open_retriever(kb, ann_config)
    # The torch scan re-scores its candidates exactly (FAISS's flat top-1) and is the faster
    # exact search on a small CPU (README, 1M docs on 2 cores: 227 against 436 ms a query).
    exact = open_retriever(
        kb, RetrieverConfig(backend="flat", device="cpu", flat_impl="torch", dtype="bfloat16")
    )
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_tokenizer()))
    questions = [
        q.text
        for dataset in ("nq", "triviaqa", "webquestions")
        for q in load_questions(dataset, args.questions_per_dataset)
    ]
    # HNSW answers from within its efSearch beam whatever the prefetch (ann.py), which is
    # where the engine caps it too.
    result = summary(replay(ann, exact, tokenizer, questions, PSA_PREFETCH_K - 1))
    result.update(backend=args.backend, docs=len(kb), index=ann.info.extra)
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
