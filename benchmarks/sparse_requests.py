"""Sparse request/response: a 4 KiB request every few ms to an echo process, with busy polling
at a given window on both ends. Prints the round trip's p50 and the client's CPU per request
(the sleep between requests included), so polling on and off compare:

    python benchmarks/sparse_requests.py --busy-poll-us 200
    python benchmarks/sparse_requests.py --busy-poll-us 0

A development probe (run the two alternately: the VM's speed drifts); ``python -m aiokvpipe
bench`` is the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvloop  # noqa: E402
from pingpong import end_echo, reap  # noqa: E402  (benchmarks/ is on the path: this script's)

import aiokvpipe  # noqa: E402

WARM_UP = 30


async def echo(port: int, busy_poll_us: float) -> None:
    pipe = await aiokvpipe.connect("127.0.0.1", port, busy_poll_us=busy_poll_us)
    while (msg := await pipe.recv()) is not None:
        await pipe.send(msg)
    await pipe.aclose()


async def client(args: argparse.Namespace) -> None:
    listener = await aiokvpipe.listen("127.0.0.1", 0, busy_poll_us=args.busy_poll_us)
    child = subprocess.Popen([sys.executable, __file__, "--echo", str(listener.port),
                              "--busy-poll-us", str(args.busy_poll_us)])
    try:
        pipe = await asyncio.wait_for(listener.accept(), 30)
        msg = torch.zeros(4096, dtype=torch.uint8)
        gap = args.gap_ms / 1e3
        for _ in range(WARM_UP):
            await pipe.send(msg)
            await pipe.recv()
            await asyncio.sleep(gap)
        rtts, cpu = [], 0.0
        for _ in range(args.requests):
            c0, t0 = time.process_time(), time.perf_counter()
            await pipe.send(msg)
            await pipe.recv()
            rtts.append(time.perf_counter() - t0)
            await asyncio.sleep(gap)
            cpu += time.process_time() - c0
        rtts.sort()
        print(f"busy_poll_us {args.busy_poll_us:6.0f}: round trip p50 "
              f"{rtts[len(rtts) // 2] * 1e6:6.1f} µs, client CPU per request "
              f"{cpu / args.requests * 1e6:6.1f} µs")
        await end_echo(pipe, listener, child)
    finally:
        reap(child)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--busy-poll-us", type=float, default=200.0)
    parser.add_argument("--gap-ms", type=float, default=3.0, help="between requests")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--echo", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo is not None:
        uvloop.run(echo(args.echo, args.busy_poll_us))
    else:
        uvloop.run(client(args))


if __name__ == "__main__":
    main()
