"""10,000 random messages from a real peer process: nothing lost, corrupted, duplicated or
reordered, per key and unkeyed. Sizes are 0-64 KiB, plus ~10% of 70-800 kB messages so that
payloads travel both inside their header frames and on the data plane. Each tensor carries its
message's sequence numbers and a CRC32 of its payload (see ``pipe_peer.check_message``); the
receiver recomputes the sender's plan from the seed and checks every message against it."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pipe_peer
import pytest
from conftest import HOST, SpawnPeer, close_quietly

import aiokvpipe

COUNT = 10_000
SEED = 20240611

pytestmark = pytest.mark.timeout(90)


async def test_ten_thousand_random_messages_from_a_peer_process(spawn_peer: SpawnPeer) -> None:
    plans = pipe_peer.plan_stream(SEED, COUNT)
    by_key: dict[str | None, list[pipe_peer.Planned]] = defaultdict(list)
    for p in plans:
        by_key[p.key].append(p)
    # The plan really is a mix of everything the test claims to cover.
    assert set(by_key) == set(pipe_peer.STREAM_KEYS)
    assert {p.structure for p in plans} == {"none", "tensor", "list", "dict"}
    small = [p for p in plans if p.nbytes <= 64 * 1024]
    assert min(p.nbytes for p in plans) == 0 and max(p.nbytes for p in small) > 60 * 1024
    # ~10% above 64 KiB: both the inline path and the data plane carry payloads, interleaved.
    assert 0.05 < 1 - len(small) / COUNT < 0.15

    listener = await aiokvpipe.listen(HOST, 0)
    pipe = None
    try:
        peer = await spawn_peer(role="connect", port=listener.port, mode="stream", seed=SEED,
                                count=COUNT, senders=4, ack=True)
        pipe = await asyncio.wait_for(listener.accept(), 30)
        await peer.expect("connected")
        started = time.monotonic()

        received: dict[str | None, int] = defaultdict(int)

        async def consume(key: str | None) -> None:
            for p in by_key[key]:
                msg = await pipe.recv(key=key)
                pipe_peer.check_message(p, msg)
                received[key] += 1

        await asyncio.wait_for(asyncio.gather(*(consume(k) for k in by_key)), 60)
        elapsed = time.monotonic() - started
        assert dict(received) == {k: len(v) for k, v in by_key.items()}
        assert (await peer.expect("sent"))["sent"] == COUNT
        # The peer closes once we acknowledge: nothing extra may arrive on any key.
        await pipe.send(None, key="ack")
        for key in by_key:
            with pytest.raises(aiokvpipe.PipeClosed):
                extra = await asyncio.wait_for(pipe.recv(key=key), 10)
                raise AssertionError(f"unexpected extra message on key {key!r}: {extra!r}")
        await peer.expect("done")
        assert pipe.stats.messages_received == COUNT
        assert pipe.stats.bytes_received == sum(p.nbytes for p in plans)
        assert elapsed < 60, f"{COUNT} messages took {elapsed:.1f} s"
        assert await peer.wait(10) == 0
    finally:
        if pipe is not None:
            await close_quietly(pipe)
        await listener.aclose()
