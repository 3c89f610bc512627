"""A measured process (``bench --role sender|receiver``): runs the cases the coordinator sends.

It speaks JSON lines (never pickle): a case in on stdin, a rendezvous and then the results or an
error out on stdout, until ``{"type": "exit"}`` or the end of stdin.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch

from .common import FAKE_UUID_ENV, Json
from .impls import IMPLS


def child_main(role: str, device: str) -> int:
    """Serve cases on stdin until told to exit; returns the process's exit status.

    The protocol gets the original stdout to itself; anything else written there (NCCL's logs)
    is sent to stderr instead.
    """
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def emit(msg: Json) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    fake_uuid = os.environ.get(FAKE_UUID_ENV)
    if fake_uuid:  # --one-gpu: both ends on one GPU must look like two to the handshake
        from .. import _connect

        async def fake_device_uuid(_device: object) -> bytes:
            return bytes.fromhex(fake_uuid)

        # ...and two hosts, or auto would pick ipc between them
        setattr(_connect, "device_uuid", fake_device_uuid)
        setattr(_connect, "host_id", lambda: bytes.fromhex(fake_uuid))
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        name = torch.cuda.get_device_name() if device.startswith("cuda") else None
        emit({"type": "hello", "role": role, "device": device, "device_name": name,
              "pid": os.getpid()})
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd.get("type") == "exit":
                break
            try:
                phases = IMPLS[cmd["impl"]].run(role, device, cmd, emit)
                emit({"type": "result", "phases": phases})
            except Exception:  # noqa: BLE001  -- reported to the coordinator, which goes on
                emit({"type": "error", "error": traceback.format_exc(limit=8)})
    except KeyboardInterrupt:
        return 130
    return 0
