"""Inner-product k-means and nearest-centroid assignment in torch, for building an IVF index
on a GPU (``IVFFlatRetriever(build_device="cuda")``).

FAISS's own k-means and ``add`` run on the CPU (faiss-cpu): at 21M MiniLM vectors and 4,096
lists its build (training on 262k sample vectors, ~8e12 flops, then the add, which assigns
21M vectors to their lists with another 6.6e13) had not finished after 4.5 minutes on a
16-core GPU host (session 28). On the GPU both are seconds. The index built from these
centroids is an ordinary FAISS index: searches run in FAISS on the CPU as before, and
candidates are re-scored exactly as before, so only which lists hold which vectors (recall)
can differ from FAISS's k-means.

Deterministic for a given device: the initial centroids are a seeded sample, ties go to the
lowest centroid (``argmax``), and each iteration's centroid sums are matrix products (no
atomics), so the same inputs give the same centroids run after run on one card.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

NITER = 10
"""Iterations, as FAISS's ``IndexIVF`` trains its quantizer (``index.cp.niter``)."""
_BLOCK = 1 << 15
"""Rows scored against every centroid at once (32k x 4,096 float32: 512 MiB, beside a vLLM
engine that holds 90% of the card)."""
_SPLIT_EPS = 1.0 / 1024.0
"""How far apart an empty centroid and the one it takes half of are pushed (FAISS's value)."""


def _assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Each row's centroid of largest inner product (ties: the lowest index)."""
    import torch

    out = torch.empty(len(x), dtype=torch.int64, device=x.device)
    for start in range(0, len(x), _BLOCK):
        block = x[start : start + _BLOCK]
        out[start : start + len(block)] = torch.argmax(block @ centroids.T, dim=1)
    return out


def kmeans(x: np.ndarray, k: int, device: str, niter: int = NITER, seed: int = 1234) -> np.ndarray:
    """``k`` centroids (float32, ``k x dim``) of the rows of ``x`` by spherical k-means with
    inner-product assignment, as FAISS's inner-product ``IndexIVF.train`` trains its coarse
    quantizer (``index.cp``: ``spherical``, ``niter=10``): initial centroids a seeded
    sample of rows, each centroid the normalized mean of its rows, an empty cluster takes
    half of the largest one (the two centroids nudged apart)."""
    import torch

    if not 1 <= k <= len(x):
        raise ValueError(f"k: must be in [1, {len(x)}], got {k}")
    if niter < 1:
        raise ValueError(f"niter: must be >= 1, got {niter}")
    data = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(device)
    generator = torch.Generator().manual_seed(seed)
    init = torch.randperm(len(x), generator=generator)[:k].sort().values
    centroids = data[init.to(device)].clone()
    for iteration in range(niter):
        assign = _assign(data, centroids)
        sums = torch.zeros_like(centroids)
        for start in range(0, len(data), _BLOCK):
            block = assign[start : start + _BLOCK]
            onehot = torch.zeros(len(block), k, dtype=data.dtype, device=data.device)
            onehot[torch.arange(len(block), device=data.device), block] = 1.0
            sums += onehot.T @ data[start : start + len(block)]
        counts = torch.bincount(assign, minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled].unsqueeze(1).to(data.dtype)
        empty = torch.nonzero(~filled).flatten().tolist()
        if empty:
            _split_largest(centroids, counts, empty)
        centroids /= torch.linalg.vector_norm(centroids, dim=1, keepdim=True).clamp_min(1e-30)
        if iteration == 0 or iteration == niter - 1:
            logger.info(
                "k-means %d/%d: %d centroids, %d empty before splits",
                iteration + 1,
                niter,
                k,
                len(empty),
            )
    return np.ascontiguousarray(centroids.cpu().numpy(), dtype=np.float32)


def _split_largest(centroids: torch.Tensor, counts: torch.Tensor, empty: list[int]) -> None:
    """Give each empty cluster half of the currently largest one, as FAISS does: the two
    centroids are the old one nudged apart by ``_SPLIT_EPS`` in alternate dimensions (a
    change of direction, which the normalization keeps)."""
    import torch

    sizes = counts.tolist()  # a copy: the splits below count in it
    up = torch.ones(centroids.shape[1], dtype=centroids.dtype, device=centroids.device)
    up[0::2] += _SPLIT_EPS
    up[1::2] -= _SPLIT_EPS
    down = 2.0 - up
    for e in empty:
        j = max(range(len(sizes)), key=lambda i: (sizes[i], -i))  # largest, lowest index
        centroids[e] = centroids[j] * up
        centroids[j] = centroids[j] * down
        sizes[e] = sizes[j] // 2
        sizes[j] -= sizes[e]


def assign_blocks(
    vectors: np.ndarray, centroids: np.ndarray, device: str, block: int = 1 << 18
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(start, rows, lists)`` for consecutive blocks of ``vectors`` (float32 rows as
    stored, e.g. a memory map read block by block): each row's centroid of largest inner
    product (ties: the lowest index), computed on ``device``."""
    import torch

    c = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
    for start in range(0, len(vectors), block):
        rows = np.ascontiguousarray(vectors[start : start + block], dtype=np.float32)
        with warnings.catch_warnings():  # a knowledge base's read-only memory map: only read
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            tensor = torch.from_numpy(rows)
        lists = _assign(tensor.to(device), c).cpu().numpy()
        yield start, rows, lists
