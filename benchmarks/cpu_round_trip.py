"""The CPU a round trip costs, in one process (both ends together), on a machine without a
GPU: what the 4 KiB one-way target leaves the library's Python (BENCHMARKS.md, 2026-12-05
06:19). A development probe, not the bench.

    python benchmarks/cpu_round_trip.py floor|none|inline [ROUND_TRIPS]

- ``floor``: a bare uvloop ping-pong of two 32-byte frames over a socketpair, no library;
- ``none``: our pipe over tcp on 127.0.0.1, ``None`` answered by ``None``;
- ``inline``: the same, a 4 KiB CPU tensor (inline in its header) answered by ``None``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvloop  # noqa: E402

import aiokvpipe  # noqa: E402

WARM = 300


class _Frames(asyncio.Protocol):
    """Each read handed to whoever waits for it, or kept until someone does."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[bytes] | None = None
        self.kept: deque[bytes] = deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(data)
        else:
            self.kept.append(data)

    def next(self) -> asyncio.Future[bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        if self.kept:
            self.waiter.set_result(self.kept.popleft())
        return self.waiter


async def floor(n: int) -> float:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    _, pa = await loop.create_connection(_Frames, sock=a)
    _, pb = await loop.create_connection(_Frames, sock=b)
    frame = struct.Struct("<QQQQ")

    async def echo() -> None:
        for i in range(n + WARM):
            await pb.next()
            assert pb.transport is not None
            pb.transport.write(frame.pack(i, 0, 0, 0))

    answering = asyncio.ensure_future(echo())
    for i in range(n + WARM):
        if i == WARM:
            t0 = time.process_time()
        got = pa.next()
        assert pa.transport is not None
        pa.transport.write(frame.pack(i, 0, 0, 0))
        await got
    spent = time.process_time() - t0
    await answering
    return spent / n


async def pipe(n: int, payload: torch.Tensor | None) -> float:
    listener = await aiokvpipe.listen("127.0.0.1", 0)
    accepting = asyncio.ensure_future(listener.accept())
    a = await aiokvpipe.connect("127.0.0.1", listener.port)
    b = await accepting

    async def echo() -> None:
        for _ in range(n + WARM):
            await b.recv()
            await b.send(None, "pong")

    answering = asyncio.ensure_future(echo())
    for i in range(n + WARM):
        if i == WARM:
            t0 = time.process_time()
        await a.send(payload)
        await a.recv("pong")
    spent = time.process_time() - t0
    await answering
    for end in (a, b, listener):
        await end.aclose()
    return spent / n


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "none"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 3000
    if mode == "floor":
        run = floor(n)
    elif mode in ("none", "inline"):
        run = pipe(n, torch.zeros(4096, dtype=torch.uint8) if mode == "inline" else None)
    else:
        sys.exit(f"unknown mode {mode!r}: floor, none or inline")
    print(f"{mode}: CPU µs a round trip, both ends: {uvloop.run(run) * 1e6:.1f}")


if __name__ == "__main__":
    main()
