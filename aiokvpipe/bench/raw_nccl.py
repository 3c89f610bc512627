"""The GPU baseline's measured side: raw point-to-point NCCL through CuPy, two processes.

As BENCHMARKS.md defines it: ``NcclCommunicator.send``/``recv`` on one stream, back to back, no
metadata. Its unique id travels through the coordinator's pipes to the children. It is plain
blocking code (there is no event loop in it to block). Its timing mirrors ours: the sender's
clock runs from the first send until it holds the receiver's one-byte acknowledgement, the
stream synchronised. Each sender first times a few warm-up messages to pick a count filling the
phase's seconds, and tells the receiver that count over NCCL.

CuPy is imported lazily, in the measured processes only: importing this module works on a
machine without CUDA.
"""

from __future__ import annotations

import struct
import time
from typing import Any, Final

import torch

from .common import MAX_SAMPLES, MIN_LAT_SAMPLES, Emit, Json, MiB, latency_figures

#: Counts are capped so one phase cannot queue unbounded work on a stream.
MAX_RAW_MSGS: Final = 200_000


class _RawNccl:
    """One end of a two-rank communicator; the sender is rank 0. Blocking, by design."""

    def __init__(self, comm: Any, rank: int, capacity: int) -> None:
        import cupy as cp
        from cupy.cuda import nccl

        self._cp, self._nccl, self._comm = cp, nccl, comm
        self._peer = 1 - rank
        self._stream = cp.cuda.Stream(non_blocking=True)
        self._buf = cp.zeros(capacity, dtype=cp.uint8)  # zeros: touch the memory up front
        self._ctl = cp.zeros(8, dtype=cp.uint8)

    def _send(self, ptr: int, n: int) -> None:
        self._comm.send(ptr, n, self._nccl.NCCL_UINT8, self._peer, self._stream.ptr)

    def _recv(self, ptr: int, n: int) -> None:
        self._comm.recv(ptr, n, self._nccl.NCCL_UINT8, self._peer, self._stream.ptr)

    def _sync(self) -> None:
        self._stream.synchronize()

    def _tell_count(self, count: int) -> None:
        import numpy as np

        # On our stream, so the copy is ordered before the send that reads it.
        self._ctl.set(np.frombuffer(struct.pack("<q", count), dtype=np.uint8),
                      stream=self._stream)
        self._send(self._ctl.data.ptr, 8)
        self._sync()

    def _hear_count(self) -> int:
        self._recv(self._ctl.data.ptr, 8)
        self._sync()
        (count,) = struct.unpack("<q", self._ctl.get().tobytes())
        return int(count)

    @staticmethod
    def _warm_msgs(phase: Json) -> int:
        """Messages of each of the two untimed batches that open a phase: a warm-up (the
        first op on a connection also sets it up) and a calibration. Both ends derive the
        same number from the phase alone."""
        return max(int(phase["warmup_msgs"]), 2 if phase["nbytes"] >= 64 * MiB else 20)

    def _count_for(self, seconds: float, per_msg: float, floor: int, cap: int) -> int:
        return max(floor, min(cap, int(seconds / max(per_msg, 1e-7))))

    def sender_phase(self, phase: Json) -> Json:
        n, seconds, ptr = int(phase["nbytes"]), float(phase["seconds"]), self._buf.data.ptr
        warm = self._warm_msgs(phase)
        if phase["kind"] == "lat":
            back = self._cp.empty(n, dtype=self._cp.uint8)
            for _batch in range(2):  # warm-up, then calibration
                t0 = time.perf_counter()
                for _ in range(warm):
                    self._send(ptr, n)
                    self._recv(back.data.ptr, n)
                    self._sync()
            count = self._count_for(seconds, (time.perf_counter() - t0) / warm,
                                    MIN_LAT_SAMPLES, MAX_SAMPLES)
            self._tell_count(count)
            rtts = []
            for _ in range(count):
                t0 = time.perf_counter()
                self._send(ptr, n)
                self._recv(back.data.ptr, n)
                self._sync()
                rtts.append(time.perf_counter() - t0)
            return latency_figures(rtts)
        for _batch in range(2):  # warm-up, then calibration
            t0 = time.perf_counter()
            for _ in range(warm):
                self._send(ptr, n)
            self._sync()
        count = self._count_for(seconds, (time.perf_counter() - t0) / warm, 1, MAX_RAW_MSGS)
        self._tell_count(count)
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            self._send(ptr, n)
        self._recv(self._ctl.data.ptr, 1)  # the receiver's acknowledgement
        self._sync()
        elapsed = time.perf_counter() - t0
        return {"msgs": count, "bytes": count * n, "elapsed_s": elapsed,
                "gbps": count * n / elapsed / 1e9, "cpu_s": time.process_time() - cpu0}

    def receiver_phase(self, phase: Json) -> Json:
        n, ptr = int(phase["nbytes"]), self._buf.data.ptr
        warm = self._warm_msgs(phase)
        if phase["kind"] == "lat":
            back = self._cp.empty(n, dtype=self._cp.uint8)
            for _ in range(2 * warm):
                self._recv(back.data.ptr, n)
                self._send(back.data.ptr, n)
            self._sync()
            count = self._hear_count()
            for _ in range(count):  # ordered on one stream: each echo follows its receive
                self._recv(back.data.ptr, n)
                self._send(back.data.ptr, n)
            self._sync()
            return {"msgs": count}
        for _ in range(2 * warm):
            self._recv(ptr, n)
        self._sync()
        count = self._hear_count()
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            self._recv(ptr, n)
        self._send(self._ctl.data.ptr, 1)
        self._sync()
        return {"msgs": count, "elapsed_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - cpu0}

    def close(self) -> None:
        self._sync()
        del self._buf, self._ctl
        self._cp.get_default_memory_pool().free_all_blocks()


def raw_nccl_case(role: str, device: str, case: Json, emit: Emit) -> list[Json]:
    """Run a raw-NCCL case on this side; the receiver makes the unique id and emits it."""
    import cupy as cp
    from cupy.cuda import nccl

    index = torch.device(device).index or 0
    with cp.cuda.Device(index):
        if role == "receiver":
            uid = nccl.get_unique_id()
            # CuPy 14 hands out bytes, older CuPy a tuple of C chars (signed): send unsigned.
            raw_id = uid if isinstance(uid, bytes) else bytes(b & 0xFF for b in uid)
            emit({"type": "rendezvous", "value": raw_id.hex()})
        else:
            raw_id = bytes.fromhex(case["rendezvous"])
        rank = 0 if role == "sender" else 1
        try:
            comm = nccl.NcclCommunicator(2, raw_id, rank)
        except TypeError:  # older CuPy wants the tuple of signed chars back
            comm = nccl.NcclCommunicator(2, tuple(b - 256 if b > 127 else b for b in raw_id),
                                         rank)
        raw = _RawNccl(comm, rank, int(case["max_nbytes"]))
        try:
            run = raw.sender_phase if role == "sender" else raw.receiver_phase
            return [run(phase) for phase in case["phases"]]
        finally:
            raw.close()
            comm.destroy()
