"""Prompt layout, query window and the shared document-token cache."""

from __future__ import annotations

import pytest

from ralmspec_vllm.core.config import RaLMConfig
from ralmspec_vllm.core.prompt import DocumentTokenCache, PromptLayout

from .fakes import BOS, FakeTokenizer, ScriptedRetriever


def test_layout_doc_separator_question_generated() -> None:
    tok = FakeTokenizer(bos=True)
    layout = PromptLayout(tok, RaLMConfig())
    assert layout.prefix_ids == (BOS,)
    sep = tok.encode("\n\n", add_special_tokens=False)
    assert list(layout.separator_ids) == sep and len(sep) == 2
    q = layout.question_ids("who is it")
    assert len(q) == 3 and BOS not in q
    assert layout.build((7, 8), q, [2, 3]) == [BOS, 7, 8, *sep, *q, 2, 3]
    assert layout.build(None, q, []) == [BOS, *q]
    assert PromptLayout(tok, RaLMConfig(), prefix_ids=[]).build(None, q, []) == q


def test_query_is_last_window_tokens_of_question_and_generated() -> None:
    tok = FakeTokenizer()
    layout = PromptLayout(tok, RaLMConfig(query_window=4))
    q = layout.question_ids("a b c d e f")
    assert layout.query(q, []) == "c d e f"
    assert layout.query(q, tok.encode("g1 g2", False)) == "e f g1 g2"
    assert layout.query(q, tok.encode("g1 g2 g3 g4 g5", False)) == "g2 g3 g4 g5"
    short = layout.question_ids("x")
    assert layout.query(short, tok.encode("g0", False)) == "x g0"


async def test_document_tokens_fetched_once_and_capped() -> None:
    kb = ScriptedRetriever(doc_length=30)
    cache = DocumentTokenCache(kb, FakeTokenizer(), max_doc_tokens=10, capacity=2)
    (a, b), latency = await cache.get([1, 2])
    assert len(a) == 10 and a != b and latency > 0.0
    (a2,), latency2 = await cache.get([1])
    assert a2 == a and latency2 == 0.0 and kb.document_calls == 1
    await cache.get([3])  # capacity 2: least recently used (2) goes
    assert 2 not in cache and 1 in cache and len(cache) == 2
    fresh = cache.emptied()  # same settings, no entries; the old cache keeps its own
    assert len(fresh) == 0 and len(cache) == 2
    (c,), _ = await fresh.get([1])
    assert c == a and kb.document_calls == 3  # fetched again, capped at the same 10 tokens
    assert fresh.capacity == 2 and fresh.retriever is kb


async def test_missing_document_is_an_error() -> None:
    class Empty(ScriptedRetriever):
        async def documents(self, doc_ids):  # type: ignore[no-untyped-def]
            return []

    with pytest.raises(KeyError, match="doc id 5"):
        await DocumentTokenCache(Empty(), FakeTokenizer(), 10).get([5])
