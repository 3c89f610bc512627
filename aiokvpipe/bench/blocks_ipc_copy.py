"""The block case's ipc baseline: a contiguous copy through CUDA IPC, two processes.

As BENCHMARKS.md defines the ipc baseline ("GPU, one host"): the consumer (the receiving
process) copies out of the producer's buffer, mapped once through CUDA IPC
(``cudaIpcGetMemHandle``/``cudaIpcOpenMemHandle``), with one ``cudaMemcpyAsync`` device to
device on its own stream; one byte of socket signalling each way per message (producer:
"copy", consumer: "copied"). The producer keeps as many copies asked for as ours keeps
requests in flight (the case's depth), and the consumer answers a copy once the next one is
queued behind it, so the copies run back to back as ours can. Both buffers are plain ``cudaMalloc``
allocations of the phase's size, so it is the same bytes as the block case's request, moved as
one contiguous copy.

Plain blocking code, like :mod:`.raw_nccl` (no event loop to block). The consumer listens on
127.0.0.1 and announces the port as its rendezvous; the producer connects and sends its
buffer's handle. The sender's clock runs from the first "copy" to the last "copied". CuPy is
imported lazily (through ``aiokvpipe._cudaipc``): importing this module works without CUDA.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections import deque
from typing import Any, Final

import torch

from .._cudaipc import IPC_HANDLE_BYTES
from .common import Emit, Json, recv_exactly

_COPY, _COPIED, _END, _ENDED, _BYE = b"c", b"d", b"e", b"f", b"x"
_HELLO: Final = struct.Struct("<Q")  # the buffer's size, after the IPC handle


def _expect(sock: socket.socket, byte: bytes) -> None:
    got = recv_exactly(sock, 1)
    if got != byte:
        raise RuntimeError(f"expected {byte!r} from the other process, got {got!r}")


def _producer_phase(sock: socket.socket, phase: Json, window: int) -> Json:
    """Keep ``window`` copies asked for and not yet answered, as ours keeps requests in
    flight; the clock stops at the last answer of the timed copies."""
    def run(until: float, at_least: int) -> tuple[int, float]:
        asked = answered = 0
        while asked < window and (asked < at_least or time.perf_counter() < until):
            sock.sendall(_COPY)
            asked += 1
        while answered < asked:
            _expect(sock, _COPIED)
            answered += 1
            if asked < at_least or time.perf_counter() < until:
                sock.sendall(_COPY)
                asked += 1
        return asked, time.perf_counter()

    run(time.perf_counter() + float(phase["warmup_s"]), int(phase["warmup_msgs"]))
    cpu0, t0 = time.process_time(), time.perf_counter()
    msgs, t1 = run(t0 + float(phase["seconds"]), 1)
    elapsed = t1 - t0
    sock.sendall(_END)
    _expect(sock, _ENDED)
    nbytes = msgs * int(phase["nbytes"])
    return {"msgs": msgs, "bytes": nbytes, "elapsed_s": elapsed, "gbps": nbytes / elapsed / 1e9,
            "cpu_s": time.process_time() - cpu0}


def _consumer_phase(sock: socket.socket, dst: int, src: int, nbytes: int, stream: object
                    ) -> Json:
    """Per "copy": enqueue the copy, then wait for the one before it and answer for that:
    the next copy is queued on the GPU while the last one runs, so copies run back to back
    whenever the producer keeps two or more asked for."""
    import cupy as cp

    from .. import _cudaipc

    pending: deque[Any] = deque()

    def answer_oldest() -> None:
        pending.popleft().synchronize()
        sock.sendall(_COPIED)

    copies, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while True:
        what = recv_exactly(sock, 1)
        if what == _END:
            while pending:
                answer_oldest()
            break
        if what != _COPY:
            raise RuntimeError(f"unexpected {what!r} from the producer")
        _cudaipc.copy_async(dst, src, nbytes, stream.ptr)  # type: ignore[attr-defined]
        done = cp.cuda.Event(block=False, disable_timing=True)
        done.record(stream)
        pending.append(done)
        copies += 1
        # Answer all but the newest; the newest too once nothing else was asked for (the
        # producer then waits for it).
        while len(pending) > 1 or (pending and _idle(sock)):
            answer_oldest()
    sock.sendall(_ENDED)
    # Warm-up and timed copies both land here: the figures that count are the sender's.
    return {"msgs": copies, "elapsed_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0}


def _idle(sock: socket.socket) -> bool:
    """Whether nothing from the producer is waiting to be read."""
    poller = select.poll()  # (select() fails for descriptors past 1,023)
    poller.register(sock, select.POLLIN)
    return not poller.poll(0)


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
                window = max(1, int(case.get("depth", 1)))
                results = [_producer_phase(sock, phase, window) for phase in case["phases"]]
                _expect(sock, _BYE)  # the consumer unmapped our buffer: it may be freed
                return results
        finally:
            _cudaipc.free(src, index)
