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
import logging
import socket
from collections import deque
from collections.abc import Callable, Sequence

import torch

from ._cuda import EventPoller
from ._dtypes import dtype_of
from ._errors import fresh
from ._hostmem import HostBufferPool, byte_view
from ._plane import settle_like
from ._wire import TensorSpec

log = logging.getLogger("aiokvpipe")

#: Bytes that may arrive before the header announcing them has been processed; they are parked
#: here (the only copy on this path) and reading pauses until the destination is known.
_SPILL_BYTES = 256 * 1024

#: Payload goes to the kernel this much per send() at most. On loopback one send() also runs
#: the receiver's side of TCP and can take in tens of MiB at once: milliseconds in which the
#: event loop runs nothing else.
_SEND_SLICE = 4 * 1024 * 1024


def tune_socket(sock: socket.socket) -> None:
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _CudaStaging:
    """Copies between CUDA tensors and pinned host memory on side streams, awaited by polling."""

    def __init__(self) -> None:
        self._streams: dict[tuple[str, int], tuple[torch.cuda.Stream, EventPoller]] = {}

    def _stream(self, direction: str, device: torch.device) -> tuple[torch.cuda.Stream,
                                                                     EventPoller]:
        key = (direction, device.index or 0)
        if key not in self._streams:
            self._streams[key] = (torch.cuda.Stream(device), EventPoller())
        return self._streams[key]

    async def to_host(self, t: torch.Tensor, ready: torch.cuda.Event) -> torch.Tensor:
        stream, poller = self._stream("d2h", t.device)
        with torch.cuda.stream(stream):
            stream.wait_event(ready)
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        await poller.watch(done, host.nbytes, keepalive=(t, host))
        return host

    async def to_device(self, hosts: list[torch.Tensor], device: torch.device
                        ) -> list[torch.Tensor]:
        stream, poller = self._stream("h2d", device)
        with torch.cuda.stream(stream):
            outs = [h.to(device, non_blocking=True) for h in hosts]
            done = torch.cuda.Event()
            done.record(stream)
        await poller.watch(done, sum(h.nbytes for h in hosts), keepalive=hosts)
        return outs

    def abort(self, exc: BaseException) -> None:
        for _, poller in self._streams.values():
            poller.abort(exc)


class _Target:
    """One posted receive: the tensors to fill and how far we got."""

    __slots__ = ("tensors", "views", "index", "offset", "future")

    def __init__(self, tensors: list[torch.Tensor], future: asyncio.Future[list[torch.Tensor]]
                 ) -> None:
        self.tensors = tensors
        self.views = [byte_view(t) for t in tensors if t.numel()]
        self.index = 0
        self.offset = 0
        self.future = future

    def buffer(self) -> memoryview:
        return self.views[self.index][self.offset:]

    def advance(self, n: int) -> bool:
        """Account ``n`` bytes written; True once every view is full."""
        self.offset += n
        while self.index < len(self.views) and self.offset == len(self.views[self.index]):
            self.index += 1
            self.offset = 0
        return self.index == len(self.views)


class _PayloadReceiver(asyncio.BufferedProtocol):
    def __init__(self, plane: TcpPlane) -> None:
        self._plane = plane
        self._transport: asyncio.Transport | None = None
        self._targets: deque[_Target] = deque()
        self._spill = bytearray(_SPILL_BYTES)
        self._spilled = 0
        self._paused = False
        self._eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; the interface is the same.
        self._transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._targets and not self._spilled:
            return self._targets[0].buffer()
        return memoryview(self._spill)[self._spilled:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._targets and not self._spilled:
            target = self._targets[0]
            if target.advance(nbytes):
                self._targets.popleft()
                self._plane._received(target)
            return
        # Bytes ahead of their header: hold them and stop reading until post() says where.
        self._spilled += nbytes
        if self._transport is not None and not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def post(self, target: _Target) -> None:
        if self._eof:
            self._plane._lost(ConnectionResetError("payload connection closed by the peer"))
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
                 on_lost: Callable[[BaseException], None], pool_bytes: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = send_sock
        self._device = device
        self._on_lost = on_lost
        self._receiver = _PayloadReceiver(self)
        self._outbox: deque[tuple[Sequence[torch.Tensor], list[torch.cuda.Event | None],
                                  asyncio.Future[None]]] = deque()
        self._outbox_nonempty: asyncio.Future[None] | None = None
        self._sender = self._loop.create_task(self._send_loop())
        self._staging = _CudaStaging()
        self._pool = HostBufferPool(pool_bytes)
        self._error: BaseException | None = None
        self._closing = False

    @classmethod
    async def start(cls, send_sock: socket.socket, recv_sock: socket.socket,
                    device: torch.device, on_lost: Callable[[BaseException], None],
                    pool_bytes: int) -> TcpPlane:
        """``pool_bytes``: how much freed receive memory to keep for reuse."""
        tune_socket(send_sock)
        tune_socket(recv_sock)
        plane = cls(send_sock, device, on_lost, pool_bytes)
        await plane._loop.connect_accepted_socket(lambda: plane._receiver, recv_sock)
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
                ev.record(torch.cuda.current_stream(t.device))
            ready.append(ev)
        self._outbox.append((tensors, ready, fut))
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
                for t, ev in zip(tensors, ready):
                    if ev is not None:
                        t = await self._staging.to_host(t, ev)
                    view = byte_view(t)
                    for start in range(0, len(view), _SEND_SLICE):
                        await self._loop.sock_sendall(self._sock,
                                                      view[start:start + _SEND_SLICE])
                        if start + _SEND_SLICE < len(view):
                            # A slice the socket took at once completes without a suspension:
                            # let the loop run between slices.
                            await asyncio.sleep(0)
            except OSError as exc:
                self._lost(exc)
                return
            self._outbox.popleft()
            if not fut.done():
                fut.set_result(None)

    # -- receiving ----------------------------------------------------------------------------

    def post_recv(self, specs: Sequence[TensorSpec]) -> asyncio.Future[list[torch.Tensor]]:
        fut: asyncio.Future[list[torch.Tensor]] = self._loop.create_future()
        if self._error is not None:
            fut.set_exception(fresh(self._error))
            return fut
        pin = self._device.type == "cuda"
        tensors = []
        for s in specs:
            dtype = dtype_of(s.dtype)
            assert dtype is not None, "the pipe checks dtypes before posting"
            # CUDA receivers stage through pinned memory, which torch's host allocator caches.
            tensors.append(torch.empty(s.shape, dtype=dtype, pin_memory=True) if pin
                           else self._pool.empty(s.shape, dtype))
        target = _Target(tensors, fut)
        if not target.views:
            self._received(target)
        else:
            self._receiver.post(target)
        return fut

    def _received(self, target: _Target) -> None:
        if self._device.type == "cuda" and target.tensors:
            task = self._loop.create_task(self._staging.to_device(target.tensors, self._device))
            task.add_done_callback(lambda t: settle_like(target.future, t))
        elif not target.future.done():
            target.future.set_result(target.tensors)

    # -- ending -------------------------------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self._closing or self._error is not None:
            return
        self._on_lost(exc)

    def abort(self, exc: BaseException) -> None:
        if self._error is not None:
            return
        self._error = exc
        self._sender.cancel()
        while self._outbox:
            _, _, fut = self._outbox.popleft()
            if not fut.done():
                fut.set_exception(fresh(exc))
                fut.exception()
        self._receiver.fail(exc)
        self._staging.abort(exc)
        self._sock.close()

    def close(self) -> None:
        self._closing = True
        self._sender.cancel()
        try:
            self._sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        self._sock.close()
        self._receiver.fail(ConnectionAbortedError("data plane closed"))
