#!/usr/bin/env bash
# On the GPU machine (after install.sh): batch-1 latency on the approximate and sparse
# retrievers at 1M docs (real passages + synthetic filler), SmolLM2-135M: baseline, oracle
# (the ceiling), the shipped PSA and PSA with pipelined verification (late and early: each
# step's search sent after or before the step is generated), one invocation. Checks
# issue 5's "never below 1.0x" on HNSW, IVF and BM25 with the current PSA (the last GPU HNSW
# row, 0.70x, predates OS3's overlap-aware plain steps). --time-budget-s applies per backend
# (default 200 s); more bench_latency args may follow. Used with run.sh:
#   bash benchmarks/gpu/run.sh start NAME gpu/approx_latency_1m.sh [bench_latency args]
set -uo pipefail
out=${1:?usage: approx_latency_1m.sh OUTDIR [bench_latency args]}; shift
exec python3 benchmarks/bench_latency.py --out-dir "$out" --model smollm2-135m \
  --backends hnsw,ivf,bm25 --filler 1000000 \
  --methods baseline,oracle,PSA,PSA:overlap_depth=pipeline,PSA:overlap_depth=pipeline:early_verification=true \
  --questions-per-dataset 34 --time-budget-s 200 --no-plot "$@"
