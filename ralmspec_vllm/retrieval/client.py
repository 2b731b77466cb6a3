"""``RetrieverClient``: the async gRPC client of the retriever service (an ``AsyncRetriever``).

Every call runs with a deadline (``timeout_s``) and is retried with jittered exponential
backoff (``backoff_s`` doubling per attempt, capped at 2 s) on
UNAVAILABLE / DEADLINE_EXCEEDED / RESOURCE_EXHAUSTED, at most ``max_retries`` times; then it
raises ``RetrieverUnavailable``. INVALID_ARGUMENT is never retried and becomes
``RetrieverRequestError`` (a ``ValueError`` naming the field); other statuses become
``RetrieverServerError``. Answers are decoded by ``wire.py`` into the project's own types.
The channel is created lazily, inside the event loop that first uses the client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ralmspec_vllm.auth import RETRIEVER_KEY_ENV
from ralmspec_vllm.retrieval.base import IVFRouting, TermWeights
from ralmspec_vllm.retrieval.batching import BatchStats
from ralmspec_vllm.retrieval.errors import (
    RetrieverRequestError,
    RetrieverServerError,
    RetrieverUnavailable,
)
from ralmspec_vllm.retrieval.proto_gen import retriever_pb2 as pb
from ralmspec_vllm.retrieval.proto_gen import retriever_pb2_grpc as pb_grpc
from ralmspec_vllm.retrieval.service import SERVICE_NAME
from ralmspec_vllm.retrieval.wire import (
    document_from_proto,
    embeddings_from_proto,
    embeddings_to_proto,
    hits_from_proto,
    info_from_proto,
    vectors_from_proto,
)
from ralmspec_vllm.types import Document, Hit, RetrieverInfo

logger = logging.getLogger(__name__)

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
MAX_BACKOFF_S = 2.0


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One query's hits with their index vectors, shape (len(hits), dim)."""

    hits: list[Hit]
    vectors: np.ndarray


class RetrieverClient:
    """Async client of ``ralmspec.retriever.v1.Retriever`` at ``target`` ("host:port")."""

    def __init__(
        self,
        target: str,
        *,
        timeout_s: float = 5.0,
        max_retries: int = 3,
        backoff_s: float = 0.05,
        max_message_bytes: int = 64 * 1024 * 1024,
        api_key: str | None = None,
    ) -> None:
        """``api_key``: sent as ``authorization: Bearer <key>`` on every retriever RPC (a
        service started with API keys refuses calls without one: UNAUTHENTICATED, not
        retried, ``RetrieverServerError``); ``None``: ``$RALMSPEC_RETRIEVER_API_KEY`` if
        set (the variable ``retriever serve`` takes its key from); ``""``: none."""
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if not backoff_s >= 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        self.target = target
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Reconnect quickly after a server restart instead of grpc's 1 s+ backoff.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        if api_key is None:
            api_key = os.environ.get(RETRIEVER_KEY_ENV)
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.RetrieverStub | None = None
        self._dim: int | None = None
        self.on_call: Callable[[str], None] | None = None
        """Called with the RPC's name once per call (not per retry): the server counts its
        calls by RPC this way (``ralmspec_retriever_calls_total``)."""

    # -- lifecycle ------------------------------------------------------------------------

    def _connect(self) -> pb_grpc.RetrieverStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
            self._stub = pb_grpc.RetrieverStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None

    async def __aenter__(self) -> RetrieverClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Wait until the health service reports SERVING, or raise ``RetrieverUnavailable``."""
        self._connect()
        assert self._channel is not None
        stub = health_pb2_grpc.HealthStub(self._channel)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        attempts, last = 0, "NO_ATTEMPT"
        while (remaining := deadline - loop.time()) > 0:
            attempts += 1
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME),
                    timeout=remaining,
                    wait_for_ready=True,
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as err:
                last = err.code().name
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        raise RetrieverUnavailable(self.target, "Health.Check", attempts, last, "not SERVING")

    # -- AsyncRetriever ---------------------------------------------------------------------

    async def info(self) -> RetrieverInfo:
        """The hosted retriever's info; server limits appear in ``extra`` as ``service.*``."""
        info = info_from_proto(await self._call("Info", pb.InfoRequest()))
        self._dim = info.dim
        return info

    async def stats(self) -> BatchStats:
        """The server's cross-request batching counters and its backend's work counters."""
        msg = await self._call("Info", pb.InfoRequest())
        s = msg.stats
        return BatchStats(
            backend=dict(msg.backend_counters),
            search_calls=s.search_calls,
            index_searches=s.index_searches,
            queries=s.queries,
            max_merged_calls=s.max_merged_calls,
            max_merged_queries=s.max_merged_queries,
            search_seconds=s.search_seconds,
        )

    async def reset_caches(self) -> int:
        """Empty the server's query-encoder memo (``ResetCaches``): the encodings dropped."""
        reply = await self._call("ResetCaches", pb.ResetCachesRequest())
        return int(reply.encoder_memo_entries)

    async def encode(self, queries: Sequence[str], *, timeout_s: float | None = None) -> np.ndarray:
        """Query embeddings (n, dim) from the server's encoder, exactly as Search uses them."""
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not one string")
        if len(queries) == 0:
            dim = self._dim if self._dim is not None else (await self.info()).dim
            return np.zeros((0, dim), dtype=np.float32)
        reply = await self._call("Encode", pb.EncodeRequest(texts=list(queries)), timeout_s)
        return vectors_from_proto(reply.embeddings, len(queries))

    async def search(
        self,
        queries: Sequence[str],
        k: int,
        prefetch: int = 0,
        *,
        timeout_s: float | None = None,
    ) -> list[list[Hit]]:
        """Top-k hits per query text (score desc, doc id asc), then up to ``prefetch`` more
        (``SearchRequest.prefetch``)."""
        if isinstance(queries, str):
            raise TypeError("queries must be a sequence of strings, not one string")
        if len(queries) == 0:
            return []
        request = pb.SearchRequest(
            text=pb.TextQueries(texts=list(queries)), top_k=k, prefetch=prefetch
        )
        reply = await self._call("Search", request, timeout_s)
        return [hits_from_proto(r) for r in reply.results]

    async def search_vectors(
        self,
        vectors: np.ndarray,
        k: int,
        prefetch: int = 0,
        *,
        timeout_s: float | None = None,
    ) -> list[list[Hit]]:
        """Top-k (+ ``prefetch``) hits per query embedding, ``vectors`` of shape (n, dim)
        (or (dim,))."""
        arr = _as_matrix(vectors)
        if len(arr) == 0:
            return []
        request = pb.SearchRequest(embeddings=embeddings_to_proto(arr), top_k=k, prefetch=prefetch)
        reply = await self._call("Search", request, timeout_s)
        return [hits_from_proto(r) for r in reply.results]

    async def search_with_vectors(
        self,
        queries: Sequence[str] | np.ndarray,
        k: int,
        prefetch: int = 0,
        *,
        timeout_s: float | None = None,
    ) -> list[SearchResult]:
        """Like ``search``/``search_vectors`` (texts or an embedding matrix), plus each hit's
        index vector, in one round trip (dense backends only)."""
        if isinstance(queries, np.ndarray):
            arr = _as_matrix(queries)
            if len(arr) == 0:
                return []
            request = pb.SearchRequest(
                embeddings=embeddings_to_proto(arr),
                top_k=k,
                prefetch=prefetch,
                return_vectors=True,
            )
        else:
            if len(queries) == 0:
                return []
            request = pb.SearchRequest(
                text=pb.TextQueries(texts=list(queries)),
                top_k=k,
                prefetch=prefetch,
                return_vectors=True,
            )
        reply = await self._call("Search", request, timeout_s)
        return [
            SearchResult(hits_from_proto(r), vectors_from_proto(r.vectors, len(r.doc_ids)))
            for r in reply.results
        ]

    async def score(
        self, query: str | np.ndarray, doc_ids: Sequence[int], *, timeout_s: float | None = None
    ) -> list[float]:
        """The knowledge base's score of each doc for ``query`` (text or one embedding)."""
        if len(doc_ids) == 0:
            return []
        ids = [int(d) for d in doc_ids]
        if isinstance(query, str):
            request = pb.ScoreRequest(text=query, doc_ids=ids)
        else:
            request = pb.ScoreRequest(embedding=embeddings_to_proto(_as_matrix(query)), doc_ids=ids)
        reply = await self._call("Score", request, timeout_s)
        return list(reply.scores)

    async def documents(
        self, doc_ids: Sequence[int], *, timeout_s: float | None = None
    ) -> list[Document]:
        if len(doc_ids) == 0:
            return []
        request = pb.GetDocumentsRequest(doc_ids=[int(d) for d in doc_ids])
        reply = await self._call("GetDocuments", request, timeout_s)
        return [document_from_proto(d) for d in reply.documents]

    async def vectors(
        self, doc_ids: Sequence[int], *, timeout_s: float | None = None
    ) -> np.ndarray | None:
        """Document index vectors (n, dim) for dense backends; ``None`` for sparse ones."""
        if len(doc_ids) == 0:
            dim = self._dim if self._dim is not None else (await self.info()).dim
            return np.zeros((0, dim), dtype=np.float32) if dim > 0 else None
        request = pb.GetVectorsRequest(doc_ids=[int(d) for d in doc_ids])
        reply = await self._call("GetVectors", request, timeout_s)
        if not reply.available:
            return None
        return vectors_from_proto(reply.vectors, len(doc_ids))

    async def term_weights(
        self, doc_ids: Sequence[int], *, timeout_s: float | None = None
    ) -> list[TermWeights] | None:
        """Each document's distinct terms and weights for BM25 backends; ``None`` for the
        others."""
        if len(doc_ids) == 0:
            return []
        request = pb.GetTermWeightsRequest(doc_ids=[int(d) for d in doc_ids])
        reply = await self._call("GetTermWeights", request, timeout_s)
        if not reply.available:
            return None
        return [(list(d.terms), np.asarray(d.weights, dtype=np.float64)) for d in reply.docs]

    async def routing(self, *, timeout_s: float | None = None) -> IVFRouting | None:
        """How an IVF backend routes a query (``base.IVFRouting``); ``None`` for the others,
        and for a server older than the RPC (then guesses rank every cached document)."""
        try:
            reply = await self._call("GetRouting", pb.GetRoutingRequest(), timeout_s)
        except RetrieverServerError as err:
            if err.status != grpc.StatusCode.UNIMPLEMENTED.name:
                raise
            logger.info("%s serves no GetRouting: guesses rank every cached document", self.target)
            return None
        if not reply.available:
            return None
        centroids = embeddings_from_proto(reply.centroids, "centroids")
        return IVFRouting(np.ascontiguousarray(centroids, dtype=np.float32), reply.nprobe)

    async def lists(
        self, doc_ids: Sequence[int], *, timeout_s: float | None = None
    ) -> np.ndarray | None:
        """Each document's inverted list for IVF backends; ``None`` for the others."""
        if len(doc_ids) == 0:
            return np.zeros(0, dtype=np.int64)
        request = pb.GetListsRequest(doc_ids=[int(d) for d in doc_ids])
        reply = await self._call("GetLists", request, timeout_s)
        if not reply.available:
            return None
        return np.asarray(reply.lists, dtype=np.int64)

    # -- transport --------------------------------------------------------------------------

    async def _call(self, method: str, request: Any, timeout_s: float | None = None) -> Any:
        rpc = getattr(self._connect(), method)
        if self.on_call is not None:
            self.on_call(method)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        attempt = 0
        while True:
            attempt += 1
            try:
                return await rpc(request, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                code, details = err.code(), err.details() or ""
                if code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise RetrieverRequestError(self.target, method, details) from None
                if code not in RETRYABLE:
                    raise RetrieverServerError(self.target, method, code.name, details) from err
                if attempt > self.max_retries:
                    raise RetrieverUnavailable(
                        self.target, method, attempt, code.name, details
                    ) from err
                # Exponential, capped, with "equal jitter" (half fixed, half random) so
                # clients restarted together do not retry in lockstep.
                ceiling = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                delay = ceiling * (0.5 + 0.5 * random.random())
                logger.debug(
                    "%s on %s: %s (attempt %d), retrying in %.3f s",
                    method,
                    self.target,
                    code.name,
                    attempt,
                    delay,
                )
                await asyncio.sleep(delay)


def _as_matrix(vectors: np.ndarray) -> np.ndarray:
    arr = np.asarray(vectors, dtype=np.float32)
    return arr[None, :] if arr.ndim == 1 else arr
