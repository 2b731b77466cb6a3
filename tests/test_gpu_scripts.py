"""The GPU machine's scripts (``benchmarks/gpu``): they only run there, where a broken line
costs a session's device time, so here every script must parse and the headline command's
flags must make a valid ``bench_latency`` configuration."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from benchmarks.bench_latency import parse_args

GPU = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu"


@pytest.mark.parametrize("script", sorted(p.name for p in GPU.glob("*.sh")))
def test_script_parses(script: str) -> None:
    subprocess.run(["bash", "-n", str(GPU / script)], check=True)


def test_headline_command_is_a_valid_bench_latency_run(tmp_path: Path) -> None:
    """``latency_21m.sh`` run against a ``python3`` that only records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv"
    fake = bin_dir / "python3"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {shlex.quote(str(record))}\n')
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "out"
    subprocess.run(
        ["bash", str(GPU / "latency_21m.sh"), str(out), "--seed", "3"],
        check=True,
        env=env,
        cwd=GPU.parent.parent,
    )
    argv = record.read_text().splitlines()
    assert argv[0] == "benchmarks/bench_latency.py"
    cfg = parse_args(argv[1:])  # the dataclass validates every value, methods included
    assert cfg.filler == 21_000_000 and cfg.flat_scan == "circular" and cfg.seed == 3
    assert cfg.ordered_methods[:2] == ["baseline", "oracle"] and len(cfg.methods) == 3
    assert cfg.out_dir == str(out) and cfg.questions_per_dataset == 34
