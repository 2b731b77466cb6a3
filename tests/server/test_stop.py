"""``stop`` and ``stop_token_ids`` through the real server with the official client: the
answer ends where the offline baseline with the same stop ends, token for token, in every
mode, streamed or not; the text ends before the stop string (or includes it when asked)."""

from __future__ import annotations

import dataclasses
from typing import Any

import openai
import pytest

from ralmspec_vllm.core.prompt import chat_query_text
from ralmspec_vllm.core.runner import RaLMResult
from ralmspec_vllm.core.stop import StopCondition

from .conftest import MODEL_NAME, RALM, Served
from .test_openai_server import SPECULATIVE

pytestmark = pytest.mark.vllm

QUESTION = "Tell me about the history of astronomy and the stars."
MAX_TOKENS = 40
MODES = [{"mode": "baseline"}, SPECULATIVE[0], SPECULATIVE[2]]


async def offline(served: Served, stop: StopCondition | None = None) -> RaLMResult:
    config = dataclasses.replace(RALM, max_new_tokens=MAX_TOKENS, stop=stop or StopCondition())
    return await served.offline.generate(QUESTION, "baseline", config=config)


def unique_piece(served: Served, plain: RaLMResult, start: int) -> str:
    """Text of two answer tokens from ``start`` that occurs once in the whole answer."""
    tokenizer: Any = served.service.tokenizer
    for at in range(start, len(plain.token_ids) - 2):
        piece = tokenizer.decode(list(plain.token_ids[at : at + 2])).strip()
        if len(piece) > 2 and plain.text.count(piece) == 1:
            return str(piece)
    raise AssertionError("no unique piece of text in the answer")


async def create(
    client: openai.AsyncOpenAI, stream: bool, ralm: dict[str, Any], **extra: Any
) -> tuple[str, str | None, Any, int, list[dict[str, Any]]]:
    """(text, finish_reason, stop_reason, completion tokens, sources) of one completion."""
    body = {"ralm": {**ralm, "return_sources": True}, **extra}
    if not stream:
        response = await client.completions.create(
            model=MODEL_NAME, prompt=QUESTION, max_tokens=MAX_TOKENS, extra_body=body
        )
        choice = response.choices[0]
        assert response.usage is not None
        sources = (response.model_extra or {})["sources"]
        stop_reason = (choice.model_extra or {}).get("stop_reason")
        completion = response.usage.completion_tokens
        return choice.text, choice.finish_reason, stop_reason, completion, sources
    chunks = [
        chunk
        async for chunk in await client.completions.create(
            model=MODEL_NAME,
            prompt=QUESTION,
            max_tokens=MAX_TOKENS,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=body,
        )
    ]
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and chunks[-1].usage is not None
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    last = final[0].choices[0]
    return (
        text,
        last.finish_reason,
        (last.model_extra or {}).get("stop_reason"),
        chunks[-1].usage.completion_tokens,
        (final[0].model_extra or {})["sources"],
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_stop_string_ends_the_answer_like_the_baseline(
    served: Served, openai_client: openai.AsyncOpenAI, stream: bool
) -> None:
    plain = await offline(served)
    assert len(plain.token_ids) == MAX_TOKENS, "the answer must run long enough to be cut"
    piece = unique_piece(served, plain, 12)
    want = await offline(served, StopCondition(strings=(piece, "never in this answer")))
    assert want.stop_reason == piece and len(want.token_ids) < MAX_TOKENS
    for ralm in MODES:
        text, finish, reason, completion, sources = await create(
            openai_client, stream, ralm, stop=[piece, "never in this answer"]
        )
        assert text == plain.text[: plain.text.index(piece)], ralm
        assert (finish, reason) == ("stop", piece), ralm
        assert completion == len(want.token_ids), ralm
        assert sources[-1]["token_end"] == len(want.token_ids)
        assert sources[-1]["char_end"] == len(text)

        text, *_ = await create(
            openai_client, stream, ralm, stop=piece, include_stop_str_in_output=True
        )
        assert text == plain.text[: plain.text.index(piece) + len(piece)], ralm


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_stop_token_ends_the_answer_without_its_text(
    served: Served, openai_client: openai.AsyncOpenAI, stream: bool
) -> None:
    plain = await offline(served)
    token = plain.token_ids[20]
    want = await offline(served, StopCondition(token_ids=frozenset({token})))
    end = plain.token_ids.index(token) + 1  # its first occurrence
    assert want.token_ids == plain.token_ids[:end] and want.stop_reason == token
    tokenizer: Any = served.service.tokenizer
    for ralm in MODES:
        text, finish, reason, completion, _ = await create(
            openai_client, stream, ralm, stop_token_ids=[token]
        )
        assert text == tokenizer.decode(list(want.token_ids[:-1]), skip_special_tokens=True)
        assert (finish, reason, completion) == ("stop", token, end), ralm


async def test_chat_stops_and_streams_the_same_text(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    messages = [{"role": "user", "content": "Who was Aristotle?"}]
    tokenizer: Any = served.service.tokenizer
    question = str(
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    config = dataclasses.replace(RALM, max_new_tokens=MAX_TOKENS)
    plain = await served.offline.generate(
        question, "baseline", config=config, query=chat_query_text(messages)
    )
    piece = unique_piece(served, plain, 10)
    for ralm in MODES:
        whole = await openai_client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            stop=[piece],
            extra_body={"ralm": ralm},
        )
        assert whole.choices[0].message.content == plain.text[: plain.text.index(piece)]
        assert whole.choices[0].finish_reason == "stop"
        stream = await openai_client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=MAX_TOKENS,
            stop=piece,
            stream=True,
            extra_body={"ralm": ralm},
        )
        chunks = [c async for c in stream]
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content
