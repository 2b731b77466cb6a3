"""Where an answer ends. Stop strings and stop token ids: where the check cuts, what text is
shown, and that RaLMSpec stops exactly where the baseline does, rollbacks included; and
``ignore_eos``: every mode runs past EOS alike."""

from __future__ import annotations

import dataclasses

import pytest

from ralmspec_vllm.core.config import RaLMConfig
from ralmspec_vllm.core.stop import StopCondition, StopText, earliest_stop

from .fakes import EOS, FIRST_GEN, FakeLM, FakeTokenizer, ScriptedRetriever
from .world import LONG_QUESTION, baseline_and_freeze, describe, forced, make_engine, matrix

TOK = FakeTokenizer(vocab_size=5000)


def g(*numbers: int) -> list[int]:
    return [FIRST_GEN + n for n in numbers]


def test_a_stop_token_ends_the_answer_after_it() -> None:
    stop = StopCondition(token_ids=frozenset(g(7)))
    assert stop.find(TOK, g(1, 2, 7, 3, 7), 0) == (3, FIRST_GEN + 7)
    assert stop.find(TOK, g(1, 2, 7, 3, 7), 3) == (5, FIRST_GEN + 7)  # only after ``begin``
    assert stop.find(TOK, g(1, 2, 3), 0) is None


def test_a_stop_string_ends_the_answer_at_the_token_completing_it() -> None:
    stop = StopCondition(strings=("g2 g3",))
    # The string spans tokens 1-2; checked from the step that began at token 2.
    assert stop.find(TOK, g(1, 2, 3, 4), 2) == (3, "g2 g3")
    assert stop.find(TOK, g(1, 2, 4, 3), 2) is None


def test_the_earlier_of_a_stop_token_and_a_stop_string_wins() -> None:
    both = StopCondition(strings=("g4",), token_ids=frozenset(g(9)))
    assert both.find(TOK, g(1, 4, 9), 0) == (2, "g4")
    assert both.find(TOK, g(1, 9, 4), 0) == (2, FIRST_GEN + 9)


def test_earliest_stop_is_the_first_completed_then_the_longest() -> None:
    assert earliest_stop("abcabc", ("c", "b")) == (1, "b")
    assert earliest_stop("abcabc", ("bc", "b")) == (1, "b")
    assert earliest_stop("abcabc", ("bc", "c")) == (1, "bc")
    assert earliest_stop("xxabab", ("abab", "ba")) == (3, "ba")
    assert earliest_stop("abcabc", ("b",), start=2) == (4, "b")
    assert earliest_stop("abc", ("x",)) is None


@pytest.mark.parametrize(
    "bad",
    [
        {"strings": ("",)},
        {"strings": ["x"]},
        {"token_ids": frozenset({-1})},
        {"token_ids": {1}},
    ],
)
def test_bad_stop_conditions_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="stop"):
        StopCondition(**bad)  # type: ignore[arg-type]


TEXTS = [
    ("the answer is 42.\n\nQuestion: next", ("\n\nQuestion:",), "the answer is 42."),
    ("a b c", ("b c d",), "a b c"),  # a held tail that never completes is released at the end
    ("xxabab", ("abab", "ba"), "xxa"),  # "ba" is completed first, though "abab" starts first
    ("no stop here", ("zz",), "no stop here"),
    ("stop at once", ("stop",), ""),
]


@pytest.mark.parametrize(("text", "strings", "shown"), TEXTS)
def test_stop_text_shows_the_same_text_however_it_arrives(
    text: str, strings: tuple[str, ...], shown: str
) -> None:
    whole = StopText(strings)
    assert whole.push(text) + whole.flush() == shown
    for cut in range(len(text) + 1):  # every split into two deltas
        parts = StopText(strings)
        assert parts.push(text[:cut]) + parts.push(text[cut:]) + parts.flush() == shown
    chars = StopText(strings)
    streamed = [chars.push(c) for c in text]  # one character at a time
    assert "".join(streamed) + chars.flush() == shown
    for i in range(len(text)):  # nothing shown is ever part of a stop string
        released = "".join(streamed[: i + 1])
        assert earliest_stop(released, strings) is None


def test_stop_text_holds_back_only_a_possible_stop_start() -> None:
    shown = StopText(("###",))
    assert shown.push("abc#") == "abc"
    assert shown.push("#") == ""
    assert shown.push("x") == "##x"
    assert shown.push("##") == ""
    assert shown.push("#tail") == ""
    assert shown.flush() == ""
    assert shown.stopped


def test_stop_text_can_include_the_stop_string() -> None:
    shown = StopText(("END",), include=True)
    assert shown.push("abc EN") + shown.push("D and more") + shown.flush() == "abc END"


# -- identity: RaLMSpec stops where the baseline stops ------------------------------------------

SCRIPTS = {
    "natural": None,
    "miss-step-2": forced({2}),
    "miss-every-third": forced(lambda s: s % 3 == 1),
    "miss-every-step": forced(lambda s: s >= 1),
}


def _lm() -> FakeLM:
    return FakeLM(vocab_size=5000)  # nearly every generated word is new: stops are precise


def _stops(answer: list[int]) -> list[StopCondition]:
    """Stops cutting the answer mid-step, at a step boundary (a string spanning two steps)
    and late, as strings and as token ids."""
    words = TOK.decode(answer).split(" ")
    return [
        StopCondition(strings=(words[5],)),
        StopCondition(strings=(f"{words[7]} {words[8]}",)),  # tokens 7-8: across a boundary
        StopCondition(strings=("never there", words[13])),
        StopCondition(token_ids=frozenset({answer[10]})),
        StopCondition(strings=(words[21],), token_ids=frozenset({answer[17]})),
    ]


@pytest.mark.parametrize("script_name", sorted(SCRIPTS))
async def test_ralmspec_stops_where_the_baseline_stops(script_name: str) -> None:
    retriever = ScriptedRetriever(SCRIPTS[script_name])
    engine, _ = make_engine(retriever, _lm(), tokenizer=TOK)
    plain = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    assert len(plain.token_ids) == engine.config.max_new_tokens
    for stop in _stops(list(plain.token_ids)):
        config = dataclasses.replace(engine.config, stop=stop)
        base = await engine.generate(LONG_QUESTION, "baseline", config=config)
        assert base.finished and base.stop_reason is not None
        assert base.token_ids == plain.token_ids[: len(base.token_ids)]
        assert len(base.token_ids) < len(plain.token_ids)
        assert base.trace.spans[-1].end == len(base.token_ids)
        for spec in matrix(strides=(1, 3, 8)):
            result = await engine.generate(
                LONG_QUESTION, "ralmspec", speculation=spec, config=config
            )
            assert result.token_ids == base.token_ids, (stop, describe(spec))
            assert result.stop_reason == base.stop_reason, (stop, describe(spec))
            assert result.finished
            assert result.trace.step_doc_ids == base.trace.step_doc_ids, describe(spec)


async def test_a_stop_in_a_rolled_back_step_is_forgotten() -> None:
    """A speculated step generated on a wrong document runs into a stop token that the
    baseline never generates: the verification rolls the step back, the stop goes with it,
    and the answer goes on to the baseline's."""
    retriever = ScriptedRetriever(forced(lambda s: s % 2 == 1))
    engine, lm = make_engine(retriever, _lm(), tokenizer=TOK)
    plain = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    spec = next(s for s in matrix(strides=(3,)) if not s.async_verification and s.prefetch_k == 1)
    lm.calls.clear()
    probe = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec)
    assert probe.token_ids == plain.token_ids and probe.trace.rollbacks > 0
    kept = set(plain.token_ids)
    discarded = [t for call in lm.calls for t in call.output if t not in kept and t != EOS]
    assert discarded, "no speculated step was thrown away"
    stop = StopCondition(token_ids=frozenset(discarded[:3]))
    config = dataclasses.replace(engine.config, stop=stop)
    lm.calls.clear()
    result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec, config=config)
    assert any(stop.token_ids & set(call.output) for call in lm.calls), "the stop never ran"
    assert result.token_ids == plain.token_ids
    assert result.stop_reason is None and not result.finished


async def test_eos_and_length_leave_no_stop_reason() -> None:
    retriever = ScriptedRetriever(None)
    engine, _ = make_engine(
        retriever, FakeLM(eos_at_length=9), RaLMConfig(), tokenizer=FakeTokenizer()
    )
    result = await engine.generate(LONG_QUESTION, "baseline")
    assert result.finished and result.stop_reason is None and result.token_ids[-1] == EOS


@pytest.mark.parametrize("lm_args", [{"eos_at_length": 9}, {"eos_probability": 0.05}], ids=str)
async def test_ignore_eos_runs_every_mode_past_eos_alike(lm_args: dict[str, float]) -> None:
    retriever = ScriptedRetriever(forced(lambda s: s % 3 == 1))
    engine, _ = make_engine(retriever, FakeLM(**lm_args), tokenizer=FakeTokenizer())  # type: ignore[arg-type]
    stopped = await baseline_and_freeze(engine, retriever, LONG_QUESTION)
    assert stopped.finished and len(stopped.token_ids) < engine.config.max_new_tokens
    config = dataclasses.replace(engine.config, ignore_eos=True)
    base = await engine.generate(LONG_QUESTION, "baseline", config=config)
    assert len(base.token_ids) == engine.config.max_new_tokens and not base.finished
    assert EOS in base.token_ids  # generated, and generation went on
    for spec in matrix(strides=(1, 3, 8)):
        result = await engine.generate(LONG_QUESTION, "ralmspec", speculation=spec, config=config)
        assert result.token_ids == base.token_ids, describe(spec)
        assert not result.finished
