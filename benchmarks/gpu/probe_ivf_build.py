"""How long an IVF build takes on the GPU box: FAISS's k-means and add on the CPU against the
torch build on the GPU (``--ivf-build cuda``, ``retrieval/kmeans.py``), and why FAISS is slow.

Session 28 (H100 host): FAISS's build of IVF-SQ8 at 21M docs (k-means for 4,096 lists on
262k sample vectors, 10 iterations, ~8e12 flops, then the add of 21M) had not finished after
4.5 minutes. The 2-core dev machine runs that k-means at 75-116 GFLOP/s with kernels that
suit its CPU (70-110 s on 2 cores; the host has 16), and at 38 GFLOP/s with those the
faiss-cpu wheel's OpenBLAS 0.3.15 picks for it. OpenBLAS picks its kernels from the CPU
model, and the host reports a generic "Intel(R) Xeon(R) Processor", so this probe prints
the core OpenBLAS chose and times FAISS's k-means in child processes under
``OPENBLAS_CORETYPE`` overrides, then times whole builds (train + add) both ways:

    python3 benchmarks/gpu/probe_ivf_build.py --docs 2000000 --out-dir "$OUT/gpu"

Writes ``probe_ivf_build_<machine>.json``; one JSON line per cell on stdout as it goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

CORETYPES = ("", "SkylakeX", "Haswell")
"""OpenBLAS kernel sets to try for FAISS's k-means ("": OpenBLAS's own choice; importing
ralmspec_vllm sets the variable from the CPU's flags, ``ralmspec_vllm/openblas.py``, so
the child imports faiss before anything of ours)."""


def sample(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def faiss_kmeans_cell(n: int, dim: int, k: int, threads: int) -> dict[str, Any]:
    """FAISS's IVF k-means (spherical, 10 iterations) on ``n`` random unit vectors."""
    requested = os.environ.get("OPENBLAS_CORETYPE", "")  # before our import may set it
    import faiss

    from ralmspec_vllm.openblas import faiss_openblas_core

    faiss.omp_set_num_threads(threads)
    x = sample(n, dim, 0)
    clus = faiss.Clustering(dim, k)
    clus.niter, clus.spherical, clus.max_points_per_centroid = 10, True, 256
    start = time.perf_counter()
    clus.train(x, faiss.IndexFlatIP(dim))
    seconds = time.perf_counter() - start
    flops = 2.0 * n * k * dim * clus.niter
    return {
        "what": "faiss_kmeans",
        "openblas": faiss_openblas_core(),
        "coretype": requested,
        "threads": threads,
        "seconds": round(seconds, 3),
        "gflops": round(flops / seconds / 1e9, 1),
    }


def torch_kmeans_cell(n: int, dim: int, k: int, device: str) -> dict[str, Any]:
    import torch

    from ralmspec_vllm.retrieval import kmeans

    x = sample(n, dim, 0)
    kmeans.kmeans(x[: min(n, 4 * k)], k, device, niter=1)  # warm-up: CUDA context, kernels
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    kmeans.kmeans(x, k, device)
    seconds = time.perf_counter() - start
    flops = 2.0 * n * k * dim * kmeans.NITER * 2  # assignment + the one-hot sums
    return {
        "what": "torch_kmeans",
        "device": device,
        "seconds": round(seconds, 3),
        "gflops": round(flops / seconds / 1e9, 1),
    }


def build_cell(docs: int, dim: int, nlist: int, codec: str, build: str) -> dict[str, Any]:
    """A whole ``IVFFlatRetriever`` build (train on 64 x nlist vectors, add every doc)."""
    from ralmspec_vllm.retrieval.ann import IVFFlatRetriever, ivf_build_device

    vectors = sample(docs, dim, 1)
    start = time.perf_counter()
    ivf = IVFFlatRetriever(
        vectors, nlist=nlist, codec=codec, build_device=ivf_build_device(build), progress=False
    )
    seconds = time.perf_counter() - start
    queries = sample(64, dim, 2)
    hits = ivf.search_vectors(queries, 10)
    return {
        "what": "ivf_build",
        "build": build,
        "docs": docs,
        "nlist": nlist,
        "codec": codec,
        "seconds": round(seconds, 2),
        "hits_per_query": sum(len(row) for row in hits) / len(hits),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--docs", type=int, default=2_000_000, help="vectors in the whole builds")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--nlist", type=int, default=4096, help="lists (k-means k)")
    p.add_argument("--sample", type=int, default=65536, help="k-means cells' vectors")
    p.add_argument("--threads", type=int, default=12, help="FAISS OpenMP threads")
    p.add_argument("--codec", choices=("flat", "sq8"), default="sq8")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one FAISS k-means under this process's OPENBLAS_CORETYPE
        print(json.dumps(faiss_kmeans_cell(args.sample, args.dim, args.nlist, args.threads)))
        return 0

    import faiss
    import torch

    from benchmarks.common import describe_machine, git_state
    from ralmspec_vllm.openblas import faiss_openblas_core  # sets OPENBLAS_CORETYPE first

    faiss.omp_set_num_threads(args.threads)
    as_shipped = faiss_openblas_core()  # what the whole builds below run on
    print(json.dumps({"what": "openblas_as_shipped", "openblas": as_shipped}), flush=True)
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    for coretype in CORETYPES:
        env = {**os.environ, "OPENBLAS_CORETYPE": coretype}
        if not coretype:
            env.pop("OPENBLAS_CORETYPE")
        cmd = [sys.executable, __file__, "--child", "--sample", str(args.sample)]
        cmd += ["--dim", str(args.dim), "--nlist", str(args.nlist)]
        cmd += ["--threads", str(args.threads)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            emit({"what": "faiss_kmeans", "coretype": coretype, "error": done.stderr[-500:]})
        else:
            emit(json.loads(done.stdout.strip().splitlines()[-1]))
    cuda = ["cuda"] if torch.cuda.is_available() else []
    for device in ["cpu", *cuda]:
        emit(torch_kmeans_cell(args.sample, args.dim, args.nlist, device))
    for build in ["faiss", *cuda]:
        emit(build_cell(args.docs, args.dim, args.nlist, args.codec, build))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    path = args.out_dir / f"probe_ivf_build_{machine.tag}.json"
    meta = {
        "machine": asdict(machine),
        "git_sha": git_state().sha,
        "openblas_as_shipped": as_shipped,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
