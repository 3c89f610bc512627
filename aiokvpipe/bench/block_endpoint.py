"""Our side of the paged-KV block case: ``send_blocks``/``recv_blocks`` between two block pools.

Each end holds a pool shaped like an 8B Llama's KV cache in vLLM's layout (per layer one tensor
``[2 (K, V), num_blocks, block_size, kv_heads, head_dim]``, ``block_dim=1``), allocated and
touched once per case; a *message* is one request: the same number of block ids at random on
each end (distinct ids, drawn once per case from the case's seed), every layer. The sender
sends it with one ``send_blocks`` or, for a phase with ``by_layer``, one ``send_blocks`` per
layer, all started at once as a producer streaming layers would; the receiver takes it with
one ``recv_blocks`` either way. Requests go one after another (one in flight): a request is
hundreds of MiB, so the turn-around between two is noise.

A round ends like the other endpoints': the sender, once its last ``send_blocks`` returned,
sends the round's request count under the key ``"end"``; the receiver finishes the requests
up to that count (their payload may still be arriving when the count does), withdraws the
``recv_blocks`` it posted ahead for a request that will not come (cancelling it before an offer
moves nothing), and acknowledges with an unkeyed ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
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


def request_ids(case: Json, role: str) -> list[int]:
    """The request's block ids on ``role``'s end: distinct, at random in its pool, each end
    its own draw (the ids of two ends are unrelated, as in two engines)."""
    g = torch.Generator().manual_seed(int(case.get("seed", 0)) * 2 + (role == "receiver"))
    perm = torch.randperm(int(case["pool_blocks"]), generator=g)
    return [int(i) for i in perm[:int(case["request_blocks"])]]


class BlocksEndpoint:
    """One end of a block case over our pipe (see the module docstring)."""

    def __init__(self, pipe: Any, role: str, case: Json, device: str) -> None:
        self.pipe = pipe
        self._pool = make_pool(case, device)
        self._ids = request_ids(case, role)
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

    async def _send_request(self) -> None:
        pipe, pool, ids = self.pipe, self._pool, self._ids
        key = f"r{self._next}"
        self._next += 1
        if self._by_layer:
            await asyncio.gather(*(pipe.send_blocks(pool, ids, key=key, layers=[i])
                                   for i in range(self._layers)))
        else:
            await pipe.send_blocks(pool, ids, key=key)

    async def stream(self, seconds: float, min_msgs: int) -> int:
        deadline, sent = time.perf_counter() + seconds, 0
        while sent < min_msgs or time.perf_counter() < deadline:
            await self._send_request()
            sent += 1
        await self.pipe.send(torch.tensor([sent]), key=_END_KEY)
        if (await self.pipe.recv()) is not None:
            raise RuntimeError("expected the end-of-round acknowledgement")
        return sent

    async def drain(self) -> int:
        pipe, loop = self.pipe, asyncio.get_running_loop()
        end = loop.create_task(pipe.recv(key=_END_KEY))
        received, expected = 0, None
        try:
            while expected is None or received < expected:
                req = loop.create_task(pipe.recv_blocks(self._pool, self._ids,
                                                        key=f"r{self._next}"))
                while not req.done():
                    if end.done() and expected is None:
                        expected = int(end.result()[0])
                        if received >= expected:  # nothing more comes: withdraw the receive
                            break
                    waiting = {req} if end.done() else {req, end}
                    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if not req.done():
                    req.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await req
                    break
                req.result()
                received += 1
                self._next += 1
            if expected is None:
                expected = int((await end)[0])
        finally:
            if not end.done():
                end.cancel()
        if received != expected:
            raise RuntimeError(f"received {received} requests, the sender sent {expected}")
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
