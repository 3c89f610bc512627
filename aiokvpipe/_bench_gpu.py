"""``python -m aiokvpipe bench --device cuda``: the nccl plane against raw NCCL, two GPUs.

The sender process runs on ``cuda:0``, the receiver on ``cuda:1`` (each sets its device). Our
side is :class:`aiokvpipe._bench.OursEndpoint` with ``transport="nccl"``: a received message
counts once ``recv()`` has returned, which for the nccl plane means its data is in place.

The baseline is raw point-to-point NCCL through CuPy, as BENCHMARKS.md defines it:
``NcclCommunicator.send``/``recv`` on one stream, back to back, no metadata. Its unique id
travels through the coordinator's pipes to the children. It is plain blocking code (there is
no event loop in it to block). Its timing mirrors ours: the sender's clock runs from the first
send until it holds the receiver's one-byte acknowledgement, the stream synchronised. Each
sender first times a few warm-up messages to pick a count filling the phase's seconds, and
tells the receiver that count over NCCL.

CuPy is imported lazily, in the measured processes only: ``--help`` and importing this module
work on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import os
import struct
import sys
import time
from collections.abc import Callable
from typing import Any, Final

import torch

from ._bench import (
    DEPTH,
    MAX_SAMPLES,
    MIN_LAT_SAMPLES,
    ONE_GPU_ENV,
    GiB,
    Json,
    KiB,
    MiB,
    both_sides,
    case_timeout,
    fig_of,
    finish,
    fmt,
    format_size,
    host_info,
    lat_phase,
    parse_sizes,
    percentile,
    ratio,
    render_table,
    run_cases,
    summarize,
    tput_phase,
    verdict,
    worst_loop_lag,
)

GPU_SIZES: Final = "4K,64K,1M,16M,256M,1G"
QUICK_SIZES: Final = "4K,1M,16M,256M"
LAT_SIZES: Final = (4 * KiB, 1 * MiB)
BUNDLE_LAYERS: Final = 64
BUNDLE_TENSOR_BYTES: Final = (1 * MiB, 4 * MiB)
KEYED_TASKS: Final = 64
KEYED_NBYTES: Final = 4 * MiB
#: Raw NCCL: counts are capped so one phase cannot queue unbounded work on a stream.
MAX_RAW_MSGS: Final = 200_000
#: Seconds a case may spend creating NCCL communicators and connecting.
NCCL_SETUP_S: Final = 60.0


def bundle_label(tensor_bytes: int) -> str:
    return f"bundle 2×{BUNDLE_LAYERS}×{format_size(tensor_bytes)}"


KEYED_LABEL: Final = f"{KEYED_TASKS} tasks × {format_size(KEYED_NBYTES)}"


def plan_gpu(sizes: list[int], seconds: float, repeat: int, loop: str, quick: bool
             ) -> list[Json]:
    """Cases of raw NCCL and ours, interleaved per repeat. Raw NCCL sends each bundle as one
    tensor of the same bytes, and stands in for the keyed test with back-to-back 4 MiB."""
    bundles = BUNDLE_TENSOR_BYTES[:1] if quick else BUNDLE_TENSOR_BYTES
    common = ([tput_phase(f"tput {format_size(n)}", n, seconds) for n in sizes]
              + [lat_phase(n, seconds) for n in LAT_SIZES]
              + [tput_phase(bundle_label(t), 2 * BUNDLE_LAYERS * t, seconds,
                            layers=BUNDLE_LAYERS, tensor_bytes=t) for t in bundles])
    keyed = {"label": KEYED_LABEL, "kind": "keyed", "tasks": KEYED_TASKS,
             "nbytes": KEYED_NBYTES, "seconds": seconds, "warmup_s": max(0.05, 0.15 * seconds),
             "warmup_msgs": 1}
    ours = common + [keyed]
    raw = common + [tput_phase(KEYED_LABEL, KEYED_NBYTES, seconds)]
    max_nbytes = max([*sizes, *LAT_SIZES, KEYED_NBYTES,
                      *(2 * BUNDLE_LAYERS * t for t in bundles)])
    cases = []
    for r in range(repeat):
        for impl, phases, loop_name in (("nccl-raw", raw, "none"), ("ours", ours, loop)):
            cases.append({"impl": impl, "loop": loop_name, "repeat": r, "phases": phases,
                          "max_nbytes": max_nbytes, "depth": DEPTH, "transport": "nccl",
                          "timeout_s": case_timeout(phases, NCCL_SETUP_S)})
    return cases


# -- raw NCCL, in a measured process -----------------------------------------------------------


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
            return {"p50_us": percentile(rtts, 50) / 2 * 1e6,
                    "p99_us": percentile(rtts, 99) / 2 * 1e6, "samples": len(rtts)}
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


def raw_nccl_case(role: str, device: str, case: Json, emit: Callable[[Json], None]
                  ) -> list[Json]:
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


# -- the report --------------------------------------------------------------------------------

_TPUT_TARGETS: Final = {16 * MiB: 0.93, 256 * MiB: 0.97, 1 * GiB: 0.97}


def gpu_report(summary: dict[str, dict[str, Json]], sizes: list[int], quick: bool
               ) -> tuple[str, list[Json]]:
    headers = ["metric", "size", "ours", "raw NCCL", "ours/raw", "target", "result"]
    rows: list[list[str]] = []
    targets: list[Json] = []

    def row(metric: str, size: str, label: str, key: str, spec: str, target: str = "",
            ok: bool | None = None) -> None:
        ours, raw = fig_of(summary, "ours", label, key), fig_of(summary, "nccl-raw", label, key)
        rows.append([metric, size, fmt(ours, spec), fmt(raw, spec), fmt(ratio(ours, raw), ".2f"),
                     target, verdict(ok) if target else ""])

    def ratio_target(name: str, label: str, floor: float) -> tuple[str, bool | None]:
        r = ratio(fig_of(summary, "ours", label, "gbps"),
                  fig_of(summary, "nccl-raw", label, "gbps"))
        ok = None if r is None else r >= floor
        targets.append({"name": name, "value": r, "target": floor, "pass": ok})
        return f"≥{floor:g}×raw", ok

    for n in sizes:
        label, target, ok = f"tput {format_size(n)}", "", None
        if n in _TPUT_TARGETS:
            target, ok = ratio_target(f"throughput {format_size(n)} ours/raw", label,
                                      _TPUT_TARGETS[n])
        row("throughput GB/s", format_size(n), label, "gbps", ".3g", target, ok)
    for n in LAT_SIZES:
        label, target, ok = f"lat {format_size(n)}", "", None
        if n == 4 * KiB:
            p50 = fig_of(summary, "ours", label, "p50_us")
            ok = None if p50 is None else p50 <= 40.0
            target = "≤40 µs"
            targets.append({"name": "one-way p50 4 KiB (µs)", "value": p50, "target": 40.0,
                            "pass": ok})
        row("one-way p50 µs", format_size(n), label, "p50_us", ".3g", target, ok)
        row("one-way p99 µs", format_size(n), label, "p99_us", ".3g")
    for t in BUNDLE_TENSOR_BYTES[:1] if quick else BUNDLE_TENSOR_BYTES:
        label, target, ok = bundle_label(t), "", None
        if t == 1 * MiB:
            target, ok = ratio_target(f"{label} ours/raw (one tensor)", label, 0.9)
        row(f"{label} GB/s", format_size(2 * BUNDLE_LAYERS * t), label, "gbps", ".3g",
            target, ok)
    row(f"{KEYED_LABEL} GB/s", "agg.", KEYED_LABEL, "gbps", ".3g")
    largest = f"tput {format_size(max(sizes))}"
    lag, ok = worst_loop_lag(summary, largest, 2.0)
    targets.append({"name": f"loop lag p99 ms while {format_size(max(sizes))} streams (ours)",
                    "value": lag, "target": 2.0, "pass": ok})
    rows.append(["loop lag p99 ms snd/rcv", format_size(max(sizes)),
                 both_sides(summary, "ours", largest, "lag_p99_ms", ".2f"), "—", "", "≤2 ms",
                 verdict(ok)])
    for n in sizes:
        label = f"tput {format_size(n)}"
        rows.append(["CPU s/GB snd/rcv", format_size(n),
                     both_sides(summary, "ours", label, "cpu_s_per_gb", ".3g"),
                     both_sides(summary, "nccl-raw", label, "cpu_s_per_gb", ".3g"), "", "", ""])
    return render_table(headers, rows), targets


# -- the command -------------------------------------------------------------------------------


def main(args: argparse.Namespace, loop: str) -> int:
    """Run the GPU bench (``args`` as parsed by :func:`aiokvpipe._bench.add_parser`)."""
    if importlib.util.find_spec("cupy") is None:
        print("bench: --device cuda needs CuPy with NCCL (pip install 'aiokvpipe[cuda12]' or "
              "'[cuda13]')", file=sys.stderr)
        return 2
    one_gpu = bool(getattr(args, "one_gpu", False))
    receiver_device = "cuda:0" if one_gpu else "cuda:1"
    if one_gpu:
        os.environ[ONE_GPU_ENV] = "1"
    if not torch.cuda.is_available() or torch.cuda.device_count() < (1 if one_gpu else 2):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"bench: --device cuda needs two CUDA devices (cuda:0 sends, cuda:1 receives); "
              f"found {found}", file=sys.stderr)
        return 2
    try:
        sizes = parse_sizes(args.sizes or (QUICK_SIZES if args.quick else GPU_SIZES))
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    seconds = args.seconds or (0.5 if args.quick else 1.0)
    repeat = args.repeat or 1
    cases = plan_gpu(sizes, seconds, repeat, loop, args.quick)
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    route = f"cuda:0 → {receiver_device}" + (" (ONE GPU: NCCL over sockets)" if one_gpu else "")
    info = host_info(route)
    started = time.perf_counter()
    records, errors, hellos = asyncio.run(run_cases(cases, "cuda:0", receiver_device))
    info["gpus"] = {h["role"]: h.get("device_name") for h in hellos}
    summary = summarize(records)
    table, targets = gpu_report(summary, sizes, args.quick)
    settings = {"sizes": sizes, "seconds": seconds, "repeat": repeat, "ours_loop": loop,
                "depth": DEPTH, "quick": args.quick, "wall_s": time.perf_counter() - started}
    gpus = " / ".join(str(v) for v in info["gpus"].values()) or "?"
    finish(args, info, date, settings, records, errors, summary, targets, sizes,
           ["ours", "nccl-raw"],
           [f"device {route} ({gpus})",
            (f"ours: transport nccl on {loop}; raw: CuPy NCCL send/recv, one stream; "
             f"{repeat} repeat(s) × {seconds:g} s per point; {DEPTH} sends in flight (ours)"),
            ("one-way latency = ping-pong round trip / 2; ratios are ours ÷ raw; bundles: raw "
             "sends the same bytes as one tensor; keyed: raw sends 4 MiB back to back"),
            "snd/rcv = sender/receiver process; loop lag is ours' only (raw has no loop)"],
           table)
    return 1 if errors else 0
