"""The control channel: framed messages over one TCP connection, plus heartbeats.

A plain :class:`asyncio.Protocol`: ``data_received`` feeds the sans-I/O
:class:`~aiokvpipe._wire.FrameDecoder` and hands each frame to the pipe synchronously, so a
header costs no task switch. Bulk payload never travels here, so control frames never wait
behind it.

Two phases: during the handshake frames are queued for :meth:`ControlChannel.read_frame`;
:meth:`ControlChannel.attach` then routes them, and connection loss, to a handler.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Protocol

from . import _wire
from ._errors import BrokenPipe, ProtocolError, fresh

log = logging.getLogger("aiokvpipe")

#: Frames the handshake may have queued before anyone reads them; more is a protocol error.
_MAX_EARLY_FRAMES = 64


class FrameHandler(Protocol):
    def on_frame(self, frame: _wire.Frame) -> None: ...

    def on_connection_lost(self, exc: BaseException) -> None: ...


class HeartbeatMissed(TimeoutError):
    """No frame arrived from the peer within the heartbeat timeout."""


class ControlChannel(asyncio.Protocol):
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._decoder = _wire.FrameDecoder()
        self._early: deque[_wire.Frame] = deque()
        self._early_waiter: asyncio.Future[None] | None = None
        self._handler: FrameHandler | None = None
        self._lost: BaseException | None = None
        self._write_paused = False
        self._drain_waiters: deque[asyncio.Future[None]] = deque()
        self._last_heard = self._loop.time()
        self._heartbeat: asyncio.Task[None] | None = None
        #: Resolves (to the cause) when the connection ends, so a handshake step that waits
        #: for something else -- data connections, NCCL -- can stop waiting for a dead peer.
        self.lost: asyncio.Future[BaseException] = self._loop.create_future()

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; the interface is the same.
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self._last_heard = self._loop.time()
        if self._lost is not None:
            return
        try:
            frames = self._decoder.feed(data)
        except ProtocolError as exc:
            self._fail(exc)
            return
        for frame in frames:
            if self._handler is not None:
                try:
                    self._handler.on_frame(frame)
                except Exception as exc:  # ProtocolError, or e.g. no memory for a payload
                    self._fail(exc)
                    return
            elif len(self._early) >= _MAX_EARLY_FRAMES:
                self._fail(ProtocolError("peer flooded the handshake with frames"))
                return
            else:
                self._early.append(frame)
                self._wake_reader()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc if exc is not None else ConnectionResetError("peer closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        while self._drain_waiters:
            fut = self._drain_waiters.popleft()
            if not fut.done():
                fut.set_result(None)

    # -- our API ------------------------------------------------------------------------------

    @property
    def peer(self) -> object:
        return self._transport.get_extra_info("peername") if self._transport else None

    def write(self, frame: _wire.Frame) -> None:
        """Queue ``frame``; raises :class:`BrokenPipe` if the connection is gone."""
        self.write_encoded(_wire.encode(frame))

    def write_encoded(self, data: bytes) -> None:
        """Queue frames already encoded (the pipe joins a message's frames into one write)."""
        if self._lost is not None or self._transport is None:
            raise BrokenPipe("control connection is closed") from self._lost
        self._transport.write(data)

    @property
    def write_paused(self) -> bool:
        """The transport's buffer is over its high-water mark: :meth:`drain` would wait."""
        return self._write_paused

    async def drain(self) -> None:
        """Wait while the kernel's send buffer is full (bounded control-frame backlog)."""
        if not self._write_paused:
            return
        if self._lost is not None:
            raise BrokenPipe("control connection is closed") from self._lost
        fut = self._loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    async def read_frame(self) -> _wire.Frame:
        """Next frame during the handshake (before :meth:`attach`)."""
        while not self._early:
            if isinstance(self._lost, ProtocolError):
                raise fresh(self._lost)  # the peer is not speaking our protocol: say so
            if self._lost is not None:
                raise BrokenPipe("connection closed during the handshake") from self._lost
            self._early_waiter = self._loop.create_future()
            try:
                await self._early_waiter
            finally:
                self._early_waiter = None
        return self._early.popleft()

    def attach(self, handler: FrameHandler) -> None:
        """Route frames (first those already queued) and connection loss to ``handler``."""
        self._handler = handler
        while self._early and self._lost is None:
            handler.on_frame(self._early.popleft())
        if self._lost is not None:
            handler.on_connection_lost(self._lost)

    def start_heartbeat(self, interval: float, timeout: float | None) -> None:
        """Send a heartbeat every ``interval`` s; fail if the peer is silent for ``timeout`` s
        (``None``: never)."""
        self._last_heard = started = self._loop.time()
        self._heartbeat = self._loop.create_task(self._heartbeat_loop(interval, timeout,
                                                                      started))

    async def _heartbeat_loop(self, interval: float, timeout: float | None,
                              started: float) -> None:
        next_beat = wake_at = started
        while self._lost is None:
            now = self._loop.time()
            if timeout is not None and now - wake_at > interval:
                # We woke late: this process was stalled (CPU starvation, a long GC, a
                # blocking call in the loop). The peer's silence over that stretch is our own
                # deafness, not its death: restart its clock instead of breaking the pipe.
                self._last_heard = max(self._last_heard, now - interval)
            if now >= next_beat:
                self.write(_wire.Heartbeat())
                next_beat = now + interval
            if timeout is None:
                wake_at = next_beat
            else:
                deadline = self._last_heard + timeout
                if now >= deadline:
                    self._fail(HeartbeatMissed(f"peer silent for {now - self._last_heard:.2f} s "
                                               f"(heartbeat timeout {timeout:g} s)"))
                    return
                wake_at = min(next_beat, deadline)
            await asyncio.sleep(wake_at - now)

    def close(self) -> None:
        """Close the connection (after flushing what is queued) and stop the heartbeat."""
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once, discarding what is queued."""
        if self._heartbeat is not None and self._heartbeat is not asyncio.current_task():
            self._heartbeat.cancel()
        if self._transport is not None:
            self._transport.abort()

    # -- internals ----------------------------------------------------------------------------

    def _wake_reader(self) -> None:
        if self._early_waiter is not None and not self._early_waiter.done():
            self._early_waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._lost is not None:
            return
        self._lost = exc
        self.lost.set_result(exc)
        if isinstance(exc, ProtocolError) and self._transport is not None:
            try:
                self._transport.write(_wire.encode(_wire.Error(_wire.ErrorCode.PROTOCOL,
                                                               str(exc))))
            except Exception:  # the peer is being dropped anyway; the error is best effort
                pass
        self.abort()
        self._wake_reader()
        while self._drain_waiters:
            fut = self._drain_waiters.popleft()
            if not fut.done():
                fut.set_exception(BrokenPipe("control connection lost"))
                fut.exception()  # a waiter may be gone; don't warn about an unread error
        if self._handler is not None:
            self._handler.on_connection_lost(exc)
