"""Benchmark of the ipc plane against the raw CUDA IPC copy, two processes on one GPU.

    python tests/ipc_probe_bench.py [--sizes 4K,1M,16M,256M,1G] [--json FILE]

In one run: (1) the baseline, the consumer copying out of the producer's buffer mapped once
through CUDA IPC (``cudaMemcpyAsync`` on its stream, then synchronize), one byte of socket
signalling each way per message; (2) the plane, ``post_send`` in the producer against
receives posted ahead in the consumer, once mapping the allocator's segments and once through
the staging ring. Per size: GB/s of one message at a time (ready → copied → acknowledged,
the baseline's own semantics), GB/s with 4 in flight, and the one-way p50 (send called in
the producer → data final in the consumer; CLOCK_MONOTONIC is shared by the processes).
A benchmark, not a test; the parent is the producer, a child it spawns the consumer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ipc_link import plane_on_socket  # noqa: E402

from aiokvpipe import _cudaipc  # noqa: E402
from aiokvpipe._ipc_plane import IpcPlane  # noqa: E402
from aiokvpipe._wire import TensorSpec  # noqa: E402

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
MODES = ("segments", "ring")
DEPTH = 4


def parse_size(text: str) -> int:
    return int(text[:-1]) * UNITS[text[-1]] if text[-1] in UNITS else int(text)


def iterations(size: int) -> int:
    return 2000 if size <= 64 << 10 else 400 if size <= 1 << 20 else 100 if size <= 64 << 20 \
        else 30


class Line:
    """JSON lines over a socket, blocking or from asyncio."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, obj: Any) -> None:
        self.sock.setblocking(True)
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def recv(self) -> Any:
        self.sock.setblocking(True)
        while b"\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def arecv(self) -> Any:
        loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        while b"\n" not in self.buf:
            chunk = await loop.sock_recv(self.sock, 1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    async def asend(self, obj: Any) -> None:
        self.sock.setblocking(False)
        await asyncio.get_running_loop().sock_sendall(self.sock, json.dumps(obj).encode() + b"\n")


# -- baseline ------------------------------------------------------------------------------------


def raw_producer(ctl: Line, size: int, n: int, variant: str = "") -> dict[str, float]:
    src = torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    info = _cudaipc.allocation_of(src.data_ptr())
    handle = _cudaipc.export_memory(info.base)
    ctl.send({"raw": size, "handle": handle.hex(), "offset": src.data_ptr() - info.base,
              "n": n, "variant": variant})
    ev = torch.cuda.Event()
    assert ctl.recv() == "opened"
    sock = ctl.sock
    rts, goes = [], []
    for _ in range(n + 1):
        t0 = time.perf_counter()
        if variant == "producer-event":  # one tiny GPU op in the producer's context
            ev.record()
        sock.sendall(b"g")
        assert sock.recv(1) == b"d"
        rts.append(time.perf_counter() - t0)
        goes.append(t0)
    done = ctl.recv()["done"]
    one_way = [d - g for d, g in zip(done[1:], goes[1:])]
    rt = statistics.median(rts[1:])
    return {"gbps": size / rt / 1e9, "rt_p50_us": rt * 1e6,
            "one_way_p50_us": statistics.median(one_way) * 1e6}


def raw_consumer(ctl: Line, msg: dict[str, Any]) -> None:
    size, n = msg["raw"], msg["n"]
    base = _cudaipc.open_memory(bytes.fromhex(msg["handle"]), 0)
    dst = torch.empty(size, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    ctl.send("opened")
    sock = ctl.sock
    done = []
    for _ in range(n + 1):
        assert sock.recv(1) == b"g"
        _cudaipc.copy_async(dst.data_ptr(), base + msg["offset"], size, stream.cuda_stream)
        if msg.get("variant") == "consumer-poll":  # an event polled, as the plane does
            ev = torch.cuda.Event()
            ev.record(stream)
            while not ev.query():
                pass
        else:
            stream.synchronize()
        done.append(time.perf_counter())
        sock.sendall(b"d")
    ctl.send({"done": done})
    _cudaipc.close_memory(base)


# -- the plane -----------------------------------------------------------------------------------


def lost(exc: BaseException) -> None:
    raise SystemExit(f"plane lost: {exc!r}")


async def plane_producer(ctl: Line, plane: IpcPlane, size: int, n: int) -> dict[str, float]:
    srcs = [torch.randint(0, 255, (size,), dtype=torch.uint8, device="cuda")
            for _ in range(DEPTH)]
    torch.cuda.synchronize()
    seq = n + 1
    await ctl.asend({"plane": size, "total": seq + DEPTH - 1 + n})
    assert await ctl.arecv() == "posting"
    goes, rts, resumed = [], [], []
    TRACE.clear()
    for _ in range(seq):  # one at a time; the first maps the buffer
        t0 = time.perf_counter()
        await plane.post_send([srcs[0]])
        t1 = time.perf_counter()
        rts.append(t1 - t0)
        goes.append(t0)
        resumed.append(t1)
    ours = {k: list(v) for k, v in TRACE.items()}
    for s in srcs[1:]:  # map the other buffers before timing
        await plane.post_send([s])
    t0 = time.perf_counter()
    pending: list[asyncio.Future[None]] = []
    for i in range(n):
        pending.append(plane.post_send([srcs[i % DEPTH]]))
        if len(pending) >= DEPTH:
            await pending.pop(0)
    for f in pending:
        await f
    piped = (time.perf_counter() - t0) / n
    reply = await ctl.arecv()
    done = reply["done"]
    one_way = [d - g for d, g in zip(done[1:seq], goes[1:])]
    rt = statistics.median(rts[1:])
    if size <= 1 << 20 or size == 16 << 20:
        theirs = reply["trace"]
        chain = [("post", goes), ("record out", ours.get("rec_out", [])),
                 ("record in", theirs.get("rec_in", [])),
                 ("copy enqueued", theirs.get("enqueued", [])),
                 ("copy seen done", theirs.get("copied", [])),
                 ("ack out", theirs.get("ack_out", [])), ("ack in", ours.get("ack_in", [])),
                 ("send resumed", resumed)]
        stages = {f"{a}→{b}": [y - x for x, y in zip(xs, ys)]
                  for (a, xs), (b, ys) in zip(chain, chain[1:])}
        stages["copy seen done→recv resumed"] = [d - c for d, c in
                                                 zip(done, theirs.get("copied", []))]
        for name, vals in stages.items():
            if len(vals) > 2:
                print(f"      {name:30} p50 {statistics.median(vals[1:seq]) * 1e6:8.1f} µs")
    return {"gbps": size / rt / 1e9, "rt_p50_us": rt * 1e6,
            "one_way_p50_us": statistics.median(one_way) * 1e6,
            "pipelined_gbps": size / piped / 1e9}


TRACE: dict[str, list[float]] = {}


def trace_plane(plane: IpcPlane) -> None:
    """Timestamps of each stage of a message's path in this process (monkeypatched)."""
    def wrap(name: str, fn: Any, after: bool = False) -> Any:
        def wrapped(*a: Any, **k: Any) -> Any:
            if not after:
                TRACE.setdefault(name, []).append(time.perf_counter())
            r = fn(*a, **k)
            if after:
                TRACE.setdefault(name, []).append(time.perf_counter())
            return r
        return wrapped
    plane._enqueue = wrap("enqueued", plane._enqueue, after=True)  # type: ignore[method-assign]
    plane._copied = wrap("copied", plane._copied)  # type: ignore[method-assign]
    plane._after_copies = wrap("ack_out", plane._after_copies)  # type: ignore[method-assign]
    # Records leave through the attached writer; what arrives is seen as decoded.
    plane._signal = wrap("rec_out", plane._signal, after=True)
    plane._on_ack = wrap("ack_in", plane._on_ack)  # type: ignore[method-assign]
    plane._on_record = wrap("rec_in", plane._on_record)  # type: ignore[method-assign]


async def plane_consumer(ctl: Line, plane: IpcPlane, msg: dict[str, Any]) -> None:
    size, total = msg["plane"], msg["total"]
    TRACE.clear()
    spec = TensorSpec(14, (size,), 1)
    done: list[float] = []
    await ctl.asend("posting")
    # Receives posted ahead, as the pipe posts one when the header arrives.
    ahead = [plane.post_recv([spec]) for _ in range(min(2, total))]
    posted = len(ahead)
    while ahead:
        await ahead.pop(0)
        done.append(time.perf_counter())
        if posted < total:
            ahead.append(plane.post_recv([spec]))
            posted += 1
    await ctl.asend({"done": done, "trace": TRACE})


def micro() -> dict[str, float]:
    """µs per call of the CUDA steps a message's path may take (this process, idle GPU)."""
    x = torch.empty(1 << 20, device="cuda")
    stream = torch.cuda.current_stream()
    out: dict[str, float] = {}

    def timed(name: str, fn: Any, n: int = 2000) -> None:
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        out[name] = (time.perf_counter() - t0) / n * 1e6

    ipc_event = torch.cuda.Event(interprocess=True)
    plain = torch.cuda.Event()
    timed("interprocess event record+query", lambda: (ipc_event.record(), ipc_event.query()))
    timed("plain event record+query", lambda: (plain.record(), plain.query()))
    timed("stream query", stream.query)
    timed("cuPointerGetAttributes", lambda: _cudaipc.allocation_of(x.data_ptr()))
    timed("cuPointerGetAttribute (buffer id)", lambda: _cudaipc.buffer_id_of(x.data_ptr()))
    dev = torch.device("cuda", 0)
    timed("torch.cuda.current_stream(dev)", lambda: torch.cuda.current_stream(dev))
    timed("torch.cuda.current_device()", torch.cuda.current_device)

    def enter_device() -> None:
        with torch.cuda.device(dev):
            pass

    timed("with torch.cuda.device(dev)", enter_device)
    side = torch.cuda.Stream()

    def ctx_alloc() -> None:
        with torch.cuda.device(dev), torch.cuda.stream(side):
            torch.empty(1024, device=dev)

    def manual_alloc() -> None:
        prev = torch.cuda.current_stream(dev)
        torch.cuda.set_stream(side)
        torch.empty(1024, device=dev)
        torch.cuda.set_stream(prev)

    timed("alloc in device+stream contexts", ctx_alloc)
    timed("alloc with set_stream by hand", manual_alloc)
    timed("torch.empty(4 KiB)", lambda: torch.empty(1024, device=dev))
    y = torch.empty(1 << 20, device="cuda")
    timed("copy_async 4 KiB", lambda: _cudaipc.copy_async(y.data_ptr(), x.data_ptr(), 4096,
                                                          side.cuda_stream))
    timed("plain event record(side)+query", lambda: (plain.record(side), plain.query()))
    info = _cudaipc.allocation_of(x.data_ptr())
    timed("cudaIpcGetMemHandle", lambda: _cudaipc.export_memory(info.base), 200)
    torch.cuda.synchronize()
    return out


# -- driver --------------------------------------------------------------------------------------


async def run_planes(role: str, ctl: Line, socks: list[socket.socket], sizes: list[int],
                     results: dict[str, Any]) -> None:
    """``socks``: this end's signalling socket for each mode in turn."""
    for m, mode in enumerate(MODES):
        plane, link = await plane_on_socket(socks[m], torch.device("cuda", 0), lost,
                                            mode=mode)
        trace_plane(plane)
        for size in sizes:
            if role == "producer":
                results[mode][size] = r = await plane_producer(ctl, plane, size,
                                                               iterations(size))
                print(f"  {mode:8} {size:>11} B  {r['gbps']:8.1f} GB/s  pipelined "
                      f"{r['pipelined_gbps']:8.1f}  one-way p50 {r['one_way_p50_us']:7.1f} µs",
                      flush=True)
            else:
                await plane_consumer(ctl, plane, await ctl.arecv())
        plane.close()
        link.abort()
        await plane.released


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4K,1M,16M,256M,1G")
    ap.add_argument("--json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    torch.cuda.set_device(0)
    try:
        import uvloop
        new_loop = uvloop.new_event_loop
    except ImportError:
        new_loop = asyncio.new_event_loop
    if args.child:
        fds = [int(x) for x in args.child.split(",")]
        ctl = Line(socket.socket(fileno=fds[0]))
        socks = [socket.socket(fileno=fd) for fd in fds[1:]]
        for _ in range(len(sizes) + 2):
            raw_consumer(ctl, ctl.recv())
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(run_planes("consumer", ctl, socks, sizes, {}))
        return
    ctl_a, ctl_b = socket.socketpair()
    ours: list[socket.socket] = []
    theirs: list[socket.socket] = []
    for _ in MODES:
        mine, other = socket.socketpair()
        ours.append(mine)
        theirs.append(other)
    child_arg = ",".join(str(s.fileno()) for s in [ctl_b, *theirs])
    child = subprocess.Popen([sys.executable, __file__, "--sizes", args.sizes,
                              "--child", child_arg],
                             pass_fds=[s.fileno() for s in [ctl_b, *theirs]])
    for s in [ctl_b, *theirs]:
        s.close()
    ctl = Line(ctl_a)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0),
                               "date": time.strftime("%Y-%m-%d"), "raw": {},
                               **{m: {} for m in MODES}}
    print(f"{results['device']}, {results['date']}: two processes on cuda:0", flush=True)
    results["micro_us"] = micro()
    for name, us in results["micro_us"].items():
        print(f"  {name:34} {us:8.2f} µs", flush=True)
    try:
        for variant in ("producer-event", "consumer-poll"):
            r = raw_producer(ctl, 4096, 500, variant)
            print(f"  raw 4 KiB, {variant:15} one-way p50 {r['one_way_p50_us']:7.1f} µs  "
                  f"rt p50 {r['rt_p50_us']:7.1f} µs", flush=True)
            results[f"raw-{variant}"] = r
        for size in sizes:
            r = raw_producer(ctl, size, iterations(size))
            results["raw"][size] = r
            print(f"  raw      {size:>11} B  {r['gbps']:8.1f} GB/s  one-way p50 "
                  f"{r['one_way_p50_us']:7.1f} µs  rt p50 {r['rt_p50_us']:7.1f} µs", flush=True)
        with asyncio.Runner(loop_factory=new_loop) as runner:
            runner.run(run_planes("producer", ctl, ours, sizes, results))
    finally:
        try:
            child.wait(timeout=120)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    print("\n| size | raw IPC copy GB/s | segments GB/s (×) | ring GB/s (×) | segments 4-deep GB/s"
          " | one-way p50 raw / segments / ring µs |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        raw, seg, ring = results["raw"][size], results["segments"][size], results["ring"][size]
        print(f"| {size} | {raw['gbps']:.1f} | {seg['gbps']:.1f} ({seg['gbps'] / raw['gbps']:.2f})"
              f" | {ring['gbps']:.1f} ({ring['gbps'] / raw['gbps']:.2f}) | "
              f"{seg['pipelined_gbps']:.1f} | {raw['one_way_p50_us']:.1f} / "
              f"{seg['one_way_p50_us']:.1f} / {ring['one_way_p50_us']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
