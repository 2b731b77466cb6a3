#!/usr/bin/env bash
# On the GPU machine (after install.sh): run driver scripts one after another, so that one
# `run.sh start` and one string of `follow` calls cover a whole session's plan:
#   bash benchmarks/gpu/run.sh start NAME gpu/chain.sh \
#     "FALLBACK_MODES=on serving_fallback_21m.sh --concurrency 1,8,64,256" \
#     "approx_latency_1m.sh --time-budget-s 240"
# Each step is one string: leading VAR=value words set its environment, then a script under
# benchmarks/gpu/ and its arguments (words split on spaces). Every step writes into OUTDIR.
# A failing step is reported and the next one still runs; the exit status is the first
# failure's.
set -uo pipefail
out=${1:?usage: chain.sh OUTDIR STEP [STEP...]}; shift
[ $# -gt 0 ] || { echo "chain.sh: no steps" >&2; exit 2; }
here=$(dirname "$0")
for step in "$@"; do  # check every step before running any
  read -ra words <<<"$step"
  i=0; while [[ ${words[$i]:-} == [A-Z_]*=* ]]; do i=$((i + 1)); done
  [ -f "$here/${words[$i]:-}" ] || { echo "chain.sh: no script in step '$step'" >&2; exit 2; }
done
# Memory, disk and the largest process into OUTDIR/resources.log before each step and every
# CHAIN_SAMPLE_S (10) seconds, which `run.sh follow` copies back every minute: two machines
# were lost mid-chain (sessions 30 and 31, each in a 21M step some 20 minutes in) with
# nothing that said why.
mkdir -p "$out"
sample() {
  echo "$(date +%T) $(free -m | awk '/^Mem:/{print "mem used " $3 " avail " $7 " MiB"}')" \
    "$(df -m "$HOME" | awk 'NR==2{print "disk used " $3 " avail " $4 " MiB"}')" \
    "top $(ps -eo rss=,comm= --sort=-rss | head -1 | awk '{print $2 " " int($1 / 1024) " MiB"}')" \
    "${1:-}" >>"$out/resources.log" 2>&1
}
while sleep "${CHAIN_SAMPLE_S:-10}"; do sample; done &
sampler=$!
trap 'kill $sampler 2>/dev/null' EXIT
status=0
for step in "$@"; do
  read -ra words <<<"$step"
  env_vars=(); i=0
  while [[ ${words[$i]} == [A-Z_]*=* ]]; do env_vars+=("${words[$i]}"); i=$((i + 1)); done
  echo "[chain] $step: $(date +%T)"
  sample "before: $step"
  env "${env_vars[@]}" bash "$here/${words[$i]}" "$out" "${words[@]:$((i + 1))}"
  rc=$?
  echo "[chain] $step: rc=$rc $(date +%T)"
  [ $rc -ne 0 ] && [ $status -eq 0 ] && status=$rc
done
exit $status
