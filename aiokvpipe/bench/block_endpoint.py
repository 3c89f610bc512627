"""Our side of the paged-KV block case: ``send_blocks``/``recv_blocks`` between two block pools.

Each end holds a pool shaped like an 8B Llama's KV cache in vLLM's layout (per layer one tensor
``[2 (K, V), num_blocks, block_size, kv_heads, head_dim]``, ``block_dim=1``), allocated and
touched once per case; a *message* is one request: the same number of block ids at random on
each end, every layer. The sender sends it with one ``send_blocks`` or, for a phase with
``by_layer``, one ``send_blocks`` per layer, all started at once as a producer streaming
layers would; the receiver takes it with one ``recv_blocks`` either way.

Requests are kept in flight as an engine handing over many requests does, and as our
``send()`` is measured: the case's depth of them (8), fewer where the pool cannot give each
its own blocks. Each in-flight slot has its own ids on each end (distinct within and across
slots, drawn once per case from the case's seed), so no two requests in flight touch the same
block. With one in flight, a request of 512 MiB over ipc spends more time in its control
round trips than in its 0.26 ms copy on an H200: what a serving engine sees is the throughput
of many.

A round ends like the other endpoints': the sender, once its last ``send_blocks`` returned,
sends how many requests each slot sent under the key ``"end"``; the receiver finishes those
(their payload may still be arriving when the counts do), withdraws the ``recv_blocks`` it
posted ahead for requests that will not come (cancelling one before an offer moves nothing),
and acknowledges with an unkeyed ``None``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import torch

import aiokvpipe

from .common import Json, KiB
from .endpoints import Endpoint, OursEndpoint

#: The model the pools are shaped after (BENCHMARKS.md, "Paged blocks"): an 8B Llama in bf16.
BLOCK_SIZE: Final = 16
KV_HEADS: Final = 8
HEAD_DIM: Final = 128
DTYPE: Final = torch.bfloat16
#: Bytes of one block of one tensor's K (or V): 16 tokens × 8 heads × 128 × 2 bytes.
KV_BLOCK_BYTES: Final = BLOCK_SIZE * KV_HEADS * HEAD_DIM * 2
assert KV_BLOCK_BYTES == 32 * KiB
_END_KEY: Final = "end"


def request_nbytes(case: Json) -> int:
    """Bytes of one request: its blocks × layers × (K, V) × 32 KiB."""
    return int(case["request_blocks"]) * int(case["layers"]) * 2 * KV_BLOCK_BYTES


def make_pool(case: Json, device: str) -> aiokvpipe.BlockPool:
    """A pool of ``case["pool_blocks"]`` blocks, every page touched (a resident pool, as an
    engine's is: received bytes must not pay first-touch page faults)."""
    shape = (2, int(case["pool_blocks"]), BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    tensors = []
    for _ in range(int(case["layers"])):
        t = torch.empty(shape, dtype=DTYPE, device=device)
        t.fill_(1.0)
        tensors.append(t)
    return aiokvpipe.BlockPool(tensors, block_dim=1)


def slot_ids(case: Json, role: str, slots: int) -> list[list[int]]:
    """Per request slot, the block ids a request takes on ``role``'s end: distinct within and
    across slots (requests in flight never share a block), at random in the pool, each end
    its own draw (the ids of two ends are unrelated, as in two engines)."""
    g = torch.Generator().manual_seed(int(case.get("seed", 0)) * 2 + (role == "receiver"))
    perm = [int(i) for i in torch.randperm(int(case["pool_blocks"]), generator=g)]
    n = int(case["request_blocks"])
    return [perm[s * n:(s + 1) * n] for s in range(slots)]


def slots_for(case: Json) -> int:
    """Requests in flight: the case's depth, as many as the pool holds without sharing."""
    return max(1, min(int(case.get("depth", 1)),
                      int(case["pool_blocks"]) // int(case["request_blocks"])))


class BlocksEndpoint:
    """One end of a block case over our pipe (see the module docstring)."""

    def __init__(self, pipe: Any, role: str, case: Json, device: str) -> None:
        self.pipe = pipe
        self._pool = make_pool(case, device)
        self._slots = slots_for(case)
        self._ids = slot_ids(case, role, self._slots)
        self._layers = len(self._pool.tensors)
        self._by_layer = False
        self._next = 0  # the next request's number: both ends count alike

    @staticmethod
    async def listen(case: Json, device: str) -> tuple[Any, Callable[[], Awaitable[Endpoint]]]:
        port, accept_pipe = await OursEndpoint.listen(case, device)

        async def accept() -> Endpoint:
            ep = await accept_pipe()
            assert isinstance(ep, OursEndpoint)
            return BlocksEndpoint(ep.pipe, "receiver", case, device)

        return port, accept

    @staticmethod
    async def connect(case: Json, device: str, rendezvous: Any) -> Endpoint:
        ep = await OursEndpoint.connect(case, device, rendezvous)
        assert isinstance(ep, OursEndpoint)
        return BlocksEndpoint(ep.pipe, "sender", case, device)

    async def prepare(self, phase: Json) -> None:
        self._by_layer = bool(phase.get("by_layer"))

    async def _send_request(self, number: int, ids: list[int]) -> None:
        pipe, pool, key = self.pipe, self._pool, f"r{number}"
        if self._by_layer:
            await asyncio.gather(*(pipe.send_blocks(pool, ids, key=key, layers=[i])
                                   for i in range(self._layers)))
        else:
            await pipe.send_blocks(pool, ids, key=key)

    def _number(self, first: int, slot: int, k: int) -> int:
        """The request number of slot ``slot``'s ``k``-th request of a round from ``first``:
        a slot always sends (and receives) the same blocks, so a request's copy plan is the
        one its slot's first request made, as an engine's would be for a request it has seen."""
        return first + slot + k * self._slots

    async def stream(self, seconds: float, min_msgs: int) -> int:
        """One task per slot, each sending its requests one after another until the time is
        up; then each slot's count, under the key ``"end"``."""
        deadline, first = time.perf_counter() + seconds, self._next
        counts = [0] * self._slots

        async def slot(s: int) -> None:
            while sum(counts) < min_msgs or time.perf_counter() < deadline:
                number = self._number(first, s, counts[s])
                counts[s] += 1
                await self._send_request(number, self._ids[s])

        await asyncio.gather(*(slot(s) for s in range(self._slots)))
        self._next = self._number(first, 0, max(counts))
        await self.pipe.send(torch.tensor(counts), key=_END_KEY)
        if (await self.pipe.recv()) is not None:
            raise RuntimeError("expected the end-of-round acknowledgement")
        return sum(counts)

    async def drain(self) -> int:
        """One task per slot, each taking its requests one after another (awaiting each
        ``recv_blocks`` directly, as an engine would) until the sender's counts say no more
        come; a receive posted beyond them is withdrawn (cancelled before an offer, it moves
        nothing). The counts come only once every request was pulled, so each slot is then
        waiting for one that will not come, or about to see that it need not post it."""
        pipe, loop, first = self.pipe, asyncio.get_running_loop(), self._next
        counts: list[int] | None = None
        current: list[tuple[int, asyncio.Task[None]] | None] = [None] * self._slots
        received = 0

        async def slot(s: int) -> None:
            nonlocal received
            k = 0
            while counts is None or k < counts[s]:
                req = loop.create_task(pipe.recv_blocks(
                    self._pool, self._ids[s], key=f"r{self._number(first, s, k)}"))
                current[s] = (k, req)
                try:
                    await req
                except asyncio.CancelledError:
                    if req.cancelled() and counts is not None and k >= counts[s]:
                        return  # withdrawn: the sender sent no more
                    raise
                received += 1
                k += 1

        tasks = [loop.create_task(slot(s)) for s in range(self._slots)]
        end = loop.create_task(pipe.recv(key=_END_KEY))
        try:
            waiting: set[asyncio.Future[Any]] = {end, *tasks}
            while not end.done():  # a slot that fails (its recv_blocks raised) ends it now
                done, waiting = await asyncio.wait(waiting,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    t.result()
            counts = [int(c) for c in await end]
            for s, entry in enumerate(current):
                if entry is not None and entry[0] >= counts[s]:
                    entry[1].cancel()
            await asyncio.gather(*tasks)
        finally:
            for t in (end, *tasks):
                t.cancel()
        if received != sum(counts):
            raise RuntimeError(f"received {received} requests, the sender sent {sum(counts)}")
        self._next = self._number(first, 0, max(counts))
        await pipe.send(None)
        return received

    async def ping(self) -> None:
        raise NotImplementedError("the block case measures throughput only")

    async def end_echo(self) -> None:
        raise NotImplementedError("the block case measures throughput only")

    async def echo(self) -> int:
        raise NotImplementedError("the block case measures throughput only")

    async def aclose(self) -> None:
        await self.pipe.aclose()
