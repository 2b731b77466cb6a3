"""Running a ``benchmarks/`` probe script end to end, as a user would, for its tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def run_probe(script: str, argv: list[str], tmp_path: Path) -> Any:
    """Run ``benchmarks/<script> <argv> --out FILE`` in a fresh interpreter; it must exit 0.
    Returns the JSON it wrote."""
    out = tmp_path / "probe.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *argv, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())
