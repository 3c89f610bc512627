"""Busy polling: after traffic the loop keeps polling for a window that adapts to the gaps
between messages, stops once it ran out, and costs nothing while traffic is sparse."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref

import pytest
import torch
from conftest import HOST, PairFactory, SpawnPeer, close_quietly, eventually

import aiokvpipe
from aiokvpipe import _wire
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
    for _ in range(12):
        now += 1.0
        p.wrote(now)
        p.read(now + 10 * MOST)
        windows.append(p.window_s)
    # Halved at every second late answer: one alone may be a hiccup.
    assert windows[:8] == [MOST, MOST / 2, MOST / 2, MOST / 4, MOST / 4, MOST / 8, MOST / 8,
                           MOST / 16]
    assert MOST / 16 / 2 < MIN_WINDOW_S
    assert windows[8:] == [MOST / 16, 0.0, 0.0, 0.0]
    assert p.wrote(now + 1.0) == 0.0


def test_one_late_answer_among_prompt_ones_keeps_the_window() -> None:
    # (And half the answers caught is reason enough to go on polling for them.)
    p = SpinPolicy(MOST)
    now = 1.0
    for i in range(20):
        now += 1.0
        p.wrote(now)
        p.read(now + (10 * MOST if i % 2 else MOST / 2))
    assert p.window_s == MOST


def test_answers_a_longer_window_would_catch_grow_it_to_cover_such_answers() -> None:
    p = SpinPolicy(MOST)
    p.window_s = 0.0
    p.wrote(1.0)
    p.read(1.0 + 0.3 * MOST)
    assert p.window_s == 0.0  # one alone says little
    p.wrote(2.0)
    p.read(2.0 + 0.4 * MOST)
    assert p.window_s == pytest.approx(0.6 * MOST)  # one and a half times the gap
    p.wrote(3.0)
    p.read(3.0 + 0.5 * MOST)  # caught now
    assert p.window_s == pytest.approx(0.6 * MOST)
    for t in (4.0, 5.0):
        p.wrote(t)
        p.read(t + 0.9 * MOST)
    assert p.window_s == MOST  # never beyond the most
    p.window_s = 0.0
    for t in (6.0, 7.0):
        p.wrote(t)
        p.read(t + 1e-6)
    assert p.window_s == MIN_WINDOW_S  # from nothing, at least the least


def test_writes_without_answers_halve_the_window() -> None:
    # One-way traffic: each write finds the window after the one before run out, unanswered.
    p = SpinPolicy(MOST)
    now = 1.0
    for _ in range(12):
        now += 2 * MOST
        p.wrote(now)
    assert p.window_s == 0.0


def test_a_write_no_read_answered_polls_not_at_all() -> None:
    # A stream: the next write comes before any answer; polling would only slow the peer.
    p = SpinPolicy(MOST)
    assert p.wrote(1.0) == MOST
    for i in range(1, 5):
        assert p.wrote(1.0 + i * MOST / 10) == 0.0  # each within the window before it
    assert p.window_s == MOST  # (and none of them ran it out)
    p.read(1.0 + MOST / 2)
    assert p.wrote(2.0) == MOST


def test_a_stream_unanswered_for_longer_than_the_window_halves_it() -> None:
    # Writes closer together than the window, none answered for ten windows: the window
    # after the first of them ran out with nothing read, again and again (judged from each
    # write before, none would have: the window stayed, polled for after every read).
    p = SpinPolicy(MOST)
    now = 1.0
    assert p.wrote(now) == MOST
    for _ in range(40):
        now += MOST / 4
        assert p.wrote(now) == 0.0
    assert p.window_s == 0.0
    p.read(now + MOST / 10)  # the peer's credit, judged from the stream's first write
    assert p.window_s == 0.0 and p.wrote(now + MOST) == 0.0


def test_a_window_that_ran_out_once_is_one_miss() -> None:
    # A hiccup of three windows between two writes, then writes and their answer in time:
    # one miss, not one for each write after the hiccup (two would halve the window).
    p = SpinPolicy(MOST)
    now = 1.0
    p.wrote(now)
    now += 3 * MOST
    p.wrote(now)  # the window after the first write ran out: one miss
    for _ in range(4):
        now += MOST / 10
        p.wrote(now)
    p.read(now + MOST / 10)  # half a window after the write that counted the miss
    assert p.window_s == MOST


def test_reads_without_a_write_judge_nothing() -> None:
    p = SpinPolicy(MOST)
    for i in range(5):
        p.read(3.0 + i)  # the peer's own traffic: no write of ours awaits it
    assert p.window_s == MOST


# -- the poller on a running loop ---------------------------------------------------------------


class CountingPoller(BusyPoller):
    """Counts its poll callbacks."""

    __slots__ = ("polls",)

    def __init__(self, most_s: float) -> None:
        super().__init__(most_s)
        self.polls = 0

    def _poll(self, loop: asyncio.AbstractEventLoop) -> None:
        self.polls += 1
        super()._poll(loop)


async def test_the_loop_polls_for_the_window_after_a_write_then_stops() -> None:
    window = 20e-3
    loop = asyncio.get_running_loop()
    poller = CountingPoller(window)
    t0 = time.monotonic()
    poller.wrote(loop)  # and nothing read after it
    assert poller.polling
    await eventually(lambda: not poller.polling, 5, "the poller stops")
    elapsed = time.monotonic() - t0
    assert elapsed >= window, f"stopped after {elapsed * 1e3:.1f} ms, before its window"
    assert poller.polls > 1
    # Stopped, it keeps nothing scheduled: the loop may sleep until something happens.
    polls = poller.polls
    for _ in range(5):
        await asyncio.sleep(0)
    assert poller.polls == polls


async def test_a_window_shrunk_to_nothing_polls_not_at_all() -> None:
    poller = BusyPoller(MOST)
    poller.policy.window_s = 0.0
    poller.wrote(asyncio.get_running_loop())
    assert not poller.polling


async def test_a_read_ends_the_polling_at_its_next_turn() -> None:
    poller = CountingPoller(10.0)
    poller.wrote(asyncio.get_running_loop())
    assert poller.polling
    poller.read()
    for _ in range(3):
        await asyncio.sleep(0)  # the poll callback runs once more, and stops
    assert not poller.polling and poller.polls == 1


def test_a_closed_loop_is_not_kept_alive_by_its_poller() -> None:
    loop = asyncio.new_event_loop()
    poller = poller_for(loop, MOST)
    assert poller is not None
    loop.call_soon(loop.stop)
    poller.wrote(loop)  # a poll scheduled when the loop closes
    loop.run_forever()
    loop.close()
    ref = weakref.ref(loop)
    del loop
    gc.collect()
    assert ref() is None


def test_a_loops_poller_keeps_the_longest_most_asked_for() -> None:
    loop = asyncio.new_event_loop()
    try:
        poller = poller_for(loop, 50e-6)
        assert poller is not None
        assert poller_for(loop, 300e-6) is poller
        assert poller.policy.most_s == 300e-6
        assert poller_for(loop, 100e-6) is poller
        assert poller.policy.most_s == 300e-6
        assert poller_for(loop, 0) is None
    finally:
        loop.close()


# -- on a real pipe ----------------------------------------------------------------------------


async def test_a_pipe_keeps_its_loop_polling_after_a_message(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(busy_poll_us=1000)
    poller = a._control._poller
    assert poller is not None and poller is b._control._poller  # one per loop
    await a.send(torch.ones(16))
    assert poller.polling
    assert torch.equal(await asyncio.wait_for(b.recv(), 5), torch.ones(16))


async def test_writes_that_await_no_answer_do_not_poll(pair_factory: PairFactory) -> None:
    # A credit return, a heartbeat, an acknowledgement: nothing answers them, so polling
    # after one only burns CPU (and a request written next would count as unanswered).
    a, b = await pair_factory(busy_poll_us=1000)
    poller = a._control._poller
    assert poller is not None
    await eventually(lambda: not poller.polling, 5, "the handshake's polling ends")
    a._control.write(_wire.Heartbeat())
    a._control.write_encoded(_wire.encode(_wire.Heartbeat()))
    assert not poller.polling
    # Gathered writes poll once written if one of them awaits an answer.
    assert a._control.hold()
    a._control.write_encoded(_wire.encode(_wire.Heartbeat()))
    a._control.write_encoded(_wire.encode(_wire.Heartbeat()), answer_due=True)
    assert not poller.polling
    a._control.release()
    assert poller.polling


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


async def test_requests_answered_at_once_are_polled_for(spawn_peer: SpawnPeer) -> None:
    # Requests to an echo process, each written after the last answer was read: the loop
    # polls for the answer (a loaded machine may let a few answers come late).
    async with await aiokvpipe.listen(HOST, 0, busy_poll_us=MAX_BUSY_POLL_US) as lst:
        peer = await spawn_peer(role="connect", port=lst.port, mode="echo")
        a = await asyncio.wait_for(lst.accept(), 20)
    try:
        poller = a._control._poller
        assert poller is not None
        polled = 0
        for _ in range(50):
            await a.send(torch.ones(4))
            polled += poller.polling
            await asyncio.wait_for(a.recv(), 10)
        assert polled >= 25, f"polled for {polled} answers of 50"
    finally:
        await close_quietly(a)
        await peer.wait(20)


async def test_one_way_messages_stop_the_polling(pair_factory: PairFactory) -> None:
    # Messages 5 ms apart, none answered (the peer returns credits after 1 ms at the
    # earliest, beyond the 100 µs most): soon the sender no longer polls at all.
    a, b = await pair_factory(client_opts={"busy_poll_us": 100},
                              server_opts={"busy_poll_us": 0})
    poller = a._control._poller
    assert poller is not None and b._control._poller is None
    for sent in range(50):
        if not poller.policy.window_s:
            break
        await asyncio.sleep(5e-3)  # the traffic's own gap, the subject of the test
        await a.send(torch.ones(4))
        await asyncio.wait_for(b.recv(), 5)
    assert poller.policy.window_s == 0.0, f"still {poller.policy.window_s} after {sent}"
    await a.send(torch.ones(4))
    assert not poller.polling


@pytest.mark.parametrize("value", [True, "200", None])
def test_busy_poll_us_not_a_number_is_refused(value: object) -> None:
    with pytest.raises(TypeError, match="busy_poll_us"):
        aiokvpipe.PipeOptions(busy_poll_us=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, 1001, float("nan"), float("inf")])
def test_busy_poll_us_out_of_range_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="busy_poll_us"):
        aiokvpipe.PipeOptions(busy_poll_us=value)
