"""The ipc pipe's own Python a message, on a machine without a GPU (development probe).

Two pipes with real ipc planes in one process, over a socketpair, with CUDA replaced at the
narrowest seams: the driver calls of ``_cudaipc`` (a copy is a ``memmove`` at once; a handle
is the address itself, opened in the same process), ``torch.cuda``'s events and streams
(always complete; ``--check`` makes both late, below), the device index. Everything else,
the wire, the protocol, the pipe, the plane's records, ledgers, targets, polls and
acknowledgements, runs as it does on a GPU. The figure is the CPU time a message costs both
ends together, with none of the CUDA calls': compare two versions of the package on one
machine, alternated (the host sets the absolute figure).

- ``tput``: 4 KiB messages, 8 sends in flight (the bench's throughput shape);
- ``lat``: a 4 KiB message answered by one without payload (the bench's one-way shape).

``--check`` makes it a test of that path instead: messages from 64 tensors in turn, each its
own allocation, checked on arrival, whole and in order. Message k's bytes are all k % 251,
written just before it is sent, and 255 once its send() returned (the caller may reuse the
memory then): a copy that runs after the sender was told it completed delivers 255s. Copies
run late, as on a GPU: ``copy_async`` queues one on its stream, and it runs (in order) only
when an event recorded after it is seen complete, or its stream is seen idle or synchronized.
One stream query in five finds the caller's stream busy and every event completes only at
its third query, so that sends also go by record (after their data is "ready"), behind one
another and between notes, and copies are polled more than once; one tensor in seven cannot
be exported and goes through the staging ring (two copies, its record waiting for the
first); two messages in four go as two halves of their tensor (a COPY record of two pieces,
written with the header). The receiver's copies are awaited in batches of two messages at
most (``_BATCH_BYTES`` cut down), and ``tput`` sends in rounds of 40, each drained before
the next posts 8 sends at once: those arrive in one read, noted headers among records, so
that a copy enqueued out of the sender's order lands batches behind later messages' copies,
is acknowledged with them, and runs after the sender reused its memory. (One batch behind,
it would still run first: its event completes two polls after the acknowledgement left,
before the sender's send() has returned.) It prints how many went each way.

    python benchmarks/ipc_python_path.py tput|lat [MESSAGES] [--repeat N] [--profile KEY]
        [--check]

Never import this from the package: it patches ``torch.cuda`` for the whole process.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import ctypes
import functools
import pstats
import random
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import uvloop  # noqa: E402

from aiokvpipe import _cudaipc, _ipc_plane  # noqa: E402
from aiokvpipe._control import ControlChannel  # noqa: E402
from aiokvpipe._options import default_budgets  # noqa: E402
from aiokvpipe._pipe import Pipe  # noqa: E402

CPU = torch.device("cpu")
MAX_INFLIGHT, WINDOW = default_budgets("ipc")  # an ipc pipe's default budget and credits
DEPTH = 8
#: ``--check``: what a sent tensor holds once send() returned (message k holds k % 251).
REUSED = 255
#: ``--check``: tput sends in rounds of this many messages, each round drained (every send
#: complete) before the next starts with DEPTH sends posted at once.
ROUND = 40
#: CPU memory standing in for CUDA allocations: base → (buffer id, size, exportable).
_ALLOCATIONS: dict[int, tuple[int, int, bool]] = {}
_BUFFERS: list[ctypes.Array[ctypes.c_char]] = []  # what _malloc handed out, kept alive


def _allocation_of(ptr: int) -> _cudaipc.Allocation:
    # A snapshot, taken in one C call under the GIL: the plane asks from worker threads
    # (exports, opens) while another may add the staging ring (_malloc).
    for base, (buffer_id, size, exportable) in tuple(_ALLOCATIONS.items()):
        if base <= ptr < base + size:
            return _cudaipc.Allocation(buffer_id, base, size, exportable)
    raise RuntimeError(f"no allocation holds {ptr:#x}")


def _malloc(nbytes: int, index: int) -> int:
    """The staging ring's ``cudaMalloc``."""
    buffer = ctypes.create_string_buffer(nbytes)
    _BUFFERS.append(buffer)
    base = ctypes.addressof(buffer)
    _ALLOCATIONS[base] = (1000 + len(_BUFFERS), nbytes, True)
    return base


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


#: ``--check``: the fake streams by handle (what ``copy_async`` is given).
_STREAMS: dict[int, _Stream] = {}


class _Stream(_Done):
    """``--check``: a stream whose copies run late, as on a GPU: ``copy_async`` only queues
    one; it runs (a ``memmove``, in launch order) once an event recorded after it is seen
    complete, the stream is seen idle or synchronized. A copy queued after ``wait_event``
    runs after the event's own stream has run what was queued on it before the record."""

    def __init__(self) -> None:
        self.cuda_stream = len(_STREAMS) + 1
        _STREAMS[self.cuda_stream] = self
        self._queued: deque[Callable[[], object]] = deque()
        self.launched = 0  # ops queued on this stream so far (copies and waits)

    def launch(self, op: Callable[[], object]) -> None:
        self._queued.append(op)
        self.launched += 1

    def run_to(self, mark: int) -> None:
        """Run what was queued before ``launched`` was ``mark``."""
        while self._queued and self.launched - len(self._queued) < mark:
            self._queued.popleft()()

    def wait_event(self, event: _Late) -> None:  # type: ignore[override]
        if event.at is not None:
            stream, mark = event.at
            self.launch(functools.partial(stream.run_to, mark))

    def query(self) -> bool:
        self.synchronize()  # an idle stream has run everything
        return True

    def synchronize(self) -> None:
        self.run_to(self.launched)


def _copy_late(dst: int, src: int, n: int, stream: int) -> None:
    """``--check``'s ``copy_async``: queued on its stream (see _Stream)."""
    _STREAMS[stream].launch(functools.partial(ctypes.memmove, dst, src, n))


class _Late(_Done):
    """``--check``: an event that completes at its third query after being recorded (a send
    may then be posted while an earlier one's ring copy, queried once, is still running);
    the copies queued on its stream before the record run when it is first seen complete."""

    def __init__(self) -> None:
        self._pending = 0
        self.at: tuple[_Stream, int] | None = None  # its stream, and what ran before it

    def record(self, stream: object = None) -> None:
        assert isinstance(stream, _Stream)
        self._pending = 2
        self.at = (stream, stream.launched)

    def query(self) -> bool:
        if self._pending:
            self._pending -= 1
            return False
        self.synchronize()
        return True

    def synchronize(self) -> None:
        if self.at is not None:
            stream, mark = self.at
            self.at = None
            stream.run_to(mark)


class _Busy(_Stream):
    """``--check``: a stream busy at one query in five, drawn from a seeded generator (a
    fixed period would fall on the same call of each message's sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self._draw = random.Random(5).random

    def query(self) -> bool:
        if self._draw() < 0.2:
            return False
        return super().query()


def fake_cuda(check: bool) -> None:
    """Replace the CUDA calls the ipc plane makes (see the module docstring)."""
    stream = _Busy() if check else _Done()
    patches: dict[object, dict[str, object]] = {
        _cudaipc: {
            "allocation_of": _allocation_of,
            "buffer_id_of": lambda ptr: _allocation_of(ptr).buffer_id,
            "export_memory": lambda base: base.to_bytes(8, "little") + bytes(56),
            "open_memory": lambda handle, index: int.from_bytes(handle[:8], "little"),
            "close_memory": lambda ptr: None,
            "copy_async": _copy_late if check else (
                lambda dst, src, n, stream: ctypes.memmove(dst, src, n)),
            "set_device": lambda index: None,
            "malloc": _malloc,
            "free": lambda ptr, index: None,
        },
        _ipc_plane: {
            "device_index": lambda device: 0,
            "current_stream": lambda device: stream,
            "recycle_streams": lambda streams: None,
            "after_pending_work": lambda device: None,
        },
        torch.cuda: {"current_device": lambda: 0, "Event": _Late if check else _Done,
                     "set_stream": lambda stream: None},
    }
    if check:  # a read's copies are awaited in several batches, of two messages at most
        patches[_ipc_plane]["_BATCH_BYTES"] = 2 * 4096 + 1
    for owner, names in patches.items():
        for name, value in names.items():
            setattr(owner, name, value)


async def pipe_pair(check: bool) -> tuple[Pipe, Pipe]:
    loop = asyncio.get_running_loop()
    pipes: list[Pipe] = []
    for sock in socket.socketpair():
        _, channel = await loop.create_connection(ControlChannel, sock=sock)
        owner: list[Pipe] = []

        def on_lost(exc: BaseException, owner: list[Pipe] = owner) -> None:
            owner[0]._break(exc)

        streams = [_Stream(), _Stream()] if check else [_Done(), _Done()]
        plane = _ipc_plane.IpcPlane(CPU, on_lost, "segments", 1 << 20,
                                    streams)  # type: ignore[arg-type]
        pipe = Pipe(channel, plane, device=CPU, max_inflight_bytes=MAX_INFLIGHT,
                    recv_buffer_bytes=WINDOW, peer_credits=WINDOW, heartbeat_interval=None,
                    heartbeat_timeout=None)
        owner.append(pipe)
        pipes.append(pipe)
    return pipes[0], pipes[1]


async def run(mode: str, n: int, repeat: int, profile: str | None, check: bool) -> None:
    a, b = await pipe_pair(check)
    # With --check, 64 tensors (allocations) in turn; a tensor is sent again only after its
    # earlier send completed (8 in flight at most). One in seven cannot be exported (as
    # under expandable segments): it goes through the staging ring, its record gated on the
    # ring copy's event, while the others go by note or record; messages k % 4 in (1, 2)
    # are the tensor's two halves (one COPY record of two pieces, never a note). Message
    # k's bytes are all k % 251, written just before it is sent; once send() returned they
    # are REUSED at once (the caller owns that memory again), so a copy that runs after
    # that delivers wrong bytes.
    xs = [torch.zeros(4096, dtype=torch.uint8) for _ in range(64 if check else 1)]
    for i, x in enumerate(xs):
        _ALLOCATIONS[x.data_ptr()] = (i + 1, x.numel(), not check or i % 7 != 3)
    sent, received = [0], [0]

    async def receive(count: int) -> None:
        for _ in range(count):
            got = await b.recv()
            if check:
                if isinstance(got, list):  # sent as two halves
                    got = torch.cat(got)
                assert isinstance(got, torch.Tensor)
                due = received[0] % 251
                if not (got.numel() == 4096 and bool((got == due).all())):
                    held = sorted(set(got.tolist()))
                    why = (f" ({REUSED}: the sender's memory was reused before its copy ran)"
                           if REUSED in held else "")
                    raise AssertionError(f"message {received[0]} holds bytes {held[:8]}, "
                                         f"not {due}{why}")
            received[0] += 1
            if mode == "lat":
                await b.send(None, "pong")

    async def send_next() -> None:
        k = sent[0]
        sent[0] += 1
        x = xs[k % len(xs)]
        if not check:
            await a.send(x)
            return
        x.fill_(k % 251)
        await a.send([x[:2048], x[2048:]] if k % 4 in (1, 2) else x)
        x.fill_(REUSED)

    async def send(count: int) -> None:
        if mode == "lat":
            for _ in range(count):
                await send_next()
                await a.recv("pong")
            return

        async def one(left: list[int]) -> None:
            while left[0] > 0:
                left[0] -= 1
                await send_next()

        # --check: rounds, each drained before the next posts DEPTH sends at once (see
        # the module docstring); else one round.
        step = ROUND if check else max(count, 1)
        for start in range(0, count, step):
            left = [min(count - start, step)]
            await asyncio.gather(*(one(left) for _ in range(DEPTH)))

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
    if check:
        noted = a._plane.stats["copies_noted"]  # type: ignore[attr-defined]
        copied = b._plane._completed  # type: ignore[attr-defined]
        ring = a._plane.stats["ring_bytes"]  # type: ignore[attr-defined]
        print(f"checked {received[0]} messages in order: {noted} described in their "
              f"header, {copied - noted} by record; staging ring {ring} bytes")
    await a.aclose()
    await b.aclose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=("tput", "lat"))
    ap.add_argument("messages", nargs="?", type=int, default=4000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", metavar="KEY", help="cProfile, sorted by KEY (tottime, ...)")
    ap.add_argument("--check", action="store_true", help="test the path (see above)")
    args = ap.parse_args()
    fake_cuda(args.check)
    uvloop.run(run(args.mode, args.messages, args.repeat, args.profile, args.check))


if __name__ == "__main__":
    main()
