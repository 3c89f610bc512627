"""The other end of tests/test_ipc_cuda.py: an IpcPlane signalling over an inherited socket
(``ipc_link.py``), driven by JSON-line commands on stdin, answering with JSON-line events on
stdout.

    python tests/ipc_peer.py SOCK_FD DEVICE MODE

Commands: ``{"op": "echo", "specs": [[code, shape], ...]}`` receives one message and sends
it back; ``{"op": "send", "specs": ..., "fill": v, "sleep_cycles": n}`` sends tensors whose
value ``v`` is written by a kernel queued behind ``n`` cycles of GPU sleep (stream order);
``{"op": "recv_check", "specs": ..., "fill": v}`` receives and checks every element is ``v``;
``{"op": "export_small"}`` answers the handle of a 4 KiB allocation; ``{"op": "exit"}``.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from ipc_link import plane_on_socket  # noqa: E402

from aiokvpipe import _dtypes  # noqa: E402
from aiokvpipe._ipc_plane import IpcPlane  # noqa: E402
from aiokvpipe._ipc_probe import export_probe  # noqa: E402
from aiokvpipe._wire import TensorSpec  # noqa: E402


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def specs_of(raw: list[list[Any]]) -> list[TensorSpec]:
    out = []
    for code, shape in raw:
        out.append(TensorSpec(code, tuple(shape), _dtypes.DTYPE_OF[code].itemsize))
    return out


async def main() -> None:
    sock_fd, device_name, mode = sys.argv[1:4]
    device = torch.device(device_name)
    torch.cuda.set_device(device)
    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=int(sock_fd))
    plane: IpcPlane | None = None

    def lost(exc: BaseException) -> None:
        say("lost", error=repr(exc))
        if plane is not None:
            plane.abort(exc)

    plane, link = await plane_on_socket(sock, device, lost, mode=mode)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    say("ready", pid=__import__("os").getpid())
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        try:
            if op == "echo":
                got = await plane.post_recv(specs_of(cmd["specs"]))
                await plane.post_send(got)
                say("echoed")
            elif op == "send":
                tensors = [torch.zeros(s.shape, dtype=_dtypes.DTYPE_OF[s.dtype], device=device)
                           for s in specs_of(cmd["specs"])]
                torch.cuda.synchronize(device)
                torch.cuda._sleep(int(cmd.get("sleep_cycles", 0)))
                for t in tensors:
                    t.fill_(cmd["fill"])
                done = plane.post_send(tensors)
                say("posted")
                await done
                say("sent")
            elif op == "recv_check":
                got = await plane.post_recv(specs_of(cmd["specs"]))
                ok = all(bool((t == cmd["fill"]).all()) for t in got)
                say("checked", ok=ok)
            elif op == "export_small":
                say("exported", handle=(await export_probe(device)).hex())
            elif op == "exit":
                plane.close()
                link.abort()
                await plane.released
                say("bye")
                return
            else:
                say("error", error=f"unknown op {op}")
        except Exception as exc:  # reported to the test, which decides
            say("failed", op=op, error=repr(exc))


if __name__ == "__main__":
    asyncio.run(main())
