"""SyncPipe's keyed and non-blocking API: blocking send/recv, submit_*, poll, cancel, close.

Two SyncPipes joined over real sockets on 127.0.0.1, driven from plain threads as a
synchronous engine would; the broken-pipe case kills a real peer process.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from aiokvpipe import BrokenPipe, PipeClosed
from aiokvpipe.compat import PipeFuture, SyncPipe

pytestmark = pytest.mark.timeout(90)

WAIT_S = 30.0  # bound on any one wait below: a hang fails the test instead of stalling it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pair(**opts: object) -> tuple[SyncPipe, SyncPipe]:
    port = _free_port()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        server = pool.submit(SyncPipe, "127.0.0.1", port, 0, **opts)
        client = SyncPipe("127.0.0.1", port, 1, **opts)
        return server.result(WAIT_S), client


@pytest.fixture
def pair() -> Iterator[tuple[SyncPipe, SyncPipe]]:
    server, client = _pair(timeout=WAIT_S)
    try:
        yield server, client
    finally:
        client.close()
        server.close()
    assert not any(t.name.startswith("aiokvpipe-sync") for t in threading.enumerate())


def _request(i: int) -> Any:
    """Request ``i``: each of the message structures, with ``i`` in its values."""
    base = torch.arange(i, i + 1 + i % 7, dtype=torch.float32)
    match i % 4:
        case 0:
            return base
        case 1:
            return [base, torch.full((2, 3), i, dtype=torch.int64)]
        case 2:
            return {"k": base, "v": base.to(torch.bfloat16) * 2}
        case _:
            return {"only": base.reshape(1, -1)}


def _values(msg: Any) -> list[float]:
    tensors = msg.values() if isinstance(msg, dict) else msg if isinstance(msg, list) else [msg]
    return [float(x) for t in tensors for x in t.flatten().tolist()]


def test_64_concurrent_keyed_requests_from_worker_threads(pair: tuple[SyncPipe, SyncPipe]
                                                          ) -> None:
    server, client = pair
    n = 64

    def serve(i: int) -> None:
        # blocking calls from a worker thread of the "decode" side
        req = server.recv(key=f"req-{i}")
        server.send({"i": torch.tensor(i), "sum": torch.tensor(sum(_values(req)))},
                    key=f"resp-{i}")

    def submit(i: int) -> tuple[PipeFuture[Any], PipeFuture[None]]:
        # non-blocking submissions from a worker thread of the "prefill" side
        return client.submit_recv(key=f"resp-{i}"), client.submit_send(_request(i),
                                                                         key=f"req-{i}")

    order = list(range(n))
    random.Random(13).shuffle(order)
    with concurrent.futures.ThreadPoolExecutor(16) as servers, \
            concurrent.futures.ThreadPoolExecutor(16) as submitters:
        served = [servers.submit(serve, i) for i in order]
        submitted = [f.result(WAIT_S) for f in [submitters.submit(submit, i)
                                                for i in range(n)]]
        outstanding: set[PipeFuture[Any]] = {f for pair_ in submitted for f in pair_}
        collected: list[PipeFuture[Any]] = []
        deadline = time.monotonic() + WAIT_S
        # The engine's step loop: collect what finished, then do a step's worth of waiting.
        while len(collected) < 2 * n:
            assert time.monotonic() < deadline, f"{len(collected)} of {2 * n} finished"
            collected += client.poll()
            concurrent.futures.wait(outstanding - set(collected), timeout=0.2,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        for f in served:
            f.result(WAIT_S)
    assert len(collected) == len(set(collected)) == 2 * n  # each returned exactly once
    assert client.poll() == []
    for i, (resp, sent) in enumerate(submitted):
        assert sent.op == "send" and sent.key == f"req-{i}" and sent.result() is None
        assert resp.op == "recv" and resp.key == f"resp-{i}"
        msg = resp.result()
        assert int(msg["i"]) == i
        assert float(msg["sum"]) == pytest.approx(sum(_values(_request(i))))


def test_submissions_from_one_thread_are_sent_in_order(pair: tuple[SyncPipe, SyncPipe]
                                                       ) -> None:
    server, client = pair
    sends = [client.submit_send(torch.tensor([i])) for i in range(200)]
    assert [int(server.recv()) for _ in range(200)] == list(range(200))
    concurrent.futures.wait(sends, timeout=WAIT_S)
    assert {f.result() for f in sends} == {None}
    assert sorted(client.poll(), key=sends.index) == sends


def test_blocking_send_and_recv_carry_any_structure_by_key(pair: tuple[SyncPipe, SyncPipe]
                                                          ) -> None:
    server, client = pair
    msgs: dict[str | None, Any] = {
        None: None, "": torch.ones(3), "list": [torch.zeros(2), torch.ones(1, 1)],
        "dict": {"k": torch.arange(4), "v": torch.empty(0)}, "γ": torch.tensor(7)}
    for key, msg in msgs.items():
        client.send(msg, key=key)
    for key in reversed(msgs):  # claimed by key, in any order
        got = server.recv(key=key)
        want = msgs[key]
        if want is None:
            assert got is None
        elif isinstance(want, torch.Tensor):
            assert torch.equal(got, want)
        elif isinstance(want, list):
            assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        else:
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)
    assert server.poll() == [] and client.poll() == []  # blocking calls are not collected


def test_recv_timeout_raises_and_loses_nothing(pair: tuple[SyncPipe, SyncPipe]) -> None:
    server, client = pair
    with pytest.raises(TimeoutError):
        server.recv(key="late", timeout=0.05)
    client.send(torch.tensor([5]), key="late")
    assert int(server.recv(key="late")) == 5


def test_a_cancelled_submit_recv_takes_nothing(pair: tuple[SyncPipe, SyncPipe]) -> None:
    server, client = pair
    fut = server.submit_recv(key="k")
    assert fut.cancel() and fut.cancelled()
    assert fut.cancel()  # cancelling twice: still cancelled
    client.send(torch.tensor([1]), key="k")
    assert int(server.recv(key="k", timeout=WAIT_S)) == 1
    assert server.poll() == [fut]


def test_cancel_racing_arrival_never_loses_or_duplicates_a_message(
        pair: tuple[SyncPipe, SyncPipe]) -> None:
    server, client = pair
    rng = random.Random(7)
    outcomes = {"cancelled": 0, "completed": 0}
    for i in range(300):
        sent = client.submit_send(torch.tensor([i]), key="race")
        if i % 3 == 0:
            sent.result(WAIT_S)  # the message is (nearly) here before the receive starts
        fut = server.submit_recv(key="race")
        for _ in range(rng.randrange(3000)):  # jitter, to hit every moment of the transfer
            pass
        if fut.cancel():
            outcomes["cancelled"] += 1
            assert fut.cancelled()
            got = server.recv(key="race", timeout=WAIT_S)  # the message is still there
        else:
            outcomes["completed"] += 1
            got = fut.result(WAIT_S)
        assert int(got) == i  # neither lost (a timeout) nor taken twice (i - 1)
    assert server.pipe.stats.recv_buffered_messages == 0
    assert outcomes["cancelled"] > 0, outcomes


def test_cancel_from_a_done_callback_on_the_loop_thread(pair: tuple[SyncPipe, SyncPipe]
                                                        ) -> None:
    server, client = pair
    first = server.submit_recv(key="first")
    second = server.submit_recv(key="second")
    first.add_done_callback(lambda _: second.cancel())  # runs on the loop thread
    t0 = time.monotonic()
    client.send(torch.tensor([1]), key="first")
    done, _ = concurrent.futures.wait([second], timeout=WAIT_S)
    # wait() is woken by the cancellation, not by its timeout (cancel() alone did not wake
    # it: it waited the whole 30 s)
    assert second in done and second.cancelled()
    assert time.monotonic() - t0 < WAIT_S / 3
    assert list(concurrent.futures.as_completed([second], timeout=1)) == [second]
    client.send(torch.tensor([2]), key="second")
    assert int(server.recv(key="second")) == 2


def test_a_cancelled_send_waiting_for_credits_sends_nothing() -> None:
    server, client = _pair(timeout=WAIT_S, recv_buffer_bytes=1 << 20)
    with server, client:
        client.send(torch.ones(1 << 19, dtype=torch.float32), key="big")  # 2 MiB: all credits
        waiting = client.submit_send(torch.tensor([666]), key="b")
        done, _ = concurrent.futures.wait([waiting], timeout=0.2)
        assert not done  # it waits for credits the receiver has not returned
        assert waiting.cancel()
        assert server.recv(key="big").shape == (1 << 19,)  # returns the credits
        client.send(torch.tensor([7]), key="b")
        assert int(server.recv(key="b")) == 7  # not 666
        assert server.pipe.stats.messages_received == 2


def test_close_fails_pending_futures_with_pipe_closed() -> None:
    server, client = _pair(timeout=WAIT_S)
    pending = [server.submit_recv(key=f"never-{i}") for i in range(3)]
    pending.append(server.submit_recv())
    peer_pending = client.submit_recv(key="never")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(server.recv, "never-blocking", WAIT_S)
        server.close()
        with pytest.raises(PipeClosed):
            blocked.result(WAIT_S)
    for fut in pending:
        with pytest.raises(PipeClosed):
            fut.result(WAIT_S)
    assert set(server.poll()) == set(pending)
    with pytest.raises(PipeClosed):
        server.submit_recv(key="after")
    with pytest.raises(PipeClosed):
        server.submit_send(torch.ones(1))
    with pytest.raises(PipeClosed):  # the peer's graceful close reaches this side too
        peer_pending.result(WAIT_S)
    with pytest.raises(PipeClosed):
        client.submit_send(torch.ones(1)).result(WAIT_S)
    client.close()
    server.close()  # idempotent
    assert not any(t.name.startswith("aiokvpipe-sync") for t in threading.enumerate())


_PEER = """
import sys
from aiokvpipe.compat import SyncPipe
pipe = SyncPipe("127.0.0.1", int(sys.argv[1]), 1, timeout=30)
pipe.send(None, key="hello")
print("connected", flush=True)
sys.stdin.read()  # until the test kills us (or goes away)
"""


def test_a_killed_peer_fails_pending_futures_with_broken_pipe() -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    peer = subprocess.Popen([sys.executable, "-c", _PEER, str(port)], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        with SyncPipe("127.0.0.1", port, 0, timeout=WAIT_S) as server:
            assert server.recv(key="hello") is None
            assert peer.stdout is not None and peer.stdout.readline() == "connected\n"
            pending = [server.submit_recv(key=f"k{i}") for i in range(4)]
            peer.send_signal(signal.SIGKILL)
            peer.wait(WAIT_S)
            for fut in pending:
                with pytest.raises(BrokenPipe):
                    fut.result(WAIT_S)
            assert set(server.poll()) == set(pending)
            with pytest.raises(BrokenPipe):
                server.submit_recv(key="after").result(WAIT_S)
            with pytest.raises(BrokenPipe):
                server.send(torch.ones(1), key="after")
    finally:
        if peer.poll() is None:
            peer.kill()
        peer.wait(WAIT_S)
        assert peer.stdin is not None and peer.stdout is not None
        peer.stdin.close()
        peer.stdout.close()


def test_blocks_through_the_synchronous_bridge(pair: tuple[SyncPipe, SyncPipe]) -> None:
    # An engine step loop: the decode side submits its receives, the prefill side sends
    # layer by layer from worker threads; poll() collects what finished.
    from aiokvpipe import BlockPool

    server, client = pair
    src = BlockPool([torch.randn(2, 32, 4, 8) for _ in range(4)], block_dim=1)
    dst = BlockPool([torch.zeros(2, 16, 4, 8) for _ in range(4)], block_dim=1)
    requests = {f"r{i}": ([4 * i, 4 * i + 1], [15 - 2 * i, 14 - 2 * i]) for i in range(4)}
    received = {key: server.submit_recv_blocks(dst, d, key=key)
                for key, (_, d) in requests.items()}
    with concurrent.futures.ThreadPoolExecutor(4) as workers:
        sends = [workers.submit(client.send_blocks, src, s, key, [layer], WAIT_S)
                 for key, (s, _) in requests.items() for layer in range(4)]
        for f in sends:
            f.result(WAIT_S)
    concurrent.futures.wait(received.values(), timeout=WAIT_S)
    finished = server.poll()
    assert set(finished) == set(received.values())
    for key, (s_ids, d_ids) in requests.items():
        received[key].result(0)
        for t_src, t_dst in zip(src.tensors, dst.tensors):
            assert torch.equal(t_src[:, s_ids], t_dst[:, d_ids]), key
