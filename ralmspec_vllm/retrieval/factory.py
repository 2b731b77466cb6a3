"""Pick and open a retrieval backend from one typed config (shared by CLI, server, benchmarks).

``RetrieverConfig`` names the backend and its parameters; ``add_retriever_arguments`` puts
the same fields on an ``argparse`` parser (defaults taken from the dataclass) and
``config_from_args`` builds the config back, so every command spells the flags the same way.
``open_retriever`` opens the knowledge base if given a path and returns the backend, loading
its saved index from the knowledge base's artefact directory or building it once.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING

from ralmspec_vllm.retrieval.analyzer import Analyzer
from ralmspec_vllm.retrieval.ann import IVF_BUILDS, IVF_CODECS, ivf_build_device
from ralmspec_vllm.retrieval.base import Retriever
from ralmspec_vllm.retrieval.flat import DEVICES, DTYPES, IMPLS, LAYOUTS, SCANS
from ralmspec_vllm.types import BM25Params

if TYPE_CHECKING:
    from ralmspec_vllm.retrieval.kb import KnowledgeBase

BACKENDS = ("flat", "hnsw", "ivf", "bm25")


@dataclass(frozen=True, slots=True)
class RetrieverConfig:
    """Which retrieval backend to serve and how."""

    backend: str = "flat"
    """``flat`` (exact dense), ``hnsw`` / ``ivf`` (approximate dense) or ``bm25`` (sparse)."""
    device: str = "auto"
    """Flat search device: ``auto`` (GPU when present), ``cpu`` or ``cuda``. ANN and BM25
    always run on the CPU."""
    flat_impl: str = "faiss"
    """Flat candidate generator: ``faiss`` (IndexFlatIP) or ``torch`` (matmul + topk)."""
    dtype: str = "float32"
    """Matrix dtype of the torch flat search: ``bfloat16`` / ``float16`` halve the memory and
    make a batch of 4-16 queries cost about one on CPUs with AMX; results stay exact (wider
    candidate sets, re-scored in float64)."""
    flat_layout: str = "auto"
    """Torch flat matrix layout on the CPU in bfloat16: ``packed`` (oneDNN, fastest up to ~64
    queries a search), ``plain``, ``both`` (packed for small searches, plain for the large
    merged batches of a busy server; twice the memory) or ``auto`` (packed where possible)."""
    flat_scan: str = "batch"
    """Torch flat scan: ``batch`` (each search walks the matrix) or ``circular`` (one shared
    walk that searches board at any chunk and leave after a full turn: concurrent searches
    never wait for each other: for ``overlap_depth="pipeline"``)."""
    flat_chunk_size: int = 1 << 20
    """Documents per chunk of the torch flat scan. A circular scan's search boards at a chunk
    boundary and its thread runs a handful of tensor ops per chunk; in the LM's own process
    each op may wait for the GIL, so larger chunks mean fewer waits (and a longer wait to
    board)."""
    candidate_margin: int = 16
    """Extra candidates a dense index proposes beyond k before exact re-scoring."""
    hnsw_m: int = 64
    """HNSW graph degree M (paper: 64)."""
    ef_construction: int = 40
    """HNSW efConstruction (paper: 40)."""
    ef_search: int = 128
    """HNSW efSearch (raised to k + margin when smaller)."""
    nlist: int | None = None
    """IVF inverted lists; ``None``: about 4 sqrt(N)."""
    nprobe: int = 16
    """IVF lists visited per query."""
    ivf_codec: str = "flat"
    """How IVF stores vectors: ``flat`` (float32, IVF-Flat) or ``sq8`` (8-bit scalar
    quantizer: a quarter of the memory and disk, 8 GB at 21M docs instead of 32; candidates
    are re-scored exactly either way, so only recall can differ)."""
    ivf_build: str = "auto"
    """Where an IVF build's k-means and list assignment run (``ann.IVF_BUILDS``): ``faiss``
    on the CPU, ``cuda`` in torch on the GPU (seconds where FAISS takes minutes at 21M
    docs; the index and its search are FAISS's either way), ``auto``: the GPU if there is
    one. Loading a saved index needs the same choice it was built with."""
    ivf_probe_groups: int = 1
    """Search each IVF query's probed lists in this many groups on as many threads and
    merge them (``IVFFlatRetriever._candidates``): FAISS gives a single query one core.
    1: FAISS's own search."""
    bm25_k1: float = 1.5
    """BM25 term-frequency saturation (rank-bm25 default)."""
    bm25_b: float = 0.75
    """BM25 length normalisation (rank-bm25 default)."""
    bm25_epsilon: float = 0.25
    """BM25 floor for negative idf, as a fraction of the mean idf (rank-bm25 default)."""
    bm25_stopwords: bool = True
    """Drop English stopwords in the BM25 analyzer (documents and queries)."""
    rebuild: bool = False
    """Rebuild a saved index (HNSW, IVF, BM25) even if one exists."""
    save_index: bool = True
    """Save a built index (HNSW, IVF, BM25) into the knowledge base for later starts. Off
    where nothing will start again from this disk (a lent GPU machine): writing a 21M-doc
    index costs ~20-60 s and ~8-19 GB."""
    progress: bool = True
    """Show progress bars while building indexes."""
    threads: int | None = None
    """Search threads of this process (torch intra-op, FAISS OpenMP, BM25's shard pool), set
    when the retriever opens; ``None``: their defaults (every core). Fewer leave cores to a
    vLLM engine on the same machine while a memory-bound flat scan runs."""

    def __post_init__(self) -> None:
        choices = {
            "backend": BACKENDS,
            "device": DEVICES,
            "flat_impl": IMPLS,
            "dtype": DTYPES,
            "flat_layout": LAYOUTS,
            "flat_scan": SCANS,
            "ivf_codec": IVF_CODECS,
            "ivf_build": IVF_BUILDS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: must be one of {allowed}, got {getattr(self, name)!r}")
        if self.flat_impl == "faiss" and self.dtype != "float32":
            raise ValueError(f"dtype: {self.dtype} needs flat_impl='torch'")
        if self.flat_layout in ("packed", "both") and (
            self.flat_impl != "torch" or self.dtype != "bfloat16"
        ):
            raise ValueError(
                f"flat_layout: {self.flat_layout} needs flat_impl='torch' and dtype='bfloat16'"
            )
        if self.flat_scan == "circular" and self.flat_impl != "torch":
            raise ValueError("flat_scan: circular needs flat_impl='torch'")
        for name in ("hnsw_m", "ef_construction"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name}: must be >= 2, got {getattr(self, name)}")
        for name in ("ef_search", "nprobe", "flat_chunk_size", "ivf_probe_groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads: must be >= 1, got {self.threads}")
        if self.nlist is not None and self.nlist < 1:
            raise ValueError(f"nlist: must be >= 1, got {self.nlist}")
        if self.candidate_margin < 0:
            raise ValueError(f"candidate_margin: must be >= 0, got {self.candidate_margin}")
        if self.bm25_k1 < 0:
            raise ValueError(f"bm25_k1: must be >= 0, got {self.bm25_k1}")
        if not 0.0 <= self.bm25_b <= 1.0:
            raise ValueError(f"bm25_b: must be in [0, 1], got {self.bm25_b}")
        if self.bm25_epsilon < 0:
            raise ValueError(f"bm25_epsilon: must be >= 0, got {self.bm25_epsilon}")

    @property
    def bm25_params(self) -> BM25Params:
        return BM25Params(k1=self.bm25_k1, b=self.bm25_b, epsilon=self.bm25_epsilon)

    @property
    def analyzer(self) -> Analyzer:
        return Analyzer(stopwords=self.bm25_stopwords)


def open_retriever(kb: KnowledgeBase | str | Path, config: RetrieverConfig) -> Retriever:
    """The configured backend over ``kb`` (a ``KnowledgeBase`` or its directory)."""
    if isinstance(kb, str | Path):
        from ralmspec_vllm.retrieval.kb import KnowledgeBase

        kb = KnowledgeBase.open(kb)
    if config.threads is not None:
        set_search_threads(config.threads)
    margin = config.candidate_margin
    if config.backend == "flat":
        from ralmspec_vllm.retrieval.flat import FlatRetriever

        return FlatRetriever.from_kb(
            kb,
            impl=config.flat_impl,
            device=config.device,
            dtype=config.dtype,
            layout=config.flat_layout,
            scan=config.flat_scan,
            chunk_size=config.flat_chunk_size,
            candidate_margin=margin,
            progress=config.progress,
        )
    if config.backend == "hnsw":
        from ralmspec_vllm.retrieval.ann import HNSWRetriever

        return HNSWRetriever.from_kb(
            kb,
            m=config.hnsw_m,
            ef_construction=config.ef_construction,
            ef_search=config.ef_search,
            candidate_margin=margin,
            progress=config.progress,
            rebuild=config.rebuild,
            save=config.save_index,
        )
    if config.backend == "ivf":
        from ralmspec_vllm.retrieval.ann import IVFFlatRetriever

        return IVFFlatRetriever.from_kb(
            kb,
            nlist=config.nlist,
            nprobe=config.nprobe,
            codec=config.ivf_codec,
            probe_groups=config.ivf_probe_groups,
            build_device=ivf_build_device(config.ivf_build),
            candidate_margin=margin,
            progress=config.progress,
            rebuild=config.rebuild,
            save=config.save_index,
        )
    from ralmspec_vllm.retrieval.bm25 import BM25Retriever

    return BM25Retriever.from_kb(
        kb,
        params=config.bm25_params,
        analyzer=config.analyzer,
        rebuild=config.rebuild,
        progress=config.progress,
        save=config.save_index,
        threads=config.threads,
    )


def set_search_threads(threads: int) -> None:
    """Torch intra-op and FAISS OpenMP threads of this process (process-wide)."""
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss
    except ImportError:  # BM25-only installs
        return
    faiss.omp_set_num_threads(threads)


def add_retriever_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--backend``, ``--device``, ... (one flag per ``RetrieverConfig`` field)."""
    group = parser.add_argument_group("retriever")
    for f in fields(RetrieverConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = "auto" if default is None else default
        help_text = f"{_FIELD_HELP.get(f.name, '')} (default: {shown})"
        if isinstance(default, bool):
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=help_text
            )
        elif f.name in _CHOICES:
            group.add_argument(flag, choices=_CHOICES[f.name], default=default, help=help_text)
        else:
            kind = float if isinstance(default, float) else int
            group.add_argument(flag, type=kind, default=default, help=help_text)


def config_to_args(config: RetrieverConfig) -> list[str]:
    """The flags that make ``config_from_args`` give back ``config`` (only non-defaults):
    how a parent process hands its retriever settings to a ``retriever serve`` child."""
    args: list[str] = []
    for f in fields(RetrieverConfig):
        value = getattr(config, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args.append(f"{flag}={value}")
    return args


def config_from_args(args: argparse.Namespace) -> RetrieverConfig:
    """The ``RetrieverConfig`` described by flags added with ``add_retriever_arguments``."""
    return RetrieverConfig(**{f.name: getattr(args, f.name) for f in fields(RetrieverConfig)})


_CHOICES = {
    "backend": BACKENDS,
    "device": DEVICES,
    "flat_impl": IMPLS,
    "dtype": DTYPES,
    "flat_layout": LAYOUTS,
    "flat_scan": SCANS,
    "ivf_codec": IVF_CODECS,
    "ivf_build": IVF_BUILDS,
}

_FIELD_HELP = {
    "backend": "retrieval backend",
    "device": "flat search device",
    "flat_impl": "flat search implementation",
    "dtype": "torch flat matrix dtype",
    "flat_layout": "torch flat matrix layout (packed: small batches, both: a busy server)",
    "flat_scan": "torch flat scan (circular: searches share one never-ending walk)",
    "flat_chunk_size": "documents per chunk of the torch flat scan",
    "candidate_margin": "extra dense candidates re-scored beyond k",
    "hnsw_m": "HNSW M",
    "ef_construction": "HNSW efConstruction",
    "ef_search": "HNSW efSearch",
    "nlist": "IVF lists; auto = about 4 sqrt(N)",
    "nprobe": "IVF lists probed per query",
    "ivf_codec": "IVF vector storage (sq8: 8-bit, a quarter of the memory)",
    "ivf_build": "where an IVF build's k-means runs (cuda: torch on the GPU; auto: GPU if any)",
    "ivf_probe_groups": "search a query's IVF lists in this many groups on as many threads",
    "bm25_k1": "BM25 k1",
    "bm25_b": "BM25 b",
    "bm25_epsilon": "BM25 idf floor epsilon",
    "bm25_stopwords": "drop English stopwords in BM25",
    "rebuild": "rebuild saved indexes",
    "save_index": "save a built index (HNSW, IVF, BM25) into the knowledge base",
    "progress": "show build progress bars",
    "threads": "torch/FAISS/BM25 search threads of the retriever process; auto = every core",
}
