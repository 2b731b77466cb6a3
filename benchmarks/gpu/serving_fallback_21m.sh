#!/usr/bin/env bash
# On the GPU machine (after install.sh): bench_serving at 21M docs twice, back to back on the
# same card: with the server's retriever fallback as shipped (--max-retriever-utilization,
# default on) and with it off, so "never below 1.0x" and what the fallback gives up at low
# load are measured against one baseline each. The retriever child runs the latency
# headline's exact scan (torch bf16, circular, 12 threads); scheduler hook. Used with run.sh:
#   bash benchmarks/gpu/run.sh start NAME gpu/serving_fallback_21m.sh [bench_serving args]
# Writes OUTDIR/serving_21m_fallback-{on,off}.json (+ .server.log). Default cells c=8,64,256;
# a later --concurrency wins. FALLBACK_MODES="on" (or "off") runs one of the two only.
# PIN_CPUS="SERVER:RETRIEVER" (e.g. "12-15:0-11") pins the server with its engine core and
# the retriever child to those cores (--cpus), runs the load generator on the server's cores
# too (taskset; a knowledge base not built yet is then built on those cores only) and adds
# "-pinned" to the names.
set -uo pipefail
out=${1:?usage: serving_fallback_21m.sh OUTDIR [bench_serving args]}; shift
modes=${FALLBACK_MODES:-on off}
for mode in $modes; do
  case $mode in on|off) ;; *) echo "FALLBACK_MODES: on and/or off, got '$mode'" >&2; exit 2;; esac
done
export VLLM_BATCH_INVARIANT=${VLLM_BATCH_INVARIANT:-1} PYTHONUNBUFFERED=1  # 0 for a CPU dry run
R=--server-arg=--retriever-arg
pin=(); suffix=""; run=(python3)
if [ -n "${PIN_CPUS:-}" ]; then
  case $PIN_CPUS in *?:?*) ;; *) echo "PIN_CPUS: SERVER:RETRIEVER cores, got '$PIN_CPUS'" >&2; exit 2;; esac
  pin=(--server-arg=--cpus="${PIN_CPUS%%:*}" "$R=--cpus=${PIN_CPUS#*:}"); suffix="-pinned"
  if command -v taskset >/dev/null; then run=(taskset -c "${PIN_CPUS%%:*}" python3)
  else echo "[serving_fallback_21m] no taskset: the load generator runs on any core" >&2; fi
fi
for mode in $modes; do
  name="serving_21m_fallback-$mode$suffix"
  extra=("${pin[@]}"); [ "$mode" = off ] && extra+=(--server-arg=--max-retriever-utilization=0)
  echo "[serving_fallback_21m] $name: $(date +%T)"
  "${run[@]}" benchmarks/bench_serving.py --out-dir "$out" --no-plot --name "$name" \
    --filler 21000000 --concurrency 8,64,256 --methods baseline,ralmspec \
    --server-arg=--lm-path=sessions "$R=--flat-impl=torch" "$R=--device=cpu" \
    "$R=--dtype=bfloat16" "$R=--flat-scan=circular" "$R=--threads=12" \
    "${extra[@]}" "$@" 2>&1 | grep -v "it/s\]"
  cp "${RALMSPEC_CACHE:-$HOME/.cache/ralmspec-vllm}/bench/$name.server.log" "$out/" 2>/dev/null || true
done
echo "[serving_fallback_21m] done: $(date +%T)"
