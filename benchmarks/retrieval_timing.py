"""Timing one retriever: in-process calls and calls through a real loopback gRPC server.

``bench_retrieval`` decides what to measure; this module measures one (corpus, retriever)
pair. ``Variant`` names a backend on a device, ``retriever_config`` turns it into the
project's ``RetrieverConfig`` and ``config_flags`` into the ``retriever serve`` flags a child
server needs. ``time_inproc`` times ``encode`` and ``search_vectors`` separately for dense
backends (their sum is the latency of ``search``); ``time_grpc_server`` starts a server (child
process or thread) and times ``RetrieverClient.search`` with text queries, one channel for
all batch sizes, handing each finished cell to ``on_cell`` at once (the caller saves it).
Every cell is condensed to ``LatencyStats`` row fields.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import LatencyStats, RepeatPolicy, measure, measure_async
from ralmspec_vllm.retrieval.base import Retriever
from ralmspec_vllm.retrieval.factory import RetrieverConfig

Row = dict[str, Any]

CellDone = Callable[[int, Row], object]
"""``on_cell(batch_size, row)``: one timed cell, handed over as soon as it is finished."""


@dataclass(frozen=True, slots=True)
class Variant:
    """One retriever setup measured: a backend on a device with a flat implementation and
    (torch flat only) a matrix dtype; BM25 with a number of search threads (``None``: every
    core); IVF with its probed lists searched in ``probe_groups`` groups."""

    backend: str
    device: str = "cpu"
    flat_impl: str = "faiss"
    dtype: str = "float32"
    threads: int | None = None
    probe_groups: int = 1

    @property
    def label(self) -> str:
        """``flat`` (FAISS on the CPU), ``flat-torch`` (torch on the CPU), ``flat-cuda``...,
        suffixed with a non-float32 dtype (``flat-cuda-float16``)."""
        if self.device != "cpu":
            label = f"{self.backend}-{self.device}"
        elif self.flat_impl == "faiss":
            label = self.backend
        else:
            label = f"{self.backend}-{self.flat_impl}"
        if self.threads is not None:
            label = f"{label}-t{self.threads}"
        if self.probe_groups > 1:
            label = f"{label}-g{self.probe_groups}"
        return label if self.dtype == "float32" else f"{label}-{self.dtype}"


@dataclass(frozen=True, slots=True)
class IndexParams:
    """Approximate-index parameters shared by every variant of a run."""

    hnsw_m: int
    ef_construction: int
    ef_search: int
    nlist: int
    nprobe: int
    ivf_codec: str = "flat"
    save_index: bool = True
    """Save a built HNSW, IVF or BM25 index into the knowledge base (off where nothing
    starts again from this disk, or it lacks the room: 21M documents on a lent machine)."""


def retriever_config(variant: Variant, params: IndexParams) -> RetrieverConfig:
    return RetrieverConfig(
        backend=variant.backend,
        device=variant.device,
        flat_impl=variant.flat_impl,
        dtype=variant.dtype,
        hnsw_m=params.hnsw_m,
        ef_construction=params.ef_construction,
        ef_search=params.ef_search,
        nlist=params.nlist,
        nprobe=params.nprobe,
        ivf_codec=params.ivf_codec,
        ivf_probe_groups=variant.probe_groups,
        save_index=params.save_index,
        progress=True,
        threads=variant.threads,
    )


def config_flags(config: RetrieverConfig) -> list[str]:
    """``config`` as ``retriever serve`` flags (the names ``add_retriever_arguments`` uses)."""
    flags: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        flag = f.name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(f"--{flag}" if value else f"--no-{flag}")
        elif value is not None:
            flags += [f"--{flag}", str(value)]
    return flags


def describe_params(config: RetrieverConfig) -> str:
    """The parameters that shape a backend's latency, e.g. ``M=16,efC=40,efS=128``."""
    if config.backend == "hnsw":
        return f"M={config.hnsw_m},efC={config.ef_construction},efS={config.ef_search}"
    if config.backend == "ivf":
        codec = "" if config.ivf_codec == "flat" else f",{config.ivf_codec}"
        return f"nlist={config.nlist},nprobe={config.nprobe}{codec}"
    if config.backend == "bm25":
        return f"k1={config.bm25_k1},b={config.bm25_b}"
    return f"{config.flat_impl},{config.dtype}"


class Queries:
    """Cycles through query texts: call ``i`` at batch size ``b`` gets its own slice."""

    def __init__(self, texts: Sequence[str]) -> None:
        if not texts:
            raise ValueError("questions: no query texts")
        self.texts = list(texts)

    def batch(self, b: int, i: int) -> list[str]:
        n = len(self.texts)
        start = (i * b) % n
        return [self.texts[(start + j) % n] for j in range(b)]


def time_inproc(
    retriever: Retriever, queries: Queries, b: int, k: int, policy: RepeatPolicy
) -> Row:
    """One in-process cell; dense retrievers also report ``encode_ms_p50/p99``."""
    encode = getattr(retriever, "encode", None)
    search_vectors = getattr(retriever, "search_vectors", None)
    dense = encode is not None and search_vectors is not None
    encode_s: dict[int, float] = {}

    def call(i: int) -> None:
        texts = queries.batch(b, i)
        if encode is None or search_vectors is None:
            retriever.search(texts, k)
            return
        start = time.perf_counter()
        vectors = encode(texts)
        encode_s[i] = time.perf_counter() - start
        search_vectors(vectors, k)

    row: Row = dict(LatencyStats.from_seconds(measure(call, policy)).as_row())
    if dense:
        enc = LatencyStats.from_seconds([s for i, s in encode_s.items() if i >= policy.warmup])
        row.update(encode_ms_p50=round(enc.p50_ms, 3), encode_ms_p99=round(enc.p99_ms, 3))
    return row


async def time_client(
    target: str,
    queries: Queries,
    batch_sizes: Sequence[int],
    k: int,
    policy: RepeatPolicy,
    on_cell: CellDone | None = None,
) -> dict[int, Row]:
    """Every batch size against the server at ``target``, through one client channel."""
    from ralmspec_vllm.retrieval.client import RetrieverClient

    out: dict[int, Row] = {}
    async with RetrieverClient(target, timeout_s=600.0, max_retries=0) as client:
        await client.wait_ready(timeout_s=120.0)
        for b in batch_sizes:

            def call(i: int, b: int = b) -> Any:
                return client.search(queries.batch(b, i), k)

            samples = await measure_async(call, policy)
            out[b] = dict(LatencyStats.from_seconds(samples).as_row())
            if on_cell is not None:
                on_cell(b, out[b])
    return out


def time_grpc_server(
    retriever: Retriever,
    index: Path,
    config: RetrieverConfig,
    *,
    server: str,
    batch_window_ms: float,
    queries: Queries,
    batch_sizes: Sequence[int],
    k: int,
    policy: RepeatPolicy,
    on_cell: CellDone | None = None,
) -> dict[int, Row]:
    """Start a server (``process``: ``retriever serve`` child; ``thread``: serves
    ``retriever`` itself) on 127.0.0.1 with an OS-chosen port and time it (``on_cell``
    after each batch size)."""
    from ralmspec_vllm.retrieval.server import ServerProcess, ServerThread
    from ralmspec_vllm.retrieval.service import ServiceConfig

    def timed(target: str) -> dict[int, Row]:
        return asyncio.run(time_client(target, queries, batch_sizes, k, policy, on_cell))

    if server == "thread":
        service = ServiceConfig(batch_window_ms=batch_window_ms)
        with ServerThread(retriever, config=service) as thread:
            return timed(thread.target)
    args = ["--index", str(index), *config_flags(dataclasses.replace(config, progress=False))]
    args += ["--port", "0", "--batch-window-ms", str(batch_window_ms)]
    with ServerProcess.spawn(args, timeout_s=900.0) as child:
        return timed(child.target)
