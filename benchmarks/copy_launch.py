"""What one copy launch and the other per-message CUDA calls of the ipc receiver cost, timed
alone (development probe; needs a GPU): the way to tell a cheaper binding from the cost a
call takes on inside a busy process.

A child process exports a 16 MiB buffer; this process maps it through CUDA IPC and times,
per call, copies out of it (and, for comparison, out of its own memory) through CuPy's
``cudaMemcpyAsync`` (kinds default and device to device) and the driver's
``cuMemcpyDtoDAsync``/``cuMemcpyAsync`` through ctypes, 16 MiB and 4 KiB, synchronising the
stream every 8 launches as a stream of messages would; then an event record, a stream
query, a 16 MiB ``torch.empty``.

    python benchmarks/copy_launch.py
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from aiokvpipe import _cudaipc  # noqa: E402

N = 16 << 20
DEFAULT, DEVICE_TO_DEVICE = 4, 3  # cudaMemcpyKind


def produce() -> None:
    x = torch.ones(N, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    info = _cudaipc.allocation_of(x.data_ptr())
    print(_cudaipc.export_memory(info.base).hex(), x.data_ptr() - info.base, flush=True)
    sys.stdin.readline()  # mapped and done: the buffer may go


def timed(name: str, fn: Callable[[], object], stream: torch.cuda.Stream, n: int = 4000,
          batch: int = 8) -> None:
    for _ in range(50):
        fn()
    stream.synchronize()
    total = 0.0
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
        if i % batch == batch - 1:
            stream.synchronize()
    stream.synchronize()
    print(f"{name:<44} {total / n * 1e6:7.2f} µs a call", flush=True)


def driver_copy(name: str) -> Callable[..., int]:
    fn = getattr(ctypes.CDLL("libcuda.so.1"), name)
    fn.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def main() -> None:
    child = subprocess.Popen([sys.executable, __file__, "produce"], stdout=subprocess.PIPE,
                             stdin=subprocess.PIPE, text=True)
    assert child.stdout is not None and child.stdin is not None
    handle, offset = child.stdout.readline().split()
    dev = torch.device("cuda:0")
    torch.cuda.set_device(dev)
    base = _cudaipc.open_memory(bytes.fromhex(handle), 0)
    try:
        src = base + int(offset)
        local = torch.ones(N, dtype=torch.uint8, device=dev)
        dst = torch.empty(N, dtype=torch.uint8, device=dev).data_ptr()
        stream = torch.cuda.Stream(dev)
        h = stream.cuda_stream
        rt = _cudaipc.runtime()
        dtod, anycopy = driver_copy("cuMemcpyDtoDAsync_v2"), driver_copy("cuMemcpyAsync")
        for n, size in ((N, "16 MiB"), (4096, "4 KiB")):
            timed(f"cudaMemcpyAsync default, IPC, {size}",
                  lambda: rt.memcpyAsync(dst, src, n, DEFAULT, h), stream)
            timed(f"cudaMemcpyAsync device to device, IPC, {size}",
                  lambda: rt.memcpyAsync(dst, src, n, DEVICE_TO_DEVICE, h), stream)
            timed(f"cuMemcpyDtoDAsync (ctypes), IPC, {size}", lambda: dtod(dst, src, n, h),
                  stream)
            timed(f"cuMemcpyAsync (ctypes), IPC, {size}", lambda: anycopy(dst, src, n, h),
                  stream)
            timed(f"cudaMemcpyAsync default, local, {size}",
                  lambda: rt.memcpyAsync(dst, local.data_ptr(), n, DEFAULT, h), stream)
        event = torch.cuda.Event()
        timed("Event.record", lambda: event.record(stream), stream)
        timed("Stream.query", torch.cuda.current_stream(dev).query, stream)
        timed("torch.empty, 16 MiB", lambda: torch.empty(N, dtype=torch.uint8, device=dev),
              stream)
    finally:
        child.stdin.write("done\n")
        child.stdin.flush()
        child.wait(30)
        _cudaipc.close_memory(base)


if __name__ == "__main__":
    produce() if sys.argv[1:] == ["produce"] else main()
