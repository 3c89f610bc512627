"""The coordinator's side: the two measured processes, and the cases run through them.

The command starts two copies of itself with the hidden ``--role sender|receiver`` option
(:mod:`.child`) and drives them with JSON lines over their stdin and stdout (never pickle). The
receiver goes first: it listens and announces a rendezvous (a port, or an NCCL unique id) that
the coordinator hands to the sender. A case that fails is recorded and skipped, and both
processes are restarted; whatever happens, both are stopped and reaped before this returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Awaitable
from pathlib import Path
from typing import IO, Any, Final

from .common import FAKE_UUID_ENV, ONE_GPU_ENV, Json
from .impls import label

#: Seconds a child may take to start (importing torch, CUDA set-up) and to say hello.
START_TIMEOUT_S: Final = 120.0
#: Seconds to wait for a child to exit after being asked, then after SIGTERM.
STOP_TIMEOUT_S: Final = 5.0
#: The folder that holds the ``aiokvpipe`` package the coordinator runs from.
_ROOT: Final = str(Path(__file__).resolve().parents[2])


class CaseFailed(Exception):
    """A case failed or timed out in one of the children."""


class _Child:
    """One measured process, spoken to in JSON lines; its stderr kept in a temporary file."""

    def __init__(self, role: str, device: str) -> None:
        self.role, self.device = role, device
        self._proc: asyncio.subprocess.Process | None = None
        # Kept for the child's whole life, to quote its last words when it fails.
        self._stderr: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115
        self.hello: Json = {}

    async def start(self) -> None:
        env = dict(os.environ)
        # The children import this very aiokvpipe, wherever the coordinator found it.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        if env.get(ONE_GPU_ENV):
            # Two "hosts" to NCCL, two GPUs to our handshake: see --one-gpu.
            env["NCCL_HOSTID"] = f"aiokvpipe-bench-{self.role}"
            env[FAKE_UUID_ENV] = ("aa" if self.role == "sender" else "bb") * 16
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "aiokvpipe", "bench", "--role", self.role,
            "--role-device", self.device, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=self._stderr, env=env, limit=1 << 22)
        self.hello = await self.read(START_TIMEOUT_S)
        if self.hello.get("type") != "hello":
            raise CaseFailed(f"{self.role} did not start: {self.hello}")

    async def send(self, msg: Json) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(msg) + "\n").encode())
        await self._proc.stdin.drain()

    async def read(self, timeout: float) -> Json:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        except TimeoutError:
            raise CaseFailed(f"{self.role} gave no answer within {timeout:.0f} s"
                             f"{self.stderr_tail()}") from None
        if not line:
            raise CaseFailed(f"{self.role} exited{self.stderr_tail()}")
        msg: Json = json.loads(line)
        if msg.get("type") == "error":
            raise CaseFailed(f"{self.role}: {msg['error'].rstrip()}")
        return msg

    def stderr_tail(self, nbytes: int = 3000) -> str:
        self._stderr.seek(0, os.SEEK_END)
        size = self._stderr.tell()
        self._stderr.seek(max(0, size - nbytes))
        tail = self._stderr.read().decode(errors="replace").strip()
        return f"; its stderr ends with:\n{tail}" if tail else ""

    async def stop(self, polite: bool) -> None:
        """End the child and reap it: ``polite`` asks it to exit first (it is between cases),
        then SIGTERM, then SIGKILL, each given a few seconds."""
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        try:
            if polite and proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.write(b'{"type": "exit"}\n')
                proc.stdin.close()
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                return
        except (TimeoutError, ConnectionError):
            pass
        for signal_it in (proc.terminate, proc.kill):
            try:
                signal_it()
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
                return
            except ProcessLookupError:
                return
            except TimeoutError:
                continue

    def kill_now(self) -> None:
        """Last resort when the coordinator's loop is going away."""
        if self._proc is not None and self._proc.returncode is None:
            try:
                self._proc.kill()
            except (ProcessLookupError, RuntimeError):
                pass


class ChildPair:
    """The sender and receiver processes; restarted when a case leaves them in doubt."""

    def __init__(self, sender_device: str, receiver_device: str) -> None:
        self.sender = _Child("sender", sender_device)
        self.receiver = _Child("receiver", receiver_device)

    async def start(self) -> None:
        await _both(self.sender.start(), self.receiver.start())

    async def stop(self, polite: bool) -> None:
        """Stop both (see :meth:`_Child.stop`); a second cancellation kills them outright."""
        try:
            await asyncio.shield(asyncio.gather(self.sender.stop(polite),
                                                self.receiver.stop(polite)))
        finally:
            self.sender.kill_now()
            self.receiver.kill_now()

    async def restart(self) -> None:
        await self.stop(polite=False)
        self.sender = _Child("sender", self.sender.device)
        self.receiver = _Child("receiver", self.receiver.device)
        await self.start()

    async def run_case(self, case: Json) -> tuple[list[Json], list[Json]]:
        """(sender's, receiver's) phase results; raises :class:`CaseFailed`."""
        timeout = float(case["timeout_s"]) + 30.0
        await self.receiver.send(case)
        rendezvous = await self.receiver.read(START_TIMEOUT_S)
        await self.sender.send({**case, "rendezvous": rendezvous["value"]})
        sent, received = await _both(self.sender.read(timeout), self.receiver.read(timeout))
        return sent["phases"], received["phases"]


async def _both(a: Awaitable[Any], b: Awaitable[Any]) -> tuple[Any, Any]:
    """Await both; on the first failure cancel the other and raise that failure."""
    ta, tb = asyncio.ensure_future(a), asyncio.ensure_future(b)
    try:
        await asyncio.wait((ta, tb), return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in (ta, tb):
            if not t.done():
                t.cancel()
        await asyncio.gather(ta, tb, return_exceptions=True)
    for t in (ta, tb):
        if t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return ta.result(), tb.result()


async def run_cases(cases: list[Json], sender_device: str, receiver_device: str
                    ) -> tuple[list[Json], list[Json], list[Json]]:
    """Run every case; returns (records, errors, the children's hellos). A failed case is
    recorded and skipped, the children restarted; the children are stopped whatever
    happens."""
    records: list[Json] = []
    errors: list[Json] = []
    pair = ChildPair(sender_device, receiver_device)
    finished = False
    try:
        await pair.start()
        hellos = [pair.sender.hello, pair.receiver.hello]
        for i, case in enumerate(cases, 1):
            loop = f" ({case['loop']})" if case["loop"] != "none" else ""
            name = f"{label(case['impl'])}{loop}"
            print(f"bench: [{i}/{len(cases)}] {name}, repeat {case['repeat'] + 1}",
                  file=sys.stderr, flush=True)
            try:
                sent, received = await pair.run_case(case)
            except CaseFailed as exc:
                print(f"bench: {name} failed: {exc}", file=sys.stderr, flush=True)
                errors.append({"impl": case["impl"], "loop": case["loop"],
                               "repeat": case["repeat"], "error": str(exc)})
                await pair.restart()
                continue
            for phase, s, r in zip(case["phases"], sent, received):
                records.append({"impl": case["impl"], "loop": case["loop"],
                                "repeat": case["repeat"], "label": phase["label"],
                                "kind": phase["kind"], "nbytes": phase["nbytes"],
                                "sender": s, "receiver": r})
        finished = True
    finally:
        await pair.stop(polite=finished)
    return records, errors, hellos
