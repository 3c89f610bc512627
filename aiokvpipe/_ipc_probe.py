"""What the handshake and ``doctor`` ask of CUDA IPC before any pipe exists: which host
this is (:func:`host_id`), whether this process can use CUDA IPC and why not
(:func:`ipc_info`), and the probe that proves two processes can open each other's
handles: one end exports a small allocation (:func:`export_probe`), the other opens it
(:func:`probe_opens`), each in a worker thread, never on the event loop. CuPy is imported
lazily: without it :func:`ipc_info` says so.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import uuid

import torch

from . import _cudaipc
from ._cuda import short_gil_turns
from ._plane import in_daemon_thread
from ._wire import HOST_ID_BYTES

log = logging.getLogger("aiokvpipe")



def host_id() -> bytes:
    """16 bytes naming this host's kernel boot (``/proc/sys/kernel/random/boot_id``); zeros
    when it cannot be read. Two processes with the same id run under one kernel."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(HOST_ID_BYTES)


def ipc_info() -> tuple[bool, str]:
    """(this process can use CUDA IPC, why or why not); never raises, initialises no GPU."""
    if not sys.platform.startswith("linux"):
        return False, "CUDA IPC needs Linux"
    try:
        if not torch.cuda.is_available():
            return False, "no CUDA device here"
    except Exception as exc:  # a broken driver install
        return False, f"CUDA unusable: {exc}"
    try:
        _cudaipc.runtime()
    except Exception as exc:  # ImportError, or a CuPy that finds no runtime
        return False, f"needs CuPy (pip install 'aiokvpipe[cuda12]' or '[cuda13]'): {exc}"
    try:
        _cudaipc.load_driver()
    except OSError as exc:
        return False, f"cannot load the CUDA driver library: {exc}"
    if host_id() == bytes(HOST_ID_BYTES):
        return False, "cannot tell which host this is (/proc/sys/kernel/random/boot_id)"
    return True, f"CUDA IPC available (CUDA runtime {_runtime_version()} through CuPy)"


_info: tuple[bool, str] | None = None


async def ipc_info_async() -> tuple[bool, str]:
    """:func:`ipc_info`, found once per process in a worker thread: the first call imports
    CuPy and loads the CUDA driver library, tens of milliseconds the event loop must not
    wait for (it held a connecting end's loop for 66 ms on an H200)."""
    global _info
    if _info is None:
        with short_gil_turns():
            _info = await asyncio.to_thread(ipc_info)
    return _info


def allocator_note() -> str | None:
    """Why tensors would go through the staging ring (two copies), if they would."""
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + os.environ.get(
        "PYTORCH_ALLOC_CONF", "")
    if "expandable_segments:true" in conf.replace(" ", "").lower():
        return ("torch's allocator uses expandable segments, which CUDA IPC cannot export: "
                "tensors are staged through the ipc ring (two copies instead of one)")
    return None


def _runtime_version() -> str:
    """The CUDA runtime version CuPy's bindings use, as "13.0" (no CUDA context needed)."""
    try:
        v = int(_cudaipc.runtime().runtimeGetVersion())
        return f"{v // 1000}.{v % 1000 // 10}"
    except Exception:  # noqa: BLE001 - only for the message
        return "?"


_probes: dict[int, tuple[int, bytes]] = {}
_probes_lock = threading.Lock()


async def export_probe(device: torch.device) -> bytes:
    """The IPC handle of a small allocation this process keeps on ``device`` (made once, in a
    worker thread), for a peer's :func:`probe_opens`. Raises ``RuntimeError`` if CUDA IPC
    does not work here (``ImportError`` without CuPy)."""
    index = device_index(device)
    made = _probes.get(index)
    if made is not None:  # every handshake asks, before the peer authenticated: no thread
        return made[1]

    def make() -> bytes:
        with _probes_lock:
            if index not in _probes:
                ptr = _cudaipc.malloc(4096, index)
                _probes[index] = (ptr, _cudaipc.export_memory(ptr))
            return _probes[index][1]

    result: bytes = await in_daemon_thread(make, "aiokvpipe-ipc")
    return result


async def probe_opens(handle: bytes, device: torch.device) -> bool:
    """Whether the peer's probe ``handle`` opens on ``device`` here (opened in a worker thread
    and closed again). False, never an exception, for anything that does not open: garbage,
    a handle of this very process, another container, GPUs without peer access."""
    if len(handle) != _cudaipc.IPC_HANDLE_BYTES:
        return False
    index = device_index(device)

    def attempt() -> bool:
        ptr = _cudaipc.open_memory(handle, index)
        try:
            return _cudaipc.allocation_of(ptr).size > 0
        finally:
            _cudaipc.close_memory(ptr)

    try:
        return bool(await in_daemon_thread(attempt, "aiokvpipe-ipc"))
    except Exception as exc:  # CUDARuntimeError, DriverError, ImportError
        log.debug("the peer's ipc probe handle does not open here: %r", exc)
        return False


def device_index(device: torch.device) -> int:
    if device.type != "cuda":
        raise ValueError(f"CUDA IPC needs a CUDA device, not {device}")
    return torch.cuda.current_device() if device.index is None else device.index

