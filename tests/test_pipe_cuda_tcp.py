"""CUDA tensors over the tcp data plane (staged through pinned host memory): same GPU on both
ends with transport="tcp" forced, CPU → CUDA and CUDA → CPU, in-process and with a peer
process. Skipped where torch sees no CUDA device."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import HOST, PairFactory, SpawnPeer, close_quietly

import aiokvpipe

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

MiB = 1 << 20
CUDA_TCP = {"device": "cuda", "transport": "tcp"}


def cuda_message(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {
        "k": torch.randn(4, 128, 64, device="cuda", dtype=torch.float16, generator=g),
        "v": torch.randn(4, 128, 64, device="cuda", dtype=torch.bfloat16, generator=g),
        "ids": torch.randint(0, 50000, (1000,), device="cuda", generator=g),
        "mask": torch.rand(33, device="cuda", generator=g) > 0.5,
        "empty": torch.empty(0, 8, device="cuda"),
        "scalar": torch.tensor(2.5, device="cuda"),
    }


def assert_same(sent: dict[str, torch.Tensor], got: Any, device_type: str) -> None:
    assert isinstance(got, dict) and list(got) == list(sent)
    for name, s in sent.items():
        g = got[name]
        assert g.device.type == device_type, f"{name} arrived on {g.device}"
        assert g.dtype == s.dtype and g.shape == s.shape, name
        assert torch.equal(g.cpu(), s.cpu()), f"{name}: values differ"


async def test_cuda_to_cuda_on_the_same_gpu_over_tcp(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(**CUDA_TCP)
    assert a.transport == b.transport == "tcp"
    assert b.device == torch.device("cuda", torch.cuda.current_device())
    sent = cuda_message(1)
    await a.send(sent, key="req")
    assert_same(sent, await asyncio.wait_for(b.recv(key="req"), 30), "cuda")
    back = cuda_message(2)
    await b.send(back)
    assert_same(back, await asyncio.wait_for(a.recv(), 30), "cuda")


async def test_auto_transport_on_one_gpu_falls_back_to_tcp(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(device="cuda", transport="auto")
    assert a.transport == b.transport == "tcp"  # NCCL refuses two ranks on one GPU
    sent = cuda_message(3)
    await a.send(sent)
    assert_same(sent, await asyncio.wait_for(b.recv(), 30), "cuda")


async def test_cpu_sender_to_cuda_receiver(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(transport="tcp", client_opts={"device": "cpu"},
                              server_opts={"device": "cuda"})
    sent = {name: t.cpu() for name, t in cuda_message(4).items()}
    await a.send(sent)
    assert_same(sent, await asyncio.wait_for(b.recv(), 30), "cuda")


async def test_cuda_sender_to_cpu_receiver(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(transport="tcp", client_opts={"device": "cuda"},
                              server_opts={"device": "cpu"})
    sent = cuda_message(5)
    await a.send(sent)
    assert_same(sent, await asyncio.wait_for(b.recv(), 30), "cpu")


async def test_send_sees_the_result_of_kernels_still_queued(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(**CUDA_TCP)
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(4):
        x = x @ x  # queued on the current stream, most likely unfinished at send() time
        x = x / x.abs().max()
    await a.send(x)
    got = await asyncio.wait_for(b.recv(), 30)
    assert torch.equal(got.cpu(), x.cpu())


async def test_send_from_a_side_stream(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(**CUDA_TCP)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        y = torch.arange(MiB, device="cuda", dtype=torch.float32).mul_(3)
        await a.send(y)  # ordered after the work queued on the side stream
    got = await asyncio.wait_for(b.recv(), 30)
    side.synchronize()
    assert torch.equal(got.cpu(), y.cpu())


async def test_received_tensor_is_usable_at_once_on_the_current_stream(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory(**CUDA_TCP)
    sent = torch.randn(8 * MiB // 4, device="cuda")
    await a.send(sent)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = await asyncio.wait_for(b.recv(), 30)
        doubled = got * 2  # no synchronisation by the caller
    side.synchronize()
    assert torch.equal(doubled.cpu(), (sent * 2).cpu())


async def test_large_and_noncontiguous_cuda_tensors(pair_factory: PairFactory) -> None:
    a, b = await pair_factory(**CUDA_TCP)
    big = torch.randint(0, 255, (64 * MiB,), device="cuda", dtype=torch.uint8)
    base = torch.randn(512, 1024, device="cuda")
    sent = {"big": big, "t": base.t(), "strided": base[::3, 1::2]}
    await a.send(sent)
    got = await asyncio.wait_for(b.recv(), 60)
    for name, s in sent.items():
        assert got[name].is_cuda and got[name].shape == s.shape
        assert torch.equal(got[name].cpu(), s.cpu()), name


async def test_cuda_round_trip_through_a_peer_process_on_the_same_gpu(
        spawn_peer: SpawnPeer) -> None:
    async with await aiokvpipe.listen(HOST, 0, **CUDA_TCP) as lst:
        peer = await spawn_peer(role="connect", port=lst.port, mode="echo", opts=CUDA_TCP)
        pipe = await asyncio.wait_for(lst.accept(), 60)
        try:
            await peer.expect("connected", timeout=60)
            for seed in range(3):
                sent = cuda_message(seed)
                await pipe.send(sent)
                assert_same(sent, await asyncio.wait_for(pipe.recv(), 30), "cuda")
            await pipe.aclose()
            assert (await peer.expect("done"))["echoed"] == 3
        finally:
            await close_quietly(pipe)


#: GPU clock cycles of torch.cuda._sleep that keep a stream busy for ~0.2 s (at <= 2 GHz).
BUSY_CYCLES = 400_000_000


async def test_received_tensors_are_safe_on_the_callers_stream(pair_factory: PairFactory
                                                               ) -> None:
    """The caller's stream still reads a received tensor after the caller dropped it while the
    next message arrives: its memory must not be reused for that message meanwhile."""
    a, b = await pair_factory(**CUDA_TCP)
    consumer = torch.cuda.Stream()
    n, rounds = 4 * MiB, 6
    totals = []
    for i in range(rounds):
        await a.send(torch.full((n,), i, dtype=torch.int32, device="cuda"))
        with torch.cuda.stream(consumer):
            back = await asyncio.wait_for(b.recv(), 30)
            torch.cuda._sleep(BUSY_CYCLES)  # the consumer is busy: the sum runs much later
            totals.append(back.sum(dtype=torch.int64))
            del back  # dropped at once, still to be read by `consumer`
    consumer.synchronize()
    assert [int(x) for x in totals] == [i * n for i in range(rounds)]


async def test_large_receive_buffers_are_allocated_off_the_event_loop(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await pair_factory(**CUDA_TCP)
    where: list[str] = []
    real = b._plane._allocate

    def spy(*args: Any) -> Any:
        where.append(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(b._plane, "_allocate", spy)
    big = torch.arange(8 * MiB // 4, device="cuda", dtype=torch.float32)
    small = torch.arange(16, device="cuda", dtype=torch.float32)
    for t in (big, small, big):
        await a.send(t)
        assert torch.equal(await asyncio.wait_for(b.recv(), 30), t)
    loop_thread = threading.current_thread().name
    assert where[0].startswith("aiokvpipe-alloc") and where[2].startswith("aiokvpipe-alloc")
    assert where[1] == loop_thread  # small buffers come from the caches at once


async def test_a_cuda_receive_allocation_failure_breaks_with_the_local_error(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await pair_factory(**CUDA_TCP)
    boom = RuntimeError("CUDA out of memory (injected)")

    def fail(*args: Any) -> Any:
        raise boom

    monkeypatch.setattr(b._plane, "_allocate", fail)
    waiting = asyncio.create_task(b.recv())
    try:
        await a.send(torch.ones(8 * MiB // 4, device="cuda"))
    except aiokvpipe.BrokenPipe:
        pass
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        async with asyncio.timeout(10):
            await waiting
    assert info.value.__cause__ is boom


async def test_a_failed_copy_to_the_device_breaks_the_pipe(
        pair_factory: PairFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = await pair_factory(**CUDA_TCP)
    boom = RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

    async def fail(*args: Any) -> Any:
        raise boom

    monkeypatch.setattr(b._plane._staging, "to_device", fail)
    waiting = asyncio.create_task(b.recv())
    try:
        await a.send(torch.ones(1000, device="cuda"))
    except aiokvpipe.BrokenPipe:
        pass
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        async with asyncio.timeout(10):
            await waiting
    assert info.value.__cause__ is boom


_FRESH_PROCESS_CONNECT = r"""
import asyncio, threading, torch, aiokvpipe
on_main = []
real = torch.cuda._lazy_init
def spy():
    if not torch.cuda.is_initialized():
        on_main.append(threading.current_thread() is threading.main_thread())
    return real()
torch.cuda._lazy_init = spy
async def main():
    listener = await aiokvpipe.listen("127.0.0.1", 0, device="cuda", transport="tcp")
    accepting = asyncio.ensure_future(listener.accept())
    a = await aiokvpipe.connect("127.0.0.1", listener.port, device="cuda", transport="tcp")
    b = await accepting
    await a.send(torch.ones(4, device="cuda"))
    assert torch.equal(await b.recv(), torch.ones(4, device="cuda"))
    await a.aclose(); await b.aclose(); await listener.aclose()
asyncio.run(main())
print(on_main)
"""


def test_the_first_cuda_pipe_of_a_process_creates_the_context_off_the_loop() -> None:
    # Creating a process's CUDA context takes 100 ms and more: the first listen()/connect()
    # must not do it on the event loop's thread.
    out = subprocess.run([sys.executable, "-c", _FRESH_PROCESS_CONNECT], capture_output=True,
                         text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    on_main = out.stdout.strip().splitlines()[-1]
    assert on_main.startswith("[False") and "True" not in on_main, on_main
