"""Probe: how a host's CPU runs the exact flat scan's matrix product, per batch size.

The torch flat search (``retrieval/flat.py``) multiplies a batch of query vectors with the
whole (N x 384) document matrix. Its cost per batch size decides what a verification of s
speculated steps costs (OS3's b(s)) and how many queries a saturated retriever can serve.
This times that product alone, for the layouts and dtypes the scan could use, and prints
which oneDNN kernel torch picked (``ONEDNN_VERBOSE``) so a slow path is visible:

    python benchmarks/gpu/probe_matmul.py --docs 4000000 --batches 1,4,16,64,128

Layouts: ``q @ M.T`` (the matrix stored N x d, as the scan does now), ``q @ MT`` (stored
d x N), ``F.linear(q, M)``, the documents as the left operand (``M @ q.T`` and
``F.linear(M, q)``: scores docs x queries, the small query block the reused one) and, in
bfloat16, the matrix pre-packed by oneDNN for a batch-size hint (``pk<hint>``:
``mkldnn._reorder_linear_weight`` + ``_linear_pointwise``). Prints ms per call, effective
TFLOP/s and GB/s of matrix read.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any


def _time(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def probe(docs: int, dim: int, batches: list[int], dtypes: list[str], repeats: int) -> None:
    import torch
    import torch.nn.functional as F

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, mkldnn "
          f"{torch.backends.mkldnn.is_available()}, docs {docs}, dim {dim}")  # fmt: skip
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        matrix = torch.randn(docs, dim).to(dtype)
        transposed = matrix.T.contiguous()
        gbytes = matrix.numel() * matrix.element_size() / 1e9
        for b in batches:
            q = torch.randn(b, dim).to(dtype)
            layouts: dict[str, Callable[[], Any]] = {
                "q@M.T": partial(torch.matmul, q, matrix.T),
                "q@MT": partial(torch.matmul, q, transposed),
                "linear": partial(F.linear, q, matrix),
                # the documents as the big left operand, the queries as a small right one
                # (scores come out docs x queries): AMX tiles then stream the matrix rows
                "M@q.T": partial(torch.matmul, matrix, q.T),
                "lin(M,q)": partial(F.linear, matrix, q),
            }
            if dtype_name == "bfloat16" and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
                # the weight pre-packed in oneDNN's blocked layout (torch.compile's CPU path)
                for hint in sorted({1, 16, b}):
                    packed = torch.ops.mkldnn._reorder_linear_weight(matrix, hint)
                    layouts[f"pk{hint}"] = partial(
                        torch.ops.mkldnn._linear_pointwise, q, packed, None, "none", [], ""
                    )
            for name, fn in layouts.items():
                seconds = _time(fn, repeats)
                flops = 2 * b * dim * docs / seconds / 1e12
                print(f"{dtype_name:9s} b={b:4d} {name:8s} {seconds * 1000:9.1f} ms "
                      f"{flops:7.2f} TFLOP/s {gbytes / seconds:7.1f} GB/s")  # fmt: skip
        del matrix, transposed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batches", default="1,4,16,64,128")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--verbose-batch", type=int, default=64,
                        help="rerun it with ONEDNN_VERBOSE=1 (0: skip)")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        probe(args.docs, args.dim, batches, args.dtypes.split(","), 1)
        return 0
    probe(args.docs, args.dim, batches, args.dtypes.split(","), args.repeats)
    if args.verbose_batch:
        env = dict(os.environ, ONEDNN_VERBOSE="1")
        cmd = [sys.executable, __file__, "--child", "--docs", str(min(args.docs, 262144)),
               "--batches", str(args.verbose_batch), "--dtypes", args.dtypes]  # fmt: skip
        out = subprocess.run(cmd, env=env, capture_output=True, text=True).stdout
        lines = [line for line in out.splitlines() if line.startswith("onednn_verbose")]
        isa = [line for line in lines if ",isa:" in line]
        execs = [",".join(line.split(",")[5:10]) for line in lines if ",exec," in line]
        seen = dict.fromkeys(isa + execs)
        print("oneDNN kernels:", *seen, sep="\n  ") if seen else print("oneDNN: no verbose lines")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
