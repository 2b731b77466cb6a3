"""The per-request speculation cache: documents seen so far, ranked like the knowledge base.

Data flow: verified retrieval results are ``insert``-ed (top-1, or top-k with prefetching);
at each speculative retrieval point the cache ranks its documents for the current query and
the top-1 is the speculated document. Ranking uses the knowledge base's own scoring function,
through one of two ``CacheScorer``s:

- ``DenseCacheScorer``: the query embedding from an injected encoder, the knowledge base's
  exact inner product with the cached documents' own index vectors (held in a numpy matrix:
  one float32 product, exact re-scoring of the few rows that could be the best).
- ``RetrieverCacheScorer``: ``AsyncRetriever.score(query, cached_ids)``, i.e. the knowledge
  base's scores with corpus-wide statistics (what BM25 needs: a BM25 fitted on the cache
  alone would rank differently).
- ``TermWeightCacheScorer`` (BM25): each cached document's term weights, fetched once when
  it is inserted (``AsyncRetriever.term_weights``: the retriever's own stored weights, with
  corpus-wide statistics), summed here per query in the query's term order, the same float
  additions in the same order as the retriever's ``score``: bit for bit its scores, without
  a call per step (at 21M documents a ``score`` call took 14 ms on the H200).

Over an IVF index a dense guess ranks only the cached documents in the lists the query's
search reads (``SpeculationConfig.route_guesses``, ``retrieval.base.IVFRouting``): each
document's list is fetched with its vector, and the query's lists are computed from the
centroids beside its embedding. A document the search cannot reach is no guess. That
product with every centroid is on the guess's path, so by default (``"auto"``) a
``RoutingGate`` shared by the engine's requests routes only while the guesses it changes are
worth it.

Ties break like the knowledge base: score descending, then doc id ascending.

Eviction (bounded ``capacity``): ``lru`` evicts the document whose last use is oldest, a use
being an insert, a re-insert by a later verification, or being the speculated top-1; within
one insert, higher-ranked documents count as more recent. ``fifo`` evicts the oldest insert.
Correctness never depends on the cache: it only decides how often speculation is right.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import numpy as np

from ralmspec_vllm.core.config import Eviction
from ralmspec_vllm.core.encoding import QueryEmbedder, QueryEncoder, ThreadEmbedder
from ralmspec_vllm.core.trace import TraceRecorder
from ralmspec_vllm.retrieval.analyzer import Analyzer
from ralmspec_vllm.retrieval.base import (
    AsyncRetriever,
    IVFRouting,
    TermWeights,
    float32_products,
)
from ralmspec_vllm.retrieval.dense import float32_relative_error, inner_product

logger = logging.getLogger(__name__)


class SpeculationCache:
    """Bounded set of doc ids with optional vectors and use ticks (one request's)."""

    def __init__(
        self, capacity: int, eviction: Eviction = "lru", score_recent: int | None = None
    ) -> None:
        """``score_recent``: what ``scored_ids`` returns at most (the most recently used)."""
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        if score_recent is not None and score_recent < 1:
            raise ValueError(f"score_recent must be positive, got {score_recent}")
        self.capacity = capacity
        self.eviction = eviction
        self.score_recent = score_recent
        self._ids = np.empty(capacity, dtype=np.int64)
        self._ticks = np.empty(capacity, dtype=np.int64)
        self._norms = np.zeros(capacity, dtype=np.float64)
        self._vectors: np.ndarray | None = None
        self._lists: np.ndarray | None = None
        self._dense: bool | None = None
        self._slot: dict[int, int] = {}
        self._terms: CachedTermWeights | None = None
        self._size = 0
        self._clock = 0
        self.evictions = 0
        self.route: Literal["always", "auto"] = "always"
        """With lists inserted, whether a dense guess always ranks within the query's probed
        lists, or as ``RoutingGate`` decides (``SpeculationConfig.route_guesses``)."""

    def __len__(self) -> int:
        return self._size

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self._slot

    @property
    def doc_ids(self) -> np.ndarray:
        """Cached doc ids in slot order (a copy)."""
        return self._ids[: self._size].copy()

    def scored_ids(self) -> np.ndarray:
        """The doc ids a retriever-side scoring ranks (a copy, ascending): every cached one,
        or the ``score_recent`` most recently used (ties of use: any)."""
        n = self.score_recent
        if n is None or self._size <= n:
            return np.sort(self._ids[: self._size])
        recent = np.argpartition(self._ticks[: self._size], self._size - n)[self._size - n :]
        return np.sort(self._ids[recent])

    @property
    def vectors(self) -> np.ndarray | None:
        """Vectors aligned with ``doc_ids`` (a view), or ``None`` when none were inserted."""
        return None if self._vectors is None else self._vectors[: self._size]

    @property
    def lists(self) -> np.ndarray | None:
        """Each cached document's IVF list, aligned with ``doc_ids`` (a view), or ``None``
        when documents were inserted without lists."""
        return None if self._lists is None else self._lists[: self._size]

    @property
    def max_vector_norm(self) -> float:
        """Largest Euclidean norm among the cached vectors (0.0 when empty)."""
        return float(self._norms[: self._size].max()) if self._size else 0.0

    def missing(self, doc_ids: Sequence[int]) -> list[int]:
        """Those of ``doc_ids`` not cached, first occurrence order, no duplicates."""
        return [d for d in dict.fromkeys(doc_ids) if d not in self._slot]

    def insert(
        self,
        doc_ids: Sequence[int],
        vectors: Mapping[int, np.ndarray] | None = None,
        terms: Mapping[int, TermWeights] | None = None,
        lists: Mapping[int, int] | None = None,
    ) -> None:
        """Insert in priority order (best first). ``vectors`` maps each doc id not cached yet
        to its index vector (dense scoring), ``terms`` to its term weights (BM25 scoring
        here), ``lists`` to its IVF list (routed guesses; all inserts with or all without);
        already cached ones only count as used."""
        if terms is not None and self._terms is None:
            self._terms = CachedTermWeights(self.capacity)
        if lists is not None and self._lists is None:
            if self._size:
                raise ValueError("a cache holds documents all with lists or all without")
            self._lists = np.empty(self.capacity, dtype=np.int64)
        elif lists is None and self._lists is not None:
            raise ValueError("a cache holds documents all with lists or all without")
        if self._size + len(doc_ids) <= self.capacity:
            self._insert_without_eviction(doc_ids, vectors, terms, lists)
        else:
            # Lowest priority first, so the best documents get the newest ticks.
            for i in range(len(doc_ids) - 1, -1, -1):
                self._insert_one(int(doc_ids[i]), vectors, terms, lists)
        if self._terms is not None:
            self._terms.flush()

    def _insert_without_eviction(
        self,
        doc_ids: Sequence[int],
        vectors: Mapping[int, np.ndarray] | None,
        terms: Mapping[int, TermWeights] | None,
        lists: Mapping[int, int] | None,
    ) -> None:
        """``_insert_one`` for each id, lowest priority first, where nothing can be evicted
        (room for every id): the same state, with the array writes done once for all. A
        verified step inserts up to ``prefetch_k`` (256) documents, and one by one that cost
        the server's event loop ~0.5 ms a step (2-core box, session 48)."""
        lru = self.eviction == "lru"
        slot_of = self._slot
        size = self._size
        clock = self._clock
        new_ids: list[int] = []
        new_ticks: list[int] = []
        used: dict[int, int] = {}  # slot -> its last use's tick
        for i in range(len(doc_ids) - 1, -1, -1):
            clock += 1
            doc_id = int(doc_ids[i])
            slot = slot_of.get(doc_id)
            if slot is not None:
                if lru:
                    used[slot] = clock
                continue
            if not _at_hand(doc_id, vectors, terms, lists):
                continue
            # Raises at the first new id if at all (every id of an insert brings the same
            # kinds), before anything of this insert went in.
            self._claim_dense(vectors is not None)
            slot_of[doc_id] = size + len(new_ids)
            new_ids.append(doc_id)
            new_ticks.append(clock)
        self._clock = clock
        if new_ids:
            rows = np.arange(size, size + len(new_ids))
            self._ids[rows] = new_ids
            self._ticks[rows] = new_ticks
            self._size = size + len(new_ids)
            if terms is not None:
                assert self._terms is not None
                for slot, doc_id in zip(rows.tolist(), new_ids, strict=True):
                    self._terms.add(slot, *terms[doc_id])
            if lists is not None:
                assert self._lists is not None
                self._lists[rows] = [lists[d] for d in new_ids]
            if vectors is not None:
                block = np.stack([np.asarray(vectors[d], dtype=np.float32) for d in new_ids])
                self._vector_rows(self._size, block.shape[1])[rows] = block
                v64 = block.astype(np.float64)
                # never under: the 1e-12 covers any order of summation (384 terms: ~4e-14)
                self._norms[rows] = np.sqrt(np.einsum("ij,ij->i", v64, v64)) * (1.0 + 1e-12)
        if used:
            self._ticks[list(used)] = list(used.values())

    def term_scores(self, query_terms: Sequence[str]) -> np.ndarray:
        """Each cached document's score (slot order, like ``doc_ids``) for a query of
        ``query_terms`` from the inserted term weights (``CachedTermWeights.scores``)."""
        if self._terms is None:
            raise ValueError("term scoring needs documents inserted with term weights")
        return self._terms.scores(query_terms, self._size)

    def touch(self, doc_id: int) -> None:
        """Mark a use (LRU only); unknown ids are ignored."""
        slot = self._slot.get(doc_id)
        if slot is not None and self.eviction == "lru":
            self._clock += 1
            self._ticks[slot] = self._clock

    def best(self, scores: np.ndarray, doc_ids: np.ndarray | None = None) -> int | None:
        """Top-1 of ``scores`` (aligned with ``doc_ids``, default the cache's): score
        descending, doc id ascending. ``None`` for an empty candidate set."""
        ids = self._ids[: self._size] if doc_ids is None else doc_ids
        if len(ids) == 0:
            return None
        top = scores.max()
        return int(ids[scores == top].min())

    def best_exact(self, rows: np.ndarray, scores: np.ndarray) -> int | None:
        """Top-1 among slot ``rows`` with ``scores`` (score desc, doc id asc)."""
        return self.best(scores, self._ids[rows]) if len(rows) else None

    def slot(self, doc_id: int) -> int:
        """The row of a cached document in ``doc_ids``, ``vectors`` and ``lists``."""
        return self._slot[doc_id]

    def _insert_one(
        self,
        doc_id: int,
        vectors: Mapping[int, np.ndarray] | None,
        terms: Mapping[int, TermWeights] | None = None,
        lists: Mapping[int, int] | None = None,
    ) -> None:
        self._clock += 1
        slot = self._slot.get(doc_id)
        if slot is not None:
            if self.eviction == "lru":
                self._ticks[slot] = self._clock
            return
        if not _at_hand(doc_id, vectors, terms, lists):
            return
        self._claim_dense(vectors is not None)
        if self._size < self.capacity:
            slot = self._size
            self._size += 1
        else:
            slot = int(np.argmin(self._ticks[: self._size]))
            del self._slot[int(self._ids[slot])]
            self.evictions += 1
            if self._terms is not None:
                self._terms.free(slot)
        self._slot[doc_id] = slot
        self._ids[slot] = doc_id
        self._ticks[slot] = self._clock
        if terms is not None:
            assert self._terms is not None
            self._terms.add(slot, *terms[doc_id])
        if lists is not None:
            assert self._lists is not None
            self._lists[slot] = lists[doc_id]
        if vectors is not None:
            vector = vectors[doc_id]
            self._vector_rows(slot + 1, len(vector))[slot] = vector
            v64 = np.asarray(vector, dtype=np.float64)
            self._norms[slot] = float(np.sqrt(v64 @ v64)) * (1.0 + 1e-12)  # never under

    def _claim_dense(self, dense: bool) -> None:
        """The first document in decides whether the cache holds vectors; the rest agree."""
        if self._dense is None:
            self._dense = dense
        elif self._dense != dense:
            raise ValueError("a cache holds documents all with vectors or all without")

    def _vector_rows(self, rows: int, dim: int) -> np.ndarray:
        """The vector matrix with at least ``rows`` rows (grown by doubling: a request that
        caches few documents never pays for ``capacity`` rows)."""
        vectors = self._vectors
        if vectors is None or len(vectors) < rows:
            grown = np.zeros((min(self.capacity, max(rows, 32, 2 * self._size)), dim), np.float32)
            if vectors is not None:
                grown[: len(vectors)] = vectors
            self._vectors = vectors = grown
        return vectors


def _at_hand(
    doc_id: int,
    vectors: Mapping[int, np.ndarray] | None,
    terms: Mapping[int, TermWeights] | None,
    lists: Mapping[int, int] | None,
) -> bool:
    """Whether an insert has what the cache ranks ``doc_id`` by, for each kind it brings
    (vectors, term weights, lists): a document evicted earlier in the same insert lost its
    fetched entries and is left out."""
    return all(m is None or m.get(doc_id) is not None for m in (vectors, terms, lists))


class CachedTermWeights:
    """The cached documents' term weights as one inverted list: entries (term key, slot,
    weight) kept sorted by key, so a query term's documents are one contiguous range. A term
    key is the term's ``hash`` (this process's: keys never leave it); two distinct terms
    sharing a 64-bit key would only blur a guess, never an answer. Eviction frees a slot by
    bumping its generation: its old entries stop counting at once and are dropped when
    they are half the list. ~20 bytes per (document, distinct term): ~12 MiB for 8,192
    documents of ~70 distinct terms."""

    def __init__(self, capacity: int) -> None:
        self._keys = np.empty(0, dtype=np.int64)
        self._slots = np.empty(0, dtype=np.int32)
        self._gens = np.empty(0, dtype=np.int32)
        self._weights = np.empty(0, dtype=np.float64)
        self._slot_gen = np.zeros(capacity, dtype=np.int32)
        # entries added for each slot's current document (how many ``free`` makes stale)
        self._slot_entries = np.zeros(capacity, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, int, int, np.ndarray]] = []
        self._stale = 0

    def __len__(self) -> int:
        """Entries held, stale ones included."""
        return len(self._keys)

    def add(self, slot: int, terms: Sequence[str], weights: np.ndarray) -> None:
        """Queue a document's distinct terms and weights for ``slot`` (``flush`` merges)."""
        if len(terms) != len(weights):
            raise ValueError(f"{len(terms)} terms but {len(weights)} weights")
        keys = np.fromiter((hash(t) for t in terms), dtype=np.int64, count=len(terms))
        weights = np.asarray(weights, dtype=np.float64)
        self._pending.append((keys, slot, int(self._slot_gen[slot]), weights))
        self._slot_entries[slot] += len(keys)

    def free(self, slot: int) -> None:
        """The document in ``slot`` left the cache: its entries no longer count."""
        self._stale += int(self._slot_entries[slot])
        self._slot_entries[slot] = 0
        self._slot_gen[slot] += 1

    def flush(self) -> None:
        """Merge the queued documents into the sorted list (and drop stale entries when
        they are half of it)."""
        if self._pending:
            pending, self._pending = self._pending, []
            keys = np.concatenate([p[0] for p in pending])
            order = np.argsort(keys, kind="stable")
            keys = keys[order]
            slots = np.concatenate([np.full(len(p[0]), p[1], np.int32) for p in pending])[order]
            gens = np.concatenate([np.full(len(p[0]), p[2], np.int32) for p in pending])[order]
            weights = np.concatenate([p[3] for p in pending])[order]
            at = np.searchsorted(self._keys, keys)
            self._keys = np.insert(self._keys, at, keys)
            self._slots = np.insert(self._slots, at, slots)
            self._gens = np.insert(self._gens, at, gens)
            self._weights = np.insert(self._weights, at, weights)
        if self._stale and 2 * self._stale >= len(self._keys):
            live = self._gens == self._slot_gen[self._slots]
            self._keys, self._slots = self._keys[live], self._slots[live]
            self._gens, self._weights = self._gens[live], self._weights[live]
            self._stale = 0

    def scores(self, query_terms: Sequence[str], size: int) -> np.ndarray:
        """Scores of slots ``0..size-1``: 0.0 plus, for each query term in order
        (repetitions included), the weight of that term in each document that has it:
        the additions, in the order, that the retriever's BM25 ``score`` makes."""
        scores = np.zeros(size, dtype=np.float64)
        keys = self._keys
        for term in query_terms:
            key = hash(term)
            lo = int(np.searchsorted(keys, key, "left"))
            hi = int(np.searchsorted(keys, key, "right"))
            if lo == hi:
                continue
            slots = self._slots[lo:hi]
            live = self._gens[lo:hi] == self._slot_gen[slots]
            scores[slots[live]] += self._weights[lo:hi][live]
        return scores


class CacheScorer(Protocol):
    """Ranks a request's cached documents for a query with the knowledge base's scoring."""

    needs_vectors: bool
    """Whether inserted documents must come with their index vectors."""
    needs_terms: bool
    """Whether inserted documents must come with their term weights."""

    async def top1(
        self, cache: SpeculationCache, query: str, recorder: TraceRecorder
    ) -> int | None: ...


class DenseCacheScorer:
    """The knowledge base's dense score (``retrieval.dense.inner_product``) of the query
    embedding against the cached documents' own vectors.

    A float32 product ranks all cached documents at BLAS speed; only those within its error
    bound of the best are re-scored with the exact, reproducible ``inner_product``. The
    result is exactly the top-1 the knowledge base's score gives (ties: lower doc id), at
    the cost of one small matrix-vector product."""

    needs_vectors = True
    needs_terms = False

    def __init__(
        self,
        encoder: QueryEncoder | None = None,
        in_thread: bool = True,
        *,
        embedder: QueryEmbedder | None = None,
    ) -> None:
        """Embed with ``encoder`` (in a worker thread unless ``in_thread`` is False), or with
        an ``embedder`` such as ``BatchingEmbedder`` (batched across requests)."""
        if embedder is None:
            if encoder is None:
                raise ValueError("encoder or embedder is required")
            embedder = ThreadEmbedder(encoder, in_thread)
        self.embedder = embedder
        self.routing: IVFRouting | None = None
        """The knowledge base's IVF routing (``RaLMEngine`` sets it): a cache holding its
        documents' lists is ranked within the query's probed lists only."""
        self.gate = RoutingGate()
        """Whether routing pays, for caches whose ``route`` is ``"auto"`` (all requests')."""

    async def top1(
        self, cache: SpeculationCache, query: str, recorder: TraceRecorder
    ) -> int | None:
        if len(cache) == 0:
            return None
        start = time.perf_counter()
        q = await self.embedder.embed(query)
        vectors = cache.vectors  # read after the await: consistent with doc ids right now
        if vectors is None:
            raise ValueError("dense cache scoring needs documents inserted with vectors")
        approx = float32_products(vectors, q)  # not BLAS: its threads spin against the scan
        bound = _candidate_bound(q, cache.max_vector_norm)
        best = cache.best_exact(*_exact(q, vectors, approx, bound))
        lists, routing = cache.lists, self.routing
        if best is not None and lists is not None and routing is not None:
            step_s = recorder.lm_time_s / recorder.lm_calls if recorder.lm_calls else None
            if cache.route == "always" or self.gate.wants_probe():
                probe_start = time.perf_counter()
                reachable = np.isin(lists, routing.probed(q))
                reached = bool(reachable[cache.slot(best)])
                self.gate.record(not reached, time.perf_counter() - probe_start, step_s)
                recorder.routed_guesses += 1
                recorder.rerouted_guesses += not reached
                rows = np.flatnonzero(reachable)
                if not reached and len(rows):  # else nothing cached is reachable: a miss
                    found = _exact(q, vectors[rows], approx[rows], bound)
                    best = cache.best_exact(rows[found[0]], found[1])
        recorder.guessed(start)
        return best


class RoutingGate:
    """``route_guesses="auto"``: route a guess only while routing is measured to pay.

    Routing changes a guess only where the exact best cached document lies in a list the
    query's search skips (a sure miss), and costs a product with every centroid on the
    guess's path. The gate keeps the share of such guesses over the last ``window`` probed
    ones and the probe's time, and routes while share x an LM step (what a miss costs at
    least: the step generated again) exceeds the probe's time, with hysteresis. The first
    ``warmup`` guesses are all probed; while routing does not pay, 1 in ``sample_every``
    still is, so a change of knowledge base or load is seen. One gate serves every request
    of an engine: at 1 guess in 16 a single answer holds only a couple of samples."""

    def __init__(self, warmup: int = 32, sample_every: int = 16, window: int = 256) -> None:
        self.warmup = warmup
        self.sample_every = sample_every
        self._unreachable: deque[bool] = deque(maxlen=window)
        self.probe_s: float | None = None
        """Moving average of one probe's seconds (the centroid product and the lookup)."""
        self.step_s: float | None = None
        """Moving average of the LM step's seconds, as the probing requests saw it."""
        self.routing = True
        self._skipped = 0

    @property
    def unreachable_share(self) -> float | None:
        """Share of the probed guesses whose exact best was unreachable."""
        n = len(self._unreachable)
        return sum(self._unreachable) / n if n else None

    @property
    def warm(self) -> bool:
        """Whether the warm-up is over (the gate decides from here on)."""
        return len(self._unreachable) >= self.warmup

    def wants_probe(self) -> bool:
        """Whether this guess is routed (probed)."""
        if self.routing or not self.warm:
            return True
        self._skipped += 1
        if self._skipped >= self.sample_every:
            self._skipped = 0
            return True
        return False

    def record(self, unreachable: bool, probe_s: float, step_s: float | None) -> None:
        """One probed guess: whether its exact best was unreachable, the probe's seconds,
        and its request's mean LM step so far (``None`` before its first)."""
        self._unreachable.append(unreachable)
        self.probe_s = _moving(self.probe_s, probe_s)
        if step_s is not None:
            self.step_s = _moving(self.step_s, step_s)
        share = self.unreachable_share
        if not self.warm or share is None or self.step_s is None:
            return
        gain = share * self.step_s
        pays = gain > (0.8 if self.routing else 1.25) * self.probe_s  # hysteresis
        if pays != self.routing:
            self.routing = pays
            logger.info(
                "guesses %s: %.1f%% of the exact best guesses unreachable x %.1f ms a step "
                "%s a %.2f ms probe",
                "routed" if pays else f"unrouted (sampled 1 in {self.sample_every})",
                100 * share,
                1000 * self.step_s,
                ">" if pays else "<",
                1000 * self.probe_s,
            )


def _moving(average: float | None, value: float, weight: float = 0.1) -> float:
    return value if average is None else (1 - weight) * average + weight * value


def _candidate_bound(q: np.ndarray, max_norm: float) -> float:
    """How far any float32 product of ``q`` with a row of norm <= ``max_norm`` may be from
    the exact one."""
    q_norm = float(np.linalg.norm(q.astype(np.float64)))
    return float32_relative_error(len(q)) * q_norm * max_norm


def _exact(
    q: np.ndarray, vectors: np.ndarray, approx: np.ndarray, bound: float
) -> tuple[np.ndarray, np.ndarray]:
    """``exact_candidates`` given the rows' float32 products ``approx`` and their ``bound``."""
    rows = np.flatnonzero(approx >= approx.max() - 2.0 * bound - 1e-30)
    return rows, inner_product(q[None, :], vectors[rows])[0]


def exact_candidates(
    q: np.ndarray, vectors: np.ndarray, max_norm: float
) -> tuple[np.ndarray, np.ndarray]:
    """Rows that may hold the exact maximum of ``inner_product(q, vectors)`` and their
    exact scores. Any float32 dot product is within ``bound`` of the exact one, so the
    exact best (and any exact tie) lies within ``2 * bound`` of the float32 maximum.
    ``max_norm`` must bound every row's norm (a slight overestimate only widens the set)."""
    approx = float32_products(vectors, q)  # not BLAS: its idle threads spin against the scan
    return _exact(q, vectors, approx, _candidate_bound(q, max_norm))


class RetrieverCacheScorer:
    """The knowledge base's own ``score`` of the cached doc ids (BM25, or any backend)."""

    needs_vectors = False
    needs_terms = False

    def __init__(self, retriever: AsyncRetriever) -> None:
        self.retriever = retriever

    async def top1(
        self, cache: SpeculationCache, query: str, recorder: TraceRecorder
    ) -> int | None:
        doc_ids = cache.scored_ids()  # snapshot: verification may insert while we await
        if len(doc_ids) == 0:
            return None
        start = time.perf_counter()
        scores = await self.retriever.score(query, doc_ids.tolist())
        recorder.retrieval("score", "speculate", 1, len(doc_ids), time.perf_counter() - start)
        return cache.best(np.asarray(scores, dtype=np.float64), doc_ids)


class TermWeightCacheScorer:
    """BM25's score of the cached documents from their term weights (module docstring):
    the query analyzed here with the retriever's ``analyzer``, no retriever call."""

    needs_vectors = False
    needs_terms = True

    def __init__(self, analyzer: Analyzer) -> None:
        self.analyzer = analyzer

    async def top1(
        self, cache: SpeculationCache, query: str, recorder: TraceRecorder
    ) -> int | None:
        if len(cache) == 0:
            return None
        start = time.perf_counter()
        best = cache.best(cache.term_scores(self.analyzer(query)))
        recorder.guessed(start)
        return best
