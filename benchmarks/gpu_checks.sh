#!/usr/bin/env bash
# The CUDA checks of one session on a one-GPU machine, in one go: the CUDA tests, then the
# benchmarks that need a GPU. Logs and JSON go to $OUT (default ./gpu-out); a summary last.
#   OUT=/tmp/out bash benchmarks/gpu_checks.sh [quick|tests|bench|slow]
# quick: without the slow extras; tests, bench, slow: only those parts (each fits in one
# 10-minute device call).
# Run from the checkout's root, with the pytest-asyncio wheel in .whl/ if the image lacks it.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
part=${1:-all}
case $part in all|quick|tests|bench|slow) ;; *) echo "unknown part: $part" >&2; exit 2 ;; esac
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
# The device image lacks pytest-asyncio: install the wheels carried in .whl/ (pip of this
# python, no index), and import aiokvpipe from this checkout.
[ -d .whl ] && "$PY" -m pip install -q --no-deps --no-index .whl/*.whl > "$OUT/pip.log" 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
summary=()
step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("$(printf '%-14s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" \
    "$(grep -E '[0-9]+ (passed|failed)' "$OUT/$name.log" | tail -1)")")
}
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader > "$OUT/gpu.txt"
want() { [ "$part" = all ] || [ "$part" = "$1" ] || { [ "$part" = quick ] && [ "$1" != slow ]; }; }
want tests && step cuda-tests 380 "$PY" -m pytest -q -p no:cacheprovider --durations=12 -m "(cuda or nccl) and not slow" \
  tests/test_cuda_nccl.py tests/test_pipe_cuda_tcp.py tests/test_planes_cuda.py \
  tests/test_ipc_cuda.py tests/test_pipe_ipc.py tests/test_pipe_blocks_cuda.py \
  tests/test_blocks.py tests/test_blocks_move.py
want tests && step lifecycle 60 "$PY" benchmarks/lifecycle_lag.py --pipes 2 --json "$OUT/lifecycle.json"
want bench && step bench-ipc 120 "$PY" -m aiokvpipe bench --device cuda --quick --seconds 0.3 \
  --json "$OUT/bench-ipc.json"
want bench && step bench-blocks 150 "$PY" -m aiokvpipe bench --blocks --device cuda --one-gpu --repeat 1 \
  --seconds 1 --json "$OUT/bench-blocks.json"
if want slow; then  # the slow extras (about 5 minutes more)
  step ctx-probe 60 "$PY" benchmarks/ctx_probe.py
  step blocks-probe 120 "$PY" benchmarks/blocks_probe.py
  step kill-trials 300 "$PY" -m pytest -q -p no:cacheprovider -m slow tests/test_pipe_ipc.py \
    -k kill_trials
fi
cat "$OUT/gpu.txt"
printf '%s\n' "${summary[@]}"
tail -6 "$OUT/lifecycle.log" 2>/dev/null
grep -sE "one-way p50|throughput|loop lag|memory|^(tcp|nccl|ipc) " "$OUT/bench-ipc.log" | head -16
grep -sE "^(nccl|tcp|ipc) " "$OUT/bench-blocks.log"
grep -sE "round trip" "$OUT/ctx-probe.log"
grep -sE "in flight|baseline" "$OUT/blocks-probe.log"
