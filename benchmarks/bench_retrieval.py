"""Retrieval latency per batch size, backend and transport: the verification cost RaLMSpec pays.

Flow: open the real knowledge base (``--index`` or the default one) and, for the scale run,
a copy grown with synthetic filler to ``--filler`` documents in total (built once into the
cache dir, reused afterwards). For each corpus size and each backend (flat on the CPU, plus
the torch flat path on CUDA when a GPU exists, HNSW, IVF-Flat, BM25) the retriever is opened
(building its index the first time, timed), then every batch size is timed

- ``inproc``: ``retriever.search(texts, k)`` in this process; dense backends time the
  encoder and the index search separately (``encode_ms_*`` columns), the latency is the sum;
- ``grpc``: the same text queries through ``RetrieverClient.search`` against a real server
  on 127.0.0.1 (an OS-chosen port) in a child process (``--server thread`` for an in-process
  server thread), with the cross-request batch window set by ``--batch-window-ms``.

Queries are real open-domain questions (``--questions nq``), a different slice per call.
Each cell runs ``--warmup`` untimed calls, then up to ``--reps`` timed ones within
``--cell-budget-s``. Results: ``benchmarks/results/retrieval_<machine>.json`` (rows + run
metadata) and a PNG next to it; a fixed-width table is printed at the end. The JSON is
rewritten after every index open and every timed cell (``meta.complete`` false,
``meta.cells_done`` of ``meta.cells_total``), so a run stopped by ``timeout`` keeps every
finished cell; the last write sets ``complete`` true and draws the PNG.

Threads: on a small or shared CPU run it with ``OMP_NUM_THREADS=1`` (the child server
inherits it). With two torch threads on two busy cores, every OpenMP barrier in the MiniLM
forward pass waits for a descheduled thread: one query encode was measured at 250-1000 ms
instead of 70-85 ms single-threaded. The JSON records the thread settings.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python benchmarks/bench_retrieval.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cli import OutputConfig, output_flags, parse_config
from benchmarks.common import (
    RepeatPolicy,
    Writer,
    describe_machine,
    format_table,
    progress,
    run_metadata,
)
from benchmarks.corpora import Corpus, open_corpora
from benchmarks.retrieval_report import TABLE_COLUMNS, Results, cell_row, plot_rows
from benchmarks.retrieval_timing import (
    IndexParams,
    Queries,
    Row,
    Variant,
    describe_params,
    retriever_config,
    time_grpc_server,
    time_inproc,
)
from ralmspec_vllm.retrieval.encoder import MEMO_ENV
from ralmspec_vllm.retrieval.factory import IVF_CODECS
from ralmspec_vllm.retrieval.flat import DTYPES as FLAT_DTYPES

logger = logging.getLogger("bench_retrieval")

BACKENDS = ("flat", "hnsw", "ivf", "bm25")
TRANSPORTS = ("inproc", "grpc")
SIZES = ("real", "filler")


@dataclass(frozen=True)
class BenchConfig(OutputConfig):
    """What ``bench_retrieval`` measures and how (one field per CLI flag).

    ``name`` (from ``OutputConfig``) defaults to ``retrieval_<machine-tag>``.
    """

    backends: tuple[str, ...] = BACKENDS
    """Backends to time; ``flat`` also runs the torch path on CUDA when a GPU exists."""
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 64)
    """Queries per search call."""
    sizes: tuple[str, ...] = SIZES
    """``real`` (the knowledge base as built) and/or ``filler`` (grown to ``filler_total``)."""
    filler_total: int = 1_000_000
    """Total documents (real + synthetic filler) of the scale run."""
    transports: tuple[str, ...] = TRANSPORTS
    """``inproc`` (direct call) and/or ``grpc`` (real server on loopback)."""
    k: int = 10
    """Hits per query."""
    reps: int = 20
    """Most timed calls per cell."""
    warmup: int = 1
    """Untimed calls before timing each cell."""
    cell_budget_s: float = 4.0
    """Stop timing a cell after this much timed work (at least 3 calls)."""
    questions: str = "nq"
    """Question set (nq, triviaqa, webquestions) or a text file with one query per line."""
    index: str | None = None
    """Real knowledge-base folder; ``None``: the default index."""
    filler_index: str | None = None
    """Where the filler knowledge base lives; ``None``: inside the cache dir."""
    server: str = "process"
    """gRPC server placement: ``process`` (child process) or ``thread``."""
    batch_window_ms: float = 0.0
    """Server cross-request batch window (0: a lone client never waits)."""
    flat_impls: tuple[str, ...] = ("faiss", "torch")
    """Flat search implementations timed on the CPU (``faiss`` IndexFlatIP, ``torch`` matmul)."""
    flat_dtypes: tuple[str, ...] = ("float32",)
    """Matrix dtypes of the torch flat cells, CPU and CUDA (``retrieval.flat.DTYPES``); one
    variant each. FAISS flat is float32 only."""
    cuda: bool = True
    """Also time flat search on CUDA (torch path) when a GPU exists."""
    hnsw_m: int = 32
    """HNSW M (paper: 64). 32 keeps the one-time 1M-doc build within minutes on 2 cores."""
    ef_construction: int = 40
    """HNSW efConstruction (paper: 40)."""
    ef_search: int = 128
    """HNSW efSearch."""
    nlist: int | None = None
    """IVF lists; ``None``: min(4 sqrt(N), ``max_auto_nlist``) per corpus size."""
    max_auto_nlist: int = 1024
    """Cap of the automatic nlist (k-means training time grows with nlist on a CPU)."""
    nprobe: int = 16
    """IVF lists probed per query."""
    ivf_codec: str = "flat"
    """IVF codes: ``flat`` (float32) or ``sq8`` (8-bit, a quarter of the memory: what fits
    beside a 21M-document knowledge base)."""
    save_index: bool = True
    """Save built HNSW, IVF and BM25 indexes into the knowledge base for later runs."""
    ivf_probe_groups: tuple[int, ...] = (1,)
    """IVF variants by probe groups (``RetrieverConfig.ivf_probe_groups``; 1: FAISS's own
    one-core search of a query, label ``ivf``; n: label ``ivf-g<n>``), over one opened index."""
    bm25_threads: tuple[int, ...] = (0,)
    """BM25 search threads, one variant each (0: every core, label ``bm25``; n: label
    ``bm25-t<n>``). Consecutive BM25 variants share one opened index (``set_threads``): at
    21M documents it is built in memory once, not once per setting."""

    def __post_init__(self) -> None:
        for name, allowed in (
            ("backends", BACKENDS),
            ("transports", TRANSPORTS),
            ("sizes", SIZES),
        ):
            values = getattr(self, name)
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"{name}: must be a non-empty subset of {allowed}, got {values}")
        if not self.flat_impls or any(i not in ("faiss", "torch") for i in self.flat_impls):
            raise ValueError(
                f"flat_impls: must be a non-empty subset of faiss,torch, got {self.flat_impls}"
            )
        if not self.flat_dtypes or any(d not in FLAT_DTYPES for d in self.flat_dtypes):
            raise ValueError(
                f"flat_dtypes: must be a non-empty subset of {FLAT_DTYPES}, got {self.flat_dtypes}"
            )
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError(f"batch_sizes: must be positive, got {self.batch_sizes}")
        for name in ("filler_total", "k", "reps", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")
        if not self.cell_budget_s > 0:
            raise ValueError(f"cell_budget_s: must be > 0, got {self.cell_budget_s}")
        if self.server not in ("process", "thread"):
            raise ValueError(f"server: must be 'process' or 'thread', got {self.server!r}")
        if not self.batch_window_ms >= 0:
            raise ValueError(f"batch_window_ms: must be >= 0, got {self.batch_window_ms}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist: must be >= 1, got {self.nlist}")
        if self.ivf_codec not in IVF_CODECS:
            raise ValueError(f"ivf_codec: must be one of {IVF_CODECS}, got {self.ivf_codec!r}")
        if not self.ivf_probe_groups or min(self.ivf_probe_groups) < 1:
            raise ValueError(f"ivf_probe_groups: must be >= 1, got {self.ivf_probe_groups}")
        if not self.bm25_threads or min(self.bm25_threads) < 0:
            raise ValueError(f"bm25_threads: must be >= 0 (0: every core), got {self.bm25_threads}")

    @property
    def policy(self) -> RepeatPolicy:
        return RepeatPolicy(
            reps=self.reps,
            warmup=self.warmup,
            budget_s=self.cell_budget_s,
            min_reps=min(3, self.reps),
        )

    def index_params(self, num_docs: int) -> IndexParams:
        """ANN parameters at a corpus size (the automatic nlist depends on it)."""
        auto = min(round(4 * math.sqrt(num_docs)), self.max_auto_nlist)
        nlist = max(1, min(num_docs, self.nlist if self.nlist is not None else auto))
        return IndexParams(
            self.hnsw_m,
            self.ef_construction,
            self.ef_search,
            nlist,
            self.nprobe,
            self.ivf_codec,
            self.save_index,
        )

    def variants(self, cuda_available: bool) -> list[Variant]:
        out: list[Variant] = []
        for backend in self.backends:
            if backend == "bm25":
                out += [Variant(backend, threads=t or None) for t in self.bm25_threads]
                continue
            if backend == "ivf":
                out += [Variant(backend, probe_groups=g) for g in self.ivf_probe_groups]
                continue
            if backend != "flat":
                out.append(Variant(backend))
                continue
            if "faiss" in self.flat_impls:
                out.append(Variant("flat", "cpu", "faiss"))
            if "torch" in self.flat_impls:
                out += [Variant("flat", "cpu", "torch", dtype) for dtype in self.flat_dtypes]
            if self.cuda and cuda_available:
                out += [Variant("flat", "cuda", "torch", dtype) for dtype in self.flat_dtypes]
        return out


# -- the run --------------------------------------------------------------------------------


def artifact_names(corpus: Corpus) -> set[str]:
    root = corpus.kb.path / "artifacts"
    return {p.name for p in root.iterdir()} if root.is_dir() else set()


REUSED = ("bm25", "ivf")
"""Backends whose variants differ only in a search-time setting (BM25's threads, IVF's probe
groups): consecutive ones share one opened index (at 21M documents each build is minutes)."""


def bench_variant(
    cfg: BenchConfig,
    corpus: Corpus,
    variant: Variant,
    queries: Queries,
    machine_tag: str,
    results: Results,
    previous: Any = None,
) -> Any:
    """Open one (corpus, variant) and time its cells, adding the opening record (how long,
    what it built) and every cell's row to ``results`` as soon as they exist. A BM25 or IVF
    variant reuses ``previous`` (the retriever the previous variant of its backend opened
    on this corpus), changing only its search setting, and returns its retriever for the
    next variant; others return None."""
    from ralmspec_vllm.retrieval.factory import open_retriever

    rcfg = retriever_config(variant, cfg.index_params(corpus.size))
    before = artifact_names(corpus)
    start = time.perf_counter()
    reused = previous is not None and previous.backend == variant.backend
    if reused:
        retriever = previous
    else:
        # In this process BM25's threads are set on the index alone: the config's
        # ``threads`` would also set torch's for every later variant (a child server
        # started with ``rcfg`` gets them all).
        in_process = rcfg if variant.backend != "bm25" else dataclasses.replace(rcfg, threads=None)
        retriever = open_retriever(corpus.kb, in_process)
    if variant.backend == "bm25":
        retriever.index.set_threads(variant.threads)
    if variant.backend == "ivf":
        retriever.probe_groups = variant.probe_groups
    opened: Row = {
        "what": f"open {variant.label}",
        "corpus_size": corpus.size,
        "seconds": round(time.perf_counter() - start, 2),
        "built": sorted(artifact_names(corpus) - before),
        "index_params": describe_params(rcfg),
    }
    if variant.backend in REUSED:
        opened["reused"] = reused
    logger.info("%s on %d docs opened in %.1f s", variant.label, corpus.size, opened["seconds"])
    results.add_build(opened)
    base = {
        "machine": machine_tag,
        "backend": variant.label,
        "device": variant.device,
        "corpus_size": corpus.size,
        "num_real_docs": corpus.num_real_docs,
        "k": cfg.k,
        "index_params": opened["index_params"],
    }
    if variant.backend == "bm25":  # the threads the in-process cells ran on
        base["search_threads"] = retriever.index.threads
        base["shards"] = retriever.index.shards
    if variant.backend == "ivf":
        base["probe_groups"] = variant.probe_groups
    if "inproc" in cfg.transports:
        for b in progress(cfg.batch_sizes, desc=f"{variant.label}@{corpus.size} inproc"):
            cell = time_inproc(retriever, queries, b, cfg.k, cfg.policy)
            results.add_row(cell_row(base, "inproc", b, cell))
    if "grpc" in cfg.transports:
        logger.info("timing %s over gRPC (server in a %s)", variant.label, cfg.server)
        time_grpc_server(
            retriever,
            corpus.kb.path,
            rcfg,
            server=cfg.server,
            batch_window_ms=cfg.batch_window_ms,
            queries=queries,
            batch_sizes=cfg.batch_sizes,
            k=cfg.k,
            policy=cfg.policy,
            on_cell=lambda b, cell: results.add_row(cell_row(base, "grpc", b, cell)),
        )
    if variant.backend in REUSED:
        return retriever
    del retriever
    gc.collect()
    return None


def load_queries(spec: str, limit: int = 5000) -> Queries:
    path = Path(spec)
    if path.is_file():
        lines = path.read_text().split("\n")
        return Queries([line.strip() for line in lines if line.strip()][:limit])
    from ralmspec_vllm.questions import load_questions

    return Queries([q.text for q in load_questions(spec, limit)])


def run_benchmark(cfg: BenchConfig, on_write: Writer | None = None) -> tuple[Path, list[Row]]:
    """Measure everything ``cfg`` asks for, rewriting the JSON as cells finish (``on_write``
    after each write); draw the PNG at the end; return the JSON's path and the rows.

    The encoder's memo of recent texts is off meanwhile (``MEMO_ENV``, inherited by child
    servers): cells and variants cycle through the same questions, and a memo hit would
    time a dictionary lookup instead of an encoder pass."""
    with _environment(MEMO_ENV, "0"):
        return _run_benchmark(cfg, on_write)


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _run_benchmark(cfg: BenchConfig, on_write: Writer | None) -> tuple[Path, list[Row]]:
    machine = describe_machine()
    queries = load_queries(cfg.questions)
    params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out_dir", "name")}
    params["num_queries"] = len(queries.texts)
    meta = run_metadata("bench_retrieval", params, machine)  # git state of the code run
    corpora, builds = open_corpora(cfg.index, cfg.filler_index, cfg.sizes, cfg.filler_total)
    meta["corpora"] = [c.describe() for c in corpora]
    variants = cfg.variants(cuda_available=machine.gpu_count > 0)
    cells = len(corpora) * len(variants) * len(cfg.transports) * len(cfg.batch_sizes)
    name = cfg.name or f"retrieval_{machine.tag}"
    results = Results(name, meta, cfg.out_dir, cells, builds, on_write=on_write)
    results.write()
    for corpus in corpora:
        previous = None
        for variant in variants:
            if previous is not None and previous.backend != variant.backend:
                previous = None  # free its index before the next one is built
                gc.collect()
            previous = bench_variant(cfg, corpus, variant, queries, machine.tag, results, previous)
        del previous
        gc.collect()
    path = results.write(complete=True)
    if cfg.plot:
        plot_rows(results.rows, path.with_suffix(".png"), machine.tag)
    return path, results.rows


def _csv(kind: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    return lambda text: tuple(kind(x) for x in text.split(",") if x)


_DTYPES = ",".join(FLAT_DTYPES)

# (flag, BenchConfig field, argparse keywords): defaults come from BenchConfig.
_FLAGS: tuple[tuple[str, str, Row], ...] = (
    ("--backends", "backends", {"type": _csv(str), "help": "comma list of flat,hnsw,ivf,bm25"}),
    ("--batch-sizes", "batch_sizes", {"type": _csv(int), "help": "comma list of batch sizes"}),
    ("--sizes", "sizes", {"type": _csv(str), "help": "comma list of real,filler"}),
    ("--filler", "filler_total", {"type": int, "help": "total docs of the filler corpus"}),
    ("--transports", "transports", {"type": _csv(str), "help": "comma list of inproc,grpc"}),
    ("--k", "k", {"type": int, "help": "hits per query"}),
    ("--reps", "reps", {"type": int, "help": "most timed calls per cell"}),
    ("--warmup", "warmup", {"type": int, "help": "untimed calls per cell"}),
    ("--cell-budget-s", "cell_budget_s", {"type": float, "help": "timing budget per cell"}),
    ("--questions", "questions", {"help": "nq|triviaqa|webquestions or a file, one query a line"}),
    ("--index", "index", {"help": "real knowledge-base folder (default: the default index)"}),
    ("--filler-index", "filler_index", {"help": "filler knowledge base (default: cache dir)"}),
    ("--server", "server", {"choices": ("process", "thread"), "help": "gRPC server placement"}),
    ("--batch-window-ms", "batch_window_ms", {"type": float, "help": "server batch window"}),
    ("--flat-impls", "flat_impls", {"type": _csv(str), "help": "CPU flat: faiss,torch"}),
    ("--flat-dtypes", "flat_dtypes", {"type": _csv(str), "help": f"torch flat: {_DTYPES}"}),
    ("--cuda", "cuda", {"action": argparse.BooleanOptionalAction, "help": "flat on CUDA too"}),
    ("--hnsw-m", "hnsw_m", {"type": int, "help": "HNSW M"}),
    ("--ef-construction", "ef_construction", {"type": int, "help": "HNSW efConstruction"}),
    ("--ef-search", "ef_search", {"type": int, "help": "HNSW efSearch"}),
    ("--nlist", "nlist", {"type": int, "help": "IVF lists (default: min(4 sqrt N, 1024))"}),
    ("--nprobe", "nprobe", {"type": int, "help": "IVF lists probed per query"}),
    ("--ivf-codec", "ivf_codec", {"choices": IVF_CODECS, "help": "IVF codes (sq8: 8-bit)"}),
    (
        "--save-index",
        "save_index",
        {"action": argparse.BooleanOptionalAction, "help": "save built indexes into the KB"},
    ),
    (
        "--ivf-probe-groups",
        "ivf_probe_groups",
        {"type": _csv(int), "help": "IVF variants: a query's lists in N groups on N threads"},
    ),
    ("--bm25-threads", "bm25_threads", {"type": _csv(int), "help": "BM25 threads, 0 = all"}),
    *output_flags("retrieval_<machine-tag>"),
)
QUICK: dict[str, Any] = {
    "sizes": ("real",),
    "batch_sizes": (1, 8),
    "reps": 3,
    "warmup": 1,
    "cell_budget_s": 1.0,
}


def parse_args(argv: Sequence[str] | None = None) -> BenchConfig:
    return parse_config(BenchConfig, _FLAGS, QUICK, __doc__, argv)


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    start = time.perf_counter()
    path, rows = run_benchmark(cfg)
    key = ("corpus_size", "backend", "transport", "batch_size")
    print(format_table(sorted(rows, key=lambda r: [r[c] for c in key]), TABLE_COLUMNS))
    print(f"\nwrote {path} ({len(rows)} rows) in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
