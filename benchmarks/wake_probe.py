"""How fast can the event loop learn that a CUDA stream reached a point? (development probe)

For a tiny op (a 4 KiB copy) and a large one (a 256 MiB copy) on a side stream, the time from
the launch to the loop running the completion, and the CPU time spent, per way of waiting:

- spin: ``event.query()`` in a tight loop, the loop blocked (the floor);
- poll: ``event.query()`` on every loop iteration (``asyncio.sleep(0)``);
- thread-spin / thread-block: a worker thread in ``event.synchronize()`` (a spinning or a
  blocking-sync event), then ``loop.call_soon_threadsafe``;
- hostfunc: ``cudaLaunchHostFunc`` (CuPy's ``launch_host_func``) calling
  ``loop.call_soon_threadsafe`` from the driver's thread.

    python benchmarks/wake_probe.py
"""

from __future__ import annotations

import asyncio
import queue
import statistics
import threading
import time

import torch


def main() -> None:
    import cupy
    import uvloop

    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    stream = torch.cuda.Stream(dev)
    cstream = cupy.cuda.ExternalStream(stream.cuda_stream)
    bufs = {n: (torch.ones(n, dtype=torch.uint8, device=dev),
                torch.empty(n, dtype=torch.uint8, device=dev)) for n in (4096, 256 << 20)}

    async def run() -> None:
        loop = asyncio.get_running_loop()
        jobs: queue.SimpleQueue[tuple[torch.cuda.Event, asyncio.Future[None]] | None] = \
            queue.SimpleQueue()

        def waiter() -> None:
            while (item := jobs.get()) is not None:
                ev, fut = item
                ev.synchronize()
                loop.call_soon_threadsafe(fut.set_result, None)

        th = threading.Thread(target=waiter, daemon=True)
        th.start()

        async def once(way: str, n: int) -> float:
            src, dst = bufs[n]
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                dst.copy_(src)
            if way == "poll":
                ev = torch.cuda.Event()
                ev.record(stream)
                while not ev.query():
                    await asyncio.sleep(0)
            elif way == "spin":  # no loop iteration between the launch and the completion
                ev = torch.cuda.Event()
                ev.record(stream)
                while not ev.query():
                    pass
            elif way.startswith("thread"):
                ev = torch.cuda.Event(blocking=way == "thread-block")
                ev.record(stream)
                fut = loop.create_future()
                jobs.put((ev, fut))
                await fut
            else:
                fut = loop.create_future()
                cstream.launch_host_func(
                    lambda _: loop.call_soon_threadsafe(fut.set_result, None), None)
                await fut
            return time.perf_counter() - t0

        print(f"{'way':<14} {'size':>8} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/op':>10}")
        for n in bufs:
            base = []
            for _ in range(200):
                t0 = time.perf_counter()
                with torch.cuda.stream(stream):
                    bufs[n][1].copy_(bufs[n][0])
                stream.synchronize()
                base.append(time.perf_counter() - t0)
            base.sort()
            print(f"{'synchronize':<14} {n:>8} {base[100] * 1e6:>8.1f} {base[198] * 1e6:>8.1f}")
            for way in ("spin", "poll", "thread-spin", "thread-block", "hostfunc"):
                for _ in range(20):
                    await once(way, n)
                c0 = time.process_time()
                ts = sorted([await once(way, n) for _ in range(500)])
                cpu = (time.process_time() - c0) / 500
                print(f"{way:<14} {n:>8} {statistics.median(ts) * 1e6:>8.1f} "
                      f"{ts[494] * 1e6:>8.1f} {cpu * 1e6:>10.1f}", flush=True)
        jobs.put(None)

    uvloop.run(run())


if __name__ == "__main__":
    main()
