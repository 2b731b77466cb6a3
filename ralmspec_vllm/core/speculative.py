"""RaLMSpec for one request: speculate from the cache, verify in one batch, roll back.

Round structure (stride s from ``FixedStride`` or OS3):

1. The first retrieval point has an empty cache: a real retrieval (top-k with P), whose
   documents seed the cache; that step is final.
2. Speculate up to s steps: the cache's top-1 for the current query, then one step of
   generation with it. Steps stop early at EOS or ``max_new_tokens``; they are still
   verified before the answer is final.
3. Verify: ``search`` of the round's s queries as ONE call (``prefetch_k`` hits each, of
   which the first ``exact_k`` are the exact top ranks); compare the knowledge base's top-1
   with the speculated doc id, position by position. Documents of the queries up to and
   including the first mismatch are inserted into the cache.
4. At the first mismatch m: drop every token from step m on, regenerate step m with the true
   document (a final step), start the next round. Kept tokens were generated with exactly
   the documents the baseline uses, from exactly the baseline's context: identical output.

Plain steps (S): when OS3 picks stride 1 for synchronous verification, a speculated step
costs the same LM step and the same search as a plain retrieval step, plus a second LM step
on every miss, so it can only lose. With asynchronous verification it loses when misses are
frequent and an LM step costs more than a verification (``prefers_plain_step``). Such steps
run as plain retrieval: the baseline's search (the exact top-1), its document inserted into
the cache, a final step generated with it (``SpeculationConfig.plain_prefetch=True`` adds the
prefetch: with the step's search, or where a search costs at most half an LM step as a
second search beside the step, ``PREFETCH_BESIDE_RATIO``). The cache's would-be speculation
is still scored against the retrieved document, so OS3 keeps estimating gamma (and a, b)
and returns to speculation once speculating pays; with ``plain_probe_every`` > 1 only every
so many steps of a plain run do that, and the others are the baseline's steps.

Held speculation (not in the paper): while ``ctx.speculation_held()`` answers True (the
server's retriever is busier than it allows, ``RaLMService``), no new step is speculated;
once every speculated step is verified, steps run as the baseline's steps: its search (the
exact top-1, no prefetch), no cache scoring and no cache insert. A speculating request asks the
retriever for more queries than the baseline (every step after a mismatch is verified
again), which only pays while the retriever has room for them. The request resumes
speculating as soon as the hold lifts; the answer is the same either way.

Asynchronous verification (A): the verification runs as a task while the next steps are
speculated concurrently: one (the paper's), or with ``overlap_depth="stride"`` as many as the
next round's planned stride, for as long as the verification is in flight; with
``overlap_depth="fill"``, up to ``max_speculation_stride``, and the next round verifies all
of them at once (the verifier never waits for a planned stride). A fill round that starts
from nothing (the first, or after a rollback) is ``OptimalStrideScheduler.fill_restart``
steps. All matched ->
those steps are kept, still unverified, and open the next round (a round verifies at most
its stride; steps beyond it wait for the round after). Mismatch -> the step in flight is
cancelled, its LM call aborted (``LanguageModel.abort``) and every step after the mismatch,
with its tokens, discarded with the rollback.

Pipelined verification (``overlap_depth="pipeline"``, not in the paper): there are no
rounds. Each speculated step's query goes to the retriever the moment the step is generated,
as its own search, while the LM speculates the next step; up to ``max_speculation_stride``
(or the fixed stride) steps are unverified at once. Results settle strictly in step order:
a match finalizes its step and inserts its documents; the first mismatch cancels every
later search, aborts the LM step in flight, and rolls back to it as above. A retriever
whose searches overlap (the circular flat scan, ``FlatRetriever(scan="circular")``) answers
each step one scan after it was generated instead of after the previous round's scan; a
retriever that runs one batch at a time batches what queued behind the running search.

Early verification (``early_verification``, pipeline only, not in the paper): a step's query
and document are known before the step is generated, so its search is sent then, and runs
while the LM generates the step. A hit settles when the step is generated; a miss settles
the moment the search answers: the step in flight is aborted and regenerated with the true
document. A hit costs only the LM step; a miss costs a plain step (search, then LM step)
plus whatever the abort costs. That last part is measured per miss (an aborted vLLM step
cost ~17 ms on the H200): OS3 runs plain steps when, at the measured accuracy, speculating
costs more (``OptimalStrideScheduler.prefers_plain_step_early``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ralmspec_vllm.core.baseline import baseline_step
from ralmspec_vllm.core.cache import CacheScorer, DenseCacheScorer, SpeculationCache
from ralmspec_vllm.core.config import SpeculationConfig
from ralmspec_vllm.core.request import RequestContext
from ralmspec_vllm.core.stride import (
    FixedStride,
    OptimalStrideScheduler,
    StepCosts,
    StrideLedger,
    StrideScheduler,
)
from ralmspec_vllm.core.trace import CallPurpose, VerificationRecord
from ralmspec_vllm.types import Hit

logger = logging.getLogger(__name__)

PrefetchMode = Literal["with", "beside", "none"]
"""How a retrieval step fills the cache (``SpeculativeRequest._retrieve_step``)."""

PREFETCH_BESIDE_RATIO = 0.5
"""With ``SpeculationConfig.plain_prefetch``: a plain step searches as the baseline does (the
exact top-1, no prefetch) and fetches the cache's prefetch with a second search beside its
LM step where a search costs at most this fraction of an LM step (OS3's b(1) against a).
There the second search is cheap (its query is encoded already) and hides behind the step,
and the prefetch's exact ranking of ``prefetch_k`` hits leaves the step's path: ~0.5 ms a
step on the H200 at 1M HNSW, where plain steps ran 1-3% behind the baseline for it (session
24). Where searches are slow (a 21M scan, BM25 at 21M) one search with prefetch stays: a
second would cost a whole search."""


@dataclass(frozen=True, slots=True)
class SpeculativeStep:
    """A generated step whose document is not verified yet."""

    start: int
    """Generated-token count before the step (the rollback point)."""
    end: int
    query: str
    doc_id: int | None


@dataclass(frozen=True, slots=True)
class Mismatch:
    step: int
    """Index of the first wrong speculation within the round."""
    true_doc_id: int | None


@dataclass(frozen=True, slots=True)
class _Guess:
    """A speculated step before its generation: the cache's document for its query."""

    started: float
    """``perf_counter`` when the guess began (OS3's a covers the guess and the step)."""
    step: SpeculativeStep
    """``end`` equals ``start`` until the step is generated."""


@dataclass(slots=True)
class _Unsettled:
    """Pipeline: a speculated step whose search has not been settled yet."""

    step: SpeculativeStep
    search: asyncio.Task[tuple[list[Hit], float, asyncio.Task[bool]]]
    """The search, timed; it answers with its hits, its latency and the fetch it started
    for what the cache will need of them."""
    generating: bool
    """Early verification: the step's search went out before the step was generated, and
    the step is still being generated (``step.end`` is not known yet)."""
    started: float = 0.0
    """Early verification: ``perf_counter`` when the step's guess began (a miss's cost)."""

    def settleable(self) -> bool:
        """The search answered, and either the step exists or the answer is a miss (a
        miss settles at once: the step in flight is aborted; a hit waits for the step)."""
        if not self.search.done():
            return False
        if not self.generating or self.search.cancelled() or self.search.exception():
            return True
        hits, _, _ = self.search.result()
        return _top1(hits) != self.step.doc_id


def make_scheduler(
    config: SpeculationConfig, ledger: StrideLedger | None = None
) -> StrideScheduler:
    if config.speculation_stride == "auto":
        depth = config.overlap_depth if isinstance(config.overlap_depth, int) else None
        return OptimalStrideScheduler(
            window=config.window,
            gamma_max=config.gamma_max,
            max_stride=config.max_speculation_stride,
            asynchronous=config.async_verification,
            confidence_z=config.gamma_confidence_z,
            evidence_window=config.gamma_evidence_window,
            ledger=ledger,
            depth=depth,
        )
    return FixedStride(config.speculation_stride)


def _top1(hits: list[Hit]) -> int | None:
    return hits[0].doc_id if hits else None


class SpeculativeRequest:
    """Runs RaLMSpec for one ``RequestContext``."""

    def __init__(
        self,
        ctx: RequestContext,
        config: SpeculationConfig,
        scorer: CacheScorer,
        ledger: StrideLedger | None = None,
    ) -> None:
        self.ctx = ctx
        self.config = config
        self.scorer = scorer
        self.recorder = ctx.recorder
        self.cache = SpeculationCache(config.cache_capacity, config.eviction, config.score_recent)
        self.scheduler = make_scheduler(config, ledger)
        # "fill": speculate ahead up to this many steps and verify all of them next round
        self._fill = config.async_verification and config.overlap_depth == "fill"
        fixed = config.speculation_stride if isinstance(config.speculation_stride, int) else 1
        self._fill_cap = max(fixed, config.max_speculation_stride)
        self._pipeline = config.async_verification and config.overlap_depth == "pipeline"
        self._early = self._pipeline and config.early_verification
        self._pipeline_depth = (
            config.speculation_stride
            if isinstance(config.speculation_stride, int)
            else config.max_speculation_stride
        )
        # What the scorer ranks by (vectors, term weights), fetched for documents not yet
        # cached ahead of their insertion (a pipelined search starts the fetch for its own
        # hits as it answers), until ``_insert`` moves them into the cache (those of a
        # search cancelled by a rollback stay until the request ends: a few hundred).
        self._fetched: dict[str, dict[int, Any]] = {"vectors": {}, "term_weights": {}, "lists": {}}
        routing = scorer.routing if isinstance(scorer, DenseCacheScorer) else None
        self._routed = config.route_guesses is not False and routing is not None
        """Whether the cache holds its documents' IVF lists, so guesses can rank only what
        the query's search can find (``SpeculationConfig.route_guesses``)."""
        self.cache.route = "auto" if config.route_guesses == "auto" else "always"
        self._inserting: asyncio.Task[None] | None = None
        """Pipeline: the last settled step's cache insert, which waits for its fetch and
        for the insert before it (so documents go in in step order) off the settle path."""
        self._plain_run = 0
        """Plain steps OS3 chose since the last speculation (``plain_probe_every``)."""
        self._segment: tuple[float, int] | None = None
        """Speculation since the last decision point: (``perf_counter``, final length)."""

    async def run(self) -> None:
        ctx = self.ctx
        if ctx.done:
            return
        await self._first_step()
        if self._pipeline:
            await self._run_pipeline()
            self._close_segment()
            return
        pending: list[SpeculativeStep] = []  # speculated, not verified yet, in order
        while pending or not ctx.done:
            stride = self.scheduler.next_stride()
            if not pending:
                held = ctx.speculation_held()
                if self._decide_plain(held, stride):
                    await self._plain_step(held)
                    continue
            if self._fill:  # the verifier never waits: all that is pending, else restart
                stride = min(self._fill_cap, len(pending)) if pending else self._restart(stride)
            self.recorder.strides.append(stride)
            while len(pending) < stride and not ctx.done:
                if pending and ctx.speculation_held():
                    break  # verify what there is; plain steps follow
                pending.append(await self._speculate(ctx.new_lm_request_id()))
            steps, pending = pending[:stride], pending[stride:]
            if self.config.async_verification and not ctx.done:
                pending, mismatch = await self._verify_overlapped(steps, pending, stride)
            else:
                mismatch = await self._verify(steps, stride, asynchronous=False)
            if mismatch is not None:
                pending = []  # all after the mismatch: their tokens go with the rollback
                await self._correct(steps[mismatch.step].start, mismatch.true_doc_id)
        self._close_segment()

    def _restart(self, planned: int) -> int:
        """Fill: the size of a round that starts from nothing (the first, or after a
        rollback): OS3's ``fill_restart``, else the planned stride."""
        restart = None
        if isinstance(self.scheduler, OptimalStrideScheduler):
            restart = self.scheduler.fill_restart(self._fill_cap)
        return min(self._fill_cap, planned if restart is None else restart)

    async def _first_step(self) -> None:
        start, before = time.perf_counter(), len(self.ctx.generated)
        _, latency, _, generated = await self._retrieve_step(self.ctx.query())
        if isinstance(self.scheduler, OptimalStrideScheduler):
            self.scheduler.record_search(latency)  # b(1), before any verification
        # A plain step: the first figure of its cost, up to the end of its generation, kept
        # apart from the steady plain steps' (``StepCosts``' "first"). Its wait for the
        # cache's seeding (prefetch_k documents' vectors or term weights, which every
        # request pays whichever mode follows) is not a plain step's cost: counted, it
        # priced plain steps ~20% above a baseline step on the H200 at 1M IVF (session 24).
        self._record_plain(start, before, end=generated, first=True)

    def _record_plain(
        self, start: float, before: int, end: float | None = None, first: bool = False
    ) -> None:
        """A plain step (``first``: the request's first) that ran from ``start`` (with
        ``before`` tokens) to ``end`` (by default now), for ``StepCosts``."""
        steps = self._step_costs()
        if steps is not None:
            seconds = (time.perf_counter() if end is None else end) - start
            steps.record("first" if first else "plain", seconds, len(self.ctx.generated) - before)

    def _plain_prefetch(self) -> PrefetchMode:
        """How a plain step fills the cache: not at all where ``plain_prefetch`` is off (the
        default); with a second search beside its LM step (``PREFETCH_BESIDE_RATIO``) with
        OS3 and a prefetch, once b(1) and a are known and a search is cheap; else with its
        search."""
        if not self.config.plain_prefetch:
            return "none"
        scheduler = self.scheduler
        if not isinstance(scheduler, OptimalStrideScheduler) or not self.config.prefetch:
            return "with"
        a, b1 = scheduler.a, scheduler.search_cost
        cheap = a is not None and b1 is not None and b1 <= PREFETCH_BESIDE_RATIO * a
        return "beside" if cheap else "with"

    def _step_costs(self) -> StepCosts | None:
        scheduler = self.scheduler
        return scheduler.steps if isinstance(scheduler, OptimalStrideScheduler) else None

    def _decide_plain(self, held: bool, stride: int) -> bool:
        """At a decision point (every speculated step verified): the speculation measured
        since the last one goes to ``StepCosts``; then plain step or speculation (which
        opens a new measured segment)."""
        self._close_segment()
        if held or self._plain_pays(stride):
            return True
        self._plain_run = 0
        self._segment = (time.perf_counter(), self.ctx.final_length)
        return False

    def _close_segment(self) -> None:
        """Record the open speculation segment: its seconds over the tokens it finalized."""
        if self._segment is None:
            return
        (started, final), self._segment = self._segment, None
        steps = self._step_costs()
        if steps is not None:
            seconds = time.perf_counter() - started
            steps.record("speculation", seconds, self.ctx.final_length - final)

    async def _retrieve_step(
        self,
        query: str,
        reads_cache: Callable[[], Coroutine[Any, Any, Any]] | None = None,
        prefetch: PrefetchMode = "with",
    ) -> tuple[list[Hit], float, Any, float]:
        """Search (with prefetch), seed the cache, generate a final step with the top-1.
        Returns the hits, the search latency, what ``reads_cache`` returned (a coroutine
        that reads the cache, a plain step's guess, started when the search answers and run
        beside the step; this step's documents go in after it, never before) and the
        ``perf_counter`` when the step's generation ended (the insert may end later).
        ``prefetch``: ``"with"`` the step's search (the default); ``"beside"``: the step's
        search is the baseline's (the exact top-1), and the prefetch for the cache is a
        second search beside the step (``PREFETCH_BESIDE_RATIO``); ``"none"``: the
        baseline's search only, and only its top-1 goes into the cache
        (``SpeculationConfig.plain_prefetch``). With either, the hits returned are the
        top-1's. An answer that ends with this step leaves the cache unfilled: nothing
        reads it again."""
        start = time.perf_counter()
        if prefetch != "with":
            (hits,) = await self.ctx.search([query], 1, "retrieve")
        else:
            (hits,) = await self._search([query], "retrieve")
        latency = time.perf_counter() - start
        reading: asyncio.Task[Any] | None = None
        if reads_cache is not None:
            reading = asyncio.create_task(reads_cache())
        # The step needs the top-1 only; the cache (and what it fetches for the new
        # documents) is needed by the next guess: fill it while the step generates.
        found: asyncio.Task[list[list[Hit]]] | None = None
        if prefetch == "beside":
            found = asyncio.create_task(self._search([query], "prefetch"))
        insert = asyncio.create_task(self._insert([hits], after=reading, found=found))
        try:
            await self.ctx.generate_step(_top1(hits), "retrieve")
        except BaseException:
            await _cancel([t for t in (insert, reading, found) if t is not None])
            raise
        generated = time.perf_counter()
        if self.ctx.done:  # the answer ends with this step: no guess reads the cache again
            if reading is not None:
                await reading  # before the insert (which waits for it) is cancelled
            await _cancel([t for t in (insert, found) if t is not None])
        else:
            await insert  # a failed fetch raises here, as itself
        self.ctx.finalize(len(self.ctx.generated))
        return hits, latency, None if reading is None else reading.result(), generated

    async def _search(self, queries: list[str], purpose: CallPurpose) -> list[list[Hit]]:
        """``prefetch_k`` hits per query, the first ``exact_k`` (or all) exact; only the
        top-1 decides a verification."""
        cfg = self.config
        return await self.ctx.search(queries, cfg.search_k, purpose, cfg.search_prefetch)

    def _plain_pays(self, stride: int) -> bool:
        if not isinstance(self.scheduler, OptimalStrideScheduler):
            return False
        if self.scheduler.measured_plain_pays():  # the clock overrules the models
            self.recorder.measured_plain_steps += 1
            return True
        if self._early:  # a hit costs the step alone, a miss what it was measured to cost
            return self.scheduler.prefers_plain_step_early()
        if stride != 1:
            return False
        return not self.config.async_verification or self.scheduler.prefers_plain_step()

    async def _plain_step(self, held: bool = False) -> None:
        """Retrieve, then generate a final step; score the cache's guess for OS3's gamma.
        Between two probes of a plain run (``SpeculationConfig.plain_probe_every``) the step
        is the baseline's instead (``_quiet_step``). ``held``: run because the server holds
        speculation (counted in ``held_steps``); then the step is the baseline's step: the
        baseline's search (the exact top-1, no prefetch), no scoring of the cache (an
        encoder call, possibly on the retriever's host), no cache insert (whose vectors
        would be another call) and nothing for OS3. The hold exists because the retriever
        has no room, so a held request must not ask it for more than the baseline would; the
        cache just misses the held steps' documents when speculation resumes."""
        if held:
            await self._baseline_step()
            self.recorder.held_steps += 1
            return
        run, self._plain_run = self._plain_run, self._plain_run + 1
        if run % self.config.plain_probe_every:
            await self._quiet_step()
            return
        start, before = time.perf_counter(), len(self.ctx.generated)
        query = self.ctx.query()
        # The guess (OS3's evidence only) is scored beside the step's LM work, once the
        # search has answered (its query is encoded by then, and nothing competes with
        # the search), and against the cache as it was: before the search's documents.
        hits, search_s, guessed, _ = await self._retrieve_step(
            query,
            reads_cache=lambda: self.scorer.top1(self.cache, query, self.recorder),
            prefetch=self._plain_prefetch(),
        )
        self.recorder.plain_steps += 1
        hit = guessed == _top1(hits)
        # a: the LM step and whatever scoring the step did not hide; b: the search
        self.scheduler.record_speculation(time.perf_counter() - start - search_s)
        self.scheduler.record_verification(search_s, int(hit), not hit, size=1)
        self._record_plain(start, before)

    async def _baseline_step(self) -> float:
        """The baseline's own step (``baseline.baseline_step``: the exact top-1, no
        prefetch, nothing else), counted as a plain step. Returns the search's seconds."""
        search_s = await baseline_step(self.ctx)
        self.recorder.plain_steps += 1
        return search_s

    async def _quiet_step(self) -> None:
        """A plain step between two probes (``plain_probe_every``): the baseline's step,
        whose times still feed OS3 (a: the LM step, b(1): the search) and ``StepCosts``."""
        start, before = time.perf_counter(), len(self.ctx.generated)
        search_s = await self._baseline_step()
        self.recorder.quiet_steps += 1
        self.scheduler.record_speculation(time.perf_counter() - start - search_s)
        if isinstance(self.scheduler, OptimalStrideScheduler):
            self.scheduler.record_search(search_s)
        self._record_plain(start, before)

    async def _speculate(self, lm_request_id: str) -> SpeculativeStep:
        return await self._generate_guess(await self._guess(), lm_request_id)

    async def _guess(self) -> _Guess:
        """The current position's query and the cache's top-1 for it (the document a
        speculated step will be generated with)."""
        start = time.perf_counter()
        begin = len(self.ctx.generated)
        query = self.ctx.query()
        doc_id = await self.scorer.top1(self.cache, query, self.recorder)
        if doc_id is not None:
            self.cache.touch(doc_id)
        return _Guess(start, SpeculativeStep(begin, begin, query, doc_id))

    async def _generate_guess(self, guess: _Guess, lm_request_id: str) -> SpeculativeStep:
        """Generate the guessed step; the returned step has its end."""
        step = guess.step
        await self.ctx.generate_step(step.doc_id, "speculate", lm_request_id)
        self.scheduler.record_speculation(time.perf_counter() - guess.started)
        return SpeculativeStep(step.start, len(self.ctx.generated), step.query, step.doc_id)

    async def _verify(
        self, steps: list[SpeculativeStep], stride: int, asynchronous: bool
    ) -> Mismatch | None:
        start = time.perf_counter()
        results = await self._search([step.query for step in steps], "verify")
        return await self._judge(steps, results, time.perf_counter() - start, stride, asynchronous)

    async def _judge(
        self,
        steps: list[SpeculativeStep],
        results: list[list[Hit]],
        latency: float,
        stride: int,
        asynchronous: bool,
        fetching: asyncio.Task[bool] | None = None,
    ) -> Mismatch | None:
        """Compare ``steps``' documents with their searches' top-1: finalize the matched
        prefix, cache what the searches found, record the verification; return the first
        mismatch (for the rollback) or None. ``fetching`` (pipeline): the fetch for the
        searches' documents, still running; the insert then goes in after it and after
        the inserts queued before, without holding up the verdict."""
        mismatch = None
        for i, (step, hits) in enumerate(zip(steps, results, strict=True)):
            if _top1(hits) != step.doc_id:
                mismatch = Mismatch(i, _top1(hits))
                break
        matched = len(steps) if mismatch is None else mismatch.step
        self.ctx.finalize(steps[-1].end if mismatch is None else steps[mismatch.step].start)
        if self._answered():  # nothing reads the cache again: no insert, no fetch for it
            if fetching is not None:
                await _cancel([fetching])
        elif fetching is None:
            await self._insert(results[: matched + 1])
        else:
            self._inserting = asyncio.create_task(
                self._insert_in_turn(self._inserting, results[: matched + 1], fetching)
            )
        rec = self.recorder
        rec.speculation_hits += matched
        rec.speculation_misses += mismatch is not None
        rec.verifications.append(
            VerificationRecord(
                stride=stride,
                num_steps=len(steps),
                matched=matched,
                mismatch_step=None if mismatch is None else mismatch.step,
                latency_s=latency,
                asynchronous=asynchronous,
            )
        )
        self.scheduler.record_verification(latency, matched, mismatch is not None, len(steps))
        return mismatch

    async def _verify_overlapped(
        self, steps: list[SpeculativeStep], ahead: list[SpeculativeStep], stride: int
    ) -> tuple[list[SpeculativeStep], Mismatch | None]:
        """Verify ``steps`` while speculating past ``ahead`` (already speculated after them);
        keep what was speculated ahead only if all matched."""
        depth = self.config.overlap_depth
        if depth == "fill":
            limit = self._fill_cap
        elif depth == "stride":
            limit = self.scheduler.next_stride()
        else:
            assert isinstance(depth, int)  # "pipeline" runs _run_pipeline instead
            limit = depth
        ahead = list(ahead)
        verification = asyncio.create_task(self._verify(steps, stride, asynchronous=True))
        in_flight: list[str] = []  # the LM request id of the step being speculated
        overlapped = asyncio.create_task(self._run_ahead(verification, ahead, limit, in_flight))
        try:
            mismatch = await verification
        except BaseException:
            await self._discard(overlapped, in_flight)
            raise
        if mismatch is None:
            await overlapped  # the step in flight finishes; no new one starts
            return ahead, None
        await self._discard(overlapped, in_flight)
        return [], mismatch

    async def _run_ahead(
        self,
        verification: asyncio.Task[Mismatch | None],
        ahead: list[SpeculativeStep],
        limit: int,
        in_flight: list[str],
    ) -> None:
        """Speculate one step, then more while ``verification`` runs, up to ``limit`` ahead."""
        first = True
        while len(ahead) < limit and not self.ctx.done and (first or not verification.done()):
            if self.ctx.speculation_held():
                return
            first = False
            in_flight[:] = [self.ctx.new_lm_request_id()]
            ahead.append(await self._speculate(in_flight[0]))
            in_flight.clear()

    async def _run_pipeline(self) -> None:
        """Speculate step after step, each verified by its own search as soon as it exists
        (or, with ``early_verification``, as soon as its document is guessed); settle the
        searches in step order (see the module docstring)."""
        ctx = self.ctx
        unsettled: list[_Unsettled] = []
        speculation: asyncio.Task[SpeculativeStep] | None = None
        lm_request_id = ""
        try:
            while True:
                if speculation is None and not ctx.done:
                    held = self.ctx.speculation_held()
                    if not unsettled and self._decide_plain(held, self.scheduler.next_stride()):
                        await self._inserted()  # its guess reads the cache as it is by now
                        await self._plain_step(held)
                        continue
                    if not held and len(unsettled) < self._pipeline_depth:
                        lm_request_id = ctx.new_lm_request_id()
                        if self._early:
                            guess = await self._guess()
                            search = asyncio.create_task(self._timed_search(guess.step.query))
                            unsettled.append(_Unsettled(guess.step, search, True, guess.started))
                            speculation = asyncio.create_task(
                                self._generate_guess(guess, lm_request_id)
                            )
                        else:
                            speculation = asyncio.create_task(self._speculate(lm_request_id))
                if speculation is None and not unsettled:
                    break  # done, everything verified
                head = unsettled[0] if unsettled else None
                if head is not None and head.settleable():
                    unsettled.pop(0)
                    hits, latency, fetching = head.search.result()
                    mismatch = await self._judge(
                        [head.step],
                        [hits],
                        latency,
                        len(unsettled) + 1,
                        asynchronous=True,
                        fetching=fetching,
                    )
                    if mismatch is not None:
                        if speculation is not None:
                            await self._discard(speculation, [lm_request_id])
                            speculation = None
                        await _cancel_searches(unsettled)
                        unsettled = []
                        await self._correct(head.step.start, mismatch.true_doc_id)
                        await self._inserted()  # the next guess sees what the search found
                        if self._early and isinstance(self.scheduler, OptimalStrideScheduler):
                            self.scheduler.record_miss(time.perf_counter() - head.started)
                    continue
                if speculation is not None and speculation.done():
                    step = speculation.result()
                    speculation = None
                    if self._early:  # its search is already out: the last unsettled step
                        unsettled[-1].step, unsettled[-1].generating = step, False
                        self.recorder.strides.append(len(unsettled))
                    else:
                        self.recorder.strides.append(len(unsettled) + 1)
                        search = asyncio.create_task(self._timed_search(step.query))
                        unsettled.append(_Unsettled(step, search, generating=False))
                    continue
                waiting: set[asyncio.Future[Any]] = set()
                if speculation is not None:
                    waiting.add(speculation)
                if head is not None and not head.search.done():
                    waiting.add(head.search)
                # empty only if the head matched while still generating: then it is the
                # speculation, which is waited for
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            # Done and all verified: the queued inserts fill a cache nothing reads again.
            if self._inserting is not None:
                await _cancel([self._inserting])
        except BaseException:
            if speculation is not None:
                await self._discard(speculation, [lm_request_id])
            await _cancel_searches(unsettled)
            if self._inserting is not None:
                await _cancel([self._inserting])
            raise

    async def _timed_search(self, query: str) -> tuple[list[Hit], float, asyncio.Task[bool]]:
        """A pipelined step's search, timed; as it answers, the fetch of what the cache
        will need for its new documents starts. The step settles on the hits alone; only
        its cache insert waits for the fetch (at 21M BM25 documents a fetch of term
        weights took 17-40 ms, most of an LM step, when the settle waited for it)."""
        start = time.perf_counter()
        (hits,) = await self._search([query], "verify")
        latency = time.perf_counter() - start
        return hits, latency, asyncio.create_task(self._fetch_for([[h.doc_id for h in hits]]))

    async def _discard(self, task: asyncio.Task[Any], in_flight: list[str]) -> None:
        """Cancel speculating ahead; tokens already appended go with the rollback."""
        if not task.done():
            task.cancel()
            if in_flight:
                await self.ctx.lm.abort(in_flight[0])
                self.recorder.lm_aborts += 1
        await asyncio.gather(task, return_exceptions=True)

    async def _correct(self, rollback_to: int, true_doc_id: int | None) -> None:
        dropped = self.ctx.truncate(rollback_to)
        self.recorder.rollbacks += 1
        self.recorder.tokens_discarded += dropped
        logger.debug(
            "%s: rollback to %d tokens (%d dropped)", self.ctx.request_id, rollback_to, dropped
        )
        await self.ctx.generate_step(true_doc_id, "verify")
        self.ctx.finalize(len(self.ctx.generated))

    async def _insert(
        self,
        results: list[list[Hit]],
        after: asyncio.Task[Any] | None = None,
        found: asyncio.Task[list[list[Hit]]] | None = None,
    ) -> None:
        """Insert verified documents; later queries' documents count as more recent. What
        the scorer ranks by (vectors, term weights) is fetched for the documents the cache
        does not hold yet, once each (unless a search fetched it already). ``after``: a
        task awaited before anything goes in (a plain step's guess, which must read the
        cache without these documents; a pipelined step's fetch for them).
        ``found``: a search for the same queries with the prefetch, whose hits go in
        instead of ``results`` (the exact top-k of each, same top-1)."""
        if found is not None:
            results = await found
        if after is not None:
            await after
        ranked = [[hit.doc_id for hit in hits] for hits in results]
        # Until a pass finds nothing to fetch: while one awaited, another insert may have
        # moved a document into the cache (dropping its fetched entry) and evicted it.
        while await self._fetch_for(ranked):
            pass
        vectors = self._fetched["vectors"] if self.scorer.needs_vectors else None
        terms = self._fetched["term_weights"] if self.scorer.needs_terms else None
        lists = self._fetched["lists"] if self._routed else None
        for ids in ranked:
            self.cache.insert(ids, vectors, terms, lists)
        self.recorder.cache_peak = max(self.recorder.cache_peak, len(self.cache))
        for fetched in self._fetched.values():
            for ids in ranked:
                for d in ids:
                    fetched.pop(d, None)

    async def _insert_in_turn(
        self,
        before: asyncio.Task[None] | None,
        results: list[list[Hit]],
        fetching: asyncio.Task[bool],
    ) -> None:
        """Pipeline: ``_insert`` once the insert ``before`` and the fetch ``fetching`` are
        done (a failure of either raises here, as itself)."""
        if before is not None:
            await before
        await self._insert(results, after=fetching)

    def _answered(self) -> bool:
        """The answer is complete and every token of it final: no step follows, so no
        guess reads the cache again, and filling it (a fetch, up to ``prefetch_k``
        inserts a search) would only delay the request's end."""
        return self.ctx.done and self.ctx.final_length == len(self.ctx.generated)

    async def _inserted(self) -> None:
        """Wait for the queued cache inserts (pipeline); their failures raise here."""
        if self._inserting is not None:
            await self._inserting

    async def _fetch_for(self, ranked: list[list[int]]) -> bool:
        """Fetch what the scorer needs for those documents neither cached nor fetched;
        whether there were any. The kinds go out together (an IVF cache's vectors and
        lists: one round trip of waiting, not two in a row)."""
        retriever = self.ctx.retriever
        fetches = []
        if self.scorer.needs_vectors:
            fetches.append(self._fetch_missing(ranked, "vectors", retriever.vectors))
        if self.scorer.needs_terms:
            fetches.append(self._fetch_missing(ranked, "term_weights", retriever.term_weights))
        if self._routed:
            fetches.append(self._fetch_missing(ranked, "lists", retriever.lists))
        if len(fetches) == 1:
            return await fetches[0]
        tasks = [asyncio.ensure_future(fetch) for fetch in fetches]
        try:
            return any(await asyncio.gather(*tasks))
        except BaseException:  # one failed: the others stop too
            await _cancel(tasks)
            raise

    async def _fetch_missing(
        self,
        ranked: list[list[int]],
        kind: Literal["vectors", "term_weights", "lists"],
        fetch: Callable[[list[int]], Awaitable[Any]],
    ) -> bool:
        """``fetch`` what the cache needs for the ranked documents it lacks and nothing
        fetched holds yet, into ``self._fetched[kind]``; whether there were any."""
        fetched = self._fetched[kind]
        missing = [d for d in self.cache.missing([d for ids in ranked for d in ids])
                   if d not in fetched]  # fmt: skip
        if not missing:
            return False
        start = time.perf_counter()
        values = await fetch(missing)
        self.recorder.retrieval(kind, "verify", 1, len(missing), time.perf_counter() - start)
        if values is None:
            raise ValueError(f"this cache scoring needs a retriever that serves {kind}")
        fetched.update(zip(missing, values, strict=True))
        return True


async def _cancel_searches(unsettled: Sequence[_Unsettled]) -> None:
    """Cancel the unsettled steps' searches and the fetches of those that answered."""
    await _cancel([u.search for u in unsettled])
    fetches = [u.search.result()[2] for u in unsettled if not u.search.cancelled()
               and u.search.exception() is None]  # fmt: skip
    await _cancel(fetches)


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel the tasks and wait until they are done (their errors are theirs)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
