"""``benchmarks/ipc_stream.py`` with a wall-clock timer around chosen functions of the package
(development probe): where each end's time goes a message, without a profiler's overhead on
every call (a timer costs about 0.3 µs a call, only on the functions named).

    PHASES=pipe.Pipe.on_data,ipc.IpcPlane.post_recv,ipc.-._empty_like_specs \\
        python benchmarks/ipc_phases.py tput recv PORT &
    PHASES=pipe.Pipe._post,ipc.IpcPlane.post_send_noted \\
        python benchmarks/ipc_phases.py tput send PORT SECONDS

``PHASES``: ``module.Class.function`` (``-`` for a module-level function, which is timed
only where it is called through its module), modules ``pipe``, ``ipc``, ``cuda``,
``control``, ``protocol``, ``wire``. At exit each end prints, per function, the µs and
calls a message (warm-up included), messages counted by ``Pipe._claim`` at the receiver
and ``Pipe._post`` at the sender, which are always timed. Nested timers add up: a
function's figure includes those of what it calls.
"""

from __future__ import annotations

import atexit
import functools
import os
import runpy
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from aiokvpipe import _control, _cuda, _ipc_plane, _ipc_records, _pipe, _protocol, _wire  # noqa: E402

MODULES = {"pipe": _pipe, "ipc": _ipc_plane, "ipc_records": _ipc_records, "cuda": _cuda,
           "control": _control, "protocol": _protocol, "wire": _wire}
SECONDS: dict[str, float] = {}
CALLS: dict[str, int] = {}


def timed(owner: object, name: str, tag: str) -> None:
    inner: Callable[..., Any] = getattr(owner, name)
    clock = time.perf_counter

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = clock()
        try:
            return inner(*args, **kwargs)
        finally:
            SECONDS[tag] = SECONDS.get(tag, 0.0) + clock() - t0
            CALLS[tag] = CALLS.get(tag, 0) + 1

    setattr(owner, name, wrapper)


def report(role: str) -> None:
    messages = CALLS.get("Pipe._claim" if role == "recv" else "Pipe._post", 0) or 1
    print(f"[{role}] {messages} messages (warm-up included); per message:")
    for tag, seconds in sorted(SECONDS.items(), key=lambda kv: -kv[1]):
        print(f"[{role}]   {tag:36s} {seconds / messages * 1e6:7.2f} µs  "
              f"{CALLS[tag] / messages:5.2f} calls")


def main() -> None:
    role = sys.argv[2] if len(sys.argv) > 2 else ""
    specs = [s for s in os.environ.get("PHASES", "").split(",") if s]
    specs += ["pipe.Pipe._claim" if role == "recv" else "pipe.Pipe._post"]
    for spec in dict.fromkeys(specs):
        module, owner, name = spec.split(".")
        where = MODULES[module] if owner == "-" else getattr(MODULES[module], owner)
        timed(where, name, f"{owner}.{name}")
    atexit.register(report, role)
    sys.argv = [str(ROOT / "benchmarks" / "ipc_stream.py"), *sys.argv[1:]]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
