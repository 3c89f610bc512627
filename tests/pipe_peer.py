"""The far end of the pipe integration tests: a real peer process, plus helpers both ends share.

Run as a script, it opens one pipe and plays one role::

    python pipe_peer.py '{"role": "connect", "port": 4321, "mode": "stream", ...}'

and reports what happens as JSON lines on stdout (``{"event": "connected"}``, ...); the test
reads them to synchronise. It exits by itself when the test process goes away (stdin closes),
so a crashed test run leaves no orphan behind. Imported (``import pipe_peer``), it provides
the deterministic message plans, payload builders and checkers used on both sides.

Config keys:
    role       "connect" (to host:port) | "listen" (port 0, reports {"event": "listening",
               "port": N}) | "rank0" | "rank1" (aiokvpipe.open_pipe on host:port)
    host, port where to connect / open_pipe
    opts       keyword options for listen/connect/open_pipe
    mode       "stream" | "flood" | "idle" | "echo" | "slow_recv" (see the ``_mode_*`` functions)
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import struct
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

# -- deterministic message plans (shared with the tests) -------------------------------------

#: Keys a random stream uses: unkeyed, plain, unicode, and the empty string (a key of its own).
STREAM_KEYS: tuple[str | None, ...] = (None, "alpha", "beta", "γάμμα", "")
STREAM_DTYPES: tuple[str, ...] = ("uint8", "float32", "bfloat16", "int64", "float16")
DICT_NAMES: tuple[str, ...] = ("k", "v", "ключ", "", "layer.0.attn", "x" * 40)

#: First bytes of every non-empty tensor of a planned message: magic, tensor index, message
#: sequence number, sequence number within its key, CRC32 of the remaining bytes, size.
META = struct.Struct("<4sIqqII")
META_MAGIC = b"AKVT"
assert META.size == 32

_POOL_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Planned:
    """One message of a random stream, as both ends compute it from the seed."""

    seq: int
    key: str | None
    key_seq: int
    structure: str  # "none" | "tensor" | "list" | "dict"
    names: tuple[str, ...]
    specs: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype name, shape) per tensor

    @property
    def nbytes(self) -> int:
        total = 0
        for dname, shape in self.specs:
            n = getattr(torch, dname).itemsize
            for d in shape:
                n *= d
            total += n
        return total


#: Sizes of "large" messages: above 64 KiB, where a pipe may switch from carrying the payload
#: with its header to its data plane (aiokvpipe inlines payloads up to 64 KiB).
LARGE_TENSOR_BYTES = (70_000, 200_000)


def plan_stream(seed: int, count: int, max_message_bytes: int = 64 * 1024,
                large_fraction: float = 0.1) -> list[Planned]:
    """``count`` messages with random keys, structures, dtypes and sizes, the same on every
    call with the same seed: 0 to ``max_message_bytes`` per message, except ``large_fraction``
    of the tensor-carrying ones whose every tensor has LARGE_TENSOR_BYTES."""
    rng = random.Random(seed)
    key_seq: dict[str | None, int] = {}
    plans = []
    for seq in range(count):
        key = rng.choice(STREAM_KEYS)
        ks = key_seq.get(key, 0)
        key_seq[key] = ks + 1
        structure = rng.choices(("none", "tensor", "list", "dict"), (15, 35, 25, 25))[0]
        n = {"none": 0, "tensor": 1}.get(structure, rng.randint(0, 4))
        names = tuple(rng.sample(DICT_NAMES, n)) if structure == "dict" else ("",) * n
        specs = []
        large = rng.random() < large_fraction
        for _ in range(n):
            dname = rng.choice(STREAM_DTYPES)
            itemsize = getattr(torch, dname).itemsize
            if rng.random() < 0.05:
                shape: tuple[int, ...] = rng.choice([(0,), (0, 7), (3, 0)])
            else:
                nbytes = (rng.randint(*LARGE_TENSOR_BYTES) if large else
                          rng.randint(META.size, max(META.size, max_message_bytes // n)))
                elems = nbytes // itemsize
                shape = (4, elems // 4) if elems % 4 == 0 and rng.random() < 0.3 else (elems,)
            specs.append((dname, shape))
        plans.append(Planned(seq, key, ks, structure, names, tuple(specs)))
    return plans


def random_pool(seed: int) -> bytes:
    return random.Random(seed).randbytes(2 * _POOL_BYTES)


def build_message(p: Planned, pool: bytes, rng: random.Random) -> Any:
    """The message ``p`` describes, each tensor stamped with META and checksummed."""
    tensors = []
    for index, (dname, shape) in enumerate(p.specs):
        dtype = getattr(torch, dname)
        numel = 1
        for d in shape:
            numel *= d
        n = numel * dtype.itemsize
        if n == 0:
            tensors.append(torch.empty(shape, dtype=dtype))
            continue
        buf = bytearray(n)
        off = rng.randrange(0, _POOL_BYTES)
        buf[META.size:] = pool[off:off + n - META.size]
        crc = zlib.crc32(memoryview(buf)[META.size:])
        buf[:META.size] = META.pack(META_MAGIC, index, p.seq, p.key_seq, crc, n)
        tensors.append(torch.frombuffer(buf, dtype=torch.uint8).view(dtype).reshape(shape))
    if p.structure == "none":
        return None
    if p.structure == "tensor":
        return tensors[0]
    if p.structure == "list":
        return tensors
    return dict(zip(p.names, tensors))


def check_message(p: Planned, msg: Any) -> None:
    """Raise AssertionError unless ``msg`` is exactly the message ``p`` describes, intact."""
    where = f"message #{p.seq} (key {p.key!r} #{p.key_seq}, {p.structure})"
    if p.structure == "none":
        assert msg is None, f"{where}: got {type(msg).__name__}, expected None"
        return
    if p.structure == "tensor":
        assert isinstance(msg, torch.Tensor), f"{where}: got {type(msg).__name__}"
        tensors = [msg]
    elif p.structure == "list":
        assert isinstance(msg, list), f"{where}: got {type(msg).__name__}"
        tensors = msg
    else:
        assert isinstance(msg, dict), f"{where}: got {type(msg).__name__}"
        assert tuple(msg) == p.names, f"{where}: dict keys {tuple(msg)} != {p.names}"
        tensors = list(msg.values())
    assert len(tensors) == len(p.specs), f"{where}: {len(tensors)} tensors, not {len(p.specs)}"
    for index, (t, (dname, shape)) in enumerate(zip(tensors, p.specs)):
        assert t.dtype == getattr(torch, dname), f"{where} tensor {index}: dtype {t.dtype}"
        assert tuple(t.shape) == shape, f"{where} tensor {index}: shape {tuple(t.shape)}"
        if t.numel() == 0:
            continue
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy()
        magic, idx, seq, key_seq, crc, n = META.unpack(raw[:META.size].tobytes())
        assert (magic, idx, seq, key_seq, n) == (META_MAGIC, index, p.seq, p.key_seq, raw.size), (
            f"{where} tensor {index}: carries the stamp of message #{seq} (key #{key_seq}, "
            f"tensor {idx}, magic {magic!r}, {n} bytes)")
        assert zlib.crc32(raw[META.size:]) == crc, f"{where} tensor {index}: payload corrupted"


_pattern = torch.empty(0, dtype=torch.uint8)


def _pattern_at(seq: int, nbytes: int) -> torch.Tensor:
    """Bytes (i + 31 * seq) % 251 for i in range(nbytes): a view of one cached pattern."""
    global _pattern
    if _pattern.numel() < nbytes + 251:
        _pattern = torch.arange(2 * nbytes + 251, dtype=torch.int64).remainder_(251).to(
            torch.uint8)
    start = (31 * seq) % 251
    return _pattern[start:start + nbytes]


def seq_tensor(seq: int, nbytes: int) -> torch.Tensor:
    """``nbytes`` (>= 8) bytes: ``seq`` as int64, then a pattern that depends on ``seq``."""
    assert nbytes >= 8
    t = _pattern_at(seq, nbytes).clone()
    t[:8] = torch.tensor([seq], dtype=torch.int64).view(torch.uint8)
    return t


def read_seq(t: torch.Tensor) -> int:
    """The ``seq`` a :func:`seq_tensor` carries; AssertionError if its bytes are damaged."""
    assert t.dtype == torch.uint8 and t.dim() == 1 and t.numel() >= 8, (t.dtype, t.shape)
    seq = int(t[:8].view(torch.int64).item())
    expected = _pattern_at(seq, t.numel())
    assert torch.equal(t[8:], expected[8:]), f"payload of message #{seq} is corrupted"
    return seq


def vm_rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS line")


# -- the peer process -------------------------------------------------------------------------


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def _exit_when_parent_goes() -> None:
    # The test keeps our stdin open; EOF means it is gone, and so must we be.
    # (os.read, not sys.stdin: a daemon thread must hold no buffered-IO lock at shutdown.)
    while os.read(0, 4096):
        pass
    os._exit(3)


async def _open(cfg: dict[str, Any]) -> Any:
    import aiokvpipe

    role, opts = cfg["role"], cfg.get("opts", {})
    host = cfg.get("host", "127.0.0.1")
    if role == "connect":
        return await aiokvpipe.connect(host, cfg["port"], **opts)
    if role == "listen":
        listener = await aiokvpipe.listen(host, 0, **opts)
        emit("listening", port=listener.port)
        try:
            return await listener.accept()
        finally:
            await listener.aclose()
    if role in ("rank0", "rank1"):
        return await aiokvpipe.open_pipe(host, cfg["port"], rank=int(role[-1]), **opts)
    raise ValueError(f"unknown role {role!r}")


async def _mode_stream(pipe: Any, cfg: dict[str, Any]) -> None:
    """Send the plan of (seed, count) from ``senders`` concurrent tasks, then close; with
    ``ack``, first wait for a message under key "ack" (the receiver has everything)."""
    plans = plan_stream(cfg["seed"], cfg["count"])
    pool = random_pool(cfg["seed"])
    it = iter(plans)
    started = time.monotonic()

    async def sender(i: int) -> None:
        rng = random.Random(i)
        for p in it:
            # Nothing awaits between taking a plan and calling send(): call order = plan order.
            await pipe.send(build_message(p, pool, rng), key=p.key)

    await asyncio.gather(*(sender(i) for i in range(cfg.get("senders", 4))))
    emit("sent", sent=len(plans), elapsed=time.monotonic() - started)
    if cfg.get("ack"):
        await pipe.recv(key="ack")
    await pipe.aclose()
    emit("done")


async def _mode_flood(pipe: Any, cfg: dict[str, Any]) -> None:
    """Send ``size``-byte messages under key "flood" until killed."""
    msg = torch.full((cfg["size"],), 7, dtype=torch.uint8)
    await pipe.send(msg, key="flood")
    emit("flooding")
    while True:
        await pipe.send(msg, key="flood")


async def _mode_idle(pipe: Any, cfg: dict[str, Any]) -> None:
    """Wait in recv(); report how it ends."""
    import aiokvpipe

    try:
        msg = await pipe.recv()
    except aiokvpipe.PipeError as exc:
        emit("recv_error", type=type(exc).__name__, cause=type(exc.__cause__).__name__)
    else:
        emit("received", type=type(msg).__name__)


async def _mode_echo(pipe: Any, cfg: dict[str, Any]) -> None:
    """Send every unkeyed message back, until the test closes the pipe."""
    import aiokvpipe

    n = 0
    while True:
        try:
            msg = await pipe.recv()
        except aiokvpipe.PipeClosed:
            break
        await pipe.send(msg)
        n += 1
    await pipe.aclose()
    emit("done", echoed=n)


async def _mode_slow_recv(pipe: Any, cfg: dict[str, Any]) -> None:
    """Receive ``count`` seq_tensor messages, sleeping ``sleep_s`` before each recv (a slow
    consumer); report claim times (time.monotonic) and the largest recv_buffered_bytes seen."""
    count, sleep_s = cfg["count"], cfg["sleep_s"]
    max_buffered = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal max_buffered
        while not stop.is_set():
            max_buffered = max(max_buffered, pipe.stats.recv_buffered_bytes)
            await asyncio.sleep(0.001)

    sampler = asyncio.create_task(sample())
    claimed, bad = [], []
    for i in range(count):
        await asyncio.sleep(sleep_s)  # the slow consumer
        max_buffered = max(max_buffered, pipe.stats.recv_buffered_bytes)
        msg = await pipe.recv()
        claimed.append(time.monotonic())
        max_buffered = max(max_buffered, pipe.stats.recv_buffered_bytes)
        try:
            if read_seq(msg) != i:
                bad.append(i)
        except AssertionError:
            bad.append(i)
        del msg
    stop.set()
    await sampler
    emit("report", claimed=claimed, bad=bad, max_buffered=max_buffered)
    await pipe.aclose()
    emit("done")


MODES = {
    "stream": _mode_stream,
    "flood": _mode_flood,
    "idle": _mode_idle,
    "echo": _mode_echo,
    "slow_recv": _mode_slow_recv,
}


async def _main(cfg: dict[str, Any]) -> None:
    pipe = await _open(cfg)
    emit("connected", transport=pipe.transport)
    await MODES[cfg["mode"]](pipe, cfg)


def main(argv: Sequence[str]) -> int:
    cfg = json.loads(argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s peer %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_exit_when_parent_goes, daemon=True).start()
    try:
        asyncio.run(_main(cfg))
    except BaseException as exc:
        emit("error", type=type(exc).__name__, message=str(exc))
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
