"""RaLMSpec and oracle outputs are token-identical to the baseline, whatever happens."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever
from ralmspec_vllm.types import Hit

from .fakes import FakeLM, FakeTokenizer, ScriptedRetriever, SyntheticDenseRetriever
from .world import (
    LONG_QUESTION,
    SHORT_QUESTION,
    assert_speculated,
    baseline_and_freeze,
    describe,
    forced,
    make_engine,
    matrix,
)

SCRIPTS = {
    "natural": None,  # hash-chosen truth over 6 documents: a mix of hits and misses
    "miss-step-1": forced({1}),
    "miss-step-2": forced({2}),
    "miss-step-3": forced({3}),
    "miss-every-third": forced(lambda s: s % 3 == 1),
    "miss-every-step": forced(lambda s: s >= 1),
}
LMS = {
    "no-eos": {},
    "eos-at-13": {"eos_at_length": 13},  # inside the 4th step: mid-round for s >= 2
    "eos-random": {"eos_probability": 0.03},  # content-dependent EOS
}


async def check_matrix(
    question: str,
    script_name: str,
    configs: list[SpeculationConfig],
    lm: FakeLM | None = None,
    config: RaLMConfig | None = None,
    doc_length: int = 12,
) -> None:
    retriever = ScriptedRetriever(SCRIPTS[script_name], doc_length=doc_length)
    engine, _ = make_engine(retriever, lm, config)
    baseline = await baseline_and_freeze(engine, retriever, question)
    assert baseline.token_ids
    for spec in configs:
        result = await engine.generate(question, "ralmspec", speculation=spec)
        assert result.token_ids == baseline.token_ids, describe(spec)
        assert result.trace.step_doc_ids == baseline.trace.step_doc_ids, describe(spec)
        assert result.finished == baseline.finished
        assert result.text == baseline.text


@pytest.mark.parametrize("lm_name", sorted(LMS))
@pytest.mark.parametrize("script_name", sorted(SCRIPTS))
@pytest.mark.parametrize("question", [SHORT_QUESTION, LONG_QUESTION], ids=["short", "long"])
async def test_ralmspec_matches_baseline_over_ablation_matrix(
    question: str, script_name: str, lm_name: str
) -> None:
    lm = FakeLM(**LMS[lm_name])  # type: ignore[arg-type]
    await check_matrix(question, script_name, list(matrix()), lm=lm)


@pytest.mark.parametrize("script_name", ["natural", "miss-step-2", "miss-every-step"])
async def test_odd_shapes_match(script_name: str) -> None:
    """Length limit not a multiple of the stride, tiny window, documents over the cap."""
    config = RaLMConfig(retrieval_stride=5, query_window=3, max_doc_tokens=8, max_new_tokens=33)
    await check_matrix(LONG_QUESTION, script_name, list(matrix()), config=config, doc_length=20)


async def test_documents_longer_than_256_tokens_are_capped() -> None:
    retriever = ScriptedRetriever(forced({2}), doc_length=300)
    engine, lm = make_engine(retriever)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    question_len = len(FakeTokenizer().encode(SHORT_QUESTION))
    separator_len = len(engine.layout.separator_ids)
    first = lm.calls[0]
    assert len(first.prompt) == 256 + separator_len + question_len
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=SpeculationConfig())
    assert result.token_ids == baseline.token_ids
    assert result.trace.rollbacks == 1


async def test_oracle_matches_with_no_retrieval() -> None:
    retriever = ScriptedRetriever(forced(lambda s: s % 2 == 0))
    engine, _ = make_engine(retriever)
    baseline = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    searches = len(retriever.search_calls)
    oracle = await engine.generate(
        LONG_QUESTION, "oracle", oracle_doc_ids=baseline.trace.step_doc_ids
    )
    assert oracle.token_ids == baseline.token_ids
    assert oracle.trace.retrieval_calls == ()
    assert len(retriever.search_calls) == searches and retriever.score_calls == 0
    assert oracle.trace.retrieval_time_s == 0.0


@pytest.mark.parametrize("config", list(matrix((1, 3))), ids=describe)
async def test_dense_cache_scoring_matches(config: SpeculationConfig) -> None:
    """Real in-process dense retriever; the cache ranks with the documents' own vectors."""
    dense = SyntheticDenseRetriever()
    retriever = InProcessAsyncRetriever(dense)
    engine = RaLMEngine(
        FakeLM(), FakeTokenizer(), retriever, encoder=dense.encode, encode_in_thread=False
    )
    baseline = await engine.generate(LONG_QUESTION, "baseline")
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.num_calls("score") == 0 and trace.num_calls("vectors") >= 1
    assert_speculated(trace, config)  # the dense cache path really speculates right


@pytest.mark.parametrize(
    ("forced_steps", "positions"),
    [
        ({1}, [0]),  # first step of the first round
        ({2}, [1]),  # middle step
        ({3}, [2]),  # last step
        ({1, 2, 3, 4, 5, 6, 7}, [0] * 7),  # every step: each round fails at its first step
    ],
)
async def test_forced_mismatch_lands_where_scripted(
    forced_steps: set[int], positions: list[int]
) -> None:
    retriever = ScriptedRetriever(forced(forced_steps))
    engine, _ = make_engine(retriever)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(speculation_stride=3)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    got = [v.mismatch_step for v in trace.verifications if v.mismatch_step is not None]
    assert got == positions
    assert trace.rollbacks == len(positions)
    # a mismatch at round position m throws away the steps from m to the round's end
    first = trace.verifications[0]
    assert trace.tokens_discarded >= 4 * (first.num_steps - positions[0])


@pytest.mark.parametrize("pooled", [True, False], ids=["pooled", "paper"])
async def test_later_requests_start_from_the_engines_pooled_accuracy(pooled: bool) -> None:
    """OS3 with the evidence bound starts a request from what earlier requests of the same
    engine and config measured (a long first round); the paper's OS3 starts every request at
    stride 1. Both stay identical to the baseline, rollback included."""
    retriever = ScriptedRetriever(forced({9}), latency_s=0.02)  # one miss at step 9
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.001))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    spec = SpeculationConfig.preset("PSA" if pooled else "PSA-PAPER")
    first = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=spec)
    matched, mismatches = engine.stride_ledgers[spec].trials()
    second = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=spec)
    for result in (first, second):
        assert result.token_ids == baseline.token_ids
        assert result.trace.rollbacks == 1
    assert first.trace.strides[0] == 1  # nothing measured yet
    if pooled:
        assert mismatches == 1 and matched >= 20  # the first request's outcomes, pooled
        assert second.trace.strides[0] > 4
        assert len(second.trace.verifications) < len(first.trace.verifications)
    else:
        assert (matched, mismatches) == (0, 0)  # the paper's OS3 pools nothing
        assert second.trace.strides[0] == 1


class GemmLikeRetriever(ScriptedRetriever):
    """A retriever whose search of 2+ queries costs 3x one query (fp32 CPU gemm vs gemv)."""

    def __init__(self, script: Callable[[int], int], one_query_s: float) -> None:
        super().__init__(script)
        self.one_query_s = one_query_s

    async def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        await asyncio.sleep(self.one_query_s * (1 if len(queries) == 1 else 3))
        return await super().search(queries, k, prefetch)


@pytest.mark.parametrize("preset", ["PSA", "PSA-PAPER"])
async def test_extended_os3_takes_plain_steps_when_rounds_cost_more_than_they_save(
    preset: str,
) -> None:
    """Half the speculations are wrong and a round of 2+ queries costs 3x a single search:
    the size-aware OS3 (PSA) settles on plain steps, the paper's (latest b whatever its
    batch) keeps speculating. Both stay identical to the baseline."""
    retriever = GemmLikeRetriever(forced(lambda s: s % 2 == 1), one_query_s=0.01)
    engine, _ = make_engine(retriever, FakeLM(latency_s=0.001))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    retriever.search_calls.clear()
    result = await engine.generate(
        SHORT_QUESTION, "ralmspec", speculation=SpeculationConfig.preset(preset)
    )
    assert result.token_ids == baseline.token_ids
    multi = sum(1 for n, _ in retriever.search_calls if n > 1)
    steps = len(baseline.trace.step_doc_ids)
    if preset == "PSA":  # one exploratory round of 3, then single-query steps only
        assert multi <= 2 and result.trace.plain_steps >= steps // 4
    else:
        assert multi > steps // 4 and result.trace.plain_steps <= 2


async def test_the_engine_pools_a_bounded_number_of_configs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ralmspec_vllm.core import runner

    monkeypatch.setattr(runner, "MAX_STRIDE_LEDGERS", 2)
    retriever = ScriptedRetriever(forced({3}))
    engine, _ = make_engine(retriever)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    for prefetch_k in (1, 2, 3, 4):  # four per-request configs, room for two
        spec = SpeculationConfig.preset("PSA", prefetch_k=prefetch_k)
        result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=spec)
        assert result.token_ids == baseline.token_ids
    assert [s.prefetch_k for s in engine.stride_ledgers] == [1, 2]


@pytest.mark.parametrize("score_recent", [1, 2, 5])
@pytest.mark.parametrize("script_name", ["natural", "miss-every-third"])
async def test_scoring_only_the_recent_cache_keeps_the_answer(
    script_name: str, score_recent: int
) -> None:
    """``score_recent`` narrows what the retriever's ``Score`` ranks, so it can change the
    speculated documents, never the answer: token for token the baseline's, late and early
    pipelines and rounds alike."""
    retriever = ScriptedRetriever(SCRIPTS[script_name])
    engine, _ = make_engine(retriever, FakeLM())
    baseline = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    presets = (
        "PSA",
        "PSA:overlap_depth=pipeline",
        "PSA:overlap_depth=pipeline:early_verification=true",
    )
    for text in presets:
        spec = SpeculationConfig.parse(
            f"{text}:prefetch_k=20:exact_k=0:score_recent={score_recent}"
        )
        retriever.score_ids.clear()
        result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
        assert result.token_ids == baseline.token_ids, text
        assert result.trace.step_doc_ids == baseline.trace.step_doc_ids, text
        assert retriever.score_ids and max(map(len, retriever.score_ids)) <= score_recent, text


class QueryLog(InProcessAsyncRetriever):
    """Records every query a search was asked."""

    def __init__(self, retriever: object) -> None:
        super().__init__(retriever)  # type: ignore[arg-type]
        self.queries: list[str] = []

    async def search(self, queries: Sequence[str], k: int, prefetch: int = 0) -> list[list[Hit]]:
        self.queries.extend(queries)
        return await super().search(queries, k, prefetch)


@pytest.mark.parametrize("preset", ["PSA", "B"])
async def test_a_query_text_apart_from_the_prompt_is_what_every_search_reads(
    preset: str,
) -> None:
    """A chat request's prompt is its rendered template, but its queries read the
    conversation's text (``query``): every mode's searches read it and never the markup,
    and the answers stay the baseline's."""
    dense = SyntheticDenseRetriever()
    log = QueryLog(dense)
    config = RaLMConfig(query_window=6, retrieval_stride=2, max_new_tokens=12)
    engine = RaLMEngine(
        FakeLM(), FakeTokenizer(), log, config, encoder=dense.encode, encode_in_thread=False
    )
    question = "who first sailed around the world"
    prompt = f"system you are a helpful assistant user {question} assistant"
    baseline = await engine.generate(prompt, "baseline", query=question)
    assert log.queries[0] == question  # the window: the question's 6 words, no markup
    asked = list(log.queries)
    assert all(w not in q.split() for q in asked for w in ("system", "user", "assistant"))
    log.queries.clear()
    result = await engine.generate(
        prompt, "ralmspec", speculation=SpeculationConfig.preset(preset), query=question
    )
    assert result.token_ids == baseline.token_ids
    assert result.trace.step_doc_ids == baseline.trace.step_doc_ids
    # speculated steps query their own (sometimes rolled back) text, never the markup
    assert log.queries[0] == question
    assert all(w not in q.split() for q in log.queries for w in ("system", "user", "assistant"))
    # without ``query`` the window reads the prompt, markup and all
    log.queries.clear()
    await engine.generate(prompt, "baseline")
    assert log.queries[0] == "first sailed around the world assistant"
