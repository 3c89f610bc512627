"""The CPU suite (``bench``, ``--device cpu``): the tcp plane beside asyncio streams (also with
tensors for messages, where small ones are measured) and the zero-copy ceiling, two processes
on 127.0.0.1.

Cases of all implementations are interleaved within each repeat, so drifting noise on a shared
machine hits them alike; figures are medians over the repeats.
"""

from __future__ import annotations

import argparse
from typing import Final

from .common import (
    DEPTH,
    Json,
    KiB,
    MiB,
    case_timeout,
    format_size,
    have_uvloop,
    lat_phase,
    tput_label,
    tput_phase,
)
from .report import Summary, Table, ratio
from .suite import run_and_report, seconds_per_point, sizes_or_none

CPU_SIZES: Final = "4K,1M,16M,64M"
#: Latency is measured at the benchmarked sizes up to this one.
LAT_MAX_NBYTES: Final = 1 * MiB
BASELINES: Final = ("ours-no-poll", "streams-asyncio", "streams-uvloop", "streams-tensors",
                     "ceiling")
#: The streams with tensors for messages, and ours without busy polling, run where small
#: messages are measured: they say what delivering tensors costs on top of bytes, and what
#: busy polling buys and costs, which matter only there.
TENSOR_STREAMS_MAX_NBYTES: Final = 64 * KiB


def plan_cpu(sizes: list[int], seconds: float, repeat: int, ours_loop: str) -> list[Json]:
    phases = ([tput_phase(tput_label(n), n, seconds) for n in sizes]
              + [lat_phase(n, seconds) for n in sizes if n <= LAT_MAX_NBYTES])
    small = min(sizes) <= TENSOR_STREAMS_MAX_NBYTES
    impls = [("ours", ours_loop)]
    if small:
        impls.append(("ours-no-poll", ours_loop))
    impls.append(("streams-asyncio", "asyncio"))
    if have_uvloop():
        impls.append(("streams-uvloop", "uvloop"))
        if small:
            impls.append(("streams-tensors", "uvloop"))
    impls.append(("ceiling", ours_loop))
    cases = []
    for r in range(repeat):
        for impl, loop in impls:
            # Ours without polling at the small sizes only, where polling matters.
            ps = ([p for p in phases if p["nbytes"] <= TENSOR_STREAMS_MAX_NBYTES]
                  if impl == "ours-no-poll" else phases)
            cases.append({"impl": impl, "loop": loop, "repeat": r, "phases": ps,
                          "max_nbytes": max(p["nbytes"] for p in ps), "depth": DEPTH,
                          "transport": "tcp", "timeout_s": case_timeout(ps)})
    return cases


def cpu_report(summary: Summary, sizes: list[int]) -> tuple[str, list[Json]]:
    """The CPU run's table, and its targets in machine-readable form."""
    t = Table(summary, [b for b in BASELINES if b in summary])
    for n in sizes:
        label, target, ok = tput_label(n), "", None
        if n >= 16 * MiB:
            target, ok = t.ratio_at_least(f"throughput {format_size(n)} ours/ceiling", label,
                                          "ceiling", 0.85)
        elif n == 4 * KiB and "streams-uvloop" in summary:
            # Issue 10: small messages at least as fast as uvloop's streams.
            target, ok = t.ratio_at_least("throughput 4 KiB ours/uvloop streams", label,
                                          "streams-uvloop", 1.0)
        t.row("throughput GB/s", format_size(n), label, "gbps", ".3g", target, ok)
    for n in sizes:
        if n > LAT_MAX_NBYTES:
            continue
        label, target, ok = f"lat {format_size(n)}", "", None
        if n == 4 * KiB:
            ours = t.fig("ours", label, "p50_us")
            r_ceil = ratio(ours, t.fig("ceiling", label, "p50_us"))
            r_uv = ratio(ours, t.fig("streams-uvloop", label, "p50_us"))
            parts = [None if r_ceil is None else r_ceil <= 2.0,
                     None if r_uv is None else r_uv <= 1.2]
            target = "≤2×ceiling & ≤1.2×uvloop"
            ok = None if None in parts else all(parts)
            t.target("one-way p50 4 KiB ours/ceiling", r_ceil, 2.0, parts[0])
            t.target("one-way p50 4 KiB ours/uvloop streams", r_uv, 1.2, parts[1])
        t.row("one-way p50 µs", format_size(n), label, "p50_us", ".3g", target, ok)
        t.row("one-way p99 µs", format_size(n), label, "p99_us", ".3g")
        t.lat_cpu_row(n)
    t.loop_lag_row(max(sizes), 5.0)
    t.cpu_rows(sizes, ".2f")
    return t.render()


def run(args: argparse.Namespace, loop: str) -> int:
    """Run the CPU suite (``args`` as parsed by :func:`.cli.add_parser`) with ours and the
    ceiling on ``loop``; returns the exit status."""
    sizes = sizes_or_none(args, CPU_SIZES)
    if sizes is None:
        return 2
    seconds = seconds_per_point(args)
    repeat = args.repeat or (1 if args.quick else 3)

    def describe(info: Json, hellos: list[Json]) -> list[str]:
        return [f"device cpu ({info['cpu']}, {info['cpu_count']} cores)",
                (f"ours and the ceiling on {loop}; {repeat} repeat(s) × {seconds:g} s per "
                 f"point, medians; {DEPTH} sends in flight"),
                ("one-way latency = ping-pong round trip / 2; ratios are ours ÷ baseline "
                 "(throughput: higher is better, latency: lower is better); snd/rcv = sender/"
                 "receiver process")]

    return run_and_report(
        args, plan_cpu(sizes, seconds, repeat, loop), route="cpu", sender_device="cpu",
        receiver_device="cpu", sizes=sizes,
        settings={"sizes": sizes, "seconds": seconds, "repeat": repeat, "ours_loop": loop,
                  "depth": DEPTH},
        impls=["ours", *BASELINES], report=lambda summary: cpu_report(summary, sizes),
        describe=describe)
