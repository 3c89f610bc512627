"""What every suite does around its own plan and table: read the common options, run the cases
through the two measured processes, summarise, report.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
import time
from collections.abc import Callable

from .common import Json, parse_sizes
from .report import Summary, finish, host_info, summarize
from .runner import run_cases


def sizes_or_none(args: argparse.Namespace, default: str) -> list[int] | None:
    """``--sizes`` (or ``default``) parsed; None, said on stderr, when it is not sizes."""
    try:
        return parse_sizes(args.sizes or default)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return None


def seconds_per_point(args: argparse.Namespace) -> float:
    return float(args.seconds or (0.5 if args.quick else 1.0))


def run_and_report(args: argparse.Namespace, cases: list[Json], *, route: str,
                   sender_device: str, receiver_device: str, sizes: list[int],
                   settings: Json, impls: list[str],
                   report: Callable[[Summary], tuple[str, list[Json]]],
                   describe: Callable[[Json, list[Json]], list[str]]) -> int:
    """Run ``cases``, print the table and write what ``--json``/``--plot`` ask for; returns
    the exit status (1 when a case failed).

    ``describe(info, hellos)`` gives the lines above the table (the first names the run, for
    the header and the plot's title); it may add to ``info`` (the JSON's ``host``) what the
    measured processes said when they started.
    """
    date = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    info = host_info(route)
    started = time.perf_counter()
    records, errors, hellos = asyncio.run(run_cases(cases, sender_device, receiver_device))
    notes = describe(info, hellos)
    summary = summarize(records)
    table, targets = report(summary)
    settings = {**settings, "wall_s": time.perf_counter() - started}
    finish(args, info, date, settings, records, errors, summary, targets, sizes, impls, notes,
           table)
    return 1 if errors else 0
