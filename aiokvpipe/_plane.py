"""The data-plane interface: what the Pipe needs from a way of moving payload bytes.

The Pipe owns ordering, keys, credits and failure; a plane only moves the payload of one
message after another, in the order posted, in each direction.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol, TypeVar

import torch

from ._errors import fresh
from ._wire import TensorSpec

T = TypeVar("T")


class DataPlane(Protocol):
    #: ``"tcp"``, ``"nccl"`` or ``"ipc"``, as reported in ``Pipe.stats``.
    name: str

    def post_send(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[None]:
        """Queue the payload of the next outgoing message (contiguous tensors, in order).

        Called synchronously from ``send()`` in the caller's task, so a CUDA plane can order
        itself after work already queued on the caller's current stream. The future completes
        once the tensors' memory may be reused, and fails if the plane breaks.
        """
        ...

    def post_recv(self, specs: Sequence[TensorSpec]) -> asyncio.Future[list[torch.Tensor]]:
        """Queue the receipt of the next incoming payload into new tensors on the pipe's
        device; the future yields them once their contents are final.

        Never raises and never blocks: large buffers are allocated in a worker thread, in
        order. If the allocation fails, the future fails with that local error (a
        ``RuntimeError`` such as CUDA's out of memory, or ``MemoryError``) and the plane
        reports it through its ``on_lost`` callback: the payload cannot be received, so the
        pipe must break. The peer going away mid-payload fails it with a ``ConnectionError``.
        """
        ...

    def abort(self, exc: BaseException) -> None:
        """Break: stop all transfers at once; pending futures fail with ``exc``."""
        ...

    def close(self) -> None:
        """Release the plane's resources after a graceful close (nothing is in flight).
        Never blocks: slow teardown (NCCL's) runs in a daemon thread."""
        ...


class HostBytesPlane(DataPlane, Protocol):
    """A plane that moves host memory as it is (tcp): block transfers of CPU pools go
    straight between the pools' memory and the socket."""

    def post_send_views(self, views: Sequence[memoryview], keepalive: object = None
                        ) -> asyncio.Future[None]:
        """Queue host bytes (a CPU pool's blocks, a staging buffer) as the next payload, in
        order with :meth:`post_send`; ``keepalive`` is held until they have left."""
        ...

    def post_recv_views(self, views: Sequence[memoryview] | asyncio.Future[list[memoryview]],
                        keepalive: object = None) -> asyncio.Future[Any]:
        """Receive the next payload straight into host memory ``views``, in order with
        :meth:`post_recv`. ``views`` may be a future of them, made over several loop
        iterations: receives posted later wait behind it (a failed one breaks the plane)."""
        ...


class DeviceBytesPlane(DataPlane, Protocol):
    """A plane that receives into given device memory (nccl): staged block transfers."""

    def post_recv_into(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[Any]:
        """Receive the next payload into ``tensors`` (on the plane's device), in order with
        :meth:`post_recv`. The plane writes them only after the work queued so far on the
        caller's current stream (they may be memory that work still uses, freed to that
        stream's pool)."""
        ...


class SignallingPlane(DataPlane, Protocol):
    """A plane whose own records travel on the pipe's control connection (ipc), in SIGNAL
    frames and in order with the pipe's frames: one connection, one write and one read for
    a message's header and its payload's description."""

    def attach_signals(self, write: Callable[[bytes], None],
                       received: Callable[[], object] | None = None,
                       write_soon: Callable[[bytes], None] | None = None) -> None:
        """From now on, write records to the peer with ``write`` (which never raises); and
        call ``received()`` once receives completed (their futures are done), so that the
        owner delivers them at once rather than from their futures' callbacks, a loop
        iteration later. ``write_soon`` (default ``write``) carries records that may wait
        for the owner's next write, at most until the next loop iteration (in order with
        the rest)."""
        ...

    def on_signal(self, data: bytes) -> None:
        """Records from the peer; raises ``ProtocolError`` for bad ones, and errors of its
        own as they are: the pipe breaks."""
        ...

    def unclaimed(self) -> str | None:
        """Once every message the peer sent arrived (a graceful close): what it signalled
        that none of them claims, a violation, or None."""
        ...

    def hold_copies(self) -> None:
        """The pipe hands the plane one read's frames: receives they start may complete
        together (:meth:`release_copies`, in the same loop iteration, always called)."""
        ...

    def release_copies(self) -> None:
        """End of :meth:`hold_copies`; never raises."""
        ...

    def post_send_noted(self, tensors: Sequence[torch.Tensor],
                        waiter: asyncio.Future[None] | None = None
                        ) -> tuple[asyncio.Future[None], bytes | None]:
        """:meth:`post_send`, and the note that describes the payload to the peer's plane
        in the message's header (``None``: the plane describes it in its own records). The
        pipe must put a note in the very header it writes next. ``waiter`` (the sender's
        own future, which it may cancel) gets its result along with the send's future when
        the send succeeds, not a loop iteration after it, from that future's callback."""
        ...

    def post_recv_noted(self, specs: Sequence[TensorSpec], note: bytes
                        ) -> asyncio.Future[list[torch.Tensor]]:
        """:meth:`post_recv` of a message whose header carried the peer's ``note``; raises
        ``ProtocolError`` for a bad note."""
        ...


class Received(list[torch.Tensor]):
    """A payload's tensors (what ``post_recv``'s future may yield) with the CUDA stream they
    were allocated on. A caller who receives on that same stream needs no ``record_stream``,
    which costs the caching allocator a CUDA event per tensor: recorded when the tensor is
    freed, polled on the next allocation. A plain list vouches for no stream: the pipe keeps
    its tensors for the caller's stream (``record_stream``) whatever it is."""

    __slots__ = ("stream",)

    def __init__(self, tensors: list[torch.Tensor], stream: torch.cuda.Stream) -> None:
        super().__init__(tensors)
        self.stream = stream


#: Receive buffers up to this size are allocated on the event loop (from the allocators'
#: caches, a few microseconds); larger ones in the plane's allocation thread.
SYNC_ALLOC_BYTES: Final = 1 << 20


class OrderedWorker:
    """One worker thread per plane direction for blocking preparation (allocating large
    pinned or device buffers): jobs run one at a time, in submission order.

    The thread starts on the first job and ends after :meth:`shutdown`; it is named
    ``aiokvpipe-<name>_0``.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``fn`` in the worker thread; the future (of the running loop) yields its result
        or raises its exception. Cancelling the future drops a job not yet started."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix=f"aiokvpipe-{self._name}")
        return asyncio.wrap_future(self._pool.submit(fn))

    def shutdown(self) -> None:
        """Drop the jobs not started; the thread ends after the running one (never waits)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


_FROM_SOURCE: Any = object()


def fail_future(fut: asyncio.Future[Any], exc: BaseException) -> None:
    """Fail ``fut`` (if still pending) with a copy of ``exc``; its waiter may be gone, so
    the exception counts as retrieved (no "never retrieved" warning)."""
    if not fut.done():
        fut.set_exception(fresh(exc))
        fut.exception()


def mark_read(fut: asyncio.Future[Any]) -> None:
    """A done callback for a future (a task) whose outcome nobody may read: its exception
    counts as retrieved, so that asyncio does not log it when the future is collected."""
    if not fut.cancelled():
        fut.exception()


def settle_like(dest: asyncio.Future[T], source: asyncio.Future[Any],
                value: T = _FROM_SOURCE) -> None:
    """Complete ``dest`` the way ``source`` completed: cancelled, failed, or with ``value``
    (by default ``source``'s own result). Does nothing if ``dest`` is already done."""
    if dest.done():
        return
    if source.cancelled():
        dest.cancel()
    elif (exc := source.exception()) is not None:
        dest.set_exception(exc)
    else:
        dest.set_result(source.result() if value is _FROM_SOURCE else value)


async def in_daemon_thread(fn: Callable[[], Any], name: str,
                            orphaned: Callable[[Any], None] | None = None) -> Any:
    """Run a blocking call off the loop in a daemon thread (which never keeps the interpreter
    from exiting). If the wait is cancelled, ``orphaned`` receives the result when it comes
    (to release what nobody will use), on the loop or, if the loop is gone, in the thread."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[Any] = loop.create_future()

    def settle(result: Any, exc: BaseException | None) -> None:
        if fut.done():
            if exc is None and orphaned is not None:
                orphaned(result)
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
            if exc is None and orphaned is not None:
                orphaned(result)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await fut
