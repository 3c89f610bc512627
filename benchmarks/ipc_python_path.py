"""The ipc pipe's own Python a message, on a machine without a GPU (development probe).

Two pipes with real ipc planes in one process, over a socketpair, with CUDA replaced at the
narrowest seams: the driver calls of ``_cudaipc`` (a copy is a ``memmove``; a handle is the
address itself, opened in the same process), ``torch.cuda``'s events and streams (always
complete), the device index. Everything else, the wire, the protocol, the pipe, the plane's
records, ledgers, targets, polls and acknowledgements, runs as it does on a GPU. The figure
is the CPU time a message costs both ends together, with none of the CUDA calls': compare
two versions of the package on one machine, alternated (the host sets the absolute figure).

- ``tput``: 4 KiB messages, 8 sends in flight (the bench's throughput shape);
- ``lat``: a 4 KiB message answered by one without payload (the bench's one-way shape).

    python benchmarks/ipc_python_path.py tput|lat [MESSAGES] [--repeat N] [--profile KEY]

Never import this from the package: it patches ``torch.cuda`` for the whole process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import pstats
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvloop  # noqa: E402

from aiokvpipe import _cudaipc, _ipc_plane  # noqa: E402
from aiokvpipe._control import ControlChannel  # noqa: E402
from aiokvpipe._pipe import Pipe  # noqa: E402

CPU = torch.device("cpu")
WINDOW = (512 << 20) + (64 << 10)  # the default receive credits
DEPTH = 8
#: CPU memory standing in for CUDA allocations: base → (buffer id, size).
_ALLOCATIONS: dict[int, tuple[int, int]] = {}


def _allocation_of(ptr: int) -> _cudaipc.Allocation:
    for base, (buffer_id, size) in _ALLOCATIONS.items():
        if base <= ptr < base + size:
            return _cudaipc.Allocation(buffer_id, base, size, True)
    raise RuntimeError(f"no allocation holds {ptr:#x}")


class _Done:
    """An event or stream whose work is always complete."""

    cuda_stream = 0

    def query(self) -> bool:
        return True

    def record(self, stream: object = None) -> None:
        pass

    def wait_event(self, event: object) -> None:
        pass

    def synchronize(self) -> None:
        pass


def fake_cuda() -> None:
    """Replace the CUDA calls the ipc plane makes (see the module docstring)."""
    stream = _Done()
    patches: dict[object, dict[str, object]] = {
        _cudaipc: {
            "allocation_of": _allocation_of,
            "buffer_id_of": lambda ptr: _allocation_of(ptr).buffer_id,
            "export_memory": lambda base: base.to_bytes(8, "little") + bytes(56),
            "open_memory": lambda handle, index: int.from_bytes(handle[:8], "little"),
            "close_memory": lambda ptr: None,
            "copy_async": lambda dst, src, n, stream: ctypes.memmove(dst, src, n),
            "set_device": lambda index: None,
        },
        _ipc_plane: {
            "_index": lambda device: 0,
            "current_stream": lambda device: stream,
            "recycle_streams": lambda streams: None,
            "after_pending_work": lambda device: None,
        },
        torch.cuda: {"current_device": lambda: 0, "Event": _Done,
                     "set_stream": lambda stream: None},
    }
    for owner, names in patches.items():
        for name, value in names.items():
            setattr(owner, name, value)


async def pipe_pair() -> tuple[Pipe, Pipe]:
    loop = asyncio.get_running_loop()
    pipes: list[Pipe] = []
    for sock in socket.socketpair():
        _, channel = await loop.create_connection(ControlChannel, sock=sock)
        owner: list[Pipe] = []

        def on_lost(exc: BaseException, owner: list[Pipe] = owner) -> None:
            owner[0]._break(exc)

        plane = _ipc_plane.IpcPlane(CPU, on_lost, "segments", 1 << 20,
                                    [_Done(), _Done()])  # type: ignore[list-item]
        pipe = Pipe(channel, plane, device=CPU, max_inflight_bytes=512 << 20,
                    recv_buffer_bytes=WINDOW, peer_credits=WINDOW, heartbeat_interval=None,
                    heartbeat_timeout=None)
        owner.append(pipe)
        pipes.append(pipe)
    return pipes[0], pipes[1]


async def run(mode: str, n: int, repeat: int, profile: str | None) -> None:
    a, b = await pipe_pair()
    x = torch.zeros(4096, dtype=torch.uint8)
    _ALLOCATIONS[x.data_ptr()] = (1, x.numel())

    async def receive(count: int) -> None:
        for _ in range(count):
            await b.recv()
            if mode == "lat":
                await b.send(None, "pong")

    async def send(count: int) -> None:
        if mode == "lat":
            for _ in range(count):
                await a.send(x)
                await a.recv("pong")
            return
        left = [count]

        async def one() -> None:
            while left[0] > 0:
                left[0] -= 1
                await a.send(x)

        await asyncio.gather(*(one() for _ in range(DEPTH)))

    await asyncio.gather(send(300), receive(300))  # warm-up: regions mapped, caches filled
    prof = cProfile.Profile() if profile else None
    runs = []
    for _ in range(repeat):
        if prof:
            prof.enable()
        c0 = time.process_time()
        await asyncio.gather(send(n), receive(n))
        runs.append((time.process_time() - c0) / n * 1e6)
        if prof:
            prof.disable()
    runs.sort()
    print(f"{mode}: CPU µs a message, both ends: min {runs[0]:.1f}, median "
          f"{runs[len(runs) // 2]:.1f} ({repeat} runs of {n}{', profiled' if prof else ''})")
    if prof:
        pstats.Stats(prof).sort_stats(profile or "tottime").print_stats(40)
    await a.aclose()
    await b.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("tput", "lat"))
    ap.add_argument("messages", nargs="?", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", metavar="KEY", help="cProfile, sorted by KEY (tottime, ...)")
    args = ap.parse_args()
    fake_cuda()
    uvloop.run(run(args.mode, args.messages, args.repeat, args.profile))


if __name__ == "__main__":
    main()
