"""The floor of an asyncio pipe of CUDA IPC copies in Python on this host (development probe).

Two processes on cuda:0 and one TCP socket, with nothing of a protocol but an 8-byte header:
the producer exports one buffer once and the consumer maps it once. Per message the producer
writes the header; the consumer allocates the message's tensor, copies it out of the mapped
buffer on its own stream, records an event and polls it from the loop, hands the tensor to a
task awaiting it (a ``recv()``), and acknowledges: the producer's send completes on the ack.

- ``loop``: that, on uvloop; 8 sends in flight for throughput, one at a time for latency (the
  consumer's task answers once it has the tensor, as the bench's ``lat1``).
- ``raw``: the bench's baseline in the same run: blocking code, one message at a time, the
  consumer synchronising its stream before it answers.

Whatever a pipe adds (keys, credits, ordering, failure handling, several tensors a message),
it cannot beat ``loop``: if ``loop`` misses a target against ``raw``, so must any pipe built
this way, on this host.

    python benchmarks/ipc_floor.py [--sizes 4K,16M] [--seconds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from aiokvpipe import _cudaipc  # noqa: E402

U64 = struct.Struct("<Q")
HELLO = struct.Struct("<Q64s")  # offset of the buffer in its allocation, handle
DEPTH = 8
DEV = torch.device("cuda", 0)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


# -- consumer (child process) --------------------------------------------------------------------


class Words(asyncio.Protocol):
    """A connection carrying 8-byte words: ``word`` is called for each, ``words_done`` after
    each read."""

    buf = bytearray()

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        while len(self.buf) - pos >= 8:
            self.word(U64.unpack_from(self.buf, pos)[0])
            pos += 8
        del self.buf[:pos]
        self.words_done()

    def word(self, value: int) -> None:
        raise NotImplementedError

    def words_done(self) -> None:
        pass


class Consumer(Words):
    def __init__(self, base: int, stream: torch.cuda.Stream, answer_from_task: bool) -> None:
        self.base, self.stream, self.handle = base, stream, stream.cuda_stream
        self.answer_from_task = answer_from_task
        self.copying: deque[tuple[torch.cuda.Event, torch.Tensor]] = deque()
        self.events: list[torch.cuda.Event] = []
        self.waiters: deque[asyncio.Future[torch.Tensor]] = deque()
        self.ready: deque[torch.Tensor] = deque()
        self.polling = False
        self.done = asyncio.get_running_loop().create_future()
        self.loop = asyncio.get_running_loop()

    def word(self, n: int) -> None:
        if n == 0:
            self.done.set_result(None)
            return
        t = torch.empty(n, dtype=torch.uint8, device=DEV)  # the idle current stream's
        _cudaipc.copy_async(t.data_ptr(), self.base, n, self.handle)
        ev = self.events.pop() if self.events else torch.cuda.Event()
        ev.record(self.stream)
        self.copying.append((ev, t))

    def words_done(self) -> None:
        if self.copying and not self.polling:
            self.polling = True
            self.loop.call_soon(self.poll)

    def poll(self) -> None:
        acks = 0
        while self.copying and self.copying[0][0].query():
            ev, t = self.copying.popleft()
            self.events.append(ev)
            acks += 1
            if self.waiters:
                self.waiters.popleft().set_result(t)
            else:
                self.ready.append(t)
        if acks and not self.answer_from_task:
            self.transport.write(U64.pack(acks))
        if self.copying:
            self.loop.call_soon(self.poll)
        else:
            self.polling = False

    async def recv(self) -> torch.Tensor:
        if self.ready:
            return self.ready.popleft()
        fut: asyncio.Future[torch.Tensor] = self.loop.create_future()
        self.waiters.append(fut)
        return await fut


async def consume(sock: socket.socket, base: int, mode: int) -> None:
    loop = asyncio.get_running_loop()
    stream = torch.cuda.Stream(DEV)
    _, proto = await loop.connect_accepted_socket(
        lambda: Consumer(base, stream, mode == 1), sock)
    assert isinstance(proto, Consumer)

    async def drain() -> None:
        while True:
            t = await proto.recv()
            if proto.answer_from_task:
                proto.transport.write(U64.pack(1))
            del t

    task = asyncio.ensure_future(drain())
    await proto.done
    task.cancel()


def consume_raw(sock: socket.socket, base: int) -> None:
    stream = torch.cuda.Stream(DEV)
    while True:
        (n,) = U64.unpack(sock.recv(8, socket.MSG_WAITALL))
        if n == 0:
            return
        t = torch.empty(n, dtype=torch.uint8, device=DEV)
        _cudaipc.copy_async(t.data_ptr(), base, n, stream.cuda_stream)
        stream.synchronize()
        sock.sendall(U64.pack(1))


def child(port: int, kind: str) -> None:
    torch.cuda.set_device(DEV)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    offset, handle = HELLO.unpack(sock.recv(HELLO.size, socket.MSG_WAITALL))
    base = _cudaipc.open_memory(handle, 0) + offset
    sock.sendall(b"m")
    if kind == "raw":
        consume_raw(sock, base)
    else:
        import uvloop
        (mode,) = U64.unpack(sock.recv(8, socket.MSG_WAITALL))  # 1: answers from the task
        sock.setblocking(False)
        uvloop.run(consume(sock, base, mode))


# -- producer (parent) ---------------------------------------------------------------------------


class Producer(Words):
    def __init__(self) -> None:
        self.pending: deque[asyncio.Future[None]] = deque()

    def word(self, acks: int) -> None:
        for _ in range(acks):
            self.pending.popleft().set_result(None)

    def send(self, n: int) -> asyncio.Future[None]:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append(fut)
        self.transport.write(U64.pack(n))
        return fut


async def produce(sock: socket.socket, sizes: list[int], seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    sock.sendall(U64.pack(0))  # mode: acks from the poll (throughput)
    sock.setblocking(False)
    _, proto = await loop.connect_accepted_socket(Producer, sock)
    assert isinstance(proto, Producer)
    out = {}
    for n in sizes:
        count = 0
        deadline = time.perf_counter() + seconds

        async def sender() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await proto.send(n)
                count += 1

        for _ in range(20):
            await proto.send(n)
        t0 = time.perf_counter()
        await asyncio.gather(*(sender() for _ in range(DEPTH)))
        out[f"tput {n}"] = count * n / (time.perf_counter() - t0) / 1e9
    proto.transport.write(U64.pack(0))
    return out


async def produce_lat(sock: socket.socket, n: int, seconds: float) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    sock.sendall(U64.pack(1))  # mode: answers from the receiving task (lat1)
    sock.setblocking(False)
    _, proto = await loop.connect_accepted_socket(Producer, sock)
    assert isinstance(proto, Producer)
    for _ in range(200):
        await proto.send(n)
    rtts = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        await proto.send(n)
        rtts.append(time.perf_counter() - t0)
    proto.transport.write(U64.pack(0))
    rtts.sort()
    return {f"lat {n} p50 us": rtts[len(rtts) // 2] / 2 * 1e6}


def produce_raw(sock: socket.socket, sizes: list[int], seconds: float) -> dict[str, float]:
    out = {}
    for n in sizes:
        rtts = []
        deadline = time.perf_counter() + seconds
        for _ in range(20):
            sock.sendall(U64.pack(n))
            sock.recv(8, socket.MSG_WAITALL)
        t0 = time.perf_counter()
        while (t1 := time.perf_counter()) < deadline:
            sock.sendall(U64.pack(n))
            sock.recv(8, socket.MSG_WAITALL)
            rtts.append(time.perf_counter() - t1)
        out[f"tput {n}"] = len(rtts) * n / (time.perf_counter() - t0) / 1e9
        rtts.sort()
        out[f"lat {n} p50 us"] = rtts[len(rtts) // 2] / 2 * 1e6
    sock.sendall(U64.pack(0))
    return out


def run(kind: str, sizes: list[int], seconds: float) -> dict[str, float]:
    buf = torch.ones(max(sizes), dtype=torch.uint8, device=DEV)
    torch.cuda.synchronize()
    info = _cudaipc.allocation_of(buf.data_ptr())
    results: dict[str, float] = {}
    phases = [("raw", None)] if kind == "raw" else [("tput", None)] + [
        ("lat", n) for n in sizes if n <= 1 << 20]
    for phase, n in phases:
        with socket.create_server(("127.0.0.1", 0)) as server:
            proc = subprocess.Popen([sys.executable, __file__, "--child",
                                     str(server.getsockname()[1]), kind])
            server.settimeout(60)
            sock, _ = server.accept()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(HELLO.pack(buf.data_ptr() - info.base, _cudaipc.export_memory(info.base)))
            assert sock.recv(1, socket.MSG_WAITALL) == b"m"
            if phase == "raw":
                results.update(produce_raw(sock, sizes, seconds))
            else:
                import uvloop
                coro = (produce(sock, sizes, seconds) if phase == "tput"
                        else produce_lat(sock, int(n or 0), seconds))
                results.update(uvloop.run(coro))
        finally:
            proc.wait(60)
            sock.close()
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4K,16M")
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--child", nargs=2)
    args = ap.parse_args()
    if args.child:
        child(int(args.child[0]), args.child[1])
        return
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    rows: dict[str, list[tuple[float, float]]] = {}
    for _ in range(args.repeat):
        raw, floor = run("raw", sizes, args.seconds), run("loop", sizes, args.seconds)
        for k in floor:
            rows.setdefault(k, []).append((floor[k], raw[k]))
    print(f"{'figure':<22} {'asyncio floor':>14} {'raw':>10} {'floor/raw':>10}")
    for k, pairs in rows.items():
        for f, r in pairs:
            unit = "GB/s" if k.startswith("tput") else ""
            print(f"{k + ' ' + unit:<22} {f:>14.3g} {r:>10.3g} {f / r:>10.2f}")


if __name__ == "__main__":
    main()
