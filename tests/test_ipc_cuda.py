"""The ipc plane through real CUDA IPC between two real processes on one GPU.

The test process runs one IpcPlane, ``tests/ipc_peer.py`` the other, their records carried
both ways by one socket pair (``tests/ipc_link.py``, as a pipe's control connection carries
them). Skipped without a CUDA device or CuPy. Run on a GPU machine:

    python -m pytest -q -m cuda tests/test_ipc_cuda.py
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from ipc_link import plane_on_socket
from jsonpeer import JsonPeerProcess

from aiokvpipe import BrokenPipe, ProtocolError, _dtypes
from aiokvpipe._ipc_plane import DEFAULT_RING_BYTES, IpcPlane
from aiokvpipe._ipc_probe import export_probe, ipc_info, probe_opens
from aiokvpipe._ipc_records import CopyRecord, Piece, RegionRecord, encode_record
from aiokvpipe._wire import TensorSpec

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not ipc_info()[0], reason=f"needs CUDA IPC: {ipc_info()[1]}"),
    pytest.mark.timeout(240),
]

PEER = Path(__file__).with_name("ipc_peer.py")
DEV = torch.device("cuda", 0)
MiB = 1 << 20
SLEEP_1S = 2_000_000_000  # torch.cuda._sleep cycles: about a second at H100/H200 clocks


class Peer:
    def __init__(self, proc: JsonPeerProcess) -> None:
        self.proc = proc

    async def do(self, op: str, **fields: Any) -> None:
        stdin = self.proc.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await stdin.drain()

    async def expect(self, name: str, timeout: float = 60.0) -> dict[str, Any]:
        return await self.proc.expect(name, timeout)


class Local:
    """This process's plane, broken on loss as the Pipe would break it."""

    def __init__(self) -> None:
        self.plane: IpcPlane | None = None
        self.lost: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    def on_lost(self, exc: BaseException) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        err = BrokenPipe(f"ipc plane lost: {exc!r}")
        err.__cause__ = exc
        assert self.plane is not None
        self.plane.abort(err)


@asynccontextmanager
async def pair(mode: str = "segments", peer_mode: str | None = None,
               peer_env: dict[str, str] | None = None) -> AsyncIterator[tuple[Local, Peer]]:
    ours, theirs = socket.socketpair()
    stderr = tempfile.NamedTemporaryFile(prefix="ipc-peer-", suffix=".log", delete=False)
    env = {**os.environ, **(peer_env or {})}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(PEER), str(theirs.fileno()), "cuda:0",
        peer_mode or mode, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=stderr, pass_fds=(theirs.fileno(),), env=env)
    theirs.close()
    peer = Peer(JsonPeerProcess(proc, "ipc peer", Path(stderr.name)))
    local = Local()
    link = None
    try:
        await peer.expect("ready", timeout=120)
        local.plane, link = await plane_on_socket(ours, DEV, local.on_lost, mode=mode)
        yield local, peer
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 30)
        if link is None or local.plane is None:
            ours.close()
        else:
            local.plane.abort(BrokenPipe("test over"))
            link.abort()
            await asyncio.wait_for(local.plane.released, 30)
        stderr.close()
        os.unlink(stderr.name)


def spec(t: torch.Tensor) -> TensorSpec:
    return TensorSpec(_dtypes.CODE_OF[t.dtype], tuple(t.shape), t.element_size())


def raw(t: torch.Tensor) -> list[list[Any]]:
    return [[_dtypes.CODE_OF[t.dtype], list(t.shape)]]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    bits = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, device=DEV)
    return bits.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


async def echo(local: Local, peer: Peer, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Send ``tensors`` to the peer, which sends them back; what came back."""
    assert local.plane is not None
    await peer.do("echo", specs=[r for t in tensors for r in raw(t)])
    back = local.plane.post_recv([spec(t) for t in tensors])
    await asyncio.wait_for(local.plane.post_send(tensors), 60)
    got = await asyncio.wait_for(back, 60)
    await peer.expect("echoed")
    return got


def usable_gpu() -> None:
    """Allocate, compute and synchronise, with a deadline (a wedged GPU fails, not hangs)."""
    result: list[float] = []

    def work() -> None:
        x = torch.ones(1 << 20, device=DEV)
        result.append(float((x * 2).sum().item()))
        torch.cuda.synchronize(DEV)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(20)
    assert result == [2.0 * (1 << 20)], "the CUDA context is not usable after the peer died"


DTYPE_SHAPES = [(dtype, shape) for dtype in _dtypes.DTYPE_OF.values()
                for shape in [(), (0,), (3, 5), (7,)]]


@pytest.mark.parametrize("mode", ["segments", "ring"])
async def test_messages_of_every_dtype_shape_and_size_round_trip(mode: str) -> None:
    async with pair(mode) as (local, peer):
        # Every dtype, 0-d and empty tensors among them, in one message and one at a time.
        tensors = [random_tensor(d, s) for d, s in DTYPE_SHAPES]
        got = await echo(local, peer, tensors)
        assert all(same_bits(a, b) for a, b in zip(tensors, got))
        for t in tensors[:8]:
            assert same_bits((await echo(local, peer, [t]))[0], t)
        # 1 byte to 256 MiB; the largest is several staging rings long in ring mode.
        for n in [1, 4099, MiB, 16 * MiB + 5, 256 * MiB]:
            t = random_tensor(torch.uint8, (n,))
            assert same_bits((await echo(local, peer, [t]))[0], t)
        # Many tensors of one allocation, sliced: one region, many pieces.
        base = random_tensor(torch.float16, (2048, 256))
        parts = [base[i * 16:(i + 1) * 16] for i in range(128)]
        got = await echo(local, peer, parts)
        assert all(same_bits(a, b) for a, b in zip(parts, got))
        assert local.plane is not None
        stats = local.plane.stats
        assert stats["ring_bytes"] == (0 if mode == "segments" else DEFAULT_RING_BYTES)


async def test_the_copy_waits_for_the_producers_pending_kernels_both_ways() -> None:
    async with pair() as (local, peer):
        assert local.plane is not None
        # The peer's data is written by a kernel queued behind a second of GPU sleep.
        t = torch.empty(4 * MiB, dtype=torch.int32, device=DEV)
        got = local.plane.post_recv([spec(t)])
        await peer.do("send", specs=raw(t), fill=7, sleep_cycles=SLEEP_1S)
        (received,) = await asyncio.wait_for(got, 30)
        assert bool((received == 7).all())
        await peer.expect("posted")
        await peer.expect("sent")
        # And ours: zeros now, sevens once the sleep on our stream is over.
        t = torch.zeros(4 * MiB, dtype=torch.int32, device=DEV)
        torch.cuda.synchronize(DEV)
        await peer.do("recv_check", specs=raw(t), fill=9)
        torch.cuda._sleep(SLEEP_1S)
        t.fill_(9)
        await asyncio.wait_for(local.plane.post_send([t]), 30)
        assert (await peer.expect("checked"))["ok"] is True


def injected_cuda_error() -> RuntimeError:
    return RuntimeError("CUDA error: an illegal memory access was encountered (injected)")


def send_behind_our_busy_stream(plane: IpcPlane) -> asyncio.Future[None]:
    """Post a 1 MiB send that our stream is still writing: the plane waits for it (the job's
    ``ready`` event) and takes the send up again from the poller's callback."""
    t = torch.zeros(MiB, dtype=torch.uint8, device=DEV)
    torch.cuda.synchronize(DEV)
    torch.cuda._sleep(SLEEP_1S // 10)  # our stream is busy for ~0.1 s, then writes t
    t.fill_(3)
    sent = plane.post_send([t])
    assert len(plane._jobs) == 1 and plane._jobs[0].ready is not None, \
        "the send did not wait for our stream"
    return sent


async def test_a_cuda_error_once_the_callers_stream_has_written_breaks_the_plane(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A send posted while the caller's stream is still writing is described later, from the
    poller's callback. A CUDA error there (an event query, a staging copy) must break the
    plane with that cause; raised, it went to the loop's exception handler and the send
    waited for ever."""
    async with pair() as (local, peer):
        plane = local.plane
        assert plane is not None
        boom = injected_cuda_error()
        described: list[object] = []

        def failing(job: object) -> bool:
            described.append(job)
            raise boom

        sent = send_behind_our_busy_stream(plane)
        monkeypatch.setattr(plane, "_describe", failing)
        assert await asyncio.wait_for(local.lost, 30) is boom
        assert len(described) == 1
        with pytest.raises(BrokenPipe):
            await asyncio.wait_for(sent, 30)


async def test_a_failed_poll_of_the_callers_stream_breaks_the_plane_with_its_cause() -> None:
    """The event a send waits on (the caller's stream writing its data) cannot be queried
    (a CUDA error): the plane breaks with that error. The poller used to log it, and the
    send, and every send after it, waited for ever."""
    async with pair() as (local, peer):
        plane = local.plane
        assert plane is not None
        boom = injected_cuda_error()
        sent = send_behind_our_busy_stream(plane)

        def failing() -> bool:
            raise boom

        ready = plane._jobs[0].ready
        assert ready is not None
        ready.query = failing  # type: ignore[method-assign]
        assert await asyncio.wait_for(local.lost, 30) is boom
        with pytest.raises(BrokenPipe):
            await asyncio.wait_for(sent, 30)


async def test_a_failed_poll_of_a_copy_breaks_the_plane_with_its_cause(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A copy's completion cannot be queried (a CUDA error): the plane breaks with that
    error, and the receive fails with it. It used to fail the receive with "ipc plane
    closed", blaming the connection, and a message of several records could hang."""
    async with pair() as (local, peer):
        plane = local.plane
        assert plane is not None
        boom = injected_cuda_error()
        pool = plane._events

        def failing() -> bool:
            raise boom

        class FailingEvents:
            """The plane's event pool, handing out events whose query fails (this plane
            only receives here: the one event it takes is its copy's)."""

            def get(self) -> torch.cuda.Event:
                event = pool.get()
                event.query = failing  # type: ignore[method-assign]
                return event

            def put(self, event: torch.cuda.Event) -> None:
                pool.put(event)

        monkeypatch.setattr(plane, "_events", FailingEvents())
        t = torch.empty(MiB, dtype=torch.uint8, device=DEV)
        got = plane.post_recv([spec(t)])
        await peer.do("send", specs=raw(t), fill=5)
        assert await asyncio.wait_for(local.lost, 30) is boom
        with pytest.raises(BrokenPipe):
            await asyncio.wait_for(got, 30)


async def test_an_abort_keeps_a_staged_send_until_our_streams_are_idle() -> None:
    """A send's tensor from another device is copied onto ours for it, a copy nobody else
    holds; in ring mode the plane's send stream reads it into the ring. An abort must not
    drop it while that stream may still read it (the allocator would hand the memory to new
    work meanwhile): only the release, once our streams are idle, does."""
    async with pair("ring") as (local, peer):
        plane = local.plane
        assert plane is not None
        t = random_tensor(torch.uint8, (MiB,))
        assert same_bits((await echo(local, peer, [t]))[0], t)  # the ring is made now
        sent = plane.post_send([torch.ones(8 * MiB, dtype=torch.uint8)])
        job = plane._jobs[0] if plane._jobs else plane._inflight[-1].job
        assert job is not None
        staged = weakref.ref(job.keepalive[1][0])
        assert staged().device == DEV  # type: ignore[union-attr]
        del job
        plane.abort(BrokenPipe("test: abort"))
        gc.collect()
        assert staged() is not None, "dropped while our send stream may still read it"
        await asyncio.wait_for(plane.released, 30)
        gc.collect()
        assert staged() is None
        with pytest.raises(BrokenPipe):
            await sent


async def test_a_receive_into_given_memory_waits_for_the_callers_pending_work() -> None:
    """A block transfer's staging buffer comes from the caller's stream's pool, where work
    still queued may use that memory: the copy into it must come after that work."""
    async with pair() as (local, peer):
        plane = local.plane
        assert plane is not None
        buf = torch.zeros(1 << 20, dtype=torch.int32, device=DEV)
        # One receive first: the peer's memory mapped and every kernel and copy path loaded
        # now (a mapping or a lazy load while our stream sleeps would synchronise it).
        torch.cuda._sleep(1)
        warm = plane.post_recv_into([buf])
        await peer.do("send", specs=raw(buf), fill=5)
        await asyncio.wait_for(warm, 30)
        await peer.expect("posted")
        await peer.expect("sent")
        torch.cuda.synchronize(DEV)
        mapped = len(plane._mappings)
        torch.cuda._sleep(SLEEP_1S)  # a second of the caller's own work, then it writes 9
        buf.fill_(9)
        got = plane.post_recv_into([buf])
        await peer.do("send", specs=raw(buf), fill=7)

        async def enqueued() -> None:  # the peer's record came, and the copy is enqueued
            while plane._targets:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(enqueued(), 30)
        assert not torch.cuda.current_stream(DEV).query(), "too late: the test proves nothing"
        assert len(plane._mappings) == mapped  # nothing new mapped while our stream slept
        await asyncio.wait_for(got, 30)
        await peer.expect("posted")
        await peer.expect("sent")
        torch.cuda.synchronize(DEV)
        assert int(buf.min()) == int(buf.max()) == 7, ("the copy was overwritten by work "
                                                       "queued before it on our stream")


async def test_expandable_segments_fall_back_to_the_staging_ring() -> None:
    env = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    async with pair(peer_env=env) as (local, peer):
        assert local.plane is not None
        t = torch.empty(8 * MiB, dtype=torch.int16, device=DEV)
        got = local.plane.post_recv([spec(t)])
        await peer.do("send", specs=raw(t), fill=3)
        (received,) = await asyncio.wait_for(got, 30)
        assert bool((received == 3).all())
        await peer.expect("posted")
        await peer.expect("sent")


async def test_producer_killed_mid_transfer_fails_the_receive_fast_and_leaves_cuda_usable(
        ) -> None:
    async with pair() as (local, peer):
        assert local.plane is not None
        baseline = torch.cuda.memory_allocated(DEV)
        t = torch.empty(64 * MiB, dtype=torch.uint8, device=DEV)
        got = local.plane.post_recv([spec(t)])
        del t
        # The peer's data waits behind seconds of GPU sleep: we are polling its event.
        await peer.do("send", specs=raw(torch.empty(64 * MiB, dtype=torch.uint8)), fill=1,
                      sleep_cycles=5 * SLEEP_1S)
        await peer.expect("posted")
        killed = time.monotonic()
        peer.proc.send_signal(signal.SIGKILL)
        with pytest.raises(BrokenPipe):
            await asyncio.wait_for(got, 2)
        assert time.monotonic() - killed < 2
        await asyncio.wait_for(local.plane.released, 10)
        assert local.plane.stats["mapped_regions"] == 0
        usable_gpu()
        del got
        assert torch.cuda.memory_allocated(DEV) <= baseline + 4 * MiB


async def test_consumer_killed_fails_the_send_fast_and_frees_its_memory() -> None:
    async with pair() as (local, peer):
        assert local.plane is not None
        # What earlier tests left for the collector must not be freed during this one: on
        # the H200 (15:30) 189 MB of it went meanwhile and the count fell below the baseline.
        gc.collect()
        baseline = torch.cuda.memory_allocated(DEV)
        t = torch.full((256 * MiB,), 5, dtype=torch.uint8, device=DEV)
        sent = local.plane.post_send([t])  # the peer never posts the receive
        await asyncio.sleep(0.2)
        assert not sent.done()
        killed = time.monotonic()
        peer.proc.send_signal(signal.SIGKILL)
        with pytest.raises(BrokenPipe):
            await asyncio.wait_for(sent, 2)
        assert time.monotonic() - killed < 2
        await asyncio.wait_for(local.plane.released, 10)
        t.fill_(6)  # ours again
        assert int(t[-1]) == 6
        del t, sent
        assert torch.cuda.memory_allocated(DEV) <= baseline  # all 256 MiB of it back
        usable_gpu()


@asynccontextmanager
async def raw_producer() -> AsyncIterator[tuple[Local, socket.socket]]:
    """Our plane as the consumer of a hand-written producer's records."""
    ours, theirs = socket.socketpair()
    local = Local()
    local.plane, link = await plane_on_socket(ours, DEV, local.on_lost)
    try:
        yield local, theirs
    finally:
        local.plane.abort(BrokenPipe("test over"))
        link.abort()
        await asyncio.wait_for(local.plane.released, 10)
        theirs.close()


async def test_a_handle_that_does_not_open_is_a_protocol_error_not_a_crash() -> None:
    async with raw_producer() as (local, sock):
        assert local.plane is not None
        got = local.plane.post_recv([TensorSpec(14, (4096,), 1)])
        sock.sendall(encode_record(RegionRecord(1, 4096, b"\xab" * 64))
                     + encode_record(CopyRecord((Piece(1, 0, 4096),), True)))
        exc = await asyncio.wait_for(local.lost, 10)
        assert isinstance(exc, ProtocolError)
        assert "does not open" in str(exc)
        with pytest.raises(BrokenPipe):
            await asyncio.wait_for(got, 5)
    usable_gpu()


async def test_garbage_on_the_signalling_socket_is_a_protocol_error() -> None:
    async with raw_producer() as (local, sock):
        sock.sendall(b"\x09garbage")
        assert isinstance(await asyncio.wait_for(local.lost, 5), ProtocolError)


async def test_memory_smaller_than_announced_is_refused_and_probes_prove_ipc() -> None:
    async with pair() as (local, peer):
        await peer.do("export_small")
        handle = bytes.fromhex((await peer.expect("exported"))["handle"])
        # The handshake's proof: the peer's handle opens here, our own does not.
        assert await probe_opens(handle, DEV) is True
        assert await probe_opens(await export_probe(DEV), DEV) is False
        assert await probe_opens(b"\x01" * 64, DEV) is False
        async with raw_producer() as (victim, sock):
            sock.sendall(encode_record(RegionRecord(1, 1 << 30, handle)))
            exc = await asyncio.wait_for(victim.lost, 10)
            assert isinstance(exc, ProtocolError)
            assert "announced" in str(exc)
        usable_gpu()


def test_the_ipc_plane_loads_cupys_runtime_bindings_without_the_cupy_package() -> None:
    # Importing the cupy package took 160-406 ms on an H200 host, and even in a worker
    # thread held the GIL (the event loop) in chunks over 2 ms at every first connection.
    script = ("import sys; from aiokvpipe import _ipc_plane, _ipc_probe, _cudaipc\n"
              "ok, why = _ipc_probe.ipc_info(); rt = _cudaipc.runtime()\n"
              "rt.setDevice(0); ptr = rt.malloc(1 << 20); rt.free(ptr)\n"
              "print(ok, 'cupy' in sys.modules, why)")
    import subprocess

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[:2] == ["True", "False"], out.stdout
