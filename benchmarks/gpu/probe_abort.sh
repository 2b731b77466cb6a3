#!/usr/bin/env bash
# On the GPU machine (after install.sh): what an aborted vLLM step costs (the price of an
# early-verification miss; session 20 inferred ~17 ms on a ~22 ms step), SmolLM2-135M fp32,
# fresh prompts of 400 tokens, aborts after 1, 3 and 10 ms; ~1 minute with the engine start.
# Used with run.sh or as a chain.sh step:
#   bash benchmarks/gpu/run.sh start NAME gpu/probe_abort.sh [probe_abort args]
set -uo pipefail
out=${1:?usage: probe_abort.sh OUTDIR [probe_abort args]}; shift
exec python3 benchmarks/probe_abort.py --out-dir "$out" --model smollm2-135m --trials 20 \
  --abort-after-ms 1,3,10 "$@"
