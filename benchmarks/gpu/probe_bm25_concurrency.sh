#!/usr/bin/env bash
# On the GPU machine (after install.sh): does BM25 at 21M docs answer more searches per second
# side by side (each on fewer threads) than one at a time on 12? Session 25 found a search
# 49 ms on 12 threads and 147 ms on one (25% parallel efficiency) and argued the >=2x BM25
# target out of reach; that argument holds only if concurrent searches get no more done.
# Builds the 21M BM25 index (~105 s, not saved) over the filler knowledge base (reused when
# an earlier step built it); ~40 s of searches. As a chain.sh step:
#   bash benchmarks/gpu/run.sh start NAME gpu/chain.sh ... "probe_bm25_concurrency.sh"
set -uo pipefail
out=${1:?usage: probe_bm25_concurrency.sh OUTDIR [probe args]}; shift
exec python3 benchmarks/probe_bm25_concurrency.py --filler 21000000 --threads 12,4,1 \
  --concurrency 1,3,12 --searches 48 --k 1 --prefetch 63 \
  --out "$out/probe_bm25_concurrency_21m.json" "$@"
