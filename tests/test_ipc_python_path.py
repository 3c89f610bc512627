"""``benchmarks/ipc_python_path.py`` (the ipc pipe's Python with CUDA faked at the driver seam)
runs on a machine without a GPU: the probe keeps working, and the ipc plane's path through
the pipe (notes in headers, records, batched completions, acknowledgements, delivery, credits)
carries thousands of messages end to end in one process. The real planes run on a GPU
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
def test_the_ipc_python_path_probe_moves_its_messages(mode: str) -> None:
    done = subprocess.run([sys.executable, str(PROBE), mode, "500", "--repeat", "2"],
                          capture_output=True, text=True, timeout=100)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "broke" not in done.stderr, done.stderr  # a pipe that broke logs it
    found = re.search(rf"^{mode}: CPU µs a message, both ends: min ([0-9.]+), median "
                      r"([0-9.]+) \(2 runs of 500\)$", done.stdout, re.M)
    assert found, done.stdout
    assert 0 < float(found[1]) <= float(found[2])
