"""``python -m aiokvpipe bench``: its options, and which suite they select.

The command (the *coordinator*) plans a suite's cases, runs them through two measured processes
(:mod:`.runner`, :mod:`.child`) and prints the table (:mod:`.report`). The same command with the
hidden ``--role`` option is a measured process.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections.abc import Callable
from typing import Any, Final

from . import blocks, cpu, gpu, ipc
from .child import child_main
from .common import have_uvloop
from .report import replot

#: Runs a suite: ``(args, event loop for ours)`` → exit status.
SuiteRun = Callable[[argparse.Namespace, str], int]

#: The suites, by the ``--device`` that selects them. A suite is ours on one transport beside
#: its baseline, measured in the same run: a module that plans cases, runs them and builds its
#: table (as cpu.py and gpu.py do), its baseline's measured side registered in impls.IMPLS.
#: To come, each a module and a line here, with the option that selects it:
#:   ipc:    two processes on one GPU, transport="ipc"; baseline: the consumer copying out of
#:           the producer's buffer mapped through CUDA IPC (BENCHMARKS.md, "GPU, one host").
SUITES: Final[dict[str, SuiteRun]] = {
    "cpu": cpu.run,
    "cuda": ipc.run_cuda,  # ipc on one GPU (or --transport ipc), nccl otherwise
}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench", help="measure throughput, latency and loop lag against baselines",
        description="Start a sender and a receiver process on this machine and measure our "
                    "pipe beside its baselines (BENCHMARKS.md), in the same run.")
    p.add_argument("--device", choices=tuple(SUITES), default="cpu",
                   help="cpu: tcp plane vs asyncio streams and the zero-copy ceiling; "
                        "cuda: nccl plane on cuda:0 → cuda:1 vs raw NCCL (default cpu)")
    p.add_argument("--transport", choices=("auto", "nccl", "ipc"), default="auto",
                   help="cuda only: ipc = two processes on cuda:0, the ipc plane against the "
                        "raw CUDA IPC copy, and the GPU memory one pipe costs per transport; "
                        "nccl = the nccl suite; auto (default): ipc on a one-GPU machine "
                        "unless --one-gpu, nccl otherwise. With --blocks: that plane only")
    p.add_argument("--sizes", default=None,
                   help=f"comma-separated message sizes (default {cpu.CPU_SIZES} on cpu, "
                        f"{gpu.GPU_SIZES} on cuda, {ipc.IPC_SIZES} for ipc)")
    p.add_argument("--seconds", type=float, default=None,
                   help="timed seconds per throughput point (default 1.0)")
    p.add_argument("--repeat", type=int, default=None,
                   help="repeats, interleaved across implementations; medians are reported "
                        "(default 3 on cpu, 1 on cuda)")
    p.add_argument("--quick", action="store_true",
                   help="a smaller, shorter set (cuda: fewer sizes, 0.5 s per point)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE as JSON")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw throughput against size (needs matplotlib)")
    p.add_argument("--replot", metavar="FILE.json",
                   help="measure nothing: draw --plot from the throughput figures of an "
                        "earlier run's --json")
    p.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=None,
                   help="run our pipe (and the ceiling) on uvloop (default: if installed)")
    p.add_argument("--one-gpu", action="store_true",
                   help="cuda on a one-GPU machine: both ends on cuda:0, NCCL told they are "
                        "two hosts (NCCL_HOSTID) so it runs over its socket transport. Checks "
                        "our overhead against raw NCCL under the same transport; the figures "
                        "are not NVLink figures")
    blocks.add_arguments(p)
    p.add_argument("--role", choices=("sender", "receiver"), help=argparse.SUPPRESS)
    p.add_argument("--role-device", default="cpu", help=argparse.SUPPRESS)
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Check the options, then run the suite they select (or, with ``--role``, serve as a
    measured process); returns the exit status (2: the options or the machine do not fit)."""
    if args.role:
        return child_main(args.role, args.role_device)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("bench: --plot needs matplotlib, which is not installed here "
              "(pip install matplotlib)", file=sys.stderr)
        return 2
    if args.replot:
        if not args.plot:
            print("bench: --replot needs --plot FILE.png", file=sys.stderr)
            return 2
        replot(args.replot, args.plot)
        return 0
    use_uvloop = have_uvloop() if args.uvloop is None else args.uvloop
    if use_uvloop and not have_uvloop():
        print("bench: --uvloop asked for, but uvloop is not installed", file=sys.stderr)
        return 2
    if args.seconds is not None and not args.seconds > 0:
        print("bench: --seconds must be positive", file=sys.stderr)
        return 2
    if args.repeat is not None and args.repeat < 1:
        print("bench: --repeat must be at least 1", file=sys.stderr)
        return 2
    if args.device == "cpu" and args.transport != "auto":
        print(f"bench: --transport {args.transport} is for --device cuda (the cpu suite "
              "measures tcp)", file=sys.stderr)
        return 2
    suite = blocks.run if args.blocks else SUITES[args.device]  # --blocks: on cpu or cuda
    return suite(args, "uvloop" if use_uvloop else "asyncio")
