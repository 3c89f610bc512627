"""``python -m aiokvpipe doctor``: what this machine can do, and what ``transport="auto"`` picks.

Every probe is fenced: a missing or broken CUDA, CuPy or uvloop is reported, never raised.
The transport verdicts come from the handshake's own decision,
:func:`aiokvpipe._handshake.choose_transport`, on capabilities built exactly as a pipe builds
them (:func:`aiokvpipe._connect._local_caps`).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import importlib.metadata
import json
import platform
import sys
from typing import Any

import torch

Json = dict[str, Any]


def _fenced(probe: Any) -> Json:
    try:
        result: Json = probe()
        return result
    except Exception as exc:  # noqa: BLE001  -- doctor reports what is broken, never fails
        return {"error": f"{type(exc).__name__}: {exc}"}


def _python() -> Json:
    return {"version": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable, "platform": platform.platform()}


def _torch() -> Json:
    return {"version": torch.__version__, "cuda_build": torch.version.cuda}


def _cuda() -> Json:
    if torch.version.cuda is None:
        return {"available": False, "why": "this torch was built without CUDA", "devices": []}
    if not torch.cuda.is_available():
        return {"available": False, "why": "no CUDA device or driver visible", "devices": []}
    devices = []
    for i in range(torch.cuda.device_count()):
        props: Any = torch.cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name, "uuid": str(getattr(props, "uuid", "")),
                        "memory_bytes": int(props.total_memory),
                        "capability": f"{props.major}.{props.minor}"})
    return {"available": True, "devices": devices}


def _cupy() -> Json:
    try:
        import cupy
    except ImportError:
        return {"installed": False,
                "why": "not installed (pip install 'aiokvpipe[cuda12]' or '[cuda13]')"}
    info: Json = {"installed": True, "version": cupy.__version__}
    try:
        info["cuda_runtime"] = int(cupy.cuda.runtime.runtimeGetVersion())
        info["cuda_driver"] = int(cupy.cuda.runtime.driverGetVersion())
    except Exception as exc:  # noqa: BLE001  -- CuPy imports without a driver, then fails
        info["cuda_error"] = f"{type(exc).__name__}: {exc}"
    try:
        from cupy.cuda import nccl

        info["nccl"] = bool(nccl.available)
        info["nccl_version"] = int(nccl.get_version()) if nccl.available else None
    except Exception as exc:  # noqa: BLE001  -- a CuPy built without NCCL, a missing libnccl
        info["nccl"] = False
        info["nccl_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _ipc() -> Json:
    """Whether this process can take part in CUDA IPC, and why not."""
    from . import _ipc_probe

    ok, why = _ipc_probe.ipc_info()
    info: Json = {"possible": ok, "why": why, "host_id": _ipc_probe.host_id().hex()}
    note = _ipc_probe.allocator_note()
    if note:
        info["note"] = note
    if ok and torch.cuda.device_count() > 1:
        from . import _cudaipc

        n = torch.cuda.device_count()
        info["peer_access"] = {f"cuda:{i}-cuda:{j}": _cudaipc.can_access_peer(i, j)
                               for i in range(n) for j in range(n) if i < j}
    return info


def _uvloop() -> Json:
    try:
        return {"installed": True, "version": importlib.metadata.version("uvloop")}
    except importlib.metadata.PackageNotFoundError:
        return {"installed": False}


def _auto_transport() -> Json:
    """What ``auto`` would choose against a peer like this machine, in three situations."""
    from . import _connect, _handshake, _ipc_probe
    from ._options import PipeOptions

    opts = PipeOptions()  # transport="auto", as a user gets it
    ipc_ok = _ipc_probe.ipc_info()[0]

    def caps(device: torch.device) -> Any:
        # What the handshake would send (doctor runs outside any event loop).
        c = asyncio.run(_connect._local_caps(opts, device))
        return dataclasses.replace(c, ipc=c.ipc and ipc_ok)

    cpu = caps(torch.device("cpu"))
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        verdict = _verdict(_handshake, cpu, cpu, "no CUDA device here, so a peer like this "
                           "machine, on another GPU or the same, uses device='cpu'")
        return {"other_gpu": verdict, "same_gpu": verdict, "cpu_peer": verdict}
    here = caps(torch.device("cuda", 0))
    peers = True  # (a like machine's GPU: the handshake's probe decides there)
    if torch.cuda.device_count() > 1:
        other = caps(torch.device("cuda", 1))
        other_note = "cuda:0 ↔ cuda:1 of this machine"
        from . import _cudaipc
        try:  # without peer access the peer's handle does not open: no ipc
            peers = _cudaipc.can_access_peer(0, 1)
        except Exception:  # noqa: BLE001  -- CuPy missing or broken: not proven either
            peers = False
    else:  # one GPU: a like machine's GPU, which only its UUID (and host) tell apart
        other = dataclasses.replace(here, device_uuid=bytes(b ^ 0xFF for b in here.device_uuid),
                                    host_id=bytes(b ^ 0xFF for b in here.host_id))
        other_note = "this machine has one GPU: a peer like it on another machine's GPU"
    return {"other_gpu": _verdict(_handshake, here, other, other_note, proven=peers),
            "same_gpu": _verdict(_handshake, here, here, "two processes on cuda:0"),
            "cpu_peer": _verdict(_handshake, here, cpu, "cuda:0 ↔ a peer with device='cpu'")}


def _verdict(hs: Any, a: Any, b: Any, note: str, proven: bool = True) -> Json:
    # The handshake proves ipc by opening the peer's handle; doctor has no peer and assumes
    # the proof holds wherever the capabilities allow ipc (and says so), unless ``proven``
    # is False: two GPUs of this machine without peer access.
    try:
        chosen = hs.choose_transport(a, b, ipc_proven=proven).name.lower()
    except hs.NoTransport as exc:
        return {"transport": None, "why": str(exc), "situation": note}
    if chosen == "ipc":
        why = ("one host, CUDA IPC at both ends (if the peer's handle opens here: "
               "proven at the handshake)")
        return {"transport": chosen, "why": why, "situation": note}
    why = hs.nccl_possible(a, b)
    if why is None:
        why = f"different GPUs, CuPy with NCCL {nccl_version(a.nccl_version)} at both ends"
    why_not_ipc = hs.ipc_possible(a, b)
    if why_not_ipc is None and not proven:
        why_not_ipc = "no peer access between the two GPUs (the peer's handle would not open)"
    if why_not_ipc and a.cuda and b.cuda:
        why += f"; not ipc: {why_not_ipc}"
    return {"transport": chosen, "why": why, "situation": note}


def collect() -> Json:
    """Everything doctor reports, as plain JSON-able data."""
    from . import __version__

    return {"aiokvpipe": __version__, "python": _fenced(_python), "torch": _fenced(_torch),
            "cuda": _fenced(_cuda), "cupy": _fenced(_cupy), "uvloop": _fenced(_uvloop),
            "ipc": _fenced(_ipc),
            "auto_transport": _fenced(_auto_transport)}


def nccl_version(code: int) -> str:
    """NCCL's version code as text: 22809 → "2.28.9" (the scheme of NCCL ≥ 2.9)."""
    return f"{code // 10000}.{code // 100 % 100}.{code % 100}"


def _nccl_line(c: Json) -> str:
    if not c.get("installed"):
        return "not available (needs CuPy)"
    if c.get("nccl"):
        return f"{nccl_version(int(c['nccl_version']))} (via CuPy)"
    return f"not available in this CuPy {c.get('nccl_error', '')}".rstrip()


def render(info: Json) -> str:
    lines = [f"aiokvpipe {info['aiokvpipe']} doctor"]
    py, tc, cu, cp, uv = (info[k] for k in ("python", "torch", "cuda", "cupy", "uvloop"))

    def add(name: str, text: str) -> None:
        lines.append(f"  {name:<9} {text}")

    add("python", f"{py.get('version')} ({py.get('implementation')}, {py.get('executable')})"
        if "error" not in py else py["error"])
    add("platform", str(py.get("platform", "?")))
    add("torch", f"{tc.get('version')}, " + (f"built for CUDA {tc['cuda_build']}"
                                             if tc.get("cuda_build") else "built without CUDA"))
    if "error" in cu:
        add("CUDA", f"could not be queried: {cu['error']}")
    elif not cu["available"]:
        add("CUDA", f"not available: {cu['why']}")
    else:
        add("CUDA", f"{len(cu['devices'])} device(s)")
        for d in cu["devices"]:
            add("", f"cuda:{d['index']} {d['name']} · {d['memory_bytes'] / 2**30:.1f} GiB · "
                f"sm {d['capability']} · {d['uuid']}")
    if "error" in cp:
        add("CuPy", f"broken: {cp['error']}")
    elif not cp["installed"]:
        add("CuPy", cp["why"])
    else:
        extra = f", {cp['cuda_error']}" if "cuda_error" in cp else ""
        add("CuPy", f"{cp['version']}{extra}")
    add("NCCL", _nccl_line(cp) if "error" not in cp else "unknown")
    ipc = info.get("ipc", {})
    if "error" in ipc:
        add("CUDA IPC", f"could not be checked: {ipc['error']}")
    else:
        add("CUDA IPC", ("possible" if ipc.get("possible") else "not possible") +
            f": {ipc.get('why')}" + (f"; {ipc['note']}" if ipc.get("note") else ""))
        for pair, ok in ipc.get("peer_access", {}).items():
            add("", f"{pair}: {'peer access' if ok else 'no peer access (ipc refused)'}")
    add("uvloop", uv.get("version") if uv.get("installed") else
        "not installed (asyncio's own loop is used)")
    lines.append('transport="auto" would choose, against a peer like this machine:')
    auto = info["auto_transport"]
    if "error" in auto:
        lines.append(f"  could not be worked out: {auto['error']}")
        return "\n".join(lines)
    if auto["other_gpu"] == auto["same_gpu"] == auto["cpu_peer"]:  # no GPU: one answer
        v = auto["cpu_peer"]
        lines.append(f"  any peer: {v['transport'] or 'refused'}  ({v['situation']}; "
                     f"nccl needs {v['why'].removeprefix('both ends need ')})")
        return "\n".join(lines)
    for key, name in (("other_gpu", "peer on another GPU of this machine"),
                      ("same_gpu", "peer on the same GPU"),
                      ("cpu_peer", "peer with device='cpu'")):
        v = auto[key]
        lines.append(f"  {name + ':':<38} {v['transport'] or 'refused'}  ({v['why']}; "
                     f"{v['situation']})")
    return "\n".join(lines)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="report CUDA, CuPy/NCCL, uvloop and the auto transport",
                       description="Report what this machine offers aiokvpipe and which data "
                                   "plane transport='auto' would choose.")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    info = collect()
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0
