"""An IpcPlane on a socket of its own, for tests and probes of the plane without a pipe: the
socket carries its records both ways, as the pipe's control connection does in SIGNAL frames.

Records delimit themselves, so the socket carries them bare. The link plays the pipe's part:
the peer's records go to ``on_signal`` (a bad one is reported through ``on_lost``), and the
connection's loss while something is in flight is reported too; an end between messages is a
graceful close.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import torch

from aiokvpipe._ipc_plane import IpcPlane


class SignalLink(asyncio.Protocol):
    def __init__(self, plane: IpcPlane, on_lost: Callable[[BaseException], None]) -> None:
        self.plane = plane
        self.transport: asyncio.Transport | None = None
        self._on_lost = on_lost
        self._lost = False  # reported once, as a pipe breaks once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.plane.on_signal(data)
        except Exception as exc:  # the pipe breaks on these
            self.lost(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        stats = self.plane.stats
        busy = stats["sends_in_flight"] or stats["receives_pending"] or self.plane._copies
        if exc is not None or busy:
            self.lost(exc or ConnectionResetError("signalling connection closed"))

    def lost(self, exc: BaseException) -> None:
        if not self._lost:
            self._lost = True
            self.abort()
            self._on_lost(exc)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def plane_on_socket(sock: socket.socket, device: torch.device,
                          on_lost: Callable[[BaseException], None], **options: Any
                          ) -> tuple[IpcPlane, SignalLink]:
    """Start a plane whose records travel over ``sock`` (connected to the peer's). A loss
    drops the connection first, as a pipe that breaks aborts its control connection."""
    link: SignalLink | None = None

    def lost(exc: BaseException) -> None:
        if link is None:
            on_lost(exc)
        else:
            link.lost(exc)

    plane = await IpcPlane.start(device, lost, **options)
    link = SignalLink(plane, on_lost)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().connect_accepted_socket(lambda: link, sock)
    except BaseException as exc:
        plane.abort(exc)
        raise
    plane.attach_signals(link.write)
    return plane, link
