"""The nccl plane's failure paths on a machine without a GPU: NCCL's library and CUDA's
events and streams faked at the plane's seams (``NcclLib``, ``torch.cuda.Event``, the
streams), everything else the plane's own. The real plane runs on a GPU
(tests/test_cuda_nccl.py, tests/test_planes_cuda.py)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any

import pytest
import torch
from conftest import PairFactory, eventually

import aiokvpipe
from aiokvpipe import _nccl_plane
from aiokvpipe._cudaipc import DriverError
from aiokvpipe._errors import fresh
from aiokvpipe._nccl_lib import IN_PROGRESS, SUCCESS, NcclError

pytestmark = pytest.mark.timeout(30)

#: Floats of a message too large to go inline in its header: its payload takes the plane.
MESSAGE_FLOATS = 64 * 1024

#: ``ncclRemoteError``: what a communicator reports once the peer's side of NCCL failed.
REMOTE_ERROR = 6


class FakeLib:
    """NCCL's calls: ``group_end`` returns ``group_rc`` (raising, as the real one does, for
    an error); the communicators' state is ``state``; everything else succeeds at once."""

    def __init__(self, group_rc: int = SUCCESS, state: int = SUCCESS) -> None:
        self.group_rc, self.state = group_rc, state
        self.aborted: list[int] = []

    def group_start(self) -> None:
        pass

    def group_end(self) -> int:
        return self.check(self.group_rc, "ncclGroupEnd")

    def send(self, *args: object) -> None:
        pass

    def recv(self, *args: object) -> None:
        pass

    def async_error(self, comm: int) -> int:
        return self.state

    def check(self, rc: int, what: str) -> int:
        if rc not in (SUCCESS, IN_PROGRESS):
            raise NcclError(f"{what} failed ({rc})", rc)
        return rc

    def abort(self, comm: int) -> int:
        self.aborted.append(comm)
        return 0


class Stream:
    cuda_stream = 0

    def wait_event(self, event: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


class NeverDone:
    """An event recorded behind a kernel that never ends (its peer is gone)."""

    def record(self, stream: object = None) -> None:
        pass

    def query(self) -> bool:
        return False


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", NeverDone)
    monkeypatch.setattr(_nccl_plane, "current_stream", lambda device: Stream())
    monkeypatch.setattr(_nccl_plane, "recycle_streams", lambda streams: None)


def plane(lib: FakeLib, lost: list[BaseException]) -> Any:
    return _nccl_plane.NcclPlane(lib, 1, 2, torch.device("cpu"),  # type: ignore[arg-type]
                                 lost.append, [Stream(), Stream(), Stream()])  # type: ignore


@pytest.mark.usefixtures("fake_cuda")
async def test_a_send_nccl_still_connects_for_fails_when_the_plane_breaks() -> None:
    """A send whose group call returned ncclInProgress (NCCL still connecting, the peer
    gone meanwhile) fails when the plane is aborted, and its memory is kept until the
    communicator's abort ended NCCL's use of it. (It was in no queue and no poller: its
    send() waited for ever on a broken pipe.)"""
    lost: list[BaseException] = []
    p = plane(FakeLib(group_rc=IN_PROGRESS, state=IN_PROGRESS), lost)
    x = torch.ones(16)
    sent = p.post_send([x])
    await eventually(lambda: p._send._busy is not None, 5, "NCCL still connecting")
    cause = ConnectionResetError("heartbeat missed (injected)")
    p.abort(cause)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(sent, 5)
    await eventually(lambda: not p._send._held, 5, "its memory dropped after the abort")
    assert not lost, lost  # (an abort is the owner's: nothing is reported back)


@pytest.mark.usefixtures("fake_cuda")
async def test_a_failure_of_nccls_transport_fails_the_op_and_breaks_the_plane() -> None:
    """NCCL's transport fails under an op (its communicator reports an error; the kernel
    never ends) while the control connection lives: the op fails with the NcclError and
    the owner is told, within tens of ms of polling. (Only the op's event was polled: its
    send() waited for ever.)"""
    lost: list[BaseException] = []
    lib = FakeLib()
    p = plane(lib, lost)
    sent = p.post_send([torch.ones(16)])
    await eventually(lambda: bool(p._send.poller._pending), 5, "the op is enqueued")
    lib.state = REMOTE_ERROR
    with pytest.raises(NcclError):
        await asyncio.wait_for(sent, 5)
    assert len(lost) == 1 and isinstance(lost[0], NcclError), lost
    assert lost[0].code == REMOTE_ERROR
    p.abort(lost[0])


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("when", ["enqueued", "enqueued from the queue", "polled"])
async def test_a_send_whose_nccl_op_fails_raises_broken_pipe(
        pair_factory: PairFactory, when: str) -> None:
    """A pipe's payload goes to a real nccl plane (NCCL faked), wired to the pipe as
    ``_connect`` wires one, and NCCL reports the peer's failure: at the enqueue
    (``ncclGroupEnd``; the lane breaks the pipe inside ``post_send``), for a send on the fast
    path or one granted from the queue; or later, from the poll of the op's transport.
    send() raises BrokenPipe with that cause, as every call on a broken pipe does. (It
    raised LocalProtocolError for the header that followed the failed enqueue, or the raw
    NcclError from the poll.)"""
    a, b = await pair_factory()
    lib = FakeLib(group_rc=SUCCESS if when == "polled" else REMOTE_ERROR)
    p = _nccl_plane.NcclPlane(lib, 1, 2, torch.device("cpu"),  # type: ignore[arg-type]
                              a._break, [Stream(), Stream(), Stream()])  # type: ignore
    a._plane.post_send = p.post_send  # type: ignore[method-assign]
    try:
        if when == "enqueued from the queue":
            credits = a._credits.capacity
            await a._credits.acquire(credits)  # the send waits in the queue for credit
            send = asyncio.ensure_future(a.send(torch.ones(MESSAGE_FLOATS)))
            await asyncio.sleep(0)
            assert not send.done()
            a._credits.release(credits)
        else:
            send = asyncio.ensure_future(a.send(torch.ones(MESSAGE_FLOATS)))
        if when == "polled":
            await eventually(lambda: bool(p._send.poller._pending), 5, "the op is enqueued")
            lib.state = REMOTE_ERROR
        with pytest.raises(aiokvpipe.BrokenPipe) as raised:
            await asyncio.wait_for(send, 5)
        assert isinstance(raised.value.__cause__, NcclError), raised.value.__cause__
        assert a.state.name == "BROKEN"
    finally:
        p.abort(ConnectionAbortedError("test over"))


@pytest.mark.parametrize("exc", [NcclError("ncclSend failed (6)", 6),
                                 DriverError("cuPointerGetAttribute", 2)])
def test_an_error_whose_init_takes_its_own_arguments_is_copied_for_each_caller(
        exc: BaseException) -> None:
    """Every caller waiting on a broken plane gets its own copy of the cause: one of the
    CUDA and NCCL errors (message and code) is copied too. (The copy called its __init__
    with the message alone and raised TypeError inside the poller: the op's caller waited
    for ever.)"""
    exc.__cause__ = OSError("under it")
    new = fresh(exc)
    assert type(new) is type(exc) and new is not exc
    assert str(new) == str(exc) and new.code == exc.code  # type: ignore[attr-defined]
    assert new.__cause__ is exc.__cause__


class BlockingStream(Stream):
    """The staging stream: a job's wait for the caller's work holds until ``go`` is set."""

    def __init__(self) -> None:
        self.waiting = threading.Event()
        self.go = threading.Event()

    def wait_event(self, event: object) -> None:
        self.waiting.set()
        assert self.go.wait(10), "the test never let the staging job go on"


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("job_running", [True, False])
async def test_an_ended_plane_hands_back_its_staging_stream_only_if_no_job_runs_on_it(
        monkeypatch: pytest.MonkeyPatch, job_running: bool) -> None:
    """A CPU tensor's staging job still running when the plane is aborted may queue its copy
    on the staging stream afterwards: that stream must not go to another plane (it was
    handed back with the others at once); without a job, all three are handed back."""
    recycled: list[object] = []
    done = threading.Event()

    def recycle(streams: list[object]) -> None:
        recycled.extend(streams)
        done.set()

    monkeypatch.setattr(_nccl_plane, "recycle_streams", recycle)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    send, recv, stage = Stream(), Stream(), BlockingStream()
    p = _nccl_plane.NcclPlane(FakeLib(), 1, 2, torch.device("cpu"),  # type: ignore[arg-type]
                              [].append, [send, recv, stage])  # type: ignore[list-item]
    sent = None
    if job_running:
        sent = p.post_send([torch.empty(16, device="meta")])  # not the plane's device: staged
        assert await asyncio.to_thread(stage.waiting.wait, 5), "the staging job started"
    p.abort(ConnectionResetError("peer gone (injected)"))
    try:
        assert await asyncio.to_thread(done.wait, 5), "the streams were handed back"
        expected = [send, recv] if job_running else [send, recv, stage]
        assert recycled == expected
    finally:
        stage.go.set()
        if sent is not None:
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(sent, 5)
