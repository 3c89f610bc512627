"""Fixtures of the fault suite (``tests/fault/``): figures, leak snapshots, helper processes.

Every test here reports *figures* (trials, hangs, time-to-error, leaks, ...) through the
``figures`` fixture: a one-line summary is printed when the test ends (visible with ``-s``),
all of them again in pytest's terminal summary, and, when ``AIOKVPIPE_FAULT_REPORT`` names a
file, merged into that JSON file under the test's id.

Scale knobs (environment variables, read when a test starts):

=============================  ========================  =====================
variable                       default run (CI)          ``-m slow`` run
=============================  ========================  =====================
AIOKVPIPE_FAULT_TRIALS         10 SIGKILL trials         100
AIOKVPIPE_FAULT_SEED           random (printed)          random (printed)
AIOKVPIPE_FUZZ_INPUTS          ~40 000 decoder inputs    1 000 000
AIOKVPIPE_FUZZ_CONNECTIONS     ~600 listener inputs      20 000
AIOKVPIPE_SOAK_SECONDS         60                        1800
=============================  ========================  =====================

The slow run::

    AIOKVPIPE_FAULT_REPORT=fault-figures.json .venv/bin/python -m pytest tests/fault -m slow -s

(``atheris`` installed adds libFuzzer on the decoder; without it that one test is skipped.)
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import socket_fds
from jsonpeer import JsonPeerProcess

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
REPORT_ENV = "AIOKVPIPE_FAULT_REPORT"

_ALL_FIGURES: dict[str, dict[str, Any]] = {}


# -- figures ----------------------------------------------------------------------------------


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(float(value)) if value else default  # "1e6" is accepted


def fault_seed() -> int:
    """The seed of this run's random choices: ``AIOKVPIPE_FAULT_SEED`` or a fresh one."""
    value = os.environ.get("AIOKVPIPE_FAULT_SEED")
    return int(value) if value else random.SystemRandom().randrange(1 << 32)


def timing(samples: list[float]) -> dict[str, float | None]:
    """max / median / p95 of a list of seconds (None when empty), rounded to 0.1 ms."""
    if not samples:
        return {"n": 0, "max_s": None, "median_s": None, "p95_s": None}
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"n": len(samples), "max_s": round(ordered[-1], 4),
            "median_s": round(statistics.median(ordered), 4), "p95_s": round(p95, 4)}


def _summary_line(nodeid: str, fig: dict[str, Any]) -> str:
    keys = ("outcome", "case", "seed", "trials", "inputs", "inputs_per_s", "connections",
            "messages", "hangs", "crashes", "edges", "protocol_error_sites", "time_to_error",
            "detect", "error", "leaks", "rss", "lost", "corrupted", "duplicated", "reordered",
            "lost_after_completed_close", "elapsed_s")
    parts = []
    for k in keys:
        if k not in fig:
            continue
        v = fig[k]
        if isinstance(v, dict):
            v = ",".join(f"{a}={b}" for a, b in v.items() if b is not None)
        parts.append(f"{k}={v}")
    return f"FAULT-FIGURES {nodeid.split('::')[-1]}: " + " ".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call":
        item.stash[_OUTCOME] = report.outcome


_OUTCOME = pytest.StashKey[str]()


@pytest.fixture
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """A dict the test fills with its figures; reported when the test ends, pass or fail."""
    fig: dict[str, Any] = {}
    started = time.monotonic()
    yield fig
    fig.setdefault("elapsed_s", round(time.monotonic() - started, 2))
    fig["outcome"] = request.node.stash.get(_OUTCOME, "error")
    nodeid = request.node.nodeid
    _ALL_FIGURES[nodeid] = fig
    print("\n" + _summary_line(nodeid, fig))
    path = os.environ.get(REPORT_ENV)
    if path:
        try:
            existing = json.loads(Path(path).read_text())
        except (OSError, ValueError):
            existing = {}
        existing[nodeid] = fig
        Path(path).write_text(json.dumps(existing, indent=2, default=str) + "\n")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ALL_FIGURES:
        return
    terminalreporter.section("aiokvpipe fault figures")
    for nodeid, fig in _ALL_FIGURES.items():
        terminalreporter.write_line(_summary_line(nodeid, fig))
    path = os.environ.get(REPORT_ENV)
    if path:
        terminalreporter.write_line(f"(figures as JSON in {path})")


# -- leak snapshots ---------------------------------------------------------------------------


def rss_bytes(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def own_thread_count() -> int:
    """``threading.active_count()`` less the event loop's default-executor workers
    ("asyncio_N": ``getaddrinfo`` runs there; the pool keeps up to min(32, cpus + 4) threads
    for the loop's life and joins them when the loop closes, so they are pooled, not leaked)."""
    return sum(1 for t in threading.enumerate() if not t.name.startswith("asyncio_"))


@dataclass
class Snapshot:
    """What a trial must give back: tasks, socket fds, threads."""

    tasks: set[asyncio.Task[Any]]
    sockets: int
    threads: int

    @classmethod
    def take(cls) -> Snapshot:
        current = asyncio.current_task()
        return cls({t for t in asyncio.all_tasks() if t is not current}, len(socket_fds()),
                   own_thread_count())

    def leaks(self, now: Snapshot) -> dict[str, int]:
        return {"tasks": len(now.tasks - self.tasks),
                "fds": max(0, now.sockets - self.sockets),
                "threads": max(0, now.threads - self.threads)}

    async def settle(self, timeout: float = 2.0) -> dict[str, int]:
        """Leaks left ``timeout`` s after the trial closed everything (transports close their
        sockets a loop iteration or two after ``close()``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            leaks = self.leaks(Snapshot.take())
            if not any(leaks.values()) or loop.time() > deadline:
                return leaks
            await asyncio.sleep(0.01)

    def describe_tasks(self) -> list[str]:
        current = asyncio.current_task()
        return [repr(t)[:300] for t in asyncio.all_tasks() - self.tasks if t is not current]


def add_leaks(total: dict[str, int], leaks: dict[str, int]) -> None:
    for k, v in leaks.items():
        total[k] = total.get(k, 0) + v


# -- crashes the event loop swallows ----------------------------------------------------------


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """Contexts passed to the loop's exception handler during the test ("Task exception was
    never retrieved", "Fatal error: protocol.data_received() call failed", ...): each one is
    a crash the library did not handle."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        errors.append(context)
        lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    yield errors
    loop.set_exception_handler(previous)


def describe_loop_errors(errors: list[dict[str, Any]]) -> list[str]:
    return [f"{c.get('message')}: {c.get('exception')!r}" for c in errors]


# -- helper processes -------------------------------------------------------------------------


class Proc(JsonPeerProcess):
    """A helper process (``raw_peer.py`` / ``fault_peer.py``) and its JSON-line events.

    The helper exits by itself when its stdin closes (the test went away) and after its own
    watchdog (``watchdog_s``) at the latest; teardown SIGKILLs and reaps it regardless.
    """

    def kill(self) -> float:
        """SIGKILL now; returns the loop time just before the signal."""
        t = asyncio.get_running_loop().time()
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return t

    async def reap(self, timeout: float = 15.0) -> int | None:
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        finally:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            # The transport holds the stdout pipe until it sees EOF: read what is left.
            if self.proc.stdout is not None:
                try:
                    await asyncio.wait_for(self.proc.stdout.read(), 5)
                except (TimeoutError, ValueError):
                    pass


@pytest.fixture
async def procs(tmp_path: Path) -> AsyncIterator[Any]:
    """``await spawn(script, cfg, prefix=[...], env={...})`` starts ``tests/fault/<script>``
    with ``cfg`` as JSON (``prefix``: a command to run it under, e.g. ``ip netns exec NS``).
    Every process is SIGKILLed (if still running) and reaped in teardown."""
    started: list[Proc] = []

    async def spawn(script: str, cfg: dict[str, Any], *, prefix: list[str] | None = None,
                    env: dict[str, str] | None = None, watchdog_s: float = 120.0) -> Proc:
        cfg = {"watchdog_s": watchdog_s, **cfg}
        child_env = {k: v for k, v in os.environ.items() if k != "AIOKVPIPE_TOKEN"}
        child_env.update(PYTHONUNBUFFERED="1", **(env or {}))
        stderr_path = tmp_path / f"{script}-{len(started)}.stderr"
        with open(stderr_path, "wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *(prefix or []), sys.executable, str(HERE / script), json.dumps(cfg),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env=child_env, cwd=str(HERE))
        p = Proc(proc, script, stderr_path)
        started.append(p)
        return p

    try:
        yield spawn
    finally:
        for p in started:
            try:
                await p.reap()
            except TimeoutError:  # pragma: no cover - SIGKILL not reaped in 15 s
                print(f"{p.name} {p.pid} could not be reaped")


@dataclass
class Outcome:
    """How one awaited call ended, and when."""

    exc: BaseException | None = None
    value: Any = None
    at: float | None = None
    hung: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


async def outcome_of(aw: Any, timeout: float) -> Outcome:
    """Await ``aw`` for at most ``timeout`` s; never raises (a hang is ``hung=True``)."""
    loop = asyncio.get_running_loop()
    fut = asyncio.ensure_future(aw)
    try:
        value = await asyncio.wait_for(asyncio.shield(fut), timeout)
        return Outcome(value=value, at=loop.time())
    except TimeoutError:
        fut.cancel()
        try:
            await asyncio.wait_for(fut, 5)
        except BaseException:  # noqa: BLE001 - the call is being abandoned
            pass
        return Outcome(hung=True, at=loop.time())
    except Exception as exc:  # noqa: BLE001 - what we measure
        return Outcome(exc=exc, at=loop.time())
