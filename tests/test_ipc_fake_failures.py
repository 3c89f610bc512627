"""Failures on the ipc pipe's receive path, on a machine without a GPU: two real ipc pipes in
one process with CUDA faked at the driver seam (``benchmarks/ipc_python_path.py``), run in a
subprocess because the fake patches ``torch.cuda`` for the whole process. The real planes'
failures run on a GPU (tests/test_pipe_ipc.py, tests/test_ipc_cuda.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Messages that carry their copy in the header are allocated together when the read that
# brought them has been handled (IpcPlane._enqueue_deferred): a failure there happens after
# the pipe handled the headers, outside the frame loop whose errors break the pipe. It must
# still break it, with the local cause (not as the peer's protocol violation), and fail the
# receive waiting for the message instead of leaving it waiting for ever.
_ALLOCATION_FAILS = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {bench!r})
    import torch, uvloop
    import aiokvpipe
    import ipc_python_path as probe

    probe.fake_cuda(False)
    x = torch.full((4096,), 7, dtype=torch.uint8)
    probe._ALLOCATIONS[x.data_ptr()] = (1, x.numel(), True)

    async def main():
        a, b = await probe.pipe_pair(False)
        await a.send(x)  # maps the region; later sends carry their copy in the header
        assert int((await b.recv())[0]) == 7
        boom = MemoryError("no memory for the payload (injected)")
        def fail(messages):
            raise boom
        b._plane._allocate = fail
        waiting = asyncio.create_task(b.recv())
        try:
            await asyncio.wait_for(a.send(x), 5)
        except aiokvpipe.BrokenPipe:
            pass  # b may have broken the pipe before the send completed
        try:
            await asyncio.wait_for(waiting, 5)
        except aiokvpipe.BrokenPipe as exc:
            assert exc.__cause__ is boom, repr(exc.__cause__)
            assert b._plane.stats["copies_noted"] == 0  # (the receiver's own sends)
            assert a._plane.stats["copies_noted"] == 2, a._plane.stats
            print("broke with the local cause")
        else:
            raise AssertionError("recv() returned a message whose tensors were never made")
        await a.aclose()
        await b.aclose()

    uvloop.run(main())
""")


@pytest.mark.timeout(60)
def test_a_failed_allocation_of_noted_receives_breaks_the_pipe_with_the_local_cause() -> None:
    script = _ALLOCATION_FAILS.format(bench=str(ROOT / "benchmarks"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=50, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broke with the local cause" in done.stdout, done.stdout + done.stderr
