"""``benchmarks/probe_bm25_concurrency.py`` runs end to end on the default knowledge base."""

from __future__ import annotations

from pathlib import Path

from tests.probes import run_probe


def test_the_probe_times_every_pool_and_caller_count_with_the_same_hits(tmp_path: Path) -> None:
    argv = ["--threads", "2,1", "--concurrency", "1,3", "--searches", "7", "--prefetch", "4"]
    payload = run_probe("probe_bm25_concurrency.py", argv, tmp_path)
    cells = [(r["threads"], r["callers"]) for r in payload["results"]]
    assert cells == [(2, 1), (2, 3), (1, 1), (1, 3)]  # the probe exits 1 if hits differ
    assert all(r["per_s"] > 0 and r["p90_ms"] >= r["p50_ms"] > 0 for r in payload["results"])
    meta = payload["meta"]
    assert meta["docs"] > 1000 and meta["searches"] == 7 and meta["prefetch"] == 4
    assert meta["run"]["benchmark"] == "probe_bm25_concurrency"
