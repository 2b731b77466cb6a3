"""Benchmark plumbing (``benchmarks/common.py``) and an end-to-end smoke run of bench_retrieval.

The smoke run builds a 40-passage knowledge base from a JSONL corpus, grows it to 160 docs
with filler, and times every backend in-process and over a real loopback gRPC server with one
repetition; it checks the result file's shape, not any timing.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_retrieval
from benchmarks.cli import OutputConfig, output_flags, parse_config
from benchmarks.common import (
    DEFAULT_OUT_DIR,
    PNG_COLORS,
    LatencyStats,
    RepeatPolicy,
    Series,
    describe_machine,
    dumps_results,
    format_table,
    git_state,
    measure,
    package_versions,
    percentile,
    plot_panels,
    read_results,
    run_metadata,
    write_results,
)
from benchmarks.retrieval_timing import config_flags
from tests.corpus_fixtures import build_tiny_kb

# -- common.py ------------------------------------------------------------------------------


def test_percentile_matches_numpy() -> None:
    values = np.random.default_rng(3).exponential(size=37).tolist()
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12)
    assert percentile([4.0], 99) == 4.0
    with pytest.raises(ValueError, match="values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="q must"):
        percentile([1.0], 101)


def test_latency_stats_in_milliseconds() -> None:
    stats = LatencyStats.from_seconds([0.001, 0.002, 0.003, 0.010])
    assert stats.n == 4
    assert stats.p50_ms == pytest.approx(2.5)
    assert stats.mean_ms == pytest.approx(4.0)
    assert stats.p99_ms == pytest.approx(3.0 + 7.0 * 0.97)
    row = stats.as_row()
    assert set(row) == {"latency_ms_p50", "latency_ms_p99", "latency_ms_mean", "n"}


def test_measure_warms_up_and_respects_reps_and_budget() -> None:
    calls: list[int] = []
    samples = measure(calls.append, RepeatPolicy(reps=5, warmup=2))
    assert calls == [0, 1, 2, 3, 4, 5, 6]
    assert len(samples) == 5
    # Each call sleeps 20 ms: after the 3 minimum calls, 60 ms exceed the 50 ms budget.
    slow = measure(lambda i: time.sleep(0.02), RepeatPolicy(reps=100, warmup=0, budget_s=0.05))
    assert len(slow) == 3
    with pytest.raises(ValueError, match="reps"):
        RepeatPolicy(reps=0)


def test_format_table_aligns_columns() -> None:
    rows = [
        {"backend": "flat", "batch_size": 1, "latency_ms_p50": 1.234},
        {"backend": "bm25", "batch_size": 64, "latency_ms_p50": 123.456},
    ]
    lines = format_table(rows, ["backend", "batch_size", "latency_ms_p50"]).splitlines()
    assert lines[0].split() == ["backend", "batch_size", "latency_ms_p50"]
    assert set(lines[1]) <= {"-", " "}
    assert lines[2].split() == ["flat", "1", "1.23"]
    assert lines[3].split() == ["bm25", "64", "123.46"]
    assert len({len(line) for line in lines}) == 1  # right-aligned numbers: equal widths


def test_git_state_of_a_snapshot_reads_its_commit_file(tmp_path: Path) -> None:
    # A snapshot inside another checkout must not report that checkout's HEAD.
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "COMMIT").write_text("ab" * 20 + "\n")
    assert git_state(snap) == type(git_state(snap))("ab" * 20, False)
    assert git_state(tmp_path).sha == "unknown"  # no checkout, no COMMIT file


def test_metadata_and_results_round_trip(tmp_path: Path) -> None:
    machine = describe_machine()
    assert machine.cpu_cores >= 1 and machine.cpu_model
    assert re.fullmatch(r"(cpu-\d+c|gpu-[a-z0-9-]+)", machine.tag)
    sha = git_state().sha
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    assert package_versions(["numpy", "no-such-package"]) == {
        "numpy": np.__version__,
        "no-such-package": "",
    }
    meta = run_metadata("unit", {"k": 3}, machine)
    assert meta["git_sha"] == sha and meta["params"] == {"k": 3}
    assert meta["machine"]["cpu_cores"] == machine.cpu_cores
    assert set(meta["threads"]) >= {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}
    path = write_results("unit", [{"a": 1}, {"a": 2.5}], meta, tmp_path / "out")
    assert path == tmp_path / "out" / "unit.json"
    data = read_results(path)
    assert data["rows"] == [{"a": 1}, {"a": 2.5}]
    assert data["meta"]["params"] == {"k": 3}


def test_plot_panels_writes_png(tmp_path: Path) -> None:
    panels = {
        "small": [Series("flat inproc", [1, 2, 4], [1.0, 1.5, 2.5])],
        "large": [
            Series("flat inproc", [1, 2, 4], [10.0, 15.0, 25.0]),
            Series("flat grpc", [1, 2, 4], [11.0, 16.0, 27.0], style="--"),
        ],
    }
    path = plot_panels(tmp_path / "p.png", panels, xlabel="batch", ylabel="ms")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(path) as image:  # a palette PNG (room in the tracked tree), not RGBA
        assert image.mode == "P"
        assert len(image.getcolors(256) or []) <= PNG_COLORS
        assert image.size[0] > 400  # drawn at full size, only its colours reduced


@dataclass(frozen=True)
class _ToyConfig(OutputConfig):
    reps: int = 2
    """Timed calls."""

    def __post_init__(self) -> None:
        if self.reps < 1:
            raise ValueError(f"reps: must be >= 1, got {self.reps}")


def test_output_config_fields_flags_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    flags = [("--reps", "reps", {"type": int, "help": "timed calls"}), *output_flags("toy_<m>")]

    def parse(*argv: str) -> _ToyConfig:
        return parse_config(_ToyConfig, flags, {"reps": 1}, "toy", list(argv))

    assert parse() == _ToyConfig(out_dir=str(DEFAULT_OUT_DIR), name=None, plot=True, reps=2)
    assert _ToyConfig(5).reps == 5  # the subclass's fields stay positional, the base's are not
    cfg = parse("--out-dir", "/tmp/o", "--name", "n", "--no-plot", "--quick")
    assert (cfg.out_dir, cfg.name, cfg.plot, cfg.reps) == ("/tmp/o", "n", False, 1)
    with pytest.raises(ValueError, match=r"^reps:"):
        parse("--reps", "0")
    with pytest.raises(SystemExit):
        parse("--help")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--name NAME result file stem (default: toy_<m>)" in help_text
    assert f"--out-dir OUT_DIR results folder (default: {DEFAULT_OUT_DIR})" in help_text
    assert "--plot, --no-plot save the PNG (default: True)" in help_text


# -- bench_retrieval end to end ---------------------------------------------------------------

# A vocabulary of its own (the latency and serving worlds use the default), kept as it was.
WORDS = [
    "river",
    "mountain",
    "castle",
    "king",
    "queen",
    "bridge",
    "ocean",
    "forest",
    "city",
    "music",
    "painter",
    "novel",
]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(11)
    kb = build_tiny_kb(root, rng, WORDS)
    (root / "queries.txt").write_text(
        "\n".join(" ".join(rng.choice(WORDS, size=5)) for _ in range(12)) + "\n"
    )
    return {"root": root, "kb": kb, "queries": root / "queries.txt"}


def smoke_args(world: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "--index", str(world["kb"]), "--filler-index", str(world["root"] / "kb-filler"),
        "--questions", str(world["queries"]), "--out-dir", str(out), "--name", "smoke",
        "--batch-sizes", "1,2", "--reps", "1", "--warmup", "0", "--filler", "160",
        "--nlist", "4", "--hnsw-m", "8", "--no-cuda", "--log-level", "WARNING", *extra,
    ]  # fmt: skip


def test_bench_retrieval_smoke(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    argv = smoke_args(tiny_world, tmp_path, "--server", "thread")
    assert bench_retrieval.main(argv) == 0
    data = read_results(tmp_path / "smoke.json")
    rows = data["rows"]
    cells = {(r["corpus_size"], r["backend"], r["transport"], r["batch_size"]) for r in rows}
    assert cells == {
        (size, backend, transport, b)
        for size in (40, 160)
        for backend in ("flat", "flat-torch", "hnsw", "ivf", "bm25")
        for transport in ("inproc", "grpc")
        for b in (1, 2)
    }
    for row in rows:
        assert row["num_real_docs"] == 40 and row["n"] == 1
        assert 0 < row["latency_ms_p50"] <= row["latency_ms_p99"]
        assert row["machine"] == data["meta"]["machine_tag"]
        dense_inproc = row["transport"] == "inproc" and row["backend"] != "bm25"
        assert ("encode_ms_p50" in row) == dense_inproc
    params = {r["backend"]: r["index_params"] for r in rows if r["corpus_size"] == 160}
    assert params["hnsw"].startswith("M=8,") and params["ivf"].startswith("nlist=4,")
    builds = data["meta"]["builds"]
    assert builds[0]["what"] == "filler knowledge base" and builds[0]["reused"] is False
    assert (tmp_path / "smoke.png").read_bytes()[:4] == b"\x89PNG"

    # A second run reuses the filler knowledge base and the saved ANN indexes.
    again = tmp_path / "again"
    argv = smoke_args(tiny_world, again, "--server", "thread", "--transports", "inproc")
    assert bench_retrieval.main([*argv, "--backends", "hnsw", "--no-plot"]) == 0
    builds = read_results(again / "smoke.json")["meta"]["builds"]
    assert builds[0]["reused"] is True
    assert all(b["built"] == [] for b in builds[1:])


def test_config_flags_round_trip_through_the_server_cli() -> None:
    """A child server started with ``config_flags(cfg)`` serves exactly ``cfg``."""
    import argparse

    from ralmspec_vllm.retrieval.factory import RetrieverConfig, config_from_args
    from ralmspec_vllm.retrieval.server import add_arguments

    for cfg in (
        RetrieverConfig(backend="ivf", nlist=7, nprobe=3, progress=False),
        RetrieverConfig(backend="hnsw", hnsw_m=12, ef_construction=20, ef_search=50),
        RetrieverConfig(backend="bm25", bm25_stopwords=False, bm25_k1=1.2),
    ):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        args = parser.parse_args(["--index", "x", *config_flags(cfg)])
        assert config_from_args(args) == cfg


@pytest.mark.slow
def test_bench_retrieval_grpc_server_process(tiny_world: dict[str, Path], tmp_path: Path) -> None:
    """The child-process server gets the benchmark's retriever flags through the real CLI."""
    argv = smoke_args(tiny_world, tmp_path, "--server", "process", "--transports", "grpc")
    argv += ["--backends", "ivf", "--sizes", "real", "--batch-sizes", "4", "--no-plot"]
    assert bench_retrieval.main(argv) == 0
    (row,) = read_results(tmp_path / "smoke.json")["rows"]
    assert (row["backend"], row["transport"], row["corpus_size"]) == ("ivf", "grpc", 40)


def test_results_json_keeps_number_arrays_on_one_line() -> None:
    payload = {
        "name": "x",
        "meta": {"methods": ["baseline", "PSA"], "flag": True},
        "rows": [{"strides": [1, 2, 3], "searches": [[1, 0.5], [16, -1e-05]], "none": None,
                  "mixed": [1, "a"], "empty": [], "nested": {"p": [0.25, 1.5e10, False]}}],
    }  # fmt: skip
    text = dumps_results(payload)
    assert json.loads(text) == payload
    assert '"strides": [1, 2, 3]' in text and '"searches": [[1, 0.5], [16, -1e-05]]' in text
    assert '"p": [0.25, 15000000000.0, false]' in text
    assert '"mixed": [\n' in text  # only arrays of numbers are folded
