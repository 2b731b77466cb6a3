"""One request's state and its two primitive actions: retrieve and generate one step.

A *step* is one retrieval point: up to ``retrieval_stride`` tokens generated greedily with one
document in front. ``RequestContext`` holds the question tokens, the generated tokens, the
document span of every step and the trace recorder; the baseline, oracle and speculative
loops (``baseline.py``, ``speculative.py``) are written in terms of ``query``, ``search``,
``generate_step`` and ``truncate``. Every LM call gets its own request id (``<id>#<n>``) so a
speculative call in flight can be aborted alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from ralmspec_vllm.core.config import RaLMConfig
from ralmspec_vllm.core.lm import Generation, LanguageModel
from ralmspec_vllm.core.prompt import DocumentTokenCache, PromptLayout
from ralmspec_vllm.core.stop import StopReason
from ralmspec_vllm.core.trace import CallPurpose, TokenSpan, TraceRecorder
from ralmspec_vllm.retrieval.base import AsyncRetriever
from ralmspec_vllm.types import Hit

FinalCallback = Callable[[int, tuple[int, ...]], None]
"""Called with (offset, tokens) when generated tokens become final (never rolled back)."""

SpeculationHold = Callable[[], bool]
"""Asked before each speculated step: True while speculation should pause (the server's
retriever is busy, ``RaLMService``); the request then runs plain retrieval steps."""


def _never() -> bool:
    return False


class RequestContext:
    """Mutable state of one question being answered."""

    def __init__(
        self,
        request_id: str,
        question_ids: Sequence[int],
        config: RaLMConfig,
        lm: LanguageModel,
        retriever: AsyncRetriever,
        layout: PromptLayout,
        doc_tokens: DocumentTokenCache,
        recorder: TraceRecorder,
        on_final: FinalCallback | None = None,
        speculation_held: SpeculationHold | None = None,
        query_ids: Sequence[int] | None = None,
    ) -> None:
        """``query_ids``: what the retrieval query's window reads before the answer, where
        it is not the prompt's question (a chat request's text without the template's
        markup, ``prompt.chat_query_text``)."""
        self.request_id = request_id
        self.question_ids = list(question_ids)
        self.query_ids = self.question_ids if query_ids is None else list(query_ids)
        self.config = config
        self.lm = lm
        self.retriever = retriever
        self.layout = layout
        self.doc_tokens = doc_tokens
        self.recorder = recorder
        self.generated: list[int] = []
        self.spans: list[TokenSpan] = []
        self.finished = False
        """The model emitted EOS, or the answer ran into a stop (in the last kept step)."""
        self.stop_reason: StopReason | None = None
        """The stop string or token id that ended the answer (``config.stop``)."""
        self.final_length = 0
        """Generated tokens that can no longer be rolled back (safe to stream)."""
        self.on_final = on_final
        self.speculation_held = speculation_held or _never
        self._lm_calls = 0

    @property
    def done(self) -> bool:
        return self.finished or len(self.generated) >= self.config.max_new_tokens

    def query(self) -> str:
        """The retrieval query for the current position."""
        return self.layout.query(self.query_ids, self.generated)

    def new_lm_request_id(self) -> str:
        self._lm_calls += 1
        return f"{self.request_id}#{self._lm_calls}"

    async def search(
        self, queries: Sequence[str], k: int, purpose: CallPurpose, prefetch: int = 0
    ) -> list[list[Hit]]:
        """The exact top-k per query (+ up to ``prefetch`` further hits, for the cache)."""
        start = time.perf_counter()
        hits = await self.retriever.search(queries, k, prefetch)
        self.recorder.retrieval("search", purpose, len(queries), k, time.perf_counter() - start)
        if len(hits) != len(queries):
            raise ValueError(f"retriever answered {len(hits)} result lists for {len(queries)}")
        return hits

    async def generate_step(
        self, doc_id: int | None, purpose: CallPurpose, lm_request_id: str | None = None
    ) -> Generation:
        """Generate one step with ``doc_id`` in front and append it (tokens and span)."""
        doc = None
        if doc_id is not None:
            (doc,), latency = await self.doc_tokens.get([doc_id])
            if latency:
                self.recorder.retrieval("documents", purpose, 1, 1, latency)
        prompt = self.layout.build(doc, self.question_ids, self.generated)
        max_tokens = min(
            self.config.retrieval_stride, self.config.max_new_tokens - len(self.generated)
        )
        start = time.perf_counter()
        try:
            gen = await self.lm.generate(
                prompt,
                max_tokens,
                lm_request_id or self.new_lm_request_id(),
                ignore_eos=self.config.ignore_eos,
            )
        finally:  # an aborted call kept the LM busy too
            end = time.perf_counter()
            self.recorder.lm_spans.append((start, end))
        self.recorder.lm(gen.num_prompt_tokens, gen.num_cached_tokens, end - start)
        if not gen.token_ids and not gen.finished:  # would retry the same step forever
            raise RuntimeError(f"{self.request_id}: the LM returned no tokens and did not stop")
        begin = len(self.generated)
        self.generated += gen.token_ids[:max_tokens]
        self.finished = gen.finished
        if self.config.stop:
            stop = self.config.stop.find(self.layout.tokenizer, self.generated, begin)
            if stop is not None:  # the tokens after it were never part of the answer
                del self.generated[stop[0] :]
                self.finished, self.stop_reason = True, stop[1]
        self.spans.append(TokenSpan(begin, len(self.generated), doc_id))
        return gen

    def finalize(self, length: int) -> None:
        """Declare the first ``length`` generated tokens final; never moves backwards."""
        if length < self.final_length or length > len(self.generated):
            raise RuntimeError(
                f"finalize({length}) with {self.final_length} final of {len(self.generated)}"
            )
        if length > self.final_length:
            start, self.final_length = self.final_length, length
            if self.on_final is not None:
                self.on_final(start, tuple(self.generated[start:length]))

    def truncate(self, length: int) -> int:
        """Roll back to ``length`` generated tokens (a step boundary); returns tokens dropped."""
        dropped = len(self.generated) - length
        if length < self.final_length:
            raise RuntimeError(f"rollback to {length} behind {self.final_length} final tokens")
        if dropped < 0:
            raise ValueError(f"cannot roll back to {length} of {len(self.generated)} tokens")
        del self.generated[length:]
        while self.spans and self.spans[-1].start >= length:
            self.spans.pop()
        if self.spans and self.spans[-1].end != length:
            raise ValueError(f"rollback to {length} is not a step boundary")
        self.finished, self.stop_reason = False, None
        return dropped

    def spans_tuple(self) -> tuple[TokenSpan, ...]:
        return tuple(self.spans)
