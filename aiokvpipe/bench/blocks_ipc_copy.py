"""The block case's ipc baseline: a contiguous copy through CUDA IPC, two processes.

As BENCHMARKS.md defines the ipc baseline ("GPU, one host"): the consumer (the receiving
process) copies out of the producer's buffer, mapped once through CUDA IPC
(``cudaIpcGetMemHandle``/``cudaIpcOpenMemHandle``), with one ``cudaMemcpyAsync`` device to
device on its own stream, then synchronises; one byte of socket signalling each way per
message (producer: "copy", consumer: "copied"). Both buffers are plain ``cudaMalloc``
allocations of the phase's size, so it is the same bytes as the block case's request, moved as
one contiguous copy.

Plain blocking code, like :mod:`.raw_nccl` (no event loop to block). The consumer listens on
127.0.0.1 and announces the port as its rendezvous; the producer connects and sends its
buffer's handle. The sender's clock runs from the first "copy" to the last "copied". CuPy is
imported lazily (through ``aiokvpipe._cudaipc``): importing this module works without CUDA.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Final

import torch

from .._cudaipc import IPC_HANDLE_BYTES
from .common import Emit, Json, recv_exactly

_COPY, _COPIED, _END, _ENDED, _BYE = b"c", b"d", b"e", b"f", b"x"
_HELLO: Final = struct.Struct("<Q")  # the buffer's size, after the IPC handle


def _expect(sock: socket.socket, byte: bytes) -> None:
    got = recv_exactly(sock, 1)
    if got != byte:
        raise RuntimeError(f"expected {byte!r} from the other process, got {got!r}")


def _producer_phase(sock: socket.socket, phase: Json) -> Json:
    def copy_once() -> None:
        sock.sendall(_COPY)
        _expect(sock, _COPIED)

    n, warm_end = 0, time.perf_counter() + float(phase["warmup_s"])
    while n < int(phase["warmup_msgs"]) or time.perf_counter() < warm_end:
        copy_once()
        n += 1
    cpu0, t0 = time.process_time(), time.perf_counter()
    deadline, msgs = t0 + float(phase["seconds"]), 0
    while msgs < 1 or time.perf_counter() < deadline:
        copy_once()
        msgs += 1
    elapsed = time.perf_counter() - t0
    sock.sendall(_END)
    _expect(sock, _ENDED)
    nbytes = msgs * int(phase["nbytes"])
    return {"msgs": msgs, "bytes": nbytes, "elapsed_s": elapsed, "gbps": nbytes / elapsed / 1e9,
            "cpu_s": time.process_time() - cpu0}


def _consumer_phase(sock: socket.socket, dst: int, src: int, nbytes: int, stream: object
                    ) -> Json:
    from .. import _cudaipc

    copies, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while (what := recv_exactly(sock, 1)) != _END:
        if what != _COPY:
            raise RuntimeError(f"unexpected {what!r} from the producer")
        _cudaipc.copy_async(dst, src, nbytes, stream.ptr)  # type: ignore[attr-defined]
        stream.synchronize()  # type: ignore[attr-defined]
        sock.sendall(_COPIED)
        copies += 1
    sock.sendall(_ENDED)
    # Warm-up and timed copies both land here: the figures that count are the sender's.
    return {"msgs": copies, "elapsed_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0}


def ipc_copy_case(role: str, device: str, case: Json, emit: Emit) -> list[Json]:
    """Run an IPC-copy case on this side (the receiver is the consumer: it listens, emits
    its port, maps the producer's buffer and copies out of it); raises on any failure."""
    import cupy as cp

    from .. import _cudaipc

    index = torch.device(device).index or 0
    nbytes = int(case["max_nbytes"])
    timeout = float(case["timeout_s"])
    with cp.cuda.Device(index):
        if role == "receiver":
            with socket.create_server(("127.0.0.1", 0)) as server:
                server.settimeout(timeout)
                emit({"type": "rendezvous", "value": server.getsockname()[1]})
                sock, _ = server.accept()
            with sock:
                sock.settimeout(timeout)
                handle = recv_exactly(sock, IPC_HANDLE_BYTES)
                (size,) = _HELLO.unpack(recv_exactly(sock, _HELLO.size))
                if size < nbytes:
                    raise RuntimeError(f"the producer's buffer has {size} bytes, not {nbytes}")
                dst = _cudaipc.malloc(nbytes, index)
                src = _cudaipc.open_memory(handle, index)
                stream = cp.cuda.Stream(non_blocking=True)
                try:
                    # Each phase's figures are kept per phase, as the other baselines do; the
                    # producer's phases run in the same order, one _END after each.
                    return [_consumer_phase(sock, dst, src, int(phase["nbytes"]), stream)
                            for phase in case["phases"]]
                finally:
                    stream.synchronize()
                    _cudaipc.close_memory(src)
                    _cudaipc.free(dst, index)
                    sock.sendall(_BYE)
        src = _cudaipc.malloc(nbytes, index)
        try:
            cp.cuda.runtime.memset(src, 1, nbytes)
            cp.cuda.Device(index).synchronize()
            handle = _cudaipc.export_memory(src)
            with socket.create_connection(("127.0.0.1", int(case["rendezvous"])),
                                          timeout=timeout) as sock:
                sock.sendall(handle + _HELLO.pack(nbytes))
                results = [_producer_phase(sock, phase) for phase in case["phases"]]
                _expect(sock, _BYE)  # the consumer unmapped our buffer: it may be freed
                return results
        finally:
            _cudaipc.free(src, index)
