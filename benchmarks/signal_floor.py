"""What a second signalling socket costs per message (development probe, no GPU).

The ipc plane's messages travelled as the pipe's header on the control connection and a COPY
record on the plane's own socket, which also carried the acknowledgements back (until they
moved onto the control connection, as SIGNAL frames, after this probe). This probe
moves nothing but that signalling between two processes on uvloop, in the two shapes:

- one socket: a 16-byte header that says everything; acknowledgements come back on it;
- two sockets: an 8-byte header on one and a 16-byte record on the other, written one after
  the other as the pipe does; the receiver pairs them; acknowledgements on the second.

The receiver hands each message to a task awaiting it (a ``recv()``) and acknowledges once
per read; 8 sends are in flight for throughput, one for latency.

    python benchmarks/signal_floor.py [--seconds 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("<QQ")  # one socket: size and where the payload lies
SHORT = struct.Struct("<Q")  # two sockets: the header (size); acknowledgements
DEPTH = 8


class Words(asyncio.Protocol):
    """A connection of fixed-size words: ``on(word)`` for each, ``on(None)`` after a read."""

    def __init__(self, size: int, on: Callable[[bytes | None], None]) -> None:
        self.size, self.on, self.buf = size, on, bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos, size = 0, self.size
        while len(self.buf) - pos >= size:
            self.on(bytes(self.buf[pos:pos + size]))
            pos += size
        del self.buf[:pos]
        self.on(None)


async def receiver(split: bool, port: int) -> None:
    loop = asyncio.get_running_loop()
    sizes: deque[int] = deque()
    records: deque[bytes] = deque()
    waiters: deque[asyncio.Future[None]] = deque()
    done: asyncio.Future[None] = loop.create_future()
    acks = 0
    ack_to: Any = None

    def deliver() -> None:
        nonlocal acks
        while sizes and (records or not split):
            n = sizes.popleft()
            if split:
                records.popleft()
            if n == 0:
                done.set_result(None)
                return
            acks += 1
            if waiters:
                waiters.popleft().set_result(None)
        if acks:
            ack_to.write(SHORT.pack(acks))
            acks = 0

    def on_header(word: bytes | None) -> None:
        if word is None:
            deliver()
        else:
            sizes.append((SHORT if split else HEADER).unpack(word)[0])

    def on_record(word: bytes | None) -> None:
        if word is None:
            deliver()
        else:
            records.append(word)

    async def recv_forever() -> None:
        while True:
            fut = loop.create_future()
            waiters.append(fut)
            await fut

    task = asyncio.ensure_future(recv_forever())
    head, _ = await loop.create_connection(
        lambda: Words(SHORT.size if split else HEADER.size, on_header), "127.0.0.1", port)
    ack_to = head
    if split:
        ack_to, _ = await loop.create_connection(
            lambda: Words(HEADER.size, on_record), "127.0.0.1", port)
    await done
    task.cancel()


async def sender(split: bool, seconds: float) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    pending: deque[asyncio.Future[None]] = deque()
    conns: list[Words] = []

    def on_ack(word: bytes | None) -> None:
        if word is not None:
            for _ in range(SHORT.unpack(word)[0]):
                pending.popleft().set_result(None)

    def accept() -> Words:
        conns.append(Words(SHORT.size, on_ack))
        return conns[-1]

    server = await loop.create_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--receiver", str(int(split)), str(port)])
    try:
        deadline = time.monotonic() + 30
        while len(conns) < (2 if split else 1) or not all(hasattr(c, "transport")
                                                          for c in conns):
            assert time.monotonic() < deadline, "the receiver did not connect"
            await asyncio.sleep(0.01)
        head = conns[0].transport  # connected first (the receiver awaits each in turn)
        side = conns[1].transport if split else None

        def send(n: int) -> asyncio.Future[None]:
            fut = loop.create_future()
            pending.append(fut)
            if side is not None:
                side.write(HEADER.pack(0, n))  # the record first, as the ipc plane
                head.write(SHORT.pack(n))
            else:
                head.write(HEADER.pack(n, 0))
            return fut

        for _ in range(200):
            await send(1)
        count, end = 0, time.perf_counter() + seconds

        async def stream() -> None:
            nonlocal count
            while time.perf_counter() < end:
                await send(1)
                count += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(stream() for _ in range(DEPTH)))
        rate = count / (time.perf_counter() - t0)
        rtts, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            t1 = time.perf_counter()
            await send(1)
            rtts.append(time.perf_counter() - t1)
        rtts.sort()
        send(0)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
    return rate, rtts[len(rtts) // 2] / 2 * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--receiver", nargs=2)
    args = ap.parse_args()
    import uvloop

    if args.receiver:
        uvloop.run(receiver(args.receiver[0] == "1", int(args.receiver[1])))
        return
    print(f"{'shape':<12} {'k msg/s':>8} {'one-way p50 µs':>15}")
    for _ in range(args.repeat):
        for split in (False, True):
            rate, p50 = uvloop.run(sender(split, args.seconds))
            print(f"{'two sockets' if split else 'one socket':<12} {rate / 1e3:>8.1f} "
                  f"{p50:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
