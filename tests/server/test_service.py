"""``RaLMService`` without vLLM: verified-token streaming, limits, cancellation (fast).

Runs the real core over the core tests' deterministic fakes (``core.fakes``). The streaming
contract checked here: chunks are contiguous, never retracted (a rollback below the streamed
frontier fails the job), and concatenate to exactly the baseline's tokens, whatever the
speculation does (forced misses at the first, a middle and every step; P, S, A on and off).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from core.fakes import FakeLM, FakeTokenizer, ScriptedRetriever
from core.world import LONG_QUESTION, SHORT_QUESTION, forced

from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.load import CALIBRATION_QUERIES, LoopLoad, RetrieverLoad
from ralmspec_vllm.service import (
    WARMUP_TOKENS,
    JobError,
    JobResult,
    RaLMService,
    RequestOptions,
    ServiceConfig,
    VerifiedChunk,
)

SCRIPTS = {
    "natural": None,
    "miss-step-1": forced({1}),
    "miss-step-3": forced({3}),
    "miss-every-step": forced(lambda s: s >= 1),
}
PRESETS = ["B", "P", "S", "A", "PSA"]


def make_service(
    script: object = None, lm: FakeLM | None = None, **config: object
) -> tuple[RaLMService, ScriptedRetriever, FakeLM]:
    retriever = ScriptedRetriever(script)  # type: ignore[arg-type]
    lm = lm or FakeLM(eos_at_length=37)
    service_config = ServiceConfig(ralm=RaLMConfig(max_new_tokens=48), **config)  # type: ignore[arg-type]
    service = RaLMService(lm, FakeTokenizer(), retriever, service_config, max_model_len=1024)
    return service, retriever, lm


async def collect(
    service: RaLMService, question: str, **options: object
) -> tuple[list[VerifiedChunk], JobResult]:
    job = service.plan(service.question_ids(question), None, RequestOptions(**options))  # type: ignore[arg-type]
    chunks: list[VerifiedChunk] = []
    result = None
    async for item in service.stream(job):
        if isinstance(item, JobResult):
            result = item
        else:
            chunks.append(item)
    assert result is not None
    return chunks, result


@pytest.mark.parametrize("script_name", sorted(SCRIPTS))
@pytest.mark.parametrize("question", [SHORT_QUESTION, LONG_QUESTION], ids=["short", "long"])
async def test_stream_is_verified_prefix_of_baseline(script_name: str, question: str) -> None:
    service, retriever, _ = make_service(SCRIPTS[script_name])
    _, baseline = await collect(service, question, mode="baseline")
    retriever.freeze()
    for preset in PRESETS:
        spec = SpeculationConfig.preset(preset)
        for stride in (1, 3, "auto") if preset != "S" and preset != "PSA" else ("auto",):
            chunks, result = await collect(
                service,
                question,
                mode="ralmspec",
                speculation_stride=stride,
                prefetch_k=spec.prefetch_k,
                async_verification=spec.async_verification,
            )
            label = f"{preset} s={stride}"
            assert result.token_ids == baseline.token_ids, label
            position = 0
            for chunk in chunks:
                assert chunk.start == position, label
                assert chunk.token_ids, label
                position += len(chunk.token_ids)
            assert sum((c.token_ids for c in chunks), ()) == baseline.token_ids, label
            assert len(chunks) > 1, label  # streamed progressively, not all at the end


async def test_baseline_streams_every_step() -> None:
    service, _, _ = make_service()
    chunks, result = await collect(service, SHORT_QUESTION, mode="baseline", retrieval_stride=4)
    assert [len(c.token_ids) for c in chunks[:-1]] == [4] * (len(chunks) - 1)
    assert result.trace.mode == "baseline"
    assert [s.doc_id for s in result.spans] == list(result.trace.step_doc_ids)


async def test_plan_limits() -> None:
    with pytest.raises(ValueError, match="max_prefetch_k"):  # below PSA's 256: caught at start
        make_service(max_prefetch_k=50)
    service, _, _ = make_service(max_tokens_limit=100, max_retrieval_stride=8, max_prefetch_k=300)
    ids = service.question_ids(SHORT_QUESTION)
    job = service.plan(ids, None, RequestOptions())
    assert job.mode == "ralmspec" and job.config.max_new_tokens == 48
    assert job.speculation == SpeculationConfig.preset("PSA")
    job = service.plan(ids, 7, RequestOptions(mode="baseline", retrieval_stride=2))
    assert (job.mode, job.config.max_new_tokens, job.config.retrieval_stride) == ("baseline", 7, 2)
    too_long = service.config.speculation.max_speculation_stride + 1  # the default cap moves
    bad = [
        (ids, 0, RequestOptions(), "max_tokens"),
        (ids, 101, RequestOptions(), "max_tokens"),
        (ids, None, RequestOptions(mode="oracle"), "ralm.mode"),
        (ids, None, RequestOptions(retrieval_stride=9), "ralm.retrieval_stride"),
        (ids, None, RequestOptions(speculation_stride=too_long), "ralm.speculation_stride"),
        (ids, None, RequestOptions(speculation_stride="fast"), "ralm.speculation_stride"),
        (ids, None, RequestOptions(prefetch_k=301), "ralm.prefetch_k"),
        (list(range(1024 - 256)), None, RequestOptions(), "prompt"),
    ]
    for question_ids, max_tokens, options, param in bad:
        with pytest.raises(JobError) as err:
            service.plan(question_ids, max_tokens, options)
        assert err.value.param == param, (param, str(err.value))
    # Without a server cap, the model length bounds max_tokens: prompt + document + answer.
    service, _, _ = make_service(max_tokens_limit=100_000)
    room = 1024 - service.prompt_overhead() - len(ids)
    assert service.plan(ids, room, RequestOptions()).config.max_new_tokens == room
    with pytest.raises(JobError, match=f"max_tokens must be in \\[1, {room}\\]"):
        service.plan(ids, room + 1, RequestOptions())


async def test_closing_the_stream_cancels_the_job() -> None:
    service, _, lm = make_service(lm=FakeLM(latency_s=0.05))
    job = service.plan(service.question_ids(SHORT_QUESTION), None, RequestOptions(mode="baseline"))
    stream = service.stream(job)
    first = await anext(stream)  # type: ignore[call-overload]
    assert isinstance(first, VerifiedChunk)
    await asyncio.sleep(0.02)  # the next step's LM call (50 ms) is in flight now
    await stream.aclose()  # type: ignore[attr-defined]  # as a disconnected client does
    calls = len(lm.calls)
    await asyncio.sleep(0.2)
    assert len(lm.calls) == calls  # nothing ran on after the close
    assert lm.cancelled  # the in-flight LM call was cancelled
    assert not lm._inflight


class _Clocks:
    """A wall clock and a loop-thread CPU clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def spend(self, seconds: float, share: float) -> None:
        """``seconds`` of wall time with the loop running ``share`` of a core."""
        self.wall += seconds
        self.cpu += seconds * share


def _loop_load(clocks: _Clocks) -> LoopLoad:
    return LoopLoad(clock=lambda: clocks.wall, cpu_clock=lambda: clocks.cpu, min_gap_s=0.0)


def fallbacks(reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("ralmspec_load_fallbacks_total", {"reason": reason}) or 0.0


async def test_calibration_measures_what_a_query_costs_the_retriever() -> None:
    service, retriever, _ = make_service()
    retriever.latency_s, retriever.query_latency_s = 0.01, 0.002  # 10 ms a call + 2 ms a query
    cost = await service.calibrate_retriever()
    assert 0.0015 <= cost <= 0.004, cost
    assert service.retriever_load.query_cost_s == cost
    assert not service.retriever_load.sent  # calibration is not load


async def retriever_down(*args: object, **kwargs: object) -> None:
    """A retriever call that fails at once (for ``retriever.search``)."""
    raise ConnectionError("retriever down")


async def test_a_failing_calibration_leaves_the_fallback_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, retriever, _ = make_service()
    retriever.search = retriever_down  # type: ignore[method-assign]
    assert await service.calibrate_retriever() == 0.0
    assert service.retriever_load.query_cost_s == 0.0
    assert "retriever calibration failed" in caplog.text


async def test_the_warm_up_answers_both_ways_then_restarts_the_clock_and_the_load() -> None:
    """One short baseline answer and one RaLMSpec answer; afterwards OS3's clock has no
    steps (a warm-up's one-off costs would steer plain-or-speculate for a minute), the
    speculation outcomes stay pooled, and the load signals have no queries and no loop
    time."""
    service, retriever, lm = make_service(forced({2}))
    await service.calibrate_retriever()
    clocks = _Clocks()
    service.loop_load = _loop_load(clocks)
    generate = lm.generate

    async def busy_loop(*args: object, **kwargs: object) -> object:
        clocks.spend(0.5, 1.0)  # the warm-up's first calls keep the loop busy
        return await generate(*args, **kwargs)  # type: ignore[arg-type]

    lm.generate = busy_loop  # type: ignore[method-assign]
    seconds = await service.warm_up()
    lm.generate = generate  # type: ignore[method-assign]
    assert seconds is not None and seconds >= 0
    assert [c.request_id.split("#")[0] for c in lm.calls][:1] == ["warmup-baseline"]
    assert any(c.request_id.startswith("warmup-ralmspec") for c in lm.calls)
    assert all(len(c.output) <= WARMUP_TOKENS for c in lm.calls)
    (ledger,) = service.engine.stride_ledgers.values()
    assert ledger.steps.per_token("plain", "first", "speculation") is None
    assert sum(ledger.trials()) > 0  # the miss forced at step 2 and the hits around it
    assert not service.retriever_load.sent and retriever.search_calls
    assert not service.loop_load.samples and service.fallback_reason() is None


async def test_a_failing_warm_up_is_logged_and_serving_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    service, retriever, _ = make_service()
    real = retriever.search
    retriever.search = retriever_down  # type: ignore[method-assign]
    assert await service.warm_up() is None
    assert "warm-up failed" in caplog.text
    retriever.search = real  # type: ignore[method-assign]
    _, result = await collect(service, SHORT_QUESTION)
    assert result.token_ids


async def test_calibration_prices_the_encoding_a_memo_would_hide() -> None:
    """A retriever whose encoder memoises texts answers a repeated text for free, so the
    calibration must never repeat one: here a fresh text costs 2 ms and a memoised one
    nothing, and the price is the fresh text's (it read ~0 when each pair repeated its
    texts: 0.07 ms on the dev box against a query's ~16 ms under load, session 47)."""
    service, retriever, _ = make_service()
    seen: set[str] = set()
    search = retriever.search
    asked: list[str] = []

    async def memoised(queries: Sequence[str], k: int, prefetch: int = 0) -> object:
        fresh = [q for q in queries if q not in seen]
        seen.update(fresh)
        asked.extend(queries)
        await asyncio.sleep(0.002 * len(fresh))
        return await search(queries, k, prefetch)

    retriever.search = memoised  # type: ignore[method-assign,assignment]
    cost = await service.calibrate_retriever()
    assert 0.0015 <= cost <= 0.004, cost
    assert len(asked) == len(set(asked)) == 2 * (1 + CALIBRATION_QUERIES)


async def test_a_busy_retriever_runs_ralmspec_requests_as_the_baseline() -> None:
    """``max_retriever_utilization``: while this server keeps the retriever busy (recent
    queries/s x the calibrated cost of one), a ``ralmspec`` request runs as the baseline
    (same answer, counted); once the window has gone quiet, requests speculate again."""
    service, _, _ = make_service(max_retriever_utilization=0.5)
    assert service.config.max_speculating is None
    service.retriever_load = RetrieverLoad(window_s=1.0)
    service.retriever_load.calibrate(0.0, 3.15, 64)  # 50 ms a query: a slow scan
    _, first = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert not first.load_fallback and first.trace.verifications  # idle: it speculates
    service.retriever_load.clear()
    _, want = await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
    assert first.token_ids == want.token_ids
    assert service.retriever_load.utilization() > 0.5  # >10 queries within the last second
    before = fallbacks("retriever")
    _, busy = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert busy.load_fallback and busy.trace.mode == "baseline"
    assert not busy.trace.verifications
    assert busy.token_ids == want.token_ids
    assert fallbacks("retriever") == before + 1
    await asyncio.sleep(1.05)  # the window goes quiet
    assert service.fallback_reason() is None
    _, again = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert not again.load_fallback and again.trace.verifications
    assert again.token_ids == want.token_ids


async def test_failed_searches_do_not_count_as_retriever_load() -> None:
    """A retriever that fails fast is not busy: its failed searches add nothing to the load
    signal (an error can return at once, so its queries say nothing about the retriever's
    room), while the searches that succeed do."""
    service, retriever, _ = make_service(max_retriever_utilization=0.4)
    service.retriever_load.calibrate(0.0, 3.15, 64)  # 50 ms a query
    search = retriever.search

    async def down(*args: object, **kwargs: object) -> object:
        raise ConnectionError("injected: retriever down")

    retriever.search = down  # type: ignore[method-assign]
    with pytest.raises(ConnectionError, match="injected"):
        await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
    assert service.retriever_load.query_rate() == 0.0
    assert not service.retriever_busy()
    retriever.search = search  # type: ignore[method-assign]
    await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
    assert service.retriever_load.query_rate() > 0.0


async def test_a_retriever_that_turns_busy_holds_speculation_mid_answer() -> None:
    """A request that started speculating on an idle retriever runs plain steps once the
    retriever turns busy (a burst of other requests' queries after its 4th LM call): same
    answer, not a fallback (it did speculate), its held steps counted on the metric."""
    from prometheus_client import REGISTRY

    service, _, lm = make_service(max_retriever_utilization=0.5)
    service.retriever_load.calibrate(0.0, 0.063, 64)  # 1 ms a query: its own are no load
    _, want = await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
    service.retriever_load.clear()
    generate = lm.generate

    async def busy_after_call_4(*args: object, **kwargs: object) -> object:
        out = await generate(*args, **kwargs)  # type: ignore[arg-type]
        if len(lm.calls) == 4:
            service.retriever_load.observe(10_000)  # 5,000 queries/s: utilization 5
        return out

    lm.generate = busy_after_call_4  # type: ignore[method-assign]
    lm.calls.clear()
    before = REGISTRY.get_sample_value("ralmspec_held_steps_total") or 0.0
    _, result = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert result.token_ids == want.token_ids
    assert not result.load_fallback and result.trace.mode.startswith("ralmspec")
    trace = result.trace
    assert trace.verifications and trace.held_steps > len(trace.spans) // 2
    assert REGISTRY.get_sample_value("ralmspec_held_steps_total") == before + trace.held_steps
    service.retriever_load.clear()  # quiet again: the next request speculates throughout
    _, again = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert again.token_ids == want.token_ids and again.trace.held_steps == 0


async def test_a_busy_event_loop_runs_ralmspec_requests_as_the_baseline() -> None:
    """``max_loop_cpu``: while this server's event loop has run more than the limit's share
    of a core lately, a ``ralmspec`` request runs as the baseline (same answer, counted
    under ``server``); once the loop has room again, requests speculate."""
    service, _, _ = make_service(max_loop_cpu=0.6)
    clocks = _Clocks()
    service.loop_load = _loop_load(clocks)
    _, want = await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
    clocks.spend(2.0, 0.3)  # a third of a core: room
    _, idle = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert not idle.load_fallback and idle.trace.verifications
    clocks.spend(2.0, 0.95)  # the loop nearly full
    before = fallbacks("server")
    assert service.fallback_reason() == "server"
    _, busy = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert busy.load_fallback and busy.trace.mode == "baseline"
    assert not busy.trace.verifications and busy.token_ids == want.token_ids
    assert fallbacks("server") == before + 1
    clocks.spend(10.0, 0.1)  # quiet for longer than the window
    _, again = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert not again.load_fallback and again.trace.verifications
    assert idle.token_ids == again.token_ids == want.token_ids


async def test_an_event_loop_that_turns_busy_holds_speculation_mid_answer() -> None:
    """A request that started speculating runs plain steps once the loop turns busy (after
    its 4th LM call): same answer, not a fallback, its held steps counted."""
    service, _, lm = make_service(max_loop_cpu=0.6)
    clocks = _Clocks()
    service.loop_load = _loop_load(clocks)
    _, want = await collect(service, LONG_QUESTION, mode="baseline", retrieval_stride=2)
    generate = lm.generate

    async def busy_after_call_4(*args: object, **kwargs: object) -> object:
        out = await generate(*args, **kwargs)  # type: ignore[arg-type]
        clocks.spend(0.5, 1.0 if len(lm.calls) >= 4 else 0.1)
        return out

    lm.generate = busy_after_call_4  # type: ignore[method-assign]
    lm.calls.clear()
    _, result = await collect(service, LONG_QUESTION, mode="ralmspec", retrieval_stride=2)
    assert result.token_ids == want.token_ids
    assert not result.load_fallback and result.trace.verifications
    assert result.trace.held_steps > 0


async def test_max_loop_cpu_none_never_falls_back_on_the_loop() -> None:
    service, _, _ = make_service(max_loop_cpu=None)
    clocks = _Clocks()
    service.loop_load = _loop_load(clocks)
    service.loop_load.sample()
    clocks.spend(5.0, 1.0)
    assert service.fallback_reason() is None and not service.speculation_held()
    with pytest.raises(ValueError, match="max_loop_cpu"):
        ServiceConfig(max_loop_cpu=0.0)


async def test_speculating_limit_comes_before_the_retriever() -> None:
    service, _, _ = make_service(max_speculating=0, max_retriever_utilization=None)
    before = fallbacks("speculating")
    _, result = await collect(service, SHORT_QUESTION, mode="ralmspec")
    assert result.load_fallback and fallbacks("speculating") == before + 1
    service, _, _ = make_service(max_retriever_utilization=None)
    service.retriever_load.calibrate(0.0, 63.0, 64)  # a second a query
    service.retriever_load.observe(100)
    assert service.fallback_reason() is None  # off: a busy retriever changes nothing


@pytest.mark.parametrize("mode", ["baseline", "ralmspec"])
async def test_ignore_eos_reaches_the_lm_through_the_http_api(mode: str) -> None:
    """The request field is honoured, not just accepted: over the real app (ASGI), the
    answer that stopped at EOS runs on to max_tokens with ``ignore_eos``."""
    import httpx

    from ralmspec_vllm.entrypoints.openai.app import build_app

    service, retriever, _ = make_service()
    await service.run(service.plan(service.question_ids(LONG_QUESTION), None, RequestOptions()))
    retriever.freeze()  # taught by the baseline: ralmspec sees the same documents
    transport = httpx.ASGITransport(app=build_app(service, "m"))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        body = {"prompt": LONG_QUESTION, "max_tokens": 48, "ralm": {"mode": mode}}
        stops = (await http.post("/v1/completions", json=body)).json()
        runs_on = (await http.post("/v1/completions", json={**body, "ignore_eos": True})).json()
    assert stops["choices"][0]["finish_reason"] == "stop"
    assert stops["usage"]["completion_tokens"] == 38  # EOS is the 38th token
    assert runs_on["choices"][0]["finish_reason"] == "length"
    assert runs_on["usage"]["completion_tokens"] == 48
    assert runs_on["choices"][0]["text"].startswith(stops["choices"][0]["text"])
