"""Exact dense retrieval: brute-force inner product over every document vector.

Two interchangeable candidate generators feed ``DenseIndexRetriever`` (``dense.py``), which
re-scores candidates with ``inner_product`` and widens the candidate set until the top-k is
provably exact, so both give the same hits and the same (bit-identical) scores:

- ``impl="faiss"``: ``faiss.IndexFlatIP``; moved to every GPU when the FAISS build has GPUs
  (``faiss.get_num_gpus() > 0``) and ``device`` is not ``"cpu"``, on the CPU otherwise.
- ``impl="torch"``: the matrix lives on ``device`` (``"cuda"`` where faiss-gpu is missing, e.g.
  CUDA 13; ``"cpu"`` works too) in float16 or float32; queries are one matmul + ``topk`` per
  chunk of documents, chunks merged by a second ``topk``.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ralmspec_vllm.retrieval.base import DocumentStore
from ralmspec_vllm.retrieval.dense import DenseIndexRetriever, TextEncoder, float32_relative_error

if TYPE_CHECKING:
    from ralmspec_vllm.retrieval.kb import KnowledgeBase

logger = logging.getLogger(__name__)

IMPLS = ("faiss", "torch")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float16")

# Loose bound for reduced-precision paths (fp16 inputs/outputs, TF32 or fp16 reductions).
_REDUCED_PRECISION_ERROR = 2.0**-7


class FlatRetriever(DenseIndexRetriever):
    """Exact top-k inner-product search (FAISS flat or torch matmul) over all vectors."""

    backend = "flat"

    def __init__(
        self,
        vectors: np.ndarray,
        documents: DocumentStore | None = None,
        encoder: TextEncoder | None = None,
        *,
        impl: str = "faiss",
        device: str = "auto",
        dtype: str = "float32",
        chunk_size: int = 1 << 20,
        candidate_margin: int = 16,
        index_dir: str = "",
        progress: bool = False,
    ) -> None:
        if impl not in IMPLS:
            raise ValueError(f"impl: must be one of {IMPLS}, got {impl!r}")
        if device not in DEVICES:
            raise ValueError(f"device: must be one of {DEVICES}, got {device!r}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {DTYPES}, got {dtype!r}")
        if impl == "faiss" and dtype != "float32":
            raise ValueError("dtype: the faiss flat index is float32 only")
        if chunk_size < 1:
            raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
        super().__init__(
            vectors, documents, encoder, candidate_margin=candidate_margin, index_dir=index_dir
        )
        self.impl = impl
        self.dtype = dtype
        self.chunk_size = chunk_size
        if impl == "faiss":
            self._index, self.device = _faiss_flat(self._vectors, device, progress)
        else:
            self._matrix, self.device = _torch_matrix(self._vectors, device, dtype, chunk_size)
        logger.info(
            "flat retriever: %d x %d, impl=%s device=%s dtype=%s",
            self.num_docs,
            self.dim,
            impl,
            self.device,
            dtype,
        )

    @classmethod
    def from_kb(cls, kb: KnowledgeBase, **params: Any) -> FlatRetriever:
        """Flat search over the knowledge base's embeddings with its encoder and documents."""
        return cls(kb.embeddings(), kb.documents, kb.encoder(), **params)

    def _relative_error(self) -> float:
        exact32 = float32_relative_error(self.dim)
        if self.dtype == "float16" or self.device != "cpu":
            return exact32 + _REDUCED_PRECISION_ERROR
        return exact32

    def _extra_info(self) -> dict[str, str]:
        return {"impl": self.impl, "device": self.device, "dtype": self.dtype}

    def _candidates(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        if self.impl == "faiss":
            scores, ids = self._index.search(queries, count)
            return ids.astype(np.int64, copy=False), scores
        return self._torch_candidates(queries, count)

    def _torch_candidates(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        matrix = self._matrix
        with torch.inference_mode():
            q = torch.from_numpy(queries).to(device=matrix.device, dtype=matrix.dtype)
            best_scores: torch.Tensor | None = None
            best_ids: torch.Tensor | None = None
            for start in range(0, self.num_docs, self.chunk_size):
                block = q @ matrix[start : start + self.chunk_size].T
                top = torch.topk(block.float(), min(count, block.shape[1]), dim=1)
                ids = top.indices + start
                if best_scores is None or best_ids is None:
                    best_scores, best_ids = top.values, ids
                    continue
                merged = torch.cat([best_scores, top.values], dim=1)
                merged_ids = torch.cat([best_ids, ids], dim=1)
                keep = torch.topk(merged, min(count, merged.shape[1]), dim=1)
                best_scores = keep.values
                best_ids = torch.gather(merged_ids, 1, keep.indices)
            assert best_scores is not None and best_ids is not None
            return best_ids.cpu().numpy().astype(np.int64), best_scores.cpu().numpy()


def _faiss_flat(vectors: np.ndarray, device: str, progress: bool) -> tuple[Any, str]:
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    step = 1 << 18
    with tqdm(total=len(vectors), unit="vec", desc="flat index", disable=not progress) as bar:
        for start in range(0, len(vectors), step):
            index.add(np.ascontiguousarray(vectors[start : start + step], dtype=np.float32))
            bar.update(min(step, len(vectors) - start))
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device != "cpu" and gpus > 0:
        return faiss.index_cpu_to_all_gpus(index), "cuda"
    if device == "cuda":
        raise ValueError("device: this FAISS build has no GPU support (use impl='torch')")
    return index, "cpu"


def _torch_matrix(vectors: np.ndarray, device: str, dtype: str, chunk_size: int) -> tuple[Any, str]:
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA requested but torch sees no GPU")
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    matrix = torch.empty(vectors.shape, dtype=torch_dtype, device=device)

    def load(start: int) -> None:
        # A writable copy per chunk: the KB's embeddings are a read-only memory map.
        block = np.array(vectors[start : start + chunk_size], dtype=np.float32)
        matrix[start : start + len(block)] = torch.from_numpy(block).to(device, torch_dtype)

    # Threads overlap the page-cache reads and copies (21M x 384 is 32 GB; one thread took
    # ~70 s on the H200 host).
    workers = max(1, min(os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers, thread_name_prefix="flat-load") as pool:
        list(pool.map(load, range(0, len(vectors), chunk_size)))
    return matrix, device
