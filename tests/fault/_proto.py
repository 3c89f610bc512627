"""Speaking aiokvpipe's protocol by hand, with the real sans-I/O encoder and decoder.

Hostile and scripted peers use this to land at exact points of a connection (half a frame
prefix, a header cut in the middle, a replayed handshake) that a real ``aiokvpipe`` peer never
produces. Imported by the fault tests (in-process) and by ``raw_peer.py`` (a helper process
that imports it after ``_light``, so that no torch import slows it down).
"""

from __future__ import annotations

import asyncio
import secrets
import struct
from collections import deque
from typing import Any

from aiokvpipe import _handshake, _wire
from aiokvpipe._errors import ProtocolError

READ_TIMEOUT_S = 5.0


class RawConn:
    """One TCP connection: write raw bytes, read whole frames with a :class:`FrameDecoder`."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = _wire.FrameDecoder()
        self.frames: deque[_wire.Frame] = deque()
        self.sent = bytearray()  # everything written, for replay tests

    @classmethod
    async def open(cls, host: str, port: int) -> RawConn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def write(self, data: bytes) -> None:
        self.sent += data
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self, timeout: float = READ_TIMEOUT_S) -> _wire.Frame | None:
        """The next frame, or ``None`` at end of stream; TimeoutError if nothing comes."""
        async with asyncio.timeout(timeout):
            while not self.frames:
                data = await self.reader.read(65536)
                if not data:
                    return None
                self.frames.extend(self.decoder.feed(data))
        return self.frames.popleft()

    async def read_until_close(self, timeout: float = READ_TIMEOUT_S
                               ) -> tuple[list[_wire.Frame], str]:
        """Every frame until the peer closes; and how it ended: "eof", "reset", "timeout" or
        "protocol-error" (the peer sent bytes that are not frames)."""
        frames: list[_wire.Frame] = []
        try:
            while True:
                frame = await self.read_frame(timeout)
                if frame is None:
                    return frames, "eof"
                frames.append(frame)
        except TimeoutError:
            return frames, "timeout"
        except (ConnectionResetError, BrokenPipeError):
            return frames, "reset"
        except ProtocolError:
            return frames, "protocol-error"

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        self.writer.transport.abort()

    async def wait_closed(self) -> None:
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


def caps(**overrides: Any) -> _wire.Capabilities:
    """A CPU, tcp, no-heartbeat client's capabilities (a hand-speaking peer never sends
    heartbeats, so the far end must not time it out)."""
    fields: dict[str, Any] = {"transport": _wire.Transport.TCP, "recv_buffer_bytes": 64 << 20,
                              "heartbeat_ms": 0}
    fields.update(overrides)
    return _wire.Capabilities(**fields)


def hello_bytes(nonce: bytes, version: int = _wire.PROTOCOL_VERSION, **cap_overrides: Any
                ) -> bytes:
    """A HELLO; ``version`` other than ours is encoded as is (the encoder does not check it)."""
    return _wire.encode(_wire.Hello(nonce, caps(**cap_overrides), version))


class RawClient:
    """A by-hand aiokvpipe client: each handshake step is a method, so a test can stop (or be
    killed) between any two bytes of it."""

    def __init__(self, host: str, port: int, token: bytes | None = None) -> None:
        self.host, self.port, self.token = host, port, token
        self.nonce = secrets.token_bytes(_wire.NONCE_BYTES)
        self.ctl: RawConn | None = None
        self.server_hello: _wire.Hello | None = None
        self.accept: _wire.Accept | None = None
        self.c2s: RawConn | None = None
        self.s2c: RawConn | None = None
        self.seq = 0

    async def open(self) -> RawConn:
        self.ctl = await RawConn.open(self.host, self.port)
        return self.ctl

    def hello_bytes(self, **kw: Any) -> bytes:
        return hello_bytes(self.nonce, **kw)

    async def read_expect(self, kind: type, conn: RawConn | None = None) -> Any:
        frame = await (conn or self.ctl).read_frame()  # type: ignore[union-attr]
        if not isinstance(frame, kind):
            raise AssertionError(f"expected {kind.__name__}, got {frame!r}")
        return frame

    async def hello(self) -> _wire.Hello:
        assert self.ctl is not None
        await self.ctl.write(self.hello_bytes())
        self.server_hello = await self.read_expect(_wire.Hello)
        return self.server_hello

    def auth_bytes(self) -> bytes:
        assert self.server_hello is not None
        return _wire.encode(_wire.Auth(_handshake.proof(self.token, True, self.nonce,
                                                        self.server_hello.nonce)))

    async def auth(self) -> _wire.Accept:
        assert self.ctl is not None
        await self.ctl.write(self.auth_bytes())
        self.accept = await self.read_expect(_wire.Accept)
        return self.accept

    def attach_bytes(self, direction: _wire.Direction) -> bytes:
        assert self.accept is not None
        return _wire.encode(_wire.Attach(self.accept.session_id, direction))

    async def attach(self) -> None:
        self.c2s = await RawConn.open(self.host, self.port)
        await self.c2s.write(self.attach_bytes(_wire.Direction.CLIENT_TO_SERVER))
        self.s2c = await RawConn.open(self.host, self.port)
        await self.s2c.write(self.attach_bytes(_wire.Direction.SERVER_TO_CLIENT))

    async def ready(self) -> None:
        await self.read_expect(_wire.Ready)

    async def handshake(self) -> None:
        """The whole handshake, up to READY: the far end now holds an open pipe to us."""
        await self.open()
        await self.hello()
        await self.auth()
        await self.attach()
        await self.ready()

    def header_bytes(self, specs: list[tuple[int, tuple[int, ...]]], key: str | None = None,
                     structure: _wire.Structure | None = None) -> bytes:
        """The next HEADER: ``specs`` are (wire dtype code, shape); dtype codes the encoder
        does not know are encoded with item size 1."""
        if structure is None:
            structure = (_wire.Structure.NONE if not specs else _wire.Structure.TENSOR
                         if len(specs) == 1 else _wire.Structure.LIST)
        tensors = tuple(_wire.TensorSpec(code, tuple(shape), _wire.DTYPE_ITEMSIZE.get(code, 1))
                        for code, shape in specs)
        data = _wire.encode(_wire.Header(self.seq, key, structure, tensors))
        self.seq += 1
        return data

    def close(self) -> None:
        for conn in (self.ctl, self.c2s, self.s2c):
            if conn is not None:
                conn.abort()

    async def wait_closed(self) -> None:
        for conn in (self.ctl, self.c2s, self.s2c):
            if conn is not None:
                await conn.wait_closed()


def raw_header(seq: int, key_len_field: int, key: bytes, structure: int, count_field: int,
               tensors: list[tuple[bytes, int, int, list[int]]]) -> bytes:
    """A HEADER frame built field by field, bypassing every check of the encoder: for values
    the encoder refuses (counts beyond the limits, lengths that lie, u64 "negative" sizes).
    ``tensors``: (name, dtype code, ndim field, dims)."""
    specs = b""
    for name, code, ndim, dims in tensors:
        specs += struct.pack(">B", len(name)) + name + struct.pack(">BB", code, ndim)
        specs += b"".join(struct.pack(">Q", d) for d in dims)
    body = struct.pack(">QQHBII", seq, 0, key_len_field, structure, count_field, len(specs))
    body += specs + key
    return struct.pack(">BBHI", _wire.FrameType.HEADER, 0, 0, len(body)) + body


def raw_frame(ftype: int, body: bytes, length: int | None = None, flags: int = 0,
              reserved: int = 0) -> bytes:
    """Any frame prefix + body; ``length`` may lie about the body."""
    return struct.pack(">BBHI", ftype, flags, reserved,
                       len(body) if length is None else length) + body


def describe(frames: list[_wire.Frame]) -> list[str]:
    out = []
    for f in frames:
        if isinstance(f, _wire.Error):
            out.append(f"Error({f.code.name}: {f.text})")
        else:
            out.append(type(f).__name__)
    return out
