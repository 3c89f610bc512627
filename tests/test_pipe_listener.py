"""A live listener against bad clients (garbage, HTTP, silence, wrong or missing token), and the
ways of opening a pipe: ``open_pipe`` across two processes, ``connect()`` retrying until the
listener appears, ``TimeoutError`` when nobody listens."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from conftest import HOST, SpawnPeer, close_quietly, discard, eventually, free_port, socket_fds

import aiokvpipe
from aiokvpipe import _connect, _wire

HANDSHAKE_TIMEOUT = 1.0

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def listener(any_loop: str) -> AsyncIterator[aiokvpipe.Listener]:
    lst = await aiokvpipe.listen(HOST, 0, handshake_timeout=HANDSHAKE_TIMEOUT)
    try:
        yield lst
    finally:
        await lst.aclose()


async def good_client_transfers(listener: aiokvpipe.Listener, **opts: object) -> None:
    """A well-behaved client connects to ``listener`` and moves a message each way."""
    accepted = asyncio.ensure_future(listener.accept())
    client = server = None
    try:
        client = await asyncio.wait_for(aiokvpipe.connect(HOST, listener.port, **opts), 10)
        server = await asyncio.wait_for(accepted, 10)
        x = torch.arange(1000, dtype=torch.float32)
        await client.send(x, key="ping")
        assert torch.equal(await asyncio.wait_for(server.recv(key="ping"), 10), x)
        await server.send({"y": x * 2})
        assert torch.equal((await asyncio.wait_for(client.recv(), 10))["y"], x * 2)
    finally:
        discard(accepted)
        await close_quietly(*(p for p in (client, server) if p is not None))


async def raw_connect(port: int) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, (HOST, port))
    return sock


async def wait_dropped(sock: socket.socket, timeout: float) -> float:
    """Seconds until the listener closes ``sock`` (EOF or reset); whatever it sent is drained."""
    loop = asyncio.get_running_loop()
    started = time.monotonic()

    async def until_eof() -> None:
        while True:
            try:
                if not await loop.sock_recv(sock, 65536):
                    return
            except ConnectionResetError:
                return

    await asyncio.wait_for(until_eof(), timeout)
    return time.monotonic() - started


# -- bad clients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [
    pytest.param(random.Random(1).randbytes(4096), id="random-bytes"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/8\r\n\r\n", id="http-get"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), id="tls-hello"),
    pytest.param(_wire.encode(_wire.Attach(bytes(16), _wire.Direction.CLIENT_TO_SERVER)),
                 id="attach-unknown-session"),
    pytest.param(_wire.encode(_wire.Heartbeat()), id="heartbeat-first"),
    pytest.param(b"\x01\x00\x00\x00\xff\xff\xff\xff", id="hello-with-huge-length"),
])
async def test_garbage_client_is_dropped_and_listener_keeps_serving(
        listener: aiokvpipe.Listener, payload: bytes) -> None:
    sockets_before = socket_fds()
    sock = await raw_connect(listener.port)
    try:
        await asyncio.get_running_loop().sock_sendall(sock, payload)
        # Dropped for what it sent, well before the handshake timeout.
        assert await wait_dropped(sock, 5) < HANDSHAKE_TIMEOUT * 0.8
    finally:
        sock.close()
    await good_client_transfers(listener)
    await eventually(lambda: socket_fds() <= sockets_before, 2,
                     "the listener closed every socket of the bad and the good client")


async def test_garbage_storm_then_good_client(listener: aiokvpipe.Listener) -> None:
    rng = random.Random(5)
    socks = [await raw_connect(listener.port) for _ in range(30)]
    try:
        loop = asyncio.get_running_loop()
        for s in socks:
            await loop.sock_sendall(s, rng.randbytes(rng.randint(1, 2000)))
        good = asyncio.create_task(good_client_transfers(listener))
        times = await asyncio.gather(*(wait_dropped(s, 5) for s in socks))
        await asyncio.wait_for(good, 10)
        assert max(times) < 5
    finally:
        for s in socks:
            s.close()


async def test_silent_clients_are_dropped_after_handshake_timeout_without_blocking_others(
        listener: aiokvpipe.Listener) -> None:
    loop = asyncio.get_running_loop()
    silent = await raw_connect(listener.port)  # sends nothing at all
    half = await raw_connect(listener.port)  # a valid HELLO, then nothing
    try:
        await loop.sock_sendall(half, _wire.encode(_wire.Hello(bytes(32), _wire.Capabilities())))
        started = time.monotonic()
        drops = asyncio.gather(wait_dropped(silent, 10), wait_dropped(half, 10))
        # While both hang in their handshakes, a good client gets through at once.
        await good_client_transfers(listener)
        assert time.monotonic() - started < HANDSHAKE_TIMEOUT * 0.8
        await asyncio.wait_for(drops, 10)
        waited = time.monotonic() - started
        assert HANDSHAKE_TIMEOUT * 0.9 <= waited <= HANDSHAKE_TIMEOUT + 2.0, waited
    finally:
        silent.close()
        half.close()
    await good_client_transfers(listener)


async def test_wrong_token_fails_on_the_connecting_side_and_listener_keeps_serving(
        any_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOKVPIPE_TOKEN", raising=False)
    async with await aiokvpipe.listen(HOST, 0, token="the right secret") as lst:
        sockets_before = socket_fds()
        with pytest.raises(aiokvpipe.AuthenticationError):
            await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port, token="a wrong secret"), 10)
        with pytest.raises(aiokvpipe.AuthenticationError):
            await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port, token=b"the right secre"),
                                   10)
        await eventually(lambda: socket_fds() <= sockets_before, 2,
                         "sockets of the refused clients closed")
        await good_client_transfers(lst, token="the right secret")
        await good_client_transfers(lst, token=b"the right secret")  # bytes == its UTF-8 str


async def test_server_with_token_refuses_client_without_one(
        any_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOKVPIPE_TOKEN", raising=False)
    async with await aiokvpipe.listen(HOST, 0, token="s3cret") as lst:
        with pytest.raises(aiokvpipe.AuthenticationError):
            await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port), 10)
        with pytest.raises(aiokvpipe.AuthenticationError):
            await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port, token=""), 10)
        await good_client_transfers(lst, token="s3cret")


async def test_client_with_token_refuses_server_without_one(
        any_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Authentication is mutual: a listener that cannot prove it holds the token is refused.
    monkeypatch.delenv("AIOKVPIPE_TOKEN", raising=False)
    async with await aiokvpipe.listen(HOST, 0) as lst:
        with pytest.raises(aiokvpipe.AuthenticationError):
            await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port, token="s3cret"), 10)
        await good_client_transfers(lst)


async def test_token_from_environment_variable(any_loop: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIOKVPIPE_TOKEN", "from-the-env")
    async with await aiokvpipe.listen(HOST, 0) as lst:
        await good_client_transfers(lst)  # both ends read it from the environment
        await good_client_transfers(lst, token="from-the-env")  # explicit == env
        with pytest.raises(aiokvpipe.AuthenticationError):
            await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port, token="other"), 10)
    monkeypatch.delenv("AIOKVPIPE_TOKEN")
    async with await aiokvpipe.listen(HOST, 0, token="explicit") as lst:
        monkeypatch.setenv("AIOKVPIPE_TOKEN", "explicit")
        await good_client_transfers(lst)  # the client's token comes from the environment
        monkeypatch.setenv("AIOKVPIPE_TOKEN", "not-it")
        with pytest.raises(aiokvpipe.AuthenticationError):
            await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port), 10)


async def test_token_from_environment_in_a_peer_process(
        spawn_peer: SpawnPeer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIOKVPIPE_TOKEN", raising=False)
    async with await aiokvpipe.listen(HOST, 0, token="shared-by-env") as lst:
        bad = await spawn_peer(role="connect", port=lst.port, mode="echo",
                               env={"AIOKVPIPE_TOKEN": "wrong"})
        with pytest.raises(AssertionError, match="AuthenticationError"):
            await bad.next_event(timeout=30)
        good = await spawn_peer(role="connect", port=lst.port, mode="echo",
                                env={"AIOKVPIPE_TOKEN": "shared-by-env"})
        pipe = await asyncio.wait_for(lst.accept(), 30)
        try:
            await good.expect("connected")
            await pipe.send(torch.ones(5))
            assert torch.equal(await asyncio.wait_for(pipe.recv(), 10), torch.ones(5))
            await pipe.aclose()
            assert (await good.expect("done"))["echoed"] == 1
        finally:
            await close_quietly(pipe)


# -- opening pipes ------------------------------------------------------------------------------


async def echo_check(pipe: aiokvpipe.Pipe, n: int = 5) -> None:
    for i in range(n):
        msg = {"i": torch.tensor(i), "data": torch.randn(1000 * (i + 1))}
        await pipe.send(msg)
        back = await asyncio.wait_for(pipe.recv(), 10)
        assert int(back["i"]) == i and torch.equal(back["data"], msg["data"])


async def test_open_pipe_rank0_here_rank1_in_a_peer_process(spawn_peer: SpawnPeer) -> None:
    port = free_port()
    opening = asyncio.create_task(aiokvpipe.open_pipe(HOST, port, rank=0))
    peer = await spawn_peer(role="rank1", port=port, mode="echo")
    pipe = await asyncio.wait_for(opening, 30)
    try:
        await peer.expect("connected")
        await echo_check(pipe)
        await pipe.aclose()
        assert (await peer.expect("done"))["echoed"] == 5
        assert await peer.wait(10) == 0
    finally:
        await close_quietly(pipe)
    # rank 0 listened for one peer only: the port is free again.
    with pytest.raises(TimeoutError):
        await aiokvpipe.connect(HOST, port, connect_timeout=0.3)


async def test_open_pipe_rank1_here_started_before_rank0_peer(spawn_peer: SpawnPeer) -> None:
    port = free_port()
    # rank 1 first: it keeps retrying while the peer process starts up and listens.
    opening = asyncio.create_task(aiokvpipe.open_pipe(HOST, port, rank=1, connect_timeout=30))
    peer = await spawn_peer(role="rank0", port=port, mode="echo")
    pipe = await asyncio.wait_for(opening, 30)
    try:
        await peer.expect("connected")
        await echo_check(pipe)
        await pipe.aclose()
        assert (await peer.expect("done"))["echoed"] == 5
    finally:
        await close_quietly(pipe)


async def test_connect_retries_until_the_listener_appears(any_loop: str) -> None:
    port = free_port()
    connecting = asyncio.create_task(aiokvpipe.connect(HOST, port, connect_timeout=10))
    await asyncio.sleep(0.5)  # deliberately late: the listener appears after a while
    assert not connecting.done(), connecting
    async with await aiokvpipe.listen(HOST, port) as lst:
        server = await asyncio.wait_for(lst.accept(), 10)
    client = await asyncio.wait_for(connecting, 10)
    try:
        await client.send(torch.ones(3))
        assert torch.equal(await server.recv(), torch.ones(3))
    finally:
        await close_quietly(client, server)


async def test_connect_reaches_a_listener_that_appears_shortly_before_connect_timeout(
        any_loop: str) -> None:
    connect_timeout = 1.5
    port = free_port()
    connecting = asyncio.create_task(aiokvpipe.connect(HOST, port,
                                                       connect_timeout=connect_timeout))
    await asyncio.sleep(connect_timeout - 0.25)  # deliberately late, but within the timeout
    async with await aiokvpipe.listen(HOST, port) as lst:
        accepted = asyncio.ensure_future(lst.accept())
        try:
            client = await asyncio.wait_for(connecting, 10)
            server = await asyncio.wait_for(accepted, 10)
        finally:
            discard(connecting)
            discard(accepted)
    await close_quietly(client, server)


async def test_connect_raises_timeout_error_after_connect_timeout(any_loop: str) -> None:
    connect_timeout = 1.0
    port = free_port()
    sockets_before = socket_fds()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await aiokvpipe.connect(HOST, port, connect_timeout=connect_timeout)
    elapsed = time.monotonic() - started
    # Not before connect_timeout (the listener might still have come), and not much after.
    assert connect_timeout * 0.95 <= elapsed <= connect_timeout + 1.0, elapsed
    assert socket_fds() <= sockets_before


async def test_cancelled_connect_leaks_no_socket(any_loop: str) -> None:
    port = free_port()
    sockets_before = socket_fds()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await aiokvpipe.connect(HOST, port, connect_timeout=10)
    assert socket_fds() <= sockets_before


async def test_connect_gives_up_at_connect_timeout_when_nothing_answers(any_loop: str) -> None:
    # A listener whose accept queue is full drops our SYN, as a firewall's DROP rule does:
    # the connection attempt gets no answer at all, and once waited for the kernel's own
    # timeout (minutes), whatever connect_timeout said.
    server = socket.socket()
    fillers: list[socket.socket] = []
    try:
        server.bind((HOST, 0))
        server.listen(0)  # never accepted: room for one connection, then SYNs are dropped
        port = server.getsockname()[1]
        for _ in range(2):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((HOST, port))
        await eventually(lambda: full_accept_queue(server), 5, "the accept queue filled")
        started = time.monotonic()
        async with asyncio.timeout(10):
            with pytest.raises(TimeoutError, match="nobody accepted"):
                await aiokvpipe.connect(HOST, port, connect_timeout=0.5, handshake_timeout=0.5)
        assert time.monotonic() - started < 2.0
    finally:
        for s in [server, *fillers]:
            s.close()


def full_accept_queue(server: socket.socket) -> bool:
    """Whether a connection attempt to ``server`` (listening with backlog 0) goes unanswered
    now: the kernel's queue of connections waiting for accept() is full."""
    probe = socket.socket()
    probe.settimeout(0.05)
    try:
        probe.connect(server.getsockname())
    except TimeoutError:
        return True
    except OSError:
        return False
    finally:
        probe.close()
    return False


async def test_connect_raises_only_typed_errors_when_the_host_is_out_of_reach(
        any_loop: str) -> None:
    # A host out of reach (EHOSTUNREACH, ENETUNREACH: a peer host rebooting) once escaped as
    # a bare OSError, at the first attempt: it is retried until connect_timeout. Any other
    # failure to connect (EACCES, say) is a PipeError.
    started = time.monotonic()
    with pytest.raises((TimeoutError, aiokvpipe.PipeError)) as caught:
        await aiokvpipe.connect("255.255.255.255", 9, connect_timeout=0.3)
    assert isinstance(caught.value.__cause__, OSError)
    assert time.monotonic() - started < 5.0


async def test_more_clients_at_once_than_handshake_slots_all_connect(
        any_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # A tcp pipe takes three connections: a handshake waiting for its two data connections
    # kept its slot, which they needed too. With every slot held so, nothing moved until
    # the handshake timeout, and every client failed (seen with 128 clients at once).
    monkeypatch.setattr(_connect, "MAX_CONCURRENT_HANDSHAKES", 2)
    async with await aiokvpipe.listen(HOST, 0, handshake_timeout=10) as lst:
        async with asyncio.timeout(20):
            clients = await asyncio.gather(*(aiokvpipe.connect(HOST, lst.port,
                                                               handshake_timeout=10)
                                             for _ in range(6)))
            servers = [await lst.accept() for _ in range(6)]
    await close_quietly(*clients, *servers)


async def test_pipes_waiting_for_accept_hold_handshake_slots(
        any_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """While nobody calls accept(), no more pipes complete than the accept queue holds and
    the handshake slots: a finished pipe waiting for room holds its slot; accept() lets the
    others through. (A tcp handshake gave its slot back for its data connections, and took
    none again: a listener nobody accepted from kept every pipe anyone opened, 400 in a
    review, with their sockets and receive memory.)"""
    monkeypatch.setattr(_connect, "MAX_CONCURRENT_HANDSHAKES", 3)
    monkeypatch.setattr(_connect, "ACCEPT_QUEUE", 2)
    async with await aiokvpipe.listen(HOST, 0, handshake_timeout=30) as lst:
        connecting = [asyncio.create_task(aiokvpipe.connect(
            HOST, lst.port, handshake_timeout=30, connect_timeout=30)) for _ in range(8)]
        try:
            async with asyncio.timeout(30):
                await eventually(lambda: len(lst._ready) == 2 and lst._slots.locked()
                                 and sum(t.done() for t in connecting) >= 4, 10,
                                 "the accept queue full, every slot taken")
                # However long nobody accepts, no more complete: the bound holds at every
                # moment (without it, all eight completed within milliseconds).
                await asyncio.wait(connecting, timeout=1.0)
                done = sum(t.done() for t in connecting)
                assert done <= 2 + 3, f"{done} pipes completed, nobody accepting"
                servers = [await lst.accept() for _ in range(8)]
                clients = await asyncio.gather(*connecting)
        finally:
            for t in connecting:
                t.cancel()
    await close_quietly(*clients, *servers)


@pytest.mark.parametrize("first", ["refused", "unusable"])
async def test_connect_tries_each_address_and_data_connections_follow_the_control_one(
        any_loop: str, monkeypatch: pytest.MonkeyPatch, first: str) -> None:
    """A name resolving to an address nobody listens on (or one this host cannot use: a
    link-local IPv6 address without its interface), then to the listener's: connect()
    takes the second at once (it tried the first alone, until connect_timeout or failing
    at once), and the data connections go to the address the control connection reached,
    the name not resolved again (a round-robin name could send them, and the session id,
    to another listener)."""
    dead = free_port()
    async with await aiokvpipe.listen(HOST, 0) as lst:
        resolved: list[str] = []
        bad = ((socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (HOST, dead))
               if first == "refused" else
               (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                ("fe80::1", dead, 0, 0)))

        async def resolve(loop: object, host: str, port: int, flags: int = 0) -> list[Any]:
            resolved.append(host)
            return [bad, (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                          (HOST, lst.port))]

        monkeypatch.setattr(_connect, "_resolve", resolve)
        async with asyncio.timeout(10):
            client = await aiokvpipe.connect("prefill.example", lst.port, connect_timeout=30)
            server = await lst.accept()
        assert client.transport == "tcp" and resolved == ["prefill.example"], resolved
        await close_quietly(client, server)


STALLED_CLIENT = """
import asyncio, logging
import aiokvpipe
from aiokvpipe import _connect
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
opened = _connect._connect_to
async def no_data_connections(loop, where, until):
    if until is None:  # a data connection: never opened
        await asyncio.sleep(3600)
    return await opened(loop, where, until)
_connect._connect_to = no_data_connections
async def main():
    async with await aiokvpipe.listen("127.0.0.1", 0, handshake_timeout=0.5) as lst:
        try:
            await aiokvpipe.connect("127.0.0.1", lst.port, handshake_timeout=2)
        except Exception as exc:
            print("client:", repr(exc))
asyncio.run(asyncio.wait_for(main(), 20))
"""


def test_a_handshake_given_up_waiting_for_data_connections_logs_one_line() -> None:
    # A client that stops after the listener's ACCEPT: aiokvpipe's one line, and no
    # "_GatheringFuture exception was never retrieved" ERROR from asyncio beside it (in a
    # process of its own: the test runner keeps such futures alive past the test).
    done = subprocess.run([sys.executable, "-c", STALLED_CLIENT], capture_output=True,
                          text=True, timeout=60)
    assert "client: TimeoutError" in done.stdout, done.stdout + done.stderr
    assert "dropped incoming connection" in done.stderr, done.stderr
    assert "ERROR asyncio" not in done.stderr, done.stderr


OUT_OF_FDS = """
import asyncio, logging, os, resource, socket, sys
import aiokvpipe
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
async def main():
    lst = await aiokvpipe.listen("127.0.0.1", 0)
    clients = [socket.socket() for _ in range(12)]  # opened before the limit bites
    room = len(os.listdir("/proc/self/fd")) + 2  # two accepted, then EMFILE
    resource.setrlimit(resource.RLIMIT_NOFILE, (room, resource.getrlimit(
        resource.RLIMIT_NOFILE)[1]))
    for c in clients:
        c.setblocking(False)
        try:
            c.connect(("127.0.0.1", lst.port))
        except BlockingIOError:
            pass
    await asyncio.sleep(1.5)  # accept() fails with EMFILE all along
    for c in clients:
        c.close()
    await lst.aclose()
asyncio.run(asyncio.wait_for(main(), 20))
"""


def test_a_listener_out_of_file_descriptors_says_so_once_not_every_100_ms() -> None:
    done = subprocess.run([sys.executable, "-c", OUT_OF_FDS], capture_output=True,
                          text=True, timeout=60)
    failed = done.stderr.count("accept() failed")
    assert failed == 1, done.stdout + done.stderr


async def _queue_frozen_peers(lst: aiokvpipe.Listener, spawn_peer: SpawnPeer,
                              n: int) -> list[aiokvpipe.Pipe]:
    """``n`` pipes handed over to ``lst`` and not accepted, their peers frozen (SIGSTOP):
    none of them can answer a close."""
    peers = [await spawn_peer(role="connect", port=lst.port, mode="idle") for _ in range(n)]
    for peer in peers:
        await peer.expect("connected")
    await eventually(lambda: len(lst._ready) == n, 10, f"{n} pipes queued")
    for peer in peers:
        peer.send_signal(signal.SIGSTOP)
    return list(lst._ready)


async def test_closing_a_listener_closes_its_queued_pipes_together(
        spawn_peer: SpawnPeer) -> None:
    # Pipes handed over but never accepted are closed by aclose(). Peers that cannot answer
    # the close (frozen) each cost close_timeout: one after the other, three cost three.
    close_timeout = 1.5
    async with asyncio.timeout(30):
        lst = await aiokvpipe.listen(HOST, 0, close_timeout=close_timeout)
        try:
            queued = await _queue_frozen_peers(lst, spawn_peer, 3)
            t0 = time.monotonic()
        finally:
            await lst.aclose()
        elapsed = time.monotonic() - t0
    assert all(p.closed for p in queued)
    assert close_timeout <= elapsed < 2 * close_timeout, elapsed


@pytest.mark.parametrize("when", ["stopping accepting", "closing the queued pipes"])
async def test_a_cancelled_listener_close_aborts_its_queued_pipes(
        spawn_peer: SpawnPeer, when: str) -> None:
    # Cancelled before its queued pipes' closes began, or while they waited for their
    # peers' half of the close, aclose() could leave them open, and a second aclose()
    # returned at once: open for ever.
    async with asyncio.timeout(30):
        lst = await aiokvpipe.listen(HOST, 0, close_timeout=60)
        queued = await _queue_frozen_peers(lst, spawn_peer, 2)
        closing = asyncio.ensure_future(lst.aclose())
        if when == "stopping accepting":
            await asyncio.sleep(0)  # its first step: it waits for the accept task to end
            assert not any(p._closed_here for p in queued)
        else:
            await eventually(lambda: all(p._closed_here for p in queued), 10, "closing")
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
        await lst.aclose()
        assert all(isinstance(p._error, aiokvpipe.BrokenPipe) for p in queued)
        with pytest.raises(aiokvpipe.PipeClosed):
            await lst.accept()


async def test_open_pipe_rank0_cancelled_while_its_listener_closes_ends_the_pipe(
        any_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled after accept() returned, while its listener closes: open_pipe() raises
    CancelledError and the pipe it accepted, which the caller never gets, ends: the peer
    hears of it. (It stayed open, heartbeating, and the peer's recv() waited for ever.)"""
    closing, go_on = asyncio.Event(), asyncio.Event()
    real_aclose = _connect.Listener.aclose

    async def slow_aclose(self: _connect.Listener) -> None:  # a close that takes a while
        closing.set()
        await go_on.wait()
        await real_aclose(self)

    monkeypatch.setattr(_connect.Listener, "aclose", slow_aclose)
    port = free_port()
    opening = asyncio.create_task(aiokvpipe.open_pipe(HOST, port, rank=0))
    client = await aiokvpipe.connect(HOST, port, connect_timeout=10)
    try:
        async with asyncio.timeout(10):
            await closing.wait()
            opening.cancel()
            go_on.set()
            with pytest.raises(asyncio.CancelledError):
                await opening
            with pytest.raises(aiokvpipe.BrokenPipe):
                await client.recv()
    finally:
        await close_quietly(client)


async def test_listener_aclose_closes_a_pipe_waiting_for_room_as_gracefully_as_the_queued(
        any_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Listener.aclose() with the accept queue full and one more pipe finished, waiting for
    room: each of their peers sees a graceful close (PipeClosed), none a broken pipe, and
    the listener's metrics count no pipe broken. (The one waiting was aborted, counted as
    "peer_closed_connection".)"""
    from prometheus_client import CollectorRegistry
    monkeypatch.setattr(_connect, "ACCEPT_QUEUE", 2)
    registry = CollectorRegistry()
    lst = await aiokvpipe.listen(HOST, 0, metrics_registry=registry)
    clients: list[aiokvpipe.Pipe] = []
    try:
        async with asyncio.timeout(20):
            clients = list(await asyncio.gather(*(
                aiokvpipe.connect(HOST, lst.port, connect_timeout=10) for _ in range(3))))
            await eventually(lambda: len(lst._ready) == 2 and len(lst._handshakes) == 1, 10,
                             "two pipes queued, one waiting for room")
            await lst.aclose()
            for client in clients:
                with pytest.raises(aiokvpipe.PipeClosed):
                    await client.recv()
        broken = sum(m.value for metric in registry.collect() for m in metric.samples
                     if m.name == "aiokvpipe_pipes_broken_total")
        assert broken == 0
    finally:
        await lst.aclose()
        await close_quietly(*clients)
