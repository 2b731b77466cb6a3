"""``guess_ahead``: a guess ranks the cache with the query embedding encoded one token early,
while the step before generated its last token. Only which document is speculated may move;
every answer stays the baseline's, token for token, rollbacks included."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import pytest

from ralmspec_vllm.core.config import SpeculationConfig
from ralmspec_vllm.core.request import RequestContext
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.core.speculative import SpeculativeRequest
from ralmspec_vllm.core.trace import TraceRecorder
from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever

from .fakes import FakeLM, FakeTokenizer, ScriptedRetriever, SyntheticDenseRetriever
from .test_identity import assert_speculated
from .world import LONG_QUESTION, SHORT_QUESTION, baseline_and_freeze, describe, forced, matrix


def ahead(config: SpeculationConfig) -> SpeculationConfig:
    return dataclasses.replace(config, guess_ahead=True)


class Spy:
    """An encoder that logs every text it embeds and whether an LM call was in flight."""

    def __init__(self, encode: object, lm: FakeLM) -> None:
        self.encode, self.lm = encode, lm
        self.texts: list[str] = []
        self.during_lm: list[bool] = []

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        self.texts += texts
        self.during_lm += [bool(self.lm._inflight)] * len(texts)
        return self.encode(texts)  # type: ignore[operator]


def dense_engine(latency_s: float = 0.0) -> tuple[RaLMEngine, FakeLM, Spy]:
    dense = SyntheticDenseRetriever()
    lm = FakeLM(latency_s=latency_s)
    spy = Spy(dense.encode, lm)
    engine = RaLMEngine(
        lm,
        FakeTokenizer(),
        InProcessAsyncRetriever(dense),
        encoder=spy,
        encode_in_thread=False,
    )
    return engine, lm, spy


@pytest.mark.parametrize("config", [ahead(c) for c in matrix((1, 3))], ids=describe)
async def test_guess_ahead_keeps_the_answer_over_the_ablation_matrix(
    config: SpeculationConfig,
) -> None:
    engine, lm, _ = dense_engine()
    baseline = await engine.generate(LONG_QUESTION, "baseline")
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    assert result.trace.step_doc_ids == baseline.trace.step_doc_ids
    assert_speculated(result.trace, config)
    assert lm.streamed > 0
    trace = result.trace
    if trace.plain_steps < len(trace.spans) - 1:  # a plain step scores its guess beside it
        assert trace.ahead_guesses > 0


class OneHotRetriever(ScriptedRetriever):
    """A scripted retriever whose documents have one-hot vectors and whose queries all embed
    as doc 0's: the dense cache always guesses doc 0, so speculation misses exactly where the
    script names a fresh document (``forced``)."""

    dim = 256

    async def vectors(self, doc_ids: Sequence[int]) -> np.ndarray:  # type: ignore[override]
        out = np.zeros((len(doc_ids), self.dim), dtype=np.float32)
        out[np.arange(len(doc_ids)), [d % self.dim for d in doc_ids]] = 1.0
        return out

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        out[:, 0] = 1.0
        return out


async def test_ahead_guesses_embed_the_query_one_token_early_during_the_lm_step() -> None:
    """Every speculated step's guess embeds the query of its position but for the last
    token, while the step before it was still generating; without ``guess_ahead`` every
    guess embeds its own query with the LM idle."""
    config = SpeculationConfig(
        speculation_stride=4,
        async_verification=True,
        overlap_depth="pipeline",
        early_verification=True,
    )
    retriever = OneHotRetriever(forced(set()))  # every guess right: no rollback
    lm = FakeLM(latency_s=0.002)
    spy = Spy(retriever.encode, lm)
    engine = RaLMEngine(lm, FakeTokenizer(), retriever, encoder=spy, encode_in_thread=False)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    question = engine.layout.question_ids(SHORT_QUESTION)
    answer = list(baseline.token_ids)
    ends = range(4, len(answer) + 1, 4)
    early = {engine.layout.query(question, answer[: end - 1]) for end in ends}
    boundary = {engine.layout.query(question, answer[:end]) for end in ends}
    assert len(boundary) > 8 and not early & boundary

    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=ahead(config))
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.rollbacks == 0 and trace.plain_steps == 0
    assert trace.ahead_guesses == len(trace.spans) - 1  # every step but the first, retrieved
    assert set(spy.texts) <= early and all(spy.during_lm)
    assert len(spy.texts) == trace.ahead_guesses + 1  # the last step's: never needed

    spy.texts.clear()
    spy.during_lm.clear()
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids and result.trace.ahead_guesses == 0
    assert set(spy.texts) <= boundary and not any(spy.during_lm)
    assert len(spy.texts) == len(result.trace.spans) - 1
    assert len(answer) % 4 == 0


@pytest.mark.parametrize("misses", [{1}, {2, 3}, {1, 2, 3, 4, 5, 6, 7}, {4, 9, 13}])
@pytest.mark.parametrize(
    ("search_s", "lm_s"), [(0.0, 0.0), (0.004, 0.001), (0.001, 0.004)], ids=["0", "slow", "fast"]
)
@pytest.mark.parametrize(
    "overlap", [(False, 1, False), (True, "stride", False), (True, "pipeline", True)]
)
async def test_forced_rollbacks_keep_the_answer_with_guesses_made_ahead(
    misses: set[int],
    search_s: float,
    lm_s: float,
    overlap: tuple[bool, int | str, bool],
) -> None:
    """Forced misses at chosen steps, with searches slower and faster than an LM step (an
    ahead embedding then belongs to a step that is rolled back, or kept): token for token the
    baseline's, and the documents each step used too."""
    asynchronous, depth, early = overlap
    retriever = OneHotRetriever(forced(misses), latency_s=search_s)
    lm = FakeLM(latency_s=lm_s)
    engine = RaLMEngine(lm, FakeTokenizer(), retriever, encoder=retriever.encode)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    for stride in (1, 3, "auto"):
        config = SpeculationConfig(
            speculation_stride=stride,
            max_speculation_stride=8,
            prefetch_k=20,
            async_verification=asynchronous,
            overlap_depth=depth,  # type: ignore[arg-type]
            early_verification=early,
            guess_ahead=True,
        )
        result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
        assert result.token_ids == baseline.token_ids, stride
        assert result.trace.step_doc_ids == baseline.trace.step_doc_ids, stride
        trace = result.trace
        # OS3 may run the forced misses' steps plain (sync, stride 1): no rollback there
        assert trace.rollbacks > 0 or (stride == "auto" and trace.plain_steps > 0), stride
        if trace.plain_steps < len(trace.spans) - 1:
            assert trace.ahead_guesses > 0, stride


async def test_an_embedding_made_for_other_tokens_is_not_used() -> None:
    """An embedding made ahead is used only at the position one token after the tokens it
    was made from: after a step that did not make one (a held or quiet step), after a
    rollback, or where the step ended early, the guess embeds its own query."""
    engine, lm, spy = dense_engine()
    question = engine.layout.question_ids(LONG_QUESTION)
    ctx = RequestContext(
        "r",
        question,
        engine.config,
        lm,
        engine.retriever,
        engine.layout,
        engine.doc_tokens,
        TraceRecorder("ralmspec"),
    )
    request = SpeculativeRequest(ctx, ahead(SpeculationConfig()), engine.scorer)
    request.cache.insert([1, 2, 3], {d: np.ones(16, np.float32) * d for d in (1, 2, 3)})
    made = [5, 6, 7]
    made_query = engine.layout.query(question, made)
    for generated, used in [
        ([5, 6, 7, 8], True),
        ([5, 6, 7], False),
        ([5, 6, 7, 8, 9], False),
        ([5, 6, 9, 8], False),
    ]:
        request._encode_ahead(made_query, tuple(made))
        ctx.generated = list(generated)
        spy.texts.clear()
        before = ctx.recorder.ahead_guesses
        guess = await request._guess()
        assert guess.step.query == ctx.query()
        assert ctx.recorder.ahead_guesses == before + used, generated
        assert spy.texts == [made_query if used else ctx.query()], generated
    request._encode_ahead(engine.layout.query(question, made), tuple(made))
    await request.run()  # the request is done already: the one made ahead is dropped
    assert request._ahead is None


async def test_the_option_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="guess_ahead must be a bool"):
        SpeculationConfig(guess_ahead=1)  # type: ignore[arg-type]
