"""The chat-query probe's summary: guess accuracy split by answer length."""

from __future__ import annotations

import torch

from benchmarks.common import greedy_step
from benchmarks.corpora import size_tag
from benchmarks.probe_chat_queries import EARLY, summarize, summarize_follow_up


def _answer(*steps: tuple[int, int | None]) -> dict[str, object]:
    return {"steps": [{"doc": doc, "guess": guess} for doc, guess in steps]}


def test_summary_counts_guessed_steps_by_answer_length() -> None:
    short = _answer((1, None), (2, 2), (3, 9))  # the first step has no cache to guess from
    long = _answer((1, None), *[(d, d) for d in range(2, EARLY + 3)])
    summary = summarize([short, long])
    assert summary["answers"] == 2 and summary["short_answers"] == 1
    assert summary["short"] == {"guesses": 2, "accuracy": 0.5}
    assert summary["long"] == {"guesses": EARLY + 1, "accuracy": 1.0}
    assert summary["all"] == {"guesses": EARLY + 3, "accuracy": round((EARLY + 2) / (EARLY + 3), 4)}
    assert summary["mean_steps"] == (3 + EARLY + 2) / 2
    assert summarize([])["all"] == {"guesses": 0, "accuracy": 0.0}
    assert summarize([])["mean_steps"] == 0.0


def test_the_follow_up_summary_counts_first_steps_the_carried_cache_guessed() -> None:
    def step(doc: int, guess: int | None, cached: bool) -> dict[str, object]:
        return {"doc": doc, "guess": guess, "cached": cached}

    fresh = [{"steps": [step(1, None, False), step(2, 2, True)]}, {"steps": [step(5, None, False)]}]
    carried = [
        {"steps": [step(1, 1, True), step(2, 2, True)]},  # guessed right from the first turn's
        {"steps": [step(5, 4, True)]},  # cached, but another document ranked first
    ]
    summary = summarize_follow_up(fresh, carried)
    assert summary["answers"] == 2
    assert summary["first_step_guess_right"] == 1 and summary["first_step_truth_cached"] == 2
    assert summary["fresh"]["all"] == {"guesses": 1, "accuracy": 1.0}
    assert summary["carried"]["all"] == {"guesses": 3, "accuracy": round(2 / 3, 4)}
    empty = summarize_follow_up([], [])
    assert empty["first_step_guess_right"] == 0 and empty["carried"]["answers"] == 0


def test_result_files_name_corpus_sizes_in_thousands_or_millions() -> None:
    assert [size_tag(n) for n in (4645, 20_000, 1_000_000, 3_000_000)] == ["4k", "20k", "1m", "3m"]


class _Scripted:
    """A causal LM stand-in whose greedy continuation is fixed."""

    def __init__(self, continuation: list[int]) -> None:
        self.continuation = continuation

    def generate(self, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
        assert kwargs["max_new_tokens"] == len(self.continuation) and kwargs["do_sample"] is False
        return torch.cat([ids, torch.tensor([self.continuation])], dim=1)


def test_a_greedy_step_stops_before_the_first_stop_token() -> None:
    prompt = [5, 6, 7]
    assert greedy_step(_Scripted([1, 2, 3, 4]), prompt, 4, {9}, 0) == ([1, 2, 3, 4], False)
    assert greedy_step(_Scripted([1, 9, 3, 8]), prompt, 4, {8, 9}, 0) == ([1], True)
    assert greedy_step(_Scripted([8, 1, 2, 3]), prompt, 4, [8], 0) == ([], True)
