"""aiokvpipe.compat.SyncPipe: PyNcclPipe's synchronous interface over a real pipe."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import threading
import time
import warnings
from collections.abc import Iterator

import pytest
import torch

from aiokvpipe import PipeClosed, compat
from aiokvpipe.compat import BundleReceived, PipeFuture, SyncPipe

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pair(**opts: object) -> tuple[SyncPipe, SyncPipe]:
    port = _free_port()
    result: dict[str, SyncPipe | BaseException] = {}

    def listen() -> None:
        try:
            result["server"] = SyncPipe("127.0.0.1", port, 0, **opts)
        except BaseException as exc:  # surfaced by the assert below
            result["server"] = exc

    t = threading.Thread(target=listen)
    t.start()
    client = SyncPipe("127.0.0.1", port, 1, **opts)
    t.join(30)
    server = result["server"]
    assert isinstance(server, SyncPipe), server
    return server, client


def test_send_tensor_and_recv_tensor_round_trip_in_order() -> None:
    server, client = _pair()
    with server, client:
        sent = [torch.arange(i * 10, dtype=torch.float16).reshape(-1, 2) for i in range(1, 20)]
        for t in sent:
            client.send_tensor(t)
        client.send_tensor(None)
        for t in sent:
            got = server.recv_tensor()
            assert got is not None and got.dtype == t.dtype and torch.equal(got, t)
        assert server.recv_tensor() is None
        server.send_tensor(torch.tensor(42))
        assert client.recv_tensor() == torch.tensor(42)


def test_close_delivers_everything_then_peer_sees_pipe_closed() -> None:
    server, client = _pair()
    client.send_tensor(torch.ones(1000))
    client.close()
    got = server.recv_tensor()
    assert got is not None and torch.equal(got, torch.ones(1000))
    with pytest.raises(PipeClosed):
        server.recv_tensor()
    server.close()
    assert not any(t.name.startswith("aiokvpipe-sync") for t in threading.enumerate())


def test_recv_timeout_raises_and_loses_nothing() -> None:
    server, client = _pair(timeout=0.2)
    with server, client:
        with pytest.raises(TimeoutError):
            server.recv_tensor()
        client.send_tensor(torch.tensor([1, 2, 3]))
        got = server.recv_tensor()
        assert got is not None and got.tolist() == [1, 2, 3]


def test_send_tensor_rejects_non_tensors_and_stays_usable() -> None:
    server, client = _pair()
    with server, client:
        with pytest.raises(TypeError):
            client.send_tensor([torch.ones(1)])  # type: ignore[arg-type]
        client.send_tensor(torch.zeros(2))
        got = server.recv_tensor()
        assert got is not None and torch.equal(got, torch.zeros(2))


def test_a_sync_pipe_runs_on_uvloop_where_it_is_installed() -> None:
    uvloop = pytest.importorskip("uvloop")  # (a test dependency: installed in CI)
    server, client = _pair()
    with server, client:
        for end in (server, client):
            assert isinstance(end._loop, uvloop.Loop)
        client.send_tensor(torch.ones(3))
        assert server.recv_tensor().tolist() == [1.0, 1.0, 1.0]


def test_recv_tensor_given_a_bundle_raises_a_type_error_that_holds_it() -> None:
    server, client = _pair()
    with server, client:
        client.send({"k": torch.ones(2), "v": torch.zeros(3)})
        client.send_tensor(torch.tensor([5]))
        with pytest.raises(TypeError) as info:
            server.recv_tensor()
        assert isinstance(info.value, BundleReceived)
        got = info.value.message  # taken off the pipe, not lost
        assert isinstance(got, dict) and torch.equal(got["v"], torch.zeros(3))
        assert server.recv_tensor().tolist() == [5]  # the pipe goes on, in order


def test_a_blocking_call_on_the_loop_thread_raises_instead_of_waiting_for_ever() -> None:
    # A PipeFuture's done callback runs on the pipe's loop thread: a blocking call there
    # waited for that very thread, the peer's heartbeats then broke the pipe, and the other
    # threads' timeouts never fired.
    server, client = _pair()
    with server, client:
        outcome: list[BaseException | None] = []
        called = threading.Event()

        def answer(_: object) -> None:
            try:
                server.send_tensor(torch.ones(1))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)
            called.set()

        receiving = server.submit_recv()
        receiving.add_done_callback(answer)  # (pending: it runs where the result is set)
        client.send_tensor(torch.zeros(2))
        assert called.wait(10)
        assert isinstance(outcome[0], RuntimeError), outcome
        assert torch.equal(receiving.result(10), torch.zeros(2))
        server.send_tensor(torch.full((3,), 7.0))  # the pipe goes on, from this thread
        assert torch.equal(client.recv_tensor(), torch.full((3,), 7.0))


def test_close_in_a_done_callback_closes_gracefully_once_the_callback_returned() -> None:
    """close() on the loop thread (a future's done callback: "close when done") cannot
    wait there for itself: it starts the close, which runs once the callback returned; the
    peer sees a graceful close, another thread's call ends, the thread ends. (It waited 10 s
    for itself, raised RuntimeError, left the pipe open and the other call blocked.)"""
    server, client = _pair()
    try:
        outcome: list[BaseException | None] = []
        called = threading.Event()
        elsewhere: list[BaseException] = []

        def waiting() -> None:
            try:
                server.recv(key="never")
            except BaseException as exc:
                elsewhere.append(exc)

        other = threading.Thread(target=waiting)
        other.start()

        def close_when_done(_: object) -> None:
            t0 = time.monotonic()
            try:
                server.close()
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)
            outcome.append(time.monotonic() - t0)  # type: ignore[arg-type]
            called.set()

        server.submit_recv().add_done_callback(close_when_done)
        client.send_tensor(torch.ones(1))
        assert called.wait(10)
        assert outcome[0] is None and outcome[1] < 0.5, outcome  # type: ignore[operator]
        with pytest.raises(PipeClosed):  # the peer: a graceful close
            client.recv(timeout=10)
        other.join(10)
        assert not other.is_alive() and isinstance(elsewhere[0], PipeClosed), elsewhere
        server._thread.join(10)
        assert not server._thread.is_alive() and server.pipe.closed
        server.close()  # idempotent, from any thread
        with pytest.raises(PipeClosed):
            server.submit_recv()
    finally:
        client.close()
        server.close()


def test_the_constructor_gives_up_at_its_timeout_and_leaves_no_port_listening() -> None:
    # timeout bounds any one blocking call, the constructor's too: with no peer it waited
    # for ever, and cut short (Ctrl-C) it left the port listening.
    port = _free_port()
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        SyncPipe("127.0.0.1", port, 0, timeout=0.5)
    assert time.monotonic() - started < 10
    with socket.socket() as probe:
        probe.settimeout(2)
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "still listening"


@pytest.mark.parametrize("warnings_are", ["warnings", "errors"])
def test_a_sync_pipe_dropped_without_close_closes_its_pipe_and_ends_its_thread(
        warnings_are: str) -> None:
    # Its loop thread held the pipe (sockets, buffers, a port) open for the process's life.
    # A ResourceWarning made an error must not stop the close either.
    server, client = _pair(timeout=20)
    with server:
        client.send_tensor(torch.ones(3))
        thread = client._thread
        # The send's task may still be finishing its last step on the loop thread, its frame
        # holding the SyncPipe (then not collected below): once a later callback ran, it has.
        asyncio.run_coroutine_threadsafe(asyncio.sleep(0), client._loop).result(10)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("error" if warnings_are == "errors" else "always",
                                  ResourceWarning)
            del client
            gc.collect()  # returns at once: the close runs on the pipe's own loop
        if warnings_are == "warnings":
            assert any("never closed" in str(w.message) for w in seen), seen
        got = server.recv_tensor()  # closed gracefully: what was sent arrives, then the close
        assert got is not None and torch.equal(got, torch.ones(3))
        with pytest.raises(PipeClosed):
            server.recv_tensor()
        thread.join(15)
        assert not thread.is_alive()


def test_each_step_of_a_transfer_runs_with_its_callers_stream_current(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Transfers submitted from threads on different CUDA streams run at once on the one
    loop thread: each of their steps sees its own caller's stream current, and the loop
    thread's stream is its own again between them. (A stream context held across awaits
    made one transfer's stream current in the other's steps, and left it current for good.)
    CUDA's current stream is faked at ``torch.cuda.stream``, the seam the transfers use."""
    current = ["the loop thread's own"]

    @contextlib.contextmanager
    def stream(s: object) -> Iterator[None]:
        prev, current[0] = current[0], s  # type: ignore[assignment]
        try:
            yield
        finally:
            current[0] = prev

    monkeypatch.setattr(torch.cuda, "stream", stream)
    seen: dict[str, list[object]] = {"a": [], "b": []}

    async def main() -> None:
        turns = [asyncio.Event() for _ in range(3)]

        async def transfer(name: str, first: asyncio.Event, then: asyncio.Event) -> str:
            seen[name].append(current[0])
            await first.wait()
            seen[name].append(current[0])
            then.set()
            return name

        futures = [PipeFuture(None, "send", None) for _ in range(2)]  # type: ignore[arg-type]
        both = asyncio.gather(
            compat._transfer(futures[0], lambda: transfer("a", turns[0], turns[1]), "A"),
            compat._transfer(futures[1], lambda: transfer("b", turns[1], turns[2]), "B"))
        await asyncio.sleep(0)  # both started, each waiting
        seen["between"] = [current[0]]
        turns[0].set()
        await both
        assert [f.result() for f in futures] == ["a", "b"]

    asyncio.run(main())
    assert seen == {"a": ["A", "A"], "b": ["B", "B"],
                    "between": ["the loop thread's own"]}, seen
    assert current == ["the loop thread's own"]
