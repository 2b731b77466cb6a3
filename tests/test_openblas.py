"""``OPENBLAS_CORETYPE`` for faiss's bundled OpenBLAS 0.3.15 (``ralmspec_vllm/openblas.py``):
chosen from the CPU's flags unless the user set it, before faiss loads its OpenBLAS, and
what faiss then actually runs."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from ralmspec_vllm import openblas


def test_coretype_follows_the_cpu_flags() -> None:
    avx512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx2", "fma"}
    assert openblas.coretype_for(avx512) == "SkylakeX"
    assert openblas.coretype_for({"avx2", "fma", "avx512f"}) == "Haswell"  # partial AVX-512
    assert openblas.coretype_for({"avx2", "fma"}) == "Haswell"
    assert openblas.coretype_for({"avx", "sse4_2"}) is None
    assert openblas.coretype_for(set()) is None


def test_cpu_flags_reads_the_first_processor(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 fma\n\nprocessor\t: 1\nflags\t: sse\n")
    assert openblas.cpu_flags(info) == {"fpu", "avx2", "fma"}
    assert openblas.cpu_flags(tmp_path / "missing") == set()


def test_a_coretype_the_user_set_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(openblas.ENV, "Zen")
    monkeypatch.setattr(openblas, "cpu_flags", lambda: {"avx2", "fma"})
    assert openblas.prefer_native_kernels() == "Zen"
    monkeypatch.delenv(openblas.ENV)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert openblas.prefer_native_kernels() == "Haswell"
    monkeypatch.delenv(openblas.ENV)
    monkeypatch.setattr(openblas, "cpu_flags", lambda: {"sse2"})
    assert openblas.prefer_native_kernels() is None


@pytest.mark.skipif(
    platform.machine() != "x86_64" or openblas.coretype_for(openblas.cpu_flags()) is None,
    reason="needs an x86-64 Linux CPU with AVX2",
)
def test_importing_the_package_first_sets_the_kernels_faiss_runs() -> None:
    """In a fresh process without the variable, ``import ralmspec_vllm`` before faiss makes
    faiss's OpenBLAS run the kernels this CPU's flags name (on the dev machine's AMD EPYC
    its own choice is "Barcelona", 3x slower for FAISS's k-means)."""
    env = {k: v for k, v in os.environ.items() if k != openblas.ENV}
    want = openblas.coretype_for(openblas.cpu_flags())
    code = (
        "import ralmspec_vllm, faiss\n"
        "from ralmspec_vllm.openblas import faiss_openblas_core\n"
        "print(faiss_openblas_core())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split()[0] == want, done.stdout
