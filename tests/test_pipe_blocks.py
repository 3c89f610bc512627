"""send_blocks/recv_blocks between real pipes over 127.0.0.1: paged KV pool to pool."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import warnings
from typing import Any

import pytest
import torch
from conftest import PairFactory, eventually

import aiokvpipe
from aiokvpipe import BlockPool, _pipe_blocks, _wire
from aiokvpipe._blocks import (
    MAX_PIPE_SEGMENTS,
    MAX_PIPE_TENSORS,
    MAX_POOL_SEGMENTS,
    MAX_POOL_TENSORS,
)
from aiokvpipe._blocks_wire import encode_layout
from aiokvpipe._pipe_blocks import VIEWS_PER_STEP
from aiokvpipe._plane import settle_like
from aiokvpipe._protocol import offer_cost

pytestmark = pytest.mark.timeout(60)

SENTINEL = -7.0


def vllm_pool(num_blocks: int, layers: int = 4, fill: float = SENTINEL) -> BlockPool:
    """vLLM's layout: per layer [2 (K, V), num_blocks, block_size, kv_heads, head_dim]."""
    return BlockPool([torch.full((2, num_blocks, 4, 2, 8), fill) for _ in range(layers)],
                     block_dim=1)


def fill_blocks(pool: BlockPool, ids: list[int], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for t in pool.tensors:
        for b in ids:
            t[:, b] = torch.randn(t[:, b].shape, generator=g)


def assert_moved(src: BlockPool, dst: BlockPool, src_ids: list[int], dst_ids: list[int],
                 layers: range | list[int] | None = None) -> None:
    chosen = range(len(src.tensors)) if layers is None else layers
    for i in chosen:
        for s, d in zip(src_ids, dst_ids):
            assert torch.equal(src.tensors[i][:, s], dst.tensors[i][:, d]), (i, s, d)


async def round_trip(x: aiokvpipe.Pipe, y: aiokvpipe.Pipe) -> None:
    """x → y → x on the control connection: whatever either end wrote before is processed."""
    await x.send(None, key="sync")
    await y.recv(key="sync")
    await y.send(None, key="sync")
    await x.recv(key="sync")


def assert_untouched(dst: BlockPool, named: list[int], layers: range | list[int] | None = None
                     ) -> None:
    chosen = set(range(len(dst.tensors)) if layers is None else layers)
    for i, t in enumerate(dst.tensors):
        keep = [b for b in range(t.shape[1]) if i not in chosen or b not in named]
        assert bool((t[:, keep] == SENTINEL).all()), f"tensor {i}: an unnamed block was written"


async def test_blocks_move_pool_to_pool_and_nothing_else_is_written(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    src, dst = vllm_pool(64), vllm_pool(40)  # num_blocks may differ
    src_ids, dst_ids = [3, 4, 5, 17, 60, 0], [39, 1, 2, 3, 20, 8]
    fill_blocks(src, src_ids, seed=1)
    async with asyncio.timeout(20):
        await asyncio.gather(a.send_blocks(src, src_ids, key="r1"),
                             b.recv_blocks(dst, dst_ids, key="r1"))
    assert_moved(src, dst, src_ids, dst_ids)
    assert_untouched(dst, dst_ids)


async def test_layer_by_layer_sends_complete_one_recv(pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    src, dst = vllm_pool(16, layers=6), vllm_pool(16, layers=6)
    ids = [1, 2, 3, 9]
    fill_blocks(src, ids, seed=2)
    receiving = asyncio.create_task(b.recv_blocks(dst, ids, key="req"))
    for layer in range(6):
        await a.send_blocks(src, ids, key="req", layers=[layer])
        assert not receiving.done() or layer == 5
    async with asyncio.timeout(10):
        await receiving
    assert_moved(src, dst, ids, ids)


async def test_concurrent_requests_interleave_by_key(pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    src, dst = vllm_pool(128), vllm_pool(128)
    reqs = {f"r{i}": ([i * 4 + j for j in range(4)], [120 - i * 4 - j for j in range(4)])
            for i in range(12)}
    fill_blocks(src, [s for s_ids, _ in reqs.values() for s in s_ids], seed=3)
    async with asyncio.timeout(20):
        await asyncio.gather(
            *(a.send_blocks(src, s_ids, key=k) for k, (s_ids, _) in reqs.items()),
            *(b.recv_blocks(dst, d_ids, key=k) for k, (_, d_ids) in reversed(reqs.items())))
    for s_ids, d_ids in reqs.values():
        assert_moved(src, dst, s_ids, d_ids)


async def test_dict_pools_with_block_dim_0_and_layer_names(pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    # MLA-like: [num_blocks, block_size, dim], selected by name
    src = BlockPool({f"l{i}": torch.arange(32 * 4 * 6, dtype=torch.bfloat16).view(32, 4, 6) + i
                     for i in range(3)}, block_dim=0)
    dst = BlockPool({f"l{i}": torch.zeros(8, 4, 6, dtype=torch.bfloat16) for i in range(3)},
                    block_dim=0)
    async with asyncio.timeout(10):
        await asyncio.gather(a.send_blocks(src, [30, 2], key="m", layers=["l2"]),
                             b.recv_blocks(dst, [0, 7], key="m", layers="l2"))
    assert torch.equal(dst.tensors[2][0], src.tensors[2][30])
    assert torch.equal(dst.tensors[2][7], src.tensors[2][2])
    assert not dst.tensors[0].any() and not dst.tensors[1].any()


@pytest.mark.parametrize("misfit", ["block-shape", "dtype", "count"])
async def test_a_misfit_is_a_value_error_on_both_ends_and_the_pipe_goes_on(
        pair_factory: PairFactory, misfit: str) -> None:
    a, b = await pair_factory()
    src = vllm_pool(8)
    if misfit == "block-shape":
        dst = BlockPool([torch.zeros(2, 8, 4, 2, 4) for _ in range(4)], block_dim=1)
    elif misfit == "dtype":
        dst = BlockPool([torch.zeros(2, 8, 4, 2, 8, dtype=torch.float16) for _ in range(4)],
                        block_dim=1)
    else:
        dst = vllm_pool(8)
    dst_ids = [1, 2] if misfit == "count" else [1, 2, 3]
    async with asyncio.timeout(10):
        sent, got = await asyncio.gather(a.send_blocks(src, [1, 2, 3], key="x"),
                                         b.recv_blocks(dst, dst_ids, key="x"),
                                         return_exceptions=True)
        assert isinstance(sent, ValueError) and isinstance(got, ValueError), (sent, got)
        assert "refused" in str(sent)
        await a.send(torch.ones(3), key="after")  # the pipe stays usable
        assert (await b.recv(key="after")).tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(("ids", "error"), [
    ([99], IndexError), ([-1], IndexError), ([1, 1], ValueError), ([1.5], TypeError)])
async def test_bad_destination_ids_are_refused_before_anything_moves(
        pair_factory: PairFactory, ids: list[object], error: type[Exception]) -> None:
    a, b = await pair_factory()
    with pytest.raises(error):
        await b.recv_blocks(vllm_pool(8), ids, key="bad")
    with pytest.raises((TypeError, ValueError)):
        await a.send_blocks(vllm_pool(8), [1], key="bad", layers=[9])
    assert not a.closed and not b.closed


@pytest.mark.parametrize("bad", ["id-out-of-range", "id-twice", "layer-name"])
@pytest.mark.parametrize("offer_first", [False, True])
async def test_a_receive_failing_on_its_arguments_fails_the_peers_sends_for_it_too(
        pair_factory: PairFactory, bad: str, offer_first: bool) -> None:
    """recv_blocks with a bad destination id, an id named twice, or a layer name its pool
    lacks raises on its own end; the peer's send_blocks for it (here one per layer, sent
    before or after) is refused with that reason, each at once, instead of waiting for ever
    for a receive. A new recv_blocks for the key then takes offers again."""
    a, b = await pair_factory()
    src = BlockPool({"k": torch.ones(8, 4), "v": torch.full((8, 4), 2.0)}, block_dim=0)
    dst = BlockPool({"k": torch.zeros(8, 4), "v": torch.zeros(8, 4)}, block_dim=0)
    ids, layers = {"id-out-of-range": ([99], None), "id-twice": ([3, 3], None),
                   "layer-name": ([3, 4], "K")}[bad]
    async with asyncio.timeout(10):
        sends = [asyncio.create_task(a.send_blocks(src, [1, 2], key="r", layers=[name]))
                 for name in ("k", "v")]
        if offer_first:
            await eventually(lambda: len(b._blocks._offers_in.get("r", ())) == 2, 5,
                             "both offers wait at b")
        with pytest.raises(ValueError):
            await b.recv_blocks(dst, ids, key="r", layers=layers)
        for sent in await asyncio.gather(*sends, return_exceptions=True):
            assert isinstance(sent, ValueError), sent
            assert "recv_blocks failed" in str(sent), sent
        assert not dst.tensors[0].any() and not dst.tensors[1].any()  # nothing moved
        # The key is not spoiled: a later pair of calls moves the blocks.
        await asyncio.gather(a.send_blocks(src, [1, 2], key="r"),
                             b.recv_blocks(dst, [3, 4], key="r"))
    assert torch.equal(dst.tensors[1][3:5], src.tensors[1][1:3])


@pytest.mark.parametrize("bad", ["id-out-of-range", "layer-name", "layer-index"])
@pytest.mark.parametrize("receive_first", [False, True])
async def test_a_send_failing_on_its_arguments_fails_the_peers_receive_for_it_too(
        pair_factory: PairFactory, bad: str, receive_first: bool) -> None:
    """send_blocks with a source id outside its pool or a layer its pool lacks raises on its
    own end, and tells the peer (OFFER_FAILED): the recv_blocks meant for it, waiting or
    made later, raises that reason at once instead of waiting for ever. The credit it cost
    comes back, and the key goes on."""
    a, b = await pair_factory()
    src = BlockPool({"k": torch.ones(8, 4), "v": torch.full((8, 4), 2.0)}, block_dim=0)
    dst = BlockPool({"k": torch.zeros(8, 4), "v": torch.zeros(8, 4)}, block_dim=0)
    ids, layers = {"id-out-of-range": ([99], None), "layer-name": ([1], "K"),
                   "layer-index": ([1], 5)}[bad]
    credits = a.stats.send_credits
    async with asyncio.timeout(10):
        receiving = None
        if receive_first:
            receiving = asyncio.create_task(b.recv_blocks(dst, [3], key="r"))
            await eventually(lambda: bool(b._blocks._sinks.get("r")), 5, "the receive waits")
        with pytest.raises(ValueError):
            await a.send_blocks(src, ids, key="r", layers=layers)
        if receiving is None:
            await eventually(lambda: bool(b._blocks._offers_in.get("r")), 5, "word at b")
            receiving = asyncio.create_task(b.recv_blocks(dst, [3], key="r"))
        with pytest.raises(ValueError, match="send_blocks failed"):
            await receiving
        assert not dst.tensors[0].any() and not dst.tensors[1].any()
        await round_trip(a, b)  # (b's answer carries the credit back to a)
        assert a.stats.send_credits == credits
        await asyncio.gather(a.send_blocks(src, [1], key="r"),
                             b.recv_blocks(dst, [3], key="r"))
    assert torch.equal(dst.tensors[1][3], src.tensors[1][1])


async def test_a_send_failing_on_its_layers_leaves_a_receive_that_took_its_offers_be(
        pair_factory: PairFactory) -> None:
    """A failed send naming no layers (they were the bad argument) fails the next receive
    that still misses blocks, not an earlier one that has every layer pulled and waits for
    its data. (It failed that one, whose blocks were arriving, and the receive meant for
    the failed send waited for ever.)"""
    a, b = await pair_factory()
    n = 512
    src = BlockPool({"k": torch.ones(n, 4096), "v": torch.full((n, 4096), 2.0)}, block_dim=0)
    dst = BlockPool({"k": torch.zeros(n, 4096), "v": torch.zeros(n, 4096)}, block_dim=0)
    async with asyncio.timeout(10):
        first = asyncio.create_task(b.recv_blocks(dst, range(n), key="r"))
        await eventually(lambda: bool(b._blocks._sinks.get("r")), 5, "the first receive waits")
        good = asyncio.create_task(a.send_blocks(src, range(n), key="r"))  # 16 MiB
        await eventually(lambda: not next(iter(b._blocks._sinks["r"])).missing, 5, "pulled")
        with pytest.raises(ValueError):
            await a.send_blocks(src, [0], key="r", layers="nope")
        second = asyncio.create_task(b.recv_blocks(dst, [0], key="r"))
        await good
        await first
        with pytest.raises(ValueError, match="send_blocks failed"):
            await second
    assert torch.equal(dst.tensors[1], src.tensors[1])


@pytest.mark.parametrize("failing", ["recv_blocks", "send_blocks"])
async def test_a_call_failing_on_its_arguments_is_paired_after_the_calls_made_before_it(
        pair_factory: PairFactory, failing: str) -> None:
    """A good call for a key, held while it prepares (here behind a first receive into a
    fresh CPU pool, whose memory is checked writable in a thread), then a call for the same
    key that fails on its arguments: the peer pairs them in call order, the good call with
    its first call, the failure with its second. (The failure went first, and took the
    good call's partner.)"""
    a, b = await pair_factory()
    src = BlockPool([torch.ones(8, 4)], block_dim=0)
    dst1, dst2 = (BlockPool([torch.zeros(8, 4)], block_dim=0) for _ in range(2))
    x, y = (a, b) if failing == "send_blocks" else (b, a)  # x holds the two calls
    async with asyncio.timeout(10):
        for d in (dst1, dst2, src):  # every pool's writable check done: only x's gate holds
            await asyncio.gather(y.send_blocks(src if d is not src else dst1, [0], key="w"),
                                 x.recv_blocks(d, [0], key="w"))
        src.tensors[0].fill_(1.0)
        dst1.tensors[0].zero_()
        dst2.tensors[0].zero_()
        if failing == "recv_blocks":
            sending = asyncio.create_task(a.send_blocks(src, [1], key="r"))
            await eventually(lambda: bool(b._blocks._offers_in.get("r")), 5, "offer at b")
        fresh = BlockPool([torch.zeros(8, 4)], block_dim=0)
        holding = asyncio.create_task(x.recv_blocks(fresh, [0], key="hold"))  # checks fresh
        await asyncio.sleep(0)
        if failing == "send_blocks":
            first_y = asyncio.create_task(b.recv_blocks(dst1, [3], key="r"))
            good = asyncio.create_task(a.send_blocks(src, [1], key="r"))  # called first
            await asyncio.sleep(0)
            with pytest.raises(ValueError):
                await a.send_blocks(src, [99], key="r")  # called second
            await good
            await first_y
            assert torch.equal(dst1.tensors[0][3], src.tensors[0][1])
            with pytest.raises(ValueError, match="send_blocks failed"):
                await b.recv_blocks(dst2, [3], key="r")
        else:
            good = asyncio.create_task(b.recv_blocks(dst1, [3], key="r"))  # called first
            await asyncio.sleep(0)
            with pytest.raises(ValueError):
                await b.recv_blocks(dst2, [99], key="r")  # called second
            await sending
            await good
            assert torch.equal(dst1.tensors[0][3], src.tensors[0][1])
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)


async def test_a_receive_failing_on_its_arguments_after_our_close_is_only_that_error(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    sending = asyncio.create_task(a.send_blocks(vllm_pool(8), [1], key="r"))
    await eventually(lambda: bool(b._blocks._offers_in.get("r")), 5, "the offer waits at b")
    await asyncio.wait_for(b.aclose(), 10)
    for _ in range(2):  # (the first once tried to refuse the offer on the closed pipe)
        with pytest.raises(IndexError):
            await b.recv_blocks(vllm_pool(8), [99], key="r")
    await b.wait_closed()  # graceful
    with pytest.raises(aiokvpipe.PipeClosed):
        await asyncio.wait_for(sending, 5)


async def test_a_receive_called_after_a_failed_one_lifts_its_refusal_even_while_it_waited(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A recv_blocks failing on its arguments, then a good one for the same key, while an
    unrelated call prepares (so the failed one registers its refusal in its turn): the good
    call, made after, lifts it, as it does when nothing prepares. (The refusal came after
    the good call had lifted the refusals, outlived it, and refused the next offer.)"""
    a, b = await pair_factory()
    src = BlockPool([torch.arange(32.0).view(8, 4)], block_dim=0)
    dst = BlockPool([torch.zeros(8, 4)], block_dim=0)
    async with asyncio.timeout(10):
        await asyncio.gather(a.send_blocks(src, [0], key="w"), b.recv_blocks(dst, [0], key="w"))
        checked = asyncio.Event()
        real_check = _pipe_blocks._check_writable

        async def slow_check(pool: BlockPool) -> None:  # a first use that takes a while
            await checked.wait()
            await real_check(pool)

        monkeypatch.setattr(_pipe_blocks, "_check_writable", slow_check)
        fresh = BlockPool([torch.zeros(8, 4)], block_dim=0)
        holding = asyncio.create_task(b.recv_blocks(fresh, [0], key="hold"))  # checks fresh
        await asyncio.sleep(0)
        failed = asyncio.create_task(b.recv_blocks(dst, [99], key="r"))
        good = asyncio.create_task(b.recv_blocks(dst, [3], key="r"))  # called after it
        await asyncio.sleep(0)  # both started: the failed one waits its turn
        checked.set()
        with pytest.raises(IndexError):
            await failed
        await a.send_blocks(src, [1], key="r")  # to the good call
        await good
        sending = asyncio.create_task(a.send_blocks(src, [2], key="r"))  # before any call
        await eventually(lambda: sending.done() or bool(b._blocks._offers_in.get("r")), 5,
                         "the offer waits at b (or was refused)")
        await b.recv_blocks(dst, [4], key="r")  # takes it: it was not refused
        await sending
        holding.cancel()
        await asyncio.gather(holding, return_exceptions=True)
    assert dst.tensors[0][3].tolist() == src.tensors[0][1].tolist()
    assert dst.tensors[0][4].tolist() == src.tensors[0][2].tolist()


async def test_a_send_cancelled_before_the_pull_moves_nothing(pair_factory: PairFactory
                                                              ) -> None:
    a, b = await pair_factory(recv_buffer_bytes=1 << 20)
    src, dst = vllm_pool(8), vllm_pool(8)
    fill_blocks(src, [1], seed=4)
    sending = asyncio.create_task(a.send_blocks(src, [1], key="gone"))
    await eventually(lambda: bool(b._blocks._offers_in), 5, "the offer is at b, unmatched")
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    async with asyncio.timeout(10):
        # the retracted offer is never pulled: a later recv for the key waits for a new one
        await round_trip(a, b)  # the RETRACT was processed
        receiving = asyncio.create_task(b.recv_blocks(dst, [2], key="gone"))
        await round_trip(b, a)  # a PULL of b's, if any, and a's answer were processed
        assert not receiving.done() and not b._blocks._incoming
        await a.send_blocks(src, [1], key="gone")
        await receiving
    assert_moved(src, dst, [1], [2])
    # every offer's credit came back: the retracted one's too
    await eventually(lambda: a.stats.send_credits == 1 << 20, 5, f"credits back: {a.stats}")


def cancel_at_pull(a: aiokvpipe.Pipe, sending: asyncio.Task[None], when: str) -> None:
    """Cancel ``sending`` in the loop iteration in which ``a`` reads the peer's PULL, before
    the call can see it: ``when`` "before" or "after" the PULL is handled."""
    on_frame = a._blocks.on_frame

    def handle(frame: _wire.Frame) -> None:
        pull = isinstance(frame, _wire.Pull)
        if pull and when == "before":
            sending.cancel()
        on_frame(frame)
        if pull and when == "after":
            sending.cancel()

    a._blocks.on_frame = handle  # type: ignore[method-assign]


@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_send_cancelled_as_the_pull_arrives_is_sent_whole_and_raises(
        pair_factory: PairFactory, when: str) -> None:
    # The PULL committed the transfer: the peer waits for the blocks. Cancelled in that very
    # loop iteration, the call must neither take the offer back (too late: a RuntimeError
    # escaped, and the receive waited for ever) nor swallow the cancellation.
    a, b = await pair_factory()
    src, dst = vllm_pool(8), vllm_pool(8)
    fill_blocks(src, [1, 5], seed=6)
    sending = asyncio.create_task(a.send_blocks(src, [1, 5], key="k"))
    await eventually(lambda: bool(b._blocks._offers_in), 5, "the offer is at b, unmatched")
    cancel_at_pull(a, sending, when)
    async with asyncio.timeout(10):
        receiving = asyncio.create_task(b.recv_blocks(dst, [2, 3], key="k"))
        with pytest.raises(asyncio.CancelledError):
            await sending
        await receiving
    assert_moved(src, dst, [1, 5], [2, 3])
    assert_untouched(dst, [2, 3])
    async with asyncio.timeout(10):  # the pipe goes on
        await asyncio.gather(a.send_blocks(src, [5], key="k2"),
                             b.recv_blocks(dst, [7], key="k2"))
    assert_moved(src, dst, [5], [7])
    assert a._error is None and b._error is None


async def test_both_ends_send_and_receive_blocks_at_once(pair_factory: PairFactory) -> None:
    # Each end's offer #0 once ended the other's as well: both pipes broke.
    a, b = await pair_factory()
    a_src, b_src, a_dst, b_dst = vllm_pool(8), vllm_pool(8), vllm_pool(8), vllm_pool(8)
    fill_blocks(a_src, [1, 2], seed=9)
    fill_blocks(b_src, [3, 4], seed=10)
    async with asyncio.timeout(10):
        for _ in range(3):
            await asyncio.gather(a.send_blocks(a_src, [1, 2], key="a->b"),
                                 b.send_blocks(b_src, [3, 4], key="b->a"),
                                 a.recv_blocks(a_dst, [0, 7], key="b->a"),
                                 b.recv_blocks(b_dst, [5, 6], key="a->b"))
    assert_moved(a_src, b_dst, [1, 2], [5, 6])
    assert_moved(b_src, a_dst, [3, 4], [0, 7])
    assert a._error is None and b._error is None


async def test_a_source_may_name_a_block_more_often_than_its_pool_has_blocks(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    src, dst = vllm_pool(2), vllm_pool(8)
    fill_blocks(src, [0, 1], seed=7)
    async with asyncio.timeout(10):
        await asyncio.gather(a.send_blocks(src, [0, 1, 0, 0], key="k"),
                             b.recv_blocks(dst, [4, 5, 6, 7], key="k"))
    assert_moved(src, dst, [0, 1, 0, 0], [4, 5, 6, 7])
    assert_untouched(dst, [4, 5, 6, 7])


async def test_an_empty_transfer_returns_at_once_at_either_end(pair_factory: PairFactory
                                                               ) -> None:
    # Once an OFFER of no blocks, which a staged path (CUDA pools, nccl, ipc) never
    # completed: the receiver waited for a chunk that no sender writes.
    a, b = await pair_factory()
    src, dst = vllm_pool(8), vllm_pool(8)
    async with asyncio.timeout(5):
        await a.send_blocks(src, [], key="none")
        await b.recv_blocks(dst, [], key="none")
        await b.recv_blocks(dst, torch.tensor([], dtype=torch.int64), key="none", layers=[1])
    assert_untouched(dst, [])
    assert not b._blocks._offers_in and a._proto.next_offer_id == 0


async def test_more_ids_than_one_offer_names_is_a_value_error_before_anything_moves(
        pair_factory: PairFactory) -> None:
    # Once refused only as the OFFER frame was built: a ProtocolError after the offer took
    # its id and credit, and the next send_blocks broke the pipe (an offer out of sequence).
    a, b = await pair_factory()
    src, dst = vllm_pool(8), vllm_pool(8)
    too_many = [0] * (_wire.MAX_OFFER_BLOCKS + 1)  # a source may repeat ids
    credits = a.stats.send_credits
    with pytest.raises(ValueError, match="limit"):
        await a.send_blocks(src, too_many, key="big")
    wide = BlockPool([torch.zeros(_wire.MAX_OFFER_BLOCKS + 1, 2)], block_dim=0)
    with pytest.raises(ValueError, match="limit"):
        await b.recv_blocks(wide, range(_wire.MAX_OFFER_BLOCKS + 1), key="big")
    # Both calls failed: a's told b (OFFER_FAILED, an offer's id and credit), b paired it
    # with its own failed receive and gave the credit back.
    await round_trip(a, b)
    assert a.stats.send_credits == credits and not b._blocks._offers_in
    fill_blocks(src, [3], seed=11)
    async with asyncio.timeout(10):
        await asyncio.gather(a.send_blocks(src, [3], key="k"), b.recv_blocks(dst, [4], key="k"))
    assert_moved(src, dst, [3], [4])


@pytest.mark.parametrize("discarded", ["before", "while it waits"])
async def test_recv_blocks_takes_a_discarded_key_back_as_recv_does(
        pair_factory: PairFactory, discarded: str) -> None:
    # A retried request reusing its key, or a recv_blocks waiting when another task gives
    # the key up: offers for it were refused as discarded while recv_blocks waited for ever.
    a, b = await pair_factory()
    src, dst = vllm_pool(8), vllm_pool(8)
    fill_blocks(src, [2], seed=12)
    if discarded == "before":
        b.discard("req")
    async with asyncio.timeout(10):
        receiving = asyncio.create_task(b.recv_blocks(dst, [6], key="req"))
        await eventually(lambda: "req" in b._blocks._sinks, 5, "recv_blocks asked for it")
        if discarded != "before":
            b.discard("req")
        await a.send_blocks(src, [2], key="req")
        await receiving
    assert_moved(src, dst, [2], [6])


async def test_a_recv_blocks_cancelled_just_before_its_key_is_discarded_does_not_take_it_back(
        pair_factory: PairFactory) -> None:
    # As for recv(key): cancelled and its key discarded in the loop iteration the offer is
    # read, before its task runs again, the call no longer asks for the key. Its sink was
    # still listed: the offer was pulled for a call that was gone, and later ones waited.
    a, b = await pair_factory()
    src, dst = vllm_pool(8), vllm_pool(8)
    receiving = asyncio.create_task(b.recv_blocks(dst, [1], key="req"))
    await eventually(lambda: "req" in b._blocks._sinks, 5, "recv_blocks waits")
    on_frame = b._blocks.on_frame

    def abandon_then_handle(frame: _wire.Frame) -> None:
        if isinstance(frame, _wire.Offer) and not receiving.done():
            receiving.cancel()
            b.discard("req")
        on_frame(frame)

    b._blocks.on_frame = abandon_then_handle  # type: ignore[method-assign]
    async with asyncio.timeout(10):
        with pytest.raises(ValueError, match="discarded"):
            await a.send_blocks(src, [4], key="req")
        with pytest.raises(asyncio.CancelledError):
            await receiving
        with pytest.raises(ValueError, match="discarded"):
            await a.send_blocks(src, [4], key="req")
    assert not dst.tensors[0].ne(SENTINEL).any()


async def test_recv_blocks_cancelled_twice_returns_only_once_nothing_writes_the_pool(
        pair_factory: PairFactory) -> None:
    # The second cancellation (a timeout inside a task group, a server shutting down) ended
    # the wait for what was already being received: the call returned while the socket
    # still wrote into the named blocks.
    a, b = await pair_factory()
    src = BlockPool([torch.ones(2, 16, 1 << 19) for _ in range(2)], block_dim=1)  # 64 MiB
    dst = BlockPool([torch.zeros(2, 16, 1 << 19) for _ in range(2)], block_dim=1)
    posted = asyncio.get_running_loop().create_future()
    block_data = b._blocks._block_data

    def note_posted(offer_id: int) -> None:
        block_data(offer_id)
        if not posted.done():
            posted.set_result(None)

    b._blocks._block_data = note_posted  # type: ignore[method-assign]
    async with asyncio.timeout(20):
        receiving = asyncio.create_task(b.recv_blocks(dst, range(16), key="big"))
        sending = asyncio.create_task(a.send_blocks(src, range(16), key="big"))
        await posted  # the payload is being received into the pool
        receiving.cancel()
        await asyncio.sleep(0)  # it is waiting for the receives already posted
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiving
        assert not b._blocks.receiving, "recv_blocks returned while its blocks were written"
        await sending


async def test_a_close_sends_a_pulled_transfer_whole_while_it_waits_for_send_budget(
        pair_factory: PairFactory) -> None:
    # A pulled transfer is committed: the peer waits for its blocks. Its payload still
    # waiting for send budget (a large send holds it) used to fail with PipeClosed when the
    # close aborted the budget, and the peer's recv_blocks waited for ever on a closed pipe.
    a, b = await pair_factory(max_inflight_bytes=80 << 20)
    big = torch.ones(64 << 18)  # 64 MiB: in flight while b reads nothing
    src = BlockPool([torch.randn(2, 8, 1 << 19)], block_dim=1)  # 32 MiB of blocks
    dst = BlockPool([torch.zeros(2, 8, 1 << 19)], block_dim=1)
    reading = b._plane._receiver._transport
    reading.pause_reading()
    async with asyncio.timeout(30):
        sending_big = asyncio.create_task(a.send(big, key="big"))
        await eventually(lambda: a._send_budget.in_use >= big.nbytes, 5, "big in flight")
        sending = asyncio.create_task(a.send_blocks(src, range(8), key="kv"))
        receiving = asyncio.create_task(b.recv_blocks(dst, range(8), key="kv"))
        await eventually(lambda: a._send_budget.waiting == 1, 5, "pulled, waiting for budget")
        closing = asyncio.create_task(a.aclose())
        await eventually(lambda: a._closed_here, 5, "the close began")
        reading.resume_reading()
        await sending_big
        await sending
        await receiving
        assert bool((await b.recv(key="big") == 1).all())
        await closing
        await b.aclose()
    assert torch.equal(src.tensors[0], dst.tensors[0])
    assert a.state.name == b.state.name == "CLOSED"


async def test_a_queued_send_waiting_for_credits_holds_no_budget_a_pulled_transfer_needs(
        pair_factory: PairFactory) -> None:
    # The receiver takes the blocks before the message sent ahead of them, which holds most
    # of the credit window. A send queued behind used to take its send budget first and then
    # wait for credits, holding that budget; the pulled transfer's payload then waited for
    # budget, the receiver for the blocks, the credits for the receiver: for ever.
    window = 1 << 20
    a, b = await pair_factory(max_inflight_bytes=window, recv_buffer_bytes=window)
    src = BlockPool([torch.randn(2, 16, 64, 64)], block_dim=1)  # 32 KiB a block
    dst = BlockPool([torch.zeros(2, 16, 64, 64)], block_dim=1)
    async with asyncio.timeout(20):
        await a.send(torch.ones(150 << 10), key="meta-0")  # 600 KiB of credit, unclaimed
        offering = asyncio.create_task(a.send_blocks(src, range(16), key="kv"))  # 512 KiB
        await eventually(lambda: bool(b._blocks._offers_in), 5, "the offer is at b")
        queued = asyncio.create_task(a.send(torch.ones(150 << 10), key="meta-1"))
        await eventually(lambda: len(a._send_queue) == 1, 5, "meta-1 waits for credits")
        await b.recv_blocks(dst, range(16), key="kv")
        await offering
        assert bool((await b.recv(key="meta-0") == 1).all())
        await queued
        assert bool((await b.recv(key="meta-1") == 1).all())
    assert torch.equal(src.tensors[0], dst.tensors[0])


async def test_the_pools_of_one_pipe_are_bounded_in_segments_each_way(
        pair_factory: PairFactory) -> None:
    # What an end holds for the peer's pool layouts grows with their segments: 1,024 pools
    # of the most shredded layout once cost about 40 GiB from 55 MB of POOL frames.
    a, b = await pair_factory()

    def shredded() -> BlockPool:  # MAX_POOL_SEGMENTS segments a block
        return BlockPool([torch.zeros(1024, 2, 1) for _ in range(MAX_POOL_SEGMENTS // 1024)],
                         block_dim=1)

    for _ in range(MAX_PIPE_SEGMENTS // MAX_POOL_SEGMENTS):
        a._blocks._announce(shredded())  # described to the peer: up to the limit
    with pytest.raises(ValueError, match="segments"):
        async with asyncio.timeout(5):  # (else it would wait for the peer's recv_blocks)
            await a.send_blocks(shredded(), [0], key="one too many")
    await round_trip(a, b)  # b took every POOL frame, and both pipes go on
    assert a._error is None and b._error is None
    # A peer describing more is refused: the pipe breaks with a ProtocolError.
    body = encode_layout(9999, shredded().layout)
    a._control.write_encoded(a._proto.send_pool(9999, body))
    await eventually(lambda: b._error is not None, 10, "b refused the pool")
    assert isinstance(b._error.__cause__, aiokvpipe.ProtocolError), repr(b._error)
    assert "segments" in str(b._error.__cause__)


async def test_the_pools_of_one_pipe_are_bounded_in_tensors_each_way(
        pair_factory: PairFactory) -> None:
    # Each tensor of a pool described costs the other end a layout of up to ~2.4 KB: 1,024
    # pools of 1,024 tensors held 2.5 GB there, charged to no credit.
    a, b = await pair_factory()

    def wide() -> BlockPool:  # MAX_POOL_TENSORS tensors
        return BlockPool([torch.zeros(4, 1) for _ in range(MAX_POOL_TENSORS)], block_dim=0)

    for _ in range(MAX_PIPE_TENSORS // MAX_POOL_TENSORS):
        a._blocks._announce(wide())  # described to the peer: up to the limit
    with pytest.raises(ValueError, match="tensors together"):
        async with asyncio.timeout(5):
            await a.send_blocks(wide(), [0], key="one too many")
    await round_trip(a, b)  # b took every POOL frame, and both pipes go on
    assert a._error is None and b._error is None
    body = encode_layout(9999, wide().layout)  # a peer describing more breaks the pipe
    a._control.write_encoded(a._proto.send_pool(9999, body))
    await eventually(lambda: b._error is not None, 10, "b refused the pool")
    assert isinstance(b._error.__cause__, aiokvpipe.ProtocolError), repr(b._error)
    assert "tensors together" in str(b._error.__cause__)


async def test_a_receiver_makes_the_views_of_a_large_scattered_transfer_turn_by_turn(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # 2,048 scattered blocks over 32 layers of 2 segments: 131,072 views, once all made in
    # the one callback that read the BLOCK_DATA (157 ms on the loop).
    a, b = await pair_factory()
    src = BlockPool([torch.randn(2, 4096, 4) for _ in range(32)], block_dim=1)
    dst = BlockPool([torch.zeros(2, 4096, 4) for _ in range(32)], block_dim=1)
    ids = list(range(0, 4096, 2))
    made = [0]
    most = [0]
    views_of = _pipe_blocks.run_views

    def counted(*args: object) -> list[memoryview]:
        views = views_of(*args)  # type: ignore[arg-type]
        made[0] += len(views)
        return views

    block_data = b._blocks._block_data

    def one_callback(offer_id: int) -> None:
        made[0] = 0
        block_data(offer_id)
        most[0] = max(most[0], made[0])

    monkeypatch.setattr(_pipe_blocks, "run_views", counted)
    b._blocks._block_data = one_callback  # type: ignore[method-assign]
    async with asyncio.timeout(30):
        await asyncio.gather(a.send_blocks(src, ids, key="k"), b.recv_blocks(dst, ids, key="k"))
    assert most[0] <= VIEWS_PER_STEP, f"{most[0]} views made in one callback"
    for s_t, d_t in zip(src.tensors, dst.tensors):
        assert torch.equal(s_t[:, ids], d_t[:, ids]) and not d_t[:, 1::2].any()


async def test_views_that_never_come_break_the_tcp_plane_rather_than_stall_it(
        pair_factory: PairFactory) -> None:
    # A receive posted with a future of views holds the receives behind it: if that future
    # is cancelled (its task ended with the loop), the plane must break, not wait for ever.
    _, b = await pair_factory()
    views: asyncio.Future[list[memoryview]] = asyncio.get_running_loop().create_future()
    receive = b._plane.post_recv_views(views)
    views.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(aiokvpipe.BrokenPipe):
            await b.wait_closed()
    assert receive.done()


async def test_an_abandoned_receive_drains_its_bytes_through_a_small_scratch(
        pair_factory: PairFactory) -> None:
    # A receive given up after its PULL left still has its payload to read: it once went
    # into one zeroed buffer of the transfer's size, made on the loop (3 s for 1 GiB, or a
    # MemoryError that broke the pipe).
    a, b = await pair_factory()
    src = BlockPool([torch.randn(2, 64, 1 << 16)], block_dim=1)  # 32 MiB of blocks
    dst = BlockPool([torch.zeros(2, 64, 1 << 16)], block_dim=1)
    posted: list[list[memoryview]] = []
    post = b._plane.post_recv_views

    def record(views: Any, keepalive: object = None) -> Any:
        if isinstance(views, list):
            posted.append(views)
        return post(views, keepalive)

    b._plane.post_recv_views = record  # type: ignore[method-assign]
    send_pull = b._blocks._send_pull

    def pull_then_give_up(offer_id: int, error: str = "") -> None:
        send_pull(offer_id, error)
        receiving.cancel()  # after the PULL left: the payload comes all the same

    b._blocks._send_pull = pull_then_give_up  # type: ignore[method-assign]
    async with asyncio.timeout(30):
        receiving = asyncio.create_task(b.recv_blocks(dst, range(64), key="k"))
        await a.send_blocks(src, range(64), key="k")
        with pytest.raises(asyncio.CancelledError):
            await receiving
    assert len(posted) == 1 and sum(map(len, posted[0])) == 32 << 20
    assert max(map(len, posted[0])) <= 1 << 20, "a buffer of the transfer's size"
    assert not dst.tensors[0].any()  # nothing of it landed in the pool
    b._blocks._send_pull = send_pull  # type: ignore[method-assign]
    async with asyncio.timeout(10):  # the stream is in step: the next transfer lands
        await asyncio.gather(a.send_blocks(src, [3], key="k2"), b.recv_blocks(dst, [5], key="k2"))
    assert torch.equal(src.tensors[0][:, 3], dst.tensors[0][:, 5])


async def test_a_pool_made_again_around_the_same_tensors_is_the_same_pool(
        pair_factory: PairFactory) -> None:
    # Pools were told apart by object: a BlockPool made per request around the engine's
    # tensors was a new pool each time, and after 1,024 requests the pipe refused them all.
    a, b = await pair_factory()
    src_tensors = [torch.randn(2, 8, 4, 2, 8) for _ in range(2)]
    dst_tensors = [torch.zeros(2, 8, 4, 2, 8) for _ in range(2)]
    async with asyncio.timeout(30):
        for i in range(_wire.MAX_POOLS + 2):
            block = i % 8
            await asyncio.gather(
                a.send_blocks(BlockPool(src_tensors, block_dim=1), [block], key=f"r{i}"),
                b.recv_blocks(BlockPool(dst_tensors, block_dim=1), [block], key=f"r{i}"))
    assert len(a._blocks._described) == 1
    for s_t, d_t in zip(src_tensors, dst_tensors):
        assert torch.equal(s_t, d_t)
    # A different layout over the same memory is another pool.
    async with asyncio.timeout(10):
        await asyncio.gather(
            a.send_blocks(BlockPool({"k": src_tensors[0]}, block_dim=1), [1], key="named"),
            b.recv_blocks(BlockPool({"k": dst_tensors[0]}, block_dim=1), [1], key="named"))
    assert len(a._blocks._described) == 2


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="Linux's memory maps")
async def test_a_pool_in_read_only_memory_is_refused_before_anything_moves(
        pair_factory: PairFactory, tmp_path: Any) -> None:
    # Receiving blocks into a numpy.memmap opened "r" failed the socket's receive (EFAULT),
    # breaking the pipe at both ends; over nccl the scatter out of the GPU would write it.
    np = pytest.importorskip("numpy")
    a, b = await pair_factory()
    path = tmp_path / "pool.bin"
    path.write_bytes(torch.arange(32, dtype=torch.float32).numpy().tobytes())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "The given NumPy array is not writable"
        mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r", shape=(8, 4)))
    read_only = BlockPool([mapped], block_dim=0)
    async with asyncio.timeout(10):
        with pytest.raises(ValueError, match="read-only"):
            await b.recv_blocks(read_only, [1, 2], key="in")
        # Nothing moved and the pipe goes on; sending out of read-only memory is fine.
        dst = BlockPool([torch.zeros(8, 4)], block_dim=0)
        await asyncio.gather(a.send_blocks(read_only, [5], key="out"),
                             b.recv_blocks(dst, [0], key="out"))
    assert torch.equal(dst.tensors[0][0], mapped[5])
    assert a._error is None and b._error is None
    # A writable pool is checked once; made again per request, it is not read again...
    key = dst.memory_key[1]
    assert key in _pipe_blocks._WRITABLE
    # ...until its memory may go: other memory, read-only, may be mapped at its address.
    del dst
    gc.collect()
    assert key not in _pipe_blocks._WRITABLE


async def test_a_discarded_key_stays_discarded_when_a_receive_is_refused_before_moving(
        pair_factory: PairFactory, tmp_path: Any) -> None:
    # recv_blocks takes a discarded key back at once; refused before anything moved (its
    # pool in read-only memory), it left the key taken back, and the next offer for it
    # waited for a receive that never came instead of being refused.
    np = pytest.importorskip("numpy")
    a, b = await pair_factory()
    path = tmp_path / "pool.bin"
    path.write_bytes(bytes(8 * 4 * 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapped = torch.from_numpy(np.memmap(path, dtype=np.float32, mode="r", shape=(8, 4)))
    b.discard("gone")
    async with asyncio.timeout(10):
        with pytest.raises(ValueError, match="read-only"):
            await b.recv_blocks(BlockPool([mapped], block_dim=0), [1], key="gone")
        with pytest.raises(ValueError, match="discard"):
            await a.send_blocks(BlockPool([torch.ones(8, 4)], block_dim=0), [1], key="gone")
    assert a._error is None and b._error is None


async def test_a_receive_whose_pool_is_checked_first_keeps_its_turn(
        pair_factory: PairFactory) -> None:
    # Two recv_blocks for one key: the first into a CPU pool not yet checked writable (its
    # memory maps read in a thread), the second into one checked before. The second took
    # the first offer while the first waited for its check.
    a, b = await pair_factory()
    src = BlockPool([torch.arange(32.0).reshape(8, 4)], block_dim=0)
    checked = BlockPool([torch.zeros(8, 4)], block_dim=0)
    async with asyncio.timeout(10):
        await asyncio.gather(a.send_blocks(src, [7], key="warm"),
                             b.recv_blocks(checked, [7], key="warm"))
        fresh = BlockPool([torch.zeros(8, 4)], block_dim=0)
        first = asyncio.create_task(b.recv_blocks(fresh, [0], key="k"))
        second = asyncio.create_task(b.recv_blocks(checked, [0], key="k"))
        await a.send_blocks(src, [1], key="k")
        await a.send_blocks(src, [2], key="k")
        await asyncio.gather(first, second)
    assert torch.equal(fresh.tensors[0][0], src.tensors[0][1]), "the first call's turn taken"
    assert torch.equal(checked.tensors[0][0], src.tensors[0][2])


async def test_dict_pools_naming_their_tensors_in_another_order_are_refused_at_both_ends(
        pair_factory: PairFactory) -> None:
    # Tensors go by position: a {"k", "v"} pool's K landed in a {"v", "k"} pool's V.
    a, b = await pair_factory()
    src = BlockPool({"k": torch.full((8, 4), 1.0), "v": torch.full((8, 4), 2.0)}, block_dim=0)
    dst = BlockPool({"v": torch.zeros(8, 4), "k": torch.zeros(8, 4)}, block_dim=0)
    async with asyncio.timeout(10):
        results = await asyncio.gather(a.send_blocks(src, [1], key="kv"),
                                       b.recv_blocks(dst, [2], key="kv"),
                                       return_exceptions=True)
    assert all(isinstance(r, ValueError) and "another order" in str(r) for r in results)
    assert not any(t.any() for t in dst.tensors)
    assert a._error is None and b._error is None


async def test_a_peer_dying_mid_transfer_breaks_both_calls(pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    src, dst = vllm_pool(1024), vllm_pool(1024)
    receiving = asyncio.create_task(b.recv_blocks(dst, list(range(1024)), key="k"))
    sending = asyncio.create_task(a.send_blocks(src, list(range(1024)), key="k"))
    await asyncio.sleep(0)
    a._control._transport.abort()  # type: ignore[union-attr]
    async with asyncio.timeout(10):
        for task in (receiving, sending):
            with pytest.raises(aiokvpipe.BrokenPipe):
                await task


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_memory_stays_flat_over_a_thousand_requests(pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    src, dst = vllm_pool(256, layers=8), vllm_pool(256, layers=8)
    ids = list(range(0, 256, 8))
    async with asyncio.timeout(50):
        for i in range(1100):
            if i == 100:
                before = _rss()  # after warm-up: caches, specs, pools of futures
            await asyncio.gather(a.send_blocks(src, ids, key=f"r{i}"),
                                 b.recv_blocks(dst, ids, key=f"r{i}"))
    grown = _rss() - before
    per_request = 2 * 8 * len(ids) * 4 * 2 * 8 * 4  # bytes moved per request
    assert grown < 8 * per_request + (4 << 20), f"RSS grew by {grown} bytes"


async def test_discard_refuses_block_offers_now_and_later(pair_factory: PairFactory) -> None:
    # A decode side that gives a request up must not leave the prefill's send_blocks waiting
    # for a pull that never comes.
    a, b = await pair_factory()
    src = vllm_pool(8)
    waiting = asyncio.create_task(a.send_blocks(src, [1], key="gone", layers=[0]))
    await eventually(lambda: bool(b._blocks._offers_in), 5, "the offer is at b, unmatched")
    assert b.discard("gone") == 1
    async with asyncio.timeout(10):
        with pytest.raises(ValueError, match="discarded"):
            await waiting
        with pytest.raises(ValueError, match="discarded"):  # and later offers too
            await a.send_blocks(src, [1], key="gone", layers=[1])
    await eventually(lambda: a.stats.send_credits == b._proto.recv_buffer_bytes, 5,
                     "offer credits back")
async def test_thousands_of_scattered_blocks_arrive_intact(pair_factory: PairFactory) -> None:
    """A CPU pool's request is thousands of small views: sent many per sendmsg, received many
    per recvmsg_into, across batches, partial sends (37.5 MiB outruns the socket buffers)
    and reads that end inside a view."""
    a, b = await pair_factory()

    def pool(num_blocks: int) -> BlockPool:  # 8 KiB K and V segments per block and layer
        return BlockPool([torch.full((2, num_blocks, 16, 8, 16), SENTINEL) for _ in range(4)],
                         block_dim=1)

    src, dst = pool(1024), pool(700)
    g = torch.Generator().manual_seed(5)
    src_ids = torch.randperm(1024, generator=g)[:600].tolist()
    dst_ids = torch.randperm(700, generator=g)[:600].tolist()
    for t in src.tensors:
        t.copy_(torch.randn(t.shape, generator=g))
    async with asyncio.timeout(40):
        for key in ("first", "second"):  # the second finds the plane's state reset
            await asyncio.gather(a.send_blocks(src, src_ids, key=key),
                                 b.recv_blocks(dst, dst_ids, key=key))
    for s_t, d_t in zip(src.tensors, dst.tensors):
        assert torch.equal(s_t[:, src_ids], d_t[:, dst_ids])
    assert_untouched(dst, dst_ids)


async def test_the_tcp_plane_moves_views_split_differently_on_each_end(
        pair_factory: PairFactory) -> None:
    """Bytes posted as views on one end land in views cut elsewhere on the other: a view
    larger than a send slice (a staging buffer), views of a few bytes, reads that end
    inside a view and cross many."""
    a, b = await pair_factory(transport="tcp")
    payload = torch.randint(0, 256, (9 << 20,), dtype=torch.uint8)
    out = torch.zeros_like(payload)
    mv_in, mv_out = memoryview(payload.numpy()), memoryview(out.numpy())
    cuts_in = [0, 3, 4, 100_000, 5 << 20, 9 << 20]  # one view over 4 MiB, tiny ones
    cuts_out = [0, *range(1, 2000, 7), 70_001, *range(1 << 20, 9 << 20, 3001), 9 << 20]
    send_views = [mv_in[x:y] for x, y in zip(cuts_in, cuts_in[1:])]
    recv_views = [mv_out[x:y] for x, y in zip(cuts_out, cuts_out[1:])]
    async with asyncio.timeout(20):
        received = b._plane.post_recv_views(recv_views, keepalive=out)
        sent = a._plane.post_send_views(send_views, keepalive=payload)
        await asyncio.gather(sent, received)
    assert torch.equal(out, payload)


async def test_a_graceful_close_ends_waiting_block_calls_with_pipe_closed(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    src, dst = vllm_pool(8), vllm_pool(8)
    offered = asyncio.create_task(a.send_blocks(src, [1], key="never-pulled"))
    waiting = asyncio.create_task(b.recv_blocks(dst, [2], key="never-sent"))
    async with asyncio.timeout(10):
        await eventually(lambda: bool(b._blocks._offers_in), 10, "the offer reached b")
        await a.aclose()  # ours: our offer will never be pulled now
        with pytest.raises(aiokvpipe.PipeClosed):
            await offered
        with pytest.raises(aiokvpipe.PipeClosed):  # the peer's: nothing more will come
            await waiting
        await b.aclose()


async def test_a_close_crossing_the_peers_pull_leaves_no_receive_waiting(
        pair_factory: PairFactory) -> None:
    # The sender closes while the receiver's PULL of its offer is on the way: the offer is
    # given up here, so the receiver must not wait for a payload that never comes.
    a, b = await pair_factory(close_timeout=60.0)
    src, dst = vllm_pool(8), vllm_pool(8)
    offered = asyncio.create_task(a.send_blocks(src, [1], key="k"))
    async with asyncio.timeout(10):
        await eventually(lambda: bool(b._blocks._offers_in), 10, "the offer reached b")
        receiving = asyncio.create_task(b.recv_blocks(dst, [2], key="k"))
        closing = asyncio.create_task(a.aclose())  # runs right after b's PULL is written
        with pytest.raises(aiokvpipe.PipeClosed):
            await offered
        with pytest.raises(aiokvpipe.PipeClosed):
            await receiving
        await closing
        await b.aclose()
    assert_untouched(dst, [])


async def test_an_offer_taken_back_by_a_close_at_once_breaks_nothing(
        pair_factory: PairFactory) -> None:
    # a's close takes the offer back right after it went out: b reads the OFFER and its
    # RETRACT together, and must not answer (refuse: its key is discarded) an offer that
    # is gone. Both ends close cleanly. (A refusal crossing the RETRACT on the wire:
    # tests/test_protocol.py.)
    a, b = await pair_factory()
    b.discard("gone")
    offered = asyncio.create_task(a.send_blocks(vllm_pool(8), [1], key="gone"))
    closing = asyncio.create_task(a.aclose())  # runs right after the OFFER is written
    async with asyncio.timeout(10):
        await closing
        with pytest.raises((aiokvpipe.PipeClosed, ValueError)):
            await offered
        await b.aclose()
    assert (a.state.name, b.state.name) == ("CLOSED", "CLOSED")  # graceful, not broken


async def test_the_peers_close_ends_our_offers_it_will_never_pull(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory()
    offered = asyncio.create_task(a.send_blocks(vllm_pool(8), [1], key="k"))
    async with asyncio.timeout(10):
        await eventually(lambda: bool(b._blocks._offers_in), 10, "the offer reached b")
        await b.aclose()
        with pytest.raises(aiokvpipe.PipeClosed):
            await offered
        await a.aclose()


async def test_a_graceful_close_delivers_blocks_already_pulled(pair_factory: PairFactory
                                                               ) -> None:
    a, b = await pair_factory()
    src, dst = vllm_pool(2048), vllm_pool(2048)
    ids = list(range(0, 2048, 2))
    fill_blocks(src, ids[:4], seed=9)
    receiving = asyncio.create_task(b.recv_blocks(dst, ids, key="big"))
    sending = asyncio.create_task(a.send_blocks(src, ids, key="big"))
    async with asyncio.timeout(20):
        while not a._blocks.sending:  # the pull came and the payload is on its way
            await asyncio.sleep(0)
        await asyncio.gather(a.aclose(), sending, receiving)
        await b.aclose()
    assert_moved(src, dst, ids, ids)


async def test_a_transfer_of_cpu_pools_is_cut_into_the_chunks_of_a_cuda_pool(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU pool's transfer over tcp travels in the chunks a CUDA pool's staging cuts it
    into, one BLOCK_DATA each, so that a CPU pool at one end meets a CUDA pool at the other
    (tests/test_pipe_blocks_cuda.py). (It went in one: a CUDA receiver read the rest as the
    next message's bytes, a CUDA sender's second chunk broke the pipe.)"""
    monkeypatch.setattr(_pipe_blocks, "STAGING_BYTES", 3000)  # a block of a tensor: 512 B
    a, b = await pair_factory(transport="tcp")
    src, dst = vllm_pool(64), vllm_pool(40)
    src_ids, dst_ids = [3, 4, 5, 17, 60, 0, 9, 10], [39, 1, 2, 3, 20, 8, 30, 31]
    fill_blocks(src, src_ids, seed=11)
    seen: list[int] = []
    block_data = b._blocks._block_data
    monkeypatch.setattr(b._blocks, "_block_data",
                        lambda offer_id: (seen.append(offer_id), block_data(offer_id)))
    chunks = list(_pipe_blocks.iter_chunks(src.layout, range(4), len(src_ids), 3000))
    async with asyncio.timeout(20):
        await asyncio.gather(a.send_blocks(src, src_ids, key="r"),
                             b.recv_blocks(dst, dst_ids, key="r"))
        assert len(seen) == len(chunks) > 1, (seen, len(chunks))
        x = torch.arange(1 << 17, dtype=torch.uint8)  # the payload stream is in step after
        await a.send(x)
        assert torch.equal(await b.recv(), x)
    assert_moved(src, dst, src_ids, dst_ids)
    assert_untouched(dst, dst_ids)


async def test_blocks_larger_than_the_staging_travel_one_a_chunk(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block of one tensor larger than the staging chunk goes in a chunk of its own. (It
    raised ValueError mid-transfer, after the pull, and broke the pipe as our failure.)"""
    monkeypatch.setattr(_pipe_blocks, "STAGING_BYTES", 256)  # a block of a tensor: 512 B
    a, b = await pair_factory(transport="tcp")
    src, dst = vllm_pool(16), vllm_pool(16)
    fill_blocks(src, [1, 2, 3], seed=14)
    async with asyncio.timeout(20):
        await asyncio.gather(a.send_blocks(src, [1, 2, 3], key="r"),
                             b.recv_blocks(dst, [4, 5, 6], key="r"))
    assert_moved(src, dst, [1, 2, 3], [4, 5, 6])
    assert a._error is None and b._error is None


async def test_a_receive_the_peers_close_leaves_short_raises_once_the_rest_landed(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The peer sends one of the two layers a recv_blocks waits for, and closes while that
    layer still lands: once it landed, the call raises PipeClosed (it waited for ever)."""
    a, b = await pair_factory()
    src, dst = vllm_pool(8, layers=2), vllm_pool(8, layers=2)
    landing: list[tuple[asyncio.Future[Any], asyncio.Future[Any]]] = []
    track = b._blocks._track

    def held(sink: Any, done: asyncio.Future[Any], incoming: Any, last: bool) -> None:
        late: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        landing.append((done, late))  # lands (for the exchange) when the test says so
        track(sink, late, incoming, last)

    monkeypatch.setattr(b._blocks, "_track", held)
    async with asyncio.timeout(20):
        receiving = asyncio.create_task(b.recv_blocks(dst, [1, 2], key="r"))
        await a.send_blocks(src, [3, 4], key="r", layers=[0])
        closing = asyncio.create_task(a.aclose())
        await eventually(lambda: b._proto.close_received, 10, "b read the peer's CLOSE")
        assert not receiving.done() and len(landing) == 1
        done, late = landing[0]
        await asyncio.wait([done])
        settle_like(late, done)
        with pytest.raises(aiokvpipe.PipeClosed):
            await receiving
        await closing
    assert_moved(src, dst, [3, 4], [1, 2], layers=[0])


async def test_recv_blocks_after_the_peers_close_raises_while_a_message_still_lands(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the peer closed, recv_blocks raises PipeClosed at once, also while a message's
    payload still lands (recv() may still take that message; no block will come)."""
    a, b = await pair_factory(transport="tcp")
    landing: list[tuple[asyncio.Future[Any], asyncio.Future[Any]]] = []
    post_recv = b._plane.post_recv

    def held(specs: Any) -> asyncio.Future[Any]:
        late: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        landing.append((post_recv(specs), late))  # arrives when the test says so
        return late

    monkeypatch.setattr(b._plane, "post_recv", held)
    x = torch.arange(1 << 20, dtype=torch.int32)  # far above the inline limit
    async with asyncio.timeout(20):
        await a.send(x, key="big")
        closing = asyncio.create_task(a.aclose())
        await eventually(lambda: b._proto.close_received, 10, "b read the peer's CLOSE")
        assert b._incoming and len(landing) == 1
        with pytest.raises(aiokvpipe.PipeClosed):
            await b.recv_blocks(vllm_pool(8), [1], key="k")
        done, late = landing[0]
        await done
        settle_like(late, done)
        assert torch.equal(await b.recv(key="big"), x)
        await closing


async def test_an_offer_retracted_across_our_pull_leaves_the_next_one_to_be_pulled(
        pair_factory: PairFactory) -> None:
    """Two offers of a key's layer wait; recv_blocks pulls the first, whose sender takes it
    back before it reads the PULL: the second is pulled now. (It stayed queued for ever, as
    did both calls.)"""
    a, b = await pair_factory()
    src, dst = vllm_pool(16), vllm_pool(16)
    fill_blocks(src, [1, 2], seed=12)
    async with asyncio.timeout(20):
        first = asyncio.create_task(a.send_blocks(src, [1, 2], key="k"))
        second = asyncio.create_task(a.send_blocks(src, [1, 2], key="k"))
        await eventually(lambda: len(b._blocks._offers_in.get("k", ())) == 2, 10,
                         "both offers wait at b")
        a._control._transport.pause_reading()  # a reads b's PULL only after it took it back
        receiving = asyncio.create_task(b.recv_blocks(dst, [3, 4], key="k"))
        await eventually(lambda: bool(b._blocks._incoming), 10, "b pulled the first offer")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        a._control._transport.resume_reading()
        await asyncio.gather(second, receiving)
    assert_moved(src, dst, [1, 2], [3, 4])


async def test_a_receive_cancelled_in_the_iteration_its_offer_is_read_takes_nothing(
        pair_factory: PairFactory) -> None:
    """A recv_blocks cancelled just before the read that brings its offer (a callback of
    the same loop iteration): the offer waits for the next call. (The cancelled call pulled
    it and read the blocks into scratch, and a retry waited for ever.)"""
    a, b = await pair_factory()
    src, dst = vllm_pool(16), vllm_pool(16)
    fill_blocks(src, [1, 2], seed=13)
    receiving = asyncio.create_task(b.recv_blocks(dst, [3, 4], key="k"))
    await eventually(lambda: bool(b._blocks._sinks.get("k")), 10, "the call waits at b")
    on_frame = b._blocks.on_frame

    def cancel_first(frame: _wire.Frame) -> None:
        if isinstance(frame, _wire.Offer) and not receiving.done():
            receiving.cancel()  # requested; the call has not resumed yet
        on_frame(frame)

    b._blocks.on_frame = cancel_first  # type: ignore[method-assign]
    async with asyncio.timeout(20):
        sending = asyncio.create_task(a.send_blocks(src, [1, 2], key="k"))
        with pytest.raises(asyncio.CancelledError):
            await receiving
        await round_trip(a, b)
        assert not sending.done(), "the blocks went to a call that was cancelled"
        await asyncio.gather(sending, b.recv_blocks(dst, [3, 4], key="k"))
    assert_moved(src, dst, [1, 2], [3, 4])


@pytest.mark.parametrize(("ids", "layers", "what"), [
    ((0, 16), (0,), "blocks outside its pool of 16"),
    ((3,), (4,), "tensors outside its pool of 4"),
])
async def test_an_offer_outside_the_senders_pool_is_a_protocol_error(
        pair_factory: PairFactory, ids: tuple[int, ...], layers: tuple[int, ...],
        what: str) -> None:
    # The receiver may read the sender's pool at those ids itself (ipc): ids and tensors
    # beyond the pool the sender described break the pipe, whether or not a recv_blocks
    # is waiting, and nothing is read.
    a, b = await pair_factory()
    src = vllm_pool(16)
    pool_id, _ = a._blocks._announce(src)
    _, frame = a._proto.send_offer(pool_id, None, layers, ids)
    a._write(frame)
    async with asyncio.timeout(5):
        with pytest.raises(aiokvpipe.BrokenPipe) as info:
            await b.wait_closed()
    assert isinstance(info.value.__cause__, aiokvpipe.ProtocolError)
    assert what in str(info.value.__cause__)


async def test_a_flood_of_offers_is_handled_a_bounded_number_per_loop_iteration(
        pair_factory: PairFactory) -> None:
    # Each block frame sets work in motion (a match, a copy, an answer): eight requests
    # streamed a layer at a time put 256 offers in one read, which held an H200 host's loop
    # for 30 ms. A receiver acts on TURN_BUDGET's worth per loop iteration (16 block frames).
    from aiokvpipe import _pipe, _wire

    a, b = await pair_factory()
    src, dst = vllm_pool(64), vllm_pool(64)
    b_transport = b._control._transport
    assert b_transport is not None
    b_transport.pause_reading()
    n = 200
    sends = [asyncio.create_task(a.send_blocks(src, [i % 64], key=f"k{i}")) for i in range(n)]
    await round_trip_written(a, n)
    handled: list[int] = []
    count = 0
    on_frame = b._blocks.on_frame

    def counting(frame: _wire.Frame) -> None:
        nonlocal count
        count += 1
        on_frame(frame)

    b._blocks.on_frame = counting  # type: ignore[method-assign]

    def turn() -> None:  # runs once per loop iteration
        nonlocal count
        handled.append(count)
        count = 0
        asyncio.get_running_loop().call_soon(turn)

    asyncio.get_running_loop().call_soon(turn)
    b_transport.resume_reading()
    async with asyncio.timeout(20):
        await asyncio.gather(*(b.recv_blocks(dst, [i % 64], key=f"k{i}") for i in range(n)),
                             *sends)
    per_turn = _pipe.TURN_BUDGET // _wire.FRAME_WEIGHT[_wire.FrameType.OFFER]
    assert per_turn == 16
    # A read and the continuation of a backlog can fall in one iteration (uvloop runs what
    # a read schedules before it polls again): two turns' worth at most. Without the
    # budget, the offers' read alone was 200.
    assert max(handled) <= 2 * per_turn, f"{handled} block frames per loop iteration"
    assert sum(handled) >= n  # the offers (and the pool's description) went through


async def round_trip_written(a: aiokvpipe.Pipe, n: int) -> None:
    """Wait until ``a`` has written ``n`` offers (they wait, unread, at the peer)."""
    await eventually(lambda: len(a._blocks._offers_out) == n, 10, f"{n} offers written")



async def test_a_receive_in_a_task_that_swallowed_a_cancellation_takes_its_offer(
        pair_factory: PairFactory) -> None:
    """A task that caught a cancellation without uncancel() (an older cancel scope, a
    hand-written ``except CancelledError``) still counts it; its later recv_blocks is not
    being cancelled for that, and takes its offer (it never took one, and waited for ever)."""
    a, b = await pair_factory()
    src, dst = vllm_pool(8), vllm_pool(8)
    fill_blocks(src, [3, 4], seed=15)

    async def handler() -> None:
        try:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            pass  # swallowed: the task's cancelling() stays 1
        await b.recv_blocks(dst, [1, 2], key="r")

    async with asyncio.timeout(10):
        await asyncio.gather(handler(), a.send_blocks(src, [3, 4], key="r"))
    assert_moved(src, dst, [3, 4], [1, 2])


async def test_a_wait_for_a_scatter_after_a_break_ends_its_call_even_when_cancelled() -> None:
    """After a break a receive's end waits for its scatter, in a thread: cancelled meanwhile
    (the loop shutting down), it still settles, so that recv_blocks ends. (It never did:
    the call then waited for ever.)"""
    go = threading.Event()

    class Scatter:  # its event: the scatter is still running
        def synchronize(self) -> None:
            go.wait(5)

    loop = asyncio.get_running_loop()
    landed: asyncio.Future[None] = loop.create_future()
    failed: asyncio.Future[None] = loop.create_future()
    failed.set_exception(aiokvpipe.BrokenPipe("the pipe broke (injected)"))
    waiting = asyncio.create_task(_pipe_blocks._settle_after(Scatter(), landed, failed, None))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    go.set()
    assert landed.done() and isinstance(landed.exception(), aiokvpipe.BrokenPipe)


async def test_a_peer_retracting_many_queued_offers_costs_linear_work(
        pair_factory: PairFactory) -> None:
    """A peer queues 20,000 empty offers for a key nobody receives (well within its receive
    credit: 296 bytes each), then retracts them newest first. Each RETRACT takes its offer
    out at once: the lot takes well under the bound. (Each scanned every queued offer: 30 s
    of the receiver's loop on the 2-core VM, a stall long enough, at the default credit's
    1.8 M offers, to miss heartbeats.)"""
    n = 20_000
    a, b = await pair_factory(heartbeat_timeout=120)
    pool_id, _ = a._blocks._announce(BlockPool([torch.zeros(8, 16)], block_dim=0))
    cost = offer_cost(0, 1)
    offers = []
    for _ in range(n):  # accounted as send_blocks does, so the credit coming back is due
        assert a._credits.try_acquire(cost)
        a._proto.spend(cost)
        offers.append(a._proto.send_offer(pool_id, "nobody", (0,), ())[1])
    a._write(b"".join(offers))
    await eventually(lambda: b._proto.next_offer_in == n, 30, "the offers are queued at b")
    started = asyncio.get_running_loop().time()
    a._write(b"".join(_wire.encode(_wire.Retract(i)) for i in reversed(range(n))))
    await eventually(lambda: not b._blocks._offers_in, 30, "every offer retracted")
    took = asyncio.get_running_loop().time() - started
    assert took < 8, f"{n} retracts took {took:.1f} s"  # linear: about 0.5 s here
    assert a.state is b.state is aiokvpipe.State.OPEN
