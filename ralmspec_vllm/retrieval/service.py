"""The gRPC servicer: one in-process ``Retriever`` behind ``ralmspec.retriever.v1.Retriever``.

Data flow: a request is validated first (``InvalidField`` -> INVALID_ARGUMENT naming the
field; the server keeps serving), then Search goes through a ``SearchLane`` (text queries
and embedding queries batch separately, see ``batching.py``) while Score, GetDocuments,
GetVectors, GetTermWeights, GetRouting and GetLists run directly in a worker thread. Answers
are encoded by ``wire.py``.
Unexpected backend failures become INTERNAL and are logged with their traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import grpc
import numpy as np

from ralmspec_vllm.retrieval.base import (
    DenseRetriever,
    Retriever,
    RoutedRetriever,
    TermWeightRetriever,
    reset_caches,
)
from ralmspec_vllm.retrieval.batching import BatchStats, SearchLane
from ralmspec_vllm.retrieval.proto_gen import retriever_pb2 as pb
from ralmspec_vllm.retrieval.proto_gen import retriever_pb2_grpc as pb_grpc
from ralmspec_vllm.retrieval.wire import (
    InvalidField,
    document_to_proto,
    embeddings_from_proto,
    embeddings_to_proto,
    hits_to_proto,
    info_to_proto,
)
from ralmspec_vllm.types import Hit

logger = logging.getLogger(__name__)

SERVICE_NAME = "ralmspec.retriever.v1.Retriever"
# Backends whose top-k is always a prefix of their top-k' (k < k'): Search calls with
# different k may share one index search. Others (HNSW, IVF) merge only equal k.
EXACT_PREFIX_BACKENDS = frozenset({"flat", "bm25"})
UNMERGED_BACKENDS = frozenset({"bm25"})
"""Backends whose lanes search one request at a time (``SearchLane(merging=False)``): a BM25
batch costs the sum of its queries, each already searched on every thread."""
Req = TypeVar("Req")
Resp = TypeVar("Resp")


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """Batching and request limits of the retriever service."""

    batch_window_ms: float = 2.0
    """How long the first queued Search waits for others to merge with (0 = no waiting)."""
    max_batch: int = 256
    """Most queries merged into one index search (a single larger request still runs)."""
    max_k: int = 1000
    """Largest top_k a Search may ask for."""
    max_queries: int = 1024
    """Most queries in one Search request."""
    max_doc_ids: int = 10_000
    """Most doc ids in one Score / GetDocuments / GetVectors / GetTermWeights / GetLists
    request."""
    max_message_bytes: int = 64 * 1024 * 1024
    """gRPC send/receive message limit; Search with vectors is refused if it would exceed it."""
    max_concurrent_rpcs: int = 0
    """RPCs in flight before the server answers RESOURCE_EXHAUSTED (0 = unlimited)."""
    merge_searches: bool | None = None
    """Whether concurrent Search calls may share one index search: ``None`` by backend
    (all but ``UNMERGED_BACKENDS``); ``False`` answers each call with its own search, oldest
    first (the first caller never waits for the others' queries); ``True`` merges BM25 too."""

    def __post_init__(self) -> None:
        if not self.batch_window_ms >= 0:
            raise ValueError(f"batch_window_ms must be >= 0, got {self.batch_window_ms}")
        for name in ("max_batch", "max_k", "max_queries", "max_doc_ids"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_concurrent_rpcs < 0:
            raise ValueError(f"max_concurrent_rpcs must be >= 0, got {self.max_concurrent_rpcs}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")


def _concat_texts(parts: list[list[str]]) -> list[str]:
    return [text for part in parts for text in part]


def _concat_vectors(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


class RetrieverService(pb_grpc.RetrieverServicer):
    """Serves one retriever; create it inside the event loop that runs the server."""

    def __init__(self, retriever: Retriever, config: ServiceConfig | None = None) -> None:
        self.retriever = retriever
        self.config = config or ServiceConfig()
        self.info = retriever.info
        self.dense: DenseRetriever | None = (
            retriever if isinstance(retriever, DenseRetriever) and self.info.dim > 0 else None
        )
        # One thread per lane: a lane runs one index search at a time (batching while busy),
        # except over a circular scan, where batches board the shared walk as they come.
        overlapping = self.info.extra.get("scan") == "circular"
        self._executor = ThreadPoolExecutor(
            max_workers=64 if overlapping else 2, thread_name_prefix="retriever-search"
        )
        window_s = self.config.batch_window_ms / 1000.0
        mixed_k = self.info.backend in EXACT_PREFIX_BACKENDS
        merging = self.config.merge_searches
        if merging is None:
            merging = self.info.backend not in UNMERGED_BACKENDS
        self.text_lane: SearchLane[list[str]] = SearchLane(
            "text",
            retriever.search,
            _concat_texts,
            window_s=window_s,
            max_batch=self.config.max_batch,
            executor=self._executor,
            mixed_k=mixed_k,
            overlapping=overlapping,
            merging=merging,
        )
        self.vector_lane: SearchLane[np.ndarray] | None = None
        if self.dense is not None:
            self.vector_lane = SearchLane(
                "vector",
                self.dense.search_vectors,
                _concat_vectors,
                window_s=window_s,
                max_batch=self.config.max_batch,
                executor=self._executor,
                mixed_k=mixed_k,
                overlapping=overlapping,
                merging=merging,
            )

    @property
    def stats(self) -> BatchStats:
        """Batching counters over both lanes."""
        stats = self.text_lane.stats
        return stats + self.vector_lane.stats if self.vector_lane is not None else stats

    async def close(self) -> None:
        await self.text_lane.close()
        if self.vector_lane is not None:
            await self.vector_lane.close()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- RPCs -------------------------------------------------------------------------------

    async def Search(
        self, request: pb.SearchRequest, context: grpc.aio.ServicerContext
    ) -> pb.SearchResponse:
        return await self._guard("Search", self._search, request, context)

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        return await self._guard("Score", self._score, request, context)

    async def GetDocuments(
        self, request: pb.GetDocumentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDocumentsResponse:
        return await self._guard("GetDocuments", self._documents, request, context)

    async def GetVectors(
        self, request: pb.GetVectorsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetVectorsResponse:
        return await self._guard("GetVectors", self._vectors, request, context)

    async def Encode(
        self, request: pb.EncodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.EncodeResponse:
        return await self._guard("Encode", self._encode, request, context)

    async def GetTermWeights(
        self, request: pb.GetTermWeightsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTermWeightsResponse:
        return await self._guard("GetTermWeights", self._term_weights, request, context)

    async def GetRouting(
        self, request: pb.GetRoutingRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRoutingResponse:
        return await self._guard("GetRouting", self._routing, request, context)

    async def GetLists(
        self, request: pb.GetListsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetListsResponse:
        return await self._guard("GetLists", self._lists, request, context)

    async def ResetCaches(
        self, request: pb.ResetCachesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResetCachesResponse:
        return await self._guard("ResetCaches", self._reset_caches, request, context)

    async def Info(
        self, request: pb.InfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.InfoResponse:
        msg = info_to_proto(self.info)
        cfg = self.config
        msg.limits.CopyFrom(
            pb.Limits(
                max_k=cfg.max_k,
                max_queries=cfg.max_queries,
                max_doc_ids=cfg.max_doc_ids,
                max_message_bytes=cfg.max_message_bytes,
                batch_window_ms=cfg.batch_window_ms,
                max_batch=cfg.max_batch,
            )
        )
        s = self.stats
        msg.stats.CopyFrom(
            pb.BatchStats(
                search_calls=s.search_calls,
                index_searches=s.index_searches,
                queries=s.queries,
                max_merged_calls=s.max_merged_calls,
                max_merged_queries=s.max_merged_queries,
                search_seconds=s.search_seconds,
            )
        )
        counters = getattr(self.retriever, "counters", None)
        if counters is not None:
            msg.backend_counters.update(counters())
        return msg

    # -- implementation ---------------------------------------------------------------------

    async def _guard(
        self,
        method: str,
        handler: Callable[[Req], Awaitable[Resp]],
        request: Req,
        context: grpc.aio.ServicerContext,
    ) -> Resp:
        try:
            return await handler(request)
        except InvalidField as exc:
            logger.debug("%s rejected: %s", method, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:
            logger.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        raise AssertionError("unreachable: context.abort raises")

    async def _search(self, request: pb.SearchRequest) -> pb.SearchResponse:
        kind = request.WhichOneof("queries")
        if kind is None:
            raise InvalidField("queries", "missing: set text or embeddings")
        k, prefetch = request.top_k, request.prefetch
        if not 1 <= k <= self.config.max_k:
            raise InvalidField("top_k", f"must be in [1, {self.config.max_k}], got {k}")
        if not 0 <= prefetch <= self.config.max_k - k:
            raise InvalidField(
                "prefetch",
                f"must be in [0, max_k - top_k = {self.config.max_k - k}], got {prefetch}",
            )
        hits: list[list[Hit]]
        if kind == "text":
            texts = self._check_texts(request.text.texts)
            self._check_vectors_fit(request.return_vectors, len(texts), k + prefetch)
            hits = await self.text_lane.submit(texts, len(texts), k, prefetch)
        else:
            vectors = self._check_embeddings(request.embeddings, "embeddings")
            self._check_vectors_fit(request.return_vectors, len(vectors), k + prefetch)
            assert self.vector_lane is not None
            hits = await self.vector_lane.submit(vectors, len(vectors), k, prefetch)
        if not request.return_vectors:
            return pb.SearchResponse(results=[hits_to_proto(row) for row in hits])
        assert self.dense is not None
        ids = [h.doc_id for row in hits for h in row]
        flat = await asyncio.to_thread(self.dense.vectors, ids)
        results, offset = [], 0
        for row in hits:
            results.append(hits_to_proto(row, flat[offset : offset + len(row)]))
            offset += len(row)
        return pb.SearchResponse(results=results)

    async def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        kind = request.WhichOneof("query")
        ids = self._check_doc_ids(request.doc_ids)
        if kind == "text":
            if not request.text.strip():
                raise InvalidField("text", "query is empty")
            scores = await asyncio.to_thread(self.retriever.score, request.text, ids)
        elif kind == "embedding":
            query = self._check_embeddings(request.embedding, "embedding")
            if len(query) != 1:
                raise InvalidField("embedding", f"expected exactly 1 vector, got {len(query)}")
            scores = await asyncio.to_thread(self._score_vector, query[0], ids)
        else:
            raise InvalidField("query", "missing: set text or embedding")
        return pb.ScoreResponse(scores=scores)

    def _score_vector(self, query: np.ndarray, ids: list[int]) -> list[float]:
        # Only the backend's own scoring function is acceptable (the speculation cache must
        # see exactly the scores Search reports), so there is no generic fallback.
        scorer = getattr(self.dense, "score_vector", None)
        if scorer is None:
            raise InvalidField("embedding", f"the {self.info.backend!r} backend scores text only")
        return [float(s) for s in scorer(query, ids)]

    async def _documents(self, request: pb.GetDocumentsRequest) -> pb.GetDocumentsResponse:
        ids = self._check_doc_ids(request.doc_ids)
        docs = await asyncio.to_thread(self.retriever.documents, ids)
        return pb.GetDocumentsResponse(documents=[document_to_proto(d) for d in docs])

    async def _vectors(self, request: pb.GetVectorsRequest) -> pb.GetVectorsResponse:
        ids = self._check_doc_ids(request.doc_ids)
        if self.dense is None:
            return pb.GetVectorsResponse(available=False)
        if len(ids) * self.info.dim * 4 > self.config.max_message_bytes - 1024:
            raise InvalidField("doc_ids", f"{len(ids)} vectors exceed the message size limit")
        vectors = await asyncio.to_thread(self.dense.vectors, ids)
        return pb.GetVectorsResponse(available=True, vectors=embeddings_to_proto(vectors))

    async def _term_weights(self, request: pb.GetTermWeightsRequest) -> pb.GetTermWeightsResponse:
        ids = self._check_doc_ids(request.doc_ids)
        if not isinstance(self.retriever, TermWeightRetriever):
            return pb.GetTermWeightsResponse(available=False)
        docs = await asyncio.to_thread(self.retriever.term_weights, ids)
        return pb.GetTermWeightsResponse(
            available=True,
            docs=[pb.DocTermWeights(terms=terms, weights=weights) for terms, weights in docs],
        )

    async def _routing(self, request: pb.GetRoutingRequest) -> pb.GetRoutingResponse:
        if not isinstance(self.retriever, RoutedRetriever):
            return pb.GetRoutingResponse(available=False)
        routing = await asyncio.to_thread(self.retriever.routing)
        if routing.centroids.nbytes > self.config.max_message_bytes - 1024:
            logger.warning(
                "GetRouting: %d centroids exceed the %d-byte message limit; clients' guesses "
                "rank every cached document",
                len(routing.centroids),
                self.config.max_message_bytes,
            )
            return pb.GetRoutingResponse(available=False)
        return pb.GetRoutingResponse(
            available=True,
            centroids=embeddings_to_proto(routing.centroids),
            nprobe=routing.nprobe,
        )

    async def _lists(self, request: pb.GetListsRequest) -> pb.GetListsResponse:
        ids = self._check_doc_ids(request.doc_ids)
        if not isinstance(self.retriever, RoutedRetriever):
            return pb.GetListsResponse(available=False)
        lists = await asyncio.to_thread(self.retriever.lists, ids)
        return pb.GetListsResponse(available=True, lists=lists.tolist())

    async def _encode(self, request: pb.EncodeRequest) -> pb.EncodeResponse:
        if self.dense is None:
            raise InvalidField("texts", f"the {self.info.backend!r} backend has no encoder")
        texts = self._check_texts(request.texts, "texts")
        vectors = await asyncio.to_thread(self.dense.encode, texts)
        return pb.EncodeResponse(embeddings=embeddings_to_proto(vectors))

    async def _reset_caches(self, request: pb.ResetCachesRequest) -> pb.ResetCachesResponse:
        dropped = await asyncio.to_thread(reset_caches, self.retriever)
        logger.info("caches reset: %d memoised query encodings dropped", dropped)
        return pb.ResetCachesResponse(encoder_memo_entries=dropped)

    # -- validation -------------------------------------------------------------------------

    def _check_texts(self, texts: Sequence[str], field: str = "text.texts") -> list[str]:
        if not texts:
            raise InvalidField(field, "no queries given")
        if len(texts) > self.config.max_queries:
            raise InvalidField(
                field, f"{len(texts)} queries exceed the limit of {self.config.max_queries}"
            )
        for i, text in enumerate(texts):
            if not text.strip():
                raise InvalidField(f"{field}[{i}]", "query is empty")
        return list(texts)

    def _check_embeddings(self, msg: pb.Embeddings, field: str) -> np.ndarray:
        if self.dense is None:
            raise InvalidField(
                field, f"the {self.info.backend!r} backend does not search by embedding"
            )
        if msg.dim != self.info.dim:
            raise InvalidField(f"{field}.dim", f"got {msg.dim}, the index has {self.info.dim}")
        vectors = embeddings_from_proto(msg, field)
        if len(vectors) > self.config.max_queries:
            raise InvalidField(
                field, f"{len(vectors)} queries exceed the limit of {self.config.max_queries}"
            )
        return vectors

    def _check_vectors_fit(self, return_vectors: bool, n: int, k: int) -> None:
        if not return_vectors:
            return
        if self.dense is None:
            raise InvalidField(
                "return_vectors", f"the {self.info.backend!r} backend has no vectors"
            )
        size = n * k * (self.info.dim * 4 + 24)
        if size > self.config.max_message_bytes - 1024:
            raise InvalidField(
                "return_vectors",
                f"the answer would be ~{size} bytes, over the {self.config.max_message_bytes} "
                "byte message limit: ask for fewer queries or a smaller top_k",
            )

    def _check_doc_ids(self, doc_ids: Sequence[int]) -> list[int]:
        ids = list(doc_ids)
        if not ids:
            raise InvalidField("doc_ids", "no doc ids given")
        if len(ids) > self.config.max_doc_ids:
            raise InvalidField(
                "doc_ids", f"{len(ids)} ids exceed the limit of {self.config.max_doc_ids}"
            )
        n = self.info.num_docs
        unknown = [d for d in ids if not 0 <= d < n]
        if unknown:
            raise InvalidField(
                "doc_ids", f"unknown doc id(s) {unknown[:5]} (the index has ids 0..{n - 1})"
            )
        return ids
