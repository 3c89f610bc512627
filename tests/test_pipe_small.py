"""The small-message path on a real pipe: inline payloads, the no-suspension send, credits that
ride in headers, and the specs both ends remember for recurring shapes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from conftest import PairFactory, eventually
from test_pipe_roundtrip import assert_same_message, random_tensor

import aiokvpipe
from aiokvpipe._message import flatten
from aiokvpipe._pipe import YIELD_EVERY

pytestmark = pytest.mark.timeout(30)

KiB = 1 << 10


async def test_small_send_does_not_overtake_one_waiting_for_credits(
        pair_factory: PairFactory) -> None:
    # Credits for exactly one 4 KiB message: the second send waits for them, and a third,
    # which alone would fit no better, must queue behind it instead of taking the fast path.
    one = flatten(torch.full((4 * KiB,), 1, dtype=torch.uint8)).cost
    a, b = await pair_factory(recv_buffer_bytes=one)
    await asyncio.wait_for(a.send(torch.full((4 * KiB,), 1, dtype=torch.uint8)), 5)
    second = asyncio.create_task(a.send(torch.full((4 * KiB,), 2, dtype=torch.uint8)))
    done, _ = await asyncio.wait({second}, timeout=0.2)
    assert not done, "the second send did not wait for credits"
    third = asyncio.create_task(a.send(None))
    done, _ = await asyncio.wait({third}, timeout=0.2)
    assert not done, "an empty send overtook a send waiting for credits"
    got = [await asyncio.wait_for(b.recv(), 5) for _ in range(3)]
    await asyncio.wait_for(asyncio.gather(second, third), 5)
    assert [int(g[0]) if g is not None else None for g in got] == [1, 2, None]


async def test_small_send_does_not_overtake_one_waiting_for_send_budget(
        pair_factory: PairFactory) -> None:
    # The second 1 MiB send holds the send lock while it waits for the first one's budget;
    # credits are plentiful, so only the queue of slow senders keeps the small send behind it.
    a, b = await pair_factory(max_inflight_bytes=512 * KiB)
    sends = [asyncio.create_task(a.send(torch.full((1 << 20,), i, dtype=torch.uint8)))
             for i in (1, 2)]
    sends.append(asyncio.create_task(a.send(torch.full((16,), 3, dtype=torch.uint8))))
    await asyncio.wait_for(asyncio.gather(*sends), 10)
    got = [int((await asyncio.wait_for(b.recv(), 10))[0]) for _ in range(3)]
    assert got == [1, 2, 3]


async def test_credits_riding_on_headers_all_come_back(pair_factory: PairFactory) -> None:
    # A request/response exchange returns credits only inside headers; once both sides are
    # idle, every credit is back with its owner.
    a, b = await pair_factory(recv_buffer_bytes=1 << 20)
    full = a.stats.send_credits
    for i in range(200):
        await a.send(torch.full((100 + i,), i % 7, dtype=torch.int32))
        await b.send(await b.recv())
        assert int((await a.recv())[0]) == i % 7
    await eventually(lambda: a.stats.send_credits == full == b.stats.send_credits, 5,
                     f"credits back: {a.stats} {b.stats}")
    assert a.stats.recv_buffered_bytes == b.stats.recv_buffered_bytes == 0


async def test_inline_message_of_odd_sizes_and_mixed_dtypes(pair_factory: PairFactory) -> None:
    # Tensors of one small message share one received buffer; after an odd-sized one the
    # next is not aligned for its dtype and must be copied out, not viewed misaligned.
    a, b = await pair_factory()
    sent = {"flag": random_tensor(torch.bool, (3,), 1),
            "k": random_tensor(torch.float32, (5, 7), 2),
            "b": random_tensor(torch.uint8, (1,), 3),
            "v": random_tensor(torch.complex128, (2, 3), 4),
            "scalar": torch.tensor(7, dtype=torch.int64),
            "empty": torch.empty(0, 4, dtype=torch.float16),
            "h": random_tensor(torch.bfloat16, (9,), 5)}
    await a.send(sent)
    got = await asyncio.wait_for(b.recv(), 5)
    assert_same_message(sent, got)
    for t in got.values():
        if t.numel():
            assert t.data_ptr() % t.element_size() == 0, "a received tensor is misaligned"
    # They are ordinary, independent tensors.
    got["k"].zero_()
    assert_same_message(sent["v"], got["v"])
    got["h"].share_memory_()
    assert got["h"].is_shared()
    assert torch.equal(got["h"], sent["h"])


async def test_recurring_shapes_keep_their_dtypes_and_names(pair_factory: PairFactory) -> None:
    # Both ends remember specs by shape; a shape that comes back with another dtype, or in a
    # dict under other names, must not be mistaken for the one remembered.
    a, b = await pair_factory()
    dtypes = [torch.float16, torch.int16, torch.bfloat16, torch.uint8, torch.float32]
    sent: list[object] = []
    for i in range(40):
        dt = dtypes[i % len(dtypes)]
        shape = (4, 8) if dt.itemsize < 4 else (2, 8)
        msg: object = random_tensor(dt, shape, i)
        if i % 3 == 0:
            msg = {f"layer{i % 2}": msg, "x": random_tensor(dt, shape, i + 100)}
        sent.append(msg)
        await a.send(msg)  # type: ignore[arg-type]
    for i, msg in enumerate(sent):
        assert_same_message(msg, await asyncio.wait_for(b.recv(), 5))


async def test_small_sends_on_a_broken_pipe_raise_broken_pipe(pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    b._control.abort()  # the connection drops under the sender, nobody closed anything
    with pytest.raises(aiokvpipe.BrokenPipe):
        for _ in range(1000):  # the fast path must notice the loss, not queue forever
            await asyncio.wait_for(a.send(torch.ones(16)), 5)


async def _count_ticks(stop: asyncio.Event) -> int:
    ticks = 0
    while not stop.is_set():
        await asyncio.sleep(0)
        ticks += 1
    return ticks


async def test_streaming_small_sends_does_not_starve_the_loop(pair_factory: PairFactory) -> None:
    # Each of these sends completes without waiting (tiny, credits plentiful, the kernel's
    # buffers take them all), yet other tasks must get to run while a task streams them.
    a, b = await pair_factory()
    stop = asyncio.Event()
    ticker = asyncio.create_task(_count_ticks(stop))
    await asyncio.sleep(0)
    n = 20 * YIELD_EVERY
    for i in range(n):
        await a.send(torch.full((8,), i, dtype=torch.int32))
    stop.set()
    assert await ticker >= n // YIELD_EVERY - 1
    for i in range(n):
        assert int((await asyncio.wait_for(b.recv(), 5))[0]) == i


async def test_draining_a_backlog_does_not_starve_the_loop(pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    n = 20 * YIELD_EVERY
    for i in range(n):
        await a.send(torch.full((8,), i, dtype=torch.int32))
    await eventually(lambda: b.stats.recv_buffered_messages == n, 5, "all arrived")
    stop = asyncio.Event()
    ticker = asyncio.create_task(_count_ticks(stop))
    await asyncio.sleep(0)
    got = [int((await b.recv())[0]) for _ in range(n)]
    stop.set()
    assert got == list(range(n))
    assert await ticker >= n // YIELD_EVERY - 1


async def test_recv_cancelled_at_its_yield_loses_nothing(pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    for i in range(3):
        await a.send(torch.full((8,), i, dtype=torch.int32))
    await eventually(lambda: b.stats.recv_buffered_messages == 3, 5, "all arrived")
    b._calls_since_yield = YIELD_EVERY - 1  # the next recv() yields before taking message 0
    task = asyncio.create_task(b.recv())
    later = asyncio.create_task(b.recv())  # called while it yields: in line behind it
    await asyncio.sleep(0)  # it runs up to its yield
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The one called next gets message 0, not 1. (The first took message 0 before its yield
    # and gave it back once cancelled, after the second had taken message 1.)
    assert int((await asyncio.wait_for(later, 5))[0]) == 0
    assert [int((await b.recv())[0]) for _ in range(2)] == [1, 2]


async def test_a_woken_recv_cancelled_before_it_ran_passes_its_message_to_the_next_in_line(
        pair_factory: PairFactory) -> None:
    """Two recv() calls wait; two messages arrive in one read, one for each; the first call
    is cancelled before its task runs: the second gets the first message, a third call the
    second. (The first message was bound to the first call: handed back, it came after the
    second, which the second call had got.)"""
    a, b = await pair_factory()
    first, second = asyncio.create_task(b.recv()), asyncio.create_task(b.recv())
    await eventually(lambda: len(b._waiters.get(None, ())) == 2, 5, "both wait")
    a._calls_since_yield = 0  # (no yield between the two sends)
    assert a._control.hold()  # both messages in one write, read together
    for i in range(2):
        await a.send(torch.full((8,), i, dtype=torch.int32))
    a._control.release()
    while b.stats.messages_received < 2:  # (the test's timeout bounds it)
        await asyncio.sleep(0)
    assert not first.done() and not second.done()  # woken, not yet run
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert int((await asyncio.wait_for(second, 5))[0]) == 0
    assert int((await asyncio.wait_for(b.recv(), 5))[0]) == 1


async def test_at_a_graceful_close_a_recv_behind_a_woken_one_that_gives_up_gets_its_message(
        pair_factory: PairFactory) -> None:
    """Two recv() wait; the peer's last message and its CLOSE come in one read; the first
    recv, woken for the message, is cancelled before it ran: the second gets the message,
    and PipeClosed comes only after it. (The second raised PipeClosed at the CLOSE, and a
    later recv() still returned the message.)"""
    a, b = await pair_factory()
    first, second = asyncio.create_task(b.recv()), asyncio.create_task(b.recv())
    await eventually(lambda: len(b._waiters.get(None, ())) == 2, 5, "both wait")
    b._control._transport.pause_reading()  # the message and the CLOSE read together
    await a.send(torch.arange(4))
    closing = asyncio.create_task(a.aclose())
    await eventually(lambda: a._proto.close_sent, 5, "a's CLOSE written")
    b._control._transport.resume_reading()
    while b.stats.messages_received < 1:  # (the test's timeout bounds it)
        await asyncio.sleep(0)
    assert not first.done() and not second.done()
    first.cancel()
    async with asyncio.timeout(10):
        with pytest.raises(asyncio.CancelledError):
            await first
        assert (await second).tolist() == [0, 1, 2, 3]
        with pytest.raises(aiokvpipe.PipeClosed):
            await b.recv()
        await closing


async def test_at_a_graceful_close_a_woken_recv_failing_to_make_its_tensors_leaves_the_next(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, but the woken recv fails to make its message's tensors (out of memory): it
    raises that, the message stays first in line, and the recv behind it gets it. (That one
    had raised PipeClosed already.)"""
    a, b = await pair_factory()
    first, second = asyncio.create_task(b.recv()), asyncio.create_task(b.recv())
    await eventually(lambda: len(b._waiters.get(None, ())) == 2, 5, "both wait")
    b._control._transport.pause_reading()
    await a.send(torch.arange(4))
    closing = asyncio.create_task(a.aclose())
    await eventually(lambda: a._proto.close_sent, 5, "a's CLOSE written")
    real = torch.frombuffer
    failed: list[bool] = []

    def frombuffer(*args: Any, **kw: Any) -> torch.Tensor:  # out of memory, once
        if not failed:
            failed.append(True)
            raise MemoryError("no memory for the message's tensor (injected)")
        return real(*args, **kw)

    monkeypatch.setattr(torch, "frombuffer", frombuffer)
    b._control._transport.resume_reading()
    async with asyncio.timeout(10):
        with pytest.raises(MemoryError):
            await first
        assert (await second).tolist() == [0, 1, 2, 3]
        with pytest.raises(aiokvpipe.PipeClosed):
            await b.recv()
        await closing
