"""The tcp data plane: payload bytes over a pair of sockets, one per direction, no extra copies.

Sending: ``loop.sock_sendall`` of a memoryview over each tensor's own memory (CPU), or over a
pinned host copy of a CUDA tensor, made on a side stream after the caller's stream.

Receiving: an :class:`asyncio.BufferedProtocol` whose ``get_buffer`` hands the kernel the
destination tensor's memory, so ``recv_into`` writes the payload straight where it belongs.
CUDA receivers get pinned host tensors, copied to the device on a side stream.

Each socket carries payload only (headers travel on the control channel), so a 1 GiB payload
never delays a credit or a heartbeat.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import itertools
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence

import torch

from ._cuda import (
    EventPoller,
    current_stream,
    recycle_streams,
    recycle_when_idle,
    side_streams,
)
from ._dtypes import dtype_of
from ._errors import fresh
from ._hostmem import HostBufferPool, byte_view
from ._plane import SYNC_ALLOC_BYTES, OrderedWorker, settle_like
from ._wire import TensorSpec

log = logging.getLogger("aiokvpipe")

#: Bytes that may arrive before the header announcing them has been processed; they are parked
#: here (the only copy on this path) and reading pauses until the destination is known.
_SPILL_BYTES = 256 * 1024

#: Payload goes to the kernel this much per send() at most. On loopback one send() also runs
#: the receiver's side of TCP and can take in tens of MiB at once: milliseconds in which the
#: event loop runs nothing else.
_SEND_SLICE = 4 * 1024 * 1024
#: A tensor's payload goes in slices of this much: 64 MiB messages on the 2-core VM
#: (2026-12-02, alternating runs) kept their ratio to the zero-copy ceiling, and the sender's
#: loop-lag p99 was 1.8–3.3 ms (median 2.8, five runs) against 3.3–6.4 ms at 4 MiB (median
#: 3.4, five runs; the 5 ms target failed twice). Block views keep :data:`_SEND_SLICE`
#: batches (smaller ones measured slower there).
_TENSOR_SLICE = 2 * 1024 * 1024

#: Views per ``sendmsg`` call at most (Linux's IOV_MAX is 1024).
_IOV_MAX = 512


def _hold(keepalive: object, _: object) -> None:
    """A done callback whose only work is to have kept ``keepalive`` referenced till then."""


def tune_socket(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _CudaStaging:
    """Copies between CUDA tensors and pinned host memory on side streams, awaited by polling.

    A failure of a poller (a CUDA error) is reported to ``on_error``. Large pinned buffers for
    outgoing tensors are allocated in ``worker``'s thread, never on the event loop.
    """

    def __init__(self, on_error: Callable[[BaseException], None], worker: OrderedWorker,
                 device: torch.device, streams: Sequence[torch.cuda.Stream]) -> None:
        self._streams: dict[tuple[str, int], tuple[torch.cuda.Stream, EventPoller]] = {}
        self._on_error = on_error
        self._worker = worker
        #: The plane's device's two streams, made off the loop (side_streams); a tensor on
        #: another GPU gets torch's side streams, made when first needed.
        self._own = list(streams)
        self._released = False
        for direction, stream in zip(("d2h", "h2d"), self._own):
            self._streams[(direction, device.index or 0)] = (stream, EventPoller(on_error))

    def stream(self, direction: str, device: torch.device) -> tuple[torch.cuda.Stream,
                                                                    EventPoller]:
        """The side stream (and its poller) for ``"d2h"`` or ``"h2d"`` copies on ``device``;
        create it on the event loop's thread."""
        key = (direction, device.index or 0)
        if self._released:  # the plane ended: its streams may be another plane's by now
            raise ConnectionAbortedError("data plane closed")
        if key not in self._streams:
            self._streams[key] = (torch.cuda.Stream(device), EventPoller(self._on_error))
        return self._streams[key]

    async def to_host(self, t: torch.Tensor, ready: torch.cuda.Event) -> torch.Tensor:
        stream, poller = self.stream("d2h", t.device)
        if t.nbytes > SYNC_ALLOC_BYTES:
            host = await self._worker.submit(
                lambda: torch.empty(t.shape, dtype=t.dtype, pin_memory=True))
        else:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        await poller.watch(done, host.nbytes, keepalive=(t, host))
        return host

    async def to_device(self, hosts: list[torch.Tensor], outs: list[torch.Tensor],
                        device: torch.device) -> list[torch.Tensor]:
        """Copy ``hosts`` into ``outs`` (allocated on the ``"h2d"`` stream beforehand)."""
        stream, poller = self.stream("h2d", device)
        with torch.cuda.stream(stream):
            for out, host in zip(outs, hosts):
                if host.numel():
                    out.copy_(host, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        await poller.watch(done, sum(h.nbytes for h in hosts), keepalive=hosts)
        return outs

    def abort(self, exc: BaseException) -> None:
        for _, poller in self._streams.values():
            poller.abort(exc)
        self.release()

    def release(self) -> None:
        """Give the plane's own streams back for reuse, once their copies have ended."""
        self._released = True
        own, self._own = self._own, []
        recycle_when_idle(own)


class _Target:
    """One posted receive: the tensors to fill and how far we got."""

    __slots__ = ("tensors", "outs", "views", "index", "offset", "future", "_ends")

    def __init__(self, tensors: list[torch.Tensor], future: asyncio.Future[list[torch.Tensor]],
                 outs: list[torch.Tensor] | None = None) -> None:
        self.tensors = tensors
        self.outs = outs  # CUDA receivers: the device tensors the host tensors are copied to
        self.views = [byte_view(t) for t in tensors if t.numel()]
        self.index = 0
        self.offset = 0
        self.future = future
        self._ends: list[int] | None = None  # where each view ends in the payload, if asked

    def buffer(self) -> memoryview:
        return self.views[self.index][self.offset:]

    def _view_ends(self) -> list[int]:
        if self._ends is None:
            self._ends = list(itertools.accumulate(map(len, self.views)))
        return self._ends

    def buffers(self, max_views: int, max_bytes: int) -> list[memoryview]:
        """The buffers from where the target stands: the rest of the current view and the
        whole views after it, at most ``max_views`` of them and about ``max_bytes``."""
        ends, i = self._view_ends(), self.index
        end = min(i + max_views, bisect.bisect_left(ends, ends[i] - len(self.views[i])
                                                    + self.offset + max_bytes) + 1)
        return [self.views[i][self.offset:], *self.views[i + 1:end]]

    def advance(self, n: int) -> bool:
        """Account ``n`` bytes written from where the target stood (across as many views as
        they fill); True once every view is full."""
        offset = self.offset + n
        length = len(self.views[self.index])
        if offset < length:
            self.offset = offset
            return False
        if offset > length:  # past this view (a scatter read): find the view it ends in
            ends = self._view_ends()
            at = ends[self.index] - length + offset
            self.index = bisect.bisect_right(ends, at)
            self.offset = at - ends[self.index - 1]
            return self.index == len(self.views)
        self.index += 1
        self.offset = 0
        return self.index == len(self.views)


class _PayloadReceiver(asyncio.BufferedProtocol):
    def __init__(self, plane: TcpPlane, sock: socket.socket | None = None) -> None:
        self._plane = plane
        # The transport's own socket (it stays the transport's: never closed here), read
        # directly for scatter receives; see _scatter_read.
        self._sock = sock
        self._transport: asyncio.Transport | None = None
        self._targets: deque[_Target] = deque()
        self._spill = bytearray(_SPILL_BYTES)
        self._spilled = 0
        self._paused = False
        self._eof = False
        # A scatter read happened in this turn of the event loop (see _scatter_read).
        self._scattered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; the interface is the same.
        self._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._targets and not self._spilled:
            return self._targets[0].buffer()
        return memoryview(self._spill)[self._spilled:]

    def buffer_updated(self, nbytes: int) -> None:
        self._plane.moved_bytes += nbytes
        if self._targets and not self._spilled:
            target = self._targets[0]
            if target.advance(nbytes):
                self._targets.popleft()
                self._plane._received(target)
            elif (self._sock is not None and not self._scattered
                  and target.index + 1 < len(target.views)):
                self._scatter_read(target, self._sock)
            return
        # Bytes ahead of their header: hold them and stop reading until post() says where.
        self._spilled += nbytes
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _scatter_read(self, target: _Target, sock: socket.socket) -> None:
        """Read what the socket holds now into many of ``target``'s views at once.

        A transport reads into one buffer per call (``get_buffer``), so a target of many
        small views (a CPU pool's blocks: 32 KiB each for an 8B Llama) would cost a system
        call and a round of callbacks per view. One ``recvmsg_into`` fills up to
        :data:`_IOV_MAX` views here, on the loop's thread inside the transport's read
        callback (so nothing else reads the socket meanwhile); at most about
        :data:`_SEND_SLICE` bytes, so the loop runs between bursts. Errors and the end of
        the stream are left to the transport, which meets them on its next read.

        One burst per turn of the loop: uvloop calls ``get_buffer``/``buffer_updated`` again
        and again (up to 32 times) while each read fills its buffer, and bursts in every one
        of them held the loop for 100+ ms at a time on a 512 MiB request.
        """
        self._scattered = True
        asyncio.get_running_loop().call_soon(self._scatter_again)
        try:
            n = sock.recvmsg_into(target.buffers(_IOV_MAX, _SEND_SLICE))[0]
        except OSError:  # BlockingIOError: nothing more yet; anything else: the transport's
            return
        if n and target.advance(n):
            self._targets.popleft()
            self._plane._received(target)

    def _scatter_again(self) -> None:
        self._scattered = False

    def post(self, target: _Target) -> None:
        if self._eof:
            exc = ConnectionResetError("payload connection closed by the peer")
            if not target.future.done():
                target.future.set_exception(exc)
            self._plane._lost(exc)
            return
        self._targets.append(target)
        if self._spilled:
            self._drain_spill()

    def _drain_spill(self) -> None:
        spill = memoryview(self._spill)
        used = 0
        while self._targets and used < self._spilled:
            target = self._targets[0]
            dest = target.buffer()
            n = min(len(dest), self._spilled - used)
            dest[:n] = spill[used:used + n]
            used += n
            if target.advance(n):
                self._targets.popleft()
                self._plane._received(target)
        spill[:self._spilled - used] = spill[used:self._spilled]
        self._spilled -= used
        if not self._spilled and self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if exc is None and not self._targets and not self._spilled:
            # A clean end between payloads is how a graceful close looks; a dead peer is
            # reported by the control channel. A later receive finds the connection gone.
            self._eof = True
            return
        self._plane._lost(exc or ConnectionResetError("payload connection closed mid-payload"))

    def fail(self, exc: BaseException) -> None:
        while self._targets:
            fut = self._targets.popleft().future
            if not fut.done():
                fut.set_exception(fresh(exc))
                fut.exception()
        if self._transport is not None:
            self._transport.abort()


class TcpPlane:
    """Payload over two sockets: ``send_sock`` written with ``sock_sendall``, the other read
    through :class:`_PayloadReceiver`. Create with :meth:`start`."""

    name = "tcp"

    def __init__(self, send_sock: socket.socket, device: torch.device,
                 on_lost: Callable[[BaseException], None], pool_bytes: int,
                 recv_sock: socket.socket | None = None,
                 streams: Sequence[torch.cuda.Stream] = ()) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = send_sock
        self._device = device
        self._on_lost = on_lost
        self._receiver = _PayloadReceiver(self, recv_sock)
        self._outbox: deque[tuple[Sequence[torch.Tensor], list[torch.cuda.Event | None],
                                  asyncio.Future[None]]] = deque()
        self._outbox_nonempty: asyncio.Future[None] | None = None
        self._sender = self._loop.create_task(self._send_loop())
        self._stage_worker = OrderedWorker("stage")
        self._alloc_worker = OrderedWorker("alloc")
        self._staging = _CudaStaging(self._lost, self._stage_worker, device, streams)
        self._pool = HostBufferPool(pool_bytes)
        # Receives whose buffers are being allocated, oldest first: posted in this order.
        self._allocating: deque[tuple[asyncio.Future[_Target], asyncio.Future[
            list[torch.Tensor]]]] = deque()
        self._recv_failed: BaseException | None = None
        #: Payload bytes written and read so far: a close can tell a transfer still moving
        #: from a stuck one.
        self.moved_bytes = 0
        self._error: BaseException | None = None
        self._closing = False

    @classmethod
    async def start(cls, send_sock: socket.socket, recv_sock: socket.socket,
                    device: torch.device, on_lost: Callable[[BaseException], None],
                    pool_bytes: int) -> TcpPlane:
        """``pool_bytes``: how much freed receive memory to keep for reuse."""
        tune_socket(send_sock)
        tune_socket(recv_sock)
        # CUDA receive buffers are allocated on the h2d stream: both made before the plane.
        streams = await side_streams(device, 2) if device.type == "cuda" else []
        try:
            plane = cls(send_sock, device, on_lost, pool_bytes,
                        recv_sock if hasattr(recv_sock, "recvmsg_into") else None, streams)
        except BaseException:
            recycle_streams(streams)
            raise
        try:
            await plane._loop.connect_accepted_socket(lambda: plane._receiver, recv_sock)
        except BaseException as exc:
            plane.abort(exc)
            raise
        return plane

    # -- sending ------------------------------------------------------------------------------

    def post_send(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._error is not None:
            fut.set_exception(fresh(self._error))
            return fut
        tensors = [t for t in tensors if t.numel()]
        if not tensors:
            fut.set_result(None)
            return fut
        # Mark the caller's stream now: the staging copy must see every kernel already queued.
        ready: list[torch.cuda.Event | None] = []
        for t in tensors:
            ev = None
            if t.is_cuda:
                ev = torch.cuda.Event()
                ev.record(current_stream(t.device))
            ready.append(ev)
        self._outbox.append((tensors, ready, fut))
        if self._outbox_nonempty is not None and not self._outbox_nonempty.done():
            self._outbox_nonempty.set_result(None)
        return fut

    def post_send_views(self, views: Sequence[memoryview], keepalive: object = None
                        ) -> asyncio.Future[None]:
        """Queue bytes that are already in host memory (a CPU pool's blocks, a pinned staging
        buffer), in order with :meth:`post_send`; ``keepalive`` owns the memory and is held
        until they have left."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if self._error is not None:
            fut.set_exception(fresh(self._error))
            return fut
        fut.add_done_callback(functools.partial(_hold, keepalive))
        self._outbox.append((views, [None] * len(views), fut))  # type: ignore[arg-type]
        if self._outbox_nonempty is not None and not self._outbox_nonempty.done():
            self._outbox_nonempty.set_result(None)
        return fut

    async def _send_loop(self) -> None:
        while True:
            if not self._outbox:
                self._outbox_nonempty = self._loop.create_future()
                await self._outbox_nonempty
                continue
            tensors, ready, fut = self._outbox[0]
            try:
                if tensors and isinstance(tensors[0], memoryview):  # post_send_views
                    await self._send_views(tensors)
                    tensors = ()
                for t, ev in zip(tensors, ready):
                    view, keep = await self._payload_bytes(t, ev)
                    for start in range(0, len(view), _TENSOR_SLICE):
                        await self._loop.sock_sendall(self._sock,
                                                      view[start:start + _TENSOR_SLICE])
                        self.moved_bytes += min(_TENSOR_SLICE, len(view) - start)
                        if start + _TENSOR_SLICE < len(view):
                            # A slice the socket took at once completes without a suspension:
                            # let the loop run between slices.
                            await asyncio.sleep(0)
                    del keep
            except Exception as exc:  # noqa: BLE001  -- any failure must end in a break
                # OSError: the connection failed; anything else is local (a pinned allocation,
                # a CUDA copy). Either way this payload cannot be completed: break the pipe.
                self._send_failed(exc)
                return
            self._outbox.popleft()
            if not fut.done():
                fut.set_result(None)

    async def _send_views(self, views: Sequence[memoryview]) -> None:
        """Send ``views`` in order, many per ``sendmsg`` call: a CPU pool's blocks are
        thousands of small pieces (32 KiB each for an 8B Llama), and one ``sock_sendall``
        each costs more in Python than the kernel needs to take them. Batches hold at most
        :data:`_IOV_MAX` views and about :data:`_SEND_SLICE` bytes (the loop runs between
        them, as between slices). Where the socket takes part of a batch, the rest of the
        view it stopped in goes with ``sock_sendall``, which waits until it is writable."""
        loop, sock = self._loop, self._sock
        if max(map(len, views)) > _SEND_SLICE:  # a staging buffer: cut it in slices
            views = [v[at:at + _SEND_SLICE] for v in views for at in range(0, len(v),
                                                                             _SEND_SLICE)]
        ends = list(itertools.accumulate(map(len, views)))
        i, n, pos = 0, len(views), 0  # views[i] is the first not sent whole; pos: bytes sent
        while i < n:
            end = min(n, i + _IOV_MAX, bisect.bisect_left(ends, pos + _SEND_SLICE) + 1)
            try:
                pos += sock.sendmsg(views[i:end])
            except (BlockingIOError, InterruptedError):
                pass
            i = bisect.bisect_right(ends, pos)
            if i < end:  # the socket is full inside views[i]: wait to send its rest
                start = ends[i] - len(views[i])
                await loop.sock_sendall(sock, views[i][pos - start:])
                pos = ends[i]
                i += 1
            elif i < n:
                # A batch the socket took at once completes without a suspension: let the
                # loop run between batches.
                await asyncio.sleep(0)

    async def _payload_bytes(self, t: torch.Tensor, ready: torch.cuda.Event | None
                             ) -> tuple[memoryview, torch.Tensor]:
        """The bytes to send for ``t`` and the tensor owning them (hold it while the view is
        used): ``t``'s own memory, or a pinned host copy of a CUDA tensor made after
        ``ready``."""
        if ready is not None:
            t = await self._staging.to_host(t, ready)
        return byte_view(t), t

    def _send_failed(self, exc: BaseException) -> None:
        self._lost(exc)
        if self._error is None:  # nobody aborted us (a close is under way): fail the senders
            self._fail_outbox(exc)

    def _fail_outbox(self, exc: BaseException) -> None:
        while self._outbox:
            _, _, fut = self._outbox.popleft()
            if not fut.done():
                fut.set_exception(fresh(exc))
                fut.exception()

    # -- receiving ----------------------------------------------------------------------------

    def post_recv(self, specs: Sequence[TensorSpec]) -> asyncio.Future[list[torch.Tensor]]:
        """See :meth:`DataPlane.post_recv`. CPU receivers get pooled host memory at once;
        CUDA receivers need pinned staging and device memory, allocated in a worker thread
        when large. Receives are handed to the socket reader strictly in posting order; bytes
        arriving meanwhile wait in the reader's bounded spill buffer."""
        fut: asyncio.Future[list[torch.Tensor]] = self._loop.create_future()
        failed = self._error or self._recv_failed
        if failed is not None:
            fut.set_exception(fresh(failed))
            return fut
        sync = (self._device.type == "cpu"
                or sum(s.nbytes for s in specs) <= SYNC_ALLOC_BYTES)
        if sync:
            job: asyncio.Future[_Target] = self._loop.create_future()
            try:
                job.set_result(self._allocate(specs, fut))
            except Exception as exc:  # noqa: BLE001  -- reported as what it is
                if not self._allocating:
                    self._allocation_failed(fut, exc)
                    return fut
                job.set_exception(exc)
            if not self._allocating:
                self._post(job.result())
                return fut
        else:
            job = self._alloc_worker.submit(functools.partial(self._allocate, specs, fut))
        self._allocating.append((job, fut))
        job.add_done_callback(self._post_allocated)
        return fut

    def post_recv_views(self, views: Sequence[memoryview] | asyncio.Future[list[memoryview]],
                        keepalive: object = None) -> asyncio.Future[list[torch.Tensor]]:
        """Receive the next payload straight into ``views`` (host memory: a CPU pool's blocks,
        a pinned staging buffer), in order with :meth:`post_recv`; ``keepalive`` owns them.
        ``views`` may be a future of them: later receives wait behind it, as behind an
        allocation (their bytes wait in the socket), and a failed one breaks the plane."""
        fut: asyncio.Future[list[torch.Tensor]] = self._loop.create_future()
        failed = self._error or self._recv_failed
        if failed is not None:
            fut.set_exception(fresh(failed))
            return fut
        fut.add_done_callback(functools.partial(_hold, keepalive))
        job: asyncio.Future[_Target] = self._loop.create_future()
        if isinstance(views, asyncio.Future):
            views.add_done_callback(functools.partial(self._views_made, job, fut))
        else:
            target = _Target([], fut)
            target.views = [v for v in views if len(v)]
            if not self._allocating:
                self._post(target)
                return fut
            job.set_result(target)
        self._allocating.append((job, fut))
        job.add_done_callback(self._post_allocated)
        return fut

    @staticmethod
    def _views_made(job: asyncio.Future[_Target], fut: asyncio.Future[list[torch.Tensor]],
                    views: asyncio.Future[list[memoryview]]) -> None:
        if job.done():  # the plane ended meanwhile
            return
        if views.cancelled():
            job.set_exception(ConnectionAbortedError("the receive's views were cancelled"))
            return
        exc = views.exception()
        if exc is not None:
            job.set_exception(exc)
            return
        target = _Target([], fut)
        target.views = [v for v in views.result() if len(v)]
        job.set_result(target)

    def _allocate(self, specs: Sequence[TensorSpec],
                  fut: asyncio.Future[list[torch.Tensor]]) -> _Target:
        """The receive buffers for ``specs`` (runs on the loop or in the allocation thread)."""
        dtypes = []
        for s in specs:
            dtype = dtype_of(s.dtype)
            assert dtype is not None, "the pipe checks dtypes before posting"
            dtypes.append(dtype)
        if self._device.type != "cuda":
            return _Target([self._pool.empty(s.shape, d) for s, d in zip(specs, dtypes)], fut)
        h2d, _ = self._staging.stream("h2d", self._device)
        with torch.cuda.device(self._device), torch.cuda.stream(h2d):
            # Pinned staging (torch's host allocator caches it), and the device tensors on the
            # stream that will fill them, so the allocator orders their reuse after the copy.
            hosts = [torch.empty(s.shape, dtype=d, pin_memory=True)
                     for s, d in zip(specs, dtypes)]
            outs = [torch.empty(s.shape, dtype=d, device=self._device)
                    for s, d in zip(specs, dtypes)]
        return _Target(hosts, fut, outs)

    def _post_allocated(self, _: object = None) -> None:
        while self._allocating and self._allocating[0][0].done():
            job, fut = self._allocating.popleft()
            if self._error is not None or job.cancelled():
                continue  # aborted: abort() failed the futures
            exc = job.exception()
            if exc is not None:
                self._allocation_failed(fut, exc)
                return
            self._post(job.result())

    def _allocation_failed(self, fut: asyncio.Future[list[torch.Tensor]],
                           exc: BaseException) -> None:
        # The payload's bytes will come with nowhere to go: nothing after it can be received.
        self._recv_failed = exc
        if not fut.done():
            fut.set_exception(exc)
        for job, later in self._allocating:
            job.cancel()
            if not later.done():
                later.set_exception(fresh(exc))
        self._allocating.clear()
        self._lost(exc)

    def _post(self, target: _Target) -> None:
        if not target.views:
            self._received(target)
        else:
            self._receiver.post(target)

    def _received(self, target: _Target) -> None:
        if target.outs is not None and target.tensors:
            outs = target.outs
            task = self._loop.create_task(self._staging.to_device(target.tensors, outs,
                                                                  self._device))
            task.add_done_callback(functools.partial(self._copied, target))
        elif not target.future.done():
            target.future.set_result(target.outs if target.outs is not None
                                     else target.tensors)

    def _copied(self, target: _Target, task: asyncio.Task[list[torch.Tensor]]) -> None:
        settle_like(target.future, task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self._lost(exc)

    # -- ending -------------------------------------------------------------------------------

    def _close_sock(self) -> None:
        """Close the send socket once the send loop (just cancelled) has let go of it: a
        ``sock_sendall`` waiting for room unwatches its descriptor only in the loop turn its
        cancellation runs, by number, on asyncio's loop; closed before, the number may by then
        belong to a new socket, which it would unwatch."""
        if self._sender.done():
            self._sock.close()
        else:
            self._sender.add_done_callback(lambda _: self._sock.close())

    def _lost(self, exc: BaseException) -> None:
        if self._closing or self._error is not None:
            return
        self._on_lost(exc)

    def abort(self, exc: BaseException) -> None:
        if self._error is not None:
            return
        self._error = exc
        self._sender.cancel()
        self._fail_outbox(exc)
        for job, fut in self._allocating:
            job.cancel()
            if not fut.done():
                fut.set_exception(fresh(exc))
                fut.exception()
        self._allocating.clear()
        self._stage_worker.shutdown()
        self._alloc_worker.shutdown()
        self._receiver.fail(exc)
        self._staging.abort(exc)
        self._pool.close()
        self._close_sock()

    def close(self) -> None:
        self._closing = True
        self._sender.cancel()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._close_sock()
        self._stage_worker.shutdown()
        self._alloc_worker.shutdown()
        self._receiver.fail(ConnectionAbortedError("data plane closed"))
        self._staging.release()
        self._pool.close()
