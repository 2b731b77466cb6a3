#!/usr/bin/env bash
# On the GPU machine (after install.sh): bench_retrieval at 21M documents (real passages +
# synthetic filler, the headline's knowledge base), one invocation: exact flat on the CPU as
# the paper ran it (FAISS, float32), the torch bf16 scan on the CPU (the latency headline's)
# and on the GPU, and IVF-SQ8 with 4,096 lists at nprobe 64 (what approx_latency_21m.sh
# serves), both as FAISS searches one query (one core) and with each query's 64 lists in 12
# groups on 12 threads (`ivf-g12`, the index reused). Batches of 1, 8 and 32 real NQ
# questions, in-process. HNSW is left out by default: `--backends hnsw` builds it (M 32,
# efConstruction 40) in 716 s on the H100 box's 16 cores (session 42: 13 minutes in all
# with the knowledge base, the process at ~80 GB of RAM), so it needs a step of its own.
# BM25's 21M search is timed by bm25_latency_21m.sh's probe (serially and on 12 threads);
# `--backends flat,ivf,bm25` adds its batch cells here (its index is built again, ~110 s,
# as bm25-t1 and bm25). Nothing is saved (--no-save-index:
# the disk holds the knowledge base's 32 GB of vectors). After a 21M latency run on the
# same machine the knowledge base is already built. Used with run.sh:
#   bash benchmarks/gpu/run.sh start NAME gpu/retrieval_21m.sh [bench_retrieval args]
set -uo pipefail
out=${1:?usage: retrieval_21m.sh OUTDIR [bench_retrieval args]}; shift
exec python3 benchmarks/bench_retrieval.py --out-dir "$out" --sizes filler --filler 21000000 \
  --backends flat,ivf --flat-impls faiss,torch --flat-dtypes bfloat16 \
  --nlist 4096 --nprobe 64 --ivf-codec sq8 --ivf-probe-groups 1,12 --no-save-index \
  --bm25-threads 1,12 \
  --transports inproc --batch-sizes 1,8,32 --reps 10 --cell-budget-s 8 --no-plot "$@"
