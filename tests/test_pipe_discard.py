"""Pipe.discard(key): abandoned requests give their receive credits back."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch
from conftest import eventually

import aiokvpipe

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def small_pipe():
    listener = await aiokvpipe.listen(recv_buffer_bytes=1 << 20)
    accept = asyncio.create_task(listener.accept())
    sender = await aiokvpipe.connect("127.0.0.1", listener.port)
    receiver = await accept
    yield sender, receiver
    await sender.aclose()
    await receiver.aclose()
    await listener.aclose()


async def test_unclaimed_keyed_message_holds_credits_until_discarded(small_pipe) -> None:
    sender, receiver = small_pipe
    await sender.send(torch.zeros(150_000), key="abandoned")  # 600 kB of a 1 MiB budget
    blocked = asyncio.create_task(sender.send(torch.ones(150_000), key="wanted"))
    done, _ = await asyncio.wait({blocked}, timeout=0.3)
    assert not done, "the second send should wait for credits the orphan holds"
    assert receiver.discard("abandoned") == 1
    async with asyncio.timeout(5):
        await blocked
        got = await receiver.recv(key="wanted")
    assert isinstance(got, torch.Tensor) and bool((got == 1).all())
    assert receiver.stats.recv_buffered_messages == 0


async def test_discard_only_touches_its_key_and_keeps_order(small_pipe) -> None:
    sender, receiver = small_pipe
    for i in range(3):
        await sender.send(torch.tensor([i]), key="keep")
        await sender.send(torch.tensor([100 + i]), key="drop")
    await sender.send(torch.tensor([-1]), key="fence")
    assert (await receiver.recv(key="fence")).item() == -1  # everything before it arrived
    assert receiver.discard("drop") == 3
    assert receiver.discard("drop") == 0
    assert [(await receiver.recv(key="keep")).item() for _ in range(3)] == [0, 1, 2]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.1):
            await receiver.recv(key="drop")


async def test_discarding_unkeyed_messages_lasts_until_recv_asks_again(small_pipe) -> None:
    # recv() took a discarded key back only when it had one: after discard(None) every
    # unkeyed message was dropped for good, and recv() waited for ever.
    sender, receiver = small_pipe
    await sender.send(torch.tensor([1]))
    await sender.send(torch.tensor([2]), key="fence")
    await receiver.recv(key="fence")
    assert receiver.discard(None) == 1
    async with asyncio.timeout(5):
        waiting = asyncio.create_task(receiver.recv())
        await sender.send(torch.tensor([3]))
        assert (await waiting).item() == 3


async def test_a_recv_waiting_when_its_key_is_discarded_still_gets_what_comes(
        small_pipe) -> None:
    # A recv(key) waiting asks for the key: a discard meanwhile (another task abandoning
    # the request) once made every later message for it dropped, and the recv wait for ever.
    sender, receiver = small_pipe
    async with asyncio.timeout(5):
        waiting = asyncio.create_task(receiver.recv(key="k"))
        await eventually(lambda: "k" in receiver._waiters, 5, "recv(key) waits")
        assert receiver.discard("k") == 0
        await sender.send(torch.tensor([5]), key="k")
        assert (await waiting).item() == 5


async def test_a_recv_cancelled_just_before_its_key_is_discarded_does_not_take_it_back(
        small_pipe) -> None:
    # Abandoning a request from another task: cancel its recv(key), discard the key, in the
    # loop iteration a message for it is read, before the cancelled task runs again. That
    # recv no longer asks for the key: the message is dropped, and so are later ones.
    sender, receiver = small_pipe
    waiting = asyncio.create_task(receiver.recv(key="k"))
    await eventually(lambda: "k" in receiver._waiters, 5, "recv(key) waits")
    on_data = receiver.on_data

    def abandon_then_read(data: Any) -> bool:
        if not waiting.done():
            waiting.cancel()
            receiver.discard("k")
        return on_data(data)

    receiver.on_data = abandon_then_read  # type: ignore[method-assign]
    async with asyncio.timeout(5):
        await sender.send(torch.tensor([1]), key="k")
        await sender.send(torch.tensor([2]), key="fence")
        await receiver.recv(key="fence")
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await sender.send(torch.tensor([3]), key="k")
        await sender.send(torch.tensor([4]), key="fence")
        await receiver.recv(key="fence")
    assert receiver._proto.is_discarded("k")
    assert receiver.stats.recv_buffered_messages == 0


async def test_a_message_a_cancelled_recv_had_taken_is_dropped_when_its_key_is_discarded(
        small_pipe) -> None:
    """Abandoning a request from another task in the loop iteration its message was handed
    to the waiting recv(key): cancel, then discard. The message's credits come back. (The
    cancelled recv put the message back under the discarded key, where it held its credits
    for ever and stalled the sender.)"""
    sender, receiver = small_pipe
    waiting = asyncio.create_task(receiver.recv(key="k"))
    await eventually(lambda: "k" in receiver._waiters, 5, "recv(key) waits")
    on_data = receiver.on_data

    def read_then_abandon(data: Any) -> bool:
        more = on_data(data)  # the message is handed to the waiting recv's future
        if not waiting.done():
            waiting.cancel()
            receiver.discard("k")
        return more

    receiver.on_data = read_then_abandon  # type: ignore[method-assign]
    full = sender.stats.send_credits
    async with asyncio.timeout(10):
        # 40 kB: inline, so it is handed over in the read that brings it
        await sender.send(torch.zeros(10_000), key="k")
        with pytest.raises(asyncio.CancelledError):
            await waiting
        receiver.on_data = on_data  # type: ignore[method-assign]
        assert receiver.stats.recv_buffered_messages == 0, "kept under a discarded key"
        await eventually(lambda: sender.stats.send_credits == full, 5,
                         f"the sender's credits back: {sender.stats.send_credits} of {full}")


async def test_a_message_arriving_when_its_key_is_discarded_goes_to_the_recv_waiting(
        small_pipe) -> None:
    """discard(key) while a recv(key) waits and a message for it is announced, its payload
    still arriving: the waiting recv gets it, as it gets one announced after the discard.
    (It was dropped, and the recv waited for ever.)"""
    sender, receiver = small_pipe
    waiting = asyncio.create_task(receiver.recv(key="k"))
    await eventually(lambda: "k" in receiver._waiters, 5, "recv(key) waits")
    discarded = _while_a_payload_arrives(receiver, lambda: receiver.discard("k"))
    x = torch.arange(200_000)
    async with asyncio.timeout(10):
        await sender.send(x, key="k")
        assert torch.equal(await waiting, x)
    assert discarded == [0], discarded


async def test_a_message_left_to_a_recv_that_then_gave_up_is_dropped(small_pipe) -> None:
    """discard(key) while a recv(key) waits and a message for it is still arriving, then
    that recv is cancelled (a request given up: discard, then cancel): the message, which
    nobody will ask for now, is dropped and its credits come back."""
    sender, receiver = small_pipe
    waiting = asyncio.create_task(receiver.recv(key="k"))
    await eventually(lambda: "k" in receiver._waiters, 5, "recv(key) waits")
    _while_a_payload_arrives(receiver, lambda: (receiver.discard("k"), waiting.cancel())[0])
    full = sender.stats.send_credits
    async with asyncio.timeout(10):
        await sender.send(torch.arange(100_000), key="k")  # 800 kB, through the data plane
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await _nothing_kept(sender, receiver, full)


async def test_a_woken_recv_cancelled_after_a_discard_leaves_its_message_to_the_next_waiting(
        small_pipe) -> None:
    """Two recv(key) wait; a message comes for the first; discard(key) (the second still
    waits: nothing dropped); the first is cancelled before it ran: the second gets that
    message. (It was dropped, as if nobody waited, and the second got the next one.)"""
    sender, receiver = small_pipe
    first = asyncio.create_task(receiver.recv(key="k"))
    second = asyncio.create_task(receiver.recv(key="k"))
    await eventually(lambda: len(receiver._waiters.get("k", ())) == 2, 5, "both wait")
    await sender.send(torch.tensor([1]), key="k")
    while receiver.stats.messages_received < 1:  # (the test's timeout bounds it)
        await asyncio.sleep(0)
    assert not first.done()  # woken, not yet run
    assert receiver.discard("k") == 0
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    async with asyncio.timeout(10):
        assert (await second).tolist() == [1]


@pytest.mark.parametrize("size", ["inline", "payload"])
async def test_discard_then_a_cancel_of_the_recv_waiting_drops_what_came_between(
        small_pipe, size: str) -> None:
    """recv(key) waits; the request is given up: discard(key), a message for the key comes
    (for the recv waiting), then that recv is cancelled before it took it: the message is
    dropped and its credits come back. (The header lifted the discard, so the message was
    kept for nobody, its credits held for the life of the pipe.)"""
    sender, receiver = small_pipe
    full = sender.stats.send_credits
    waiting = asyncio.create_task(receiver.recv(key="k"))
    await eventually(lambda: "k" in receiver._waiters, 5, "recv(key) waits")
    assert receiver.discard("k") == 0
    n = 4 if size == "inline" else 200_000  # 800 kB: through the data plane
    async with asyncio.timeout(10):
        sending = asyncio.create_task(sender.send(torch.zeros(n, dtype=torch.int32), key="k"))
        if size == "inline":  # woken, not yet run
            while receiver.stats.messages_received < 1:
                await asyncio.sleep(0)
        else:  # its header in, its payload still arriving
            while not receiver._incoming:
                await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await sending
        await _nothing_kept(sender, receiver, full)


async def test_a_recv_woken_before_the_discard_takes_its_message_and_the_discard_stands(
        small_pipe) -> None:
    """recv(key) woken for a message, not yet run, when discard(key) is called: it gets that
    message (it was owed it), and the discard stands: the next message for the key is
    dropped and its credits come back. (Taking it lifted the discard, as for a recv asleep
    at the discard, and the next message was kept for nobody.)"""
    sender, receiver = small_pipe
    full = sender.stats.send_credits
    waiting = asyncio.create_task(receiver.recv(key="k"))
    await eventually(lambda: "k" in receiver._waiters, 5, "recv(key) waits")
    async with asyncio.timeout(10):
        await sender.send(torch.tensor([1]), key="k")
        while receiver.stats.messages_received < 1:
            await asyncio.sleep(0)
        assert not waiting.done()  # woken, not yet run
        assert receiver.discard("k") == 0
        assert (await waiting).tolist() == [1]
        await sender.send(torch.zeros(100_000), key="k")  # 400 kB for the request given up
        await _nothing_kept(sender, receiver, full)


async def _nothing_kept(sender: Any, receiver: Any, full: int) -> None:
    """What came for a key given up is not kept: the sender's credits are all back, nothing
    waits at the receiver."""
    await eventually(lambda: sender.stats.send_credits == full, 5,
                     f"the sender's credits back: {sender.stats.send_credits} of {full}")
    assert receiver.stats.recv_buffered_messages == 0


def _while_a_payload_arrives(receiver: Any, act: Any) -> list[Any]:
    """Run ``act()`` once, right after the read that brings a message's header while its
    payload is still on the way; returns the list its result goes to."""
    on_data = receiver.on_data
    results: list[Any] = []

    def reading(data: Any) -> bool:
        more = on_data(data)
        if receiver._incoming and not results:
            results.append(act())
        return more

    receiver.on_data = reading
    return results
