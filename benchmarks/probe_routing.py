"""Offline probe: how often is the speculation cache's guess right over an IVF index, ranked
over every cached document (the exact best), within the lists the query's search reads
(``route_guesses``), or with the query one token early (its step's last token not decoded
yet, which would take the guess off the step's critical path; ranked either way)?

Real parts, no vLLM: SmolLM2-135M through Hugging Face transformers (greedy) answers real
questions the iterative-RaLM way (the index's top-1 in front of the question, a new
retrieval every 4 tokens, 128 tokens at most), over the default knowledge base grown with
synthetic filler and a FAISS IVF-Flat index (``IVFFlatRetriever``). The cache holds every
earlier step's search with a 256-document prefetch, as PSA's verifications fill it, and is
ranked by the engine's own ``DenseCacheScorer`` (exact scores, ties to the lower doc id;
routed: with the index's ``routing``). Answers need not match vLLM's token for token: the
probe measures how guesses behave on real text, not speed.

    .venv/bin/python benchmarks/probe_routing.py --filler 1000000 --nlist 1024 --nprobe 16 \\
        --questions-per-dataset 6

Writes ``benchmarks/results/probe_routing_<machine>_<size>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import describe_machine, greedy_step, run_metadata
from benchmarks.corpora import kb_of_size, size_tag

logger = logging.getLogger("probe_routing")

STRIDE, WINDOW, MAX_NEW, PREFETCH = 4, 32, 128, 256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--filler", type=int, default=1_000_000, help="total documents")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--questions-per-dataset", type=int, default=6)
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ralmspec_vllm.core.cache import DenseCacheScorer, SpeculationCache
    from ralmspec_vllm.core.trace import TraceRecorder
    from ralmspec_vllm.engine.models import resolve_model
    from ralmspec_vllm.questions import load_questions
    from ralmspec_vllm.retrieval.ann import IVFFlatRetriever

    kb = kb_of_size(args.filler)
    ivf = IVFFlatRetriever.from_kb(kb, nlist=args.nlist, nprobe=args.nprobe)
    routing = ivf.routing()
    embeddings = np.asarray(kb.embeddings())
    path = resolve_model("smollm2-135m")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    separator = tok.encode("\n\n", add_special_tokens=False)

    def query(question_ids: list[int], generated: list[int]) -> str:
        if len(generated) >= WINDOW:
            tail = generated[-WINDOW:]
        else:
            tail = question_ids[max(0, len(question_ids) - WINDOW + len(generated)) :]
            tail = tail + generated
        return str(tok.decode(tail, skip_special_tokens=True))

    scorers = {routed: DenseCacheScorer(ivf.encode, in_thread=False) for routed in (False, True)}
    scorers[True].routing = routing  # a cache holding lists is then ranked within the probed
    recorder, loop = TraceRecorder("probe"), asyncio.new_event_loop()

    def guess(cache: SpeculationCache, text: str, routed: bool) -> int | None:
        return loop.run_until_complete(scorers[routed].top1(cache, text, recorder))

    counts = dict.fromkeys(
        ("guesses", "exact", "routed", "cached", "unreachable", "early", "early_routed"), 0
    )
    questions = [
        q
        for name in ("nq", "triviaqa", "webquestions")
        for q in load_questions(name, args.questions_per_dataset)
    ]
    start = time.perf_counter()
    for i, question in enumerate(questions):
        question_ids = tok.encode(question.text, add_special_tokens=False)
        generated: list[int] = []
        cache = SpeculationCache(MAX_NEW // STRIDE * PREFETCH + 1)  # never evicts
        while len(generated) < MAX_NEW:
            text = query(question_ids, generated)
            (q,) = ivf.encode([text])
            (hits,) = ivf.search_vectors(q[None], 1, PREFETCH - 1)
            truth = hits[0].doc_id
            if len(cache):
                exact = guess(cache, text, routed=False)
                assert exact is not None  # the cache holds documents
                early = query(question_ids, generated[:-1])
                counts["guesses"] += 1
                counts["exact"] += exact == truth
                counts["routed"] += guess(cache, text, routed=True) == truth
                counts["cached"] += truth in cache
                counts["unreachable"] += bool(
                    exact != truth and not np.isin(ivf.lists([exact]), routing.probed(q))[0]
                )
                counts["early"] += guess(cache, early, routed=False) == truth
                counts["early_routed"] += guess(cache, early, routed=True) == truth
            ids = [h.doc_id for h in hits]
            vectors = dict(zip(ids, embeddings[ids], strict=True))
            cache.insert(ids, vectors, lists=dict(zip(ids, ivf.lists(ids).tolist(), strict=True)))
            doc = tok.encode(kb.documents.get([truth])[0].contents, add_special_tokens=False)
            prompt = doc[:128] + separator + question_ids + generated
            new, ended = greedy_step(model, prompt, STRIDE, [tok.eos_token_id], tok.eos_token_id)
            generated += new
            if ended or not new:
                break
        logger.info("%d/%d %s: %s", i + 1, len(questions), question.qid, counts)
    n = max(1, counts["guesses"])
    result: dict[str, Any] = {
        "meta": run_metadata("probe_routing", vars(args), describe_machine()),
        "counts": counts,
        "accuracy": {k: round(counts[k] / n, 4) for k in list(counts)[1:] if k != "unreachable"},
        "wrong_exact_guesses_unreachable": counts["unreachable"],
        "wrong_exact_guesses": counts["guesses"] - counts["exact"],
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = size_tag(args.filler)
    out = out_dir / f"probe_routing_{describe_machine().tag}_{tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    logger.info("accuracy %s -> %s", result["accuracy"], out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
