"""Where a 4 KiB ping-pong's time goes inside the echoing process (CPU, no GPU needed).

Two processes on 127.0.0.1: a pinger sends a 4 KiB tensor and waits for it back, an echo
sends back what it receives. In the echo, a timestamp is taken on entry to the pipe's steps
(the read, the header's decoding, the delivery, the claim, the reply's send and its write);
it prints, per pair of consecutive steps, the median time between them. ``--streams`` does
the same for uvloop streams (the read, then the reply's write), the bench's baseline.

    python benchmarks/echo_path.py [--streams] [--rounds 5000]

A development probe (monkeypatching, not a test); ``python -m aiokvpipe bench`` is the
benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvloop  # noqa: E402

import aiokvpipe  # noqa: E402
from aiokvpipe import _control, _pipe  # noqa: E402

MARKS: list[tuple[str, int]] = []
WARM_UP = 200
_LEN = struct.Struct("<I")


def _marked(name: str, fn: object) -> object:
    def wrapper(*args: object, **kwargs: object) -> object:
        MARKS.append((name, time.perf_counter_ns()))
        return fn(*args, **kwargs)  # type: ignore[operator]
    return wrapper


def instrument() -> None:
    steps = {_control.ControlChannel: ("data_received", "write_encoded"),
             _pipe.Pipe: ("on_data", "_on_header", "_deliver", "_claim", "_check_can_send",
                          "_post")}
    for cls, names in steps.items():
        for name in names:
            setattr(cls, name, _marked(name, getattr(cls, name)))


def report() -> None:
    """Median time between each pair of consecutive steps, in the order they first came."""
    gaps: dict[tuple[str, str], list[int]] = {}
    for (a, ta), (b, tb) in zip(MARKS, MARKS[1:]):
        gaps.setdefault((a, b), []).append(tb - ta)
    for (a, b), v in gaps.items():
        if len(v) > 10 * WARM_UP:  # a step of every round, not of start-up or the end
            print(f"  {a:>16} -> {b:<16} p50 {statistics.median(v[WARM_UP:]) / 1e3:7.1f} µs",
                  flush=True)


async def echo_ours() -> None:
    instrument()
    listener = await aiokvpipe.listen("127.0.0.1", 0)
    print(listener.port, flush=True)
    pipe = await listener.accept()
    await listener.aclose()
    while (msg := await pipe.recv()) is not None:
        await pipe.send(msg)
    await pipe.aclose()
    report()


async def echo_streams() -> None:
    done = asyncio.get_running_loop().create_future()
    feed = asyncio.StreamReader.feed_data
    asyncio.StreamReader.feed_data = _marked("data_received", feed)  # type: ignore[method-assign]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (n := _LEN.unpack(await reader.readexactly(4))[0]):
            body = await reader.readexactly(n)
            MARKS.append(("write", time.perf_counter_ns()))
            writer.write(_LEN.pack(n) + body)
        writer.close()
        done.set_result(None)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await done
    server.close()
    report()


async def ping(port: int, rounds: int, streams: bool) -> None:
    rts = []
    if streams:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        frame = _LEN.pack(4096) + bytes(4096)
        for _ in range(rounds):
            t0 = time.perf_counter()
            writer.write(frame)
            await reader.readexactly(4 + 4096)
            rts.append(time.perf_counter() - t0)
        writer.write(_LEN.pack(0))
        await writer.drain()
        writer.close()
    else:
        x = torch.zeros(4096, dtype=torch.uint8)
        pipe = await aiokvpipe.connect("127.0.0.1", port, connect_timeout=30)
        for _ in range(rounds):
            t0 = time.perf_counter()
            await pipe.send(x)
            await pipe.recv()
            rts.append(time.perf_counter() - t0)
        await pipe.send(None)
        await pipe.aclose()
    rts = sorted(rts[WARM_UP:])
    print(f"{'uvloop streams' if streams else 'ours'}: one-way p50 "
          f"{rts[len(rts) // 2] / 2e-6:.1f} µs; in the echo, between its steps:", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", action="store_true", help="uvloop streams instead of ours")
    ap.add_argument("--rounds", type=int, default=5000)
    ap.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        uvloop.run(echo_streams() if args.streams else echo_ours())
        return
    cmd = [sys.executable, __file__, "--echo"] + (["--streams"] if args.streams else [])
    echo = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert echo.stdout is not None
        port = int(echo.stdout.readline())  # it listens
        uvloop.run(ping(port, args.rounds, args.streams))
        print(echo.communicate(timeout=60)[0], end="", flush=True)
    finally:
        if echo.poll() is None:
            echo.kill()
            echo.wait()


if __name__ == "__main__":
    main()
