"""Block transfers of a pipe: ``send_blocks``/``recv_blocks`` as a receiver-driven rendezvous.

The sender offers blocks (OFFER); the receiver's matching ``recv_blocks`` answers with a PULL
once it knows where they go; the payload then moves straight from the sending pool into the
receiving one, so the receiver never allocates a buffer that grows with the request. The
rules and their bookkeeping are the sans-I/O protocol's (``_protocol``); this module keeps the
callers' futures and moves the bytes, each plane its best way:

* Every transfer but an ipc pull is cut into chunks of at most :data:`STAGING_BYTES`, one
  BLOCK_DATA and one payload each, the same on both ends whatever their pools' devices (a
  CPU pool at one end may meet a CUDA pool at the other).
* CPU pools (tcp): each chunk's bytes go from the blocks' own memory to the socket, and are
  received into it, as views.
* CUDA pools (nccl, tcp): each chunk is gathered into a staging buffer (pinned host memory for
  tcp, device memory for nccl), sent, and scattered on arrival.
* ipc: the sender lets the peer map each CUDA pool once (``IpcPlane.export_pool``) and offers
  blocks only once its caller's stream has written them. The receiver pulls once it knows
  where the pool lies; the sender, committed by the PULL (it can no longer take the offer
  back), answers one BLOCK_DATA: "copy now". The receiver copies the blocks out of the mapped
  pool itself, one kernel over all runs (into a CPU pool: gathered through bounded device
  staging), and answers PULLED once the copy ran, which completes the sender's call. A pool
  that cannot be exported travels staged, as above.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import weakref
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, cast

import torch

from . import _hostmem, _wire
from ._blocks import (
    MAX_PIPE_SEGMENTS,
    MAX_PIPE_TENSORS,
    BlockPool,
    PoolLayout,
    check_counts,
    check_fits,
    merge_runs,
    normalize_ids,
)
from ._blocks import normalize_layers as _normalize_layers
from ._blocks_move import (
    Chunk,
    MappedPool,
    Segment,
    Side,
    copy_runs,
    gather,
    iter_chunks,
    kernel_prepared,
    prepare_kernel,
    run_views,
    scatter,
)
from ._blocks_wire import decode_layout, encode_layout
from ._cuda import EventPoller
from ._errors import PipeClosed, PipeError, ProtocolError, fresh
from ._message import check_key
from ._plane import (
    DeviceBytesPlane,
    HostBytesPlane,
    fail_future,
    in_daemon_thread,
    mark_read,
    settle_like,
)
from ._protocol import failed_offer_cost, offer_cost

if TYPE_CHECKING:
    from ._pipe import Pipe

log = logging.getLogger("aiokvpipe")

#: Staged transfers are cut into chunks of at most this many bytes, the same on both ends.
STAGING_BYTES: Final = 64 << 20
#: Staged chunks one transfer may have in flight at once (so staging memory is bounded).
CHUNKS_IN_FLIGHT: Final = 2
#: Why a receiver refuses blocks for a key it gave up (``Pipe.discard``).
DISCARDED: Final = "the receiver discarded this key"
#: A CPU pool's views are made layer by layer, at most about this many per loop iteration
#: for all the calls of a pipe together (each view is a slice; a 4,096-token layer of an 8B
#: Llama is 512 of them): 32 calls sending a layer each, woken by their PULLs in one
#: iteration, held the 2-core VM's loop for 13–27 ms. With 2,048 a request's sender still
#: lagged 4.2–6.6 ms (p99) there, with 1,024 3.7–4.0 ms.
VIEWS_PER_STEP: Final = 1024


class _Passed:
    """An event that has completed: watched, it completes once every event watched before
    it did (an :class:`EventPoller` completes its watches in order)."""

    @staticmethod
    def query() -> bool:
        return True


_PASSED: Final = _Passed()


@dataclass(eq=False)
class _Refusal:
    """A ``recv_blocks`` that failed on its own arguments (a bad id, a layer it does not
    have): the offers meant for it are refused with its reason, so that the peer's
    ``send_blocks`` raises too rather than wait for ever, each of its layers once, until a
    new ``recv_blocks`` asks for the key."""

    why: str
    #: the layers still to refuse; None: whichever come first (the call's layers were bad)
    missing: set[int] | None


#: Keys with refusals kept at most, and refusals a key (the oldest forgotten first): a
#: receiver failing calls for keys nobody sends must not grow without bound.
MAX_REFUSED_KEYS: Final = 4096
MAX_REFUSALS_PER_KEY: Final = 64


@dataclass(eq=False)
class _Sink:
    """One ``recv_blocks`` call: where blocks of ``key`` go, and which tensors are missing."""

    pool: BlockPool
    ids: tuple[int, ...]
    key: str | None
    missing: set[int]
    done: asyncio.Future[None]
    #: payload receives posted for this call, not complete yet
    inflight: set[asyncio.Future[Any]] = field(default_factory=set)
    #: offers pulled for this call whose payload is still to come
    pending_offers: int = 0
    abandoned: bool = False
    #: (CUDA pools) after what the caller's stream had queued at the call: copies into the
    #: pool wait for it
    after: torch.cuda.Event | None = None
    #: the task of the call (whose cancellation shows before it leaves: its wait is shielded)
    task: asyncio.Task[Any] | None = None
    #: its task's cancellations requested before the call (one swallowed without
    #: ``uncancel()`` stays counted: it is not this call's)
    cancels: int = 0

    @property
    def live(self) -> bool:
        """The call still waits for its blocks: not done, given up or being cancelled."""
        return not (self.done.done() or self.abandoned
                    or (self.task is not None and self.task.cancelling() > self.cancels))


@dataclass(eq=False)
class _Incoming:
    """A pulled offer whose payload arrives chunk by chunk (one BLOCK_DATA each)."""

    sink: _Sink
    layers: tuple[int, ...]
    chunks: deque[Chunk]
    #: the offer's block ids in the sender's pool
    ids: tuple[int, ...] = ()
    #: ipc: the sender's pool as mapped here; its one BLOCK_DATA means "copy now"
    mapped: MappedPool | None = None
    #: a CPU pool on tcp: each chunk straight into its blocks, as views
    views: bool = False


class BlockExchange:
    """The block transfers of one pipe (see the module docstring)."""

    def __init__(self, pipe: Pipe) -> None:
        self._pipe = pipe
        self._kernel_gate = asyncio.Lock()
        self._kernel_waiters = 0  # block calls waiting for the copy kernel (or behind them)
        #: scatters after a break, awaited before their calls end (see _settle_after)
        self._settling: set[asyncio.Task[None]] = set()
        #: Our pools described to the peer, by what they are (see BlockPool.memory_key): its
        #: id, whether the peer copies out of it itself (ipc), and the first BlockPool of it
        #: (whose tensors stay alive, so that no other memory takes those addresses).
        self._described: dict[Hashable, tuple[int, bool, BlockPool]] = {}
        self._peer_pools: dict[int, PoolLayout] = {}
        #: Segments of a block, and tensors, of the pools described so far, ours and the
        #: peer's.
        self._our_segments = self._peer_segments = 0
        self._our_tensors = self._peer_tensors = 0
        self._offers_out: dict[int, asyncio.Future[str]] = {}
        #: The PULL answers of our offers whose call was cancelled in the loop iteration the
        #: PULL came in, before that call could see it (send_blocks takes them).
        self._late_pulls: dict[int, str] = {}
        #: The peer's offers (and failed offers) waiting for a matching receive, by key, in
        #: order, by offer id (a RETRACT takes one out at once: a scan each would let a peer
        #: make us do quadratic work); and all of them by offer id.
        self._offers_in: dict[str | None, dict[int, _wire.Offer | _wire.OfferFailed]] = {}
        self._queued: dict[int, _wire.Offer | _wire.OfferFailed] = {}
        self._sinks: dict[str | None, list[_Sink]] = {}
        self._refusals: OrderedDict[str | None, deque[_Refusal]] = OrderedDict()
        self._incoming: dict[int, _Incoming] = {}
        #: The offers of our pools the peer copies out of itself (ipc), pulled but not yet
        #: copied (the PULLED answer completes them).
        self._copies_out: dict[int, asyncio.Future[str]] = {}
        #: The peer's pools as mapped here (ipc), and recent merged runs.
        self._mapped: dict[int, MappedPool] = {}
        self._runs: dict[tuple[tuple[int, ...] | None, tuple[int, ...] | None],
                         tuple[tuple[int, int, int], ...]] = {}
        #: Views of CPU pools made in this loop iteration by all calls (see VIEWS_PER_STEP).
        self._turn_views = 0
        #: Block payloads posted and not yet out, and those announced to us and not yet
        #: written into their pools: a graceful close waits for both.
        self.sending: set[asyncio.Future[Any]] = set()
        self.receiving: set[asyncio.Future[Any]] = set()
        # A failed poll is a CUDA error, which no later call on this device escapes: the
        # pipe breaks with it (else the poller kept failing block calls with a stale error
        # while the pipe looked healthy).
        self._poller = EventPoller(pipe._break)
        self._ready_poller = EventPoller(pipe._break)

    async def _ready_to_move(self, pool: BlockPool, receiving: bool) -> None:
        """The copy kernel of each GPU this call may use (gathers and scatters run on the
        pool's, staging on the pipe's), made off the loop (:func:`prepare_kernel`); and a
        CPU pool received into, its memory checked writable (:func:`_check_writable`; a
        ``ValueError`` if not). Calls that wait for either go through a lock, which is FIFO,
        and so do calls made while any still waits: block calls keep their order. Once
        done: no suspension."""
        devices = (pool.device, self._pipe.device)
        check = receiving and pool.device.type == "cpu" and not _writable_known(pool)
        if not (self._kernel_waiters or check) and all(kernel_prepared(d) for d in devices):
            return
        self._kernel_waiters += 1
        try:
            async with self._kernel_gate:
                for device in dict.fromkeys(devices):
                    await prepare_kernel(device)
                if check and not _writable_known(pool):  # (a call ahead may have checked it)
                    await _check_writable(pool)
        finally:
            self._kernel_waiters -= 1

    # -- the sending end ------------------------------------------------------------------

    async def send_blocks(self, pool: BlockPool, block_ids: object, key: str | None,
                          layers: object) -> None:
        pipe = self._pipe
        t0 = perf_counter()
        key, ids, chosen = await self._arguments(pool, block_ids, key, layers, sending=True)
        pipe._check_can_send()
        if not ids:  # nothing to move: no offer (the peer's recv_blocks of none returns too)
            return
        ready = _mark_stream(pool)  # what the caller's stream has queued at the call
        await self._ready_to_move(pool, receiving=False)
        pipe._check_can_send()
        try:
            pool_id, peer_copies = self._announce(pool)
        except ValueError as exc:  # more pools, or larger, than a pipe describes
            await self._tell_failed(key, chosen, exc)
            raise
        if peer_copies and ready is not None:
            # The peer reads the blocks as soon as it pulls: offer them once the caller's
            # stream has written them. Cancelled here, nothing was offered.
            try:
                await self._ready_poller.watch(ready)
            except Exception:
                pipe._check_can_send()  # the failed poll broke the pipe: BrokenPipe
                raise
        cost = offer_cost(len(ids), len(chosen))
        await pipe._credits.acquire(cost)
        proto = pipe._proto
        try:
            pipe._check_can_send()
        except BaseException:
            pipe._credits.release(cost)
            raise
        proto.spend(cost)
        offer_id, data = proto.send_offer(pool_id, key, chosen, ids)
        pulled: asyncio.Future[str] = pipe._loop.create_future()
        self._offers_out[offer_id] = pulled
        copied: asyncio.Future[str] | None = None
        if peer_copies:
            # Registered now: the PULL and the PULLED may come in the same read.
            copied = self._copies_out[offer_id] = pipe._loop.create_future()
        pipe._write(data)
        try:
            refusal = await pulled
        except asyncio.CancelledError:
            late = self._late_pulls.pop(offer_id, None)
            if late is None and (not pulled.done() or pulled.cancelled()
                                 or pulled.exception() is not None):
                # Not pulled: take it back, unmoved (unless a close took it back already).
                if self._offers_out.pop(offer_id, None) is not None:
                    self._take_back(offer_id)
                raise
            # Pulled in the loop iteration of the cancellation: committed, so the blocks are
            # sent whole (the peer waits for them), and the cancellation stands.
            if late if late is not None else pulled.result():
                self._forget_copy(offer_id)  # refused: nothing moves
            elif copied is None:
                self._start_payload(pool, ids, chosen, offer_id, ready)
            raise
        except BaseException:  # the pipe closed or broke before the peer pulled
            self._forget_copy(offer_id)
            raise
        if refusal:
            self._forget_copy(offer_id)
            raise ValueError(f"the peer refused blocks for key {key!r}: {refusal}")
        if copied is not None:
            # The peer copies out of our pool; its PULLED says it is done with the blocks.
            await asyncio.shield(copied)
        else:
            await asyncio.shield(self._start_payload(pool, ids, chosen, offer_id, ready))
        nbytes = pool.layout.block_bytes(chosen) * len(ids)
        pipe._bytes_sent += nbytes
        pipe._block_transfers_sent += 1
        pipe._metrics.sent_blocks(nbytes, perf_counter() - t0)

    async def _arguments(self, pool: BlockPool, block_ids: object, key: str | None,
                         layers: object, *, sending: bool
                         ) -> tuple[str | None, tuple[int, ...], tuple[int, ...]]:
        """A block call's arguments, checked (:func:`_checked`, :func:`_check_device`):
        (key, ids, tensor indices). Bad ones raise, once the peer's matching call was told
        (:meth:`_tell_failed`, :meth:`_refuse_for`)."""
        try:
            checked = _checked(pool, block_ids, key, layers, destination=not sending)
            _check_device(self._pipe, pool)
        except (TypeError, ValueError) as exc:
            named = _named_by(pool, key, layers)
            if named is not None:  # (a key that is itself bad names no call of the peer's)
                await (self._tell_failed if sending else self._refuse_for)(*named, exc)
            raise
        return checked

    async def _tell_failed(self, key: str | None, layers: tuple[int, ...] | None,
                           exc: Exception) -> None:
        """A ``send_blocks`` failed on its arguments: tell the peer, whose receive for it
        then fails too (OFFER_FAILED) rather than wait for ever; in its turn, as its offer
        would have gone (behind the calls made before it that prepare, wait for their
        caller's stream or wait for credits), so that the peer pairs calls in call order.
        ``layers``: those it named, None if they were what was wrong. Not on a pipe that
        ends; cancelled, it tells nothing."""
        pipe = self._pipe
        chosen = layers or ()
        # (What the frame carries: its cost is that.)
        text = _wire.error_text(f"the sender's send_blocks failed: {exc}")
        cost = failed_offer_cost(key, len(chosen), text)
        if self._ending():
            return
        await self._wait_turn()
        try:
            # Behind the offers of earlier calls still waiting for their caller's stream
            # (ipc): the poller completes its watches in order.
            await self._ready_poller.watch(_PASSED)
        except Exception:  # the poll failed: the pipe broke with it
            return
        try:
            await pipe._credits.acquire(cost)
        except PipeError:
            return  # the pipe ended: so did the peer's receive
        if self._ending():
            pipe._credits.release(cost)
            return
        pipe._proto.spend(cost)
        with contextlib.suppress(PipeError):  # the connection is gone: so is the receive
            pipe._write(pipe._proto.send_offer_failed(key, chosen, text))

    async def _wait_turn(self) -> None:
        """Wait until the block calls made before this one are past their preparation (see
        :meth:`_ready_to_move`): what this call does next comes after what they do then."""
        if not self._kernel_waiters:
            return
        self._kernel_waiters += 1
        try:
            async with self._kernel_gate:
                pass
        finally:
            self._kernel_waiters -= 1

    def _take_back(self, offer_id: int) -> None:
        """An offer of ours given up before the peer pulled it: RETRACT it (while we may still
        write), so that a PULL already on its way does not leave the peer's receive waiting
        for a payload that never comes."""
        self._forget_copy(offer_id)
        pipe = self._pipe
        if pipe._error is None and not pipe._proto.close_sent:
            with contextlib.suppress(PipeError):  # the connection is gone: so is that wait
                pipe._write(pipe._proto.send_retract(offer_id))

    def _forget_copy(self, offer_id: int) -> None:
        """The peer will not copy this offer (refused, or taken back before it pulled)."""
        fut = self._copies_out.pop(offer_id, None)
        if fut is not None:
            fut.cancel()

    def _announce(self, pool: BlockPool) -> tuple[int, bool]:
        """``pool``'s id on this pipe, described to the peer the first time (a BlockPool
        made again over the same tensors is the same pool), and whether the peer copies out
        of it itself (ipc)."""
        key = pool.memory_key
        described = self._described.get(key)
        if described is not None:
            return described[0], described[1]
        if len(self._described) >= _wire.MAX_POOLS:
            raise ValueError(f"a pipe carries at most {_wire.MAX_POOLS} pools")
        if self._our_segments + pool.layout.segments > MAX_PIPE_SEGMENTS:
            raise ValueError(f"the pools described on this pipe would have more than "
                             f"{MAX_PIPE_SEGMENTS} segments a block together")
        tensors = len(pool.layout.tensors)
        if self._our_tensors + tensors > MAX_PIPE_TENSORS:
            raise ValueError(f"the pools described on this pipe would have more than "
                             f"{MAX_PIPE_TENSORS} tensors together")
        self._our_segments += pool.layout.segments
        self._our_tensors += tensors
        pool_id = len(self._described)
        pipe = self._pipe
        pipe._write(pipe._proto.send_pool(pool_id, encode_layout(pool_id, pool.layout)))
        # ipc: the plane exports pools whose memory the peer can map (it says no to others,
        # which then travel staged)
        export = getattr(pipe._plane, "export_pool", None)
        exported = bool(export is not None and export(pool_id, pool.tensors))
        self._described[key] = (pool_id, exported, pool)
        return pool_id, exported

    def _start_payload(self, pool: BlockPool, ids: tuple[int, ...], layers: tuple[int, ...],
                       offer_id: int, ready: torch.cuda.Event | None) -> asyncio.Future[None]:
        """Send a pulled offer's payload, whether or not its caller still waits (the peer
        does): a task of its own, which breaks the pipe if it fails."""
        transfer = asyncio.ensure_future(self._send_payload(pool, ids, layers, offer_id, ready))
        transfer.add_done_callback(mark_read)  # (its caller may be gone; the pipe broke)
        return self._sending(transfer)  # a close sends its CLOSE only after it

    async def _send_payload(self, pool: BlockPool, ids: tuple[int, ...],
                            layers: tuple[int, ...], offer_id: int,
                            ready: torch.cuda.Event | None) -> None:
        pipe = self._pipe
        try:
            await self._send_payload_now(pool, ids, layers, offer_id, ready)
        except Exception as exc:
            # Part of the payload may have left, or none while the peer waits for it: the
            # stream is no longer in step. The caller gets a copy of the pipe's error:
            # re-raising ``exc`` would chain this frame (its staging buffer, the pool) into
            # the cause the pipe keeps.
            pipe._break(exc)
            raise fresh(pipe._error) if pipe._error is not None else exc
        except BaseException:
            pipe._break(ConnectionAbortedError("block transfer cancelled"))
            raise

    async def _send_payload_now(self, pool: BlockPool, ids: tuple[int, ...],
                                layers: tuple[int, ...], offer_id: int,
                                ready: torch.cuda.Event | None) -> None:
        pipe = self._pipe
        plane = pipe._plane
        proto = pipe._proto
        if pool.device.type == "cpu" and plane.name == "tcp":
            # Nothing is posted until the views are made, so the payload stream stays in step.
            chunks = list(iter_chunks(pool.layout, layers, len(ids), STAGING_BYTES))
            parts = [await self._views_turn_by_turn(pool, chunk, ids, "src") for chunk in chunks]
            nbytes = sum(chunk.nbytes for chunk in chunks)
            await pipe._send_budget.acquire(nbytes)
            sent: list[asyncio.Future[Any]] = []
            try:
                for views in parts:
                    sent.append(self._sending(cast(HostBytesPlane, plane).post_send_views(
                        views, keepalive=pool)))
                    pipe._write(proto.send_block_data(offer_id))
            except BaseException:
                pipe._send_budget.release(nbytes)
                raise
            proto.offer_sent(offer_id)
            try:
                for done in sent:
                    await done
            finally:
                pipe._send_budget.release(nbytes)
            return
        cuda = pool.device.type == "cuda"
        tcp = plane.name == "tcp"
        stream = torch.cuda.Stream(pool.device) if cuda else None
        inflight: deque[asyncio.Future[Any]] = deque()
        for chunk in iter_chunks(pool.layout, layers, len(ids), STAGING_BYTES):
            while len(inflight) >= CHUNKS_IN_FLIGHT:
                await inflight.popleft()
            await pipe._send_budget.acquire(chunk.nbytes)
            # tcp sends host memory (pinned, for a CUDA pool's copy engine); nccl sends
            # device memory (a CPU pool's chunk is copied there by the plane).
            buf = torch.empty(chunk.nbytes, dtype=torch.uint8,
                              device=pool.device if cuda and not tcp else "cpu",
                              pin_memory=cuda and tcp)
            if stream is not None:
                with torch.cuda.device(pool.device), torch.cuda.stream(stream):
                    if ready is not None:
                        stream.wait_event(ready)
                    gather(pool, ids, chunk, buf, stream=stream)
                    if not tcp:  # the plane orders itself after this (gathering) stream
                        done = plane.post_send([buf])
                if tcp:  # the socket reads the host buffer once the copy is done
                    event = torch.cuda.Event()
                    event.record(stream)
                    await self._poller.watch(event, chunk.nbytes, keepalive=buf)
                    done = cast(HostBytesPlane, plane).post_send_views(
                        [_host_view(buf)], keepalive=buf)
            else:
                gather(pool, ids, chunk, buf)
                done = plane.post_send([buf])
            pipe._write(proto.send_block_data(offer_id))
            done.add_done_callback(functools.partial(_release, pipe, chunk.nbytes))
            inflight.append(self._sending(done))
        proto.offer_sent(offer_id)
        while inflight:
            await inflight.popleft()

    # -- the receiving end ------------------------------------------------------------------

    async def recv_blocks(self, pool: BlockPool, block_ids: object, key: str | None,
                          layers: object) -> None:
        pipe = self._pipe
        t0 = perf_counter()
        key, ids, chosen = await self._arguments(pool, block_ids, key, layers, sending=False)
        _check_can_recv_blocks(pipe)
        was_discarded = pipe._proto.is_discarded(key)
        pipe._proto.undiscard(key)  # asked for again: offers for it are taken from now on
        if not ids:  # nothing to move (the peer's send_blocks of none offers nothing)
            return
        after = _mark_stream(pool)  # what the caller's stream has queued at the call
        try:
            await self._ready_to_move(pool, receiving=True)
        except ValueError as exc:
            # Refused before anything moved (a pool in read-only memory): as if never
            # called, a key discarded before stays so (its offers refused, not left waiting);
            # else the offers meant for it are refused, as for any bad argument.
            if was_discarded and pipe._error is None:
                pipe.discard(key)
            else:
                self._refuse_now(key, _Refusal(f"the receiver's recv_blocks failed: {exc}",
                                               set(chosen)))
            raise
        _check_can_recv_blocks(pipe)
        # Asked for again, in its turn (after any call before it that failed, which refused
        # what it had to by then): offers are taken from now on.
        self._refusals.pop(key, None)
        task = asyncio.current_task(pipe._loop)
        sink = _Sink(pool, ids, key, set(chosen), pipe._loop.create_future(), after=after,
                     task=task, cancels=task.cancelling() if task is not None else 0)
        self._sinks.setdefault(key, []).append(sink)
        try:
            for offer in self._waiting(key):
                self._try_match(offer)
                if sink.done.done():
                    break
            await asyncio.shield(sink.done)
            nbytes = pool.layout.block_bytes(chosen) * len(ids)
            pipe._bytes_received += nbytes
            pipe._block_transfers_received += 1
            pipe._metrics.received_blocks(nbytes, perf_counter() - t0)
        except BaseException as exc:  # cancelled, or the pipe closed or broke
            self._abandon(sink)
            # What is already posted still writes into the pool: wait for it, so that once
            # this call is over nothing touches the named blocks any more, even when
            # cancelled again meanwhile (those receives end, if only with the pipe).
            cancelled_again = False
            while sink.inflight:
                try:
                    await asyncio.wait(set(sink.inflight))
                except asyncio.CancelledError:
                    cancelled_again = True
            if cancelled_again and not isinstance(exc, asyncio.CancelledError):
                raise asyncio.CancelledError from exc
            raise
        finally:
            self._drop_sink(sink)

    def _drop_sink(self, sink: _Sink) -> None:
        sinks = self._sinks.get(sink.key)
        if sinks and sink in sinks:
            sinks.remove(sink)
            if not sinks:
                del self._sinks[sink.key]

    def _abandon(self, sink: _Sink) -> None:
        sink.abandoned = True
        self._drop_sink(sink)

    def on_frame(self, frame: _wire.Frame) -> None:
        """A block-transfer frame the protocol accepted."""
        if isinstance(frame, _wire.PoolInfo):
            pool_id, layout = decode_layout(frame.layout)
            if pool_id != frame.pool_id:
                raise ProtocolError(f"POOL {frame.pool_id} describes pool {pool_id}")
            self._peer_segments += layout.segments
            if self._peer_segments > MAX_PIPE_SEGMENTS:  # (what we hold for its layouts)
                raise ProtocolError(f"the peer's pools have more than {MAX_PIPE_SEGMENTS} "
                                    "segments a block together")
            self._peer_tensors += len(layout.tensors)
            if self._peer_tensors > MAX_PIPE_TENSORS:
                raise ProtocolError(f"the peer's pools have more than {MAX_PIPE_TENSORS} "
                                    "tensors together")
            self._peer_pools[frame.pool_id] = layout
        elif isinstance(frame, _wire.Offer):
            layout = self._peer_pools[frame.pool_id]
            # min/max: one pass in C over thousands of ids, not a generator in Python
            if frame.ids and not (0 <= min(frame.ids) and max(frame.ids) < layout.num_blocks):
                raise ProtocolError(f"offer {frame.offer_id} names blocks outside its pool of "
                                    f"{layout.num_blocks}")
            if frame.layers and not (0 <= min(frame.layers)
                                     and max(frame.layers) < len(layout.tensors)):
                raise ProtocolError(f"offer {frame.offer_id} names tensors outside its pool of "
                                    f"{len(layout.tensors)}")
            if not self._pipe._proto.offer_waiting(frame.offer_id):
                return  # taken back in the same read: its RETRACT follows, nothing to do
            if self._pipe._proto.is_discarded(frame.key):
                if not any(sink.live for sink in self._sinks.get(frame.key, ())):
                    self._refuse(frame, DISCARDED)
                    return
                # A recv_blocks waits since before the discard: it asks for the key again.
                self._pipe._proto.undiscard(frame.key)
            self._queue(frame)
            self._try_match(frame)
        elif isinstance(frame, _wire.OfferFailed):
            if (self._pipe._proto.is_discarded(frame.key)
                    and not any(sink.live for sink in self._sinks.get(frame.key, ()))):
                self._refuse(frame, DISCARDED)  # (dropped: nobody waits for it)
                return
            self._queue(frame)
            self._try_match(frame)
        elif isinstance(frame, _wire.Pull):
            fut = self._offers_out.pop(frame.offer_id, None)
            copied = self._copies_out.get(frame.offer_id)
            if fut is None:  # given up here (a close of ours): the peer never copies it
                return
            # First: a failed write below must not leave the call waiting.
            if not fut.done():
                fut.set_result(frame.error)
            elif fut.cancelled():  # its call was cancelled in this loop iteration: it reads
                self._late_pulls[frame.offer_id] = frame.error  # this instead, and sends whole
            if copied is not None and not frame.error:
                # Committed (no RETRACT is possible any more): let the peer copy now, whether
                # or not the caller is still waiting; a close waits for the copy to end.
                pipe = self._pipe
                self._sending(copied)
                pipe._write(pipe._proto.send_block_data(frame.offer_id))
        elif isinstance(frame, _wire.Pulled):
            fut = self._copies_out.pop(frame.offer_id, None)
            if fut is None:
                raise ProtocolError(f"PULLED of offer {frame.offer_id}, a pool it cannot map")
            if not fut.done():
                fut.set_result("")
        elif isinstance(frame, _wire.BlockData):
            self._block_data(frame.offer_id)
        elif isinstance(frame, _wire.Retract):
            self._pipe.credit_released()  # the protocol released the offer's credit
            queued = self._queued.get(frame.offer_id)
            if queued is not None:
                self._unqueue(queued)
                return
            incoming = self._incoming.pop(frame.offer_id, None)
            if incoming is not None:  # crossed our PULL: those layers are missing again,
                sink = incoming.sink  # and an offer queued meanwhile may bring them
                sink.missing.update(incoming.layers)
                sink.pending_offers -= 1
                for offer in self._waiting(sink.key):
                    self._try_match(offer)
                self._settle(sink)  # (the peer's close may have come first)

    def discard(self, key: str | None) -> int:
        """The receiver gave ``key`` up: refuse its offers waiting here (their senders hear
        why); later ones are refused as they come while the key stays discarded."""
        offers = self._offers_in.pop(key, {})
        for offer_id, offer in offers.items():
            del self._queued[offer_id]
            self._refuse(offer, DISCARDED)
        return len(offers)

    def _refuse(self, offer: _wire.Offer | _wire.OfferFailed, why: str) -> None:
        if isinstance(offer, _wire.OfferFailed):  # nothing waits for an answer: dropped
            self._pipe._proto.failed_offer_taken(offer.offer_id)
            self._pipe.credit_released()
        else:
            self._send_pull(offer.offer_id, why)

    async def _refuse_for(self, key: str | None, layers: tuple[int, ...] | None,
                          exc: Exception) -> None:
        """A ``recv_blocks`` failed on its arguments: refuse the offers meant for it, those
        waiting and those to come (see :class:`_Refusal`), so that their senders hear why;
        in its turn, behind the calls made before it that still prepare (they take offers
        first). ``layers``: those it named, None if they were what was wrong. Not on a pipe
        that ends; cancelled, it refuses nothing."""
        await self._wait_turn()
        self._refuse_now(key, _Refusal(f"the receiver's recv_blocks failed: {exc}",
                                       None if layers is None else set(layers)))

    def _ending(self) -> bool:
        """The pipe broke or closes: no offer is made, pulled or refused any more."""
        pipe = self._pipe
        return pipe._error is not None or pipe._closed_here or pipe._proto.close_sent

    def _refuse_now(self, key: str | None, refusal: _Refusal) -> None:
        """Refuse the offers waiting for ``key`` that ``refusal`` covers, and keep it for
        those to come."""
        if self._ending():
            return  # (the close took them back)
        for offer in self._waiting(key):
            if self._sink_for(offer) is not None:
                continue  # an earlier call's, waiting for it to be matched
            if self._refused_by(refusal, offer):
                self._unqueue(offer)
            if refusal.missing is not None and not refusal.missing:
                return
        refusals = self._refusals.setdefault(key, deque(maxlen=MAX_REFUSALS_PER_KEY))
        refusals.append(refusal)
        self._refusals.move_to_end(key)
        if len(self._refusals) > MAX_REFUSED_KEYS:
            self._refusals.popitem(last=False)

    def _refused_by(self, refusal: _Refusal, offer: _wire.Offer | _wire.OfferFailed
                    ) -> bool:
        """Refuse ``offer`` if ``refusal`` covers its layers (then they are done)."""
        if isinstance(offer, _wire.OfferFailed):  # both calls failed: they pair up
            refusal.missing = set()
            self._refuse(offer, refusal.why)
            return True
        if refusal.missing is None:  # the first offer to come fixes the layers: all of them
            refusal.missing = set(range(len(self._peer_pools[offer.pool_id].tensors)))
        if not refusal.missing.issuperset(offer.layers):
            return False
        refusal.missing.difference_update(offer.layers)
        self._refuse(offer, refusal.why)
        return True

    def _queue(self, offer: _wire.Offer | _wire.OfferFailed, first: bool = False) -> None:
        """Keep ``offer`` waiting for a receive of its key: last in line, or ``first``."""
        queue = self._offers_in.setdefault(offer.key, {})
        if first and queue:  # (rare: a call given up before its PULL went)
            self._offers_in[offer.key] = {offer.offer_id: offer, **queue}
        else:
            queue[offer.offer_id] = offer
        self._queued[offer.offer_id] = offer

    def _unqueue(self, offer: _wire.Offer | _wire.OfferFailed) -> None:
        queue = self._offers_in[offer.key]
        del queue[offer.offer_id]
        del self._queued[offer.offer_id]
        if not queue:
            del self._offers_in[offer.key]

    def _waiting(self, key: str | None) -> list[_wire.Offer | _wire.OfferFailed]:
        """The offers waiting for ``key``, in order (a copy: matching takes them out)."""
        queue = self._offers_in.get(key)
        return list(queue.values()) if queue else []

    def _sink_for(self, offer: _wire.Offer | _wire.OfferFailed) -> _Sink | None:
        """The first call waiting that ``offer`` is for: a live one that still misses the
        layers it names (a failed offer naming none: one that still misses any)."""
        for sink in self._sinks.get(offer.key, ()):
            # (a call being cancelled takes nothing: a later one will)
            if sink.live and sink.missing and sink.missing.issuperset(offer.layers):
                return sink
        return None

    def _try_match(self, offer: _wire.Offer | _wire.OfferFailed) -> None:
        sink = self._sink_for(offer)
        if sink is not None:
            self._unqueue(offer)
            if isinstance(offer, _wire.OfferFailed):
                # The send meant for this call failed on its arguments: so does the call.
                self._refuse(offer, "")
                if not sink.done.done():
                    sink.done.set_exception(ValueError(offer.error))
            else:
                self._pull(sink, offer)
            return
        refusals = self._refusals.get(offer.key)
        for refusal in refusals or ():
            if self._refused_by(refusal, offer):
                self._unqueue(offer)
                if not refusal.missing:
                    refusals.remove(refusal)  # type: ignore[union-attr]
                    if not refusals:
                        del self._refusals[offer.key]
                return

    def _pull(self, sink: _Sink, offer: _wire.Offer) -> None:
        pipe = self._pipe
        try:
            check_fits(sink.pool.layout, self._peer_pools[offer.pool_id])
            check_counts(len(sink.ids), len(offer.ids))
        except ValueError as exc:
            # A misfit is the callers' error on both ends: this recv_blocks() raises it, the
            # peer's send_blocks() hears why; the pipe goes on.
            self._refuse(offer, str(exc))
            sink.done.set_exception(ValueError(str(exc)))
            return
        sink.missing.difference_update(offer.layers)
        sink.pending_offers += 1
        source = getattr(pipe._plane, "pool_source", None)
        chunks: deque[Chunk] = deque()
        if source is None:
            chunks.extend(self._chunks(sink, offer.layers))
        # (ipc: cut into chunks only if the pool turns out to travel staged)
        incoming = self._incoming[offer.offer_id] = _Incoming(
            sink, tuple(offer.layers), chunks, tuple(offer.ids),
            views=sink.pool.device.type == "cpu" and pipe._plane.name == "tcp")
        if source is None:
            self._send_pull(offer.offer_id)
            return
        # ipc: pull once we know whether the sender exported the pool (we then copy out of
        # it ourselves on its one BLOCK_DATA) or sends it staged: a BLOCK_DATA must never
        # come before we know which it means.
        source(offer.pool_id).add_done_callback(functools.partial(
            self._pool_placed, offer, incoming))

    @staticmethod
    def _chunks(sink: _Sink, layers: Sequence[int]) -> Iterator[Chunk]:
        """A staged transfer's chunks, cut as the sender cuts them."""
        return iter_chunks(sink.pool.layout, layers, len(sink.ids), STAGING_BYTES)

    def _send_pull(self, offer_id: int, error: str = "") -> None:
        """Take an offer (or refuse it, saying why); its credit goes back either way."""
        pipe = self._pipe
        pipe._write(pipe._proto.send_pull(offer_id, error))
        pipe.credit_released()

    def _pool_placed(self, offer: _wire.Offer, incoming: _Incoming,
                     fut: asyncio.Future[list[tuple[int, int]] | None]) -> None:
        pipe = self._pipe
        if fut.cancelled() or fut.exception() is not None or pipe._error is not None:
            return  # the plane broke: so does the pipe
        if self._incoming.get(offer.offer_id) is not incoming:
            return  # the sender took the offer back meanwhile
        sink = incoming.sink
        if not sink.live:
            # Given up before its PULL went: nothing was taken. The offer waits for the next
            # call, first in line (pulled for nobody, the sender heard it was copied), or is
            # refused if the call's key was discarded meanwhile, as discard() does.
            del self._incoming[offer.offer_id]
            sink.pending_offers -= 1
            sink.missing.update(incoming.layers)
            if (self._pipe._proto.is_discarded(offer.key)
                    and not any(s.live for s in self._sinks.get(offer.key, ()))):
                self._refuse(offer, DISCARDED)
                return
            self._queue(offer, first=True)
            self._try_match(offer)
            return
        places = fut.result()
        try:
            if places is not None:
                incoming.mapped = self._mapped.get(offer.pool_id)
                if incoming.mapped is None:
                    incoming.mapped = self._mapped[offer.pool_id] = _mapped_pool(
                        self._peer_pools[offer.pool_id], places, pipe.device)
            else:
                incoming.chunks.extend(self._chunks(incoming.sink, incoming.layers))
            self._send_pull(offer.offer_id)
        except Exception as exc:  # the peer's pool does not fit its mapping; a lost link
            pipe._break(exc)

    def _copy_out(self, mapped: MappedPool, offer_id: int, incoming: _Incoming
                  ) -> asyncio.Future[Any]:
        """Copy an offer's blocks out of the peer's mapped pool into the sink's; then PULLED."""
        sink, pipe = incoming.sink, self._pipe
        ids = incoming.ids
        plane = cast(Any, pipe._plane)
        done: asyncio.Future[Any]
        if sink.abandoned:  # the caller gave up before anything was copied: copy nothing
            done = pipe._loop.create_future()
            done.set_result(None)
        elif sink.pool.device == mapped.device:
            runs = self._runs_of(ids, sink.ids)
            nbytes = sink.pool.layout.block_bytes(incoming.layers) * len(sink.ids)
            done = plane.pull(
                lambda stream: copy_runs(mapped, sink.pool, incoming.layers, runs,
                                         stream=stream),
                nbytes, sink.after, keepalive=sink.pool)
        else:  # a CPU pool: through bounded staging on our device
            done = asyncio.ensure_future(self._copy_out_staged(mapped, ids, incoming))

        def answer(f: asyncio.Future[Any]) -> None:
            if not f.cancelled() and f.exception() is None and pipe._error is None:
                try:
                    pipe._write(pipe._proto.send_pulled(offer_id))
                except PipeError:  # the connection is gone: the pipe broke, and says why
                    pass

        done.add_done_callback(answer)
        return done

    def _runs_of(self, src_ids: tuple[int, ...] | None, dst_ids: tuple[int, ...] | None
                 ) -> tuple[tuple[int, int, int], ...]:
        """:func:`merge_runs`, remembered for the last few pairs of id lists: a request
        streamed layer by layer names the same blocks in every call. ``None`` for one side:
        the positions ``0..n-1`` (a run of this pool against a packed stream)."""
        runs = self._runs.get((src_ids, dst_ids))
        if runs is None:
            if len(self._runs) >= 16:
                self._runs.clear()
            named = src_ids if src_ids is not None else dst_ids
            assert named is not None  # one side names the blocks
            n = len(named)
            runs = self._runs[src_ids, dst_ids] = merge_runs(
                range(n) if src_ids is None else src_ids,
                range(n) if dst_ids is None else dst_ids)
        return runs

    def _views_of(self, pool: BlockPool, chunk: Chunk, ids: tuple[int, ...]
                  ) -> list[memoryview] | asyncio.Future[list[memoryview]]:
        """The views of ``chunk`` of a transfer into blocks ``ids`` of a CPU pool, in the
        stream's order: at once if this loop iteration has room for them all (most
        transfers), else a future of them, made segment by segment as
        :meth:`_room_for_views` allows (a request of 2,048 scattered blocks over 32 layers
        is 131,072 views: 157 ms in one callback). The plane holds later receives behind it
        meanwhile."""
        segments = [(seg.tensor, self._segment_runs(seg, ids, "dst")) for seg in chunk.segments]
        tensors = pool.layout.tensors
        n = sum(len(runs) * len(tensors[i].segment_offsets) for i, runs in segments)
        if self._turn_views + n <= VIEWS_PER_STEP:
            self._count_views(n)
            return [v for i, runs in segments for v in run_views(pool, i, runs, "dst")]
        return asyncio.ensure_future(self._views_turn_by_turn(pool, chunk, ids, "dst"))

    async def _views_turn_by_turn(self, pool: BlockPool, chunk: Chunk, ids: tuple[int, ...],
                                  side: Side) -> list[memoryview]:
        """The views of ``chunk`` of a transfer of blocks ``ids``, a segment (a layer, most
        often) at a time as :meth:`_room_for_views` allows: thousands of views (a
        4,096-token request of an 8B Llama: 16,384) take tens of ms to make, and the loop
        runs between segments."""
        views: list[memoryview] = []
        for seg in chunk.segments:
            runs = self._segment_runs(seg, ids, side)
            await self._room_for_views(
                len(runs) * len(pool.layout.tensors[seg.tensor].segment_offsets))
            views += run_views(pool, seg.tensor, runs, side)
        return views

    def _segment_runs(self, seg: Segment, ids: tuple[int, ...], side: Side
                      ) -> tuple[tuple[int, int, int], ...]:
        """The runs of ``seg``'s blocks of ``ids`` (this pool's side) against the stream."""
        if seg.start or seg.stop != len(ids):  # (a chunk's part of a tensor: rare)
            ids = ids[seg.start:seg.stop]
        return self._runs_of(ids, None) if side == "src" else self._runs_of(None, ids)

    async def _room_for_views(self, n: int) -> None:
        """Wait until this loop iteration has room for ``n`` more views (VIEWS_PER_STEP per
        iteration for all calls of the pipe; a call alone may go over once)."""
        while self._turn_views and self._turn_views + n > VIEWS_PER_STEP:
            await asyncio.sleep(0)
        self._count_views(n)

    def _count_views(self, n: int) -> None:
        """``n`` views made in this loop iteration (the count starts again at the next)."""
        if not self._turn_views:
            self._pipe._loop.call_soon(self._new_view_turn)
        self._turn_views += n

    def _new_view_turn(self) -> None:
        self._turn_views = 0

    async def _copy_out_staged(self, mapped: MappedPool, ids: tuple[int, ...],
                               incoming: _Incoming) -> None:
        sink, plane = incoming.sink, cast(Any, self._pipe._plane)
        landing: deque[asyncio.Future[Any]] = deque()
        for chunk in iter_chunks(sink.pool.layout, incoming.layers, len(sink.ids),
                                 STAGING_BYTES):
            while len(landing) >= CHUNKS_IN_FLIGHT:
                await landing.popleft()
            if sink.abandoned:  # the caller gave up: copy no more
                break
            buf = torch.empty(chunk.nbytes, dtype=torch.uint8, device=mapped.device)
            # The copy stream writes memory allocated on the current stream: after it.
            allocated = torch.cuda.Event()
            allocated.record(torch.cuda.current_stream(mapped.device))
            gathered = plane.pull(
                functools.partial(_gather_on, mapped, ids, chunk, buf),
                chunk.nbytes, allocated, keepalive=buf)
            landing.append(self._unstage(sink, chunk, buf, gathered))
        while landing:
            await landing.popleft()

    def _block_data(self, offer_id: int) -> None:
        incoming = self._incoming.get(offer_id)
        if incoming is not None and incoming.mapped is not None:  # "copy now"
            del self._incoming[offer_id]
            self._track(incoming.sink, self._copy_out(incoming.mapped, offer_id, incoming),
                        incoming, last=True)
            return
        if incoming is None or not incoming.chunks:
            raise ProtocolError(f"more BLOCK_DATA for offer {offer_id} than it has chunks")
        chunk = incoming.chunks.popleft()
        if not incoming.chunks:
            del self._incoming[offer_id]
            self._pipe._proto.offer_received(offer_id)
        sink = incoming.sink
        plane = self._pipe._plane
        pool = sink.pool
        if incoming.views:  # a CPU pool on tcp: straight into its blocks (scratch if abandoned)
            host = cast(HostBytesPlane, plane)
            if sink.abandoned:
                done = host.post_recv_views(_scratch_views(chunk.nbytes))
            else:
                done = host.post_recv_views(self._views_of(pool, chunk, sink.ids),
                                            keepalive=pool)
            self._track(sink, done, incoming, last=not incoming.chunks)
            return
        if plane.name == "tcp":
            buf = torch.empty(chunk.nbytes, dtype=torch.uint8,
                              pin_memory=pool.device.type == "cuda")
            received = cast(HostBytesPlane, plane).post_recv_views([_host_view(buf)], keepalive=buf)
        else:
            buf = torch.empty(chunk.nbytes, dtype=torch.uint8, device=self._pipe.device)
            received = cast(DeviceBytesPlane, plane).post_recv_into([buf])
        self._track(sink, self._unstage(sink, chunk, buf, received), incoming,
                    last=not incoming.chunks)

    def _unstage(self, sink: _Sink, chunk: Chunk, buf: torch.Tensor,
                 received: asyncio.Future[Any]) -> asyncio.Future[None]:
        """Once ``received`` says ``buf`` holds ``chunk``, scatter it into the sink's pool;
        the future completes once the blocks are written (or the call was abandoned)."""
        landed: asyncio.Future[None] = self._pipe._loop.create_future()
        pool = sink.pool
        cuda = pool.device.type == "cuda"

        def unstage(fut: asyncio.Future[Any]) -> None:
            try:
                unstage_now(fut)
            except Exception as exc:  # a CUDA error: the call fails (and the pipe breaks)
                if not landed.done():
                    landed.set_exception(exc)

        def unstage_now(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled() or fut.exception() is not None:
                settle_like(landed, fut, None)
                return
            if sink.abandoned:
                landed.set_result(None)
                return
            if not cuda and buf.device.type == "cpu":
                scatter(pool, sink.ids, chunk, buf)
                landed.set_result(None)
                return
            stream = torch.cuda.Stream(buf.device if not cuda else pool.device)
            with torch.cuda.device(stream.device), torch.cuda.stream(stream):
                if cuda:
                    if sink.after is not None:
                        stream.wait_event(sink.after)
                    scatter(pool, sink.ids, chunk, buf, stream=stream)
                    host = None
                else:  # a CPU pool, the chunk on a GPU: to host memory first
                    host = torch.empty(chunk.nbytes, dtype=torch.uint8, pin_memory=True)
                    host.copy_(buf, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            watched = self._poller.watch(event, chunk.nbytes, keepalive=(buf, host, stream))

            def copied(f: asyncio.Future[None]) -> None:
                if cuda and (f.cancelled() or f.exception() is not None):
                    # The pipe broke: the scatter may still be queued (behind the caller's
                    # stream). The call ends once it ran, so that nothing writes the named
                    # blocks after it (they are the caller's again); buf stays until then.
                    settling = self._pipe._loop.create_task(
                        _settle_after(event, landed, f, keepalive=(buf, stream)))
                    self._settling.add(settling)  # (the loop keeps tasks weakly)
                    settling.add_done_callback(self._settling.discard)
                    return
                try:
                    if host is not None and not f.cancelled() and f.exception() is None:
                        scatter(pool, sink.ids, chunk, host)
                except Exception as exc:
                    if not landed.done():
                        landed.set_exception(exc)
                settle_like(landed, f, None)

            watched.add_done_callback(copied)

        received.add_done_callback(unstage)
        return landed

    def _track(self, sink: _Sink, done: asyncio.Future[Any], incoming: _Incoming,
               last: bool) -> None:
        sink.inflight.add(done)
        self.receiving.add(done)

        def landed(fut: asyncio.Future[Any]) -> None:
            sink.inflight.discard(fut)
            self.receiving.discard(fut)
            pipe = self._pipe
            if fut.cancelled() or fut.exception() is not None:
                pipe._break(fut.exception() or ConnectionAbortedError("receive lost"))
                # also when the pipe had already ended
                fail_future(sink.done, pipe._error or PipeClosed(
                    "the pipe closed before the blocks arrived"))
                return
            if last:
                sink.pending_offers -= 1
            self._settle(sink)
            if not self.receiving:
                pipe._maybe_finish()  # a close may have waited for these blocks

        done.add_done_callback(landed)

    def _settle(self, sink: _Sink) -> None:
        """End ``sink``'s call once nothing it pulled is still to land: done when it has all
        its blocks; PipeClosed when the peer closed (it offers nothing more) and some are
        missing."""
        if sink.done.done() or sink.pending_offers or sink.inflight:
            return
        if not sink.missing:
            sink.done.set_result(None)
        elif self._pipe._proto.close_received:
            sink.done.set_exception(PipeClosed("the peer closed the pipe before sending all "
                                               "the blocks"))

    def _sending(self, done: asyncio.Future[Any]) -> asyncio.Future[Any]:
        self.sending.add(done)
        done.add_done_callback(self.sending.discard)
        return done

    # -- ending -------------------------------------------------------------------------------

    def closing(self, exc: BaseException, *, ours: bool) -> None:
        """A graceful close began: calls that can no longer complete raise ``exc``. Ours: no
        offer of ours will be pulled any more (we take them back), and no new block will
        arrive. The peer's: it pulls and offers nothing more (its receives ended with its
        close), so our offers and a receive that is waiting for offers end."""
        # Detached first: a failed write below breaks the pipe, which comes back here.
        offers, self._offers_out = self._offers_out, {}
        for offer_id, fut in offers.items():
            fail_future(fut, exc)
            if ours:
                self._take_back(offer_id)
            else:  # the peer closed: it pulls nothing more, and needs no RETRACT
                self._forget_copy(offer_id)
        for sinks in self._sinks.values():
            for sink in sinks:
                if ours or not (sink.pending_offers or sink.inflight):
                    fail_future(sink.done, exc)

    def fail(self, exc: BaseException) -> None:
        """The pipe ended: every waiting call raises ``exc``; stop polling the streams."""
        self.closing(exc, ours=True)
        for fut in self._copies_out.values():  # no PULLED will come
            fail_future(fut, exc)
        self._copies_out.clear()
        self._poller.abort(exc)
        self._ready_poller.abort(exc)


def _checked(pool: object, block_ids: object, key: str | None, layers: object, *,
             destination: bool) -> tuple[str | None, tuple[int, ...], tuple[int, ...]]:
    """A block call's arguments, checked before anything moves: (key, ids, tensor indices)."""
    if not isinstance(pool, BlockPool):
        raise TypeError(f"pool must be a BlockPool, not {type(pool).__name__}")
    ids = normalize_ids(pool, block_ids, destination=destination)
    if len(ids) > _wire.MAX_OFFER_BLOCKS:  # (one OFFER frame names them all)
        raise ValueError(f"{len(ids)} block ids in one call; the limit is "
                         f"{_wire.MAX_OFFER_BLOCKS}")
    return check_key(key), ids, _normalize_layers(pool, layers)


def _named_by(pool: object, key: object, layers: object
              ) -> tuple[str | None, tuple[int, ...] | None] | None:
    """What a block call with bad arguments names still: its key and the pool's tensors it
    chose (None if they were what was wrong); None if its key itself is bad."""
    try:
        key = check_key(key)
    except (TypeError, ValueError):
        return None
    chosen = None
    if isinstance(pool, BlockPool):
        with contextlib.suppress(TypeError, ValueError, KeyError):
            chosen = _normalize_layers(pool, layers)
    return key, chosen


def _check_can_recv_blocks(pipe: Pipe) -> None:
    """recv()'s check, and more: once the peer closed, no block comes that a new call has not
    pulled already (it took its offers back), even while a message's payload still lands."""
    pipe._check_can_recv()
    if pipe._proto.close_received:
        raise PipeClosed("the peer closed the pipe")


def _check_device(pipe: Pipe, pool: BlockPool) -> None:
    """The nccl and ipc planes move device memory of the pipe's own GPU: a CUDA pool on
    another GPU is a ``ValueError`` before anything moves (tcp stages through the host and
    takes any)."""
    plane = pipe._plane.name
    if pool.device.type == "cuda" and plane != "tcp" and pool.device != pipe.device:
        raise ValueError(f"over {plane}, a CUDA pool must be on the pipe's device "
                         f"{pipe.device}, not {pool.device}")


#: The tensor addresses of CPU pools found writable: each pool's memory is checked once, at
#: its first receive (a pool made again per request around the same tensors is found here).
#: An entry goes when one of the pool's tensors dies: its memory may be unmapped, and other
#: memory, read-only, mapped at the same address.
_WRITABLE: set[tuple[int, ...]] = set()
#: Entries kept at most (then forgotten together: a pool forgotten is checked again).
_WRITABLE_KEPT: Final = 4096


def _writable_known(pool: BlockPool) -> bool:
    return pool.memory_key[1] in _WRITABLE


async def _check_writable(pool: BlockPool) -> None:
    """A CPU pool in memory mapped read-only (a ``numpy.memmap`` opened ``"r"``) is a
    ``ValueError`` before anything moves: writing the blocks there breaks the pipe over tcp
    (the socket's receive fails with EFAULT), and over nccl the scatter out of the GPU's
    staging would write it. Its mappings are read in a thread (milliseconds in a large
    process), once per pool."""
    spans = []
    for t in pool.tensors:
        storage = t.untyped_storage()
        spans.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    bad = await in_daemon_thread(functools.partial(_hostmem.read_only, spans),
                                 "aiokvpipe-blocks")
    if bad:
        raise ValueError(f"cannot receive into the pool: its tensor {bad[0]} lies in memory "
                         "mapped read-only")
    if len(_WRITABLE) >= _WRITABLE_KEPT:
        _WRITABLE.clear()
    key = pool.memory_key[1]
    _WRITABLE.add(key)
    for t in pool.tensors:
        weakref.finalize(t, _WRITABLE.discard, key).atexit = False


def _mark_stream(pool: BlockPool) -> torch.cuda.Event | None:
    """For a CUDA pool, an event after the work queued on the caller's stream now: the blocks
    are read only once what the caller queued to write them has run. None when that stream
    is idle (everything it was given has run): on one GPU shared by two processes, an event
    recorded by the sender is work in its context, which waits for the GPU to switch over
    from the receiver's copies (hundreds of µs each request, with several in flight)."""
    if pool.device.type != "cuda":
        return None
    stream = torch.cuda.current_stream(pool.device)
    if stream.query():
        return None
    event = torch.cuda.Event()
    event.record(stream)
    return event


def _mapped_pool(layout: PoolLayout, places: list[tuple[int, int]], device: torch.device
                 ) -> MappedPool:
    """The peer's pool as mapped here; :class:`ProtocolError` if a tensor's blocks would
    reach past the memory its region maps (a peer announcing more than it exported)."""
    if len(places) != len(layout.tensors):
        raise ProtocolError(f"the peer placed {len(places)} tensors of a pool of "
                            f"{len(layout.tensors)}")
    for tl, (_, room) in zip(layout.tensors, places):
        if tl.span_bytes > room:
            raise ProtocolError(f"pool tensor {tl.name!r} spans {tl.span_bytes} bytes; its "
                                f"region maps {room}")
    return MappedPool(layout, tuple(ptr for ptr, _ in places), device)


def _gather_on(mapped: MappedPool, ids: tuple[int, ...], chunk: Chunk, buf: torch.Tensor,
               stream: torch.cuda.Stream) -> None:
    gather(mapped, ids, chunk, buf, stream=stream)


async def _settle_after(event: torch.cuda.Event, landed: asyncio.Future[None],
                        f: asyncio.Future[None], keepalive: object) -> None:
    """Settle ``landed`` like ``f`` once the work before ``event`` has run (waited for in a
    thread; a broken context ends the wait too); ``keepalive`` (what that work reads) is
    held until then."""
    try:
        await in_daemon_thread(event.synchronize, "aiokvpipe-blocks")
    except Exception as exc:  # noqa: BLE001  -- the device failed: nothing runs any more
        log.debug("waiting for a scatter after a break: %r", exc)
    finally:  # (also when the loop shuts down: the call must end)
        settle_like(landed, f, None)


def _release(pipe: Pipe, nbytes: int, _: object) -> None:
    pipe._send_budget.release(nbytes)


def _host_view(buf: torch.Tensor) -> memoryview:
    from ._hostmem import byte_view
    return byte_view(buf)


#: What the bytes of a transfer nobody waits for any more are read into, again and again.
_SCRATCH: Final = memoryview(bytearray(1 << 20))


def _scratch_views(nbytes: int) -> list[memoryview]:
    """``nbytes`` of views that all fall on one small scratch buffer: a transfer abandoned
    by its recv_blocks is read and dropped without memory of its size (a 1 GiB one took 3 s
    on the loop to zero a buffer of its own, or failed with MemoryError and broke the
    pipe)."""
    whole, rest = divmod(nbytes, len(_SCRATCH))
    return [_SCRATCH] * whole + ([_SCRATCH[:rest]] if rest else [])
