#!/usr/bin/env bash
# On the GPU machine (after install.sh): where a dense guess's time goes (session 38: 1.7 ms
# a guess at 21M against the encoder's 0.785 ms): the encoder alone, the guess with the
# encoder inline and in a worker thread, and scoring alone, idle and beside a GIL-holding
# thread; ~1 min (with RALMSPEC_ENCODER_COMPILE=1, as the latency runs, +14 s). As a
# chain.sh step (first: it is short):
#   bash benchmarks/gpu/run.sh start NAME gpu/chain.sh "RALMSPEC_ENCODER_COMPILE=1 probe_guess.sh" ...
set -uo pipefail
out=${1:?usage: probe_guess.sh OUTDIR [probe_guess args]}; shift
exec python3 benchmarks/gpu/probe_guess.py --out-dir "$out" --texts 300 "$@"
