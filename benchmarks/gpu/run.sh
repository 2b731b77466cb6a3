#!/usr/bin/env bash
# On the GPU machine, after install.sh: run one benchmark phase, results under $OUT/gpu.
#   bash benchmarks/gpu/run.sh warm [N]    # CPU flags, filler index to N docs, first vLLM start
#   bash benchmarks/gpu/run.sh check       # versions, GPU, engine smoke (first start JITs ~2 min)
#   bash benchmarks/gpu/run.sh retrieval   # bench_retrieval: real + 1M docs, CPU and CUDA flat, HNSW, IVF, BM25
#   bash benchmarks/gpu/run.sh latency     # bench_latency: SmolLM2, exact flat (FAISS on CPU) at 1M docs
#   bash benchmarks/gpu/run.sh bench NAME SCRIPT [args]   # any benchmark, log in $RES/NAME.log
#   bash benchmarks/gpu/run.sh start NAME SCRIPT [args]  # a benchmark that outlives this call
#   bash benchmarks/gpu/run.sh follow NAME [SECONDS]      # wait for it (or SECONDS), results -> $RES
#     A device call ends after 10 minutes, but a process in its own session (setsid) runs on
#     while the machine is held: one invocation can then time for 20+ minutes after paying
#     its setup once (filler index, vLLM start, 21M matrix: ~6 min on a fresh machine). Issue
#     the `follow` calls back to back: the machine goes back 30 s after a call ends. Run it
#     from a copy outside the checkout (e.g. cp -r .snap ~/snap; cd ~/snap; install.sh),
#     since every call re-copies the checkout.
#   bash benchmarks/gpu/run.sh save-cache  # vLLM/Triton/FlashInfer JIT caches -> $RES/jit_cache.tgz
#     (copy it to $RALMSPEC_CACHE/gpu/ on the CPU machine: prepare.sh then carries it, and
#     install.sh restores it, so a fresh machine's first vLLM start skips that compilation)
# Extra arguments go to the benchmark. Each phase fits one device call (< 10 minutes).
# Two GPUs: run one phase per GPU in parallel, e.g.
#   CUDA_VISIBLE_DEVICES=0 bash run.sh bench a bench_latency.py ... &
#   CUDA_VISIBLE_DEVICES=1 bash run.sh bench b bench_latency.py ... ; wait
set -uo pipefail
. "$HOME/ralmspec.env"
RES=${OUT:-/tmp/out}/gpu; mkdir -p "$RES"
phase=${1:?usage: run.sh check|retrieval|latency [args]}; shift
export PYTHONUNBUFFERED=1
case "$phase" in
  warm)
    # Pay once what would otherwise eat a benchmark's time budget: the filler index build
    # (21M: ~35 s), and vLLM's first start on SmolLM2 (torch.compile + CUDA graphs ~2.5 min,
    # GGUF dequantisation ~1 min; both cached on this machine for later starts).
    { lscpu | grep -E "Model name|^CPU\(s\)|Thread|NUMA node\(s\)"
      echo "bf16/AMX flags: $(grep -o 'amx[a-z_0-9]*\|avx512_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"
      free -g | head -2; df -h "$HOME" | tail -1; nvidia-smi --query-gpu=name,memory.total --format=csv
    } 2>&1 | tee "$RES/machine.txt"
    if [ -n "${1:-}" ]; then
      python3 -c "import logging, sys; logging.basicConfig(level=logging.INFO)
from ralmspec_vllm.retrieval.kb import default_index
from benchmarks.corpora import filler_corpus
print(filler_corpus(default_index(), int(sys.argv[1]))[1])" "$1" 2>&1 | grep -v "it/s\]" | tail -3
    fi
    python3 benchmarks/bench_latency.py --model smollm2-135m --backends bm25 --methods baseline \
      --questions-per-dataset 1 --datasets nq --warmup 0 --no-plot --out-dir /tmp/warm 2>&1 \
      | tee "$RES/warm.log" | grep -E "bench_latency|Error|error|Traceback|^\|" ;;
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import vllm, faiss, grpc, google.protobuf as p, torch; print("vllm", vllm.__version__, "faiss", faiss.__version__, "grpc", grpc.__version__, "protobuf", p.__version__, "torch", torch.__version__)'
    python3 -m pytest -q -m gpu tests/engine tests/retrieval -p no:cacheprovider 2>&1 | tail -15
    ;;
  retrieval)
    python3 benchmarks/bench_retrieval.py --sizes real,filler --filler 1000000 --cuda \
      --out-dir "$RES" "$@" 2>&1 | tee "$RES/retrieval.log" | grep -v "it/s\]" ;;
  latency)
    python3 benchmarks/bench_latency.py --model smollm2-135m --backends flat --filler 1000000 \
      --out-dir "$RES" "$@" 2>&1 | tee "$RES/latency.log" | grep -v "it/s\]" ;;
  bench)
    name=${1:?bench NAME SCRIPT [args]}; script=${2:?bench NAME SCRIPT [args]}; shift 2
    python3 "benchmarks/$script" --out-dir "$RES" "$@" 2>&1 | tee "$RES/$name.log" \
      | grep -v "it/s\]" | grep -E "bench_|Error|error|Traceback|^\|" ;;
  start)
    name=${1:?start NAME SCRIPT [args]}; script=${2:?start NAME SCRIPT [args]}; shift 2
    dir=$HOME/runs/$name; mkdir -p "$dir"
    if [[ $script == *.sh ]]; then  # a driver script (e.g. gpu/serving_paths.sh): OUTDIR first
      setsid nohup bash "benchmarks/$script" "$dir" "$@" >"$dir/log" 2>&1 </dev/null &
    else
      setsid nohup python3 "benchmarks/$script" --out-dir "$dir" "$@" >"$dir/log" 2>&1 </dev/null &
    fi
    echo $! >"$dir/pid"; echo "[start] $name: pid $(cat "$dir/pid"), log $dir/log" ;;
  follow)
    name=${1:?follow NAME [SECONDS]}; secs=${2:-540}; dir=$HOME/runs/$name
    pid=$(cat "$dir/pid"); end=$((SECONDS + secs))
    # Copy the results every minute too: a call cut short by the device budget still returns
    # what $RES holds, and bench_latency rewrites its JSON after every question.
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $end ]; do
      sleep 5; [ $((SECONDS % 60)) -lt 5 ] && cp -r "$dir/." "$RES/" && rm -f "$RES"/*.tmp
    done
    grep -v "it/s\]" "$dir/log" | grep -E "bench_|Error|error|Traceback|^\||budget" | tail -40
    tail -n 4 "$dir/log"; cp -r "$dir/." "$RES/"; rm -f "$RES"/*.tmp  # a JSON mid-rewrite
    if kill -0 "$pid" 2>/dev/null; then echo "[follow] $name: still running"
    else echo "[follow] $name: finished"; fi ;;
  save-cache)
    dirs=$(cd "$HOME" && ls -d .cache/vllm .cache/flashinfer .triton/cache .cache/torch/kernels \
      2>/dev/null || true)
    [ -n "$dirs" ] || { echo "no JIT cache under $HOME" >&2; exit 1; }
    tar -czf "$RES/jit_cache.tgz" -C "$HOME" $dirs && du -h "$RES/jit_cache.tgz" && echo $dirs ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac
