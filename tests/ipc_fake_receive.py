"""Scenarios of the ipc pipe's receive path on a machine without a GPU, for
``tests/test_ipc_fake_receive.py``: two real ipc pipes in one process with CUDA faked at the
driver seam as ``benchmarks/ipc_python_path.py --check`` fakes it (copies run late, when an
event recorded after them is seen complete), the caller's stream idle. Run as a script (the
fake patches ``torch.cuda`` for the whole process): ``python ipc_fake_receive.py SCENARIO``;
it prints ``ok: ...`` and exits 0, or fails with an AssertionError saying what went wrong.
"""

from __future__ import annotations

import asyncio
import ctypes
import struct
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import ipc_python_path as probe  # noqa: E402
import torch  # noqa: E402
import uvloop  # noqa: E402

import aiokvpipe  # noqa: E402
from aiokvpipe import _cudaipc, _ipc_plane, _pipe_blocks, _wire  # noqa: E402
from aiokvpipe._dtypes import code_of  # noqa: E402
from aiokvpipe._errors import PeerSaysProtocolError  # noqa: E402
from aiokvpipe._ipc_plane import IpcPlane  # noqa: E402
from aiokvpipe._ipc_records import (  # noqa: E402
    MAX_REGIONS,
    CopyRecord,
    Piece,
    RegionRecord,
    RetireRecord,
    encode_note,
    encode_record,
)
from aiokvpipe._pipe import Pipe  # noqa: E402
from aiokvpipe._wire import TensorSpec  # noqa: E402

probe.fake_cuda(True)
_IDLE = probe._Stream()
setattr(_ipc_plane, "current_stream", lambda device: _IDLE)  # never busy: deterministic
X = torch.full((4096,), 7, dtype=torch.uint8)
probe._ALLOCATIONS[X.data_ptr()] = (1, X.numel(), True)
#: How many receives each flush of deferred receives (IpcPlane._enqueue_deferred) carried.
FLUSHED: list[int] = []
_enqueue_deferred = IpcPlane._enqueue_deferred


def _counted(self: IpcPlane) -> None:
    FLUSHED.append(len(self._deferred))
    _enqueue_deferred(self)


setattr(IpcPlane, "_enqueue_deferred", _counted)
BOOM = MemoryError("no memory for the payload (injected)")


def _fail(*args: object) -> Any:
    raise BOOM


async def _pair() -> tuple[Pipe, Pipe, list[dict[str, Any]]]:
    """Two pipes, the region of X mapped at b (one message moved), and a list collecting
    what reaches the loop's exception handler."""
    loop = asyncio.get_running_loop()
    leaked: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: leaked.append(context))
    a, b = await probe.pipe_pair(True)
    await a.send(X)
    assert int((await asyncio.wait_for(b.recv(), 5))[0]) == 7
    FLUSHED.clear()
    return a, b, leaked


async def _broken_with(b: Pipe, cause: BaseException, receives: list[asyncio.Future[Any]]
                       ) -> None:
    for got in await asyncio.wait_for(asyncio.gather(*receives, return_exceptions=True), 5):
        assert isinstance(got, aiokvpipe.BrokenPipe), f"recv() gave {got!r}"
        assert got.__cause__ is cause, f"cause {got.__cause__!r}, not {cause!r}"
    await asyncio.wait_for(b._plane.released, 5)  # type: ignore[attr-defined]


async def allocation() -> str:
    """A failed allocation of a read's noted receives breaks the pipe with that local cause
    (not a ProtocolError) and fails the receive waiting for the message."""
    a, b, leaked = await _pair()
    setattr(b._plane, "_allocate", _fail)
    waiting = asyncio.ensure_future(b.recv())
    try:
        await asyncio.wait_for(a.send(X), 5)
    except aiokvpipe.BrokenPipe:
        pass  # b may break the pipe before the send completes
    await _broken_with(b, BOOM, [waiting])
    assert FLUSHED == [1], f"the receive was not deferred to the read's end: {FLUSHED}"
    assert not leaked, leaked
    await a.aclose()
    return "the pipe broke with the MemoryError"


async def launch() -> str:
    """A copy launch failing in the middle of a read's deferred receives (the 2nd of 4)
    fails all four receives with its cause; nothing leaks to the loop; the plane releases."""
    a, b, leaked = await _pair()
    failure = RuntimeError("cudaMemcpyAsync failed (injected)")
    launches = [0]
    copy_late = _cudaipc.copy_async

    def copy(dst: int, src: int, n: int, stream: int) -> None:
        launches[0] += 1
        if launches[0] == 2:
            raise failure
        copy_late(dst, src, n, stream)

    setattr(_cudaipc, "copy_async", copy)
    receives = [asyncio.ensure_future(b.recv()) for _ in range(4)]
    sends = asyncio.gather(*(a.send(X) for _ in range(4)), return_exceptions=True)
    await _broken_with(b, failure, receives)
    assert FLUSHED == [4], f"expected one read of four deferred receives: {FLUSHED}"
    await asyncio.wait_for(sends, 5)
    assert not leaked, leaked
    await a.aclose()
    return "four receives failed with the launch's error"


async def release_never_raises() -> str:
    """release_copies (called in Pipe.on_data's finally) never raises: a deferred receive
    that cannot be allocated breaks the plane through on_lost instead."""
    a, b, leaked = await _pair()
    plane = b._plane
    assert isinstance(plane, IpcPlane)
    region = next(iter(plane._mappings))
    spec = TensorSpec(code_of(torch.uint8), (4096,), 1, "")
    setattr(plane, "_allocate", _fail)
    plane.hold_copies()
    fut = plane.post_recv_noted([spec], encode_note(region, 0, 4096))
    plane.release_copies()  # must not raise
    assert fut.done() and isinstance(fut.exception(), MemoryError), fut
    assert b._error is not None and b._error.__cause__ is BOOM, repr(b._error)
    assert not leaked, leaked
    await a.aclose()
    return "release_copies returned; the pipe broke with the MemoryError"


async def retire() -> str:
    """A noted receive deferred to the read's end keeps its region mapped: the peer's RETIRE
    of that region (its memory freed and made again, a new buffer id), read in the same
    read, unmaps it only after the copy out of it ran."""
    a, b, leaked = await _pair()
    ran = [0]
    closes: list[tuple[int, int]] = []  # (region, copies run when its unmapping was asked)

    def copy(dst: int, src: int, n: int, stream: int) -> None:
        def run() -> None:  # queued, as the probe's copies: it runs late
            ran[0] += 1
            ctypes.memmove(dst, src, n)
        probe._STREAMS[stream].launch(run)

    setattr(_cudaipc, "copy_async", copy)
    close_mapping = IpcPlane._close_mapping

    def closing(self: IpcPlane, m: Any) -> None:
        closes.append((m.region, ran[0]))
        close_mapping(self, m)

    setattr(IpcPlane, "_close_mapping", closing)
    first_region = next(iter(b._plane._mappings))  # type: ignore[attr-defined]

    async def remade() -> None:
        probe._ALLOCATIONS[X.data_ptr()] = (2, X.numel(), True)  # freed, made again
        await a.send(X)

    sends = asyncio.gather(a.send(X), remade())
    got = [await asyncio.wait_for(b.recv(), 5) for _ in range(2)]
    await asyncio.wait_for(sends, 5)
    assert all(int(t[0]) == 7 for t in got)
    assert FLUSHED and FLUSHED[0] == 1, f"the first receive was not deferred: {FLUSHED}"
    first = [copies for region, copies in closes if region == first_region]
    assert first, f"region {first_region} was never unmapped: {closes}"
    assert first[0] >= 1, (f"region {first_region} was unmapped before the copy out of it "
                           f"ran ({first[0]} copies had run)")
    assert not leaked, leaked
    await a.aclose()
    await b.aclose()
    return f"region {first_region} unmapped after its copy ran"


class _Writes:
    """The writes reaching a pipe's control transport (uvloop's transports are C objects:
    the channel's reference is wrapped, not the class)."""

    def __init__(self, pipe: Pipe) -> None:
        self.data: list[bytes] = []
        self._transport: Any = pipe._control._transport
        pipe._control._transport = self  # type: ignore[assignment]

    def write(self, data: bytes) -> None:
        self.data.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def answer() -> str:
    """The receiver answers a message at once: the acknowledgement of its copy and the
    answer reach the sender in one write (one wake-up there, not two)."""
    a, b, leaked = await _pair()

    async def answering() -> torch.Tensor:
        got = await b.recv()
        await b.send(None, key="answer")
        return got

    # The credit of _pair's message goes back first, on a header (else it lingers, and
    # its CREDIT frame could come in the middle of what is counted).
    await b.send(None, key="settle")
    assert await asyncio.wait_for(a.recv("settle"), 5) is None
    assert not b._proto.credit_owed
    task = asyncio.create_task(answering())
    writes = _Writes(b)
    await asyncio.wait_for(a.send(X), 5)
    assert await asyncio.wait_for(a.recv("answer"), 5) is None
    assert int((await task)[0]) == 7
    assert len(writes.data) == 1, (f"{len(writes.data)} writes for the acknowledgement and "
                                   f"the answer: {[len(d) for d in writes.data]} bytes")
    assert not leaked, leaked
    await a.aclose()
    await b.aclose()
    return f"acknowledgement and answer in one write of {len(writes.data[0])} bytes"


async def pool_partial() -> str:
    """A block pool whose third tensor cannot be exported goes staged, and what its export
    pinned goes back to the exports' LRU (pinned, it stayed exported and mapped at the peer
    for the plane's life); an allocation another pool pinned before stays pinned."""
    a, b, leaked = await _pair()
    plane: Any = a._plane
    layers = [torch.full((4096,), i, dtype=torch.uint8) for i in range(3)]
    for i, t in enumerate(layers):
        probe._ALLOCATIONS[t.data_ptr()] = (50 + i, t.numel(), True)
    assert plane.export_pool(1, [X])  # X's allocation (buffer id 1) pinned by a first pool
    export = _cudaipc.export_memory

    def failing(base: int) -> bytes:
        if base == layers[2].data_ptr():
            raise RuntimeError("cudaIpcGetMemHandle failed (injected)")
        return export(base)

    setattr(_cudaipc, "export_memory", failing)
    assert not plane.export_pool(2, [X, *layers]), "a pool with an unexportable tensor"
    pinned = sorted(ex.buffer_id for ex in plane._exports.values() if ex.pinned)
    assert pinned == [1], f"pinned after the failed export: buffer ids {pinned}"
    assert await asyncio.wait_for(b._plane.pool_source(2), 5) is None  # type: ignore
    assert not leaked, leaked
    await a.aclose()
    await b.aclose()
    return "only the first pool's allocation stays pinned"


async def acked() -> str:
    """The acknowledgement of a copy resumes the send() awaiting it at the next loop
    iteration, not two later (a future of the plane's relayed to the sender's by a done
    callback, as asyncio.shield does, costs a loop iteration more at every send)."""
    a, b, leaked = await _pair()
    loop = asyncio.get_running_loop()
    seen: list[bool] = []
    on_ack = IpcPlane._on_ack

    def acking(self: IpcPlane, rec: Any) -> None:
        on_ack(self, rec)
        if self is a._plane:  # scheduled after whatever the ack scheduled
            loop.call_soon(lambda: seen.append(sending.done()))

    setattr(IpcPlane, "_on_ack", acking)
    sending = asyncio.ensure_future(a.send(X))
    assert int((await asyncio.wait_for(b.recv(), 5))[0]) == 7
    await asyncio.wait_for(sending, 5)
    assert seen == [True], f"send() had not returned one loop iteration after its ack: {seen}"
    assert not leaked, leaked
    await a.aclose()
    await b.aclose()
    return "send() returned at the loop iteration after its acknowledgement"


async def region_reuse() -> str:
    """A (hostile) producer announces a region id again once it retired it, in the read where
    a copy out of the old mapping was queued: each mapping is unmapped once, the old one
    after its copy, the new one only when the plane ends; a later copy reads the new one.
    (Mappings kept by region id unmapped the new one under the live region, and leaked the
    old.)"""
    opened: list[int] = []
    closed: list[int] = []

    def open_memory(handle: bytes, index: int) -> int:
        opened.append(int.from_bytes(handle[:8], "little"))
        return opened[-1]

    setattr(_cudaipc, "open_memory", open_memory)
    setattr(_cudaipc, "close_memory", closed.append)
    old, new = torch.full((4096,), 1, dtype=torch.uint8), torch.full((4096,), 2, dtype=torch.uint8)
    for i, t in enumerate((old, new)):
        probe._ALLOCATIONS[t.data_ptr()] = (100 + i, t.numel(), True)
    lost: list[BaseException] = []
    plane = IpcPlane(torch.device("cpu"), lost.append, "segments", 1 << 20,
                     [probe._Stream(), probe._Stream()])  # type: ignore[list-item]
    plane.attach_signals(lambda data: None)
    spec = TensorSpec(code_of(torch.uint8), (4096,), 1, "")

    def region(t: torch.Tensor) -> bytes:
        handle = t.data_ptr().to_bytes(8, "little") + bytes(_cudaipc.IPC_HANDLE_BYTES - 8)
        return encode_record(RegionRecord(7, 4096, handle))

    copy = encode_record(CopyRecord((Piece(7, 0, 4096),), True))
    plane.on_signal(region(old))
    await asyncio.wait_for(plane._mappings[7].opened, 5)
    first = plane.post_recv([spec])
    plane.on_signal(copy + encode_record(RetireRecord(7)) + region(new))
    assert int((await asyncio.wait_for(first, 5))[0][0]) == 1
    await asyncio.wait_for(plane._mappings[7].opened, 5)
    await plane._worker.submit(lambda: None)  # the worker ran what was queued before
    assert closed == [old.data_ptr()], f"unmapped {closed}, not the old region only"
    second = plane.post_recv([spec])
    plane.on_signal(copy)
    assert int((await asyncio.wait_for(second, 5))[0][0]) == 2
    plane.close()
    await asyncio.wait_for(plane.released, 5)
    assert sorted(closed) == sorted(opened), f"mapped {opened}, unmapped {closed}"
    assert not lost, lost
    return "each mapping unmapped once, the old after its copy"


async def exports_pinned() -> str:
    """With 512 exports held by block pools, a tensor sent again and again is exported and
    mapped once. (The export made when pools held the most was retired at once, never
    announced: each send exported it anew, the peer mapped one region more every time and
    broke the pipe at the 1024th, blaming the producer.)"""
    a, b, leaked = await _pair()
    layers = [torch.zeros(256, dtype=torch.uint8) for _ in range(512)]
    for i, t in enumerate(layers):
        probe._ALLOCATIONS[t.data_ptr()] = (1000 + i, t.numel(), True)
    for p in range(4):
        assert a._plane.export_pool(10 + p, layers[p * 128:(p + 1) * 128])  # type: ignore
    y = torch.full((4096,), 9, dtype=torch.uint8)
    probe._ALLOCATIONS[y.data_ptr()] = (60, y.numel(), True)
    mapped = []
    for _ in range(4):
        got = asyncio.ensure_future(b.recv())
        await asyncio.wait_for(a.send(y), 5)
        assert int((await asyncio.wait_for(got, 5))[0]) == 9  # type: ignore[index]
        mapped.append(len(b._plane._ledger.regions))  # type: ignore[attr-defined]
    assert mapped == [1 + 512 + 1] * 4, f"regions mapped at the peer after each send: {mapped}"
    assert not leaked, leaked
    await a.aclose()
    await b.aclose()
    return "one region for the tensor, beside the pools' 512"


async def regions_bounded() -> str:
    """A message of more tensors, each its own allocation, than the peer maps regions
    arrives whole: the tensors beyond that go through the staging ring; a block pool of as
    many goes staged. (Each was exported and announced: the peer broke the pipe at the
    1025th region, blaming an honest producer.)"""
    a, b, leaked = await _pair()
    xs = [torch.full((256,), i % 251, dtype=torch.uint8) for i in range(MAX_REGIONS + 76)]
    for i, t in enumerate(xs):
        probe._ALLOCATIONS[t.data_ptr()] = (2000 + i, t.numel(), True)
    got = asyncio.ensure_future(b.recv())
    await asyncio.wait_for(a.send(xs), 10)
    out = await asyncio.wait_for(got, 10)
    assert isinstance(out, list), type(out)
    assert [int(t[0]) for t in out] == [i % 251 for i in range(len(xs))], "bytes misplaced"
    pool = [torch.zeros(256, dtype=torch.uint8) for _ in range(MAX_REGIONS + 6)]
    for i, t in enumerate(pool):
        probe._ALLOCATIONS[t.data_ptr()] = (4000 + i, t.numel(), True)
    assert not a._plane.export_pool(3, pool), "a pool beyond the peer's regions"  # type: ignore
    assert await asyncio.wait_for(b._plane.pool_source(3), 5) is None  # type: ignore
    assert b._error is None and a._error is None, (a._error, b._error)
    assert not leaked, leaked
    await a.aclose()
    await b.aclose()
    return f"{len(xs)} tensors received; the pool of {len(pool)} staged"


async def ring_freed() -> str:
    """The staging ring, still being allocated when the pipe breaks, is freed once that
    completes. (Its free was queued behind the worker's end and never ran: 128 MiB of GPU
    memory gone until the process ends.)"""
    a, b, leaked = await _pair()
    allocating, go = threading.Event(), threading.Event()
    allocated: list[int] = []
    freed: list[int] = []
    malloc = _cudaipc.malloc

    def slow_malloc(nbytes: int, index: int) -> int:
        allocating.set()
        go.wait(5)
        allocated.append(malloc(nbytes, index))
        return allocated[-1]

    setattr(_cudaipc, "malloc", slow_malloc)
    setattr(_cudaipc, "free", lambda ptr, index: freed.append(ptr))
    y = torch.full((4096,), 3, dtype=torch.uint8)
    probe._ALLOCATIONS[y.data_ptr()] = (70, y.numel(), False)  # through the ring
    sending = asyncio.ensure_future(a.send(y))
    assert await asyncio.to_thread(allocating.wait, 5), "the ring's allocation never began"
    cause = ConnectionResetError("the connection died (injected)")
    a._break(cause)
    go.set()
    got = (await asyncio.wait_for(asyncio.gather(sending, return_exceptions=True), 5))[0]
    assert isinstance(got, aiokvpipe.BrokenPipe), f"send() gave {got!r}"
    await asyncio.wait_for(a._plane.released, 5)  # type: ignore[attr-defined]
    assert allocated and freed == allocated, f"allocated {allocated}, freed {freed}"
    assert not leaked, leaked
    await b.aclose()
    return "the ring allocated after the break was freed"


class _CudaError(RuntimeError):
    """A CUDA runtime error as CuPy raises it: its code in ``status``."""

    def __init__(self, status: int) -> None:
        super().__init__(f"CUDA error {status} (injected)")
        self.status = status


async def _failed_causes(y: torch.Tensor) -> tuple[BaseException | None, BaseException | None]:
    """Send ``y`` (its allocation new to the pipe) from a to b; both ends' causes once they
    broke."""
    a, b, leaked = await _pair()
    got = asyncio.ensure_future(b.recv())
    results = await asyncio.wait_for(asyncio.gather(a.send(y), got, return_exceptions=True), 5)
    assert all(isinstance(r, aiokvpipe.BrokenPipe) for r in results), results
    await asyncio.wait_for(asyncio.gather(a._plane.released, b._plane.released), 5)  # type: ignore
    assert not leaked, leaked
    assert a._error is not None and b._error is not None
    return a._error.__cause__, b._error.__cause__


async def blame() -> str:
    """Whose failure it is: a staging ring that cannot be allocated is the sender's own (its
    peer hears that it failed, not that the connection closed); a peer's handle that does not
    open for want of memory is the receiver's own, and one that does not open for another
    reason is the peer's protocol error."""
    y = torch.full((4096,), 5, dtype=torch.uint8)
    probe._ALLOCATIONS[y.data_ptr()] = (80, y.numel(), False)
    malloc, open_memory = _cudaipc.malloc, _cudaipc.open_memory

    def fail(status: int) -> Callable[..., Any]:
        def raising(*args: object) -> Any:
            raise _CudaError(status)
        return raising

    setattr(_cudaipc, "malloc", fail(2))
    ours, theirs = await _failed_causes(y)
    assert isinstance(ours, RuntimeError) and "staging ring" in str(ours), repr(ours)
    assert isinstance(theirs, aiokvpipe.PeerFailure), repr(theirs)
    setattr(_cudaipc, "malloc", malloc)
    probe._ALLOCATIONS[y.data_ptr()] = (81, y.numel(), True)
    for status, receiver, sender in ((2, _CudaError, aiokvpipe.PeerFailure),
                                     (400, aiokvpipe.ProtocolError,
                                      PeerSaysProtocolError)):
        probe._ALLOCATIONS[y.data_ptr()] = (82 + status, y.numel(), True)  # a new region

        def opening(handle: bytes, index: int, status: int = status) -> int:
            if int.from_bytes(handle[:8], "little") == y.data_ptr():
                raise _CudaError(status)
            return int(open_memory(handle, index))

        setattr(_cudaipc, "open_memory", opening)
        at_sender, at_receiver = await _failed_causes(y)
        assert type(at_receiver) is receiver, f"status {status}: {at_receiver!r}"
        assert type(at_sender) is sender, f"status {status}: {at_sender!r}"
    return "the ring's failure and an open's want of memory are their own end's"


def _block_pools() -> tuple[torch.Tensor, torch.Tensor, aiokvpipe.BlockPool,
                            aiokvpipe.BlockPool]:
    """A sender's pool (block i holds i * 64 ...) and an empty receiver's, 4 blocks each."""
    src = torch.arange(256, dtype=torch.int64).to(torch.uint8).reshape(4, 64).clone()
    dst = torch.zeros(4, 64, dtype=torch.uint8)
    probe._ALLOCATIONS[src.data_ptr()] = (500, src.numel(), True)
    probe._ALLOCATIONS[dst.data_ptr()] = (501, dst.numel(), True)
    return src, dst, aiokvpipe.BlockPool([src], block_dim=0), aiokvpipe.BlockPool([dst],
                                                                                block_dim=0)


async def pool_flush_fails() -> str:
    """A send_blocks whose pool export writes its records behind a ring copy's, whose event
    cannot be queried (a CUDA error): the pipe breaks with that cause, and the call raises
    BrokenPipe. (The raw error reached the caller and the pipe stayed open, its POOL frame
    sent but the pool not kept as described: the next call described it again, and the
    peer broke the pipe, blaming us.)"""
    a, b, leaked = await _pair()
    _, _, pool_a, pool_b = _block_pools()
    failure = _CudaError(700)

    class Gate:
        def query(self) -> bool:
            raise failure

    a._plane._gated.append((Gate(), b""))  # type: ignore[attr-defined]
    receiving = asyncio.ensure_future(b.recv_blocks(pool_b, [0], key="k"))
    got = (await asyncio.wait_for(asyncio.gather(a.send_blocks(pool_a, [2], key="k"),
                                                 return_exceptions=True), 5))[0]
    assert isinstance(got, aiokvpipe.BrokenPipe), f"send_blocks() gave {got!r}"
    assert got.__cause__ is failure, repr(got.__cause__)
    theirs = (await asyncio.wait_for(asyncio.gather(receiving, return_exceptions=True), 5))[0]
    assert isinstance(theirs, aiokvpipe.BrokenPipe), f"the peer's recv_blocks() gave {theirs!r}"
    await asyncio.wait_for(a._plane.released, 5)  # type: ignore[attr-defined]
    assert not leaked, leaked
    await b.aclose()
    return "the pipe broke with the CUDA error"


async def offer_kept() -> str:
    """A recv_blocks cancelled while the peer's pool is still being mapped (its PULL waits
    for that) takes nothing: the next call gets the offer. (The PULL went for nobody: the
    sender heard the blocks were copied, and the next call waited for ever.)"""
    a, b, sending, src, dst, pool_b = await _offer_left_in_the_mapping_window(discard=False)
    await asyncio.wait_for(b.recv_blocks(pool_b, [0], key="k"), 5)
    await asyncio.wait_for(sending, 5)
    assert torch.equal(dst[0], src[2]), "the second call did not get the blocks"
    await a.aclose()
    await b.aclose()
    return "the offer went to the next call"


async def offer_discarded() -> str:
    """As offer_kept, the call's key discarded after the cancel (a request given up): the
    offer is refused, as discard() refuses offers now and later, and the sender hears why.
    (Put back under the discarded key, it waited there for ever, and so did the sender.)"""
    a, b, sending, _, dst, _ = await _offer_left_in_the_mapping_window(discard=True)
    try:
        await asyncio.wait_for(sending, 5)
        raise AssertionError("send_blocks of a discarded key succeeded")
    except ValueError as exc:
        assert "discard" in str(exc), exc
    assert not b._blocks._offers_in, b._blocks._offers_in
    assert int(dst.sum()) == 0
    await a.aclose()
    await b.aclose()
    return "the offer was refused: discarded"


async def _offer_left_in_the_mapping_window(discard: bool) -> tuple[Any, ...]:
    """A recv_blocks matched an offer, and is cancelled (then its key discarded, if
    ``discard``) while the peer's pool is still being mapped; then the mapping completes."""
    a, b, leaked = await _pair()
    src, dst, pool_a, pool_b = _block_pools()
    mapping, go = threading.Event(), threading.Event()
    open_memory = _cudaipc.open_memory

    def slow_open(handle: bytes, index: int) -> int:
        mapping.set()
        go.wait(5)  # cudaIpcOpenMemHandle of a large pool: up to ~0.1 s, in the worker
        return int(open_memory(handle, index))

    setattr(_cudaipc, "open_memory", slow_open)
    first = asyncio.ensure_future(b.recv_blocks(pool_b, [0], key="k"))
    sending = asyncio.ensure_future(a.send_blocks(pool_a, [2], key="k"))
    assert await asyncio.to_thread(mapping.wait, 5), "the pool's mapping never began"
    while not b._blocks._incoming:  # matched; its PULL waits for the mapping
        await asyncio.sleep(0)
    first.cancel()
    try:
        await first
        raise AssertionError("the first call was not cancelled")
    except asyncio.CancelledError:
        pass
    if discard:
        b.discard("k")
    go.set()
    assert not leaked, leaked
    return a, b, sending, src, dst, pool_b


async def pull_after_break() -> str:
    """The pipe breaks while a copy out of the peer's pool into a recv_blocks' blocks is
    queued (behind the caller's stream, say): the call raises only once that copy ran, so
    that nothing writes its blocks after it. (It raised at once, and the copy then wrote
    blocks the caller had handed to another request.)"""
    a, b, leaked = await _pair()
    src, dst, pool_a, pool_b = _block_pools()
    ran: list[bool] = []
    copy_runs = _pipe_blocks.copy_runs

    def late(source: Any, dest: Any, layers: Any, runs: Any, *, stream: Any) -> None:
        def run() -> None:
            copy_runs(source, dest, layers, runs)
            ran.append(True)
        probe._STREAMS[stream.cuda_stream].launch(run)  # runs once its stream is waited on

    setattr(_pipe_blocks, "copy_runs", late)
    pull = IpcPlane.pull

    gpu_busy = threading.Event()

    class Busy(probe._Late):  # the copy's event: done only once the device goes on
        def query(self) -> bool:
            return gpu_busy.is_set() and bool(super().query())

    def breaking(self: IpcPlane, *args: Any, **kw: Any) -> Any:
        if self is b._plane:
            setattr(self, "_events", SimpleNamespace(get=Busy, put=lambda event: None))
        fut = pull(self, *args, **kw)
        if self is b._plane:
            # The device is still busy (the caller's stream ahead of the copy): the plane's
            # release, which waits for its streams, waits for this.
            self._worker.submit(lambda: gpu_busy.wait(5))
            b._break(ConnectionResetError("the peer died (injected)"))
        return fut

    setattr(IpcPlane, "pull", breaking)
    sending = asyncio.ensure_future(a.send_blocks(pool_a, [2], key="k"))
    receiving = asyncio.ensure_future(b.recv_blocks(pool_b, [0], key="k"))
    at_end: list[bool] = []
    receiving.add_done_callback(lambda _: at_end.append(bool(ran)))
    while b._error is None:
        await asyncio.sleep(0)
    # However long the device stays busy, the call waits (without the fix: within a few
    # loop iterations); then the device goes on.
    await asyncio.wait({receiving}, timeout=0.5)
    gpu_busy.set()
    results = await asyncio.wait_for(asyncio.gather(receiving, sending,
                                                    return_exceptions=True), 10)
    assert isinstance(results[0], aiokvpipe.BrokenPipe), results
    assert at_end == [True], "recv_blocks ended before the copy into its blocks ran"
    assert not leaked, leaked
    return "recv_blocks raised after the copy ran"


async def unclaimed_at_close() -> str:
    """The peer signals a copy no message of its own claims (a COPY record, or the start of
    one), then closes saying it sent nothing more: a ProtocolError, not a graceful end.
    (The pipe ended gracefully, the record left behind.)"""
    copy = encode_record(CopyRecord((Piece(0, 0, 16),), True))
    outcomes = []
    for records in ("copy", "half"):
        a, b, leaked = await _pair()
        region = next(iter(b._plane._mappings))
        data = (copy[:4] + struct.pack(">I", region) + copy[8:] if records == "copy"
                else struct.pack(">BBH", 4, 1, 1))  # a COPY record's head, no piece
        a._control._transport.write(_wire.encode_signal(data)
                                    + _wire.encode(_wire.Close(b._proto.next_recv_seq)))
        try:
            await asyncio.wait_for(b.wait_closed(), 5)
            raise AssertionError("the pipe ended gracefully")
        except aiokvpipe.BrokenPipe as exc:
            assert isinstance(exc.__cause__, aiokvpipe.ProtocolError), repr(exc.__cause__)
            outcomes.append(str(exc.__cause__))
        await asyncio.wait_for(asyncio.gather(a.aclose(), b.aclose(),
                                              return_exceptions=True), 5)
        assert not leaked, leaked
    assert "no message claims" in outcomes[0] and "unfinished record" in outcomes[1], outcomes
    return "; ".join(outcomes)


SCENARIOS: dict[str, Callable[[], Any]] = {
    "allocation": allocation, "launch": launch, "release_never_raises": release_never_raises,
    "retire": retire, "answer": answer, "acked": acked, "region_reuse": region_reuse,
    "pool_partial": pool_partial, "exports_pinned": exports_pinned,
    "regions_bounded": regions_bounded, "ring_freed": ring_freed, "blame": blame,
    "pool_flush_fails": pool_flush_fails, "offer_kept": offer_kept,
    "offer_discarded": offer_discarded,
    "pull_after_break": pull_after_break, "unclaimed_at_close": unclaimed_at_close}

if __name__ == "__main__":
    print("ok:", uvloop.run(SCENARIOS[sys.argv[1]]()))
