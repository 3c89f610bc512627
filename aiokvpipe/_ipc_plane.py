"""The ipc data plane: two processes of one host, the consumer copying straight out of the
producer's GPU memory through CUDA IPC.

Producer (``post_send``): each tensor's allocation (a caching-allocator segment) is exported
once as a CUDA IPC memory handle and announced as a *region*; tensors whose allocation cannot
be exported (torch's ``expandable_segments``) are first copied into a *staging ring*, a plain
``cudaMalloc`` buffer exported once. An event is recorded on the caller's stream; once it has
fired (polled from the loop; at once when the data was already written) a small fixed-layout
``COPY`` record (region, offset, bytes per piece) goes to the peer. Most sends, one tensor
whose data is written already with nothing of ours queued ahead, put that description in
their own header instead, as a 20-byte note (:meth:`IpcPlane.post_send_noted`). The send
completes when the peer acknowledges the copy: the memory may then be reused.

Readiness travels as that record rather than as an interprocess CUDA event: with one
interprocess event recorded and queried per message, a first version took ~0.4 ms per message
on an H200 (2026-12-01) against ~20 µs for the raw IPC copy; and a consumer stream made to
wait on the event of a producer that then dies could wait forever.

Consumer (``post_recv``): regions are mapped once (``cudaIpcOpenMemHandle``, up to ~0.1 s:
in a worker thread, never on the loop) and cached until the producer retires them. A
``COPY`` names data that is already final, so nothing on our stream waits for the peer's GPU
work and a producer that dies cannot wedge it. The consumer copies on its own stream into
fresh tensors (from the pool of the current stream if that is idle, so a caller on it needs
no ``record_stream``; else from the copy stream's), records an event, completes the receive
once the event fired (the copy is then complete; the pipe keeps the tensors for the
caller's stream), and acks. The copies one read of the connection starts are awaited with
one event, up to 64 MiB of them (:meth:`IpcPlane.hold_copies`). Most messages describe
their copy in their own header (:meth:`IpcPlane.post_recv_noted`); those of one read, with
nothing queued ahead, are allocated together at the read's end and their copies launched
back to back; a copy queued by record launches them first, so copies complete in the order
the producer sent them, which its acknowledgement counts rely on.

Signalling rides on the pipe's control connection, in SIGNAL frames (``signal(data)``
out, :meth:`IpcPlane.on_signal` in): a message's COPY record and its header leave in one
write and arrive in one read, and acknowledgements share the connection with the credits.
(Two sockets of the plane's own, one per direction, halved the message rate: a second read
and write a message at each end.) The records and their checks are :mod:`._ipc_records`;
anything malformed, a region never announced, too many copies in flight, a piece outside
its region, a handle that does not open or that maps less memory than announced raises
:class:`ProtocolError` out of :meth:`~IpcPlane.on_signal` or through ``on_lost`` (the pipe
then breaks); running out of memory mapping one is ours, not the peer's. Nothing is ever
unpickled. The producer keeps the regions it announces within the consumer's
:data:`~._ipc_records.MAX_REGIONS` (beyond, tensors go through the ring). What the
handshake asks of CUDA IPC before a pipe exists (the host, the probe handles) is
:mod:`._ipc_probe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any, Final, Literal, NamedTuple

import torch

from . import _cudaipc
from ._cuda import (
    EventPoller,
    after_pending_work,
    current_stream,
    recycle_streams,
    side_streams,
)
from ._dtypes import DTYPE_OF
from ._errors import ProtocolError, fresh
from ._ipc_probe import device_index
from ._ipc_records import (
    MAX_COPIES_IN_FLIGHT,
    MAX_PIECES,
    MAX_POOL_TENSORS,
    MAX_REGIONS,
    RING_ALIGN,
    AckRecord,
    ConsumerLedger,
    CopyRecord,
    Piece,
    PoolPlace,
    PoolRecord,
    Record,
    RecordDecoder,
    RegionRecord,
    RetireRecord,
    RingSpace,
    decode_note,
    encode_copy_of_one,
    encode_note,
    encode_record,
)
from ._plane import Received, fail_future, settle_like
from ._wire import TensorSpec

log = logging.getLogger("aiokvpipe")

#: The producer retires its least recently used region beyond this many not held by a pool.
_MAX_EXPORTS: Final = 512
#: Regions exported at once at most: the consumer maps at most MAX_REGIONS, one of them kept
#: for the staging ring. A tensor beyond it (every export held by a pool or a send in flight)
#: goes through the ring.
_MAX_LIVE_EXPORTS: Final = MAX_REGIONS - 1
#: Default size of the staging ring (allocated only when a tensor needs it).
DEFAULT_RING_BYTES: Final = 128 << 20
#: Bytes of copies awaited together at most (one read's, see :meth:`IpcPlane.hold_copies`):
#: a receive waits behind at most this much copying started after it in the same read
#: (~30 µs at the ~2 TB/s of a copy within one GPU).
_BATCH_BYTES: Final = 64 << 20
#: Ring bytes per COPY record at most: small enough that the consumer starts copying a large
#: message early, large enough that the per-record cost (GPU work alternating between the
#: two processes' contexts, ~0.1 ms) is amortised.
_RING_CHUNK: Final = 32 << 20

Mode = Literal["segments", "ring"]

# -- the plane ----------------------------------------------------------------------------------


_Task = tuple[Callable[[], Any], "asyncio.Future[Any]"]


class _Worker:
    """One daemon thread running blocking CUDA calls (opening, closing, freeing) in the order
    submitted, so that a close never overtakes the open of the same mapping."""

    def __init__(self, loop: asyncio.AbstractEventLoop, device_index: int) -> None:
        self._loop = loop
        self._index = device_index
        self._queue: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="aiokvpipe-ipc-worker",
                                            daemon=True)
            self._thread.start()
        self._queue.put((fn, fut))
        return fut

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        try:
            _cudaipc.set_device(self._index)
        except Exception as first:  # every call below will then fail and say why
            log.debug("ipc worker: setDevice: %r", first)
        while (item := self._queue.get()) is not None:
            fn, fut = item
            failure: BaseException | None = None
            try:
                result = fn()
            except BaseException as err:
                result, failure = None, err
            try:
                self._loop.call_soon_threadsafe(_settle, fut, result, failure)
            except RuntimeError:  # the loop is gone; carry on with the clean-up regardless
                pass


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
        fut.exception()  # nobody may be waiting: do not warn
    else:
        fut.set_result(result)


class _Export:
    """An allocation of ours that the peer may map."""

    __slots__ = ("region", "buffer_id", "base", "size", "handle", "announced", "pending",
                 "pinned")

    def __init__(self, region: int, buffer_id: int, base: int, size: int, handle: bytes
                 ) -> None:
        self.region = region
        self.buffer_id = buffer_id
        self.base = base
        self.size = size
        self.handle = handle
        self.announced = False
        self.pending = 0  # parts posted but not yet described: never retire it meanwhile
        self.pinned = False  # holds a block pool the peer maps for the plane's life


class _Part(NamedTuple):
    ptr: int
    nbytes: int
    export: _Export | None  # None: through the ring
    offset: int  # from the export's base


class _Job:
    """One posted send: its parts, how far they were described, its completion."""

    __slots__ = ("parts", "index", "offset", "future", "waiter", "ready", "is_ready",
                 "keepalive")

    def __init__(self, parts: list[_Part], future: asyncio.Future[None],
                 ready: torch.cuda.Event | None, keepalive: object,
                 waiter: asyncio.Future[None] | None = None) -> None:
        self.parts = parts
        self.index = 0
        self.offset = 0
        self.future = future
        self.waiter = waiter  # the sender's, woken with the future (post_send_noted)
        self.ready = ready  # recorded on the caller's stream at post time; None: idle then
        self.is_ready = ready is None
        self.keepalive = keepalive


class _Sent(NamedTuple):
    ring_spans: int
    job: _Job | None  # set on a message's last record


class _Copy(NamedTuple):
    """A COPY record's copies, enqueued on the copy stream, awaited."""

    rec: CopyRecord
    maps: tuple[_Mapping, ...]
    future: asyncio.Future[list[torch.Tensor]] | None  # a message's last: done with it
    tensors: list[torch.Tensor]  # the memory the copies write: the future's result


class _Mapping:
    """A peer region as this process sees it."""

    __slots__ = ("region", "opened", "address", "users", "retired")

    def __init__(self, region: int) -> None:
        self.region = region
        #: the local address of the region's base, once mapped (set as the open is queued)
        self.opened: asyncio.Future[int]
        #: That address once ``opened``'s callback ran (a noted receive's one-look check);
        #: until then, and if it failed, None.
        self.address: int | None = None
        self.users = 0  # pieces of queued or running copies that read it
        self.retired = False


class _Target:
    """One posted receive: the tensors and how many of their bytes were copied."""

    __slots__ = ("tensors", "chunks", "index", "offset", "remaining", "future", "after")

    def __init__(self, tensors: list[torch.Tensor],
                 future: asyncio.Future[list[torch.Tensor]],
                 after: torch.cuda.Event | None = None) -> None:
        self.tensors = tensors
        #: the copy stream waits for this before its first copy into the tensors
        self.after = after
        chunks: list[tuple[int, int]] = []
        remaining = 0
        for t in tensors:
            if n := t.numel() * t.element_size():
                chunks.append((t.data_ptr(), n))
                remaining += n
        self.chunks = chunks
        self.index = 0
        self.offset = 0
        self.remaining = remaining
        self.future = future


class _EventPool:
    """Events for reuse: recording a fresh ``torch.cuda.Event`` creates (and later destroys)
    a CUDA event each message. An event goes back only once it has fired and nothing waits on
    it; events of a broken plane are simply dropped."""

    __slots__ = ("_free",)

    _KEEP: Final = 2 * MAX_COPIES_IN_FLIGHT

    def __init__(self) -> None:
        self._free: list[torch.cuda.Event] = []

    def get(self) -> torch.cuda.Event:
        return self._free.pop() if self._free else torch.cuda.Event()

    def put(self, event: torch.cuda.Event) -> None:
        if len(self._free) < self._KEEP:
            self._free.append(event)


def _empty_like_specs(specs: Sequence[TensorSpec], device: torch.device) -> list[torch.Tensor]:
    # (The pipe checked that each dtype is known here before posting.)
    return [torch.empty(s.shape, dtype=DTYPE_OF[s.dtype], device=device) for s in specs]


class _Ring:
    __slots__ = ("ptr", "space", "region", "handle")

    def __init__(self, ptr: int, size: int, region: int, handle: bytes) -> None:
        self.ptr = ptr
        self.space = RingSpace(size)
        self.region = region
        self.handle = handle


class IpcPlane:
    """Payload through CUDA IPC; see the module docstring. Create with :meth:`start`."""

    name = "ipc"

    def __init__(self, device: torch.device, on_lost: Callable[[BaseException], None],
                 mode: Mode, ring_bytes: int, streams: Sequence[torch.cuda.Stream]) -> None:
        self._loop = asyncio.get_running_loop()
        self._device = device
        self._index = device_index(device)
        self._on_lost = on_lost
        self._mode: Mode = mode
        self._ring_bytes = ring_bytes
        self._error: BaseException | None = None
        self._closing = False
        self._worker = _Worker(self._loop, self._index)
        self._events = _EventPool()
        self._signal: Callable[[bytes], None] = _unattached
        self._signal_soon: Callable[[bytes], None] = _unattached
        self._decoder = RecordDecoder()
        # producer
        self._send_stream, self._copy_stream = streams  # made off the loop (side_streams)
        self._jobs: deque[_Job] = deque()  # posted, not yet wholly described
        self._inflight: deque[_Sent] = deque()  # described, not yet acknowledged
        self._acked = 0
        # A failed poll (a CUDA error) breaks the plane with its cause: the callbacks below
        # only see their future fail, and every send and receive would wait for ever.
        self._ready_poller = EventPoller(self._lost)  # the head job's data (caller's stream)
        self._watching_ready = False
        self._gate_poller = EventPoller(self._lost)  # ring copies on our send stream
        self._gated: deque[tuple[torch.cuda.Event | None, bytes]] = deque()
        self._watching_gate = False
        self._exports: OrderedDict[int, _Export] = OrderedDict()  # by CUDA buffer id
        self._unexportable: set[int] = set()  # buffer ids that go through the ring
        self._next_region = 1
        self._ring: _Ring | None = None
        self._ring_pending: asyncio.Future[Any] | None = None
        self._out = bytearray()
        self._warned_unexportable = False
        self._noted = 0  # payloads described in their header (post_send_noted)
        # consumer
        # Copies completed in one poll are acknowledged together at its end (after_pass).
        self._copy_poller = EventPoller(self._lost, after_pass=self._after_copies)
        self._ledger = ConsumerLedger()
        self._mappings: dict[int, _Mapping] = {}
        self._copies: deque[tuple[CopyRecord, tuple[_Mapping, ...]]] = deque()
        self._targets: deque[_Target] = deque()  # posted, not yet wholly copied into
        self._copying = 0  # copies enqueued, not yet completed
        #: Copies enqueued while the owner handles one read (hold_copies), awaited as one.
        self._batch: list[_Copy] | None = None
        self._batch_bytes = 0
        #: Noted receives posted meanwhile, allocated and enqueued together at the read's end
        #: (rec, mapping, specs, future).
        self._deferred: list[tuple[CopyRecord, _Mapping, Sequence[TensorSpec],
                                   asyncio.Future[list[torch.Tensor]]]] = []
        self._stranded: list[list[_Copy]] = []  # never awaited (a CUDA error): kept to release
        self._waiting = False
        self._completed = 0
        self._ack_due = False
        self._received: Callable[[], object] | None = None
        self._received_due = False
        # worker-thread side: mapping → its address (touched in the worker thread only).
        # Keyed by mapping, not region id: a peer may announce an id again once it retired
        # it, while copies still read the old mapping; each must be unmapped, and only once.
        self._thread_maps: dict[_Mapping, int] = {}
        #: The staging ring's memory, once allocated (worker thread only, as _thread_maps).
        self._thread_ring: int | None = None
        self._pool_sources: dict[int, asyncio.Future[list[tuple[int, int]] | None]] = {}
        self._pulls = 0  # copies out of the peer's mapped pools (stats)
        #: Done once :meth:`abort` or :meth:`close` has unmapped, freed and dropped everything.
        self.released: asyncio.Future[None] = self._loop.create_future()

    @classmethod
    async def start(cls, device: torch.device, on_lost: Callable[[BaseException], None], *,
                    mode: Mode = "segments", ring_bytes: int = DEFAULT_RING_BYTES
                    ) -> IpcPlane:
        """Start the plane; its owner then :meth:`attach_signals` before the first post.

        ``device``: the CUDA device received tensors land on (and sent ones are staged to).
        ``on_lost(exc)`` is called once when the plane cannot go on (a handle that does not
        open, a CUDA error in a callback); the owner then calls :meth:`abort`, as it does
        when its connection to the peer is lost. ``mode``: ``"segments"`` maps the caching
        allocator's segments (one copy) and stages only what cannot be exported; ``"ring"``
        stages everything through a ``ring_bytes`` staging ring (two copies).
        """
        if device.type != "cuda":
            raise ValueError("the ipc plane needs a CUDA device")
        if mode not in ("segments", "ring"):
            raise ValueError(f"mode must be 'segments' or 'ring', not {mode!r}")
        if ring_bytes < RING_ALIGN * 4:
            raise ValueError(f"ring_bytes must be at least {RING_ALIGN * 4}")
        _cudaipc.runtime()  # ImportError now, not on the first message
        streams = await side_streams(device, 2)
        try:
            return cls(device, on_lost, mode, ring_bytes, streams)
        except BaseException:
            recycle_streams(streams)
            raise

    def attach_signals(self, write: Callable[[bytes], None],
                       received: Callable[[], object] | None = None,
                       write_soon: Callable[[bytes], None] | None = None) -> None:
        """``write(data)`` carries our records to the peer, in order; it never raises (the
        pipe writes them in SIGNAL frames on its control connection). The owner hands the
        peer's records to :meth:`on_signal`. ``received()``, if given, is called at the end
        of each poll that completed a receive, after its future and before the
        acknowledgement.
        ``write_soon`` (default: ``write``) carries the acknowledgements: they may wait for
        the owner's next write until the next loop iteration, so that the answer a
        receiver writes at once goes out with them, in one write."""
        self._signal = write
        self._signal_soon = write_soon if write_soon is not None else write
        self._received = received

    def on_signal(self, data: bytes | bytearray | memoryview) -> None:
        """The peer's records, in the order it signalled them (any split: a record cut at
        the end of ``data`` waits for the rest). Raises :class:`ProtocolError` for anything
        malformed or out of place, and a CUDA error of ours as it is: the owner breaks."""
        if self._error is not None or self._closing:
            return
        for rec in self._decoder.feed(data):
            if self._error is not None:  # a record before this one broke the plane
                return
            if type(rec) is AckRecord:
                self._on_ack(rec)
            else:
                self._on_record(rec)

    def unclaimed(self) -> str | None:
        """Once every message the peer sent arrived (a graceful close): what it signalled
        that none of them claims, a violation, or None."""
        if self._copies:
            return f"{len(self._copies)} COPY record(s) that no message claims"
        if self._decoder.buffered:
            return f"{self._decoder.buffered} bytes of an unfinished record"
        return None

    @property
    def stats(self) -> dict[str, int | str]:
        """What the plane holds: its mode, regions exported and mapped, ring bytes; and what
        it did: copies out of mapped pools (``pulls``), sends described in their header
        (``copies_noted``)."""
        return {"mode": self._mode, "exported_regions": len(self._exports),
                "mapped_regions": len(self._mappings), "copies_in_flight": len(self._inflight),
                "ring_bytes": self._ring.space.size if self._ring else 0,
                "sends_in_flight": len(self._inflight) + len(self._jobs),
                "receives_pending": len(self._targets) + len(self._deferred) + self._copying,
                "pools_mapped": sum(1 for f in self._pool_sources.values()
                                    if f.done() and not f.cancelled()
                                    and f.exception() is None and f.result() is not None),
                "pulls": self._pulls, "copies_noted": self._noted}

    def _guard(self) -> contextlib.AbstractContextManager[Any]:
        """Make the plane's device current for runtime calls that act on the current device
        (``cudaMemcpyAsync``, ``to()``); free when it already is, as it mostly is."""
        if torch.cuda.current_device() == self._index:
            return _CURRENT_DEVICE  # one reusable no-op: nothing made per message
        return torch.cuda.device(self._index)

    # -- sending ---------------------------------------------------------------------------------

    def post_send(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[None]:
        """Queue a message's payload. Stream-ordered: the peer copies what the caller's
        current stream will have written. The future completes once the peer has copied
        everything (the tensors may then be reused) and fails if the plane breaks."""
        return self._post_send(tensors, False, None)[0]

    def post_send_noted(self, tensors: Sequence[torch.Tensor],
                        waiter: asyncio.Future[None] | None = None
                        ) -> tuple[asyncio.Future[None], bytes | None]:
        """:meth:`post_send`; and when the payload is one piece of an exported region
        (announced to the peer by now), ready now and next in line, its description as a
        note for the message's header (:meth:`post_recv_noted` at the peer) instead of a
        COPY record: one frame less to write and to read a message. The pipe must write
        that header next. ``waiter``, if given, gets its result on the acknowledgement,
        along with the send's future (whose callbacks run a loop iteration later)."""
        return self._post_send(tensors, True, waiter)

    def _post_send(self, tensors: Sequence[torch.Tensor], noted: bool,
                   waiter: asyncio.Future[None] | None
                   ) -> tuple[asyncio.Future[None], bytes | None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._error is not None:
            fut.set_exception(fresh(self._error))
            return fut, None
        dev = self._device
        # No device context: each call below names the device or stream it acts on (entering
        # torch.cuda.device costs microseconds a message).
        caller = current_stream(dev)
        staged = [t for t in tensors if t.numel()]
        for t in staged:  # (a loop, not any(): no generator made per message)
            if t.device != dev:
                with self._guard():
                    staged = [t if t.device == dev else t.to(dev, non_blocking=True)
                              for t in staged]
                break
        if not staged:
            fut.set_result(None)
            return fut, None
        # A CUDA error naming or exporting an allocation propagates: nothing was described
        # to the peer, and the pipe breaks before it writes the header.
        parts = [self._part(t) for t in staged]
        ready: torch.cuda.Event | None = None
        if not caller.query():  # an idle stream has written everything already
            ready = self._events.get()
            ready.record(caller)
        job = _Job(parts, fut, ready, (tensors, staged), waiter)
        if noted and ready is None and not self._jobs and not self._gated and self._one(job):
            # Nothing of ours is queued to go after the header: the note (read at the peer
            # along with the header) keeps the records' order.
            note = encode_note(*self._take_one(job))
            self._noted += 1
            if self._out:  # a region announced just now leaves ahead of the header
                self._flush()
            return fut, note
        self._jobs.append(job)
        self._pump_send()
        return fut, None

    def _part(self, t: torch.Tensor) -> _Part:
        ptr, nbytes = t.data_ptr(), t.numel() * t.element_size()
        if self._mode == "ring":
            return _Part(ptr, nbytes, None, 0)
        # The hot path: one single-attribute driver query names the allocation; an export
        # cached under that id is still the same live memory (a freed and remade allocation
        # gets a new id, and then takes the slow path below, which retires the old export).
        buffer_id = _cudaipc.buffer_id_of(ptr)
        if buffer_id in self._unexportable:
            return _Part(ptr, nbytes, None, 0)
        ex = self._exports.get(buffer_id)
        if ex is not None and ex.base <= ptr and ptr + nbytes <= ex.base + ex.size:
            self._exports.move_to_end(ex.buffer_id)
            ex.pending += 1
            return _Part(ptr, nbytes, ex, ptr - ex.base)
        info = _cudaipc.allocation_of(ptr)
        if not info.exportable:
            if len(self._unexportable) >= _MAX_EXPORTS:
                self._unexportable.clear()
            self._unexportable.add(info.buffer_id)
            self._note_unexportable("its allocation cannot be exported (expandable segments?)")
            return _Part(ptr, nbytes, None, 0)
        ex = self._exports.get(info.buffer_id)
        if ex is None:
            ex = self._export(info)
            if ex is None:
                return _Part(ptr, nbytes, None, 0)
        else:
            self._exports.move_to_end(info.buffer_id)
        ex.pending += 1
        return _Part(ptr, nbytes, ex, ptr - ex.base)

    def _export(self, info: _cudaipc.Allocation) -> _Export | None:
        # A new allocation overlapping one we exported means that one was freed (the caching
        # allocator released its segment): the peer must drop its mapping.
        for bid, old in list(self._exports.items()):
            if old.base < info.base + info.size and info.base < old.base + old.size:
                self._retire(bid)
        # Room next, so that the export made here, which its caller uses next, is never the
        # one retired (it would stay in use unannounced, and be made again at every send).
        self._retire_idle()
        if len(self._exports) >= _MAX_LIVE_EXPORTS:
            self._note_unexportable(f"{len(self._exports)} regions are exported and in use, "
                                    "the most the peer maps")
            return None
        try:
            handle = _cudaipc.export_memory(info.base)
        except RuntimeError as exc:
            self._note_unexportable(f"cudaIpcGetMemHandle failed: {exc}")
            return None
        ex = _Export(self._new_region(), info.buffer_id, info.base, info.size, handle)
        self._exports[info.buffer_id] = ex
        return ex

    def _retire_idle(self) -> None:
        """Keep fewer than :data:`_MAX_EXPORTS` exports that no pool holds: retire the least
        recently used of those no send holds. (Pools' exports last the plane's life and do
        not count: with them in the count, every new export would retire all the others.)"""
        loose = [b for b, e in self._exports.items() if not e.pinned]
        if len(loose) >= _MAX_EXPORTS:
            exports = self._exports
            for bid in [b for b in loose if not exports[b].pending
                        ][:len(loose) - _MAX_EXPORTS + 1]:
                self._retire(bid)

    def _new_region(self) -> int:
        region = self._next_region
        self._next_region = (region + 1) & 0xFFFFFFFF or 1
        return region

    def _retire(self, buffer_id: int) -> None:
        ex = self._exports.pop(buffer_id)
        if ex.announced:
            self._emit(encode_record(RetireRecord(ex.region)))

    def _note_unexportable(self, why: str) -> None:
        if not self._warned_unexportable:
            self._warned_unexportable = True
            log.info("ipc plane: a tensor goes through the staging ring (two copies): %s", why)

    def _describe(self, job: _Job) -> bool:
        """Emit COPY records for as much of ``job`` (whose data is ready) as the in-flight
        bound and ring space allow; True once all of it is described."""
        if self._one(job):
            # Most messages: one tensor in one exported allocation, one piece (the loop
            # below, for the general case, costs several times more).
            self._emit(encode_copy_of_one(*self._take_one(job)))
            return True
        parts = job.parts
        while len(self._inflight) < MAX_COPIES_IN_FLIGHT:
            pieces: list[Piece] = []
            ring_copies: list[tuple[int, int, int]] = []
            ring_bytes = 0
            parts = job.parts
            while job.index < len(parts) and len(pieces) < MAX_PIECES:
                part = parts[job.index]
                ex = part.export
                if ex is not None:
                    if not ex.announced:
                        ex.announced = True
                        self._emit(encode_record(RegionRecord(ex.region, ex.size, ex.handle)))
                    pieces.append(Piece(ex.region, part.offset + job.offset,
                                        part.nbytes - job.offset))
                    ex.pending -= 1
                    job.index += 1
                    job.offset = 0
                    continue
                if ring_bytes >= _RING_CHUNK:
                    break
                ring = self._ring_ready()
                span = ring.space.alloc(min(part.nbytes - job.offset, _RING_CHUNK - ring_bytes)
                                        ) if ring is not None else None
                if ring is None or span is None:
                    break
                start, length = span
                ring_copies.append((ring.ptr + start, part.ptr + job.offset, length))
                ring_bytes += length
                prev = pieces[-1] if pieces else None
                if prev and prev.region == ring.region and prev.offset + prev.nbytes == start:
                    pieces[-1] = Piece(ring.region, prev.offset, prev.nbytes + length)
                else:
                    pieces.append(Piece(ring.region, start, length))
                job.offset += length
                if job.offset == part.nbytes:
                    job.index += 1
                    job.offset = 0
            if not pieces:
                return False
            last = job.index == len(parts)
            gate = None
            if ring_copies:
                # The peer may read the ring only once these copies are done: the record
                # waits for them (in order with everything after it).
                stream = self._send_stream
                with self._guard():
                    if job.ready is not None:
                        stream.wait_event(job.ready)
                    for dst, src, n in ring_copies:
                        _cudaipc.copy_async(dst, src, n, stream.cuda_stream)
                gate = self._events.get()
                gate.record(stream)
            self._emit(encode_record(CopyRecord(tuple(pieces), last)), gate)
            self._inflight.append(_Sent(len(ring_copies), job if last else None))
            if last:
                return True
        return False

    def _one(self, job: _Job) -> bool:
        """``job`` is one piece of an exported allocation, not yet described, and may go."""
        return (len(job.parts) == 1 and job.parts[0].export is not None and not job.index
                and len(self._inflight) < MAX_COPIES_IN_FLIGHT)

    def _take_one(self, job: _Job) -> tuple[int, int, int]:
        """Describe a job that is :meth:`_one` as sent (its region announced first, if it
        was not yet); returns its piece: region, offset, bytes."""
        part = job.parts[0]
        ex = part.export
        assert ex is not None and not job.offset
        if not ex.announced:
            ex.announced = True
            self._emit(encode_record(RegionRecord(ex.region, ex.size, ex.handle)))
        ex.pending -= 1
        job.index = 1
        self._inflight.append(_Sent(0, job))
        # In range by construction: a live export's region id, an offset inside its
        # allocation, and 1 to MAX_PAYLOAD_BYTES bytes (the pipe bounds a message).
        return ex.region, part.offset, part.nbytes

    def _emit(self, data: bytes, gate: torch.cuda.Event | None = None) -> None:
        """Queue bytes for the peer, in order; with ``gate``, not before it has fired."""
        if gate is None and not self._gated:
            self._out += data
        else:
            self._gated.append((gate, data))

    def _ring_ready(self) -> _Ring | None:
        if self._ring is not None:
            return self._ring
        if self._ring_pending is None:
            size, index = self._ring_bytes, self._index

            def allocate() -> tuple[int, bytes]:
                ptr = _cudaipc.malloc(size, index)
                try:
                    handle = _cudaipc.export_memory(ptr)
                except BaseException:
                    _cudaipc.free(ptr, index)
                    raise
                # Freed by release(), which runs after this in the same thread, whenever the
                # plane ends: also when it ended before this result reached the loop.
                self._thread_ring = ptr
                return ptr, handle

            self._ring_pending = self._worker.submit(allocate)
            self._ring_pending.add_done_callback(self._ring_allocated)
        return None

    def _ring_allocated(self, fut: asyncio.Future[tuple[int, bytes]]) -> None:
        if fut.cancelled():
            return
        if (exc := fut.exception()) is not None:
            # Ours (out of memory, a CUDA error here): the peer is told we failed.
            err = RuntimeError(f"cannot allocate the {self._ring_bytes}-byte ipc staging "
                               f"ring: {exc}")
            err.__cause__ = exc
            self._lost(err)
            return
        ptr, handle = fut.result()
        if self._error is not None or self._closing:
            return  # (release() frees it)
        self._ring = _Ring(ptr, self._ring_bytes, self._new_region(), handle)
        self._emit(encode_record(RegionRecord(self._ring.region, self._ring_bytes, handle)))
        self._or_lost(self._pump_send)

    def _pump_send(self) -> None:
        """Describe queued jobs in order, each once its data is ready; then write."""
        while self._jobs and self._error is None:
            job = self._jobs[0]
            if not job.is_ready:
                assert job.ready is not None
                if not job.ready.query():
                    if not self._watching_ready:
                        self._watching_ready = True
                        self._ready_poller.watch(job.ready, then=self._job_ready)
                    break
                job.is_ready = True
            if not self._describe(job):
                break
            self._jobs.popleft()
            if job.ready is not None:  # fired, and no longer waited on by any stream
                self._events.put(job.ready)
                job.ready = None
        self._flush()

    def _job_ready(self, fut: asyncio.Future[None]) -> None:
        self._watching_ready = False
        if not fut.cancelled() and fut.exception() is None:
            self._or_lost(self._pump_send)

    def _or_lost(self, pump: Callable[[], None]) -> None:
        """Run ``pump`` from a callback (a poll, a worker's result): a CUDA error there (an
        event query, a staging copy) breaks the plane with that cause. Raised, it would go to
        the loop's exception handler and leave every send waiting for ever."""
        try:
            pump()
        except Exception as exc:
            self._lost(exc)

    def _flush(self) -> None:
        while self._gated:
            gate, data = self._gated[0]
            if gate is not None and not gate.query():
                if not self._watching_gate:
                    self._watching_gate = True
                    self._gate_poller.watch(gate, then=self._gate_fired)
                break
            self._gated.popleft()
            if gate is not None:
                self._events.put(gate)
            self._out += data
        if self._out:
            out, self._out = bytes(self._out), bytearray()
            self._signal(out)

    def _gate_fired(self, fut: asyncio.Future[None]) -> None:
        self._watching_gate = False
        if not fut.cancelled() and fut.exception() is None and self._error is None:
            self._or_lost(self._flush)

    def export_pool(self, pool_id: int, tensors: Sequence[torch.Tensor]) -> bool:
        """Let the peer map block pool ``pool_id`` (the pipe's id for it; ``tensors``, one
        per layer) for the plane's life, so that it copies blocks straight out of it
        (:meth:`pull`). Returns False, and tells the peer so, when a tensor cannot be
        exported (ring mode, expandable segments, another device, a failed export): that
        pool's blocks then travel staged, as messages."""
        places: list[PoolPlace] = []
        pinned_here: list[_Export] = []
        if (self._error is None and self._mode == "segments"
                and 0 < len(tensors) <= MAX_POOL_TENSORS
                and all(t.device == self._device for t in tensors)):
            try:
                for t in tensors:
                    ex = self._pinned_export(t.data_ptr(), pinned_here)
                    if ex is None:
                        places = []
                        break
                    places.append(PoolPlace(ex.region, t.data_ptr() - ex.base))
            except Exception as exc:  # a CUDA call failed: staged it is
                log.info("ipc plane: cannot export block pool %d: %s", pool_id, exc)
                places = []
        if not places:
            # Staged: what this call pinned goes back to the exports' LRU (retired in turn),
            # not held for the plane's life. (Pinned by another pool before: stays so.)
            for ex in pinned_here:
                ex.pinned = False
        self._emit(encode_record(PoolRecord(pool_id, tuple(places))))
        # Behind earlier records waiting for a ring copy: a failed query of its event breaks
        # the plane (raised, it would reach the caller and leave the pipe open, the pool
        # half described).
        self._or_lost(self._flush)
        return bool(places)

    def _pinned_export(self, ptr: int, pinned_here: list[_Export]) -> _Export | None:
        """The export of ``ptr``'s allocation, pinned (appended to ``pinned_here`` if it was
        not pinned yet) and announced; None if it cannot be exported."""
        info = _cudaipc.allocation_of(ptr)
        if not info.exportable:
            return None
        ex = self._exports.get(info.buffer_id) or self._export(info)
        if ex is None:
            return None
        if not ex.pinned:
            ex.pinned = True
            pinned_here.append(ex)
        if not ex.announced:
            ex.announced = True
            self._emit(encode_record(RegionRecord(ex.region, ex.size, ex.handle)))
        return ex

    def _on_ack(self, rec: Record) -> None:
        assert isinstance(rec, AckRecord)
        n = rec.copies - self._acked
        if not 0 <= n <= len(self._inflight):
            raise ProtocolError(f"ack of {rec.copies} copies; {self._acked} were acked and "
                                f"{len(self._inflight)} more sent")
        self._acked = rec.copies
        for _ in range(n):
            sent = self._inflight.popleft()
            if sent.ring_spans:
                assert self._ring is not None
                for _ in range(sent.ring_spans):
                    self._ring.space.release()
            job = sent.job
            if job is not None and not job.future.done():
                job.future.set_result(None)  # its callbacks first: the pipe's bookkeeping
                if job.waiter is not None and not job.waiter.done():
                    job.waiter.set_result(None)
        if n:
            self._pump_send()

    # -- receiving -------------------------------------------------------------------------------

    def post_recv(self, specs: Sequence[TensorSpec]) -> asyncio.Future[list[torch.Tensor]]:
        """Queue the receipt of the next message into new tensors on the plane's device; the
        future yields them once copied (safe on any stream), and fails if the plane breaks."""
        fut: asyncio.Future[list[torch.Tensor]] = self._loop.create_future()
        if self._error is not None:
            fut.set_exception(fresh(self._error))
            return fut
        return self._post_target(self._allocate((specs,))[0], fut)

    def _allocate(self, messages: Sequence[Sequence[TensorSpec]]) -> list[list[torch.Tensor]]:
        """New tensors for each message of ``messages``, for our copy stream to write at once:
        all of them under one look at the caller's stream (two queries, not two each)."""
        dev, stream = self._device, self._copy_stream
        if torch.cuda.current_device() == self._index:
            prev = current_stream(dev)
            if prev.query():
                made = [_empty_like_specs(specs, dev) for specs in messages]
                if prev.query():
                    # Idle after the allocations: the work that used this memory before it
                    # was freed was queued before that, and has run, so our copy stream may
                    # write it at once. (Checked again after: another thread may queue work
                    # and free memory in between.) A caller receiving on this stream (as
                    # most do) then needs no record_stream (see Received). The tensors go to
                    # the caller only once the copy has run.
                    return [Received(tensors, prev) for tensors in made]
                del made  # never written: back to that stream's pool at once
            # Busy: allocated on the copy stream, not to wait for the caller's work. The
            # allocator hands us only memory that stream may write now, and reuses it only
            # after what that stream does with it (our copies). Switching the current stream
            # by hand: torch.cuda.stream()'s context costs several times more, and
            # set_stream is exact when the device is current.
            torch.cuda.set_stream(stream)
            try:
                return [_empty_like_specs(specs, dev) for specs in messages]
            finally:
                torch.cuda.set_stream(prev)
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            return [_empty_like_specs(specs, dev) for specs in messages]

    def post_recv_noted(self, specs: Sequence[TensorSpec], note: bytes
                        ) -> asyncio.Future[list[torch.Tensor]]:
        """:meth:`post_recv` of a message whose header carried the peer's ``note`` (see
        :meth:`post_send_noted`): a COPY of one piece, the whole message. Raises
        :class:`ProtocolError` for a bad note, before anything is posted."""
        if self._error is not None or self._closing:
            return self.post_recv(specs)
        piece = decode_note(note)
        nbytes = specs[0].nbytes if len(specs) == 1 else sum(s.nbytes for s in specs)
        if piece.nbytes != nbytes:
            # Else its copy would wait for (and fill) the next message's target.
            raise ProtocolError(f"a note of {piece.nbytes} bytes on a message of {nbytes}")
        rec = CopyRecord((piece,), True)
        m = self._mappings.get(piece.region)
        if (self._batch is None or self._copies or self._targets or self._waiting
                or m is None or m.address is None):
            # Outside a read, behind others, or its region not mapped yet: in turn.
            self._on_copy(rec)
            return self.post_recv(specs)
        # Most messages: the owner holds a read's copies (hold_copies), nothing waits ahead
        # and the region is mapped. The copy needs no turn through the queues and the pump:
        # it is allocated and enqueued with the read's others, together, at the read's end.
        self._ledger.copy(rec)
        m.users += 1  # from now: a RETIRE read meanwhile must not unmap it under the copy
        fut: asyncio.Future[list[torch.Tensor]] = self._loop.create_future()
        self._deferred.append((rec, m, specs, fut))
        return fut

    def _enqueue_deferred(self) -> None:
        """Allocate and enqueue the noted receives deferred while a read was handled, in
        their order and before any copy posted after them."""
        deferred, self._deferred = self._deferred, []
        i = 0
        try:
            made = self._allocate([specs for _, _, specs, _ in deferred])
            handle = self._copy_stream.cuda_stream
            with self._guard():
                for i, (rec, m, _, fut) in enumerate(deferred):
                    self._enqueue_noted(rec, m, made[i], fut, handle)
        except BaseException as exc:
            # Ours (out of memory), or a CUDA error: this receive and the rest never
            # complete. The plane breaks (our caller's on_lost); its release closes every
            # mapping, whatever its users, once the copy stream is idle.
            for _, _, _, never in deferred[i:]:
                fail_future(never, exc)  # (a no-op for one whose copy failed and said so)
            raise

    def post_recv_into(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[Any]:
        """Receive the next message into ``tensors`` (contiguous, on the plane's device: a
        block transfer's staging), in order with :meth:`post_recv`. The copy into them
        waits for the work queued so far on the current stream: they may come from its
        pool, in memory its pending work still uses."""
        fut: asyncio.Future[list[torch.Tensor]] = self._loop.create_future()
        if self._error is not None:
            fut.set_exception(fresh(self._error))
            return fut
        # (While that work runs, this and every later copy wait: a busy caller's stream holds
        # staged block transfers up, as it holds up sends.)
        return self._post_target(list(tensors), fut, after_pending_work(self._device))

    def _post_target(self, tensors: list[torch.Tensor],
                     fut: asyncio.Future[list[torch.Tensor]],
                     after: torch.cuda.Event | None = None
                     ) -> asyncio.Future[list[torch.Tensor]]:
        target = _Target(tensors, fut, after)
        if not target.remaining:
            fut.set_result(tensors)
            return fut
        self._targets.append(target)
        self._pump_recv()
        return fut

    def pool_source(self, pool_id: int) -> asyncio.Future[list[tuple[int, int]] | None]:
        """Where the peer's block pool ``pool_id`` lies here, once its POOL record came and
        its regions are mapped: per tensor, (the local address of its first element, bytes
        from there to its region's end); ``None`` if the peer sends that pool staged. Fails
        if the plane breaks first."""
        fut = self._pool_sources.get(pool_id)
        if fut is None:
            fut = self._pool_sources[pool_id] = self._loop.create_future()
            if self._error is not None:
                fail_future(fut, self._error)
        return fut

    def pull(self, launch: Callable[[torch.cuda.Stream], None], nbytes: int,
             after: torch.cuda.Event | None, keepalive: object) -> asyncio.Future[None]:
        """Copy out of a mapped pool: ``launch(stream)`` enqueues the copy on the plane's
        copy stream (after ``after``, an event of the caller's), which the plane waits for
        before it unmaps anything. The future completes once the copy ran; it fails if the
        plane breaks, once the copy stream is idle. Exceptions of ``launch`` propagate
        (what it enqueued before it failed runs before the plane's streams are idle)."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._error is not None:
            fail_future(fut, self._error)
            return fut
        self._pulls += 1
        stream = self._copy_stream
        with self._guard():
            if after is not None:
                stream.wait_event(after)
            launch(stream)
        done = self._events.get()
        done.record(stream)
        watched = self._copy_poller.watch(done, nbytes // 5, keepalive=keepalive)

        def ran(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._events.put(done)
            elif self._error is not None and not self.released.done():
                # Broken: the copy may still be queued (behind the caller's stream), writing
                # the caller's pool. Failed only once the plane's streams are idle, so that
                # a recv_blocks ends after the last write into its blocks.
                self.released.add_done_callback(lambda _: settle_like(fut, f, None))
                return
            settle_like(fut, f, None)

        watched.add_done_callback(ran)
        return fut

    def _on_pool(self, rec: PoolRecord) -> None:
        self._ledger.pool(rec)
        fut = self.pool_source(rec.pool_id)
        if not rec.places:
            if not fut.done():
                fut.set_result(None)
            return
        maps = [self._mappings[p.region] for p in rec.places]
        sizes = [self._ledger.regions[p.region] for p in rec.places]
        for m in set(maps):
            m.users += 1  # pinned: a pool stays mapped until the plane ends

        def placed(_: object) -> None:
            if fut.done():
                return
            if any(m.opened.cancelled() or m.opened.exception() is not None for m in maps):
                fail_future(fut, self._error or ProtocolError(
                    f"a region of the peer's block pool {rec.pool_id} did not map"))
                return
            fut.set_result([(m.opened.result() + p.offset, size - p.offset)
                            for m, p, size in zip(maps, rec.places, sizes)])

        asyncio.gather(*{m.opened for m in maps}, return_exceptions=True
                       ).add_done_callback(placed)

    def _on_record(self, rec: Record) -> None:
        if type(rec) is CopyRecord:  # one a message: first
            self._on_copy(rec)
        elif isinstance(rec, PoolRecord):
            self._on_pool(rec)
        elif isinstance(rec, RegionRecord):
            self._ledger.region(rec)
            m = _Mapping(rec.region)
            m.opened = self._worker.submit(functools.partial(self._open, rec, m))
            self._mappings[rec.region] = m
            m.opened.add_done_callback(functools.partial(self._opened, m))
        elif isinstance(rec, RetireRecord):
            self._ledger.retire(rec)
            m = self._mappings.pop(rec.region)
            m.retired = True
            if not m.users:
                self._close_mapping(m)
        else:  # on_signal routes acks to _on_ack, and the decoder knows no other type
            raise ProtocolError(f"unexpected record {rec!r}")

    def _on_copy(self, rec: CopyRecord) -> None:
        self._ledger.copy(rec)
        pieces = rec.pieces
        if len(pieces) == 1:
            m = self._mappings[pieces[0].region]
            m.users += 1
            maps: tuple[_Mapping, ...] = (m,)
        else:
            maps = tuple(self._mappings[p.region] for p in pieces)
            for m in maps:
                m.users += 1
        self._copies.append((rec, maps))
        if self._targets:  # else its header, which follows, posts the target and pumps
            self._pump_recv()

    def _open(self, rec: RegionRecord, m: _Mapping) -> int:
        """Worker thread: map a region. A handle that does not open, or maps less than
        announced, is the peer's :class:`ProtocolError`; running out of memory mapping it,
        or a failure to look at what it mapped, is ours (raised as it is)."""
        try:
            ptr = _cudaipc.open_memory(rec.handle, self._index)
        except Exception as exc:
            if _cudaipc.out_of_memory(exc):
                raise
            raise ProtocolError(f"the peer's IPC handle for region {rec.region} does not "
                                f"open here: {exc}") from exc
        try:
            mapped = _cudaipc.allocation_of(ptr).size
        except BaseException:
            _cudaipc.close_memory(ptr)
            raise
        if mapped < rec.size:
            _cudaipc.close_memory(ptr)
            raise ProtocolError(f"region {rec.region} maps {mapped} bytes but was announced "
                                f"as {rec.size}")
        self._thread_maps[m] = ptr
        return ptr

    def _opened(self, m: _Mapping, fut: asyncio.Future[int]) -> None:
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is None:
            m.address = fut.result()
        else:
            self._lost(exc)  # (_open says whose failure it is)

    def _close_mapping(self, m: _Mapping) -> None:
        def close() -> None:
            ptr = self._thread_maps.pop(m, None)
            if ptr is not None:
                _cudaipc.close_memory(ptr)

        self._worker.submit(close)

    def _wait_for(self, fut: asyncio.Future[Any]) -> None:
        self._waiting = True

        def resume(_: asyncio.Future[Any]) -> None:
            self._waiting = False
            self._pump_recv()

        fut.add_done_callback(resume)

    def _pump_recv(self) -> None:
        """Enqueue the copies whose target is posted, regions mapped and data ready."""
        if self._waiting or self._error is not None:
            return
        try:
            self._pump_recv_now()
        except Exception as exc:  # raised in a callback, it would leave receives waiting
            self._lost(exc)

    def _pump_recv_now(self) -> None:
        if self._deferred:  # posted before any copy queued here: enqueued first, in order
            self._enqueue_deferred()
        while self._copies and self._targets:
            rec, maps = self._copies[0]
            for m in maps:
                if not m.opened.done():
                    self._wait_for(m.opened)
                    return
                if m.opened.cancelled() or m.opened.exception() is not None:
                    return  # reported by _opened; the plane is about to break
            target = self._targets[0]
            nbytes = rec.nbytes
            if nbytes > target.remaining or rec.last != (nbytes == target.remaining):
                raise ProtocolError(f"COPY of {nbytes} bytes where {target.remaining} bytes of "
                                    f"the message were due ({'last' if rec.last else 'more'})")
            self._copies.popleft()
            self._enqueue(rec, maps, target)
            if rec.last:
                self._targets.popleft()

    def _make_room(self, nbytes: int) -> None:
        if self._batch and self._batch_bytes + nbytes > _BATCH_BYTES:
            # This copy would hold up the receives ahead of it in the batch: those are
            # awaited on their own, with an event recorded before it is enqueued.
            batch, self._batch, self._batch_bytes = self._batch, [], 0
            self._await_copies(batch)

    def _enqueue_noted(self, rec: CopyRecord, m: _Mapping, tensors: list[torch.Tensor],
                       fut: asyncio.Future[list[torch.Tensor]], handle: int) -> None:
        """:meth:`_enqueue` of a noted message's copy (one piece, from ``m``); into one
        tensor (most messages) by one launch, without a :class:`_Target` to cut the piece
        into chunks. The caller made the plane's device current (:meth:`_guard`)."""
        if len(tensors) != 1:
            self._enqueue(rec, (m,), _Target(tensors, fut))
            return
        _, offset, nbytes = rec.pieces[0]  # the tensor's bytes: post_recv_noted checked
        self._make_room(nbytes)
        try:
            assert m.address is not None  # (post_recv_noted took only a mapped region)
            _cudaipc.copy_async(tensors[0].data_ptr(), m.address + offset, nbytes, handle)
        except BaseException as exc:
            self._copy_failed(exc, _Copy(rec, (m,), fut, tensors))
            raise
        self._watch_copy(_Copy(rec, (m,), fut, tensors))

    def _enqueue(self, rec: CopyRecord, maps: tuple[_Mapping, ...], target: _Target) -> None:
        self._make_room(rec.nbytes)
        stream = self._copy_stream
        handle = stream.cuda_stream
        try:
            with self._guard():
                if target.after is not None:  # its memory's earlier users (post_recv_into)
                    stream.wait_event(target.after)
                    target.after = None
                self._copy_pieces(rec, maps, target, handle)
        except BaseException as exc:
            self._copy_failed(exc, _Copy(rec, maps, target.future, target.tensors))
            raise
        self._watch_copy(_Copy(rec, maps, target.future if rec.last else None,
                               target.tensors))

    def _copy_failed(self, exc: BaseException, copy: _Copy) -> None:
        # A copy failed part-way: its message is never delivered, half copied. Those
        # enqueued may still run, and its memory (another stream's pool, maybe) must stay
        # ours until the plane's release has waited for this stream.
        assert copy.future is not None
        fail_future(copy.future, exc)
        try:
            self._watch_copy(copy)
        except Exception as err:  # a broken context: the copy's error is what counts
            log.debug("ipc plane: recording a failed copy's event: %r", err)

    def _watch_copy(self, copy: _Copy) -> None:
        self._copying += 1
        if self._batch is not None:
            self._batch.append(copy)  # awaited with the rest of the read's (release_copies)
            self._batch_bytes += copy.rec.nbytes
            return
        self._await_copies([copy])

    def _await_copies(self, batch: list[_Copy]) -> None:
        """Await ``batch``, copies enqueued one after the other on our copy stream, with one
        event recorded after the last of them (a stream runs its work in order). If the
        event cannot be recorded (a CUDA error, raised), the batch's memory is kept until
        the plane's release has waited for the copy stream."""
        try:
            self._watch_batch(batch)
        except BaseException:
            self._stranded.append(batch)
            raise

    def _watch_batch(self, batch: list[_Copy]) -> None:
        done = self._events.get()
        done.record(self._copy_stream)
        nbytes = batch[0].rec.nbytes if len(batch) == 1 else sum(c.rec.nbytes for c in batch)
        # The poller sleeps until an op of this size could have ended at 500 GB/s; a copy
        # within one GPU runs at ~2 TB/s, so announce a fifth: never oversleep the copy.
        self._copy_poller.watch(done, nbytes // 5, keepalive=batch,
                                then=functools.partial(self._copied, batch, done))

    def hold_copies(self) -> None:
        """The owner hands us a read's worth of headers and records: await the copies they
        enqueue together, with one event and one poll, at :meth:`release_copies` (called
        in the same loop iteration), instead of an event and a completion each."""
        if self._batch is None:
            self._batch = []

    def release_copies(self) -> None:
        """Start awaiting the copies enqueued since :meth:`hold_copies`. Never raises: a CUDA
        error recording the event breaks the plane (on_lost)."""
        if self._deferred:
            try:
                self._enqueue_deferred()
            except Exception as exc:  # those receives are never delivered: the plane breaks
                self._lost(exc)
        batch, self._batch, self._batch_bytes = self._batch, None, 0
        if batch:
            try:
                self._await_copies(batch)
            except Exception as exc:  # those receives are never delivered: the plane breaks
                self._lost(exc)

    @staticmethod
    def _copy_pieces(rec: CopyRecord, maps: tuple[_Mapping, ...], target: _Target,
                     handle: int) -> None:
        for piece, m in zip(rec.pieces, maps):
            # The future's result, not a field its callback sets: that callback may not have
            # run yet when the future is already done.
            src, n = m.opened.result() + piece.offset, piece.nbytes
            while n:
                ptr, size = target.chunks[target.index]
                k = min(n, size - target.offset)
                _cudaipc.copy_async(ptr + target.offset, src, k, handle)
                src += k
                n -= k
                target.offset += k
                target.remaining -= k
                if target.offset == size:
                    target.index += 1
                    target.offset = 0

    def _copied(self, batch: list[_Copy], done: torch.cuda.Event,
                fut: asyncio.Future[None]) -> None:
        self._copying -= len(batch)
        if fut.cancelled() or (exc := fut.exception()) is not None:
            for copy in batch:
                if copy.future is not None:
                    fail_future(copy.future,
                                self._error or ConnectionAbortedError("ipc plane closed"))
            return
        del exc
        self._events.put(done)
        try:
            for copy in batch:
                self._ledger.copied()
                for m in copy.maps:
                    m.users -= 1
                    if m.retired and not m.users:
                        self._close_mapping(m)
                self._completed += 1
                future = copy.future
                if future is not None and not future.done():
                    future.set_result(copy.tensors)
                    self._received_due = True
        except Exception as err:  # (closing a mapping) the rest would wait for ever: break
            self._lost(err)
        # Acknowledged at the end of this poll (the poller's after_pass), with every copy it
        # saw complete: not a loop iteration later, where it waited behind the headers read
        # meanwhile (hundreds of µs at 16 MiB, the sender idle).
        self._ack_due = True

    def _after_copies(self) -> None:
        # The owner delivers what the copies completed; then one ACK for the poll, however
        # many copies completed in it. It leads the owner's next write: a caller woken by
        # the delivery (scheduled first) and answering at once sends it with its answer.
        # The delivery may break the pipe or finish its close; then no ACK goes out, which
        # loses nothing: a broken pipe fails every send, and a close completes only after
        # the peer's sends did, each on its ACK, so no copy of this poll is still owed one.
        if self._received_due:
            self._received_due = False
            if self._received is not None:
                self._received()
        if self._ack_due:  # (not when the poll completed pulls only)
            self._ack_due = False
            if self._error is None and not self._closing:
                self._signal_soon(encode_record(AckRecord(self._completed)))

    # -- ending ----------------------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self._closing or self._error is not None:
            return
        self._on_lost(exc)

    def abort(self, exc: BaseException) -> None:
        """Break: every pending and later future fails with ``exc`` at once. Mappings are
        closed, the ring freed and held tensors dropped in a worker thread once this plane's
        own streams are idle (their copies never wait on the peer, so that is prompt)."""
        if self._error is not None:
            return
        self._error = exc
        for job in self._jobs:
            fail_future(job.future, exc)
        for sent in self._inflight:
            if sent.job is not None:
                fail_future(sent.job.future, exc)
        for target in self._targets:
            fail_future(target.future, exc)
        for _, _, _, fut in self._deferred:
            fail_future(fut, exc)
        self._deferred.clear()
        for source in self._pool_sources.values():
            fail_future(source, exc)
        # Ring copies queued on our send stream may still read these sends' tensors (their
        # copies onto this device, held by nobody else): kept until that stream is idle.
        sending: list[object] = [job.keepalive for job in self._jobs]
        sending += [sent.job.keepalive for sent in self._inflight if sent.job is not None]
        # Copies enqueued but never awaited may still write these receives' memory.
        for batch in (self._batch or [], *self._stranded):
            for copy in batch:
                if copy.future is not None:
                    fail_future(copy.future, exc)
        sending += [self._batch or (), self._stranded]
        self._batch = None
        self._jobs.clear()
        self._inflight.clear()
        self._targets.clear()
        self._copies.clear()
        self._ready_poller.abort(exc)
        self._copy_poller.fail_pending(exc)
        self._gate_poller.fail_pending(exc)
        self._gated.clear()
        self._release(lambda: _abort_all((self._copy_poller, self._gate_poller), exc),
                      keepalive=sending)

    def close(self) -> None:
        """Graceful end (nothing in flight): unmap and free off the loop."""
        if self._closing or self._error is not None:
            return
        self._closing = True
        for source in self._pool_sources.values():
            fail_future(source, ConnectionAbortedError("closed"))
        self._ready_poller.abort(ConnectionAbortedError("closed"))
        self._release(lambda: _abort_all((self._copy_poller, self._gate_poller),
                                         ConnectionAbortedError("closed")))

    def _release(self, then: Callable[[], object], keepalive: object = None) -> None:
        """Unmap, free and drop in the worker once our streams are idle; ``keepalive``
        (memory they may still read) is dropped only then."""
        self._ring = None
        send_stream, copy_stream, index = self._send_stream, self._copy_stream, self._index
        self._mappings.clear()

        def release() -> None:
            try:
                send_stream.synchronize()
                copy_stream.synchronize()
            except Exception as err:  # a broken context: unmapping below still matters
                log.debug("ipc plane: synchronize at release: %r", err)
            else:
                recycle_streams((send_stream, copy_stream))
            for m, ptr in list(self._thread_maps.items()):
                try:
                    _cudaipc.close_memory(ptr)
                except Exception as err:
                    log.debug("ipc plane: cudaIpcCloseMemHandle(%d): %r", m.region, err)
            self._thread_maps.clear()
            ring, self._thread_ring = self._thread_ring, None
            if ring is not None:
                try:
                    _cudaipc.free(ring, index)
                except Exception as err:
                    log.debug("ipc plane: freeing the ring: %r", err)

        def finished(_: asyncio.Future[None]) -> None:
            nonlocal keepalive
            keepalive = None
            then()
            if not self.released.done():
                self.released.set_result(None)

        self._worker.submit(release).add_done_callback(finished)
        self._worker.stop()
        self._exports.clear()


#: What :meth:`IpcPlane._guard` enters when the plane's device is current already.
_CURRENT_DEVICE: Final = contextlib.nullcontext()


def _unattached(data: bytes) -> None:
    raise RuntimeError("ipc plane: signalled before attach_signals()")


def _abort_all(pollers: Sequence[EventPoller], exc: BaseException) -> None:
    for poller in pollers:
        poller.abort(exc)


