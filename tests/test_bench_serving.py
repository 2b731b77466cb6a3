"""``bench_serving`` end to end against a real ``ralmspec-vllm serve`` subprocess.

The smoke test builds a 40-passage knowledge base from a JSONL corpus, writes a question file
and runs the benchmark's CLI (tiny random-weight Llama, exact flat retrieval, concurrency 1
and 2, baseline vs the server's default RaLMSpec vs preset B, 2 requests per cell, a short
answer limit), with server flags given both ways (``--server-arg=...`` and after ``--``), in
the default mode (shared questions, the server's prefix cache reset before every cell and
confirmed by vLLM). A smaller run covers ``--no-shared-questions`` (fresh questions per
method, the untimed reference pass). Both check the result file's shape, that every answer
equals the baseline's and that the server-side batching numbers were scraped, not any
timing. The unit tests cover the config,
the identity check and the metric diff on hand-made inputs.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from benchmarks.bench_serving import ServingConfig, main, parse_args, question_pool
from benchmarks.common import read_results
from benchmarks.serving_load import Job, RequestRecord, max_in_flight, never_answered, summarize
from benchmarks.serving_report import (
    add_ratios,
    check_identity,
    cpu_columns,
    gauge_columns,
    load_columns,
    repeat_summary,
)
from benchmarks.serving_server import batch_stats
from benchmarks.serving_session import ralm_options
from tests.corpus_fixtures import WORDS, build_tiny_kb


def record(qid: str, text: str, start: float = 0.0, error: str = "") -> RequestRecord:
    return RequestRecord(Job(qid, "q", "ralmspec", {}), start, 1.0, 0.1, text, 5, error=error)


def test_config_flags_and_method_options() -> None:
    with pytest.raises(ValueError, match="methods"):
        ServingConfig(methods=("baseline", "XYZ"))
    with pytest.raises(ValueError, match="concurrency"):
        ServingConfig(concurrency=(0,))
    argv = ["--concurrency", "1,16", "--server-arg=--max-num-seqs=8", "--", "--dtype", "float32"]
    cfg = parse_args(argv)
    assert cfg.concurrency == (1, 16) and cfg.max_tokens == 128
    assert cfg.server_args == ("--max-num-seqs=8", "--dtype", "float32")
    assert cfg.cell_size(16) == 32 and cfg.cell_size(None) == 16
    assert ralm_options("ralmspec") == {"mode": "ralmspec"}
    psa = ralm_options("PSA")
    assert (psa["speculation_stride"], psa["prefetch_k"]) == ("auto", 256)
    assert ralm_options("PSA-PAPER")["prefetch_k"] == 20
    assert psa["async_verification"] is True


def test_question_pool_sizes(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}"}) + "\n" for i in range(50)))
    cfg = ServingConfig(
        concurrency=(1, 4), questions_file=str(path), warmup=1, shared_questions=False
    )
    assert len(question_pool(cfg)) == 1 + (4 + 8) * 2  # fresh questions per method
    shared = ServingConfig(concurrency=(1, 4), questions_file=str(path))
    assert shared.shared_questions  # the default
    assert len(question_pool(shared)) == 2 + 4 + 8  # one set per cell
    short = ServingConfig(concurrency=(64,), questions_file=str(path), shared_questions=False)
    assert len(question_pool(short)) == 2 + 128 * 2  # recycled
    assert not parse_args(["--no-shared-questions"]).shared_questions
    repeated = ServingConfig(concurrency=(1, 4), questions_file=str(path), repeats=3)
    assert len(question_pool(repeated)) == 2 + (4 + 8) * 3  # fresh questions per repeat
    with pytest.raises(ValueError, match="repeats"):
        ServingConfig(repeats=0)


def test_repeat_summary_and_ratios_per_repeat() -> None:
    rows: list[dict[str, object]] = []
    for rep, base, spec in ((0, 10.0, 12.0), (1, 20.0, 18.0)):
        rows.append({"cell": "c=4", "method": "baseline", "repeat": rep,
                     "throughput_tok_s": base, "p50_s": 1.0})  # fmt: skip
        rows.append({"cell": "c=4", "method": "ralmspec", "repeat": rep,
                     "throughput_tok_s": spec, "p50_s": 1.0})  # fmt: skip
    add_ratios(rows)  # each repeat against its own baseline
    assert [r["speedup_vs_baseline"] for r in rows] == [1.0, 1.2, 1.0, 0.9]
    summary = {e["method"]: e for e in repeat_summary(rows)}
    assert summary["ralmspec"]["repeats"] == 2
    assert summary["ralmspec"]["speedup_vs_baseline"] == {"mean": 1.05, "min": 0.9, "max": 1.2}
    assert summary["baseline"]["throughput_tok_s"] == {"mean": 15.0, "min": 10.0, "max": 20.0}


def test_identity_check_and_in_flight_count() -> None:
    records = [record("a", "x"), record("b", "y", start=0.5), record("c", "z", error="boom")]
    assert check_identity(records, {"a": "x", "b": "y", "c": "other"}) == (True, [])
    assert check_identity(records, {"a": "x", "b": "Y"}) == (False, ["b"])
    assert check_identity(records, {}) == (None, [])
    assert max_in_flight(records) == 3


def test_resends_only_for_connections_that_failed_unanswered() -> None:
    request: Any = httpx.Request("POST", "http://127.0.0.1/v1/completions")

    def wrapped(cause: Exception, error: type[openai.APIConnectionError]) -> Exception:
        try:
            raise error(request=request) from cause
        except openai.APIConnectionError as err:
            return err

    reset = httpx.ReadError("[Errno 104] Connection reset by peer")
    assert never_answered(wrapped(reset, openai.APIConnectionError))
    assert never_answered(wrapped(httpx.ConnectError("refused"), openai.APIConnectionError))
    closed = httpx.RemoteProtocolError("Server disconnected without sending a response.")
    assert never_answered(wrapped(closed, openai.APIConnectionError))
    garbled = httpx.RemoteProtocolError("illegal status line: b'XYZ'")
    assert not never_answered(wrapped(garbled, openai.APIConnectionError))  # it answered
    assert not never_answered(wrapped(reset, openai.APITimeoutError))  # may still be running
    assert not never_answered(openai.APIConnectionError(request=request))  # cause unknown
    assert not never_answered(RuntimeError("boom"))
    resent = RequestRecord(Job("a", "q", "baseline", {}), 0.0, 1.0, 0.1, "x", 5, resends=2)
    summary = summarize([resent, record("b", "y"), record("c", "", error="boom")], 2.0)
    assert (summary["connection_resends"], summary["failed"]) == (2, 1)
    assert summary["lm_wait_s"] is None  # no usage block said


def test_lm_waits_are_averaged_per_cause() -> None:
    waits = [{"guess": 0.1, "retrieval": 0.4, "other": 0.0}, {"guess": 0.3, "retrieval": 0.0,
             "other": 0.2}]  # fmt: skip
    records = [replace(record(str(i), "x"), ralm={"lm_wait_s": w}) for i, w in enumerate(waits)]
    summary = summarize([*records, record("2", "x")], 1.0)  # the last: no usage block
    assert summary["lm_wait_s"] == {"guess": 0.2, "retrieval": 0.2, "other": 0.1}


def test_load_and_cpu_columns() -> None:
    samples = [(0.0, 0.0), (1.0, 0.52), (2.0, 0.31), (3.0, 0.45), (4.0, 0.41)]
    cols = load_columns(samples)
    assert cols["utilization_p10"] == 0.0 and cols["utilization_p50"] == 0.41
    assert cols["utilization_p90"] == cols["utilization_max"] == 0.52
    assert cols["utilization_timeline"] == [[t, u] for t, u in samples]
    assert load_columns([])["utilization_p50"] is None
    cols = gauge_columns({"loop_cpu": [0.9, 0.1, 0.5, 0.7, 0.3]})
    assert (cols["loop_cpu_p50"], cols["loop_cpu_p90"]) == (0.5, 0.9)
    assert cols["encoder_busy_p50"] is None and cols["encoder_busy_p90"] is None  # not served
    before = {"server": 10.0, "retriever": 100.0, "client": 1.0}
    after = {"server": 25.0, "retriever": 340.0, "engine": 30.0, "client": 4.0}
    assert cpu_columns(before, after, 20.0) == {
        "cpu_cores": {"client": 0.15, "engine": 1.5, "retriever": 12.0, "server": 0.75}
    }  # a process that appeared during the cell counts from 0
    assert cpu_columns(before, after, 0.0) == {"cpu_cores": {}}


def test_batch_stats_diffs_histograms() -> None:
    def scrape(count: float, total: float, small: float) -> dict:  # type: ignore[type-arg]
        name = "ralmspec_retriever_batch_queries"
        return {
            (name + "_count", ()): count, (name + "_sum", ()): total,
            (name + "_bucket", (("le", "1.0"),)): small,
            (name + "_bucket", (("le", "8.0"),)): count,
            (name + "_bucket", (("le", "+Inf"),)): count,
        }  # fmt: skip

    stats = batch_stats(scrape(2, 3, 1), scrape(6, 23, 1))  # 4 new RPCs of 20 queries
    assert stats["batch_queries_mean"] == 5.0
    assert stats["batch_queries_p50"] == 8.0 and stats["verifications"] == 0
    assert stats["index_searches"] is None  # a retriever without counters: unknown, not 0
    calls = "ralmspec_retriever_calls_total"
    stats = batch_stats(
        {(calls, (("method", "Search"),)): 5.0, (calls, (("method", "Encode"),)): 2.0},
        {(calls, (("method", "Search"),)): 9.0, (calls, (("method", "Encode"),)): 2.0,
         (calls, (("method", "GetVectors"),)): 3.0},
    )  # fmt: skip
    assert stats["retriever_calls"] == {"GetVectors": 3, "Search": 4}  # none sent: left out

    def index(searches: float, seconds: float) -> dict:  # type: ignore[type-arg]
        return {
            ("ralmspec_retriever_index_searches_total", ()): searches,
            ("ralmspec_retriever_search_seconds_total", ()): seconds,
        }

    stats = batch_stats(index(10, 1.0), index(14, 2.2))  # 4 index searches, 1.2 s in them
    assert (stats["index_searches"], stats["index_search_mean_s"]) == (4, 0.3)
    assert "scan_chunk" not in stats  # a backend without counters

    def walk(chunks: float, rows: float, product: float, threshold: float, busy: float) -> dict:  # type: ignore[type-arg]
        seconds, work = (
            "ralmspec_retriever_backend_seconds_total",
            "ralmspec_retriever_backend_work_total",
        )
        return {
            **index(10, 1.0),
            (seconds, (("phase", "scan_product"),)): product,
            (seconds, (("phase", "scan_threshold"),)): threshold,
            (seconds, (("phase", "scan_busy"),)): busy,
            (seconds, (("phase", "rank"),)): 0.5,
            (work, (("counter", "scan_chunks"),)): chunks,
            (work, (("counter", "scan_rows"),)): rows,
            (work, (("counter", "scan_cohorts"),)): chunks,
        }  # fmt: skip

    stats = batch_stats(walk(100, 100, 1.0, 0.5, 2.0), walk(300, 1300, 3.0, 2.5, 7.0))
    assert stats["scan_chunk"] == {
        "rows": 6.0, "cohorts": 1.0, "product_ms": 10.0, "threshold_ms": 10.0, "other_ms": 5.0,
    }  # fmt: skip
    assert stats["backend_seconds"]["rank"] == 0.0 and stats["backend_work"]["scan_chunks"] == 200


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    rng = np.random.default_rng(7)
    kb = build_tiny_kb(root, rng)
    with (root / "questions.jsonl").open("w") as f:
        for i in range(13):
            words = " ".join(rng.choice(WORDS, size=5))
            f.write(json.dumps({"question": f"who {words}", "id": f"q{i}"}) + "\n")
    return {"kb": kb, "questions": root / "questions.jsonl"}


@pytest.mark.vllm
def test_bench_serving_smoke(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    argv = ["--model", "tiny-llama", "--concurrency", "1,2", "--methods", "baseline,ralmspec,B"]
    argv += ["--questions", str(tiny_world["questions"]), "--index", str(tiny_world["kb"])]
    argv += ["--requests-per-cell", "2", "--max-tokens", "12", "--warmup", "1"]
    argv += ["--out-dir", str(tmp_path), "--name", "smoke", "--log-level", "WARNING"]
    argv += ["--server-arg=--max-model-len=1024", "--server-arg=--max-retriever-utilization=0"]
    argv += ["--", "--max-doc-tokens", "64"]
    assert main(argv) == 0
    data = read_results(tmp_path / "smoke.json")
    assert (tmp_path / "smoke.png").stat().st_size > 0
    meta, rows = data["meta"], data["rows"]
    assert meta["all_outputs_identical"] is True and meta["skipped_cells"] == []
    assert "--max-doc-tokens" in meta["server"]["argv"]
    assert meta["reference_pass"]["questions"] == 0  # shared questions: checked directly
    assert [(r["concurrency"], r["method"]) for r in rows] == [
        (1, "baseline"), (1, "ralmspec"), (1, "B"), (2, "ralmspec"), (2, "B"), (2, "baseline"),
    ]  # fmt: skip
    for row in rows:
        for key in (
            "machine",
            "concurrency",
            "method",
            "throughput_tok_s",
            "p50_s",
            "p99_s",
            "ttft_p50_s",
            "tpot_p50_s",
            "requests_per_s",
            "batch_queries_mean",
        ):
            assert row[key] is not None, key  # fmt: skip
        assert row["outputs_identical"] is True and row["num_checked"] == 2
        assert row["prefix_cache_reset"] is True  # vLLM confirmed the reset before the cell
        assert row["num_requests"] == 2 and row["failed"] == 0 and row["connection_resends"] == 0
        assert row["corpus_size"] == 40 and row["mean_output_tokens"] <= 12
        assert row["retriever_rpcs"] >= 1  # the cell's searches were scraped from /metrics
        assert row["index_searches"] >= 1 and row["index_search_mean_s"] > 0  # the child's
        assert "scan" in row["backend_seconds"] and row["backend_work"]["searches"] >= 1
        assert row["load_fallbacks"] == 0  # both fallbacks off: every ralmspec request speculates
        assert row["retriever_fallbacks"] == 0 and row["held_steps"] == 0
        assert isinstance(row["measured_plain_steps"], int)  # scraped from /metrics
        assert row["retriever_queries"] >= row["retriever_rpcs"]
        assert row["lm_calls"] >= 3 and row["lm_generated_tokens"] >= 2 * 3  # vLLM's counters
        # each process's share of the cell, and the load signal sampled from /metrics
        assert {"server", "engine", "retriever", "client"} <= set(row["cpu_cores"]), row
        assert row["cpu_cores"]["server"] > 0 and row["cpu_cores"]["client"] > 0
        assert row["utilization_timeline"] and row["utilization_timeline"][0][0] < 1.0
        assert row["utilization_p50"] == 0.0  # the fallback is off: no calibration, cost 0
    by = {(r["concurrency"], r["method"]): r for r in rows}
    assert by[(1, "B")]["verifications"] >= 1 and by[(1, "baseline")]["verifications"] == 0
    assert by[(2, "baseline")]["speedup_vs_baseline"] == 1.0


@pytest.mark.vllm
def test_bench_serving_fresh_questions_per_method(
    tiny_world: dict[str, Path], tmp_path: Path
) -> None:
    argv = ["--model", "tiny-llama", "--concurrency", "1", "--methods", "baseline,B"]
    argv += ["--questions", str(tiny_world["questions"]), "--index", str(tiny_world["kb"])]
    argv += ["--requests-per-cell", "2", "--max-tokens", "8", "--warmup", "0", "--repeats", "2"]
    argv += ["--out-dir", str(tmp_path), "--name", "fresh", "--log-level", "WARNING"]
    argv += ["--no-plot", "--no-shared-questions", "--server-arg=--max-model-len=1024"]
    argv += ["--server-arg=--max-doc-tokens=64"]
    assert main(argv) == 0
    data = read_results(tmp_path / "fresh.json")
    meta, rows = data["meta"], data["rows"]
    assert meta["all_outputs_identical"] is True
    assert meta["reference_pass"]["questions"] == 4  # B's own questions, answered untimed
    assert [(r["repeat"], r["method"]) for r in rows] == [
        (0, "baseline"), (0, "B"), (1, "B"), (1, "baseline"),
    ]  # fmt: skip
    assert len({q["id"] for q in meta["questions"]}) == 8  # fresh per method and repeat
    # This server runs with the default retriever fallback: it calibrated at start-up.
    assert "retriever calibration: 1 query" in Path(meta["server"]["log"]).read_text()
    assert [e["repeats"] for e in meta["repeat_summary"]] == [2, 2]
    for row in rows:
        assert row["outputs_identical"] is True and row["num_checked"] == 2
        assert row["prefix_cache_reset"] is False
