"""``benchmarks/probe_bm25_gil.py`` runs end to end on the default knowledge base."""

from __future__ import annotations

from pathlib import Path

from tests.probes import run_probe


def test_the_probe_times_every_load_and_k_and_writes_them(tmp_path: Path) -> None:
    argv = ["--filler", "0", "--threads", "1", "--ks", "1,3", "--repeats", "1"]
    payload = run_probe("probe_bm25_gil.py", argv, tmp_path)
    cells = {(r["switch_ms"], r["load"], r["k"]) for r in payload["results"]}
    assert cells == {
        (switch, load, k)
        for switch in (0.5, 5.0)
        for load in ("idle", "duty20", "busy")
        for k in (1, 3)
    }
    assert all(r["p50_ms"] > 0 for r in payload["results"])
    assert payload["meta"]["docs"] > 1000 and payload["meta"]["threads"] == 1
