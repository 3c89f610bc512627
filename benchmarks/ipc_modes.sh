#!/usr/bin/env bash
# The ipc plane's two modes against each other (issue 12: a staging ring or the caching
# allocator's segments, chosen by measuring both): 16 MiB and 256 MiB streams (8 sends in
# flight) and 4 KiB ping-pongs, each mode in turn, ROUNDS times. Needs one GPU.
#   OUT=/tmp/out bash benchmarks/ipc_modes.sh [ROUNDS]
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
port=29651
one() {  # one PLANE_MODE tput|lat BYTES
  port=$((port + 1))
  local log="$OUT/recv-$1-$2-$3.log"
  IPC_STREAM_MODE=$1 IPC_STREAM_BYTES=$3 timeout 60 "$PY" benchmarks/ipc_stream.py "$2" recv \
    $port > "$log" 2>&1 &
  local rpid=$!
  IPC_STREAM_MODE=$1 IPC_STREAM_BYTES=$3 timeout 60 "$PY" benchmarks/ipc_stream.py "$2" send \
    $port 1.5 2>&1 | sed "s/^/$1: /"
  wait $rpid
  tail -1 "$log" | sed "s/^/$1: /"
}
for r in $(seq "${1:-2}"); do
  for mode in segments ring; do
    one $mode tput 16777216
    one $mode tput 268435456
    one $mode lat 4096
  done
done
