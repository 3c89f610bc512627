"""The nccl data plane: NCCL point-to-point on CUDA streams, completion by polling events.

Two communicators, one per direction, each with its own CUDA stream: on one shared
communicator two large sends crossing each other deadlock (each waits for a receive the other
side has queued behind its own send). In each communicator the sending end is rank 0.

Nothing here waits on the GPU or on the peer from the event loop. The communicators are
non-blocking (:mod:`._nccl_lib`): set-up returns at once and is polled, so a peer that never
joins leaves no thread behind, and cancelling :func:`start` aborts the half-built
communicators. An op is enqueued (``ncclSend``/``ncclRecv`` return at once; if NCCL answers
``ncclInProgress``, later ops of that direction wait until the communicator is ready), a CUDA
event is recorded after it, and an :class:`~aiokvpipe._cuda.EventPoller` completes the future
when the event has fired. Large receive buffers are allocated in a worker thread, in order.
Blocking teardown (``ncclCommAbort``, ``ncclCommFinalize``/``Destroy``) runs in daemon threads.

NCCL is loaded lazily (CuPy's libnccl, else the nvidia-nccl wheel's): without it,
:func:`nccl_info` says so and ``auto`` picks tcp.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import _nccl_lib
from ._cuda import (
    EventPoller,
    Queryable,
    after_pending_work,
    current_stream,
    recycle_streams,
    side_streams,
)
from ._dtypes import dtype_of
from ._errors import fresh
from ._nccl_lib import IN_PROGRESS, SUCCESS, NcclError, NcclLib
from ._plane import SYNC_ALLOC_BYTES, OrderedWorker, fail_future, in_daemon_thread, settle_like
from ._wire import NCCL_UNIQUE_ID_BYTES, TensorSpec

log = logging.getLogger("aiokvpipe")

#: A graceful close waits this long for ncclCommFinalize before aborting the communicator.
_FINALIZE_TIMEOUT_S = 10.0


# -- what this process can do -----------------------------------------------------------------

_info_lock = threading.Lock()
_info: concurrent.futures.Future[tuple[bool, int]] | None = None


def _compute_info(out: concurrent.futures.Future[tuple[bool, int]]) -> None:
    try:
        lib = _nccl_lib.load()
        out.set_result((True, lib.version))
    except Exception as exc:  # noqa: BLE001  -- no libnccl, a CuPy without NCCL, too old
        log.debug("NCCL unavailable: %r", exc)
        out.set_result((False, 0))


def _info_future() -> concurrent.futures.Future[tuple[bool, int]]:
    global _info
    with _info_lock:
        if _info is None:
            _info = concurrent.futures.Future()
            _info.set_running_or_notify_cancel()  # so a cancelled waiter cannot cancel it
            threading.Thread(target=_compute_info, args=(_info,), name="aiokvpipe-nccl-info",
                             daemon=True).start()
        return _info


def nccl_info() -> tuple[bool, int]:
    """(NCCL with non-blocking communicators usable here, NCCL version code); never raises.

    Computed once per process (loading CuPy and libnccl takes a while) and cached. Blocking
    on the first call: from a coroutine use :func:`nccl_info_async`."""
    return _info_future().result()


async def nccl_info_async() -> tuple[bool, int]:
    """:func:`nccl_info` without blocking the event loop: the first call computes it in a
    worker thread, later calls return the cached answer. Cancelling the wait is safe."""
    fut = _info_future()
    if fut.done():
        return fut.result()
    return await asyncio.wrap_future(fut)


def _lib() -> NcclLib:
    ok, _ = nccl_info()
    if not ok:
        raise RuntimeError("NCCL is not available in this process")
    return _nccl_lib.load()


def new_unique_ids() -> tuple[bytes, bytes]:
    """Fresh ids for the (server→client, client→server) communicators (blocking)."""
    lib = _lib()
    return lib.unique_id(), lib.unique_id()


async def new_unique_ids_async() -> tuple[bytes, bytes]:
    """:func:`new_unique_ids` in a worker thread (``ncclGetUniqueId`` starts NCCL's
    bootstrap: network interface discovery, a listening socket)."""
    await nccl_info_async()
    ids: tuple[bytes, bytes] = await in_daemon_thread(new_unique_ids, "aiokvpipe-nccl-id")
    return ids


# -- set-up -----------------------------------------------------------------------------------


async def _wait_ready(lib: NcclLib, comm: int) -> None:
    """Poll a non-blocking communicator from the loop until it leaves ``ncclInProgress``;
    raise :class:`NcclError` if it failed."""
    polls = 0
    while (state := lib.async_error(comm)) == IN_PROGRESS:
        polls += 1
        # A few polls per loop iteration first (an op in progress ends within microseconds),
        # then every millisecond (set-up takes tens to hundreds of them).
        await asyncio.sleep(0 if polls < 64 else 0.001)
    lib.check(state, "NCCL communicator")


def _abort_in_thread(lib: NcclLib, comms: Sequence[int], then: Callable[[], None] | None = None
                     ) -> None:
    """``ncclCommAbort`` each communicator in a daemon thread (it can take seconds while
    NCCL's threads wind down), then call ``then`` in that thread."""
    def run() -> None:
        for comm in comms:
            try:
                lib.abort(comm)
            except Exception as err:  # noqa: BLE001  -- nothing more to do about it
                log.debug("ncclCommAbort: %r", err)
        if then is not None:
            then()

    threading.Thread(target=run, name="aiokvpipe-nccl-abort", daemon=True).start()


async def start(server: bool, ids: tuple[bytes, bytes], device: torch.device,
                on_lost: Callable[[BaseException], None]) -> NcclPlane:
    """Set up the plane; both ends must call this concurrently (NCCL set-up is collective).

    Returns once both communicators are ready and their connections open. Raises
    :class:`~aiokvpipe._nccl_lib.NcclError` if NCCL fails. Cancelling it (a handshake
    timeout) aborts the half-built communicators in a daemon thread and returns at once;
    no thread stays blocked on a peer that never joins.
    """
    if device.type != "cuda":
        raise ValueError("the nccl plane needs a CUDA device")
    if any(len(uid) != NCCL_UNIQUE_ID_BYTES for uid in ids):
        raise ValueError(f"NCCL unique ids must be {NCCL_UNIQUE_ID_BYTES} bytes")
    await nccl_info_async()
    lib = _lib()
    index = device.index if device.index is not None else 0
    comms: list[int] = []

    def init() -> list[int]:
        # Returns at once (non-blocking communicators); a thread because the first
        # initialisation in a process loads NCCL's plugins and probes the network.
        made: list[int] = []
        with torch.cuda.device(index):
            try:
                made.append(lib.init_rank_nonblocking(ids[0], 2, 0 if server else 1))
                made.append(lib.init_rank_nonblocking(ids[1], 2, 1 if server else 0))
            except BaseException:
                _abort_in_thread(lib, made)
                raise
        return made

    plane: NcclPlane | None = None
    try:
        comms = await in_daemon_thread(init, "aiokvpipe-nccl-init",
                                        orphaned=functools.partial(_abort_in_thread, lib))
        for comm in comms:
            await _wait_ready(lib, comm)
        s2c, c2s = comms
        send_comm, recv_comm = (s2c, c2s) if server else (c2s, s2c)
        streams = await side_streams(device, 3)
        plane = NcclPlane(lib, send_comm, recv_comm, device, on_lost, streams)
        comms = []  # the plane owns them now
        await plane._open_connections()
        return plane
    except BaseException as exc:
        if plane is not None:
            plane.abort(exc)
        elif comms:
            _abort_in_thread(lib, comms)
        raise


# -- the plane --------------------------------------------------------------------------------


@dataclass(eq=False)
class _Op:
    """A group of sends or receives waiting for its turn on a lane."""

    #: Its buffers: None while they are allocated in the worker thread.
    tensors: list[torch.Tensor] | None
    #: The caller's stream at post time (sends, receives into given tensors): the op waits
    #: for it on the lane's stream.
    after: torch.cuda.Event | None
    done: asyncio.Future[None]
    keepalive: object = None
    allocation: asyncio.Future[list[torch.Tensor]] | None = None
    nbytes: int = field(default=0)


class _Lane:
    """One direction: a communicator, its stream and event poller, and the ops waiting to be
    enqueued, in posting order. An op waits for its buffers (allocated in a worker thread)
    and for the communicator to leave ``ncclInProgress``; then it is enqueued as one NCCL
    group and awaited through an event recorded after it."""

    def __init__(self, lib: NcclLib, comm: int, device: torch.device, sending: bool,
                 on_error: Callable[[BaseException], None], stream: torch.cuda.Stream) -> None:
        self.lib = lib
        self.comm = comm
        self.device = device
        self.sending = sending
        self.stream = stream  # made off the loop (side_streams)
        self.poller = EventPoller(on_error)
        self._on_error = on_error
        self._queue: deque[_Op] = deque()
        self._busy: asyncio.Task[None] | None = None  # waiting out ncclInProgress
        self._busy_op: _Op | None = None  # the op it waits for (in no queue and no poller)
        #: Memory of ops given up while NCCL held them: kept until the streams are done.
        self._held: list[object] = []
        self.error: BaseException | None = None

    def submit(self, op: _Op) -> None:
        self._queue.append(op)
        if op.allocation is not None:
            op.allocation.add_done_callback(lambda _: self.pump())
        self.pump()

    def pump(self) -> None:
        while self._queue and self._busy is None and self.error is None:
            op = self._queue[0]
            if op.allocation is not None:
                if not op.allocation.done():
                    return
                if op.allocation.cancelled():
                    self._queue.popleft()
                    continue
                if (exc := op.allocation.exception()) is not None:
                    self._queue.popleft()
                    self.fail(exc, first=op)
                    return
                op.tensors = op.allocation.result()
                op.allocation = None
            self._queue.popleft()
            try:
                rc = self._enqueue(op)
            except Exception as exc:  # noqa: BLE001  -- an NcclError, a CUDA error: local
                self.fail(exc, first=op)
                return
            if rc == IN_PROGRESS:
                self._busy_op = op
                self._busy = asyncio.get_running_loop().create_task(self._finish_later(op))
                return
            self._watch(op)

    def _enqueue(self, op: _Op) -> int:
        assert op.tensors is not None
        lib, stream = self.lib, self.stream
        if op.after is not None:
            stream.wait_event(op.after)
        nbytes = 0
        with torch.cuda.device(self.device):
            lib.group_start()
            try:
                for t in op.tensors:
                    n = t.numel() * t.element_size()
                    if not n:
                        continue
                    if self.sending:
                        lib.send(t.data_ptr(), n, 1, self.comm, stream.cuda_stream)
                    else:
                        lib.recv(t.data_ptr(), n, 0, self.comm, stream.cuda_stream)
                    nbytes += n
            finally:
                rc = lib.group_end()
        op.nbytes = nbytes
        return rc

    async def _finish_later(self, op: _Op) -> None:
        try:
            await _wait_ready(self.lib, self.comm)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001
            self._busy = self._busy_op = None
            self.fail(exc, first=op)
            return
        self._busy = self._busy_op = None
        self._watch(op)
        self.pump()

    def _watch(self, op: _Op) -> None:
        done: Queryable
        try:
            with torch.cuda.device(self.device):
                event = torch.cuda.Event()
                event.record(self.stream)
            done = _OpDone(event, self)
        except Exception as exc:  # noqa: BLE001  -- a CUDA error, after NCCL took the op
            # Watched all the same, through an event that reports the error: the poller
            # fails the op and breaks the plane, and keeps the op's memory until the plane's
            # streams are done with it. (Raised, it left the op waiting for ever.) Nothing
            # more is enqueued meanwhile.
            self.error = exc
            done = _Failed(exc)
        # The tensors stay referenced until NCCL is done with them, so the caching allocator
        # cannot hand their memory to anyone else meanwhile.
        watched = self.poller.watch(done, op.nbytes, keepalive=(op.tensors, op.keepalive))
        watched.add_done_callback(lambda w: settle_like(op.done, w))

    def fail(self, exc: BaseException, first: _Op | None = None) -> None:
        """A local failure: ``first`` fails with ``exc`` itself, every later op with a copy;
        nothing more is enqueued (the peer's matching op would take the next message's
        bytes), and the plane is told."""
        if self.error is not None:
            return
        self.error = exc
        if first is not None and not first.done.done():
            first.done.set_exception(exc)
        self._fail_queued(exc)
        self._on_error(exc)

    def _fail_queued(self, exc: BaseException) -> None:
        while self._queue:
            op = self._queue.popleft()
            if op.allocation is not None:
                op.allocation.cancel()
            if not op.done.done():
                op.done.set_exception(fresh(exc))
                op.done.exception()

    def abort(self, exc: BaseException) -> None:
        self.error = self.error or exc
        if self._busy is not None:
            self._busy.cancel()
            op, self._busy, self._busy_op = self._busy_op, None, None
            if op is not None:  # (its caller waited for ever: it was in no queue)
                fail_future(op.done, exc)
                self._held.append((op.tensors, op.keepalive))
        self._fail_queued(exc)
        self.poller.fail_pending(exc)

    def release(self, exc: BaseException) -> None:
        """Our stream is done with every op (the communicator aborted): drop their memory."""
        self.poller.abort(exc)
        self._held.clear()


class _OpDone:
    """An op's completion: its event, and its communicator's asynchronous error. A failure of
    NCCL's own transport (a link down, the peer's proxy failing) while the control connection
    lives leaves the kernel waiting for ever: the event alone would never say."""

    __slots__ = ("_event", "_lane", "_polls")

    #: Polls of an unfinished op between two looks at the communicator's state (a C call):
    #: one every 32 ms or so once the poller backs off to 1 ms.
    CHECK_EVERY = 32

    def __init__(self, event: torch.cuda.Event, lane: _Lane) -> None:
        self._event = event
        self._lane = lane
        self._polls = 0

    def query(self) -> bool:
        if self._event.query():
            return True
        self._polls += 1
        # Not once the lane failed: its communicator is being aborted, or gone.
        if self._polls % self.CHECK_EVERY == 0 and self._lane.error is None:
            lane = self._lane
            state = lane.lib.async_error(lane.comm)
            if state not in (SUCCESS, IN_PROGRESS):
                lane.lib.check(state, "NCCL communicator")  # raises: the poller fails
        return False


class _Failed:
    """An op's completion that cannot be awaited: polling it raises the error that prevented
    recording its event."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc

    def query(self) -> bool:
        raise self._exc


class NcclPlane:
    """Payload over two NCCL communicators; see the module docstring. Create with
    :func:`start`."""

    name = "nccl"

    def __init__(self, lib: NcclLib, send_comm: int, recv_comm: int, device: torch.device,
                 on_lost: Callable[[BaseException], None],
                 streams: Sequence[torch.cuda.Stream]) -> None:
        self._lib = lib
        self._device = device
        self._on_lost = on_lost
        self._send = _Lane(lib, send_comm, device, True, self._lost, streams[0])
        self._recv = _Lane(lib, recv_comm, device, False, self._lost, streams[1])
        self._alloc_worker = OrderedWorker("alloc")
        #: CPU tensors to send, copied to the device in turn on the third of ``streams``.
        self._stage_worker = OrderedWorker("stage")
        self._stage_stream = streams[2]
        #: Held by a staging job while it uses the stage stream; once the plane ends, no job
        #: starts and the stream is handed back only if none is running (see _staging_ended).
        self._stage_lock = threading.Lock()
        self._stage_closed = False
        self._error: BaseException | None = None
        self._closed = False

    async def _open_connections(self) -> None:
        """Exchange one byte each way: NCCL opens a peer connection lazily, at the first op,
        and this end learns that the peer's communicators work."""
        out = torch.zeros(1, dtype=torch.uint8, device=self._device)
        into = torch.empty(1, dtype=torch.uint8, device=self._device)
        loop = asyncio.get_running_loop()
        sent: asyncio.Future[None] = loop.create_future()
        got: asyncio.Future[None] = loop.create_future()
        self._send.submit(_Op([out], None, sent))
        self._recv.submit(_Op([into], None, got))
        await asyncio.gather(sent, got)

    def _lost(self, exc: BaseException) -> None:
        if self._closed or self._error is not None:
            return
        self._on_lost(exc)

    # -- sending ------------------------------------------------------------------------------

    def post_send(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        failed = self._error or self._send.error
        if failed is not None:
            fut.set_exception(fresh(failed))
            return fut
        with torch.cuda.device(self._device):
            # Another GPU's tensor: copied here on the caller's streams, asynchronously (the
            # copy is ordered on this device's current stream, before the event below).
            sent = [t if t.device.type != "cuda" or t.device == self._device
                    else t.to(self._device, non_blocking=True) for t in tensors if t.numel()]
            # Everything the caller queued on its stream (the data, .contiguous() copies,
            # those copies) happens before NCCL reads the memory.
            after = torch.cuda.Event()
            after.record(current_stream(self._device))
        if all(t.device == self._device for t in sent):
            self._send.submit(_Op(sent, after, fut, keepalive=tensors))
        else:
            # A CPU tensor is copied to the device in a worker thread: from pageable memory
            # the copy is synchronous, after all of the caller's queued work, and it held the
            # loop for as long. Later sends wait their turn behind it; receives do not.
            staging = self._stage_worker.submit(functools.partial(self._stage, sent, after))
            self._send.submit(_Op(None, after, fut, keepalive=tensors, allocation=staging))
        return fut

    def _stage(self, tensors: list[torch.Tensor], after: torch.cuda.Event
               ) -> list[torch.Tensor]:
        """Worker thread: ``tensors`` on the plane's device, the CPU ones copied after
        ``after`` on the plane's staging stream, and complete. (Allocated on that stream:
        their memory is reused only once they are dropped, which the send's poller does
        after NCCL read them.)"""
        stream = self._stage_stream
        with self._stage_lock:
            if self._stage_closed:  # (the plane ended as this job started)
                raise ConnectionAbortedError("the nccl plane ended")
            with torch.cuda.device(self._device), torch.cuda.stream(stream):
                stream.wait_event(after)
                out = [t if t.device == self._device else t.to(self._device, non_blocking=True)
                       for t in tensors]
            stream.synchronize()
        return out

    def _staging_ended(self) -> list[torch.cuda.Stream]:
        """The plane ended: no staging job starts any more. Returns the stage stream to hand
        back with the others, or nothing if a job is running on it (it may queue a copy on
        it yet: the stream is then dropped, not given to another plane)."""
        if not self._stage_lock.acquire(blocking=False):
            log.debug("a staging job runs as the plane ends: its stream is not reused")
            return []
        self._stage_closed = True
        self._stage_lock.release()
        return [self._stage_stream]

    # -- receiving ----------------------------------------------------------------------------

    def post_recv(self, specs: Sequence[TensorSpec]) -> asyncio.Future[list[torch.Tensor]]:
        """See :meth:`DataPlane.post_recv`: buffers over ``SYNC_ALLOC_BYTES`` in all are
        allocated in a worker thread; receives are enqueued in posting order."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[torch.Tensor]] = loop.create_future()
        failed = self._error or self._recv.error
        if failed is not None:
            fut.set_exception(fresh(failed))
            return fut
        done: asyncio.Future[None] = loop.create_future()
        allocate = functools.partial(self._allocate, specs)
        if sum(s.nbytes for s in specs) <= SYNC_ALLOC_BYTES:
            try:
                op = _Op(allocate(), None, done)
            except Exception as exc:  # noqa: BLE001  -- reported as what it is
                allocation: asyncio.Future[list[torch.Tensor]] = loop.create_future()
                allocation.set_exception(exc)
                op = _Op(None, None, done, allocation=allocation)
        else:
            op = _Op(None, None, done, allocation=self._alloc_worker.submit(allocate))
        def settle(d: asyncio.Future[None]) -> None:
            settle_like(fut, d, op.tensors or [])

        done.add_done_callback(settle)
        self._recv.submit(op)
        return fut

    def post_recv_into(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[None]:
        """Receive the next payload into ``tensors`` (contiguous, on the plane's device; a
        block transfer's staging buffer): in posting order with :meth:`post_recv`. NCCL
        writes them after the work queued so far on the current stream."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        failed = self._error or self._recv.error
        if failed is not None:
            done.set_exception(fresh(failed))
            return done
        # They may come from the current stream's pool, in memory its pending work still
        # uses: NCCL writes them after that work (which holds this and later receives up,
        # as a busy caller's stream holds up sends).
        self._recv.submit(_Op(list(tensors), after_pending_work(self._device), done))
        return done

    def _allocate(self, specs: Sequence[TensorSpec]) -> list[torch.Tensor]:
        # Allocated on the receive stream: the allocator only reuses this memory after what
        # the receive stream does with it, i.e. after NCCL has written it.
        stream = self._recv.stream
        with torch.cuda.device(self._device), torch.cuda.stream(stream):
            outs = []
            for s in specs:
                dtype = dtype_of(s.dtype)
                assert dtype is not None, "the pipe checks dtypes before posting"
                outs.append(torch.empty(s.shape, dtype=dtype, device=self._device))
        return outs

    # -- ending -------------------------------------------------------------------------------

    def abort(self, exc: BaseException) -> None:
        """Abort both communicators, so kernels waiting for a dead peer end, then drop the
        memory they used. Pending futures fail with ``exc`` at once.

        Waits (in a daemon thread) only for the plane's own streams, never for the device:
        the application's streams may be stuck on the same dead peer."""
        if self._error is not None or self._closed:  # closed: its teardown owns the rest
            return
        self._error = exc
        self._alloc_worker.shutdown()
        self._stage_worker.shutdown()
        lanes = (self._send, self._recv)
        for lane in lanes:
            lane.abort(exc)
        loop = asyncio.get_running_loop()

        def release() -> None:
            # The communicators are aborted: the kernels on our streams end. Once they have,
            # the memory the pollers keep alive may go.
            idle = []
            for stream in (*(lane.stream for lane in lanes), *self._staging_ended()):
                try:
                    stream.synchronize()
                    idle.append(stream)
                except Exception as err:  # noqa: BLE001
                    log.debug("synchronize after abort: %r", err)
            recycle_streams(idle)
            try:
                for lane in lanes:
                    loop.call_soon_threadsafe(lane.release, exc)
            except RuntimeError:  # the loop has closed: nobody is left to notify
                pass

        _abort_in_thread(self._lib, [self._send.comm, self._recv.comm], then=release)

    def close(self) -> None:
        """Graceful end: nothing is in flight. The communicators are finalised and destroyed
        in a daemon thread; this returns at once."""
        if self._closed or self._error is not None:
            return
        self._closed = True
        self._alloc_worker.shutdown()
        self._stage_worker.shutdown()
        lib, comms = self._lib, [self._send.comm, self._recv.comm]
        streams = [self._send.stream, self._recv.stream]

        def teardown() -> None:
            for comm in comms:
                try:
                    lib.finalize(comm)
                    deadline = time.monotonic() + _FINALIZE_TIMEOUT_S
                    while (state := lib.async_error(comm)) == IN_PROGRESS:
                        if time.monotonic() > deadline:
                            raise TimeoutError("ncclCommFinalize did not complete")
                        time.sleep(0.001)
                    if state != SUCCESS:
                        lib.check(state, "ncclCommFinalize")
                    lib.destroy(comm)
                except Exception as err:  # noqa: BLE001
                    log.debug("NCCL teardown failed (%r); aborting the communicator", err)
                    lib.abort(comm)
            idle = []
            for stream in (*streams, *self._staging_ended()):  # (this thread may wait)
                try:
                    stream.synchronize()
                    idle.append(stream)
                except Exception as err:  # noqa: BLE001 -- dropped: a broken context
                    log.debug("synchronize after close: %r", err)
            recycle_streams(idle)

        threading.Thread(target=teardown, name="aiokvpipe-nccl-close", daemon=True).start()


__all__ = ["NcclError", "NcclPlane", "new_unique_ids", "new_unique_ids_async", "nccl_info",
           "nccl_info_async", "start"]
