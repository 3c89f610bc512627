"""The ipc pipe's receive path on a machine without a GPU: failures and unmapping around the
receives deferred to a read's end, an acknowledgement leaving with the answer and waking the
send() it answers at once, a block pool's failed export pinning nothing; the producer's
exports within the regions the consumer maps, with pools holding many; the staging ring
freed when the pipe broke while it was allocated; whose failure a ring or a mapping that
cannot be made is; block pulls: a call cancelled before its PULL takes nothing, a break
ends a call only once the copy into its blocks ran; records no message claims at a close
are the peer's violation; through
two real ipc pipes with CUDA faked at the driver seam (``tests/ipc_fake_receive.py`` says
how; each scenario runs in its own process, as the fake patches ``torch.cuda``). The real
planes run on a GPU (tests/test_pipe_ipc.py, tests/test_ipc_cuda.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "ipc_fake_receive.py"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scenario", ["allocation", "launch", "release_never_raises",
                                      "retire", "answer", "acked", "region_reuse",
                                      "pool_partial", "exports_pinned", "regions_bounded",
                                      "ring_freed", "blame", "pool_flush_fails",
                                      "offer_kept",
                                      "offer_discarded", "pull_after_break",
                                      "unclaimed_at_close"])
def test_deferred_receives(scenario: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), scenario], capture_output=True,
                          text=True, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("ok:"), done.stdout + done.stderr
