"""Prompt layout, query window and the shared document-token cache."""

from __future__ import annotations

import pytest

from ralmspec_vllm.core.config import RaLMConfig
from ralmspec_vllm.core.prompt import (
    DocumentTokenCache,
    NoChatTemplate,
    PromptLayout,
    chat_query_text,
    render_chat,
)

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


class TemplateTokenizer:
    """Just the chat-template surface of a Hugging Face tokenizer."""

    def __init__(self, chat_template: str | None) -> None:
        self.chat_template = chat_template
        self.calls: list[tuple[list[dict[str, str]], dict[str, object]]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: object) -> str:
        self.calls.append((messages, kwargs))
        end = "<assistant>" if kwargs.get("add_generation_prompt") else ""
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + end


def test_render_chat_is_the_template_as_text_and_refuses_a_model_without_one() -> None:
    """The server's chat endpoint and ``bench_latency --chat`` render a conversation the
    same way: the tokenizer's template, as text, with the caller's template arguments."""
    tok = TemplateTokenizer("{{ messages }}")
    user = [{"role": "user", "content": "who"}]
    assert render_chat(tok, user, add_generation_prompt=True) == "<user>who<assistant>"
    assert tok.calls == [(user, {"tokenize": False, "add_generation_prompt": True})]
    for missing in (TemplateTokenizer(None), object()):
        with pytest.raises(NoChatTemplate, match="no chat template"):
            render_chat(missing, user)
    assert issubclass(NoChatTemplate, ValueError)


def test_chat_query_text_is_the_conversation_without_markup_or_instructions() -> None:
    """What a chat request's queries read: message contents, one per line, system and
    developer messages left out (an instruction is not the topic)."""
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who was Aristotle?"},
        {"role": "assistant", "content": "A Greek philosopher."},
        {"role": "developer", "content": "Cite sources."},
        {"role": "user", "content": "Who taught him?"},
    ]
    text = chat_query_text(messages)
    assert text == "Who was Aristotle?\nA Greek philosopher.\nWho taught him?"
    assert chat_query_text(messages[:2]) == "Who was Aristotle?"
    assert chat_query_text(messages[:1]) == ""  # nothing to query: the caller's call
