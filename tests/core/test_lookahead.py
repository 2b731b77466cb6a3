"""Look-ahead guesses (``SpeculationConfig.lookahead_guess``): the next step's guess is made
while the LM generates the current step's last token, from the query one token short.

Identity is checked over the whole ablation matrix with forced misses and EOS; the other
tests pin down which query a guess used and when a look-ahead guess must not be used.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from ralmspec_vllm.core.config import RaLMConfig, SpeculationConfig
from ralmspec_vllm.core.runner import RaLMEngine
from ralmspec_vllm.retrieval.base import InProcessAsyncRetriever

from .fakes import FakeLM, FakeTokenizer, ScriptedRetriever, SyntheticDenseRetriever
from .test_identity import LMS, SCRIPTS, check_matrix
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


@pytest.mark.parametrize("lm_name", sorted(LMS))
@pytest.mark.parametrize("script_name", sorted(SCRIPTS))
@pytest.mark.parametrize("question", [SHORT_QUESTION, LONG_QUESTION], ids=["short", "long"])
async def test_lookahead_matches_baseline_over_ablation_matrix(
    question: str, script_name: str, lm_name: str
) -> None:
    lm = FakeLM(**LMS[lm_name])  # type: ignore[arg-type]
    await check_matrix(question, script_name, list(matrix(lookahead=True)), lm=lm)


@pytest.mark.parametrize("config", list(matrix((1, 3), lookahead=True)), ids=describe)
async def test_lookahead_with_dense_cache_scoring_matches(config: SpeculationConfig) -> None:
    """The real in-process dense retriever: a query one token short still guesses right."""
    dense = SyntheticDenseRetriever()
    retriever = InProcessAsyncRetriever(dense)
    engine = RaLMEngine(
        FakeLM(), FakeTokenizer(), retriever, encoder=dense.encode, encode_in_thread=False
    )
    baseline = await engine.generate(LONG_QUESTION, "baseline")
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    assert_speculated(result.trace, config)
    if not config.adaptive:  # OS3 may run every step plain here
        assert result.trace.lookahead_used > 0


class ScoreRecorder(ScriptedRetriever):
    """Records the query of every cache scoring (each guess's)."""

    def __init__(self) -> None:
        super().__init__(None, num_common=1)  # every query's top-1 is doc 0: all hits
        self.scored: list[str] = []

    async def score(self, query: str, doc_ids: Sequence[int]) -> list[float]:
        self.scored.append(query)
        return await super().score(query, doc_ids)


@pytest.mark.parametrize(
    "config",
    [
        SpeculationConfig(speculation_stride=3, lookahead_guess=True),
        SpeculationConfig(
            speculation_stride=4,
            async_verification=True,
            overlap_depth="pipeline",
            early_verification=True,
            lookahead_guess=True,
        ),
    ],
    ids=describe,
)
async def test_guesses_use_the_query_one_token_short(config: SpeculationConfig) -> None:
    """The first guess follows the first (retrieved) step and uses its exact query; every
    later one was made one token before the step it follows ended. The answer's last step
    starts no look-ahead."""
    retriever = ScoreRecorder()
    engine, _ = make_engine(retriever)
    baseline = await engine.generate(LONG_QUESTION, "baseline")
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.rollbacks == 0 and trace.speculation_hits == len(trace.spans) - 1
    question_ids = engine.layout.question_ids(LONG_QUESTION)
    tokens = list(result.token_ids)
    ends = [span.end for span in trace.spans[:-1]]  # each step a guess follows
    expected = [engine.layout.query(question_ids, tokens[: ends[0]])]
    expected += [engine.layout.query(question_ids, tokens[: end - 1]) for end in ends[1:]]
    assert retriever.scored == expected
    assert trace.lookahead_used == trace.lookahead_guesses == len(ends) - 1
    exact = [engine.layout.query(question_ids, tokens[:end]) for end in ends[1:]]
    assert not set(exact) & set(retriever.scored)  # no guess was made twice


@pytest.mark.parametrize("async_verification", [False, True], ids=["sync", "async"])
async def test_a_rolled_back_steps_lookahead_is_not_used(async_verification: bool) -> None:
    """A miss throws away the steps after it; the look-ahead guess made for them is
    dropped, and the corrected step makes a new one."""
    retriever = ScriptedRetriever(forced(lambda step: step % 4 == 2))
    engine, _ = make_engine(retriever)
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(
        speculation_stride=3, async_verification=async_verification, lookahead_guess=True
    )
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    trace = result.trace
    assert trace.rollbacks >= 2
    assert 0 < trace.lookahead_used <= trace.lookahead_guesses
    if not async_verification:  # the round's last step made one for the next round
        assert trace.lookahead_used < trace.lookahead_guesses


async def test_one_token_steps_make_no_lookahead() -> None:
    """With a stride of one token there is no moment one token short of a step's end."""
    retriever = ScriptedRetriever(forced({3}))
    engine, _ = make_engine(retriever, config=RaLMConfig(retrieval_stride=1, max_new_tokens=20))
    baseline = await baseline_and_freeze(engine, retriever, SHORT_QUESTION)
    config = SpeculationConfig(speculation_stride=3, lookahead_guess=True)
    result = await engine.generate(SHORT_QUESTION, "ralmspec", speculation=config)
    assert result.token_ids == baseline.token_ids
    assert result.trace.lookahead_guesses == 0


async def test_without_the_switch_no_guess_looks_ahead() -> None:
    retriever = ScoreRecorder()
    engine, _ = make_engine(retriever)
    await engine.generate(LONG_QUESTION, "baseline")
    result = await engine.generate(
        LONG_QUESTION, "ralmspec", speculation=SpeculationConfig(speculation_stride=3)
    )
    assert result.trace.lookahead_guesses == 0
    question_ids = engine.layout.question_ids(LONG_QUESTION)
    tokens = list(result.token_ids)
    ends = [span.end for span in result.trace.spans[:-1]]
    assert retriever.scored == [engine.layout.query(question_ids, tokens[:e]) for e in ends]
