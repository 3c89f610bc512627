#!/usr/bin/env bash
# Large ipc messages (256 MiB, 1 GiB; 8 sends in flight at most): the rate at the default
# budgets (0) and at others, in bytes (BENCHMARKS.md, 2026-12-05). Needs one GPU.
#   OUT=/tmp/out bash benchmarks/ipc_depth.sh [ROUNDS [BUDGET...]]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
port=29611
rounds=${1:-2}; shift
budgets=("${@:-0 4294967296}")
for r in $(seq "$rounds"); do
  for bytes in 268435456 1073741824; do
    for inflight in ${budgets[@]}; do
      port=$((port + 1))
      IPC_STREAM_BYTES=$bytes IPC_STREAM_INFLIGHT=$inflight \
        timeout 60 python3 benchmarks/ipc_stream.py tput recv $port > "$OUT/recv.log" 2>&1 &
      rpid=$!
      IPC_STREAM_BYTES=$bytes IPC_STREAM_INFLIGHT=$inflight \
        timeout 60 python3 benchmarks/ipc_stream.py tput send $port 2 2>&1 \
        | sed "s/^/round $r, budgets ${inflight:-default} B: /"
      wait $rpid
      tail -1 "$OUT/recv.log"
    done
  done
done
