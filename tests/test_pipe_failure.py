"""A peer that dies (SIGKILL mid-transfer) or freezes (SIGSTOP): the surviving end's pending and
later calls raise ``BrokenPipe`` promptly, with the cause chained, and nothing leaks."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import torch
from conftest import HOST, SpawnPeer, close_quietly, eventually, socket_fds

import aiokvpipe

MiB = 1 << 20
BREAK_DEADLINE_S = 2.0

pytestmark = pytest.mark.timeout(60)


def assert_broken(exc: BaseException | None, what: str) -> None:
    assert isinstance(exc, aiokvpipe.BrokenPipe), f"{what}: {exc!r}, not BrokenPipe"
    assert isinstance(exc, BrokenPipeError)
    assert exc.__cause__ is not None, f"{what}: BrokenPipe without a __cause__"


async def test_sigkilled_peer_breaks_every_pending_and_later_call(
        spawn_peer: SpawnPeer, any_loop: str) -> None:
    loop = asyncio.get_running_loop()
    # The peer listens and floods us with 8 MiB messages; it grants us only 1 MiB of credits,
    # so our second send to it must wait (a pending send).
    peer = await spawn_peer(role="listen", mode="flood", size=8 * MiB,
                            opts={"recv_buffer_bytes": MiB})
    port = (await peer.expect("listening"))["port"]
    tasks_before = asyncio.all_tasks()
    sockets_before = socket_fds()
    unhandled: list[dict[str, object]] = []  # errors in callbacks, "never retrieved" ones
    loop.set_exception_handler(lambda _, context: unhandled.append(context))

    pipe = await aiokvpipe.connect(HOST, port)
    try:
        await peer.expect("connected")
        await peer.expect("flooding")
        received = 0
        enough = loop.create_future()

        async def consume() -> None:
            nonlocal received
            while True:
                msg = await pipe.recv(key="flood")
                assert msg.numel() == 8 * MiB and bool((msg == 7).all())
                received += 1
                if received == 3 and not enough.done():
                    enough.set_result(None)

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(asyncio.shield(enough), 30)  # transfer is under way
        # Whatever pends when the peer dies: recvs (keyed, unkeyed) and sends (one posted and
        # waiting for credits the dead peer will never grant, one queued behind it).
        await pipe.send(torch.zeros(2 * MiB, dtype=torch.uint8))  # oversize: admitted alone
        pending = {
            "consumer recv(key='flood')": consumer,
            "recv()": asyncio.create_task(pipe.recv()),
            "recv(key='other')": asyncio.create_task(pipe.recv(key="other")),
            "send waiting for credits": asyncio.create_task(pipe.send(torch.ones(MiB))),
            "send queued behind it": asyncio.create_task(pipe.send(torch.ones(10))),
        }
        done, _ = await asyncio.wait(pending.values(), timeout=0.2)
        assert not done, f"these did not pend: {[n for n, t in pending.items() if t in done]}"
        finished_at: dict[str, float] = {}
        for name, task in pending.items():
            task.add_done_callback(
                lambda _, name=name: finished_at.setdefault(name, time.monotonic()))

        killed_at = time.monotonic()
        peer.send_signal(signal.SIGKILL)
        done, not_done = await asyncio.wait(pending.values(), timeout=10)
        assert not not_done, f"still pending 10 s after SIGKILL: {list(not_done)}"
        slowest = max(finished_at.values()) - killed_at
        assert slowest < BREAK_DEADLINE_S, f"took {slowest:.2f} s to notice the dead peer"
        for name, task in pending.items():
            assert_broken(task.exception(), name)
        assert received >= 3

        # Every later call raises BrokenPipe too, with the cause.
        for name, call in [("send", lambda: pipe.send(torch.ones(3))),
                           ("send(None)", lambda: pipe.send(None)),
                           ("recv", lambda: pipe.recv()),
                           ("recv(key)", lambda: pipe.recv(key="flood"))]:
            with pytest.raises(aiokvpipe.BrokenPipe) as info:
                await asyncio.wait_for(call(), 2)
            assert_broken(info.value, f"later {name}")
        assert pipe.closed
        await asyncio.wait_for(pipe.aclose(), 5)  # releases resources, does not raise
        assert await peer.wait(10) == -signal.SIGKILL
    finally:
        await close_quietly(pipe)

    leftover = asyncio.all_tasks() - tasks_before - {asyncio.current_task()}
    if leftover:
        _, still = await asyncio.wait(leftover, timeout=2)
        assert not still, f"tasks leaked by the broken pipe: {still}"
    await eventually(lambda: socket_fds() <= sockets_before, 2.0,
                     f"sockets leaked: {socket_fds() - sockets_before}")
    loop.set_exception_handler(None)
    assert not unhandled, f"errors nobody handled: {[c.get('message') for c in unhandled]}"


async def test_sigkilled_sender_mid_payload_breaks_a_waiting_recv(
        spawn_peer: SpawnPeer) -> None:
    # The peer dies while one large payload is half-way through the socket.
    peer = await spawn_peer(role="listen", mode="flood", size=256 * MiB)
    port = (await peer.expect("listening"))["port"]
    pipe = await aiokvpipe.connect(HOST, port)
    try:
        await peer.expect("connected")
        recv = asyncio.create_task(pipe.recv(key="flood"))
        await eventually(lambda: pipe.stats.recv_buffered_bytes > 0, 10,
                         "the first 256 MiB header arrived")
        peer.send_signal(signal.SIGSTOP)  # freeze it mid-payload, then kill it there
        assert not recv.done() and pipe.stats.messages_received == 0
        killed_at = time.monotonic()
        peer.send_signal(signal.SIGKILL)
        with pytest.raises(aiokvpipe.BrokenPipe) as info:
            await asyncio.wait_for(recv, 10)
        assert time.monotonic() - killed_at < BREAK_DEADLINE_S
        assert_broken(info.value, "recv of the half-sent payload")
    finally:
        await close_quietly(pipe)


async def test_frozen_peer_is_detected_by_heartbeat(spawn_peer: SpawnPeer) -> None:
    interval, timeout = 0.2, 0.6
    peer = await spawn_peer(role="listen", mode="idle", opts={"heartbeat_interval": interval})
    port = (await peer.expect("listening"))["port"]
    pipe = await aiokvpipe.connect(HOST, port, heartbeat_interval=interval,
                                   heartbeat_timeout=timeout)
    try:
        await peer.expect("connected")
        recv = asyncio.create_task(pipe.recv())
        # An idle but live peer keeps the pipe open well past the heartbeat timeout.
        done, _ = await asyncio.wait({recv}, timeout=3 * timeout)
        assert not done, f"idle pipe to a live peer broke: {recv.exception()!r}"

        stopped_at = time.monotonic()
        peer.send_signal(signal.SIGSTOP)
        with pytest.raises(aiokvpipe.BrokenPipe) as info:
            await asyncio.wait_for(recv, timeout + 5)
        elapsed = time.monotonic() - stopped_at
        assert_broken(info.value, "recv from a frozen peer")
        assert isinstance(info.value.__cause__, TimeoutError), info.value.__cause__
        # Not before the peer could have been silent for `timeout`, and promptly after.
        assert timeout - interval - 0.1 <= elapsed <= timeout + 1.0, elapsed
        with pytest.raises(aiokvpipe.BrokenPipe):
            await pipe.send(torch.ones(1))

        # Thawed, the peer finds its pipe broken too, and ends by itself.
        peer.send_signal(signal.SIGCONT)
        ended = await peer.expect("recv_error", timeout=10)
        assert ended["type"] == "BrokenPipe", ended
        assert await peer.wait(10) == 0
    finally:
        await close_quietly(pipe)


async def test_heartbeats_disabled_keep_an_idle_pipe_open(spawn_peer: SpawnPeer) -> None:
    # heartbeat_interval=None on both ends: silence is not a failure.
    peer = await spawn_peer(role="listen", mode="idle", opts={"heartbeat_interval": None})
    port = (await peer.expect("listening"))["port"]
    pipe = await aiokvpipe.connect(HOST, port, heartbeat_interval=None)
    try:
        await peer.expect("connected")
        recv = asyncio.create_task(pipe.recv())
        done, _ = await asyncio.wait({recv}, timeout=1.0)
        assert not done, f"pipe without heartbeats broke: {recv.exception()!r}"
        await pipe.send(None)
        assert (await peer.expect("received"))["type"] == "NoneType"
        peer.send_signal(signal.SIGKILL)
        with pytest.raises(aiokvpipe.BrokenPipe):  # a dead peer is still noticed
            await asyncio.wait_for(recv, BREAK_DEADLINE_S)
    finally:
        await close_quietly(pipe)


async def test_default_heartbeats_survive_a_3_s_stall_of_the_peer(spawn_peer: SpawnPeer
                                                                   ) -> None:
    # An engine's loop may be held for seconds (a long prefill holding the GIL): its
    # heartbeats stop meanwhile, and the pipe must not take it for dead (issue 13).
    peer = await spawn_peer(role="listen", mode="echo")
    port = (await peer.expect("listening"))["port"]
    pipe = await aiokvpipe.connect(HOST, port)  # default heartbeat options
    try:
        await peer.expect("connected")
        peer.send_signal(signal.SIGSTOP)
        await asyncio.sleep(3.0)  # the stall itself, not a stand-in for synchronisation
        peer.send_signal(signal.SIGCONT)
        await pipe.send(torch.arange(5))
        back = await asyncio.wait_for(pipe.recv(), 10)
        assert torch.equal(back, torch.arange(5)) and not pipe.closed
    finally:
        await close_quietly(pipe)


async def test_default_heartbeats_find_a_frozen_peer_within_10_s(spawn_peer: SpawnPeer
                                                                  ) -> None:
    peer = await spawn_peer(role="listen", mode="idle")
    port = (await peer.expect("listening"))["port"]
    pipe = await aiokvpipe.connect(HOST, port)  # default heartbeat options
    try:
        await peer.expect("connected")
        recv = asyncio.create_task(pipe.recv())
        stopped_at = time.monotonic()
        peer.send_signal(signal.SIGSTOP)
        with pytest.raises(aiokvpipe.BrokenPipe) as info:
            await asyncio.wait_for(recv, 15)
        elapsed = time.monotonic() - stopped_at
        assert isinstance(info.value.__cause__, TimeoutError), info.value.__cause__
        assert 3.0 < elapsed <= 10.0, elapsed
    finally:
        peer.send_signal(signal.SIGCONT)
        await close_quietly(pipe)
