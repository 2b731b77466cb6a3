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

With ``--follow-up TEXT`` each conversation gets a second user turn (the question, the
``messages`` answer as the assistant's message, then TEXT), answered twice from its
messages' text: with a fresh cache, as every request starts today, and with the first
turn's cache carried over (one pass: the answer's tokens and searches are the same either
way, only the guesses differ). The carried cache's guess at the second turn's first step says
how often a server that kept a conversation's cache could speculate the one search a
request now always waits for (session 46: about a third of what PSA leaves exposed on a
4-step chat answer at 21M). The follow-up is synthetic (no packaged question set has
conversations); the result file names it.

    .venv/bin/python benchmarks/probe_chat_queries.py --filler 3000000 --questions-per-dataset 10
    .venv/bin/python benchmarks/probe_chat_queries.py --filler 3000000 --questions-per-dataset 10 \
        --sources messages --follow-up "Tell me more about that."

Writes ``benchmarks/results/probe_chat_queries_<machine>_<size>[_follow-up].json``.
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
FOLLOW_UP_STEPS = 4
"""The second turn's steps answered by default: its first step is what a carried cache
could speculate, and a fresh cache has caught up a few steps later."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-0.5b")
    parser.add_argument("--filler", type=int, default=3_000_000, help="total documents")
    parser.add_argument("--questions-per-dataset", type=int, default=10)
    parser.add_argument(
        "--sources",
        default=",".join(SOURCES),
        help="query sources to answer with, of " + ",".join(SOURCES),
    )
    parser.add_argument("--follow-up", default=None, help="a second user turn's text")
    parser.add_argument(
        "--follow-up-steps",
        type=int,
        default=FOLLOW_UP_STEPS,
        help="retrieval steps of the second turn to answer (its first ones are the question)",
    )
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    sources_run = [s for s in args.sources.split(",") if s]
    if not sources_run or set(sources_run) - set(SOURCES):
        parser.error(f"--sources takes some of {','.join(SOURCES)}")
    if args.follow_up is not None and "messages" not in sources_run:
        parser.error("--follow-up continues the messages source's answer: include it")
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

    def answer(
        question_ids: list[int],
        query_ids: list[int],
        carried: SpeculationCache | None = None,
        max_steps: int = MAX_NEW // STRIDE,
    ) -> tuple[list[dict[str, Any]], SpeculationCache]:
        """One iterative-RaLM answer of at most ``max_steps`` steps, and its cache: one
        record from the answer's own cache (empty at first) and, where a ``carried`` cache
        is given, one from it, each with every step's query, true top-1 and guess. The
        step's search fills both caches alike."""
        generated: list[int] = []
        cache = SpeculationCache(2 * MAX_NEW // STRIDE * PREFETCH + 1)  # never evicts
        caches = [cache] if carried is None else [cache, carried]
        steps: list[list[dict[str, Any]]] = [[] for _ in caches]
        while len(generated) < MAX_NEW and len(steps[0]) < max_steps:
            text = layout.query(query_ids, generated)
            (q,) = flat.encode([text])
            (hits,) = flat.search_vectors(q[None], 1, PREFETCH - 1)
            truth, ids = hits[0].doc_id, [h.doc_id for h in hits]
            for c, record in zip(caches, steps, strict=True):
                guess = loop.run_until_complete(scorer.top1(c, text, recorder)) if c else None
                record.append({"query": text, "doc": truth, "guess": guess, "cached": truth in c})
                c.insert(ids, dict(zip(ids, embeddings[ids], strict=True)))
            doc = tok.encode(kb.documents.get([truth])[0].contents, add_special_tokens=False)
            prompt = layout.build(doc[:MAX_DOC], question_ids, generated)
            new, ended = greedy_step(model, prompt, STRIDE, eos, tok.eos_token_id)
            generated += new
            if ended or not new:
                break
        text = tok.decode(generated, skip_special_tokens=True)
        return [{"text": text, "steps": record} for record in steps], cache

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
        caches = {}
        for source in sources_run:
            (record[source],), caches[source] = answer(prompt_ids, sources[source])
        if args.follow_up is not None:
            turn = [
                *messages,
                {"role": "assistant", "content": record["messages"]["text"]},
                {"role": "user", "content": args.follow_up},
            ]
            ids = layout.question_ids(render_chat(tok, turn, add_generation_prompt=True))
            query = layout.question_ids(chat_query_text(turn))
            (record["follow_up_fresh"], record["follow_up_carried"]), _ = answer(
                ids, query, caches["messages"], max_steps=args.follow_up_steps
            )
        records.append(record)
        logger.info(
            "%d/%d %s: first queries %s",
            i + 1,
            len(questions),
            question.qid,
            [a["steps"][0]["query"][-60:] for k, a in record.items() if isinstance(a, dict)],
        )
    summary: dict[str, Any] = {s: summarize([r[s] for r in records]) for s in sources_run}
    if len(sources_run) == len(SOURCES):
        summary["first_document_changed"] = sum(
            r["template"]["steps"][0]["doc"] != r["messages"]["steps"][0]["doc"] for r in records
        )
    if args.follow_up is not None:
        summary["follow_up"] = summarize_follow_up(
            [r["follow_up_fresh"] for r in records], [r["follow_up_carried"] for r in records]
        )
    result: dict[str, Any] = {
        "meta": run_metadata("probe_chat_queries", vars(args), describe_machine()),
        "summary": summary,
        "questions": records,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = size_tag(args.filler) + ("_follow-up" if args.follow_up is not None else "")
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


def summarize_follow_up(
    fresh: list[dict[str, Any]], carried: list[dict[str, Any]]
) -> dict[str, Any]:
    """The second turn from a fresh cache and from the first turn's, question by question:
    the first step's guess (none from a fresh cache) and whether its true top-1 was cached,
    and the whole answers' guess accuracy."""
    firsts = [a["steps"][0] for a in carried if a["steps"]]
    return {
        "answers": len(carried),
        "first_step_guess_right": sum(
            s["guess"] is not None and s["guess"] == s["doc"] for s in firsts
        ),
        "first_step_truth_cached": sum(bool(s.get("cached")) for s in firsts),
        "fresh": summarize(fresh),
        "carried": summarize(carried),
    }


if __name__ == "__main__":
    raise SystemExit(main())
