"""``benchmarks/probe_lane_merging.py`` runs end to end on the default knowledge base: a real
gRPC server, merged and unmerged bursts."""

from __future__ import annotations

from pathlib import Path

from tests.probes import run_probe


def test_the_probe_times_merged_and_unmerged_bursts(tmp_path: Path) -> None:
    argv = ["--threads", "1", "--burst", "4", "--repeats", "2", "--window-ms", "20"]
    payload = run_probe("probe_lane_merging.py", argv, tmp_path)
    merged, unmerged = payload["results"]
    assert (merged["merging"], unmerged["merging"]) == (True, False)
    # Merged: the 20 ms window gathers each burst of 4 into fewer searches than calls.
    assert merged["index_searches"] < 8 and merged["max_merged_calls"] > 1
    # Unmerged: one index search per call, whatever the window.
    assert (unmerged["index_searches"], unmerged["max_merged_calls"]) == (8, 1)
    assert all(r[key] > 0 for r in (merged, unmerged) for key in ("first_ms", "mean_ms"))
