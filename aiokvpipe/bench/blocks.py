"""The paged-KV block suite (``bench --blocks``): ``send_blocks``/``recv_blocks`` pool to pool
beside a contiguous transfer of the same bytes on the same plane, in the same run.

One request of an 8B-Llama-shaped pool (32 layers, K and V, block_size 16, 8 KV heads,
head_dim 128, bf16): 4,096 tokens = 256 blocks × 32 layers × 2 × 32 KiB = 512 MiB, at random
block ids in pools of 4,096 blocks (BENCHMARKS.md, "Paged blocks"). Each plane's request moves
twice: with one ``send_blocks`` call, and layer by layer (one ``send_blocks`` per layer, one
``recv_blocks``: the streaming overhead). Beside it, the plane's baseline moving the same bytes
as one contiguous buffer, and our ``send()`` of one tensor of the same bytes:

* ``--device cpu``: the tcp plane, pools in CPU memory; baseline the zero-copy ceiling
  (:class:`.endpoints.CeilingEndpoint`). Pools default to 1,024 blocks (2 GiB per process)
  so that the two processes fit a CI-sized machine; ``--blocks-pool 4096`` is the issue's.
* ``--device cuda``: nccl (baseline raw NCCL, :mod:`.raw_nccl`), tcp staging through pinned
  memory (baseline our ``send()``), and ipc when this machine can (baseline the consumer's
  contiguous copy through CUDA IPC, :mod:`.blocks_ipc_copy`). ``--one-gpu``: both processes on
  cuda:0, nccl disguised as two hosts as in the GPU suite; the ipc cases then run in their own
  pair of processes without the disguise (which hides that both ends share a host).

Targets (issue 11): tcp on the CPU ≥ 0.75 × the ceiling; nccl ≥ 0.9 × raw NCCL; ipc ≥ 0.85 ×
the IPC copy.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import os
import sys
import time
from typing import Final

import torch

from .block_endpoint import KV_BLOCK_BYTES, request_nbytes, slots_for
from .common import DEPTH, ONE_GPU_ENV, Json, case_timeout, format_size, tput_phase
from .report import Summary, both_sides, finish, fmt, host_info, ratio, render_table, summarize
from .report import verdict as verdict_of
from .runner import run_cases

#: The issue's request: 4,096 tokens of 16-token blocks, 32 layers.
REQUEST_BLOCKS: Final = 256
LAYERS: Final = 32
#: Pool sizes by device: the issue's 4,096 on CUDA (8 GiB per process); 1,024 on the CPU.
DEFAULT_POOL_BLOCKS: Final = {"cpu": 1024, "cuda": 4096}
#: Seconds a case may take to set up: pools allocated and touched, NCCL communicators.
SETUP_S: Final = 60.0

#: Per plane: its baseline (moving the same bytes as one buffer) and our target against it.
#: "tcp" on CUDA has no raw baseline: our send() of one tensor stands in, without a target.
BASELINES: Final = {"cpu:tcp": ("ceiling", 0.75), "cuda:nccl": ("nccl-raw", 0.9),
                    "cuda:tcp": ("ours", None), "cuda:ipc": ("blocks-ipc-copy", 0.85)}
_NAMES: Final = {"ceiling": "zero-copy ceiling", "nccl-raw": "raw NCCL",
                 "blocks-ipc-copy": "CUDA IPC copy", "ours": "ours, send()"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The suite's options, on ``bench``'s parser."""
    p.add_argument("--blocks", action="store_true",
                   help="paged KV: send_blocks/recv_blocks of one 4,096-token request of an "
                        "8B-Llama-shaped pool (512 MiB at random block ids) beside the same "
                        "bytes as one buffer; with --device cpu (tcp) or cuda (nccl, tcp, ipc)")
    p.add_argument("--blocks-pool", type=int, metavar="N",
                   help="blocks per pool (default 4096 on cuda, 8 GiB per process; 1024 on "
                        "cpu, 2 GiB per process)")
    p.add_argument("--blocks-request", type=int, metavar="N", default=REQUEST_BLOCKS,
                   help=f"blocks per request (default {REQUEST_BLOCKS}: 4,096 tokens)")
    p.add_argument("--blocks-layers", type=int, metavar="N", default=LAYERS,
                   help=f"layers of the model (default {LAYERS})")


def planes_for(device: str, cupy: bool, ipc: bool) -> list[str]:
    """The planes measured on ``device`` (``"cpu"`` or ``"cuda"``), as ``device:transport``."""
    if device == "cpu":
        return ["cpu:tcp"]
    return [p for p, ok in (("cuda:nccl", cupy), ("cuda:tcp", True), ("cuda:ipc", ipc)) if ok]


def labels(plane: str) -> tuple[str, str, str]:
    """The phase labels of a plane: blocks in one call, by layer, and one contiguous tensor."""
    t = plane.split(":")[1]
    return f"{t}: blocks", f"{t}: blocks by layer", f"{t}: one tensor"


def plan_blocks(planes: list[str], shape: Json, seconds: float, repeat: int, loop: str
                ) -> list[Json]:
    """Cases of our blocks, our send() and each plane's baseline, interleaved per repeat."""
    nbytes = request_nbytes(shape)
    cases = []
    for r in range(repeat):
        for plane in planes:
            transport = plane.split(":")[1]
            whole, by_layer, one = labels(plane)
            base = BASELINES[plane][0]
            ours_blocks = [tput_phase(whole, nbytes, seconds),
                           tput_phase(by_layer, nbytes, seconds, by_layer=True)]
            one_tensor = [tput_phase(one, nbytes, seconds)]
            impls = [("blocks", ours_blocks, loop), ("ours", one_tensor, loop)]
            if base != "ours":
                impls.append((base, one_tensor, loop if base == "ceiling" else "none"))
            for impl, phases, loop_name in impls:
                cases.append({"impl": impl, "loop": loop_name, "repeat": r, "phases": phases,
                              "max_nbytes": nbytes, "depth": DEPTH, "transport": transport,
                              "timeout_s": case_timeout(phases, SETUP_S), **shape,
                              "seed": r, "plane": plane})
    return cases


def blocks_report(summary: Summary, planes: list[str], layers: int
                  ) -> tuple[str, list[Json]]:
    """The table (per plane: our blocks, by layer, our send(), the baseline; each ÷ the
    plane's baseline and ÷ our send()), and the targets in machine-readable form."""
    headers = ["plane", "transfer", "GB/s", "÷ baseline", "÷ send()", "loop lag p99 ms snd/rcv",
               "CPU s/GB snd/rcv", "target", "result"]
    rows: list[list[str]] = []
    targets: list[Json] = []

    def gbps(impl: str, label: str) -> float | None:
        v = summary.get(impl, {}).get(label, {}).get("gbps")
        return float(v) if v is not None else None

    for plane in planes:
        whole, by_layer, one = labels(plane)
        base, floor = BASELINES[plane]
        base_gbps, send_gbps = gbps(base, one), gbps("ours", one)
        entries = [("blocks", whole, "ours, blocks: 1 call"),
                   ("blocks", by_layer, f"ours, blocks: {layers} calls, a layer each"),
                   ("ours", one, "ours, send(): 1 tensor")]
        if base != "ours":
            entries.append((base, one, f"{_NAMES[base]}: 1 buffer"))
        for impl, label, what in entries:
            value = gbps(impl, label)
            target, result = "", ""
            if impl == base and label == one:
                what += " (baseline)"
            if floor is not None and impl == "blocks" and label == whole:
                r = ratio(value, base_gbps)
                ok = None if r is None else r >= floor
                targets.append({"name": f"{plane} blocks ours/{_NAMES[base]}", "value": r,
                                "target": floor, "pass": ok})
                target, result = f"≥{floor:g}×{_NAMES[base]}", verdict_of(ok)
            rows.append([plane.split(":")[1] + (" (cpu)" if plane == "cpu:tcp" else ""),
                         what, fmt(value), fmt(ratio(value, base_gbps), ".2f"),
                         fmt(ratio(value, send_gbps), ".2f"),
                         both_sides(summary, impl, label, "lag_p99_ms", ".2f"),
                         both_sides(summary, impl, label, "cpu_s_per_gb", ".2f"),
                         target, result])
    return render_table(headers, rows), targets


def run(args: argparse.Namespace, loop: str) -> int:
    """Run the block suite (``args`` as parsed by :func:`.cli.add_parser`) with ours on
    ``loop``; returns the exit status (2: the options or the machine do not fit)."""
    device = args.device
    if device not in DEFAULT_POOL_BLOCKS:
        return _refuse(f"--blocks runs with --device cpu or cuda, not {device}")
    if args.sizes or args.plot:
        return _refuse("--blocks moves one request size; --sizes and --plot do not apply")
    shape = {"pool_blocks": args.blocks_pool or DEFAULT_POOL_BLOCKS[device],
             "request_blocks": args.blocks_request, "layers": args.blocks_layers}
    if not 1 <= shape["request_blocks"] <= shape["pool_blocks"]:
        return _refuse("--blocks-request must be at least 1 and at most --blocks-pool")
    if shape["layers"] < 1:
        return _refuse("--blocks-layers must be at least 1")
    one_gpu = bool(getattr(args, "one_gpu", False))
    receiver_device = "cpu"
    cupy = ipc = False
    if device == "cuda":
        if not torch.cuda.is_available() or torch.cuda.device_count() < (1 if one_gpu else 2):
            return _refuse("--blocks --device cuda needs two CUDA devices (or --one-gpu)")
        receiver_device = "cuda:0" if one_gpu else "cuda:1"
        cupy = importlib.util.find_spec("cupy") is not None
        from .._ipc_probe import ipc_info

        ipc = ipc_info()[0]
    planes = planes_for(device, cupy, ipc)
    transport = getattr(args, "transport", "auto")
    if transport != "auto":  # one plane only
        planes = [p for p in planes if p.endswith(":" + transport)]
        if not planes:
            return _refuse(f"--transport {transport} cannot run here with --device {device}")
    seconds = float(args.seconds or (0.5 if args.quick else 2.0))  # a request is 512 MiB
    repeat = args.repeat or (1 if args.quick or device == "cuda" else 3)
    cases = plan_blocks(planes, shape, seconds, repeat, loop)
    nbytes = request_nbytes(shape)
    pool_bytes = shape["pool_blocks"] * shape["layers"] * 2 * KV_BLOCK_BYTES
    route = ("cpu" if device == "cpu" else
             f"cuda:0 → {receiver_device}" + (" (ONE GPU: nccl over sockets)" if one_gpu else ""))
    issue = " (the full-size pool)" if shape["pool_blocks"] == 4096 else (
        ", scaled down from the full-size 4,096 (--blocks-pool)")
    sender_device = "cpu" if device == "cpu" else "cuda:0"

    # With --one-gpu, the disguise (two hosts to NCCL and to our handshake) would hide from
    # the ipc cases that both ends share a host: those run in a pair of their own without it.
    groups = [([c for c in cases if c["plane"] != "cuda:ipc"], one_gpu),
              ([c for c in cases if c["plane"] == "cuda:ipc"], False)]
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    info = host_info(route)
    started = time.perf_counter()
    records: list[Json] = []
    errors: list[Json] = []
    hellos: list[Json] = []
    for group, disguised in groups:
        if not group:
            continue
        if disguised:
            os.environ[ONE_GPU_ENV] = "1"
        else:
            os.environ.pop(ONE_GPU_ENV, None)
        recs, errs, hs = asyncio.run(run_cases(group, sender_device, receiver_device))
        records += recs
        errors += errs
        hellos = hellos or hs
    if device == "cuda":
        info["gpus"] = {h["role"]: h.get("device_name") for h in hellos}
    where = (f"device cpu ({info['cpu']}, {info['cpu_count']} cores)" if device == "cpu" else
             f"device {route} ({' / '.join(str(v) for v in info.get('gpus', {}).values())})")
    notes = [
        f"paged KV blocks · {where}",
        (f"request: {shape['request_blocks']} blocks × {shape['layers']} layers × K,V × "
         f"32 KiB = {format_size(nbytes)}, at random ids; pools of {shape['pool_blocks']} "
         f"blocks{issue}: {format_size(pool_bytes)} per process"),
        (f"ours on {loop}; {repeat} repeat(s) × {seconds:g} s per point, medians; blocks: "
         f"{slots_for({**shape, 'depth': DEPTH})} requests in flight, each on blocks of its "
         "own; send() and baselines: the request's bytes as one buffer, "
         f"{DEPTH} sends in flight (ours, ceiling; raw baselines one at a time)"),
        ("÷ baseline: ÷ the plane's one-buffer baseline (on cuda tcp: our send()); snd/rcv = "
         "sender/receiver process; loop lag is ours' only (raw baselines have no loop)"),
    ]
    summary = summarize(records)
    table, targets = blocks_report(summary, planes, shape["layers"])
    settings = {"blocks": True, **shape, "request_bytes": nbytes, "planes": planes,
                "seconds": seconds, "repeat": repeat, "ours_loop": loop, "depth": DEPTH,
                "one_gpu": one_gpu, "wall_s": time.perf_counter() - started}
    impls = list(dict.fromkeys(["blocks", "ours", *(BASELINES[p][0] for p in planes)]))
    finish(args, info, date, settings, records, errors, summary, targets, [nbytes], impls,
           notes, table)
    return 1 if errors else 0


def _refuse(why: str) -> int:
    print(f"bench: {why}", file=sys.stderr)
    return 2
