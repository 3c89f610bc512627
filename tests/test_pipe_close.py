"""Graceful close on a real pipe: what was sent before ``aclose()`` is delivered, then the peer
sees ``PipeClosed`` (never ``BrokenPipe``); later calls raise ``PipeClosed``; ``aclose()`` is
idempotent; ``async with`` closes."""

from __future__ import annotations

import asyncio

import pipe_peer
import pytest
import torch
from conftest import HOST, PairFactory, SpawnPeer, close_quietly

import aiokvpipe

Pair = tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]
MiB = 1 << 20

pytestmark = pytest.mark.timeout(60)


async def drain_until_closed(p: aiokvpipe.Pipe, key: str | None = None) -> list[int]:
    """recv() seq_tensor messages until the pipe reports PipeClosed (BrokenPipe propagates)."""
    seqs = []
    while True:
        try:
            msg = await asyncio.wait_for(p.recv(key=key), 30)
        except aiokvpipe.PipeClosed:
            return seqs
        seqs.append(pipe_peer.read_seq(msg))


async def test_everything_sent_before_aclose_arrives_then_peer_sees_pipeclosed(
        pipe_pair: Pair) -> None:
    a, b = pipe_pair
    sizes = [8, 8 * MiB, 1000, 4 * MiB, 8, 16 * MiB, 64 * 1024]
    for i, n in enumerate(sizes):
        await a.send(pipe_peer.seq_tensor(i, n))
    await asyncio.wait_for(a.aclose(), 30)  # nothing of it was received yet
    assert a.closed
    assert await drain_until_closed(b) == list(range(len(sizes)))


@pytest.mark.parametrize("nbytes", [1000, 70_000], ids=["1kB", "70kB"])
async def test_close_right_after_many_concurrent_sends_delivers_all(
        pipe_pair: Pair, nbytes: int) -> None:
    # Many payloads still in the socket when the CLOSE frames are exchanged: the receiver
    # must not treat the end of the control connection as a broken pipe before it has them.
    a, b = pipe_pair
    n = 100
    await asyncio.gather(*(a.send(pipe_peer.seq_tensor(i, nbytes)) for i in range(n)))
    closing = asyncio.create_task(a.aclose())
    try:
        assert await drain_until_closed(b) == list(range(n))
    finally:
        await asyncio.wait_for(closing, 30)


@pytest.mark.parametrize("end", ["aclose", "break"])
async def test_an_ended_pipe_keeps_no_cache_of_receive_memory(
        pair_factory: PairFactory, end: str) -> None:
    """Received CPU tensors' memory is cached for the pipe's next messages: once the pipe
    ended, the cache is dropped, and memory freed later is not cached again. (Up to
    recv_buffer_bytes, 513 MiB by default, stayed with a closed pipe, and with any tensor
    it had received still alive.)"""
    a, b = await pair_factory()
    for i in range(3):
        await a.send(torch.full((MiB,), i, dtype=torch.int32))  # 4 MiB: pooled memory
    got = [await b.recv() for _ in range(3)]
    kept = got.pop()
    del got  # two blocks back in the cache
    pool = b._plane._pool
    assert pool.cached_bytes >= 8 * MiB
    if end == "aclose":
        await asyncio.wait_for(asyncio.gather(a.aclose(), b.aclose()), 10)
    else:
        b._break(ConnectionAbortedError("torn down (test)"))
    assert pool.cached_bytes == 0
    assert int(kept[0]) == 2
    del kept  # freed after the end: not cached either
    assert pool.cached_bytes == 0


async def test_peer_process_closing_right_after_its_last_send_delivers_all(
        spawn_peer: SpawnPeer) -> None:
    # The realistic case of the test above: a prefill process sends and exits at once.
    count, seed = 3000, 99
    plans = pipe_peer.plan_stream(seed, count)
    listener = await aiokvpipe.listen(HOST, 0)
    pipe = None
    try:
        peer = await spawn_peer(role="connect", port=listener.port, mode="stream", seed=seed,
                                count=count, senders=4, ack=False)
        pipe = await asyncio.wait_for(listener.accept(), 30)
        await peer.expect("connected")
        got = 0
        for key in pipe_peer.STREAM_KEYS:
            for p in (p for p in plans if p.key == key):
                pipe_peer.check_message(p, await asyncio.wait_for(pipe.recv(key=key), 30))
                got += 1
        assert got == count
        with pytest.raises(aiokvpipe.PipeClosed):
            await asyncio.wait_for(pipe.recv(), 10)
        await peer.expect("sent")
        await peer.expect("done")
    finally:
        if pipe is not None:
            await close_quietly(pipe)
        await listener.aclose()


async def test_calls_after_close_raise_pipeclosed_on_both_ends(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    assert a.state is aiokvpipe.State.OPEN  # (public: comparable without private imports)
    await a.send(pipe_peer.seq_tensor(0, 64))
    await a.aclose()
    assert a.state is aiokvpipe.State.CLOSED
    with pytest.raises(aiokvpipe.PipeClosed):
        await a.send(torch.ones(1))
    with pytest.raises(aiokvpipe.PipeClosed):
        await a.recv()
    with pytest.raises(aiokvpipe.PipeClosed):
        await a.recv(key="k")
    # The peer still gets what was sent, then PipeClosed -- for recv and for send.
    assert pipe_peer.read_seq(await b.recv()) == 0
    with pytest.raises(aiokvpipe.PipeClosed):
        await b.recv()
    with pytest.raises(aiokvpipe.PipeClosed):
        await b.recv(key="k")
    with pytest.raises(aiokvpipe.PipeClosed):
        await b.send(torch.ones(1))
    assert b.closed
    for p in (a, b):
        with pytest.raises(aiokvpipe.PipeClosed) as info:
            await p.send(None)
        assert not isinstance(info.value, aiokvpipe.BrokenPipe)


async def test_aclose_is_idempotent_and_concurrent_safe(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    await asyncio.wait_for(asyncio.gather(a.aclose(), a.aclose(), a.aclose()), 30)
    await asyncio.wait_for(a.aclose(), 5)
    await asyncio.wait_for(b.aclose(), 5)
    await asyncio.wait_for(b.aclose(), 5)
    for p in (a, b):
        with pytest.raises(aiokvpipe.PipeClosed):
            await p.recv()


async def test_both_ends_closing_at_once_is_graceful(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    await a.send(pipe_peer.seq_tensor(1, 4 * MiB))
    await b.send(pipe_peer.seq_tensor(2, 4 * MiB))
    await asyncio.wait_for(asyncio.gather(a.aclose(), b.aclose()), 30)
    # aclose() here fails this end's own pending and later recv()s with PipeClosed; what
    # matters is that neither end saw a broken pipe.
    for p in (a, b):
        with pytest.raises(aiokvpipe.PipeClosed) as info:
            await p.send(None)
        assert not isinstance(info.value, aiokvpipe.BrokenPipe)


async def test_pending_recv_raises_pipeclosed_when_this_end_closes(pipe_pair: Pair) -> None:
    a, _ = pipe_pair
    pending = [asyncio.create_task(a.recv()), asyncio.create_task(a.recv(key="x"))]
    await asyncio.sleep(0)  # both reach their wait
    await asyncio.wait_for(a.aclose(), 30)
    for t in pending:
        with pytest.raises(aiokvpipe.PipeClosed):
            await t


async def test_pending_recv_raises_pipeclosed_when_the_peer_closes(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    pending = [asyncio.create_task(b.recv()), asyncio.create_task(b.recv(key="x"))]
    await a.send(pipe_peer.seq_tensor(5, 100))
    await asyncio.wait_for(a.aclose(), 30)
    assert pipe_peer.read_seq(await pending[0]) == 5
    with pytest.raises(aiokvpipe.PipeClosed):
        await pending[1]
    with pytest.raises(aiokvpipe.PipeClosed):
        await b.recv()


async def test_sends_in_flight_at_aclose_either_arrive_or_raise_pipeclosed(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory(max_inflight_bytes=8 * MiB)
    n = 10
    outcomes: dict[int, str] = {}

    async def send(i: int) -> None:
        try:
            await a.send(pipe_peer.seq_tensor(i, 4 * MiB))
            outcomes[i] = "sent"
        except aiokvpipe.PipeClosed:
            outcomes[i] = "closed"

    senders = [asyncio.create_task(send(i)) for i in range(n)]
    await asyncio.sleep(0)  # every sender has called send(): some posted, the rest waiting
    await asyncio.wait_for(asyncio.gather(a.aclose(), *senders), 30)
    received = await drain_until_closed(b)
    assert sorted(outcomes) == list(range(n))
    assert received == [i for i in range(n) if outcomes[i] == "sent"]
    assert "sent" in outcomes.values() and "closed" in outcomes.values(), outcomes


async def test_async_with_closes_the_pipe(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    async with a as entered:
        assert entered is a
        await a.send(pipe_peer.seq_tensor(7, 4 * MiB))
    assert a.closed
    with pytest.raises(aiokvpipe.PipeClosed):
        await a.send(None)
    assert await drain_until_closed(b) == [7]


async def test_async_with_closes_on_error_too(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    with pytest.raises(KeyError):
        async with a:
            await a.send(pipe_peer.seq_tensor(8, 64))
            raise KeyError("boom")
    assert a.closed
    assert await drain_until_closed(b) == [8]


async def test_listener_async_with_and_aclose(any_loop: str) -> None:
    async with await aiokvpipe.listen(HOST, 0) as listener:
        port = listener.port
        waiting = asyncio.create_task(listener.accept())
        await asyncio.sleep(0)
    with pytest.raises(aiokvpipe.PipeClosed):
        await asyncio.wait_for(waiting, 5)
    with pytest.raises(aiokvpipe.PipeClosed):
        await listener.accept()
    with pytest.raises(TimeoutError):
        await aiokvpipe.connect(HOST, port, connect_timeout=0.2)


async def test_a_close_the_peer_never_answers_breaks_saying_which_timeout(
        pair_factory: PairFactory) -> None:
    a, b = await pair_factory(close_timeout=0.3)
    b._control._transport.pause_reading()  # frozen: it never reads our CLOSE
    await asyncio.wait_for(a.aclose(), 10)
    with pytest.raises(aiokvpipe.BrokenPipe) as info:
        await a.wait_closed()
    cause = info.value.__cause__
    assert isinstance(cause, TimeoutError) and "close_timeout=0.3 s" in str(cause), cause


async def test_close_waits_on_while_a_large_transfer_is_still_moving(
        pair_factory: PairFactory) -> None:
    # close_timeout bounds a *stuck* close; a transfer that takes longer but keeps moving
    # bytes must not be cut off (it used to be broken after a fixed 10 s).
    a, b = await pair_factory(close_timeout=0.1)
    big = torch.ones(128 << 20)  # 512 MiB: far more than 0.1 s over loopback here
    sending = asyncio.create_task(a.send(big))
    receiving = asyncio.create_task(b.recv())
    await asyncio.sleep(0)
    async with asyncio.timeout(60):
        await asyncio.gather(sending, a.aclose())
        got = await receiving
        await b.aclose()
    assert got.shape == big.shape and bool(got[-1] == 1)
    assert a._error is None and b._error is None


async def test_a_close_answer_that_cannot_be_written_breaks_the_pipe_at_once(
        pair_factory: PairFactory) -> None:
    """The peer's CLOSE arrives, then our connection dies before our answer is written (a
    failed write closed the transport; its loss is reported a callback later): the close
    did not complete, and the pipe breaks at once with the connection's cause. (The answer
    counted as sent: wait_closed() waited out close_timeout, then blamed a timeout, and the
    pipe said CLOSED.)"""
    a, b = await pair_factory(close_timeout=20.0)
    on_close = b._on_close

    def then_lose_the_connection() -> None:
        on_close()  # our closer is scheduled: it answers next
        b._control._transport.abort()  # type: ignore[union-attr]

    b._on_close = then_lose_the_connection  # type: ignore[method-assign]
    closing = asyncio.ensure_future(a.aclose())
    with pytest.raises(aiokvpipe.BrokenPipe) as raised:
        await asyncio.wait_for(b.wait_closed(), 5)  # well within close_timeout
    assert not isinstance(raised.value.__cause__, TimeoutError), raised.value.__cause__
    assert b.state is aiokvpipe.State.BROKEN
    await asyncio.gather(closing, return_exceptions=True)
