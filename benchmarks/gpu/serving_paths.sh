#!/usr/bin/env bash
# On the GPU machine (after install.sh): bench_serving once per LM path, back to back on the
# same card, so the scheduler hook and resubmission meet the same load. Used with run.sh start:
#   bash benchmarks/gpu/run.sh start NAME gpu/serving_paths.sh TAG "resubmit sessions" [args]
# or directly: bash benchmarks/gpu/serving_paths.sh OUTDIR TAG PATHS [bench_serving args]
# Writes OUTDIR/serving_TAG_<path>.json (+ .server.log); VLLM_BATCH_INVARIANT=1 keeps the
# baseline reproducible against itself under a changing batch mix.
set -uo pipefail
out=${1:?OUTDIR}; tag=${2:?TAG}; paths=${3:?"paths, e.g. 'resubmit sessions'"}; shift 3
export VLLM_BATCH_INVARIANT=1 PYTHONUNBUFFERED=1
for p in $paths; do
  name="serving_${tag}_${p}"
  echo "[serving_paths] $name: $(date +%T)"
  python3 benchmarks/bench_serving.py --out-dir "$out" --no-plot --name "$name" \
    --server-arg=--lm-path="$p" "$@" 2>&1 | grep -v "it/s\]"
  cp "$RALMSPEC_CACHE/bench/$name.server.log" "$out/" 2>/dev/null || true
done
echo "[serving_paths] done: $(date +%T)"
