"""Batch-1 latency of iterative RaLM: baseline vs oracle vs RaLMSpec's ablation rows.

Flow: load real questions (``--datasets`` x ``--questions-per-dataset`` of NQ, TriviaQA,
WebQuestions, or ``--questions FILE``, JSONL with ``question``), open the knowledge base
(``--index`` or the default index; ``--filler N`` grows it with synthetic filler to N
documents in total, built once into the cache dir and shared with ``bench_retrieval``),
start ONE vLLM engine on ``--model``, then per backend (``--backends``) open the retriever
(in-process, behind a real gRPC server thread with ``--transport grpc``, or in a child
``retriever serve`` process with ``--transport process``, as ``serve`` runs it; the
knowledge base and the first backend's in-process retriever open in a thread while the
engine starts, which on a fresh GPU machine hides their ~100 s at 21M), and

1. warm up: one untimed question through every method;
2. for every question, one at a time: the baseline first (its token ids are the reference
   and its per-step doc ids become the oracle's), then every other method of ``--methods``
   (``oracle``: documents handed in, zero retrieval cost, the ceiling; ``B``, ``P``, ``S``,
   ``A``, ``PS``, ``SA``, ``PA``, ``PSA``: RaLMSpec presets). Methods are interleaved per
   question so machine-load drift hits them alike. Each run gets a fresh ``RaLMEngine`` and
   (by default) an emptied vLLM prefix cache, so no run profits from another's KV blocks.
   OS3's measured accuracy (``StrideLedger``) is pooled per method across the questions,
   as one server engine pools it across requests; ``PSA-PAPER`` (the paper's OS3) ignores it.
3. every run's token ids are compared with the baseline's: a mismatch is logged as an
   error, marks the row ``outputs_identical: false`` and makes the exit status 1.

Dense backends rank the speculation cache with the knowledge base's own query encoder
(in-process) or the server's ``Encode`` RPC (gRPC); BM25 with the retriever's ``score``.
Results: ``benchmarks/results/latency_<machine>_<model>_<backend>.json`` (one file per
backend; rows + run metadata) and a PNG next to it (``latency_report``). The JSON is
rewritten after the warm-up and after every timed question (``meta.complete`` false,
``meta.questions_timed`` so far; rows from the same ``summarize``), so a run stopped by
``timeout`` keeps its last question's file; the last write sets ``complete`` true and draws
the PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

if __package__ in (None, ""):  # run as `python benchmarks/bench_latency.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ralmspec_vllm.engine.settings import apply_process_settings

apply_process_settings()  # before torch / vLLM / FAISS are imported

from benchmarks.cli import OutputConfig, output_flags, parse_config  # noqa: E402
from benchmarks.common import (  # noqa: E402
    MachineInfo,
    Writer,
    describe_machine,
    format_table,
    run_metadata,
    write_results,
)
from benchmarks.latency_report import (  # noqa: E402
    INLINE,
    TABLE_COLUMNS,
    RunRecord,
    encodes_inline,
    host_drift,
    plot_latency,
    speculation_spec,
    summarize,
)
from benchmarks.latency_runs import (  # noqa: E402
    OpenedRetriever,
    bench_backend,
    open_inproc,
    set_faiss_threads,
    set_torch_threads,
    spawn_child,
    torch_threads,
)
from ralmspec_vllm.core.config import PRESETS, RaLMConfig  # noqa: E402
from ralmspec_vllm.cpus import parse_cpus, pin  # noqa: E402
from ralmspec_vllm.questions import DATASETS, Question, load_questions, load_questions_file  # noqa: E402
from ralmspec_vllm.retrieval.ann import IVF_BUILDS, IVF_CODECS  # noqa: E402
from ralmspec_vllm.retrieval.factory import RetrieverConfig  # noqa: E402
from ralmspec_vllm.retrieval.flat import DTYPES as FLAT_DTYPES  # noqa: E402
from ralmspec_vllm.retrieval.flat import SCANS as FLAT_SCANS  # noqa: E402

logger = logging.getLogger("bench_latency")
T = TypeVar("T")

METHODS = ("baseline", "oracle", *PRESETS)
TRANSPORTS = ("inproc", "grpc", "process")
BACKENDS = ("flat", "hnsw", "ivf", "bm25")


HNSW_EF_SEARCH = RetrieverConfig().ef_search
IVF_NPROBE = RetrieverConfig().nprobe
"""The approximate indexes' default search parameters (``RetrieverConfig``'s)."""


@dataclass(frozen=True)
class LatencyConfig(OutputConfig):
    """What ``bench_latency`` measures and how (one field per CLI flag).

    ``name`` (from ``OutputConfig``) defaults to ``latency_<machine>_<model>_<backend>`` per
    backend.
    """

    model: str = "smollm2-135m"
    """Built-in model name (``engine.models.MODELS``) or a model directory."""
    backends: tuple[str, ...] = ("flat",)
    """Retrieval backends, one result file each."""
    methods: tuple[str, ...] = METHODS
    """``baseline`` (always run: the reference), ``oracle`` and RaLMSpec preset rows, each
    optionally with fields overridden (``PSA:overlap_depth=1``, ``SpeculationConfig.parse``)
    and, for dense retrieval in process, suffixed ``@inline`` (``latency_report.INLINE``)."""
    datasets: tuple[str, ...] = ("nq", "triviaqa", "webquestions")
    """Question sets (ignored with ``questions_file``)."""
    questions_per_dataset: int = 5
    """First N test questions of each dataset."""
    skip_questions: int = 0
    """Drop the first N questions of the set: a later shard of a run too long for one
    sitting (``merge_latency.py`` joins the shards' result files)."""
    questions_file: str | None = None
    """JSONL with ``question`` (and optionally ``id``, ``dataset``) instead of the datasets."""
    index: str | None = None
    """Knowledge-base folder; ``None``: the default (real Wikipedia) index."""
    filler: int | None = None
    """Grow the index with synthetic filler to this many documents in total."""
    transport: str = "inproc"
    """``inproc`` (retriever in this process), ``grpc`` (a server thread in this process and
    the real client) or ``process`` (a ``retriever serve`` child process and the real
    client, as ``serve`` runs it; ``--torch-threads`` then sets the child's threads)."""
    cpus: str | None = None
    """Pin this process, and vLLM's engine core that it starts, to these cores (``--cpus``
    of ``ralmspec_vllm.cpus``, e.g. ``12-15``); ``None``: every core it may use."""
    retriever_cpus: str | None = None
    """``--transport process`` only: the child retriever's cores (e.g. ``0-11``). With
    ``cpus`` disjoint from them, the scan's threads and the LM's processes never take each
    other's cores, as ``serve --cpus 12-15 --retriever-arg=--cpus=0-11`` runs them."""
    chat: bool = False
    """Put each question through the model's chat template, as one user message with the
    generation prompt (what the server's /v1/chat/completions does), instead of the bare
    question text. An instruct model given a bare question often ends its turn at once: a
    quarter of Qwen2.5-Coder-0.5B's answers were its end-of-turn token alone (session 42)."""
    max_new_tokens: int = 128
    retrieval_stride: int = 4
    warmup: int = 1
    """Untimed questions per method before timing."""
    time_budget_s: float | None = None
    """Start no further question once this much time was spent timing (per backend)."""
    reset_prefix_cache: bool = True
    """Empty vLLM's prefix cache before every timed run."""
    prefix_caching: bool = True
    """vLLM prefix caching. Off: every step recomputes its whole prompt, so a step's tokens
    depend on its prompt alone (on a GPU, bf16 kernels under prefix caching can flip a
    near-tie token depending on which part of the prompt came from the cache)."""
    dtype: str | None = None
    """LM dtype (``EngineConfig.dtype``); default: float32 (token identity holds)."""
    faiss_threads: int | None = None
    """FAISS OpenMP threads; ``None``: leave the process setting (``OMP_NUM_THREADS``)."""
    torch_threads: int | None = None
    """Torch intra-op threads of this process (the torch flat scan, the encoder); ``None``:
    torch's default (every core). Fewer leave cores to vLLM's engine process while a
    memory-bound scan runs."""
    bm25_threads: int | None = None
    """BM25 search threads (``BM25Index.set_threads``; with ``--transport process`` the
    child's ``--threads``); ``None``: every core. Fewer leave cores to vLLM's engine."""
    probe_bm25_threads: tuple[int, ...] = ()
    """Before the warm-up, time one BM25 search of each question's text at each of these
    thread counts on the opened in-process index (the serial search is 1) and check the hits
    agree; the backend's ``bm25_search_probe`` in the JSON. Then ``bm25_threads`` again."""
    cache_scoring: str = "local"
    """How speculation ranks a request's cache: "local" (dense: the query embedding and
    the cached vectors; BM25: the cached documents' term weights) or "retriever" (its
    ``score`` over the cached ids, a call per speculated step). Same speculated documents."""
    switch_interval_ms: float | None = None
    """Python's GIL switch interval (``sys.setswitchinterval``) in this process; ``None``:
    Python's 5 ms. In-process, a search thread re-takes the GIL after every torch or numpy
    call, and while the event loop runs Python (vLLM's outputs, speculation) each re-take can
    wait a whole interval: on 2 cores a 5-query bf16 scan of 1M docs took 39 ms alone and 432
    ms beside a busy Python thread at 5 ms, 74 ms at 0.5 ms (``serve`` keeps its retriever in
    another process)."""
    loop_lag_ms: float | None = None
    """Watch the event loop during every run: a task sleeps this long at a time and records
    how late it wakes (rows' ``loop_lag_ms``); ``None``: off."""
    flat_impl: str = "faiss"
    """Flat search: ``faiss`` (IndexFlatIP; below 20 queries per call its CPU cost grows
    linearly with the batch) or ``torch`` (one matmul per call: batches amortise)."""
    flat_device: str = "cpu"
    """Where flat search runs: ``cpu`` (as the paper) or ``cuda`` (torch on the GPU)."""
    flat_dtype: str = "float32"
    """Matrix dtype of the torch flat search (``retrieval.flat.DTYPES``); faiss: float32."""
    flat_scan: str = "batch"
    """Torch flat scan (``retrieval.flat.SCANS``): ``batch`` (each search walks the matrix)
    or ``circular`` (searches board one shared walk: they overlap, for
    ``overlap_depth=pipeline``)."""
    flat_chunk_size: int = 1 << 20
    """Documents per chunk of the torch flat scan (``RetrieverConfig.flat_chunk_size``)."""
    hnsw_ef_search: int = HNSW_EF_SEARCH
    ivf_nlist: int | None = None
    """IVF lists (``None``: ~4 sqrt(N), FAISS's rule of thumb; 18,330 at 21M docs, whose
    k-means alone would take the H200 host's CPU many minutes)."""
    ivf_nprobe: int = IVF_NPROBE
    ivf_codec: str = "flat"
    """IVF vector storage (``RetrieverConfig.ivf_codec``): ``sq8`` at 21M docs, where a
    float32 IVF (32 GB) would not fit the GPU host's disk next to the knowledge base."""
    ivf_probe_groups: int = 1
    """Search a query's IVF lists in this many groups on as many threads
    (``RetrieverConfig.ivf_probe_groups``); 1: FAISS's one-core search of a query."""
    ivf_build: str = "auto"
    """Where an IVF build's k-means and list assignment run (``RetrieverConfig.ivf_build``):
    ``auto`` is torch on the GPU where there is one (seconds at 21M docs; FAISS on the CPU
    had not finished its k-means and add after 4.5 minutes in session 28)."""
    save_index: bool = True
    """Save a built HNSW, IVF or BM25 index for later runs (``RetrieverConfig.save_index``);
    the 21M scripts turn it off: a lent GPU machine starts from scratch every session."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.backends or any(v not in BACKENDS for v in self.backends):
            raise ValueError(f"backends: must be a non-empty subset of {BACKENDS}")
        if not self.methods:
            raise ValueError("methods: must not be empty")
        for method in self.methods:
            if method not in ("baseline", "oracle"):
                try:
                    speculation_spec(method)
                except ValueError as exc:
                    raise ValueError(f"methods: {exc}") from None
        if any(encodes_inline(m) for m in self.methods) and (
            self.transport != "inproc" or self.cache_scoring != "local" or "bm25" in self.backends
        ):
            raise ValueError(
                f"methods: {INLINE} needs dense backends, --transport inproc and local cache "
                "scoring (the encoder it moves onto the event loop's thread)"
            )
        if self.questions_file is None and (
            not self.datasets or any(d not in DATASETS for d in self.datasets)
        ):
            raise ValueError(f"datasets: must be a subset of {sorted(DATASETS)}")
        if self.flat_impl not in ("faiss", "torch"):
            raise ValueError(f"flat_impl: must be 'faiss' or 'torch', got {self.flat_impl!r}")
        if self.flat_device not in ("cpu", "cuda"):
            raise ValueError(f"flat_device: must be 'cpu' or 'cuda', got {self.flat_device!r}")
        if self.flat_dtype not in FLAT_DTYPES:
            raise ValueError(f"flat_dtype: must be one of {FLAT_DTYPES}, got {self.flat_dtype!r}")
        if self.flat_dtype != "float32" and self.flat_impl != "torch":
            raise ValueError(f"flat_dtype: {self.flat_dtype} needs flat_impl='torch'")
        if self.flat_scan not in FLAT_SCANS:
            raise ValueError(f"flat_scan: must be one of {FLAT_SCANS}, got {self.flat_scan!r}")
        if self.flat_scan != "batch" and self.flat_impl != "torch":
            raise ValueError(f"flat_scan: {self.flat_scan} needs flat_impl='torch'")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport: must be one of {TRANSPORTS}, got {self.transport!r}")
        for name in ("cpus", "retriever_cpus"):
            if getattr(self, name) is not None:
                parse_cpus(getattr(self, name))  # ValueError naming the bad part
        if self.retriever_cpus is not None and self.transport != "process":
            raise ValueError("retriever_cpus: needs transport='process' (a child to pin)")
        for name in ("questions_per_dataset", "max_new_tokens", "retrieval_stride"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.skip_questions < 0:
            raise ValueError(f"skip_questions: must be >= 0, got {self.skip_questions}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if self.filler is not None and self.filler < 1:
            raise ValueError(f"filler: must be >= 1, got {self.filler}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s: must be > 0, got {self.time_budget_s}")
        if self.faiss_threads is not None and self.faiss_threads < 1:
            raise ValueError(f"faiss_threads: must be >= 1, got {self.faiss_threads}")
        if self.loop_lag_ms is not None and not self.loop_lag_ms > 0:
            raise ValueError(f"loop_lag_ms: must be > 0, got {self.loop_lag_ms}")
        if self.cache_scoring not in ("local", "retriever"):
            raise ValueError(f"cache_scoring: local or retriever, got {self.cache_scoring!r}")
        if self.switch_interval_ms is not None and not self.switch_interval_ms > 0:
            raise ValueError(f"switch_interval_ms: must be > 0, got {self.switch_interval_ms}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads: must be >= 1, got {self.torch_threads}")
        if self.ivf_probe_groups < 1:
            raise ValueError(f"ivf_probe_groups: must be >= 1, got {self.ivf_probe_groups}")
        if self.bm25_threads is not None and self.bm25_threads < 1:
            raise ValueError(f"bm25_threads: must be >= 1, got {self.bm25_threads}")
        if any(t < 1 for t in self.probe_bm25_threads):
            raise ValueError(f"probe_bm25_threads: must be >= 1, got {self.probe_bm25_threads}")
        if self.flat_chunk_size < 1:
            raise ValueError(f"flat_chunk_size: must be >= 1, got {self.flat_chunk_size}")

    @property
    def ordered_methods(self) -> list[str]:
        """``baseline`` first (added if missing), then the rest in the given order."""
        return ["baseline", *(m for m in self.methods if m != "baseline")]

    def label(self, backend: str) -> str:
        """The backend's name in rows and file names: ``flat-torch`` for the torch path,
        ``flat-torch-cuda`` on the GPU, suffixed with a non-float32 dtype
        (``flat-torch-cuda-float16``); an approximate index's search parameters where they
        differ from the defaults (``hnsw-ef512``, ``ivf-nlist4096-nprobe64``)."""
        if backend == "hnsw" and self.hnsw_ef_search != HNSW_EF_SEARCH:
            return f"hnsw-ef{self.hnsw_ef_search}"
        if backend == "ivf":
            nlist = "" if self.ivf_nlist is None else f"-nlist{self.ivf_nlist}"
            nprobe = "" if self.ivf_nprobe == IVF_NPROBE else f"-nprobe{self.ivf_nprobe}"
            codec = "" if self.ivf_codec == "flat" else f"-{self.ivf_codec}"
            groups = "" if self.ivf_probe_groups == 1 else f"-g{self.ivf_probe_groups}"
            return f"ivf{nlist}{nprobe}{codec}{groups}"
        if backend != "flat" or self.flat_impl != "torch":
            return backend
        label = "flat-torch-cuda" if self.flat_device == "cuda" else "flat-torch"
        label = label if self.flat_dtype == "float32" else f"{label}-{self.flat_dtype}"
        return label if self.flat_scan == "batch" else f"{label}-{self.flat_scan}"

    @property
    def ralm(self) -> RaLMConfig:
        return RaLMConfig(
            retrieval_stride=self.retrieval_stride, max_new_tokens=self.max_new_tokens
        )


def load_question_set(cfg: LatencyConfig) -> list[Question]:
    """The file's questions, or the datasets' first N each, interleaved (nq, tqa, wq, nq, ...)
    so that a time budget cuts every dataset alike; the first ``skip_questions`` dropped."""
    if cfg.questions_file is not None:
        questions = load_questions_file(cfg.questions_file)
    else:
        sets = [load_questions(d, cfg.questions_per_dataset) for d in cfg.datasets]
        questions = [q for group in itertools.zip_longest(*sets) for q in group if q is not None]
    if cfg.skip_questions >= len(questions):
        raise ValueError(f"skip_questions: {cfg.skip_questions} leaves none of {len(questions)}")
    return questions[cfg.skip_questions :]


def open_kb(cfg: LatencyConfig) -> tuple[Any, dict[str, Any]]:
    """The knowledge base and a description of it for the metadata."""
    from benchmarks.corpora import filler_corpus
    from ralmspec_vllm.retrieval.kb import KnowledgeBase, default_index

    real = KnowledgeBase.open(cfg.index) if cfg.index else default_index()
    record: dict[str, Any] = {}
    kb = real
    if cfg.filler is not None:
        kb, record = filler_corpus(real, cfg.filler)
    m = kb.manifest
    return kb, {
        "path": str(kb.path),
        "num_docs": m.num_docs,
        "num_real_docs": m.num_real_docs,
        "num_filler_docs": m.num_filler_docs,
        "encoder": m.encoder,
        "filler_build": record,
    }


async def run_benchmark(
    cfg: LatencyConfig, open_cores: set[int] | None = None
) -> tuple[list[Path], list[dict[str, Any]]]:
    """Start the engine for ``cfg.model``, measure, write JSON (+ PNG) per backend.
    ``open_cores``: the cores the opening thread (knowledge base, retriever) may use while
    this thread is pinned (``--cpus``), e.g. every core the process had."""
    from ralmspec_vllm.engine.lm import VllmLanguageModel
    from ralmspec_vllm.engine.models import resolve_model
    from ralmspec_vllm.engine.settings import EngineConfig
    from ralmspec_vllm.engine.version import load_vllm

    questions = load_question_set(cfg)
    set_torch_threads(cfg.torch_threads)
    # vLLM (and with it transformers) is imported before the opening thread starts, not
    # alongside it: the encoder that thread loads imports transformers too, and transformers'
    # lazy module is not safe to import from two threads at once. Session 16's HNSW run
    # died of it: "cannot import name 'PretrainedConfig' from 'transformers'".
    await asyncio.to_thread(load_vllm)
    # The knowledge base (a 21M filler build: ~35 s) and the first backend's in-process
    # retriever (~70 s to load and lay out 21M vectors) open in a thread while the model
    # converts and vLLM starts (~3 min on a fresh GPU machine): they share nothing, and a
    # GPU session's minutes are few.
    opening = asyncio.get_running_loop().run_in_executor(
        None, _on_cores, open_cores, open_ahead, cfg
    )
    lm: Any = None
    opened: OpenedRetriever | None = None
    try:
        engine_cfg = EngineConfig(
            model=str(resolve_model(cfg.model)),
            seed=cfg.seed,
            dtype=cfg.dtype,
            enable_prefix_caching=cfg.prefix_caching,
        )
        start = time.perf_counter()
        lm = await VllmLanguageModel.create(engine_cfg)
        engine_info = {"startup_s": time.perf_counter() - start}
        kb, kb_info, opened = await opening
        # the host as it is, not the cores --cpus left this thread
        machine = _on_cores(open_cores, describe_machine)
        return await measure_all(
            cfg, lm, kb, kb_info, questions, engine_info, opened=opened, machine=machine
        )
    finally:
        if opened is None:  # an engine start that failed: let the opening end, then close it
            with contextlib.suppress(Exception):
                opened = (await opening)[2]
        if opened is not None:
            opened.close()
        if lm is not None:
            await lm.shutdown()


def _on_cores(cores: set[int] | None, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this thread (and what it starts) on ``cores`` (None: as it is),
    then back: with ``--cpus`` the filler build may use every core while vLLM starts, and a
    ``--transport process`` child starts from there before pinning itself."""
    if cores is None:
        return fn(*args)
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        return fn(*args)
    finally:
        os.sched_setaffinity(0, before)


def open_ahead(cfg: LatencyConfig) -> tuple[Any, dict[str, Any], OpenedRetriever | None]:
    """``open_kb``, plus the first backend's retriever: in this process, or its ``retriever
    serve`` child with ``--transport process`` (``--transport grpc``: none ahead)."""
    kb, kb_info = open_kb(cfg)
    if cfg.transport == "inproc":
        return kb, kb_info, open_inproc(cfg, cfg.backends[0], kb)
    if cfg.transport == "process":
        return kb, kb_info, spawn_child(cfg, cfg.backends[0], kb)
    return kb, kb_info, None


async def measure_all(
    cfg: LatencyConfig,
    lm: Any,
    kb: Any,
    kb_info: dict[str, Any],
    questions: Sequence[Question],
    engine_info: dict[str, Any] | None = None,
    on_write: Writer | None = None,
    opened: OpenedRetriever | None = None,
    machine: MachineInfo | None = None,
) -> tuple[list[Path], list[dict[str, Any]]]:
    """Measure every backend of ``cfg`` on a started ``VllmLanguageModel``; write results
    after the warm-up and every timed question (partial), and at the end (complete).
    ``opened``: a backend's in-process retriever opened ahead (the caller closes it);
    ``machine``: what to record (default: ``describe_machine()`` now)."""
    machine = machine or describe_machine()
    model_tag = Path(cfg.model).name
    meta = run_meta(
        cfg, machine, kb_info, questions, {**dataclasses.asdict(lm.config), **(engine_info or {})}
    )
    base = {
        "machine": machine.tag,
        "model": model_tag,
        "corpus_size": kb_info["num_docs"],
        "transport": cfg.transport,
    }
    paths: list[Path] = []
    all_rows: list[dict[str, Any]] = []
    for backend in cfg.backends:
        label = cfg.label(backend)
        name = cfg.name or f"latency_{machine.tag}_{model_tag}_{label}"
        if cfg.name and len(cfg.backends) > 1:
            name = f"{cfg.name}_{label}"

        def save(
            records: list[RunRecord], info: dict[str, Any], complete: bool = False, name: str = name
        ) -> tuple[Path, list[dict[str, Any]]]:
            rows = summarize(records, base, cfg.ordered_methods)
            path = write_results(name, rows, backend_meta(meta, rows, info, complete), cfg.out_dir)
            if on_write is not None:
                on_write(path)
            return path, rows

        ahead = opened if opened is not None and opened.backend == backend else None
        records, info = await bench_backend(cfg, backend, kb, lm, questions, save, ahead)
        path, rows = save(records, info, complete=True)
        drift = host_drift(rows)
        if drift is not None:
            logger.warning("%s", drift)
        if cfg.plot:
            title = (
                f"Batch-1 RaLM latency, {model_tag}, {label} over "
                f"{kb_info['num_docs']:,} docs, {len(questions)} questions, {machine.tag}"
            )
            plot_latency(rows, path.with_suffix(".png"), title)
        paths.append(path)
        all_rows += rows
    return paths, all_rows


def run_meta(
    cfg: LatencyConfig,
    machine: MachineInfo,
    kb_info: dict[str, Any],
    questions: Sequence[Question],
    engine_info: dict[str, Any],
) -> dict[str, Any]:
    """The metadata every backend's result file shares (taken once, before timing)."""
    faiss_threads = set_faiss_threads(cfg.faiss_threads)
    set_torch_threads(cfg.torch_threads)
    if cfg.switch_interval_ms is not None:
        sys.setswitchinterval(cfg.switch_interval_ms / 1000)
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "out_dir"}
    meta = run_metadata("bench_latency", params, machine)  # git state of the code run
    meta.update(
        seed=cfg.seed,
        knowledge_base=kb_info,
        engine=engine_info,
        threads={
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", ""),
            "faiss": faiss_threads,
            "torch": torch_threads(),
            "bm25": cfg.bm25_threads,
            "switch_interval_ms": sys.getswitchinterval() * 1000,
        },
        questions=[{"id": q.qid, "dataset": q.dataset, "text": q.text} for q in questions],
    )
    return meta


def backend_meta(
    meta: dict[str, Any], rows: list[dict[str, Any]], info: dict[str, Any], complete: bool
) -> dict[str, Any]:
    """One backend's metadata: the run's, the retriever's ``info`` and how far it got
    (``complete``: the backend's loop finished; ``questions_timed``: answered by every
    method)."""
    timed = max((row["num_questions"] for row in rows), default=0)
    return {
        **meta,
        "retriever": info,
        "complete": complete,
        "questions_timed": timed,
        "questions_total": len(meta["questions"]),
        "all_outputs_identical": all(r["outputs_identical"] for r in rows),
    }


def _csv(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


# (flag, LatencyConfig field, argparse keywords): defaults come from LatencyConfig.
_FLAGS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("--model", "model", {"help": "model name or directory"}),
    ("--backends", "backends", {"type": _csv, "help": "comma list of flat,hnsw,ivf,bm25"}),
    ("--methods", "methods", {"type": _csv, "help": f"comma list of {','.join(METHODS)}; "
                              "a preset may override fields: PSA:overlap_depth=1"}),
    ("--datasets", "datasets", {"type": _csv, "help": "comma list of nq,triviaqa,webquestions"}),
    ("--questions-per-dataset", "questions_per_dataset", {"type": int, "help": "first N each"}),
    ("--questions", "questions_file", {"help": "JSONL file with a 'question' per line"}),
    ("--skip-questions", "skip_questions", {"type": int, "help": "drop the first N (a shard)"}),
    ("--index", "index", {"help": "knowledge-base folder (default: the default index)"}),
    ("--filler", "filler", {"type": int, "help": "grow the index to N docs with filler"}),
    ("--transport", "transport",
     {"choices": TRANSPORTS, "help": "retriever transport (process: as serve runs it)"}),
    ("--cpus", "cpus", {"help": "pin this process and vLLM's engine to these cores (e.g. 12-15)"}),
    ("--retriever-cpus", "retriever_cpus",
     {"help": "with --transport process: the retriever child's cores (e.g. 0-11)"}),
    ("--chat", "chat",
     {"action": argparse.BooleanOptionalAction, "help": "questions through the chat template"}),
    ("--max-new-tokens", "max_new_tokens", {"type": int, "help": "answer length limit"}),
    ("--retrieval-stride", "retrieval_stride", {"type": int, "help": "tokens per retrieval"}),
    ("--warmup", "warmup", {"type": int, "help": "untimed questions per method"}),
    ("--reset-prefix-cache", "reset_prefix_cache",
     {"action": argparse.BooleanOptionalAction, "help": "empty the KV prefix cache per run"}),
    ("--prefix-caching", "prefix_caching",
     {"action": argparse.BooleanOptionalAction, "help": "vLLM prefix caching"}),
    ("--dtype", "dtype", {"help": "LM dtype (default: float32)"}),
    ("--time-budget-s", "time_budget_s", {"type": float, "help": "stop starting questions"}),
    ("--faiss-threads", "faiss_threads", {"type": int, "help": "FAISS OpenMP threads"}),
    ("--torch-threads", "torch_threads", {"type": int, "help": "torch threads (flat scan)"}),
    ("--loop-lag-ms", "loop_lag_ms",
     {"type": float, "help": "watch the event loop's lag every N ms (default: off)"}),
    ("--bm25-threads", "bm25_threads", {"type": int, "help": "BM25 search threads"}),
    ("--probe-bm25-threads", "probe_bm25_threads",
     {"type": lambda t: tuple(int(x) for x in t.split(",") if x),
      "help": "time BM25 searches at these thread counts first"}),
    ("--cache-scoring", "cache_scoring",
     {"choices": ("local", "retriever"), "help": "rank the cache here or by retriever score"}),
    ("--switch-interval-ms", "switch_interval_ms",
     {"type": float, "help": "Python GIL switch interval (default: Python's 5 ms)"}),
    ("--flat-impl", "flat_impl", {"choices": ("faiss", "torch"), "help": "flat search"}),
    ("--flat-device", "flat_device", {"choices": ("cpu", "cuda"), "help": "flat search device"}),
    ("--flat-dtype", "flat_dtype", {"choices": FLAT_DTYPES, "help": "torch flat matrix dtype"}),
    ("--flat-scan", "flat_scan",
     {"choices": FLAT_SCANS, "help": "torch flat scan (circular: searches overlap)"}),
    ("--flat-chunk-size", "flat_chunk_size",
     {"type": int, "help": "documents per chunk of the torch flat scan (default 1048576)"}),
    ("--ef-search", "hnsw_ef_search", {"type": int, "help": "HNSW efSearch"}),
    ("--nlist", "ivf_nlist", {"type": int, "help": "IVF lists (default: ~4 sqrt(docs))"}),
    ("--nprobe", "ivf_nprobe", {"type": int, "help": "IVF lists probed per query"}),
    ("--ivf-codec", "ivf_codec", {"choices": IVF_CODECS, "help": "IVF vector storage"}),
    ("--ivf-build", "ivf_build",
     {"choices": IVF_BUILDS, "help": "where an IVF build's k-means runs (auto: the GPU if any)"}),
    ("--ivf-probe-groups", "ivf_probe_groups",
     {"type": int, "help": "IVF: a query's lists in N groups on N threads"}),
    ("--save-index", "save_index",
     {"action": argparse.BooleanOptionalAction, "help": "save a built HNSW/IVF/BM25 index"}),
    ("--seed", "seed", {"type": int, "help": "engine seed"}),
    *output_flags("latency_<machine>_<model>_<backend>"),
)  # fmt: skip
QUICK: dict[str, Any] = {
    "model": "tiny-llama",
    "methods": ("baseline", "PSA"),
    "datasets": ("nq",),
    "questions_per_dataset": 2,
    "questions_file": None,
    "skip_questions": 0,
    "max_new_tokens": 24,
    "filler": None,
}
"""``--quick``: a smoke run (the tiny index is the default one: real passages only)."""


def parse_args(argv: Sequence[str] | None = None) -> LatencyConfig:
    return parse_config(LatencyConfig, _FLAGS, QUICK, __doc__, argv)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    # the cores the knowledge base may open on (``_on_cores``); without affinity calls
    # (not Linux) ``pin`` refuses --cpus with a clear error instead
    pinnable = cfg.cpus is not None and hasattr(os, "sched_getaffinity")
    everywhere = os.sched_getaffinity(0) if pinnable else None
    try:
        pin(cfg.cpus)  # before any thread or child exists: they inherit the cores
    except ValueError as exc:
        print(f"bench_latency: {exc}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    paths, rows = asyncio.run(run_benchmark(cfg, open_cores=everywhere))
    print(format_table(rows, TABLE_COLUMNS))
    for path in paths:
        print(f"wrote {path}")
    print(f"({len(rows)} rows in {time.perf_counter() - start:.0f} s)")
    if not all(row["outputs_identical"] for row in rows):
        bad = [f"{r['retriever']}/{r['method']}" for r in rows if not r["outputs_identical"]]
        print(f"ERROR: outputs differ from the baseline's in {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
