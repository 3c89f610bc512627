"""Failures inside the data planes end in a typed error, promptly, never a hang (CPU).

A plane's internal tasks (the tcp send loop, CUDA event pollers, staging copies) and its
receive-buffer allocations can fail for local reasons. Each failure must break the pipe with
that cause, and a local failure must be reported as what it is, not as the peer's fault.
Failures are injected at the narrowest seam (one method of one plane instance) of real pipes
over real sockets.
"""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time

import pipe_peer
import pytest
import torch
from conftest import PairFactory, discard, eventually

import aiokvpipe
from aiokvpipe._cuda import EventPoller
from aiokvpipe._plane import OrderedWorker
from aiokvpipe._tcp_plane import TcpPlane

Pair = tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]
MiB = 1 << 20

pytestmark = pytest.mark.timeout(60)


async def test_a_failure_in_the_tcp_send_loop_breaks_the_pipe_with_its_cause(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RuntimeError while preparing a payload (a pinned allocation, a CUDA copy) must not
    end the send loop silently: the pending send raises BrokenPipe with that cause."""
    a, b = await pair_factory()
    boom = RuntimeError("pinned allocation failed (injected)")
    plane = a._plane
    real = plane._payload_bytes

    async def fail_once(*args: object) -> object:
        monkeypatch.setattr(plane, "_payload_bytes", real)
        raise boom

    monkeypatch.setattr(plane, "_payload_bytes", fail_once)
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        async with asyncio.timeout(5):  # a hang is the bug
            await a.send(pipe_peer.seq_tensor(1, MiB))
    assert info.value.__cause__ is boom
    with pytest.raises(aiokvpipe.BrokenPipe):  # later sends fail too, at once
        async with asyncio.timeout(5):
            await a.send(pipe_peer.seq_tensor(2, MiB))


async def test_a_receive_allocation_failure_is_a_local_error_not_a_protocol_error(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await pair_factory()
    boom = MemoryError("no memory for the payload (injected)")

    def fail(*args: object) -> object:
        raise boom

    monkeypatch.setattr(b._plane, "_allocate", fail)
    waiting = asyncio.create_task(b.recv())
    try:
        await a.send(pipe_peer.seq_tensor(1, MiB))
    except aiokvpipe.BrokenPipe:
        pass  # b may already have broken the pipe
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        async with asyncio.timeout(5):
            await waiting
    cause = info.value.__cause__
    assert cause is boom, f"expected the MemoryError itself, got {cause!r}"
    assert not isinstance(cause, aiokvpipe.ProtocolError)


# -- the CUDA event poller, with a fake event (no GPU needed) ----------------------------------


class _Event:
    def __init__(self, fires_after: int | None = None, error: BaseException | None = None
                 ) -> None:
        self.polls = 0
        self.fires_after = fires_after
        self.error = error

    def query(self) -> bool:
        self.polls += 1
        if self.error is not None:
            raise self.error
        return self.fires_after is not None and self.polls > self.fires_after


async def test_event_poller_fails_every_pending_future_and_reports_when_query_raises() -> None:
    errors: list[BaseException] = []
    poller = EventPoller(on_error=errors.append)
    cuda_error = RuntimeError("CUDA error: an illegal memory access was encountered")
    first = poller.watch(_Event(fires_after=2))
    broken = poller.watch(_Event(error=cuda_error))
    behind = poller.watch(_Event(fires_after=None))  # would never fire
    assert await asyncio.wait_for(first, 5) is None
    for fut in (broken, behind):
        with pytest.raises(RuntimeError, match="illegal memory access"):
            await asyncio.wait_for(fut, 5)
    assert errors == [cuda_error]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        await poller.watch(_Event(fires_after=0))  # later watches fail at once
    poller.abort(RuntimeError("aborted"))


async def test_event_poller_without_a_callback_still_fails_its_futures() -> None:
    poller = EventPoller()
    fut = poller.watch(_Event(error=RuntimeError("query failed")))
    with pytest.raises(RuntimeError, match="query failed"):
        await asyncio.wait_for(fut, 5)


async def test_event_poller_calls_then_from_the_poll_before_any_done_callback() -> None:
    """``then`` runs as the poll sees the event fire, a loop iteration before the future's
    done callbacks (which asyncio schedules): that iteration is on every CUDA receive's
    path. Exactly once, with the future it completed."""
    poller = EventPoller()
    order: list[str] = []
    def then(f: asyncio.Future[None]) -> None:
        # Run inside the poll itself: not scheduled as a done callback (an iteration later).
        in_poll = poller._in_poll
        order.append(f"then done={f.done()} in_poll={in_poll}")

    fut = poller.watch(_Event(fires_after=1), then=then)
    fut.add_done_callback(lambda f: order.append("callback"))
    await asyncio.wait_for(fut, 5)
    await asyncio.sleep(0)  # let the scheduled done callback run
    assert order == ["then done=True in_poll=True", "callback"]


async def test_event_poller_after_pass_answers_a_polls_completions_together_at_its_end(
        ) -> None:
    """``after_pass`` runs once per poll that completed events, after all their ``then``
    callbacks and inside that poll (the ipc plane acknowledges every copy the poll saw done
    at once: deferred to the next loop iteration, the acknowledgement waited behind the
    headers read meanwhile while the sender idled). A poll that completes nothing, or fails,
    does not call it."""
    order: list[str] = []
    poller = EventPoller(after_pass=lambda: order.append("after"))
    events = [_Event(fires_after=0), _Event(fires_after=0), _Event(fires_after=2)]
    futs = [poller.watch(e, then=lambda _, i=i: order.append(f"then {i}"))
            for i, e in enumerate(events)]
    futs[0].add_done_callback(lambda _: order.append("next iteration"))
    await asyncio.wait_for(futs[1], 5)
    # The first poll completed two events and answered them together, in that poll (before
    # the done callbacks it scheduled for the next loop iteration).
    assert order[:4] == ["then 0", "then 1", "after", "next iteration"]
    await asyncio.wait_for(futs[2], 5)
    assert order[4:] == ["then 2", "after"]
    assert events[2].polls == 3  # two polls that completed nothing: no after_pass for them
    # A poll that completes one event and then fails on the next: the poller is broken, its
    # owner told through on_error; nothing is answered.
    poller.watch(_Event(fires_after=0), then=lambda _: order.append("then 3"))
    broken = poller.watch(_Event(error=RuntimeError("query failed")))
    with pytest.raises(RuntimeError, match="query failed"):
        await asyncio.wait_for(broken, 5)
    assert order[6:] == ["then 3"]
    poller.abort(RuntimeError("test over"))


async def test_event_poller_polls_once_per_iteration_when_a_then_watches_more() -> None:
    """A ``then`` that watches the next event (a receive's copy completing, the next one
    enqueued) must not start a second round of polls beside the running one: each would
    query every loop iteration, doubling the poller's cost for as long as events flow."""
    poller = EventPoller()
    later = _Event(fires_after=None)
    poller.watch(_Event(fires_after=0), then=lambda _: poller.watch(later))
    iterations = 50
    for _ in range(iterations):
        await asyncio.sleep(0)
    # One query per loop iteration at most (fewer if the loop stalled into the back-off).
    assert 1 <= later.polls <= iterations + 1
    poller.abort(RuntimeError("test over"))


async def test_event_poller_times_an_event_from_its_first_poll_not_its_watch() -> None:
    """A loop that stalls between a watch and its first poll (an engine holding the GIL)
    must not make the event look overdue: the poller then polls it on every loop iteration
    around its expected end, not once a millisecond."""
    loop = asyncio.get_running_loop()
    poller = EventPoller()
    loop.call_soon(time.sleep, 0.01)  # runs just before the first poll
    event = _Event(fires_after=None)
    poller.watch(event)
    await asyncio.sleep(0)  # the stall, then the first poll, ran
    assert event.polls == 1
    assert poller._handle is not None  # polled on: the next iteration, not a timer
    assert not isinstance(poller._handle, asyncio.TimerHandle), "backed off to 1 ms polls"
    poller.abort(RuntimeError("test over"))


async def test_event_poller_then_failing_the_rest_calls_each_then_once() -> None:
    """A ``then`` that fails the poller's pending watches (a plane breaking as a copy
    completes) runs inside the poll: every other watch's ``then`` still runs exactly once,
    none is left unpolled, and an abort leaves nothing scheduled."""
    poller = EventPoller()
    calls: list[str] = []
    fired = _Event(fires_after=0)
    never = _Event(fires_after=None)

    def first(_: asyncio.Future[None]) -> None:
        calls.append("first")
        poller.fail_pending(RuntimeError("plane broke"))

    poller.watch(_Event(fires_after=0), then=first)
    poller.watch(fired, then=lambda _: calls.append("fired"))
    poller.watch(never, then=lambda _: calls.append("never"))
    for _ in range(5):
        await asyncio.sleep(0)
    assert sorted(calls) == ["fired", "first", "never"]
    assert never.polls >= 1 and poller._pending  # still polled: its memory stays referenced
    poller.abort(RuntimeError("test over"))
    assert poller._handle is None and not poller._pending


async def test_event_poller_fails_then_once_and_survives_a_then_that_raises() -> None:
    loop = asyncio.get_running_loop()
    reported: list[BaseException] = []
    loop.set_exception_handler(lambda _, ctx: reported.append(ctx["exception"]))
    try:
        poller = EventPoller()
        boom = ValueError("a bug in a then callback")

        def bad(_: asyncio.Future[None]) -> None:
            raise boom

        poller.watch(_Event(fires_after=0), then=bad)
        # The poller goes on: the next event completes, and the error went to the loop.
        assert await asyncio.wait_for(poller.watch(_Event(fires_after=1)), 5) is None
        assert reported == [boom]

        def cancelling(_: asyncio.Future[None]) -> None:
            raise asyncio.CancelledError  # a BaseException: must not end the poller either

        poller.watch(_Event(fires_after=0), then=cancelling)
        assert await asyncio.wait_for(poller.watch(_Event(fires_after=1)), 5) is None
        assert len(reported) == 2 and isinstance(reported[1], asyncio.CancelledError)
        # A future its holder cancelled still gets its then, once, when the event fires.
        calls_of_cancelled: list[asyncio.Future[None]] = []
        dropped = poller.watch(_Event(fires_after=2), then=calls_of_cancelled.append)
        dropped.cancel()
        assert await asyncio.wait_for(poller.watch(_Event(fires_after=0)), 5) is None
        assert calls_of_cancelled == [dropped]
        # Failed pending watches get their then once (scheduled), never again on firing.
        calls: list[asyncio.Future[None]] = []
        event = _Event(fires_after=None)
        fut = poller.watch(event, then=calls.append)
        await asyncio.sleep(0)
        poller.fail_pending(RuntimeError("plane broke"))
        event.fires_after = 0  # it fires after all; the poller still polls it
        while poller._pending:
            await asyncio.sleep(0)
        assert calls == [fut]
        with pytest.raises(RuntimeError, match="plane broke"):
            fut.result()
        later = poller.watch(_Event(fires_after=0), then=calls.append)
        await asyncio.sleep(0)
        assert calls == [fut, later] and later.exception() is not None
        # Aborted: a pending watch's then runs once, with the abort's error.
        aborted_calls: list[asyncio.Future[None]] = []
        other = EventPoller()
        pending = other.watch(_Event(fires_after=None), then=aborted_calls.append)
        other.abort(RuntimeError("aborted"))
        await asyncio.sleep(0)
        assert aborted_calls == [pending]
        with pytest.raises(RuntimeError, match="aborted"):
            pending.result()
        poller.abort(RuntimeError("aborted"))
    finally:
        loop.set_exception_handler(None)


# -- the ordered worker ---------------------------------------------------------------------------


async def test_ordered_worker_runs_jobs_one_at_a_time_in_order_off_the_loop() -> None:
    worker = OrderedWorker("test-alloc")
    release = threading.Event()
    ran: list[tuple[int, str]] = []

    def job(i: int) -> int:
        if i == 0:
            release.wait(10)
        ran.append((i, threading.current_thread().name))
        return i

    try:
        futs = [worker.submit(lambda i=i: job(i)) for i in range(5)]
        await asyncio.sleep(0)
        assert not any(f.done() for f in futs)  # all behind the first
        release.set()
        assert await asyncio.wait_for(asyncio.gather(*futs), 10) == list(range(5))
        assert [i for i, _ in ran] == list(range(5))
        assert all(name.startswith("aiokvpipe-test-alloc") for _, name in ran)
    finally:
        release.set()
        worker.shutdown()


def test_short_gil_turns_nest_and_restore_the_switch_interval() -> None:
    import sys

    from aiokvpipe._cuda import short_gil_turns

    before = sys.getswitchinterval()
    with short_gil_turns():
        assert sys.getswitchinterval() <= 0.0005
        with short_gil_turns():
            assert sys.getswitchinterval() <= 0.0005
        assert sys.getswitchinterval() <= 0.0005  # the outer body still runs
    assert sys.getswitchinterval() == before



@pytest.mark.parametrize("end", ["abort", "close"])
async def test_the_tcp_plane_keeps_its_send_socket_until_its_writer_is_gone(
        any_loop: str, end: str) -> None:
    """A plane that ends while a payload waits for room in its send socket: a socket made
    right after must work. (The plane closed its socket at once; a new socket took the same
    number, and on asyncio's loop the cancelled send's clean-up, a turn later, then unwatched
    the new socket or made watching it fail.) The old socket is closed once let go of."""
    loop = asyncio.get_running_loop()
    send_a, send_b = socket.socketpair()
    recv_a, recv_b = socket.socketpair()
    plane = await TcpPlane.start(send_a, recv_a, torch.device("cpu"), lambda exc: None, 0)
    sent = plane.post_send([torch.ones(64 * MiB, dtype=torch.uint8)])  # nobody reads it
    # Its first bytes reached the peer: the socket is full, and the send waits for room.
    await eventually(lambda: bool(select.select([send_b], [], [], 0)[0]), 5, "bytes sent")
    if end == "abort":
        plane.abort(ConnectionAbortedError("plane ended (test)"))
    else:
        plane.close()
    # A new socket takes the lowest free number: the plane's, if it closed it already.
    new_a, new_b = socket.socketpair()
    try:
        new_a.setblocking(False)
        writable = loop.create_future()
        loop.add_writer(new_a.fileno(), lambda: writable.done() or writable.set_result(None))
        await eventually(lambda: send_a.fileno() == -1, 5, "the old send socket closed")
        await asyncio.sleep(0)  # (the cancelled send's clean-up ran by now)
        async with asyncio.timeout(5):
            await writable  # still watched
    finally:
        discard(sent)  # (failed by an abort; a close leaves it to the pipe)
        loop.remove_writer(new_a.fileno())
        for s in (new_a, new_b, send_b, recv_b):
            s.close()
