#!/usr/bin/env bash
# On the GPU machine, once every piece sits in $STASH (staged one call each): reassemble,
# install vLLM and the wheels into $SITE with --no-deps, unpack the cache. ~20 s.
# Prints the environment to export afterwards (also written to $HOME/ralmspec.env).
set -euo pipefail
STASH=${STASH:-$HOME/stash}; SITE=${SITE:-$HOME/site}; CACHE=${CACHE:-$HOME/rcache}
W=$(mktemp -d)
cat "$STASH"/vllm_bundle.tar.part* > "$W/vllm_bundle.tar"
cat "$STASH"/data.tar.part* > "$W/data.tar"
tar -xf "$W/vllm_bundle.tar" -C "$W" && mkdir -p "$SITE" "$CACHE"
tar -xJf "$W/vllm026_trim.tar.xz" -C "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
  "$W"/wheels/*.whl
mkdir "$W/data" && tar -xf "$W/data.tar" -C "$W/data"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$W"/data/wheels/*.whl
cp -r "$W/data/cache/." "$CACHE/"
if ls "$STASH"/qwen.tar.part* >/dev/null 2>&1; then  # optional: WITH_QWEN=1 prepare.sh
  mkdir "$W/qwen" && cat "$STASH"/qwen.tar.part* | tar -xf - -C "$W/qwen"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$W"/qwen/*.whl
fi
if [ -f "$STASH/jit_cache.tgz" ]; then  # optional: a previous session's `run.sh save-cache`
  tar -xzf "$STASH/jit_cache.tgz" -C "$HOME" || echo "[install] JIT caches not restored" >&2
fi
rm -rf "$W"
# Bytecode now, on every core: the wheels went in with --no-compile, and the first vLLM
# import (the benchmark's, then its engine process's) otherwise compiles it serially (~30 s).
python3 -m compileall -q -j 0 "$SITE" >/dev/null 2>&1 || true
# VLLM_USE_FLASHINFER_SAMPLER=0: greedy decoding never samples, but vLLM's start builds
# FlashInfer's top-k/top-p sampler with nvcc on a fresh machine (103 s in session 13's
# 200 s engine start; a start with that cache took 32 s).
cat > "$HOME/ralmspec.env" <<ENV
export PYTHONPATH=$SITE:$(pwd) RALMSPEC_CACHE=$CACHE
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_USE_FLASHINFER_SAMPLER=0
ENV
cat "$HOME/ralmspec.env"
