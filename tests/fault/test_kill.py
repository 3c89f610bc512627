"""SIGKILL of the peer at random points of a stream: the survivor never hangs, its calls raise
within 2 s, and each trial gives back every task, socket and thread it took.

Points (drawn with a seeded RNG; the seed is printed and reported, ``AIOKVPIPE_FAULT_SEED``
replays a run):

* ``before-handshake/listener`` -- a hand-speaking client killed after part of its HELLO or
  AUTH; the survivor is a listener: it drops the connection at once and keeps serving.
* ``before-handshake/connector`` -- a hand-speaking listener killed after accepting, after
  part of its HELLO or ACCEPT, or with both data connections attached but no READY; the
  survivor's ``connect()`` raises.
* ``mid-header`` -- a hand-speaking client killed part-way through a message HEADER (or, for
  ``mid-payload/raw``, part-way through the payload it announced).
* ``mid-payload`` -- a real aiokvpipe peer streaming 1-16 MiB messages (to or from the
  survivor) killed at a random moment.
* ``during-close`` -- a real peer that sent a few messages kills itself 0-10 ms after it
  started ``aclose()``; the survivor gets every message it sent before, then ``PipeClosed``
  (the close finished) or ``BrokenPipe`` (it did not).

``AIOKVPIPE_FAULT_TRIALS`` sets the number of trials (10 by default, 100 in the slow run).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import aiokvpipe

from .conftest import (
    HOST,
    Snapshot,
    add_leaks,
    describe_loop_errors,
    env_int,
    fault_seed,
    outcome_of,
    timing,
)
from .fault_peer import check_message, make_message

MiB = 1 << 20
DEADLINE_S = 2.0  # the survivor's calls must raise within this of the kill
HANG_S = 15.0  # what counts as a hang (the test does not wait longer for any call)

CATEGORIES = ("before-handshake/listener", "before-handshake/connector", "mid-header",
              "mid-payload", "during-close")


class DropLog(logging.Handler):
    """Records (time.monotonic(), exception) of the listener's dropped connections."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.drops: list[tuple[float, BaseException]] = []
        self.crashes: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg.startswith("dropped incoming connection"):
            self.drops.append((time.monotonic(), record.args[1]))  # type: ignore[index]
        elif record.levelno >= logging.ERROR:
            self.crashes.append(record.getMessage())


@pytest.fixture
def drop_log() -> Iterator[DropLog]:
    logger = logging.getLogger("aiokvpipe")
    handler = DropLog()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


class Trials:
    """Runs one trial of each kind; every trial returns a dict of what it measured."""

    def __init__(self, spawn: Any, drop_log: DropLog, rng: random.Random) -> None:
        self.spawn = spawn
        self.drop_log = drop_log
        self.rng = rng
        self.loop = asyncio.get_running_loop()

    async def good_client(self, lst: aiokvpipe.Listener) -> None:
        accepted = asyncio.ensure_future(lst.accept())
        client = await asyncio.wait_for(aiokvpipe.connect(HOST, lst.port), 10)
        server = await asyncio.wait_for(accepted, 10)
        await client.send(torch.arange(10))
        assert torch.equal(await asyncio.wait_for(server.recv(), 10), torch.arange(10))
        await asyncio.wait_for(asyncio.gather(client.aclose(), server.aclose()), 10)

    async def later_calls_raise(self, pipe: aiokvpipe.Pipe) -> None:
        """After the error, new calls raise at once and aclose() returns."""
        for call in (pipe.recv(), pipe.send(torch.ones(2))):
            out = await outcome_of(call, DEADLINE_S)
            assert isinstance(out.exc, aiokvpipe.PipeError), f"later call: {out}"
        out = await outcome_of(pipe.aclose(), DEADLINE_S)
        assert out.exc is None and not out.hung, f"aclose() after the kill: {out}"

    # -- before the handshake ---------------------------------------------------------------

    async def before_handshake_listener(self) -> dict[str, Any]:
        stage = self.rng.choice(["hello", "auth"])
        cut = self.rng.random()
        lst = await aiokvpipe.listen(HOST, 0)
        try:
            n = len(self.drop_log.drops)
            peer = await self.spawn("raw_peer.py", {"role": "client", "port": lst.port,
                                                    "stage": stage, "cut": cut},
                                    watchdog_s=60)
            armed = await peer.expect("armed", 20)
            t_kill = peer.kill()
            deadline = t_kill + HANG_S
            while len(self.drop_log.drops) <= n and self.loop.time() < deadline:
                await asyncio.sleep(0.002)
            await peer.reap()
            hung = len(self.drop_log.drops) <= n
            t_err, reason = self.drop_log.drops[n] if not hung else (self.loop.time(), None)
            leftover = await outcome_of(lst.accept(), 0.05)
            assert leftover.hung, f"the killed peer's handshake produced a pipe: {leftover}"
            await self.good_client(lst)
        finally:
            await lst.aclose()
        return {"detail": f"{stage} cut={cut:.2f} ({armed['written']} B)", "hung": hung,
                "time_to_error": t_err - t_kill, "error": repr(reason)}

    async def before_handshake_connector(self) -> dict[str, Any]:
        stage = self.rng.choice(["accepted", "hello", "accept", "ready"])
        cut = self.rng.random()
        peer = await self.spawn("raw_peer.py", {"role": "server", "stage": stage, "cut": cut},
                                watchdog_s=60)
        port = (await peer.expect("listening", 20))["port"]
        connecting = asyncio.ensure_future(aiokvpipe.connect(HOST, port))
        try:
            armed = await peer.expect("armed", 20)
            assert not connecting.done(), f"connect() ended before the kill: {connecting}"
            t_kill = peer.kill()
            out = await outcome_of(connecting, HANG_S)
        finally:
            if not connecting.done():
                connecting.cancel()
        await peer.reap()
        if out.exc is None and not out.hung:
            await out.value.aclose()
            raise AssertionError("connect() to a killed listener returned a pipe")
        return {"detail": f"{stage} cut={cut:.2f} ({armed['written']} B)", "hung": out.hung,
                "time_to_error": (out.at or 0) - t_kill, "error": repr(out.exc)}

    # -- on an open pipe ---------------------------------------------------------------------

    async def mid_header(self) -> dict[str, Any]:
        raw_payload = self.rng.random() < 0.3
        stage = "payload" if raw_payload else "header"
        cut = self.rng.random()
        nbytes = self.rng.randint(1, 4 * MiB)
        lst = await aiokvpipe.listen(HOST, 0)
        pipe = None
        try:
            accepted = asyncio.ensure_future(lst.accept())
            peer = await self.spawn("raw_peer.py", {"role": "client", "port": lst.port,
                                                    "stage": stage, "cut": cut,
                                                    "nbytes": nbytes}, watchdog_s=60)
            armed = await peer.expect("armed", 20)
            pipe = await asyncio.wait_for(accepted, 10)
            pending = [asyncio.ensure_future(pipe.recv(key="k")),
                       asyncio.ensure_future(pipe.recv())]
            await asyncio.sleep(0.01)  # let the partial frame arrive
            t_kill = peer.kill()
            outs = [await outcome_of(p, HANG_S) for p in pending]
            await peer.reap()
            for out in outs:
                assert out.hung or isinstance(out.exc, aiokvpipe.BrokenPipe), out
            await self.later_calls_raise(pipe)
            await self.good_client(lst)
        finally:
            if pipe is not None:
                await pipe.aclose()
            await lst.aclose()
        return {"category": "mid-payload/raw" if raw_payload else "mid-header",
                "detail": f"{stage} of {nbytes} B cut={cut:.2f} ({armed['written']} B)",
                "hung": any(o.hung for o in outs),
                "time_to_error": max((o.at or 0) for o in outs) - t_kill,
                "error": repr(outs[0].exc.__cause__ if outs[0].exc else None)}

    async def _real_pipe(self, mode: str, cfg: dict[str, Any]) -> tuple[Any, aiokvpipe.Pipe]:
        """A real peer process in ``mode`` and this side's end of its pipe; the survivor
        listens or connects at random."""
        cfg = {"mode": mode, "seed": self.rng.randrange(1 << 30),
               "loop": self.rng.choice(["asyncio", "uvloop"]), **cfg}
        if self.rng.random() < 0.5:
            lst = await aiokvpipe.listen(HOST, 0)
            accepted = asyncio.ensure_future(lst.accept())
            peer = await self.spawn("fault_peer.py", {"role": "connect", "port": lst.port,
                                                      **cfg}, watchdog_s=90)
            try:
                pipe = await asyncio.wait_for(accepted, 30)
            finally:
                if not accepted.done():
                    accepted.cancel()
            await lst.aclose()
            await peer.expect("connected", 10)
            return peer, pipe
        peer = await self.spawn("fault_peer.py", {"role": "listen", **cfg}, watchdog_s=90)
        port = (await peer.expect("listening", 30))["port"]
        pipe = await aiokvpipe.connect(HOST, port)
        await peer.expect("connected", 10)
        return peer, pipe

    async def mid_payload(self) -> dict[str, Any]:
        survivor_sends = self.rng.random() < 0.5
        delay = self.rng.uniform(0, 0.4)
        peer, pipe = await self._real_pipe("recv_stream" if survivor_sends else "send_stream",
                                              {"min_bytes": MiB, "max_bytes": 16 * MiB})
        received = 0
        try:
            if survivor_sends:
                rng = random.Random(self.rng.randrange(1 << 30))

                async def work() -> None:
                    seq = 0
                    while True:
                        await pipe.send(make_message(rng, (0, seq, 0),
                                                     rng.randint(MiB, 16 * MiB)), key="s")
                        seq += 1
                worker = asyncio.ensure_future(work())
                await peer.expect("receiving", 30)
            else:
                async def work() -> None:
                    nonlocal received
                    while True:
                        ident = check_message(await pipe.recv(key="s"))
                        assert ident[1] == received, f"message {ident} where #{received} due"
                        received += 1
                worker = asyncio.ensure_future(work())
                await peer.expect("streaming", 30)
            await asyncio.sleep(delay)
            assert not worker.done(), worker
            t_kill = peer.kill()
            out = await outcome_of(worker, HANG_S)
            await peer.reap()
            assert out.hung or isinstance(out.exc, aiokvpipe.BrokenPipe), out
            await self.later_calls_raise(pipe)
        finally:
            await pipe.aclose()
        return {"detail": f"survivor {'sends' if survivor_sends else 'receives'}, kill after "
                          f"{delay * 1000:.0f} ms, {received} received",
                "hung": out.hung, "time_to_error": (out.at or 0) - t_kill,
                "error": repr(out.exc.__cause__ if out.exc else None)}

    async def during_close(self) -> dict[str, Any]:
        count = self.rng.randint(0, 6)
        delay = self.rng.choice([0.0, self.rng.uniform(0, 0.01)])
        peer, pipe = await self._real_pipe("close_after", {"count": count,
                                                              "kill_delay_s": delay,
                                                              "max_bytes": MiB})
        got = 0
        try:
            async def work() -> None:
                nonlocal got
                while True:
                    ident = check_message(await pipe.recv(key="s"))
                    assert ident[1] == got, f"message {ident} where #{got} was due"
                    got += 1

            worker = asyncio.ensure_future(work())
            events = [await peer.next_event(30)]
            while events[-1]["event"] != "killing":
                events.append(await peer.next_event(30))
            t_kill = events[-1]["t"]
            out = await outcome_of(worker, HANG_S)
            await peer.reap()
            closed_first = any(e["event"] == "closed" for e in events)
            assert out.hung or isinstance(out.exc, (aiokvpipe.PipeClosed,
                                                    aiokvpipe.BrokenPipe)), out
            if isinstance(out.exc, aiokvpipe.PipeClosed):
                assert got == count, f"graceful close after {got} of {count} messages"
            await self.later_calls_raise(pipe)
        finally:
            await pipe.aclose()
        # The peer's aclose() completed before it died, yet messages were lost: the bug that
        # test_messages_sent_before_a_completed_close_are_all_delivered pins down. Counted
        # here, asserted there.
        lost = closed_first and (got < count or not isinstance(out.exc, aiokvpipe.PipeClosed))
        return {"detail": f"{count} messages, kill {delay * 1000:.1f} ms into aclose(), "
                          f"{got} received, close {'done' if closed_first else 'cut'}"
                          + (" LOST AFTER COMPLETED CLOSE" if lost else ""),
                "hung": out.hung, "time_to_error": max(0.0, (out.at or 0) - t_kill),
                "error": type(out.exc).__name__, "lost_after_completed_close": lost}


async def run_trials(n: int, spawn: Any, drop_log: DropLog, loop_errors: list[Any],
                     figures: dict[str, Any]) -> None:
    seed = fault_seed()
    print(f"\nSIGKILL trials: {n}, seed {seed} (replay with AIOKVPIPE_FAULT_SEED={seed})")
    rng = random.Random(seed)
    trials = Trials(spawn, drop_log, rng)
    order = [CATEGORIES[i % len(CATEGORIES)] for i in range(n)]
    rng.shuffle(order)
    run = {"before-handshake/listener": trials.before_handshake_listener,
           "before-handshake/connector": trials.before_handshake_connector,
           "mid-header": trials.mid_header, "mid-payload": trials.mid_payload,
           "during-close": trials.during_close}
    results: list[dict[str, Any]] = []
    leaks: dict[str, int] = {}
    figures.update(seed=seed, trials=0, hangs=0, leaks=leaks)
    for i, category in enumerate(order):
        before = Snapshot.take()
        result = {"category": category, **await run[category]()}
        trial_leaks = await before.settle()
        add_leaks(leaks, trial_leaks)
        result["leaks"] = trial_leaks
        result["time_to_error"] = round(result["time_to_error"], 4)
        results.append(result)
        figures["trials"] = i + 1
        figures["hangs"] = sum(r["hung"] for r in results)
        print(f"  trial {i:3d} {result['category']:27s} {result['time_to_error'] * 1000:7.1f} ms"
              f"  {result['detail']}  -> {result['error'][:90]}"
              + (f"  LEAKED {trial_leaks} {before.describe_tasks()}"
                 if any(trial_leaks.values()) else ""))
    times = [r["time_to_error"] for r in results if not r["hung"]]
    per_category: dict[str, Any] = {}
    for r in results:
        per_category.setdefault(r["category"], []).append(r["time_to_error"])
    figures.update(
        lost_after_completed_close=sum(bool(r.get("lost_after_completed_close"))
                                       for r in results),
        time_to_error=timing(times),
        per_point={k: timing(v) for k, v in per_category.items()},
        crashes=len(loop_errors) + len(drop_log.crashes),
        results=results,
    )
    hangs = [r for r in results if r["hung"]]
    slow = [r for r in results if not r["hung"] and r["time_to_error"] > DEADLINE_S]
    assert not hangs, f"{len(hangs)} hangs: {hangs}"
    assert not slow, f"{len(slow)} calls took over {DEADLINE_S} s to raise: {slow}"
    assert not any(leaks.values()), f"leaks over {n} trials: {leaks}"
    assert not loop_errors, describe_loop_errors(loop_errors)
    assert not drop_log.crashes, drop_log.crashes


@pytest.mark.timeout(240)
async def test_sigkill_at_random_points(procs: Any, drop_log: DropLog,
                                        loop_errors: list[Any], figures: dict[str, Any]) -> None:
    await run_trials(env_int("AIOKVPIPE_FAULT_TRIALS", 10), procs, drop_log, loop_errors,
                     figures)


@pytest.mark.slow
@pytest.mark.timeout(3600)
async def test_sigkill_at_random_points_slow(procs: Any, drop_log: DropLog,
                                             loop_errors: list[Any],
                                             figures: dict[str, Any]) -> None:
    await run_trials(env_int("AIOKVPIPE_FAULT_TRIALS", 100), procs, drop_log, loop_errors,
                     figures)


@pytest.mark.timeout(60)
async def test_client_killed_between_accept_and_attach_is_released_promptly(
        procs: Any, drop_log: DropLog, figures: dict[str, Any]) -> None:
    """A client that dies after the listener's ACCEPT, before its data connections attach:
    its control connection is gone, so the listener should drop the half-open session at
    once -- not hold its task, handshake slot and sockets until ``handshake_timeout``."""
    lst = await aiokvpipe.listen(HOST, 0, handshake_timeout=20.0)
    before = Snapshot.take()
    try:
        n = len(drop_log.drops)
        peer = await procs("raw_peer.py", {"role": "client", "port": lst.port,
                                           "stage": "attach", "cut": 0.5}, watchdog_s=60)
        await peer.expect("armed", 20)
        t_kill = peer.kill()
        await peer.reap()
        loop = asyncio.get_running_loop()
        deadline = t_kill + 5.0
        while len(drop_log.drops) < n + 2 and loop.time() < deadline:
            await asyncio.sleep(0.005)
        released = [t - t_kill for t, _ in drop_log.drops[n:]]
        reasons = [repr(r) for _, r in drop_log.drops[n:]]
        leaks = await before.settle(timeout=0.5)
        figures.update(time_to_error={"released_s": [round(x, 3) for x in released]},
                       error=reasons, leaks=leaks)
        # Two connections to drop: the data connection (EOF mid-ATTACH) and the control one.
        assert len(released) == 2, (
            f"{DEADLINE_S + 3:.0f} s after the kill the listener still holds the control "
            f"connection of the dead client (dropped so far: {reasons}); it waits for its "
            f"ATTACH connections until handshake_timeout (20 s)")
        assert max(released) < DEADLINE_S
        assert not any(leaks.values()), leaks
    finally:
        await lst.aclose()


@pytest.mark.timeout(120)
async def test_messages_sent_before_a_completed_close_are_all_delivered(
        procs: Any, figures: dict[str, Any]) -> None:
    """``aclose()`` promises that everything already sent is delivered. A peer process sends
    a few <= 1 MiB messages, closes its pipe (``aclose()`` returns) and *stays alive*; the
    receiver must get every message, then ``PipeClosed``, in every round.

    (Found by the during-close trials: up to 6ee0903 the receiver answered the peer's CLOSE at
    once, the peer then closed its control connection, and the receiver broke the pipe on that
    EOF while payloads were still arriving on the data connection -- about one pipe in ten
    lost its last messages.)"""
    rounds, count = 80, 4
    seed = fault_seed()
    lst = await aiokvpipe.listen(HOST, 0)
    peer = await procs("fault_peer.py", {"role": "connect", "port": lst.port,
                                         "mode": "close_many", "rounds": rounds,
                                         "count": count, "seed": seed}, watchdog_s=100)
    results = []
    try:
        for r in range(rounds):
            pipe = await asyncio.wait_for(lst.accept(), 30)
            got = 0
            try:
                while True:
                    ident = check_message(await asyncio.wait_for(pipe.recv(key="s"), 10))
                    assert ident[:2] == (r, got), ident
                    got += 1
            except aiokvpipe.PipeError as exc:
                results.append((got, type(exc).__name__, repr(exc.__cause__)))
            await pipe.aclose()
        await peer.expect("closed", 10)
    finally:
        await lst.aclose()
    lost = [(i, res) for i, res in enumerate(results) if res[0] < count or res[1] != "PipeClosed"]
    figures.update(seed=seed, trials=rounds, messages=rounds * count,
                   lost=sum(count - res[0] for _, res in lost), rounds_broken=len(lost),
                   examples=lost[:3])
    assert not lost, (
        f"{len(lost)} of {rounds} pipes broke after the peer's aclose() had returned, losing "
        f"{sum(count - res[0] for _, res in lost)} of {rounds * count} messages; e.g. round "
        f"{lost[0][0]}: {lost[0][1][0]} of {count} received, then {lost[0][1][1]} caused by "
        f"{lost[0][1][2]}")
