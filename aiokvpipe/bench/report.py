"""What a run leaves behind: medians per implementation and phase, the table of ours beside
each baseline with its targets, the ``--json`` document and the ``--plot`` picture.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import socket
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import torch

from .common import Json, format_size, median, tput_label
from .impls import label as impl_label

#: ``summary[impl][phase label]`` → that phase's figures, medians over the repeats.
Summary = dict[str, dict[str, Json]]


def summarize(records: list[Json]) -> Summary:
    """Medians over repeats: ``summary[impl][phase label]``."""
    groups: dict[tuple[str, str], list[Json]] = {}
    for rec in records:
        groups.setdefault((rec["impl"], rec["label"]), []).append(rec)
    out: Summary = {}
    for (impl, label), recs in groups.items():
        fig: Json = {"kind": recs[0]["kind"], "nbytes": recs[0]["nbytes"], "runs": len(recs)}
        if fig["kind"] == "lat":
            fig["p50_us"] = median([r["sender"]["p50_us"] for r in recs])
            fig["p99_us"] = median([r["sender"]["p99_us"] for r in recs])
            for side, count in (("sender", "rounds"), ("receiver", "msgs")):
                per_round = [r[side]["cpu_s"] / r[side][count] * 1e6 for r in recs
                             if r[side].get("cpu_s") is not None and r[side].get(count)]
                if per_round:
                    fig[f"{side}_cpu_us_per_round"] = median(per_round)
        else:
            fig["gbps"] = median([r["sender"]["gbps"] for r in recs])
            for side in ("sender", "receiver"):
                fig[f"{side}_lag_p99_ms"] = median([r[side].get("lag_p99_ms", float("nan"))
                                                    for r in recs])
                fig[f"{side}_cpu_s_per_gb"] = median(
                    [r[side]["cpu_s"] / (r["sender"]["bytes"] / 1e9) for r in recs
                     if r["sender"]["bytes"]])
        out.setdefault(impl, {})[label] = fig
    return out


def fig_of(summary: Summary, impl: str, label: str, key: str) -> float | None:
    value = summary.get(impl, {}).get(label, {}).get(key)
    return float(value) if value is not None else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(x: float | None, spec: str = ".3g") -> str:
    """``spec`` ".3g" means three significant digits but never an exponent."""
    if x is None:
        return "—"
    if spec == ".3g" and abs(x) >= 100:
        return f"{x:.0f}"
    return format(x, spec)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns aligned: text left, the rest right."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    left = {0, 1, len(headers) - 2, len(headers) - 1}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])]
                     + [line(r) for r in rows])


def _short(impl: str) -> str:
    """A baseline's name in a ratio's column and a target: ``uvloop``, ``ceiling``, ``raw``."""
    return _SHORT.get(impl) or impl_label(impl).split()[0]


_SHORT: Final = {"ours-no-poll": "no-poll"}


class Table:
    """A suite's table: per row a metric of ours, each baseline's, ours ÷ each baseline, the
    target and its result; and the targets, machine-readable, for the JSON."""

    def __init__(self, summary: Summary, baselines: Sequence[str]) -> None:
        self.summary, self.bases = summary, list(baselines)
        self.headers = ["metric", "size", "ours", *[impl_label(b) for b in self.bases],
                        *[f"ours/{_short(b)}" for b in self.bases], "target", "result"]
        self.rows: list[list[str]] = []
        self.targets: list[Json] = []

    def fig(self, impl: str, label: str, key: str) -> float | None:
        return fig_of(self.summary, impl, label, key)

    def target(self, name: str, value: float | None, target: float, ok: bool | None) -> None:
        self.targets.append({"name": name, "value": value, "target": target, "pass": ok})

    def ratio_at_least(self, name: str, label: str, base: str, floor: float
                       ) -> tuple[str, bool | None]:
        """The target "ours ≥ ``floor`` × ``base``" in GB/s: its text and its result."""
        r = ratio(self.fig("ours", label, "gbps"), self.fig(base, label, "gbps"))
        ok = None if r is None else r >= floor
        self.target(name, r, floor, ok)
        return f"≥{floor:g}×{_short(base)}", ok

    def row(self, metric: str, size: str, label: str, key: str, spec: str, target: str = "",
            ok: bool | None = None) -> None:
        ours = self.fig("ours", label, key)
        vals = [self.fig(b, label, key) for b in self.bases]
        self.rows.append([metric, size, fmt(ours, spec), *[fmt(v, spec) for v in vals],
                          *[fmt(ratio(ours, v), ".2f") for v in vals], target,
                          verdict(ok) if target else ""])

    def _sides_row(self, metric: str, size: int, what: str, spec: str, target: str = "",
                   result: str = "", label: str | None = None) -> None:
        """Sender/receiver figures of every implementation, no ratios (of the throughput
        phase at ``size`` unless ``label`` names another)."""
        label = label or tput_label(size)
        self.rows.append([metric, format_size(size),
                          *[both_sides(self.summary, i, label, what, spec)
                            for i in ("ours", *self.bases)],
                          *[""] * len(self.bases), target, result])

    def loop_lag_row(self, size: int, limit_ms: float) -> None:
        """Our worse side's loop-lag p99 while ``size`` streams, against ``limit_ms``."""
        label = tput_label(size)
        lag = max((v for v in (self.fig("ours", label, "sender_lag_p99_ms"),
                               self.fig("ours", label, "receiver_lag_p99_ms"))
                   if v is not None), default=None)
        ok = None if lag is None else lag <= limit_ms
        self.target(f"loop lag p99 ms while {format_size(size)} streams (ours)", lag, limit_ms,
                    ok)
        self._sides_row("loop lag p99 ms snd/rcv", size, "lag_p99_ms", ".2f",
                        f"≤{limit_ms:g} ms", verdict(ok))

    def cpu_rows(self, sizes: Sequence[int], spec: str) -> None:
        for n in sizes:
            self._sides_row("CPU s/GB snd/rcv", n, "cpu_s_per_gb", spec)

    def lat_cpu_row(self, size: int, label: str | None = None) -> None:
        """CPU µs per ping-pong round trip on each side (what busy polling costs), of the
        phase ``label`` (default: the echo at ``size``)."""
        self._sides_row("CPU µs/round trip snd/rcv", size, "cpu_us_per_round", ".3g",
                        label=label or f"lat {format_size(size)}")

    def render(self) -> tuple[str, list[Json]]:
        return render_table(self.headers, self.rows), self.targets


def both_sides(summary: Summary, impl: str, label: str, what: str, spec: str) -> str:
    s = fig_of(summary, impl, label, f"sender_{what}")
    r = fig_of(summary, impl, label, f"receiver_{what}")
    return "—" if s is None and r is None else f"{fmt(s, spec)}/{fmt(r, spec)}"


# -- the run's description ----------------------------------------------------------------------


def host_info(device: str) -> Json:
    info: Json = {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "uvloop": _version_of("uvloop"),
        "device": device,
    }
    try:
        from .. import __version__

        info["aiokvpipe"] = __version__
    except ImportError:
        pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version_of(module: str) -> str | None:
    try:
        return importlib.metadata.version(module)
    except importlib.metadata.PackageNotFoundError:
        return None


def header_line(info: Json, date: str, what: str) -> str:
    uv = info["uvloop"] or "not installed"
    return (f"aiokvpipe {info.get('aiokvpipe', '?')} bench · {what} · {date} · "
            f"{info['hostname']} · Python {info['python']} · torch {info['torch']} · "
            f"uvloop {uv}")


def plot(path: str, sizes: list[int], series: dict[str, list[float | None]], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, values in series.items():
        points = [(s, v) for s, v in zip(sizes, values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [format_size(s) for s in sizes])
    ax.set_xlabel("message size (one tensor per message)")
    ax.set_ylabel("GB/s")
    ax.set_title(textwrap.fill(title, 110), fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def replot(json_path: str, png_path: str) -> None:
    """Draw throughput against size from a ``--json`` document: one line per implementation,
    titled with the run's device and date (a picture of a run made elsewhere, a GPU say)."""
    with open(json_path) as f:
        doc = json.load(f)
    points: dict[str, dict[int, float]] = {}
    for impl, figures in doc["summary"].items():
        for fig in figures.values():
            if fig.get("kind") == "tput" and fig.get("gbps"):
                points.setdefault(impl, {})[fig["nbytes"]] = fig["gbps"]
    sizes = sorted({n for by_size in points.values() for n in by_size})
    series: dict[str, list[float | None]] = {
        impl: [by_size.get(n) for n in sizes] for impl, by_size in points.items()}
    host = doc.get("host", {})
    title = (f"aiokvpipe bench {doc.get('date', '')[:10]} · {host.get('device', '')} · "
             f"{host.get('cpu', '')} · torch {host.get('torch', '')}")
    plot(png_path, sizes, series, title)


def finish(args: argparse.Namespace, info: Json, date: str, settings: Json,
           records: list[Json], errors: list[Json], summary: Summary,
           targets: list[Json], sizes: list[int], impls: list[str], notes: list[str],
           table: str) -> None:
    """Write the JSON and the plot if asked, print the errors, notes and the table last."""
    what = notes[0]
    if args.json:
        doc = {"tool": "aiokvpipe bench", "date": date, "command": " ".join(sys.argv),
               "argv": sys.argv, "host": info, "settings": settings, "summary": summary,
               "targets": targets, "records": records, "errors": errors}
        Path(args.json).write_text(json.dumps(_finite(doc), indent=1, allow_nan=False) + "\n")
    if args.plot:
        series = {impl_label(i): [fig_of(summary, i, tput_label(n), "gbps") for n in sizes]
                  for i in impls if i in summary}
        plot(args.plot, sizes, series, header_line(info, date, what))
    for err in errors:
        print(f"ERROR {impl_label(err['impl'])} repeat {err['repeat'] + 1}: "
              f"{err['error'].splitlines()[-1] if err['error'] else ''}")
    print(header_line(info, date, what))
    for note in notes[1:]:
        print(f"  {note}")
    print(table)


def _finite(obj: Any) -> Any:
    """NaN and infinities (a figure nobody measured) become null: strict JSON has neither."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj
