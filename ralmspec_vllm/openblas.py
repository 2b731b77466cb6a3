"""Name the OpenBLAS kernels this CPU can run before faiss loads its own OpenBLAS.

The faiss-cpu wheels (1.15.1 here) bundle OpenBLAS 0.3.15, which picks its kernels from the
CPU model number and does not know CPUs newer than about 2020: on the dev machine's AMD EPYC
it runs its "Barcelona" kernels (2007, SSE), and FAISS's k-means there ran at 38 GFLOP/s
instead of 116-124 with the "SkylakeX" ones (``benchmarks/gpu/probe_ivf_build.py``). FAISS uses
BLAS for k-means (IVF training), IVF list assignment and batched flat searches of 20 or more
queries. OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when it loads; ``prefer_native_kernels``
sets it from the CPU's flags (AVX-512 -> ``SkylakeX``, AVX2 + FMA -> ``Haswell``) unless it is
already set, after numpy has loaded (numpy's own, newer OpenBLAS keeps its choice). Child
processes inherit it. Scores are unaffected: dense candidates are re-scored exactly.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

ENV = "OPENBLAS_CORETYPE"
_AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}


def coretype_for(flags: set[str]) -> str | None:
    """The OpenBLAS kernel set for CPU ``flags`` (``/proc/cpuinfo``), ``None``: leave its
    own choice (no AVX2)."""
    if flags >= _AVX512:
        return "SkylakeX"
    if flags >= {"avx2", "fma"}:
        return "Haswell"
    return None


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's flags (empty where there is no ``/proc/cpuinfo``)."""
    try:
        with cpuinfo.open() as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def prefer_native_kernels() -> str | None:
    """Set ``OPENBLAS_CORETYPE`` for this CPU unless set (x86-64 Linux only); returns the
    value in effect. numpy is imported first so that its OpenBLAS chooses for itself."""
    import numpy  # noqa: F401  (loads numpy's OpenBLAS before the variable exists)

    if ENV not in os.environ and platform.machine() in ("x86_64", "AMD64"):
        chosen = coretype_for(cpu_flags())
        if chosen is not None:
            os.environ[ENV] = chosen
    return os.environ.get(ENV)


def faiss_openblas_core() -> str:
    """The kernel set the faiss wheel's OpenBLAS runs, and its build (loads faiss)."""
    import ctypes

    import faiss

    libs = Path(faiss.__file__).resolve().parents[1] / "faiss_cpu.libs"
    for lib in sorted(libs.glob("libopenblas*.so*")):
        blas = ctypes.CDLL(str(lib))
        blas.openblas_get_corename.restype = ctypes.c_char_p
        blas.openblas_get_config.restype = ctypes.c_char_p
        return f"{blas.openblas_get_corename().decode()} ({blas.openblas_get_config().decode()})"
    return f"no OpenBLAS under {libs}"
