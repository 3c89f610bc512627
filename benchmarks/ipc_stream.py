"""One ipc pipe between two processes on cuda:0, nothing else in them: a stream of 16 MiB
messages (8 sends in flight) or 4 KiB ping-pongs answered without payload, for sampling
profilers (development probe; ``python -m aiokvpipe bench`` is the benchmark). In a stream
each end prints the CPU time it spent per message (``time.process_time``, all its threads): in a
stream, a figure steadier than the rate on a shared host, and the bound on it when an end
is busy all the time.

    python benchmarks/ipc_stream.py tput|lat recv PORT &
    python benchmarks/ipc_stream.py tput|lat send PORT SECONDS

Wrap either in ``py-spy record --nonblocking --format raw -o FILE --``. ``IPC_STREAM_GC=freeze``
freezes the collector's objects after start-up; ``IPC_STREAM_TURN=N`` sets the pipe's turn
budget (frames handled per loop iteration); ``IPC_STREAM_BYTES=N``, the streamed message's
size (16 MiB); ``IPC_STREAM_DEPTH=N``, the sends in flight (8); ``IPC_STREAM_INFLIGHT=N``,
both ends' ``max_inflight_bytes`` (and ``recv_buffer_bytes``, 1 MiB more for the headers);
``IPC_STREAM_BATCH=N``, the receiver's bytes of copies awaited together at most
(``_ipc_plane._BATCH_BYTES``, 64 MiB); ``IPC_STREAM_MODE=ring`` (or ``segments``, the
default), the mode of both planes: ``ring`` stages every tensor through the sender's staging
ring (two copies) instead of letting the receiver copy out of the allocator's segments.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvloop  # noqa: E402

import aiokvpipe  # noqa: E402
from aiokvpipe import _ipc_plane, _pipe  # noqa: E402

WARM_UP = 50  # messages sent before anything is timed
DEPTH = int(os.environ.get("IPC_STREAM_DEPTH", 8))  # sends in flight in a stream
_INFLIGHT = int(os.environ.get("IPC_STREAM_INFLIGHT", 0))
OPTS = ({"max_inflight_bytes": _INFLIGHT, "recv_buffer_bytes": _INFLIGHT + (1 << 20)}
        if _INFLIGHT else {})


async def receive(mode: str, port: int) -> None:
    listener = await aiokvpipe.listen("127.0.0.1", port, device="cuda:0", transport="ipc",
                                      **OPTS)
    pipe = await listener.accept()
    count, cpu0 = -WARM_UP, 0.0  # counted from the end of the sender's warm-up
    while (await pipe.recv()) is not None:
        count += 1
        if count == 0:
            cpu0 = time.process_time()
        if mode == "lat":
            await pipe.send(None, "pong")
    if count > 0:
        print(f"receiver: {(time.process_time() - cpu0) / count * 1e6:.1f} µs CPU a message "
              f"({count} messages)", flush=True)
    await pipe.aclose()
    await listener.aclose()


async def send(mode: str, port: int, seconds: float) -> None:
    pipe = await aiokvpipe.connect("127.0.0.1", port, device="cuda:0", transport="ipc",
                                   connect_timeout=60, **OPTS)
    n = int(os.environ.get("IPC_STREAM_BYTES", 16 << 20)) if mode == "tput" else 4096
    x = torch.zeros(n, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    for _ in range(WARM_UP):
        await pipe.send(x)
        if mode == "lat":
            await pipe.recv("pong")
    end = time.perf_counter() + seconds
    cpu0 = time.process_time()
    if mode == "tput":
        count = 0

        async def one() -> None:
            nonlocal count
            while time.perf_counter() < end:
                await pipe.send(x)
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(DEPTH)))
        dt, count = time.perf_counter() - t0, max(count, 1)
        print(f"{n} B: {count * n / dt / 1e9:.1f} GB/s, {dt / count * 1e6:.1f} µs a message "
              f"({count} messages); sender: "
              f"{(time.process_time() - cpu0) / count * 1e6:.1f} µs CPU a message", flush=True)
    else:
        rts = []
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            await pipe.send(x)
            await pipe.recv("pong")
            rts.append(time.perf_counter() - t0)
        rts.sort()
        print(f"4 KiB one way p50 {rts[len(rts) // 2] / 2e-6:.1f} µs", flush=True)
    plane = pipe._plane.stats  # what the mode did: a ring in use, regions exported
    print(f"sender's plane: {plane['mode']}, ring {plane['ring_bytes']} B, "
          f"{plane['exported_regions']} regions exported", flush=True)
    await pipe.send(None)
    await pipe.aclose()


def _force_plane_mode(plane_mode: str) -> None:
    """Start every ipc plane of this process in ``plane_mode``: the pipe starts them with
    the default of ``IpcPlane.start``'s ``mode`` (segments), which this changes."""
    start: Any = _ipc_plane.IpcPlane.start
    start.__func__.__kwdefaults__["mode"] = plane_mode


def main() -> None:
    mode, role, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.cuda.set_device(0)
    if os.environ.get("IPC_STREAM_TURN"):
        _pipe.TURN_BUDGET = int(os.environ["IPC_STREAM_TURN"])  # type: ignore[misc]
    if os.environ.get("IPC_STREAM_BATCH"):
        _ipc_plane._BATCH_BYTES = int(os.environ["IPC_STREAM_BATCH"])  # type: ignore[misc]
    if os.environ.get("IPC_STREAM_MODE"):
        _force_plane_mode(os.environ["IPC_STREAM_MODE"])
    if os.environ.get("IPC_STREAM_GC") == "freeze":
        gc.collect()
        gc.freeze()
    if role == "recv":
        uvloop.run(receive(mode, port))
    else:
        uvloop.run(send(mode, port, float(sys.argv[4])))


if __name__ == "__main__":
    main()
