"""A completion of several prompts (a batch, as evaluation harnesses send them) through the
real server with the official client: one choice per prompt, in order, each the offline
baseline's answer to its prompt token for token, streamed or not, with its own RaLM fields."""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Any

import openai
import pytest

from ralmspec_vllm.core.stop import StopCondition

from .conftest import MODEL_NAME, RALM, Served
from .test_openai_server import QUESTIONS, SPECULATIVE, baseline

pytestmark = pytest.mark.vllm


@pytest.mark.parametrize("ralm", [{"mode": "baseline"}, SPECULATIVE[0]], ids=str)
async def test_each_prompt_gets_its_baseline_answer(
    served: Served, openai_client: openai.AsyncOpenAI, ralm: dict[str, Any]
) -> None:
    wants = [await baseline(served, q) for q in QUESTIONS[:3]]
    response = await openai_client.completions.create(
        model=MODEL_NAME,
        prompt=QUESTIONS[:3],
        extra_body={"ralm": {**ralm, "return_sources": True}, "return_token_ids": True},
    )
    assert [c.index for c in response.choices] == [0, 1, 2]
    for choice, want in zip(response.choices, wants, strict=True):
        assert tuple(choice.token_ids) == want.token_ids  # type: ignore[attr-defined]
        assert choice.text == want.text
        extra = choice.model_extra or {}
        assert extra["ralm"]["mode"].startswith(ralm["mode"])
        assert extra["sources"][-1]["token_end"] == len(want.token_ids)
    assert "ralm" not in (response.model_extra or {})  # per choice, not per response
    assert response.usage is not None
    prompt_tokens = sum(len(served.service.question_ids(q)) for q in QUESTIONS[:3])
    assert response.usage.prompt_tokens == prompt_tokens
    assert response.usage.completion_tokens == sum(len(w.token_ids) for w in wants)
    ids = [served.service.question_ids(q) for q in QUESTIONS[:2]]
    by_ids = await openai_client.completions.create(
        model=MODEL_NAME, prompt=ids, extra_body={"ralm": ralm}
    )
    assert [c.text for c in by_ids.choices] == [w.text for w in wants[:2]]


async def test_a_streamed_batch_interleaves_choices(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    wants = [await baseline(served, q) for q in QUESTIONS]
    stream = await openai_client.completions.create(
        model=MODEL_NAME,
        prompt=QUESTIONS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ralm": SPECULATIVE[0]},
    )
    chunks = [chunk async for chunk in stream]
    texts: dict[int, str] = defaultdict(str)
    finished: list[int] = []
    order: list[int] = []
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            order.append(choice.index)
            if choice.finish_reason:
                finished.append(choice.index)
                assert (choice.model_extra or {})["ralm"]["mode"].startswith("ralmspec")
    assert [texts[i] for i in range(len(QUESTIONS))] == [w.text for w in wants]
    assert sorted(finished) == list(range(len(QUESTIONS)))
    assert order != sorted(order), "the answers were streamed one after another"
    usage = chunks[-1].usage
    assert usage is not None and not chunks[-1].choices
    assert usage.completion_tokens == sum(len(w.token_ids) for w in wants)


async def test_a_batch_shares_its_stop(served: Served, openai_client: openai.AsyncOpenAI) -> None:
    tokenizer: Any = served.service.tokenizer
    wants = [await baseline(served, q) for q in QUESTIONS[:2]]
    token = wants[1].token_ids[6]
    stop = dataclasses.replace(RALM, stop=StopCondition(token_ids=frozenset({token})))
    cut = [await served.offline.generate(q, "baseline", config=stop) for q in QUESTIONS[:2]]
    assert cut[1].stop_reason == token
    response = await openai_client.completions.create(
        model=MODEL_NAME,
        prompt=QUESTIONS[:2],
        extra_body={"ralm": SPECULATIVE[2], "stop_token_ids": [token]},
    )
    for choice, want in zip(response.choices, cut, strict=True):
        shown = want.token_ids[:-1] if want.stop_reason is not None else want.token_ids
        assert choice.text == tokenizer.decode(list(shown), skip_special_tokens=True)
        assert choice.finish_reason == ("stop" if want.finished else "length")
