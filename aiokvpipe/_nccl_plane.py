"""The nccl data plane: CuPy's NCCL point-to-point on CUDA streams, completion by polling events.

Two communicators, one per direction, each with its own CUDA stream: on one shared
communicator two large sends crossing each other deadlock (each waits for a receive the other
side has queued behind its own send). In each communicator the sending end is rank 0.

Nothing here waits on the GPU from the event loop: an op is enqueued (``ncclSend``/``ncclRecv``
return at once), a CUDA event is recorded after it, and an :class:`~aiokvpipe._cuda.EventPoller`
completes the future when the event has fired. The only blocking steps -- communicator
set-up, which is collective, and a one-byte exchange that makes NCCL open its connections
(lazily opened connections would otherwise block the first send until the peer posts its
receive) -- run in a worker thread during the handshake.

CuPy is imported lazily: without it, :func:`nccl_info` says so and ``auto`` picks tcp.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._cuda import EventPoller
from ._dtypes import dtype_of
from ._errors import fresh
from ._plane import settle_like
from ._wire import NCCL_UNIQUE_ID_BYTES, TensorSpec

log = logging.getLogger("aiokvpipe")


def _nccl() -> Any:
    from cupy.cuda import nccl  # lazy: CuPy is an optional extra

    return nccl


def nccl_info() -> tuple[bool, int]:
    """(CuPy with NCCL importable here, NCCL version); never raises."""
    try:
        nccl = _nccl()
        return bool(nccl.available), int(nccl.get_version())
    except Exception:  # ImportError, or a CuPy built without NCCL / no driver
        return False, 0


def _id_to_bytes(uid: bytes | Sequence[int]) -> bytes:
    # CuPy 14 hands out bytes; older CuPy a tuple of C ``char`` values (signed).
    return uid if isinstance(uid, bytes) else bytes(b & 0xFF for b in uid)


def _communicator(nccl: Any, uid: bytes, rank: int) -> Any:
    if len(uid) != NCCL_UNIQUE_ID_BYTES:
        raise ValueError("NCCL unique id must be 128 bytes")
    try:
        return nccl.NcclCommunicator(2, uid, rank)
    except TypeError:  # older CuPy: a tuple of signed chars
        return nccl.NcclCommunicator(2, tuple(b - 256 if b > 127 else b for b in uid), rank)


def new_unique_ids() -> tuple[bytes, bytes]:
    """Fresh ids for the (server→client, client→server) communicators."""
    nccl = _nccl()
    return _id_to_bytes(nccl.get_unique_id()), _id_to_bytes(nccl.get_unique_id())


def _setup(server: bool, ids: tuple[bytes, bytes], device: torch.device) -> tuple[Any, Any]:
    """Create both communicators and open their connections (blocking; runs in a thread).

    Returns (send_comm, recv_comm). In each communicator the sending end is rank 0.
    """
    import cupy

    nccl = _nccl()
    with cupy.cuda.Device(device.index):
        s2c = _communicator(nccl, ids[0], 0 if server else 1)
        c2s = _communicator(nccl, ids[1], 1 if server else 0)
        send_comm, recv_comm = (s2c, c2s) if server else (c2s, s2c)
        byte = cupy.zeros(1, dtype=cupy.uint8)
        stream = cupy.cuda.Stream(non_blocking=True)
        # The same order on both ends (s2c first), so the exchange cannot deadlock.
        if server:
            send_comm.send(byte.data.ptr, 1, nccl.NCCL_UINT8, 1, stream.ptr)
            recv_comm.recv(byte.data.ptr, 1, nccl.NCCL_UINT8, 0, stream.ptr)
        else:
            recv_comm.recv(byte.data.ptr, 1, nccl.NCCL_UINT8, 0, stream.ptr)
            send_comm.send(byte.data.ptr, 1, nccl.NCCL_UINT8, 1, stream.ptr)
        stream.synchronize()
    return send_comm, recv_comm


async def start(server: bool, ids: tuple[bytes, bytes], device: torch.device,
                on_lost: Callable[[BaseException], None]) -> NcclPlane:
    """Set up the plane; both ends must call this concurrently (NCCL set-up is collective)."""
    if device.type != "cuda":
        raise ValueError("the nccl plane needs a CUDA device")
    send_comm, recv_comm = await _in_daemon_thread(lambda: _setup(server, ids, device))
    return NcclPlane(send_comm, recv_comm, device)


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Run a blocking call off the loop in a daemon thread.

    NCCL's set-up waits for the peer with no timeout of its own. If the peer never joins, the
    handshake timeout abandons the wait; a daemon thread (unlike the default executor's)
    does not then keep the interpreter from exiting.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(fresh(exc))
        else:
            fut.set_result(result)

    def run() -> None:
        try:
            result, exc = fn(), None
        except BaseException as err:
            result, exc = None, err
        try:
            loop.call_soon_threadsafe(settle, result, exc)
        except RuntimeError:  # the loop is gone; nobody is waiting any more
            pass

    threading.Thread(target=run, name="aiokvpipe-nccl-setup", daemon=True).start()
    return await fut


class NcclPlane:
    """Payload over two NCCL communicators; see the module docstring."""

    name = "nccl"

    def __init__(self, send_comm: Any, recv_comm: Any, device: torch.device) -> None:
        self._nccl = _nccl()
        self._send_comm = send_comm
        self._recv_comm = recv_comm
        self._device = device
        self._send_stream = torch.cuda.Stream(device)
        self._recv_stream = torch.cuda.Stream(device)
        self._send_poller = EventPoller()
        self._recv_poller = EventPoller()
        self._error: BaseException | None = None
        self._closed = False

    def post_send(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[None]:
        if self._error is not None:
            return _failed(self._error)
        nccl, stream = self._nccl, self._send_stream
        with torch.cuda.device(self._device):
            # Everything the caller queued on its stream (the data, .contiguous() copies)
            # happens before NCCL reads the memory.
            caller = torch.cuda.current_stream(self._device)
            staged = [self._on_device(t, caller) for t in tensors if t.numel()]
            stream.wait_stream(caller)
            nbytes = 0
            nccl.groupStart()
            try:
                for t in staged:
                    n = t.numel() * t.element_size()
                    self._send_comm.send(t.data_ptr(), n, nccl.NCCL_UINT8, 1, stream.cuda_stream)
                    nbytes += n
            finally:
                nccl.groupEnd()
            done = torch.cuda.Event()
            done.record(stream)
        # The tensors stay referenced until NCCL has read them, so the caching allocator
        # cannot hand their memory to anyone else meanwhile.
        return self._send_poller.watch(done, nbytes, keepalive=(tensors, staged))

    def _on_device(self, t: torch.Tensor, caller: torch.cuda.Stream) -> torch.Tensor:
        if t.device == self._device:
            return t
        # A CPU tensor or one on another GPU: copy it here on the caller's stream, so the
        # stream ordering above covers it.
        return t.to(self._device, non_blocking=True)

    def post_recv(self, specs: Sequence[TensorSpec]) -> asyncio.Future[list[torch.Tensor]]:
        if self._error is not None:
            return _failed(self._error)
        nccl, stream = self._nccl, self._recv_stream
        with torch.cuda.device(self._device), torch.cuda.stream(stream):
            # Allocated on the receive stream: the allocator only reuses this memory after
            # what the receive stream does with it, i.e. after NCCL has written it.
            outs = []
            for s in specs:
                dtype = dtype_of(s.dtype)
                assert dtype is not None, "the pipe checks dtypes before posting"
                outs.append(torch.empty(s.shape, dtype=dtype, device=self._device))
            nbytes = 0
            nccl.groupStart()
            try:
                for t in outs:
                    n = t.numel() * t.element_size()
                    if n:
                        self._recv_comm.recv(t.data_ptr(), n, nccl.NCCL_UINT8, 0,
                                             stream.cuda_stream)
                        nbytes += n
            finally:
                nccl.groupEnd()
            done = torch.cuda.Event()
            done.record(stream)
        fut: asyncio.Future[list[torch.Tensor]] = asyncio.get_running_loop().create_future()
        watched = self._recv_poller.watch(done, nbytes, keepalive=outs)
        watched.add_done_callback(lambda w: settle_like(fut, w, outs))
        return fut

    def abort(self, exc: BaseException) -> None:
        """Abort both communicators, so kernels waiting for a dead peer end, then drop the
        memory they used. Pending futures fail with ``exc`` at once."""
        if self._error is not None:
            return
        self._error = exc
        comms = [self._send_comm, self._recv_comm]
        self._send_comm = self._recv_comm = None
        loop = asyncio.get_running_loop()
        pollers = (self._send_poller, self._recv_poller)

        # ncclCommAbort may take a while to tear down NCCL's proxy threads; keep it off the
        # event loop. Memory the kernels used is released only once they are gone.
        def abort_comms() -> None:
            for comm in comms:
                try:
                    comm.abort()
                except Exception as err:  # already torn down
                    log.debug("ncclCommAbort: %r", err)
            try:
                torch.cuda.synchronize(self._device)
            except Exception as err:
                log.debug("synchronize after abort: %r", err)
            try:
                for poller in pollers:
                    loop.call_soon_threadsafe(poller.abort, exc)
            except RuntimeError:  # the loop has closed: nobody is left to notify
                pass

        for p in pollers:
            p.fail_pending(exc)
        threading.Thread(target=abort_comms, name="aiokvpipe-nccl-abort", daemon=True).start()

    def close(self) -> None:
        """Graceful end: nothing is in flight, so destroying the communicators is prompt."""
        if self._closed or self._error is not None:
            return
        self._closed = True
        for comm in (self._send_comm, self._recv_comm):
            comm.destroy()


def _failed(exc: BaseException) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    fut.set_exception(fresh(exc))
    return fut
