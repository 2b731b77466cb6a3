"""``benchmarks/probe_scan.py``'s staggered load with callers that give up (rollbacks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.probe_scan import staggered
from ralmspec_vllm.retrieval.flat import FlatRetriever
from tests.probes import run_probe


@pytest.mark.parametrize("honour", [True, False])
def test_given_up_searches_leave_the_walk_only_when_honoured(honour: bool) -> None:
    rng = np.random.default_rng(2)
    docs = rng.standard_normal((200_000, 32)).astype(np.float32)
    queries = rng.standard_normal((12, 32)).astype(np.float32)
    flat = FlatRetriever(docs, impl="torch", device="cpu", dtype="bfloat16", chunk_size=64,
                         scan="circular")  # fmt: skip
    walk = flat._circular
    assert walk is not None
    try:
        kept = staggered(flat, queries, 0.001, 4, 1, give_up_every=3, give_up_after_s=0.005,
                         honour_give_up=honour)  # fmt: skip
    finally:
        flat.close()  # waits for the walk: every search has ended
    assert len(kept) == 8 and all(s > 0 for s in kept)  # 4 of 12 gave up
    # given up on the walk or before boarding it (a thread that started late)
    assert flat.times.abandoned == (4 if honour else 0)
    assert walk.abandoned <= flat.times.abandoned


def test_the_probe_reports_the_walks_work_for_circular_scans(tmp_path: Path) -> None:
    """End to end: a circular row holds the walk's counters over its staggered searches."""
    argv = ["--docs", "20000", "--dim", "16", "--threads", "1", "--chunk-size", "4096",
            "--scans", "batch,circular", "--searches", "6", "--batch", "2", "--depth", "3",
            "--interval-ms", "1", "--k", "2", "--repeats", "1"]  # fmt: skip
    payload = run_probe("probe_scan.py", argv, tmp_path)
    circular, batch = payload["circular"], payload["batch"]
    assert circular["staggered_median_s"] > 0 and batch["staggered_median_s"] > 0
    # Each search rides one full turn of 5 chunks: 30 (cohort, chunk) pairs. Searches in
    # flight together share a chunk's pass, so the passes are between one turn and 30 (it
    # was ">= 30" until session 31, when a faster run shared passes: 19-24).
    assert circular["scan_cohorts"] == 6 * 5
    assert 5 <= circular["scan_chunks"] <= 6 * 5 and circular["scan_product_s"] > 0
    assert not any(key.startswith("scan_chunks") for key in batch)
