#!/usr/bin/env bash
# On the GPU machine (after install.sh): batch-1 latency on BM25 at 21M docs (real passages +
# synthetic filler, the exact headline's knowledge base), SmolLM2-135M: baseline, oracle (the
# ceiling), PSA and PSA with pipelined verification (late and early), one invocation. The
# BM25 index (~1.5B
# postings, ~45 GB of RAM while it is built) is counted from the filler's word draws on every
# core (`retrieval/bm25_build.py`), overlapping the engine start; not saved (--no-save-index:
# a lent machine starts from scratch each session, and ~19 GB would take the disk's room).
# --time-budget-s (default 400 s) stops starting questions. Used with run.sh:
#   bash benchmarks/gpu/run.sh start NAME gpu/bm25_latency_21m.sh [bench_latency args]
set -uo pipefail
out=${1:?usage: bm25_latency_21m.sh OUTDIR [bench_latency args]}; shift
exec python3 benchmarks/bench_latency.py --out-dir "$out" --model smollm2-135m \
  --backends bm25 --filler 21000000 --no-save-index --switch-interval-ms 0.5 \
  --methods baseline,oracle,PSA,PSA:overlap_depth=pipeline,PSA:overlap_depth=pipeline:early_verification=true \
  --questions-per-dataset 34 --time-budget-s 400 --no-plot "$@"
