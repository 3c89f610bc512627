"""ByteBudget: the byte semaphore behind the pipe's backpressure.

Every test is deterministic: tasks are advanced with ``await asyncio.sleep(0)`` yields (never a
timed sleep), and state is read from ``in_use`` / ``waiting`` between steps.
"""

from __future__ import annotations

import asyncio

import pytest

from aiokvpipe import BrokenPipe
from aiokvpipe._budget import ByteBudget

pytestmark = pytest.mark.timeout(10)


async def settle(rounds: int = 10) -> None:
    """Let every ready task run until it blocks again."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class Grants:
    """Spawns ``acquire`` tasks and records the order in which they are granted."""

    def __init__(self, budget: ByteBudget) -> None:
        self.budget = budget
        self.order: list[str] = []

    def spawn(self, name: str, n: int) -> asyncio.Task[None]:
        async def take() -> None:
            await self.budget.acquire(n)
            self.order.append(name)

        return asyncio.create_task(take(), name=name)

    async def queue(self, name: str, n: int) -> asyncio.Task[None]:
        """Spawn an acquire and check that it is left waiting."""
        before = self.budget.waiting
        task = self.spawn(name, n)
        await settle()
        assert not task.done(), f"{name} ({n} bytes) should wait"
        assert self.budget.waiting == before + 1
        return task


def test_acquire_completes_without_suspending_when_bytes_are_free() -> None:
    b = ByteBudget(100)
    coro = b.acquire(60)
    with pytest.raises(StopIteration):  # finished on the first step: it never waited
        coro.send(None)
    assert b.in_use == 60
    coro = b.acquire(40)  # exactly fills the budget
    with pytest.raises(StopIteration):
        coro.send(None)
    assert b.in_use == 100
    assert b.waiting == 0


async def test_acquire_waits_until_enough_bytes_are_released() -> None:
    b = ByteBudget(100)
    await b.acquire(80)
    g = Grants(b)
    task = await g.queue("w", 30)
    assert b.in_use == 80  # a waiter takes nothing

    b.release(5)  # 75 + 30 > 100: still not enough
    await settle()
    assert not task.done()
    assert b.in_use == 75

    b.release(5)  # 70 + 30 == 100: fits exactly
    await settle()
    assert task.done() and task.exception() is None
    assert b.in_use == 100
    assert b.waiting == 0


async def test_large_waiter_is_not_starved_by_later_small_requests() -> None:
    b = ByteBudget(100)
    await b.acquire(60)
    g = Grants(b)
    big = await g.queue("big", 80)
    # Each of these would fit next to the 60 held, but must queue behind the big one.
    smalls = [await g.queue(f"small{i}", 10) for i in range(4)]
    assert b.in_use == 60
    assert g.order == []

    b.release(60)
    await settle()
    assert big.done() and all(t.done() for t in smalls[:2])
    assert g.order == ["big", "small0", "small1"]  # 80 + 10 + 10 = 100
    assert b.in_use == 100
    assert not smalls[2].done() and not smalls[3].done()

    b.release(80)
    await settle()
    assert g.order == ["big", "small0", "small1", "small2", "small3"]
    assert b.in_use == 40


async def test_grants_stop_at_the_first_waiter_that_does_not_fit() -> None:
    b = ByteBudget(100)
    await b.acquire(100)
    g = Grants(b)
    a = await g.queue("a", 70)
    bb = await g.queue("b", 50)
    c = await g.queue("c", 10)

    b.release(100)
    await settle()
    # a fits; b does not (120); c would fit (80) but may not overtake b.
    assert a.done() and not bb.done() and not c.done()
    assert b.in_use == 70 and b.waiting == 2

    b.release(70)
    await settle()
    assert g.order == ["a", "b", "c"]
    assert b.in_use == 60


async def test_new_acquire_queues_behind_waiters_even_if_it_would_fit() -> None:
    b = ByteBudget(100)
    await b.acquire(90)
    g = Grants(b)
    await g.queue("big", 50)
    late = g.spawn("late", 5)  # 95 <= 100, but someone is already waiting
    await settle()
    assert not late.done()
    assert b.in_use == 90
    b.release(90)
    await settle()
    assert g.order == ["big", "late"]


async def test_oversize_request_is_admitted_alone_when_nothing_is_held() -> None:
    b = ByteBudget(100)
    coro = b.acquire(250)
    with pytest.raises(StopIteration):  # no deadlock, no wait
        coro.send(None)
    assert b.in_use == 250

    g = Grants(b)
    small = await g.queue("small", 1)  # nothing else fits while the oversize one is held
    b.release(250)
    await settle()
    assert small.done()
    assert b.in_use == 1


async def test_oversize_request_waits_for_everything_to_be_released() -> None:
    b = ByteBudget(100)
    await b.acquire(10)
    await b.acquire(10)
    g = Grants(b)
    huge = await g.queue("huge", 250)
    after = await g.queue("after", 1)

    b.release(10)
    await settle()
    assert not huge.done()  # 10 still held

    b.release(10)
    await settle()
    assert huge.done()
    assert not after.done()  # the oversize grant is alone
    assert b.in_use == 250

    b.release(250)
    await settle()
    assert after.done()
    assert b.in_use == 1


async def test_cancelled_waiter_leaks_nothing_and_unblocks_those_behind_it() -> None:
    b = ByteBudget(100)
    await b.acquire(90)
    g = Grants(b)
    head = await g.queue("head", 50)
    behind = await g.queue("behind", 5)  # fits now (95), blocked only by head's place

    head.cancel()
    await settle()
    assert head.cancelled()
    assert behind.done() and behind.exception() is None
    assert b.in_use == 95
    assert b.waiting == 0

    b.release(95)
    assert b.in_use == 0  # nothing of head's request was ever taken


async def test_cancelling_the_only_waiter_leaves_the_budget_unchanged() -> None:
    b = ByteBudget(100)
    await b.acquire(70)
    g = Grants(b)
    w = await g.queue("w", 50)
    w.cancel()
    await settle()
    assert w.cancelled()
    assert b.in_use == 70 and b.waiting == 0
    b.release(70)
    await b.acquire(100)  # the whole budget is there again
    assert b.in_use == 100


async def test_waiter_cancelled_and_release_in_the_same_step_grants_the_next() -> None:
    # The cancelled task has not run its cleanup yet when release() walks the queue.
    b = ByteBudget(100)
    await b.acquire(100)
    g = Grants(b)
    first = await g.queue("first", 60)
    second = await g.queue("second", 60)
    first.cancel()
    b.release(100)
    await settle()
    assert first.cancelled()
    assert second.done() and second.exception() is None
    assert g.order == ["second"]
    assert b.in_use == 60
    assert b.waiting == 0


async def test_cancel_after_grant_but_before_resuming_returns_the_bytes() -> None:
    b = ByteBudget(100)
    await b.acquire(100)
    g = Grants(b)
    task = await g.queue("t", 40)

    b.release(100)  # grants t synchronously: its bytes are counted before it runs
    assert b.in_use == 40
    assert not task.done()

    task.cancel()  # ... and it is cancelled before it gets to resume
    await settle()
    assert task.cancelled()
    assert g.order == []
    assert b.in_use == 0
    assert b.waiting == 0


async def test_bytes_returned_by_a_cancelled_grant_go_to_the_next_waiter() -> None:
    b = ByteBudget(100)
    await b.acquire(100)
    g = Grants(b)
    first = await g.queue("first", 40)
    second = await g.queue("second", 80)

    b.release(100)
    assert b.in_use == 40  # first granted; second (120) does not fit
    first.cancel()
    await settle()
    assert first.cancelled()
    assert second.done() and second.exception() is None
    assert g.order == ["second"]
    assert b.in_use == 80


async def test_wait_for_timeout_around_acquire_leaks_nothing() -> None:
    b = ByteBudget(10)
    await b.acquire(10)
    loop = asyncio.get_running_loop()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout_at(loop.time()):  # already expired: cancels at the first wait
            await b.acquire(5)
    assert b.in_use == 10 and b.waiting == 0


async def test_abort_fails_every_waiter_and_every_later_acquire() -> None:
    b = ByteBudget(100)
    await b.acquire(100)
    g = Grants(b)
    w1 = await g.queue("w1", 10)
    w2 = await g.queue("w2", 500)
    exc = BrokenPipe("peer died")

    b.abort(exc)
    await settle()
    errors = [w1.exception(), w2.exception()]
    # Each caller gets its own copy (same type, message and cause), so no traceback
    # collects the frames of every caller.
    assert all(isinstance(e, BrokenPipe) and str(e) == "peer died" for e in errors)
    assert errors[0] is not errors[1] and exc not in errors
    assert b.waiting == 0
    assert g.order == []

    b.release(100)
    assert b.in_use == 0
    with pytest.raises(BrokenPipe, match="peer died") as info:
        await b.acquire(1)  # would fit at once, but the budget is dead
    assert info.value is not exc
    assert b.in_use == 0


def test_release_of_more_than_is_held_raises_value_error() -> None:
    b = ByteBudget(100)
    with pytest.raises(ValueError):
        b.release(1)
    coro = b.acquire(30)
    with pytest.raises(StopIteration):
        coro.send(None)
    with pytest.raises(ValueError):
        b.release(31)
    assert b.in_use == 30  # the failed release changed nothing
    b.release(30)
    assert b.in_use == 0


async def test_negative_counts_are_rejected() -> None:
    b = ByteBudget(100)
    with pytest.raises(ValueError):
        await b.acquire(-1)
    await b.acquire(10)
    with pytest.raises(ValueError):
        b.release(-1)
    assert b.in_use == 10


@pytest.mark.parametrize("capacity", [0, -1])
def test_capacity_must_be_positive(capacity: int) -> None:
    with pytest.raises(ValueError):
        ByteBudget(capacity)


# -- request / withdraw: the FIFO without a task (the pipe's queued sends) --------------------


async def test_request_is_granted_at_once_when_free_and_in_fifo_order_with_acquire() -> None:
    b = ByteBudget(100)
    first = b.request(60)
    assert first.done() and b.in_use == 60
    g = Grants(b)
    a = await g.queue("acquire", 50)
    later = b.request(10)  # fits, but must not overtake the waiting acquire
    assert not later.done() and b.waiting == 2
    b.release(60)
    await settle()
    assert a.done() and later.done() and g.order == ["acquire"]
    assert b.in_use == 60


async def test_withdrawing_a_pending_request_lets_those_behind_it_in() -> None:
    b = ByteBudget(100)
    b.request(90)
    big = b.request(50)
    small = b.request(10)
    assert not big.done() and not small.done()
    b.withdraw(50, big)
    assert big.cancelled() and small.done() and b.in_use == 100 and b.waiting == 0


async def test_withdrawing_a_granted_request_gives_its_bytes_back() -> None:
    b = ByteBudget(100)
    b.request(100)
    r = b.request(40)
    b.release(100)
    assert r.done() and b.in_use == 40
    b.withdraw(40, r)
    assert b.in_use == 0
