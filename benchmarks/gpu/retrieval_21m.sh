#!/usr/bin/env bash
# On the GPU machine (after install.sh): bench_retrieval at 21M documents (real passages +
# synthetic filler, the headline's knowledge base), one invocation: exact flat on the CPU as
# the paper ran it (FAISS, float32), the torch bf16 scan on the CPU (the latency headline's)
# and on the GPU, and IVF-SQ8 with 4,096 lists at nprobe 64 (what approx_latency_21m.sh
# serves), both as FAISS searches one query (one core) and with each query's 64 lists in 12
# groups on 12 threads (`ivf-g12`, the index reused). Batches of 1, 8 and 32 real NQ
# questions, in-process. HNSW is left out by default: `--backends hnsw` builds it (M 32,
# efConstruction 40) in an estimated 10-20 minutes on 16 cores (26 s at 1M on the H200;
# on the dev machine's 2 cores 68 s at 1M and 229 s at 3M, 3.4x the time for 3x the docs;
# not yet run at 21M; ~38 GB of RAM beside the knowledge base), so it needs a session of
# its own. BM25's 21M search is timed by bm25_latency_21m.sh's probe
# (serially and on 12 threads); `--backends flat,ivf,bm25` adds its batch cells here (its
# index is built again, ~110 s, as bm25-t1 and bm25). Nothing is saved (--no-save-index:
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
