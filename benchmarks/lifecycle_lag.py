"""Event-loop lag while pipes connect, move 256 MiB messages and close (issue 10, hole 4).

Two processes: this one listens, a child connects, for each transport asked for. Each runs a
1 ms ticker and reports the p99 of how late it woke, over the whole life of several pipes:
handshake (CuPy import, CUDA and NCCL set-up, IPC probes), 256 MiB CUDA messages each way,
and the graceful close (NCCL teardown). Target: p99 <= 2 ms on both ends.

    python benchmarks/lifecycle_lag.py --transports tcp,ipc,nccl --pipes 3 --json out.json

On one GPU both ends use cuda:0; nccl then needs NCCL told they are two hosts, as the suite
does (NCCL_HOSTID, and fake device UUIDs and host ids for our handshake).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback
from typing import Any

import torch

import aiokvpipe

MESSAGE_BYTES = 256 << 20
MESSAGES = 4


#: (time.perf_counter(), what starts then): the ticker's worst stalls are told with the step
#: they happened in, so that a failing figure says where to look.
MARKS: list[tuple[float, str]] = []
STALLS: list[tuple[float, float]] = []  # (when the tick began, how late it came)


def mark(what: str) -> None:
    MARKS.append((time.perf_counter(), what))


class StallSampler(threading.Thread):
    """Watches the ticker from a thread: when it is 2 ms overdue, takes the main thread's
    stack once, so that each stall is told with the code that held the loop."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.last_tick = time.perf_counter()
        self.stacks: dict[float, str] = {}  # tick it followed → where the main thread was
        self._main = threading.main_thread().ident
        self._stop = threading.Event()

    def run(self) -> None:
        sys.setswitchinterval(0.0002)  # let this thread in while the main one runs Python
        while not self._stop.wait(0.0005):
            last = self.last_tick
            if time.perf_counter() - last > 0.002 and last not in self.stacks:
                frame = sys._current_frames().get(self._main)
                self.stacks[last] = _where(frame)

    def stop(self) -> None:
        self._stop.set()


def _where(frame: Any) -> str:
    """The innermost frames of ours (aiokvpipe) and the one they called, shortly."""
    if frame is None:
        return "?"
    summary = traceback.extract_stack(frame)
    ours = [i for i, f in enumerate(summary) if "aiokvpipe" in f.filename
            and "benchmarks" not in f.filename]
    picked = summary[ours[-1]:][:3] if ours else summary[-3:]
    return " > ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in picked)


SAMPLER = StallSampler()


async def ticker(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        t, began = loop.time(), time.perf_counter()
        SAMPLER.last_tick = began
        await asyncio.sleep(0.001)
        lag = max(0.0, loop.time() - t - 0.001)
        lags.append(lag)
        if lag > 0.002:
            STALLS.append((began, lag))


def worst_stalls(n: int = 5) -> list[str]:
    """The ``n`` longest stalls, each with the step that was running when the tick was due
    (what kept the loop from it started then or before)."""
    out = []
    for began, lag in sorted(STALLS, key=lambda s: -s[1])[:n]:
        due = began + 0.001
        step = next((w for t, w in reversed(MARKS) if t <= due), "start")
        where = SAMPLER.stacks.get(began)
        out.append(f"{lag * 1e3:.1f} ms in {step!r}" + (f" at {where}" if where else ""))
    return out


def p99(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=100)[98] * 1e3 if len(xs) > 100 else float("nan")


def disguise(tag: str) -> None:
    """Make two processes on one GPU look like two hosts to NCCL and our handshake."""
    from aiokvpipe import _connect

    os.environ["NCCL_HOSTID"] = f"aiokvpipe-bench-{tag}"
    fake = (tag.encode() * 16)[:16]

    async def fake_uuid(_device: object) -> bytes:
        return fake

    _connect.device_uuid = fake_uuid  # type: ignore[assignment]
    _connect.host_id = lambda: fake  # type: ignore[assignment]


def message(device: str) -> torch.Tensor:
    """The sender's message, made before the ticker starts: allocating and filling 256 MiB
    on the loop is the bench's own stall, not the pipe's (on the CPU it took 0.2–0.5 s)."""
    t = torch.ones(MESSAGE_BYTES // 4, device=device)
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return t


async def one_pipe(pipe: aiokvpipe.Pipe, t: torch.Tensor | None) -> None:
    """``t``: send it and wait for its echo, MESSAGES times; ``None``: echo what comes."""
    sender = t is not None
    for i in range(MESSAGES):
        if sender:
            mark(f"send #{i}")
            await pipe.send(t)
            mark(f"recv #{i}")
            await pipe.recv()
        else:
            mark(f"recv #{i}")
            got = await pipe.recv()
            mark(f"send #{i}")
            await pipe.send(got)
    mark("close")
    await pipe.aclose()
    mark("closed")


async def child(port: int, transport: str, pipes: int, device: str) -> None:
    if transport == "nccl" and torch.cuda.device_count() < 2:
        disguise("peer")
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, stop))
    for _ in range(pipes):
        mark("connect")
        pipe = await aiokvpipe.connect("127.0.0.1", port, device=device, transport=transport)
        await one_pipe(pipe, None)
    stop.set()
    await tick
    print(json.dumps({"p99_ms": p99(lags), "ticks": len(lags), "worst": worst_stalls(8)}),
          flush=True)


async def parent(transport: str, pipes: int, device: str) -> dict[str, Any]:
    if transport == "nccl" and torch.cuda.device_count() < 2:
        disguise("here")
    MARKS.clear()
    STALLS.clear()
    t = message(device)
    lags: list[float] = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(lags, stop))
    mark("listen")
    listener = await aiokvpipe.listen("127.0.0.1", 0, device=device, transport=transport)
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(listener.port),
                             "--transports", transport, "--pipes", str(pipes),
                             "--device", device], stdout=subprocess.PIPE, text=True)
    t0 = time.perf_counter()
    try:
        for _ in range(pipes):
            mark("accept")
            pipe = await asyncio.wait_for(listener.accept(), 120)
            kind = pipe.transport
            await one_pipe(pipe, t)
        await listener.aclose()
        stop.set()
        await tick
        out, _ = await asyncio.to_thread(proc.communicate, timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    theirs = json.loads(out.strip().splitlines()[-1])
    return {"transport": kind, "pipes": pipes, "seconds": round(time.perf_counter() - t0, 2),
            "listener_p99_ms": round(p99(lags), 3), "connector_p99_ms":
            round(theirs["p99_ms"], 3), "target_ms": 2.0,
            "listener_ticks": len(lags), "connector_ticks": theirs["ticks"],
            "listener_worst": worst_stalls(8), "connector_worst": theirs["worst"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # nccl last: its one-GPU disguise (two hosts) stays in this process and would rule ipc out
    ap.add_argument("--transports", default="tcp,ipc,nccl")
    ap.add_argument("--pipes", type=int, default=3)
    ap.add_argument("--json")
    ap.add_argument("--device", default="cuda:0", help="cpu: check the probe itself (tcp)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    SAMPLER.start()
    if args.child is not None:
        asyncio.run(child(args.child, args.transports, args.pipes, args.device))
        return
    rows = [asyncio.run(parent(t, args.pipes, args.device)) for t in args.transports.split(",")]
    print(f"{'transport':10} {'pipes':>5} {'s':>6} {'listener p99 ms':>16} "
          f"{'connector p99 ms':>17}  target ≤ 2 ms")
    for r in rows:
        ok = max(r["listener_p99_ms"], r["connector_p99_ms"]) <= r["target_ms"]
        print(f"{r['transport']:10} {r['pipes']:>5} {r['seconds']:>6} "
              f"{r['listener_p99_ms']:>16} {r['connector_p99_ms']:>17}  "
              f"{'PASS' if ok else 'FAIL'}")
    for r in rows:  # where the worst stalls of each end happened
        for end in ("listener", "connector"):
            print(f"{r['transport']} {end}, {r[end + '_ticks']} ticks; worst stalls:")
            for line in r[end + "_worst"]:
                print(f"    {line}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu",
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
