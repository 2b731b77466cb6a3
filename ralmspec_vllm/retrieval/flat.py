"""Exact dense retrieval: brute-force inner product over every document vector.

Two interchangeable candidate generators feed ``DenseIndexRetriever`` (``dense.py``), which
re-scores candidates with ``inner_product`` and widens the candidate set until the top-k is
provably exact, so both give the same hits and the same (bit-identical) scores:

- ``impl="faiss"``: ``faiss.IndexFlatIP``; moved to every GPU when the FAISS build has GPUs
  (``faiss.get_num_gpus() > 0``) and ``device`` is not ``"cpu"``, on the CPU otherwise.
- ``impl="torch"``: the matrix lives on ``device`` (``"cuda"`` where faiss-gpu is missing, e.g.
  CUDA 13; ``"cpu"`` works too) in float32, bfloat16 or float16; a query batch is one matmul
  per chunk of documents (on the CPU in bfloat16, against chunks pre-packed for oneDNN).
  Each chunk's scores are cut into groups of ``_GROUP`` docs (strided: ``_group_maxima``);
  groups whose best score reaches the running threshold ``min(c-th best, k-th best - 2 * bound)``
  (c = k + margin, bound = the index's error bound for that query) are kept. One scan thus
  proposes every doc that could still be in the exact top-k, and reports the threshold as the
  ceiling on the scores of the docs it left out: no second scan ("widening") is needed even
  where a bfloat16 bound (~2^-6.4 |q| max|x|) admits hundreds of near-ties. Queries and the
  matrix are scaled by powers of two (exact) to norm <= 1, so float16 cannot overflow.

Error bounds (``reduced_relative_error``): on the CPU torch multiplies bfloat16/float16 with
fp32 accumulation and rounds the output to the input dtype (checked: ``torch.mm`` has no CPU
``out_dtype``; a probe with 1 + 383 x u/2 sums gives the fp32 result for batch 1..20; the
packed product too, ``tests/retrieval/test_flat.py``).

Measured (3M x 384 MiniLM index, NQ questions, CPU 2 threads, Sapphire Rapids with AMX;
ms per search_vectors call of batch 1/4/16, noisy +-20%): k=1 float32 263/556/715, bfloat16
235/186/323, float16 243/356/539, faiss 478/964/3953; k=20 float32 254/470/961, bfloat16
223/247/367, float16 248/411/532. No query needed a second scan; candidates re-scored per
query (median/max): bfloat16 k=1 30/79, k=20 230/429; float16 17/19 and 36/39 (= k + 16).
All hits and scores equal FAISS's. The float32 scan costs what the older topk merge did.
A bare bfloat16 matmul over the 3M matrix takes ~228 ms for 1, 2, 3, 4 or 8 rows and 281 ms
for 16, so padding 1-3 queries to 4 rows gains nothing measurable (A/B within noise).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from ralmspec_vllm.retrieval import abandon
from ralmspec_vllm.retrieval.base import DocumentStore
from ralmspec_vllm.retrieval.circular import CircularScan
from ralmspec_vllm.retrieval.dense import DenseIndexRetriever, TextEncoder, float32_relative_error

if TYPE_CHECKING:
    from ralmspec_vllm.retrieval.kb import KnowledgeBase

logger = logging.getLogger(__name__)

IMPLS = ("faiss", "torch")
LAYOUTS = ("auto", "packed", "plain", "both")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "bfloat16", "float16")
SCANS = ("batch", "circular")

# Added to the bound off the CPU: GPU kernels may use TF32 or reduced-precision split-K
# reductions. A loose allowance, not a proof.
_REDUCED_PRECISION_ERROR = 2.0**-7
# Unit roundoff u and half the subnormal spacing eta of the reduced dtypes.
_ROUNDING = {"bfloat16": (2.0**-8, 2.0**-134), "float16": (2.0**-11, 2.0**-25)}
_SAFETY = 1.125
# Docs per group whose maximum decides whether the group's scores are looked at.
_GROUP = 64


def reduced_relative_error(dim: int, dtype: str) -> float:
    """Bound on |index score - q.x| / (|q| max|x|) for the torch CPU path in ``dtype``.

    Setting: q and x scaled by powers of two to norms in [1/2, 1) (exact), so
    ``|q| max|x| >= 1/4`` and nothing overflows. Each input is rounded to ``dtype`` (RNE):
    ``|dq_j| <= u |q_j| + eta`` (eta covers float16 subnormals), likewise x. Then

    - input: ``sum |q_j x_j - q'_j x'_j| <= (2u + u^2)|q||x| + 2 eta (1+u)(|q|_1 + |x|_1)
      + d eta^2``, with ``|v|_1 <= sqrt(d)|v| <= sqrt(d)``: relative to ``|q||x| >= 1/4``
      at most ``2u + u^2 + 4 (4 eta (1+u) sqrt(d) + d eta^2)``;
    - accumulation: products of two bf16/fp16 values are exact in fp32, summed in fp32:
      ``gamma_d sum|q'_j x'_j| <= g (1+u)^2 |q||x|`` with ``g = float32_relative_error(d)``
      (twice gamma_d); fp32 underflow adds at most ``4 d 2^-126``;
    - output rounded to ``dtype``: ``u |s'| + eta`` with ``|s'| <= (1 + input + acc)|q||x|``.

    The sum, times 1.125 for safety. About 3u: bfloat16 0.0132 (2^-6.2), float16 0.00166.
    """
    u, eta = _ROUNDING[dtype]
    g = float32_relative_error(dim)
    inputs = 2 * u + u * u + 4 * (4 * eta * (1 + u) * dim**0.5 + dim * eta * eta)
    accumulation = g * (1 + u) ** 2 + 4 * dim * 2.0**-126
    output = u * (1 + inputs + accumulation) + 4 * eta
    return _SAFETY * (inputs + accumulation + output)


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
        layout: str = "auto",
        scan: str = "batch",
    ) -> None:
        """``scan`` (torch only): ``batch`` (each search walks the matrix itself) or
        ``circular`` (one shared walk that searches board at any chunk, ``CircularScan``).
        ``layout`` of the torch matrix (``_TorchMatrix``): ``packed`` (CPU, bfloat16: each
        chunk pre-packed in oneDNN's blocked layout, fastest up to ~64 queries a call),
        ``plain``, ``both`` (packed for small calls, plain for large ones such as a serving
        retriever's merged batches; twice the memory) or ``auto`` (packed where this torch
        build can, else plain)."""
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
        if layout not in LAYOUTS:
            raise ValueError(f"layout: must be one of {LAYOUTS}, got {layout!r}")
        if scan not in SCANS:
            raise ValueError(f"scan: must be one of {SCANS}, got {scan!r}")
        if scan == "circular" and impl != "torch":
            raise ValueError("scan: circular needs impl='torch'")
        super().__init__(
            vectors, documents, encoder, candidate_margin=candidate_margin, index_dir=index_dir
        )
        self.impl = impl
        self.dtype = dtype
        # A multiple of _GROUP, so only the matrix's last chunk has a partial group.
        self.chunk_size = -(-chunk_size // _GROUP) * _GROUP
        self._matrix_scale = _power_of_two_scale(self._max_norm)
        self.scan = scan
        self._circular: CircularScan | None = None
        if impl == "faiss":
            self._index, self.device = _faiss_flat(self._vectors, device, progress)
        else:
            self._matrix = _TorchMatrix(
                self._vectors, device, dtype, self.chunk_size, self._matrix_scale, layout
            )
            self.device = self._matrix.device
            if scan == "circular":
                self._circular = CircularScan(
                    self._matrix.num_chunks, self._matrix.product, add_all=_ThresholdScan.add_all
                )
        logger.info(
            "flat retriever: %d x %d, impl=%s device=%s dtype=%s%s%s",
            self.num_docs,
            self.dim,
            impl,
            self.device,
            dtype,
            f" ({self._matrix.layout} layout)" if impl == "torch" else "",
            ", circular scan" if scan == "circular" else "",
        )

    @classmethod
    def from_kb(cls, kb: KnowledgeBase, **params: Any) -> FlatRetriever:
        """Flat search over the knowledge base's embeddings with its encoder and documents."""
        return cls(kb.embeddings(), kb.documents, kb.encoder(), **params)

    def _relative_error(self) -> float:
        if self.dtype == "float32":
            bound = float32_relative_error(self.dim)
        else:
            bound = reduced_relative_error(self.dim, self.dtype)
        if self.device != "cpu":
            bound += _REDUCED_PRECISION_ERROR
        return bound

    def _extra_info(self) -> dict[str, str]:
        info = {"impl": self.impl, "device": self.device, "dtype": self.dtype}
        if self.impl == "torch":
            info["layout"] = self._matrix.layout
            info["scan"] = self.scan
        return info

    def counters(self) -> dict[str, float]:
        """``DenseIndexRetriever.counters`` plus the circular scan's walk, if any."""
        out = super().counters()
        if self._circular is not None:
            out.update(self._circular.counters())
        return out

    def close(self) -> None:
        """Stop the circular scan's thread (if any); searches still on board fail."""
        if self._circular is not None:
            self._circular.close()

    def _candidate_count(self, k: int, prefetch: int = 0) -> int:
        if self.impl == "torch" and self.dtype == "bfloat16":
            # The bfloat16 scan already proposes every near-tie of the k-th score, hundreds
            # per query (3M MiniLM docs, k=20: median 235, holding all of the exact top-64):
            # those are the prefetch hits. Asking for k + prefetch would lower its threshold
            # and cost what an exact top-(k + prefetch) does.
            return super()._candidate_count(k)
        return super()._candidate_count(k, prefetch)

    def _candidates(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        if self.impl == "faiss":
            scores, ids = self._index.search(queries, count)
            return ids.astype(np.int64, copy=False), scores
        ids, scores, _ = self._torch_scan(queries, count, count)
        return ids, scores

    def _bounded_candidates(
        self, queries: np.ndarray, count: int, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.impl == "faiss":
            return super()._bounded_candidates(queries, count, k)
        return self._torch_scan(queries, count, k)

    def _torch_scan(
        self, queries: np.ndarray, count: int, k: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top ``count`` plus every doc within twice the bound of the k-th; see module doc."""
        import torch

        q_norms = np.linalg.norm(queries.astype(np.float64), axis=1)
        q_scale = np.array([_power_of_two_scale(n) for n in q_norms])
        scaled = (queries * q_scale[:, None].astype(np.float32)).astype(np.float32)
        bound = self._relative_error() * q_norms * q_scale * self._max_norm * self._matrix_scale
        # 2 * bound, widened a little so the float32 threshold arithmetic cannot undercut it.
        slack = 2.0 * (bound + 1e-30 * q_scale * self._matrix_scale) * (1 + 2.0**-8)
        with torch.inference_mode():
            scan = _ThresholdScan(len(queries), count, k, slack, self.device)
            if self._circular is not None:
                self._circular.submit(self._matrix.queries(scaled), scan).result()
            else:
                abandoned = abandon.current()
                for start, block in self._matrix.products(scaled):
                    abandon.check(abandoned)  # the caller gave up: stop between chunks
                    scan.add(block, start)
            ids, scores, ceiling = scan.result()
        unscale = 1.0 / (q_scale * self._matrix_scale)  # powers of two: exact
        return ids, scores * unscale[:, None], ceiling * unscale


class _ThresholdScan:
    """Collects, chunk by chunk, every doc whose score reaches the running threshold."""

    def __init__(self, rows: int, count: int, k: int, slack: np.ndarray, device: Any) -> None:
        import torch

        if not 1 <= k <= count:
            raise ValueError(f"need 1 <= k <= count, got k={k}, count={count}")
        self.count, self.k = count, k
        self.slack = torch.from_numpy(slack.astype(np.float32)).to(device)
        # Best group maxima so far: real scores of distinct docs, so their c-th and k-th are
        # lower bounds on the true c-th and k-th, and the threshold never exceeds the true one.
        # -inf where fewer than ``count`` docs were seen: the threshold then stays -inf.
        self.best = torch.full((rows, count), -torch.inf, device=device)
        self.parts: list[tuple[Any, Any, Any]] = []  # (rows, doc ids, scores): tensors/arrays

    def add(self, block: Any, start: int) -> None:
        import torch

        groups, maxima = _group_maxima(block)
        merged = torch.cat([self.best, maxima], dim=1)
        self.best = torch.topk(merged, self.count, dim=1).values
        threshold = _threshold(self.best, self.k, self.count, self.slack)
        row, col, values = _reaching(groups, maxima, threshold)
        self.parts.append((row, col + start, values))

    @staticmethod
    def add_all(scans: list[_ThresholdScan], block: Any, start: int) -> None:
        """``scans[i].add(rows_i of block, start)`` for every scan, as one set of tensor ops.

        ``block`` stacks the scans' rows in order (a circular scan's cohorts). Every op works
        row by row, so each scan ends with the hits and threshold its own ``add`` would give,
        bit for bit. What it saves is ops: in-process, each torch op the scan's thread makes
        releases the GIL and must re-take it, which waits while the event loop runs Python.
        So the per-scan work is a handful of ops (none when the cohort's k are alike) and the
        hits are split among the scans in numpy, which holds the GIL throughout."""
        import torch

        if len(scans) == 1:
            scans[0].add(block, start)
            return
        groups, maxima = _group_maxima(block)
        # Each best is -inf padded to its count; pad further to the widest: a row's top-c of
        # the padded merge equals its own top-c, and an index past its real width reads -inf.
        width = max(s.count for s in scans)
        bests = [
            s.best
            if s.count == width
            else torch.nn.functional.pad(s.best, (0, width - s.count), value=-torch.inf)
            for s in scans
        ]
        merged = torch.cat([torch.cat(bests), maxima], dim=1)
        best = torch.topk(merged, width, dim=1).values
        slack = torch.cat([s.slack for s in scans])
        counts = {(s.k, s.count) for s in scans}
        if len(counts) == 1:
            ((k, count),) = counts
            threshold = _threshold(best, k, count, slack)
        else:
            index = torch.tensor(
                [[s.k - 1, s.count - 1] for s in scans for _ in range(s.best.shape[0])],
                device=block.device,
            )
            picked = best.gather(1, index)
            threshold = torch.minimum(picked[:, 0] - slack, picked[:, 1])
        row, col, values = _reaching(groups, maxima, threshold)
        hit_rows = row.cpu().numpy()  # sorted by row
        hit_cols = (col + start).cpu().numpy()
        hit_values = values.cpu().numpy()
        bounds = np.cumsum([0] + [s.best.shape[0] for s in scans])
        cuts = np.searchsorted(hit_rows, bounds)
        for i, s in enumerate(scans):
            r0, r1, a, b = bounds[i], bounds[i + 1], cuts[i], cuts[i + 1]
            s.best = best[r0:r1] if s.count == width else best[r0:r1, : s.count]
            s.parts.append((hit_rows[a:b] - r0, hit_cols[a:b], hit_values[a:b]))

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids -1 padded, scores, ceiling): the final threshold is exact, not a lower bound."""
        rows = self.best.shape[0]
        row = np.concatenate([_numpy(p[0]) for p in self.parts])
        ids = np.concatenate([_numpy(p[1]) for p in self.parts]).astype(np.int64)
        values = np.concatenate([_numpy(p[2]) for p in self.parts])
        slack = self.slack.cpu().numpy()
        per_row: list[tuple[np.ndarray, np.ndarray]] = []
        ceiling = np.empty(rows, dtype=np.float64)
        for r in range(rows):
            mine = row == r
            v, i = values[mine], ids[mine]
            ranked = np.sort(v)[::-1]
            cth = ranked[min(self.count, len(ranked)) - 1]
            kth = ranked[min(self.k, len(ranked)) - 1] - slack[r]
            limit = min(np.float32(cth), np.float32(kth))
            keep = v >= limit
            per_row.append((i[keep], v[keep]))
            ceiling[r] = float(limit)
        width = max(len(i) for i, _ in per_row)
        out_ids = np.full((rows, width), -1, dtype=np.int64)
        out_scores = np.full((rows, width), -np.inf, dtype=np.float64)
        for r, (i, v) in enumerate(per_row):
            out_ids[r, : len(i)] = i
            out_scores[r, : len(v)] = v
        return out_ids, out_scores, ceiling


def _group_maxima(block: Any) -> tuple[Any, Any]:
    """``(groups, maxima)`` of a chunk's ``(rows, n)`` scores: ``groups`` is the block (-inf
    padded to a multiple of ``_GROUP`` columns) viewed as ``(rows, _GROUP, w)``, so group
    ``j`` holds columns ``j, j + w, j + 2w, ...``, and ``maxima`` its float32 ``(rows, w)``
    maxima. Strided rather than consecutive: the maximum is then an elementwise max of
    ``_GROUP`` contiguous rows, which vectorizes, where a reduction over 64 adjacent
    bfloat16 scores does not (2-core EPYC, 16 rows x 1M columns: 1.5 against 4.4 ms). Any
    partition of the docs gives the same hits (the maxima are scores of distinct docs)."""
    import torch

    rows, n = block.shape
    if n % _GROUP:
        pad = torch.full((rows, _GROUP - n % _GROUP), -torch.inf, dtype=block.dtype)
        block = torch.cat([block, pad.to(block.device)], dim=1)
    groups = block.view(rows, _GROUP, -1)
    return groups, groups.amax(dim=1).float()


def _reaching(groups: Any, maxima: Any, threshold: Any) -> tuple[Any, Any, Any]:
    """``(row, column, score)`` of every score in ``groups`` (``_group_maxima``) that
    reaches its row's ``threshold``, rows ascending: only groups whose maximum does are read."""
    import torch

    row, group = (maxima >= threshold[:, None]).nonzero(as_tuple=True)
    values = groups[row, :, group].float()  # (hits, _GROUP)
    keep = values >= threshold[row, None]
    col = group[:, None] + groups.shape[2] * torch.arange(_GROUP, device=groups.device)
    row = row[:, None].expand(-1, _GROUP)
    return row[keep], col[keep], values[keep]


def _threshold(best: Any, k: int, count: int, slack: Any) -> Any:
    """Per row: the k-th best minus its slack, or the count-th best if lower (``best``: a
    scan's top ``count`` group maxima so far, -inf where fewer were seen)."""
    import torch

    return torch.minimum(best[:, k - 1] - slack, best[:, count - 1])


def _numpy(x: Any) -> np.ndarray:
    return x if isinstance(x, np.ndarray) else x.cpu().numpy()


def _power_of_two_scale(norm: float) -> float:
    """2^-e with norm * 2^-e in [1/2, 1) (1.0 for a zero norm)."""
    if not norm > 0 or not np.isfinite(norm):
        return 1.0
    _, exponent = np.frexp(norm)
    return float(np.ldexp(1.0, -int(exponent)))


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


PACK_BATCH_HINT = 16
"""Queries per call oneDNN packs the bfloat16 chunks for (a verification holds 1-16)."""
PACKED_MAX_BATCH = 64
"""With ``layout="both"``: calls of up to this many queries use the packed chunks, larger
ones the plain matrix. H200 host (AMX, 16 threads, 4M docs): packed for 16 / plain
44 / 60 ms at 16 queries, 89 / 116 ms at 64, but 1,379 / 370 ms at 256
(``benchmarks/results/gpu/probe_matmul_4m_h200host_session6.txt``)."""


def can_pack() -> bool:
    """Whether this torch build packs bfloat16 linear weights for oneDNN on the CPU."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(8, 32, dtype=torch.bfloat16)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        out = _packed_product(torch.ones(2, 32, dtype=torch.bfloat16), packed)
    except (AttributeError, NotImplementedError, RuntimeError):
        return False
    return bool(out.shape == (2, 8) and (out == 32).all())


def _packed_product(q: Any, packed: Any) -> Any:
    import torch

    return torch.ops.mkldnn._linear_pointwise(q, packed, None, "none", [], "")


class _TorchMatrix:
    """The scaled document matrix of the torch scan, in chunks of ``chunk_size`` rows.

    Plain: one tensor on ``device``; a chunk's scores are ``q @ chunk.T``. Packed (CPU,
    bfloat16, where ``can_pack``): every chunk pre-packed by oneDNN for a batch of
    ``PACK_BATCH_HINT`` queries (what ``torch.compile`` does for CPU linear layers), the same
    product with bfloat16 inputs, fp32 accumulation and a bfloat16 output, so the scan's error
    bound holds unchanged; the plain layout leaves oneDNN a slower kernel for small batches
    (2-core EPYC, 200k docs: 64 queries 141 ms plain, 67 ms packed), but the packing for 16
    queries is the slower one at hundreds (``PACKED_MAX_BATCH``). ``both`` keeps the two and
    picks by the call's batch.
    """

    def __init__(
        self,
        vectors: np.ndarray,
        device: str,
        dtype: str,
        chunk_size: int,
        scale: float,
        layout: str = "auto",
    ) -> None:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device: CUDA requested but torch sees no GPU")
        possible = device == "cpu" and dtype == "bfloat16" and can_pack()
        if layout in ("packed", "both") and not possible:
            raise ValueError(
                f"layout: {layout} needs device='cpu', dtype='bfloat16' and oneDNN packing"
            )
        if layout == "auto":
            layout = "packed" if possible else "plain"
        self.device = device
        self.layout = layout
        self.dtype = getattr(torch, dtype)
        self._starts = list(range(0, len(vectors), chunk_size))
        matrix = (
            torch.empty(vectors.shape, dtype=self.dtype, device=device)
            if layout in ("plain", "both")
            else None
        )

        def load(start: int) -> Any:
            """The chunk at ``start``: packed (or None), filling the plain matrix if any."""
            # A writable copy per chunk: the KB's embeddings are a read-only memory map.
            block = np.array(vectors[start : start + chunk_size], dtype=np.float32)
            block *= np.float32(scale)  # a power of two: exact
            rows = torch.from_numpy(block).to(device, self.dtype)
            if matrix is not None:
                matrix[start : start + len(block)] = rows
            if layout in ("packed", "both"):
                return torch.ops.mkldnn._reorder_linear_weight(rows, PACK_BATCH_HINT)
            return None

        # Threads overlap the page-cache reads, copies and packing (21M x 384 is 32 GB; one
        # thread took ~70 s on the H200 host).
        workers = max(1, min(os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(workers, thread_name_prefix="flat-load") as pool:
            self._packed = list(pool.map(load, self._starts))
        self._plain = (
            [] if matrix is None else [matrix[s : s + chunk_size] for s in self._starts]  # views
        )

    @property
    def packed(self) -> bool:
        """Whether calls of up to ``PACKED_MAX_BATCH`` queries use pre-packed chunks."""
        return self.layout in ("packed", "both")

    @property
    def num_chunks(self) -> int:
        return len(self._starts)

    def queries(self, queries: np.ndarray) -> Any:
        """float32 queries as a tensor the products take."""
        import torch

        return torch.from_numpy(queries).to(device=self.device, dtype=self.dtype)

    def product(self, q: Any, i: int) -> tuple[int, Any]:
        """(first row, scores of the query tensor ``q`` against chunk ``i``)."""
        if self.layout == "packed" or (self.layout == "both" and len(q) <= PACKED_MAX_BATCH):
            return self._starts[i], _packed_product(q, self._packed[i])
        return self._starts[i], q @ self._plain[i].T

    def products(self, queries: np.ndarray) -> Iterator[tuple[int, Any]]:
        """(first row, scores of ``queries`` against the chunk) for every chunk, in order."""
        q = self.queries(queries)
        for i in range(self.num_chunks):
            yield self.product(q, i)
