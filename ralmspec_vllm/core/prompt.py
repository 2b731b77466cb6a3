"""Prompt layout and the shared document-token cache.

Layout of every LM call, in every mode:

    prompt = special prefix (e.g. BOS) + doc tokens (title + text, first ``max_doc_tokens``)
             + separator tokens + question tokens + generated tokens

The retrieval query is the decoded last ``query_window`` tokens of question + generated,
where a request may give the "question" part of the query apart from the prompt's: a chat
request's prompt is its conversation through the chat template, but its queries read the
conversation's text without the template's markup (``chat_query_text``).
Everything is token-level (pieces are tokenized separately and concatenated), so a kept
prefix stays byte-identical across steps and vLLM's prefix cache can serve it.

``DocumentTokenCache`` is shared by all requests of an engine: a document is fetched from the
retriever and tokenized once, then served from memory (bounded, least recently used out; at
most ~1 KiB a document with the 256-token cap).
"""

from __future__ import annotations

import logging
import time
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from ralmspec_vllm.core.config import RaLMConfig
from ralmspec_vllm.core.lm import Tokenizer
from ralmspec_vllm.retrieval.base import AsyncRetriever

logger = logging.getLogger(__name__)

DocTokens = array
"""A document's capped token ids, stored compactly (4 bytes a token, not ~36 as a tuple)."""


class NoChatTemplate(ValueError):
    """The tokenizer has no chat template: the model can only be asked plain text."""


def render_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]], **template_args: Any) -> str:
    """``messages`` through ``tokenizer``'s chat template, as the question text (the server's
    chat endpoint and ``bench_latency --chat`` ask the LM this way); ``template_args`` go to
    ``apply_chat_template`` (e.g. ``add_generation_prompt``). ``NoChatTemplate`` without one;
    the template's own errors pass through."""
    apply = getattr(tokenizer, "apply_chat_template", None)
    if apply is None or not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate("this model has no chat template")
    return str(apply([dict(m) for m in messages], tokenize=False, **template_args))


QUERY_SKIPPED_ROLES = frozenset({"system", "developer"})
"""Chat roles whose messages no retrieval query reads: instructions, not the topic."""


def chat_query_text(messages: Sequence[Mapping[str, str]]) -> str:
    """What a chat request's retrieval queries read before the answer: its messages'
    contents, one per line, system and developer messages left out.

    The rendered template is the prompt, but as a query it would put markup in the window:
    Qwen2.5's template adds a default system prompt, so the first query of a short question
    read "created by Alibaba Cloud. You are a helpful assistant. user <question> assistant",
    and each step's window slid further off those words, so the first steps' documents
    were hard to guess (session 45: speculation accuracy 0.53 on answers of up to 4 steps).
    An instruction such as "Answer briefly." says nothing about which document helps."""
    return "\n".join(m["content"] for m in messages if m.get("role") not in QUERY_SKIPPED_ROLES)


class PromptLayout:
    """Builds prompts and retrieval queries for one tokenizer and ``RaLMConfig``."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: RaLMConfig,
        prefix_ids: Sequence[int] | None = None,
    ) -> None:
        """``prefix_ids`` defaults to the tokenizer's special prefix (``encode("")`` with
        special tokens: BOS for Llama-style tokenizers, nothing for GPT-2-style ones)."""
        self.tokenizer = tokenizer
        self.config = config
        if prefix_ids is None:
            prefix_ids = tokenizer.encode("", add_special_tokens=True)
        self.prefix_ids: tuple[int, ...] = tuple(prefix_ids)
        self.separator_ids: tuple[int, ...] = tuple(
            tokenizer.encode(config.separator, add_special_tokens=False)
        )

    def question_ids(self, question: str) -> list[int]:
        return self.tokenizer.encode(question, add_special_tokens=False)

    def query(self, question_ids: Sequence[int], generated: Sequence[int]) -> str:
        """The retrieval query: decoded last ``query_window`` tokens of question + generated."""
        window = self.config.query_window
        if len(generated) >= window:
            tail = list(generated[len(generated) - window :])
        else:
            need = window - len(generated)
            tail = list(question_ids[max(0, len(question_ids) - need) :]) + list(generated)
        return self.tokenizer.decode(tail, skip_special_tokens=True)

    def build(
        self, doc: Sequence[int] | None, question_ids: Sequence[int], generated: Sequence[int]
    ) -> list[int]:
        """The full prompt; ``doc`` ``None`` (retriever found nothing) means no document."""
        prompt = list(self.prefix_ids)
        if doc is not None:
            prompt += doc
            prompt += self.separator_ids
        prompt += question_ids
        prompt += generated
        return prompt


class DocumentTokenCache:
    """Doc id -> capped token ids, fetched through ``AsyncRetriever.documents`` on a miss."""

    def __init__(
        self,
        retriever: AsyncRetriever,
        tokenizer: Tokenizer,
        max_doc_tokens: int,
        capacity: int = 100_000,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.max_doc_tokens = max_doc_tokens
        self.capacity = capacity
        self._tokens: OrderedDict[int, DocTokens] = OrderedDict()
        self.fetches = 0
        """Retriever ``documents`` calls made so far."""

    def __len__(self) -> int:
        return len(self._tokens)

    def emptied(self) -> DocumentTokenCache:
        """A new, empty cache with the same retriever, tokenizer, cap and capacity (this one
        is left as it is, for requests that still hold it)."""
        return DocumentTokenCache(
            self.retriever, self.tokenizer, self.max_doc_tokens, self.capacity
        )

    def __contains__(self, doc_id: int) -> bool:
        return doc_id in self._tokens

    def tokenize(self, text: str) -> DocTokens:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return array("i", ids[: self.max_doc_tokens])

    def put(self, doc_id: int, tokens: DocTokens) -> None:
        self._tokens[doc_id] = tokens
        self._tokens.move_to_end(doc_id)
        while len(self._tokens) > self.capacity:
            self._tokens.popitem(last=False)

    def cached(self, doc_id: int) -> DocTokens | None:
        tokens = self._tokens.get(doc_id)
        if tokens is not None:
            self._tokens.move_to_end(doc_id)
        return tokens

    async def get(self, doc_ids: Sequence[int]) -> tuple[list[DocTokens], float]:
        """Tokens of each doc id, and the seconds spent in the retriever (0.0 on a full hit)."""
        missing = [d for d in dict.fromkeys(doc_ids) if d not in self._tokens]
        latency = 0.0
        if missing:
            start = time.perf_counter()
            docs = await self.retriever.documents(missing)
            latency = time.perf_counter() - start
            self.fetches += 1
            by_id = {doc.doc_id: doc for doc in docs}
            for doc_id in missing:
                doc = by_id.get(doc_id)
                if doc is None:
                    raise KeyError(f"retriever returned no document for doc id {doc_id}")
                self.put(doc_id, self.tokenize(doc.contents))
        result: list[DocTokens] = []
        for doc_id in doc_ids:
            tokens = self.cached(doc_id)
            if tokens is None:  # evicted meanwhile by a tiny capacity: fetch alone
                tokens = (await self.get([doc_id]))[0][0]
            result.append(tokens)
        return result, latency
