"""A real aiokvpipe peer process for the fault suite: streams, closes, echoes, dies on cue.

    python fault_peer.py '{"role": "connect", "port": 4321, "mode": "send_stream", ...}'

Reports JSON lines on stdout (each with ``t``, its ``time.monotonic()``: the same clock as the
test's event loop, so the test can time events across processes). Exits when stdin closes
(the test is gone) or after ``watchdog_s``.

Config: ``role`` "connect" | "listen" (port 0 on ``host``; reports "listening"), ``host``,
``port``, ``opts`` (listen/connect keywords), ``mode``:

send_stream   send checksummed messages of ``min_bytes``..``max_bytes`` under key "s" until
              killed; reports "streaming" after the first
recv_stream   receive and check messages under key "s" until killed; "receiving" after the first
close_after   send ``count`` messages, report "closing", start ``aclose()``, and SIGKILL itself
              ``kill_delay_s`` later (reporting "killing" first); if the close finishes before
              that, it reports "closed", waits ``linger_s`` (default 0) and kills itself
close_many    (connect role) ``rounds`` times: open a pipe, send ``count`` messages, ``aclose()``
              and report "closed"; the process stays alive
echo          soak peer: one receive loop per key in ``keys``, each checks every message and
              sends it back under the same key; random ``recv()`` cancellations; at the end a
              "report" with counts, violations and RSS samples
partition     receive (listen role) or send (connect role) until the pipe breaks, or with
              ``idle`` only wait in ``recv()``; report "broken" with the exception, its cause,
              and when
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
import time
import zlib
from typing import Any

import torch

import aiokvpipe

MiB = 1 << 20


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# -- checksummed messages (shared with the tests) ---------------------------------------------

_POOL: torch.Tensor | None = None


def pool(nbytes: int = 48 * MiB) -> torch.Tensor:
    """Random bytes that message payloads are views of (no per-message generation cost)."""
    global _POOL
    if _POOL is None or _POOL.numel() < nbytes:
        g = torch.Generator().manual_seed(1234)
        _POOL = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=g)
    return _POOL


DTYPES = (torch.uint8, torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.int32)


def crc_of(t: torch.Tensor) -> int:
    if t.numel() == 0:
        return 0
    return zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def make_message(rng: random.Random, ident: tuple[int, int, int], nbytes: int) -> Any:
    """A dict or list: an int64 ``id`` tensor (ident, crc, sizes) then 1-3 data tensors of
    random dtypes and shapes totalling about ``nbytes``, viewing the shared pool."""
    p = pool()
    parts = rng.randint(1, 3)
    tensors = []
    for i in range(parts):
        dtype = rng.choice(DTYPES)
        share = nbytes // parts
        numel = share // dtype.itemsize
        off = rng.randrange(0, p.numel() - numel * dtype.itemsize - 16) & ~15
        t = p[off:off + numel * dtype.itemsize].view(dtype)
        if numel and numel % 4 == 0 and rng.random() < 0.4:
            t = t.reshape(4, numel // 4)
            if rng.random() < 0.3:
                t = t.t()  # non-contiguous: the pipe must send what it reads as
        tensors.append(t)
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy(), crc) \
            if t.numel() else crc
    sizes = sum(t.numel() * t.element_size() for t in tensors)
    head = torch.tensor([*ident, crc, sizes, len(tensors)], dtype=torch.int64)
    if rng.random() < 0.5:
        return {"id": head, **{f"x{i}": t for i, t in enumerate(tensors)}}
    return [head, *tensors]


def check_message(msg: Any) -> tuple[int, int, int]:
    """The ident of an intact message; ValueError if it is damaged."""
    if isinstance(msg, dict):
        tensors = list(msg.values())
        if next(iter(msg)) != "id" or list(msg)[1:] != [f"x{i}" for i in range(len(msg) - 1)]:
            raise ValueError(f"dict keys {list(msg)}")
    elif isinstance(msg, list):
        tensors = msg
    else:
        raise ValueError(f"a {type(msg).__name__}, not a message")
    head, data = tensors[0], tensors[1:]
    if head.dtype != torch.int64 or head.shape != (6,):
        raise ValueError(f"id tensor {head.dtype} {tuple(head.shape)}")
    a, b, c, crc, sizes, n = (int(x) for x in head)
    if n != len(data):
        raise ValueError(f"{len(data)} data tensors, {n} announced")
    got = 0
    for t in data:
        got = zlib.crc32(t.contiguous().reshape(-1).view(torch.uint8).numpy(), got) \
            if t.numel() else got
    if got != crc or sum(t.numel() * t.element_size() for t in data) != sizes:
        raise ValueError(f"message {(a, b, c)} corrupted")
    return a, b, c


# -- modes ------------------------------------------------------------------------------------


async def _open(cfg: dict[str, Any]) -> aiokvpipe.Pipe:
    opts = cfg.get("opts", {})
    host = cfg.get("host", "127.0.0.1")
    if cfg["role"] == "connect":
        pipe = await aiokvpipe.connect(host, cfg["port"], **opts)
    else:
        listener = await aiokvpipe.listen(host, 0, **opts)
        emit("listening", port=listener.port)
        try:
            pipe = await listener.accept()
        finally:
            await listener.aclose()
    emit("connected")
    return pipe


async def send_stream(pipe: aiokvpipe.Pipe, cfg: dict[str, Any]) -> None:
    rng = random.Random(cfg.get("seed", 0))
    lo, hi = cfg.get("min_bytes", MiB), cfg.get("max_bytes", 16 * MiB)
    seq = 0
    while True:
        await pipe.send(make_message(rng, (0, seq, 0), rng.randint(lo, hi)), key="s")
        if seq == 0:
            emit("streaming")
        seq += 1


async def recv_stream(pipe: aiokvpipe.Pipe, cfg: dict[str, Any]) -> None:
    seq = 0
    while True:
        ident = check_message(await pipe.recv(key="s"))
        if ident[1] != seq:
            emit("error", error=f"message {ident} where #{seq} was due")
            return
        if seq == 0:
            emit("receiving")
        seq += 1


async def close_after(pipe: aiokvpipe.Pipe, cfg: dict[str, Any]) -> None:
    rng = random.Random(cfg.get("seed", 0))
    for seq in range(cfg["count"]):
        await pipe.send(make_message(rng, (0, seq, 0), rng.randint(0, cfg.get("max_bytes", MiB))),
                        key="s")
    emit("closing")
    closing = asyncio.ensure_future(pipe.aclose())
    delay = cfg["kill_delay_s"]
    if delay > 0:
        await asyncio.wait({closing}, timeout=delay)
    else:
        await asyncio.sleep(0)
    if closing.done():
        emit("closed", error=repr(closing.exception()) if closing.exception() else None)
        await asyncio.sleep(cfg.get("linger_s", 0))  # the process outlives its closed pipe
    emit("killing")
    os.kill(os.getpid(), signal.SIGKILL)


async def close_many(cfg: dict[str, Any]) -> None:
    """``rounds`` times: connect, send ``count`` messages, ``aclose()``; the process lives on,
    so nothing but the library decides what the receiver gets."""
    rng = random.Random(cfg.get("seed", 0))
    for r in range(cfg["rounds"]):
        pipe = await aiokvpipe.connect(cfg.get("host", "127.0.0.1"), cfg["port"],
                                       **cfg.get("opts", {}))
        for seq in range(cfg["count"]):
            await pipe.send(make_message(rng, (r, seq, 0),
                                         rng.randint(0, cfg.get("max_bytes", MiB))), key="s")
        await pipe.aclose()
        emit("closed", round=r)
    emit("done")
    await asyncio.Event().wait()


async def echo(pipe: aiokvpipe.Pipe, cfg: dict[str, Any]) -> None:
    """Check and echo every message; per (key, sender task) the sequence numbers must rise."""
    rng = random.Random(cfg.get("seed", 0) + 1)
    keys: list[str | None] = cfg["keys"]
    received = echoed = cancelled_recvs = 0
    violations: list[str] = []
    last: dict[tuple[str | None, int], int] = {}
    rss: list[tuple[float, int]] = []
    t0 = time.monotonic()

    async def sample_rss() -> None:
        while True:
            rss.append((round(time.monotonic() - t0, 2), rss_bytes()))
            await asyncio.sleep(1.0)

    async def loop_for(key: str | None) -> None:
        nonlocal received, echoed, cancelled_recvs
        while True:
            try:
                if rng.random() < cfg.get("cancel_recv_p", 0.2):
                    async with asyncio.timeout(rng.uniform(0, 0.01)):
                        msg = await pipe.recv(key=key)
                else:
                    msg = await pipe.recv(key=key)
            except TimeoutError:
                cancelled_recvs += 1
                continue
            except aiokvpipe.PipeClosed:
                return
            received += 1
            try:
                task, seq, kidx = check_message(msg)
            except ValueError as exc:
                violations.append(f"corrupted on key {key!r}: {exc}")
                continue
            if keys[kidx] != key:
                violations.append(f"message for key {keys[kidx]!r} received on {key!r}")
            prev = last.get((key, task), -1)
            if seq <= prev:
                violations.append(f"key {key!r} task {task}: #{seq} after #{prev}")
            last[(key, task)] = seq
            try:
                await pipe.send(msg, key=key)
            except aiokvpipe.PipeClosed:
                return
            echoed += 1

    sampler = asyncio.ensure_future(sample_rss())
    emit("echoing")
    await asyncio.gather(*(loop_for(k) for k in keys))
    sampler.cancel()
    rss.append((round(time.monotonic() - t0, 2), rss_bytes()))
    await pipe.aclose()
    emit("report", received=received, echoed=echoed, cancelled_recvs=cancelled_recvs,
         violations=violations[:50], n_violations=len(violations), rss=rss)


async def partition(pipe: aiokvpipe.Pipe, cfg: dict[str, Any]) -> None:
    rng = random.Random(0)
    count = 0
    try:
        if cfg.get("idle"):  # both ends only wait: heartbeats are all that crosses the link
            await pipe.recv(key="s")
        elif cfg["role"] == "listen":
            while True:
                check_message(await pipe.recv(key="s"))
                count += 1
                if count % cfg.get("report_every", 20) == 0:
                    emit("progress", received=count)
        else:
            while True:
                await pipe.send(make_message(rng, (0, count, 0), cfg.get("nbytes", 256 * 1024)),
                                key="s")
                count += 1
                await asyncio.sleep(cfg.get("interval_s", 0.01))
    except aiokvpipe.PipeError as exc:
        emit("broken", error=repr(exc), error_type=type(exc).__name__,
             cause=repr(exc.__cause__), cause_type=type(exc.__cause__).__name__, count=count)
    await asyncio.Event().wait()  # stay until the test kills us (or stdin closes)


MODES = {"send_stream": send_stream, "recv_stream": recv_stream, "close_after": close_after,
         "echo": echo, "partition": partition}


async def run(cfg: dict[str, Any]) -> None:
    loop = asyncio.get_running_loop()
    # The test keeps our stdin open: EOF means it is gone, and so must we be.
    loop.add_reader(0, lambda: os.read(0, 4096) or os._exit(3))
    if cfg["mode"] == "close_many":
        await close_many(cfg)
        return
    pipe = await _open(cfg)
    await MODES[cfg["mode"]](pipe, cfg)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    signal.alarm(int(cfg.get("watchdog_s", 120)))
    os.set_blocking(0, False)
    if cfg.get("loop") == "uvloop":
        import uvloop

        runner = uvloop.run
    else:
        runner = asyncio.run
    try:
        runner(run(cfg))
    except Exception as exc:
        emit("error", error=repr(exc))
        raise


if __name__ == "__main__":
    main()
