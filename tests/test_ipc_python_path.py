"""``benchmarks/ipc_python_path.py`` (the ipc pipe's Python with CUDA faked at the driver seam)
runs on a machine without a GPU, and with ``--check`` carries messages of distinct bytes
through two real ipc pipes in one process, in order: sends described in their header and by
record (from streams found busy, through the staging ring, or of two pieces), one behind the
other, copies awaited in batches, polled, acknowledged and delivered. Copies run late, as on
a GPU (when an event recorded after them is seen complete), and the sender overwrites a
tensor as soon as its send() returns. A note that went ahead of a record still queued or
still waiting for its ring copy would deliver one message's bytes under another's header:
the ``tput`` check fails with either condition of ``_post_send`` removed. A copy enqueued
behind a later message's (``_pump_recv_now`` not enqueueing the deferred noted receives
first) is acknowledged before it ran and delivers the overwritten bytes: it fails then too
(``lat`` has one message in flight, and catches neither). The real planes run on a GPU
(tests/test_pipe_ipc.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = Path(__file__).resolve().parent.parent / "benchmarks" / "ipc_python_path.py"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["tput", "lat"])
def test_the_ipc_python_path_carries_every_message_whole_and_in_order(mode: str) -> None:
    done = subprocess.run([sys.executable, str(PROBE), mode, "500", "--repeat", "2",
                           "--check"], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broke" not in done.stderr, done.stderr  # a pipe that broke logs it
    timing = re.search(rf"^{mode}: CPU µs a message, both ends: min ([0-9.]+), median "
                       r"([0-9.]+) \(2 runs of 500\)$", done.stdout, re.M)
    assert timing, done.stdout
    assert 0 < float(timing[1]) <= float(timing[2])
    ways = re.search(r"^checked (\d+) messages in order: (\d+) described in their header, "
                     r"(\d+) by record;", done.stdout, re.M)
    assert ways, done.stdout
    checked, noted, recorded = map(int, ways.groups())
    assert checked == 300 + 2 * 500  # the warm-up and both runs
    assert noted > 0 and recorded > 0  # both ways were taken, between each other
    assert re.search(r"staging ring [1-9]\d* bytes$", done.stdout, re.M), done.stdout
