"""Start, watch and stop the example servers as subprocesses (used by demo.py and the tests).

Contract: every wait here is bounded; :meth:`Server.stop` and :meth:`Server.kill` always reap
the process; a server that dies while being waited for raises :class:`ServerDied` with the tail
of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES_DIR.parent


class ServerDied(RuntimeError):
    """A server process exited while we expected it to be up."""


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def child_env(token: str | None = None) -> dict[str, str]:
    """Environment for a server: unbuffered output, the repo importable without installing it,
    and the pipe token passed by environment rather than argv (argv shows in ps)."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.pop("AIOKVPIPE_TOKEN", None)
    if token:
        env["AIOKVPIPE_TOKEN"] = token
    return env


@dataclass
class Server:
    """One running server script; ``url`` is its HTTP base URL."""

    name: str
    argv: list[str]
    url: str
    log_path: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> Server:
        """Spawn the process (output appended to ``log_path``); returns self."""
        with open(self.log_path, "ab") as log:
            # Own session: a terminal's Ctrl-C goes to the caller only, which then stops the
            # servers in order (decode first) instead of all of them dying at once.
            self.proc = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def wait_healthy(
        self, timeout: float = 60.0, ready: Callable[[dict[str, Any]], bool] = lambda _: True
    ) -> dict[str, Any]:
        """Poll ``GET /health`` until it answers 200 and ``ready(body)`` holds; return the body.

        Raises ``TimeoutError`` after ``timeout`` s, :class:`ServerDied` if the process exits.
        """
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=2.0) as client:
            while True:
                if not self.alive():
                    raise ServerDied(f"{self.name} exited; log tail:\n{self.log_tail()}")
                try:
                    resp = client.get("/health")
                    body: dict[str, Any] = resp.json() if resp.status_code == 200 else {}
                    if body and ready(body):
                        return body
                except httpx.HTTPError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready after {timeout}s:\n{self.log_tail()}"
                    )
                time.sleep(0.05)  # poll interval

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (graceful: uvicorn runs the lifespan shutdown), SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL and reap: the abrupt death of a peer."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(10.0)


def prefill_server(
    *,
    port: int,
    pipe_port: int,
    log_path: Path,
    device: str = "cpu",
    token: str | None = None,
    extra: Sequence[str] = (),
) -> Server:
    """A (not yet started) prefill server on 127.0.0.1."""
    argv = [
        sys.executable, str(EXAMPLES_DIR / "prefill_server.py"),
        "--port", str(port), "--pipe-port", str(pipe_port), "--device", device,
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    return Server("prefill", argv, f"http://127.0.0.1:{port}", log_path, child_env(token))


def decode_server(
    *,
    port: int,
    prefill_port: int,
    pipe_port: int,
    log_path: Path,
    device: str = "cpu",
    token: str | None = None,
    extra: Sequence[str] = (),
) -> Server:
    """A (not yet started) decode server on 127.0.0.1 wired to the prefill server's ports."""
    argv = [
        sys.executable, str(EXAMPLES_DIR / "decode_server.py"),
        "--port", str(port), "--prefill-url", f"http://127.0.0.1:{prefill_port}",
        "--pipe-host", "127.0.0.1", "--pipe-port", str(pipe_port), "--device", device,
        "--log-level", "warning", *extra,
    ]  # fmt: skip
    return Server("decode", argv, f"http://127.0.0.1:{port}", log_path, child_env(token))


def pipe_connected(body: dict[str, Any]) -> bool:
    """``ready`` predicate for a decode server: its pipe to the prefill server is up."""
    return bool(body.get("pipe_connected"))
