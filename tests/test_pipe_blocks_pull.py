"""Block transfers where the receiver copies out of the sender's pool itself (the ipc plane's
way), on any machine: the exchange's rules, its races, cancellation and close.

CUDA IPC cannot run here, so the ipc plane's three mapping calls are stood in for on a real
tcp pipe over 127.0.0.1 (the narrowest seam, :class:`MappingSeam`): the sender's plane "exports"
its pool; the receiver's learns where it lies from the sender pool's own addresses (both ends
live in this process) and runs the copy kernel's CPU twin over that memory. Everything else,
frames, protocol, futures, is the real thing. ``tests/test_pipe_blocks_cuda.py`` runs the real
plane on a GPU.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import PairFactory, eventually
from test_pipe_blocks import (
    assert_moved,
    assert_untouched,
    cancel_at_pull,
    fill_blocks,
    vllm_pool,
)

import aiokvpipe
from aiokvpipe import BlockPool

pytestmark = pytest.mark.timeout(60)


class MappingSeam:
    """The ipc plane's ``export_pool`` (sender), ``pool_source`` and ``pull`` (receiver).

    ``hold_placement``: ``pool_source`` answers only on :meth:`place`; ``hold_copies``:
    copies run only on :meth:`release`."""

    def __init__(self, sender: aiokvpipe.Pipe, receiver: aiokvpipe.Pipe, *,
                 hold_placement: bool = False, hold_copies: bool = False) -> None:
        self.pools: dict[int, list[torch.Tensor]] = {}
        self.sources: dict[int, asyncio.Future[Any]] = {}
        self.held: list[tuple[Callable[[Any], None], asyncio.Future[None]]] = []
        self.pulls = 0
        self.hold_placement, self.hold_copies = hold_placement, hold_copies
        sender._plane.export_pool = self.export_pool  # type: ignore[attr-defined]
        receiver._plane.pool_source = self.pool_source  # type: ignore[attr-defined]
        receiver._plane.pull = self.pull  # type: ignore[attr-defined]
        self.sender_plane = sender._plane

    def export_pool(self, pool_id: int, tensors: list[torch.Tensor]) -> bool:
        self.pools[pool_id] = list(tensors)
        if not self.hold_placement and pool_id in self.sources:
            self.place(pool_id)
        return True

    def pool_source(self, pool_id: int) -> asyncio.Future[Any]:
        if pool_id not in self.sources:
            self.sources[pool_id] = asyncio.get_running_loop().create_future()
        if not self.hold_placement and pool_id in self.pools:
            self.place(pool_id)
        return self.sources[pool_id]

    def place(self, pool_id: int) -> None:
        pool = BlockPool(self.pools[pool_id], block_dim=1)
        fut = self.sources[pool_id]
        if not fut.done():
            fut.set_result([(t.data_ptr(), tl.span_bytes)
                            for t, tl in zip(pool.tensors, pool.layout.tensors)])

    def pull(self, launch: Callable[[Any], None], nbytes: int, after: object,
             keepalive: object) -> asyncio.Future[None]:
        self.pulls += 1
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.hold_copies:
            self.held.append((launch, fut))
        else:
            launch(None)
            fut.set_result(None)
        return fut

    def release(self) -> None:
        for launch, fut in self.held:
            launch(None)
            fut.set_result(None)
        self.held.clear()


async def test_blocks_are_copied_out_of_the_senders_pool_and_nothing_else_moves(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    seam = MappingSeam(a, b)
    src, dst = vllm_pool(32), vllm_pool(20)
    s_ids, d_ids = [31, 2, 3, 4, 17, 0], [0, 1, 2, 3, 19, 7]
    fill_blocks(src, s_ids, seed=1)
    moved_before = a._plane.moved_bytes
    async with asyncio.timeout(10):
        receiving = asyncio.create_task(b.recv_blocks(dst, d_ids, key="r"))
        await a.send_blocks(src, s_ids, key="r")
        await receiving
    assert_moved(src, dst, s_ids, d_ids)
    assert_untouched(dst, d_ids)
    # ... layer by layer, one receive
    dst2 = vllm_pool(20)
    async with asyncio.timeout(10):
        receiving = asyncio.create_task(b.recv_blocks(dst2, d_ids, key="l"))
        for layer in range(4):
            await a.send_blocks(src, s_ids, key="l", layers=[layer])
        await receiving
    assert_moved(src, dst2, s_ids, d_ids)
    assert seam.pulls == 5
    assert a._plane.moved_bytes == moved_before  # no payload went through the socket


async def test_an_offer_taken_back_while_its_pool_is_being_mapped_is_never_read(
        pair_factory: PairFactory) -> None:
    # The receiver pulls only once it knows where the pool lies; the sender may take the
    # offer back until that PULL reaches it, and then nothing of its pool may be read.
    a, b = await pair_factory(recv_buffer_bytes=1 << 20)
    seam = MappingSeam(a, b, hold_placement=True)
    src, dst = vllm_pool(8), vllm_pool(8)
    fill_blocks(src, [1], seed=2)
    receiving = asyncio.create_task(b.recv_blocks(dst, [2], key="k"))
    sending = asyncio.create_task(a.send_blocks(src, [1], key="k"))
    await eventually(lambda: bool(b._blocks._incoming), 5, "the receiver matched the offer")
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    await eventually(lambda: not b._blocks._incoming, 5, "the RETRACT reached the receiver")
    seam.place(0)
    await asyncio.sleep(0)  # the placement's callbacks run
    async with asyncio.timeout(10):  # a PULL of b's, if any, a's answer and b's copy ran
        await b.send(None, key="sync")
        await a.recv(key="sync")
        await a.send(None, key="sync")
        await b.recv(key="sync")
    assert seam.pulls == 0 and not receiving.done()
    assert_untouched(dst, [])
    seam.hold_placement = False
    async with asyncio.timeout(10):  # the receive still completes with a new offer
        await a.send_blocks(src, [1], key="k")
        await receiving
    assert_moved(src, dst, [1], [2])
    await eventually(lambda: a.stats.send_credits == 1 << 20, 5, f"credits back: {a.stats}")


async def test_once_pulled_the_copy_runs_whole_and_a_close_waits_for_it(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    seam = MappingSeam(a, b, hold_copies=True)
    src, dst = vllm_pool(8), vllm_pool(8)
    fill_blocks(src, [3, 4], seed=3)
    receiving = asyncio.create_task(b.recv_blocks(dst, [5, 6], key="c"))
    sending = asyncio.create_task(a.send_blocks(src, [3, 4], key="c"))
    try:
        await eventually(lambda: bool(seam.held), 5, "the receiver started its copy")
        sending.cancel()  # too late to take it back: the peer is reading the blocks
        closing = asyncio.create_task(a.aclose())
        done, _ = await asyncio.wait({closing, receiving}, timeout=0.2)
        assert not done, "the close or the receive did not wait for the copy"
    finally:
        seam.release()  # a held copy would hold the receive (and the test) forever
    async with asyncio.timeout(10):
        await receiving
        await closing
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert_moved(src, dst, [3, 4], [5, 6])
    assert_untouched(dst, [5, 6])
    assert a.state.name == "CLOSED"  # graceful, not broken


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_send_cancelled_as_the_pull_arrives_lets_the_peer_copy(
        pair_factory: PairFactory, when: str) -> None:
    # Before, the call tried to take back an offer the peer was already copying: a
    # RuntimeError escaped, and its PULLED then broke both pipes, blaming the honest peer.
    a, b = await pair_factory()
    seam = MappingSeam(a, b)
    src, dst = vllm_pool(8), vllm_pool(8)
    fill_blocks(src, [1], seed=8)
    sending = asyncio.create_task(a.send_blocks(src, [1], key="k"))
    await eventually(lambda: bool(b._blocks._offers_in), 5, "the offer is at b, unmatched")
    cancel_at_pull(a, sending, when)
    async with asyncio.timeout(10):
        receiving = asyncio.create_task(b.recv_blocks(dst, [2], key="k"))
        with pytest.raises(asyncio.CancelledError):
            await sending
        await receiving
        await asyncio.gather(a.send_blocks(src, [1], key="again"),  # the pipe goes on
                             b.recv_blocks(dst, [3], key="again"))
    assert_moved(src, dst, [1, 1], [2, 3])
    assert seam.pulls == 2
    assert a._error is None and b._error is None
