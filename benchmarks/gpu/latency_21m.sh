#!/usr/bin/env bash
# The exact-dense headline run of issue 5, as sessions 12-13 ran it: SmolLM2-135M, the bf16
# flat scan on the CPU (12 threads, circular) over 21M docs in process, baseline / oracle /
# pipelined PSA on 102 real questions (34 per dataset), one invocation. On the GPU machine:
#   bash benchmarks/gpu/run.sh start NAME gpu/latency_21m.sh [more bench_latency args]
# then `run.sh follow NAME SECONDS` call after call, back to back. The loop stops starting
# questions after --time-budget-s; the JSON is rewritten after every question.
# --transport process puts the retriever (the scan's walk, the query encoder) in a
# `retriever serve` child, as `serve` runs it: out of the GIL of the loop that drives vLLM.
# Add --cpus 12-15 --retriever-cpus 0-11 to keep the child's 12 scan threads and this
# process with vLLM's engine core on disjoint cores (the filler build still uses every core
# while vLLM starts).
set -uo pipefail
out=${1:?usage: latency_21m.sh OUTDIR [bench_latency args]}; shift
exec python3 benchmarks/bench_latency.py --out-dir "$out" --model smollm2-135m \
  --backends flat --flat-impl torch --flat-device cpu --flat-dtype bfloat16 \
  --flat-scan circular --filler 21000000 --torch-threads 12 --switch-interval-ms 0.5 \
  --loop-lag-ms 5 \
  --methods baseline,oracle,PSA:prefetch_k=512:cache_capacity=16384:overlap_depth=pipeline \
  --questions-per-dataset 34 --time-budget-s 1500 --no-plot "$@"
