"""Backpressure on a real pipe: a fast sender facing a slow receiver waits, the receiver's
buffered bytes stay within ``recv_buffer_bytes`` (+ one message), its memory stays bounded, and
a message larger than both budgets still passes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import pipe_peer
import pytest
import torch
from conftest import HOST, PairFactory, SpawnPeer, close_quietly, eventually

import aiokvpipe
from aiokvpipe import _pipe
from aiokvpipe._message import flatten
from aiokvpipe._wire import TensorSpec, message_cost

MiB = 1 << 20
BUDGET = 4 * MiB
N_MESSAGES = 200
MESSAGE_BYTES = MiB
SLOW_RECV_SLEEP_S = 0.003
#: Unclaimed messages the receiver's credits allow at once.
#: What one of those messages costs at the receiver (a 1-D tensor's header and payload).
MESSAGE_COST = flatten(pipe_peer.seq_tensor(0, MESSAGE_BYTES)).cost
CREDIT_WINDOW = BUDGET // MESSAGE_COST

pytestmark = pytest.mark.timeout(60)


def assert_sender_was_held_back(sent_at: list[float], claimed_at: list[float]) -> None:
    """Message i can only be sent once the receiver has claimed message i - CREDIT_WINDOW
    (the credit for it came back): the sender waited for the slow receiver."""
    assert CREDIT_WINDOW == 3
    late = [i for i in range(CREDIT_WINDOW, len(sent_at))
            if not sent_at[i] > claimed_at[i - CREDIT_WINDOW]]
    assert not late, (f"sends returned before the receiver claimed the message "
                      f"{CREDIT_WINDOW} earlier: {late[:10]}")
    # The sender's total time is dominated by the receiver's pace, not its own.
    assert sent_at[-1] - sent_at[0] >= 0.8 * (N_MESSAGES - CREDIT_WINDOW - 1) * SLOW_RECV_SLEEP_S


async def test_slow_receiver_holds_back_a_fast_sender(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(max_inflight_bytes=BUDGET, recv_buffer_bytes=BUDGET)
    sent_at: list[float] = []
    claimed_at: list[float] = []
    max_buffered = 0
    max_inflight = 0

    def sample() -> None:
        nonlocal max_buffered, max_inflight
        max_buffered = max(max_buffered, b.stats.recv_buffered_bytes)
        max_inflight = max(max_inflight, a.stats.inflight_bytes)

    async def sender() -> None:
        for i in range(N_MESSAGES):
            await a.send(pipe_peer.seq_tensor(i, MESSAGE_BYTES))
            sent_at.append(time.monotonic())
            sample()

    async def slow_receiver() -> None:
        for i in range(N_MESSAGES):
            await asyncio.sleep(SLOW_RECV_SLEEP_S)  # the slow consumer
            sample()
            msg = await b.recv()
            claimed_at.append(time.monotonic())
            sample()
            assert pipe_peer.read_seq(msg) == i

    async def sampler() -> None:
        while len(claimed_at) < N_MESSAGES:
            sample()
            await asyncio.sleep(0.001)

    await asyncio.wait_for(asyncio.gather(sender(), slow_receiver(), sampler()), 60)
    assert_sender_was_held_back(sent_at, claimed_at)
    assert max_buffered <= BUDGET + MESSAGE_COST, max_buffered
    assert max_buffered >= MESSAGE_COST  # the sampler saw the buffer used
    assert max_inflight <= BUDGET, max_inflight


async def test_slow_receiver_process_stays_bounded_in_memory(spawn_peer: SpawnPeer) -> None:
    peer = await spawn_peer(role="listen", mode="slow_recv", count=N_MESSAGES,
                            sleep_s=SLOW_RECV_SLEEP_S, opts={"recv_buffer_bytes": BUDGET})
    port = (await peer.expect("listening"))["port"]
    pipe = await aiokvpipe.connect(HOST, port, max_inflight_bytes=BUDGET)
    try:
        await peer.expect("connected")
        sent_at: list[float] = []
        rss = []
        # Warm-up: the first messages size the receiver's allocator; measure growth after it.
        for i in range(5):
            await pipe.send(pipe_peer.seq_tensor(i, MESSAGE_BYTES))
            sent_at.append(time.monotonic())
        rss_base = pipe_peer.vm_rss_bytes(peer.pid)
        for i in range(5, N_MESSAGES):
            await pipe.send(pipe_peer.seq_tensor(i, MESSAGE_BYTES))
            sent_at.append(time.monotonic())
            rss.append(pipe_peer.vm_rss_bytes(peer.pid))
        report = await peer.expect("report", timeout=60)
        await peer.expect("done")
    finally:
        await close_quietly(pipe)

    assert report["bad"] == [], f"messages damaged or out of order: {report['bad'][:10]}"
    assert len(report["claimed"]) == N_MESSAGES
    assert_sender_was_held_back(sent_at, report["claimed"])
    assert report["max_buffered"] <= BUDGET + MESSAGE_COST, report
    # 200 MiB went through; without backpressure the receiver would hold most of it at once.
    growth = max(rss) - rss_base
    assert growth < 48 * MiB, f"receiver RSS grew by {growth / MiB:.0f} MiB"


async def test_message_larger_than_both_budgets_passes(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(max_inflight_bytes=BUDGET, recv_buffer_bytes=BUDGET)
    sizes = [64, 3 * MiB, 16 * MiB, 1000, 16 * MiB, 2 * MiB, 2 * MiB, 64]
    # Sent concurrently: the oversize ones must wait for the others and then go alone.
    sends = asyncio.gather(*(a.send(pipe_peer.seq_tensor(i, n)) for i, n in enumerate(sizes)))
    got = [pipe_peer.read_seq(await asyncio.wait_for(b.recv(), 30)) for _ in sizes]
    await asyncio.wait_for(sends, 30)
    assert got == list(range(len(sizes)))
    # Oversize in the other direction too, with the receiver not claiming until it is all in.
    await b.send({"kv": torch.ones(5 * MiB, dtype=torch.float32)})  # 20 MiB
    assert torch.equal((await asyncio.wait_for(a.recv(), 30))["kv"], torch.ones(5 * MiB))


async def test_unclaimed_messages_stop_the_sender_at_the_credit_limit(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory(recv_buffer_bytes=BUDGET)
    for i in range(CREDIT_WINDOW):
        await asyncio.wait_for(a.send(pipe_peer.seq_tensor(i, MESSAGE_BYTES)), 10)
    blocked = asyncio.create_task(a.send(pipe_peer.seq_tensor(CREDIT_WINDOW, MESSAGE_BYTES)))
    done, _ = await asyncio.wait({blocked}, timeout=0.3)
    assert not done, "send went past the receiver's credits while nothing was claimed"
    assert a.stats.send_credits < MESSAGE_COST
    assert pipe_peer.read_seq(await b.recv()) == 0  # frees one message's credits
    await asyncio.wait_for(blocked, 10)
    for i in range(1, CREDIT_WINDOW + 1):
        assert pipe_peer.read_seq(await b.recv()) == i


async def test_flood_of_empty_messages_is_bounded_by_credits(pair_factory: PairFactory) -> None:
    # None messages carry no payload, but each still costs credits while unclaimed.
    a, b = await pair_factory(recv_buffer_bytes=64 * 1024)
    window = 64 * 1024 // message_cost(0, ())
    for _ in range(window):
        await asyncio.wait_for(a.send(None), 10)
    blocked = asyncio.create_task(a.send(None))
    done, _ = await asyncio.wait({blocked}, timeout=0.3)
    assert not done, "unclaimed empty messages are not bounded"
    assert await b.recv() is None
    await asyncio.wait_for(blocked, 10)
    await eventually(lambda: b.stats.recv_buffered_messages == window, 5,
                     f"{window} messages buffered: {b.stats}")


@pytest.mark.parametrize("transport", ["tcp", "nccl", "ipc"])
@pytest.mark.parametrize("k", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("tensors", [1, 160, 1000])
def test_default_credits_hold_as_many_messages_as_the_default_send_budget(
        transport: str, k: int, tensors: int) -> None:
    # Credits count each message's header too: with 512 MiB exactly, two 256 MiB messages
    # did not fit at once, and large messages went one at a time (half the ipc throughput).
    # Up to a thousand tensors a message: an 80-layer model's K and V as a dict is 160.
    max_inflight, credits = aiokvpipe.PipeOptions().budgets(transport)
    size = max_inflight // k
    each = size // tensors // 2
    specs = [TensorSpec(2, (8, 16, 8, each // 1024), 2, f"layers.{i}.k") for i in range(tensors)]
    assert credits >= k * message_cost(sum(s.nbytes for s in specs), specs)


def test_ipc_pipes_keep_more_large_messages_in_flight_by_default() -> None:
    # Two in flight left the copy engine idle while one's acknowledgement and the next
    # header crossed: a 256 MiB stream at 1.35-1.53 TB/s on one H200, 2.09 with more
    # (BENCHMARKS.md, 2026-12-05). Other transports keep the smaller default.
    opts = aiokvpipe.PipeOptions()
    max_inflight, credits = opts.budgets("ipc")
    assert max_inflight >= 3 * 512 * MiB and credits > max_inflight
    assert opts.budgets("tcp") == opts.budgets("nccl") == (512 * MiB, 513 * MiB)
    assert aiokvpipe.PipeOptions(max_inflight_bytes=MiB, recv_buffer_bytes=2 * MiB
                                 ).budgets("ipc") == (MiB, 2 * MiB)


async def test_credit_for_small_messages_goes_back_in_few_frames(
        pair_factory: PairFactory) -> None:
    # A CREDIT frame per claimed message doubled the system calls of a stream of small
    # messages: credit owed below an eighth of the window lingers to be returned together.
    a, b = await pair_factory()
    frames = 0
    write = b._control.write_encoded

    def counting(data: bytes) -> None:  # b only receives: all it writes is credit
        nonlocal frames
        frames += 1
        write(data)

    b._control.write_encoded = counting  # type: ignore[method-assign]
    n = 2000
    msg = torch.ones(256, dtype=torch.uint8)
    for _ in range(n):
        await a.send(msg)
    await eventually(lambda: b.stats.recv_buffered_messages == n, 10, "all messages here")
    frames = 0
    for _ in range(n):  # claimed as fast as the loop goes: one CREDIT per loop turn before
        await b.recv()
    # Everything comes back in the end (the linger is 1 ms), in far fewer frames than the
    # claims' loop turns (one in YIELD_EVERY claims).
    await eventually(lambda: a.stats.send_credits == b._proto.recv_buffer_bytes, 5,
                     "every credit back at the sender")
    assert frames <= n // 20, f"{frames} CREDIT frames for {n} messages"


async def test_a_request_answered_at_once_arms_no_linger_timer(
        pair_factory: PairFactory) -> None:
    # Credit claimed here rides on the answer's header: a lingering return would find nothing
    # to send. Armed at every claim, the 1 ms timers fired every few round trips, and their
    # wake-ups cost a 4 KiB ping-pong a quarter of its round trip (2-core VM).
    a, b = await pair_factory()
    loop = asyncio.get_running_loop()
    armed: list[object] = []
    call_later = loop.call_later

    def counting(delay: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        if getattr(callback, "__self__", None) in (a, b):
            armed.append(callback)
        return call_later(delay, callback, *args, **kwargs)

    loop.call_later = counting  # type: ignore[method-assign]
    try:
        msg = torch.ones(256, dtype=torch.uint8)
        async with asyncio.timeout(10):  # (not wait_for: its task would answer a turn later)
            for _ in range(50):
                await a.send(msg)
                await b.send(await b.recv())  # the answer, in the step that claimed
                assert torch.equal(await a.recv(), msg)
        for _ in range(3):  # the ends' last checks run
            await asyncio.sleep(0)
    finally:
        loop.call_later = call_later  # type: ignore[method-assign]
    # Only a's last claim is owed: nothing took it along, so it lingers, once.
    assert len(armed) <= 1, f"{len(armed)} linger timers armed: {armed[:4]}"
    await eventually(lambda: b.stats.send_credits == a._proto.recv_buffer_bytes, 5,
                     "the last answer's credit back at b")


async def test_a_message_that_needs_every_credit_back_is_not_stalled_by_lingering_credit(
        pair_factory: PairFactory) -> None:
    # A message larger than the window waits until the peer has every credit back; credit
    # owed for small messages claimed before it lingers, and must still come back by itself.
    window = 64 * 1024
    a, b = await pair_factory(recv_buffer_bytes=window, max_inflight_bytes=window)
    small = torch.ones(16, dtype=torch.uint8)
    big = torch.arange(window, dtype=torch.int32)  # 4 × the window
    for _ in range(3):
        await a.send(small)
        assert torch.equal(await asyncio.wait_for(b.recv(), 5), small)
    receiving = asyncio.create_task(b.recv())
    await asyncio.wait_for(a.send(big), 5)
    assert torch.equal(await asyncio.wait_for(receiving, 5), big)


async def test_credits_left_unset_are_the_transports_and_set_ones_are_granted_as_set(
        pair_factory: PairFactory) -> None:
    # An unset grant travels as 0 (the default of the transport the handshake picks, which
    # neither end knows before): both ends must read it so, or one would send beyond it.
    a, b = await pair_factory(server_opts={"recv_buffer_bytes": 3 * MiB})
    assert a._proto.recv_buffer_bytes == b._proto.peer_credit == 513 * MiB
    assert b._proto.recv_buffer_bytes == a._proto.peer_credit == 3 * MiB
    assert a._send_budget.capacity == b._send_budget.capacity == 512 * MiB


async def test_a_send_that_waits_for_credits_is_posted_with_its_callers_stream_current(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A send that must wait (credits, budget, its turn) is posted later, from a callback:
    its caller's CUDA stream, taken at the call, is current then, so that the payload is
    read after the caller's work on it (whatever stream is current on the loop thread by
    then: another task's, or none). CUDA's current stream is faked at the seams the pipe
    uses (this machine may have no GPU)."""
    current = ["the loop thread's own"]

    @contextlib.contextmanager
    def stream(s: Any) -> Iterator[None]:
        prev, current[0] = current[0], s
        try:
            yield
        finally:
            current[0] = prev

    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(_pipe, "_callers_stream", lambda out: f"the caller's of {out.nbytes}")
    a, b = await pair_factory(recv_buffer_bytes=1 << 20)
    posted: list[tuple[str | None, str]] = []
    post_now = a._post_now

    def recording(out: Any, key: str | None, *args: Any) -> Any:
        posted.append((key, current[0]))
        return post_now(out, key, *args)

    monkeypatch.setattr(a, "_post_now", recording)
    async with asyncio.timeout(10):
        await a.send(torch.ones(200_000), key="first")  # 800 kB of the 1 MiB of credits
        waiting = asyncio.create_task(a.send(torch.ones(100_000), key="queued"))
        await asyncio.sleep(0)
        assert a._send_queue, "the second send should wait for credits"
        current[0] = "another task's"  # what the loop thread has current meanwhile
        await b.recv(key="first")  # its credits go back: the queued send is posted
        await waiting
        await b.recv(key="queued")
    assert posted == [("first", "the loop thread's own"),
                      ("queued", "the caller's of 400000")], posted
