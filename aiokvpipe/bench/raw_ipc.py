"""The one-host baseline's measured side: the consumer copies out of the producer's buffer
mapped through CUDA IPC (BENCHMARKS.md, "GPU, one host"), two processes on one GPU.

The producer (the sender) exports its buffer once (``cudaIpcGetMemHandle``), the consumer maps
it once and, per message, on one byte of socket signalling, runs ``cudaMemcpyAsync`` device to
device on its stream, synchronises and answers one byte: ready → copied → done, one message at
a time. Throughput is the bytes over the sender's clock; latency figures are half these round
trips, as ours. Blocking code (there is no event loop in it to block); the receiver listens on
127.0.0.1 and emits its port.

Also here: :func:`pipe_memory_case`, what one pipe of a given transport costs in GPU memory.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import time
from typing import Any, Final

import torch

from .common import (
    MAX_SAMPLES,
    MIN_LAT_SAMPLES,
    Emit,
    Json,
    MiB,
    latency_figures,
    recv_exactly,
)

MAX_RAW_MSGS: Final = 200_000
_HELLO = struct.Struct(f"<QQ{64}s")  # capacity, offset, handle


def _count(seconds: float, per_msg: float, floor: int, cap: int) -> int:
    return max(floor, min(cap, int(seconds / max(per_msg, 1e-7))))


def _sender(sock: socket.socket, device: torch.device, case: Json) -> list[Json]:
    from .. import _cudaipc

    cap = int(case["max_nbytes"])
    buf = torch.zeros(cap, dtype=torch.uint8, device=device)
    torch.cuda.synchronize(device)
    info = _cudaipc.allocation_of(buf.data_ptr())
    sock.sendall(_HELLO.pack(cap, buf.data_ptr() - info.base,
                             _cudaipc.export_memory(info.base)))
    recv_exactly(sock, 1)  # mapped

    def one() -> None:
        sock.sendall(b"g")
        recv_exactly(sock, 1)

    out = []
    for phase in case["phases"]:
        n, seconds = int(phase["nbytes"]), float(phase["seconds"])
        sock.sendall(struct.pack("<Q", n))
        warm = 2 if n >= 64 * MiB else 20
        t0 = time.perf_counter()
        for _ in range(warm):
            one()
        per = (time.perf_counter() - t0) / warm
        lat = phase["kind"] == "lat"
        count = _count(seconds, per, MIN_LAT_SAMPLES if lat else 1,
                       MAX_SAMPLES if lat else MAX_RAW_MSGS)
        rtts = []
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            t1 = time.perf_counter()
            one()
            rtts.append(time.perf_counter() - t1)
        elapsed = time.perf_counter() - t0
        sock.sendall(b"e")
        if lat:
            out.append(latency_figures(rtts))
        else:
            out.append({"msgs": count, "bytes": count * n, "elapsed_s": elapsed,
                        "gbps": count * n / elapsed / 1e9, "cpu_s": time.process_time() - cpu0})
    sock.sendall(struct.pack("<Q", 0))
    return out


def _receiver(sock: socket.socket, device: torch.device, case: Json) -> list[Json]:
    from .. import _cudaipc

    cap, offset, handle = _HELLO.unpack(recv_exactly(sock, _HELLO.size))
    base = _cudaipc.open_memory(handle, device.index or 0)
    out: list[Json] = []
    try:
        dst = torch.empty(cap, dtype=torch.uint8, device=device)
        stream = torch.cuda.Stream(device)
        sock.sendall(b"m")
        while (n := struct.unpack("<Q", recv_exactly(sock, 8))[0]):
            cpu0, msgs = time.process_time(), 0
            while (cmd := recv_exactly(sock, 1)) == b"g":
                _cudaipc.copy_async(dst.data_ptr(), base + offset, n, stream.cuda_stream)
                stream.synchronize()
                sock.sendall(b"d")
                msgs += 1
            assert cmd == b"e"
            out.append({"msgs": msgs, "cpu_s": time.process_time() - cpu0})
        torch.cuda.synchronize(device)
    finally:
        _cudaipc.close_memory(base)
    return out


def raw_ipc_case(role: str, device: str, case: Json, emit: Emit) -> list[Json]:
    """Run a raw-IPC case on this side; the receiver listens and emits its port."""
    dev = torch.device(device)
    if role == "receiver":
        with socket.create_server(("127.0.0.1", 0)) as server:
            emit({"type": "rendezvous", "value": server.getsockname()[1]})
            server.settimeout(60)
            sock, _ = server.accept()
    else:
        sock = socket.create_connection(("127.0.0.1", int(case["rendezvous"])), timeout=60)
    with sock:
        sock.settimeout(300)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return (_sender if role == "sender" else _receiver)(sock, dev, case)


# -- GPU memory of one pipe ---------------------------------------------------------------------


def _memory(device: torch.device) -> Json:
    torch.cuda.synchronize(device)
    free, total = torch.cuda.mem_get_info(device)
    return {"allocated": torch.cuda.memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device), "device_used": total - free}


async def _open_and_use(role: str, device: torch.device, case: Json, emit: Emit) -> Json:
    import aiokvpipe

    transport = case["transport"]
    before = _memory(device)
    if role == "receiver":
        listener = await aiokvpipe.listen("127.0.0.1", 0, device=device, transport=transport)
        emit({"type": "rendezvous", "value": listener.port})
        try:
            pipe = await asyncio.wait_for(listener.accept(), 120)
        finally:
            await listener.aclose()
    else:
        pipe = await aiokvpipe.connect("127.0.0.1", int(case["rendezvous"]), device=device,
                                       transport=transport, connect_timeout=120.0)
    try:
        # One message each way, so buffers made on first use count too.
        x = torch.ones(MiB, dtype=torch.uint8, device=device)
        if role == "sender":
            await pipe.send(x)
            await pipe.recv()
        else:
            await pipe.send(await pipe.recv())
        del x
        after = _memory(device)
    finally:
        await pipe.aclose()
    return {"transport": pipe.transport,
            **{f"{k}_delta": after[k] - before[k] for k in before}}


def pipe_memory_case(role: str, device: str, case: Json, emit: Emit) -> list[Json]:
    """GPU memory this end holds for one open pipe of ``case["transport"]`` (and the device's
    used memory, both processes together): after one message each way, minus before. For
    ``nccl`` between two processes of one GPU, NCCL is told they are two hosts, as
    ``--one-gpu`` does, and our handshake that they are two GPUs."""
    from .. import _connect

    dev = torch.device(device)
    saved: dict[str, Any] = {}
    env_before = os.environ.get("NCCL_HOSTID")
    if case["transport"] == "nccl":
        os.environ["NCCL_HOSTID"] = f"aiokvpipe-bench-mem-{role}"
        fake = ("aa" if role == "sender" else "bb") * 16

        async def fake_uuid(_device: object) -> bytes:
            return bytes.fromhex(fake)

        saved = {name: getattr(_connect, name) for name in ("device_uuid", "host_id")}
        setattr(_connect, "device_uuid", fake_uuid)
        setattr(_connect, "host_id", lambda: bytes.fromhex(fake))
    try:
        result = asyncio.run(_open_and_use(role, dev, case, emit))
    finally:
        for name, fn in saved.items():
            setattr(_connect, name, fn)
        if case["transport"] == "nccl":
            if env_before is None:
                os.environ.pop("NCCL_HOSTID", None)
            else:
                os.environ["NCCL_HOSTID"] = env_before
    return [{**result, "gbps": 0.0, "bytes": 0, "cpu_s": 0.0}]
