"""Pipe options, their defaults and their validation, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch

from ._wire import Transport

KiB: Final = 1 << 10
MiB: Final = 1 << 20

TransportName = Literal["auto", "ipc", "nccl", "tcp"]

#: The longest busy-polling window an option may ask for: beyond a millisecond a sleeping
#: loop wakes in time anyway, and the CPU spent would buy nothing.
MAX_BUSY_POLL_US: Final = 1000.0
#: The longest heartbeat interval the handshake carries (milliseconds in 32 bits).
MAX_HEARTBEAT_S: Final = (2**32 - 1) / 1000

#: The budgets when the options leave them unset (None): (max_inflight_bytes,
#: recv_buffer_bytes) by the transport the handshake picked. The credits leave room for the
#: headers (a few hundred bytes a tensor): two 256 MiB messages of a thousand tensors each
#: fit in 513 MiB, sixteen 128 MiB ones in 2 GiB + 8 MiB. On ipc a send of contiguous
#: tensors holds no memory of its own (the peer copies out of the caller's), and the copy
#: engine idles while one message's acknowledgement and the next header cross unless that
#: header came earlier: a 256 MiB stream on one H200 moved 1.35-1.53 TB/s with two in flight
#: and 2.09 with more, a 1 GiB one 1.31-1.35 with one and 2.10 with two (BENCHMARKS.md,
#: 2026-12-05).
DEFAULT_BUDGETS: Final = (512 * MiB, 513 * MiB)
IPC_BUDGETS: Final = (2048 * MiB, 2056 * MiB)


def default_budgets(transport: str) -> tuple[int, int]:
    """(max_inflight_bytes, recv_buffer_bytes) by default on a pipe of ``transport``."""
    return IPC_BUDGETS if transport == "ipc" else DEFAULT_BUDGETS


#: Environment variable read (at connect/listen time, never at import) when no token is given.
TOKEN_ENV: Final = "AIOKVPIPE_TOKEN"


@dataclass(frozen=True, slots=True)
class PipeOptions:
    """Keyword options of :func:`~aiokvpipe.listen`, :func:`~aiokvpipe.connect` and
    :func:`~aiokvpipe.open_pipe`.

    device
        Where received tensors land: ``"cpu"``, ``"cuda"`` (the current device) or
        ``"cuda:N"``. Default ``"cpu"``.
    transport
        ``"auto"`` (default): ipc when both ends run on one host and the listener could open
        a CUDA IPC handle of the client's (the same GPU, or GPUs with peer access); else nccl
        when both ends are on different CUDA devices with CuPy's NCCL; else tcp. ``"ipc"``,
        ``"nccl"`` or ``"tcp"`` force one (the handshake fails with
        :class:`~aiokvpipe.PipeError` if the peer cannot follow).
    max_inflight_bytes
        Payload bytes this end may have in flight at once; ``send()`` waits beyond it.
        Default (``None``) by transport: 512 MiB on tcp and nccl, 2 GiB on ipc (where a send
        of contiguous tensors holds no memory of its own, and large messages need several in
        flight to keep the copy engine busy). A larger message is sent alone.
    recv_buffer_bytes
        Receive credits granted to the peer: bytes that may wait here, received but not yet
        claimed by ``recv()``; each message counts its payload plus a few hundred bytes of
        header a tensor. Default (``None``) by transport: 513 MiB on tcp and nccl, so that
        two 256 MiB messages of up to a thousand tensors each (a model's K and V, layer by
        layer, as a dict) fit at once; 2 GiB + 8 MiB of GPU memory on ipc, so that a stream
        of 256 MiB or 1 GiB messages keeps the copy engine busy (set both lower to bound an
        ipc pipe's memory lower). A larger message is accepted alone. On the tcp plane, up to
        as much again of memory freed by received CPU tensors is kept for reuse (fresh
        memory costs a page fault per 4 KiB).
    token
        Shared secret both ends must hold (``str`` or ``bytes``); ``None`` reads the
        ``AIOKVPIPE_TOKEN`` environment variable; unset or empty means no authentication.
    heartbeat_interval
        Seconds between the heartbeats this end sends (default 1). Each end announces its
        rate in the handshake. ``None`` disables heartbeats, and with them the silence check,
        on both ends of this pipe.
    heartbeat_timeout
        Seconds of silence from the peer after which the pipe breaks (a frozen or partitioned
        peer); default six of the slower end's heartbeat intervals (6 s by default), and
        never less than two of the peer's intervals. The trade-off: a peer whose event loop
        is held for a while (a long prefill holding the GIL) sends nothing meanwhile, and must
        not be taken for dead; a frozen or partitioned peer should be found soon. The
        defaults survive a 3 s stall of the peer's loop and find a frozen peer within 7 s. A
        *killed* peer is found at once either way: its kernel closes the connection. (A stall
        of this process itself is never counted against the peer.)
    connect_timeout
        Seconds ``connect()`` keeps retrying while the listener is not there yet (connection
        refused); default 30.
    handshake_timeout
        Seconds the handshake may take once connected, NCCL set-up included (default 20); a
        listener drops a connection that has not completed its handshake by then.
    close_timeout
        Seconds ``aclose()`` waits for the peer's half of a graceful close (default 10)
        before it breaks the pipe instead; the clock restarts whenever a transfer makes
        progress, so a large transfer still moving is never cut off.
    busy_poll_us
        After writing what the peer answers (a message, a block transfer's frame), the
        event loop keeps polling, rather than sleeping, until the next read or for up to
        this many microseconds (default 200; 0: never), so that the answer meets a warm
        core instead of one waking from idle: about half the one-way latency of a 4 KiB
        request/response on a cloud VM. The window adapts to the answers: it shrinks to
        nothing while they take longer than this, and a stream's sender does not poll, so
        idle pipes, sparse traffic and one-way streams cost no CPU. The loop stays free
        meanwhile (a callback between the others), and a thread beside a polling loop's
        runs at full speed. The pipes of one loop share one poller, polling up to the
        longest window any of them asked for.
    name
        The pipe's label in logs and Prometheus metrics (default: the peer's address).
    metrics
        Count this pipe in Prometheus metrics (:mod:`aiokvpipe.metrics`; needs the extra
        ``metrics``, i.e. ``prometheus-client``; without it nothing is counted). Default on.
    metrics_registry
        The ``prometheus_client.CollectorRegistry`` to report to (default: the global one).
    """

    device: str | torch.device = "cpu"
    transport: TransportName = "auto"
    max_inflight_bytes: int | None = None
    recv_buffer_bytes: int | None = None
    token: str | bytes | None = None
    heartbeat_interval: float | None = 1.0
    heartbeat_timeout: float | None = None
    connect_timeout: float = 30.0
    handshake_timeout: float = 20.0
    close_timeout: float = 10.0
    busy_poll_us: float = 200.0
    name: str | None = None
    metrics: bool = True
    metrics_registry: Any = None

    def __post_init__(self) -> None:
        if self.transport not in ("auto", "ipc", "nccl", "tcp"):
            raise ValueError("transport must be 'auto', 'ipc', 'nccl' or 'tcp', not "
                             f"{self.transport!r}")
        for name in ("max_inflight_bytes", "recv_buffer_bytes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value <= 0):
                raise ValueError(f"{name} must be a positive int or None, not {value!r}")
        for name in ("heartbeat_interval", "heartbeat_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive or None, not {value!r}")
        if self.heartbeat_interval is not None and self.heartbeat_interval > MAX_HEARTBEAT_S:
            # (the handshake carries it in milliseconds, 32 bits: beyond, the frame would not
            # encode, and the failure looked like the peer's)
            raise ValueError(f"heartbeat_interval must be at most {MAX_HEARTBEAT_S:g} s, not "
                             f"{self.heartbeat_interval!r}")
        for name in ("connect_timeout", "handshake_timeout", "close_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        if isinstance(self.busy_poll_us, bool) or not isinstance(self.busy_poll_us,
                                                                  (int, float)):
            raise TypeError("busy_poll_us must be a number of microseconds (0 turns polling "
                            f"off), not {self.busy_poll_us!r}")
        if not 0 <= self.busy_poll_us <= MAX_BUSY_POLL_US:
            raise ValueError(f"busy_poll_us must be 0 to {MAX_BUSY_POLL_US:g}, not "
                             f"{self.busy_poll_us!r}")
        if self.token is not None and not isinstance(self.token, (str, bytes)):
            raise TypeError("token must be str, bytes or None")

    @property
    def wire_transport(self) -> Transport:
        return {"auto": Transport.AUTO, "tcp": Transport.TCP, "nccl": Transport.NCCL,
                "ipc": Transport.IPC}[self.transport]

    def budgets(self, transport: str) -> tuple[int, int]:
        """(max_inflight_bytes, recv_buffer_bytes) on a pipe of ``transport``: as set, else
        the transport's default."""
        inflight, credits = default_budgets(transport)
        return (self.max_inflight_bytes or inflight, self.recv_buffer_bytes or credits)

    def token_bytes(self) -> bytes | None:
        token = self.token if self.token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            return None
        return token.encode() if isinstance(token, str) else token
