"""``python -m aiokvpipe bench``: our pipe beside its baselines, between two local processes.

How it runs. The command (the *coordinator*) starts two copies of itself with the hidden
``--role sender|receiver`` option and drives them with JSON lines over their stdin and stdout
(never pickle). Each *case* is one connection of one implementation -- ours or a baseline --
between the two, running a list of *phases* (throughput at one size, latency at one size...).
The receiver goes first: it listens and announces a rendezvous (a port, or an NCCL unique id)
that the coordinator hands to the sender. Cases of all implementations are interleaved within
each repeat, so drifting noise on a shared machine hits them alike; figures are medians over
the repeats.

What a phase measures, each on one process's own clock (no cross-process timestamps):

* throughput: the sender streams one tensor per message, with several sends in flight, for the
  phase's seconds, then an end marker; its clock stops when the receiver acknowledges the
  marker. GB/s = payload bytes / that time. An untimed warm-up round of the same kind first.
* latency: ping-pong of one message; the one-way figure is the round trip halved.
* event-loop lag: how late a 1 ms ticker task wakes up, on each side, during timed throughput.
* CPU: each process's CPU seconds during timed throughput, per GB moved.

CPU baselines (BENCHMARKS.md): naive asyncio streams, on asyncio's loop and on uvloop, and the
zero-copy "ceiling" (a ``BufferedProtocol`` receiving into preallocated memory, the sender
``loop.sock_sendall`` of memoryviews, a 1-byte ack per message). The GPU bench
(:mod:`aiokvpipe._bench_gpu`) reuses this machinery with raw NCCL as its baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import socket
import statistics
import struct
import sys
import tempfile
import textwrap
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import IO, Any, Final, Protocol

import torch

Json = dict[str, Any]

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

CPU_SIZES: Final = "4K,1M,16M,64M"
#: Latency is measured at the benchmarked sizes up to this one.
LAT_MAX_NBYTES: Final = 1 * MiB
#: Sends kept in flight while streaming: concurrent sender tasks for ours, the ack window for
#: the ceiling (naive streams pipeline through their write buffer instead).
DEPTH: Final = 8
TICK_S: Final = 1e-3
#: Bounds on the samples one phase keeps (a ticker at 1 ms fills this in 200 s).
MAX_SAMPLES: Final = 200_000
MIN_LAT_SAMPLES: Final = 50
#: Seconds a child may take to start (importing torch, CUDA set-up) and to say hello.
START_TIMEOUT_S: Final = 120.0
#: Seconds to wait for a child to exit after being asked, then after SIGTERM.
STOP_TIMEOUT_S: Final = 5.0

IMPL_LABELS: Final = {
    "ours": "ours",
    "streams-asyncio": "asyncio streams",
    "streams-uvloop": "uvloop streams",
    "ceiling": "ceiling",
    "nccl-raw": "raw NCCL",
}


# -- sizes and statistics ---------------------------------------------------------------------

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"4K"`` → 4096, ``"1M"``/``"1MiB"`` → 1048576, ``"512"`` → 512 (binary units)."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 4K, 1M, 64M, 1G)")
    n = int(float(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[m.group(2).upper()])
    if not 1 <= n <= 8 * GiB:
        raise ValueError(f"size {text!r} is outside 1 B .. 8 GiB")
    return n


def parse_sizes(text: str) -> list[int]:
    return sorted({parse_size(part) for part in text.split(",") if part.strip()})


def format_size(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else None


# -- what each measured process runs ----------------------------------------------------------


class LagProbe:
    """A ticker task that sleeps 1 ms at a time and records how late it wakes up.

    Lag includes the loop's own timer granularity (about 1 ms on uvloop), so compare it with a
    baseline's on the same loop rather than with zero.
    """

    def __init__(self) -> None:
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while len(self._lags) < MAX_SAMPLES:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self._lags.append(time.perf_counter() - t0 - TICK_S)

    async def stop(self) -> Json:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        return {"lag_p50_ms": percentile(self._lags, 50) * 1e3,
                "lag_p99_ms": percentile(self._lags, 99) * 1e3,
                "lag_max_ms": max(self._lags, default=float("nan")) * 1e3,
                "lag_ticks": len(self._lags)}


async def measured(fn: Callable[[], Awaitable[int]]) -> Json:
    """Run ``fn`` (which returns a message count) under the lag probe and the CPU clock."""
    probe = LagProbe()
    probe.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        msgs = await fn()
    finally:
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        lag = await probe.stop()
    return {"msgs": msgs, "elapsed_s": elapsed, "cpu_s": cpu, **lag}


class Endpoint(Protocol):
    """One end of one benchmarked connection. Senders stream and ping; receivers drain and echo.

    Every round ends with an end marker from the sender that the receiver acknowledges, so a
    round's time on the sender's clock covers every byte's arrival.
    """

    async def prepare(self, phase: Json) -> None:
        """Make the payload of the following rounds (``nbytes``, or a bundle)."""

    async def stream(self, seconds: float, min_msgs: int) -> int:
        """Send for ``seconds`` and at least ``min_msgs`` messages; end; await the ack.
        Returns the messages sent."""

    async def ping(self) -> None:
        """One message there and back."""

    async def end_echo(self) -> None:
        """End a ping-pong round."""

    async def drain(self) -> int:
        """Receive until the end marker, acknowledge it; returns the messages received."""

    async def echo(self) -> int:
        """Send each message back until the end marker, acknowledge it."""

    async def aclose(self) -> None: ...


# The baselines' framing: an 8-byte header, kind in the top byte, payload length below.
_HEADER: Final = struct.Struct("<Q")
_DATA, _ECHO, _END = 0, 1, 2
_ACK: Final = b"\x01"


def _header(kind: int, n: int) -> bytes:
    return _HEADER.pack(kind << 56 | n)


def _split_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    (word,) = _HEADER.unpack(data)
    return word >> 56, word & ((1 << 56) - 1)


def _phase_nbytes(phase: Json) -> int:
    return int(phase["nbytes"])


class _Rounds:
    """Round ends seen by a callback-driven receiver, awaited in order by the phase code."""

    def __init__(self) -> None:
        self._counts: deque[int] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None

    def complete(self, count: int) -> None:
        self._counts.append(count)
        self._wake()

    def fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def next(self) -> int:
        while not self._counts:
            if self._error is not None:
                raise ConnectionError("the benchmark connection ended") from self._error
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._counts.popleft()


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ours ------------------------------------------------------------------------------------------


class OursEndpoint:
    """Our pipe. Receivers get new tensors per message, as an application would."""

    def __init__(self, pipe: Any, device: str, depth: int) -> None:
        self.pipe = pipe
        self._device = device
        self._depth = depth
        self._msg: Any = None

    @staticmethod
    async def listen(case: Json, device: str) -> tuple[Any, Callable[[], Awaitable[Endpoint]]]:
        import aiokvpipe

        listener = await aiokvpipe.listen("127.0.0.1", 0, device=device,
                                          transport=case["transport"])

        async def accept() -> Endpoint:
            try:
                pipe = await listener.accept()
            finally:
                await listener.aclose()
            return OursEndpoint(pipe, device, case["depth"])

        return listener.port, accept

    @staticmethod
    async def connect(case: Json, device: str, port: Any) -> Endpoint:
        import aiokvpipe

        pipe = await aiokvpipe.connect("127.0.0.1", int(port), device=device,
                                       transport=case["transport"], connect_timeout=30.0)
        return OursEndpoint(pipe, device, case["depth"])

    async def prepare(self, phase: Json) -> None:
        layers = phase.get("layers")
        if layers:  # a KV bundle: K and V of each layer, one dict message
            n = int(phase["tensor_bytes"])
            self._msg = {f"{kv}{i}": self._tensor(n) for i in range(layers) for kv in "kv"}
        else:
            self._msg = self._tensor(_phase_nbytes(phase))

    def _tensor(self, nbytes: int) -> torch.Tensor:
        return torch.zeros(nbytes, dtype=torch.uint8, device=self._device)

    async def stream(self, seconds: float, min_msgs: int) -> int:
        pipe, msg = self.pipe, self._msg
        deadline, sent = time.perf_counter() + seconds, 0

        async def one_sender() -> None:
            nonlocal sent
            while sent < min_msgs or time.perf_counter() < deadline:
                sent += 1
                await pipe.send(msg)

        await asyncio.gather(*(one_sender() for _ in range(self._depth)))
        await pipe.send(None)
        await self._expect_ack()
        return sent

    async def _expect_ack(self) -> None:
        if (await self.pipe.recv()) is not None:
            raise RuntimeError("expected the end-of-round acknowledgement")

    async def ping(self) -> None:
        await self.pipe.send(self._msg)
        await self.pipe.recv()

    async def end_echo(self) -> None:
        await self.pipe.send(None)
        await self._expect_ack()

    async def drain(self) -> int:
        n = 0
        while (await self.pipe.recv()) is not None:
            n += 1
        await self.pipe.send(None)
        return n

    async def echo(self) -> int:
        n = 0
        while (msg := await self.pipe.recv()) is not None:
            await self.pipe.send(msg)
            n += 1
        await self.pipe.send(None)
        return n

    async def stream_keyed(self, tasks: int, seconds: float, min_msgs: int) -> int:
        """``tasks`` concurrent senders, each with its own key, for ``seconds``."""
        pipe, msg = self.pipe, self._msg
        deadline = time.perf_counter() + seconds

        async def one(key: str) -> int:
            n = 0
            while n < min_msgs or time.perf_counter() < deadline:
                await pipe.send(msg, key=key)
                n += 1
            await pipe.send(None, key=key)
            return n

        counts = await asyncio.gather(*(one(f"request-{i}") for i in range(tasks)))
        await self._expect_ack()
        return sum(counts)

    async def drain_keyed(self, tasks: int) -> int:
        pipe = self.pipe

        async def one(key: str) -> int:
            n = 0
            while (await pipe.recv(key=key)) is not None:
                n += 1
            return n

        counts = await asyncio.gather(*(one(f"request-{i}") for i in range(tasks)))
        await pipe.send(None)
        return sum(counts)

    async def aclose(self) -> None:
        await self.pipe.aclose()


# naive asyncio streams -------------------------------------------------------------------------


class StreamsEndpoint:
    """``writer.write`` + ``drain`` and ``reader.readexactly``: what a quick implementation does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 rounds: _Rounds | None = None, server: asyncio.Server | None = None,
                 serving: asyncio.Task[None] | None = None) -> None:
        self._reader, self._writer = reader, writer
        self._rounds, self._server, self._serving = rounds, server, serving
        self._payload = memoryview(b"")
        self._data_hdr = self._echo_hdr = b""

    @staticmethod
    async def listen(case: Json, device: str) -> tuple[Any, Callable[[], Awaitable[Endpoint]]]:
        loop = asyncio.get_running_loop()
        rounds = _Rounds()
        conn: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            loop.create_future())

        async def on_connection(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            if conn.done():
                w.close()
                return
            conn.set_result((r, w))

        server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def accept() -> Endpoint:
            r, w = await conn
            serving = loop.create_task(StreamsEndpoint._serve(r, w, rounds))
            return StreamsEndpoint(r, w, rounds, server, serving)

        return port, accept

    @staticmethod
    async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     rounds: _Rounds) -> None:
        count = 0
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                kind, n = _split_header(header)
                if kind == _END:
                    writer.write(_ACK)
                    await writer.drain()
                    rounds.complete(count)
                    count = 0
                    continue
                data = await reader.readexactly(n)
                count += 1
                if kind == _ECHO:
                    writer.write(header)
                    writer.write(data)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            rounds.fail(exc)

    @staticmethod
    async def connect(case: Json, device: str, port: Any) -> Endpoint:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
        return StreamsEndpoint(reader, writer)

    async def prepare(self, phase: Json) -> None:
        n = _phase_nbytes(phase)
        self._payload = memoryview(bytearray(n))
        self._data_hdr, self._echo_hdr = _header(_DATA, n), _header(_ECHO, n)

    async def stream(self, seconds: float, min_msgs: int) -> int:
        w, sent, deadline = self._writer, 0, time.perf_counter() + seconds
        while sent < min_msgs or time.perf_counter() < deadline:
            w.write(self._data_hdr)
            w.write(self._payload)
            await w.drain()
            sent += 1
        await self.end_echo()
        return sent

    async def ping(self) -> None:
        self._writer.write(self._echo_hdr)
        self._writer.write(self._payload)
        await self._writer.drain()
        _, n = _split_header(await self._reader.readexactly(_HEADER.size))
        await self._reader.readexactly(n)

    async def end_echo(self) -> None:
        self._writer.write(_header(_END, 0))
        await self._writer.drain()
        await self._reader.readexactly(1)

    async def drain(self) -> int:
        assert self._rounds is not None
        return await self._rounds.next()

    echo = drain  # the serving task echoes what asks for it; rounds end the same way

    async def aclose(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass
        if self._serving is not None:
            self._serving.cancel()
        if self._server is not None:
            self._server.close()


# the zero-copy ceiling --------------------------------------------------------------------------


class _CeilingProtocol(asyncio.BufferedProtocol):
    """Receives each payload straight into preallocated memory; acks (or echoes) per message."""

    def __init__(self, capacity: int, rounds: _Rounds,
                 connected: asyncio.Future[_CeilingProtocol]) -> None:
        self._dest = memoryview(bytearray(max(capacity, 1)))
        self._hdr = memoryview(bytearray(_HEADER.size))
        self._rounds, self._connected = rounds, connected
        self._transport: Any = None
        self._in_header, self._pos, self._need, self._kind = True, 0, _HEADER.size, _DATA
        self._count = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        if not self._connected.done():
            self._connected.set_result(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._in_header:
            return self._hdr[self._pos:]
        return self._dest[self._pos:self._need]

    def buffer_updated(self, nbytes: int) -> None:
        self._pos += nbytes
        if self._pos < self._need:
            return
        if self._in_header:
            self._kind, n = _split_header(self._hdr)
            if self._kind == _END:
                self._transport.write(_ACK)
                self._rounds.complete(self._count)
                self._count, self._pos = 0, 0
                return
            if n > len(self._dest):
                self._transport.abort()
                self._rounds.fail(ValueError(f"{n}-byte message over the receive buffer"))
                return
            self._in_header, self._pos, self._need = False, 0, n
            if n:
                return
        self._count += 1
        if self._kind == _ECHO:
            self._transport.write(bytes(self._hdr))
            self._transport.write(self._dest[:self._need])
        else:
            self._transport.write(_ACK)
        self._in_header, self._pos, self._need = True, 0, _HEADER.size

    def connection_lost(self, exc: Exception | None) -> None:
        self._rounds.fail(exc or ConnectionResetError("peer closed the connection"))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class CeilingEndpoint:
    """The zero-copy ceiling of BENCHMARKS.md. Sender: ``loop.sock_sendall`` of memoryviews on a
    raw socket, at most ``depth`` messages unacknowledged; receiver: :class:`_CeilingProtocol`."""

    def __init__(self, sock: socket.socket | None = None, depth: int = DEPTH,
                 protocol: _CeilingProtocol | None = None, rounds: _Rounds | None = None,
                 server: asyncio.Server | None = None) -> None:
        self._sock, self._depth = sock, depth
        self._protocol, self._rounds, self._server = protocol, rounds, server
        self._payload = memoryview(b"")
        self._back = memoryview(bytearray(0))
        self._data_hdr = self._echo_hdr = b""

    @staticmethod
    async def listen(case: Json, device: str) -> tuple[Any, Callable[[], Awaitable[Endpoint]]]:
        loop = asyncio.get_running_loop()
        rounds = _Rounds()
        connected: asyncio.Future[_CeilingProtocol] = loop.create_future()
        server = await loop.create_server(
            lambda: _CeilingProtocol(int(case["max_nbytes"]), rounds, connected),
            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def accept() -> Endpoint:
            protocol = await connected
            return CeilingEndpoint(protocol=protocol, rounds=rounds, server=server)

        return port, accept

    @staticmethod
    async def connect(case: Json, device: str, port: Any) -> Endpoint:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            _tune(sock)
            await loop.sock_connect(sock, ("127.0.0.1", int(port)))
        except BaseException:
            sock.close()
            raise
        return CeilingEndpoint(sock, int(case["depth"]))

    async def prepare(self, phase: Json) -> None:
        n = _phase_nbytes(phase)
        self._payload = memoryview(bytearray(n))
        self._back = memoryview(bytearray(_HEADER.size + n))
        self._data_hdr, self._echo_hdr = _header(_DATA, n), _header(_ECHO, n)

    async def stream(self, seconds: float, min_msgs: int) -> int:
        loop, sock = asyncio.get_running_loop(), self._sock
        deadline = time.perf_counter() + seconds
        assert sock is not None
        window = asyncio.Semaphore(self._depth)
        sent, acked, ended = 0, 0, False

        async def read_acks() -> None:
            nonlocal acked
            buf = bytearray(4096)
            while not (ended and acked == sent + 1):  # one ack per message, one for the end
                k = await loop.sock_recv_into(sock, buf)
                if k == 0:
                    raise ConnectionResetError("receiver closed the connection")
                acked += k
                for _ in range(k):
                    window.release()

        reader = loop.create_task(read_acks())
        try:
            while sent < min_msgs or time.perf_counter() < deadline:
                await window.acquire()
                await loop.sock_sendall(sock, self._data_hdr)
                await loop.sock_sendall(sock, self._payload)
                sent += 1
            ended = True
            await loop.sock_sendall(sock, _header(_END, 0))
            await reader
        finally:
            reader.cancel()
        return sent

    async def ping(self) -> None:
        loop, sock = asyncio.get_running_loop(), self._sock
        assert sock is not None
        await loop.sock_sendall(sock, self._echo_hdr)
        await loop.sock_sendall(sock, self._payload)
        await self._recv_exactly(self._back)

    async def _recv_exactly(self, view: memoryview) -> None:
        loop, sock = asyncio.get_running_loop(), self._sock
        assert sock is not None
        got = 0
        while got < len(view):
            k = await loop.sock_recv_into(sock, view[got:])
            if k == 0:
                raise ConnectionResetError("receiver closed the connection")
            got += k

    async def end_echo(self) -> None:
        assert self._sock is not None
        await asyncio.get_running_loop().sock_sendall(self._sock, _header(_END, 0))
        await self._recv_exactly(memoryview(bytearray(1)))

    async def drain(self) -> int:
        assert self._rounds is not None
        return await self._rounds.next()

    echo = drain  # the protocol echoes what asks for it, from its callbacks

    async def aclose(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._protocol is not None:
            self._protocol.close()
        if self._server is not None:
            self._server.close()


ENDPOINTS: Final[dict[str, Any]] = {
    "ours": OursEndpoint,
    "streams": StreamsEndpoint,
    "ceiling": CeilingEndpoint,
}


# -- the phases, as each side runs them --------------------------------------------------------


async def sender_phases(ep: Endpoint, case: Json) -> list[Json]:
    results = []
    for phase in case["phases"]:
        await ep.prepare(phase)
        kind, seconds = phase["kind"], float(phase["seconds"])
        if kind == "lat":
            n, warm_end = 0, time.perf_counter() + float(phase["warmup_s"])
            while n < phase["warmup_msgs"] or time.perf_counter() < warm_end:
                await ep.ping()
                n += 1
            rtts: list[float] = []
            deadline = time.perf_counter() + seconds
            while len(rtts) < MAX_SAMPLES and (len(rtts) < MIN_LAT_SAMPLES
                                               or time.perf_counter() < deadline):
                t0 = time.perf_counter()
                await ep.ping()
                rtts.append(time.perf_counter() - t0)
            await ep.end_echo()
            results.append({"p50_us": percentile(rtts, 50) / 2 * 1e6,
                            "p99_us": percentile(rtts, 99) / 2 * 1e6, "samples": len(rtts)})
            continue
        if kind == "keyed":
            assert isinstance(ep, OursEndpoint)
            tasks = int(phase["tasks"])
            await ep.stream_keyed(tasks, float(phase["warmup_s"]), 1)
            res = await measured(functools.partial(ep.stream_keyed, tasks, seconds, 1))
        else:
            await ep.stream(float(phase["warmup_s"]), int(phase["warmup_msgs"]))
            res = await measured(functools.partial(ep.stream, seconds, 1))
        res["bytes"] = res["msgs"] * _phase_nbytes(phase)
        res["gbps"] = res["bytes"] / res["elapsed_s"] / 1e9
        results.append(res)
    return results


async def receiver_phases(ep: Endpoint, case: Json) -> list[Json]:
    results = []
    for phase in case["phases"]:
        kind = phase["kind"]
        if kind == "lat":
            results.append({"msgs": await ep.echo()})
        elif kind == "keyed":
            assert isinstance(ep, OursEndpoint)
            tasks = int(phase["tasks"])
            await ep.drain_keyed(tasks)
            results.append(await measured(functools.partial(ep.drain_keyed, tasks)))
        else:
            await ep.drain()
            results.append(await measured(ep.drain))
    return results


async def _async_case(role: str, device: str, case: Json, emit: Callable[[Json], None]
                      ) -> list[Json]:
    cls = ENDPOINTS[case["impl"].split("-")[0]]
    async with asyncio.timeout(float(case["timeout_s"])):
        ep: Endpoint
        if role == "receiver":
            rendezvous, accept = await cls.listen(case, device)
            emit({"type": "rendezvous", "value": rendezvous})
            ep = await accept()
        else:
            ep = await cls.connect(case, device, case["rendezvous"])
        try:
            if role == "receiver":
                return await receiver_phases(ep, case)
            return await sender_phases(ep, case)
        finally:
            await ep.aclose()


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_case(role: str, device: str, case: Json, emit: Callable[[Json], None]) -> list[Json]:
    """Run one case's phases on this side; raises on any failure."""
    if case["impl"] == "nccl-raw":
        from . import _bench_gpu

        return _bench_gpu.raw_nccl_case(role, device, case, emit)
    with asyncio.Runner(loop_factory=_loop_factory(case["loop"])) as runner:
        result = runner.run(_async_case(role, device, case, emit))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result


def child_main(role: str, device: str) -> int:
    """A measured process: runs the cases its stdin sends, answers on its stdout.

    The protocol gets the original stdout to itself; anything else written there (NCCL's logs)
    is sent to stderr instead.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(msg: Json) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    fake_uuid = os.environ.get(FAKE_UUID_ENV)
    if fake_uuid:  # --one-gpu: both ends on one GPU must look like two to the handshake
        from . import _connect

        setattr(_connect, "device_uuid", lambda _device: bytes.fromhex(fake_uuid))
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        name = torch.cuda.get_device_name() if device.startswith("cuda") else None
        emit({"type": "hello", "role": role, "device": device, "device_name": name,
              "pid": os.getpid()})
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("type") == "exit":
                break
            try:
                emit({"type": "result", "phases": run_case(role, device, cmd, emit)})
            except Exception:  # noqa: BLE001  -- reported to the coordinator, which goes on
                emit({"type": "error", "error": traceback.format_exc(limit=8)})
    except KeyboardInterrupt:
        return 130
    return 0


# -- the coordinator ---------------------------------------------------------------------------

#: Set by ``--one-gpu`` for the children (see there).
ONE_GPU_ENV: Final = "AIOKVPIPE_BENCH_ONE_GPU"
FAKE_UUID_ENV: Final = "AIOKVPIPE_BENCH_FAKE_UUID"


class CaseFailed(Exception):
    """A case failed or timed out in one of the children."""


class _Child:
    """One measured process, spoken to in JSON lines; its stderr kept in a temporary file."""

    def __init__(self, role: str, device: str) -> None:
        self.role, self.device = role, device
        self._proc: asyncio.subprocess.Process | None = None
        # Kept for the child's whole life, to quote its last words when it fails.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.hello: Json = {}

    async def start(self) -> None:
        env = dict(os.environ)
        # The children import this very aiokvpipe, wherever the coordinator found it.
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if env.get(ONE_GPU_ENV):
            # Two "hosts" to NCCL, two GPUs to our handshake: see --one-gpu.
            env["NCCL_HOSTID"] = f"aiokvpipe-bench-{self.role}"
            env[FAKE_UUID_ENV] = ("aa" if self.role == "sender" else "bb") * 16
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiokvpipe", "bench", "--role", self.role,
            "--role-device", self.device, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self._stderr, env=env, limit=1 << 22)
        self.hello = await self.read(START_TIMEOUT_S)
        if self.hello.get("type") != "hello":
            raise CaseFailed(f"{self.role} did not start: {self.hello}")

    async def send(self, msg: Json) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(msg) + "\n").encode())
        await self._proc.stdin.drain()

    async def read(self, timeout: float) -> Json:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        except TimeoutError:
            raise CaseFailed(f"{self.role} gave no answer within {timeout:.0f} s"
                             f"{self.stderr_tail()}") from None
        if not line:
            raise CaseFailed(f"{self.role} exited{self.stderr_tail()}")
        msg: Json = json.loads(line)
        if msg.get("type") == "error":
            raise CaseFailed(f"{self.role}: {msg['error'].rstrip()}")
        return msg

    def stderr_tail(self, nbytes: int = 3000) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - nbytes))
        tail = self._stderr.read().decode(errors="replace").strip()
        return f"; its stderr ends with:\n{tail}" if tail else ""

    async def stop(self, polite: bool) -> None:
        """End the child and reap it: ``polite`` asks it to exit first (it is between cases),
        then SIGTERM, then SIGKILL, each given a few seconds."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        try:
            if polite and proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.write(b'{"type": "exit"}\n')
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                return
        except (TimeoutError, ConnectionError):
            pass
        for signal_it in (proc.terminate, proc.kill):
            try:
                signal_it()
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                return
            except ProcessLookupError:
                return
            except TimeoutError:
                continue

    def kill_now(self) -> None:
        """Last resort when the coordinator's loop is going away."""
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.kill()
            except (ProcessLookupError, RuntimeError):
                pass


class ChildPair:
    """The sender and receiver processes; restarted when a case leaves them in doubt."""

    def __init__(self, sender_device: str, receiver_device: str) -> None:
        self.sender = _Child("sender", sender_device)
        self.receiver = _Child("receiver", receiver_device)

    async def start(self) -> None:
        await _both(self.sender.start(), self.receiver.start())

    async def stop(self, polite: bool) -> None:
        """Stop both (see :meth:`_Child.stop`); a second cancellation kills them outright."""
        try:
            await asyncio.shield(asyncio.gather(self.sender.stop(polite),
                                                self.receiver.stop(polite)))
        finally:
            self.sender.kill_now()
            self.receiver.kill_now()

    async def restart(self) -> None:
        await self.stop(polite=False)
        self.sender = _Child("sender", self.sender.device)
        self.receiver = _Child("receiver", self.receiver.device)
        await self.start()

    async def run_case(self, case: Json) -> tuple[list[Json], list[Json]]:
        """(sender's, receiver's) phase results; raises :class:`CaseFailed`."""
        timeout = float(case["timeout_s"]) + 30.0
        await self.receiver.send(case)
        rendezvous = await self.receiver.read(START_TIMEOUT_S)
        await self.sender.send({**case, "rendezvous": rendezvous["value"]})
        sent, received = await _both(self.sender.read(timeout), self.receiver.read(timeout))
        return sent["phases"], received["phases"]


async def _both(a: Awaitable[Any], b: Awaitable[Any]) -> tuple[Any, Any]:
    """Await both; on the first failure cancel the other and raise that failure."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    try:
        await asyncio.wait((ta, tb), return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in (ta, tb):
            if not t.done():
                t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)
    for t in (ta, tb):
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return ta.result(), tb.result()


def case_timeout(phases: Sequence[Json], setup_s: float = 20.0) -> float:
    planned = sum(float(p["seconds"]) + float(p["warmup_s"]) for p in phases)
    return setup_s + 3.0 * planned + 2.0 * len(phases)


async def run_cases(cases: list[Json], sender_device: str, receiver_device: str
                    ) -> tuple[list[Json], list[Json], list[Json]]:
    """Run every case; returns (records, errors, the children's hellos). A failed case is
    recorded and skipped, the children restarted; the children are stopped whatever
    happens."""
    records: list[Json] = []
    errors: list[Json] = []
    pair = ChildPair(sender_device, receiver_device)
    finished = False
    try:
        await pair.start()
        hellos = [pair.sender.hello, pair.receiver.hello]
        for i, case in enumerate(cases, 1):
            loop = f" ({case['loop']})" if case["loop"] != "none" else ""
            name = f"{IMPL_LABELS[case['impl']]}{loop}"
            print(f"bench: [{i}/{len(cases)}] {name}, repeat {case['repeat'] + 1}",
                  file=sys.stderr, flush=True)
            try:
                sent, received = await pair.run_case(case)
            except CaseFailed as exc:
                print(f"bench: {name} failed: {exc}", file=sys.stderr, flush=True)
                errors.append({"impl": case["impl"], "loop": case["loop"],
                               "repeat": case["repeat"], "error": str(exc)})
                await pair.restart()
                continue
            for phase, s, r in zip(case["phases"], sent, received):
                records.append({"impl": case["impl"], "loop": case["loop"],
                                "repeat": case["repeat"], "label": phase["label"],
                                "kind": phase["kind"], "nbytes": phase["nbytes"],
                                "sender": s, "receiver": r})
        finished = True
    finally:
        await pair.stop(polite=finished)
    return records, errors, hellos


# -- planning the CPU run ----------------------------------------------------------------------


def tput_phase(label: str, nbytes: int, seconds: float, **extra: Any) -> Json:
    return {"label": label, "kind": "tput", "nbytes": nbytes, "seconds": seconds,
            "warmup_s": max(0.05, 0.15 * seconds), "warmup_msgs": 2, **extra}


def lat_phase(nbytes: int, seconds: float) -> Json:
    return {"label": f"lat {format_size(nbytes)}", "kind": "lat", "nbytes": nbytes,
            "seconds": max(0.1, seconds / 2), "warmup_s": 0.05, "warmup_msgs": 20}


def have_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def plan_cpu(sizes: list[int], seconds: float, repeat: int, ours_loop: str) -> list[Json]:
    phases = ([tput_phase(f"tput {format_size(n)}", n, seconds) for n in sizes]
              + [lat_phase(n, seconds) for n in sizes if n <= LAT_MAX_NBYTES])
    impls = [("ours", ours_loop), ("streams-asyncio", "asyncio")]
    if have_uvloop():
        impls.append(("streams-uvloop", "uvloop"))
    impls.append(("ceiling", ours_loop))
    common = {"phases": phases, "max_nbytes": max(sizes), "depth": DEPTH,
              "transport": "tcp", "timeout_s": case_timeout(phases)}
    return [{"impl": impl, "loop": loop, "repeat": r, **common}
            for r in range(repeat) for impl, loop in impls]


# -- summarising -------------------------------------------------------------------------------


def summarize(records: list[Json]) -> dict[str, dict[str, Json]]:
    """Medians over repeats: ``summary[impl][phase label]``."""
    groups: dict[tuple[str, str], list[Json]] = {}
    for rec in records:
        groups.setdefault((rec["impl"], rec["label"]), []).append(rec)
    out: dict[str, dict[str, Json]] = {}
    for (impl, label), recs in groups.items():
        fig: Json = {"kind": recs[0]["kind"], "nbytes": recs[0]["nbytes"], "runs": len(recs)}
        if fig["kind"] == "lat":
            fig["p50_us"] = median([r["sender"]["p50_us"] for r in recs])
            fig["p99_us"] = median([r["sender"]["p99_us"] for r in recs])
        else:
            fig["gbps"] = median([r["sender"]["gbps"] for r in recs])
            for side in ("sender", "receiver"):
                fig[f"{side}_lag_p99_ms"] = median([r[side].get("lag_p99_ms", float("nan"))
                                                    for r in recs])
                fig[f"{side}_cpu_s_per_gb"] = median(
                    [r[side]["cpu_s"] / (r["sender"]["bytes"] / 1e9) for r in recs
                     if r["sender"]["bytes"]])
        out.setdefault(impl, {})[label] = fig
    return out


def fig_of(summary: dict[str, dict[str, Json]], impl: str, label: str, key: str
           ) -> float | None:
    value = summary.get(impl, {}).get(label, {}).get(key)
    return float(value) if value is not None else None



def worst_loop_lag(summary: dict[str, dict[str, Json]], label: str, limit_ms: float
                   ) -> tuple[float | None, bool | None]:
    """Our worse side's loop-lag p99 in phase ``label``, and whether it is within the limit."""
    lag = max((v for v in (fig_of(summary, "ours", label, "sender_lag_p99_ms"),
                           fig_of(summary, "ours", label, "receiver_lag_p99_ms"))
               if v is not None), default=None)
    return lag, None if lag is None else lag <= limit_ms

def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str = ".3g") -> str:
    """``spec`` ".3g" means three significant digits but never an exponent."""
    if x is None:
        return "—"
    if spec == ".3g" and abs(x) >= 100:
        return f"{x:.0f}"
    return format(x, spec)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned: text left, the rest right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    left = {0, 1, len(headers) - 2, len(headers) - 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])]
                     + [line(r) for r in rows])


def both_sides(summary: dict[str, dict[str, Json]], impl: str, label: str, what: str,
               spec: str) -> str:
    s = fig_of(summary, impl, label, f"sender_{what}")
    r = fig_of(summary, impl, label, f"receiver_{what}")
    return "—" if s is None and r is None else f"{fmt(s, spec)}/{fmt(r, spec)}"


def cpu_report(summary: dict[str, dict[str, Json]], sizes: list[int]) -> tuple[str, list[Json]]:
    """The CPU run's table, and its targets in machine-readable form."""
    bases = [b for b in ("streams-asyncio", "streams-uvloop", "ceiling") if b in summary]
    headers = ["metric", "size", "ours", *[IMPL_LABELS[b] for b in bases],
               *[f"ours/{IMPL_LABELS[b].split()[0]}" for b in bases], "target", "result"]
    rows: list[list[str]] = []
    targets: list[Json] = []
    largest = max(sizes)

    def row(metric: str, size: int, label: str, key: str, spec: str, target: str = "",
            ok: bool | None = None) -> None:
        ours = fig_of(summary, "ours", label, key)
        vals = [fig_of(summary, b, label, key) for b in bases]
        rows.append([metric, format_size(size), fmt(ours, spec), *[fmt(v, spec) for v in vals],
                     *[fmt(ratio(ours, v), ".2f") for v in vals], target,
                     verdict(ok) if target else ""])

    for n in sizes:
        label = f"tput {format_size(n)}"
        target, ok = "", None
        if n >= 16 * MiB:
            r = ratio(fig_of(summary, "ours", label, "gbps"),
                      fig_of(summary, "ceiling", label, "gbps"))
            target, ok = "≥0.85×ceiling", None if r is None else r >= 0.85
            targets.append({"name": f"throughput {format_size(n)} ours/ceiling",
                            "value": r, "target": 0.85, "pass": ok})
        row("throughput GB/s", n, label, "gbps", ".3g", target, ok)
    for n in sizes:
        if n > LAT_MAX_NBYTES:
            continue
        label = f"lat {format_size(n)}"
        target, ok = "", None
        if n == 4 * KiB:
            ours = fig_of(summary, "ours", label, "p50_us")
            r_ceil = ratio(ours, fig_of(summary, "ceiling", label, "p50_us"))
            r_uv = ratio(ours, fig_of(summary, "streams-uvloop", label, "p50_us"))
            parts = [None if r_ceil is None else r_ceil <= 2.0,
                     None if r_uv is None else r_uv <= 1.3]
            target = "≤2×ceiling & ≤1.3×uvloop"
            ok = None if None in parts else all(parts)
            targets.append({"name": "one-way p50 4 KiB ours/ceiling", "value": r_ceil,
                            "target": 2.0, "pass": parts[0]})
            targets.append({"name": "one-way p50 4 KiB ours/uvloop streams", "value": r_uv,
                            "target": 1.3, "pass": parts[1]})
        row("one-way p50 µs", n, label, "p50_us", ".3g", target, ok)
        row("one-way p99 µs", n, label, "p99_us", ".3g")
    label = f"tput {format_size(largest)}"
    lag, ok = worst_loop_lag(summary, label, 5.0)
    targets.append({"name": f"loop lag p99 ms while {format_size(largest)} streams (ours)",
                    "value": lag, "target": 5.0, "pass": ok})
    rows.append(["loop lag p99 ms snd/rcv", format_size(largest),
                 both_sides(summary, "ours", label, "lag_p99_ms", ".2f"),
                 *[both_sides(summary, b, label, "lag_p99_ms", ".2f") for b in bases],
                 *[""] * len(bases), "≤5 ms", verdict(ok)])
    for n in sizes:
        label = f"tput {format_size(n)}"
        rows.append(["CPU s/GB snd/rcv", format_size(n),
                     both_sides(summary, "ours", label, "cpu_s_per_gb", ".2f"),
                     *[both_sides(summary, b, label, "cpu_s_per_gb", ".2f") for b in bases],
                     *[""] * len(bases), "", ""])
    return render_table(headers, rows), targets


# -- the command -------------------------------------------------------------------------------


def host_info(device: str) -> Json:
    info: Json = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "uvloop": _version_of("uvloop"),
        "device": device,
    }
    try:
        from . import __version__

        info["aiokvpipe"] = __version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version_of(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def header_line(info: Json, date: str, what: str) -> str:
    uv = info["uvloop"] or "not installed"
    return (f"aiokvpipe {info.get('aiokvpipe', '?')} bench · {what} · {date} · "
            f"{info['hostname']} · Python {info['python']} · torch {info['torch']} · "
            f"uvloop {uv}")


def plot(path: str, sizes: list[int], series: dict[str, list[float | None]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, values in series.items():
        points = [(s, v) for s, v in zip(sizes, values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [format_size(s) for s in sizes])
    ax.set_xlabel("message size (one tensor per message)")
    ax.set_ylabel("GB/s")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="measure throughput, latency and loop lag against baselines",
        description="Start a sender and a receiver process on this machine and measure our "
                    "pipe beside its baselines (BENCHMARKS.md), in the same run.")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: tcp plane vs asyncio streams and the zero-copy ceiling; "
                        "cuda: nccl plane on cuda:0 → cuda:1 vs raw NCCL (default cpu)")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated message sizes (default {CPU_SIZES} on cpu, "
                        "4K,64K,1M,16M,256M,1G on cuda)")
    p.add_argument("--seconds", type=float, default=None,
                   help="timed seconds per throughput point (default 1.0)")
    p.add_argument("--repeat", type=int, default=None,
                   help="repeats, interleaved across implementations; medians are reported "
                        "(default 3 on cpu, 1 on cuda)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller, shorter set (cuda: fewer sizes, 0.5 s per point)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw throughput against size (needs matplotlib)")
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=None,
                   help="run our pipe (and the ceiling) on uvloop (default: if installed)")
    p.add_argument("--one-gpu", action="store_true",
                   help="cuda on a one-GPU machine: both ends on cuda:0, NCCL told they are "
                        "two hosts (NCCL_HOSTID) so it runs over its socket transport. Checks "
                        "our overhead against raw NCCL under the same transport; the figures "
                        "are not NVLink figures")
    p.add_argument("--role", choices=("sender", "receiver"), help=argparse.SUPPRESS)
    p.add_argument("--role-device", default="cpu", help=argparse.SUPPRESS)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    if args.role:
        return child_main(args.role, args.role_device)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("bench: --plot needs matplotlib, which is not installed here "
              "(pip install matplotlib)", file=sys.stderr)
        return 2
    use_uvloop = have_uvloop() if args.uvloop is None else args.uvloop
    if use_uvloop and not have_uvloop():
        print("bench: --uvloop asked for, but uvloop is not installed", file=sys.stderr)
        return 2
    if args.seconds is not None and not args.seconds > 0:
        print("bench: --seconds must be positive", file=sys.stderr)
        return 2
    if args.repeat is not None and args.repeat < 1:
        print("bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    if args.device == "cuda":
        from . import _bench_gpu

        return _bench_gpu.main(args, "uvloop" if use_uvloop else "asyncio")
    try:
        sizes = parse_sizes(args.sizes or CPU_SIZES)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    seconds = args.seconds or (0.5 if args.quick else 1.0)
    repeat = args.repeat or (1 if args.quick else 3)
    loop = "uvloop" if use_uvloop else "asyncio"
    cases = plan_cpu(sizes, seconds, repeat, loop)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    info = host_info("cpu")
    started = time.perf_counter()
    records, errors, _ = asyncio.run(run_cases(cases, "cpu", "cpu"))
    summary = summarize(records)
    table, targets = cpu_report(summary, sizes)
    settings = {"sizes": sizes, "seconds": seconds, "repeat": repeat, "ours_loop": loop,
                "depth": DEPTH, "wall_s": time.perf_counter() - started}
    finish(args, info, date, settings, records, errors, summary, targets, sizes,
           ["ours", "streams-asyncio", "streams-uvloop", "ceiling"],
           [f"device cpu ({info['cpu']}, {info['cpu_count']} cores)",
            (f"ours and the ceiling on {loop}; {repeat} repeat(s) × {seconds:g} s per point, "
             f"medians; {DEPTH} sends in flight"),
            ("one-way latency = ping-pong round trip / 2; ratios are ours ÷ baseline "
             "(throughput: higher is better, latency: lower is better); snd/rcv = sender/"
             "receiver process")],
           table)
    return 1 if errors else 0


def finish(args: argparse.Namespace, info: Json, date: str, settings: Json,
           records: list[Json], errors: list[Json], summary: dict[str, dict[str, Json]],
           targets: list[Json], sizes: list[int], impls: list[str], notes: list[str],
           table: str) -> None:
    """Write the JSON and the plot if asked, print the errors, notes and the table last."""
    what = notes[0]
    if args.json:
        doc = {"tool": "aiokvpipe bench", "date": date, "command": " ".join(sys.argv),
               "argv": sys.argv, "host": info, "settings": settings, "summary": summary,
               "targets": targets, "records": records, "errors": errors}
        Path(args.json).write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    if args.plot:
        series = {IMPL_LABELS[i]: [fig_of(summary, i, f"tput {format_size(n)}", "gbps")
                                   for n in sizes] for i in impls if i in summary}
        plot(args.plot, sizes, series, header_line(info, date, what))
    for err in errors:
        print(f"ERROR {IMPL_LABELS[err['impl']]} repeat {err['repeat'] + 1}: "
              f"{err['error'].splitlines()[-1] if err['error'] else ''}")
    print(header_line(info, date, what))
    for note in notes[1:]:
        print(f"  {note}")
    print(table)


def _finite(obj: Any) -> Any:
    """NaN and infinities (a figure nobody measured) become null: strict JSON has neither."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
