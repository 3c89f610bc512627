"""Busy polling: after traffic the loop keeps polling for a window that adapts to the gaps
between messages, stops once it ran out, and costs nothing while traffic is sparse."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from conftest import HOST, PairFactory, SpawnPeer, close_quietly, eventually

import aiokvpipe
from aiokvpipe._busypoll import MIN_WINDOW_S, BusyPoller, SpinPolicy, poller_for
from aiokvpipe._options import MAX_BUSY_POLL_US

pytestmark = pytest.mark.timeout(30)

MOST = 200e-6


# -- the policy, with the times given ----------------------------------------------------------


def test_an_answer_within_the_window_keeps_it() -> None:
    p = SpinPolicy(MOST)
    assert p.wrote(1.0) == MOST
    p.read(1.0 + MOST / 2)
    assert p.window_s == MOST


def test_answers_later_than_the_most_halve_the_window_down_to_nothing() -> None:
    p = SpinPolicy(MOST)
    windows = []
    now = 1.0
    for _ in range(8):
        now += 1.0
        p.wrote(now)
        p.read(now + 10 * MOST)
        windows.append(p.window_s)
    assert windows[:4] == [MOST / 2, MOST / 4, MOST / 8, MOST / 16]
    assert MOST / 16 / 2 < MIN_WINDOW_S
    assert windows[4:] == [0.0] * 4
    assert p.wrote(now + 1.0) == 0.0


def test_answers_a_longer_window_would_catch_grow_it_back_to_the_most() -> None:
    p = SpinPolicy(MOST)
    p.window_s = 0.0
    windows = []
    now = 1.0
    for _ in range(7):
        now += 1.0
        p.wrote(now)
        p.read(now + 0.9 * MOST)  # within the most, beyond the window until it has grown
        windows.append(p.window_s)
    assert windows[:5] == [MIN_WINDOW_S, 2 * MIN_WINDOW_S, 4 * MIN_WINDOW_S,
                           8 * MIN_WINDOW_S, 16 * MIN_WINDOW_S]
    assert windows[5:] == [MOST, MOST]


def test_writes_without_answers_halve_the_window() -> None:
    # One-way traffic: each write finds the window after the last one run out, unanswered.
    p = SpinPolicy(MOST)
    now = 1.0
    for _ in range(6):
        now += 2 * MOST
        p.wrote(now)
    assert p.window_s == 0.0


def test_writes_in_a_burst_and_reads_without_a_write_judge_nothing() -> None:
    p = SpinPolicy(MOST)
    for i in range(5):
        p.wrote(1.0 + i * MOST / 10)  # each within the window of the one before
    p.read(2.0)  # judges the last write's window (halves it): the answer was late
    assert p.window_s == MOST / 2
    for i in range(5):
        p.read(3.0 + i)  # the peer's own traffic: no write of ours awaits it
    assert p.window_s == MOST / 2


# -- the poller on a running loop ---------------------------------------------------------------


async def test_the_loop_polls_for_the_window_after_traffic_then_stops() -> None:
    window = 20e-3
    poller = BusyPoller(asyncio.get_running_loop(), window)
    iterations = 0

    async def count_iterations() -> None:
        nonlocal iterations
        while True:
            await asyncio.sleep(0)
            iterations += 1

    t0 = time.monotonic()
    poller.wrote()  # and nothing read after it
    assert poller.polling
    await eventually(lambda: not poller.polling, 5, "the poller stops")
    elapsed = time.monotonic() - t0
    assert elapsed >= window, f"stopped after {elapsed * 1e3:.1f} ms, before its window"
    assert elapsed < window + 1.0
    # Stopped, it keeps nothing scheduled: the loop sleeps until something happens.
    counter = asyncio.create_task(count_iterations())
    await asyncio.sleep(0.01)
    counter.cancel()
    assert not poller.polling


async def test_a_window_shrunk_to_nothing_polls_not_at_all() -> None:
    poller = BusyPoller(asyncio.get_running_loop(), MOST)
    poller.policy.window_s = 0.0
    poller.wrote()
    assert not poller.polling


async def test_a_read_ends_the_polling_at_its_next_turn() -> None:
    poller = BusyPoller(asyncio.get_running_loop(), 10.0)
    poller.wrote()
    assert poller.polling
    poller.read()
    await asyncio.sleep(0)  # one loop iteration: the poll callback runs once more, and stops
    await asyncio.sleep(0)
    assert not poller.polling


# -- on a real pipe ----------------------------------------------------------------------------


async def test_a_pipe_keeps_its_loop_polling_after_a_message(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(busy_poll_us=1000)
    poller = a._control._poller
    assert poller is not None and poller is b._control._poller  # one per loop
    await eventually(lambda: not poller.polling, 5, "the handshake's polling ends")
    await a.send(torch.ones(16))
    assert poller.polling
    assert torch.equal(await asyncio.wait_for(b.recv(), 5), torch.ones(16))


async def test_busy_poll_zero_leaves_the_loop_alone(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(busy_poll_us=0)
    assert a._control._poller is None and b._control._poller is None
    await a.send(torch.ones(16))
    await asyncio.wait_for(b.recv(), 5)


async def test_the_pipes_of_a_loop_share_one_poller_with_the_longest_window(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory(client_opts={"busy_poll_us": 50},
                              server_opts={"busy_poll_us": 300})
    poller = a._control._poller
    assert poller is b._control._poller
    assert poller is not None and poller.policy.most_s == pytest.approx(300e-6)
    assert poller_for(asyncio.get_running_loop(), 0) is None


async def test_requests_answered_at_once_keep_the_window(spawn_peer: SpawnPeer) -> None:
    # Requests to an echo process: each answer comes within the window after its request.
    async with await aiokvpipe.listen(HOST, 0, busy_poll_us=MAX_BUSY_POLL_US) as lst:
        peer = await spawn_peer(role="connect", port=lst.port, mode="echo")
        a = await asyncio.wait_for(lst.accept(), 20)
    try:
        poller = a._control._poller
        assert poller is not None
        for _ in range(50):
            await a.send(torch.ones(4))
            await asyncio.wait_for(a.recv(), 10)
        assert poller.policy.window_s == MAX_BUSY_POLL_US * 1e-6
    finally:
        await close_quietly(a)
        await peer.wait(20)


async def test_one_way_messages_stop_the_polling(pair_factory: PairFactory) -> None:
    # Messages 5 ms apart, none answered (the peer returns credits after 1 ms at the
    # earliest, beyond the 100 µs most): after a few the sender no longer polls at all.
    a, b = await pair_factory(client_opts={"busy_poll_us": 100},
                              server_opts={"busy_poll_us": 0})
    poller = a._control._poller
    assert poller is not None and b._control._poller is None
    for _ in range(8):
        await asyncio.sleep(5e-3)  # the traffic's own gap, the subject of the test
        await a.send(torch.ones(4))
        await asyncio.wait_for(b.recv(), 5)
    assert poller.policy.window_s == 0.0
    await a.send(torch.ones(4))
    assert not poller.polling


@pytest.mark.parametrize("value", [-1, 1001, float("nan")])
def test_busy_poll_us_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        aiokvpipe.PipeOptions(busy_poll_us=value)
