"""``python -m aiokvpipe bench|doctor``: the command line (see ``--help``)."""

from __future__ import annotations

import argparse
import sys

from . import _doctor


def main(argv: list[str] | None = None) -> int:
    # The benchmark is a tool beside the runtime: imported here, when the command line is
    # built, and nowhere in the runtime.
    from .bench import cli as bench_cli

    parser = argparse.ArgumentParser(prog="python -m aiokvpipe",
                                     description="aiokvpipe's benchmark and self-check.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,doctor}")
    bench_cli.add_parser(sub)
    _doctor.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
