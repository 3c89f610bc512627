"""Shared fixtures of the pipe integration tests (tests/test_pipe_*.py).

* ``any_loop``: a test (or fixture) that requests it runs once on asyncio's default event loop
  and once on uvloop (via pytest-asyncio's ``pytest_asyncio_loop_factories`` hook). Every other
  async test keeps asyncio's default loop, under its usual test id.
* ``pair_factory`` / ``pipe_pair``: pipes connected in-process over real 127.0.0.1 sockets.
* ``spawn_peer``: real peer processes running ``tests/pipe_peer.py``; each is killed (SIGKILL,
  which also ends a SIGSTOPped process) and reaped in teardown, whatever the test did.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from jsonpeer import JsonPeerProcess

import aiokvpipe

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a test dependency
    uvloop = None

HERE = Path(__file__).resolve().parent
PEER_SCRIPT = HERE / "pipe_peer.py"
HOST = "127.0.0.1"

_DEFAULT_LOOP: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop}
_BOTH_LOOPS = dict(_DEFAULT_LOOP)
if uvloop is not None:
    _BOTH_LOOPS["uvloop"] = uvloop.new_event_loop


@pytest.hookimpl(optionalhook=True)  # a pytest-asyncio without the hook runs asyncio only
def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                  ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    if "any_loop" in getattr(item, "fixturenames", ()):
        return _BOTH_LOOPS
    return _DEFAULT_LOOP  # one factory: pytest-asyncio hides the id, test ids stay unchanged


@pytest.fixture
async def any_loop() -> str:
    """Name of the running loop's module: "asyncio" or "uvloop" (the test runs on both)."""
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


# -- small helpers shared by the test modules ------------------------------------------------


def socket_fds() -> set[int]:
    """This process's open file descriptors that are sockets."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
        except OSError:  # closed between listdir and readlink (the listdir fd itself, say)
            pass
    return fds


async def eventually(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until ``predicate()`` holds, checking every few ms, for things nothing signals
    (a file descriptor closed by a transport's deferred close); fail after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.005)


def free_port() -> int:
    """A port the OS just handed out (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def discard(fut: asyncio.Future[Any]) -> None:
    """Cancel ``fut``, or read its exception if it already failed (no "never retrieved")."""
    if not fut.cancel() and not fut.cancelled() and fut.done():
        fut.exception()


async def close_quietly(*pipes: aiokvpipe.Pipe, timeout: float = 5.0) -> None:
    """Close pipes in teardown; a pipe that cannot close gracefully in time is aborted."""
    async def one(p: aiokvpipe.Pipe) -> None:
        try:
            await asyncio.wait_for(p.aclose(), timeout)
        except (TimeoutError, aiokvpipe.PipeError, OSError):
            pass
    await asyncio.gather(*(one(p) for p in pipes))


# -- in-process pairs ---------------------------------------------------------------------------

PairFactory = Callable[..., Awaitable[tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]]]


@pytest.fixture
async def pair_factory(any_loop: str) -> AsyncIterator[PairFactory]:
    """``await make(**opts)`` → ``(client, server)``: one pipe's two ends, connected over
    127.0.0.1 in this process. ``opts`` apply to both ends; ``client_opts`` / ``server_opts``
    add to one. Every pipe made is closed in teardown."""
    made: list[aiokvpipe.Pipe] = []

    async def make(*, client_opts: dict[str, Any] | None = None,
                   server_opts: dict[str, Any] | None = None, **opts: Any
                   ) -> tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]:
        async with await aiokvpipe.listen(HOST, 0, **{**opts, **(server_opts or {})}) as lst:
            accepted = asyncio.ensure_future(lst.accept())
            try:
                client = await aiokvpipe.connect(HOST, lst.port,
                                                 **{**opts, **(client_opts or {})})
                made.append(client)
                server = await asyncio.wait_for(accepted, 10)
                made.append(server)
            finally:
                discard(accepted)
        return client, server

    yield make
    await close_quietly(*made)


@pytest.fixture
async def pipe_pair(pair_factory: PairFactory) -> tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]:
    """A connected (client, server) pair with default options, on both event loops."""
    return await pair_factory()


# -- peer processes -----------------------------------------------------------------------------


class Peer(JsonPeerProcess):
    """A running ``pipe_peer.py`` process and the JSON events it reports."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr_path: Path) -> None:
        super().__init__(proc, "peer", stderr_path)


SpawnPeer = Callable[..., Awaitable[Peer]]


@pytest.fixture
async def spawn_peer(tmp_path: Path) -> AsyncIterator[SpawnPeer]:
    """``await spawn(mode=..., role=..., **config)`` starts ``pipe_peer.py`` with that config
    (see its docstring); ``env`` overrides its environment. Every peer is SIGKILLed (if still
    running) and reaped in teardown."""
    peers: list[Peer] = []

    async def spawn(*, env: dict[str, str] | None = None, **cfg: Any) -> Peer:
        cfg.setdefault("host", HOST)
        child_env = {k: v for k, v in os.environ.items() if k != "AIOKVPIPE_TOKEN"}
        child_env.update(PYTHONUNBUFFERED="1", **(env or {}))
        stderr_path = tmp_path / f"peer-{len(peers)}.stderr"
        with stderr_path.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, str(PEER_SCRIPT), json.dumps(cfg),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env=child_env, cwd=str(HERE))
        peer = Peer(proc, stderr_path)
        peers.append(peer)
        return peer

    try:
        yield spawn
    finally:
        for peer in peers:
            await peer.kill_and_reap()
            if peer.proc.stdin is not None:
                peer.proc.stdin.close()
            # Captured by pytest, shown only when the test fails.
            print(f"--- peer {peer.pid} (exit {peer.proc.returncode}) stderr ---\n"
                  f"{peer.stderr()}")
