#!/usr/bin/env bash
# On the GPU machine (after install.sh): where a MiniLM query's encoder pass goes (3.9 ms of
# a 6 ms IVF search at 1M on the H100, session 23), shipped against one CUDA graph per token
# length, idle and beside a GIL-holding thread; ~30 s. As a chain.sh step (first: it is short):
#   bash benchmarks/gpu/run.sh start NAME gpu/chain.sh "probe_encoder.sh" ...
set -uo pipefail
out=${1:?usage: probe_encoder.sh OUTDIR [probe_encoder args]}; shift
exec python3 benchmarks/gpu/probe_encoder.py --out-dir "$out" --texts 300 "$@"
