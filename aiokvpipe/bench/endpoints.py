"""The endpoints: one side of one benchmarked connection, ours or a baseline, in asyncio.

Each implementation a case can name in a measured process is an :class:`Endpoint` (or, for
blocking baselines such as raw NCCL, a module of its own: :mod:`.raw_nccl`). CPU baselines
(BENCHMARKS.md): naive asyncio streams, on asyncio's loop and on uvloop (and on uvloop with
tensors for messages: :class:`TensorStreamsEndpoint`), and the zero-copy
"ceiling" (a ``BufferedProtocol`` receiving into preallocated memory, the sender
``loop.sock_sendall`` of memoryviews, a 1-byte ack per message).

An endpoint class also has two static constructors: ``listen(case, device)`` (the receiver)
returns a rendezvous for the coordinator to hand to the sender (a port) and a coroutine function
that accepts the connection; ``connect(case, device, rendezvous)`` (the sender) connects.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections import deque
from collections.abc import Awaitable, Callable
from ctypes import string_at
from typing import Any, Final, Protocol

import torch

import aiokvpipe

from .common import DEPTH, Json


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


class EndpointClass(Protocol):
    """An endpoint's two constructors (static methods of its class)."""

    async def listen(self, case: Json, device: str
                     ) -> tuple[Any, Callable[[], Awaitable[Endpoint]]]:
        """The receiver's: a rendezvous for the sender (a port), and the accepting coroutine."""

    async def connect(self, case: Json, device: str, rendezvous: Any) -> Endpoint:
        """The sender's: connect to the rendezvous the receiver announced."""


# The baselines' framing: an 8-byte header, kind in the top byte, payload length below.
_HEADER: Final = struct.Struct("<Q")
_DATA, _ECHO, _END = 0, 1, 2
_ACK: Final = b"\x01"


def _header(kind: int, n: int) -> bytes:
    return _HEADER.pack(kind << 56 | n)


def _split_header(data: bytes | bytearray | memoryview) -> tuple[int, int]:
    (word,) = _HEADER.unpack(data)
    return word >> 56, word & ((1 << 56) - 1)


def phase_nbytes(phase: Json) -> int:
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


_PONG: Final = "pong"  # the key of a ping's answer without payload


class OursEndpoint:
    """Our pipe. Receivers get new tensors per message, as an application would."""

    #: Pipe options beyond the defaults.
    OPTIONS: dict[str, Any] = {}

    def __init__(self, pipe: Any, device: str, depth: int) -> None:
        self.pipe = pipe
        self._device = device
        self._depth = depth
        self._msg: Any = None
        self._reply_none = False  # the ping's answer carries no payload (see lat_phase)

    @classmethod
    async def listen(cls, case: Json, device: str
                     ) -> tuple[Any, Callable[[], Awaitable[Endpoint]]]:
        listener = await aiokvpipe.listen("127.0.0.1", 0, device=device,
                                          transport=case["transport"], **cls.OPTIONS)

        async def accept() -> Endpoint:
            try:
                pipe = await listener.accept()
            finally:
                await listener.aclose()
            return cls(pipe, device, case["depth"])

        return listener.port, accept

    @classmethod
    async def connect(cls, case: Json, device: str, port: Any) -> Endpoint:
        pipe = await aiokvpipe.connect("127.0.0.1", int(port), device=device,
                                       transport=case["transport"], connect_timeout=30.0,
                                       **cls.OPTIONS)
        return cls(pipe, device, case["depth"])

    async def prepare(self, phase: Json) -> None:
        self._reply_none = phase.get("reply") == "none"
        layers = phase.get("layers")
        if layers:  # a KV bundle: K and V of each layer, one dict message
            n = int(phase["tensor_bytes"])
            self._msg = {f"{kv}{i}": self._tensor(n) for i in range(layers) for kv in "kv"}
        else:
            self._msg = self._tensor(phase_nbytes(phase))

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
        await self.pipe.recv(_PONG if self._reply_none else None)

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
            if self._reply_none:
                await self.pipe.send(None, _PONG)
            else:
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


class OursNoPollEndpoint(OursEndpoint):
    """Our pipe with busy polling off (``busy_poll_us=0``): what the polling buys, and costs."""

    OPTIONS = {"busy_poll_us": 0}


# the socket baselines --------------------------------------------------------------------------


class _FramedEndpoint:
    """What the socket baselines share: the payload and headers of the framing above, and a
    receiving side that callbacks (a serving task, a protocol) drive, counting its rounds."""

    def __init__(self, rounds: _Rounds | None) -> None:
        self._rounds = rounds
        self._payload = memoryview(b"")
        self._data_hdr = self._echo_hdr = b""

    async def prepare(self, phase: Json) -> None:
        n = phase_nbytes(phase)
        self._payload = memoryview(bytearray(n))
        self._data_hdr, self._echo_hdr = _header(_DATA, n), _header(_ECHO, n)

    async def drain(self) -> int:
        assert self._rounds is not None
        return await self._rounds.next()

    echo = drain  # the callbacks echo what asks for it; rounds end the same way


class StreamsEndpoint(_FramedEndpoint):
    """``writer.write`` + ``drain`` and ``reader.readexactly``: what a quick implementation does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 rounds: _Rounds | None = None, server: asyncio.Server | None = None,
                 serving: asyncio.Task[None] | None = None) -> None:
        super().__init__(rounds)
        self._reader, self._writer = reader, writer
        self._server, self._serving = server, serving

    @classmethod
    async def listen(cls, case: Json, device: str
                     ) -> tuple[Any, Callable[[], Awaitable[Endpoint]]]:
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
            serving = loop.create_task(cls._serve(r, w, rounds))
            return cls(r, w, rounds, server, serving)

        return port, accept

    @classmethod
    async def _serve(cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
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
                received = cls._received(await reader.readexactly(n))
                count += 1
                if kind == _ECHO:
                    writer.write(header)
                    writer.write(cls._bytes_of(received))
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            rounds.fail(exc)

    @classmethod
    async def connect(cls, case: Json, device: str, port: Any) -> Endpoint:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
        return cls(reader, writer)

    @staticmethod
    def _received(data: bytes) -> Any:
        """What the receiver makes of a payload: here the bytes as they came."""
        return data

    @staticmethod
    def _bytes_of(received: Any) -> bytes | memoryview:
        """The bytes to send of a payload :meth:`_received` made."""
        return received  # type: ignore[no-any-return]

    def _message(self) -> bytes | memoryview:
        """The payload of the next message sent."""
        return self._payload

    async def stream(self, seconds: float, min_msgs: int) -> int:
        w, sent, deadline = self._writer, 0, time.perf_counter() + seconds
        while sent < min_msgs or time.perf_counter() < deadline:
            w.write(self._data_hdr)
            w.write(self._message())
            await w.drain()
            sent += 1
        await self.end_echo()
        return sent

    async def ping(self) -> None:
        self._writer.write(self._echo_hdr)
        self._writer.write(self._message())
        await self._writer.drain()
        _, n = _split_header(await self._reader.readexactly(_HEADER.size))
        self._received(await self._reader.readexactly(n))

    async def end_echo(self) -> None:
        self._writer.write(_header(_END, 0))
        await self._writer.drain()
        await self._reader.readexactly(1)

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


class TensorStreamsEndpoint(StreamsEndpoint):
    """The same streams, but each message is a tensor, as ours: the sender writes a CPU
    tensor's bytes (``ctypes.string_at``, as our inline path does), the receiver copies each
    payload into a new buffer and makes it a tensor (``torch.frombuffer``). No checks,
    sequence numbers, credits or keys: what delivering tensors costs on top of bytes, the
    floor for any pipe of tensors in Python."""

    _tensor: torch.Tensor

    async def prepare(self, phase: Json) -> None:
        await super().prepare(phase)
        self._tensor = torch.zeros(phase_nbytes(phase), dtype=torch.uint8)

    def _message(self) -> bytes | memoryview:
        return self._bytes_of(self._tensor)

    @staticmethod
    def _received(data: bytes) -> Any:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(
            0, dtype=torch.uint8)

    @staticmethod
    def _bytes_of(received: Any) -> bytes | memoryview:
        return string_at(received.data_ptr(), received.numel())  # a uint8 tensor's bytes


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


class CeilingEndpoint(_FramedEndpoint):
    """The zero-copy ceiling of BENCHMARKS.md. Sender: ``loop.sock_sendall`` of memoryviews on a
    raw socket, at most ``depth`` messages unacknowledged; receiver: :class:`_CeilingProtocol`."""

    def __init__(self, sock: socket.socket | None = None, depth: int = DEPTH,
                 protocol: _CeilingProtocol | None = None, rounds: _Rounds | None = None,
                 server: asyncio.Server | None = None) -> None:
        super().__init__(rounds)
        self._sock, self._depth = sock, depth
        self._protocol, self._server = protocol, server
        self._back = memoryview(bytearray(0))

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
        await super().prepare(phase)
        self._back = memoryview(bytearray(_HEADER.size + phase_nbytes(phase)))

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

    async def aclose(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._protocol is not None:
            self._protocol.close()
        if self._server is not None:
            self._server.close()

