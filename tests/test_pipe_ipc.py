"""``transport="ipc"`` through the public API, between real processes on cuda:0.

Peers are ``tests/ipc_pipe_peer.py`` processes; failures are real SIGKILLs. Skipped without a
CUDA device or CuPy. On a GPU machine:

    python -m pytest -q -m cuda tests/test_pipe_ipc.py             # ~1 min
    python -m pytest -q -m "cuda and slow" tests/test_pipe_ipc.py  # 100 kill trials
    (AIOKVPIPE_IPC_TRIALS=10 scales the trials down)
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonpeer import JsonPeerProcess

import aiokvpipe
from aiokvpipe import BrokenPipe
from aiokvpipe._ipc_probe import ipc_info
from aiokvpipe._plane import Received

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not ipc_info()[0], reason=f"needs CUDA IPC: {ipc_info()[1]}"),
    pytest.mark.timeout(600),
]

PEER = Path(__file__).with_name("ipc_pipe_peer.py")
DEV = torch.device("cuda", 0)
MiB = 1 << 20
#: The issue's bound: a peer's death reaches every call within this many seconds.
BREAK_S = 2.0


class Peer:
    """A peer process; ``event(name)`` waits for that event, keeping the others seen."""

    def __init__(self, proc: JsonPeerProcess) -> None:
        self.proc = proc
        self.seen: list[dict[str, Any]] = []

    async def do(self, op: str, **fields: Any) -> None:
        stdin = self.proc.proc.stdin
        assert stdin is not None
        stdin.write(json.dumps({"op": op, **fields}).encode() + b"\n")
        await stdin.drain()

    async def event(self, name: str, timeout: float = 60.0,
                    where: Callable[[dict[str, Any]], bool] = lambda e: True) -> dict[str, Any]:
        for i, ev in enumerate(self.seen):
            if ev["event"] == name and where(ev):
                return self.seen.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            ev = await self.proc.next_event(max(0.1, deadline - time.monotonic()))
            if ev["event"] == name and where(ev):
                return ev
            self.seen.append(ev)

    def kill(self) -> None:
        self.proc.proc.kill()


@asynccontextmanager
async def peers(n: int) -> AsyncIterator[list[Peer]]:
    """``n`` peer processes, ready; each SIGKILLed and reaped at the end, whatever happened."""
    logs, out = [], []
    try:
        for _ in range(n):
            log = tempfile.NamedTemporaryFile(prefix="ipc-pipe-peer-", suffix=".log",
                                              delete=False)
            logs.append(log)
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(PEER), stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=log)
            out.append(Peer(JsonPeerProcess(proc, "ipc pipe peer", Path(log.name))))
        for p in out:
            await p.event("ready", timeout=120)
        yield out
    finally:
        for p in out:
            if p.proc.proc.returncode is None:
                p.kill()
            await asyncio.wait_for(p.proc.proc.wait(), 30)
        for log in logs:
            log.close()
            os.unlink(log.name)


async def pipe_to(peer: Peer, transport: str = "auto") -> aiokvpipe.Pipe:
    """We listen, ``peer`` connects; our end of the pipe (the peer calls its end "p")."""
    listener = await aiokvpipe.listen("127.0.0.1", 0, device=DEV, transport=transport)
    try:
        await peer.do("connect", port=listener.port, name="p", transport=transport)
        pipe = await asyncio.wait_for(listener.accept(), 60)
    finally:
        await listener.aclose()
    ev = await peer.event("connected")
    assert ev["transport"] == pipe.transport
    return pipe


def same(a: Any, b: Any) -> bool:
    """Bit-exact equality of two messages (tensors compared as bytes)."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and b.device == DEV and torch.equal(a.reshape(-1).view(torch.uint8).cpu(),
                                                    b.reshape(-1).view(torch.uint8).cpu()))
    if isinstance(a, dict):
        return (isinstance(b, dict) and list(a) == list(b)
                and all(same(a[k], b[k]) for k in a))
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return a is None and b is None


def rand(dtype: torch.dtype, *shape: int) -> torch.Tensor:
    n = 1
    for d in shape:
        n *= d
    bits = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, device=DEV)
    return bits.view(dtype).reshape(shape)


async def close(pipe: aiokvpipe.Pipe) -> None:
    try:
        await asyncio.wait_for(pipe.aclose(), 10)
    except (aiokvpipe.PipeError, TimeoutError):
        pass


async def test_auto_picks_ipc_between_processes_and_every_structure_round_trips() -> None:
    async with peers(1) as (peer,):
        pipe = await pipe_to(peer)
        assert pipe.transport == "ipc"
        await peer.do("echo", name="p")
        messages: list[Any] = [
            rand(torch.float32, 3, 5),
            None,
            [rand(torch.bfloat16, 7), rand(torch.int64, 2, 2), rand(torch.uint8, 3),
             rand(torch.float16, 1, 9)],
            {"k": rand(torch.float32, 4, 8), "v": rand(torch.float32, 4, 8),
             "empty": torch.empty(0, 4, device=DEV), "ключ": rand(torch.int8, 5)},
            rand(torch.float64),  # 0-d
            [],
            rand(torch.uint8, 64 * MiB + 3),  # odd size, beyond one ring chunk
        ]
        for msg in messages:
            await pipe.send(msg)
            back = await asyncio.wait_for(pipe.recv(), 30)
            assert same(msg, back), f"{type(msg).__name__} came back different"
        # Pipelined: many in flight, in order.
        burst = [rand(torch.uint8, 1000 + i) for i in range(50)]
        sender = asyncio.gather(*(pipe.send(t) for t in burst))
        for t in burst:
            assert same(t, await asyncio.wait_for(pipe.recv(), 30))
        await sender
        await close(pipe)


#: GPU clock cycles of torch.cuda._sleep that keep a stream busy for ~0.2 s (at <= 2 GHz).
BUSY_CYCLES = 400_000_000


async def test_a_message_claimed_on_another_stream_than_it_arrived_on_is_kept_for_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A message that arrives while our current stream is idle is received into memory of
    that stream's pool, and a recv() on the same stream skips record_stream. Claimed on
    another stream, its memory must still not be reused while that stream reads it."""
    async with peers(1) as (peer,):
        pipe = await pipe_to(peer)
        assert pipe.transport == "ipc"
        # Which receives took the path under test (memory of the idle default stream).
        on_default: list[bool] = []
        post_recv = pipe._plane.post_recv

        def spy(specs: Any) -> Any:
            fut = post_recv(specs)
            default = torch.cuda.default_stream(DEV)
            fut.add_done_callback(lambda f: on_default.append(
                f.exception() is None and type(f.result()) is Received
                and f.result().stream == default))
            return fut

        monkeypatch.setattr(pipe._plane, "post_recv", spy)
        n = 4 * MiB
        consumer = torch.cuda.Stream(DEV)
        # Both streams' caches filled and the kernels used below loaded now: a cudaMalloc or
        # a kernel's lazy loading while the consumer sleeps would wait for the whole device
        # (both synchronise), and the test would prove nothing.
        with torch.cuda.stream(consumer):
            total = torch.zeros((), dtype=torch.int64, device=DEV)
            total += torch.full((n,), 250, dtype=torch.uint8, device=DEV).sum(dtype=torch.int64)
            total.zero_()
        spare = [torch.empty(n, dtype=torch.uint8, device=DEV) for _ in range(40)]
        del spare
        torch.cuda.synchronize(DEV)  # our current (the default) stream is idle
        await peer.do("stream", name="p", nbytes=n, count=2, keys=["first", "second"])
        second = await asyncio.wait_for(pipe.recv("second"), 30)
        assert on_default == [True, True], "the messages did not take the path under test"
        with torch.cuda.stream(consumer):
            # "first" came before "second" on the one wire: it waits, and recv() returns it
            # without waiting (not through wait_for, whose task would hold the tensor).
            first = await pipe.recv("first")
            on_consumer = torch.cuda.current_stream(DEV) == consumer
            t_sleep = time.perf_counter()
            torch.cuda._sleep(5 * BUSY_CYCLES)  # the consumer is busy: the sum runs ~1 s later
            total += first.sum(dtype=torch.int64)
        where = first.data_ptr()
        del first  # dropped at once, still to be read by `consumer`
        # Allocations on the stream it arrived on (best fit: the smaller free blocks go
        # first) until one overlaps its memory: none may, before the sum ran.
        clobbers = []
        reused = False
        for _ in range(32):  # from the spare blocks: no cudaMalloc
            clobbers.append(torch.full((n,), 250, dtype=torch.uint8, device=DEV))
            at = clobbers[-1].data_ptr()
            if at < where + n and where < at + n:
                reused = True
                break
        busy = not consumer.query()
        t_query = time.perf_counter() - t_sleep
        consumer.synchronize()
        t_sync = time.perf_counter() - t_sleep
        assert busy, ("the consumer's stream was idle already: the test proves nothing "
                      f"{on_consumer=} {t_query=:.3f} {t_sync=:.3f} {reused=}")
        assert int(total) == 0, (f"the message's memory was overwritten while a stream read "
                                 f"it (reused by an allocation: {reused})")
        assert bool((second == 1).all())
        await close(pipe)


async def test_a_ready_payload_is_described_in_its_header_and_never_overtakes_one_queued(
        ) -> None:
    """A send whose data is ready and that nothing of ours waits ahead of carries its copy's
    description in its header (one frame); one whose stream is busy is described by a
    record once its data is ready; and a ready send behind such a one waits its turn. If
    it went ahead in its header, the peer would pair its copy with the earlier message and
    deliver one message's bytes under the other (same sizes: no error would say so)."""
    async with peers(1) as (peer,):
        pipe = await pipe_to(peer)
        assert pipe.transport == "ipc"
        await peer.do("echo", name="p")
        noted = lambda: pipe._plane.stats["copies_noted"]  # noqa: E731
        a, b, c, d = (rand(torch.uint8, MiB) for _ in range(4))
        busy = torch.cuda.Stream(DEV)
        torch.cuda.synchronize(DEV)
        await pipe.send(a)  # our stream is idle: a note
        assert noted() == 1
        assert same(a, await asyncio.wait_for(pipe.recv(), 30))
        with torch.cuda.stream(busy):
            torch.cuda._sleep(BUSY_CYCLES // 4)
            send_b = asyncio.ensure_future(pipe.send(b))
            await asyncio.sleep(0)  # posted now, on the busy stream: waits for it
        send_c = asyncio.ensure_future(pipe.send(c))  # the idle default stream: ready
        await asyncio.sleep(0)
        assert not busy.query(), "the stream was idle already: the test proves nothing"
        await asyncio.wait_for(asyncio.gather(send_b, send_c), 30)
        assert noted() == 1  # b by record once ready, c by record behind it
        assert same(b, await asyncio.wait_for(pipe.recv(), 30))
        assert same(c, await asyncio.wait_for(pipe.recv(), 30))
        await pipe.send(d)
        assert noted() == 2
        assert same(d, await asyncio.wait_for(pipe.recv(), 30))
        await close(pipe)


async def test_auto_picks_tcp_within_one_process() -> None:
    # The listener cannot open a handle its own process exported: no ipc, and no failure.
    listener = await aiokvpipe.listen("127.0.0.1", 0, device=DEV)
    try:
        client, server = await asyncio.wait_for(asyncio.gather(
            aiokvpipe.connect("127.0.0.1", listener.port, device=DEV), listener.accept()), 60)
    finally:
        await listener.aclose()
    try:
        assert client.transport == server.transport == "tcp"
        x = rand(torch.float32, 1000)
        await client.send(x)
        assert same(x, await asyncio.wait_for(server.recv(), 30))
    finally:
        await close(client)
        await close(server)


def usable_afterwards() -> None:
    """This process's CUDA context has no sticky error: it allocates and computes."""
    a = torch.randn(2048, 2048, device=DEV)
    b = (a @ a).sum()
    big = torch.ones(256 * MiB, dtype=torch.uint8, device=DEV)
    assert torch.isfinite(b).item() and int(big.sum().item()) == 256 * MiB


async def released_without_mappings(pipe: aiokvpipe.Pipe) -> None:
    plane = pipe._plane  # the test looks inside: nothing public says what is mapped
    await asyncio.wait_for(plane.released, 10)  # type: ignore[attr-defined]
    assert not plane._thread_maps  # type: ignore[attr-defined]
    assert plane.stats["mapped_regions"] == 0  # type: ignore[attr-defined]


async def producer_killed_trial(nbytes: int) -> None:
    """The peer streams; we receive; SIGKILL it while copies run: our calls raise
    BrokenPipe within BREAK_S, our context stays usable, its mappings are gone."""
    async with peers(1) as (peer,):
        pipe = await pipe_to(peer)
        assert pipe.transport == "ipc"
        await peer.do("stream", name="p", nbytes=nbytes, count=100_000)
        for k in range(3):
            got = await asyncio.wait_for(pipe.recv(), 60)
            assert got.numel() == nbytes and int(got[0]) == int(got[-1]) == k % 251
        pending = asyncio.ensure_future(pipe.recv())
        peer.kill()
        killed = time.monotonic()
        with pytest.raises(BrokenPipe):
            while True:  # messages complete before the kill may still be delivered
                await asyncio.wait_for(asyncio.shield(pending), BREAK_S)
                pending = asyncio.ensure_future(pipe.recv())
        assert time.monotonic() - killed < BREAK_S
        with pytest.raises(BrokenPipe):
            await pipe.recv()
        await released_without_mappings(pipe)
        usable_afterwards()


async def consumer_killed_trial(nbytes: int) -> None:
    """We stream to a receiving peer; SIGKILL it: our sends raise BrokenPipe within
    BREAK_S, and our GPU memory returns to what it was before the pipe."""
    torch.cuda.synchronize()
    gc.collect()
    baseline = torch.cuda.memory_allocated(DEV)
    async with peers(1) as (peer,):
        pipe = await pipe_to(peer)
        assert pipe.transport == "ipc"
        await peer.do("sink", name="p")
        x = rand(torch.uint8, nbytes)
        for _ in range(3):
            await asyncio.wait_for(pipe.send(x), 60)
        sends = [asyncio.ensure_future(pipe.send(x)) for _ in range(4)]
        peer.kill()
        killed = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True),
                                         BREAK_S)
        assert time.monotonic() - killed < BREAK_S
        assert any(isinstance(r, BrokenPipe) for r in results), results
        assert all(r is None or isinstance(r, BrokenPipe) for r in results), results
        with pytest.raises(BrokenPipe):
            await pipe.send(x)
        await released_without_mappings(pipe)
        del x, sends, results, pipe
    gc.collect()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated(DEV) == baseline
    usable_afterwards()


async def test_producer_killed_mid_copy() -> None:
    await producer_killed_trial(256 * MiB)


async def test_consumer_killed() -> None:
    await consumer_killed_trial(256 * MiB)


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_kill_trials() -> None:
    trials = int(os.environ.get("AIOKVPIPE_IPC_TRIALS", "100"))
    for i in range(trials):
        if i % 2:
            await consumer_killed_trial(64 * MiB)
        else:
            await producer_killed_trial(64 * MiB)


async def test_two_prefills_two_decodes_on_one_gpu() -> None:
    """Each decode has a pipe to each prefill and routes keyed requests to both; killing one
    prefill breaks its pipes only. Prints per-pair and aggregate throughput."""
    nbytes = 16 * MiB
    async with peers(4) as (p0, p1, d0, d1):
        ports = []
        for p in (p0, p1):
            await p.do("listen")
            ports.append((await p.event("listening"))["port"])
        for d in (d0, d1):
            for name, port in zip(("p0", "p1"), ports):
                await d.do("connect", port=port, name=name)
                assert (await d.event("connected", where=lambda e, n=name: e["name"] == n)
                        )["transport"] == "ipc"
        for p in (p0, p1):
            for _ in range(2):
                ev = await p.event("accepted")
                assert ev["transport"] == "ipc"
                await p.do("serve", name=ev["name"])

        # Throughput, nothing failing.
        seconds = 2.0
        for d in (d0, d1):
            await d.do("requests", names=["p0", "p1"], nbytes=nbytes, seconds=seconds)
        reports = [(await d.event("requests", timeout=60))["pipes"] for d in (d0, d1)]
        total = 0.0
        for d, rep in zip(("d0", "d1"), reports):
            for p, r in rep.items():
                assert r["error"] is None and r["msgs"] > 0, (d, p, r)
                print(f"{d} ← {p}: {r['gbps']:.1f} GB/s ({r['msgs']} × 16 MiB)")
                total += r["gbps"]
        print(f"aggregate: {total:.1f} GB/s")

        # Kill prefill 0 mid-run: only the pipes to it break.
        for d in (d0, d1):
            await d.do("requests", names=["p0", "p1"], nbytes=nbytes, seconds=6.0)
        await asyncio.sleep(1.5)  # requests in full flow (not a synchronisation stand-in)
        p0.kill()
        reports = [(await d.event("requests", timeout=60))["pipes"] for d in (d0, d1)]
        for rep in reports:
            assert rep["p0"]["error"] == "BrokenPipe", rep
            assert rep["p1"]["error"] is None, rep
            assert rep["p1"]["after_other_broke"] > 0, rep
        # The surviving prefill's pipes are still whole.
        for _ in range(2):
            assert not [e for e in p1.seen if e["event"] == "serve_ended"]
        for d in (d0, d1):
            await d.do("requests", names=["p1"], nbytes=MiB, seconds=0.3)
            rep = (await d.event("requests"))["pipes"]
            assert rep["p1"]["error"] is None and rep["p1"]["msgs"] > 0, rep


async def test_a_cuda_error_naming_a_sends_memory_breaks_the_pipe_before_its_header(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The plane cannot name the allocation of a tensor being sent (a CUDA error): nothing
    of the message leaves, send() raises BrokenPipe with that error as its cause, and the
    peer is told that we failed. It used to raise the protocol's internal LocalProtocolError
    (the plane broke the pipe, then the pipe went on to write the header)."""
    from aiokvpipe import _cudaipc

    async with peers(1) as (peer,):
        pipe = await pipe_to(peer)
        assert pipe.transport == "ipc"
        boom = RuntimeError("CUDA error: an illegal memory access was encountered (injected)")

        def failing(ptr: int) -> int:
            raise boom

        monkeypatch.setattr(_cudaipc, "buffer_id_of", failing)
        with pytest.raises(BrokenPipe) as raised:
            await asyncio.wait_for(pipe.send(torch.ones(4096, device=DEV)), 30)
        assert raised.value.__cause__ is boom
        assert pipe.state.name == "BROKEN"
