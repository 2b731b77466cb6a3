"""``benchmarks/latency_groups.py``: questions grouped by what the measured-cost rule did,
each group against the baseline on the same questions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.latency_groups import group_of, main, summarize_groups


def record(qid: str, wall: float, steps: int, plain: int, searches: list[float], lm: float,
           rollbacks: int = 0) -> dict:  # fmt: skip
    return {"question_id": qid, "wall_time_s": wall, "steps": steps, "plain_steps": plain,
            "searches": [[1, s] for s in searches], "lm_time_s": lm,
            "rollbacks": rollbacks}  # fmt: skip


ROWS = [
    {"method": "baseline", "per_question": [
        record("a", 2.0, 10, 0, [0.1] * 10, 0.5),
        record("b", 3.0, 12, 0, [0.1] * 12, 0.6),
        record("c", 1.0, 6, 0, [0.1] * 6, 0.3),
    ]},
    {"method": "oracle", "per_question": []},
    {"method": "PSA", "per_question": [
        record("a", 1.0, 10, 0, [0.4] * 10, 0.6, rollbacks=2),  # speculated
        record("b", 3.3, 12, 12, [0.1] * 12, 0.6),  # plain
        record("c", 1.0, 6, 3, [0.2] * 6, 0.4),  # mixed
    ]},
]  # fmt: skip


@pytest.mark.parametrize(
    ("steps", "plain", "group"),
    [(10, 0, "speculated"), (10, 2, "speculated"), (10, 3, "mixed"), (10, 8, "plain"),
     (2, 1, "plain"), (1, 0, "speculated")],
)  # fmt: skip
def test_group_of(steps: int, plain: int, group: str) -> None:
    assert group_of({"steps": steps, "plain_steps": plain}) == group


def test_each_group_is_compared_with_the_baseline_on_its_own_questions() -> None:
    got = {g["group"]: g for g in summarize_groups(ROWS)}
    assert list(got) == ["speculated", "mixed", "plain"]
    spec = got["speculated"]
    assert spec["speedup"] == 2.0 and spec["questions"] == 1
    assert (spec["search_ms"], spec["baseline_search_ms"]) == (400.0, 100.0)
    assert spec["searches_in_flight"] == 4.0  # 10 x 0.4 s of searches in 1.0 s
    assert (spec["lm_s"], spec["baseline_lm_s"], spec["rollbacks"]) == (0.6, 0.5, 2.0)
    assert got["plain"]["speedup"] == round(3.0 / 3.3, 3)
    assert got["mixed"]["searches_per_answer"] == got["mixed"]["baseline_searches_per_answer"]


def test_main_prints_every_group(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": ROWS}))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "speculated" in out and "mixed" in out and "plain" in out and "2.00x" in out
