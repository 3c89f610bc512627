"""Failures of our own side, told apart from the peer's, and never a wrong delivery.

Each test is the regression test of a hole in issue 10; the failure is injected at the
narrowest seam (the data plane's ``post_send``/``post_recv``), the rest is a real pipe over
127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest
import torch
from conftest import PairFactory

import aiokvpipe
from aiokvpipe import _wire
from aiokvpipe._control import ControlChannel
from aiokvpipe._errors import PeerSaysProtocolError

pytestmark = pytest.mark.timeout(30)

BIG = 1 << 18  # float32 elements: 1 MiB, above the inline limit, so it takes the data plane


def _fail_once(obj: Any, name: str, exc: BaseException) -> None:
    real = getattr(obj, name)
    calls = {"n": 0}

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise exc
        return real(*args, **kwargs)

    setattr(obj, name, failing)


async def test_plane_refusing_a_payload_breaks_the_pipe_and_nothing_is_misdelivered(
        pair_factory: PairFactory) -> None:
    # Hole 1: the header used to leave before the payload was posted. The plane failing then
    # left the peer with a posted receive that the *next* message filled: request 1's data
    # delivered under request 2's key.
    a, b = await pair_factory()
    oom = RuntimeError("CUDA out of memory (staging)")
    _fail_once(a._plane, "post_send", oom)
    got_2 = asyncio.create_task(b.recv(key="request-2"))
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        await a.send(torch.full((BIG,), 1.0), key="request-1")
    assert info.value.__cause__ is oom
    with pytest.raises(aiokvpipe.BrokenPipe):  # the pipe is broken, not silently healthy
        await a.send(torch.full((BIG,), 2.0), key="request-2")
    async with asyncio.timeout(5):
        with pytest.raises(aiokvpipe.BrokenPipe) as peer_info:
            await got_2
    # The peer learns that its partner failed, not that it misbehaved.
    assert isinstance(peer_info.value.__cause__, aiokvpipe.PeerFailure)
    assert "out of memory" in str(peer_info.value.__cause__)
    assert a.stats.inflight_bytes == 0


async def test_failing_to_allocate_a_receive_is_ours_not_the_peers(
        pair_factory: PairFactory) -> None:
    # Hole 5: an allocation failure here used to be raised as a ProtocolError and reported
    # to the peer as *its* protocol violation.
    a, b = await pair_factory()
    oom = RuntimeError("out of memory allocating 1 MiB")
    _fail_once(b._plane, "post_recv", oom)
    pending = asyncio.create_task(b.recv())
    await a.send(torch.zeros(BIG))
    async with asyncio.timeout(5):
        with pytest.raises(aiokvpipe.BrokenPipe) as here:
            await pending
        assert here.value.__cause__ is oom
        with pytest.raises(aiokvpipe.BrokenPipe) as there:
            await a.wait_closed()
    assert isinstance(there.value.__cause__, aiokvpipe.PeerFailure)
    assert not isinstance(there.value.__cause__, aiokvpipe.ProtocolError)


async def test_messages_arriving_for_a_discarded_key_give_their_credits_back(
        pair_factory: PairFactory) -> None:
    # Hole 8: discard() only dropped what had arrived; a later arrival held its credits for
    # the life of the pipe, and credits are shared: enough of them stall every sender.
    a, b = await pair_factory(recv_buffer_bytes=1 << 20)
    assert b.discard("abandoned") == 0
    async with asyncio.timeout(10):
        for _ in range(8):  # 8 × 512 KiB through a 1 MiB credit window
            await a.send(torch.zeros(BIG // 2), key="abandoned")
        await a.send(torch.ones(4), key="wanted")
        assert bool((await b.recv(key="wanted") == 1).all())
    assert b.stats.recv_buffered_messages == 0 and b.stats.recv_buffered_bytes == 0
    # Asking for the key again takes it back: later messages are kept.
    later = asyncio.create_task(b.recv(key="abandoned"))
    await asyncio.sleep(0)
    await a.send(torch.full((3,), 7.0), key="abandoned")
    async with asyncio.timeout(5):
        assert (await later).tolist() == [7.0, 7.0, 7.0]


async def test_wait_closed_returns_after_a_graceful_close_and_raises_after_a_break(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    waiting = asyncio.create_task(b.wait_closed())
    await a.aclose()
    async with asyncio.timeout(5):
        await waiting
        await b.aclose()
    c, d = await pair_factory()
    c._control.abort()  # the connection drops under d
    async with asyncio.timeout(5):
        with pytest.raises(aiokvpipe.BrokenPipe) as info:
            await d.wait_closed()
    assert isinstance(info.value.__cause__, ConnectionError)


# -- connect(): what it raises ------------------------------------------------------------------


async def test_connect_to_a_name_that_does_not_resolve_is_a_pipe_error() -> None:
    # Hole 9: socket.gaierror used to escape connect() as it was.
    with pytest.raises(aiokvpipe.PipeError) as info:
        await aiokvpipe.connect("no-such-host.invalid", 1, connect_timeout=2)
    assert isinstance(info.value.__cause__, socket.gaierror)


async def test_listener_dropping_the_handshake_is_a_broken_pipe() -> None:
    # Hole 9: a listener that hangs up mid-handshake gave a bare ConnectionResetError.
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(_wire.FRAME_PREFIX_BYTES)  # the client's HELLO has come
        writer.transport.abort()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10):
            with pytest.raises(aiokvpipe.BrokenPipe) as info:
                await aiokvpipe.connect("127.0.0.1", port, connect_timeout=2)
        assert isinstance(info.value.__cause__, OSError)
    finally:
        server.close()
        await server.wait_closed()


async def test_options_object_and_keywords_combine() -> None:
    opts = aiokvpipe.PipeOptions(recv_buffer_bytes=1 << 20, close_timeout=3)
    async with await aiokvpipe.listen("127.0.0.1", 0, opts, max_inflight_bytes=1 << 21) as ls:
        accept = asyncio.create_task(ls.accept())
        async with await aiokvpipe.connect("127.0.0.1", ls.port, opts) as a:
            b = await accept
            assert a.stats.send_credits == 1 << 20
            assert b._send_budget.capacity == 1 << 21 and b._close_timeout == 3
            await b.aclose()
    with pytest.raises(TypeError):
        await aiokvpipe.connect("127.0.0.1", 1, {"device": "cpu"})  # type: ignore[arg-type]


# -- the control channel ------------------------------------------------------------------------


class _Transport(asyncio.Transport):
    """The narrowest seam for a byte-exact control-channel test: records what is written."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.paused = False
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class _Sink:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lost: BaseException | None = None

    def on_data(self, data: bytes | bytearray | memoryview) -> bool:
        self.data += data
        return False

    def on_connection_lost(self, exc: BaseException) -> None:
        self.lost = exc


class _Budgeted(_Sink):
    """A handler that takes at most ``per_turn`` bytes per call and keeps the rest back, as
    the pipe does with a turn's budget of frames."""

    def __init__(self, per_turn: int) -> None:
        super().__init__()
        self.per_turn = per_turn
        self.kept = bytearray()
        self.calls = 0
        self.lost_after = -1

    def on_data(self, data: bytes | bytearray | memoryview) -> bool:
        self.calls += 1
        self.kept += data
        self.data += self.kept[:self.per_turn]
        del self.kept[:self.per_turn]
        return bool(self.kept)

    def on_connection_lost(self, exc: BaseException) -> None:
        self.lost_after = len(self.data)
        super().on_connection_lost(exc)


async def test_a_handler_that_keeps_bytes_back_is_called_again_next_iteration() -> None:
    ch = ControlChannel()
    transport = _Transport()
    ch.connection_made(transport)
    ch.attach(sink := _Budgeted(100))
    ch.data_received(bytes(range(250)))
    assert bytes(sink.data) == bytes(range(100)) and transport.paused  # one turn's worth
    ch.data_received(b"\xff" * 10)  # read in the same iteration: waits its turn, in order
    assert len(sink.data) == 100
    await asyncio.sleep(0)
    assert bytes(sink.data) == bytes(range(200)) and transport.paused
    await asyncio.sleep(0)
    assert bytes(sink.data) == bytes(range(250)) + b"\xff" * 10
    assert not sink.kept and not transport.paused  # all taken: reading goes on


async def test_bytes_kept_back_are_handled_before_the_loss_is_reported() -> None:
    # A peer's last messages and CLOSE, read in one go and then its connection closing: the
    # pipe must see them all before it hears of the loss, or it breaks instead of closing.
    ch = ControlChannel()
    ch.connection_made(_Transport())
    ch.attach(sink := _Budgeted(100))
    ch.data_received(bytes(1000))
    ch.connection_lost(None)
    assert len(sink.data) == 1000 and sink.lost_after == 1000
    assert isinstance(sink.lost, ConnectionResetError)


async def test_a_busy_client_reading_ready_and_many_messages_at_once_is_not_flooded() -> None:
    # Hole 3: frames after READY counted against the handshake's early-frame limit; a client
    # whose loop stalled right after connecting read READY plus 64 or more messages in one
    # data_received and broke with "peer flooded the handshake".
    ch = ControlChannel()
    ch.connection_made(_Transport())
    messages = b"".join(_wire.encode_header(i, None, _wire.Structure.NONE, [], True)
                        for i in range(300))
    ch.data_received(_wire.encode(_wire.Ready()) + messages)
    assert isinstance(await ch.read_frame(), _wire.Ready)
    sink = _Sink()
    ch.attach(sink)
    assert bytes(sink.data) == messages and sink.lost is None


async def test_early_bytes_are_bounded_by_pausing_not_by_dropping_the_peer() -> None:
    ch = ControlChannel()
    transport = _Transport()
    ch.connection_made(transport)
    ch.data_received(_wire.encode(_wire.Ready()) + bytes(300_000))
    assert transport.paused  # held, not parsed and not queued without bound
    await ch.read_frame()
    ch.attach(_Sink())
    assert not transport.paused


async def test_drain_on_a_lost_connection_raises_broken_pipe_with_its_cause() -> None:
    # Hole 9: drain() raised BrokenPipe without its cause.
    ch = ControlChannel()
    ch.connection_made(_Transport())
    reset = ConnectionResetError("reset by peer")
    ch.attach(_Sink())
    ch.connection_lost(reset)
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        await ch.drain()
    assert info.value.__cause__ is reset


async def test_a_dead_peer_is_logged_once_not_per_write(pair_factory: PairFactory,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    # Hole 10: the survivor of a peer that died mid-stream logged "socket.send() raised
    # exception." dozens of times.
    a, b = await pair_factory()
    caplog.set_level(logging.INFO)
    b._control._transport.abort()  # type: ignore[union-attr]
    with pytest.raises(aiokvpipe.BrokenPipe):
        async with asyncio.timeout(10):
            while True:
                await a.send(torch.zeros(16))
    await a.aclose()
    floods = [r for r in caplog.records if "raised exception" in r.getMessage()]
    breaks = [r for r in caplog.records if r.name == "aiokvpipe" and "broke" in r.getMessage()
              and r.levelno >= logging.WARNING]
    assert not floods
    assert len([r for r in breaks if str(a.peer) in r.getMessage()]) == 1


async def test_a_broken_pipe_keeps_nothing_the_failing_send_held(
        pair_factory: PairFactory, caplog: pytest.LogCaptureFixture) -> None:
    # The failure's traceback ran through send(), whose frame holds the tensor; the pipe
    # keeps its error (and a log handler its records) while the application keeps the pipe.
    # Neither may keep the tensor: on a GPU that is the KV cache the caller wants freed.
    import gc
    import weakref

    caplog.set_level(logging.DEBUG, logger="aiokvpipe")
    a, _ = await pair_factory()
    _fail_once(a._plane, "post_send", RuntimeError("CUDA out of memory (staging)"))
    tensor = torch.full((BIG,), 1.0)
    alive = weakref.ref(tensor)
    with pytest.raises(aiokvpipe.BrokenPipe):
        await a.send(tensor)
    del tensor
    gc.collect()
    assert alive() is None, [type(r).__name__ for r in gc.get_referrers(alive())]
    assert "breaks on Traceback" in caplog.text  # where it failed is still told


async def test_the_peers_verdict_that_we_broke_the_protocol_is_not_told_back(
        pair_factory: PairFactory) -> None:
    # The peer says our frames broke the wire format: that is its verdict on us, kept apart
    # from a ProtocolError about the peer's frames (it was taken for one, and an ERROR
    # frame blaming the peer went back).
    a, b = await pair_factory()
    said: list[bytes] = []
    b._control.say = said.append  # type: ignore[method-assign]
    a._control.write_encoded(_wire.encode(_wire.Error(_wire.ErrorCode.PROTOCOL, "junk")))
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        async with asyncio.timeout(5):
            await b.wait_closed()
    cause = info.value.__cause__
    assert isinstance(cause, aiokvpipe.ProtocolError) and "junk" in str(cause)
    assert isinstance(cause, PeerSaysProtocolError)
    assert said == []


async def test_every_waiter_hears_of_a_break_even_if_tearing_down_fails(
        pair_factory: PairFactory) -> None:
    # _break ended waiters, then aborted the plane and only then marked the pipe finished:
    # a plane whose abort raised left wait_closed() waiting for ever.
    a, b = await pair_factory()
    boom = RuntimeError("the plane's abort failed (injected)")

    def failing_abort(exc: BaseException) -> None:
        raise boom

    b._plane.abort = failing_abort  # type: ignore[method-assign]
    receiving = asyncio.create_task(b.recv())
    a._control.abort()  # the connection breaks
    async with asyncio.timeout(5):
        with pytest.raises(aiokvpipe.BrokenPipe):
            await b.wait_closed()
        with pytest.raises(aiokvpipe.BrokenPipe):
            await receiving


async def test_a_close_read_after_a_failure_of_ours_in_the_same_read_starts_nothing(
        pair_factory: PairFactory) -> None:
    """A message's receive cannot be allocated here (the pipe breaks, our failure) and the
    peer's CLOSE comes in the same read: the rest of the read is not acted upon. (The CLOSE
    started a close handshake on the broken pipe, a task that spun for ever, waiting for a
    payload that had failed.)"""
    a, b = await pair_factory()
    oom = MemoryError("no memory for the receive buffer (injected)")

    def failing(*args: Any) -> Any:
        raise oom

    b._plane._allocate = failing  # type: ignore[attr-defined]
    b._control._set_reading(False)  # header and CLOSE wait in the socket: one read
    async with asyncio.timeout(20):
        await a.send(torch.zeros(100_000))  # 400 kB: through the data plane
        closing = asyncio.create_task(a.aclose())
        while not a._proto.close_sent:
            await asyncio.sleep(0)
        b._control._set_reading(True)
        with pytest.raises(aiokvpipe.BrokenPipe):
            await b.recv()
        assert b._error is not None and b._error.__cause__ is oom, repr(b._error)
        assert b._closer is None, "a close handshake started on a broken pipe"
        await closing  # (the peer hears of our failure: its close ends there)
        assert isinstance(a._error.__cause__, aiokvpipe.PeerFailure), repr(a._error)


async def test_a_listener_failing_during_the_handshake_tells_the_client(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure of the listener's own while it makes the pipe (a data plane or NCCL that
    does not start, here its last step) reaches connect() as PeerFailure, as documented,
    not as a dropped connection."""
    from aiokvpipe._protocol import ServerHandshake

    boom = RuntimeError("the listener's data plane failed to start (injected)")

    def failing_ready(self: Any) -> Any:
        raise boom

    monkeypatch.setattr(ServerHandshake, "ready", failing_ready)
    async with await aiokvpipe.listen() as lst:
        with pytest.raises(aiokvpipe.PeerFailure, match="failed to start"):
            await asyncio.wait_for(aiokvpipe.connect("127.0.0.1", lst.port), 10)


async def test_a_data_plane_that_does_not_start_here_is_a_pipe_error_from_connect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """This end's data plane fails to start (out of memory, NCCL or CUDA refusing): connect()
    raises PipeError with that cause, as documented, not the raw error. The listener's own
    start goes ahead (it then sees the client leave)."""
    from aiokvpipe._tcp_plane import TcpPlane

    boom = MemoryError("no memory for the client's data plane (injected)")
    start = TcpPlane.start
    listening_port = []

    async def failing_here(send_sock: socket.socket, *args: Any) -> Any:
        if send_sock.getpeername()[1] in listening_port:  # the client's socket, not one
            raise boom  # the listener accepted
        return await start(send_sock, *args)

    monkeypatch.setattr(TcpPlane, "start", failing_here)
    async with await aiokvpipe.listen(transport="tcp") as lst:
        listening_port.append(lst.port)
        with pytest.raises(aiokvpipe.PipeError) as info:
            await asyncio.wait_for(aiokvpipe.connect("127.0.0.1", lst.port,
                                                     transport="tcp"), 10)
    assert info.value.__cause__ is boom
    assert not isinstance(info.value, (aiokvpipe.BrokenPipe, aiokvpipe.PeerFailure))


async def test_a_message_that_cannot_be_kept_for_the_callers_stream_stays_first_in_line(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Handing a received payload over fails here (a CUDA tensor's ``record_stream`` for the
    caller's stream raises): recv() raises that error, and the message stays first in line
    with its credit held, for the next recv(). (It was gone, its credit given back, the
    pipe still open: the next recv() waited for ever.)"""
    from aiokvpipe import _pipe

    a, b = await pair_factory()
    big = torch.arange(BIG, dtype=torch.float32)  # a payload, not inline
    boom = RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    def failing(self: torch.Tensor, stream: object) -> None:
        raise boom

    await a.send(big, key="k")
    await a.send(big + 1, key="k")
    monkeypatch.setattr(b, "_on_cuda", True)  # a CUDA receiver's claim, on the CPU
    monkeypatch.setattr(_pipe, "current_stream", lambda device: object())
    monkeypatch.setattr(torch.Tensor, "record_stream", failing)
    with pytest.raises(RuntimeError) as raised:
        await asyncio.wait_for(b.recv("k"), 5)
    assert raised.value is boom
    monkeypatch.setattr(b, "_on_cuda", False)
    assert b.state is aiokvpipe.State.OPEN
    assert torch.equal(await asyncio.wait_for(b.recv("k"), 5), big)
    assert torch.equal(await asyncio.wait_for(b.recv("k"), 5), big + 1)


@pytest.mark.parametrize("seam", ["string_at", "byte_view"])
async def test_a_small_message_whose_frame_cannot_be_made_is_not_sent_and_the_pipe_stays_in_step(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch, seam: str) -> None:
    """Copying a small message into its frame fails (out of memory): send() raises that
    error, nothing is sent, and the next message goes through. (The header's sequence
    number and the credit it carried were taken before the copy: the next header came one
    ahead, and the peer broke the pipe.)"""
    from aiokvpipe import _pipe

    a, b = await pair_factory()
    boom = MemoryError("no memory for the frame (injected)")
    real = getattr(_pipe, seam)

    def failing_once(*args: Any) -> Any:
        monkeypatch.setattr(_pipe, seam, real)
        raise boom

    monkeypatch.setattr(_pipe, seam, failing_once)
    one = torch.ones(16)  # one tensor: copied by string_at; two: through byte views
    msg: Any = one if seam == "string_at" else {"x": one, "y": one + 1}
    with pytest.raises(MemoryError):
        await asyncio.wait_for(a.send(msg, key="lost"), 5)
    assert a.state is aiokvpipe.State.OPEN
    await asyncio.wait_for(a.send(torch.full((16,), 2.0), key="k"), 5)
    assert torch.equal(await asyncio.wait_for(b.recv("k"), 5), torch.full((16,), 2.0))
    assert b.stats.recv_buffered_messages == 0  # nothing of the failed send arrived
