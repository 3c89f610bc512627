"""A synchronous adapter with vLLM ``PyNcclPipe``'s method names.

Code written for the seed's interface (``send_tensor`` / ``recv_tensor`` / ``close``) runs
unchanged; the pipe itself runs on a private event loop in a background thread, so the calling
thread blocks only on its own call, never on another one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

import torch

from ._connect import open_pipe
from ._pipe import Pipe

T = TypeVar("T")

__all__ = ["SyncPipe"]


class SyncPipe:
    """``SyncPipe(host, port, rank, **opts)``: rank 0 listens, rank 1 connects.

    ``opts`` are those of :func:`aiokvpipe.open_pipe` (``device``, ``transport``, ``token``,
    …), plus ``timeout``: seconds any one call may block (``None``: no limit; a call that
    times out raises :class:`TimeoutError` and the underlying ``send``/``recv`` is cancelled
    with the usual guarantees: nothing lost, nothing half-sent).

    Unlike ``PyNcclPipe.send_tensor``, which returns before the tensor was sent,
    :meth:`send_tensor` returns once the tensor has left this process, so it may be reused at
    once. CUDA tensors are ordered after the work the calling thread queued on its current
    stream, as with the asyncio API.
    """

    def __init__(self, host: str, port: int, rank: int, *, timeout: float | None = None,
                 **opts: Any) -> None:
        self._timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"aiokvpipe-sync-{rank}")
        self._thread.start()
        try:
            self._pipe: Pipe = self._call(open_pipe(host, port, rank, **opts), None)
        except BaseException:
            self._stop_loop()
            raise

    @property
    def pipe(self) -> Pipe:
        """The underlying asyncio pipe (use it only from coroutines run on its loop)."""
        return self._pipe

    def send_tensor(self, tensor: torch.Tensor | None) -> None:
        """Send one tensor (or ``None``); blocks until it has left this process."""
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise TypeError(f"send_tensor takes a Tensor or None, not {type(tensor).__name__}")
        self._call(self._on_callers_stream(self._pipe.send(tensor)), self._timeout)

    def recv_tensor(self) -> torch.Tensor | None:
        """Receive the next unkeyed message; blocks until it is here."""
        msg = self._call(self._on_callers_stream(self._pipe.recv()), self._timeout)
        if msg is not None and not isinstance(msg, torch.Tensor):
            raise TypeError(f"recv_tensor received a {type(msg).__name__}; use the asyncio "
                            "API for bundles")
        return msg

    def close(self) -> None:
        """Close the pipe gracefully (everything sent is delivered) and stop the loop thread."""
        if not self._loop.is_closed():
            try:
                self._call(self._pipe.aclose(), None)
            finally:
                self._stop_loop()

    def __enter__(self) -> SyncPipe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _on_callers_stream(self, coro: Coroutine[Any, Any, T]) -> Coroutine[Any, Any, T]:
        # CUDA's current stream is per thread: carry the caller's over to the loop thread,
        # so send() waits for the caller's kernels and recv() hands memory to its stream.
        if not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return coro
        stream = torch.cuda.current_stream()

        async def run() -> T:
            with torch.cuda.stream(stream):
                return await coro

        return run()

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
