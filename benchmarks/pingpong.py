"""A 4 KiB ping-pong between two processes on 127.0.0.1: ours against uvloop streams (CPU).

The pinger sends a 4 KiB CPU tensor and waits for it back; the echo process sends back what
it receives. Prints the one-way p50 and p90 (round trip / 2) and the pinger's CPU time per
round trip. ``--pin CPU`` runs both processes on that one core: the round trip is then the
two processes' CPU time plus two context switches, free of the wake-up of an idle core,
which on a small VM varies by ±20 % from run to run; pinned, repeated runs agree within a
few per cent, so code versions compare (run each from its own checkout, alternated).

    python benchmarks/pingpong.py [ours|streams] [--rounds 8000] [--pin 1]

A development probe; ``python -m aiokvpipe bench`` is the benchmark (unpinned).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import struct
import subprocess
import sys
import time
from ctypes import string_at
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvloop  # noqa: E402

import aiokvpipe  # noqa: E402

_HEADER = struct.Struct("<BI")
WARM_UP = 1000


async def echo(impl: str, port: int) -> None:
    if impl == "streams":
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while True:
                header = await reader.readexactly(_HEADER.size)
                _, n = _HEADER.unpack(header)
                t = torch.frombuffer(bytearray(await reader.readexactly(n)), dtype=torch.uint8)
                writer.write(header)
                writer.write(string_at(t.data_ptr(), t.numel()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
    pipe = await aiokvpipe.connect("127.0.0.1", port)
    while (msg := await pipe.recv()) is not None:
        await pipe.send(msg)
    await pipe.aclose()


async def ping(impl: str, rounds: int) -> None:
    msg = torch.zeros(4096, dtype=torch.uint8)
    loop = asyncio.get_running_loop()
    if impl == "streams":
        accepted: asyncio.Future[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            loop.create_future())
        server = await asyncio.start_server(lambda r, w: accepted.set_result((r, w)),
                                            "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
    else:
        listener = await aiokvpipe.listen("127.0.0.1", 0)
        port = listener.port
    child = subprocess.Popen([sys.executable, __file__, impl, "--echo", str(port)])
    try:
        if impl == "streams":
            reader, writer = await asyncio.wait_for(accepted, 30)
            header = _HEADER.pack(1, msg.numel())

            async def round_trip() -> None:
                writer.write(header)
                writer.write(string_at(msg.data_ptr(), msg.numel()))
                await writer.drain()
                _, n = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                torch.frombuffer(bytearray(await reader.readexactly(n)), dtype=torch.uint8)
        else:
            pipe = await asyncio.wait_for(listener.accept(), 30)

            async def round_trip() -> None:
                await pipe.send(msg)
                await pipe.recv()

        for _ in range(WARM_UP):
            await round_trip()
        times = []
        cpu0 = time.process_time()
        for _ in range(rounds):
            t0 = time.perf_counter()
            await round_trip()
            times.append(time.perf_counter() - t0)
        cpu = time.process_time() - cpu0
        times.sort()
        print(f"{impl:8s} one-way p50 {times[rounds // 2] / 2 * 1e6:6.1f} µs  "
              f"p90 {times[rounds * 9 // 10] / 2 * 1e6:6.1f} µs  "
              f"pinger CPU {cpu / rounds * 1e6:6.1f} µs a round trip")
        if impl == "streams":
            writer.close()
            await writer.wait_closed()
            server.close()
            await asyncio.to_thread(child.wait, 10)
        else:
            await end_echo(pipe, listener, child)
    finally:
        reap(child)


async def end_echo(pipe: aiokvpipe.Pipe, listener: aiokvpipe.Listener,
                   child: subprocess.Popen[bytes]) -> None:
    """Tell the echo process to stop (a ``None`` message), close, and wait for it."""
    await pipe.send(None)
    await pipe.aclose()
    await listener.aclose()
    await asyncio.to_thread(child.wait, 10)


def reap(child: subprocess.Popen[bytes]) -> None:
    """Kill the echo process if it is still there."""
    if child.poll() is None:
        child.kill()
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("impl", choices=["ours", "streams"], nargs="?", default="ours")
    parser.add_argument("--rounds", type=int, default=8000)
    parser.add_argument("--pin", type=int, default=None, metavar="CPU",
                        help="run both processes on this one core")
    parser.add_argument("--echo", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo is not None:
        uvloop.run(echo(args.impl, args.echo))
        return
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})  # the echo process inherits it
    uvloop.run(ping(args.impl, args.rounds))


if __name__ == "__main__":
    main()
