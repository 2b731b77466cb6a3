"""The serving glue: one LM + one retriever + cross-request batching + the RaLM core.

``RaLMService`` owns a ``RaLMEngine`` (core) built on the LM, its tokenizer and a
``BatchingRetriever`` around the retriever client, so retrievals and verifications of all
concurrent requests share retriever RPCs. A request flows as:

    handler --plan()--> RaLMJob --stream()--> VerifiedChunk ... VerifiedChunk, JobResult

``plan`` applies server defaults and limits to the per-request options (``JobError`` with the
offending parameter on violation: the handler answers 400). ``stream`` runs the job as its
own task and yields tokens as soon as they can no longer be rolled back; cancelling the
consumer (a client that went away) cancels the task, which aborts the request's in-flight LM
calls and retrieval waits.

Verified-token progress comes from ``RaLMEngine.generate``'s ``on_final`` callback (tokens
that can never be rolled back). ``retrieval_stride`` and ``max_new_tokens`` are per request
(the job's ``RaLMConfig``); the engine's layout and document cache (query window, document
cap) are server-wide. ``reset_prefix_cache`` empties vLLM's prefix cache and the document-token
cache between benchmark runs (``POST /reset_prefix_cache``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

from ralmspec_vllm import metrics
from ralmspec_vllm.core.batching import BatchingRetriever, BatchRecord
from ralmspec_vllm.core.cache import CacheScorer, QueryEncoder, TermWeightCacheScorer
from ralmspec_vllm.core.config import Mode, RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.encoding import AsyncEmbedder, QueryEmbedder
from ralmspec_vllm.core.lm import LanguageModel, Tokenizer
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.core.stop import StopCondition, StopReason
from ralmspec_vllm.core.trace import RequestTrace, TokenSpan
from ralmspec_vllm.load import CALIBRATION_QUERIES, ENCODER_POLL_S, LoopLoad, RetrieverLoad
from ralmspec_vllm.retrieval.analyzer import Analyzer
from ralmspec_vllm.retrieval.base import AsyncRetriever
from ralmspec_vllm.retrieval.batching import BatchStats

logger = logging.getLogger(__name__)

SERVED_MODES: tuple[Mode, ...] = ("baseline", "ralmspec")
CacheScoring = Literal["auto", "local", "retriever"]
CACHE_SCORING: tuple[CacheScoring, ...] = ("auto", "local", "retriever")
CALIBRATION_TEXT = "retriever calibration query number {}"
WARMUP_QUESTION = "who wrote the declaration of independence"
"""What ``RaLMService.warm_up`` answers before the server takes requests."""
WARMUP_TOKENS = 32
"""Tokens of the warm-up's answers (eight retrieval steps at the default stride)."""


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Server-wide RaLM defaults (per-request options override them) and request limits."""

    ralm: RaLMConfig = field(default_factory=RaLMConfig)
    """Defaults; ``query_window``, ``max_doc_tokens`` and ``separator`` are server-wide."""
    speculation: SpeculationConfig = field(default_factory=lambda: SpeculationConfig.preset("PSA"))
    """Default speculation settings (``max_speculation_stride`` also bounds requests)."""
    default_mode: Mode = "ralmspec"
    """Mode of requests that do not choose one."""
    max_tokens_limit: int = 1024
    """Largest ``max_tokens`` a request may ask for (the model length may lower it)."""
    max_retrieval_stride: int = 64
    """Largest per-request ``retrieval_stride``."""
    max_prefetch_k: int = 256
    """Largest per-request ``prefetch_k``."""
    batch_window_s: float = 0.002
    """Cross-request batching: how long the first search of a batch waits for others."""
    max_batch_queries: int = 256
    """Cross-request batching: most queries in one retriever call."""
    max_speculating: int | None = None
    """Load-aware fallback: a ``ralmspec`` request that starts while this many others are
    speculating runs as the baseline instead (the same answer: the baseline is the reference
    speculation is checked against). Speculation spends extra LM steps and retriever queries
    to save waiting, which pays only while the engine and the retriever have room (H100,
    c=256: 0.74x the baseline's throughput). ``None``: never fall back."""
    max_retriever_utilization: float | None = 0.4
    """Load-aware fallback on the retriever (``ralmspec_vllm.load``): a ``ralmspec`` request
    that starts while this server keeps the retriever busier than this (recent queries/s x
    the calibrated seconds per query) runs as the baseline instead (the same answer).
    Speculation asks ~1.6x the baseline's queries, so near saturation they no longer fit
    (H200, 21M docs, c=64: 0.61x without this). Requests already speculating hold
    speculation (plain retrieval steps) while it lasts: a burst of requests that all start
    speculating before any of their queries show in the rate would otherwise keep
    speculating to the end (H200, 21M, c=64, start-time fallback only: 0.89x).

    Why 0.4: the calibration underrates a query's cost under serving load (H200, 21M: 9.4 ms
    calibrated; the c=256 baseline saturated the scan at 64 queries/s, ~16 ms each). On the
    calibrated scale, speculation won where it drew 0.32 (c=8: 1.72x) and lost where the
    baseline alone draws 0.50 (c=64 0.92x, c=256 0.80x with the hold at 0.5, which then
    flickered around it; session 16). 0.4 lies between, and a held c=64 server stays held.
    ``None``: never fall back or hold on the retriever's account."""
    max_loop_cpu: float | None = 0.6
    """Load-aware fallback on this server's own event loop (``load.LoopLoad``): a
    ``ralmspec`` request that starts while the loop's thread ran more than this share of a
    core over the last 5 s runs as the baseline instead (the same answer), and speculating
    requests hold speculation (plain retrieval steps) until it falls below
    ``load.RELEASE_FRACTION`` of it. Speculation's own Python work per step (a guess's
    ``Encode``, decoding a prefetch, caching its vectors, more LM calls) is ~2x the
    baseline's; once it fills the one loop thread every request waits on it. H100, IVF 1M,
    c=64 (session 47): the server process ran 0.87-1.03 cores against the baseline's
    0.47-0.50 and RaLMSpec finished 0.59-0.75x the baseline's answers, with the retriever
    7% busy; at c=8 it ran 0.48-0.53 and the pipeline matched the baseline (1.00x).

    Why 0.6: between the c=8 and c=64 servers above (their whole process; the loop thread
    is most of it), and above the baseline's own c=64 load, so a server that falls back
    entirely releases the hold only where speculation has room again; at exact dense 21M,
    where speculation pays (c=8: 1.24x, session 32), the server ran 0.11-0.16 cores. Not
    yet measured with the rule on. ``None``: never fall back or hold on the loop's
    account."""
    max_encoder_busy: float | None = 0.8
    """Load-aware fallback on the retriever's query encoder (``load.RetrieverLoad``'s
    ``encoder_busy``): a ``ralmspec`` request that starts while the encoder, which runs one
    pass at a time, was busy more than this share of the last 10 s runs as the baseline
    (reason ``retriever``), and speculating requests hold until it falls below
    ``load.RELEASE_FRACTION`` of it. The server reads the retriever's ``encoder_busy_s``
    counter with one ``Info`` call at most once a second while searches return.

    The utilization above prices a query as calibrated on an idle machine. A CPU encoder
    that shares its cores with the LM costs more under load, and its busy share says so
    directly: 2-core box, IVF 20k docs, c=32 (session 48), the encoder worked 20.6 s of the
    baseline cell's 21.2 s (~13 ms a query against 3.6 calibrated), the utilization read
    0.27, and RaLMSpec, whose guesses and extra verifications all need the encoder,
    finished 0.77x. Why 0.8, not the utilization's 0.4: an encoder answers each text
    alone, so one busy with a lone request still has the rest of its time for another:
    at c=1 on that box it read 0.41. ``None``: never fall back on the encoder's account."""
    cache_scoring: CacheScoring = "auto"
    """Where a speculative step ranks the request's cached documents (``local_cache_scoring``).
    ``local``: in this server: the query's embedding from the retriever's ``Encode`` (the
    one its searches use), then the knowledge base's exact inner product with the cached
    documents' vectors, fetched once as they enter the cache; for BM25 the cached
    documents' term weights (``GetTermWeights``, once per document, the retriever's own
    weights with its corpus-wide statistics), added here per query term.
    ``retriever``: the retriever's ``Score`` over every cached doc
    id. ``auto``: local where the retriever allows it (dense or BM25), else the retriever.
    At 21M BM25 documents a ``Score`` took 14 ms a speculated step on the H200, on the
    step's critical path (session 20). The retriever is shared by every
    request and is what saturates first; ``Score`` over a full 8,192-document cache re-reads
    8,192 vectors and scores them in float64, ~18 ms of its CPU a step (2-core dev machine,
    3M docs) beside its scan threads, where local scoring leaves it one encoder pass."""

    def __post_init__(self) -> None:
        if self.default_mode not in SERVED_MODES:
            raise ValueError(f"default_mode must be one of {SERVED_MODES}, got {self.default_mode}")
        for name in ("max_tokens_limit", "max_retrieval_stride", "max_prefetch_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.batch_window_s >= 0:
            raise ValueError(f"batch_window_s must be >= 0, got {self.batch_window_s}")
        if self.max_batch_queries < 1:
            raise ValueError(f"max_batch_queries must be >= 1, got {self.max_batch_queries}")
        if self.max_speculating is not None and self.max_speculating < 0:
            raise ValueError(f"max_speculating must be >= 0, got {self.max_speculating}")
        _check_cache_scoring(self.cache_scoring)
        for limit in ("max_retriever_utilization", "max_loop_cpu", "max_encoder_busy"):
            value = getattr(self, limit)  # the load rules' limits: None turns one off
            if value is not None and not value > 0:
                raise ValueError(f"{limit} must be > 0 (or None), got {value}")
        if self.speculation.prefetch_k > self.max_prefetch_k:  # every default request would fail
            raise ValueError(
                f"max_prefetch_k ({self.max_prefetch_k}) is below the default prefetch_k "
                f"({self.speculation.prefetch_k})"
            )


@dataclass(frozen=True, slots=True)
class RequestOptions:
    """Per-request RaLM choices as received (``None``: use the server default)."""

    mode: str | None = None
    retrieval_stride: int | None = None
    speculation_stride: int | str | None = None
    prefetch_k: int | None = None
    async_verification: bool | None = None


class JobError(ValueError):
    """A request outside the server's limits; ``param`` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class RaLMJob:
    """One validated request, ready to run."""

    request_id: str
    question_ids: tuple[int, ...]
    mode: Mode
    config: RaLMConfig
    speculation: SpeculationConfig
    query_ids: tuple[int, ...] | None = None
    """What the retrieval queries read before the answer, where it is not the question
    (a chat request: its messages' text without the template's markup)."""

    @property
    def method(self) -> str:
        """``baseline`` or ``ralmspec-<row>`` (``B``, ``P``, ..., ``PSA``): the metrics label."""
        return f"ralmspec-{self.speculation.label}" if self.mode == "ralmspec" else self.mode


@dataclass(frozen=True, slots=True)
class VerifiedChunk:
    """Answer tokens that can no longer be rolled back, starting at answer position ``start``."""

    start: int
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class JobResult:
    """The end of a job: the whole answer, its document spans and trace."""

    token_ids: tuple[int, ...]
    finished: bool
    """The model emitted EOS or ran into a stop (otherwise ``max_tokens`` ended the answer)."""
    spans: tuple[TokenSpan, ...]
    trace: RequestTrace
    load_fallback: bool = False
    """A ``ralmspec`` request that ran as the baseline because the server was busy
    (``ServiceConfig.max_speculating`` or ``max_retriever_utilization``); the same answer."""
    stop_reason: StopReason | None = None
    """The stop string or stop token id that ended the answer."""


class RaLMService:
    """Answers RaLM jobs on one LM and one retriever (see module doc)."""

    def __init__(
        self,
        lm: LanguageModel,
        tokenizer: Tokenizer,
        retriever: AsyncRetriever,
        config: ServiceConfig | None = None,
        *,
        max_model_len: int,
        encoder: QueryEncoder | None = None,
        embedder: QueryEmbedder | None = None,
        scorer: CacheScorer | None = None,
    ) -> None:
        """``encoder`` or ``embedder`` (``local_cache_scoring``): dense cache scoring in
        this process; ``scorer`` (``local_cache_scoring``): BM25 cache scoring in this
        process; none: the retriever's ``Score``."""
        self.config = config or ServiceConfig()
        self.tokenizer = tokenizer
        self.retriever = retriever
        self.max_model_len = max_model_len
        self.retriever_load = RetrieverLoad()
        """Queries sent and their calibrated cost (for ``max_retriever_utilization``)."""
        metrics.watch_retriever_utilization(lambda: self.retriever_load.utilization())
        metrics.watch_encoder_busy(lambda: self.retriever_load.encoder_busy())
        self._encoder_asked = -float("inf")
        """When the retriever's counters were last asked for (``_read_encoder``)."""
        self._encoder_reading: asyncio.Task[None] | None = None
        self._encoder_readable = (
            self.config.max_encoder_busy is not None
            and getattr(retriever, "stats", None) is not None
        )
        """Whether to read the retriever's encoder: ``max_encoder_busy`` is on, and the
        retriever reports its encoder's busy seconds (until a reading lacks them: an
        in-process retriever, BM25, a retriever without a query encoder)."""
        self.loop_load = LoopLoad()
        """This server's event-loop CPU share (for ``max_loop_cpu``)."""
        metrics.watch_loop_cpu(lambda: self.loop_load.last)
        self.batching = BatchingRetriever(
            retriever,
            self.config.batch_window_s,
            self.config.max_batch_queries,
            on_batch=self._observe_batch,
        )
        self.engine = RaLMEngine(
            lm,
            tokenizer,
            self.batching,
            self.config.ralm,
            self.config.speculation,
            encoder,
            embedder=embedder,
            speculation_held=self.speculation_held,
            scorer=scorer,
        )
        self._ids = itertools.count()
        self.speculating = 0
        """``ralmspec`` requests speculating now (for ``max_speculating``)."""

    # -- planning -------------------------------------------------------------------------

    def question_ids(self, question: str) -> list[int]:
        return self.engine.layout.question_ids(question)

    def prompt_overhead(self) -> int:
        """Prompt tokens besides question and answer: special prefix, document, separator."""
        layout = self.engine.layout
        return len(layout.prefix_ids) + self.config.ralm.max_doc_tokens + len(layout.separator_ids)

    def plan(
        self,
        question_ids: Sequence[int],
        max_tokens: int | None,
        options: RequestOptions,
        request_id: str | None = None,
        stop: StopCondition | None = None,
        ignore_eos: bool = False,
        query_ids: Sequence[int] | None = None,
    ) -> RaLMJob:
        """Apply defaults and limits; ``JobError`` (param = request field) when out of range.
        ``stop``: the request's stop strings and token ids (none by default);
        ``ignore_eos``: generate past EOS; ``query_ids``: ``RaLMJob.query_ids``."""
        cfg = self.config
        mode = options.mode or cfg.default_mode
        if mode not in SERVED_MODES:
            raise JobError(f"mode must be one of {list(SERVED_MODES)}, got {mode!r}", "ralm.mode")
        room = self.max_model_len - self.prompt_overhead() - len(question_ids)
        if room < 1:
            raise JobError(
                f"prompt too long: {len(question_ids)} tokens, but max_model_len "
                f"{self.max_model_len} minus the document budget "
                f"({self.prompt_overhead()} tokens) leaves room for at most "
                f"{self.max_model_len - self.prompt_overhead() - 1} prompt tokens",
                "prompt",
            )
        limit = min(cfg.max_tokens_limit, room)
        max_tokens = cfg.ralm.max_new_tokens if max_tokens is None else max_tokens
        if not 1 <= max_tokens <= limit:
            raise JobError(
                f"max_tokens must be in [1, {limit}] for this prompt "
                f"({len(question_ids)} prompt tokens, max_model_len {self.max_model_len}, "
                f"document budget {self.prompt_overhead()}), got {max_tokens}",
                "max_tokens",
            )
        stride = options.retrieval_stride or cfg.ralm.retrieval_stride
        _check_range("ralm.retrieval_stride", stride, cfg.max_retrieval_stride)
        spec = cfg.speculation
        sstride = options.speculation_stride or spec.speculation_stride
        if sstride != "auto":
            if not isinstance(sstride, int):
                raise JobError(
                    f"speculation_stride must be a positive integer or 'auto', got {sstride!r}",
                    "ralm.speculation_stride",
                )
            _check_range("ralm.speculation_stride", sstride, spec.max_speculation_stride)
        prefetch_k = options.prefetch_k or spec.prefetch_k
        _check_range("ralm.prefetch_k", prefetch_k, cfg.max_prefetch_k)
        asynchronous = spec.async_verification
        if options.async_verification is not None:
            asynchronous = options.async_verification
        return RaLMJob(
            request_id=request_id or f"ralm-{next(self._ids)}",
            question_ids=tuple(question_ids),
            query_ids=None if query_ids is None else tuple(query_ids),
            mode=mode,  # type: ignore[arg-type]
            config=replace(
                cfg.ralm,
                retrieval_stride=stride,
                max_new_tokens=max_tokens,
                stop=stop or StopCondition(),
                ignore_eos=ignore_eos,
            ),
            speculation=replace(
                spec,
                speculation_stride=sstride,  # type: ignore[arg-type]
                prefetch_k=prefetch_k,
                async_verification=asynchronous,
            ),
        )

    # -- running --------------------------------------------------------------------------

    async def stream(self, job: RaLMJob) -> AsyncIterator[VerifiedChunk | JobResult]:
        """Verified chunks as they become final, then one ``JobResult``. Closing the iterator
        early (or cancelling its consumer) cancels the job's in-flight work."""
        out: asyncio.Queue[VerifiedChunk] = asyncio.Queue()
        task = asyncio.create_task(self._run(job, out), name=f"ralm:{job.request_id}")
        getter: asyncio.Task[VerifiedChunk] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(out.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not out.empty():
                    yield out.get_nowait()
                yield task.result()  # re-raises the job's error
                return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            if not task.done():
                task.cancel()
                metrics.record_failure(job.method, "aborted")
                logger.info("request %s aborted: its client went away", job.request_id)
                # Under an anyio cancel scope (Starlette's streaming response) every await in
                # here is cancelled again at once; the job task is cancelled either way.
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(task, return_exceptions=True)

    async def run(self, job: RaLMJob) -> JobResult:
        """The whole answer at once (no streaming)."""
        result: JobResult | None = None
        async for item in self.stream(job):
            if isinstance(item, JobResult):
                result = item
        assert result is not None
        return result

    async def _run(self, job: RaLMJob, out: asyncio.Queue[VerifiedChunk]) -> JobResult:
        mode = job.mode
        reason = self.fallback_reason() if mode == "ralmspec" else None
        if reason is not None:
            mode = "baseline"  # the same answer, without speculation's extra work
            metrics.record_load_fallback(reason)
            logger.debug("request %s runs as the baseline: %s", job.request_id, reason)
        speculates = mode == "ralmspec"
        self.speculating += speculates
        try:
            result = await self.engine.generate(
                job.question_ids,
                mode,
                request_id=job.request_id,
                speculation=job.speculation,
                on_final=lambda start, tokens: out.put_nowait(VerifiedChunk(start, tokens)),
                config=job.config,
                query=job.query_ids,
            )
        except asyncio.CancelledError:
            raise
        except Exception:
            metrics.record_failure(job.method, "error")
            raise
        finally:
            self.speculating -= speculates
        metrics.record_request(result.trace, len(result.token_ids))
        return JobResult(
            result.token_ids,
            result.finished,
            result.trace.spans,
            result.trace,
            mode != job.mode,
            result.stop_reason,
        )

    def fallback_reason(self) -> str | None:
        """Why a ``ralmspec`` request starting now should run as the baseline, if it should:
        ``speculating`` (``max_speculating`` others are), ``retriever`` (this server keeps
        it busier than ``max_retriever_utilization``) or ``server`` (this server's event
        loop is busier than ``max_loop_cpu``)."""
        cfg = self.config
        if cfg.max_speculating is not None and self.speculating >= cfg.max_speculating:
            return "speculating"
        if self.retriever_busy():
            return "retriever"
        if self.loop_busy():
            return "server"
        return None

    def speculation_held(self) -> bool:
        """Speculating requests run plain retrieval steps now (``held_steps``): the
        retriever or this server's event loop has no room for speculation's extra work."""
        return self.retriever_busy() or self.loop_busy()

    def loop_busy(self) -> bool:
        """This server's event loop ran more than ``max_loop_cpu`` of a core lately (and
        stays busy until it falls below ``load.RELEASE_FRACTION`` of it)."""
        limit = self.config.max_loop_cpu
        return limit is not None and self.loop_load.busy(limit)

    def retriever_busy(self) -> bool:
        """This server keeps the retriever busier than ``max_retriever_utilization``, or its
        query encoder was busier than ``max_encoder_busy`` (each until it falls below
        ``load.RELEASE_FRACTION`` of its limit): a ``ralmspec`` request starting now runs as
        the baseline, and the speculating ones hold speculation (plain retrieval steps)
        until neither is."""
        cfg = self.config
        return self.retriever_load.busy(cfg.max_retriever_utilization, cfg.max_encoder_busy)

    async def calibrate_retriever(self) -> float:
        """Time one query and ``CALIBRATION_QUERIES`` queries on the retriever (best of two
        each) and set the load signal's seconds per query; returns it. Call it once, before
        serving (at 21M docs on the H200 host it takes a few seconds). A retriever that fails
        here leaves the cost at 0 (no retriever fallback), with a warning: its errors reach
        the requests that need it, as they would without calibration.

        Every search asks fresh texts: a text asked before comes from the query encoder's
        memo, which would leave the encoder's cost out of a query's price. Until session 47
        the second of each pair repeated the first's texts, and on the 2-core dev box the
        calibration read 0.07 ms a query while a query's encoding alone cost the loaded
        retriever ~16 ms (the utilization read 0.005 while RaLMSpec ran 0.65x at c=32)."""
        times = {}
        for name, count in (("one", 1), ("many", CALIBRATION_QUERIES)):
            best = float("inf")
            for trial in range(2):
                queries = [CALIBRATION_TEXT.format(f"{name}.{trial}.{i}") for i in range(count)]
                start = time.perf_counter()
                try:
                    await self.retriever.search(queries, 1)
                except Exception as exc:
                    logger.warning("retriever calibration failed, no retriever fallback: %r", exc)
                    return 0.0
                best = min(best, time.perf_counter() - start)
            times[name] = best
        cost = self.retriever_load.calibrate(times["one"], times["many"])
        logger.info(
            "retriever calibration: 1 query %.3f s, %d queries %.3f s: %.2f ms a query%s",
            times["one"], CALIBRATION_QUERIES, times["many"], cost * 1000,
            f" (~{1 / cost:.0f} queries/s at most)" if cost > 0 else "",
        )  # fmt: skip
        return cost

    async def warm_up(self) -> float | None:
        """Answer ``WARMUP_QUESTION`` once as the baseline and once with RaLMSpec (the
        server's default speculation), ``WARMUP_TOKENS`` tokens each, before the server
        takes requests; returns the seconds it took, or None if it failed (logged: the
        requests that need what failed will fail as they would have).

        The first answers pay one-off costs: kernels vLLM compiles on first use, the
        retriever's and the encoder's first calls. Paid by the clients' first requests, they
        also reach OS3's clock, which pools a minute of steps across requests: on an H100 at
        21M documents (session 35) a warm-up measured speculation slower than plain steps,
        and the benchmark's next 16 answers then ran every step plain. So after the warm-up
        the clock restarts (``StrideLedger.restart_clock``; its outcomes stay) and the load
        signals forget the warm-up's queries and loop time (its first calls are not a
        load); the Prometheus batch histograms keep them."""
        start = time.perf_counter()
        config = replace(
            self.config.ralm, max_new_tokens=min(WARMUP_TOKENS, self.config.ralm.max_new_tokens)
        )
        try:
            for mode in ("baseline", "ralmspec"):
                await self.engine.generate(
                    WARMUP_QUESTION, mode, request_id=f"warmup-{mode}", config=config
                )
        except Exception as exc:
            logger.warning("warm-up failed: %r", exc)
            return None
        finally:
            for ledger in self.engine.stride_ledgers.values():
                ledger.restart_clock()
            self.retriever_load.clear()
            self.loop_load.clear()
        seconds = time.perf_counter() - start
        logger.info("warm-up: a baseline and a RaLMSpec answer in %.1f s", seconds)
        return seconds

    def _observe_batch(self, record: BatchRecord) -> None:
        """Each merged retriever call: the Prometheus batch histograms and, if it succeeded,
        the load signal (an error can return at once: a retriever that fails fast is not
        busy, and its requests fail whether they speculate or not)."""
        metrics.observe_batch(record.num_callers, record.num_queries, record.max_wait_s)
        if record.ok:
            self.retriever_load.observe(record.num_queries)
            self._read_encoder()

    def _read_encoder(self) -> None:
        """While searches return, read the retriever's ``encoder_busy_s`` counter (one
        ``Info`` call, at most every ``ENCODER_POLL_S``, one at a time, in the background)
        into the load signal (``RetrieverLoad.observe_encoder``)."""
        now = time.monotonic()
        if not self._encoder_readable or self._encoder_reading is not None:
            return
        if now - self._encoder_asked < ENCODER_POLL_S:
            return
        self._encoder_asked = now
        self._encoder_reading = asyncio.get_running_loop().create_task(self._take_encoder_reading())

    async def _take_encoder_reading(self) -> None:
        try:
            stats = await self._retriever_stats(ENCODER_POLL_S)
        finally:
            self._encoder_reading = None
        if stats is None:  # slow or down: the next search asks again
            return
        busy = stats.backend.get("encoder_busy_s")
        if busy is None:
            self._encoder_readable = False
            logger.info("the retriever reports no query-encoder time: load by queries only")
        else:
            self.retriever_load.observe_encoder(busy)

    async def reset_prefix_cache(self) -> bool:
        """Forget cached prompt work so that the next requests start cold (benchmarks).

        Empties vLLM's KV prefix cache (``AsyncLLM.reset_prefix_cache``; either LM path
        reaches its engine through ``lm.engine``), the core's document-token cache and the
        retriever's query-encoder memo (``reset_caches``: the ``ResetCaches`` RPC, so a
        benchmark's RaLMSpec run does not find the baseline's queries already encoded).
        Returns vLLM's answer: False while requests (or paused sessions) still hold KV
        blocks, or when the LM has no vLLM engine; the other caches are emptied anyway.
        Raises ``RetrieverError`` when the retriever cannot be reached.
        """
        old = self.engine.doc_tokens
        self.engine.doc_tokens = old.emptied()  # running requests keep the old cache object
        reset_retriever = getattr(self.retriever, "reset_caches", None)
        if reset_retriever is not None:
            dropped = await reset_retriever()
            logger.info("retriever caches reset: %d memoised query encodings dropped", dropped)
        vllm_engine = getattr(self.engine.lm, "engine", None)
        if vllm_engine is None:
            logger.warning("prefix-cache reset: the LM has no vLLM engine")
            return False
        reset = bool(await vllm_engine.reset_prefix_cache())
        logger.info("prefix-cache reset: %s (%d cached documents dropped)", reset, len(old))
        return reset

    async def refresh_retriever_stats(self, timeout_s: float = 1.0) -> bool:
        """Fetch the retriever service's batch counters into the metrics (``/metrics`` calls
        this before each scrape). False, keeping the last values, when the retriever has no
        counters (an in-process one) or does not answer within ``timeout_s``: a scrape must
        not wait out the retriever's retry budget."""
        stats = await self._retriever_stats(timeout_s)
        if stats is None:
            return False
        metrics.set_retriever_stats(stats)
        return True

    async def _retriever_stats(self, timeout_s: float) -> BatchStats | None:
        """The retriever service's counters (one ``Info`` call), or None when it keeps none
        (an in-process retriever) or does not answer within ``timeout_s`` (logged at debug):
        neither a scrape nor the load signal may wait out its retry budget."""
        stats = getattr(self.retriever, "stats", None)
        if stats is None:
            return None
        try:
            return await asyncio.wait_for(stats(), timeout_s)  # type: ignore[no-any-return]
        except Exception as exc:  # a down or slow retriever: the caller goes on without it
            logger.debug("retriever stats unavailable: %r", exc)
            return None

    async def titles(self, doc_ids: Sequence[int]) -> dict[int, str]:
        """Document titles for sources (one retriever call)."""
        unique = list(dict.fromkeys(doc_ids))
        if not unique:
            return {}
        docs = await self.retriever.documents(unique)
        return {doc.doc_id: doc.title for doc in docs}


@dataclass(frozen=True, slots=True)
class LocalCacheScoring:
    """How this process ranks a request's cache (``local_cache_scoring``): ``embedder``
    (dense: the retriever's query embeddings against the cached vectors), ``scorer`` (BM25:
    the cached documents' term weights) or neither (the retriever's ``Score`` per step)."""

    embedder: QueryEmbedder | None = None
    scorer: TermWeightCacheScorer | None = None

    def describe(self) -> str:
        if self.embedder is not None:
            return "local (dense)"
        if self.scorer is not None:
            return "local (BM25 term weights)"
        return "the retriever's Score"


async def local_cache_scoring(
    retriever: AsyncRetriever, scoring: CacheScoring
) -> LocalCacheScoring:
    """The cache scoring ``ServiceConfig.cache_scoring`` asks of this retriever (one
    ``Info`` call). "auto" and "local": a dense retriever with an async ``encode``
    (``RetrieverClient``: embeddings bit-identical to its searches') is scored with its
    embeddings, a BM25 one with term weights fetched once per cached document and summed
    with its analyzer; "local" with neither is a ``ValueError``. "retriever": its ``Score``.
    Every choice speculates the same documents: each ranks the cache by the knowledge
    base's exact score, ties to the lower doc id."""
    _check_cache_scoring(scoring)
    if scoring == "retriever":
        return LocalCacheScoring()
    info = await retriever.info()
    if info.metric == "bm25":
        return LocalCacheScoring(
            scorer=TermWeightCacheScorer(Analyzer.from_name(info.extra["analyzer"]))
        )
    encode = getattr(retriever, "encode", None)
    if info.dim > 0 and encode is not None and inspect.iscoroutinefunction(encode):
        return LocalCacheScoring(embedder=AsyncEmbedder(encode))
    if scoring == "local":
        raise ValueError(
            f"cache_scoring 'local' needs a dense retriever that serves query embeddings"
            f" or a BM25 one; this one is {info.backend!r} (dim {info.dim})"
        )
    return LocalCacheScoring()


def _check_cache_scoring(value: str) -> None:
    if value not in CACHE_SCORING:
        raise ValueError(f"cache_scoring must be one of {CACHE_SCORING}, got {value!r}")


def _check_range(param: str, value: int, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise JobError(f"{param.split('.')[-1]} must be in [1, {upper}], got {value!r}", param)
