"""A real peer process of tests/test_pipe_ipc.py: pipes on cuda:0 through the public API,
driven by JSON-line commands on stdin, answering with JSON-line events on stdout.

    python tests/ipc_pipe_peer.py

Commands (``name`` names one of this process's pipes):
  {"op": "listen", "transport": t}           → {"event": "listening", "port": N}; each pipe
                                               accepted then → {"event": "accepted", "name":
                                               "inK", "transport": ...}
  {"op": "connect", "port": N, "name": n, "transport": t} → {"event": "connected", ...}
  {"op": "echo", "name": n}                   receive and send back, until the pipe ends
  {"op": "sink", "name": n}                   receive and drop, until the pipe ends
  {"op": "stream", "name": n, "nbytes": b, "count": c} send c messages of b bytes (byte i of
                                               message k is k % 251) → "streamed" or "failed";
                                               with "keys": [...], message k has key keys[k]
  {"op": "serve", "name": n}                  a prefill: answer each request (a tensor
                                               [id, nbytes] with key "req") with nbytes of
                                               value id % 251 under key "r<id>"
  {"op": "requests", "names": [...], "nbytes": b, "seconds": s} a decode: requests routed to
                                               the pipes in turn for s seconds; reports per
                                               pipe bytes, messages, the error that ended it
                                               and the messages completed after another broke
  {"op": "memory"}                            → torch and device-wide memory figures
  {"op": "exit"}
It exits when stdin closes (the test process gone), so no orphan outlives a crashed run.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import aiokvpipe  # noqa: E402

DEV = torch.device("cuda", 0)


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def payload(nbytes: int, value: int) -> torch.Tensor:
    return torch.full((nbytes,), value % 251, dtype=torch.uint8, device=DEV)


class Peer:
    def __init__(self) -> None:
        self.pipes: dict[str, aiokvpipe.Pipe] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def accept_all(self, listener: aiokvpipe.Listener) -> None:
        k = 0
        while True:
            pipe = await listener.accept()
            name = f"in{k}"
            k += 1
            self.pipes[name] = pipe
            say("accepted", name=name, transport=pipe.transport)

    async def echo(self, name: str) -> None:
        pipe = self.pipes[name]
        try:
            while True:
                await pipe.send(await pipe.recv())
        except aiokvpipe.PipeError as exc:
            say("echo_ended", name=name, error=type(exc).__name__)

    async def sink(self, name: str) -> None:
        pipe = self.pipes[name]
        try:
            while True:
                await pipe.recv()
        except aiokvpipe.PipeError as exc:
            say("sink_ended", name=name, error=type(exc).__name__)

    async def stream(self, name: str, nbytes: int, count: int,
                     keys: list[str] | None = None) -> None:
        pipe = self.pipes[name]
        try:
            for k in range(count):
                await pipe.send(payload(nbytes, k), keys[k] if keys else None)
            say("streamed", name=name)
        except aiokvpipe.PipeError as exc:
            say("failed", name=name, error=type(exc).__name__, at=time.monotonic())

    async def serve(self, name: str) -> None:
        pipe = self.pipes[name]
        try:
            while True:
                req = (await pipe.recv("req")).tolist()
                await pipe.send(payload(int(req[1]), int(req[0])), f"r{int(req[0])}")
        except aiokvpipe.PipeError as exc:
            say("serve_ended", name=name, error=type(exc).__name__)

    async def requests(self, names: list[str], nbytes: int, seconds: float) -> None:
        """Each pipe in its own task: request, receive, check; ``names`` route by turn."""
        first_break: list[float] = []
        out: dict[str, Any] = {}

        async def one(slot: int, name: str) -> None:
            pipe = self.pipes[name]
            done = after = 0
            error = None
            started = time.perf_counter()
            deadline = started + seconds
            rid = slot
            try:
                while time.perf_counter() < deadline:
                    await pipe.send(torch.tensor([rid, nbytes], device=DEV), "req")
                    kv = await pipe.recv(f"r{rid}")
                    if kv.numel() != nbytes or not bool((kv == rid % 251).all()):
                        raise AssertionError(f"request {rid} on {name}: wrong bytes")
                    done += 1
                    if first_break:
                        after += 1
                    rid += len(names)
            except aiokvpipe.PipeError as exc:
                error = type(exc).__name__
                first_break.append(time.perf_counter())
            elapsed = time.perf_counter() - started
            out[name] = {"msgs": done, "bytes": done * nbytes, "error": error,
                         "after_other_broke": after,
                         "gbps": done * nbytes / max(elapsed, 1e-9) / 1e9}

        await asyncio.gather(*(one(i, n) for i, n in enumerate(names)))
        say("requests", pipes=out)

    def memory(self) -> None:
        torch.cuda.synchronize(DEV)
        free, total = torch.cuda.mem_get_info(DEV)
        say("memory", allocated=torch.cuda.memory_allocated(DEV),
            reserved=torch.cuda.memory_reserved(DEV), device_used=total - free)


async def main() -> None:
    torch.cuda.set_device(DEV)
    torch.zeros(1, device=DEV)  # the context now, not inside a measurement
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    peer = Peer()
    say("ready")
    while line := await reader.readline():
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "listen":
            listener = await aiokvpipe.listen("127.0.0.1", 0, device=DEV,
                                              transport=cmd.get("transport", "auto"))
            peer.spawn(peer.accept_all(listener))
            say("listening", port=listener.port)
        elif op == "connect":
            pipe = await aiokvpipe.connect("127.0.0.1", cmd["port"], device=DEV,
                                           transport=cmd.get("transport", "auto"),
                                           connect_timeout=60.0)
            peer.pipes[cmd["name"]] = pipe
            say("connected", name=cmd["name"], transport=pipe.transport)
        elif op == "echo":
            peer.spawn(peer.echo(cmd["name"]))
        elif op == "sink":
            peer.spawn(peer.sink(cmd["name"]))
        elif op == "stream":
            peer.spawn(peer.stream(cmd["name"], int(cmd["nbytes"]), int(cmd["count"]),
                                   cmd.get("keys")))
        elif op == "serve":
            peer.spawn(peer.serve(cmd["name"]))
        elif op == "requests":
            peer.spawn(peer.requests(list(cmd["names"]), int(cmd["nbytes"]),
                                     float(cmd["seconds"])))
        elif op == "memory":
            peer.memory()
        elif op == "exit":
            break
        else:
            say("error", error=f"unknown op {op}")
    for pipe in peer.pipes.values():
        try:
            await asyncio.wait_for(pipe.aclose(), 10)
        except (aiokvpipe.PipeError, TimeoutError):
            pass
    say("bye")


if __name__ == "__main__":
    asyncio.run(main())
