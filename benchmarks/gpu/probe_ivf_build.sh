#!/usr/bin/env bash
# On the GPU machine (after install.sh): IVF-SQ8 builds with 4,096 lists on 2M random docs,
# FAISS on the CPU against torch on the GPU (--ivf-build), and FAISS's k-means under the
# OpenBLAS kernel sets it may run (probe_ivf_build.py says why); ~2 min. Results in
# OUTDIR/probe_ivf_build_<machine>.json. As a chain.sh step, before the IVF 21M run:
#   bash benchmarks/gpu/run.sh start NAME gpu/chain.sh "probe_ivf_build.sh" ...
set -uo pipefail
out=${1:?usage: probe_ivf_build.sh OUTDIR [probe_ivf_build args]}; shift
exec python3 benchmarks/gpu/probe_ivf_build.py --out-dir "$out" --docs 2000000 "$@"
