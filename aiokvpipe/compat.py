"""A synchronous face for the pipe: vLLM ``PyNcclPipe``'s method names, keys, and futures.

Code written for the seed's interface (``send_tensor`` / ``recv_tensor`` / ``close``) runs
unchanged. Engines whose step loop is synchronous (vLLM's connector methods are polled once per
engine step) submit keyed transfers without blocking (:meth:`SyncPipe.submit_send`,
:meth:`SyncPipe.submit_recv`) and collect the finished ones once per step
(:meth:`SyncPipe.poll`). The pipe itself runs on a private event loop in a background thread,
so a calling thread blocks only on its own call, never on another one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Coroutine, Generator
from typing import Any, Literal, TypeVar, cast

import torch

from ._blocks import BlockPool
from ._connect import open_pipe
from ._errors import PipeClosed
from ._message import Message
from ._pipe import Pipe

log = logging.getLogger("aiokvpipe")

T = TypeVar("T")

__all__ = ["BundleReceived", "SyncPipe", "PipeFuture"]


class BundleReceived(TypeError):
    """:meth:`SyncPipe.recv_tensor` received a list or dict (sent with ``send()``), not one
    tensor or ``None``. The message, taken off the pipe, is :attr:`message`: use
    :meth:`SyncPipe.recv` where the peer sends bundles."""

    def __init__(self, message: Message) -> None:
        super().__init__(f"recv_tensor received a {type(message).__name__}; use recv() for "
                         "bundles (the message is this error's .message)")
        self.message = message


class PipeFuture(concurrent.futures.Future[T]):
    """The future of one submitted ``send`` or ``recv``: a :class:`concurrent.futures.Future`
    that knows its ``key`` and ``op`` (``"send"`` or ``"recv"``).

    :meth:`cancel` cancels the transfer on the pipe's loop with the pipe's guarantees: a
    cancelled receive takes nothing (the message goes to the next matching receive), a
    cancelled send sends nothing or the whole message. It returns ``False`` when the transfer
    already completed, in which case the result stands and must be collected: a message is
    never both cancelled and taken. ``cancel()`` from another thread waits (microseconds) for
    the loop thread to decide.
    """

    def __init__(self, owner: SyncPipe, op: Literal["send", "recv"], key: str | None) -> None:
        super().__init__()
        self.op: Literal["send", "recv"] = op
        self.key = key
        self._owner = owner
        #: the loop task running the transfer; set on the loop thread only
        self._task: asyncio.Task[Any] | None = None

    def cancel(self) -> bool:
        return self._owner._cancel(self)

    def _force_cancel(self) -> bool:
        # concurrent.futures' own cancel: a state change, nothing more
        if not super().cancel():
            return False
        # Then what an executor does for a future cancelled before it ran: tell the
        # concurrent.futures.wait() and as_completed() calls waiting on it, which cancel()
        # alone does not wake (they waited out their timeout).
        self.set_running_or_notify_cancel()
        return True

    def __repr__(self) -> str:
        state = ("cancelled" if self.cancelled() else "finished" if self.done()
                 else "pending")
        return f"<PipeFuture {self.op} key={self.key!r} {state}>"


class SyncPipe:
    """``SyncPipe(host, port, rank, **opts)``: rank 0 listens, rank 1 connects.

    ``opts`` are those of :func:`aiokvpipe.open_pipe` (``device``, ``transport``, ``token``,
    …), plus ``timeout``: seconds any one blocking call may block by default (``None``: no
    limit; a call that times out raises :class:`TimeoutError` and the underlying
    ``send``/``recv`` is cancelled with the usual guarantees: nothing lost, nothing half-sent).

    Unlike ``PyNcclPipe.send_tensor``, which returns before the tensor was sent,
    :meth:`send_tensor` returns once the tensor has left this process, so it may be reused at
    once. CUDA tensors are ordered after the work the calling thread queued on its current
    stream, as with the asyncio API.

    Every method is thread-safe: many threads may call and submit at once. Submissions from
    one thread are sent in submission order.

    The pipe runs on an event loop of its own, in a thread of its own: uvloop's where uvloop
    is installed (the extra ``uvloop``), else asyncio's.

    Call :meth:`close` (or use ``with``). One garbage-collected unclosed closes its pipe
    gracefully in the background, with a :class:`ResourceWarning`; a submitted future still
    pending keeps it alive.
    """

    def __init__(self, host: str, port: int, rank: int, *, timeout: float | None = None,
                 **opts: Any) -> None:
        self._timeout = timeout
        self._lock = threading.Lock()  # guards the three fields below
        self._closed = False
        #: a close() called on the loop thread, running there
        self._closing: asyncio.Task[None] | None = None
        self._pending: set[PipeFuture[Any]] = set()  # submitted, not done
        self._finished: list[PipeFuture[Any]] = []  # done, not yet returned by poll()
        self._close_lock = threading.Lock()
        self._loop = _new_loop()
        self._thread = threading.Thread(target=_run_loop, args=(self._loop,), daemon=True,
                                        name=f"aiokvpipe-sync-{rank}")
        self._thread.start()
        try:
            self._pipe: Pipe = self._call(open_pipe(host, port, rank, **opts), timeout)
        except BaseException:
            self._stop_loop()  # (cancels the opening first: no port left listening)
            raise
        # Dropped without close(), the loop thread would hold the pipe open for ever. (Not
        # at exit: the process's end closes its connections, and waiting for each peer's
        # half of a close there would hold the exit up.) Pending futures keep us alive.
        self._finalizer = weakref.finalize(self, _close_abandoned, self._loop, self._pipe)
        self._finalizer.atexit = False

    @property
    def pipe(self) -> Pipe:
        """The underlying asyncio pipe (use it only from coroutines run on its loop)."""
        return self._pipe

    # -- PyNcclPipe's interface ---------------------------------------------------------------

    def send_tensor(self, tensor: torch.Tensor | None) -> None:
        """Send one tensor (or ``None``); blocks until it has left this process."""
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"send_tensor takes a Tensor or None, not {type(tensor).__name__}")
        self.send(tensor)

    def recv_tensor(self) -> torch.Tensor | None:
        """Receive the next unkeyed message; blocks until it is here.

        A message that is not one tensor or ``None`` (a list or dict the peer sent with
        ``send()``) raises :class:`BundleReceived`, a ``TypeError`` that holds it
        (``.message``): it is taken off the pipe, never lost.
        """
        msg = self.recv()
        if msg is not None and not isinstance(msg, torch.Tensor):
            raise BundleReceived(msg)
        return msg

    def close(self) -> None:
        """Close the pipe gracefully (everything sent is delivered) and stop the loop thread.

        Sends already on the wire complete; every other pending future fails with
        :class:`~aiokvpipe.PipeClosed` (:class:`~aiokvpipe.BrokenPipe` if the pipe broke);
        submitting afterwards raises :class:`~aiokvpipe.PipeClosed`. Idempotent.

        Called on the pipe's own loop thread (in a future's done callback, say), it cannot
        wait there for itself: the close is then started and runs once the callback returns.
        """
        if threading.get_ident() == self._thread.ident:
            self._close_from_loop()
            return
        with self._close_lock:
            self._finalizer.detach()
            if self._loop.is_closed():
                return
            with self._lock:  # (decided under the lock _close_from_loop takes)
                on_loop = self._closing is not None
                self._closed = True
            if on_loop:  # started there: it ends the loop thread when done
                self._thread.join()
                return
            try:
                self._call(self._pipe.aclose(), None)
            finally:
                try:
                    self._call(self._fail_pending(), None)
                finally:
                    self._stop_loop()

    def _close_from_loop(self) -> None:
        # Not under _close_lock: another thread's close() may hold it, waiting for this
        # very thread.
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # (Held here: the loop keeps its tasks weakly.)
            self._closing = self._loop.create_task(_shut_down(
                self._loop, self._pipe, "from its loop thread", then=self._fail_pending))
        self._finalizer.detach()

    def __enter__(self) -> SyncPipe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- any message, with keys: blocking -----------------------------------------------------

    def send(self, msg: Message, key: str | None = None, timeout: float | None = None) -> None:
        """Send ``msg`` (a Tensor, ``None``, a list or a dict of str → Tensor) with ``key``.

        Blocks until the payload has left this process (the tensors may be reused then).
        ``timeout``: seconds, ``None`` for this SyncPipe's default, ``math.inf`` for none; on
        :class:`TimeoutError` the send is cancelled: it sent nothing or the whole message.
        Raises what :meth:`aiokvpipe.Pipe.send` raises.
        """
        self._wait(self._submit("send", key, functools.partial(self._pipe.send, msg, key),
                                collect=False), timeout)

    def recv(self, key: str | None = None, timeout: float | None = None) -> Message:
        """Receive the next message sent with ``key`` (``None``: the next unkeyed one).

        ``timeout`` as for :meth:`send`; on :class:`TimeoutError` nothing was taken: the
        message goes to the next matching receive. Raises what :meth:`aiokvpipe.Pipe.recv`
        raises.
        """
        result: Message = self._wait(
            self._submit("recv", key, functools.partial(self._pipe.recv, key), collect=False),
            timeout)
        return result

    # -- any message, with keys: non-blocking -------------------------------------------------

    def submit_send(self, msg: Message, key: str | None = None) -> PipeFuture[None]:
        """Start sending ``msg`` with ``key``; returns at once.

        The future completes when the payload has left this process (do not overwrite the
        tensors before that), or fails with what :meth:`aiokvpipe.Pipe.send` raises. It is
        returned by :meth:`poll` once done. Raises :class:`~aiokvpipe.PipeClosed` once
        :meth:`close` was called.
        """
        return self._submit("send", key, functools.partial(self._pipe.send, msg, key),
                            collect=True)

    def submit_recv(self, key: str | None = None) -> PipeFuture[Message]:
        """Start receiving the next message sent with ``key``; returns at once.

        The future's result is the message, or it fails with what :meth:`aiokvpipe.Pipe.recv`
        raises. It is returned by :meth:`poll` once done. Raises
        :class:`~aiokvpipe.PipeClosed` once :meth:`close` was called.
        """
        return self._submit("recv", key, functools.partial(self._pipe.recv, key),
                            collect=True)

    # -- paged KV blocks -----------------------------------------------------------------------

    def send_blocks(self, pool: BlockPool, block_ids: object, key: str | None = None,
                    layers: object = None, timeout: float | None = None) -> None:
        """:meth:`aiokvpipe.Pipe.send_blocks`, blocking; ``timeout`` as for :meth:`send`."""
        self._wait(self.submit_send_blocks(pool, block_ids, key, layers, _collect=False),
                   timeout)

    def recv_blocks(self, pool: BlockPool, block_ids: object, key: str | None = None,
                    layers: object = None, timeout: float | None = None) -> None:
        """:meth:`aiokvpipe.Pipe.recv_blocks`, blocking; ``timeout`` as for :meth:`recv`."""
        self._wait(self.submit_recv_blocks(pool, block_ids, key, layers, _collect=False),
                   timeout)

    def submit_send_blocks(self, pool: BlockPool, block_ids: object, key: str | None = None,
                           layers: object = None, *, _collect: bool = True
                           ) -> PipeFuture[None]:
        """Start :meth:`aiokvpipe.Pipe.send_blocks`; returns at once. The future completes
        when the blocks may be overwritten; it is returned by :meth:`poll` once done. CUDA
        pools: the blocks are read after the work queued on the calling thread's current
        stream now."""
        return self._submit("send", key, functools.partial(self._pipe.send_blocks, pool,
                                                           block_ids, key, layers),
                            collect=_collect)

    def submit_recv_blocks(self, pool: BlockPool, block_ids: object, key: str | None = None,
                           layers: object = None, *, _collect: bool = True
                           ) -> PipeFuture[None]:
        """Start :meth:`aiokvpipe.Pipe.recv_blocks`; returns at once. The future completes
        when the named blocks hold the data (safe on the calling thread's current stream);
        it is returned by :meth:`poll` once done."""
        return self._submit("recv", key, functools.partial(self._pipe.recv_blocks, pool,
                                                           block_ids, key, layers),
                            collect=_collect)

    def poll(self) -> list[PipeFuture[Any]]:
        """The submitted futures that finished since the last ``poll()``, in the order they
        finished (result, error or cancelled alike); never blocks.

        Made for an engine's step loop: call it once per step. Each future submitted with
        :meth:`submit_send`/:meth:`submit_recv` is returned exactly once; until then this
        SyncPipe keeps it (and, for a receive, its message).
        """
        with self._lock:
            finished, self._finished = self._finished, []
        return finished

    # -- the bridge to the loop thread --------------------------------------------------------

    def _submit(self, op: Literal["send", "recv"], key: str | None,
                start: Callable[[], Coroutine[Any, Any, T]], *,
                collect: bool) -> PipeFuture[T]:
        fut: PipeFuture[T] = PipeFuture(self, op, key)
        stream = _callers_stream()
        with self._lock:
            if self._closed:
                raise PipeClosed("pipe closed")
            self._pending.add(fut)
            # Under the lock: close() cannot slip between the check and the hand-over, so a
            # submission it did not refuse reaches the loop before its aclose() does.
            self._loop.call_soon_threadsafe(self._start, fut, start, stream)
        fut.add_done_callback(functools.partial(self._on_done, collect=collect))
        return fut

    def _start(self, fut: PipeFuture[T], start: Callable[[], Coroutine[Any, Any, T]],
               stream: torch.cuda.Stream | None) -> None:
        """On the loop: run the transfer as a task, unless cancelled before it began."""
        if fut.done():
            return
        task = self._loop.create_task(_transfer(fut, start, stream))
        fut._task = task
        task.add_done_callback(functools.partial(_cancel_if_abandoned, fut))

    def _cancel(self, fut: PipeFuture[Any]) -> bool:
        """PipeFuture.cancel(): decided on the loop thread, where the transfer runs."""
        if fut.done():
            return fut.cancelled()
        if self._thread.ident == threading.get_ident():
            return self._cancel_on_loop(fut)
        decided = threading.Event()
        outcome: list[bool] = []

        def decide() -> None:
            outcome.append(self._cancel_on_loop(fut))
            decided.set()

        try:
            self._loop.call_soon_threadsafe(decide)
        except RuntimeError:  # the loop is closed: close() already failed every future
            return fut._force_cancel()
        while not decided.wait(0.05):
            if not self._thread.is_alive():  # stopped before it got to the request
                return fut._force_cancel()
        return outcome[0]

    def _cancel_on_loop(self, fut: PipeFuture[Any]) -> bool:
        if fut.done():
            return fut.cancelled()
        # Not done, so the transfer has not completed: _transfer() hands the outcome over in
        # the very step that completes it, and this runs on the same thread.
        task = fut._task
        if task is not None:
            # Its next step raises CancelledError instead of completing: Pipe.recv() then
            # hands the message on to the next matching recv(), Pipe.send() sends nothing or
            # the whole message.
            task.cancel()
        return fut._force_cancel()

    def _on_done(self, fut: concurrent.futures.Future[Any], *, collect: bool) -> None:
        done = cast(PipeFuture[Any], fut)  # _submit adds this callback to PipeFutures only
        with self._lock:
            self._pending.discard(done)
            if collect:
                self._finished.append(done)

    async def _fail_pending(self) -> None:
        # After aclose(): whatever is still pending (it should be nothing) fails, never hangs.
        with self._lock:
            pending = list(self._pending)
        for fut in pending:
            if fut._task is not None:
                fut._task.cancel()
            if not fut.done():
                fut.set_exception(PipeClosed("pipe closed"))

    def _refuse_on_loop(self, undo: Callable[[], object]) -> None:
        """A blocking call on the pipe's own loop thread (from a callback a PipeFuture ran
        there, say) would wait for that very thread, for ever: ``undo`` what it started
        (nothing has moved yet) and raise RuntimeError."""
        if threading.get_ident() == self._thread.ident:
            undo()
            raise RuntimeError("a blocking SyncPipe call on the pipe's own loop thread (a "
                               "PipeFuture's done callback runs there) would wait for ever: "
                               "use the submit_* forms there")

    def _wait(self, fut: PipeFuture[T], timeout: float | None) -> T:
        self._refuse_on_loop(fut.cancel)
        if timeout is None:
            timeout = self._timeout
        if timeout is not None and math.isinf(timeout):
            timeout = None
        try:
            return fut.result(timeout)
        except TimeoutError:
            if fut.cancel():
                raise
            return fut.result()  # it completed meanwhile: its outcome, not a lost message
        except BaseException:
            fut.cancel()  # interrupted (KeyboardInterrupt): leave nothing running behind
            raise

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        self._refuse_on_loop(coro.close)
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        # What still runs on the loop (an open_pipe() cut short by a timeout or Ctrl-C, with
        # its listening socket) is cancelled and let finish first: a loop stopped under it
        # left the port listening until garbage collection.
        try:
            asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(10)
        except BaseException as exc:  # a wedged loop thread: stop it all the same
            log.debug("SyncPipe: cancelling what ran on its loop: %r", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()  # (which closes the loop: _run_loop)


def _new_loop() -> asyncio.AbstractEventLoop:
    """The background loop: uvloop's if installed (the speed-up DESIGN.md promises wherever
    it is present; the asyncio API leaves the choice to the caller's own loop)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    try:
        loop.run_forever()
    finally:
        loop.close()


def _close_abandoned(loop: asyncio.AbstractEventLoop, pipe: Pipe) -> None:
    """A SyncPipe garbage-collected without close(): close its pipe gracefully (within its
    close_timeout) on its loop, which then stops, ending its thread. Returns at once: the
    collection may run on any thread, a loop's included, and must not wait there."""
    try:
        asyncio.run_coroutine_threadsafe(_shut_down(loop, pipe, "an abandoned pipe"), loop)
    except RuntimeError:  # its loop closed already
        return
    # Last: a warning turned into an error must not stop the close.
    with contextlib.suppress(Exception):
        warnings.warn(f"SyncPipe over {pipe!r} was never closed", ResourceWarning, stacklevel=2)


async def _shut_down(loop: asyncio.AbstractEventLoop, pipe: Pipe, what: str,
                     then: Callable[[], Coroutine[Any, Any, None]] | None = None) -> None:
    """On ``loop``: close ``pipe`` gracefully, ``then()``, cancel what still runs there, and
    stop the loop (its thread then closes it and ends: _run_loop)."""
    try:
        await pipe.aclose()
    except Exception as exc:  # broken already, say: nothing more to close
        log.debug("SyncPipe: closing %s: %r", what, exc)
    finally:
        if then is not None:
            await then()
        await _cancel_all()
        loop.stop()


async def _cancel_all() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=5)


async def _transfer(fut: PipeFuture[T], start: Callable[[], Coroutine[Any, Any, T]],
                    stream: torch.cuda.Stream | None) -> None:
    """Run one submitted transfer on the loop and hand its outcome to ``fut``.

    The outcome is set in the same step that completes the transfer, so there is no moment
    at which a message has been taken but ``fut`` could still be cancelled.
    """
    try:
        result = await (start() if stream is None else _OnStream(start(), stream))
    except asyncio.CancelledError:
        fut._force_cancel()
        raise
    except Exception as exc:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class _OnStream:
    """Awaits ``coro`` with ``stream`` current during each of its steps, and only then. CUDA's
    current stream is the thread's, and the loop thread runs many transfers at once: held
    across an await, one transfer's stream was current in the others' steps (a send read
    its tensors after the wrong stream's work, a received tensor was kept for the wrong
    stream), and the last left it current for good."""

    __slots__ = ("_coro", "_stream")

    def __init__(self, coro: Coroutine[Any, Any, T], stream: torch.cuda.Stream) -> None:
        self._coro = coro
        self._stream = stream

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self._coro
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                with torch.cuda.stream(self._stream):
                    step = coro.send(value) if error is None else coro.throw(error)
            except StopIteration as done:
                return done.value
            try:
                value, error = (yield step), None
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # (a cancellation thrown in: passed on)
                value, error = None, exc


def _cancel_if_abandoned(fut: PipeFuture[Any], task: asyncio.Task[None]) -> None:
    # A task cancelled before its first step never ran _transfer()'s handlers.
    if not fut.done():
        fut._force_cancel()


def _callers_stream() -> torch.cuda.Stream | None:
    # CUDA's current stream is per thread: carry the caller's over to the loop thread, so
    # send() waits for the caller's kernels and recv() hands memory to its stream.
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.current_stream()
