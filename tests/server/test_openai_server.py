"""The OpenAI-compatible server over HTTP: the official ``openai`` client, and raw ``httpx``
for error shapes, auth and disconnects. Answers must equal the offline runner's baseline token
for token, in every mode, streamed or not, alone or concurrent."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
from typing import Any

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from ralmspec_vllm import metrics
from ralmspec_vllm.core.prompt import chat_query_text
from ralmspec_vllm.core.stride import StrideLedger
from ralmspec_vllm.load import RetrieverLoad
from ralmspec_vllm.metrics import METRIC_NAMES

from .conftest import API_KEY, MODEL_NAME, SPECULATION, Served

pytestmark = pytest.mark.vllm

QUESTIONS = [
    "Who wrote about anarchism and the state?",
    "What did Aristotle teach about logic?",
    "Tell me about the history of astronomy and the stars.",
    "Where is the capital of Albania?",
]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SPECULATIVE = [
    {"mode": "ralmspec"},  # server defaults: PSA (auto stride, prefetch 20, async)
    {"mode": "ralmspec", "speculation_stride": 1, "async_verification": False, "prefetch_k": 1},
    {"mode": "ralmspec", "speculation_stride": 3, "prefetch_k": 1},
    {"mode": "ralmspec", "speculation_stride": 2, "prefetch_k": 5, "async_verification": False},
]
_baselines: dict[str, Any] = {}


async def baseline(served: Served, question: str) -> Any:
    """The offline runner's baseline answer (cached per question)."""
    if question not in _baselines:
        _baselines[question] = await served.offline.generate(question, "baseline")
    return _baselines[question]


def chat_question(served: Served, messages: list[dict[str, str]]) -> str:
    tokenizer: Any = served.service.tokenizer
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_health_models_and_auth(served: Served, openai_client: openai.AsyncOpenAI) -> None:
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        assert (await http.get("/health")).json() == {"status": "ok"}  # open without a key
        assert (await http.get("/metrics")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            reply = await http.post("/v1/completions", json={"prompt": "x"}, headers=headers)
            assert reply.status_code == 401
            assert reply.json()["error"]["code"] == "invalid_api_key"
        assert (await http.get("/v1/models")).status_code == 401
    models = await openai_client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    wrong = openai.AsyncOpenAI(base_url=served.base_url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await wrong.completions.create(model=MODEL_NAME, prompt="hello")


@pytest.mark.parametrize("ralm", [{"mode": "baseline"}, *SPECULATIVE], ids=str)
async def test_completion_equals_offline_baseline(
    served: Served, openai_client: openai.AsyncOpenAI, ralm: dict[str, Any]
) -> None:
    for question in QUESTIONS[:2]:
        want = await baseline(served, question)
        response = await openai_client.completions.create(
            model=MODEL_NAME,
            prompt=question,
            extra_body={"ralm": ralm, "return_token_ids": True},
        )
        choice = response.choices[0]
        assert tuple(choice.token_ids) == want.token_ids, question  # type: ignore[attr-defined]
        assert choice.text == want.text
        assert choice.finish_reason == ("stop" if want.finished else "length")
        assert response.usage is not None
        assert response.usage.completion_tokens == len(want.token_ids)
        extra = response.model_extra or {}
        assert extra["ralm"]["mode"].startswith(ralm["mode"])
        assert "sources" not in extra
    # a prompt given as token ids is the same question
    ids = served.service.question_ids(QUESTIONS[0])
    response = await openai_client.completions.create(
        model=MODEL_NAME, prompt=ids, extra_body={"ralm": ralm, "return_token_ids": True}
    )
    want = await baseline(served, QUESTIONS[0])
    assert tuple(response.choices[0].token_ids) == want.token_ids  # type: ignore[attr-defined]


async def test_busy_server_runs_ralmspec_requests_as_the_baseline(
    served: Served, openai_client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_speculating=1``: one request at a time speculates; requests that start while
    another speculates run as the baseline, say so and give the same answer."""
    config = dataclasses.replace(served.service.config, max_speculating=1)
    monkeypatch.setattr(served.service, "config", config)

    async def ask(question: str) -> Any:
        return await openai_client.completions.create(
            model=MODEL_NAME,
            prompt=question,
            extra_body={"ralm": SPECULATIVE[2], "return_token_ids": True},
        )

    before = sample("ralmspec_load_fallbacks_total", reason="speculating")
    alone = await ask(QUESTIONS[0])  # nobody else speculates: it does
    assert not (alone.model_extra or {})["ralm"]["load_fallback"]
    assert sample("ralmspec_load_fallbacks_total", reason="speculating") == before
    together = await asyncio.gather(*(ask(q) for q in QUESTIONS))
    fell_back = [(r.model_extra or {})["ralm"]["load_fallback"] for r in together]
    assert 1 <= sum(fell_back) <= len(QUESTIONS) - 1, fell_back  # one speculates at a time
    assert sample("ralmspec_load_fallbacks_total", reason="speculating") == before + sum(fell_back)
    for question, response, fallback in zip(QUESTIONS, together, fell_back, strict=True):
        want = await baseline(served, question)
        assert tuple(response.choices[0].token_ids) == want.token_ids  # type: ignore[attr-defined]
        usage = (response.model_extra or {})["ralm"]
        assert usage["mode"].startswith("baseline" if fallback else "ralmspec")
        assert fallback or usage["verifications"] >= 1
    assert served.service.speculating == 0


async def test_busy_retriever_runs_ralmspec_requests_as_the_baseline(
    served: Served, openai_client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``max_retriever_utilization``: a ``ralmspec`` request that starts while the server
    keeps its retriever busy runs as the baseline: same answer, ``load_fallback`` in the
    usage block, counted with reason ``retriever``; the utilization is on ``/metrics``.
    The real gRPC retriever is calibrated; the busy spell is injected (fault injection)."""
    service = served.service
    config = dataclasses.replace(service.config, max_retriever_utilization=0.5)
    monkeypatch.setattr(service, "config", config)
    monkeypatch.setattr(service, "retriever_load", RetrieverLoad())
    # The gauge reads the latest service built in this process (tests build several).
    metrics.watch_retriever_utilization(lambda: service.retriever_load.utilization())
    cost = await service.calibrate_retriever()
    assert cost >= 0.0
    service.retriever_load.query_cost_s = 0.01  # say, the H200's 21M scan: 10 ms a query
    # 1000 queries just now: 500/s over the 2 s shortest span, utilization 5; still above the
    # limit of 0.5 until the 10 s window forgets them, however slow a loaded machine is
    service.retriever_load.observe(1000)
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        text = (await http.get("/metrics")).text  # the gauge reads the load at scrape time
    gauge = [
        line for line in text.splitlines() if line.startswith("ralmspec_retriever_utilization ")
    ]
    assert len(gauge) == 1 and 0.5 < float(gauge[0].split()[1]) <= 5.0, gauge
    before = sample("ralmspec_load_fallbacks_total", reason="retriever")
    response = await openai_client.completions.create(
        model=MODEL_NAME,
        prompt=QUESTIONS[1],
        extra_body={"ralm": SPECULATIVE[2], "return_token_ids": True},
    )
    usage = (response.model_extra or {})["ralm"]
    assert usage["load_fallback"] and usage["mode"].startswith("baseline")
    want = await baseline(served, QUESTIONS[1])
    assert tuple(response.choices[0].token_ids) == want.token_ids  # type: ignore[attr-defined]
    assert sample("ralmspec_load_fallbacks_total", reason="retriever") == before + 1


async def test_retriever_turning_busy_mid_answer_holds_speculation(
    served: Served, openai_client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A speculating request whose retriever turns busy after its third step runs the rest
    as plain steps: the same answer, ``held_steps`` in the usage block and on ``/metrics``.
    The busy spell is injected into the load signal (fault injection)."""
    service = served.service
    config = dataclasses.replace(service.config, max_retriever_utilization=0.5)
    monkeypatch.setattr(service, "config", config)
    monkeypatch.setattr(service, "retriever_load", RetrieverLoad())
    service.retriever_load.query_cost_s = 0.01
    asked = 0

    def busy_after_three_asks() -> bool:
        nonlocal asked
        asked += 1
        if asked == 3:
            service.retriever_load.observe(200)  # utilization 1 from here on
        return service.retriever_busy()

    monkeypatch.setattr(service.engine, "speculation_held", busy_after_three_asks)
    before = sample("ralmspec_held_steps_total")
    response = await openai_client.completions.create(
        model=MODEL_NAME,
        prompt=QUESTIONS[3],
        extra_body={"ralm": SPECULATIVE[2], "return_token_ids": True},
    )
    usage = (response.model_extra or {})["ralm"]
    assert not usage["load_fallback"] and usage["mode"].startswith("ralmspec")
    assert usage["held_steps"] >= 1
    assert sample("ralmspec_held_steps_total") == before + usage["held_steps"]
    want = await baseline(served, QUESTIONS[3])
    assert tuple(response.choices[0].token_ids) == want.token_ids  # type: ignore[attr-defined]


async def test_speculation_measured_slower_runs_plain_steps_and_says_so(
    served: Served, openai_client: openai.AsyncOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where this server's requests measured speculation slower per token than plain steps
    (seeded into the engine's pooled ``StepCosts``: fault injection), a ralmspec request
    runs its steps plainly: the same answer, ``measured_plain_steps`` in the usage block
    and on ``/metrics``."""
    ledger = StrideLedger()
    ledger.steps.record("plain", 0.001 * 64, 64)
    ledger.steps.record("speculation", 0.1 * 64, 64)
    monkeypatch.setitem(served.service.engine.stride_ledgers, SPECULATION, ledger)
    before = sample("ralmspec_measured_plain_steps_total")
    waited = sample("ralmspec_lm_wait_seconds_total", cause="retrieval")
    response = await openai_client.completions.create(
        model=MODEL_NAME,
        prompt=QUESTIONS[2],
        extra_body={"ralm": {"mode": "ralmspec"}, "return_token_ids": True},
    )
    usage = (response.model_extra or {})["ralm"]
    assert usage["mode"].startswith("ralmspec") and not usage["load_fallback"]
    assert usage["measured_plain_steps"] >= 1 and usage["speculation_hits"] == 0
    assert usage["quiet_steps"] == 0  # every plain step probes unless --plain-probe-every
    assert usage["routed_guesses"] == usage["rerouted_guesses"] == 0  # flat: nothing to route
    assert sample("ralmspec_measured_plain_steps_total") == before + usage["measured_plain_steps"]
    # plain steps: the LM waits on their searches, which the critical path shows
    waits = usage["lm_wait_s"]
    assert set(waits) == {"guess", "retrieval", "other"} and min(waits.values()) >= 0
    assert waits["retrieval"] > 0 and sum(waits.values()) <= usage["wall_time_s"]
    added = sample("ralmspec_lm_wait_seconds_total", cause="retrieval") - waited
    assert added == pytest.approx(waits["retrieval"], abs=1e-5)
    want = await baseline(served, QUESTIONS[2])
    assert tuple(response.choices[0].token_ids) == want.token_ids  # type: ignore[attr-defined]


async def test_streaming_completion_sends_verified_text(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    question = QUESTIONS[2]
    want = await baseline(served, question)
    for ralm in ({"mode": "baseline"}, SPECULATIVE[0], SPECULATIVE[2]):
        stream = await openai_client.completions.create(
            model=MODEL_NAME,
            prompt=question,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ralm": {**ralm, "return_sources": True}},
        )
        chunks = [chunk async for chunk in stream]
        texts = [c.choices[0].text for c in chunks if c.choices]
        assert "".join(texts) == want.text
        assert sum(1 for t in texts if t) > 1  # really streamed, in several pieces
        final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert len(final) == 1
        assert final[0].choices[0].finish_reason == ("stop" if want.finished else "length")
        sources = (final[0].model_extra or {})["sources"]
        assert sources[0]["token_start"] == 0 and sources[-1]["token_end"] == len(want.token_ids)
        assert chunks[-1].usage is not None and not chunks[-1].choices
        assert chunks[-1].usage.completion_tokens == len(want.token_ids)


async def test_sources_name_the_documents_of_each_span(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    question = QUESTIONS[0]
    want = await baseline(served, question)
    response = await openai_client.completions.create(
        model=MODEL_NAME,
        prompt=question,
        extra_body={"ralm": {"mode": "ralmspec", "return_sources": True}},
    )
    text = response.choices[0].text
    sources = (response.model_extra or {})["sources"]
    expected: list[tuple[int | None, int, int]] = []
    for span in want.trace.spans:  # adjacent steps with the same document merge
        if expected and expected[-1][0] == span.doc_id:
            expected[-1] = (span.doc_id, expected[-1][1], span.end)
        else:
            expected.append((span.doc_id, span.start, span.end))
    assert [(s["doc_id"], s["token_start"], s["token_end"]) for s in sources] == expected
    assert all(s["title"] == served.titles[s["doc_id"]] for s in sources)
    assert sources[0]["char_start"] == 0 and sources[-1]["char_end"] == len(text)
    for left, right in itertools.pairwise(sources):
        assert left["char_end"] == right["char_start"]


async def test_chat_equals_offline_baseline(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Who was Aristotle?"},
    ]
    want = await served.offline.generate(
        chat_question(served, messages), "baseline", query=chat_query_text(messages)
    )
    for ralm in ({"mode": "baseline"}, SPECULATIVE[0], SPECULATIVE[1]):
        response = await openai_client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,  # type: ignore[arg-type]
            extra_body={"ralm": ralm, "return_token_ids": True},
        )
        choice = response.choices[0]
        assert tuple(choice.token_ids) == want.token_ids  # type: ignore[attr-defined]
        assert choice.message.role == "assistant" and choice.message.content == want.text
        stream = await openai_client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,  # type: ignore[arg-type]
            stream=True,
            extra_body={"ralm": ralm},
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want.text
        assert chunks[-1].choices[0].finish_reason == choice.finish_reason


async def test_chat_queries_read_the_conversation_not_the_template(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    """The prompt is the rendered template; the retrieval queries read the messages' text
    (``chat_query_text``), so a chat question's first document is the bare question's,
    not one chosen by the template's role headers and instructions."""
    question = QUESTIONS[1]
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": question},
    ]
    template = chat_question(served, messages)
    want = await served.offline.generate(template, "baseline", query=question)
    marked = await served.offline.generate(template, "baseline")  # the template as query
    first = want.trace.step_doc_ids[0]
    assert first == (await baseline(served, question)).trace.step_doc_ids[0]
    assert marked.trace.step_doc_ids[0] != first  # the markup would change the document
    for ralm in ({"mode": "baseline"}, SPECULATIVE[0]):
        response = await openai_client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,  # type: ignore[arg-type]
            extra_body={"ralm": {**ralm, "return_sources": True}},
        )
        assert response.choices[0].message.content == want.text
        sources = (response.model_extra or {})["sources"]
        assert sources[0]["doc_id"] == first
    # system messages alone leave no text to query: the template is the query then
    only = [{"role": "system", "content": question}]
    want = await served.offline.generate(chat_question(served, only), "baseline")
    response = await openai_client.chat.completions.create(
        model=MODEL_NAME,
        messages=only,  # type: ignore[arg-type]
        extra_body={"ralm": SPECULATIVE[0]},
    )
    assert response.choices[0].message.content == want.text


async def test_fields_that_do_not_change_a_greedy_answer_are_accepted(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    """Sampling knobs that greedy decoding ignores, OpenAI's bookkeeping fields, defaults
    sent explicitly and template variables the template does not use."""
    messages = [{"role": "user", "content": "Who was Aristotle?"}]
    want = await served.offline.generate(
        chat_question(served, messages), "baseline", query=chat_query_text(messages)
    )
    response = await openai_client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,  # type: ignore[arg-type]
        seed=3,
        top_p=0.5,
        user="someone",
        metadata={"run": "1"},
        store=False,
        extra_body={
            "ralm": {"mode": "ralmspec"},
            "top_k": 5,
            "add_special_tokens": False,
            "chat_template_kwargs": {"unused_flag": True},
        },
    )
    assert response.choices[0].message.content == want.text
    question = QUESTIONS[0]
    want = await baseline(served, question)
    completion = await openai_client.completions.create(
        model=MODEL_NAME,
        prompt=question,
        seed=7,
        best_of=1,  # OpenAI's legacy field, sent by some clients with its default
        extra_body={"add_special_tokens": True, "min_p": 0.1, "priority": 0},
    )
    assert completion.choices[0].text == want.text


async def test_concurrent_clients_get_baseline_answers(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    wants = [await baseline(served, q) for q in QUESTIONS]
    batches_before = len(served.service.batching.stats)
    jobs = [
        (question, ralm)
        for question in QUESTIONS
        for ralm in ({"mode": "baseline"}, SPECULATIVE[0], SPECULATIVE[1])
    ]

    async def ask(question: str, ralm: dict[str, Any]) -> tuple[int, ...]:
        response = await openai_client.completions.create(
            model=MODEL_NAME, prompt=question, extra_body={"ralm": ralm, "return_token_ids": True}
        )
        return tuple(response.choices[0].token_ids)  # type: ignore[attr-defined]

    answers = await asyncio.gather(*(ask(q, r) for q, r in jobs))
    for (question, ralm), got in zip(jobs, answers, strict=True):
        assert got == wants[QUESTIONS.index(question)].token_ids, (question, ralm)
    merged = served.service.batching.stats[batches_before:]
    assert max(record.num_callers for record in merged) > 1  # retrievals shared RPCs


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"


def ralm(**options: Any) -> dict[str, Any]:
    return {"prompt": "q", "ralm": options}


USER = {"role": "user", "content": "hi"}
IMAGE = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    (CMPL, ralm(bogus=1), 400, "ralm.bogus"),
    (CMPL, ralm(mode="oracle"), 400, "ralm.mode"),
    (CMPL, ralm(speculation_stride=0), 400, "ralm.speculation_stride"),
    (CMPL, ralm(speculation_stride=99), 400, "ralm.speculation_stride"),
    (CMPL, ralm(speculation_stride="fast"), 400, "ralm.speculation_stride"),
    (CMPL, ralm(retrieval_stride=1000), 400, "ralm.retrieval_stride"),
    (CMPL, ralm(prefetch_k=100000), 400, "ralm.prefetch_k"),
    (CMPL, ralm(async_verification="yes"), 400, "ralm.async_verification"),
    (CMPL, {"prompt": "q", "max_tokens": 0}, 400, "max_tokens"),
    (CMPL, {"prompt": "q", "max_tokens": 100000}, 400, "max_tokens"),
    (CMPL, {"prompt": "word " * 2000}, 400, "prompt"),
    (CMPL, {"prompt": "q", "temperature": 0.7}, 400, "temperature"),
    (CMPL, {"prompt": "q", "n": 2}, 400, "n"),
    (CMPL, {"prompt": "q", "best_of": 3}, 400, "best_of"),
    (CMPL, {"prompt": "q", "stop": ["x", ""]}, 400, "stop"),
    (CMPL, {"prompt": "q", "stop": [f"s{i}" for i in range(65)]}, 400, "stop"),
    (CMPL, {"prompt": "q", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    (CMPL, {"prompt": "q", "min_tokens": 4}, 400, "min_tokens"),
    (CMPL, {"prompt": "q", "skip_special_tokens": False}, 400, "skip_special_tokens"),
    (CMPL, {"prompt": ["a", [1, 2]]}, 400, "prompt.0"),  # a batch of one kind of prompt
    (CMPL, {"prompt": [[1, 2], []]}, 400, "prompt"),
    (CMPL, {"prompt": ["q"] * 257}, 400, "prompt"),
    (CMPL, {"prompt": ["q", "word " * 2000]}, 400, "prompt"),  # names the prompt: "prompt 1"
    (CMPL, {"max_tokens": 3}, 400, "prompt"),
    (CMPL, "{not json", 400, None),
    (CMPL, {"prompt": "q", "model": "other-model"}, 404, "model"),
    (CMPL, {"prompt": "q", "max_tokenz": 5}, 400, "max_tokenz"),  # a typo is not ignored
    (CMPL, {"prompt": "q", "truncate_prompt_tokens": 5}, 400, "truncate_prompt_tokens"),
    (CMPL, {"prompt": "q", "add_special_tokens": False}, 400, "add_special_tokens"),
    (CMPL, {"prompt": "q", "priority": 1}, 400, "priority"),
    (CMPL, {"prompt": "q", "cache_salt": "tenant-a"}, 400, "cache_salt"),
    (CHAT, {"messages": [USER], "bogus": 1}, 400, "bogus"),
    (CHAT, {"messages": [USER], "chat_template": "{{ 1 }}"}, 400, "chat_template"),
    (CHAT, {"messages": [USER], "documents": [{"text": "x"}]}, 400, "documents"),
    (
        CHAT,
        {"messages": [USER], "chat_template_kwargs": {"tokenize": True}},
        400,
        "chat_template_kwargs",
    ),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [IMAGE]}, 400, "messages.0.content"),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
async def test_bad_requests_get_openai_errors(
    served: Served, path: str, body: Any, status: int, param: str | None
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    async with httpx.AsyncClient(base_url=served.base_url, headers=AUTH) as http:
        reply = await http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    if param is not None:
        assert error["param"] == param, error
        assert param.split(".")[-1] in error["message"] or param == "model", error


async def test_openai_client_raises_bad_request(openai_client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await openai_client.completions.create(
            model=MODEL_NAME, prompt="q", extra_body={"ralm": {"speculation_stride": 99}}
        )
    assert "speculation_stride must be in [1, 4]" in err.value.message


async def test_metrics_expose_ralmspec_counters(
    served: Served, openai_client: openai.AsyncOpenAI
) -> None:
    await openai_client.completions.create(
        model=MODEL_NAME, prompt=QUESTIONS[3], extra_body={"ralm": SPECULATIVE[1]}
    )
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        text = (await http.get("/metrics")).text
    for name in METRIC_NAMES:
        assert f"\n{name}" in text, name
    steps = sample("ralmspec_speculation_steps_total", outcome="hit")
    steps += sample("ralmspec_speculation_steps_total", outcome="miss")
    assert steps > 0
    assert sample("ralmspec_requests_total", method="ralmspec-B", outcome="ok") >= 1
    assert sample("ralmspec_retriever_batch_calls_count") > 0
    assert sample("ralmspec_prefix_cache_hit_tokens_total") > 0
    assert sample("ralmspec_speculation_stride_count") > 0
    # The retriever service's own counters, fetched for the scrape: its backend's time.
    assert sample("ralmspec_retriever_index_searches_total") >= 1
    assert sample("ralmspec_retriever_queries_total") >= sample(
        "ralmspec_retriever_index_searches_total"
    )
    assert sample("ralmspec_retriever_search_seconds_total") > 0
    # ... and where that time went inside the backend (InfoResponse.backend_counters)
    assert sample("ralmspec_retriever_backend_seconds_total", phase="scan") > 0
    assert sample("ralmspec_retriever_backend_work_total", counter="searches") >= 1


async def test_metrics_answer_while_the_retriever_hangs(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the retriever's counters never come; a scrape still answers within
    about a second, with the last counters fetched."""
    async with httpx.AsyncClient(base_url=served.base_url) as http:
        await http.get("/metrics")
        before = sample("ralmspec_retriever_search_seconds_total")

        async def hang() -> None:
            await asyncio.sleep(3600)

        monkeypatch.setattr(served.service.retriever, "stats", hang)
        loop = asyncio.get_running_loop()
        start = loop.time()
        response = await http.get("/metrics")
        waited = loop.time() - start
    assert response.status_code == 200 and waited < 3.0
    assert "ralmspec_requests_total" in response.text
    assert sample("ralmspec_retriever_search_seconds_total") == before


async def _wait_idle(served: Served, aborted_before: float, method: str, jobs: int) -> None:
    for _ in range(200):
        aborted = sample("ralmspec_requests_total", method=method, outcome="aborted")
        idle = served.lm.in_flight() == 0  # type: ignore[attr-defined]
        if aborted >= aborted_before + jobs and idle:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the disconnected request's work did not stop")


@pytest.mark.parametrize("batch", [False, True], ids=["one-prompt", "three-prompts"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "non-stream"])
async def test_client_disconnect_aborts_work(served: Served, stream: bool, batch: bool) -> None:
    method = "ralmspec-PSA"
    before = sample("ralmspec_requests_total", method=method, outcome="aborted")
    done_before = sample("ralmspec_requests_total", method=method, outcome="ok")
    body = {
        "prompt": QUESTIONS[1:4] if batch else QUESTIONS[1],
        "max_tokens": 256,
        "stream": stream,
        "ralm": {"mode": "ralmspec"},
    }
    async with httpx.AsyncClient(base_url=served.base_url, headers=AUTH, timeout=60) as http:
        if stream:
            async with http.stream("POST", "/v1/completions", json=body) as reply:
                async for line in reply.aiter_lines():
                    if line.startswith("data: "):
                        break  # one verified chunk arrived; now hang up
        else:
            request = asyncio.create_task(http.post("/v1/completions", json=body))
            for _ in range(3000):  # until the job is generating (at most 30 s)
                if served.lm.in_flight():  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0.01)
            request.cancel()
    await _wait_idle(served, before, method, jobs=3 if batch else 1)
    assert sample("ralmspec_requests_total", method=method, outcome="ok") == done_before
