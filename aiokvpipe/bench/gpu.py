"""The GPU suite (``bench --device cuda``): the nccl plane against raw NCCL, two GPUs.

The sender process runs on ``cuda:0``, the receiver on ``cuda:1`` (each sets its device); with
``--one-gpu`` both on ``cuda:0``, NCCL over its socket transport. Our side is
:class:`.endpoints.OursEndpoint` with ``transport="nccl"``: a received message counts once
``recv()`` has returned, which for the nccl plane means its data is in place. The baseline's
side is :mod:`.raw_nccl`.

CuPy is imported lazily, in the measured processes only: ``--help`` and importing this module
work on a machine without CUDA.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import Final

import torch

from .common import (
    DEPTH,
    ONE_GPU_ENV,
    GiB,
    Json,
    KiB,
    MiB,
    case_timeout,
    format_size,
    lat_phase,
    tput_label,
    tput_phase,
)
from .report import Summary, Table
from .suite import run_and_report, seconds_per_point, sizes_or_none

GPU_SIZES: Final = "4K,64K,1M,16M,256M,1G"
QUICK_SIZES: Final = "4K,1M,16M,256M"
LAT_SIZES: Final = (4 * KiB, 1 * MiB)
BUNDLE_LAYERS: Final = 64
BUNDLE_TENSOR_BYTES: Final = (1 * MiB, 4 * MiB)
KEYED_TASKS: Final = 64
KEYED_NBYTES: Final = 4 * MiB
#: Seconds a case may spend creating NCCL communicators and connecting.
NCCL_SETUP_S: Final = 60.0
_TPUT_TARGETS: Final = {16 * MiB: 0.93, 256 * MiB: 0.97, 1 * GiB: 0.97}


def bundle_label(tensor_bytes: int) -> str:
    return f"bundle 2×{BUNDLE_LAYERS}×{format_size(tensor_bytes)}"


KEYED_LABEL: Final = f"{KEYED_TASKS} tasks × {format_size(KEYED_NBYTES)}"


def _bundles(quick: bool) -> tuple[int, ...]:
    return BUNDLE_TENSOR_BYTES[:1] if quick else BUNDLE_TENSOR_BYTES


def plan_gpu(sizes: list[int], seconds: float, repeat: int, loop: str, quick: bool
             ) -> list[Json]:
    """Cases of raw NCCL and ours, interleaved per repeat. Raw NCCL sends each bundle as one
    tensor of the same bytes, and stands in for the keyed test with back-to-back 4 MiB."""
    bundles = _bundles(quick)
    common = ([tput_phase(tput_label(n), n, seconds) for n in sizes]
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


def gpu_report(summary: Summary, sizes: list[int], quick: bool) -> tuple[str, list[Json]]:
    t = Table(summary, ["nccl-raw"])
    for n in sizes:
        label, target, ok = tput_label(n), "", None
        if n in _TPUT_TARGETS:
            target, ok = t.ratio_at_least(f"throughput {format_size(n)} ours/raw", label,
                                          "nccl-raw", _TPUT_TARGETS[n])
        t.row("throughput GB/s", format_size(n), label, "gbps", ".3g", target, ok)
    for n in LAT_SIZES:
        label, target, ok = f"lat {format_size(n)}", "", None
        if n == 4 * KiB:
            p50 = t.fig("ours", label, "p50_us")
            ok = None if p50 is None else p50 <= 40.0
            target = "≤40 µs"
            t.target("one-way p50 4 KiB (µs)", p50, 40.0, ok)
        t.row("one-way p50 µs", format_size(n), label, "p50_us", ".3g", target, ok)
        t.row("one-way p99 µs", format_size(n), label, "p99_us", ".3g")
    for tb in _bundles(quick):
        label, target, ok = bundle_label(tb), "", None
        if tb == 1 * MiB:
            target, ok = t.ratio_at_least(f"{label} ours/raw (one tensor)", label, "nccl-raw",
                                          0.9)
        t.row(f"{label} GB/s", format_size(2 * BUNDLE_LAYERS * tb), label, "gbps", ".3g",
              target, ok)
    t.row(f"{KEYED_LABEL} GB/s", "agg.", KEYED_LABEL, "gbps", ".3g")
    t.loop_lag_row(max(sizes), 2.0)
    t.cpu_rows(sizes, ".3g")
    return t.render()


def no_cuda() -> bool:
    """Say why ``--device cuda`` cannot run here (no GPU, or torch's CPU build); True then."""
    if torch.cuda.is_available():
        return False
    print(f"bench: --device cuda needs a GPU and a CUDA build of torch (torch "
          f"{torch.__version__} here sees none)", file=sys.stderr)
    return True


def run(args: argparse.Namespace, loop: str) -> int:
    """Run the GPU suite (``args`` as parsed by :func:`.cli.add_parser`) with ours on
    ``loop``; returns the exit status."""
    if no_cuda():
        return 2
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
    sizes = sizes_or_none(args, QUICK_SIZES if args.quick else GPU_SIZES)
    if sizes is None:
        return 2
    seconds = seconds_per_point(args)
    repeat = args.repeat or 1
    route = f"cuda:0 → {receiver_device}" + (" (ONE GPU: NCCL over sockets)" if one_gpu else "")

    def describe(info: Json, hellos: list[Json]) -> list[str]:
        info["gpus"] = {h["role"]: h.get("device_name") for h in hellos}
        gpus = " / ".join(str(v) for v in info["gpus"].values()) or "?"
        return [f"device {route} ({gpus})",
                (f"ours: transport nccl on {loop}; raw: CuPy NCCL send/recv, one stream; "
                 f"{repeat} repeat(s) × {seconds:g} s per point; {DEPTH} sends in flight "
                 "(ours)"),
                ("one-way latency = ping-pong round trip / 2; ratios are ours ÷ raw; bundles: "
                 "raw sends the same bytes as one tensor; keyed: raw sends 4 MiB back to back"),
                "snd/rcv = sender/receiver process; loop lag is ours' only (raw has no loop)"]

    return run_and_report(
        args, plan_gpu(sizes, seconds, repeat, loop, args.quick), route=route,
        sender_device="cuda:0", receiver_device=receiver_device, sizes=sizes,
        settings={"sizes": sizes, "seconds": seconds, "repeat": repeat, "ours_loop": loop,
                  "depth": DEPTH, "quick": args.quick},
        impls=["ours", "nccl-raw"], report=lambda summary: gpu_report(summary, sizes, args.quick),
        describe=describe)
