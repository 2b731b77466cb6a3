"""One backend's measurement loop of ``bench_latency``: warm-up, then every method per question.

``bench_backend`` opens the retriever (in-process, or a gRPC ``ServerThread`` with a real
``RetrieverClient``), picks the speculation-cache scoring (the knowledge base's encoder or
the server's ``Encode`` RPC for dense backends, ``score`` for BM25) and hands each question
to ``Runner``: baseline first (reference tokens, oracle documents), then the other methods,
each on a fresh ``RaLMEngine`` after emptying vLLM's prefix cache. Every run becomes a
``RunRecord``; a run whose tokens differ from the baseline's is logged as an error. After the
warm-up and after every timed question, ``on_progress(records so far, info)`` lets the caller
rewrite its result file, so a run killed mid-way keeps what it measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from benchmarks.latency_report import INLINE, RunRecord, encodes_inline, speculation_spec
from ralmspec_vllm.core.cache import RoutingGate
from ralmspec_vllm.core.prompt import NoChatTemplate, chat_query_text, render_chat
from ralmspec_vllm.questions import Question
from ralmspec_vllm.retrieval.encoder import clear_memos
from ralmspec_vllm.service import WARMUP_QUESTION

if TYPE_CHECKING:
    from pathlib import Path

    from benchmarks.bench_latency import LatencyConfig

logger = logging.getLogger("bench_latency")

Progress = Callable[[list[RunRecord], dict[str, Any]], object]
"""``on_progress(records, info)``: the timed records so far and the retriever's info."""


@dataclass(frozen=True, slots=True)
class Measured:
    """A run's result (``RaLMEngine.generate``) and what was measured around it."""

    result: Any
    kb_phases: dict[str, float] | None
    """Seconds inside the dense retriever by phase (None without ``PhaseTimes``)."""
    loop_lag_ms: dict[str, float] | None
    """``LoopLag.summary()`` (None without ``--loop-lag-ms``)."""


class Runner:
    """Runs every method on one question with one retriever and records the results."""

    def __init__(
        self,
        cfg: LatencyConfig,
        lm: Any,
        retriever: Any,
        embed: dict[str, Any],
        counters: Callable[[], Awaitable[dict[str, float]]] | None = None,
    ):
        self.cfg = cfg
        self.lm = lm
        self.retriever = retriever
        self.embed = embed
        """``encoder=``, ``embedder=`` or ``scorer=`` for ``RaLMEngine`` (empty: ``score``
        ranking)."""
        self.counters = counters
        """A dense retriever's work counters (None for BM25), in this process or its
        child's (``Info.backend_counters``): its ``PhaseTimes`` and, for a circular scan,
        the walk's (chunks, cohorts, seconds in products and threshold ops, searches
        abandoned). Methods run one at a time, so the difference of two snapshots is one
        run's work inside the retriever."""
        self.stride_ledgers: dict[Any, Any] = {}
        """OS3's pooled outcomes per speculation config, shared by the per-run engines as
        one server engine shares them across its requests (warm-up included; its measured
        step costs are not kept, ``warmed_up``)."""
        self.inline_ledgers: dict[Any, Any] = {}
        """``stride_ledgers`` of the ``@inline`` runs: a config and its inline twin share a
        ``SpeculationConfig``, but not their OS3 evidence (the twin's guesses cost less)."""
        self.routing_gate = RoutingGate()
        """Likewise ``route_guesses="auto"``'s gate: with one per run it would re-learn
        for every answer, and an answer's guesses barely outnumber its warm-up."""

    def warmed_up(self) -> None:
        """The warm-up is over: OS3's clock forgets its steps (``StrideLedger.restart_clock``),
        whose one-off costs would otherwise steer the timed answers' plain-or-speculate
        choice for a minute."""
        for ledger in [*self.stride_ledgers.values(), *self.inline_ledgers.values()]:
            ledger.restart_clock()

    def engine(self, inline: bool = False) -> Any:
        """A fresh engine for one run; ``inline``: its guesses embed on the event loop's
        thread (``latency_report.INLINE``)."""
        from ralmspec_vllm.core.runner import RaLMEngine

        embed = dict(self.embed)
        if inline:
            if "encoder" not in embed:
                raise ValueError(f"{INLINE} needs this process's encoder (dense, local scoring)")
            embed["encode_in_thread"] = False
        return RaLMEngine(
            self.lm,
            self.lm.tokenizer,
            self.retriever,
            self.cfg.ralm,
            stride_ledgers=self.inline_ledgers if inline else self.stride_ledgers,
            routing_gate=self.routing_gate,
            **embed,
        )

    async def one(
        self,
        method: str,
        question: str,
        oracle_ids: Sequence[int | None],
        query: str | None = None,
    ) -> Measured:
        """One run, with the retriever's phase times and the event loop's lag around it.
        ``query``: what the retrieval queries read, where not ``question`` (``query_text``)."""
        reset = self.cfg.reset_prefix_cache and self.cfg.prefix_caching
        if reset and not await self.lm.engine.reset_prefix_cache():
            logger.warning("vLLM refused to reset its prefix cache")
        # Methods answer the same question one after another with the same queries: a run
        # must not find the previous run's query encodings memoised (a RaLMSpec run after
        # the baseline's timed dictionary lookups instead of encoder passes, 2026-11-27 to
        # session 22). This process's encoders (cache scoring, an in-process retriever) are
        # cleared here, a child retriever's by its ResetCaches RPC. Within a run the memo
        # stays, as in serving.
        clear_memos()
        await self.retriever.reset_caches()
        lag = None if self.cfg.loop_lag_ms is None else LoopLag(self.cfg.loop_lag_ms / 1000)
        before = await self._phases()
        async with lag or contextlib.nullcontext():
            result = await self._generate(method, question, oracle_ids, query)
        phases = await self._since(before)
        return Measured(result, phases, None if lag is None else lag.summary())

    async def _generate(
        self, method: str, question: str, oracle_ids: Sequence[int | None], query: str | None
    ) -> Any:
        engine = self.engine(inline=encodes_inline(method))
        if method == "baseline":
            return await engine.generate(question, "baseline", query=query)
        if method == "oracle":
            return await engine.generate(question, "oracle", oracle_doc_ids=oracle_ids, query=query)
        return await engine.generate(
            question, "ralmspec", speculation=speculation_spec(method), query=query
        )

    def prompt_text(self, question: Question) -> str:
        """What the LM is asked: the question, or with ``chat`` the question as a user
        message through the model's chat template (as the server's chat endpoint has it)."""
        if not self.cfg.chat:
            return question.text
        message = [{"role": "user", "content": question.text}]
        try:
            return render_chat(self.lm.tokenizer, message, add_generation_prompt=True)
        except NoChatTemplate:
            raise ValueError(f"--chat: model {self.cfg.model!r} has no chat template") from None

    def query_text(self, question: Question) -> str | None:
        """What the retrieval queries read before the answer, where that is not
        ``prompt_text``: with ``chat``, the question without the template's markup, as the
        server's chat endpoint queries (``core.prompt.chat_query_text``)."""
        if not self.cfg.chat:
            return None
        return chat_query_text([{"role": "user", "content": question.text}])

    async def question(
        self, backend: str, question: Question, methods: Sequence[str], timed: bool = True
    ) -> list[RunRecord]:
        text, query = self.prompt_text(question), self.query_text(question)
        measured = await self.one("baseline", text, (), query)
        base = measured.result
        records = [self._record(backend, "baseline", question, measured, base)]
        for method in methods[1:]:
            measured = await self.one(method, text, base.trace.step_doc_ids, query)
            result = measured.result
            record = self._record(backend, method, question, measured, base)
            if not record.identical and timed:
                logger.error(
                    "OUTPUTS DIFFER: %s %s on %r: %d tokens vs the baseline's %d, first "
                    "difference at token %d; %s", backend, method, question.text,
                    len(result.token_ids), len(base.token_ids),
                    _first_difference(result.token_ids, base.token_ids),
                    _diagnose(result, base),
                )  # fmt: skip
            records.append(record)
        return records

    async def _phases(self) -> dict[str, float] | None:
        return None if self.counters is None else await self.counters()

    async def _since(self, before: dict[str, float] | None) -> dict[str, float] | None:
        after = await self._phases()
        if before is None or after is None:
            return None
        return {name: after[name] - before[name] for name in after}

    @staticmethod
    def _record(
        backend: str, method: str, question: Question, measured: Measured, base: Any
    ) -> RunRecord:
        result = measured.result
        trace = result.trace
        return RunRecord.from_summary(
            backend,
            method,
            question.qid,
            question.dataset,
            trace.summary(),
            strides=trace.strides,
            num_tokens=len(result.token_ids),
            identical=result.token_ids == base.token_ids,
            same_documents=trace.step_doc_ids == base.trace.step_doc_ids,
            searches=[
                (c.num_queries, c.latency_s) for c in trace.retrieval_calls if c.kind == "search"
            ],
            scores=[(c.k, c.latency_s) for c in trace.retrieval_calls if c.kind == "score"],
            fetches=[
                (c.k, c.latency_s)
                for c in trace.retrieval_calls
                if c.kind in ("vectors", "term_weights")
            ],
            kb_phases=measured.kb_phases,
            loop_lag_ms=measured.loop_lag_ms,
            doc_ids=trace.step_doc_ids if method == "baseline" else (),
        )


class LoopLag:
    """How late the event loop wakes a task that sleeps ``interval_s`` at a time, for one
    run (``async with``). The loop that drives vLLM and the speculation also holds the GIL
    that in-process search threads need after every torch call: long stretches of lag mean
    long GIL holds (``benchmarks/gpu/probe_gil.py``). Costs one wake-up per interval."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> LoopLag:
        self._task = asyncio.create_task(self._watch())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            self.samples.append(max(0.0, time.perf_counter() - start - self.interval_s))

    def summary(self) -> dict[str, float]:
        """Lag in ms: median, 99th percentile and maximum over the run's wake-ups."""
        if not self.samples:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        ordered = sorted(self.samples)

        def ms(quantile: float) -> float:
            return 1000 * ordered[min(len(ordered) - 1, int(quantile * len(ordered)))]

        return {"p50": ms(0.5), "p99": ms(0.99), "max": 1000 * ordered[-1]}


def _diagnose(result: Any, base: Any) -> str:
    """Retrieval or LM? Compare the documents of the steps up to the first differing token."""
    at = _first_difference(result.token_ids, base.token_ids)
    mine = [(span.start, span.end, span.doc_id) for span in result.trace.spans]
    theirs = [(span.start, span.end, span.doc_id) for span in base.trace.spans]
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a[2] != b[2]:
            return f"step {i} used doc {a[2]}, the baseline doc {b[2]} (retrieval differs)"
        if a[0] <= at < a[1]:
            return (
                f"step {i} (tokens {a[0]}-{a[1]}) had the baseline's documents so far: "
                "the LM gave other tokens for the same prompt (numerics)"
            )
    return "no step boundary explains it"


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def set_faiss_threads(threads: int | None) -> int | None:
    """Apply ``--faiss-threads``; return FAISS's thread count (None without FAISS)."""
    try:
        import faiss
    except ImportError:
        return None
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    return int(faiss.omp_get_max_threads())


def retriever_config(cfg: LatencyConfig, backend: str) -> Any:
    """The ``RetrieverConfig`` that ``cfg`` asks of ``backend``."""
    from ralmspec_vllm.retrieval.factory import RetrieverConfig

    return RetrieverConfig(
        backend=backend,
        flat_impl=cfg.flat_impl,
        device=cfg.flat_device if backend == "flat" else "cpu",
        dtype=cfg.flat_dtype if backend == "flat" else "float32",
        flat_scan=cfg.flat_scan if backend == "flat" else "batch",
        flat_chunk_size=cfg.flat_chunk_size,
        ef_search=cfg.hnsw_ef_search,
        nlist=cfg.ivf_nlist,
        nprobe=cfg.ivf_nprobe,
        ivf_codec=cfg.ivf_codec,
        ivf_probe_groups=cfg.ivf_probe_groups,
        ivf_build=cfg.ivf_build,
        save_index=cfg.save_index,
        progress=False,
    )


def child_args(cfg: LatencyConfig, backend: str, index: Path) -> list[str]:
    """``retriever serve`` arguments of ``--transport process``'s child: loopback, an
    OS-chosen port, the backend as ``cfg`` asks it, searching on ``cfg.bm25_threads``
    (BM25) or ``cfg.torch_threads`` threads, at this process's GIL switch interval when
    ``cfg`` sets one (a BM25 child recomputes term weights in Python beside its searches:
    at the server's default 5 ms, each of a search's GIL re-takes can wait that long), on
    ``cfg.retriever_cpus`` when given."""
    from ralmspec_vllm.retrieval.factory import config_to_args

    threads = cfg.bm25_threads if backend == "bm25" else cfg.torch_threads
    rcfg = replace(retriever_config(cfg, backend), threads=threads)
    args = ["--host", "127.0.0.1", "--port", "0", "--index", str(index), *config_to_args(rcfg)]
    if cfg.switch_interval_ms is not None:
        args.append(f"--switch-interval-ms={cfg.switch_interval_ms}")
    if cfg.retriever_cpus is not None:
        args.append(f"--cpus={cfg.retriever_cpus}")
    return args


@dataclass
class OpenedRetriever:
    """The first backend's retriever, opened ahead of ``bench_backend`` (while vLLM starts):
    in this process (``retriever``) or, with ``--transport process``, a ``retriever serve``
    child (``server``; at 21M BM25 documents it builds its index for ~105 s). Its opener
    closes it, not ``bench_backend``."""

    backend: str
    retriever: Any
    open_s: float
    server: Any = None

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
        else:
            close_retriever(self.retriever)


def _counters(sync: Any, client: Any) -> Callable[[], Awaitable[dict[str, float]]] | None:
    """The dense retriever's work counters: in this process (``counters``), or from the
    child over ``Info`` (``--transport process``); None for BM25."""
    if hasattr(sync, "times"):

        async def here() -> dict[str, float]:
            return dict(sync.counters())

        return here
    if sync is None and client is not None:

        async def there() -> dict[str, float]:
            return dict((await client.stats()).backend)

        return there
    return None


def close_retriever(retriever: Any) -> None:
    """Close an in-process retriever that holds resources (a circular scan's thread)."""
    if callable(getattr(retriever, "close", None)):
        retriever.close()


def open_inproc(cfg: LatencyConfig, backend: str, kb: Any) -> OpenedRetriever:
    start = time.perf_counter()
    retriever = _open_sync(cfg, backend, kb)
    return OpenedRetriever(backend, retriever, round(time.perf_counter() - start, 1))


def spawn_child(cfg: LatencyConfig, backend: str, kb: Any) -> OpenedRetriever:
    """``--transport process``: the backend in a ``retriever serve`` child, as ``serve`` runs
    it, so its search threads never wait for this process's GIL (the event loop that drives
    vLLM). The child keeps its query memo, as shipped; ``Runner.one`` empties it before every
    run (``ResetCaches``)."""
    from ralmspec_vllm.retrieval.server import ServerProcess

    start = time.perf_counter()
    server = ServerProcess.spawn(child_args(cfg, backend, kb.path), timeout_s=3600.0)
    return OpenedRetriever(backend, None, round(time.perf_counter() - start, 1), server)


def _open_sync(cfg: LatencyConfig, backend: str, kb: Any) -> Any:
    """The backend's retriever in this process, BM25 on ``cfg.bm25_threads`` threads."""
    from ralmspec_vllm.retrieval.bm25 import BM25Retriever
    from ralmspec_vllm.retrieval.factory import open_retriever

    retriever = open_retriever(kb, retriever_config(cfg, backend))
    if isinstance(retriever, BM25Retriever) and cfg.bm25_threads is not None:
        retriever.index.set_threads(cfg.bm25_threads)
    return retriever


async def bench_backend(
    cfg: LatencyConfig,
    backend: str,
    kb: Any,
    lm: Any,
    questions: Sequence[Question],
    on_progress: Progress | None = None,
    opened: OpenedRetriever | None = None,
) -> tuple[list[RunRecord], dict[str, Any]]:
    """Warm up and time every method on every question with one backend; ``on_progress``
    after the warm-up and after every timed question. ``opened``: this backend's retriever
    (in this process or a child), already open (the caller closes it)."""
    from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever
    from ralmspec_vllm.service import local_cache_scoring

    start = time.perf_counter()
    dense = backend != "bm25"
    server: Any = None
    client: Any = None
    sync: Any = None
    spawned: OpenedRetriever | None = None  # a child this call spawned (and stops)
    if opened is not None:
        kind = "process" if opened.server is not None else "inproc"
        if opened.backend != backend or cfg.transport != kind:
            raise ValueError(f"opened: a {opened.backend} retriever for {backend}/{cfg.transport}")
        sync, server = opened.retriever, opened.server
    elif cfg.transport == "process":
        spawned = spawn_child(cfg, backend, kb)
        server = spawned.server
    else:
        sync = _open_sync(cfg, backend, kb)
    info: dict[str, Any] = {"open_s": round(time.perf_counter() - start, 1)}
    if opened is not None:
        info.update(open_s=opened.open_s, opened_during_engine_start=True)
    # How speculation ranks the cache (``RaLMEngine``'s ``encoder=``, ``embedder=`` or
    # ``scorer=``; none: the retriever's ``score``). BM25 asks the retriever's info for its
    # analyzer over either transport, as ``serve`` does.
    embed: dict[str, Any] = {}
    if sync is not None and cfg.transport == "inproc":
        retriever: Any = InProcessAsyncRetriever(sync)
        if dense:  # (over the process transport the encoder is the child's: not recorded)
            encoder = kb.encoder()
            info["encoder"] = encoder.settings
            if cfg.cache_scoring == "local":
                embed = {"encoder": encoder.encode}
    else:
        from ralmspec_vllm.core.encoding import AsyncEmbedder
        from ralmspec_vllm.retrieval.client import RetrieverClient
        from ralmspec_vllm.retrieval.server import ServerThread

        if server is None:
            server = ServerThread(sync).start()
        client = RetrieverClient(server.target, timeout_s=120.0)
        retriever = client
        if dense and cfg.cache_scoring == "local":
            embed = {"embedder": AsyncEmbedder(client.encode)}
    if not dense and cfg.cache_scoring == "local":
        embed = {"scorer": (await local_cache_scoring(retriever, "local")).scorer}
    if backend == "bm25" and cfg.probe_bm25_threads:
        if sync is not None:
            info["bm25_search_probe"] = probe_bm25_threads(cfg, sync.index, questions)
        else:  # the index lives in the child
            logger.info("BM25 thread probe skipped: it needs the in-process index")
    runner = Runner(cfg, lm, retriever, embed, _counters(sync, client if dense else None))
    methods = cfg.ordered_methods
    records: list[RunRecord] = []
    try:
        start = time.perf_counter()
        warm = Question("warmup", WARMUP_QUESTION, (), "warmup")
        for _ in range(cfg.warmup):
            await runner.question(cfg.label(backend), warm, methods, timed=False)
        runner.warmed_up()
        info["warmup_s"] = round(time.perf_counter() - start, 1)
        if on_progress is not None:
            on_progress(records, info)
        timing_start = time.perf_counter()
        for i, question in enumerate(questions, 1):
            spent = time.perf_counter() - timing_start
            if cfg.time_budget_s is not None and spent > cfg.time_budget_s:
                logger.warning("time budget spent: timed %d of %d questions", i - 1, len(questions))
                break
            start = time.perf_counter()
            done = await runner.question(cfg.label(backend), question, methods)
            records += done
            logger.info(
                "%s %d/%d (%s) in %.1f s: %s", backend, i, len(questions), question.qid,
                time.perf_counter() - start,
                ", ".join(f"{r.method} {r.wall_time_s:.2f}s" for r in done),
            )  # fmt: skip
            if on_progress is not None:
                on_progress(records, info)
    finally:
        if client is not None:
            await client.close()
        if spawned is not None:
            spawned.close()
        elif opened is None and server is not None:  # the in-process gRPC transport's thread
            server.stop()
        if opened is None and sync is not None:
            close_retriever(sync)
    return records, info


PROBE_QUESTIONS = 20
"""Questions ``probe_bm25_threads`` searches (at 21M docs ~7 s serially)."""


def probe_bm25_threads(
    cfg: LatencyConfig, index: Any, questions: Sequence[Question]
) -> list[dict[str, Any]]:
    """One top-10 search of each of the first ``PROBE_QUESTIONS`` questions' texts at each of
    ``cfg.probe_bm25_threads`` thread counts (the same queries, in turn), timed;
    ``identical`` says whether every count gave the first count's hits. Leaves the index on
    ``cfg.bm25_threads``."""
    queries = [index.term_ids(q.text) for q in questions[:PROBE_QUESTIONS]]
    out: list[dict[str, Any]] = []
    first: list[Any] | None = None
    try:
        for threads in cfg.probe_bm25_threads:
            index.set_threads(threads)
            times, hits = [], []
            for term_ids in queries:
                start = time.perf_counter()
                hits.append(index.top_k(term_ids, 10))
                times.append(1000 * (time.perf_counter() - start))
            first = hits if first is None else first
            row = {"threads": threads, "shards": index.shards, "queries": len(queries)}
            row.update(mean_ms=round(statistics.fmean(times), 2))
            row.update(p50_ms=round(statistics.median(times), 2), identical=hits == first)
            logger.info("BM25 search probe: %s", row)
            out.append(row)
    finally:
        index.set_threads(cfg.bm25_threads)
    return out


def set_torch_threads(threads: int | None) -> None:
    """Apply ``--torch-threads`` (nothing when ``None``)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return int(torch.get_num_threads())
