"""examples/demo.py, the README's main job, as a user stops it: signals during its cleanup."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parent.parent / "examples" / "demo.py"

pytestmark = pytest.mark.timeout(180)


def _servers_on(pipe_port: int) -> list[int]:
    """The pids of the demo's servers (their command lines name the pipe port)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--pipe-port" in argv and argv[argv.index(b"--pipe-port") + 1:][:1] == [
                str(pipe_port).encode()]:
            found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc to find the servers")
def test_a_second_sigterm_during_the_cleanup_still_stops_both_servers() -> None:
    """Two SIGTERMs in a row (an impatient operator, a supervisor's retry): the demo exits
    130 and neither server is left running. (The second one interrupted the decode server's
    stop, and the prefill server, in its own session, kept running with its ports.)"""
    demo = subprocess.Popen([sys.executable, str(DEMO), "--ttft-trials", "0", "--no-check"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pipe_port = None
    try:
        assert demo.stdout is not None
        deadline = time.monotonic() + 120
        for line in demo.stdout:
            if m := re.search(r"pipe port (\d+)", line):
                pipe_port = int(m.group(1))
            if line.startswith("both up"):
                break
            assert time.monotonic() < deadline, "the demo did not come up"
        assert pipe_port is not None and len(_servers_on(pipe_port)) == 2
        demo.send_signal(signal.SIGTERM)
        time.sleep(0.15)  # (the second signal lands while the first one's cleanup runs)
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 130
        left = _servers_on(pipe_port)
        assert not left, f"servers left running: {left}"
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
        for pid in _servers_on(pipe_port) if pipe_port is not None else ():
            os.kill(pid, signal.SIGKILL)
