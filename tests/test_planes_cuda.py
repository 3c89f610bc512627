"""CUDA-side plane behaviour that needs a GPU but no NCCL peer. Skipped without CUDA."""

from __future__ import annotations

import threading

import pytest
import torch

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

    def abort(self, comm: int) -> int:
        self.go.wait(10)
        self.aborted.append(comm)
        return 0


async def test_nccl_abort_waits_for_the_planes_streams_not_the_whole_device() -> None:
    lib = _AbortOnlyNccl()
    lost: list[BaseException] = []
    plane = NcclPlane(lib, 1, 2, torch.device("cuda", 0), lost.append)  # type: ignore[arg-type]
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
