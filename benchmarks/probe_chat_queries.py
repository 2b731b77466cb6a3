"""Offline probe: what a chat request's retrieval queries read, and what that does to the
documents and to the speculation cache's guesses. Each question is asked through the chat
template (as the server's chat endpoint and ``bench_latency --chat`` ask it) and answered
twice the iterative-RaLM way, once per query source:

- ``template``: the query window reads the rendered template (the code before session 45:
  the model's default system prompt and role headers fill a short question's window);
- ``messages``: it reads the messages' text (``core.prompt.chat_query_text``, since).

Real parts, no vLLM: Qwen2.5-0.5B (or ``--model``) through Hugging Face transformers
(greedy) puts the index's exact top-1 in front of the templated question, retrieves every 4
tokens, 128 tokens at most, over the default knowledge base grown with synthetic filler and
an exact flat index (torch, bfloat16). The cache holds every earlier step's search with a
512-document prefetch, as the 21M setting's verifications fill it, and is ranked by the
engine's own ``DenseCacheScorer``: a step's guess is right when the cache's best is the
step's true top-1. Answers need not match vLLM's token for token: the probe measures how
queries and guesses behave on real text, not speed.

    .venv/bin/python benchmarks/probe_chat_queries.py --filler 3000000 --questions-per-dataset 10

Writes ``benchmarks/results/probe_chat_queries_<machine>_<size>.json``.
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

logger = logging.getLogger("probe_chat_queries")

STRIDE, MAX_NEW, PREFETCH, MAX_DOC = 4, 128, 512, 256
SOURCES = ("template", "messages")
EARLY = 4
"""Answers of at most this many steps count as short (session 45: 45 of 84 at 21M)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--filler", type=int, default=3_000_000, help="total documents")
    parser.add_argument("--questions-per-dataset", type=int, default=10)
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ralmspec_vllm.core.cache import DenseCacheScorer, SpeculationCache
    from ralmspec_vllm.core.config import RaLMConfig
    from ralmspec_vllm.core.prompt import PromptLayout, chat_query_text, render_chat
    from ralmspec_vllm.core.trace import TraceRecorder
    from ralmspec_vllm.engine.models import resolve_model
    from ralmspec_vllm.questions import load_questions
    from ralmspec_vllm.retrieval.flat import FlatRetriever

    kb = kb_of_size(args.filler)
    flat = FlatRetriever.from_kb(kb, impl="torch", device="cpu", dtype="bfloat16")
    embeddings = np.asarray(kb.embeddings())
    path = resolve_model(args.model)
    tok: Any = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config = RaLMConfig(retrieval_stride=STRIDE, max_new_tokens=MAX_NEW, max_doc_tokens=MAX_DOC)
    layout = PromptLayout(tok, config)  # the engine's own query window and prompt layout
    scorer = DenseCacheScorer(flat.encode, in_thread=False)
    recorder, loop = TraceRecorder("probe"), asyncio.new_event_loop()
    eos = {tok.eos_token_id, *tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])} - {None}

    def answer(question_ids: list[int], query_ids: list[int]) -> dict[str, Any]:
        """One iterative-RaLM answer; each step's query, true top-1 and the cache's guess."""
        generated: list[int] = []
        cache = SpeculationCache(MAX_NEW // STRIDE * PREFETCH + 1)  # never evicts
        steps: list[dict[str, Any]] = []
        while len(generated) < MAX_NEW:
            text = layout.query(query_ids, generated)
            (q,) = flat.encode([text])
            (hits,) = flat.search_vectors(q[None], 1, PREFETCH - 1)
            truth = hits[0].doc_id
            guess = loop.run_until_complete(scorer.top1(cache, text, recorder)) if cache else None
            steps.append({"query": text, "doc": truth, "guess": guess, "cached": truth in cache})
            ids = [h.doc_id for h in hits]
            cache.insert(ids, dict(zip(ids, embeddings[ids], strict=True)))
            doc = tok.encode(kb.documents.get([truth])[0].contents, add_special_tokens=False)
            prompt = layout.build(doc[:MAX_DOC], question_ids, generated)
            new, ended = greedy_step(model, prompt, STRIDE, eos, tok.eos_token_id)
            generated += new
            if ended or not new:
                break
        return {"text": tok.decode(generated, skip_special_tokens=True), "steps": steps}

    questions = [
        q
        for name in ("nq", "triviaqa", "webquestions")
        for q in load_questions(name, args.questions_per_dataset)
    ]
    records: list[dict[str, Any]] = []
    start = time.perf_counter()
    for i, question in enumerate(questions):
        messages = [{"role": "user", "content": question.text}]
        prompt_ids = layout.question_ids(render_chat(tok, messages, add_generation_prompt=True))
        sources = {
            "template": prompt_ids,
            "messages": layout.question_ids(chat_query_text(messages)),
        }
        record: dict[str, Any] = {"id": question.qid, "question": question.text}
        for source, query_ids in sources.items():
            record[source] = answer(prompt_ids, query_ids)
        records.append(record)
        logger.info(
            "%d/%d %s: first query %r / %r",
            i + 1,
            len(questions),
            question.qid,
            record["template"]["steps"][0]["query"][-60:],
            record["messages"]["steps"][0]["query"][-60:],
        )
    summary = {source: summarize([r[source] for r in records]) for source in SOURCES}
    summary["first_document_changed"] = sum(
        r["template"]["steps"][0]["doc"] != r["messages"]["steps"][0]["doc"] for r in records
    )
    result: dict[str, Any] = {
        "meta": run_metadata("probe_chat_queries", vars(args), describe_machine()),
        "summary": summary,
        "questions": records,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = size_tag(args.filler)
    out = out_dir / f"probe_chat_queries_{describe_machine().tag}_{tag}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    logger.info("%s -> %s", json.dumps(summary), out)
    return 0


def summarize(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Guess accuracy over all guessed steps, over short answers' (at most ``EARLY`` steps)
    and over the others'; steps an answer; answers of at most ``EARLY`` steps."""

    def accuracy(group: list[dict[str, Any]]) -> dict[str, Any]:
        guessed = [s for a in group for s in a["steps"] if s["guess"] is not None]
        right = sum(s["guess"] == s["doc"] for s in guessed)
        return {"guesses": len(guessed), "accuracy": round(right / max(1, len(guessed)), 4)}

    short = [a for a in answers if len(a["steps"]) <= EARLY]
    long = [a for a in answers if len(a["steps"]) > EARLY]
    return {
        "answers": len(answers),
        "short_answers": len(short),
        "mean_steps": round(sum(len(a["steps"]) for a in answers) / max(1, len(answers)), 2),
        "all": accuracy(answers),
        "short": accuracy(short),
        "long": accuracy(long),
    }


if __name__ == "__main__":
    raise SystemExit(main())
