"""What the ipc pipe's per-message steps cost on this GPU (development probe, one run):

1. CPU µs per call of the CUDA calls a message makes (allocation on a side stream, an async
   copy, event record and query, a stream query, the allocation id of a pointer);
2. a ping-pong of two processes on one GPU over a socket pair, each doing a 4 KiB copy and
   synchronising before it answers ("both"), or only one of them doing GPU work ("one"):
   what alternating GPU work between two processes' contexts costs.

    python benchmarks/ctx_probe.py
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402


def per_call() -> None:
    from aiokvpipe import _cudaipc

    dev = torch.device("cuda", 0)
    side = torch.cuda.Stream(dev)
    a = torch.ones(4096, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    ev = torch.cuda.Event()
    torch.cuda.synchronize()

    def alloc_side() -> None:
        prev = torch.cuda.current_stream(dev)
        torch.cuda.set_stream(side)
        t = torch.empty(4096, dtype=torch.uint8, device=dev)
        torch.cuda.set_stream(prev)
        t.record_stream(prev)

    def alloc_default() -> None:
        torch.empty(4096, dtype=torch.uint8, device=dev)

    def copy() -> None:
        _cudaipc.copy_async(b.data_ptr(), a.data_ptr(), 4096, side.cuda_stream)

    def record() -> None:
        ev.record(side)

    cases = {"torch.empty side stream + record_stream": alloc_side,
             "torch.empty default stream": alloc_default,
             "_cudaipc.copy_async 4 KiB": copy, "Event.record": record,
             "Event.query (done)": ev.query, "Stream.query": side.query,
             "torch.cuda.current_stream": lambda: torch.cuda.current_stream(dev),
             "torch.cuda.current_device": torch.cuda.current_device,
             "buffer_id_of": lambda: _cudaipc.buffer_id_of(a.data_ptr()),
             "torch.cuda.Event()": torch.cuda.Event}
    for name, fn in cases.items():
        for _ in range(100):
            fn()
        side.synchronize()
        n = 2000
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t0) / n
        side.synchronize()
        print(f"  {name:<42} {dt * 1e6:8.2f} µs/call", flush=True)


def pingpong(sock: socket.socket, gpu: bool, lead: bool, n: int) -> list[float]:
    dev = torch.device("cuda", 0)
    s = torch.cuda.Stream(dev)
    a = torch.ones(4096, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    torch.cuda.synchronize()
    rts = []

    def work() -> None:
        if gpu:
            with torch.cuda.stream(s):
                b.copy_(a)
            s.synchronize()

    for _ in range(n):
        if lead:
            t0 = time.perf_counter()
            work()
            sock.sendall(b"x")
            sock.recv(1)
            rts.append(time.perf_counter() - t0)
        else:
            sock.recv(1)
            work()
            sock.sendall(b"x")
    return rts


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--peer":
        fd, gpu = int(sys.argv[2]), sys.argv[3] == "1"
        sock = socket.socket(fileno=fd)
        torch.cuda.set_device(0)
        pingpong(sock, gpu, False, int(sys.argv[4]))
        return
    torch.cuda.set_device(0)
    print("CPU cost per call:")
    per_call()
    print("two processes on cuda:0, ping-pong over a socket pair, each step a 4 KiB copy + sync:")
    n = 3000
    for lead_gpu, peer_gpu, label in ((True, True, "both do GPU work (alternating contexts)"),
                                      (True, False, "only this process does GPU work"),
                                      (False, False, "no GPU work (socket only)")):
        mine, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, __file__, "--peer", str(theirs.fileno()),
                                 "1" if peer_gpu else "0", str(n)], pass_fds=[theirs.fileno()])
        theirs.close()
        rts = sorted(pingpong(mine, lead_gpu, True, n)[200:])
        proc.wait(timeout=60)
        mine.close()
        print(f"  {label:<44} round trip p50 {rts[len(rts) // 2] * 1e6:7.1f} µs  "
              f"p90 {rts[int(len(rts) * 0.9)] * 1e6:7.1f} µs", flush=True)


if __name__ == "__main__":
    main()
