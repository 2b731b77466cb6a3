"""``bench_latency`` end to end on the session's tiny vLLM engine, plus its row arithmetic.

The smoke test builds a 40-passage knowledge base from a JSONL corpus, writes a 2-question
JSONL file and runs baseline, oracle, B and PSA over flat (dense cache scoring with the
knowledge base's encoder) and BM25 through ``measure_all``; it checks the result files'
shape, token identity and the oracle's zero retrieval, not any timing. A second run (torch
flat in float16, baseline and PSA) watches every result write: one after the warm-up and one
per timed question marked incomplete, then the complete one, the PNG only after it. The unit
tests check that ``summarize`` computes the ratios, that one differing run marks its row and
the ``--flat-dtype`` flag.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from benchmarks import latency_runs
from benchmarks.bench_latency import (
    LatencyConfig,
    load_question_set,
    measure_all,
    open_kb,
    parse_args,
)
from benchmarks.common import read_results
from benchmarks.latency_report import (
    RunRecord,
    equal_lm_fraction,
    fewest_rounds,
    host_drift,
    ratio_interval,
    speedup_interval,
    summarize,
)
from benchmarks.merge_latency import BASE_FIELDS, merge
from ralmspec_vllm.core.stride import StrideLedger
from ralmspec_vllm.engine.lm import VllmLanguageModel
from ralmspec_vllm.questions import Question, load_questions_file
from ralmspec_vllm.retrieval.flat import DTYPES
from tests.corpus_fixtures import build_tiny_kb


def record(method: str, wall: float, identical: bool = True, **extra: Any) -> RunRecord:
    summary = {
        "wall_time_s": wall, "lm_time_s": wall / 2, "retrieval_time_s": wall / 4,
        "speculation_time_s": 0.0, "other_time_s": wall / 4, "steps": 8,
        "retrieval_calls": {"search": 8}, "verifications": 0, "speculation_hits": 0,
        "speculation_misses": 0, "rollbacks": 0, "tokens_discarded": 0, "lm_calls": 8, **extra,
    }  # fmt: skip
    return RunRecord.from_summary(
        "flat", method, "q", "nq", summary, strides=(3, 3), num_tokens=32,
        identical=identical, same_documents=identical,
    )  # fmt: skip


def test_summarize_ratios_and_a_loud_mismatch() -> None:
    records = [
        record("baseline", 4.0), record("baseline", 2.0),
        record("oracle", 1.0), record("oracle", 1.0),
        record("PSA", 2.0, speculation_hits=3, speculation_misses=1),
        record("PSA", 2.0, identical=False, speculation_hits=1, speculation_misses=1),
    ]  # fmt: skip
    rows = {
        r["method"]: r for r in summarize(records, {"machine": "m"}, ["baseline", "oracle", "PSA"])
    }
    assert rows["baseline"]["speedup_vs_baseline"] == 1.0
    assert rows["oracle"]["oracle_speedup"] == 3.0
    assert rows["PSA"]["speedup_vs_baseline"] == 1.5
    assert rows["PSA"]["oracle_fraction"] == 0.5
    assert rows["PSA"]["speculation_accuracy"] == pytest.approx(4 / 6, abs=1e-4)
    assert rows["PSA"]["mean_stride"] == 3.0
    assert rows["PSA"]["outputs_identical"] is False
    assert rows["PSA"]["mismatched_questions"] == ["q"]
    assert rows["oracle"]["outputs_identical"] is True
    assert rows["PSA"]["machine"] == "m" and len(rows["PSA"]["per_question"]) == 2


def paired(method: str, walls: list[float]) -> list[RunRecord]:
    """One record per question q0, q1, ... with these wall times."""
    out = []
    for i, wall in enumerate(walls):
        rec = record(method, wall, quiet_steps=2, cache_peak=7)
        out.append(dataclasses.replace(rec, question_id=f"q{i}"))
    return out


def test_the_speed_up_interval_comes_from_resampling_paired_questions() -> None:
    """A method 10% faster on every question: the interval is that ratio exactly. One that
    wins big on one question and loses on the rest: the interval holds 1.0 (the sample
    cannot tell). Too few questions: none. The row carries it, the quiet steps and the
    cache's peak."""
    base = paired("baseline", [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    steady = paired("PSA", [w / 1.1 for w in (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)])
    assert speedup_interval(base + steady, "PSA") == [1.1, 1.1]
    lumpy = paired("PSA", [0.2, 2.2, 3.3, 4.4, 5.5, 6.6])
    low, high = speedup_interval(base + lumpy, "PSA")
    assert low < 1.0 < high
    assert speedup_interval(base[:4] + steady[:4], "PSA") is None
    rows = {r["method"]: r for r in summarize(base + steady, {}, ["baseline", "PSA"])}
    assert rows["PSA"]["speedup_ci95"] == [1.1, 1.1]
    assert rows["baseline"]["speedup_ci95"] == [1.0, 1.0]
    assert rows["PSA"]["mean_quiet_steps"] == 2 and rows["PSA"]["mean_cache_peak"] == 7


def test_the_fraction_of_the_ceiling_has_its_own_interval() -> None:
    """The fraction of the ceiling (oracle time over method time) is judged against 90%:
    its interval resamples the questions the oracle and the method both ran. Steady at
    0.9 of the oracle's speed: exactly 0.9. Lumpy: an interval that holds the mean. No
    oracle run: none."""
    walls = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    base = paired("baseline", [2 * w for w in walls])
    oracle = paired("oracle", walls)
    steady = paired("PSA", [w / 0.9 for w in walls])
    rows = {
        r["method"]: r for r in summarize(base + oracle + steady, {}, ["baseline", "oracle", "PSA"])
    }
    assert rows["PSA"]["oracle_fraction"] == 0.9
    assert rows["PSA"]["oracle_fraction_ci95"] == [0.9, 0.9]
    assert rows["oracle"]["oracle_fraction_ci95"] == [1.0, 1.0]
    lumpy = paired("PSA", [0.5, 2.6, 3.4, 4.1, 6.5, 6.2])
    low, high = ratio_interval(base + oracle + lumpy, "oracle", "PSA")
    fraction = sum(walls) / (0.5 + 2.6 + 3.4 + 4.1 + 6.5 + 6.2)
    assert low < fraction < high and high - low > 0.05
    no_oracle = {r["method"]: r for r in summarize(base + steady, {}, ["baseline", "PSA"])}
    assert no_oracle["PSA"]["oracle_fraction_ci95"] is None


def test_the_fraction_at_the_oracles_lm_speed_takes_out_the_hosts_jitter() -> None:
    """Both runs make the same 8 LM calls a question; the method's LM ran at a jittery
    speed (0.6x to 1.9x the oracle's own time) plus 10% of the oracle's time with no LM call
    in flight. The plain fraction's interval is wide; at the oracle's LM speed the fraction
    is exactly 1 / 1.1 on every question. A method of 1.5x the oracle's calls, a run without
    an oracle: none."""
    walls = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    jitter = [0.6, 1.9, 1.0, 1.4, 0.7, 1.2]
    base = paired("baseline", [2 * w for w in walls])
    oracle = [dataclasses.replace(r, lm_time_s=r.wall_time_s) for r in paired("oracle", walls)]
    psa = [
        dataclasses.replace(r, lm_time_s=j * w, wall_time_s=j * w + 0.1 * w)
        for r, w, j in zip(paired("PSA", walls), walls, jitter, strict=True)
    ]
    low, high = ratio_interval(base + oracle + psa, "oracle", "PSA")
    assert high - low > 0.2
    assert equal_lm_fraction(base + oracle + psa, "PSA") == (0.9091, [0.909, 0.909])
    assert equal_lm_fraction(base + oracle, "oracle") == (1.0, [1.0, 1.0])
    rows = {
        r["method"]: r for r in summarize(base + oracle + psa, {}, ["baseline", "oracle", "PSA"])
    }
    assert rows["PSA"]["oracle_fraction_equal_lm"] == 0.9091
    assert rows["PSA"]["oracle_fraction_equal_lm_ci95"] == [0.909, 0.909]
    assert rows["PSA"]["oracle_fraction"] == round(sum(walls) / sum(r.wall_time_s for r in psa), 4)
    rolled_back = [dataclasses.replace(r, lm_calls=12) for r in psa]
    assert equal_lm_fraction(base + oracle + rolled_back, "PSA") == (None, None)
    assert equal_lm_fraction(base + psa, "PSA") == (None, None)
    no_oracle = {r["method"]: r for r in summarize(base + psa, {}, ["baseline", "PSA"])}
    assert no_oracle["PSA"]["oracle_fraction_equal_lm"] is None


def test_rounds_taken_against_the_fewest_the_outcomes_allow() -> None:
    runs = [  # 3 misses, 20 hits, 2 plain steps: 25 steps, at most 16 a round -> 3
        record("PSA", 1.0, verifications=6, speculation_hits=20, speculation_misses=3,
               plain_steps=2),
        # no miss: 40 steps need ceil(40 / 16) = 3 rounds; a fixed stride of 3 needs 14
        record("PSA", 1.0, verifications=4, speculation_hits=40),
        record("B", 1.0, verifications=14, speculation_hits=40),
        record("PSA:max_speculation_stride=4", 1.0, verifications=12, speculation_hits=40),
        record("baseline", 1.0),
    ]  # fmt: skip
    assert [fewest_rounds(r, 16) for r in runs[:2]] == [3, 3]
    methods = ["baseline", "PSA", "B", "PSA:max_speculation_stride=4"]
    rows = {r["method"]: r for r in summarize(runs, {}, methods)}
    assert (rows["PSA"]["mean_rounds"], rows["PSA"]["mean_fewest_rounds"]) == (6.0, 3.0)
    assert (rows["B"]["mean_rounds"], rows["B"]["mean_fewest_rounds"]) == (14.0, 14.0)
    assert rows["PSA:max_speculation_stride=4"]["mean_fewest_rounds"] == 10.0
    assert rows["baseline"]["mean_rounds"] is None


def test_pipelined_rounds_are_its_restarts() -> None:
    """A pipelined run verifies every step alone (40 verifications) but waits serially only
    after its start and each miss (2 misses + 1) and for its plain step."""
    method = "PSA:overlap_depth=pipeline"
    runs = [record(method, 1.0, verifications=40, speculation_hits=37, speculation_misses=2,
                   plain_steps=1, lm_aborts=2, lm_wait_guess_s=0.05, lm_wait_retrieval_s=0.02,
                   lm_wait_other_s=0.03)]  # fmt: skip
    (row,) = summarize(runs, {}, [method])
    assert (row["mean_rounds"], row["mean_fewest_rounds"]) == (4.0, 3.0)
    assert (row["mean_plain_steps"], row["mean_lm_aborts"]) == (1.0, 2.0)
    assert row["lm_wait_s"] == {"guess": 0.05, "retrieval": 0.02, "other": 0.03}
    older = record(method, 1.0, verifications=40)  # written before lm_wait existed
    (merged,) = summarize([runs[0], older], {}, [method])
    assert merged["lm_wait_s"] == row["lm_wait_s"]  # averaged over the records that have it
    (alone,) = summarize([older], {}, [method])
    assert alone["lm_wait_s"] == dict.fromkeys(("guess", "retrieval", "other"))
    assert RunRecord.from_brief("flat", method, row["per_question"][0]) == runs[0]


def test_the_baseline_row_reports_how_often_a_step_repeats_the_last_document() -> None:
    """``doc_ids`` (the baseline's documents per step) survive the JSON round trip, and
    ``repeat_rate`` counts repeats over consecutive steps within each question only."""

    summary = record("baseline", 1.0).brief() | {"retrieval_calls": {}}

    def with_docs(docs: tuple[int | None, ...]) -> RunRecord:
        return RunRecord.from_summary(
            "flat", "baseline", "q", "nq", summary, strides=(), num_tokens=8,
            identical=True, same_documents=True, doc_ids=docs,
        )  # fmt: skip

    runs = [with_docs((5, 5, 7, 7, 7)), with_docs((7, 9, None, None))]
    (row,) = summarize(runs, {}, ["baseline"])
    # pairs: (5,5) (5,7) (7,7) (7,7) | (7,9) (9,None) (None,None): 4 repeats of 7
    assert row["repeat_rate"] == round(4 / 7, 4)
    assert [RunRecord.from_brief("flat", "baseline", b) for b in row["per_question"]] == runs
    (psa,) = summarize([record("PSA", 1.0)], {}, ["PSA"])
    assert psa["repeat_rate"] is None  # only the baseline records its documents


def test_rows_report_search_latency_by_batch_size() -> None:
    runs = [
        RunRecord.from_summary(
            "flat", "PSA", "q", "nq", record("PSA", 1.0).brief() | {"retrieval_calls": {}},
            strides=(), num_tokens=8, identical=True, same_documents=True,
            searches=[(1, 0.5), (16, 0.6), (16, 0.8), (1, 0.3)],
        ),
    ]  # fmt: skip
    (row,) = summarize(runs, {}, ["PSA"])
    assert row["search_ms_by_queries"] == {
        "1": {"calls": 2, "mean_ms": 400.0, "p50_ms": 500.0},
        "16": {"calls": 2, "mean_ms": 700.0, "p50_ms": 800.0},
    }
    brief = row["per_question"][0]
    assert brief["searches"] == [[1, 0.5], [16, 0.6], [16, 0.8], [1, 0.3]]
    assert RunRecord.from_brief("flat", "PSA", brief) == runs[0]


def test_rows_report_the_cache_scoring_calls() -> None:
    runs = [
        RunRecord.from_summary(
            "bm25", "PSA", "q", "nq", record("PSA", 1.0).brief() | {"retrieval_calls": {}},
            strides=(), num_tokens=8, identical=True, same_documents=True,
            scores=[(256, 0.002), (512, 0.004), (768, 0.003)],
            fetches=[(256, 0.02), (30, 0.004)],
        ),
    ]  # fmt: skip
    (row,) = summarize(runs, {}, ["PSA"])
    assert row["score_ms"] == {"calls": 3, "mean_ms": 3.0, "p50_ms": 3.0, "mean_ids": 512.0}
    assert row["fetch_ms"] == {"calls": 2, "mean_ms": 12.0, "p50_ms": 20.0, "mean_ids": 143.0}
    brief = row["per_question"][0]
    assert brief["scores"] == [[256, 0.002], [512, 0.004], [768, 0.003]]
    assert brief["fetches"] == [[256, 0.02], [30, 0.004]]
    assert RunRecord.from_brief("bm25", "PSA", brief) == runs[0]
    (plain,) = summarize([record("PSA", 1.0)], {}, ["PSA"])
    assert plain["score_ms"] == {"calls": 0}  # dense caches are scored in the server
    assert plain["fetch_ms"] == {"calls": 0}


def test_rows_split_search_time_inside_and_outside_the_retriever() -> None:
    phases = {"searches": 2.0, "encode_s": 0.1, "scan_s": 0.7, "rank_s": 0.2, "vectors_s": 0.05}
    runs = [
        RunRecord.from_summary(
            "flat", "PSA", qid, "nq", record("PSA", 1.0).brief() | {"retrieval_calls": {}},
            strides=(), num_tokens=8, identical=True, same_documents=True,
            searches=[(1, 0.5), (4, 0.7)], kb_phases=phases,
        )
        for qid in ("q1", "q2")
    ]  # fmt: skip
    (row,) = summarize(runs, {}, ["PSA"])
    split = row["kb_phases_s"]
    assert split["searches"] == 2.0 and split["scan_s"] == 0.7 and split["rank_s"] == 0.2
    assert split["awaited_search_s"] == pytest.approx(1.2)
    assert split["search_wait_s"] == pytest.approx(0.2)  # 1.2 awaited - 1.0 inside
    brief = row["per_question"][0]
    assert brief["kb_phases"] == phases
    assert RunRecord.from_brief("flat", "PSA", brief) == runs[0]
    (plain,) = summarize([record("PSA", 1.0)], {}, ["PSA"])
    assert plain["kb_phases_s"] is None  # BM25, or a file written before the split existed


async def test_loop_lag_sees_a_blocked_event_loop() -> None:
    import asyncio
    import time

    from benchmarks.latency_runs import LoopLag

    async with LoopLag(0.002) as lag:
        await asyncio.sleep(0.03)
        time.sleep(0.06)  # holds the loop (and the GIL), as a long Python stretch would
        await asyncio.sleep(0.03)
    summary = lag.summary()
    assert summary["max"] >= 45  # the wake-up due during the block came ~60 ms late
    assert summary["p50"] < 10 and len(lag.samples) >= 5
    runs = [
        RunRecord.from_summary(
            "flat", "PSA", "q", "nq", record("PSA", 1.0).brief() | {"retrieval_calls": {}},
            strides=(), num_tokens=8, identical=True, same_documents=True, loop_lag_ms=summary,
        )
    ]  # fmt: skip
    (row,) = summarize(runs, {}, ["PSA"])
    assert row["loop_lag_ms"]["max"] == pytest.approx(summary["max"], abs=1e-3)
    rebuilt = RunRecord.from_brief("flat", "PSA", row["per_question"][0])
    assert rebuilt.loop_lag_ms == tuple((k, round(v, 3)) for k, v in summary.items())
    (plain,) = summarize([record("PSA", 1.0)], {}, ["PSA"])
    assert plain["loop_lag_ms"] is None


def _shard(ids: Sequence[str], walls: dict[str, float], **meta: Any) -> dict[str, Any]:
    """A result file as bench_latency writes it, for questions ``ids``."""
    records = [
        RunRecord.from_summary(
            "flat", method, qid, "nq", record(method, wall).brief() | {"retrieval_calls": {}},
            strides=(2, 4), num_tokens=8, identical=True, same_documents=True,
            searches=[(2, 0.1)],
        )
        for qid in ids for method, wall in walls.items()
    ]  # fmt: skip
    rows = summarize(records, {k: "x" for k in BASE_FIELDS}, list(walls))
    return {
        "rows": rows,
        "meta": {
            "git_sha": "abc", "machine_tag": "m", "knowledge_base": {"num_docs": 9},
            "params": {"methods": list(walls), "skip_questions": 0}, "date": "d",
            "command": "c", "questions_timed": len(ids), "questions_total": len(ids),
            "complete": True, "questions": [{"id": q} for q in ids], **meta,
        },
    }  # fmt: skip


def test_merging_shards_equals_summarizing_all_questions_at_once() -> None:
    walls = {"baseline": 4.0, "oracle": 1.0, "PSA": 2.0}
    a, b = _shard(["q1", "q2"], walls), _shard(["q3"], {**walls, "PSA": 1.0})
    rows, meta = merge([a, b], ["a.json", "b.json"])
    whole = {r["method"]: r for r in rows}
    assert whole["PSA"]["num_questions"] == 3 and meta["questions_timed"] == 3
    assert whole["PSA"]["mean_latency_s"] == pytest.approx(5 / 3, abs=1e-4)
    assert whole["PSA"]["speedup_vs_baseline"] == pytest.approx(4 / (5 / 3), abs=1e-3)
    assert whole["PSA"]["search_ms_by_queries"]["2"]["calls"] == 3
    assert [s["file"] for s in meta["shards"]] == ["a.json", "b.json"]
    assert [q["id"] for q in meta["questions"]] == ["q1", "q2", "q3"]
    with pytest.raises(ValueError, match="question q1"):
        merge([a, _shard(["q1"], walls)], ["a.json", "c.json"])
    later = _shard(["q4"], walls, git_sha="other")
    with pytest.raises(ValueError, match="commit"):
        merge([a, later], ["a.json", "d.json"])
    alone = _shard(["q5"], walls)
    alone["meta"]["params"]["backends"] = ["flat"]  # the other shard's run also had others
    assert merge([a, alone], ["a.json", "g.json"])[1]["questions_timed"] == 3
    alone["rows"][0]["retriever"] = "ivf"
    with pytest.raises(ValueError, match="retriever"):
        merge([a, alone], ["a.json", "g.json"])
    rows, meta = merge([a, later], ["a.json", "d.json"], any_commit=True)
    assert meta["questions_timed"] == 3
    assert [s["commit"] for s in meta["shards"]] == ["abc", "other"]
    assert meta["git_sha"] == "abc+other"
    rows, meta = merge([a, _shard(["q4"], {"baseline": 4.0, "PSA": 2.0})], ["a.json", "e.json"])
    assert [r["method"] for r in rows] == ["baseline", "PSA"]
    assert meta["methods_left_out"] == ["oracle"]
    with pytest.raises(ValueError, match="baseline"):
        merge([a, _shard(["q4"], {"PSA": 2.0})], ["a.json", "f.json"])


def test_one_file_is_summarized_again_with_todays_fields() -> None:
    """An older run's file, written before a field existed, gains it from its per-question
    records, and every other field comes out as it was written."""
    walls = {"baseline": 4.0, "oracle": 1.0, "PSA": 2.0}
    new = _shard(["q1", "q2", "q3", "q4", "q5"], walls)
    old = copy.deepcopy(new)
    for row in old["rows"]:
        del row["oracle_fraction_equal_lm"], row["oracle_fraction_equal_lm_ci95"]
    rows, meta = merge([old], ["old.json"])
    assert rows == new["rows"]
    assert {r["method"]: r["oracle_fraction_equal_lm"] for r in rows}["PSA"] == 0.6667
    assert meta["questions_timed"] == 5 and [s["file"] for s in meta["shards"]] == ["old.json"]
    assert meta["git_sha"] == "abc"
    with pytest.raises(ValueError, match="a shard"):
        merge([], [])


def test_a_join_counts_each_offered_question_once() -> None:
    # Shard a was offered q1-q4 and timed two before its budget ran out; shard b ran with
    # --skip-questions 2 and was offered q3-q4. Summing the shards' totals would say 6.
    walls = {"baseline": 4.0, "oracle": 1.0, "PSA": 2.0}
    offered = [{"id": q} for q in ("q1", "q2", "q3", "q4")]
    a = _shard(["q1", "q2"], walls, questions=offered, questions_total=4)
    b = _shard(["q3", "q4"], walls, questions=offered[2:], questions_total=2)
    _, meta = merge([a, b], ["a.json", "b.json"])
    assert meta["questions_timed"] == 4 and meta["questions_total"] == 4
    assert [q["id"] for q in meta["questions"]] == ["q1", "q2", "q3", "q4"]


def test_skip_questions_takes_a_later_shard(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": f"q {i}?"}) + "\n" for i in range(5)))
    cfg = LatencyConfig(questions_file=str(path), skip_questions=3)
    assert [q.text for q in load_question_set(cfg)] == ["q 3?", "q 4?"]
    with pytest.raises(ValueError, match="skip_questions"):
        load_question_set(LatencyConfig(questions_file=str(path), skip_questions=5))
    with pytest.raises(ValueError, match="skip_questions"):
        LatencyConfig(skip_questions=-1)
    assert parse_args(["--skip-questions", "7"]).skip_questions == 7


def test_config_validation_and_quick_flags() -> None:
    for bad in ("XYZ", "PSA:bogus=1", "PSA:overlap_depth=0"):
        with pytest.raises(ValueError, match="methods"):
            LatencyConfig(methods=("baseline", bad))
    assert LatencyConfig(methods=("PSA:overlap_depth=1",)).methods == ("PSA:overlap_depth=1",)
    with pytest.raises(ValueError, match="backends"):
        LatencyConfig(backends=("annoy",))
    with pytest.raises(ValueError, match="torch_threads"):
        LatencyConfig(torch_threads=0)
    assert parse_args(["--torch-threads", "12"]).torch_threads == 12
    cfg = parse_args(["--bm25-threads", "12", "--probe-bm25-threads", "1,12"])
    assert (cfg.bm25_threads, cfg.probe_bm25_threads) == (12, (1, 12))
    with pytest.raises(ValueError, match="probe_bm25_threads"):
        parse_args(["--probe-bm25-threads", "0,4"])
    assert parse_args([]).cache_scoring == "local"
    assert parse_args(["--cache-scoring", "retriever"]).cache_scoring == "retriever"
    with pytest.raises(ValueError, match="cache_scoring"):
        LatencyConfig(cache_scoring="nearby")
    assert LatencyConfig(methods=("PSA", "oracle")).ordered_methods == ["baseline", "PSA", "oracle"]
    inline = "PSA:overlap_depth=pipeline@inline"
    assert LatencyConfig(methods=(inline,)).methods == (inline,)
    for bad in ({"transport": "process"}, {"cache_scoring": "retriever"}, {"backends": ("bm25",)}):
        with pytest.raises(ValueError, match="@inline needs"):
            LatencyConfig(methods=(inline,), **bad)  # type: ignore[arg-type]
    for bad_method in ("PSA@thread", "PSA@inline@inline", "oracle@inline"):
        with pytest.raises(ValueError, match="methods"):
            LatencyConfig(methods=(bad_method,))
    cfg = parse_args(["--quick", "--log-level", "WARNING"])
    assert cfg.model == "tiny-llama" and cfg.questions_per_dataset == 2
    assert len(cfg.ordered_methods) == 2


def test_approximate_search_flags_reach_the_retriever_and_the_label() -> None:
    from benchmarks.latency_runs import retriever_config

    cfg = parse_args([])
    assert (cfg.label("hnsw"), cfg.label("ivf")) == ("hnsw", "ivf")  # defaults: bare names
    cfg = parse_args(["--ef-search", "512", "--nlist", "4096", "--nprobe", "64"])
    assert cfg.label("hnsw") == "hnsw-ef512" and cfg.label("ivf") == "ivf-nlist4096-nprobe64"
    grouped = parse_args(["--nprobe", "64", "--ivf-probe-groups", "12"])
    assert grouped.label("ivf") == "ivf-nprobe64-g12"
    assert retriever_config(grouped, "ivf").ivf_probe_groups == 12
    with pytest.raises(ValueError, match="ivf_probe_groups"):
        parse_args(["--ivf-probe-groups", "0"])
    ivf = retriever_config(cfg, "ivf")
    assert (ivf.nlist, ivf.nprobe, retriever_config(cfg, "hnsw").ef_search) == (4096, 64, 512)
    cfg = parse_args(["--nprobe", "64", "--ivf-codec", "sq8"])
    assert (
        cfg.label("ivf") == "ivf-nprobe64-sq8" and retriever_config(cfg, "ivf").ivf_codec == "sq8"
    )
    with pytest.raises(SystemExit):
        parse_args(["--ivf-codec", "pq"])
    assert retriever_config(parse_args([]), "ivf").nlist is None  # ~4 sqrt(N) at open
    assert retriever_config(parse_args([]), "ivf").ivf_build == "auto"
    assert retriever_config(parse_args(["--ivf-build", "faiss"]), "ivf").ivf_build == "faiss"
    with pytest.raises(SystemExit):
        parse_args(["--ivf-build", "gpu"])


def test_flat_dtype_flag_validation_and_label() -> None:
    assert parse_args([]).flat_dtype == "float32"
    assert LatencyConfig(flat_impl="torch").label("flat") == "flat-torch"
    for dtype in (d for d in DTYPES if d != "float32"):  # whatever the torch flat search offers
        cfg = parse_args(["--flat-impl", "torch", "--flat-device", "cuda", "--flat-dtype", dtype])
        assert cfg.flat_dtype == dtype
        assert cfg.label("flat") == f"flat-torch-cuda-{dtype}"
        assert cfg.label("bm25") == "bm25"
        with pytest.raises(ValueError, match="flat_dtype"):
            LatencyConfig(flat_dtype=dtype)  # faiss is float32 only
    with pytest.raises(ValueError, match="flat_dtype"):
        LatencyConfig(flat_impl="torch", flat_dtype="int8")
    with pytest.raises(SystemExit):
        parse_args(["--flat-dtype", "int8"])
    assert parse_args(["--flat-chunk-size", "4096"]).flat_chunk_size == 4096
    with pytest.raises(ValueError, match="flat_chunk_size"):
        LatencyConfig(flat_chunk_size=0)


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("latency")
    kb = build_tiny_kb(root, np.random.default_rng(5))
    with (root / "questions.jsonl").open("w") as f:
        f.write(json.dumps({"question": "which king fought the battle by the river"}) + "\n")
        f.write(json.dumps({"question": "who painted the island city", "id": "q2"}) + "\n")
    return {"kb": kb, "questions": root / "questions.jsonl"}


@pytest.mark.vllm
async def test_bench_latency_smoke(
    vllm_lm: VllmLanguageModel,
    tiny_world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cfg = LatencyConfig(
        model="tiny-llama", backends=("flat", "bm25"), methods=("baseline", "oracle", "B", "PSA"),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        max_new_tokens=20, out_dir=str(tmp_path), name="smoke", bm25_threads=2,
        probe_bm25_threads=(1, 2),
    )  # fmt: skip
    kb, kb_info = open_kb(cfg)
    questions = load_questions_file(tiny_world["questions"])
    cleared: list[int] = []
    real_clear = latency_runs.clear_memos
    monkeypatch.setattr(latency_runs, "clear_memos", lambda: cleared.append(1) or real_clear())
    paths, rows = await measure_all(cfg, vllm_lm, kb, kb_info, questions)
    # every run (1 warm-up and 2 timed questions x 4 methods x 2 backends) starts with no
    # query memoised: no method times another's encodings
    assert len(cleared) == 24
    assert [p.name for p in paths] == ["smoke_flat.json", "smoke_bm25.json"]
    for path in paths:
        data = read_results(path)
        assert path.with_suffix(".png").stat().st_size > 0
        assert data["meta"]["all_outputs_identical"] is True
        assert data["meta"]["complete"] is True and data["meta"]["questions_timed"] == 2
        assert data["meta"]["params"]["methods"] == ["baseline", "oracle", "B", "PSA"]
        methods = [row["method"] for row in data["rows"]]
        assert methods == ["baseline", "oracle", "B", "PSA"]
        for row in data["rows"]:
            for key in ("machine", "model", "retriever", "corpus_size", "mean_latency_s",
                        "speedup_vs_baseline", "oracle_fraction", "outputs_identical"):  # fmt: skip
                assert key in row, key
            assert row["corpus_size"] == 40 and row["num_questions"] == 2
            assert row["outputs_identical"] is True
            assert row["mean_tokens"] == 20
        by_method = {row["method"]: row for row in data["rows"]}
        assert by_method["oracle"]["retrieval_time_s"] == 0.0
        assert by_method["oracle"]["mean_retrieval_calls"] == 0
        assert by_method["baseline"]["mean_retrieval_calls"] >= 5  # one per 4-token step
        # OS3 speculates, or runs plain steps where its measurements say they are cheaper
        psa = by_method["PSA"]
        assert psa["mean_stride"] is not None or psa["mean_plain_steps"] > 0
        # both rank the cache here (dense: the encoder; BM25: the cached term weights),
        # from what they fetched for the documents new to the cache
        assert by_method["PSA"]["score_ms"]["calls"] == 0
        assert by_method["PSA"]["fetch_ms"]["calls"] > 0
        for row in data["rows"]:  # the dense retriever's own time, per run
            split = row["kb_phases_s"]
            if row["retriever"] == "bm25" or row["method"] == "oracle":
                assert split is None or split["searches"] == 0
                continue
            assert split["searches"] >= 1 and split["scan_s"] > 0 and split["rank_s"] > 0
            inside = split["encode_s"] + split["scan_s"] + split["rank_s"]
            assert split["awaited_search_s"] >= inside - 1e-3
    assert {row["retriever"] for row in rows} == {"flat", "bm25"}
    bm25_meta = read_results(paths[1])["meta"]
    probe = bm25_meta["retriever"]["bm25_search_probe"]
    assert [(r["threads"], r["queries"], r["identical"]) for r in probe] == [
        (1, 2, True),
        (2, 2, True),
    ]
    assert (
        bm25_meta["threads"]["bm25"] == 2
        and "bm25_search_probe" not in read_results(paths[0])["meta"]["retriever"]
    )
    # how the dense run's query encoder ran (graphs, compiled) is on record; BM25 has none
    encoder = read_results(paths[0])["meta"]["retriever"]["encoder"]
    assert encoder["compiled"] is False and encoder["device"] == "cpu"
    assert "encoder" not in bm25_meta["retriever"]


@pytest.mark.vllm
async def test_an_inline_method_runs_paired_with_its_threaded_twin(
    vllm_lm: VllmLanguageModel,
    tiny_world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``PSA@inline`` beside ``PSA`` in one invocation: its runs' engines embed a guess on
    the event loop's thread, every other run's in a worker thread, and the two keep their
    own OS3 evidence; its answers are identical to the baseline's."""
    from ralmspec_vllm.core import encoding

    made: list[bool] = []
    real_init = encoding.ThreadEmbedder.__init__

    def init(self: encoding.ThreadEmbedder, encoder: Any, in_thread: bool = True) -> None:
        made.append(in_thread)
        real_init(self, encoder, in_thread)

    monkeypatch.setattr(encoding.ThreadEmbedder, "__init__", init)
    runners: list[latency_runs.Runner] = []
    real_runner_init = latency_runs.Runner.__init__

    def runner_init(self: latency_runs.Runner, *args: Any, **kwargs: Any) -> None:
        real_runner_init(self, *args, **kwargs)
        runners.append(self)

    monkeypatch.setattr(latency_runs.Runner, "__init__", runner_init)
    cfg = LatencyConfig(
        model="tiny-llama", backends=("flat",), methods=("baseline", "PSA", "PSA@inline"),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        max_new_tokens=12, out_dir=str(tmp_path), name="inline", plot=False,
    )  # fmt: skip
    kb, kb_info = open_kb(cfg)
    _, rows = await measure_all(
        cfg, vllm_lm, kb, kb_info, load_questions_file(tiny_world["questions"])
    )
    # a warm-up and 2 questions, each run with a fresh engine: baseline, PSA, PSA@inline
    assert made == [True, True, False] * 3
    assert [row["method"] for row in rows] == ["baseline", "PSA", "PSA@inline"]
    assert all(row["outputs_identical"] for row in rows)
    inline = next(row for row in rows if row["method"] == "PSA@inline")
    assert inline["num_questions"] == 2
    assert inline["mean_stride"] is not None or inline["mean_plain_steps"] > 0
    # the twins pool their OS3 evidence apart: one ledger each, each with its own trials
    (runner,) = runners
    (threaded,), (inlined,) = runner.stride_ledgers.values(), runner.inline_ledgers.values()
    assert threaded is not inlined and sum(inlined.trials()) > 0


@pytest.mark.vllm
async def test_chat_asks_each_question_through_the_chat_template(
    vllm_lm: VllmLanguageModel,
    tiny_world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--chat``: every method is asked the question as a user message through the model's
    chat template with the generation prompt (as the server's chat endpoint asks it), its
    searches read the question without the markup (as the endpoint's do), and the answers
    stay identical to the baseline's; the setting is on record."""
    asked: list[tuple[str, str, str | None]] = []
    real_one = latency_runs.Runner.one

    async def one(
        self: latency_runs.Runner, method: str, question: str, oracle: Any, query: Any = None
    ) -> Any:
        asked.append((method, question, query))
        return await real_one(self, method, question, oracle, query)

    monkeypatch.setattr(latency_runs.Runner, "one", one)
    cfg = LatencyConfig(
        model="tiny-llama", backends=("flat",), methods=("baseline", "oracle", "PSA"),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        max_new_tokens=12, out_dir=str(tmp_path), name="chat", plot=False, chat=True,
    )  # fmt: skip
    kb, kb_info = open_kb(cfg)
    questions = load_questions_file(tiny_world["questions"])
    paths, rows = await measure_all(cfg, vllm_lm, kb, kb_info, questions)
    template = vllm_lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": questions[1].text}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\n" + questions[1].text in template
    assert [q for m, q, _ in asked[-3:]] == [template] * 3  # the last question, every method
    assert [m for m, q, _ in asked[-3:]] == ["baseline", "oracle", "PSA"]
    assert [query for m, q, query in asked[-3:]] == [questions[1].text] * 3
    assert all(row["outputs_identical"] for row in rows)
    assert read_results(paths[0])["meta"]["params"]["chat"] is True


def test_chat_needs_a_chat_template() -> None:
    """A model without a chat template is refused with a clear error, not asked raw."""
    cfg = LatencyConfig(model="tiny-llama", chat=True)
    lm = SimpleNamespace(tokenizer=SimpleNamespace(chat_template=None))
    runner = latency_runs.Runner(cfg, lm, None, {})
    question = Question(qid="q", text="who", answers=(), dataset="nq")
    with pytest.raises(ValueError, match="no chat template"):
        runner.prompt_text(question)
    assert latency_runs.Runner(LatencyConfig(), lm, None, {}).prompt_text(question) == "who"
    assert latency_runs.Runner(LatencyConfig(), lm, None, {}).query_text(question) is None


@pytest.mark.vllm
async def test_bench_latency_writes_after_every_question(
    vllm_lm: VllmLanguageModel,
    tiny_world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A run killed by ``timeout`` keeps its last question: every write is watched."""
    cfg = LatencyConfig(
        model="tiny-llama", backends=("flat",), methods=("baseline", "PSA"),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        max_new_tokens=12, flat_impl="torch", flat_dtype="float16", out_dir=str(tmp_path),
    )  # fmt: skip
    kb, kb_info = open_kb(cfg)
    questions = load_questions_file(tiny_world["questions"])
    seen: list[tuple[bool, int, int, list[str], bool, int]] = []
    restarts: list[object] = []
    restart = StrideLedger.restart_clock
    monkeypatch.setattr(
        StrideLedger, "restart_clock", lambda self: restarts.append(self) or restart(self)
    )

    def watch(path: Path) -> None:
        meta, rows = read_results(path)["meta"], read_results(path)["rows"]
        seen.append((
            meta["complete"], meta["questions_timed"], meta["questions_total"],
            [row["method"] for row in rows], path.with_suffix(".png").exists(), len(restarts),
        ))  # fmt: skip
        assert meta["params"]["flat_dtype"] == "float16"
        assert all(row["num_questions"] == meta["questions_timed"] for row in rows)
        assert all(row["retriever"] == "flat-torch-float16" for row in rows)

    paths, rows = await measure_all(cfg, vllm_lm, kb, kb_info, questions, on_write=watch)
    assert len(paths) == 1 and paths[0].name.endswith("_tiny-llama_flat-torch-float16.json")
    methods = ["baseline", "PSA"]
    # PSA's OS3 clock (its ledger's) forgets the warm-up once, before the timed questions
    assert seen == [
        (False, 0, 2, [], False, 1),  # after the warm-up
        (False, 1, 2, methods, False, 1),
        (False, 2, 2, methods, False, 1),
        (True, 2, 2, methods, False, 1),  # the PNG is drawn after the final write
    ]
    assert paths[0].with_suffix(".png").stat().st_size > 0
    data = read_results(paths[0])
    assert data["rows"] == rows and data["meta"]["retriever"]["warmup_s"] >= 0
    assert all(row["outputs_identical"] for row in rows)


@pytest.mark.vllm
@pytest.mark.parametrize(
    ("scan", "psa"), [("batch", "PSA"), ("circular", "PSA:overlap_depth=pipeline")]
)
async def test_bench_latency_with_the_retriever_in_a_child_process(
    vllm_lm: VllmLanguageModel,
    tiny_world: dict[str, Path],
    tmp_path: Path,
    scan: str,
    psa: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--transport process``: a real ``retriever serve`` child, as ``serve`` runs it (with
    the circular scan, the child's lanes overlap the pipeline's one-query searches), with
    its query memo on, as shipped, and emptied before every run (``ResetCaches``)."""
    from ralmspec_vllm.retrieval.client import RetrieverClient
    from ralmspec_vllm.retrieval.encoder import MEMO_ENV
    from ralmspec_vllm.retrieval.server import ServerProcess

    spawned: list[dict[str, str] | None] = []
    real_spawn = ServerProcess.spawn.__func__  # type: ignore[attr-defined]
    core = min(os.sched_getaffinity(0))  # --retriever-cpus: the child runs there alone

    def spawn(cls: type, args: list[str], **kwargs: object) -> ServerProcess:
        spawned.append(kwargs.get("env"))  # type: ignore[arg-type]
        child: ServerProcess = real_spawn(cls, args, **kwargs)
        environ = Path(f"/proc/{child.process.pid}/environ").read_bytes().split(b"\0")
        assert f"{MEMO_ENV}=0".encode() not in environ  # the memo is on in the child
        assert os.sched_getaffinity(child.process.pid) == {core}
        return child

    dropped: list[int] = []
    real_reset = RetrieverClient.reset_caches

    async def reset(client: RetrieverClient) -> int:
        dropped.append(await real_reset(client))
        return dropped[-1]

    monkeypatch.delenv(MEMO_ENV, raising=False)
    monkeypatch.setattr(ServerProcess, "spawn", classmethod(spawn))
    monkeypatch.setattr(RetrieverClient, "reset_caches", reset)
    cfg = LatencyConfig(
        model="tiny-llama", backends=("flat",), methods=("baseline", psa),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        max_new_tokens=16, flat_impl="torch", flat_dtype="bfloat16", transport="process",
        flat_scan=scan, torch_threads=1, loop_lag_ms=5.0, out_dir=str(tmp_path), name="child",
        plot=False, retriever_cpus=str(core),
    )  # fmt: skip
    kb, kb_info = open_kb(cfg)
    questions = load_questions_file(tiny_world["questions"])
    paths, rows = await measure_all(cfg, vllm_lm, kb, kb_info, questions)
    data = read_results(paths[0])
    assert data["meta"]["complete"] is True and data["meta"]["questions_timed"] == 2
    assert [row["method"] for row in rows] == ["baseline", psa]
    assert all(row["outputs_identical"] and row["transport"] == "process" for row in rows)
    label = "flat-torch-bfloat16" + ("-circular" if scan == "circular" else "")
    assert all(row["retriever"] == label for row in rows)
    assert rows[0]["mean_retrieval_calls"] >= 4 and rows[1]["mean_verifications"] >= 1
    for row in rows:  # timed in the child, read over Info before and after each run
        split = row["kb_phases_s"]
        assert split["searches"] >= 1 and split["scan_s"] > 0 and split["abandoned"] >= 0
        assert ("scan_chunks" in split) == (scan == "circular")
    assert all(row["loop_lag_ms"]["max"] >= row["loop_lag_ms"]["p50"] >= 0 for row in rows)
    assert spawned == [None]
    # one reset per run (a warm-up and 2 questions, 2 methods each); each finds the queries
    # its predecessor left in the child's memo (the first: the server's warm-up query)
    assert len(dropped) == 6 and all(n > 0 for n in dropped)


def test_transport_validation() -> None:
    assert parse_args(["--transport", "process"]).transport == "process"
    with pytest.raises(ValueError, match="transport"):
        LatencyConfig(transport="pigeon")


def test_cpus_flags() -> None:
    """``--cpus`` pins this process (and vLLM's engine); ``--retriever-cpus`` goes to the
    process transport's child as its own ``--cpus``; bad lists fail before anything starts."""
    from pathlib import Path

    from benchmarks.latency_runs import child_args
    from ralmspec_vllm.retrieval import server

    cfg = parse_args(["--transport", "process", "--cpus", "12-15", "--retriever-cpus", "0-11"])
    assert (cfg.cpus, cfg.retriever_cpus) == ("12-15", "0-11")
    args = child_args(cfg, "flat", Path("/kb"))
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)
    assert parser.parse_args(args).cpus == "0-11"
    assert not any(a.startswith("--cpus") for a in child_args(LatencyConfig(), "flat", Path("/kb")))
    with pytest.raises(ValueError, match="needs transport='process'"):
        LatencyConfig(retriever_cpus="0-3")
    for bad in ("3-1", "x"):
        with pytest.raises(ValueError, match="--cpus"):
            LatencyConfig(cpus=bad)


def record_openings(
    monkeypatch: pytest.MonkeyPatch, vllm_lm: VllmLanguageModel, opener: str
) -> tuple[list[Any], list[str]]:
    """``run_benchmark`` on the session's engine, handed over (a fresh one would cost
    minutes here) and not shut down (later tests share it), with ``bench_latency.<opener>``
    (what opens the first retriever ahead) and ``OpenedRetriever.close`` recorded: the
    retrievers it opened, and the backends of those closed, in order."""
    from benchmarks import bench_latency, latency_runs

    opened: list[latency_runs.OpenedRetriever] = []
    closes: list[str] = []
    real_open = getattr(bench_latency, opener)
    real_close = latency_runs.OpenedRetriever.close

    def open_ahead(*args: Any) -> latency_runs.OpenedRetriever:
        opened.append(real_open(*args))
        return opened[-1]

    def close(self: latency_runs.OpenedRetriever) -> None:
        closes.append(self.backend)
        real_close(self)

    async def create(config: Any) -> VllmLanguageModel:
        return vllm_lm

    async def keep_running() -> None:
        pass

    monkeypatch.setattr(bench_latency, opener, open_ahead)
    monkeypatch.setattr(latency_runs.OpenedRetriever, "close", close)
    monkeypatch.setattr(VllmLanguageModel, "create", staticmethod(create))
    monkeypatch.setattr(vllm_lm, "shutdown", keep_running)
    return opened, closes


@pytest.mark.vllm
async def test_run_benchmark_opens_the_retriever_while_the_engine_starts(
    vllm_lm: VllmLanguageModel,
    tiny_world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``run_benchmark`` opens the knowledge base and the first backend's retriever in a
    thread while vLLM starts, hands that retriever to the run (not opened twice) and closes
    it once."""
    from benchmarks import bench_latency

    opened, closes = record_openings(monkeypatch, vllm_lm, "open_inproc")
    cfg = LatencyConfig(
        model="tiny-llama", backends=("flat", "bm25"), methods=("baseline", "PSA"),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        max_new_tokens=12, flat_impl="torch", flat_scan="circular", torch_threads=1,
        flat_chunk_size=10, out_dir=str(tmp_path), name="ahead", plot=False,
    )  # fmt: skip
    paths, rows = await bench_latency.run_benchmark(cfg)
    assert [p.name for p in paths] == ["ahead_flat-torch-circular.json", "ahead_bm25.json"]
    assert [o.backend for o in opened] == ["flat"] and closes == ["flat"]
    # --flat-chunk-size reached the scan (rounded up to a whole group of 64 docs).
    assert opened[0].retriever.chunk_size == 64
    flat, bm25 = (read_results(p)["meta"]["retriever"] for p in paths)
    assert flat["opened_during_engine_start"] is True and flat["open_s"] == opened[0].open_s
    assert "opened_during_engine_start" not in bm25  # later backends open as before
    assert all(row["outputs_identical"] for row in rows) and len(rows) == 4
    # per answer, the circular walk's own work beside the retriever's phases
    walk = next(
        r["kb_phases_s"] for r in rows if r["method"] == "baseline" and r["retriever"] != "bm25"
    )
    assert walk["scan_chunks"] > 0 and walk["scan_cohorts"] >= walk["scan_chunks"]
    assert walk["scan_product_s"] > 0 and walk["scan_abandoned"] == 0 == walk["abandoned"]


@pytest.mark.vllm
async def test_run_benchmark_spawns_the_retriever_child_while_the_engine_starts(
    vllm_lm: VllmLanguageModel,
    tiny_world: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--transport process``: the first backend's ``retriever serve`` child starts (at 21M
    BM25 documents it builds its index for ~105 s) while vLLM starts; the run uses it and
    stops it once. A later backend spawns its own child, stopped when it is done."""
    from benchmarks import bench_latency

    ahead, closes = record_openings(monkeypatch, vllm_lm, "spawn_child")
    cfg = LatencyConfig(
        model="tiny-llama", backends=("bm25", "flat"), methods=("baseline", "PSA"),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        max_new_tokens=12, flat_impl="torch", transport="process", bm25_threads=1,
        torch_threads=1, out_dir=str(tmp_path), name="child", plot=False,
    )  # fmt: skip
    paths, rows = await bench_latency.run_benchmark(cfg)
    assert [p.name for p in paths] == ["child_bm25.json", "child_flat-torch.json"]
    assert [o.backend for o in ahead] == ["bm25"] and ahead[0].server is not None
    assert ahead[0].server.process.poll() is not None  # stopped
    assert closes == ["flat", "bm25"]  # the later child when its backend is done; then this
    bm25, flat = (read_results(p)["meta"]["retriever"] for p in paths)
    assert bm25["opened_during_engine_start"] is True and bm25["open_s"] == ahead[0].open_s
    assert "opened_during_engine_start" not in flat
    assert all(row["outputs_identical"] and row["transport"] == "process" for row in rows)
    assert len(rows) == 4


async def test_run_benchmark_closes_its_early_retriever_when_the_engine_fails(
    tiny_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: the engine start fails while the retriever is opening; the error
    surfaces and the retriever (a circular scan with its own thread) is still closed."""
    from benchmarks import bench_latency, latency_runs

    closes: list[str] = []
    real_close = latency_runs.OpenedRetriever.close

    def close(self: latency_runs.OpenedRetriever) -> None:
        closes.append(self.backend)
        real_close(self)

    async def create(config: Any) -> VllmLanguageModel:
        raise RuntimeError("injected: no GPU today")

    monkeypatch.setattr(latency_runs.OpenedRetriever, "close", close)
    monkeypatch.setattr(VllmLanguageModel, "create", staticmethod(create))
    cfg = LatencyConfig(
        model="tiny-llama", backends=("flat",), methods=("baseline",),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        flat_impl="torch", flat_scan="circular", torch_threads=1, out_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="injected"):
        await bench_latency.run_benchmark(cfg)
    assert closes == ["flat"]
    assert not list(tmp_path.iterdir())  # nothing measured, nothing written


async def test_run_benchmark_imports_vllm_before_the_opening_thread_starts(
    tiny_world: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The opening thread loads the encoder (transformers) while vLLM starts; vLLM's import
    of transformers must be over by then, since transformers' lazy module breaks when two
    threads import it at once (session 16, HNSW: "cannot import name 'PretrainedConfig'")."""
    from benchmarks import bench_latency
    from ralmspec_vllm.engine import version

    events: list[str] = []
    real_open_ahead = bench_latency.open_ahead

    def load_vllm() -> None:
        events.append("load_vllm")

    def open_ahead(cfg: LatencyConfig) -> Any:
        events.append("open_ahead")
        return real_open_ahead(cfg)

    async def create(config: Any) -> VllmLanguageModel:
        raise RuntimeError("injected: stop after the start")

    monkeypatch.setattr(version, "load_vllm", load_vllm)
    monkeypatch.setattr(bench_latency, "open_ahead", open_ahead)
    monkeypatch.setattr(VllmLanguageModel, "create", staticmethod(create))
    cfg = LatencyConfig(
        model="tiny-llama", backends=("flat",), methods=("baseline",),
        questions_file=str(tiny_world["questions"]), index=str(tiny_world["kb"]),
        flat_impl="torch", torch_threads=1, out_dir=str(tmp_path),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="injected"):
        await bench_latency.run_benchmark(cfg)
    assert events == ["load_vllm", "open_ahead"]


def test_the_process_transports_child_searches_on_the_threads_asked() -> None:
    """``--transport process``: the child ``retriever serve`` gets ``--bm25-threads`` for
    BM25 (``--torch-threads`` for dense backends) and this process's switch interval, on
    loopback."""
    from pathlib import Path

    from benchmarks.latency_runs import child_args
    from ralmspec_vllm.retrieval import server

    cfg = LatencyConfig(
        transport="process", bm25_threads=3, torch_threads=5, save_index=False,
        switch_interval_ms=0.5,
    )  # fmt: skip
    bm25 = child_args(cfg, "bm25", Path("/kb"))
    flat = child_args(cfg, "flat", Path("/kb"))
    assert bm25[:6] == ["--host", "127.0.0.1", "--port", "0", "--index", "/kb"]
    assert "--threads=3" in bm25 and "--backend=bm25" in bm25 and "--no-save-index" in bm25
    assert "--threads=5" in flat and "--threads=3" not in flat
    assert bm25[-1] == flat[-1] == "--switch-interval-ms=0.5"
    parser = argparse.ArgumentParser()
    server.add_arguments(parser)  # what `retriever serve` parses
    parsed = parser.parse_args(bm25)
    assert parsed.threads == 3 and parsed.switch_interval_ms == 0.5 and parsed.backend == "bm25"
    default = child_args(LatencyConfig(transport="process"), "bm25", Path("/kb"))
    assert not any(arg.startswith("--threads") for arg in default)  # every core
    assert not any(arg.startswith("--switch-interval") for arg in default)  # the server's


def test_cpus_the_system_refuses_stop_before_anything_starts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from benchmarks.bench_latency import main

    before = os.sched_getaffinity(0)
    assert main(["--quick", "--cpus", "100000"]) == 2
    assert "cannot run on '100000'" in capsys.readouterr().err
    assert os.sched_getaffinity(0) == before


def test_the_opening_thread_runs_on_the_cores_given_and_returns_to_its_own() -> None:
    """With ``--cpus`` this process is pinned, but the knowledge base and a process
    transport's child open on every core it had (``_on_cores``): the opening thread, the
    threads and children it starts, and then the thread is back on its own cores."""
    import threading

    from benchmarks.bench_latency import _on_cores

    mine = os.sched_getaffinity(0)
    one = {min(mine)}
    seen: dict[str, set[int]] = {}

    def opening(tag: str) -> str:
        seen["opener"] = os.sched_getaffinity(0)
        worker = threading.Thread(target=lambda: seen.update(worker=os.sched_getaffinity(0)))
        worker.start()
        worker.join()
        return tag

    assert _on_cores(one, opening, "kb") == "kb"
    assert seen == {"opener": one, "worker": one} and os.sched_getaffinity(0) == mine
    assert _on_cores(None, opening, "as is") == "as is" and seen["opener"] == mine
    with pytest.raises(ZeroDivisionError):
        _on_cores(one, lambda: 1 / 0)
    assert os.sched_getaffinity(0) == mine


def test_rows_report_the_lm_step_spread_and_warn_when_the_host_drifts() -> None:
    """``lm_step_ms`` is the p10/p50/p90 of a question's mean LM call; ``host_drift`` warns
    where the oracle's spread (else the baseline's) passes 1.3x, as session 34's host did
    (15 ms, then ~26 ms mid-run), and stays quiet for a steady host, for short answers
    (their prefill) and where no answer made enough LM calls."""
    steady = [record("oracle", 1.0, lm_time_s=0.015 * 30, lm_calls=30) for _ in range(10)]
    (row,) = summarize(steady, {}, ["oracle"])
    assert row["lm_step_ms"] == {"p10": 15.0, "p50": 15.0, "p90": 15.0}
    assert host_drift([row]) is None
    drifting = steady[:5] + [
        record("oracle", 1.0, lm_time_s=0.026 * 30, lm_calls=30) for _ in range(6)
    ]
    (row,) = summarize(drifting, {}, ["oracle"])
    assert row["lm_step_ms"] == {"p10": 15.0, "p50": 26.0, "p90": 26.0}
    warning = host_drift([row])
    assert warning is not None and "15.0-26.0 ms" in warning and "oracle" in warning
    # the oracle speaks for the run: a drifting baseline beside a steady oracle is not flagged
    as_baseline = [dataclasses.replace(r, method="baseline") for r in drifting]
    base = summarize(as_baseline, {}, ["baseline"])
    (oracle,) = summarize(steady, {}, ["oracle"])
    assert host_drift([*base, oracle]) is None
    assert host_drift(base) is not None  # no oracle: the baseline's spread is used
    short = record("oracle", 1.0, lm_time_s=0.2, lm_calls=2)  # mostly its prompt's prefill
    (row,) = summarize([*steady, short], {}, ["oracle"])
    assert row["lm_step_ms"] == {"p10": 15.0, "p50": 15.0, "p90": 15.0}
    (idle,) = summarize([short, record("oracle", 1.0, lm_calls=0)], {}, ["oracle"])
    assert idle["lm_step_ms"] is None and host_drift([idle]) is None
