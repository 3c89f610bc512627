"""aiokvpipe.compat.SyncPipe: PyNcclPipe's synchronous interface over a real pipe."""

from __future__ import annotations

import gc
import socket
import threading
import time
import warnings

import pytest
import torch

from aiokvpipe import PipeClosed
from aiokvpipe.compat import SyncPipe

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
