"""Block transfers over ``transport="ipc"``, two processes on cuda:0: time per request.

The request is the bench's (BENCHMARKS.md, "Paged blocks"): 256 blocks at random ids of
8B-Llama-shaped pools (32 layers of ``[2, 4096, 16, 8, 128]`` bf16, 8 GiB per process), every
layer, 512 MiB; the same ids every request (plans come from the cache). Per case (requests in
flight, one ``send_blocks`` per request or one per layer) a warm-up round, then a timed one;
last, a contiguous copy of 512 MiB in this process, the figure to compare with. Both ends on
uvloop when it is installed.

    python benchmarks/blocks_probe.py [--requests 40] [--cases 1:0,4:0,1:1,4:1]

``--cases``: ``depth:per_layer`` pairs. ``BLOCKS_PROBE_PROFILE=1``: cProfile of both ends for
the first case. A development probe (not a test); ``python -m aiokvpipe bench --blocks`` is
the benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import aiokvpipe  # noqa: E402

PROFILE = bool(os.environ.get("BLOCKS_PROBE_PROFILE"))
REQUEST_BYTES = 512 << 20


def kv_pool() -> aiokvpipe.BlockPool:
    return aiokvpipe.BlockPool([torch.zeros(2, 4096, 16, 8, 128, dtype=torch.bfloat16,
                                            device="cuda:0") for _ in range(32)], block_dim=1)


def ids_for(seed: int, slot: int) -> list[int]:
    """Distinct ids per request slot (requests in flight never share blocks)."""
    perm = torch.randperm(4096, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[slot * 256:(slot + 1) * 256]


def dump(pr: cProfile.Profile, who: str) -> None:
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("cumtime").print_stats(30)
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(25)
    print(f"==== cProfile, {who}\n{out.getvalue()}", flush=True)


async def child(port: int) -> None:
    """The receiving end: takes each round's requests as the parent announces them."""
    pipe = await aiokvpipe.connect("127.0.0.1", port, device="cuda:0", transport="ipc")
    pool = kv_pool()
    torch.cuda.synchronize()
    pr = cProfile.Profile()
    while True:
        cmd = await pipe.recv("cmd")
        assert isinstance(cmd, torch.Tensor)
        n, depth, profile = (int(v) for v in cmd.tolist())
        if n == 0:
            break
        if profile:
            pr.enable()

        async def one(slot: int) -> None:
            ids = ids_for(2, slot)
            for r in range(slot, n, depth):
                await pipe.recv_blocks(pool, ids, key=f"r{r}")

        await asyncio.gather(*(one(s) for s in range(depth)))
        if profile:
            pr.disable()
            dump(pr, "receiver")
        await pipe.send(None, "done")
    await pipe.aclose()


async def parent(args: argparse.Namespace) -> None:
    listener = await aiokvpipe.listen("127.0.0.1", 0, device="cuda:0", transport="ipc")
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(listener.port)])
    rows = []
    try:
        pipe = await asyncio.wait_for(listener.accept(), 120)
        pool = kv_pool()
        torch.cuda.synchronize()
        cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",")]
        for index, (depth, per_layer) in enumerate(cases):
            n = args.requests if not per_layer else max(depth, args.requests // 2)
            for timed in (False, True):
                profile = PROFILE and timed and index == 0
                await pipe.send(torch.tensor([n, depth, int(profile)]), "cmd")
                pr = cProfile.Profile()
                if profile:
                    pr.enable()
                t0 = time.perf_counter()

                async def one(slot: int) -> None:
                    ids = ids_for(1, slot)
                    for r in range(slot, n, depth):
                        if per_layer:
                            await asyncio.gather(*(pipe.send_blocks(pool, ids, key=f"r{r}",
                                                                    layers=[i])
                                                   for i in range(32)))
                        else:
                            await pipe.send_blocks(pool, ids, key=f"r{r}")

                await asyncio.gather(*(one(s) for s in range(depth)))
                await pipe.recv("done")
                dt = time.perf_counter() - t0
                if profile:
                    pr.disable()
                    dump(pr, "sender")
            calls = "a call per layer" if per_layer else "one call"
            rows.append(f"{depth} in flight, {calls:<16}: {dt / n * 1e3:7.3f} ms a request, "
                        f"{n * REQUEST_BYTES / dt / 1e9:6.0f} GB/s")
        await pipe.send(torch.tensor([0, 0, 0]), "cmd")
        await pipe.aclose()
    finally:
        await listener.aclose()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    a = torch.empty(REQUEST_BYTES, dtype=torch.uint8, device="cuda:0")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(20):
        b.copy_(a)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / 20
    print(f"{torch.cuda.get_device_name(0)}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    for row in rows:
        print("  " + row)
    print(f"  baseline, a contiguous copy of 512 MiB in one process: {dt * 1e3:.3f} ms, "
          f"{REQUEST_BYTES / dt / 1e9:.0f} GB/s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--cases", default="1:0,4:0,1:1,4:1")
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    main_coro = child(args.child) if args.child is not None else parent(args)
    try:  # the figures in BENCHMARKS.md are uvloop's, as the bench's
        import uvloop
    except ImportError:
        asyncio.run(main_coro)
    else:
        uvloop.run(main_coro)


if __name__ == "__main__":
    main()
