"""``bench_retrieval``'s progressive result file and its ``--flat-dtypes`` variants.

A tiny world (a 40-passage knowledge base from a seeded JSONL corpus and a query file) is
timed over FAISS flat and the torch flat path in every dtype ``retrieval.flat.DTYPES`` offers,
in-process and through a real gRPC server thread, one repetition per cell. Every result write
is watched: one after opening the corpora, one per index open and one per cell, all marked
incomplete, then the complete one; the PNG only after it. A run in a child process killed
with SIGTERM (what ``timeout`` sends) mid-cell leaves its last partial file. No timing is
asserted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_retrieval import BenchConfig, parse_args, run_benchmark
from benchmarks.common import read_results
from benchmarks.retrieval_timing import Variant
from ralmspec_vllm.retrieval.encoder import MEMO_ENV
from ralmspec_vllm.retrieval.flat import DTYPES
from tests.corpus_fixtures import build_tiny_kb

REDUCED = tuple(d for d in DTYPES if d != "float32")
"""The torch flat search's reduced precisions, whichever ``retrieval.flat`` offers."""


def test_flat_dtypes_make_one_torch_variant_each() -> None:
    cfg = BenchConfig(backends=("flat", "bm25"), flat_dtypes=("float32", *REDUCED))
    labels = [v.label for v in cfg.variants(cuda_available=True)]
    assert labels == [
        "flat", "flat-torch", *(f"flat-torch-{d}" for d in REDUCED),
        "flat-cuda", *(f"flat-cuda-{d}" for d in REDUCED), "bm25",
    ]  # fmt: skip
    assert [v.label for v in BenchConfig(backends=("flat",)).variants(False)] == [
        "flat",
        "flat-torch",
    ]
    assert Variant("flat", "cpu", "torch", "float16").label == "flat-torch-float16"
    assert parse_args(["--flat-dtypes", ",".join(DTYPES)]).flat_dtypes == DTYPES
    assert parse_args([]).flat_dtypes == ("float32",)
    with pytest.raises(ValueError, match="flat_dtypes"):
        BenchConfig(flat_dtypes=("int8",))
    with pytest.raises(ValueError, match="flat_dtypes"):
        BenchConfig(flat_dtypes=())


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retrieval")
    rng = np.random.default_rng(23)
    kb = build_tiny_kb(root, rng)
    words = ["river", "king", "battle", "ocean", "novel", "island"]
    (root / "queries.txt").write_text(
        "\n".join(" ".join(rng.choice(words, size=4)) for _ in range(8)) + "\n"
    )
    return {"kb": kb, "queries": root / "queries.txt"}


def test_bench_retrieval_writes_after_every_cell(world: dict[str, Path], tmp_path: Path) -> None:
    """A run killed by ``timeout`` keeps every finished cell: every write is watched."""
    cfg = parse_args([
        "--index", str(world["kb"]), "--questions", str(world["queries"]),
        "--sizes", "real", "--backends", "flat", "--flat-impls", "faiss,torch",
        "--flat-dtypes", ",".join(("float32", *REDUCED)),
        "--transports", "inproc,grpc", "--server", "thread",
        "--batch-sizes", "1,2", "--reps", "1", "--warmup", "0", "--no-cuda",
        "--out-dir", str(tmp_path), "--name", "progress", "--log-level", "WARNING",
    ])  # fmt: skip
    png = tmp_path / "progress.png"
    seen: list[tuple[bool, int, int, int, bool]] = []

    def watch(path: Path) -> None:
        data = read_results(path)
        meta = data["meta"]
        assert meta["cells_done"] == len(data["rows"])
        assert meta["params"]["flat_dtypes"] == ["float32", *REDUCED]
        seen.append(
            (meta["complete"], meta["cells_done"], meta["cells_total"], len(meta["builds"]),
             png.exists())
        )  # fmt: skip

    path, rows = run_benchmark(cfg, on_write=watch)
    variants = 2 + len(REDUCED)  # FAISS flat, then torch flat per dtype
    total = variants * 2 * 2  # x transports x batch sizes
    expected = [(False, 0, total, 0, False)]  # corpora opened, nothing timed yet
    for v in range(variants):
        expected.append((False, 4 * v, total, v + 1, False))  # the index is open
        expected += [(False, 4 * v + c, total, v + 1, False) for c in range(1, 5)]
    expected.append((True, total, total, variants, False))  # the PNG is drawn after it
    assert seen == expected
    assert png.read_bytes()[:4] == b"\x89PNG"
    data = read_results(path)
    assert data["rows"] == rows and len(rows) == total
    cells = {(r["backend"], r["transport"], r["batch_size"]) for r in rows}
    labels = ["flat", "flat-torch", *(f"flat-torch-{d}" for d in REDUCED)]
    assert cells == {(b, t, n) for b in labels for t in ("inproc", "grpc") for n in (1, 2)}
    params = {r["backend"]: r["index_params"] for r in rows}
    assert params["flat"] == "faiss,float32"
    assert all(params[f"flat-torch-{d}"] == f"torch,{d}" for d in REDUCED)
    assert [b["what"] for b in data["meta"]["builds"]] == [f"open {x}" for x in labels]


def test_sigterm_keeps_the_last_partial_file(world: dict[str, Path], tmp_path: Path) -> None:
    """What ``timeout`` does: SIGTERM mid-run leaves the file of the cells finished so far."""
    argv = [
        "--index", str(world["kb"]), "--questions", str(world["queries"]),
        "--sizes", "real", "--backends", "flat", "--flat-impls", "faiss",
        "--transports", "inproc", "--batch-sizes", "1,2,4,8", "--reps", "1000000",
        "--cell-budget-s", "3", "--no-cuda", "--out-dir", str(tmp_path), "--name", "killed",
    ]  # fmt: skip
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_retrieval.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = tmp_path / "killed.json"
    with subprocess.Popen(
        [sys.executable, str(script), *argv],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) as child:  # fmt: skip
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and child.poll() is None:
            if result.exists() and read_results(result)["meta"]["cells_done"] >= 1:
                break
            time.sleep(0.1)
        child.send_signal(signal.SIGTERM)  # each cell takes 3 s: the run is mid-cell now
        assert child.wait(timeout=30) == -signal.SIGTERM
    meta = read_results(result)["meta"]
    assert meta["complete"] is False
    assert 1 <= meta["cells_done"] < meta["cells_total"] == 4
    assert not (tmp_path / "killed.png").exists()


def test_bm25_threads_make_one_variant_each_over_one_opened_index(
    world: dict[str, Path], tmp_path: Path
) -> None:
    """``--bm25-threads 1,2``: two BM25 variants; the second re-threads the index the first
    opened (at 21M documents a second in-memory build would cost minutes)."""
    cfg = parse_args([
        "--index", str(world["kb"]), "--questions", str(world["queries"]),
        "--sizes", "real", "--backends", "bm25", "--bm25-threads", "1,2",
        "--transports", "inproc", "--batch-sizes", "1,4", "--reps", "1", "--warmup", "0",
        "--no-cuda", "--no-plot", "--out-dir", str(tmp_path), "--name", "bm25",
        "--log-level", "WARNING",
    ])  # fmt: skip
    assert [v.label for v in cfg.variants(False)] == ["bm25-t1", "bm25-t2"]
    assert [v.label for v in BenchConfig(backends=("bm25",)).variants(False)] == ["bm25"]
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        path, rows = run_benchmark(cfg)
        assert torch.get_num_threads() == 3  # the BM25 setting stays on the index
    finally:
        torch.set_num_threads(before)
    builds = read_results(path)["meta"]["builds"]
    assert [(b["what"], b["reused"]) for b in builds] == [
        ("open bm25-t1", False),
        ("open bm25-t2", True),
    ]
    cells = {(r["backend"], r["batch_size"], r["search_threads"]) for r in rows}
    assert cells == {("bm25-t1", 1, 1), ("bm25-t1", 4, 1), ("bm25-t2", 1, 2), ("bm25-t2", 4, 2)}
    with pytest.raises(ValueError, match="bm25_threads"):
        BenchConfig(bm25_threads=(-1,))


def test_ivf_probe_groups_make_one_variant_each_over_one_opened_index(
    world: dict[str, Path], tmp_path: Path
) -> None:
    cfg = parse_args([
        "--index", str(world["kb"]), "--questions", str(world["queries"]),
        "--sizes", "real", "--backends", "ivf,bm25", "--ivf-probe-groups", "1,4",
        "--nlist", "8", "--nprobe", "6", "--transports", "inproc", "--batch-sizes", "1,3",
        "--reps", "1", "--warmup", "0", "--no-cuda", "--no-plot", "--no-save-index",
        "--out-dir", str(tmp_path), "--name", "ivf", "--log-level", "WARNING",
    ])  # fmt: skip
    assert [v.label for v in cfg.variants(False)] == ["ivf", "ivf-g4", "bm25"]
    memo: list[str | None] = []  # the encoder memo is off while cells are timed, then back
    before = os.environ.get(MEMO_ENV)
    path, rows = run_benchmark(cfg, on_write=lambda _: memo.append(os.environ.get(MEMO_ENV)))
    assert set(memo) == {"0"} and os.environ.get(MEMO_ENV) == before
    builds = read_results(path)["meta"]["builds"]
    assert [(b["what"], b["reused"]) for b in builds] == [
        ("open ivf", False),
        ("open ivf-g4", True),
        ("open bm25", False),  # another backend: its own index
    ]
    cells = {(r["backend"], r["batch_size"], r.get("probe_groups")) for r in rows}
    assert {c for c in cells if c[0] != "bm25"} == {
        ("ivf", 1, 1), ("ivf", 3, 1), ("ivf-g4", 1, 4), ("ivf-g4", 3, 4),
    }  # fmt: skip
    with pytest.raises(ValueError, match="ivf_probe_groups"):
        BenchConfig(ivf_probe_groups=(0,))
