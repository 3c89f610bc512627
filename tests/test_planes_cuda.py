"""CUDA-side plane behaviour that needs a GPU but no NCCL peer. Skipped without CUDA."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import aiokvpipe
from aiokvpipe import _cuda, _cudaipc
from aiokvpipe._nccl_plane import NcclPlane

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.timeout(60),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


class _AbortOnlyNccl:
    """The one NCCL call abort() makes. The real ncclCommAbort frees NCCL's buffers, which
    may itself wait for the device; this test is about what the plane adds to it."""

    def __init__(self) -> None:
        self.aborted: list[int] = []
        #: Holds the abort thread until the test has seen it (an instant abort let it end
        #: before threading.enumerate() looked: the test failed once on the H200).
        self.go = threading.Event()

    def async_error(self, comm: int) -> int:
        return 0  # (polled while an op overruns: a healthy communicator)

    def abort(self, comm: int) -> int:
        self.go.wait(10)
        self.aborted.append(comm)
        return 0


async def test_nccl_abort_waits_for_the_planes_streams_not_the_whole_device(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_cuda, "_SPARE", {})  # torch's streams below must not be kept as spare
    lib = _AbortOnlyNccl()
    lost: list[BaseException] = []
    plane = NcclPlane(lib, 1, 2, torch.device("cuda", 0), lost.append,  # type: ignore[arg-type]
                      [torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()])
    app = torch.cuda.Stream()
    with torch.cuda.stream(app):
        torch.cuda._sleep(20_000_000_000)  # ~10 s of the application's own work
        app_done = torch.cuda.Event()
        app_done.record(app)
    before = set(threading.enumerate())
    plane.abort(RuntimeError("peer died"))
    aborting = [t for t in threading.enumerate()
                if t not in before and t.name == "aiokvpipe-nccl-abort"]
    assert aborting, "abort() started no abort thread"
    lib.go.set()
    for t in aborting:
        t.join(5)
        assert not t.is_alive(), "abort waits for the application's stream"
    assert lib.aborted == [1, 2]
    assert not app_done.query(), "the application's stream finished first: test too short"


DEV = torch.device("cuda", 0)


class _WritingNccl:
    """NCCL at its narrowest seam: a receive writes ``value`` into its buffer on the stream it
    is given, as NCCL's kernel would (two real ranks need two processes, and what is under
    test is only the order of that write on the plane's stream)."""

    def __init__(self, buf: torch.Tensor, value: int) -> None:
        self.buf, self.value = buf, value

    def group_start(self) -> int:
        return 0

    def group_end(self) -> int:
        return 0

    def async_error(self, comm: int) -> int:
        return 0  # (polled while an op overruns: a healthy communicator)

    def recv(self, ptr: int, nbytes: int, peer: int, comm: int, stream: int) -> int:
        assert ptr == self.buf.data_ptr()
        with torch.cuda.stream(torch.cuda.ExternalStream(stream, device=DEV)):
            self.buf.fill_(self.value)
        return 0

    def abort(self, comm: int) -> int:
        return 0


async def test_nccl_receives_into_given_memory_after_the_callers_pending_work(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A block transfer's staging buffer comes from the caller's stream's pool, where work
    still queued may use that memory: the plane's write must come after it."""
    monkeypatch.setattr(_cuda, "_SPARE", {})  # torch's streams below must not be kept as spare
    buf = torch.zeros(1 << 20, dtype=torch.int32, device=DEV)
    torch.cuda._sleep(1)  # its kernel loaded now (a lazy load would synchronise the device)
    torch.cuda.synchronize(DEV)
    lost: list[BaseException] = []
    plane = NcclPlane(_WritingNccl(buf, 7), 1, 2, DEV, lost.append,  # type: ignore[arg-type]
                      [torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()])
    try:
        torch.cuda._sleep(1_000_000_000)  # ~0.5 s of the caller's own work, then it writes 9
        buf.fill_(9)
        received = plane.post_recv_into([buf])  # enqueued at once (the stand-in's write too)
        assert not torch.cuda.current_stream(DEV).query(), "too short: the test proves nothing"
        await asyncio.wait_for(received, 30)
        torch.cuda.synchronize(DEV)
        assert int(buf.min()) == int(buf.max()) == 7, "the receive was overwritten by work " \
            "queued before it on the caller's stream"
        assert not lost
    finally:
        before = set(threading.enumerate())
        plane.abort(RuntimeError("test over"))
        for t in set(threading.enumerate()) - before:  # its streams back before _SPARE is
            t.join(10)


async def test_nccl_a_cuda_error_recording_an_ops_end_fails_it_and_breaks_the_plane(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL took the op, then the event that marks its end cannot be recorded (a CUDA
    error): the op fails with that error and the plane breaks. Raised from the pump, it left
    the op never watched, its future (and every later receive) waiting for ever."""
    monkeypatch.setattr(_cuda, "_SPARE", {})  # torch's streams below must not be kept as spare
    buf = torch.zeros(1 << 20, dtype=torch.int32, device=DEV)
    torch.cuda.synchronize(DEV)
    lost: list[BaseException] = []
    plane = NcclPlane(_WritingNccl(buf, 7), 1, 2, DEV, lost.append,  # type: ignore[arg-type]
                      [torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()])
    lane_stream = plane._recv.stream
    boom = RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
    real_record = torch.cuda.Event.record

    def record(self: torch.cuda.Event, stream: torch.cuda.Stream | None = None) -> None:
        if stream is lane_stream:  # only the op's end, on the plane's receive stream
            raise boom
        real_record(self, stream)

    monkeypatch.setattr(torch.cuda.Event, "record", record)
    try:
        received = plane.post_recv_into([buf])
        with pytest.raises(RuntimeError, match="injected"):
            await asyncio.wait_for(received, 30)
        assert lost == [boom]
    finally:
        # Only the patch of record: _SPARE stays empty until the plane has given its streams
        # back (torch's pool streams must not be kept as spare).
        monkeypatch.setattr(torch.cuda.Event, "record", real_record)
        before = set(threading.enumerate())
        plane.abort(RuntimeError("test over"))
        for t in set(threading.enumerate()) - before:
            t.join(10)


def test_current_stream_is_torchs_current_stream() -> None:
    side = torch.cuda.Stream(DEV)
    external = torch.cuda.ExternalStream(torch.cuda.Stream(DEV).cuda_stream, device=DEV)
    assert _cuda.current_stream(DEV) == torch.cuda.current_stream(DEV)
    for stream in (side, external, side):
        with torch.cuda.stream(stream):
            got = _cuda.current_stream(DEV)
            assert got == torch.cuda.current_stream(DEV)
            assert got.cuda_stream == stream.cuda_stream
    assert _cuda.current_stream(DEV) == torch.cuda.current_stream(DEV)


class _StreamSpy:
    """Counts the streams made through the driver, and on which threads."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.made: list[int] = []
        self.threads: set[str] = set()
        real = _cudaipc.create_streams

        def create_streams(index: int, n: int) -> list[int]:
            self.threads.add(threading.current_thread().name)
            out = real(index, n)
            self.made.extend(out)
            return out

        monkeypatch.setattr(_cudaipc, "create_streams", create_streams)
        monkeypatch.setattr(_cuda, "_SPARE", {})  # what earlier tests gave back is not ours


async def test_side_streams_are_made_off_the_loop_work_and_are_reused_once_idle(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _StreamSpy(monkeypatch)
    first = await _cuda.side_streams(DEV, 2)
    assert len(spy.made) == 2 and threading.current_thread().name not in spy.threads
    x = torch.ones(1 << 20, device=DEV)
    with torch.cuda.stream(first[0]):
        torch.cuda._sleep(100_000_000)
        y = x * 2
        queued = torch.cuda.Event()
        queued.record(first[0])
    _cuda.recycle_when_idle(first)
    deadline = time.monotonic() + 10
    while len(_cuda._SPARE.get(0, ())) < 2:
        assert time.monotonic() < deadline, "the idle streams never came back"
        await asyncio.sleep(0.01)
    assert queued.query(), "recycled while work was still queued on the stream"
    assert float(y.sum()) == 2 * (1 << 20)
    _cuda.recycle_streams(first)  # given back twice: kept once
    assert len(_cuda._SPARE[0]) == 2
    second = await _cuda.side_streams(DEV, 2)
    assert {s.cuda_stream for s in second} == {s.cuda_stream for s in first}
    assert len(spy.made) == 2, "a spare stream was not reused"


async def test_cuda_pipes_make_their_streams_off_the_loop_and_reuse_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _StreamSpy(monkeypatch)
    for round_ in range(2):
        listener = await aiokvpipe.listen("127.0.0.1", 0, device=DEV, transport="tcp")
        accepting = asyncio.ensure_future(listener.accept())
        a = await aiokvpipe.connect("127.0.0.1", listener.port, device=DEV, transport="tcp")
        b = await accepting
        await listener.aclose()
        x = torch.arange(1 << 16, device=DEV)
        await a.send(x)
        assert torch.equal(await b.recv(), x)
        await a.aclose()
        await b.aclose()
        if round_ == 0:
            assert len(spy.made) == 4  # two staging streams at each end
            deadline = time.monotonic() + 10
            while len(_cuda._SPARE.get(0, ())) < 4:
                assert time.monotonic() < deadline, "closed pipes kept their streams"
                await asyncio.sleep(0.01)
    assert len(spy.made) == 4, "the second pair made new streams instead of reusing them"
    assert threading.current_thread().name not in spy.threads
