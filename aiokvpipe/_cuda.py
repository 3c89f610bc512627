"""CUDA helpers: awaiting CUDA events from the event loop, and facts about the local GPU.

Nothing here touches CUDA at import time; torch.cuda is only used once a CUDA tensor or device
is actually in play.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Final, Protocol

import torch

from ._errors import fresh

log = logging.getLogger("aiokvpipe")

#: Bandwidth assumed when guessing how long an op will take. Deliberately optimistic (above
#: NVLink 4's 450 GB/s would be pointless, below it we would oversleep): the guess is a lower
#: bound on the real duration, so sleeping until just before it never delays a completion.
_OPTIMISTIC_BYTES_PER_S: Final = 500e9
#: Sleeps shorter than this are not worth taking: asyncio and libuv time out in whole ms.
_SLEEP_GRANULARITY_S: Final = 1e-3
#: After the guessed end, spin (yield to the loop between polls) this long before backing off.
_SPIN_S: Final = 2e-3


class Queryable(Protocol):
    def query(self) -> bool: ...


class EventPoller:
    """Awaits CUDA events recorded on one stream, oldest first, from the event loop.

    Ops on one stream finish in order, so only the oldest event needs polling. The poll
    rate adapts: while the op is surely still running (its size over an optimistic bandwidth)
    the poller sleeps in 1 ms steps; around the expected end it polls on every loop iteration
    (so small messages complete in microseconds); if the op overruns it backs off to 1 ms
    polls, and an idle poller schedules nothing, so an idle pipe costs no CPU. Polls are
    plain loop callbacks, not a task: a task's creation and steps cost several times more,
    on every CUDA receive's path.

    If polling fails (``query()`` raises: a CUDA error), every pending and later future fails
    with that error and ``on_error`` is called with it once, so the owner can break; the
    referenced memory is kept until :meth:`abort`.

    ``after_pass()``, if given, is called at the end of each poll that saw at least one event
    complete, after their ``then`` callbacks: an owner that answers completions (the ipc
    plane's acknowledgement) answers them all together, in that same poll, not a loop
    iteration later behind whatever else that iteration has to do.
    """

    def __init__(self, on_error: Callable[[BaseException], None] | None = None,
                 after_pass: Callable[[], object] | None = None) -> None:
        self._pending: deque[tuple[Queryable, asyncio.Future[None], float, object,
                                   Callable[[asyncio.Future[None]], object] | None]] = deque()
        self._handle: asyncio.Handle | None = None  # the next poll, once scheduled
        self._in_poll = False
        self._started: float | None = None  # when the oldest event was first polled
        self._error: BaseException | None = None
        self._on_error = on_error
        self._after_pass = after_pass

    def watch(self, event: Queryable, nbytes: int = 0, keepalive: object = None,
              then: Callable[[asyncio.Future[None]], object] | None = None
              ) -> asyncio.Future[None]:
        """A future that completes once ``event`` has completed.

        ``keepalive`` (tensors, say) is referenced until then, so memory a stream still uses
        is not freed under it. ``then(future)`` is called exactly once: from the poll itself
        when the event fired (a loop iteration sooner than a done callback, which asyncio
        schedules for the next one), else scheduled once polling failed or was aborted. A
        future its holder cancelled still gets its ``then``, at one of those moments.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        if self._error is not None:
            fut.set_exception(fresh(self._error))
            if then is not None:
                fut.add_done_callback(then)
            return fut
        self._pending.append((event, fut, nbytes / _OPTIMISTIC_BYTES_PER_S, keepalive, then))
        if self._handle is None and not self._in_poll:
            self._handle = loop.call_soon(self._poll)
        return fut

    def _poll(self) -> None:
        self._handle = None
        self._in_poll = True  # a `then` that watches more must not schedule a second poll
        pending = self._pending
        completed = False
        try:
            while pending:
                event, fut, expected, _, then = pending[0]
                if self._started is None:
                    # From its first poll, not its watch: a loop that stalled in between
                    # must not make an event look overdue (and polled only every 1 ms).
                    self._started = time.perf_counter()
                if not event.query():
                    elapsed = time.perf_counter() - self._started
                    loop = fut.get_loop()
                    if expected - 1.5 * _SLEEP_GRANULARITY_S <= elapsed < expected + _SPIN_S:
                        self._handle = loop.call_soon(self._poll)
                    else:  # surely still running, or overrunning: back off
                        self._handle = loop.call_later(_SLEEP_GRANULARITY_S, self._poll)
                    break
                # Its `then` as it is now: fail_pending may have run it already meanwhile.
                then = pending.popleft()[4]
                self._started = None
                completed = True
                if not fut.done():
                    fut.set_result(None)
                if then is not None:  # also for a future its holder cancelled
                    _call(then, fut)
        except Exception as exc:  # query() failed: nothing on this stream can be awaited
            self.fail_pending(exc)
            if self._on_error is not None:
                self._on_error(exc)
            else:
                log.error("CUDA event poller failed: %r", exc)
        finally:
            self._in_poll = False
        if completed and self._after_pass is not None and self._error is None:
            self._after_pass()  # its errors are its owner's: the loop's handler reports them

    def fail_pending(self, exc: BaseException) -> None:
        """Fail every pending and later future with ``exc`` now, but keep polling and keep
        the referenced memory until :meth:`abort` (the stream may still be using it)."""
        self._error = exc
        for _, fut, _, _, then in self._pending:
            _fail(fut, exc, then)
        # Polled on (the memory stays referenced), but each `then` ran once already. In
        # place: a poll running now (this may be called from a `then`) holds the deque.
        entries = [entry[:4] + (None,) for entry in self._pending]
        self._pending.clear()
        self._pending.extend(entries)

    def abort(self, exc: BaseException) -> None:
        """Stop polling; every pending and later future fails with ``exc``.

        The referenced memory is dropped here: call this only once the stream can no longer
        touch it (after the NCCL communicator was aborted, or the device synchronised).
        """
        self._error = exc
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        while self._pending:
            _, fut, _, _, then = self._pending.popleft()
            _fail(fut, exc, then)


def _fail(fut: asyncio.Future[None], exc: BaseException,
          then: Callable[[asyncio.Future[None]], object] | None) -> None:
    if not fut.done():
        fut.set_exception(fresh(exc))
        fut.exception()  # its waiter may be gone; do not warn about it
    if then is not None:  # scheduled, as a done callback: failures come from abort paths
        fut.get_loop().call_soon(then, fut)


def _call(then: Callable[[asyncio.Future[None]], object], fut: asyncio.Future[None]) -> None:
    """Run a ``then`` callback from the poll; its errors are the loop's to report, as a done
    callback's would be (asyncio's handles let only these two through), never the poller's,
    which would take them for a failed query or die of them."""
    try:
        then(fut)
    except (SystemExit, KeyboardInterrupt):
        raise
    except BaseException as exc:
        fut.get_loop().call_exception_handler({
            "message": "Exception in an event poller's callback", "exception": exc,
            "future": fut})


#: Stream objects by (stream id, device index): what :func:`current_stream` hands out.
_STREAMS: dict[tuple[int, int], torch.cuda.Stream] = {}
#: Distinct current streams remembered at most (an application uses a handful).
_MAX_STREAMS: Final = 256


def current_stream(device: torch.device) -> torch.cuda.Stream:
    """``torch.cuda.current_stream(device)`` for the per-message paths.

    torch's own builds a new ``Stream`` object through several Python helpers each call:
    9–12 µs a call on an H200 host while two processes share the GPU (2026-12-02), twice per
    received message over ipc. A stream id names one CUDA stream for the life of the
    process (torch never destroys pool streams; an external stream's id is its handle), so
    the object made for an id is reused. ``device`` must carry its index.
    """
    index = device.index
    if index is None:
        return torch.cuda.current_stream(device)
    sid, dev_index, dev_type = torch._C._cuda_getCurrentStream(index)
    key = (sid, dev_index)
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) >= _MAX_STREAMS:
            _STREAMS.clear()
        stream = _STREAMS[key] = torch.cuda.Stream(stream_id=sid, device_index=dev_index,
                                                   device_type=dev_type)
    return stream


def after_pending_work(device: torch.device) -> torch.cuda.Event | None:
    """An event recorded after the work queued so far on ``device``'s current stream, for a
    plane's stream to wait on before it writes memory that work may still use (memory
    freed to that stream's pool and handed out again); ``None`` when the stream is idle."""
    caller = current_stream(device)
    if caller.query():
        return None
    event = torch.cuda.Event()
    event.record(caller)  # on the stream's own device (torch guards it)
    return event


#: Side streams no plane holds, per device index, idle: their last owner waited for them.
#: Streams made by :func:`side_streams` are never destroyed but kept here for the next
#: plane, so a process makes only as many as it once had planes open at the same time.
_SPARE: dict[int, list[torch.cuda.Stream]] = {}
_spare_lock = threading.Lock()


async def side_streams(device: torch.device, n: int) -> list[torch.cuda.Stream]:
    """``n`` CUDA streams of ``device`` for a plane's own copies, none made on the event
    loop: spare ones first, new ones in a worker thread through the driver (torch's first
    side stream of a process makes its stream pool with the GIL held: 2–8 ms of loop lag at
    every pipe's set-up on an H200 host, 2026-12-02). Give them back with
    :func:`recycle_streams` once idle."""
    index = device_index(device)
    with _spare_lock:
        spare = _SPARE.setdefault(index, [])
        taken = [spare.pop() for _ in range(min(n, len(spare)))]
    if len(taken) < n:
        from . import _cudaipc

        making = asyncio.ensure_future(
            asyncio.to_thread(_cudaipc.create_streams, index, n - len(taken)))
        try:
            handles = await asyncio.shield(making)
        except BaseException:
            recycle_streams(taken)
            # Cancelled (a connect timeout): what the thread still makes is kept, not lost.
            making.add_done_callback(functools.partial(_keep_made, index))
            raise
        taken += _wrap(index, handles)
    return taken


def _wrap(index: int, handles: Sequence[int]) -> list[torch.cuda.Stream]:
    dev = torch.device("cuda", index)
    return [torch.cuda.ExternalStream(h, device=dev) for h in handles]


def _keep_made(index: int, making: asyncio.Future[list[int]]) -> None:
    if not making.cancelled() and making.exception() is None:
        recycle_streams(_wrap(index, making.result()))


def recycle_streams(streams: Sequence[torch.cuda.Stream]) -> None:
    """Keep ``streams`` (from :func:`side_streams`, with nothing queued on them any more)
    for the next plane. Thread-safe: a plane's release thread calls it after synchronising.
    """
    with _spare_lock:
        for stream in streams:
            spare = _SPARE.setdefault(stream.device_index, [])
            if all(s.cuda_stream != stream.cuda_stream for s in spare):  # never twice
                spare.append(stream)


def recycle_when_idle(streams: Sequence[torch.cuda.Stream]) -> None:
    """:func:`recycle_streams` once the work queued on ``streams`` has ended, waited for in
    a daemon thread (never on the loop). A stream that cannot be synchronised (a broken
    context) is dropped."""
    if not streams:
        return

    def wait_then_recycle() -> None:
        try:
            for stream in streams:
                stream.synchronize()
        except Exception as exc:  # noqa: BLE001 -- dropped, as documented
            log.debug("side streams not recycled: %r", exc)
            return
        recycle_streams(streams)

    threading.Thread(target=wait_then_recycle, name="aiokvpipe-streams", daemon=True).start()


def device_index(device: torch.device) -> int:
    """The index of a CUDA device (``cuda`` alone: the current one)."""
    return torch.cuda.current_device() if device.index is None else device.index


def cuda_available() -> bool:
    return torch.cuda.is_available()


_uuids: dict[int, bytes] = {}


async def device_uuid_async(device: torch.device) -> bytes:
    """:func:`device_uuid`, computed once per device in a worker thread (the first call may
    initialise CUDA, which takes a while) and cached."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    uuid = _uuids.get(index)
    if uuid is None:
        uuid = await asyncio.to_thread(device_uuid, torch.device("cuda", index))
        _uuids[index] = uuid
    return uuid


def device_uuid(device: torch.device) -> bytes:
    """The 16-byte UUID of a CUDA device (what tells two processes they share a GPU)."""
    props: Any = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is None:
        return bytes(16)
    return bytes(uuid.bytes) if hasattr(uuid, "bytes") else bytes.fromhex(str(uuid)
                                                                          .replace("-", ""))


#: The GIL's switch interval while a worker thread runs Python-heavy set-up (importing CuPy:
#: hundreds of ms of module code): the loop's thread then waits at most this long for the GIL
#: each time it wakes, instead of the default 5 ms, which alone failed a 2 ms loop-lag target.
_SETUP_SWITCH_INTERVAL_S: Final = 0.0005
_short_turns = 0  # bodies of short_gil_turns() running now
_saved_interval = 0.005  # the interval before the first of them


@contextlib.contextmanager
def short_gil_turns() -> Iterator[None]:
    """Shorten the GIL's turns while the body awaits set-up work in a thread (nests)."""
    global _short_turns, _saved_interval
    if _short_turns == 0:
        _saved_interval = sys.getswitchinterval()
        sys.setswitchinterval(min(_saved_interval, _SETUP_SWITCH_INTERVAL_S))
    _short_turns += 1
    try:
        yield
    finally:
        _short_turns -= 1
        if _short_turns == 0:
            sys.setswitchinterval(_saved_interval)


async def normalize_device_async(device: str | torch.device) -> torch.device:
    """:func:`normalize_device` for the event loop: the first CUDA call of a process creates
    its CUDA context (100 ms and more on an H200 host), so that is done in a worker thread;
    later calls find it made."""
    dev = _parse_device(device)
    if dev.type == "cuda" and not torch.cuda.is_initialized():
        with short_gil_turns():
            await asyncio.to_thread(_init_cuda, dev.index)
    return normalize_device(device)


def _init_cuda(index: int | None) -> None:
    """Worker thread: make the device's context (GIL released), then torch's CUDA state."""
    from . import _cudaipc

    try:
        _cudaipc.retain_primary_context(0 if index is None else index)
    except (OSError, RuntimeError):
        pass  # no driver, or no such device: normalize_device says so, in torch's words
    if torch.cuda.is_available():
        torch.cuda.init()


def _parse_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be 'cpu' or a CUDA device, not {device!r}") from exc
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, not {device!r}")
    return dev


def normalize_device(device: str | torch.device) -> torch.device:
    """``"cuda"`` → the current CUDA device; validates that the device exists."""
    dev = _parse_device(device)
    if dev.type == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here")
    index = torch.cuda.current_device() if dev.index is None else dev.index
    if not 0 <= index < torch.cuda.device_count():
        raise ValueError(f"no CUDA device {index} (this machine has "
                         f"{torch.cuda.device_count()})")
    return torch.device("cuda", index)
