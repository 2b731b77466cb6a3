"""``benchmarks/probe_lane_merging.py`` runs end to end on the default knowledge base: a real
gRPC server, merged and unmerged bursts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_probe_times_merged_and_unmerged_bursts(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    argv = ["--threads", "1", "--burst", "4", "--repeats", "2", "--window-ms", "20", "--out"]
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "probe_lane_merging.py"), *argv, str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    merged, unmerged = json.loads(out.read_text())["results"]
    assert (merged["merging"], unmerged["merging"]) == (True, False)
    # Merged: the 20 ms window gathers each burst of 4 into fewer searches than calls.
    assert merged["index_searches"] < 8 and merged["max_merged_calls"] > 1
    # Unmerged: one index search per call, whatever the window.
    assert (unmerged["index_searches"], unmerged["max_merged_calls"]) == (8, 1)
    assert all(r[key] > 0 for r in (merged, unmerged) for key in ("first_ms", "mean_ms"))
