"""Keys and ordering on a real pipe (both event loops): keyed messages go only to
``recv(key=...)``, unkeyed ones to ``recv()`` in FIFO order, concurrent ``send()`` calls
arrive in call order."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import torch
from conftest import PairFactory

import aiokvpipe

Pair = tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]


def tag(group: int, index: int, nbytes: int = 64) -> torch.Tensor:
    """A message identifying itself: [group, index] then filler that depends on both."""
    t = torch.full((max(2, nbytes // 8),), group * 1_000_003 + index, dtype=torch.int64)
    t[0], t[1] = group, index
    return t


def untag(t: torch.Tensor) -> tuple[int, int]:
    group, index = int(t[0]), int(t[1])
    assert torch.all(t[2:] == group * 1_000_003 + index), f"payload of {group}/{index} damaged"
    return group, index


async def test_concurrent_keyed_recvs_each_get_exactly_their_messages(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    keys = [f"request-{i}" for i in range(8)] + ["", "ключ-✓"]
    per_key = 6
    unkeyed = 40
    rng = random.Random(7)
    # A random interleaving that keeps each key's own order; group -1 is unkeyed.
    order = [g for g in range(len(keys)) for _ in range(per_key)] + [-1] * unkeyed
    rng.shuffle(order)

    got: dict[int, list[tuple[int, int]]] = defaultdict(list)

    async def keyed_consumer(g: int) -> None:
        for _ in range(per_key):
            got[g].append(untag(await b.recv(key=keys[g])))

    async def unkeyed_consumer() -> None:
        for _ in range(unkeyed):
            got[-1].append(untag(await b.recv()))

    consumers = [asyncio.create_task(keyed_consumer(g)) for g in range(len(keys))]
    consumers.append(asyncio.create_task(unkeyed_consumer()))
    await asyncio.sleep(0)  # let every consumer reach its first recv() before anything arrives
    counters: dict[int, int] = defaultdict(int)
    for g in order:
        i = counters[g]
        counters[g] += 1
        await a.send(tag(g, i, rng.randint(16, 20000)), key=None if g < 0 else keys[g])
    await asyncio.wait_for(asyncio.gather(*consumers), 30)

    for g in range(len(keys)):
        assert got[g] == [(g, i) for i in range(per_key)], f"key {keys[g]!r}"
    assert got[-1] == [(-1, i) for i in range(unkeyed)]
    assert b.stats.recv_buffered_messages == 0


async def test_messages_wait_unclaimed_until_their_key_is_asked_for(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    await a.send(tag(1, 0), key="a")
    await a.send(tag(2, 0), key="b")
    await a.send(tag(0, 0))
    await a.send(tag(1, 1), key="a")
    await a.send(tag(3, 0), key="")
    await a.send(tag(0, 1))
    await a.send(tag(9, 0), key="never-asked-for")
    # Wait for all seven to arrive (each message is claimed by exactly one recv below).
    await a.send(tag(4, 0), key="last")
    assert untag(await b.recv(key="last")) == (4, 0)
    assert b.stats.recv_buffered_messages == 7

    assert untag(await b.recv(key="b")) == (2, 0)
    assert untag(await b.recv()) == (0, 0)  # unkeyed FIFO is not held up by keyed messages
    assert untag(await b.recv(key="a")) == (1, 0)
    assert untag(await b.recv(key="")) == (3, 0)  # "" is a key of its own, not "unkeyed"
    assert untag(await b.recv()) == (0, 1)
    assert untag(await b.recv(key="a")) == (1, 1)
    assert b.stats.recv_buffered_messages == 1  # only "never-asked-for" is left

    # Nothing more for these keys: a recv waits (it would be wrong to get another key's message).
    for key in ("a", "b", None, ""):
        waiting = asyncio.create_task(b.recv(key=key))
        done, _ = await asyncio.wait({waiting}, timeout=0.05)
        assert not done, f"recv(key={key!r}) returned {waiting.result()!r} from nowhere"
        waiting.cancel()
    await a.send(tag(0, 2))
    assert untag(await b.recv()) == (0, 2)


async def test_concurrent_unkeyed_recvs_are_served_in_call_order(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    n = 20
    receivers = [asyncio.create_task(b.recv()) for _ in range(n)]
    await asyncio.sleep(0)  # every receiver reaches recv() in creation (= call) order
    for i in range(n):
        await a.send(tag(0, i))
    results = await asyncio.wait_for(asyncio.gather(*receivers), 10)
    assert [untag(r) for r in results] == [(0, i) for i in range(n)]


async def test_concurrent_sends_are_delivered_in_call_order(pair_factory: PairFactory) -> None:
    # A small in-flight budget makes sends queue behind each other.
    a, b = await pair_factory(max_inflight_bytes=256 * 1024)
    n = 64
    rng = random.Random(3)
    called: list[int] = []
    keyed_called: list[int] = []

    async def sender(i: int, yields: int, size: int, keyed: bool) -> None:
        for _ in range(yields):
            await asyncio.sleep(0)  # scramble which task calls send() when
        # No await between recording and calling send(): this is the call order.
        (keyed_called if keyed else called).append(i)
        await a.send(tag(0, i, size), key="k" if keyed else None)

    plan = [(i, rng.randint(0, 6), rng.randint(16, 192 * 1024), rng.random() < 0.3)
            for i in range(n)]
    senders = [asyncio.create_task(sender(*p)) for p in plan]
    unkeyed = [untag(await asyncio.wait_for(b.recv(), 10))[1]
               for _ in range(sum(1 for p in plan if not p[3]))]
    keyed = [untag(await asyncio.wait_for(b.recv(key="k"), 10))[1]
             for _ in range(sum(1 for p in plan if p[3]))]
    await asyncio.gather(*senders)
    assert called != sorted(called) or keyed_called != sorted(keyed_called), (
        "the scrambling did not change the call order; the test would prove nothing")
    assert unkeyed == called
    assert keyed == keyed_called


async def test_many_keys_interleaved_from_concurrent_senders(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    keys = [f"k{i}" for i in range(16)]
    per_key = 10

    async def send_key(g: int) -> None:
        for i in range(per_key):
            await a.send(tag(g, i, 4096), key=keys[g])

    async def recv_key(g: int) -> list[tuple[int, int]]:
        return [untag(await b.recv(key=keys[g])) for _ in range(per_key)]

    results = await asyncio.wait_for(asyncio.gather(
        *(recv_key(g) for g in reversed(range(len(keys)))),
        *(send_key(g) for g in range(len(keys)))), 30)
    for g, got in zip(reversed(range(len(keys))), results):
        assert got == [(g, i) for i in range(per_key)]
