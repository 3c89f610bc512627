"""The Pipe: ordering, keys, backpressure and the one terminal state.

A pipe joins a control channel (headers, credits, heartbeats, close) with a data plane
(payload). It never touches bytes itself: it decides *what* may be sent and *who* receives
what arrived, and turns every failure into a single terminal state that all callers see.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from ctypes import string_at
from dataclasses import dataclass
from time import perf_counter
from typing import Final, cast

import torch

from . import _wire
from ._blocks import BlockPool
from ._budget import ByteBudget
from ._busypoll import poller_for
from ._control import ControlChannel, HeartbeatMissed
from ._cuda import current_stream
from ._dtypes import DTYPE_OF
from ._errors import (
    BrokenPipe,
    PeerFailure,
    PeerSaysProtocolError,
    PipeClosed,
    PipeError,
    ProtocolError,
    fresh,
)
from ._hostmem import byte_view
from ._message import Message, Outgoing, check_key, flatten, rebuild
from ._pipe_blocks import BlockExchange
from ._plane import DataPlane, Received, SignallingPlane, mark_read, settle_like
from ._protocol import PipeProtocol, State
from ._wire import Structure
from .metrics import BreakCause, PipeMetrics

log = logging.getLogger("aiokvpipe")

#: How long ``aclose()`` waits for the peer to finish its half of a graceful close.
CLOSE_TIMEOUT_S: Final = 10.0

#: ``send()`` and ``recv()`` often complete without waiting (a small message, one already
#: arrived). One call in this many in a row, with no wait in between (the loop turns in a
#: wait), yields to the event loop all the same, so that a task streaming small messages
#: cannot starve the loop: heartbeats, other requests, timers.
#: Eight senders of 4 KiB messages on the 2-core VM (2026-12-02): the sender's loop-lag p99
#: 10–11 ms at 16, 4.3–5.0 ms at 8, with throughput no lower (A/B, three rounds each).
YIELD_EVERY: Final = 8

#: Frames acted on per loop iteration at most, weighed by ``_wire.FRAME_WEIGHT``: 256 message
#: headers, or 16 frames of block transfers (each a match, a copy or an answer). The rest of
#: what was read waits for the next iteration: 256 offers of a request streamed a layer at a
#: time, eight requests in flight, had held an H200 host's loop for 30 ms.
TURN_BUDGET: Final = 256

#: (A module constant: an enum member's lookup on its class costs ~70 ns on Python 3.11.)
_TENSOR: Final = Structure.TENSOR

#: Receive credit given back to the peer waits up to this long to be returned together with
#: more (one CREDIT frame, one write here and one read there, for many small messages), or
#: until the protocol says it is due (``credit_return_due``: an eighth of the window).
#: Returned one message at a time, the credit frames doubled the syscalls of a stream of
#: 4 KiB messages. The timer is armed only if, at the end of the loop iteration that released
#: the credit, none of our headers took it along: a request/response pair never arms one.
#: (Armed at the first release after each firing, it fired every few round trips of an
#: exchange, for nothing: those wake-ups cost a 4 KiB ping-pong a quarter of its round trip
#: on the 2-core VM, 2026-12-04.)
CREDIT_LINGER_S: Final = 0.001


@dataclass(frozen=True, slots=True)
class PipeStats:
    """A snapshot of a pipe's counters (``pipe.stats``)."""

    transport: str
    messages_sent: int
    bytes_sent: int
    messages_received: int
    bytes_received: int
    #: payload bytes of sends posted but not yet complete (bounded by ``max_inflight_bytes``)
    inflight_bytes: int
    #: credits the peer has granted us and we have not used
    send_credits: int
    #: credits held by messages that arrived here and wait for ``recv()``
    recv_buffered_bytes: int
    #: messages that arrived here and wait for ``recv()``
    recv_buffered_messages: int
    #: ``send_blocks()``/``recv_blocks()`` calls completed (their bytes count in
    #: ``bytes_sent``/``bytes_received``, with the messages')
    block_transfers_sent: int = 0
    block_transfers_received: int = 0


@dataclass(eq=False, slots=True)
class _Queued:
    """A send() waiting for its turn (see :meth:`Pipe._pump_sends`)."""

    out: Outgoing
    key: str | None
    inline: bool
    cost: int
    #: send budget the payload holds while in flight (0 for an inline message)
    held: int
    #: done once posted: the payload's completion (``None`` for an inline message)
    posted: asyncio.Future[asyncio.Future[None] | None]
    #: when the current wait began (metrics)
    since: float
    #: its requests of credits and of send budget, once made (see Pipe._admitted)
    credit: asyncio.Future[None] | None = None
    budget: asyncio.Future[None] | None = None
    #: the caller's CUDA stream at the call (CUDA tensors): current when it is posted, from
    #: whatever callback, so that the payload is read after the caller's work on it
    stream: torch.cuda.Stream | None = None


class _Incoming:
    """A message whose header arrived; its payload may still be on the way.

    It keeps what ``recv()`` needs from the header, not the header itself: an inline header
    is a view of the bytes it arrived in, which must not stay alive.

    An inline payload waits as a copy of its bytes (``inline``); its tensors are made when
    it is claimed. Messages queue by the thousand when the application falls behind, and
    each long-lived object the garbage collector tracks makes its full collections come
    sooner (with torch loaded, 60-100 ms each): a bytearray is not tracked, a tensor and a
    list are.
    """

    __slots__ = ("key", "structure", "specs", "nbytes", "cost", "payload", "tensors",
                 "inline", "discarded")

    def __init__(self, header: _wire.Header, cost: int,
                 payload: asyncio.Future[list[torch.Tensor]] | None,
                 inline: bytearray | None = None) -> None:
        self.key = header.key
        self.structure = header.structure
        self.specs = header.tensors
        self.nbytes = header.nbytes
        self.cost = cost
        self.payload = payload
        self.tensors: Sequence[torch.Tensor] = ()  # a payload's, once it arrived
        self.inline = inline
        self.discarded = False


class Pipe:
    """A bidirectional, message-oriented tensor pipe to one peer.

    Obtain one from :func:`aiokvpipe.connect`, :meth:`aiokvpipe.Listener.accept` or
    :func:`aiokvpipe.open_pipe`; use it as an async context manager or call :meth:`aclose`.

    The rules (sequence numbers, credits, discarded keys, the close handshake) are kept by a
    sans-I/O :class:`~aiokvpipe._protocol.PipeProtocol`; the pipe drives it: it moves bytes
    between it and the control channel, payloads through the data plane, and settles the
    callers' futures.
    """

    def __init__(self, control: ControlChannel, plane: DataPlane, *, device: torch.device,
                 max_inflight_bytes: int, recv_buffer_bytes: int, peer_credits: int,
                 heartbeat_interval: float | None, heartbeat_timeout: float | None,
                 inline_limit: int = 0, close_timeout: float = CLOSE_TIMEOUT_S,
                 busy_poll_s: float = 0.0, metrics: PipeMetrics | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._control = control
        self._plane = plane
        #: The plane's records travel as SIGNAL frames on our connection (ipc).
        self._on_signal: Callable[[bytes], None] | None = getattr(plane, "on_signal", None)
        self._proto = PipeProtocol(recv_buffer_bytes=recv_buffer_bytes,
                                   peer_credit=peer_credits,
                                   signals=self._on_signal is not None)
        self.device: Final = device
        self._on_cuda = device.type == "cuda"
        self.peer: Final = control.peer
        self._close_timeout = close_timeout
        self._metrics = metrics if metrics is not None else PipeMetrics(enabled=False)
        self._timed = self._metrics.enabled  # take timestamps only for someone who reads them
        # sending
        #: CPU payloads up to this size travel inside their header frame (0: never).
        self._inline_limit = inline_limit
        #: send() calls waiting for their turn, in call order: while there are any, no send
        #: may take the fast path and overtake them. :meth:`_pump_sends` posts them.
        self._send_queue: deque[_Queued] = deque()
        self._waiting_writable = False  # _pump_sends is due when the connection drains
        self._calls_since_yield = 0
        self._send_budget = ByteBudget(max_inflight_bytes)
        #: The peer's credit, queued for by sends and block transfers alike; the protocol
        #: keeps the ledger itself.
        self._credits = ByteBudget(self._proto.peer_credit)
        self._sends_in_flight: set[asyncio.Future[None]] = set()
        self._bytes_sent = 0
        # receiving
        self._incoming: deque[_Incoming] = deque()
        self._ready: dict[str | None, deque[_Incoming]] = {}
        #: recv() calls in line, by key, in call order; the first are woken (done): one for
        #: each message of ``_ready`` (see _wake)
        self._waiters: dict[str | None, deque[asyncio.Future[None]]] = {}
        #: set once a graceful close failed the calls waiting, but for those behind woken
        #: ones (see _fail_waiters)
        self._waiters_closed: PipeClosed | None = None
        #: recv() calls that waited, asleep, when their key was discarded (see discard)
        self._asleep_at_discard: set[asyncio.Future[None]] = set()
        self._messages_received = 0
        self._block_transfers_sent = self._block_transfers_received = 0
        self._bytes_received = 0
        self._ready_count = 0
        self._flush_pending = False  # a _flush_credit is scheduled
        self._linger_pending = False  # a _maybe_linger is scheduled
        self._credit_timer: asyncio.TimerHandle | None = None  # a lingering return is due
        # ending
        self._closed_here = False  # aclose() was called here
        self._finished = asyncio.Event()  # closed and released, or broken
        self._closer: asyncio.Task[None] | None = None
        self._error: BrokenPipe | None = None
        self._blocks = BlockExchange(self)
        #: The plane, if it signals (ipc): it describes payloads in notes and records, says
        #: when payloads completed (no callback per payload future) and batches a read's.
        self._signalling = cast(SignallingPlane, plane) if self._on_signal is not None else None
        if self._signalling is not None:
            self._signalling.attach_signals(self._signal, self._deliver_arrived,
                                            self._signal_soon)
        control.busy_poll(poller_for(self._loop, busy_poll_s))
        control.attach(self)
        if heartbeat_interval is not None and self._error is None:
            control.start_heartbeat(heartbeat_interval, heartbeat_timeout)
        if self._error is None:
            log.info("pipe to %s opened (%s)", self.peer, plane.name)
            self._metrics.opened()

    # -- public API ---------------------------------------------------------------------------

    async def send(self, msg: Message, key: str | None = None) -> None:
        """Send ``msg`` (a Tensor, ``None``, a list of Tensors or a dict of str → Tensor).

        Returns once the payload has left this process: the tensors may then be reused or
        freed. Messages from concurrent ``send()`` calls are delivered in call order. A message
        sent with ``key`` is received only by ``recv(key=key)``.

        Waits while ``max_inflight_bytes`` are in flight or the peer has no receive credits
        left. Raises ``TypeError``/``ValueError`` (before anything is sent, the pipe stays
        healthy) for a bad message or key, :class:`PipeClosed` once either end closed the pipe,
        :class:`BrokenPipe` once it broke -- also when the data plane fails to take the
        payload here (out of memory staging it, say): the message is then never delivered,
        and the pipe breaks rather than let a header go without its payload. Over ipc the
        peer copies out of the tensors itself: when the pipe broke at this end (a missed
        heartbeat, a failure here), a peer still running may still be copying a message whose
        send() raised, and may deliver it if it does not see the break first.

        Cancellation: a ``send()`` cancelled while waiting for its turn, budget or credits
        sends nothing. Once its header is on the wire the message is sent whole, even if the
        caller is cancelled meanwhile; the tensors are then read until the transfer ends (they
        are kept alive; do not overwrite them before that). The stream never desynchronises.
        """
        t0 = perf_counter() if self._timed else 0.0
        if key is not None:
            key = check_key(key)
        out = flatten(msg)
        self._check_can_send()
        # A small CPU message (and any empty one) is copied into its header frame: once that
        # is written the tensors are free again, with no payload to wait for and no send
        # budget to hold.
        nbytes = out.nbytes
        inline = nbytes == 0 or (nbytes <= self._inline_limit and not out.cuda)
        cost = out.cost
        held = 0 if inline else nbytes  # send budget: a payload's bytes until it is out
        if (not self._send_queue and not self._control.write_paused
                and (self._credits.try_acquire(cost) if inline
                     else self._acquire_now(held, cost))):
            # The fast path: nobody is queued ahead, budget and credits are at hand and the
            # connection takes more. Posted without a suspension, so call order holds and
            # cancellation cannot split anything; no turn in the queue, no futures to grant.
            done = (self._post_now(out, key, True, cost, 0) if inline
                    else self._post(out, key, False, cost, held))
            if done is not None:
                await done  # our own future: cancelling it leaves the transfer be
            if self._timed:
                self._metrics.sent(out.nbytes, perf_counter() - t0)
            if done is None:
                if self._control.gathering:
                    await self._written()
                elif self._yield_due():
                    # After the write: yielding first would let a later send() overtake this
                    # one. Cancelled here, the message is sent all the same.
                    await asyncio.sleep(0)
            return
        # The slow path: wait in line (call order) for the connection, budget and credits.
        turn = _Queued(out, key, inline, cost, held, self._loop.create_future(), t0,
                       stream=_callers_stream(out))
        self._send_queue.append(turn)
        self._pump_sends()
        try:
            done = await turn.posted
            self._calls_since_yield = 0  # the loop turned meanwhile
        except asyncio.CancelledError:
            if not turn.posted.cancelled() and turn.posted.done():
                raise  # posted already: the message is sent whole (see the docstring)
            self._leave_queue(turn)
            raise
        if done is not None:
            await done
        if self._timed:
            self._metrics.sent(out.nbytes, perf_counter() - t0)
        if done is None and self._control.gathering:
            # Posted by our own pump (the queue was granted meanwhile), into this loop
            # iteration's gathered frames.
            await self._written()

    async def _written(self) -> None:
        """An inline message's frame waits to be written with this loop iteration's others, by
        a callback queued ahead of us: once we resume, it was. (Returning at once would leave
        it unsent for as long as the caller then blocks the loop.) Cancelled here, the
        message is sent all the same (see send()'s docstring)."""
        await asyncio.sleep(0)
        self._calls_since_yield = 0

    async def recv(self, key: str | None = None) -> Message:
        """Receive the next message sent with ``key`` (``None``: the next unkeyed message).

        Tensors come back with the sender's dtypes and shapes on this pipe's ``device``; CUDA
        tensors are ready for use on the caller's current stream at once. Asking for a key
        that was :meth:`discard`-ed takes it back: its later messages are kept again.

        Raises :class:`PipeClosed` once the pipe is closed and no matching message remains,
        :class:`BrokenPipe` if it broke. A failure here to hand a message over (making a
        small message's tensors: ``MemoryError``; keeping CUDA tensors for the caller's
        stream: a CUDA error) is raised as it is; the message then stays first in line.

        Cancellation is safe: a cancelled ``recv()`` takes nothing; a message it would have
        received goes to the next matching ``recv()``, in order.
        """
        t0 = perf_counter() if self._timed else 0.0
        if key is not None:
            key = check_key(key)
        self._proto.undiscard(key)  # (unkeyed messages too, after a discard(None))
        if self._error is not None:
            raise fresh(self._error)
        if key not in self._waiters and self._ready.get(key) and not self._yield_due():
            # First in line with a message at hand: taken without a suspension.
            return self._claim(self._pop_ready(key), t0)
        # In line, in call order: woken once a message is there for us (at once if one is),
        # and it is taken only when we run, the first one there. A recv() cancelled meanwhile
        # takes nothing and passes its wake-up on, so messages still go out in call order.
        fut: asyncio.Future[None] = self._loop.create_future()
        waiters = self._waiters.get(key)
        if waiters is None:
            self._waiters[key] = deque((fut,))
        else:
            waiters.append(fut)
        if key in self._ready:
            self._wake(key)
        try:
            if not fut.done():
                self._check_can_recv()
                await fut
            else:  # (a yield was due: one loop turn first, holding our place in line)
                await asyncio.sleep(0)
            # The loop turned while this waited: the calls since are what may starve it.
            self._calls_since_yield = 0
        except BaseException:
            self._leave(key, fut)
            raise
        ready = self._ready[key]  # (woken: one is there for us, the first that
        # is; _pop_ready and _left inline: 1-2 µs a round trip on the 2-core VM)
        item = ready.popleft()
        if not ready:
            del self._ready[key]
        self._ready_count -= 1
        waiters = self._waiters.get(key)
        if waiters is not None and waiters[0] is fut:  # the usual: first in line
            waiters.popleft()
            if not waiters:
                del self._waiters[key]
        else:
            self._left(key, fut)
        if self._asleep_at_discard and fut in self._asleep_at_discard:
            # Waiting since before a discard(key): it took what came, and so asks for the
            # key again.
            self._asleep_at_discard.discard(fut)
            self._proto.undiscard(key)
        msg = self._claim(item, t0)
        if self._waiters_closed is not None:
            self._close_rest(key)  # (once it took it: failing, it left it to the next)
        return msg

    def _wake(self, key: str | None) -> None:
        """Wake the first waiting recv(key) calls, one for each message at hand (those woken
        already count, each has one waiting for it)."""
        waiters = self._waiters.get(key)
        ready = self._ready.get(key)
        if not waiters or not ready:
            return
        spare = len(ready)
        for fut in waiters:
            if fut.cancelled():
                continue  # (it leaves when its task runs)
            if not fut.done():
                fut.set_result(None)
            spare -= 1
            if not spare:
                return

    def _close_rest(self, key: str | None) -> None:
        """At a graceful close: once no woken recv(key) is left in line, fail the rest
        (nothing more comes for them)."""
        waiters = self._waiters.get(key)
        if self._waiters_closed is None or not waiters or any(_woken(f) for f in waiters):
            return
        for fut in waiters:
            if not fut.done():
                fut.set_exception(fresh(self._waiters_closed))
                fut.exception()
        del self._waiters[key]

    def _left(self, key: str | None, fut: asyncio.Future[None]) -> None:
        """``fut``'s recv() is out of line (it took its message, or gave up)."""
        waiters = self._waiters.get(key)
        if waiters is not None:
            with contextlib.suppress(ValueError):
                waiters.remove(fut)
            if not waiters:
                del self._waiters[key]

    def _leave(self, key: str | None, fut: asyncio.Future[None]) -> None:
        """``fut``'s recv() gives up (cancelled, or the pipe cannot deliver): a message it
        was woken for goes to the next in line; with nobody left waiting for a key given up
        meanwhile (cancel, then discard), it is dropped, its credits back (held, they would
        stall the senders)."""
        self._left(key, fut)
        self._asleep_at_discard.discard(fut)
        self._wake(key)
        if self._proto.is_discarded(key) and not self._waiting_for(key):
            if self._drop_ready(key):
                self.credit_released(now=True)
        if self._waiters_closed is not None:
            self._close_rest(key)

    def _drop_ready(self, key: str | None) -> int:
        """Drop the messages of ``key`` that arrived and no woken recv() is owed; how many."""
        ready = self._ready.get(key)
        if not ready:
            return 0
        owed = sum(1 for fut in self._waiters.get(key, ()) if _woken(fut))
        dropped = 0
        while len(ready) > owed:
            item = ready.pop()
            self._return_credit(item.cost)
            self._ready_count -= 1
            dropped += 1
        if not ready:
            del self._ready[key]
        return dropped

    def discard(self, key: str | None) -> int:
        """Give up the messages with ``key``: those that arrived and wait unclaimed, those
        arriving now, and those that arrive later (until a ``recv(key)`` or
        ``recv_blocks(..., key=key)`` asks for the key again, or one that was waiting for it
        already takes what comes; the most recent 4,096 discarded keys are remembered).
        ``None`` names the unkeyed messages.

        Block offers for the key are refused (the sender's ``send_blocks`` raises
        ``ValueError`` saying so), now and later. Their receive credits go back to the peer
        at once. Use it when a request is given up: a message that no ``recv()`` will ever
        claim would otherwise hold its credits for the life of the pipe and, with enough of
        them, stall every sender. Returns how many messages and block offers were dropped now
        (later arrivals are dropped silently).
        """
        key = check_key(key)
        self._proto.discard(key)
        # The calls asleep now take what comes, and then ask for the key again (see recv);
        # those woken already take what they were woken for, and nothing more.
        self._asleep_at_discard.update(
            fut for fut in self._waiters.get(key, ()) if not fut.done())
        dropped = self._blocks.discard(key) + self._drop_ready(key)
        if dropped:
            self.credit_released(now=True)  # "at once", as the docstring says
        if self._waiting_for(key):
            return dropped  # what is arriving goes to the recv() waiting (see _on_header)
        for item in self._incoming:
            if item.key == key and not item.discarded:
                item.discarded = True
                dropped += 1
        return dropped

    async def send_blocks(self, pool: BlockPool, block_ids: object, key: str | None = None,
                          layers: object = None) -> None:
        """Send blocks ``block_ids`` of ``pool`` (the tensors ``layers`` names: indices or dict
        keys; ``None``: all) to the peer's ``recv_blocks(..., key=key)``.

        The blocks are read as the work queued on the caller's current CUDA stream has left
        them (stream-ordered, like :meth:`send`), so a producer may send each layer as soon
        as it is written. Returns when the blocks may be overwritten: the peer took them.
        Waits for the peer's matching ``recv_blocks``; the pool is described to the peer once
        per pipe (a BlockPool made again around the same tensors, with the same layout, is
        the same pool; the pipe keeps the tensors of the first alive until it ends; at most
        1,024 pools a pipe).

        No ids: nothing moves and it returns at once (so does the peer's ``recv_blocks`` of
        none; no offer goes out).

        Raises ``TypeError``/``ValueError`` before anything moves for a bad id, layer or key
        or more than 131,072 ids (the pipe stays usable), ``ValueError`` when the peer
        refuses the blocks (its pool does not fit, the block counts differ, it discarded the
        key: its message says why), :class:`PipeClosed` and :class:`BrokenPipe` as
        :meth:`send` does.

        Cancellation: cancelled before the peer took the offer, nothing moves; after that
        (even in the loop iteration its PULL arrives in) the blocks are sent whole, read until
        the transfer ends (do not overwrite them before), and the call raises
        ``CancelledError`` all the same.
        """
        await self._blocks.send_blocks(pool, block_ids, key, layers)

    async def recv_blocks(self, pool: BlockPool, block_ids: object, key: str | None = None,
                          layers: object = None) -> None:
        """Receive blocks sent with ``key`` straight into blocks ``block_ids`` of ``pool``
        (the tensors ``layers`` names; ``None``: all). Returns once every named tensor's
        blocks arrived (from one ``send_blocks`` or several, a layer at a time, say); they
        are then safe to use on the caller's current stream. Blocks it does not name are
        never written; nothing is allocated that grows with the request.

        Asking for a key that was :meth:`discard`-ed takes it back, as :meth:`recv` does. No
        ids: returns at once (see :meth:`send_blocks`). An offer is taken by the first waiting
        call that wants all its tensors: one sending tensors no call wants whole waits, as a
        ``send_blocks`` with no ``recv_blocks`` does.

        Raises ``TypeError``/``ValueError`` before anything moves for bad ids (out of range,
        a destination named twice, more than 131,072), layers or key, or a CPU pool in
        memory mapped read-only, and ``ValueError`` when an offer for the key does not fit
        (pools that differ, block counts that differ; the sender hears why);
        :class:`PipeClosed`, :class:`BrokenPipe` as :meth:`recv` does.

        Cancellation: what has not started moving never will; what is already moving is
        waited for (cancelling again does not cut that wait short), so once the call is over
        nothing writes to the named blocks; their contents are then undefined. The same
        holds when the pipe breaks: a copy into a CUDA pool queued behind the caller's stream
        is waited for, so the call raises once that stream's work before the call has run.
        """
        await self._blocks.recv_blocks(pool, block_ids, key, layers)

    async def aclose(self) -> None:
        """Close gracefully: everything already sent is still delivered to the peer.

        Pending ``recv()`` calls here raise :class:`PipeClosed`; sends waiting for their turn
        raise it too, sends already on the wire finish first. The peer receives what was sent,
        then its ``recv()`` raises :class:`PipeClosed`. Idempotent; on a broken pipe it only
        releases resources. Gives up (breaking the pipe) after ``close_timeout`` seconds
        without progress. Cancelling ``aclose()`` aborts the connection.
        """
        if self._error is not None or self._finished.is_set():
            return
        if not self._closed_here:
            self._closed_here = True
            log.info("pipe to %s closing", self.peer)
            self._proto.start_closing()
            self._fail_waiters(PipeClosed("pipe closed"))
            self._fail_pending_senders(PipeClosed("pipe closed"), graceful=True)
            self._blocks.closing(PipeClosed("pipe closed"), ours=True)
            self._ensure_closer()
        progress = self._progress()
        while True:
            try:
                await asyncio.wait_for(asyncio.shield(self._finished.wait()),
                                       self._close_timeout)
                return
            except TimeoutError:
                # A large transfer still moving is not a stuck close: wait on while bytes move.
                now = self._progress()
                if now == progress:
                    self._break(TimeoutError(
                        f"the graceful close did not finish within close_timeout="
                        f"{self._close_timeout:g} s, nothing moving meanwhile"))
                    return
                progress = now
            except asyncio.CancelledError:
                self._break(ConnectionAbortedError("aclose() was cancelled"))
                raise

    def _progress(self) -> tuple[int, ...]:
        """Counters that move while any transfer of this pipe does."""
        return (self._bytes_sent, self._bytes_received, self._messages_received,
                getattr(self._plane, "moved_bytes", 0))

    async def wait_closed(self) -> None:
        """Wait until the pipe has ended: returns after a graceful close (by either end),
        raises :class:`BrokenPipe` (its cause chained) if it broke.

        Cancelling it only stops the wait.
        """
        await self._finished.wait()
        if self._error is not None:
            raise fresh(self._error)

    async def __aenter__(self) -> Pipe:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def transport(self) -> str:
        """The data plane in use: ``"tcp"``, ``"nccl"`` or ``"ipc"``."""
        return self._plane.name

    @property
    def state(self) -> State:
        """``OPEN``, ``CLOSING``, ``CLOSED`` or ``BROKEN``."""
        return self._proto.state

    @property
    def closed(self) -> bool:
        """True once the pipe can no longer send (closed by either end, or broken)."""
        return not self._proto.can_send

    @property
    def stats(self) -> PipeStats:
        proto = self._proto
        return PipeStats(
            transport=self._plane.name,
            messages_sent=proto.next_send_seq - len(self._sends_in_flight),
            bytes_sent=self._bytes_sent,
            messages_received=self._messages_received,
            bytes_received=self._bytes_received,
            inflight_bytes=self._send_budget.in_use,
            send_credits=self._credits.capacity - self._credits.in_use,
            recv_buffered_bytes=proto.credit_buffered,
            recv_buffered_messages=self._ready_count,
            block_transfers_sent=self._block_transfers_sent,
            block_transfers_received=self._block_transfers_received,
        )

    def __repr__(self) -> str:
        return (f"<aiokvpipe.Pipe {self._plane.name} peer={self.peer} "
                f"{self._proto.state.name.lower()}>")

    # -- sending internals --------------------------------------------------------------------

    def _yield_due(self) -> bool:
        """Count a send()/recv() that completed without waiting; True once in YIELD_EVERY."""
        self._calls_since_yield += 1
        if self._calls_since_yield < YIELD_EVERY:
            return False
        self._calls_since_yield = 0
        return True

    def _check_can_send(self) -> None:
        if self._error is not None:
            raise fresh(self._error)
        if self._closed_here:
            raise PipeClosed("pipe closed")
        if self._proto.close_received:
            raise PipeClosed("the peer closed the pipe")

    def _acquire_now(self, held: int, cost: int) -> bool:
        """Take ``held`` bytes of send budget (none for an inline message, which holds none)
        and ``cost`` of credits if nobody waits for either and both fit; else take nothing."""
        if held and not self._send_budget.try_acquire(held):
            return False
        if not self._credits.try_acquire(cost):
            if held:
                self._send_budget.release(held)
            return False
        if held and self._timed:  # no wait, counted as the queue would count it
            self._metrics.waited_budget(0.0)
            self._metrics.waited_credits(0.0)
        return True

    def _pump_sends(self, _: object = None) -> None:
        """Post queued sends, oldest first, while the connection takes more and each has its
        send budget and credits (asked for in the budgets' own FIFO, which block transfers
        share). Runs again whenever one of those frees up: a burst of queued messages then
        leaves in one loop iteration (one write), not one per iteration as a lock would
        hand them out."""
        if not self._send_queue:
            return
        # Posted together, written together: one system call for the burst. Nothing waits
        # for a later loop iteration (the pump returns before anyone awaits). Grants and
        # drains reach the pump through future callbacks, never from inside it.
        holding = self._control.hold()
        try:
            self._pump_queue()
        finally:
            if holding:
                self._control.release()

    def _pump_queue(self) -> None:
        queue = self._send_queue
        while queue:
            if self._error is not None or self._closed_here or self._proto.close_received:
                return  # _fail_queued_senders tells each why
            turn = queue[0]
            if turn.posted.done():  # cancelled: its caller is leaving (_leave_queue)
                queue.popleft()
                self._withdraw(turn)
                continue
            if self._control.write_paused:
                if not self._waiting_writable:
                    self._waiting_writable = True
                    self._control.writable().add_done_callback(self._writable_again)
                return
            if not self._admitted(turn):
                return
            queue.popleft()
            if self._timed:
                self._metrics.waited_budget(perf_counter() - turn.since)
            try:
                with (_NO_STREAM if turn.stream is None else torch.cuda.stream(turn.stream)):
                    done = self._post(turn.out, turn.key, turn.inline, turn.cost, turn.held)
            except Exception as exc:  # the pipe broke (see _post): tell this caller why
                turn.posted.set_exception(exc)
                turn.posted.exception()  # cancelled before it resumes, it reads none
                continue
            turn.posted.set_result(done)

    def _admitted(self, turn: _Queued) -> bool:
        """``turn`` holds its credits, then its send budget (each asked for once; a grant
        pumps the queue again). In that order, as a block transfer takes them (its offer's
        credit, then budget for its payload once pulled): a send holding budget while it
        waited for credits that an unclaimed message held could starve a pulled transfer
        the receiver waited for before claiming that message, for ever."""
        if turn.credit is None:
            turn.credit = self._ask(self._credits, turn.cost)
        if not _granted(turn.credit):
            return False
        if turn.budget is None:
            if self._timed:
                now = perf_counter()
                self._metrics.waited_credits(now - turn.since)
                turn.since = now
            turn.budget = self._ask(self._send_budget, turn.held)
        return _granted(turn.budget)

    def _ask(self, budget: ByteBudget, n: int) -> asyncio.Future[None]:
        """Request ``n`` bytes of ``budget``; a later grant pumps the queue again."""
        fut = budget.request(n)
        if not fut.done():
            fut.add_done_callback(self._pump_sends)
        return fut

    def _writable_again(self, fut: asyncio.Future[None]) -> None:
        self._waiting_writable = False
        if not fut.cancelled() and fut.exception() is None:
            self._pump_sends()
        # else: the connection is lost, and with it the pipe; _break fails the queue

    def _leave_queue(self, turn: _Queued) -> None:
        """A queued send() was cancelled before it was posted: it sends nothing, and what it
        was granted goes back."""
        try:
            self._send_queue.remove(turn)
        except ValueError:
            pass
        self._withdraw(turn)
        self._pump_sends()  # whoever waited behind it may go now

    def _withdraw(self, turn: _Queued) -> None:
        """Give back (once) what a send that will not be posted was granted or asked for."""
        if turn.budget is not None:
            self._send_budget.withdraw(turn.held, turn.budget)
            turn.budget = None
        if turn.credit is not None:
            self._credits.withdraw(turn.cost, turn.credit)
            turn.credit = None

    def _fail_queued_senders(self, exc: PipeError) -> None:
        queue, self._send_queue = self._send_queue, deque()
        for turn in queue:
            self._withdraw(turn)
            if not turn.posted.done():
                turn.posted.set_exception(fresh(exc))
                turn.posted.exception()  # its caller may be gone; do not warn

    def _post(self, out: Outgoing, key: str | None, inline: bool, cost: int, held: int
              ) -> asyncio.Future[None] | None:
        """Post the message's payload to the data plane, then write its header (an inline
        payload inside it, the credits we owe riding along) in one write. Returns the
        future the sender awaits for the payload's completion (its own: see _send_done),
        ``None`` for an inline message. The caller holds ``cost`` of
        credit and ``held`` bytes of send budget; they are released when the payload is out.

        The payload goes first: if the plane cannot take it, no header has left, and the pipe
        breaks (a plane that failed half-way may have started moving bytes that no header
        announces; the peer would file them under the next message's key).
        """
        if inline:
            return self._post_now(out, key, True, cost, held)
        # A plane that signals (ipc) describes the payload on our connection: its record and
        # the header leave in one write. (A pump's burst holds already: then it releases.)
        holding = self._control.hold()
        try:
            return self._post_now(out, key, False, cost, held)
        finally:
            if holding:
                self._control.release()

    def _post_now(self, out: Outgoing, key: str | None, inline: bool, cost: int, held: int
                  ) -> asyncio.Future[None] | None:
        proto = self._proto
        proto.spend(cost)
        done: asyncio.Future[None] | None = None
        note = None
        if not inline:
            # What the sender awaits: its own future, so that a cancelled send() leaves the
            # plane's alone; settled by _send_done, or by a signalling plane at once.
            waiter: asyncio.Future[None] = self._loop.create_future()
            try:
                if self._signalling is None:
                    done = self._plane.post_send(out.tensors)
                else:  # the payload's description rides in the header (ipc)
                    done, note = self._signalling.post_send_noted(out.tensors, waiter)
                if self._error is not None:
                    # The plane broke the pipe while it took the payload (nccl: enqueueing
                    # it failed, and its lane reported the loss at once): no header follows.
                    done.add_done_callback(mark_read)  # (its error is the pipe's)
                    raise fresh(self._error)
            except Exception as exc:
                self._unspend(cost, held)
                self._break(exc)
                raise fresh(self._error) if self._error else exc
        try:
            payload: Sequence[bytes | memoryview] = ()
            if inline and out.nbytes:
                # Copied into the frame: the tensors are free again when send() returns.
                if len(out.tensors) == 1:  # the common case: half the cost of byte views
                    payload = (string_at(out.tensors[0].data_ptr(), out.nbytes),)
                else:
                    payload = [byte_view(t) for t, spec in zip(out.tensors, out.specs)
                               if spec.nbytes]
            data = proto.send_header(key, out.structure, out.specs, out.nbytes, inline, note,
                                     payload)
        except Exception as exc:
            if done is not None:
                # The plane has the payload: without its header the stream is out of step.
                done.add_done_callback(mark_read)  # (its outcome is the pipe's)
                self._break(exc)
                raise fresh(self._error) if self._error else exc
            # Nothing committed (out of memory making the frame, say): the message is not
            # sent, and the pipe stays in step.
            self._unspend(cost, held)
            raise
        try:
            # Only an inline message may wait to be written with others (gather): a frame
            # whose payload is already queued on a plane must reach the peer at once, or a
            # task that synchronises the device meanwhile would wait for an NCCL send whose
            # receive the peer cannot post.
            self._control.write_encoded(data, answer_due=True, gather=inline)
        except BrokenPipe as exc:
            # The connection is gone; its loss breaks the pipe (if it has not yet).
            self._break(exc.__cause__ or exc)
            raise fresh(self._error) if self._error else exc
        if done is None:
            self._bytes_sent += out.nbytes
            return None
        self._sends_in_flight.add(done)
        done.add_done_callback(functools.partial(self._send_done, nbytes=out.nbytes,
                                                 waiter=waiter))
        if self._timed:
            self._metrics.inflight(self._send_budget.in_use)
        return waiter

    def _unspend(self, cost: int, held: int) -> None:
        """A message that was not sent after all: its credit and send budget back."""
        self._proto.refund(cost)
        self._credits.release(cost)
        self._send_budget.release(held)

    def _send_done(self, fut: asyncio.Future[None], nbytes: int,
                   waiter: asyncio.Future[None]) -> None:
        self._sends_in_flight.discard(fut)
        self._send_budget.release(nbytes)
        if self._timed:
            self._metrics.inflight(self._send_budget.in_use)
        if fut.cancelled() or fut.exception() is not None:
            # The payload was lost after its header left: the peer waits for it in vain.
            self._break(fut.exception() or ConnectionAbortedError("payload send cancelled"))
            if self._error is not None and not waiter.done():
                # BrokenPipe, as from every call on a broken pipe: a plane's event poller
                # fails its futures with the raw error before it reports the loss.
                waiter.set_exception(fresh(self._error))
        else:
            self._bytes_sent += nbytes
        settle_like(waiter, fut)  # (done already, by the plane, as most ipc sends are)
        if not waiter.cancelled():
            # Marked read: a caller cancelled after its turn was posted never awaits it, and
            # asyncio would log the failure again when the waiter is collected.
            waiter.exception()

    def _signal(self, data: bytes) -> None:
        """Write the data plane's records, in SIGNAL frames in order with ours. Never raises:
        a lost connection breaks the pipe through the channel, which reports it."""
        frames = self._proto.send_signal(data)
        if frames:
            try:
                self._control.write_encoded(frames)
            except BrokenPipe:
                pass

    def _signal_soon(self, data: bytes) -> None:
        """:meth:`_signal`, leading our next write if one comes before the next loop
        iteration (an acknowledgement, with the answer to the message it acknowledges)."""
        frames = self._proto.send_signal(data)
        if frames:
            self._control.write_soon(frames)

    def _write(self, data: bytes) -> None:
        """Write a block transfer's frames (the peer answers them); a lost connection breaks
        the pipe and raises BrokenPipe."""
        try:
            self._control.write_encoded(data, answer_due=True)
        except BrokenPipe as exc:
            self._break(exc.__cause__ or exc)
            raise fresh(self._error) if self._error else exc

    def _fail_pending_senders(self, exc: PipeError, graceful: bool = False) -> None:
        # Senders waiting for their turn, budget or credits give up; those already posted
        # finish. On a graceful close, so do block transfers the peer pulled already (they
        # are committed: it waits for them), which may still need send budget: only a
        # broken pipe takes that away.
        self._fail_queued_senders(exc)
        if not graceful:
            self._send_budget.abort(exc)
        self._credits.abort(exc)

    # -- receiving internals ------------------------------------------------------------------

    def _check_can_recv(self) -> None:
        if self._error is not None:
            raise fresh(self._error)
        if self._closed_here:
            raise PipeClosed("pipe closed")
        if self._proto.close_received and not self._incoming:
            raise PipeClosed("the peer closed the pipe and everything it sent was received")

    def on_data(self, data: bytes | bytearray | memoryview) -> bool:
        """Called by the control channel with each chunk of bytes from the peer. Acts on a
        turn's worth of frames (:data:`TURN_BUDGET`) and keeps the rest: True then, and the
        channel calls again next loop iteration."""
        plane = self._signalling
        if plane is not None:  # (ipc) the copies this read starts are awaited together
            plane.hold_copies()
        try:
            frames = self._proto.receive_data(data, TURN_BUDGET)
            for frame in frames:
                if self._error is not None:  # broken by a frame before (a failure here)
                    break
                ftype = type(frame)
                if ftype is _wire.Header:
                    if frame.credit:  # type: ignore[union-attr]
                        self._credits.release(frame.credit)  # type: ignore[union-attr]
                    self._on_header(frame)  # type: ignore[arg-type]
                elif ftype is _wire.Signal:
                    assert self._on_signal is not None  # the protocol let it through
                    self._on_signal(frame.data)  # type: ignore[union-attr]
                elif ftype is _wire.Credit:
                    self._credits.release(frame.nbytes)  # type: ignore[union-attr]
                elif ftype is _wire.Close:
                    self._on_close()
                else:  # a block transfer's frame
                    self._blocks.on_frame(frame)
        except Exception as exc:  # the peer broke a rule, or something failed here
            self._break(exc)
            return False
        finally:
            if plane is not None:
                plane.release_copies()
        return self._proto.backlogged

    def _on_header(self, h: _wire.Header) -> None:
        item_cost = h.cost
        inline = h.inline
        if inline is not None:
            # Messages without payload bytes (None, empty tensors) travel inline on every
            # plane; payload bytes only to a CPU receiver (see _connect: inline_limit).
            if h.nbytes and self._on_cuda:
                raise ProtocolError("inline payload sent to a CUDA receiver")
            # One copy out of the received bytes (at most 64 KiB): those must not stay alive.
            # The tensors are made when the message is claimed (see _Incoming).
            item = _Incoming(h, item_cost, None, bytearray(inline) if h.nbytes else None)
        else:
            # A failure to allocate here is ours, not the peer's: it breaks the pipe with
            # its own cause, and the peer is told that we failed (not that it misbehaved).
            note = h.note
            if note is None:
                payload = self._plane.post_recv(h.tensors)
            else:  # the protocol took a note only on a pipe whose plane signals
                assert self._signalling is not None
                payload = self._signalling.post_recv_noted(h.tensors, note)
            item = _Incoming(h, item_cost, payload)
        if self._proto.is_discarded(h.key) and not self._waiting_for(h.key):
            # (A recv(key) waiting since before the discard takes it: see _arrived. The
            # discard lifts when it does, not now: it may give up before.)
            item.discarded = True
        if item.payload is not None:
            self._incoming.append(item)
            # A plane that says when payloads completed delivers them in that same poll, a
            # loop iteration before a done callback would; a failed one breaks the pipe
            # through on_lost, and _deliver_arrived breaks it too.
            if self._signalling is None or item.payload.done():
                item.payload.add_done_callback(self._on_payload)
            return
        if self._incoming:  # behind a payload still arriving: keep the order
            self._incoming.append(item)
        else:  # nothing ahead of it: deliver now, not a loop iteration later
            self._arrived(item)

    def _waiting_for(self, key: str | None) -> bool:
        """Whether a recv(key) waits, not cancelled (its future is cancelled at once; it
        leaves the waiters only when its task runs next)."""
        for fut in self._waiters.get(key, ()):
            if not fut.done():
                return True
        return False

    def _unpack_inline(self, specs: tuple[_wire.TensorSpec, ...], buf: bytearray | None
                       ) -> list[torch.Tensor]:
        """The tensors of an inline payload: views of ``buf``, the copy made on arrival
        (:meth:`_claim` makes a lone tensor's itself)."""
        tensors, offset = [], 0
        for spec in specs:
            dtype = DTYPE_OF[spec.dtype]  # the protocol checked that it is known
            n = spec.nbytes
            if n and offset % spec.itemsize == 0:
                assert buf is not None
                t = torch.frombuffer(buf, dtype=dtype, count=n // spec.itemsize, offset=offset)
                if len(spec.shape) != 1:
                    t = t.view(spec.shape)
            else:  # empty, or not aligned for its dtype after an odd-sized tensor: a copy
                t = torch.empty(spec.shape, dtype=dtype, device=self.device)
                if n:
                    assert buf is not None
                    byte_view(t)[:] = memoryview(buf)[offset:offset + n]
            offset += n
            tensors.append(t)
        return tensors

    def _on_payload(self, fut: asyncio.Future[list[torch.Tensor]]) -> None:
        if fut.cancelled() or fut.exception() is not None:
            if self._error is None and not self._finished.is_set():
                self._break(fut.exception() or ConnectionAbortedError("payload cancelled"))
            return
        self._deliver_arrived()

    def _deliver_arrived(self) -> None:
        # Payloads complete in order on one plane, but an empty or inline message completes
        # at once: deliver strictly in sequence so unkeyed FIFO order holds.
        while self._incoming:
            item = self._incoming[0]
            payload = item.payload
            if payload is not None:
                if not payload.done():
                    break
                if payload.cancelled() or payload.exception() is not None:
                    self._on_payload(payload)  # breaks the pipe
                    return
                item.tensors = payload.result()
            self._incoming.popleft()
            self._arrived(item)
        if self._proto.close_received and not self._incoming:
            self._fail_waiters(PipeClosed("the peer closed the pipe and everything it sent "
                                          "was received"))
        self._maybe_finish()

    def _arrived(self, item: _Incoming) -> None:
        """``item``'s payload is complete and every message before it was delivered."""
        self._proto.payload_done()
        self._messages_received += 1
        self._bytes_received += item.nbytes
        if item.discarded or (self._proto.is_discarded(item.key)
                              and not self._waiting_for(item.key)):
            # (Left to a recv() that waited when the key was discarded, and gave up since:
            # nobody else will ask for it.)
            item.tensors, item.inline = (), None
            self._return_credit(item.cost)
        else:
            self._deliver(item)

    def _deliver(self, item: _Incoming, front: bool = False) -> None:
        key = item.key
        ready = self._ready.get(key)
        if ready is None:
            ready = self._ready[key] = deque((item,))
        elif front:
            ready.appendleft(item)
        else:
            ready.append(item)
        self._ready_count += 1
        waiters = self._waiters.get(key)
        if waiters is not None:
            first = waiters[0]
            if len(ready) == 1 and not first.done():  # the usual: one asleep, one message
                first.set_result(None)
            else:
                self._wake(key)

    def _pop_ready(self, key: str | None) -> _Incoming:
        ready = self._ready[key]
        item = ready.popleft()
        if not ready:
            del self._ready[key]
        self._ready_count -= 1
        return item

    def _claim(self, item: _Incoming, t0: float) -> Message:
        tensors: Sequence[torch.Tensor]
        specs = item.specs
        try:
            if item.payload is None:
                buf = item.inline
                if buf is not None and len(specs) == 1:  # the common case, without a call
                    spec = specs[0]
                    t = torch.frombuffer(buf, dtype=DTYPE_OF[spec.dtype])
                    tensors = (t if len(spec.shape) == 1 else t.view(spec.shape),)
                else:
                    tensors = self._unpack_inline(specs, buf)
            else:
                tensors = item.tensors
            if self._on_cuda and tensors:
                stream = current_stream(self.device)
                # (Not `home != stream` alone: torch's streams compare unequal to nothing,
                # None included.)
                home = tensors.stream if type(tensors) is Received else None
                if home is None or (home is not stream and home != stream):
                    for t in tensors:
                        # The allocator must not reuse this memory while the caller's stream
                        # uses it.
                        t.record_stream(stream)
        except BaseException:
            # Ours to fail (out of memory, a CUDA call), not the peer's: nothing is lost, the
            # message stays first in line, and its credit stays held until it is taken.
            self._deliver(item, front=True)
            raise
        self._return_credit(item.cost)
        if self._timed:
            self._metrics.received(item.nbytes, perf_counter() - t0)
        if item.structure is _TENSOR:
            return tensors[0]
        return rebuild(item.structure, item.specs, tensors)

    def _return_credit(self, n: int) -> None:
        self.credit_released(now=self._proto.release(n))

    def credit_released(self, now: bool = False) -> None:
        """Credit is owed to the peer: send it soon. Coalesced: once it reaches an eighth of
        the window (or ``now``), one CREDIT frame at the next loop iteration; less lingers up
        to CREDIT_LINGER_S for more to join it. A header we send meanwhile carries it all."""
        if self._flush_pending:
            return
        if now or self._proto.credit_return_due:
            self._flush_pending = True
            self._loop.call_soon(self._flush_credit)
        elif not self._linger_pending and self._credit_timer is None:
            self._linger_pending = True
            self._loop.call_soon(self._maybe_linger)

    def _maybe_linger(self) -> None:
        """The loop iteration that released credit is over: what no header of ours took along
        lingers (:data:`CREDIT_LINGER_S`) for more to join it."""
        self._linger_pending = False
        if (self._proto.credit_owed and self._credit_timer is None and not self._flush_pending
                and not self._finished.is_set()):
            self._credit_timer = self._loop.call_later(CREDIT_LINGER_S, self._credit_lingered)

    def _cancel_credit_timer(self) -> None:
        if self._credit_timer is not None:
            self._credit_timer.cancel()
            self._credit_timer = None

    def _credit_lingered(self) -> None:
        self._credit_timer = None
        self._flush_credit()

    def _flush_credit(self) -> None:
        self._flush_pending = False
        if self._error is not None:
            return
        data = self._proto.send_credit()
        if data:
            try:
                self._control.write_encoded(data)
            except BrokenPipe:
                pass  # the control channel reports the loss itself

    def _fail_waiters(self, exc: PipeError) -> None:
        """Fail the recv() calls waiting; those woken already take the message they were
        woken for (it is there), so they stay in line. At a graceful close, the calls behind
        woken ones fail only once those took theirs (one that gives up leaves its message to
        the next): see _close_rest."""
        for key, waiters in list(self._waiters.items()):
            if isinstance(exc, PipeClosed) and any(_woken(fut) for fut in waiters):
                self._waiters_closed = exc
                continue
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(fresh(exc))
                    fut.exception()
            waiters = deque(fut for fut in waiters if _woken(fut))  # (the rest failed now)
            if waiters:
                self._waiters[key] = waiters
            else:
                del self._waiters[key]

    # -- ending -------------------------------------------------------------------------------

    def _on_close(self) -> None:
        self._fail_pending_senders(PipeClosed("the peer closed the pipe"), graceful=True)
        self._blocks.closing(PipeClosed("the peer closed the pipe"), ours=False)
        if not self._incoming:
            self._fail_waiters(PipeClosed("the peer closed the pipe"))
        self._ensure_closer()
        self._maybe_finish()

    def _ensure_closer(self) -> None:
        if self._closer is None and self._error is None:
            self._closer = self._loop.create_task(self._close_handshake())
            self._closer.add_done_callback(self._closer_done)

    def _closer_done(self, task: asyncio.Task[None]) -> None:
        # An internal task that dies must break the pipe, or aclose() would wait in vain.
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._break(exc)

    async def _close_handshake(self) -> None:
        # Our half: let posted sends finish, then tell the peer how many messages we sent.
        # Senders still waiting for their turn see the closed state and raise PipeClosed.
        try:
            while self._sends_in_flight or self._blocks.sending:
                await asyncio.wait(self._sends_in_flight | self._blocks.sending)
            if self._proto.close_received:
                # Answering the peer's CLOSE: only once all it announced has arrived, so that
                # our CLOSE tells it that it may tear down without losing a byte in flight.
                while self._incoming and self._error is None:
                    # The last payload still arriving; inline messages queue only behind one.
                    last = next(i.payload for i in reversed(self._incoming) if i.payload)
                    await asyncio.wait({last})
                while self._blocks.receiving and self._error is None:  # still landing
                    await asyncio.wait(set(self._blocks.receiving))
            if self._error is not None:
                return
            self._control.write_encoded(self._proto.send_close())
            self._maybe_finish()
        except BrokenPipe as exc:
            # Our CLOSE never left: the connection was lost first (its loss may be reported
            # a callback later). Not a completed close: broken, with that cause, now
            # rather than at close_timeout.
            self._break(exc.__cause__ or exc)

    def _maybe_finish(self) -> None:
        """Release everything once both CLOSEs are exchanged and every payload arrived."""
        if self._proto.state is not State.CLOSED or self._incoming or self._blocks.receiving:
            return
        if self._finished.is_set() or self._error is not None:
            return
        left = self._signalling.unclaimed() if self._signalling is not None else None
        if left is not None:  # (a real sender writes a copy's record with its header)
            self._break(ProtocolError(f"the peer closed the pipe having signalled {left}"))
            return
        self._fail_waiters(PipeClosed("the peer closed the pipe and everything it sent "
                                      "was received"))
        self._finished.set()
        self._cancel_credit_timer()
        self._control.close()
        self._plane.close()
        self._metrics.closed()
        log.info("pipe to %s closed", self.peer)

    def on_connection_lost(self, exc: BaseException) -> None:
        """Called by the control channel when its connection ends."""
        if self._finished.is_set():
            return
        if self._proto.close_received and self._proto.close_sent:
            # Both CLOSEs were exchanged: the peer may close its end as soon as it has all we
            # sent, while its last payloads are still on their way to us (tcp's data
            # connections). The data plane reports them lost if they are; a deadline bounds
            # the wait.
            self._loop.call_later(self._close_timeout, self._close_overdue)
            return
        self._break(exc)

    def _close_overdue(self) -> None:
        self._break(TimeoutError("the peer closed, but its last messages never arrived"))

    def _break(self, cause: BaseException) -> None:
        """Enter the terminal broken state: every pending and later call raises BrokenPipe.

        A failure of our own (not the peer's doing) is told to the peer as such, so that it
        does not take it for a dead link or blame itself.
        """
        if self._error is not None or self._finished.is_set():
            return
        if cause.__traceback__ is not None:
            # Kept without its frames: they hold what the failing call held (the tensors
            # being sent), and the pipe keeps its error for as long as it lives.
            if log.isEnabledFor(logging.DEBUG):
                log.debug("pipe to %s breaks on %s", self.peer,
                          "".join(traceback.format_exception(cause)))
            cause.__traceback__ = None
        err = BrokenPipe(f"pipe to {self.peer} broke: {cause!r}")
        err.__cause__ = cause
        self._error = err
        self._proto.fail()
        try:
            if isinstance(cause, PeerSaysProtocolError):
                pass  # the peer's verdict on us: nothing to tell it back
            elif isinstance(cause, ProtocolError):
                self._control.say(_wire.encode(_wire.Error(_wire.ErrorCode.PROTOCOL,
                                                           str(cause))))
            elif is_local_failure(cause):
                self._control.say(internal_error(cause))
            log.warning("%s", str(err))  # text: a handler keeping records keeps no objects
            for step in (lambda: self._metrics.broken(_break_cause(cause)),
                         lambda: self._fail_waiters(err), lambda: self._blocks.fail(err),
                         lambda: self._fail_pending_senders(err), self._cancel_credit_timer,
                         lambda: self._plane.abort(err), self._control.abort):
                try:
                    step()
                except Exception as exc:  # the rest must run: every waiter must hear of it
                    log.error("pipe to %s: tearing down after a break failed: %r",
                              self.peer, exc)
            if self._closer is not None and self._closer is not asyncio.current_task():
                self._closer.cancel()
        finally:
            self._finished.set()


def _woken(fut: asyncio.Future[None]) -> bool:
    """A recv() woken for a message, not yet run (see Pipe._wake)."""
    return fut.done() and not fut.cancelled() and fut.exception() is None


def _granted(request: asyncio.Future[None]) -> bool:
    """A budget request was granted (not still waiting, nor failed by an abort: then the
    pipe is failing the queue)."""
    return request.done() and request.exception() is None


def _break_cause(cause: BaseException) -> BreakCause:
    """The metrics' name for what broke a pipe."""
    if isinstance(cause, HeartbeatMissed):
        return "heartbeat_missed"
    if isinstance(cause, ProtocolError):
        return "protocol_error"
    if isinstance(cause, PeerFailure):
        return "peer_failure"
    if isinstance(cause, ConnectionAbortedError) and "cancelled" in str(cause):
        return "cancelled"
    if isinstance(cause, TimeoutError):
        return "close_timeout"
    if isinstance(cause, (ConnectionError, EOFError, BrokenPipe)):
        return "peer_closed_connection"
    return "local_failure"


#: What a queued send without CUDA tensors is posted under: nothing (one reusable no-op).
_NO_STREAM: Final = contextlib.nullcontext()


def _callers_stream(out: Outgoing) -> torch.cuda.Stream | None:
    """The current stream of the device of ``out``'s first CUDA tensor (None without one)."""
    if out.cuda:
        for t in out.tensors:
            if t.is_cuda:
                return current_stream(t.device)
    return None


def internal_error(cause: BaseException) -> bytes:
    """The ERROR frame telling the peer that we failed (``cause`` is local): it raises
    :class:`PeerFailure`, not a dropped connection's :class:`BrokenPipe`."""
    return _wire.encode(_wire.Error(_wire.ErrorCode.INTERNAL,
                                    f"{type(cause).__name__}: {cause}"))


def is_local_failure(cause: BaseException) -> bool:
    """Did ``cause`` happen here (out of memory, a CUDA error, a bug), rather than reach us
    from the peer or the network (a dead connection, silence, a rule broken, its failure)?"""
    return not isinstance(cause, (ConnectionError, TimeoutError, PipeError, EOFError,
                                  HeartbeatMissed, PeerFailure, asyncio.CancelledError))
