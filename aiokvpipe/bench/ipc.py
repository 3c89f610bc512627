"""The one-host suite (``bench --device cuda`` on one GPU, or ``--transport ipc``): the ipc
plane against the raw CUDA IPC copy, two processes on cuda:0 (BENCHMARKS.md, "GPU, one host").

Ours is :class:`.endpoints.OursEndpoint` with ``transport="ipc"``; the baseline's side is
:mod:`.raw_ipc` (the consumer copying out of the producer's buffer mapped once, one message at
a time). Before those cases, the GPU memory one pipe costs per transport (tcp, nccl over
sockets as ``--one-gpu`` runs it, ipc): torch's counters at each end and the device's used
memory (both processes together), after one message each way, minus before.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Final

import torch

from . import gpu
from .common import (
    DEPTH,
    Json,
    KiB,
    MiB,
    case_timeout,
    format_size,
    lat_phase,
    tput_label,
    tput_phase,
)
from .report import Summary, Table, render_table
from .runner import run_cases
from .suite import run_and_report, seconds_per_point, sizes_or_none

IPC_SIZES: Final = "4K,1M,16M,256M,1G"
QUICK_SIZES: Final = "4K,16M,256M"
MEMORY_TRANSPORTS: Final = ("tcp", "nccl", "ipc")
_TPUT_FLOOR: Final = 0.9  # ours ≥ 0.9 × the raw copy at ≥ 16 MiB (issue 12)


def plan_ipc(sizes: list[int], seconds: float, repeat: int, loop: str) -> list[Json]:
    tputs = [tput_phase(tput_label(n), n, seconds) for n in sizes]
    # The raw baseline's round trip moves the payload one way and answers 1 byte; ours is
    # timed the same way (lat1: a reply without payload) and as an echo (lat: both ends
    # copy, which on one GPU makes the GPU switch between the two processes' contexts).
    one_way = lat_phase(4 * KiB, seconds, reply="none")
    echo = lat_phase(4 * KiB, seconds)
    cases = []
    for r in range(repeat):
        # Ours without busy polling at 4 KiB only: what the polling buys, and costs.
        for impl, loop_name, phases in (("ipc-raw", "none", [*tputs, one_way]),
                                        ("ours", loop, [*tputs, one_way, echo]),
                                        ("ours-no-poll", loop, [one_way, echo])):
            cases.append({"impl": impl, "loop": loop_name, "repeat": r, "phases": phases,
                          "max_nbytes": max(sizes), "depth": DEPTH, "transport": "ipc",
                          "timeout_s": case_timeout(phases, 60.0)})
    return cases


def plan_memory() -> list[Json]:
    return [{"impl": "pipe-memory", "loop": "none", "repeat": 0, "transport": t,
             "phases": [{"label": f"memory {t}", "kind": "memory", "nbytes": 0,
                         "seconds": 0.0}], "timeout_s": 180.0} for t in MEMORY_TRANSPORTS]


def measure_memory() -> list[Json]:
    """One pipe per transport between the two measured processes; per transport the
    transport picked and the deltas at each end (errors reported, not raised)."""
    records, errors, _ = asyncio.run(run_cases(plan_memory(), "cuda:0", "cuda:0"))
    out = []
    for rec in records:
        out.append({"transport": rec["label"].split()[-1], "sender": rec["sender"],
                    "receiver": rec["receiver"]})
    for err in errors:
        out.append({"transport": "?", "error": str(err)[:300]})
    return out


def memory_table(mem: list[Json]) -> str:
    rows = []
    for m in mem:
        if "error" in m:
            rows.append([m["transport"], "failed: " + m["error"][:60], "", ""])
            continue
        s, r = m["sender"], m["receiver"]
        rows.append([f"{m['transport']} (picked {s.get('transport')})",
                     f"{s['allocated_delta'] / MiB:.1f} / {r['allocated_delta'] / MiB:.1f}",
                     f"{s['reserved_delta'] / MiB:.1f} / {r['reserved_delta'] / MiB:.1f}",
                     f"{max(s['device_used_delta'], r['device_used_delta']) / MiB:.0f}"])
    return render_table(["GPU memory of one pipe", "torch allocated MiB snd/rcv",
                         "torch reserved MiB snd/rcv", "device used MiB (both ends)"], rows)


def ipc_report(summary: Summary, sizes: list[int]) -> tuple[str, list[Json]]:
    t = Table(summary, [b for b in ("ipc-raw", "ours-no-poll") if b in summary])
    for n in sizes:
        label, target, ok = tput_label(n), "", None
        if n >= 16 * MiB:
            target, ok = t.ratio_at_least(f"throughput {format_size(n)} ours/raw IPC copy",
                                          label, "ipc-raw", _TPUT_FLOOR)
        t.row("throughput GB/s", format_size(n), label, "gbps", ".4g", target, ok)
    label = f"lat1 {format_size(4 * KiB)}"
    p50 = t.fig("ours", label, "p50_us")
    ok = None if p50 is None else p50 <= 40.0
    t.target("one-way p50 4 KiB (µs)", p50, 40.0, ok)
    t.row("one-way p50 µs", "4 KiB", label, "p50_us", ".3g", "≤40 µs", ok)
    t.row("one-way p99 µs", "4 KiB", label, "p99_us", ".3g")
    t.lat_cpu_row(4 * KiB, label)
    echo = f"lat {format_size(4 * KiB)}"
    t.row("echo: one-way p50 µs", "4 KiB", echo, "p50_us", ".3g")
    t.row("echo: one-way p99 µs", "4 KiB", echo, "p99_us", ".3g")
    t.lat_cpu_row(4 * KiB)
    t.loop_lag_row(max(sizes), 2.0)
    t.cpu_rows(sizes, ".3g")
    return t.render()


def run(args: argparse.Namespace, loop: str) -> int:
    """Run the one-host suite; returns the exit status."""
    if gpu.no_cuda():
        return 2
    sizes = sizes_or_none(args, QUICK_SIZES if args.quick else IPC_SIZES)
    if sizes is None:
        return 2
    seconds = seconds_per_point(args)
    repeat = args.repeat or 1
    mem = measure_memory()
    mem_text = memory_table(mem)

    def report(summary: Summary) -> tuple[str, list[Json]]:
        table, targets = ipc_report(summary, sizes)
        return table + "\n\n" + mem_text, targets

    def describe(info: Json, hellos: list[Json]) -> list[str]:
        info["gpus"] = {h["role"]: h.get("device_name") for h in hellos}
        info["pipe_memory"] = mem
        gpus = " / ".join(str(v) for v in info["gpus"].values()) or "?"
        return [f"device cuda:0 → cuda:0, two processes ({gpus})",
                (f"ours: transport ipc on {loop}, {DEPTH} sends in flight; raw: the consumer "
                 "copies out of the producer's buffer mapped through CUDA IPC "
                 "(cudaMemcpyAsync + synchronize), one message at a time, 1 byte of "
                 f"socket signalling each way; {repeat} repeat(s) × {seconds:g} s per point"),
                ("one-way latency = round trip / 2, one payload per round trip as the raw's "
                 "go → copied → done: ours answers with a message without payload; echo: "
                 "ours sends the 4 KiB back (each end copies: on one GPU the two processes' "
                 "contexts take turns)"),
                "memory: one pipe opened and one 1 MiB message each way, minus before"]

    return run_and_report(
        args, plan_ipc(sizes, seconds, repeat, loop), route="cuda:0 → cuda:0 (ipc)",
        sender_device="cuda:0", receiver_device="cuda:0", sizes=sizes,
        settings={"sizes": sizes, "seconds": seconds, "repeat": repeat, "ours_loop": loop,
                  "depth": DEPTH, "quick": args.quick, "suite": "ipc"},
        impls=["ours", "ipc-raw", "ours-no-poll"], report=report, describe=describe)


def run_cuda(args: argparse.Namespace, loop: str) -> int:
    """``--device cuda``: the one-host ipc suite with ``--transport ipc`` or on a machine of
    one GPU (without ``--one-gpu``); the nccl suite otherwise."""
    transport = getattr(args, "transport", "auto")
    one_gpu_machine = torch.cuda.is_available() and torch.cuda.device_count() == 1
    if transport == "ipc" or (transport == "auto" and one_gpu_machine
                              and not getattr(args, "one_gpu", False)):
        return run(args, loop)
    return gpu.run(args, loop)



