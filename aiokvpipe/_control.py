"""The control channel: one TCP connection carrying frames, plus heartbeats. It only moves bytes.

A plain :class:`asyncio.Protocol`. Two phases:

* During the handshake, bytes are held raw and :meth:`ControlChannel.read_frame` parses one
  frame at a time when the handshake asks for it. Nothing is parsed ahead of the handshake:
  frames that follow its last one (a busy listener's first messages) stay raw bytes for the
  pipe. What is held is bounded by pausing the socket, never by dropping the peer.
* :meth:`ControlChannel.attach` then hands every byte, first those held, to a handler (the
  pipe, which feeds its sans-I/O protocol), synchronously, so a header costs no task switch.

Bulk payload never travels here, so control frames never wait behind it.

Writes: the first message of a loop iteration goes out at once, and so do the next ones of
the task that wrote it while it sends alone. Once other tasks send in the same iteration, the
small messages (inline: the whole message in its frame) that follow are gathered and written
together when the iteration ends (at most :data:`_HOLD_BYTES` at a time): a burst of them
from concurrent senders costs one system call and one wake-up of the peer instead of one
each. Any other frame is written at once, after what was gathered. A lone request or answer
waits for nothing, and neither does a lone task streaming. (A send() whose frame was gathered
yields once before it returns: its frame is written by then, whatever the caller does next.)
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import current_task
from typing import Final, Protocol

from . import _wire
from ._busypoll import BusyPoller
from ._errors import BrokenPipe, ProtocolError, fresh

log = logging.getLogger("aiokvpipe")

#: Raw bytes held during the handshake before reading pauses (a few handshake frames are
#: under 1 KiB; the rest is the start of the pipe's traffic, waiting for the pipe).
_EARLY_BYTES_HIGH: Final = 256 * 1024
#: Bytes handed to the pipe per loop iteration at most (then reading waits for the next).
#: 4 KiB messages on the 2-core VM: 256 KiB is about 2 ms of work.
_TURN_BYTES: Final = 256 * 1024
#: The writer of an iteration's first message when no task wrote it (a callback did).
_CALLBACK: Final = object()
#: Frames gathered by hold() are written once they reach this many bytes.
_HOLD_BYTES: Final = 256 * 1024


class ControlHandler(Protocol):
    def on_data(self, data: bytes | bytearray | memoryview) -> bool:
        """Take bytes from the peer. True: some were kept for the next loop iteration (a
        turn's worth of work was done): call again then, with new bytes or none."""
        ...

    def on_connection_lost(self, exc: BaseException) -> None: ...


class HeartbeatMissed(TimeoutError):
    """No frame arrived from the peer within the heartbeat timeout."""


class ControlChannel(asyncio.Protocol):
    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._early = bytearray()  # raw bytes received before attach()
        self._early_waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        #: Bytes handed to the handler since reading last paused for a loop iteration; it
        #: pauses again at _TURN_BYTES.
        self._turn_bytes = 0
        self._turn_paused = False
        #: The handler kept bytes back for the next iteration (see ControlHandler.on_data);
        #: bytes read meanwhile wait here for that iteration too (reading is paused then).
        self._handler_more = False
        self._waiting = bytearray()
        self._handler: ControlHandler | None = None
        self._lost: BaseException | None = None
        #: The transport's buffer is over its high-water mark: :meth:`drain` would wait. (An
        #: attribute, not a property: every send() reads it.)
        self.write_paused = False
        #: Frames written with write_soon(): they lead the next write, or go out by
        #: themselves at the next loop iteration (None: none waiting).
        self._soon: list[bytes] | None = None
        #: Frames gathered between hold() and release(), or since this loop iteration's write
        #: (None: the next write goes out at once if it is the iteration's first).
        self._held: list[bytes] | None = None
        self._held_bytes = 0
        self._held_answer_due = False  # one of them awaits an answer (write_encoded)
        #: The task that wrote this loop iteration's first message (_CALLBACK: no task did;
        #: None: none was written yet); other tasks' small messages are gathered until the
        #: iteration ends (_end_write_turn), then written together.
        self._turn_writer: object = None
        #: Another task's small messages were gathered in this iteration (_others_gathered)
        #: or the last (_concurrent): then the writer's own later ones are gathered too.
        self._others_gathered = False
        self._concurrent = False
        #: Writes are being gathered for the iteration's end (not by a hold()): one written
        #: now waits there. Its callback is queued already, so a task that yields once
        #: resumes after it (send() does, to return only once its frame was written).
        self.gathering = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: Told of every read, and of every write the peer answers, once a pipe asked for
        #: busy polling (busy_poll()).
        self._poller: BusyPoller | None = None
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
        handler = self._handler
        if handler is not None:
            if self._poller is not None:
                self._poller.read()
            if self._handler_more:  # it did a turn's work: these wait for the next turn
                self._waiting += data
                return
            self._hand(handler, data)
            self._turn_bytes += len(data)
            if (self._handler_more or self._turn_bytes >= _TURN_BYTES) \
                    and not self._turn_paused:
                # libuv reads a ready socket up to 32 times per loop iteration: at 4 KiB a
                # message that was thousands of messages handled, tens of ms without a turn
                # for anything else. Reading waits for the next iteration once this much
                # came in (counted since the last such wait: no per-read callback), or once
                # the handler kept bytes back, having done a turn's work.
                self._end_turn_soon()
            return
        self._early += data
        if len(self._early) >= _EARLY_BYTES_HIGH and not self._reading_paused:
            self._set_reading(False)
        self._wake_reader()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost reports it

    def connection_lost(self, exc: Exception | None) -> None:
        # What was read comes first: a backlog the handler kept for later turns (a peer's
        # last messages and its CLOSE, say) is acted on before the loss is reported.
        while self._handler_more and self._lost is None:
            self._hand_waiting()
        self._fail(exc if exc is not None else ConnectionResetError("peer closed the connection"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    # -- our API ------------------------------------------------------------------------------

    @property
    def peer(self) -> object:
        return self._transport.get_extra_info("peername") if self._transport else None

    def busy_poll(self, poller: BusyPoller | None) -> None:
        """Let the loop poll for the answers to our writes (see :mod:`._busypoll`): the
        poller is told of every read and of every write that awaits an answer."""
        self._poller = poller

    def write(self, frame: _wire.Frame) -> None:
        """Queue ``frame``; raises :class:`BrokenPipe` if the connection is gone."""
        self.write_encoded(_wire.encode(frame))

    def write_encoded(self, data: bytes, answer_due: bool = False, gather: bool = False
                      ) -> None:
        """Queue encoded frames; raises :class:`BrokenPipe` if the connection is gone.
        ``answer_due``: the peer answers them (a message, a block transfer's frame): the
        loop may poll for the answer (see :mod:`._busypoll`). ``gather``: a whole message (an
        inline one) that may wait to be written with the loop iteration's others (see the
        module's docstring; :attr:`gathering` says when it does); any other frame written
        meanwhile writes them at once, itself after them.

        A transport that is closing (a write already failed, its loss not yet reported)
        counts as gone: writing to it only makes asyncio log the failure again, per write.
        """
        transport = self._transport
        if self._lost is not None or transport is None or transport.is_closing():
            raise BrokenPipe("control connection is closed") from self._lost
        if self._soon is not None:  # frames written earlier go first, in this same write
            data = b"".join([*self._soon, data])
            self._soon = None
        held = self._held
        if held is None:
            # At once, as long as nothing is gathered (order): all but whole messages
            # (credits and acknowledgements, which the peer's sends may wait for; frames of
            # payloads a plane has queued already), the loop iteration's first message (a
            # lone request or answer waits for nothing), and the next ones of the task that
            # wrote it while no other task's were gathered lately (a lone task streaming has
            # nothing to gather them with). (Given the loop, current_task() makes no
            # getpid() system call.)
            if answer_due:
                writer = self._turn_writer
                if writer is None:
                    self._turn_writer = current_task(self._loop) or _CALLBACK
                    self._loop.call_soon(self._end_write_turn)
                elif gather and (self._concurrent or writer is not current_task(self._loop)):
                    # Gathered, and written together when the iteration ends: a burst of
                    # messages costs the sender one system call, and the peer one wake-up
                    # and one read, not one each.
                    held = self._held = []
                    self.gathering = True
            if held is None:
                transport.write(data)
                if answer_due and self._poller is not None:
                    self._poller.wrote(self._loop)
                return
        if (gather and self.gathering and not self._others_gathered
                and current_task(self._loop) is not self._turn_writer):
            self._others_gathered = True
        held.append(data)
        self._held_bytes += len(data)
        self._held_answer_due |= answer_due
        if self._held_bytes >= _HOLD_BYTES or (self.gathering and not gather):
            self._write_held()

    def write_soon(self, data: bytes) -> None:
        """Queue encoded frames to lead the next write, or to go out by themselves at the next
        loop iteration if nothing is written before. An acknowledgement so shares one write,
        and one wake-up of the peer, with the answer its receiver writes at once. Never
        raises: a lost connection is the channel's to report."""
        if self._lost is not None:
            return
        if self._soon is None:
            self._soon = [data]
            self._loop.call_soon(self._flush_soon)
        else:
            self._soon.append(data)

    def _end_write_turn(self) -> None:
        """The loop iteration of the last write at once ended (its callback runs first in the
        next one): write what was gathered since, and let the next write go at once."""
        self._turn_writer = None
        self._concurrent, self._others_gathered = self._others_gathered, False
        if self.gathering:
            self.gathering = False
            self.release()

    def _flush_soon(self) -> None:
        if self._soon is not None:
            try:
                self.write_encoded(b"")
            except BrokenPipe:
                self._soon = None  # the connection is gone: its loss is reported

    def hold(self) -> bool:
        """Gather what is written from now until :meth:`release` (in this same call, never
        across an await) into one write: a burst of frames then costs one system call.
        False if writes are gathered already (a hold is on, or the loop iteration's are
        gathered for its end): their owner writes them, not this caller."""
        if self._held is None:
            self._held = []
            return True
        return False

    def release(self) -> None:
        """Write what :meth:`hold` gathered, and stop gathering."""
        try:
            self._write_held()
        finally:
            self._held = None  # (a write that raised must not leave every later one held)

    def _write_held(self) -> None:
        held = self._held
        if held:
            self._held = []
            self._held_bytes = 0
            transport = self._transport
            if self._lost is None and transport is not None and not transport.is_closing():
                transport.write(held[0] if len(held) == 1 else b"".join(held))
                if self._held_answer_due and self._poller is not None:
                    self._poller.wrote(self._loop)
            self._held_answer_due = False

    async def drain(self) -> None:
        """Wait while the kernel's send buffer is full (bounded control-frame backlog).

        Raises :class:`BrokenPipe`, with the connection's loss as its cause, if it is gone.
        """
        if self._lost is not None:
            raise BrokenPipe("control connection is closed") from self._lost
        if self.write_paused:
            await self.writable()

    def writable(self) -> asyncio.Future[None]:
        """A future done once writing may go on (at once when it may now); it fails with
        :class:`BrokenPipe` if the connection is lost first."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._lost is not None:
            err = BrokenPipe("control connection is closed")
            err.__cause__ = self._lost
            fut.set_exception(err)
        elif not self.write_paused:
            fut.set_result(None)
        else:
            self._drain_waiters.append(fut)
        return fut

    async def read_frame(self) -> _wire.Frame:
        """The next frame during the handshake (before :meth:`attach`), parsed from the held
        bytes; nothing after it is parsed."""
        while True:
            frame = self._parse_early()
            if frame is not None:
                return frame
            if self._lost is not None:
                if isinstance(self._lost, ProtocolError):
                    raise fresh(self._lost)  # the peer is not speaking our protocol: say so
                raise BrokenPipe("connection closed during the handshake") from self._lost
            self._early_waiter = self._loop.create_future()
            try:
                await self._early_waiter
            finally:
                self._early_waiter = None

    def _parse_early(self) -> _wire.Frame | None:
        early = self._early
        if len(early) < _wire.FRAME_PREFIX_BYTES:
            return None
        # decode_prefix refuses an oversized length before a byte of the body is awaited,
        # and only a handshake frame (1 KiB at most) is awaited here at all.
        ftype, length = _wire.decode_prefix(early[:_wire.FRAME_PREFIX_BYTES])
        if ftype not in _wire.HANDSHAKE_FRAMES:
            raise ProtocolError(f"expected a handshake frame, not {ftype.name}")
        end = _wire.FRAME_PREFIX_BYTES + length
        if len(early) < end:
            if self._reading_paused:
                self._set_reading(True)  # the frame is larger than what we hold: read on
            return None
        body = bytes(early[_wire.FRAME_PREFIX_BYTES:end])
        del early[:end]
        if self._reading_paused and len(early) < _EARLY_BYTES_HIGH // 2:
            self._set_reading(True)
        return _wire.decode_body(ftype, body)

    def attach(self, handler: ControlHandler) -> None:
        """Hand every byte, first those held, and the connection's loss to ``handler``."""
        self._handler = handler
        early, self._early = self._early, bytearray()
        if self._reading_paused:
            self._set_reading(True)
        if self._lost is None and early:
            self._hand(handler, early)
            if self._lost is not None:
                return
            if self._handler_more:
                self._end_turn_soon()
        if self._lost is not None:
            handler.on_connection_lost(self._lost)

    def start_heartbeat(self, interval: float, timeout: float | None) -> None:
        """Send a heartbeat every ``interval`` s; fail if the peer is silent for ``timeout`` s
        (``None``: never)."""
        self._last_heard = started = self._loop.time()
        self._heartbeat = self._loop.create_task(self._heartbeat_guard(interval, timeout,
                                                                       started))

    async def _heartbeat_guard(self, interval: float, timeout: float | None,
                               started: float) -> None:
        # An internal task that dies must take the connection with it, or nobody would ever
        # notice that heartbeats stopped (the peer would, and break its end).
        try:
            await self._heartbeat_loop(interval, timeout, started)
        except BrokenPipe:
            pass  # the connection is gone: its loss is reported by _fail
        except Exception as exc:
            self._fail(exc)

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
            self._flush_soon()
            self._write_held()  # what was written goes out before the close
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

    def _hand(self, handler: ControlHandler, data: bytes | bytearray | memoryview) -> None:
        try:
            self._handler_more = handler.on_data(data)
        except Exception as exc:  # a handler that raises has broken the pipe: say why
            self._handler_more = False
            self._fail(exc)

    def _hand_waiting(self) -> None:
        """Hand the handler what was read while it had a backlog (it goes on with that too)."""
        assert self._handler is not None  # a backlog is the handler's
        waiting, self._waiting = self._waiting, bytearray()
        self._hand(self._handler, waiting)

    def _end_turn_soon(self) -> None:
        self._turn_paused = True
        self._pause_transport(True)
        self._loop.call_soon(self._end_turn)

    def _end_turn(self) -> None:
        self._turn_bytes = 0
        self._turn_paused = False
        if self._handler_more and self._lost is None:
            self._hand_waiting()
            if self._handler_more:
                self._end_turn_soon()
                return
        if not self._reading_paused:
            self._pause_transport(False)

    def _set_reading(self, on: bool) -> None:
        self._reading_paused = not on
        if not self._turn_paused:
            self._pause_transport(not on)

    def _pause_transport(self, pause: bool) -> None:
        if self._transport is not None and not self._transport.is_closing():
            if pause:
                self._transport.pause_reading()
            else:
                self._transport.resume_reading()

    def fail(self, exc: BaseException) -> None:
        """End the connection because of ``exc`` (a ProtocolError is told to the peer)."""
        self._fail(exc)

    def say(self, data: bytes) -> None:
        """Write ``data`` (an ERROR frame) if the connection still takes it; never raises."""
        transport = self._transport
        if self._lost is None and transport is not None and not transport.is_closing():
            self._flush_soon()  # after what was written before it
            self._write_held()
            transport.write(data)

    def _fail(self, exc: BaseException) -> None:
        if self._lost is not None:
            return
        if isinstance(exc, ProtocolError):
            self.say(_wire.encode(_wire.Error(_wire.ErrorCode.PROTOCOL, str(exc))))
        self._lost = exc
        self.lost.set_result(exc)
        self.abort()
        self._wake_reader()
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                err = BrokenPipe("control connection lost")
                err.__cause__ = exc
                fut.set_exception(err)
                fut.exception()  # a waiter may be gone; don't warn about an unread error
        if self._handler is not None:
            self._handler.on_connection_lost(exc)
