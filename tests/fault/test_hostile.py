"""Hostile peers against a live listener (and a hostile listener against a real client).

Each case speaks the protocol by hand with the real encoder (``_proto``), lands one specific
violation, and checks three things: the error is *clear* (the right exception type, a message
that names the problem), nothing crashed (no exception reached the event loop's handler, no
``log.exception`` from the listener), and the listener is unaffected (a good client connects
with the token and transfers tensors both ways afterwards).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import torch

import aiokvpipe
from aiokvpipe import _connect, _handshake, _ipc_probe, _wire
from aiokvpipe._errors import PeerSaysProtocolError

from ._proto import RawClient, RawConn, describe, hello_bytes, raw_frame, raw_header
from .conftest import HOST, Snapshot, describe_loop_errors

pytestmark = pytest.mark.timeout(60)

TOKEN = "hostile-test-secret"
HANDSHAKE_TIMEOUT_S = 1.5
U64_MAX = (1 << 64) - 1


# -- fixtures and helpers ---------------------------------------------------------------------


@pytest.fixture
async def listener(caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
                   ) -> AsyncIterator[aiokvpipe.Listener]:
    caplog.set_level(logging.INFO, logger="aiokvpipe")
    lst = await aiokvpipe.listen(HOST, 0, token=TOKEN, handshake_timeout=HANDSHAKE_TIMEOUT_S,
                                 recv_buffer_bytes=8 << 20)
    try:
        yield lst
    finally:
        await lst.aclose()
    crashes = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not crashes, f"unhandled errors logged: {[r.getMessage() for r in crashes]}"
    assert not loop_errors, f"exceptions reached the loop: {describe_loop_errors(loop_errors)}"


async def good_client_transfers(lst: aiokvpipe.Listener) -> None:
    """A client with the token connects and moves tensors both ways: the listener is fine."""
    accepted = asyncio.ensure_future(lst.accept())
    try:
        client = await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port, token=TOKEN), 10)
        server = await asyncio.wait_for(accepted, 10)
    finally:
        if not accepted.done():
            accepted.cancel()
    try:
        x = torch.arange(1 << 16, dtype=torch.float32)
        await asyncio.wait_for(client.send({"x": x}, key="k"), 10)
        got = await asyncio.wait_for(server.recv(key="k"), 10)
        assert torch.equal(got["x"], x)
        await asyncio.wait_for(server.send(x * 2), 10)
        assert torch.equal(await asyncio.wait_for(client.recv(), 10), x * 2)
    finally:
        await asyncio.wait_for(asyncio.gather(client.aclose(), server.aclose()), 15)


def dropped_reasons(caplog: pytest.LogCaptureFixture) -> list[BaseException]:
    """Exceptions of the listener's "dropped incoming connection" log lines so far."""
    out = []
    for r in caplog.records:
        if r.name == "aiokvpipe" and r.msg.startswith("dropped incoming connection"):
            out.append(r.args[1])  # type: ignore[index]
    return out


async def wait_dropped(caplog: pytest.LogCaptureFixture, n_before: int, timeout: float = 5.0
                       ) -> BaseException:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(dropped_reasons(caplog)) <= n_before:
        assert loop.time() < deadline, "the listener logged no dropped connection"
        await asyncio.sleep(0.005)
    return dropped_reasons(caplog)[n_before]


async def open_raw_pipe(lst: aiokvpipe.Listener) -> tuple[RawClient, aiokvpipe.Pipe]:
    """A hand-speaking client that completed the handshake, and the listener's end of it."""
    accepted = asyncio.ensure_future(lst.accept())
    c = RawClient(HOST, lst.port, TOKEN.encode())
    try:
        await c.handshake()
        return c, await asyncio.wait_for(accepted, 5)
    finally:
        if not accepted.done():
            accepted.cancel()


# -- before the handshake: the first frame ------------------------------------------------------

NONCE = bytes(range(32))
_HELLO = hello_bytes(NONCE)

FIRST_FRAME_CASES: dict[str, tuple[bytes, type[BaseException], str]] = {
    # name: (bytes sent, then EOF; exception the listener logs; text it must contain)
    "oversized-hello-length": (raw_frame(_wire.FrameType.HELLO, b"", length=0xFFFFFFFF),
                               aiokvpipe.ProtocolError, "HELLO body of 4294967295 bytes exceeds"),
    "oversized-header-length-first": (raw_frame(_wire.FrameType.HEADER, b"", length=0xFFFFFFFF),
                                      aiokvpipe.ProtocolError, "exceeds"),
    "negative-length-as-u32": (raw_frame(_wire.FrameType.AUTH, b"", length=(-1) & 0xFFFFFFFF),
                               aiokvpipe.ProtocolError, "exceeds"),
    "wrong-version": (hello_bytes(NONCE, version=_wire.PROTOCOL_VERSION + 1),
                      aiokvpipe.ProtocolError,
                      f"peer speaks protocol {_wire.PROTOCOL_VERSION + 1}"),
    "previous-version": (hello_bytes(NONCE, version=_wire.PROTOCOL_VERSION - 1),
                         aiokvpipe.ProtocolError,
                         f"peer speaks protocol {_wire.PROTOCOL_VERSION - 1}"),
    "version-zero": (hello_bytes(NONCE, version=0), aiokvpipe.ProtocolError,
                     "peer speaks protocol 0"),
    "bad-magic": (_HELLO[:8] + b"XKVP" + _HELLO[12:], aiokvpipe.ProtocolError, "bad magic"),
    "unknown-frame-type": (raw_frame(0x7F, b""), aiokvpipe.ProtocolError,
                           "unknown frame type 127"),
    "reserved-bits": (raw_frame(_wire.FrameType.HELLO, _HELLO[8:], flags=1),
                      aiokvpipe.ProtocolError, "reserved"),
    "credit-as-first-frame": (_wire.encode(_wire.Credit(5)), aiokvpipe.ProtocolError,
                              "must open with HELLO or ATTACH"),
    "header-as-first-frame": (_wire.encode(_wire.Header(0, "k", _wire.Structure.NONE)),
                              aiokvpipe.ProtocolError, "must open with HELLO or ATTACH"),
    "attach-unknown-session": (_wire.encode(_wire.Attach(bytes(16), _wire.Direction(0))),
                               aiokvpipe.ProtocolError, "unknown session"),
    "bad-boolean-in-caps": (_HELLO[:8 + 38 + 1] + b"\x07" + _HELLO[8 + 38 + 2:],
                            aiokvpipe.ProtocolError, "boolean"),
    "bad-transport-in-caps": (_HELLO[:8 + 38] + b"\x09" + _HELLO[8 + 38 + 1:],
                              aiokvpipe.ProtocolError, "Transport"),
    "http-request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", aiokvpipe.ProtocolError,
                     "unknown frame type 71"),
    # 0x16 is a frame type since protocol 3 (OFFER); TLS's version bytes then fill the
    # flags, which must be zero
    "tls-client-hello": (bytes.fromhex("160301020001") + bytes(300), aiokvpipe.ProtocolError,
                         "reserved frame bits"),
    "truncated-hello-then-eof": (_HELLO[:30], ConnectionResetError, "closed before"),
    "connect-and-close": (b"", ConnectionResetError, "closed before"),
}


@pytest.mark.parametrize("case", list(FIRST_FRAME_CASES))
async def test_hostile_first_frame_is_dropped_with_a_clear_reason(
        case: str, listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    data, exc_type, text = FIRST_FRAME_CASES[case]
    loop = asyncio.get_running_loop()
    before = Snapshot.take()
    n = len(dropped_reasons(caplog))
    conn = await RawConn.open(HOST, listener.port)
    t0 = loop.time()
    await conn.write(data)
    conn.writer.write_eof()
    reason = await wait_dropped(caplog, n)
    dt = loop.time() - t0
    frames, how = await conn.read_until_close(timeout=5)
    conn.close()
    await conn.wait_closed()
    figures.update(case=case, error=repr(reason), time_to_error={"max_s": round(dt, 4)},
                   peer_saw=describe(frames) + [how])
    assert isinstance(reason, exc_type), f"{case}: listener logged {reason!r}"
    assert text in str(reason), f"{case}: {reason!r} does not say {text!r}"
    assert how in ("eof", "reset"), f"{case}: the listener kept the connection open ({how})"
    assert dt < 2.0
    await good_client_transfers(listener)
    leaks = await before.settle()
    figures["leaks"] = leaks
    assert not any(leaks.values()), (leaks, before.describe_tasks())


# -- during the handshake -------------------------------------------------------------------------


async def test_wrong_token_proof_is_refused_with_an_authentication_error(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    n = len(dropped_reasons(caplog))
    c = RawClient(HOST, listener.port, b"not-the-token")
    await c.open()
    await c.hello()
    assert c.ctl is not None
    await c.ctl.write(c.auth_bytes())
    frames, how = await c.ctl.read_until_close()
    reason = await wait_dropped(caplog, n)
    c.close()
    figures.update(error=repr(reason), peer_saw=describe(frames) + [how])
    assert isinstance(reason, aiokvpipe.AuthenticationError)
    assert any(isinstance(f, _wire.Error) and f.code == _wire.ErrorCode.AUTHENTICATION
               for f in frames), describe(frames)
    assert not any(isinstance(f, _wire.Accept) for f in frames)
    await good_client_transfers(listener)


async def test_empty_proof_to_a_listener_with_a_token_is_refused(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    n = len(dropped_reasons(caplog))
    c = RawClient(HOST, listener.port, None)
    await c.open()
    await c.hello()
    assert c.ctl is not None
    await c.ctl.write(_wire.encode(_wire.Auth(b"")))
    frames, how = await c.ctl.read_until_close()
    reason = await wait_dropped(caplog, n)
    c.close()
    figures.update(error=repr(reason), peer_saw=describe(frames) + [how])
    assert isinstance(reason, aiokvpipe.AuthenticationError)
    await good_client_transfers(listener)


async def test_an_unauthenticated_clients_ipc_probe_handle_never_reaches_the_driver(
        listener: aiokvpipe.Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    """A client with a wrong token that claims CUDA IPC on this host (its host id is in the
    listener's HELLO) is refused before its probe handle is opened: no thread, no driver
    call on bytes an unauthenticated peer chose. (The probe was opened first.) This machine
    need not have a GPU: the listener's capabilities and the probe are faked at their
    seams, and the test asserts only the order of the two checks."""
    host = _ipc_probe.host_id()
    local_caps = _connect._local_caps
    opened: list[bytes] = []

    async def with_ipc(opts: Any, device: Any) -> _wire.Capabilities:
        return dataclasses.replace(await local_caps(opts, device), cuda=True, ipc=True,
                                   host_id=host, ipc_probe=bytes(_wire.IPC_HANDLE_BYTES))

    async def probe_opens(handle: bytes, device: Any) -> bool:
        opened.append(handle)
        return False

    monkeypatch.setattr(_connect, "_local_caps", with_ipc)
    monkeypatch.setattr(_ipc_probe, "probe_opens", probe_opens)
    c = RawClient(HOST, listener.port, b"not-the-token")
    await c.open()
    assert c.ctl is not None
    await c.ctl.write(c.hello_bytes(cuda=True, ipc=True, host_id=host,
                                    ipc_probe=b"chosen by the peer".ljust(64, b"\0")))
    c.server_hello = await c.read_expect(_wire.Hello)
    assert c.server_hello.caps.ipc  # (the fake is in place: the probe was due)
    await c.ctl.write(c.auth_bytes())
    frames, _ = await c.ctl.read_until_close()
    c.close()
    assert any(isinstance(f, _wire.Error) and f.code == _wire.ErrorCode.AUTHENTICATION
               for f in frames), describe(frames)
    assert opened == [], "the listener opened an unauthenticated peer's IPC handle"
    good = RawClient(HOST, listener.port, TOKEN.encode())  # an authenticated one's is opened
    await good.open()
    assert good.ctl is not None
    await good.ctl.write(good.hello_bytes(cuda=True, ipc=True, host_id=host,
                                          ipc_probe=b"an honest probe".ljust(64, b"\0")))
    good.server_hello = await good.read_expect(_wire.Hello)
    await good.ctl.write(good.auth_bytes())
    await good.ctl.read_frame()
    good.close()
    assert opened == [b"an honest probe".ljust(64, b"\0")], opened


async def _recording_proxy(target_port: int, record: list[bytearray]
                           ) -> asyncio.Server:
    """A TCP proxy to the listener; ``record[i]`` gets what the i-th client connection sent."""

    async def relay(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    buf: bytearray | None) -> None:
        try:
            while data := await r.read(65536):
                if buf is not None:
                    buf += data
                w.write(data)
                await w.drain()
        except OSError:
            pass
        finally:
            w.close()

    async def handle(cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        buf = bytearray()
        record.append(buf)
        sr, sw = await asyncio.open_connection(HOST, target_port)
        await asyncio.gather(relay(cr, sw, buf), relay(sr, cw, None))

    return await asyncio.start_server(handle, HOST, 0)


async def test_replayed_handshake_fails_authentication(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    """A real client's handshake bytes, recorded on the wire and replayed on a new connection,
    do not authenticate: the listener's nonce differs every time. Its recorded ATTACH frames
    do not join anything either (the session is over)."""
    record: list[bytearray] = []
    proxy = await _recording_proxy(listener.port, record)
    try:
        port = proxy.sockets[0].getsockname()[1]
        accepted = asyncio.ensure_future(listener.accept())
        client = await aiokvpipe.connect(HOST, port, token=TOKEN)
        server = await asyncio.wait_for(accepted, 10)
        await client.send(torch.ones(4))
        assert torch.equal(await server.recv(), torch.ones(4))
        await asyncio.gather(client.aclose(), server.aclose())
    finally:
        proxy.close()
        await proxy.wait_closed()
    control = bytes(record[0])
    attaches = [bytes(b) for b in record[1:]]
    # The first two frames of the control connection: the client's HELLO and its AUTH.
    dec = _wire.FrameDecoder()
    frames = dec.feed(control)
    assert isinstance(frames[0], _wire.Hello) and isinstance(frames[1], _wire.Auth)
    assert frames[1].proof, "the client sent no proof: the token was not used"
    handshake = control[:len(_wire.encode(frames[0])) + len(_wire.encode(frames[1]))]

    n = len(dropped_reasons(caplog))
    replay = await RawConn.open(HOST, listener.port)
    await replay.write(handshake)
    got, how = await replay.read_until_close()
    reason = await wait_dropped(caplog, n)
    replay.close()
    figures.update(error=repr(reason), peer_saw=describe(got) + [how])
    assert isinstance(reason, aiokvpipe.AuthenticationError), reason
    assert isinstance(got[0], _wire.Hello) and got[0].nonce != b""
    assert any(isinstance(f, _wire.Error) and f.code == _wire.ErrorCode.AUTHENTICATION
               for f in got), describe(got)
    assert not any(isinstance(f, _wire.Accept) for f in got)

    for data in attaches:
        n = len(dropped_reasons(caplog))
        conn = await RawConn.open(HOST, listener.port)
        await conn.write(data[:len(_wire.encode(_wire.Attach(bytes(16),
                                                             _wire.Direction(0))))])
        reason = await wait_dropped(caplog, n)
        conn.close()
        assert isinstance(reason, aiokvpipe.ProtocolError) and "unknown session" in str(reason)
    await good_client_transfers(listener)


async def test_slowloris_handshakes_are_dropped_at_handshake_timeout_and_others_proceed(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    """Clients that trickle their HELLO a byte at a time are dropped once the handshake
    timeout passes; good clients connect meanwhile."""
    loop = asyncio.get_running_loop()
    n_slow = 24
    data = hello_bytes(NONCE)
    drops: list[float] = []

    async def slowloris() -> None:
        conn = await RawConn.open(HOST, listener.port)
        t0 = loop.time()
        try:
            for b in data:
                await conn.write(bytes([b]))
                await asyncio.sleep(0.25)
        except OSError:
            pass
        drops.append(loop.time() - t0)
        conn.abort()

    async def slowloris_idle() -> None:  # connects and never says a word
        conn = await RawConn.open(HOST, listener.port)
        t0 = loop.time()
        _, how = await conn.read_until_close(timeout=10)
        drops.append(loop.time() - t0)
        assert how in ("eof", "reset"), how
        conn.abort()

    n = len(dropped_reasons(caplog))
    attackers = [asyncio.ensure_future(slowloris() if i % 2 else slowloris_idle())
                 for i in range(n_slow)]
    await asyncio.sleep(0.2)
    t_good = loop.time()
    await good_client_transfers(listener)  # while the slowloris connections are held open
    good_s = loop.time() - t_good
    await asyncio.wait_for(asyncio.gather(*attackers), 20)
    reasons = dropped_reasons(caplog)[n:]
    figures.update(connections=n_slow, good_client_during_attack_s=round(good_s, 3),
                   time_to_error={"max_s": round(max(drops), 3),
                                  "min_s": round(min(drops), 3)})
    assert len(reasons) >= n_slow
    assert all(isinstance(r, TimeoutError) for r in reasons[:n_slow]), reasons
    assert good_s < 2.0
    assert max(drops) < HANDSHAKE_TIMEOUT_S + 1.0
    assert min(drops) > HANDSHAKE_TIMEOUT_S - 0.2
    await good_client_transfers(listener)


async def test_frames_flooded_before_auth_are_a_protocol_error(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    n = len(dropped_reasons(caplog))
    conn = await RawConn.open(HOST, listener.port)
    await conn.write(hello_bytes(NONCE) + _wire.encode(_wire.Heartbeat()) * 1000)
    frames, how = await conn.read_until_close()
    reason = await wait_dropped(caplog, n)
    conn.close()
    figures.update(error=repr(reason), peer_saw=describe(frames)[:3] + [how])
    assert isinstance(reason, aiokvpipe.ProtocolError)
    await good_client_transfers(listener)


async def test_a_message_frame_where_auth_is_due_is_refused_from_its_prefix(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    """An unauthenticated client announces a 2 MiB HEADER_INLINE where AUTH is due, and sends
    none of its body: refused from the prefix, at once. (The listener read on, past its
    256 KiB early-bytes bound, to buffer the whole frame before refusing its type: 2 MiB a
    connection, 278 MB from 128 of them, until handshake_timeout.)"""
    n = len(dropped_reasons(caplog))
    conn = await RawConn.open(HOST, listener.port)
    prefix = raw_frame(_wire.FrameType.HEADER_INLINE, b"",
                       length=_wire.MAX_BODY[_wire.FrameType.HEADER_INLINE])
    await conn.write(hello_bytes(NONCE) + prefix)
    reason = await wait_dropped(caplog, n)
    conn.close()
    figures.update(error=repr(reason))
    assert isinstance(reason, aiokvpipe.ProtocolError), reason
    assert "expected a handshake frame, not HEADER_INLINE" in str(reason)
    await good_client_transfers(listener)


async def test_second_hello_during_the_handshake_is_a_protocol_error(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    """A replayed HELLO where AUTH is due."""
    n = len(dropped_reasons(caplog))
    conn = await RawConn.open(HOST, listener.port)
    await conn.write(hello_bytes(NONCE) * 2)
    frames, how = await conn.read_until_close()
    reason = await wait_dropped(caplog, n)
    conn.close()
    figures.update(error=repr(reason), peer_saw=describe(frames) + [how])
    assert isinstance(reason, aiokvpipe.ProtocolError) and "expected Auth" in str(reason)
    await good_client_transfers(listener)


async def test_nccl_requested_by_a_cpu_peer_is_refused_as_unsupported(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    n = len(dropped_reasons(caplog))
    c = RawClient(HOST, listener.port, TOKEN.encode())
    await c.open()
    assert c.ctl is not None
    await c.ctl.write(hello_bytes(c.nonce, transport=_wire.Transport.NCCL, cuda=True, nccl=True))
    c.server_hello = await c.read_expect(_wire.Hello)
    await c.ctl.write(c.auth_bytes())
    frames, how = await c.ctl.read_until_close()
    reason = await wait_dropped(caplog, n)
    c.close()
    figures.update(error=repr(reason), peer_saw=describe(frames) + [how])
    assert isinstance(reason, aiokvpipe.PipeError) and "nccl" in str(reason)
    assert any(isinstance(f, _wire.Error) and f.code == _wire.ErrorCode.UNSUPPORTED
               for f in frames), describe(frames)
    await good_client_transfers(listener)


async def test_duplicate_attach_is_refused_and_the_pending_pipe_times_out(
        listener: aiokvpipe.Listener, caplog: pytest.LogCaptureFixture,
        figures: dict[str, Any]) -> None:
    n = len(dropped_reasons(caplog))
    c = RawClient(HOST, listener.port, TOKEN.encode())
    await c.open()
    await c.hello()
    await c.auth()
    first = await RawConn.open(HOST, listener.port)
    await first.write(c.attach_bytes(_wire.Direction.CLIENT_TO_SERVER))
    dup = await RawConn.open(HOST, listener.port)
    await dup.write(c.attach_bytes(_wire.Direction.CLIENT_TO_SERVER))
    reason = await wait_dropped(caplog, n)
    # The half-attached session never completes: dropped at the handshake timeout.
    assert c.ctl is not None
    _, how = await c.ctl.read_until_close(timeout=HANDSHAKE_TIMEOUT_S + 2)
    reasons = dropped_reasons(caplog)[n:]
    for conn in (first, dup):
        conn.abort()
    c.close()
    figures.update(error=repr(reason), then=[repr(r) for r in reasons[1:]], control_end=how)
    assert isinstance(reason, aiokvpipe.ProtocolError) and "already attached" in str(reason)
    assert how in ("eof", "reset")
    await good_client_transfers(listener)


# -- after the handshake: an open pipe, then a violation -----------------------------------------


#: A HEADER whose payload rides in the same frame (aiokvpipe >= the inline-payload change).
_INLINE = int(getattr(_wire.FrameType, "HEADER_INLINE", 20))


def _hdr(c: RawClient, specs: list[tuple[int, tuple[int, ...]]], **kw: Any) -> bytes:
    return c.header_bytes(specs, **kw)


OPEN_PIPE_CASES: dict[str, tuple[Callable[[RawClient], bytes], str]] = {
    # name: (bytes written on the control connection, text the ProtocolError must contain)
    "unknown-dtype": (lambda c: raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 200, 1, [4])]),
                      "unknown dtype code 200"),
    "dtype-zero": (lambda c: raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 0, 1, [4])]),
                   "unknown dtype code 0"),
    "huge-shape-beyond-limit": (
        lambda c: raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 13, 2, [1 << 40, 1 << 40])]),
        "payload limit"),
    "huge-shape-unallocatable": (  # 192 TiB: within the wire's limit, beyond any address space
        lambda c: _hdr(c, [(14, (3 << 46,))]), ""),
    "negative-dimension": (lambda c: raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 1, 1, [U64_MAX])]),
                           "payload limit"),
    "negative-dimension-times-zero": (
        lambda c: raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 1, 2, [0, U64_MAX])]),
        "payload limit"),
    "oversized-header-length": (lambda c: raw_frame(_wire.FrameType.HEADER, b"",
                                                    length=0xFFFFFFF0), "exceeds"),
    "oversized-key-length": (lambda c: raw_header(0, 5000, b"k" * 5000, 0, 0, []), "5000"),
    "key-length-lies": (lambda c: raw_header(0, 900, b"k", 0, 0, []), "truncated"),
    "tensor-count-beyond-limit": (lambda c: raw_header(0, 0xFFFF, b"", 2, 0xFFFFFFFF, []),
                                  "4294967295"),
    "ndim-beyond-limit": (lambda c: raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 1, 255, [1] * 255)]),
                          "255"),
    "invalid-utf8-key": (lambda c: raw_header(0, 2, b"\xff\xfe", 0, 0, []), "UTF-8"),
    "wrong-sequence-number": (lambda c: raw_header(7, 0xFFFF, b"", 0, 0, []), "where #0"),
    "replayed-header": (lambda c: _hdr(c, []) + raw_header(0, 0xFFFF, b"", 0, 0, []),
                        "where #1"),
    "hello-on-an-open-pipe": (lambda c: hello_bytes(c.nonce), "unexpected Hello"),
    "auth-replayed-on-an-open-pipe": (lambda c: c.auth_bytes(), "unexpected Auth"),
    "credit-never-used": (lambda c: _wire.encode(_wire.Credit(1)), "more credit"),
    "credit-negative-as-u64": (lambda c: _wire.encode(_wire.Credit(U64_MAX)), "more credit"),
    "close-with-wrong-count": (lambda c: _wire.encode(_wire.Close(3)), "closed after 3"),
    "header-after-close": (lambda c: _wire.encode(_wire.Close(0)) + _hdr(c, []),
                           "after the peer's CLOSE"),
    "error-frame": (lambda c: _wire.encode(_wire.Error(_wire.ErrorCode.INTERNAL, "boom")),
                    "boom"),
    "trailing-bytes-in-credit": (lambda c: raw_frame(_wire.FrameType.CREDIT, bytes(7)),
                                 "truncated"),
    "inline-payload-beyond-limit": (  # 1 MiB announced "inline": the frame is refused
        lambda c: raw_frame(_INLINE, raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 14, 1, [1 << 20])])
                            [8:]), "1048576"),
    "inline-payload-shorter-than-announced": (
        lambda c: raw_frame(_INLINE, raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 14, 1, [100])])[8:]
                            + bytes(10)), "truncated"),
    "inline-payload-longer-than-announced": (
        lambda c: raw_frame(_INLINE, raw_header(0, 0xFFFF, b"", 1, 1, [(b"", 14, 1, [10])])[8:]
                            + bytes(100)), "stray"),
    "beyond-receive-credits": (  # 8 MiB granted; the second message overruns it
        lambda c: _hdr(c, [(14, (1,))]) + _hdr(c, [(14, (9 << 20,))]), "beyond the receive"),
}


#: What breaks the pipe where it is not the peer's protocol violation: our own failure to
#: allocate what it announced (ours, chained as it is), and the peer's report of its own.
CAUSE_TYPE: dict[str, type[BaseException] | tuple[type[BaseException], ...]] = {
    "huge-shape-unallocatable": (MemoryError, RuntimeError),
    "error-frame": aiokvpipe.PeerFailure,
}


@pytest.mark.parametrize("case", list(OPEN_PIPE_CASES))
async def test_hostile_frame_on_an_open_pipe_breaks_only_that_pipe(
        case: str, listener: aiokvpipe.Listener, figures: dict[str, Any]) -> None:
    build, text = OPEN_PIPE_CASES[case]
    loop = asyncio.get_running_loop()
    before = Snapshot.take()
    c, pipe = await open_raw_pipe(listener)
    pending = asyncio.ensure_future(pipe.recv(key="never-sent"))
    await asyncio.sleep(0)
    assert c.ctl is not None
    t0 = loop.time()
    await c.ctl.write(build(c))
    try:
        await asyncio.wait_for(pending, 2.0)
    except aiokvpipe.PipeError as exc:
        err: BaseException = exc
    else:  # pragma: no cover - the assertion below reports it
        err = AssertionError("recv() returned")
    dt = loop.time() - t0
    frames, how = await c.ctl.read_until_close(timeout=3)
    later = await asyncio.gather(pipe.recv(), pipe.send(torch.ones(1)), return_exceptions=True)
    if isinstance(err, aiokvpipe.PipeClosed) and case == "header-after-close":
        err = later[0]  # the CLOSE ended the pending recv() gracefully; the header broke it
    c.close()
    await c.wait_closed()
    await pipe.aclose()
    figures.update(case=case, error=repr(err.__cause__),
                   time_to_error={"max_s": round(dt, 4)}, peer_saw=describe(frames) + [how])
    assert isinstance(err, aiokvpipe.BrokenPipe), err
    assert isinstance(err.__cause__, CAUSE_TYPE.get(case, aiokvpipe.ProtocolError)), \
        repr(err.__cause__)
    assert text in str(err.__cause__), f"{case}: {err.__cause__!r} does not say {text!r}"
    assert all(isinstance(e, aiokvpipe.BrokenPipe) for e in later), later
    assert how in ("eof", "reset")
    await good_client_transfers(listener)
    leaks = await before.settle()
    figures["leaks"] = leaks
    assert not any(leaks.values()), (leaks, before.describe_tasks())


async def test_payload_cut_short_breaks_the_pipe(listener: aiokvpipe.Listener,
                                                 figures: dict[str, Any]) -> None:
    """A header announces 1 MiB, 1000 bytes arrive, then the data connection closes."""
    c, pipe = await open_raw_pipe(listener)
    assert c.ctl is not None and c.c2s is not None
    pending = asyncio.ensure_future(pipe.recv())
    await c.ctl.write(c.header_bytes([(14, (1 << 20,))]))
    await c.c2s.write(bytes(1000))
    c.c2s.abort()
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        await asyncio.wait_for(pending, 2.0)
    c.close()
    await pipe.aclose()
    figures.update(error=repr(info.value.__cause__))
    await good_client_transfers(listener)


# -- a hostile listener: the connecting side must fail clearly too --------------------------------


async def _fake_server(script: Callable[[RawConn], Awaitable[None]]) -> asyncio.Server:
    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conn = RawConn(r, w)
        try:
            await script(conn)
        except (OSError, TimeoutError):
            pass
        finally:
            conn.abort()

    return await asyncio.start_server(handle, HOST, 0)


async def _server_hello(conn: RawConn, version: int = _wire.PROTOCOL_VERSION) -> _wire.Hello:
    client_hello = await conn.read_frame()
    assert isinstance(client_hello, _wire.Hello)
    await conn.write(hello_bytes(secrets.token_bytes(32), version=version))
    return client_hello


async def _idle(conn: RawConn) -> None:
    await conn.read_until_close(timeout=30)


async def _bad_version(conn: RawConn) -> None:
    await _server_hello(conn, version=_wire.PROTOCOL_VERSION + 1)
    await _idle(conn)


async def _forged_accept(conn: RawConn) -> None:
    await _server_hello(conn)
    await conn.read_frame()
    await conn.write(_wire.encode(_wire.Accept(bytes(32), bytes(16), _wire.Transport.TCP)))
    await _idle(conn)


async def _no_proof_accept(conn: RawConn) -> None:
    await _server_hello(conn)
    await conn.read_frame()
    await conn.write(_wire.encode(_wire.Accept(b"", bytes(16), _wire.Transport.TCP)))
    await _idle(conn)


async def _oversized_accept(conn: RawConn) -> None:
    await _server_hello(conn)
    await conn.read_frame()
    await conn.write(raw_frame(_wire.FrameType.ACCEPT, b"", length=1 << 30))
    await _idle(conn)


async def _nccl_forced_on_cpu(conn: RawConn) -> None:
    hello = await conn.read_frame()
    assert isinstance(hello, _wire.Hello)
    nonce = secrets.token_bytes(32)
    await conn.write(hello_bytes(nonce))
    await conn.read_frame()
    proof = _handshake.proof(TOKEN.encode(), False, hello.nonce, nonce)
    ids = (bytes(128), bytes(128))
    await conn.write(_wire.encode(_wire.Accept(proof, bytes(16), _wire.Transport.NCCL, ids)))
    await _idle(conn)


async def _says_we_broke_the_protocol(conn: RawConn) -> None:
    await conn.read_frame()  # our HELLO: "unreadable", the listener says
    await conn.write(_wire.encode(_wire.Error(_wire.ErrorCode.PROTOCOL,
                                              "peer speaks protocol 10, we speak 9")))
    await _idle(conn)


async def _garbage(conn: RawConn) -> None:
    await conn.write(b"SSH-2.0-OpenSSH_9.6\r\n")
    await _idle(conn)


async def _silent(conn: RawConn) -> None:
    await _idle(conn)


HOSTILE_SERVERS: dict[str, tuple[Callable[[RawConn], Awaitable[None]],
                                  tuple[type[BaseException], ...], str]] = {
    "wrong-version": (_bad_version, (aiokvpipe.ProtocolError,),
                      f"protocol {_wire.PROTOCOL_VERSION + 1}"),
    "forged-accept-proof": (_forged_accept, (aiokvpipe.AuthenticationError,), "prove"),
    "accept-without-proof": (_no_proof_accept, (aiokvpipe.AuthenticationError,), "prove"),
    "oversized-accept": (_oversized_accept, (aiokvpipe.ProtocolError,), "exceeds"),
    "garbage-banner": (_garbage, (aiokvpipe.ProtocolError,), "unknown frame type"),
    # the listener's verdict on our bytes: the blame is ours (a ProtocolError still)
    "says-we-broke-the-protocol": (_says_we_broke_the_protocol, (PeerSaysProtocolError,),
                                   "peer speaks protocol 10"),
    "silent-server": (_silent, (TimeoutError,), "within handshake_timeout=1 s"),
    "nccl-forced-on-a-cpu-client": (_nccl_forced_on_cpu, (aiokvpipe.PipeError,), "nccl"),
}


@pytest.mark.parametrize("case", list(HOSTILE_SERVERS))
async def test_hostile_listener_gives_the_connecting_side_a_clear_error(
        case: str, figures: dict[str, Any], loop_errors: list[dict[str, Any]]) -> None:
    """``connect()`` documents: ``ProtocolError`` when the peer is not aiokvpipe,
    ``AuthenticationError`` when it cannot prove the token, ``TimeoutError`` when nobody
    answers. A listener that picks a transport the client did not offer is violating the
    protocol too (a remote error, not an argument error)."""
    script, exc_types, text = HOSTILE_SERVERS[case]
    loop = asyncio.get_running_loop()
    before = Snapshot.take()
    server = await _fake_server(script)
    port = server.sockets[0].getsockname()[1]
    t0 = loop.time()
    try:
        with pytest.raises(Exception) as info:
            await asyncio.wait_for(aiokvpipe.connect(HOST, port, token=TOKEN,
                                                     handshake_timeout=1.0), 10)
    finally:
        server.close()
        await server.wait_closed()
    dt = loop.time() - t0
    figures.update(case=case, error=repr(info.value), time_to_error={"max_s": round(dt, 4)})
    chain, e = [], info.value.__cause__
    while e is not None and len(chain) < 4:
        chain.append(repr(e))
        e = e.__cause__
    assert isinstance(info.value, exc_types), (
        f"{case}: connect() raised {info.value!r} (cause chain: {' <- '.join(chain) or 'none'}),"
        f" not {' or '.join(t.__name__ for t in exc_types)}")
    assert text in str(info.value), f"{case}: {info.value!r} does not say {text!r}"
    assert not loop_errors, describe_loop_errors(loop_errors)
    leaks = await before.settle()
    figures["leaks"] = leaks
    assert not any(leaks.values()), (leaks, before.describe_tasks())


def test_hand_built_frames_match_the_encoder() -> None:
    """The field-by-field builder that the hostile cases use agrees with the real encoder."""
    h = _wire.Header(3, "key", _wire.Structure.LIST,
                     (_wire.TensorSpec(1, (2, 3), 4), _wire.TensorSpec(14, (5,), 1)))
    assert raw_header(3, 3, b"key", 2, 2, [(b"", 1, 2, [2, 3]), (b"", 14, 1, [5])]) == \
        _wire.encode(h)
    assert raw_frame(_wire.FrameType.CREDIT, struct.pack(">Q", 9)) == \
        _wire.encode(_wire.Credit(9))
