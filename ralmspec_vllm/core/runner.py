"""The Python-level API: ``RaLMEngine`` answers questions in baseline, ralmspec or oracle mode.

Wiring: one engine holds a ``LanguageModel`` (vLLM adapter or fake), a ``Tokenizer``, an
``AsyncRetriever`` (in-process, gRPC client, optionally wrapped in ``BatchingRetriever``),
the prompt layout and the shared document-token cache. Each question becomes a
``RequestContext`` run by ``run_baseline``, ``run_oracle`` or ``SpeculativeRequest``; many
questions run concurrently as asyncio tasks (the LM batches them, ``BatchingRetriever``
batches their retrievals). The result carries the answer and a frozen ``RequestTrace``.

Cache scoring for speculation: dense (``encoder`` given; the retriever must serve vectors)
or the retriever's own ``score`` (BM25, or any backend when no encoder is given).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, replace

from ralmspec_vllm.core.baseline import run_baseline, run_oracle
from ralmspec_vllm.core.cache import (
    CacheScorer,
    DenseCacheScorer,
    RetrieverCacheScorer,
    RoutingGate,
)
from ralmspec_vllm.core.config import MODES, Mode, RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.encoding import BatchingEmbedder, QueryEmbedder, QueryEncoder
from ralmspec_vllm.core.lm import LanguageModel, Tokenizer
from ralmspec_vllm.core.prompt import DocumentTokenCache, PromptLayout
from ralmspec_vllm.core.request import FinalCallback, RequestContext, SpeculationHold
from ralmspec_vllm.core.speculative import SpeculativeRequest
from ralmspec_vllm.core.stop import StopReason
from ralmspec_vllm.core.stride import StrideLedger
from ralmspec_vllm.core.trace import RequestTrace, TraceRecorder
from ralmspec_vllm.retrieval.base import AsyncRetriever

logger = logging.getLogger(__name__)

_CAPPED_LOGGED: set[tuple[int, int]] = set()
"""(prefetch_k, limit) pairs already logged: a benchmark makes a runner per question, and
one line per process says all there is to say."""


@dataclass(frozen=True, slots=True)
class RaLMResult:
    """One answered question."""

    request_id: str
    question: str
    mode: Mode
    method: str
    """``baseline``, ``oracle`` or ``ralmspec-<row>`` (``B``, ``P``, ..., ``PSA``)."""
    token_ids: tuple[int, ...]
    text: str
    finished: bool
    """The model stopped with EOS or a stop (otherwise the length limit ended the answer)."""
    trace: RequestTrace
    stop_reason: StopReason | None = None
    """The stop string or stop token id that ended the answer (``RaLMConfig.stop``)."""


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """Answer tokens that became final; the last delta of a stream carries the result."""

    offset: int
    token_ids: tuple[int, ...]
    result: RaLMResult | None = None


MAX_STRIDE_LEDGERS = 64
"""Distinct speculation configs whose OS3 outcomes an engine pools (clients choose them per
request, so the table must not grow without bound)."""


class RaLMEngine:
    """Answers questions with iterative retrieval-augmented generation."""

    def __init__(
        self,
        lm: LanguageModel,
        tokenizer: Tokenizer,
        retriever: AsyncRetriever,
        config: RaLMConfig | None = None,
        speculation: SpeculationConfig | None = None,
        encoder: QueryEncoder | None = None,
        *,
        prefix_ids: Sequence[int] | None = None,
        doc_cache_capacity: int = 100_000,
        encode_in_thread: bool = True,
        encode_batch_window_s: float | None = None,
        embedder: QueryEmbedder | None = None,
        stride_ledgers: dict[SpeculationConfig, StrideLedger] | None = None,
        speculation_held: SpeculationHold | None = None,
        scorer: CacheScorer | None = None,
        routing_gate: RoutingGate | None = None,
    ) -> None:
        """``encoder``: the knowledge base's query encoder for dense cache scoring (``None``:
        speculation ranks the cache with ``retriever.score``). ``scorer``: any
        ``CacheScorer`` instead (e.g. ``TermWeightCacheScorer`` for BM25); not with
        ``encoder`` or ``embedder``. ``prefix_ids``: tokens before
        the document (default: the tokenizer's special prefix, e.g. BOS).
        ``encode_batch_window_s``: when set, speculation embeds the queries of concurrent
        requests in shared encoder calls (``BatchingEmbedder``; a lone query waits at most
        this long). Worth it for a transformer encoder under load, not at batch 1.
        ``embedder``: any ``QueryEmbedder`` instead of ``encoder`` (e.g. ``AsyncEmbedder``
        over the retriever client's ``encode``); dense cache scoring as with ``encoder``.
        ``stride_ledgers``: OS3's outcomes pooled per speculation config across this
        engine's requests (``stride.StrideLedger``); pass one dict to several engines to
        pool across them (a benchmark that makes a fresh engine per run).
        ``routing_gate``: the dense scorer's ``RoutingGate`` (``route_guesses="auto"``),
        likewise shared by several engines (default: this engine's own).
        ``speculation_held``: asked by every speculative request before each speculated
        step; while it answers True the request runs plain retrieval steps (the server's
        retriever-load hold, ``RaLMService``). Settable after construction."""
        self.lm = lm
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.config = config or RaLMConfig()
        self.speculation = speculation or SpeculationConfig()
        self.layout = PromptLayout(tokenizer, self.config, prefix_ids)
        self.doc_tokens = DocumentTokenCache(
            retriever, tokenizer, self.config.max_doc_tokens, doc_cache_capacity
        )
        self.scorer: CacheScorer = RetrieverCacheScorer(retriever)
        if sum(x is not None for x in (encoder, embedder, scorer)) > 1:
            raise ValueError("give one of encoder, embedder and scorer")
        if scorer is not None:
            self.scorer = scorer
        elif embedder is not None:
            self.scorer = DenseCacheScorer(embedder=embedder)
        elif encoder is not None and encode_batch_window_s is not None:
            embedder = BatchingEmbedder(encoder, encode_batch_window_s)
            self.scorer = DenseCacheScorer(embedder=embedder)
        elif encoder is not None:
            self.scorer = DenseCacheScorer(encoder, in_thread=encode_in_thread)
        if routing_gate is not None and isinstance(self.scorer, DenseCacheScorer):
            self.scorer.gate = routing_gate
        self.stride_ledgers = {} if stride_ledgers is None else stride_ledgers
        self.speculation_held = speculation_held
        self._ids = itertools.count()
        self._prefetch_limit: int | None = None
        self._prefetch_limit_known = False
        self._routing_known = False

    async def generate(
        self,
        question: str | Sequence[int],
        mode: Mode = "ralmspec",
        *,
        request_id: str | None = None,
        speculation: SpeculationConfig | None = None,
        oracle_doc_ids: Sequence[int | None] | None = None,
        on_final: FinalCallback | None = None,
        config: RaLMConfig | None = None,
        query: str | Sequence[int] | None = None,
    ) -> RaLMResult:
        """Answer one question (text, or its token ids as the server has them).
        ``query`` (text or token ids): what the retrieval queries read before the answer,
        where that is not the question itself; a chat request's prompt is the rendered
        template, its query ``prompt.chat_query_text`` of the messages.
        ``oracle_doc_ids`` (oracle mode only): the document of each
        step, e.g. ``baseline_result.trace.step_doc_ids``. ``on_final(offset, tokens)`` is
        called whenever answer tokens become final (verified: never rolled back).
        ``config`` overrides the engine's ``retrieval_stride``/``max_new_tokens``/``stop`` for
        this request (query window, document cap and separator are engine-wide)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (mode == "oracle") != (oracle_doc_ids is not None):
            raise ValueError("oracle_doc_ids must be given exactly when mode is 'oracle'")
        config = self._request_config(config)
        spec = speculation or self.speculation
        if mode == "ralmspec":
            spec = await self._fit_to_retriever(spec)
            await self._route_scorer()
        method = f"ralmspec-{spec.label}" if mode == "ralmspec" else mode
        request_id = request_id or f"ralm-{next(self._ids)}"
        if oracle_doc_ids is not None:  # documents are free for the oracle: load untimed
            await self.doc_tokens.get([d for d in oracle_doc_ids if d is not None])
        recorder = TraceRecorder(method)
        if isinstance(question, str):
            question_ids = self.layout.question_ids(question)
        else:
            question_ids, question = list(question), self.tokenizer.decode(question)
        query_ids = self.layout.question_ids(query) if isinstance(query, str) else query
        ctx = RequestContext(
            request_id,
            question_ids,
            config,
            self.lm,
            self.retriever,
            self.layout,
            self.doc_tokens,
            recorder,
            on_final,
            self.speculation_held,
            query_ids,
        )
        start = time.perf_counter()
        try:
            await self._run(ctx, mode, spec, oracle_doc_ids)
        finally:
            # An LM that keeps per-request state (engine.sessions) frees it here.
            release = getattr(self.lm, "release", None)
            if release is not None:
                await release(request_id)
        wall = time.perf_counter() - start
        tokens = tuple(ctx.generated)
        return RaLMResult(
            request_id=request_id,
            question=question,
            mode=mode,
            method=method,
            token_ids=tokens,
            text=self.tokenizer.decode(tokens, skip_special_tokens=True),
            finished=ctx.finished,
            trace=recorder.freeze(ctx.spans_tuple(), wall, started=start),
            stop_reason=ctx.stop_reason,
        )

    async def _run(
        self,
        ctx: RequestContext,
        mode: Mode,
        spec: SpeculationConfig,
        oracle_doc_ids: Sequence[int | None] | None,
    ) -> None:
        if mode == "baseline":
            await run_baseline(ctx)
        elif mode == "oracle":
            assert oracle_doc_ids is not None
            await run_oracle(ctx, oracle_doc_ids)
        else:
            ledger = self.stride_ledgers.get(spec)
            if ledger is None:
                ledger = StrideLedger()
                # Per-request options make new configs; past the cap they learn alone.
                if len(self.stride_ledgers) < MAX_STRIDE_LEDGERS:
                    self.stride_ledgers[spec] = ledger
            await SpeculativeRequest(ctx, spec, self.scorer, ledger).run()
        if ctx.final_length != len(ctx.generated):
            raise RuntimeError(f"{ctx.request_id}: answer ended with unverified tokens")

    async def prefetch_limit(self) -> int | None:
        """The largest k whose search keeps the retriever's top-1 for k = 1 (the
        baseline's), or ``None`` for any k; asked once.

        Known case: FAISS HNSW widens its search beam to ``k`` when k exceeds ``ef_search``
        (the retriever keeps the beam fixed otherwise), so a larger k explores a different
        graph neighbourhood and may find another top-1."""
        if not self._prefetch_limit_known:
            info = await self.retriever.info()
            ef_search = info.extra.get("ef_search") if info.backend == "hnsw" else None
            self._prefetch_limit = int(ef_search) if ef_search is not None else None
            self._prefetch_limit_known = True
        return self._prefetch_limit

    async def _route_scorer(self) -> None:
        """Give a dense cache scorer the retriever's IVF routing, once (``None`` for other
        backends): requests with ``route_guesses`` then rank only reachable documents."""
        if self._routing_known:
            return
        if isinstance(self.scorer, DenseCacheScorer):
            self.scorer.routing = await self.retriever.routing()
        self._routing_known = True

    async def _fit_to_retriever(self, spec: SpeculationConfig) -> SpeculationConfig:
        """``spec`` with ``prefetch_k`` capped at ``prefetch_limit`` (logged once a process):
        prefetching only speeds speculation up, the top-1 must stay the baseline's."""
        limit = await self.prefetch_limit()
        if limit is None or spec.prefetch_k <= limit:
            return spec
        if (spec.prefetch_k, limit) not in _CAPPED_LOGGED:
            _CAPPED_LOGGED.add((spec.prefetch_k, limit))
            logger.info(
                "prefetch_k=%d capped at HNSW's ef_search (%d): a wider search beam could "
                "change the top-1 the baseline sees",
                spec.prefetch_k,
                limit,
            )
        return replace(spec, prefetch_k=limit)

    def _request_config(self, config: RaLMConfig | None) -> RaLMConfig:
        if config is None:
            return self.config
        for name in ("query_window", "max_doc_tokens", "separator"):
            if getattr(config, name) != getattr(self.config, name):
                raise ValueError(f"{name} is engine-wide: build another RaLMEngine to change it")
        return config

    async def generate_many(
        self,
        questions: Sequence[str],
        mode: Mode = "ralmspec",
        *,
        speculation: SpeculationConfig | None = None,
        oracle_doc_ids: Sequence[Sequence[int | None]] | None = None,
        max_concurrency: int | None = None,
    ) -> list[RaLMResult]:
        """Answer many questions concurrently (at most ``max_concurrency`` at a time);
        results in question order."""
        if oracle_doc_ids is not None and len(oracle_doc_ids) != len(questions):
            raise ValueError("oracle_doc_ids needs one sequence per question")
        if max_concurrency is not None and max_concurrency < 1:
            raise ValueError(f"max_concurrency must be positive, got {max_concurrency}")
        limit = asyncio.Semaphore(max_concurrency or max(1, len(questions)))

        async def one(i: int) -> RaLMResult:
            async with limit:
                return await self.generate(
                    questions[i],
                    mode,
                    speculation=speculation,
                    oracle_doc_ids=None if oracle_doc_ids is None else oracle_doc_ids[i],
                )

        return list(await asyncio.gather(*(one(i) for i in range(len(questions)))))

    async def stream(
        self,
        question: str,
        mode: Mode = "ralmspec",
        *,
        request_id: str | None = None,
        speculation: SpeculationConfig | None = None,
        oracle_doc_ids: Sequence[int | None] | None = None,
        query: str | None = None,
    ) -> AsyncGenerator[StreamDelta, None]:
        """Yield answer tokens as soon as they are final (speculative tokens are held back
        until verified), then one empty delta with the ``RaLMResult``. Closing the iterator
        early cancels the request. ``query`` as in ``generate``."""
        queue: asyncio.Queue[StreamDelta | None] = asyncio.Queue()
        task = asyncio.ensure_future(
            self.generate(
                question,
                mode,
                request_id=request_id,
                speculation=speculation,
                oracle_doc_ids=oracle_doc_ids,
                on_final=lambda offset, tokens: queue.put_nowait(StreamDelta(offset, tokens)),
                query=query,
            )
        )
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (delta := await queue.get()) is not None:
                yield delta
            result = task.result()
            yield StreamDelta(len(result.token_ids), (), result)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
