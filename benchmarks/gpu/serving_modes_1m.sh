#!/usr/bin/env bash
# On the GPU machine (after install.sh): bench_serving over IVF at 1M docs (1,024 lists,
# FAISS-built, nprobe 16, the batch-1 rows' setting) once per speculation mode, back to back
# on the same card: the server's default (PSA in rounds, --overlap-depth stride) and the
# pipeline with early verification, which beat it at batch 1 at IVF and BM25 1M (sessions
# 38-43). Whether it holds under load (one search per speculated step, where rounds batch
# several) decides whether the default changes. Scheduler hook. Used with run.sh:
#   bash benchmarks/gpu/run.sh start NAME gpu/serving_modes_1m.sh [bench_serving args]
# Writes OUTDIR/serving_1m-ivf_{rounds,early}.json (+ .server.log). Default cells c=1,8,64;
# a later --concurrency wins. SERVING_MODES="rounds" (or "early") runs one of the two only;
# a mode ending in -loop-off runs with the event-loop fallback off (--max-loop-cpu 0,
# session 47's setting before the rule): SERVING_MODES="rounds rounds-loop-off" measures it.
set -uo pipefail
out=${1:?usage: serving_modes_1m.sh OUTDIR [bench_serving args]}; shift
modes=${SERVING_MODES:-rounds early}
for mode in $modes; do
  case $mode in rounds|early|rounds-loop-off|early-loop-off) ;;
    *) echo "SERVING_MODES: rounds, early (each optionally -loop-off), got '$mode'" >&2; exit 2;;
  esac
done
export VLLM_BATCH_INVARIANT=${VLLM_BATCH_INVARIANT:-1} PYTHONUNBUFFERED=1  # 0 for a CPU dry run
R=--server-arg=--retriever-arg
for mode in $modes; do
  name="serving_1m-ivf_$mode"
  extra=()
  case $mode in early*) extra=(--server-arg=--overlap-depth=pipeline --server-arg=--early-verification);; esac
  case $mode in *-loop-off) extra+=(--server-arg=--max-loop-cpu=0);; esac
  echo "[serving_modes_1m] $name: $(date +%T)"
  python3 benchmarks/bench_serving.py --out-dir "$out" --no-plot --name "$name" \
    --filler 1000000 --concurrency 1,8,64 --methods baseline,ralmspec \
    --server-arg=--lm-path=sessions "$R=--backend=ivf" "$R=--nlist=1024" "$R=--nprobe=16" \
    "$R=--ivf-build=faiss" "${extra[@]}" "$@" 2>&1 | grep -v "it/s\]"
  cp "${RALMSPEC_CACHE:-$HOME/.cache/ralmspec-vllm}/bench/$name.server.log" "$out/" 2>/dev/null || true
done
echo "[serving_modes_1m] done: $(date +%T)"
