"""A helper process that reports JSON-line events on its stdout: what the peer scripts of
``tests/`` and ``tests/fault/`` have in common."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any


class JsonPeerProcess:
    """A running helper script, its stderr file, and the events it has reported."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str, stderr_path: Path) -> None:
        self.proc = proc
        self.name = name
        self.stderr_path = stderr_path
        self.events: list[dict[str, Any]] = []

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-4000:]
        except OSError:
            return "<no stderr>"

    async def next_event(self, timeout: float = 30.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name} ({self.pid}) said nothing for {timeout} s; "
                                 f"stderr:\n{self.stderr()}") from None
        if not line:
            try:
                rc: int | None = await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                rc = None
            raise AssertionError(f"{self.name} ({self.pid}) exited ({rc}) without reporting; "
                                 f"stderr:\n{self.stderr()}")
        event: dict[str, Any] = json.loads(line)
        self.events.append(event)
        if event.get("event") == "error":
            raise AssertionError(f"{self.name} ({self.pid}) failed: {event}; stderr:\n"
                                 f"{self.stderr()}")
        return event

    async def expect(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        event = await self.next_event(timeout)
        assert event["event"] == name, f"expected {name!r} from {self.name}, got {event}"
        return event

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    async def wait(self, timeout: float) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    async def kill_and_reap(self, timeout: float = 15.0) -> int:
        if self.proc.returncode is None:
            try:
                self.proc.kill()  # SIGKILL ends a stopped process too
            except ProcessLookupError:
                pass
        return await self.wait(timeout)
