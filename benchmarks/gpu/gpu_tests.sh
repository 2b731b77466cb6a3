#!/usr/bin/env bash
# On the GPU machine (after install.sh): the gpu-marked tests (skipped on the CPU machine),
# output in OUTDIR/gpu_tests.log; default paths tests/engine tests/retrieval, or the paths
# and pytest flags given. As a chain.sh step, e.g. before a probe of the same code:
#   bash benchmarks/gpu/run.sh start NAME gpu/chain.sh \
#     "gpu_tests.sh tests/retrieval/test_encoder_cuda_graphs.py" "probe_encoder.sh" ...
set -uo pipefail
out=${1:?usage: gpu_tests.sh OUTDIR [pytest paths and flags]}; shift
[ $# -gt 0 ] || set -- tests/engine tests/retrieval
mkdir -p "$out"
python3 -m pytest -q -m gpu -p no:cacheprovider "$@" 2>&1 | tee "$out/gpu_tests.log" | tail -15
exit "${PIPESTATUS[0]}"
