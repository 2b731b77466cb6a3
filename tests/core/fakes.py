"""Deterministic test doubles for the vLLM-free core: tokenizer, LM and retrievers.

- ``FakeTokenizer``: whitespace words <-> ids (stable crc32 ids, so every instance agrees);
  ``\\n`` is a token of its own. EOS = 0, optional BOS = 1, ids ``2 .. 2+vocab`` are the
  LM's output words ``g<i>``.
- ``FakeLM``: the next token is a hash of the whole sequence so far (a different document in
  front changes the continuation); EOS at a chosen answer length or with a probability;
  optional latency (``asyncio.sleep``); simulated prefix caching in blocks; records calls.
- ``ScriptedRetriever``: an ``AsyncRetriever`` whose top-1 for the k-th distinct query seen
  while *learning* (the baseline run) is ``script(k)``; frozen afterwards, the same queries
  get the same answers and unknown queries (discarded contexts) a hash-chosen document. Its
  ``score`` ranks the true top-1 first (an exact retriever), so a speculation misses exactly
  when the true document is not in the cache: scripts force misses with fresh documents.
- ``SyntheticDenseRetriever``: a synchronous exact inner-product retriever over seeded random
  vectors with a bag-of-words query encoder (for the dense cache-scoring path).
"""

from __future__ import annotations

import asyncio
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from ralmspec_vllm.core.lm import Generation
from ralmspec_vllm.retrieval.base import top_k_from_scores
from ralmspec_vllm.types import Document, Hit, RetrieverInfo, rank_key

EOS = 0
BOS = 1
FIRST_GEN = 2
WORD_BASE = 10_000
_TOKEN = re.compile(r"\S+|\n")


def crc(text: str) -> int:
    return zlib.crc32(text.encode())


class FakeTokenizer:
    """Whitespace tokenizer with stable ids; satisfies the core's ``Tokenizer`` protocol."""

    def __init__(self, vocab_size: int = 64, bos: bool = False) -> None:
        self.vocab_size = vocab_size
        self.bos = bos
        self._words: dict[int, str] = {EOS: "</s>", BOS: "<s>"}

    @property
    def eos_token_id(self) -> int | None:
        return EOS

    def _id(self, word: str) -> int:
        if word.startswith("g") and word[1:].isdigit() and int(word[1:]) < self.vocab_size:
            return FIRST_GEN + int(word[1:])
        token = WORD_BASE + crc(word) % 1_000_000
        self._words.setdefault(token, word)
        return token

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self._id(w) for w in _TOKEN.findall(text)]
        return ([BOS] if self.bos and add_special_tokens else []) + ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        words = []
        for t in token_ids:
            if t in (EOS, BOS) and skip_special_tokens:
                continue
            if FIRST_GEN <= t < FIRST_GEN + self.vocab_size:
                words.append(f"g{t - FIRST_GEN}")
            else:
                words.append(self._words.get(t, f"<{t}>"))
        return " ".join(words)


@dataclass(frozen=True, slots=True)
class LMCall:
    request_id: str
    prompt: tuple[int, ...]
    max_tokens: int
    output: tuple[int, ...]
    num_cached_tokens: int


class FakeLM:
    """Deterministic greedy "model"; implements ``LanguageModel``."""

    def __init__(
        self,
        vocab_size: int = 64,
        eos_at_length: int | None = None,
        eos_probability: float = 0.0,
        latency_s: float = 0.0,
        block_size: int = 4,
        events: list[str] | None = None,
        abort_latency_s: float = 0.0,
    ) -> None:
        """``eos_at_length``: EOS is the token at that answer position (answer = the trailing
        generated-range ids); ``eos_probability``: hash-chosen EOS per token;
        ``abort_latency_s``: what an abort takes to return (an engine that finishes the
        forward pass it is in before it lets a request go)."""
        self.vocab_size = vocab_size
        self.eos_at_length = eos_at_length
        self.eos_threshold = int(eos_probability * 1_000_000)
        self.latency_s = latency_s
        self.block_size = block_size
        self.events = events
        """When given, "lm-start <id>" / "lm-end <id>" are appended (ordering checks)."""
        self.abort_latency_s = abort_latency_s
        self.calls: list[LMCall] = []
        self.aborted: list[str] = []
        self.cancelled: list[str] = []
        self._inflight: set[str] = set()
        self._blocks: set[int] = set()

    @staticmethod
    def answer_length(seq: Sequence[int]) -> int:
        n = 0
        for t in reversed(seq):
            if t >= WORD_BASE or t in (EOS, BOS):
                break
            n += 1
        return n

    def continuation(
        self, prompt: Sequence[int], max_tokens: int, ignore_eos: bool = False
    ) -> tuple[list[int], bool]:
        h = hash(tuple(prompt))
        answered = self.answer_length(prompt)
        out: list[int] = []
        for _ in range(max_tokens):
            h = hash((h, 0x9E3779B9))
            position = answered + len(out)
            stop = position == self.eos_at_length or (h >> 7) % 1_000_000 < self.eos_threshold
            token = EOS if stop else FIRST_GEN + h % self.vocab_size
            out.append(token)
            h = hash((h, token))
            if token == EOS and not ignore_eos:
                return out, True
        return out, False

    def _chain(self, seq: Sequence[int]) -> list[int]:
        """vLLM-style block hashes: each full block's hash covers everything before it."""
        hashes, h, size = [], 0, self.block_size
        for end in range(size, len(seq) + 1, size):
            h = hash((h, tuple(seq[end - size : end])))
            hashes.append(h)
        return hashes

    def cached_prefix(self, prompt: Sequence[int], chain: list[int] | None = None) -> int:
        cached = 0
        for h in chain if chain is not None else self._chain(prompt):
            if h not in self._blocks or cached + self.block_size > len(prompt):
                break
            cached += self.block_size
        return min(cached, max(0, len(prompt) - 1))

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        max_tokens: int,
        request_id: str,
        *,
        ignore_eos: bool = False,
    ) -> Generation:
        if request_id in self._inflight:
            raise RuntimeError(f"duplicate request id {request_id}")
        self._inflight.add(request_id)
        if self.events is not None:
            self.events.append(f"lm-start {request_id}")
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)
        except asyncio.CancelledError:
            self.cancelled.append(request_id)
            raise
        finally:
            self._inflight.discard(request_id)
        prompt = tuple(prompt_token_ids)
        out, finished = self.continuation(prompt, max_tokens, ignore_eos)
        chain = self._chain(prompt + tuple(out))
        cached = self.cached_prefix(prompt, chain)
        self._blocks.update(chain)
        self.calls.append(LMCall(request_id, prompt, max_tokens, tuple(out), cached))
        if self.events is not None:
            self.events.append(f"lm-end {request_id}")
        return Generation(tuple(out), finished, len(prompt), cached, self.latency_s)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if self.abort_latency_s:
            await asyncio.sleep(self.abort_latency_s)


def doc_text(doc_id: int, length: int) -> str:
    return " ".join(f"d{doc_id}w{i}" for i in range(length))


class ScriptedRetriever:
    """An exact ``AsyncRetriever`` whose true top-1 per query follows a script."""

    def __init__(
        self,
        script: Callable[[int], int] | None = None,
        num_common: int = 6,
        doc_length: int = 12,
        latency_s: float = 0.0,
        events: list[str] | None = None,
    ) -> None:
        self.script = script
        self.events = events
        self.num_common = num_common
        self.doc_length = doc_length
        self.latency_s = latency_s
        self.query_latency_s = 0.0
        self.learning = True
        self.step_of: dict[str, int] = {}
        self.search_calls: list[tuple[int, int]] = []
        """(queries, k) of every search."""
        self.prefetches: list[int] = []
        """``prefetch`` of every search, in the same order."""
        self.score_calls = 0
        self.score_ids: list[list[int]] = []
        """The doc ids of every ``score`` call."""
        self.document_calls = 0

    def freeze(self) -> None:
        self.learning = False

    def truth(self, query: str) -> int:
        step = self.step_of.get(query)
        if step is None and self.learning:
            step = self.step_of[query] = len(self.step_of)
        if step is None or self.script is None:
            return crc(query) % self.num_common
        return self.script(step)

    def _score(self, query: str, doc_id: int, truth: int) -> float:
        if doc_id == truth:
            return 1.0
        if doc_id >= self.num_common:
            return 0.0
        return 0.1 + 0.4 * (crc(f"{query}|{doc_id}") % 1000) / 1000

    async def _delay(self) -> None:
        if self.latency_s:
            await asyncio.sleep(self.latency_s)

    async def info(self) -> RetrieverInfo:
        return RetrieverInfo("scripted", self.num_common, 0, "ip")

    async def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        """The exact top-(k + prefetch): a valid answer to a prefetch search."""
        self.search_calls.append((len(queries), k))
        self.prefetches.append(prefetch)
        if self.events is not None:
            self.events.append(f"search-start {len(queries)}")
        await self._delay()
        if self.query_latency_s:  # a scan's arithmetic: each query costs this much more
            await asyncio.sleep(self.query_latency_s * len(queries))
        if self.events is not None:
            self.events.append(f"search-end {len(queries)}")
        out = []
        for q in queries:
            truth = self.truth(q)
            ids = set(range(self.num_common)) | {truth}
            hits = [Hit(d, self._score(q, d, truth)) for d in ids]
            out.append(sorted((h for h in hits if h.score > 0), key=rank_key)[: k + prefetch])
        return out

    async def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        self.score_calls += 1
        self.score_ids.append(list(doc_ids))
        truth = self.truth(query)
        return [self._score(query, d, truth) for d in doc_ids]

    async def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        self.document_calls += 1
        return [Document(d, f"title{d}", doc_text(d, self.doc_length)) for d in doc_ids]

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray | None:
        return None

    async def term_weights(self, doc_ids: Sequence[int]) -> None:
        return None

    async def routing(self) -> None:
        return None

    async def lists(self, doc_ids: Sequence[int]) -> None:
        return None


class SyntheticDenseRetriever:
    """Exact inner-product search over seeded random vectors (a sync ``DenseRetriever``)."""

    def __init__(self, num_docs: int = 40, dim: int = 16, seed: int = 0, doc_length: int = 10):
        rng = np.random.default_rng(seed)
        self.doc_vectors = rng.standard_normal((num_docs, dim)).astype(np.float32)
        self.dim = dim
        self.doc_length = doc_length
        self._words: dict[str, np.ndarray] = {}
        self.search_calls = 0

    @property
    def info(self) -> RetrieverInfo:
        return RetrieverInfo("synthetic-flat", len(self.doc_vectors), self.dim, "ip")

    def _word(self, word: str) -> np.ndarray:
        vec = self._words.get(word)
        if vec is None:
            rng = np.random.default_rng(crc(word))
            vec = self._words[word] = rng.standard_normal(self.dim).astype(np.float32)
        return vec

    def encode(self, queries: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(queries), self.dim), dtype=np.float32)
        for i, q in enumerate(queries):
            for w in q.split():
                out[i] += self._word(w)
        return out

    def search_vectors(self, vectors: np.ndarray, k: int, prefetch: int = 0) -> list[list[Hit]]:
        ids = np.arange(len(self.doc_vectors), dtype=np.int64)
        return [top_k_from_scores(ids, self.doc_vectors @ v, k + prefetch) for v in vectors]

    def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        self.search_calls += 1
        return self.search_vectors(self.encode(queries), k, prefetch)

    def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        q = self.encode([query])[0]
        return [float(s) for s in self.doc_vectors[list(doc_ids)] @ q]

    def documents(self, doc_ids: Sequence[int]) -> list[Document]:
        return [Document(d, "", doc_text(d, self.doc_length)) for d in doc_ids]

    def vectors(self, doc_ids: Sequence[int]) -> np.ndarray:
        return self.doc_vectors[list(doc_ids)]
