#!/usr/bin/env bash
# On the GPU machine (after install.sh): batch-1 latency on BM25 at 21M docs (real passages +
# synthetic filler, the exact headline's knowledge base), SmolLM2-135M: baseline, oracle (the
# ceiling) and PSA with early pipelined verification, the best row of session 20 (5.12x on 9
# questions, with the serial search of 359 ms and a baseline of 11 s a question). Searches
# now run on 12 threads over doc-id shards (--bm25-threads; the other 4 cores stay with
# vLLM); --probe-bm25-threads 1,12 first times 20 searches serially and on 12 threads, same
# hits, so the run says what the parallel search won on this card's host. If a 100-question
# run does not fit, shard it with --skip-questions and merge with merge_latency.py. The cache
# is ranked in this process from term weights (--cache-scoring local, the default; pass
# --cache-scoring retriever for session 20's Score per step). The BM25 index (~1.5B
# postings, ~45 GB of RAM while it is built) is counted from the filler's word draws on every
# core (`retrieval/bm25_build.py`), overlapping the engine start; not saved (--no-save-index:
# a lent machine starts from scratch each session, and ~19 GB would take the disk's room).
# Session 24 (H200, 102 questions): 1.02x. The parallel search made the baseline 1.89 s a
# question, and while speculating the in-process searches waited for the GIL (300 ms on
# average against 44 ms in the baseline). Pass --transport process to run the retriever in
# its own `retriever serve` child, as `serve` does (its search threads: --bm25-threads; the
# probe needs the in-process index and is skipped there).
# --time-budget-s (default 400 s) stops starting questions. Used with run.sh:
#   bash benchmarks/gpu/run.sh start NAME gpu/bm25_latency_21m.sh [bench_latency args]
set -uo pipefail
out=${1:?usage: bm25_latency_21m.sh OUTDIR [bench_latency args]}; shift
exec python3 benchmarks/bench_latency.py --out-dir "$out" --model smollm2-135m \
  --backends bm25 --filler 21000000 --no-save-index --switch-interval-ms 0.5 \
  --methods baseline,oracle,PSA:overlap_depth=pipeline:early_verification=true \
  --bm25-threads 12 --probe-bm25-threads 1,12 \
  --questions-per-dataset 34 --time-budget-s 400 --no-plot "$@"
