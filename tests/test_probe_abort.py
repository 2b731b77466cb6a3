"""The abort probe on the tiny model on vLLM (CPU): its rows and that an aborted step really
ends early (the engine keeps serving: the regenerated step completes)."""

from __future__ import annotations

import pytest

from benchmarks.probe_abort import parse_args, probe
from ralmspec_vllm.engine.lm import VllmLanguageModel


@pytest.mark.vllm
async def test_probe_rows(vllm_lm: VllmLanguageModel) -> None:
    rows = await probe(
        vllm_lm, trials=2, abort_after_ms=[0.5, 5.0], prompt_tokens=40, step_tokens=4
    )
    assert [r["kind"] for r in rows] == ["plain", "miss", "miss"]
    assert [r["abort_after_ms"] for r in rows] == [None, 0.5, 5.0]
    plain, *misses = rows
    assert plain["trials"] == 2 and plain["p50_ms"] > 0 and "overhead_p50_ms" not in plain
    for row in misses:
        # a miss waits at least its delay, then a whole regenerated step
        assert row["p50_ms"] >= row["abort_after_ms"] + 0.5 * plain["p50_ms"]
        assert "overhead_p50_ms" in row
    assert vllm_lm.in_flight() == 0  # every aborted call is gone


def test_flags() -> None:
    args = parse_args(["--abort-after-ms", "2,8", "--trials", "3"])
    assert args.abort_after_ms == [2.0, 8.0] and args.trials == 3
    with pytest.raises(SystemExit):
        parse_args(["--trials", "0"])
