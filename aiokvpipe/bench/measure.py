"""The phases, as each side of an asyncio case runs them, and what they measure.

What a phase measures, each on one process's own clock (no cross-process timestamps):

* throughput: the sender streams one tensor per message, with several sends in flight, for the
  phase's seconds, then an end marker; its clock stops when the receiver acknowledges the
  marker. GB/s = payload bytes / that time. An untimed warm-up round of the same kind first.
* latency: ping-pong of one message; the one-way figure is the round trip halved.
* event-loop lag: how late a 1 ms ticker task wakes up, on each side, during timed throughput.
* CPU: each process's CPU seconds during timed throughput, per GB moved; and during the
  ping-pong, per round trip (what busy polling costs shows there).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Final

import torch

from .common import MAX_SAMPLES, MIN_LAT_SAMPLES, Emit, Json, latency_figures, percentile
from .endpoints import Endpoint, EndpointClass, OursEndpoint, phase_nbytes

TICK_S: Final = 1e-3


class LagProbe:
    """A ticker task that sleeps 1 ms at a time and records how late it wakes up.

    Lag includes the loop's own timer granularity (about 1 ms on uvloop), so compare it with a
    baseline's on the same loop rather than with zero.
    """

    def __init__(self) -> None:
        self._lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while len(self._lags) < MAX_SAMPLES:
            t0 = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self._lags.append(time.perf_counter() - t0 - TICK_S)

    async def stop(self) -> Json:
        assert self._task is not None
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        return {"lag_p50_ms": percentile(self._lags, 50) * 1e3,
                "lag_p99_ms": percentile(self._lags, 99) * 1e3,
                "lag_max_ms": max(self._lags, default=float("nan")) * 1e3,
                "lag_ticks": len(self._lags)}


async def measured(fn: Callable[[], Awaitable[int]]) -> Json:
    """Run ``fn`` (which returns a message count) under the lag probe and the CPU clock."""
    probe = LagProbe()
    probe.start()
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        msgs = await fn()
    finally:
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        lag = await probe.stop()
    return {"msgs": msgs, "elapsed_s": elapsed, "cpu_s": cpu, **lag}


async def sender_phases(ep: Endpoint, case: Json) -> list[Json]:
    results = []
    for phase in case["phases"]:
        await ep.prepare(phase)
        kind, seconds = phase["kind"], float(phase["seconds"])
        if kind == "lat":
            n, warm_end = 0, time.perf_counter() + float(phase["warmup_s"])
            while n < phase["warmup_msgs"] or time.perf_counter() < warm_end:
                await ep.ping()
                n += 1
            rtts: list[float] = []
            deadline = time.perf_counter() + seconds
            cpu0 = time.process_time()
            while len(rtts) < MAX_SAMPLES and (len(rtts) < MIN_LAT_SAMPLES
                                               or time.perf_counter() < deadline):
                t0 = time.perf_counter()
                await ep.ping()
                rtts.append(time.perf_counter() - t0)
            cpu = time.process_time() - cpu0
            await ep.end_echo()
            results.append({**latency_figures(rtts), "cpu_s": cpu, "rounds": len(rtts)})
            continue
        if kind == "keyed":
            assert isinstance(ep, OursEndpoint)
            tasks = int(phase["tasks"])
            await ep.stream_keyed(tasks, float(phase["warmup_s"]), 1)
            res = await measured(functools.partial(ep.stream_keyed, tasks, seconds, 1))
        else:
            await ep.stream(float(phase["warmup_s"]), int(phase["warmup_msgs"]))
            res = await measured(functools.partial(ep.stream, seconds, 1))
        res["bytes"] = res["msgs"] * phase_nbytes(phase)
        res["gbps"] = res["bytes"] / res["elapsed_s"] / 1e9
        results.append(res)
    return results


async def receiver_phases(ep: Endpoint, case: Json) -> list[Json]:
    results = []
    for phase in case["phases"]:
        kind = phase["kind"]
        if kind == "lat":
            await ep.prepare(phase)  # how to answer (echo, or a reply without payload)
            cpu0 = time.process_time()
            msgs = await ep.echo()  # (warm-up rounds included: CPU per round is what counts)
            results.append({"msgs": msgs, "cpu_s": time.process_time() - cpu0})
        elif kind == "keyed":
            assert isinstance(ep, OursEndpoint)
            tasks = int(phase["tasks"])
            await ep.drain_keyed(tasks)
            results.append(await measured(functools.partial(ep.drain_keyed, tasks)))
        else:
            await ep.drain()
            results.append(await measured(ep.drain))
    return results


async def _endpoint_case(endpoint: EndpointClass, role: str, device: str, case: Json,
                         emit: Emit) -> list[Json]:
    async with asyncio.timeout(float(case["timeout_s"])):
        ep: Endpoint
        if role == "receiver":
            rendezvous, accept = await endpoint.listen(case, device)
            emit({"type": "rendezvous", "value": rendezvous})
            ep = await accept()
        else:
            ep = await endpoint.connect(case, device, case["rendezvous"])
        try:
            if role == "receiver":
                return await receiver_phases(ep, case)
            return await sender_phases(ep, case)
        finally:
            await ep.aclose()


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return asyncio.new_event_loop


def run_endpoint_case(endpoint: EndpointClass, role: str, device: str, case: Json,
                      emit: Emit) -> list[Json]:
    """Run one case's phases on this side with ``endpoint`` on the case's event loop; raises
    on any failure."""
    with asyncio.Runner(loop_factory=_loop_factory(case["loop"])) as runner:
        result = runner.run(_endpoint_case(endpoint, role, device, case, emit))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return result
