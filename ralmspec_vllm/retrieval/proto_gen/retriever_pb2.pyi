from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Embeddings(_message.Message):
    __slots__ = ("dim", "float32_le", "values")
    DIM_FIELD_NUMBER: _ClassVar[int]
    FLOAT32_LE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    dim: int
    float32_le: bytes
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, dim: _Optional[int] = ..., float32_le: _Optional[bytes] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class TextQueries(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("text", "embeddings", "top_k", "return_vectors", "prefetch")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    RETURN_VECTORS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_FIELD_NUMBER: _ClassVar[int]
    text: TextQueries
    embeddings: Embeddings
    top_k: int
    return_vectors: bool
    prefetch: int
    def __init__(self, text: _Optional[_Union[TextQueries, _Mapping]] = ..., embeddings: _Optional[_Union[Embeddings, _Mapping]] = ..., top_k: _Optional[int] = ..., return_vectors: bool = ..., prefetch: _Optional[int] = ...) -> None: ...

class QueryHits(_message.Message):
    __slots__ = ("doc_ids", "scores", "vectors")
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    doc_ids: _containers.RepeatedScalarFieldContainer[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    vectors: Embeddings
    def __init__(self, doc_ids: _Optional[_Iterable[int]] = ..., scores: _Optional[_Iterable[float]] = ..., vectors: _Optional[_Union[Embeddings, _Mapping]] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[QueryHits]
    def __init__(self, results: _Optional[_Iterable[_Union[QueryHits, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("text", "embedding", "doc_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_FIELD_NUMBER: _ClassVar[int]
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    embedding: Embeddings
    doc_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., embedding: _Optional[_Union[Embeddings, _Mapping]] = ..., doc_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores",)
    SCORES_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, scores: _Optional[_Iterable[float]] = ...) -> None: ...

class GetDocumentsRequest(_message.Message):
    __slots__ = ("doc_ids",)
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    doc_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, doc_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("doc_id", "title", "text")
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    doc_id: int
    title: str
    text: str
    def __init__(self, doc_id: _Optional[int] = ..., title: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class GetDocumentsResponse(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    def __init__(self, documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ...) -> None: ...

class GetVectorsRequest(_message.Message):
    __slots__ = ("doc_ids",)
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    doc_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, doc_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetVectorsResponse(_message.Message):
    __slots__ = ("available", "vectors")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    VECTORS_FIELD_NUMBER: _ClassVar[int]
    available: bool
    vectors: Embeddings
    def __init__(self, available: bool = ..., vectors: _Optional[_Union[Embeddings, _Mapping]] = ...) -> None: ...

class GetTermWeightsRequest(_message.Message):
    __slots__ = ("doc_ids",)
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    doc_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, doc_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DocTermWeights(_message.Message):
    __slots__ = ("terms", "weights")
    TERMS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    terms: _containers.RepeatedScalarFieldContainer[str]
    weights: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, terms: _Optional[_Iterable[str]] = ..., weights: _Optional[_Iterable[float]] = ...) -> None: ...

class GetTermWeightsResponse(_message.Message):
    __slots__ = ("available", "docs")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    DOCS_FIELD_NUMBER: _ClassVar[int]
    available: bool
    docs: _containers.RepeatedCompositeFieldContainer[DocTermWeights]
    def __init__(self, available: bool = ..., docs: _Optional[_Iterable[_Union[DocTermWeights, _Mapping]]] = ...) -> None: ...

class EncodeRequest(_message.Message):
    __slots__ = ("texts",)
    TEXTS_FIELD_NUMBER: _ClassVar[int]
    texts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, texts: _Optional[_Iterable[str]] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("embeddings",)
    EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    embeddings: Embeddings
    def __init__(self, embeddings: _Optional[_Union[Embeddings, _Mapping]] = ...) -> None: ...

class ResetCachesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResetCachesResponse(_message.Message):
    __slots__ = ("encoder_memo_entries",)
    ENCODER_MEMO_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    encoder_memo_entries: int
    def __init__(self, encoder_memo_entries: _Optional[int] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BM25Params(_message.Message):
    __slots__ = ("k1", "b", "epsilon")
    K1_FIELD_NUMBER: _ClassVar[int]
    B_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    k1: float
    b: float
    epsilon: float
    def __init__(self, k1: _Optional[float] = ..., b: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_k", "max_queries", "max_doc_ids", "max_message_bytes", "batch_window_ms", "max_batch")
    MAX_K_FIELD_NUMBER: _ClassVar[int]
    MAX_QUERIES_FIELD_NUMBER: _ClassVar[int]
    MAX_DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BATCH_WINDOW_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    max_k: int
    max_queries: int
    max_doc_ids: int
    max_message_bytes: int
    batch_window_ms: float
    max_batch: int
    def __init__(self, max_k: _Optional[int] = ..., max_queries: _Optional[int] = ..., max_doc_ids: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., batch_window_ms: _Optional[float] = ..., max_batch: _Optional[int] = ...) -> None: ...

class BatchStats(_message.Message):
    __slots__ = ("search_calls", "index_searches", "queries", "max_merged_calls", "max_merged_queries", "search_seconds")
    SEARCH_CALLS_FIELD_NUMBER: _ClassVar[int]
    INDEX_SEARCHES_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    MAX_MERGED_CALLS_FIELD_NUMBER: _ClassVar[int]
    MAX_MERGED_QUERIES_FIELD_NUMBER: _ClassVar[int]
    SEARCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    search_calls: int
    index_searches: int
    queries: int
    max_merged_calls: int
    max_merged_queries: int
    search_seconds: float
    def __init__(self, search_calls: _Optional[int] = ..., index_searches: _Optional[int] = ..., queries: _Optional[int] = ..., max_merged_calls: _Optional[int] = ..., max_merged_queries: _Optional[int] = ..., search_seconds: _Optional[float] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("backend", "num_docs", "dim", "metric", "bm25", "index_dir", "extra", "limits", "stats", "backend_counters")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class BackendCountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    NUM_DOCS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    BM25_FIELD_NUMBER: _ClassVar[int]
    INDEX_DIR_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_COUNTERS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    num_docs: int
    dim: int
    metric: str
    bm25: BM25Params
    index_dir: str
    extra: _containers.ScalarMap[str, str]
    limits: Limits
    stats: BatchStats
    backend_counters: _containers.ScalarMap[str, float]
    def __init__(self, backend: _Optional[str] = ..., num_docs: _Optional[int] = ..., dim: _Optional[int] = ..., metric: _Optional[str] = ..., bm25: _Optional[_Union[BM25Params, _Mapping]] = ..., index_dir: _Optional[str] = ..., extra: _Optional[_Mapping[str, str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., stats: _Optional[_Union[BatchStats, _Mapping]] = ..., backend_counters: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GetRoutingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetRoutingResponse(_message.Message):
    __slots__ = ("available", "centroids", "nprobe")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    CENTROIDS_FIELD_NUMBER: _ClassVar[int]
    NPROBE_FIELD_NUMBER: _ClassVar[int]
    available: bool
    centroids: Embeddings
    nprobe: int
    def __init__(self, available: bool = ..., centroids: _Optional[_Union[Embeddings, _Mapping]] = ..., nprobe: _Optional[int] = ...) -> None: ...

class GetListsRequest(_message.Message):
    __slots__ = ("doc_ids",)
    DOC_IDS_FIELD_NUMBER: _ClassVar[int]
    doc_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, doc_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GetListsResponse(_message.Message):
    __slots__ = ("available", "lists")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    LISTS_FIELD_NUMBER: _ClassVar[int]
    available: bool
    lists: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, available: bool = ..., lists: _Optional[_Iterable[int]] = ...) -> None: ...
