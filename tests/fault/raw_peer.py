"""A helper process that speaks aiokvpipe by hand and stops at an exact byte, to be SIGKILLed.

    python raw_peer.py '{"role": "client", "port": 4321, "stage": "header", "cut": 0.4}'

Roles and stages (``cut``: the fraction of the stage's last frame that is written, 0..1):

client (connects to host:port):
    hello    part of its HELLO
    auth     whole HELLO, the listener's HELLO read, part of AUTH
    attach   handshake up to ACCEPT, then part of the first data connection's ATTACH
    header   whole handshake (READY read), then part of a message HEADER
    payload  whole handshake, a HEADER of ``nbytes``, then part of the payload
server (listens on port 0, reports {"event": "listening", "port": N}, serves one client):
    accepted the client's connection accepted, nothing written
    hello    the client's HELLO read, part of ours written
    accept   HELLO exchanged, AUTH read, part of our ACCEPT written
    ready    ACCEPT written, both data connections attached, READY never sent

When the stage is reached it reports {"event": "armed", ...} and waits to be killed. It exits
by itself when stdin closes (the test is gone) or after ``watchdog_s``. Imports no torch.
"""

from __future__ import annotations

# ruff: noqa: I001  (``_light`` must be imported before anything imports aiokvpipe)

import _light  # noqa: F401  (first: aiokvpipe's wire modules without torch)

import asyncio
import json
import os
import secrets
import signal
import sys
import time
from typing import Any

from _proto import RawClient, RawConn, hello_bytes

from aiokvpipe import _wire


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, "t": time.monotonic(), **fields}) + "\n")
    sys.stdout.flush()


def cut_of(data: bytes, cut: float) -> bytes:
    """A strict prefix of ``data`` (at least one byte short) for 0 <= cut < 1; all of it for 1."""
    if cut >= 1:
        return data
    return data[:min(len(data) - 1, int(len(data) * cut))]


async def wait_for_death() -> None:
    # Blocks the loop on purpose: nothing more happens here until SIGKILL (or stdin EOF).
    while os.read(0, 4096):
        pass
    os._exit(3)


async def client(cfg: dict[str, Any]) -> None:
    token = cfg.get("token")
    c = RawClient(cfg.get("host", "127.0.0.1"), cfg["port"], token.encode() if token else None)
    stage, cut = cfg["stage"], cfg.get("cut", 0.5)
    await c.open()
    assert c.ctl is not None
    if stage == "hello":
        data = cut_of(c.hello_bytes(), cut)
        await c.ctl.write(data)
    else:
        await c.hello()
        if stage == "auth":
            data = cut_of(c.auth_bytes(), cut)
            await c.ctl.write(data)
        else:
            await c.auth()
            if stage == "attach":
                c.c2s = await RawConn.open(c.host, c.port)
                data = cut_of(c.attach_bytes(_wire.Direction.CLIENT_TO_SERVER), cut)
                await c.c2s.write(data)
            else:
                await c.attach()
                await c.ready()
                if stage == "header":
                    data = cut_of(c.header_bytes([(14, (cfg.get("nbytes", 1024),))],
                                                 key="k"), cut)
                    await c.ctl.write(data)
                elif stage == "payload":
                    n = cfg.get("nbytes", 1 << 20)
                    await c.ctl.write(c.header_bytes([(14, (n,))], key="k"))
                    data = cut_of(bytes(n), cut)
                    assert c.c2s is not None
                    await c.c2s.write(data)
                else:
                    raise ValueError(f"unknown client stage {stage!r}")
    emit("armed", stage=stage, written=len(data))
    await wait_for_death()


async def server(cfg: dict[str, Any]) -> None:
    stage, cut = cfg["stage"], cfg.get("cut", 0.5)
    token = cfg.get("token")
    conns: asyncio.Queue[RawConn] = asyncio.Queue()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await conns.put(RawConn(r, w))

    srv = await asyncio.start_server(on_conn, cfg.get("host", "127.0.0.1"), 0)
    emit("listening", port=srv.sockets[0].getsockname()[1])
    ctl = await conns.get()
    written = 0
    if stage != "accepted":
        hello = await ctl.read_frame()
        assert isinstance(hello, _wire.Hello), hello
        nonce = secrets.token_bytes(_wire.NONCE_BYTES)
        data = hello_bytes(nonce)
        if stage == "hello":
            data = cut_of(data, cut)
        await ctl.write(data)
        written = len(data)
        if stage != "hello":
            auth = await ctl.read_frame()
            assert isinstance(auth, _wire.Auth), auth
            from aiokvpipe import _handshake

            proof = _handshake.proof(token.encode() if token else None, False, hello.nonce,
                                     nonce)
            data = _wire.encode(_wire.Accept(proof, secrets.token_bytes(16),
                                             _wire.Transport.TCP))
            if stage == "accept":
                data = cut_of(data, cut)
            await ctl.write(data)
            written = len(data)
            if stage == "ready":
                for _ in range(2):
                    attach = await (await conns.get()).read_frame()
                    assert isinstance(attach, _wire.Attach), attach
            elif stage != "accept":
                raise ValueError(f"unknown server stage {stage!r}")
    emit("armed", stage=stage, written=written)
    await wait_for_death()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    signal.alarm(int(cfg.get("watchdog_s", 120)))  # SIGALRM's default action ends us
    try:
        asyncio.run({"client": client, "server": server}[cfg["role"]](cfg))
    except Exception as exc:
        emit("error", error=repr(exc))
        raise


if __name__ == "__main__":
    main()
