"""A semaphore whose units are bytes: the pipe's backpressure."""

from __future__ import annotations

import asyncio
from collections import deque

from ._errors import fresh


class ByteBudget:
    """Admit byte counts against a fixed capacity, first come first served.

    * ``acquire(n)`` waits until ``n`` bytes are free **and** every earlier waiter has been
      served: a large waiter is never starved by a stream of small ones.
    * A request larger than the whole capacity is admitted alone, once nothing else is held,
      so an oversize message passes instead of deadlocking.
    * Cancelling a waiting ``acquire`` takes nothing; if the grant had already been made, it is
      given back and passed on to the next waiter (as ``asyncio.Semaphore`` does).
    * ``abort(exc)`` makes every waiting and later ``acquire`` raise ``exc``.
    """

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self._capacity = capacity
        self._in_use = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._error: BaseException | None = None

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        """How many ``acquire`` calls are queued."""
        return len(self._waiters)

    def _fits(self, n: int) -> bool:
        return self._in_use + n <= self._capacity or self._in_use == 0

    def try_acquire(self, n: int) -> bool:
        """Take ``n`` bytes now if :meth:`acquire` would not wait; False (taking nothing)
        otherwise, or once aborted."""
        if self._error is None and not self._waiters and self._fits(n):
            self._in_use += n
            return True
        return False

    async def acquire(self, n: int) -> None:
        """Take ``n`` bytes, waiting in FIFO order. See the class docstring for cancellation."""
        if n < 0:
            raise ValueError(f"cannot acquire a negative byte count ({n})")
        if self._error is not None:
            raise fresh(self._error)
        if not self._waiters and self._fits(n):  # no future to make when nobody waits
            self._in_use += n
            return
        fut = self.request(n)
        try:
            await fut
        except asyncio.CancelledError:
            self.withdraw(n, fut)
            raise

    def request(self, n: int) -> asyncio.Future[None]:
        """Take ``n`` bytes in FIFO order, without awaiting: a future done once they are
        taken (at once when :meth:`acquire` would not wait), failed once aborted. Give up
        with :meth:`withdraw`, which returns the bytes if they were taken meanwhile."""
        if n < 0:
            raise ValueError(f"cannot acquire a negative byte count ({n})")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._error is not None:
            fut.set_exception(fresh(self._error))
        elif not self._waiters and self._fits(n):
            self._in_use += n
            fut.set_result(None)
        else:
            self._waiters.append((n, fut))
        return fut

    def withdraw(self, n: int, fut: asyncio.Future[None]) -> None:
        """Give up a :meth:`request` of ``n`` bytes: bytes granted go back (to the next
        waiter); a pending request leaves the queue, which may let those behind it in."""
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            self.release(n)  # granted, not used
            return
        fut.cancel()
        try:
            self._waiters.remove((n, fut))
        except ValueError:
            pass
        self._wake()

    def release(self, n: int) -> None:
        """Give back ``n`` bytes taken by :meth:`acquire`."""
        if n < 0 or n > self._in_use:
            raise ValueError(f"releasing {n} bytes but only {self._in_use} are held")
        self._in_use -= n
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        while self._waiters:
            n, fut = self._waiters[0]
            if fut.done():  # cancelled while queued; its acquire() removes nothing twice
                self._waiters.popleft()
                continue
            if not self._fits(n):
                return
            self._waiters.popleft()
            self._in_use += n
            fut.set_result(None)

    def abort(self, exc: BaseException) -> None:
        """Fail every waiting and every future :meth:`acquire` with ``exc``."""
        self._error = exc
        while self._waiters:
            _, fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(fresh(exc))
