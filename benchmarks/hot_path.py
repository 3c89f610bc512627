"""What a 4 KiB message costs our Python on the tcp path, each end alone, without its system
calls (development probe): steady enough on a noisy VM to compare two versions of the
package, where the bench's throughput swings by ±20 % from run to run.

Two real pipes in one process (uvloop, 127.0.0.1, default options: metrics on, busy
polling on). ``send``: ``a.send()`` of a 4 KiB CPU tensor, 64 in a row, with the control
transport's ``write`` made a no-op and the credits reset before each batch, so that nothing
blocks and no system call is timed. ``recv``: 64 inline message frames handed to
``b.on_data()`` at once (as one read), then 64 ``b.recv()``; the credit's return is left
out. Prints the µs a message of the best of five rounds, and all five.

    python benchmarks/hot_path.py send|recv

Compare versions alternated: ``PYTHONPATH=other/checkout python benchmarks/hot_path.py send``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
import uvloop

import aiokvpipe
from aiokvpipe import _wire
from aiokvpipe._dtypes import code_of

BATCH = 64  # messages a timed batch: a read's worth
ROUNDS, BATCHES, WARM_UP = 5, 300, 100


class _NoWrites:
    """The control transport with ``write`` a no-op (everything else passes through)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.is_closing = transport.is_closing

    def write(self, data: bytes) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def _sender(a: aiokvpipe.Pipe) -> Callable[[], Awaitable[float]]:
    a._control._transport = _NoWrites(a._control._transport)  # type: ignore[assignment]
    msg = torch.zeros(4096, dtype=torch.uint8)

    async def batch() -> float:
        a._credits._in_use = 0  # what the peer would have returned meanwhile
        a._proto.credit_outstanding = 0
        t0 = time.perf_counter()
        for _ in range(BATCH):
            await a.send(msg)
        return time.perf_counter() - t0

    return batch


def _receiver(b: aiokvpipe.Pipe) -> Callable[[], Awaitable[float]]:
    spec = _wire.TensorSpec(code_of(torch.uint8), (4096,), 1)
    payload = bytes(4096)
    setattr(b, "credit_released", lambda now=False: None)  # no CREDIT frame, no timer
    seq = [0]

    async def batch() -> float:
        first, seq[0] = seq[0], seq[0] + BATCH
        read = b"".join(_wire.encode_header(first + i, None, _wire.Structure.TENSOR, (spec,),
                                            True) + payload for i in range(BATCH))
        t0 = time.perf_counter()
        b.on_data(read)
        for _ in range(BATCH):
            await b.recv()
        dt = time.perf_counter() - t0
        b._proto.credit_owed = b._proto.credit_held = 0
        return dt

    return batch


async def main(side: str) -> None:
    listener = await aiokvpipe.listen("127.0.0.1", 0)
    accepting = asyncio.ensure_future(listener.accept())
    a = await aiokvpipe.connect("127.0.0.1", listener.port)
    b = await accepting
    batch = _sender(a) if side == "send" else _receiver(b)
    for _ in range(WARM_UP):
        await batch()
    rounds = []
    for _ in range(ROUNDS):
        total = 0.0
        for _ in range(BATCHES):
            total += await batch()
        rounds.append(total / (BATCHES * BATCH) * 1e6)
    print(f"{side}: {min(rounds):.2f} µs a 4 KiB message (best of {ROUNDS}); all "
          f"{[round(r, 2) for r in rounds]}", flush=True)
    await listener.aclose()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("side", choices=("send", "recv"))
    uvloop.run(main(ap.parse_args().side))
