"""The nccl data plane, through real CUDA, real NCCL and a real peer process.

Skipped without a CUDA device and CuPy's NCCL. With two GPUs the ends sit on cuda:0 and
cuda:1. With one GPU both sit on cuda:0 and the test makes NCCL and our handshake believe
they are two hosts (NCCL_HOSTID, fake device UUIDs), so NCCL runs over its socket transport:
slower, but the same plane, streams, events and failure paths are exercised.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

import aiokvpipe
from aiokvpipe import _connect, _dtypes
from aiokvpipe._nccl_plane import nccl_info

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.nccl,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not nccl_info()[0], reason="needs CuPy with NCCL"),
    pytest.mark.timeout(300),
]

PEER = Path(__file__).with_name("nccl_peer.py")
ROOT = Path(__file__).resolve().parent.parent
UUID_HERE, UUID_PEER = "aa" * 16, "bb" * 16
MiB = 1 << 20


class Peer:
    def __init__(self, proc: asyncio.subprocess.Process, pipe: aiokvpipe.Pipe) -> None:
        self.proc = proc
        self.pipe = pipe

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)


def _layout() -> tuple[str, str, dict[str, str]]:
    """(our device, the peer's device, extra env for the peer)."""
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
           "NVSHMEM_DISABLE_NVLS": "1"}
    if torch.cuda.device_count() >= 2:
        return "cuda:0", "cuda:1", env
    env.update(NCCL_HOSTID="aiokvpipe-test-peer", AIOKVPIPE_TEST_FAKE_UUID=UUID_PEER)
    return "cuda:0", "cuda:0", env


@pytest.fixture
async def start_peer(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator:
    procs: list[asyncio.subprocess.Process] = []
    listeners: list[aiokvpipe.Listener] = []
    pipes: list[aiokvpipe.Pipe] = []

    async def start(mode: str = "echo", *args: str, transport: str = "nccl",
                    disguise: bool = True) -> Peer:
        ours, theirs, env = _layout()
        if disguise and torch.cuda.device_count() < 2:
            # NCCL reads NCCL_HOSTID when it first initialises in this process.
            os.environ["NCCL_HOSTID"] = "aiokvpipe-test-here"
            async def fake_uuid(_d: object) -> bytes:
                return bytes.fromhex(UUID_HERE)

            monkeypatch.setattr(_connect, "device_uuid", fake_uuid)
            monkeypatch.setattr(_connect, "host_id", lambda: bytes.fromhex(UUID_HERE))
        else:
            monkeypatch.undo()
        if not disguise:
            env = {k: v for k, v in env.items()
                   if k not in ("NCCL_HOSTID", "AIOKVPIPE_TEST_FAKE_UUID")}
        listener = await aiokvpipe.listen(device=ours, transport=transport,
                                          heartbeat_interval=0.2)
        listeners.append(listener)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(PEER), str(listener.port), theirs, mode, *args,
            env={**os.environ, **env, "AIOKVPIPE_TEST_TRANSPORT": transport,
                 "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])},
            stdout=asyncio.subprocess.PIPE)
        procs.append(proc)
        async with asyncio.timeout(60):
            pipe = await listener.accept()
            pipes.append(pipe)
            assert proc.stdout is not None
            line = (await proc.stdout.readline()).decode()
            assert line.startswith("connected"), line
            if mode == "hold":
                assert (await proc.stdout.readline()).startswith(b"ready")
        return Peer(proc, pipe)

    yield start
    for pipe in pipes:
        with _suppress():
            async with asyncio.timeout(15):
                await pipe.aclose()
    for proc in procs:
        if proc.returncode is None:
            with _suppress():
                proc.send_signal(signal.SIGCONT)
            proc.kill()
        await asyncio.wait_for(proc.wait(), 30)
    for listener in listeners:
        await listener.aclose()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


async def echo(pipe: aiokvpipe.Pipe, msg: object) -> object:
    await pipe.send(msg)  # type: ignore[arg-type]
    return await pipe.recv()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (bitwise, so float8 and NaNs compare too), and on CUDA."""
    return (a.dtype == b.dtype and a.shape == b.shape and b.is_cuda
            and torch.equal(_bytes(a), _bytes(b)))


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    raw = torch.randint(0, 256, (max(1, torch.Size(shape).numel()) * dtype.itemsize,),
                        dtype=torch.uint8, device="cuda:0")
    t = raw.view(dtype)[: torch.Size(shape).numel()].reshape(shape)
    return t.clone()


async def test_auto_picks_nccl_between_two_gpus(start_peer) -> None:
    peer = await start_peer(transport="auto")
    assert peer.pipe.transport == "nccl"


async def test_every_dtype_and_structure_round_trips(start_peer) -> None:
    peer = await start_peer()
    for dtype in _dtypes.CODE_OF:
        t = _sample(dtype, (3, 5))
        back = await echo(peer.pipe, t)
        assert isinstance(back, torch.Tensor) and _same(t, back), dtype
    bundle = {f"k{i}": _sample(torch.bfloat16, (2, 8, 16)) for i in range(64)}
    back = await echo(peer.pipe, bundle)
    assert isinstance(back, dict) and list(back) == list(bundle)
    assert all(_same(bundle[k], back[k]) for k in bundle)
    items = [_sample(torch.float16, ()), torch.empty(0, 4, device="cuda:0"),
             _sample(torch.int64, (7,)), _sample(torch.float32, (4, 6)).t()]
    back = await echo(peer.pipe, items)
    assert isinstance(back, list) and len(back) == 4
    assert all(_same(a.contiguous(), b) for a, b in zip(items, back))
    assert await echo(peer.pipe, None) is None
    assert await echo(peer.pipe, []) == []


@pytest.mark.parametrize("nbytes", [1, 4096 + 3, MiB, 64 * MiB, 1024 * MiB])
async def test_sizes_from_one_byte_to_one_gib(start_peer, nbytes: int) -> None:
    peer = await start_peer()
    t = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda:0")
    back = await echo(peer.pipe, t)
    assert isinstance(back, torch.Tensor) and torch.equal(back, t)


async def test_both_directions_send_large_messages_at_once(start_peer) -> None:
    count, mib = 4, 256
    peer = await start_peer("blast", str(count), str(mib))
    ours = [torch.full((mib << 18,), -float(i), device="cuda:0") for i in range(count)]

    async def send_all() -> None:
        for t in ours:
            await peer.pipe.send(t)

    async def recv_blasts() -> list[float]:
        seen = []
        for _ in range(count):
            t = await peer.pipe.recv(key="blast")
            assert isinstance(t, torch.Tensor)
            assert bool((t == t[0]).all())
            seen.append(float(t[0]))
        return seen

    async def recv_echoes() -> None:
        # Claimed as they come: an echo left waiting would hold our receive credits, and
        # the peer, blocked on them, would stop reading ours (both sides' buffers full).
        for t in ours:
            back = await peer.pipe.recv()
            assert isinstance(back, torch.Tensor) and torch.equal(back, t)

    async with asyncio.timeout(120):
        _, blasts, _ = await asyncio.gather(send_all(), recv_blasts(), recv_echoes())
    assert blasts == [float(i) for i in range(count)]


async def test_send_waits_for_work_queued_on_the_callers_stream(start_peer) -> None:
    peer = await start_peer()
    producer = torch.cuda.Stream("cuda:0")
    for round_ in range(3):
        with torch.cuda.stream(producer):
            x = torch.zeros(16 * MiB // 4, device="cuda:0")
            torch.cuda._sleep(200_000_000)  # keep the producer busy for ~0.1 s
            x.fill_(round_ + 1)  # queued behind the sleep: unwritten when send() starts
            await peer.pipe.send(x)
        back = await peer.pipe.recv()
        assert isinstance(back, torch.Tensor)
        assert bool((back == round_ + 1).all()), "sent before the producer stream finished"


#: GPU clock cycles of torch.cuda._sleep that keep a stream busy for ~0.2 s (at <= 2 GHz).
BUSY_CYCLES = 400_000_000


async def test_received_tensors_are_safe_on_the_callers_stream(start_peer) -> None:
    """The caller's stream still reads a received tensor after the caller dropped it, while
    the next message arrives: the allocator must not hand that memory to the next receive
    (the pipe records the caller's stream on it). Without that, the next payload overwrites
    the tensor before the consumer reads it."""
    peer = await start_peer()
    consumer = torch.cuda.Stream("cuda:0")
    n, rounds = 4 * MiB, 6
    totals = []
    for i in range(rounds):
        await peer.pipe.send(torch.full((n,), i, dtype=torch.int32, device="cuda:0"))
        with torch.cuda.stream(consumer):
            back = await peer.pipe.recv()
            assert isinstance(back, torch.Tensor)
            torch.cuda._sleep(BUSY_CYCLES)  # the consumer is busy: the sum runs much later
            totals.append(back.sum(dtype=torch.int64))
            del back  # dropped at once, still to be read by `consumer`
    consumer.synchronize()
    assert [int(x) for x in totals] == [i * n for i in range(rounds)]


async def test_cpu_tensors_travel_to_a_cuda_peer(start_peer) -> None:
    peer = await start_peer()
    t = torch.arange(1000, dtype=torch.float32)
    back = await echo(peer.pipe, t)
    assert isinstance(back, torch.Tensor) and back.is_cuda
    assert torch.equal(back.cpu(), t)


async def test_a_cpu_tensor_sent_behind_busy_gpu_work_leaves_the_loop_free(start_peer
                                                                           ) -> None:
    """Over nccl a CPU tensor goes to the device in a worker thread: behind a long kernel
    on the caller's stream, the send's first step returns at once, and the tensor arrives
    whole once the kernel ended. (Copied from pageable memory on the loop, it held the loop
    until the kernel ended.)"""
    peer = await start_peer()
    t = torch.arange(1 << 20, dtype=torch.float32)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(BUSY_CYCLES)  # the caller's stream: busy for a while
    end.record()
    t0 = time.perf_counter()
    sending = asyncio.create_task(peer.pipe.send(t))
    await asyncio.sleep(0)  # the send's first step: it posts the payload
    held = time.perf_counter() - t0
    await sending
    back = await peer.pipe.recv()
    kernel_s = start.elapsed_time(end) / 1000  # (both recorded: the send waited for it)
    assert held < kernel_s / 4, f"the loop was held {held:.3f} s, the kernel ran {kernel_s:.3f}"
    assert isinstance(back, torch.Tensor) and torch.equal(back.cpu(), t)


def _holders(nbytes: int) -> list[str]:
    """What references live CUDA tensors of ``nbytes`` (to say who leaks, when one does)."""
    import gc

    found = []
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.is_cuda and obj.nbytes == nbytes:
            for ref in gc.get_referrers(obj):
                desc = type(ref).__name__
                if isinstance(ref, (tuple, list)):
                    desc += f"<-{[type(r).__name__ for r in gc.get_referrers(ref)][:4]}"
                found.append(desc)
    return found


async def _kill_with_a_kernel_in_flight(start_peer) -> tuple[float, float]:
    """One trial: the peer dies while our NCCL send kernel waits for it. Returns (seconds
    from the kill to BrokenPipe, seconds from the kill until GPU memory is back)."""
    peer = await start_peer("hold")
    baseline = torch.cuda.memory_allocated("cuda:0")
    peer.signal(signal.SIGSTOP)  # its loop cannot post the receive: our send kernel waits
    big = torch.ones(256 * MiB // 4, device="cuda:0")
    send = asyncio.create_task(peer.pipe.send(big))
    del big
    async with asyncio.timeout(5):
        while peer.pipe.stats.inflight_bytes == 0:
            await asyncio.sleep(0.01)  # wait until the NCCL send is posted
    peer.proc.kill()
    killed = time.monotonic()
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        async with asyncio.timeout(10):
            await send
    to_error = time.monotonic() - killed
    assert info.value.__cause__ is not None
    with pytest.raises(aiokvpipe.BrokenPipe):
        await peer.pipe.recv()
    del info, send  # their tracebacks reference the tensor through send()'s frame
    # The aborted communicator lets the kernel end; the pipe then drops the tensor.
    # ncclCommAbort itself can take seconds (over NCCL's socket transport it has taken 9 s);
    # the memory is released right after it returns.
    try:
        async with asyncio.timeout(30):
            while torch.cuda.memory_allocated("cuda:0") > baseline:
                await asyncio.sleep(0.05)
    except TimeoutError:
        threads = [t.name for t in threading.enumerate()]
        pytest.fail(f"{torch.cuda.memory_allocated('cuda:0') - baseline} bytes still held "
                    f"30 s after the kill; threads: {threads}; held by: {_holders(256 * MiB)}")
    return to_error, time.monotonic() - killed


async def test_peer_killed_with_a_kernel_in_flight(start_peer) -> None:
    to_error, _ = await _kill_with_a_kernel_in_flight(start_peer)
    assert to_error < 2.0
    # The process is healthy: a new pipe works.
    fresh = await start_peer()
    t = torch.arange(10, device="cuda:0")
    back = await echo(fresh.pipe, t)
    assert isinstance(back, torch.Tensor) and torch.equal(back, t)


@pytest.mark.slow
@pytest.mark.timeout(1800)
async def test_peer_killed_with_a_kernel_in_flight_repeatedly(start_peer) -> None:
    """Fault trials for the nccl path; ``AIOKVPIPE_NCCL_FAULT_TRIALS`` trials (default 10)."""
    trials = int(os.environ.get("AIOKVPIPE_NCCL_FAULT_TRIALS", "10"))
    to_error, to_free = [], []
    for _ in range(trials):
        e, f = await _kill_with_a_kernel_in_flight(start_peer)
        to_error.append(e)
        to_free.append(f)
    # The last abort thread may still be returning after it handed the memory back.
    for t in threading.enumerate():
        if t.name.startswith("aiokvpipe"):
            t.join(5)
    ours = [t.name for t in threading.enumerate() if t.name.startswith("aiokvpipe")]
    print(f"\nnccl fault trials: {trials}, BrokenPipe after kill max {max(to_error):.3f} s "
          f"median {sorted(to_error)[trials // 2]:.3f} s; GPU memory back max "
          f"{max(to_free):.3f} s median {sorted(to_free)[trials // 2]:.3f} s; "
          f"threads of ours left: {ours}")
    assert max(to_error) < 2.0
    assert not ours  # every abort thread ended


async def test_frozen_peer_is_caught_by_the_heartbeat(start_peer) -> None:
    peer = await start_peer("hold")
    peer.signal(signal.SIGSTOP)
    frozen = time.monotonic()
    with pytest.raises(aiokvpipe.BrokenPipe):
        async with asyncio.timeout(10):
            await peer.pipe.recv()
    assert time.monotonic() - frozen < 2.0


async def test_cancelled_send_in_flight_still_delivers_the_whole_message(start_peer) -> None:
    peer = await start_peer()
    peer.signal(signal.SIGSTOP)
    t = torch.randint(0, 1 << 30, (64 * MiB // 4,), dtype=torch.int32, device="cuda:0")
    send = asyncio.create_task(peer.pipe.send(t))
    async with asyncio.timeout(5):
        while peer.pipe.stats.inflight_bytes == 0:
            await asyncio.sleep(0.01)
    send.cancel()
    with pytest.raises(asyncio.CancelledError):
        await send
    peer.signal(signal.SIGCONT)
    async with asyncio.timeout(60):
        back = await peer.pipe.recv()
    assert isinstance(back, torch.Tensor) and torch.equal(back, t)
    assert await echo(peer.pipe, torch.ones(3, device="cuda:0")) is not None


async def _same_gpu_pair(transport: str) -> tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]:
    listener = await aiokvpipe.listen(device="cuda:0", transport=transport)
    accept = asyncio.create_task(listener.accept())
    try:
        async with asyncio.timeout(30):
            client = await aiokvpipe.connect("127.0.0.1", listener.port, device="cuda:0",
                                             transport=transport)
            return await accept, client
    finally:
        accept.cancel()
        await listener.aclose()


async def test_both_ends_on_one_gpu_fall_back_to_tcp() -> None:
    server, client = await _same_gpu_pair("auto")
    try:
        assert client.transport == server.transport == "tcp"
        t = torch.randn(1000, device="cuda:0")
        await client.send(t)
        back = await server.recv()
        assert isinstance(back, torch.Tensor) and back.is_cuda and torch.equal(back, t)
    finally:
        await client.aclose()
        await server.aclose()


async def test_nccl_forced_on_one_gpu_is_refused_clearly() -> None:
    with pytest.raises(aiokvpipe.PipeError, match="same GPU"):
        await _same_gpu_pair("nccl")


async def test_set_up_with_a_peer_that_never_joins_is_cancelled_without_leaving_a_thread(
        ) -> None:
    """A handshake timeout around the plane's set-up returns promptly, aborts the half-built
    communicators and leaves no thread of ours behind (NCCL's set-up is non-blocking)."""
    from aiokvpipe import _nccl_plane

    before = set(threading.enumerate())
    ids = _nccl_plane.new_unique_ids()
    lost: list[BaseException] = []
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(1.0):
            await _nccl_plane.start(True, ids, torch.device("cuda", 0), lost.append)
    assert time.monotonic() - started < 3.0

    def ours() -> list[str]:
        return [t.name for t in threading.enumerate()
                if t not in before and t.is_alive() and t.name.startswith("aiokvpipe")]

    deadline = time.monotonic() + 20
    while ours():
        if time.monotonic() > deadline:
            pytest.fail(f"threads left 20 s after the timeout: {ours()}")
        await asyncio.sleep(0.05)

