"""Open-domain QA questions from the pyserini 0.13.0 wheel (downloaded once from PyPI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ralmspec_vllm.entrypoints.cli import main
from ralmspec_vllm.questions import (
    Question,
    load_questions,
    load_questions_file,
    parse_topics,
)


@pytest.mark.parametrize(
    ("dataset", "count", "first", "answers"),
    [
        ("nq", 3610, "who got the first nobel prize in physics", ("Wilhelm Conrad Röntgen",)),
        ("triviaqa", 11313, "Who was the man behind The Chipmunks?", ("David Seville",)),
        (
            "webquestions",
            2032,
            "what does jamaican people speak?",
            ("Jamaican Creole English Language", "Jamaican English"),
        ),
    ],
)
def test_real_test_sets_load_with_answers(
    dataset: str, count: int, first: str, answers: tuple[str, ...]
) -> None:
    questions = load_questions(dataset)
    assert len(questions) == count
    assert questions[0] == Question(f"{dataset}-test-0", first, answers, dataset)
    assert all(q.text and q.answers for q in questions)
    assert len({q.qid for q in questions}) == count
    assert load_questions(dataset, limit=5) == questions[:5]  # second load: from the cache


def test_odd_line_breaks_stay_inside_a_question() -> None:
    data = "what is\u2028this\t['a', 'b']\r\nsecond one?\t[\"c\"]\n\n"
    got = parse_topics("x", data)
    assert got == [
        Question("x-test-0", "what is\u2028this", ("a", "b"), "x"),
        Question("x-test-1", "second one?", ("c",), "x"),
    ]
    with pytest.raises(ValueError, match="x line 1: expected question<TAB>answers"):
        parse_topics("x", "no answers here\n")


def test_questions_file_roundtrip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"question": "q one?", "answers": ["a1"], "id": "x1"}\n\n{"question": "q two?"}\n'
    )
    assert load_questions_file(path) == [
        Question("x1", "q one?", ("a1",), "mine"),
        Question("mine-1", "q two?", (), "mine"),
    ]
    path.write_text('{"question": "ok"}\n{"answers": ["a"]}\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl:2: field 'question'"):
        load_questions_file(path)
    path.write_text('{"question": "ok", "answers": "a"}\n')
    with pytest.raises(ValueError, match=r"mine\.jsonl:1: field 'answers'"):
        load_questions_file(path)
    with pytest.raises(ValueError, match="dataset: unknown"):
        load_questions("squad")


def test_cli_prints_jsonl_that_the_file_loader_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["questions", "--dataset", "nq", "--limit", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["answers"] == ["Wilhelm Conrad Röntgen"]
    out = tmp_path / "nq.jsonl"
    assert main(["questions", "--dataset", "nq", "--limit", "3", "--out", str(out)]) == 0
    assert load_questions_file(out) == load_questions("nq", limit=3)
