"""Request validation shared by every retrieval backend.

Backends call these before touching an index, so a malformed request fails fast with an
exception whose message starts with the offending field's name: ``ValueError`` for bad values
(``k``, ``prefetch``, ``queries[i]``, ``query``, ``vectors``) and ``KeyError`` for doc ids
outside the knowledge base (``doc_ids``). The gRPC layer maps both to ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def check_k(k: int) -> int:
    """``k`` must be an integer >= 1 (a ``k`` above the corpus size returns every document)."""
    return _check_count(k, "k", 1)


def check_prefetch(prefetch: int) -> int:
    """``prefetch`` (hits wanted after the exact top-k) must be an integer >= 0."""
    return _check_count(prefetch, "prefetch", 0)


def _check_count(value: int, field: str, minimum: int) -> int:
    """``value`` as an int; ``ValueError`` naming ``field`` unless an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{field}: must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{field}: must be >= {minimum}, got {value}")
    return int(value)


def check_query(query: str, field: str = "query") -> str:
    """A query text must be a non-blank string."""
    if not isinstance(query, str):
        raise ValueError(f"{field}: must be a string, got {type(query).__name__}")
    if not query.strip():
        raise ValueError(f"{field}: empty query text")
    return query


def check_queries(queries: Sequence[str]) -> list[str]:
    """Every query text in a batch must be a non-blank string."""
    if isinstance(queries, str):
        raise ValueError("queries: must be a sequence of strings, got one string")
    return [check_query(q, f"queries[{i}]") for i, q in enumerate(queries)]


def check_doc_ids(doc_ids: Sequence[int] | np.ndarray, num_docs: int) -> np.ndarray:
    """Doc ids as an int64 array; ``KeyError`` naming ``doc_ids`` for any id not in [0, N)."""
    ids = np.asarray(doc_ids)
    if ids.size == 0:
        return np.zeros(0, dtype=np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise KeyError(f"doc_ids: must be a flat sequence of integers, got {ids.dtype}{ids.shape}")
    bad = (ids < 0) | (ids >= num_docs)
    if bad.any():
        unknown = ids[bad][:5].tolist()
        raise KeyError(f"doc_ids: unknown doc ids {unknown} (knowledge base has {num_docs})")
    return ids.astype(np.int64, copy=False)


def check_vectors(vectors: np.ndarray, dim: int, field: str = "vectors") -> np.ndarray:
    """Query vectors as C-contiguous float32 (n, dim); 1-D input is one query."""
    arr = np.asarray(vectors)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise ValueError(f"{field}: expected shape (n, {dim}), got {tuple(np.shape(vectors))}")
    if not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"{field}: must be numeric, got {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{field}: contains NaN or infinity")
    return arr
