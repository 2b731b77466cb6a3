#!/usr/bin/env bash
# On the GPU machine (after install.sh, with the Qwen pieces staged: WITH_QWEN=1 prepare.sh
# makes 10 more): batch-1 latency with Qwen2.5-0.5B (real weights, fp32, converted from its
# GGUF there) over exact dense 1M docs (FAISS flat on 12 CPU threads, leaving 4 cores to the
# LM, as the 21M runs do), baseline / oracle / the shipped PSA / PSA with pipelined early
# verification on real questions, one invocation. The honest re-run of the README's last
# memo-flattered row (H200, 2026-11-28, 1.41x). Over IVF instead (session 38), the later
# flags win: `qwen_latency_1m.sh --backends ivf --ivf-build faiss --nlist 1024`. Used with
# run.sh / chain.sh:
#   bash benchmarks/gpu/run.sh start NAME gpu/qwen_latency_1m.sh [bench_latency args]
set -uo pipefail
out=${1:?usage: qwen_latency_1m.sh OUTDIR [bench_latency args]}; shift
exec python3 benchmarks/bench_latency.py --out-dir "$out" --model qwen2.5-0.5b \
  --backends flat --filler 1000000 --faiss-threads 12 --dtype float32 \
  --methods baseline,oracle,PSA,PSA:overlap_depth=pipeline:early_verification=true \
  --questions-per-dataset 34 --time-budget-s 300 --no-plot "$@"
