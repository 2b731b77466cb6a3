#!/usr/bin/env bash
# On the GPU machine (after install.sh): batch-1 latency on IVF at 21M docs (real passages +
# synthetic filler, the exact headline's knowledge base), SmolLM2-135M: baseline, oracle (the
# ceiling), PSA and PSA with pipelined verification (late and early), one invocation. The
# index is IVF-SQ8 with
# 4,096 lists: a float32 IVF (32 GB) would not fit the 64 GB disk next to the knowledge
# base's own 32 GB of vectors, and FAISS's default ~4 sqrt(N) = 18,330 lists would take its
# k-means many minutes on 16 cores. The build (train on 262k vectors, add 21M) overlaps the
# engine start; it is not saved (--no-save-index: a lent machine starts from scratch). Its
# k-means and list assignment run in torch on the GPU (--ivf-build auto): FAISS's k-means
# and add on the host's CPU had not finished after 4.5 minutes in session 28; on the H100's
# GPU it took 9.4 s in session 29.
# --nprobe sets the operating point (default 64: ~3% of the docs scanned per query);
# --time-budget-s (default 400 s) stops starting questions. Used with run.sh:
#   bash benchmarks/gpu/run.sh start NAME gpu/approx_latency_21m.sh [bench_latency args]
set -uo pipefail
out=${1:?usage: approx_latency_21m.sh OUTDIR [bench_latency args]}; shift
exec python3 benchmarks/bench_latency.py --out-dir "$out" --model smollm2-135m \
  --backends ivf --filler 21000000 --no-save-index --nlist 4096 --nprobe 64 --ivf-codec sq8 \
  --faiss-threads 12 --switch-interval-ms 0.5 \
  --methods baseline,oracle,PSA,PSA:overlap_depth=pipeline,PSA:overlap_depth=pipeline:early_verification=true \
  --questions-per-dataset 34 --time-budget-s 400 --no-plot "$@"
