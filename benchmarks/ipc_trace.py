"""Where a message's time goes through ``transport="ipc"``: a timeline of one round trip.

Both processes (on cuda:0) record a timestamp (``time.perf_counter_ns``, CLOCK_MONOTONIC: one
clock for every process of the host) on entry to the pipe's and the ipc plane's steps; the
parent merges them per round and prints, for each step in order, the median offset from the
round's start and how many times it ran per round. For streams of large messages it prints
the median gap between steps of one message and how busy the copy stream was.

    python benchmarks/ipc_trace.py [--sizes 4K,16M,256M] [--rounds 500] [--blocks] [--reply none]

``IPC_TRACE_PLAIN=1``: plain timings without the wrappers; ``IPC_TRACE_PROFILE=DIR``: cProfile
of both ends, written to DIR.

A development probe (monkeypatching, not a test); ``python -m aiokvpipe bench`` is the
benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import aiokvpipe  # noqa: E402
from aiokvpipe import _control, _cuda, _cudaipc, _ipc_plane, _pipe  # noqa: E402

EVENTS: list[tuple[str, int]] = []
UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def _mark(name: str) -> None:
    EVENTS.append((name, time.perf_counter_ns()))


def _wrap(cls: Any, attr: str, name: str | None = None) -> None:
    fn = getattr(cls, attr)
    label = name or f"{cls.__name__}.{attr}"
    if asyncio.iscoroutinefunction(fn):
        async def awrapper(*a: Any, **k: Any) -> Any:
            _mark(label)
            try:
                return await fn(*a, **k)
            finally:
                _mark(label + ":end")
        setattr(cls, attr, awrapper)
    else:
        def wrapper(*a: Any, **k: Any) -> Any:
            _mark(label)
            return fn(*a, **k)
        setattr(cls, attr, wrapper)


def instrument() -> None:
    if os.environ.get("IPC_TRACE_PROFILE") or os.environ.get("IPC_TRACE_PLAIN"):
        return  # profiling or plain timing instead: no wrappers to distort it
    P = _ipc_plane.IpcPlane
    for attr in ("post_send", "post_send_noted", "_pump_send", "_job_ready", "_flush",
                 "_gate_fired", "_on_ack", "post_recv", "post_recv_noted", "_on_record",
                 "_pump_recv", "_enqueue", "_enqueue_deferred", "_allocate", "_enqueue_noted",
                 "release_copies", "_copied", "_after_copies"):
        _wrap(P, attr)
    for attr in ("send", "recv", "on_data", "_on_header", "_post_now", "_claim",
                 "_on_payload", "_deliver_arrived", "_flush_credit", "_signal_soon"):
        _wrap(_pipe.Pipe, attr)
    _wrap(_control.ControlChannel, "write_encoded")
    _wrap(_control.ControlChannel, "data_received")
    _wrap(P, "on_signal")
    _wrap(_pipe.Pipe, "_signal")
    _wrap(torch.cuda.Event, "query", "Event.query")
    _wrap(torch.cuda.Stream, "query", "Stream.query")
    _wrap(_ipc_plane, "_empty_like_specs", "empty")
    _wrap(_cudaipc, "copy_async", "copy_async")
    _wrap(_cuda.EventPoller, "watch")
    _wrap(_cuda.EventPoller, "_poll")


def kv_pool() -> aiokvpipe.BlockPool:
    """The bench's 8B-Llama pool: 32 layers of [2, 4096, 16, 8, 128] bf16."""
    return aiokvpipe.BlockPool([torch.zeros(2, 4096, 16, 8, 128, dtype=torch.bfloat16,
                                            device="cuda:0") for _ in range(32)], block_dim=1)


async def blocks_report(pipe: aiokvpipe.Pipe, n: int, per_layer: bool) -> None:
    pool = kv_pool()
    ids = torch.randperm(pool.num_blocks)[:256].tolist()
    torch.cuda.synchronize()
    await pipe.send(torch.tensor([3, n]), "cmd")
    t0 = time.perf_counter()
    for _ in range(n):
        if per_layer:
            for i in range(32):
                await pipe.send_blocks(pool, ids, layers=[i])
        else:
            await pipe.send_blocks(pool, ids)
    await pipe.recv("events")
    dt = time.perf_counter() - t0
    print(f"  blocks, {'32 calls' if per_layer else '1 call'}: {n} requests of 512 MiB: "
          f"{dt / n * 1e3:.2f} ms each, {n * 512 * 2**20 / dt / 1e9:.0f} GB/s", flush=True)


async def child(port: int) -> None:
    instrument()
    pipe = await aiokvpipe.connect("127.0.0.1", port, device="cuda:0", transport="ipc")
    while True:
        cmd = await pipe.recv("cmd")
        op, n = int(cmd[0]), int(cmd[1])
        if op == 0:
            break
        EVENTS.clear()
        if op == 1:
            for _ in range(n):
                await pipe.send(await pipe.recv())
        elif op == 4:  # the answer without payload, as the bench's lat1
            for _ in range(n):
                await pipe.recv()
                await pipe.send(None, "pong")
        elif op == 3:  # block transfers into a pool like the parent's
            pool = kv_pool()
            ids = torch.randperm(pool.num_blocks)[:256].tolist()
            for _ in range(n):
                await pipe.recv_blocks(pool, ids)
            await pipe.send(None, "events")
            continue
        else:
            for _ in range(n):
                await pipe.recv()
        await pipe.send(torch.tensor(bytearray(json.dumps(EVENTS).encode()),
                                     dtype=torch.uint8), "events")
    await pipe.aclose()


def ping_report(mine: list[tuple[str, int]], theirs: list[tuple[str, int]], skip: int) -> None:
    starts = [t for name, t in mine if name == "Pipe.send"]
    merged = sorted([("P " + n, t) for n, t in mine] + [("C " + n, t) for n, t in theirs],
                    key=lambda e: e[1])
    rounds: list[list[tuple[str, int]]] = [[] for _ in starts]
    r = -1
    for name, t in merged:
        while r + 1 < len(starts) and t >= starts[r + 1]:
            r += 1
        if r >= 0:
            rounds[r].append((name, t - starts[r]))
    rounds = rounds[skip:-1]
    offsets: dict[tuple[str, int], list[int]] = defaultdict(list)
    order: dict[tuple[str, int], list[int]] = defaultdict(list)
    for rnd in rounds:
        seen: dict[str, int] = defaultdict(int)
        for pos, (name, dt) in enumerate(rnd):
            k = (name, seen[name])
            seen[name] += 1
            offsets[k].append(dt)
            order[k].append(pos)
    n = len(rounds)
    rows = sorted(offsets, key=lambda k: statistics.median(offsets[k]))
    print(f"  {'step (P parent/sender, C child/echo)':<40} {'median µs':>10} {'in % rounds':>11}")
    for k in rows:
        if len(offsets[k]) < n * 0.2:
            continue
        print(f"  {k[0] + ('' if k[1] == 0 else f' #{k[1] + 1}'):<40} "
              f"{statistics.median(offsets[k]) / 1e3:>10.1f} {100 * len(offsets[k]) / n:>10.0f}%")
    rt = [starts[i + 1] - starts[i] for i in range(skip, len(starts) - 1)]
    print(f"  round trip p50 {statistics.median(rt) / 1e3:.1f} µs; one-way "
          f"{statistics.median(rt) / 2e3:.1f} µs; "
          f"Event.query per round P {_count(mine, 'Event.query') / len(starts):.1f} "
          f"C {_count(theirs, 'Event.query') / len(starts):.1f}")


def _count(events: list[tuple[str, int]], name: str) -> int:
    return sum(1 for n, _ in events if n == name)


def stream_report(size: int, n: int, dt: float, mine: list[tuple[str, int]],
                  theirs: list[tuple[str, int]]) -> None:
    def times(events: list[tuple[str, int]], name: str) -> list[int]:
        return [t for k, t in events if k == name]

    post = times(mine, "IpcPlane.post_send")
    header = times(theirs, "IpcPlane.post_recv")
    enq = times(theirs, "IpcPlane._enqueue")
    copied = times(theirs, "IpcPlane._copied")
    ended = times(mine, "Pipe.send:end")
    print(f"  {size >> 20} MiB × {n}: {size * n / dt / 1e9:.1f} GB/s; per message "
          f"{dt / n * 1e6:.1f} µs; counts post {len(post)} header {len(header)} copies "
          f"{len(enq)}/{len(copied)} sends ended {len(ended)}; Event.query P "
          f"{_count(mine, 'Event.query')} C {_count(theirs, 'Event.query')}")
    k = min(map(len, (post, header, enq, copied, ended)))

    def med(a: list[int], b: list[int], shift: int = 0) -> str:
        d = [b[i + shift] - a[i] for i in range(k - shift)]
        return f"{statistics.median(d) / 1e3:.1f}" if d else "-"

    print(f"  median µs per message i: post_send→post_recv(header) {med(post, header)}  "
          f"post_recv→enqueue {med(header, enq)}  enqueue→copied seen {med(enq, copied)}  "
          f"copied→send returns {med(copied, ended)}  send returns→post_send of i+1 "
          f"{med(ended, post, 1)}, of i+2 {med(ended, post, 2)}  copied(i)→enqueue(i+1) "
          f"{med(copied, enq, 1)}")


async def parent(args: argparse.Namespace) -> None:
    instrument()
    listener = await aiokvpipe.listen("127.0.0.1", 0, device="cuda:0", transport="ipc")
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(listener.port)])
    try:
        pipe = await asyncio.wait_for(listener.accept(), 60)
        dev = torch.device("cuda", 0)
        print(f"transport {pipe.transport}", flush=True)
        if args.blocks:
            await blocks_report(pipe, 50, False)
            await blocks_report(pipe, 20, True)
        for size in [parse_size(s) for s in args.sizes.split(",") if s]:
            x = torch.ones(size, dtype=torch.uint8, device=dev)
            torch.cuda.synchronize()
            if size <= 1 << 20:
                n = args.rounds
                lat1 = args.reply == "none"
                await pipe.send(torch.tensor([4 if lat1 else 1, n + 20], device=dev), "cmd")
                EVENTS.clear()
                rts = []
                for _ in range(n + 20):
                    t0 = time.perf_counter()
                    await pipe.send(x)
                    await pipe.recv("pong" if lat1 else None)
                    rts.append(time.perf_counter() - t0)
                mine = list(EVENTS)
                theirs = json.loads(bytes((await pipe.recv("events")).tolist()))
                rts = sorted(rts[20:])
                print(f"{size} B ping-pong: one-way p50 {rts[n // 2] / 2e-6:.1f} µs, "
                      f"p99 {rts[int(n * 0.99)] / 2e-6:.1f} µs")
                if mine:
                    ping_report(mine, theirs, 20)
            else:
                n = max(16, min(400, (16 << 30) // size))
                await pipe.send(torch.tensor([2, n], device=dev), "cmd")
                EVENTS.clear()
                t0 = time.perf_counter()
                await asyncio.gather(*(pipe.send(x) for _ in range(n)))
                theirs = json.loads(bytes((await pipe.recv("events")).tolist()))
                dt = time.perf_counter() - t0
                if EVENTS:
                    stream_report(size, n, dt, list(EVENTS), theirs)
                else:
                    print(f"  {size >> 20} MiB × {n}: {size * n / dt / 1e9:.1f} GB/s")
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
    ap.add_argument("--sizes", default="4K,16M,256M")
    ap.add_argument("--rounds", type=int, default=500)
    ap.add_argument("--blocks", action="store_true", help="also time block transfers")
    ap.add_argument("--reply", choices=("echo", "none"), default="echo",
                    help="small sizes: the child echoes the message, or answers without "
                         "payload (the bench's lat1)")
    ap.add_argument("--child", type=int)
    args = ap.parse_args()
    torch.cuda.set_device(0)
    try:
        import uvloop
        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:
        runner = asyncio.Runner()
    out = os.environ.get("IPC_TRACE_PROFILE")
    prof = cProfile.Profile() if out else None
    with runner:
        if prof is not None:
            prof.enable()
        if args.child:
            runner.run(child(args.child))
        else:
            runner.run(parent(args))
        if prof is not None:
            prof.disable()
            with open(f"{out}/profile-{'child' if args.child else 'parent'}.txt", "w") as f:
                pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(45)


if __name__ == "__main__":
    main()
