"""Mapping between the retriever proto messages and the project's own types.

The only module (with ``service.py`` and ``client.py``) that touches ``retriever_pb2``: the
service encodes ``Hit``/``Document``/``RetrieverInfo``/numpy arrays into messages, the client
decodes them back, so no generated type leaks into the core. Decoding a client-supplied
embedding validates it and raises ``InvalidField`` naming the offending field.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ralmspec_vllm.retrieval.proto_gen import retriever_pb2 as pb
from ralmspec_vllm.types import BM25Params, Document, Hit, RetrieverInfo


class InvalidField(ValueError):
    """A request field is malformed; becomes INVALID_ARGUMENT with ``"<field>: <reason>"``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def embeddings_to_proto(vectors: np.ndarray) -> pb.Embeddings:
    """A 2-D float array as packed little-endian float32 rows."""
    arr = np.ascontiguousarray(vectors, dtype="<f4")
    if arr.ndim != 2:
        raise ValueError(f"vectors: expected a 2-D array, got shape {arr.shape}")
    return pb.Embeddings(dim=arr.shape[1], float32_le=arr.tobytes())


def embeddings_from_proto(msg: pb.Embeddings, field: str) -> np.ndarray:
    """The (count, dim) float32 matrix in ``msg``; ``InvalidField`` if it is malformed."""
    if msg.dim < 1:
        raise InvalidField(f"{field}.dim", f"must be >= 1, got {msg.dim}")
    if msg.float32_le and msg.values:
        raise InvalidField(field, "set either float32_le or values, not both")
    if msg.float32_le:
        row_bytes = 4 * msg.dim
        if len(msg.float32_le) % row_bytes:
            raise InvalidField(
                f"{field}.float32_le",
                f"{len(msg.float32_le)} bytes is not a multiple of 4 * dim = {row_bytes}",
            )
        flat = np.frombuffer(msg.float32_le, dtype="<f4")
    else:
        if len(msg.values) % msg.dim:
            raise InvalidField(
                f"{field}.values", f"{len(msg.values)} values is not a multiple of dim={msg.dim}"
            )
        flat = np.asarray(msg.values, dtype=np.float32)
    if flat.size == 0:
        raise InvalidField(field, "no vectors given")
    if not np.isfinite(flat).all():
        raise InvalidField(field, "contains NaN or infinite values")
    return flat.astype(np.float32, copy=False).reshape(-1, msg.dim)


def hits_to_proto(hits: Sequence[Hit], vectors: np.ndarray | None = None) -> pb.QueryHits:
    msg = pb.QueryHits(doc_ids=[h.doc_id for h in hits], scores=[h.score for h in hits])
    if vectors is not None:
        msg.vectors.CopyFrom(embeddings_to_proto(vectors))
    return msg


def hits_from_proto(msg: pb.QueryHits) -> list[Hit]:
    return [Hit(int(d), float(s)) for d, s in zip(msg.doc_ids, msg.scores, strict=True)]


def vectors_from_proto(msg: pb.Embeddings, rows: int) -> np.ndarray:
    """Server-sent vectors (trusted); an empty (0, dim) array when ``rows`` is 0."""
    if rows == 0:
        return np.zeros((0, max(msg.dim, 0)), dtype=np.float32)
    return embeddings_from_proto(msg, "vectors")


def document_to_proto(doc: Document) -> pb.Document:
    return pb.Document(doc_id=doc.doc_id, title=doc.title, text=doc.text)


def document_from_proto(msg: pb.Document) -> Document:
    return Document(doc_id=int(msg.doc_id), title=msg.title, text=msg.text)


def info_to_proto(info: RetrieverInfo) -> pb.InfoResponse:
    msg = pb.InfoResponse(
        backend=info.backend,
        num_docs=info.num_docs,
        dim=info.dim,
        metric=info.metric,
        index_dir=info.index_dir,
        extra=dict(info.extra),
    )
    if info.bm25 is not None:
        msg.bm25.CopyFrom(pb.BM25Params(k1=info.bm25.k1, b=info.bm25.b, epsilon=info.bm25.epsilon))
    return msg


def info_from_proto(msg: pb.InfoResponse) -> RetrieverInfo:
    """The hosted retriever's info; server limits are added to ``extra`` as ``service.*``."""
    bm25 = (
        BM25Params(k1=msg.bm25.k1, b=msg.bm25.b, epsilon=msg.bm25.epsilon)
        if msg.HasField("bm25")
        else None
    )
    extra = dict(msg.extra)
    if msg.HasField("limits"):
        lim = msg.limits
        extra.update(
            {
                "service.max_k": str(lim.max_k),
                "service.max_queries": str(lim.max_queries),
                "service.max_doc_ids": str(lim.max_doc_ids),
                "service.max_message_bytes": str(lim.max_message_bytes),
                "service.batch_window_ms": repr(lim.batch_window_ms),
                "service.max_batch": str(lim.max_batch),
            }
        )
    return RetrieverInfo(
        backend=msg.backend,
        num_docs=int(msg.num_docs),
        dim=int(msg.dim),
        metric=msg.metric,
        bm25=bm25,
        index_dir=msg.index_dir,
        extra=extra,
    )
