"""Soak: random sizes, keys, cancellations and concurrent tasks through a real peer process that
checks and echoes everything back, for ``AIOKVPIPE_SOAK_SECONDS`` (60 s by default, 30 min in
the slow run).

Every message carries (sender task, sequence number, key index) and a CRC32 of its payload.
Both ends check every message: 0 corrupted, 0 duplicated, 0 reordered (per key and sender
task, sequence numbers only rise), 0 lost (every ``send()`` that returned comes back; a
cancelled one may or may not, but whole if at all), and the RSS of both processes stays flat.
"""

from __future__ import annotations

import asyncio
import random
import statistics
from typing import Any

import pytest

import aiokvpipe

from .conftest import HOST, Snapshot, describe_loop_errors, env_int, fault_seed, rss_bytes
from .fault_peer import check_message, make_message, pool

MiB = 1 << 20
KEYS: list[str | None] = [None, "a", "b", "γάμμα", "", "req-5", "k" * 200]
SENDERS_PER_KEY = 2
#: How much the median RSS may rise from the second quarter of the run to the last quarter.
#: Single samples swing by tens of MiB (a 40 MiB message in flight, the receive pool filling),
#: so a short run gets more slack than a long one.
RSS_GROWTH_LIMIT = 64 * MiB
RSS_GROWTH_LIMIT_SHORT = 96 * MiB  # runs under 10 minutes
OPTS = {"max_inflight_bytes": 16 * MiB, "recv_buffer_bytes": 32 * MiB}
OK, MAYBE, RECEIVED, DUPLICATE = 1, 2, 4, 8  # per-message state bits


def pick_size(rng: random.Random) -> int:
    r = rng.random()
    if r < 0.70:
        return rng.randint(0, 64 * 1024)
    if r < 0.95:
        return rng.randint(64 * 1024, 2 * MiB)
    if r < 0.995:
        return rng.randint(2 * MiB, 8 * MiB)
    return 40 * MiB  # beyond recv_buffer_bytes: admitted alone


def rss_growth(samples: list[tuple[float, int]]) -> dict[str, float]:
    """Median RSS of the second quarter of the run (after warm-up) vs the last quarter."""
    if len(samples) < 8:
        return {"early_mib": 0.0, "late_mib": 0.0, "growth_mib": 0.0}
    values = [v for _, v in samples]
    n = len(values)
    early = statistics.median(values[int(n * 0.25):int(n * 0.50)])
    late = statistics.median(values[int(n * 0.75):])
    return {"early_mib": round(early / MiB, 1), "late_mib": round(late / MiB, 1),
            "growth_mib": round((late - early) / MiB, 1), "max_mib": round(max(values) / MiB, 1)}


def _series(samples: list[Any], points: int = 30) -> list[int]:
    """RSS in MiB at about ``points`` evenly spaced samples (for the figures)."""
    step = max(1, len(samples) // points)
    return [int(v / MiB) for _, v in samples[::step]]


async def soak(duration: float, procs: Any, figures: dict[str, Any],
               loop_errors: list[dict[str, Any]]) -> None:
    seed = fault_seed()
    rng = random.Random(seed)
    print(f"\nsoak: {duration:.0f} s, seed {seed}")
    loop = asyncio.get_running_loop()
    pool()  # the shared random payload pool, made before the clock starts
    before = Snapshot.take()
    lst = await aiokvpipe.listen(HOST, 0, **OPTS)
    accepted = asyncio.ensure_future(lst.accept())
    peer = await procs("fault_peer.py", {"role": "connect", "port": lst.port, "mode": "echo",
                                         "keys": KEYS, "seed": seed, "opts": OPTS,
                                         "cancel_recv_p": 0.2},
                       watchdog_s=duration + 300)
    pipe = await asyncio.wait_for(accepted, 60)
    await lst.aclose()
    await peer.expect("connected", 30)
    await peer.expect("echoing", 30)

    n_tasks = len(KEYS) * SENDERS_PER_KEY
    # One byte of state per message (a 30-minute run sends millions: the bookkeeping must not
    # be what makes the RSS grow). seq -> OK | MAYBE, plus RECEIVED, plus DUPLICATE.
    state = [bytearray() for _ in range(n_tasks)]
    fence: list[int] = [-1] * n_tasks
    n_received = 0
    last_seen: dict[tuple[str | None, int], int] = {}
    corrupted: list[str] = []
    reordered: list[str] = []
    misrouted: list[str] = []
    unknown: list[tuple[int, int]] = []
    counters = {"sends": 0, "sends_cancelled": 0, "recvs_cancelled": 0, "bytes": 0}
    fences_seen = asyncio.Event()
    rss: list[tuple[float, int]] = []
    stop = False
    t0 = loop.time()

    async def sender(task_id: int) -> None:
        key_index = task_id % len(KEYS)
        key = KEYS[key_index]
        r = random.Random(rng.randrange(1 << 30))
        seq = 0
        while not stop:
            nbytes = pick_size(r)
            msg = make_message(r, (task_id, seq, key_index), nbytes)
            state[task_id].append(0)  # before send(): its echo may beat our resumption
            if r.random() < 0.1:  # cancel this send at a random moment
                t = asyncio.ensure_future(pipe.send(msg, key=key))
                await asyncio.sleep(r.uniform(0, 0.003))
                t.cancel()
                try:
                    await t
                    state[task_id][seq] |= OK
                    counters["bytes"] += nbytes
                except asyncio.CancelledError:
                    state[task_id][seq] |= MAYBE
                    counters["sends_cancelled"] += 1
            else:
                await pipe.send(msg, key=key)
                state[task_id][seq] |= OK
                counters["bytes"] += nbytes
            counters["sends"] += 1
            seq += 1
            if r.random() < 0.05:
                await asyncio.sleep(r.uniform(0, 0.01))
        # The fence: per key and sender, everything before it arrives before it.
        state[task_id].append(0)
        await pipe.send(make_message(r, (task_id, seq, key_index), 16), key=key)
        state[task_id][seq] |= OK
        fence[task_id] = seq

    def all_fences_back() -> bool:
        return all(f >= 0 and state[t][f] & RECEIVED for t, f in enumerate(fence))

    async def receiver(key: str | None) -> None:
        nonlocal n_received
        r = random.Random(rng.randrange(1 << 30))
        while True:
            try:
                if r.random() < 0.2:
                    async with asyncio.timeout(r.uniform(0, 0.01)):
                        msg = await pipe.recv(key=key)
                else:
                    msg = await pipe.recv(key=key)
            except TimeoutError:
                counters["recvs_cancelled"] += 1
                continue
            except aiokvpipe.PipeClosed:
                return
            try:
                task_id, seq, key_index = check_message(msg)
            except ValueError as exc:
                corrupted.append(f"key {key!r}: {exc}")
                continue
            if KEYS[key_index] != key:
                misrouted.append(f"message for {KEYS[key_index]!r} received on {key!r}")
            n_received += 1
            if not (0 <= task_id < n_tasks and 0 <= seq < len(state[task_id])):
                unknown.append((task_id, seq))
            elif state[task_id][seq] & RECEIVED:
                state[task_id][seq] |= DUPLICATE
            else:
                state[task_id][seq] |= RECEIVED
            prev = last_seen.get((key, task_id), -1)
            if seq <= prev:
                reordered.append(f"key {key!r} task {task_id}: #{seq} after #{prev}")
            last_seen[(key, task_id)] = seq
            if all_fences_back():
                fences_seen.set()

    async def sample_rss() -> None:
        while True:
            rss.append((round(loop.time() - t0, 1), rss_bytes()))
            await asyncio.sleep(1.0)

    receivers = [asyncio.ensure_future(receiver(k)) for k in KEYS]
    sampler = asyncio.ensure_future(sample_rss())
    senders = [asyncio.ensure_future(sender(i)) for i in range(n_tasks)]
    try:
        await asyncio.sleep(duration)
        stop = True
        await asyncio.wait_for(asyncio.gather(*senders), 120)
        await asyncio.wait_for(fences_seen.wait(), 120)
        traffic_s = loop.time() - t0
        sampler.cancel()
        await asyncio.wait_for(pipe.aclose(), 30)
        await asyncio.wait_for(asyncio.gather(*receivers), 10)
        report = await peer.expect("report", 30)
    finally:
        for t in [*senders, *receivers, sampler]:
            t.cancel()
        await asyncio.gather(*senders, *receivers, sampler, return_exceptions=True)
        await pipe.aclose()
    await peer.reap()
    leaks = await before.settle()

    lost = [(t, s) for t in range(n_tasks) for s, v in enumerate(state[t])
            if v & OK and not v & RECEIVED]
    unknown += [(t, s) for t in range(n_tasks) for s, v in enumerate(state[t])
                if v & RECEIVED and not v & (OK | MAYBE)]
    duplicated = [(t, s) for t in range(n_tasks) for s, v in enumerate(state[t])
                  if v & DUPLICATE]
    cancelled_but_delivered = sum(1 for t in range(n_tasks) for v in state[t]
                                  if v & MAYBE and v & RECEIVED)
    peer_violations = report["violations"]
    growth_here = rss_growth(rss)
    growth_peer = rss_growth([(t, v) for t, v in report["rss"]])
    figures.update(
        seed=seed, elapsed_s=round(traffic_s, 1), messages=n_received,
        send_calls=counters["sends"], gib_each_way=round(counters["bytes"] / 2**30, 2),
        sends_cancelled=counters["sends_cancelled"],
        cancelled_but_delivered=cancelled_but_delivered,
        recvs_cancelled={"here": counters["recvs_cancelled"],
                         "peer": report["cancelled_recvs"]},
        peer_received=report["received"], lost=len(lost), corrupted=len(corrupted),
        duplicated=len(duplicated), reordered=len(reordered), misrouted=len(misrouted),
        unknown=len(unknown), peer_violations=report["n_violations"],
        rss={"here_growth_mib": growth_here["growth_mib"],
             "peer_growth_mib": growth_peer["growth_mib"],
             "here_max_mib": growth_here.get("max_mib"),
             "peer_max_mib": growth_peer.get("max_mib")},
        rss_mib_series={"here": _series(rss), "peer": _series(report["rss"])},
        leaks=leaks, crashes=len(loop_errors))
    assert not lost, f"{len(lost)} messages lost, e.g. {lost[:5]}"
    assert not corrupted and not report["n_violations"], (corrupted[:5], peer_violations[:5])
    assert not duplicated, f"{len(duplicated)} duplicated, e.g. {duplicated[:5]}"
    assert not reordered, reordered[:5]
    assert not misrouted, misrouted[:5]
    assert not unknown, f"messages that were never sent arrived: {unknown[:5]}"
    assert report["received"] == report["echoed"] == n_received
    limit = RSS_GROWTH_LIMIT if duration >= 600 else RSS_GROWTH_LIMIT_SHORT
    assert growth_here["growth_mib"] * MiB < limit, growth_here
    assert growth_peer["growth_mib"] * MiB < limit, growth_peer
    assert not any(leaks.values()), (leaks, before.describe_tasks())
    assert not loop_errors, describe_loop_errors(loop_errors)


@pytest.mark.timeout(240)
async def test_soak(procs: Any, figures: dict[str, Any],
                    loop_errors: list[dict[str, Any]]) -> None:
    await soak(env_int("AIOKVPIPE_SOAK_SECONDS", 60), procs, figures, loop_errors)


@pytest.mark.slow
@pytest.mark.timeout(2 * 3600)
async def test_soak_slow(procs: Any, figures: dict[str, Any],
                         loop_errors: list[dict[str, Any]]) -> None:
    await soak(env_int("AIOKVPIPE_SOAK_SECONDS", 1800), procs, figures, loop_errors)
