#!/usr/bin/env bash
# On the GPU machine (after install.sh): how the host's CPU runs the exact scan's product per
# batch size, every layout probe_matmul.py knows (the documents as the right operand, as the
# scan now, and as the left), bfloat16, 4M random docs; ~1 min. The text goes to
# OUTDIR/probe_matmul.txt. Session 6 (H200 host): the packed product is memory-bound to ~16
# queries, then compute-bound at ~2.2 TFLOP/s where AMX offers far more, which is what caps
# verifying many speculated steps (and serving) at 21M. As a chain.sh step:
#   bash benchmarks/gpu/run.sh start NAME gpu/chain.sh ... "probe_matmul.sh"
set -uo pipefail
out=${1:?usage: probe_matmul.sh OUTDIR [probe_matmul args]}; shift
mkdir -p "$out"
python3 benchmarks/gpu/probe_matmul.py --docs 4000000 --batches 1,16,64,256 \
  --dtypes bfloat16 "$@" 2>&1 | tee "$out/probe_matmul.txt"
exit "${PIPESTATUS[0]}"
