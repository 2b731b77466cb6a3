"""Iterative RaLM, the reference every other mode must reproduce token for token.

Loop: query = last ``query_window`` tokens of question + generated; retrieve the top-1
document; generate ``retrieval_stride`` tokens with it in front (replacing the previous one);
repeat until EOS or ``max_new_tokens``. The oracle variant takes the documents of each step
as given (the baseline's own, from its trace) and never calls the retriever's search: the
ceiling for any speed-up from faster retrieval.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from ralmspec_vllm.core.request import RequestContext


async def run_baseline(ctx: RequestContext) -> None:
    """Generate the whole answer the iterative-RaLM way into ``ctx``."""
    while not ctx.done:
        await baseline_step(ctx)


async def baseline_step(ctx: RequestContext) -> float:
    """One step of the baseline: retrieve the current query's top-1, generate a final step
    with it in front. Speculation's plain steps that must cost what the baseline's do (held
    and quiet steps) run this too. Returns the search's seconds."""
    start = time.perf_counter()
    (hits,) = await ctx.search([ctx.query()], 1, "retrieve")
    search_s = time.perf_counter() - start
    await ctx.generate_step(hits[0].doc_id if hits else None, "retrieve")
    ctx.finalize(len(ctx.generated))
    return search_s


async def run_oracle(ctx: RequestContext, step_doc_ids: Sequence[int | None]) -> None:
    """Generate with the given document per step (zero retrieval cost)."""
    step = 0
    while not ctx.done:
        if step >= len(step_doc_ids):
            raise ValueError(
                f"oracle needs a document for step {step}, only {len(step_doc_ids)} given"
            )
        await ctx.generate_step(step_doc_ids[step], "retrieve")
        ctx.finalize(len(ctx.generated))
        step += 1
