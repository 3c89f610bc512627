"""Block transfers between CUDA pools: staged through pinned memory (tcp), device staging
(nccl between two processes) and the ipc plane, with stream ordering and sentinels."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from test_cuda_nccl import start_peer  # noqa: F401  (the two-process fixture)

import aiokvpipe
from aiokvpipe import BlockPool, _pipe_blocks

pytestmark = [pytest.mark.cuda, pytest.mark.timeout(120),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SENTINEL = -7.0


def pool(num_blocks: int, fill: float = SENTINEL, device: str = "cuda:0") -> BlockPool:
    return BlockPool([torch.full((2, num_blocks, 16, 2, 64), fill, dtype=torch.bfloat16,
                                 device=device) for _ in range(4)], block_dim=1)


def randomize(p: BlockPool, ids: list[int]) -> None:
    for t in p.tensors:
        t[:, ids] = torch.randn_like(t[:, ids])


def moved(src: BlockPool, dst: BlockPool, s_ids: list[int], d_ids: list[int]) -> bool:
    return all(torch.equal(a[:, s_ids], b[:, d_ids]) for a, b in zip(src.tensors, dst.tensors))


def untouched(dst: BlockPool, named: list[int]) -> bool:
    keep = [b for b in range(dst.num_blocks) if b not in named]
    return all(bool((t[:, keep] == SENTINEL).all()) for t in dst.tensors)


@contextlib.asynccontextmanager
async def tcp_pair_in_this_process() -> AsyncIterator[tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]]:
    """Both ends of a pipe on cuda:0 in this process (tcp: the IPC probe cannot prove itself
    within one process), closed afterwards."""
    async with await aiokvpipe.listen(device="cuda:0") as listener:
        accept = asyncio.create_task(listener.accept())
        a = await aiokvpipe.connect("127.0.0.1", listener.port, device="cuda:0")
        b = await accept
        try:
            yield a, b
        finally:
            await a.aclose()
            await b.aclose()


async def test_cuda_pools_over_tcp_in_one_process_are_stream_ordered() -> None:
    async with tcp_pair_in_this_process() as (a, b):
        assert a.transport == "tcp"  # one process: the IPC probe cannot prove itself
        src, dst = pool(300), pool(64)
        s_ids = [299, 5, 6, 7, 100, 0, 42, 43]
        d_ids = [63, 0, 1, 2, 30, 31, 32, 10]
        randomize(src, s_ids)
        expected = [t.clone() for t in src.tensors]
        # The producer's last write is still queued behind a long kernel: send_blocks must
        # read the blocks after it (stream-ordered), not what is in memory now.
        torch.cuda._sleep(200_000_000)
        for t in src.tensors:
            t[:, s_ids] += 1
        receiving = asyncio.create_task(b.recv_blocks(dst, d_ids, key="r"))
        for layer in range(4):
            await a.send_blocks(src, s_ids, key="r", layers=[layer])
        await asyncio.wait_for(receiving, 60)
        for e, t in zip(expected, dst.tensors):
            assert torch.equal(e[:, s_ids] + 1, t[:, d_ids])
        assert untouched(dst, d_ids)


@pytest.mark.parametrize("src_device", ["cpu", "cuda:0"])
async def test_a_cpu_pool_and_a_cuda_pool_over_tcp_cut_a_transfer_alike(
        monkeypatch: pytest.MonkeyPatch, src_device: str) -> None:
    """A CPU pool at one end, a CUDA pool at the other, a transfer of several staging
    chunks: it lands whole, and the payload stream stays in step for the next message (the
    CPU end sent or expected one BLOCK_DATA, the CUDA end one per chunk)."""
    monkeypatch.setattr(_pipe_blocks, "STAGING_BYTES", 64 << 10)  # 8 blocks of a tensor
    async with tcp_pair_in_this_process() as (a, b):
        dst_device = "cuda:0" if src_device == "cpu" else "cpu"
        src, dst = pool(300, device=src_device), pool(64, device=dst_device)
        s_ids, d_ids = list(range(100, 140)), list(range(10, 50))
        randomize(src, s_ids)
        async with asyncio.timeout(60):
            await asyncio.gather(a.send_blocks(src, s_ids, key="r"),
                                 b.recv_blocks(dst, d_ids, key="r"))
            x = torch.arange(1 << 20, dtype=torch.int32, device="cuda:0")
            await a.send(x)
            assert torch.equal(await b.recv(), x)
        torch.cuda.synchronize()
        for s_t, d_t in zip(src.tensors, dst.tensors):
            assert torch.equal(s_t[:, s_ids].cpu(), d_t[:, d_ids].cpu())
        assert untouched(dst, d_ids)


async def test_a_break_ends_recv_blocks_only_once_its_queued_scatter_ran() -> None:
    """The pipe breaks while a chunk's scatter into the caller's CUDA pool is queued behind
    the caller's stream: recv_blocks raises only once the scatter ran, so that nothing
    writes the named blocks after it. (It raised at once, and the scatter then wrote blocks
    the caller had handed to another request.)"""
    async with tcp_pair_in_this_process() as (a, b):
        src, dst = pool(64), pool(64)
        async with asyncio.timeout(60):  # the copy kernel made: no call below prepares it
            await asyncio.gather(a.send_blocks(src, [9], key="w"),
                                 b.recv_blocks(dst, [9], key="w"))
        randomize(src, [1, 2])
        torch.cuda.synchronize()  # the sender's stream idle: its payload leaves at once
        # Only the receiver's stream is busy (a stream of its own: a busy sender would hold
        # the payload back until then, and the scatter would never be queued behind it).
        busy = torch.cuda.Stream()
        with torch.cuda.stream(busy):
            torch.cuda._sleep(2_000_000_000)  # about a second
            busy_until = torch.cuda.Event()
            busy_until.record()
            receiving = asyncio.create_task(b.recv_blocks(dst, [3, 4], key="r"))
            await asyncio.sleep(0)  # its first step marks its caller's stream: this one
        sending = asyncio.create_task(a.send_blocks(src, [1, 2], key="r"))
        async with asyncio.timeout(60):
            while not b._blocks._poller._pending:  # the scatter is queued
                await asyncio.sleep(0.001)
            assert not busy_until.query(), "the caller's stream was done already"
            b._break(ConnectionResetError("the peer died (injected)"))
            with pytest.raises(aiokvpipe.BrokenPipe):
                await receiving
            assert busy_until.query(), "recv_blocks ended before its scatter could run"
            await asyncio.gather(sending, return_exceptions=True)


@pytest.mark.parametrize("transport", ["nccl", "ipc"])
async def test_cuda_pools_between_processes(start_peer: object,  # noqa: F811
                                            transport: str) -> None:
    if transport == "nccl":
        pytest.importorskip("cupy")
    peer = await start_peer("blocks", "512", transport=transport,  # type: ignore[operator]
                            disguise=transport == "nccl")
    assert peer.pipe.transport == transport
    src, back = pool(1024), pool(700)
    s_ids = torch.randperm(1024)[:200].tolist()
    d_ids = torch.randperm(700)[:200].tolist()
    peer_ids = torch.randperm(512)[:200].tolist()
    randomize(src, s_ids)
    for _ in range(3):  # the pool is described once, then reused
        await peer.pipe.send({"ids": torch.tensor(peer_ids)})
        await asyncio.wait_for(peer.pipe.send_blocks(src, s_ids, key="blocks"), 60)
        await asyncio.wait_for(peer.pipe.recv_blocks(back, d_ids, key="back"), 60)
        assert moved(src, back, s_ids, d_ids) and untouched(back, d_ids)
    if transport == "ipc":
        # Straight out of the peer's pool, mapped once: one copy per transfer, no staging.
        stats = peer.pipe._plane.stats
        assert stats["pools_mapped"] == 1 and stats["pulls"] == 3, stats


async def ipc_peer(start: Any, *args: str) -> Any:
    peer = await start("blocks", "512", *args, transport="ipc", disguise=False)
    assert peer.pipe.transport == "ipc"
    return peer


async def test_ipc_peer_pulls_each_layer_only_after_our_stream_wrote_it(
        start_peer: object) -> None:  # noqa: F811
    peer: Any = await ipc_peer(start_peer)
    src, back = pool(1024), pool(700)
    s_ids = torch.randperm(1024)[:100].tolist()
    d_ids = torch.randperm(700)[:100].tolist()
    peer_ids = torch.randperm(512)[:100].tolist()
    randomize(src, s_ids)
    expected = [t[:, s_ids] + 1 for t in src.tensors]
    await peer.pipe.send({"ids": torch.tensor(peer_ids)})
    for layer, t in enumerate(src.tensors):
        # The layer's last write waits behind a long kernel on our stream: the peer copies
        # the blocks straight out of our pool, and must see that write. (A kernel alone: an
        # index from the host, t[:, s_ids], is copied to the GPU and synchronised, and the
        # stream would be idle by the send.)
        torch.cuda._sleep(100_000_000)
        t.add_(1)
        assert not torch.cuda.current_stream().query()
        await asyncio.wait_for(peer.pipe.send_blocks(src, s_ids, key="blocks", layers=[layer]),
                               60)
    await asyncio.wait_for(peer.pipe.recv_blocks(back, d_ids, key="back"), 60)
    for e, t in zip(expected, back.tensors):
        assert torch.equal(e, t[:, d_ids])
    assert untouched(back, d_ids)


async def test_ipc_a_failing_send_is_told_after_an_earlier_send_waiting_for_our_stream(
        start_peer: object) -> None:  # noqa: F811
    """A send_blocks waits for our stream to write its blocks before it offers them (ipc: the
    peer copies straight out of our pool); a send_blocks for the same key called after it
    fails on its arguments. The peer pairs them in call order: its first receive gets the
    blocks, its second the failure. (The failure word went ahead of the waiting offer: the
    peer's first receive failed, and the offer waited for ever.)"""
    peer: Any = await ipc_peer(start_peer)
    src, back = pool(1024), pool(700)
    s_ids = torch.randperm(1024)[:60].tolist()
    d_ids = torch.randperm(700)[:60].tolist()
    async with asyncio.timeout(60):
        await there_and_back(peer, src, back, 1)  # the copy kernel made: no call prepares
        randomize(src, s_ids)
        expected = [t[:, s_ids] + 1 for t in src.tensors]
        await peer.pipe.send({"ids": torch.tensor(torch.randperm(512)[:60].tolist())})
        torch.cuda._sleep(200_000_000)  # the last writes wait behind a long kernel
        for t in src.tensors:
            t.add_(1)  # (a kernel alone: an index from the host would synchronise)
        assert not torch.cuda.current_stream().query(), "our stream is idle already"
        good = asyncio.create_task(peer.pipe.send_blocks(src, s_ids, key="blocks"))
        await asyncio.sleep(0)  # called first: it now waits for our stream
        assert not good.done()
        with pytest.raises(IndexError):
            await peer.pipe.send_blocks(src, [5000], key="blocks")  # called second
        await asyncio.wait_for(good, 30)
        await peer.pipe.recv_blocks(back, d_ids, key="back")
        await peer.pipe.send({"ids": torch.tensor([0])})  # the peer's second receive
        assert await peer.pipe.recv(key="failed") is None
    for e, t in zip(expected, back.tensors):
        assert torch.equal(e, t[:, d_ids])


async def test_ipc_a_failed_poll_of_our_stream_breaks_the_pipe_with_its_cause(
        start_peer: object, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The event after our stream's pending writes cannot be queried (a CUDA error) while a
    block send waits to offer: the pipe breaks with that error, the call raises BrokenPipe.
    The poller used to hand the raw error to this call and to every later one, the pipe
    looking healthy."""
    peer: Any = await ipc_peer(start_peer)
    src = pool(1024)
    ids = torch.randperm(512)[:50].tolist()
    boom = RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    class Failing:
        def query(self) -> bool:
            raise boom

    poller = peer.pipe._blocks._ready_poller
    real = poller.watch
    waited: list[object] = []

    def watch(event: object, *args: Any, **kwargs: Any) -> Any:
        waited.append(event)
        return real(Failing(), *args, **kwargs)

    monkeypatch.setattr(poller, "watch", watch)
    await peer.pipe.send({"ids": torch.tensor(ids)})
    torch.cuda._sleep(100_000_000)  # our stream busy: the send waits for its event
    with pytest.raises(aiokvpipe.BrokenPipe) as raised:
        await asyncio.wait_for(peer.pipe.send_blocks(src, ids, key="blocks"), 30)
    assert len(waited) == 1, "the send did not wait for our stream"
    assert raised.value.__cause__ is boom
    assert peer.pipe.state.name == "BROKEN"
    torch.cuda.synchronize()


async def there_and_back(peer: Any, src: BlockPool, back: BlockPool, n: int
                         ) -> tuple[list[int], list[int]]:
    """``n`` random blocks of ``src`` to the peer's pool, and the peer's back into ``back``
    (the peer's "blocks" mode); returns the ids of each end."""
    s_ids = torch.randperm(src.num_blocks)[:n].tolist()
    d_ids = torch.randperm(back.num_blocks)[:n].tolist()
    randomize(src, s_ids)
    await peer.pipe.send({"ids": torch.tensor(torch.randperm(512)[:n].tolist())})
    await asyncio.wait_for(peer.pipe.send_blocks(src, s_ids, key="blocks"), 60)
    await asyncio.wait_for(peer.pipe.recv_blocks(back, d_ids, key="back"), 60)
    return s_ids, d_ids


async def test_ipc_blocks_from_a_mapped_pool_into_a_cpu_pool(start_peer: object  # noqa: F811
                                                              ) -> None:
    peer: Any = await ipc_peer(start_peer)
    src, back = pool(1024), pool(300, device="cpu")
    s_ids, d_ids = await there_and_back(peer, src, back, 120)
    for a, b in zip(src.tensors, back.tensors):
        assert torch.equal(a[:, s_ids].cpu(), b[:, d_ids])
    assert untouched(back, d_ids)
    assert peer.pipe._plane.stats["pulls"] >= 1  # gathered out of the mapped pool


async def test_ipc_a_pool_that_cannot_be_mapped_travels_staged(start_peer: object  # noqa: F811
                                                                 ) -> None:
    # A CPU pool is not exported: the peer cuts the transfer into staging chunks (only then:
    # for a mapped pool it copies straight out of it) and receives them as messages.
    peer: Any = await ipc_peer(start_peer)
    src, back = pool(1024, device="cpu"), pool(700)
    s_ids, d_ids = await there_and_back(peer, src, back, 150)
    for a, b in zip(src.tensors, back.tensors):
        assert torch.equal(a[:, s_ids], b[:, d_ids].cpu())
    assert untouched(back, d_ids)


async def test_ipc_peer_killed_while_it_pulls_our_blocks(start_peer: object  # noqa: F811
                                                         ) -> None:
    peer: Any = await ipc_peer(start_peer, "slow")
    src = pool(1024)
    ids = torch.randperm(512)[:200].tolist()
    await peer.pipe.send({"ids": torch.tensor(ids)})
    sending = asyncio.create_task(peer.pipe.send_blocks(src, ids, key="blocks"))
    exchange = peer.pipe._blocks
    async with asyncio.timeout(30):  # pulled: the peer's copy now waits for its stream
        while exchange._offers_out or not exchange._copies_out:
            # Done already: the peer's copy did not wait (the window this test needs is gone).
            assert not sending.done(), f"the transfer ended before the kill: {sending!r}"
            await asyncio.sleep(0.01)
    peer.signal(signal.SIGKILL)
    with pytest.raises(aiokvpipe.BrokenPipe):
        await asyncio.wait_for(sending, 2)
    # Our pool is ours again, and the GPU works.
    src.tensors[0].add_(1)
    torch.cuda.synchronize()



async def test_the_copy_kernel_is_made_off_the_loop_before_the_first_block_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("cupy")
    import threading

    from aiokvpipe import _blocks_move

    made_on: list[str] = []
    real = _blocks_move._kernel

    def kernel() -> Any:
        if not _blocks_move._kernel_cache:  # this call makes the kernel (and compiles it)
            made_on.append(threading.current_thread().name)
        return real()

    # As in a process that never made it (CuPy itself is imported here already).
    monkeypatch.setattr(_blocks_move, "_kernel", kernel)
    monkeypatch.setattr(_blocks_move, "_kernel_cache", [])
    monkeypatch.setattr(_blocks_move, "_prepared", {})
    async with tcp_pair_in_this_process() as (a, b):
        src, dst = pool(64), pool(64)
        randomize(src, [1, 2, 3])
        receiving = asyncio.create_task(b.recv_blocks(dst, [4, 5, 6], key="k"))
        await a.send_blocks(src, [1, 2, 3], key="k")
        await asyncio.wait_for(receiving, 60)
        assert moved(src, dst, [1, 2, 3], [4, 5, 6])
        assert made_on == ["aiokvpipe-kernel"], f"the kernel was made on {made_on}"
        assert _blocks_move.kernel_available(torch.device("cuda", 0))
