"""Pipe-level latency and throughput of ``transport="ipc"`` between two processes on cuda:0
(a probe for development, not a test; ``python -m aiokvpipe bench`` is the benchmark).

    python tests/ipc_pipe_ping.py [--transport ipc] [--sizes 4K,16M,256M]

The parent listens and sends; the child connects and echoes small messages (round trip / 2
is the one-way latency) or receives streams of large ones.
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

import aiokvpipe  # noqa: E402

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


async def child(port: int, transport: str) -> None:
    pipe = await aiokvpipe.connect("127.0.0.1", port, device="cuda:0", transport=transport)
    while True:
        cmd = await pipe.recv("cmd")
        op, n = int(cmd[0]), int(cmd[1])
        if op == 0:
            break
        if op == 1:  # echo n messages
            for _ in range(n):
                await pipe.send(await pipe.recv())
        else:  # receive n messages
            for _ in range(n):
                await pipe.recv()
            await pipe.send(torch.zeros(1, device="cuda:0"), "done")
    await pipe.aclose()


async def parent(args: argparse.Namespace) -> None:
    listener = await aiokvpipe.listen("127.0.0.1", 0, device="cuda:0",
                                      transport=args.transport)
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(listener.port),
                             "--transport", args.transport])
    try:
        pipe = await asyncio.wait_for(listener.accept(), 60)
        print(f"transport {pipe.transport}", flush=True)
        dev = torch.device("cuda", 0)
        for size in [parse_size(s) for s in args.sizes.split(",")]:
            x = torch.ones(size, dtype=torch.uint8, device=dev)
            torch.cuda.synchronize()
            if size <= 1 << 20:
                n = 2000
                await pipe.send(torch.tensor([1, n + 20], device=dev), "cmd")
                rts = []
                for _ in range(n + 20):
                    t0 = time.perf_counter()
                    await pipe.send(x)
                    await pipe.recv()
                    rts.append(time.perf_counter() - t0)
                rts = sorted(rts[20:])
                print(f"  {size:>11} B  one-way p50 {rts[n // 2] / 2 * 1e6:7.1f} µs  "
                      f"p99 {rts[int(n * 0.99)] / 2 * 1e6:7.1f} µs", flush=True)
            else:
                n = max(8, min(200, (8 << 30) // size))
                await pipe.send(torch.tensor([2, n], device=dev), "cmd")
                t0 = time.perf_counter()
                sends = [asyncio.ensure_future(pipe.send(x)) for _ in range(n)]
                await asyncio.gather(*sends)
                await pipe.recv("done")
                dt = time.perf_counter() - t0
                await pipe.send(torch.tensor([2, 1], device=dev), "cmd")
                t1 = time.perf_counter()
                await pipe.send(x)
                await pipe.recv("done")
                one = time.perf_counter() - t1
                print(f"  {size:>11} B  streamed {size * n / dt / 1e9:8.1f} GB/s  one message "
                      f"{size / one / 1e9:8.1f} GB/s", flush=True)
        await pipe.send(torch.tensor([0, 0], device=dev), "cmd")
        await pipe.aclose()
    finally:
        await listener.aclose()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--transport", default="ipc")
    ap.add_argument("--sizes", default="4K,1M,16M,256M")
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    torch.cuda.set_device(0)
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    with runner:
        if args.child:
            runner.run(child(args.child, args.transport))
        else:
            runner.run(parent(args))


if __name__ == "__main__":
    main()
