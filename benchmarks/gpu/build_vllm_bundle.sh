#!/usr/bin/env bash
# Build the vLLM 0.26.0 bundle (torch 2.11.0+cu130, Python 3.12) for the offline GPU machine.
# Usage: bash build_vllm_bundle.sh OUTDIR   (~1 min download, ~1 min xz)
# Drops what Hopper never uses (FlashAttention-2 library, Rust frontend, deep_gemm, Blackwell
# kernels) and splits the result into parts of PIECE (default 48M; one carry each: the working
# tree travels with every call, and tests/test_gpu_scripts.py keeps it small enough).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd); OUT=${1:?usage: build_vllm_bundle.sh OUTDIR}; W=$(mktemp -d)
P="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none"
for g in 5 12 17 24 26 27 28 31 35 39; do P="$P --platform manylinux_2_${g}_x86_64"; done
P="$P --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64"
python3 -m pip download -q --no-deps $P -d "$W" vllm==0.26.0 2>&1 | grep -v "is ignored" || true
python3 -m pip download -q --no-deps $P -d "$W/wheels" -r "$HERE/reqs-gpu-vllm026.txt" 2>&1 | grep -v "is ignored" || true
mkdir "$W/t" && (cd "$W/t" && unzip -q "$W"/vllm-0.26.0-*.whl \
  && rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs \
  && rm -rf vllm/third_party/deep_gemm vllm/third_party/fmha_sm100 \
  && tar -cf - vllm vllm-0.26.0.dist-info | xz -T0 -6 > "$W/vllm026_trim.tar.xz")
tar -cf "$W/vllm_bundle.tar" -C "$W" vllm026_trim.tar.xz wheels
mkdir -p "$OUT" && split -b "${PIECE:-48M}" -d "$W/vllm_bundle.tar" "$OUT/vllm_bundle.tar.part"
rm -rf "$W"; ls -l "$OUT"
