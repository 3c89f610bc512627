"""What every part of the bench shares: units, sizes, statistics, and a case's phases as JSON.

A leaf: it imports nothing from the rest of :mod:`aiokvpipe.bench`.
"""

from __future__ import annotations

import importlib.util
import math
import re
import socket
import statistics
from collections.abc import Callable, Sequence
from typing import Any, Final

#: A JSON object: what the coordinator and the measured processes say to each other, and what
#: ``--json`` writes.
Json = dict[str, Any]
#: How a measured process tells the coordinator something (a rendezvous) in the middle of a case.
Emit = Callable[[Json], None]

KiB: Final = 1 << 10
MiB: Final = 1 << 20
GiB: Final = 1 << 30

#: Sends kept in flight while streaming: concurrent sender tasks for ours, the ack window for
#: the ceiling (naive streams pipeline through their write buffer instead).
DEPTH: Final = 8
#: Bounds on the samples one phase keeps (a ticker at 1 ms fills this in 200 s).
MAX_SAMPLES: Final = 200_000
MIN_LAT_SAMPLES: Final = 50

#: Set by ``--one-gpu`` for the children: both ends on one GPU, two hosts to NCCL.
ONE_GPU_ENV: Final = "AIOKVPIPE_BENCH_ONE_GPU"
#: The device UUID a ``--one-gpu`` child pretends to have, so our handshake sees two GPUs.
FAKE_UUID_ENV: Final = "AIOKVPIPE_BENCH_FAKE_UUID"


# -- sizes and statistics ---------------------------------------------------------------------

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"4K"`` → 4096, ``"1M"``/``"1MiB"`` → 1048576, ``"512"`` → 512 (binary units)."""
    m = _SIZE_RE.fullmatch(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (try 4K, 1M, 64M, 1G)")
    n = int(float(m.group(1)) * {"": 1, "K": KiB, "M": MiB, "G": GiB}[m.group(2).upper()])
    if not 1 <= n <= 8 * GiB:
        raise ValueError(f"size {text!r} is outside 1 B .. 8 GiB")
    return n


def parse_sizes(text: str) -> list[int]:
    return sorted({parse_size(part) for part in text.split(",") if part.strip()})


def format_size(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n q / 100), at least 1
    return ordered[int(rank) - 1]


def median(values: Sequence[float]) -> float | None:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else None


def latency_figures(round_trips_s: Sequence[float]) -> Json:
    """A latency phase's figures from its round trips (seconds): one-way = round trip / 2."""
    return {"p50_us": percentile(round_trips_s, 50) / 2 * 1e6,
            "p99_us": percentile(round_trips_s, 99) / 2 * 1e6, "samples": len(round_trips_s)}


def have_uvloop() -> bool:
    return importlib.util.find_spec("uvloop") is not None


# -- a case's phases ----------------------------------------------------------------------------
# A *case* is one connection of one implementation between the two measured processes, running
# a list of *phases*; both are plain JSON, planned by a suite (cpu.py, gpu.py) and run by
# measure.py or a baseline's own module.


def tput_phase(label: str, nbytes: int, seconds: float, **extra: Any) -> Json:
    return {"label": label, "kind": "tput", "nbytes": nbytes, "seconds": seconds,
            "warmup_s": max(0.05, 0.15 * seconds), "warmup_msgs": 2, **extra}


def lat_phase(nbytes: int, seconds: float, *, reply: str = "echo") -> Json:
    """A ping-pong phase. ``reply="echo"``: the receiver sends the message back (both ends
    move the payload); ``"none"``: it answers with a message without payload (only the
    receiver moves one, as the raw IPC baseline's 1-byte answer), labelled ``lat1``."""
    label = "lat" if reply == "echo" else "lat1"
    return {"label": f"{label} {format_size(nbytes)}", "kind": "lat", "nbytes": nbytes,
            "seconds": max(0.1, seconds / 2), "warmup_s": 0.05, "warmup_msgs": 20,
            "reply": reply}


def tput_label(nbytes: int) -> str:
    return f"tput {format_size(nbytes)}"


def case_timeout(phases: Sequence[Json], setup_s: float = 20.0) -> float:
    planned = sum(float(p["seconds"]) + float(p["warmup_s"]) for p in phases)
    return setup_s + 3.0 * planned + 2.0 * len(phases)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    """``n`` bytes from a blocking socket (the raw baselines' few bytes of signalling)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionResetError("the other process closed the connection")
        data += chunk
    return data
