"""Busy polling: keep the event loop polling, not sleeping, while a pipe awaits an answer.

An event loop with nothing to do blocks in ``epoll_wait``, and its core goes idle. The next
message then meets a cold core: woken from its idle state, caches and branch predictors
emptied by whatever ran there meanwhile. Measured on the 2-core VM (2026-12-04), the work from
a 4 KiB message's arrival to its answer's write took 60-71 µs on a cold core and 20-30 µs on a
polling one; a request/response pair pays it at both ends, every time. So after a write the
loop keeps polling (a callback that schedules itself, so the loop polls its sockets without
blocking, between other callbacks, never holding the loop) until the next read or the end of
a window, and an answer arriving meanwhile meets a warm core.

It polls only while an answer is due: from a write that awaits one (a message, a block
transfer's frame; not a credit return, a heartbeat or an acknowledgement) until the next
read, and only after such a write that follows a read. Polling in a stream of messages was
measured to cost throughput (4 KiB messages streamed at 0.8 × the speed, 2026-12-04): a
loop that sleeps wakes to a batch of messages in one read, a polling one reads them one at
a time, and a polling sender slows its receiver if the two share a physical core.

The window adapts much as Linux's haltpoll governor does, judged by how long after the first
write since the last read the next read came, so that idle pipes and one-way traffic cost no
CPU: caught within the window, it stays; answers a longer window would have caught grow it to
cover such gaps (up to the most, the ``busy_poll_us`` option); longer gaps, or writes that
find the window run out with nothing read, halve it, down to nothing; both at the second in a
row. Polling then costs at most the window per write, and nothing once answers take longer
than the most.

One poller serves all the pipes of a loop (the loop polls once per iteration, for them all):
their traffic together judges one window, and any read ends the polling.
"""

from __future__ import annotations

import asyncio
import weakref
from time import monotonic
from typing import Final

#: A window grown from nothing starts here; one halved below it stops polling.
MIN_WINDOW_S: Final = 10e-6


class SpinPolicy:
    """How long to poll after a write (sans-I/O: the times are given)."""

    __slots__ = ("most_s", "window_s", "_last_write", "_misses", "_lates")

    def __init__(self, most_s: float) -> None:
        self.most_s = most_s
        self.window_s = most_s
        #: When we first wrote since the last read (or since the window after that write
        #: ran out): the write a read would answer; a stream's later writes are not what a
        #: read of the peer's credit answers.
        self._last_write: float | None = None
        #: Windows in a row that polled for nothing, and answers in a row that came after
        #: the window but within the most (see read()).
        self._misses = 0
        self._lates = 0

    def read(self, now: float) -> None:
        """Bytes arrived at ``now``: judge the window after our last write by them."""
        wrote = self._last_write
        if wrote is None:
            return  # no write awaits an answer (more of a read, or the peer's own traffic)
        self._last_write = None
        gap = now - wrote
        if gap <= self.window_s:
            self._misses = self._lates = 0  # caught
        elif gap <= self.most_s:
            # A longer window would have caught it: at the second such answer in a row, grow
            # to cover such gaps at once.
            self._misses = 0
            self._lates += 1
            if self._lates >= 2:
                self._lates = 0
                self.window_s = min(self.most_s,
                                    max(2 * self.window_s, 1.5 * gap, MIN_WINDOW_S))
        else:
            self._missed()

    def wrote(self, now: float) -> float:
        """We wrote at ``now``; returns the window to poll for: none after a write that no
        read answered (a stream: the next write comes sooner than any answer, and a loop
        polling beside a busy peer slows it, on a core's other hyperthread, say)."""
        wrote = self._last_write
        if wrote is None:
            self._last_write = now
            return self.window_s
        if now - wrote > self.window_s and (self.window_s or self._lates):
            # The window after the first unanswered write ran out with nothing read. (With
            # no window and no late answer counted, a miss would change nothing.) The next
            # window is judged from this write: one run-out is one miss, not one a write.
            self._missed()
            self._last_write = now
        return 0.0

    @property
    def awaiting(self) -> bool:
        """A write of ours awaits an answer: a read now has something to judge."""
        return self._last_write is not None

    @property
    def streaming(self) -> bool:
        """A write now would change nothing: one before it awaits an answer still, with no
        window and no late answer counted (a stream's every write after the first)."""
        return self._last_write is not None and not self.window_s and not self._lates

    def _missed(self) -> None:
        # Both ways only at the second in a row: one late answer (a peer's garbage
        # collection, a VM's vCPU descheduled), or one prompt answer among slow ones, says
        # little about the next. Polling for answers that come too late is worse than
        # wasted: on a core's other hyperthread it slows the peer that is answering.
        self._lates = 0
        self._misses += 1
        if self._misses >= 2:
            self._misses = 0
            half = self.window_s / 2
            self.window_s = half if half >= MIN_WINDOW_S else 0.0


class BusyPoller:
    """Keeps one event loop polling from each write that awaits an answer until the next
    read, for at most :class:`SpinPolicy`'s window.

    Get it with :func:`poller_for`; the control channel calls :meth:`read` and
    :meth:`wrote`. It holds no reference to its loop (a scheduled poll does, while it
    waits): the registry below forgets a loop once nothing else holds it.
    """

    __slots__ = ("policy", "_deadline", "polling", "__weakref__")

    def __init__(self, most_s: float) -> None:
        self.policy = SpinPolicy(most_s)
        self._deadline = 0.0
        #: A poll callback is scheduled (the loop will not block before it runs).
        self.polling = False

    def read(self) -> None:
        if not self.polling and not self.policy.awaiting:
            return  # nothing to judge, no polling to end (a stream's receiver)
        now = monotonic()
        self.policy.read(now)
        self._deadline = now  # the answer came: polling ends at its next turn

    def wrote(self, loop: asyncio.AbstractEventLoop) -> None:
        """We wrote something the peer answers (a message, a block transfer's frame)."""
        if not self.polling and self.policy.streaming:
            return  # nothing to judge or poll: not even the clock is read
        now = monotonic()
        window = self.policy.wrote(now)
        self._deadline = now + window
        if window and not self.polling:
            self.polling = True
            loop.call_soon(self._poll, loop)

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        # Scheduling itself keeps a callback ready, so the loop polls its sockets with a zero
        # timeout and comes back here, other callbacks running in between.
        if monotonic() < self._deadline:
            loop.call_soon(self._poll, loop)
        else:
            self.polling = False


_POLLERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, BusyPoller] = (
    weakref.WeakKeyDictionary())


def poller_for(loop: asyncio.AbstractEventLoop, most_s: float) -> BusyPoller | None:
    """The loop's poller, its most window raised to ``most_s`` if that is more (the pipes of a
    loop share one, and it keeps the longest most any of them asked for); ``None`` when
    ``most_s`` is 0: this pipe does not poll."""
    if most_s <= 0:
        return None
    poller = _POLLERS.get(loop)
    if poller is None:
        poller = _POLLERS[loop] = BusyPoller(most_s)
    elif most_s > poller.policy.most_s:
        poller.policy.most_s = most_s
    return poller
