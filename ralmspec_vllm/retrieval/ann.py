"""Approximate dense retrieval: FAISS HNSW and IVF-Flat, inner-product metric.

Each retriever wraps a FAISS index that proposes ``k + margin`` candidates; ``dense.py``
re-scores them with the exact ``inner_product`` and ranks them (score desc, doc id asc), so
recall depends on the index parameters but every reported score equals ``score``.

Indexes are built once and saved as ``index.faiss`` + ``index.json`` (parameters, corpus
size, a fingerprint of the vectors) in a directory named by the parameters, by default
``kb.artifact_dir("hnsw-M64-efc40")`` / ``kb.artifact_dir("ivf-nlist1024")``; the next start
loads it (search-time parameters, efSearch and nprobe, are not part of the name). Vectors
are added in chunks with a progress bar: a 1M-vector HNSW build takes minutes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ralmspec_vllm.retrieval.base import DocumentStore, IVFRouting
from ralmspec_vllm.retrieval.dense import DenseIndexRetriever, TextEncoder
from ralmspec_vllm.retrieval.validation import check_doc_ids

if TYPE_CHECKING:
    from ralmspec_vllm.retrieval.kb import KnowledgeBase

logger = logging.getLogger(__name__)

IVF_CODECS = ("flat", "sq8")
"""IVF vector storage: float32 (IVF-Flat) or FAISS's 8-bit scalar quantizer."""
IVF_BUILDS = ("auto", "faiss", "cuda")
"""Where an IVF index's k-means and list assignment run: FAISS on the CPU, torch on the GPU
(``retrieval/kmeans.py``), or ``auto``: the GPU where torch sees one."""


def ivf_build_device(build: str) -> str | None:
    """The torch device an ``IVF_BUILDS`` choice builds on; ``None``: FAISS on the CPU."""
    if build not in IVF_BUILDS:
        raise ValueError(f"ivf_build: must be one of {IVF_BUILDS}, got {build!r}")
    if build == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else None
    return None if build == "faiss" else build


INDEX_FILE = "index.faiss"
META_FILE = "index.json"
_ADD_CHUNK = 1 << 16


class _FaissANNRetriever(DenseIndexRetriever):
    """Shared load-or-build and candidate search of a saved FAISS index."""

    def __init__(
        self,
        vectors: np.ndarray,
        documents: DocumentStore | None,
        encoder: TextEncoder | None,
        *,
        index_path: Path | None,
        build_params: dict[str, Any],
        candidate_margin: int,
        progress: bool,
        rebuild: bool,
        save: bool = True,
    ) -> None:
        super().__init__(
            vectors,
            documents,
            encoder,
            candidate_margin=candidate_margin,
            index_dir=str(index_path.parent) if index_path else "",
        )
        self.build_params = build_params
        self._index = _load_or_build(
            index_path,
            {
                "backend": self.backend,
                **build_params,
                "num_docs": self.num_docs,
                "dim": self.dim,
                "fingerprint": _fingerprint(self._vectors),
            },
            lambda: self._build(progress),
            rebuild=rebuild,
            save=save,
        )

    def _build(self, progress: bool) -> Any:
        raise NotImplementedError

    def _candidates(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        # Per-call parameters, not index attributes: concurrent searches must not race.
        scores, ids = self._index.search(queries, count, params=self._search_params(count))
        return ids.astype(np.int64, copy=False), scores

    def _search_params(self, count: int) -> Any:
        raise NotImplementedError

    def _add_all(self, index: Any, desc: str, progress: bool) -> None:
        with tqdm(total=self.num_docs, unit="vec", desc=desc, disable=not progress) as bar:
            for start in range(0, self.num_docs, _ADD_CHUNK):
                block = self._vectors[start : start + _ADD_CHUNK]
                index.add(np.ascontiguousarray(block, dtype=np.float32))
                bar.update(len(block))

    def _extra_info(self) -> dict[str, str]:
        return {name: str(value) for name, value in self.build_params.items()}


class HNSWRetriever(_FaissANNRetriever):
    """``faiss.IndexHNSWFlat`` (inner product); paper defaults M=64, efConstruction=40."""

    backend = "hnsw"

    def __init__(
        self,
        vectors: np.ndarray,
        documents: DocumentStore | None = None,
        encoder: TextEncoder | None = None,
        *,
        m: int = 64,
        ef_construction: int = 40,
        ef_search: int = 128,
        index_path: Path | None = None,
        candidate_margin: int = 16,
        progress: bool = True,
        rebuild: bool = False,
        save: bool = True,
    ) -> None:
        for field, value in (("hnsw_m", m), ("ef_construction", ef_construction)):
            if value < 2:
                raise ValueError(f"{field}: must be >= 2, got {value}")
        if ef_search < 1:
            raise ValueError(f"ef_search: must be >= 1, got {ef_search}")
        self.m, self.ef_construction, self.ef_search = m, ef_construction, ef_search
        super().__init__(
            vectors,
            documents,
            encoder,
            index_path=index_path,
            build_params={"hnsw_m": m, "ef_construction": ef_construction},
            candidate_margin=candidate_margin,
            progress=progress,
            rebuild=rebuild,
            save=save,
        )

    @staticmethod
    def artifact_name(m: int = 64, ef_construction: int = 40) -> str:
        return f"hnsw-M{m}-efc{ef_construction}"

    @classmethod
    def from_kb(cls, kb: KnowledgeBase, **params: Any) -> HNSWRetriever:
        name = cls.artifact_name(params.get("m", 64), params.get("ef_construction", 40))
        path = Path(kb.artifact_dir(name)) / INDEX_FILE
        return cls(kb.embeddings(), kb.documents, kb.encoder(), index_path=path, **params)

    def _build(self, progress: bool) -> Any:
        import faiss

        index = faiss.IndexHNSWFlat(self.dim, self.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        self._add_all(index, f"hnsw M={self.m} efC={self.ef_construction}", progress)
        return index

    def _candidate_count(self, k: int, prefetch: int = 0) -> int:
        # The beam (efSearch) must not depend on k: a wider beam visits other nodes, so a
        # top-20 search (a prefetching verification) could rank a different top-1 than the
        # baseline's top-1 search and break token identity. The margin is therefore taken
        # from inside the fixed beam; only k > ef_search widens it (``RaLMEngine`` caps
        # prefetching at ef_search, ``prefetch_limit``).
        return min(super()._candidate_count(k, prefetch), max(self.ef_search, k))

    def _search_params(self, count: int) -> Any:
        import faiss

        # efSearch below the number of wanted results would silently shrink the result list.
        return faiss.SearchParametersHNSW(efSearch=max(self.ef_search, count))  # type: ignore[attr-defined]

    def _extra_info(self) -> dict[str, str]:
        return {**super()._extra_info(), "ef_search": str(self.ef_search)}


class IVFFlatRetriever(_FaissANNRetriever):
    """``faiss.IndexIVFFlat`` (inner product), k-means trained on a seeded sample; with
    ``codec="sq8"`` an ``IndexIVFScalarQuantizer`` (8 bits a dimension) instead, a quarter
    of the memory and disk: at 21M MiniLM vectors 8 GB instead of 32, which a 64 GB disk
    that already holds the knowledge base's 32 GB of vectors can take."""

    backend = "ivf"

    def __init__(
        self,
        vectors: np.ndarray,
        documents: DocumentStore | None = None,
        encoder: TextEncoder | None = None,
        *,
        nlist: int | None = None,
        nprobe: int = 16,
        codec: str = "flat",
        train_size: int | None = None,
        seed: int = 1234,
        index_path: Path | None = None,
        candidate_margin: int = 16,
        progress: bool = True,
        rebuild: bool = False,
        save: bool = True,
        probe_groups: int = 1,
        build_device: str | None = None,
    ) -> None:
        """``build_device``: a torch device (``"cuda"``) that trains the lists' centroids and
        assigns the vectors to them (``retrieval/kmeans.py``), instead of FAISS on the CPU;
        the index and its search are FAISS's either way."""
        nlist = default_nlist(len(vectors)) if nlist is None else nlist
        if probe_groups < 1:
            raise ValueError(f"probe_groups: must be >= 1, got {probe_groups}")
        self.probe_groups = probe_groups
        self._group_pool: ThreadPoolExecutor | None = None
        self._group_pool_size = 0
        if not 1 <= nlist <= len(vectors):
            raise ValueError(f"nlist: must be in [1, {len(vectors)}], got {nlist}")
        if nprobe < 1:
            raise ValueError(f"nprobe: must be >= 1, got {nprobe}")
        if codec not in IVF_CODECS:
            raise ValueError(f"codec: must be one of {IVF_CODECS}, got {codec!r}")
        self.nlist, self.nprobe, self.seed, self.codec = nlist, nprobe, seed, codec
        self._routing: IVFRouting | None = None
        self._doc_lists: np.ndarray | None = None
        self._routing_lock = threading.Lock()
        self.build_device = build_device
        self.train_size = min(len(vectors), train_size or max(64 * nlist, 10_000))
        build_params: dict[str, Any] = {"nlist": nlist, "train_size": self.train_size, "seed": seed}
        if codec != "flat":  # a flat index's parameters stay as saved before codecs existed
            build_params["codec"] = codec
        if build_device is not None:  # other centroids: not the index FAISS's k-means makes
            build_params["trainer"] = "torch"
        super().__init__(
            vectors,
            documents,
            encoder,
            index_path=index_path,
            build_params=build_params,
            candidate_margin=candidate_margin,
            progress=progress,
            rebuild=rebuild,
            save=save,
        )

    @staticmethod
    def artifact_name(nlist: int, codec: str = "flat") -> str:
        return f"ivf-nlist{nlist}" if codec == "flat" else f"ivf-nlist{nlist}-{codec}"

    @classmethod
    def from_kb(cls, kb: KnowledgeBase, **params: Any) -> IVFFlatRetriever:
        nlist = params.get("nlist") or default_nlist(len(kb))
        codec = params.get("codec", "flat")
        path = Path(kb.artifact_dir(cls.artifact_name(nlist, codec))) / INDEX_FILE
        params = {**params, "nlist": nlist}
        return cls(kb.embeddings(), kb.documents, kb.encoder(), index_path=path, **params)

    def _build(self, progress: bool) -> Any:
        import faiss

        quantizer = faiss.IndexFlatIP(self.dim)
        ip = faiss.METRIC_INNER_PRODUCT
        index: Any
        if self.codec == "sq8":
            qt = faiss.ScalarQuantizer.QT_8bit
            index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, self.nlist, qt, ip)
        else:
            index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, ip)
        index.cp.seed = self.seed
        rng = np.random.default_rng(self.seed)
        sample = np.sort(rng.choice(self.num_docs, size=self.train_size, replace=False))
        where = "FAISS" if self.build_device is None else f"torch on {self.build_device}"
        logger.info(
            "training IVF (nlist=%d, %s) on %d vectors, %s",
            self.nlist,
            self.codec,
            len(sample),
            where,
        )
        train = np.ascontiguousarray(self._vectors[sample], dtype=np.float32)
        desc = f"ivf nlist={self.nlist} {self.codec}"
        if self.build_device is None:
            index.train(train)
            self._add_all(index, desc, progress)
        else:
            self._build_torch(index, train, desc, progress)
        return index

    def _build_torch(self, index: Any, train: np.ndarray, desc: str, progress: bool) -> None:
        """Train ``index`` and add every vector with centroids and list assignments computed
        in torch on ``build_device``, then hand them to FAISS: the quantizer gets the
        centroids, ``train_encoder`` fits the codec (SQ8's ranges, on residuals) to the
        sample's lists, and ``add_core`` adds each block with its precomputed lists.

        The device memory torch cached (~2 GB at 4,096 lists) is kept, not released: the build
        may overlap a vLLM engine start on the same card, and vLLM's memory profiler fails the
        start ("Error in memory profiling") if another process frees memory while it
        profiles. Kept, it stays inside the 10% of the card vLLM leaves, where this process's
        query encoder reuses it."""
        import faiss

        from ralmspec_vllm.retrieval import kmeans

        device = str(self.build_device)
        start = time.perf_counter()
        centroids = kmeans.kmeans(train, self.nlist, device, seed=self.seed)
        trained = time.perf_counter()
        index.quantizer.add(centroids)
        ((_, _, lists),) = kmeans.assign_blocks(train, centroids, device, block=len(train))
        ptr = faiss.swig_ptr
        index.train_encoder(len(train), ptr(train), ptr(np.ascontiguousarray(lists)))
        index.is_trained = True
        with tqdm(total=self.num_docs, unit="vec", desc=desc, disable=not progress) as bar:
            for _, rows, lists in kmeans.assign_blocks(self._vectors, centroids, device):
                index.add_core(len(rows), ptr(rows), None, ptr(np.ascontiguousarray(lists)))
                bar.update(len(rows))
        logger.info(
            "IVF built on %s: k-means %.1f s, codec and %d vectors added %.1f s",
            device,
            trained - start,
            self.num_docs,
            time.perf_counter() - trained,
        )

    def _search_params(self, count: int) -> Any:
        import faiss

        return faiss.SearchParametersIVF(nprobe=min(self.nprobe, self.nlist))  # type: ignore[call-arg]

    def _candidates(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS's search gives each query one core (its OpenMP loop runs over queries), so
        a batch-1 search scans all ``nprobe`` lists on one. With ``probe_groups`` > 1 each
        query's probed lists are dealt by centroid rank into that many groups, each group
        searched on a thread of its own (``search_preassigned``, one core each), and the
        groups' candidates merged by (index score desc, doc id asc). Every query is searched
        alone, so its candidates never depend on the batch, the thread count or timing;
        they can differ from FAISS's own search only where index scores tie at a group's
        cut-off (the exact re-scoring then ranks whatever came back)."""
        nprobe = min(self.nprobe, self.nlist)
        groups = min(self.probe_groups, nprobe)
        if groups == 1:
            return super()._candidates(queries, count)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        list_scores, lists = self._index.quantizer.search(queries, nprobe)
        if self._group_pool is None or self._group_pool_size < groups:  # probe_groups grew
            self._group_pool = ThreadPoolExecutor(groups, thread_name_prefix="ivf-probe")
            self._group_pool_size = groups
        pool = self._group_pool
        tasks = [
            [
                pool.submit(
                    self._search_lists, q, lists[i, g::groups], list_scores[i, g::groups], count
                )
                for g in range(groups)
            ]
            for i, q in enumerate(queries)
        ]
        ids = np.full((len(queries), count), -1, dtype=np.int64)
        scores = np.full((len(queries), count), -np.inf, dtype=np.float32)
        for i, row in enumerate(tasks):
            parts = [task.result() for task in row]
            part_scores = np.concatenate([p[0] for p in parts])
            part_ids = np.concatenate([p[1] for p in parts])
            found = part_ids >= 0
            part_scores, part_ids = part_scores[found], part_ids[found]
            best = np.lexsort((part_ids, -part_scores))[:count]
            ids[i, : len(best)] = part_ids[best]
            scores[i, : len(best)] = part_scores[best]
        return ids, scores

    def _search_lists(
        self, query: np.ndarray, lists: np.ndarray, list_scores: np.ndarray, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """One query's top ``count`` within the given inverted lists (one core)."""
        import faiss

        keys = np.ascontiguousarray(lists[None], dtype=np.int64)
        coarse = np.ascontiguousarray(list_scores[None], dtype=np.float32)
        q = np.ascontiguousarray(query[None], dtype=np.float32)
        scores = np.empty((1, count), dtype=np.float32)
        ids = np.empty((1, count), dtype=np.int64)
        params = faiss.SearchParametersIVF(nprobe=len(lists))  # type: ignore[call-arg]
        ptr = faiss.swig_ptr
        self._index.search_preassigned_c(
            1, ptr(q), count, ptr(keys), ptr(coarse), ptr(scores), ptr(ids), False, params
        )
        return scores[0], ids[0]

    def routing(self) -> IVFRouting:
        """The lists' centroids and ``nprobe`` (``base.IVFRouting``), read from the index
        once, with the map ``lists`` reads (a client that routes asks for lists next)."""
        with self._routing_lock:
            if self._routing is None:
                centroids = self._index.quantizer.reconstruct_n(0, self.nlist)
                self._routing = IVFRouting(
                    np.ascontiguousarray(centroids, dtype=np.float32), min(self.nprobe, self.nlist)
                )
            self._map_lists()
            return self._routing

    def lists(self, doc_ids: Sequence[int]) -> np.ndarray:
        """The inverted list that holds each document, as the index stored it."""
        ids = check_doc_ids(doc_ids, self.num_docs)
        with self._routing_lock:
            doc_lists = self._map_lists()
        return doc_lists[ids].astype(np.int64)

    def _map_lists(self) -> np.ndarray:
        """Every document's list, read from the index once (21M documents: 84 MB, ~1 s).
        Call with ``_routing_lock`` held."""
        if self._doc_lists is None:
            self._doc_lists = _doc_lists(self._index, self.num_docs)
        return self._doc_lists

    def _extra_info(self) -> dict[str, str]:
        extra = {**super()._extra_info(), "nprobe": str(self.nprobe), "codec": self.codec}
        if self.probe_groups > 1:
            extra["probe_groups"] = str(self.probe_groups)
        return extra


def _doc_lists(index: Any, num_docs: int) -> np.ndarray:
    """Each document's inverted list in a FAISS IVF ``index`` (ids are doc ids), int32."""
    import faiss

    out = np.full(num_docs, -1, dtype=np.int32)
    invlists = index.invlists
    for lst in range(index.nlist):
        size = invlists.list_size(lst)
        if size:
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), size)
            out[np.asarray(ids, dtype=np.int64)] = lst
    if (out < 0).any():
        raise RuntimeError(f"IVF index holds {int((out >= 0).sum())} of {num_docs} documents")
    return out


def default_nlist(num_docs: int) -> int:
    """FAISS's rule of thumb, ~4 sqrt(N) lists, at most N."""
    return max(1, min(num_docs, round(4 * math.sqrt(num_docs))))


def _fingerprint(vectors: np.ndarray) -> str:
    """Cheap identity of a vector matrix (shape + a strided sample) to detect stale indexes."""
    step = max(1, len(vectors) // 1024)
    digest = hashlib.sha1(str(vectors.shape).encode())
    digest.update(np.ascontiguousarray(vectors[::step], dtype=np.float32).tobytes())
    digest.update(np.ascontiguousarray(vectors[-1], dtype=np.float32).tobytes())
    return digest.hexdigest()


def _load_or_build(
    path: Path | None,
    meta: dict[str, Any],
    build: Callable[[], Any],
    rebuild: bool = False,
    save: bool = True,
) -> Any:
    """Load ``path`` if its saved metadata matches ``meta``; otherwise build it, and save it
    there unless ``save`` is off."""
    import faiss

    if not rebuild and path is not None and path.exists() and (path.parent / META_FILE).exists():
        saved = json.loads((path.parent / META_FILE).read_text())
        if saved == meta:
            logger.info("loading %s index from %s", meta["backend"], path)
            return faiss.read_index(str(path))
        logger.warning("index at %s was built for other vectors or parameters; rebuilding", path)
    index = build()
    if path is not None and save:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
        (path.parent / META_FILE).write_text(json.dumps(meta, indent=1))
        logger.info("saved %s index to %s", meta["backend"], path)
    return index
