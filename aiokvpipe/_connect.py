"""Opening pipes: the listener, the connector, and the handshake's I/O.

Every connection to a listener starts with one frame that says what it is: ``HELLO`` opens a
control connection (a new pipe), ``ATTACH`` joins a tcp data connection to a pipe whose
handshake is under way. Each incoming connection is handled in its own task, bounded by
``handshake_timeout``; a bad one is logged and dropped, and the listener carries on.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import secrets
import socket
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import torch

from . import _handshake, _ipc_plane, _ipc_probe, _nccl_plane, _wire
from ._control import ControlChannel
from ._cuda import device_uuid_async as device_uuid
from ._cuda import normalize_device_async
from ._errors import AuthenticationError, BrokenPipe, PipeClosed, PipeError, ProtocolError
from ._ipc_probe import host_id
from ._options import PipeOptions, default_budgets
from ._pipe import Pipe, internal_error, is_local_failure
from ._plane import DataPlane, mark_read
from ._protocol import ClientHandshake, Refused, ServerHandshake
from ._tcp_plane import TcpPlane, tune_socket
from .metrics import PipeMetrics, RefusalReason, handshake_refused

log = logging.getLogger("aiokvpipe")
T = TypeVar("T")

#: Handshakes a listener runs at once; more connections wait in the kernel's backlog.
MAX_CONCURRENT_HANDSHAKES = 128
#: Handshakes that sent ACCEPT and wait for their data connections without a slot (those
#: connections need slots of their own: a slot held meanwhile deadlocked a listener that
#: 128 clients reached at once). Beyond this many, a waiting handshake keeps its slot.
MAX_WAITING_FOR_DATA = 4 * MAX_CONCURRENT_HANDSHAKES
#: Established pipes waiting for ``accept()``; the handshake of the next one waits meanwhile.
ACCEPT_QUEUE = 16
#: Default silence limit, in the slower end's heartbeat intervals (see PipeOptions).
SILENCE_INTERVALS = 6


# -- shared by both ends ----------------------------------------------------------------------


async def _local_caps(opts: PipeOptions, device: torch.device) -> _wire.Capabilities:
    """What this end offers. CUDA facts (NCCL's version, an IPC probe handle) are found off
    the event loop, once per process."""
    cuda = device.type == "cuda"
    nccl, version = (False, 0)
    if cuda and opts.transport in ("auto", "nccl"):
        nccl, version = await _nccl_plane.nccl_info_async()
    ipc, probe = False, bytes(_wire.IPC_HANDLE_BYTES)
    if cuda and opts.transport in ("auto", "ipc") and (await _ipc_probe.ipc_info_async())[0]:
        try:
            probe = await _ipc_probe.export_probe(device)
            ipc = True
        except Exception as exc:  # noqa: BLE001  -- no ipc here: say why, offer the rest
            log.info("CUDA IPC unavailable: %r", exc)
    return _wire.Capabilities(
        transport=opts.wire_transport,
        cuda=cuda,
        nccl=nccl,
        device_uuid=await device_uuid(device) if cuda else bytes(_wire.DEVICE_UUID_BYTES),
        nccl_version=version,
        # 0: the default of the transport the handshake picks, known to both ends only then
        recv_buffer_bytes=opts.recv_buffer_bytes or 0,
        heartbeat_ms=round(opts.heartbeat_interval * 1000) if opts.heartbeat_interval else 0,
        host_id=host_id() if cuda else bytes(_wire.HOST_ID_BYTES),
        ipc=ipc,
        ipc_probe=probe,
    )


async def _ipc_proven(caps: _wire.Capabilities, client: _wire.Capabilities,
                      device: torch.device) -> bool:
    """Can this process map the client's GPU memory? Opening its probe handle says."""
    if _handshake.ipc_possible(caps, client) is not None:
        return False
    return await _ipc_probe.probe_opens(client.ipc_probe, device)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await loop.sock_recv_into(sock, view[got:])
        if k == 0:
            raise ConnectionResetError("connection closed before the first frame")
        got += k
    return bytes(buf)


async def _read_first_frame(loop: asyncio.AbstractEventLoop, sock: socket.socket
                            ) -> _wire.Frame:
    """Read exactly one frame from a raw socket, and not a byte more: what follows belongs
    to whoever takes the socket over."""
    ftype, length = _wire.decode_prefix(await _recv_exactly(loop, sock,
                                                            _wire.FRAME_PREFIX_BYTES))
    if ftype not in (_wire.FrameType.HELLO, _wire.FrameType.ATTACH):
        raise ProtocolError(f"a connection must open with HELLO or ATTACH, not {ftype.name}")
    return _wire.decode_body(ftype, await _recv_exactly(loop, sock, length))


def _say_why(sock: socket.socket, exc: ProtocolError) -> None:
    """Best effort, never waiting: send the peer an ERROR frame before the socket closes.

    Bytes it sent that we did not read would make the close a reset, which can destroy the
    ERROR frame in flight; so discard what is already buffered (a bounded amount)."""
    try:
        sock.send(_wire.encode(_wire.Error(_wire.ErrorCode.PROTOCOL, str(exc))))
        sock.shutdown(socket.SHUT_WR)
        for _ in range(16):
            if not sock.recv(65536):
                break
    except OSError:  # BlockingIOError: nothing more buffered; or the peer is already gone
        pass


class _LateBreak:
    """Routes data-plane loss to the pipe, which exists only once the plane does."""

    def __init__(self) -> None:
        self.pipe: Pipe | None = None
        self.early: BaseException | None = None

    def __call__(self, exc: BaseException) -> None:
        if self.pipe is not None:
            self.pipe._break(exc)
        elif self.early is None:
            self.early = exc


def _refusal_reason(exc: BaseException) -> RefusalReason:
    """The metrics' name for why a listener dropped a handshake."""
    if isinstance(exc, AuthenticationError):
        return "authentication"
    if isinstance(exc, ProtocolError):
        return "version" if "speaks protocol" in str(exc) else "protocol"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, PipeError) and not isinstance(exc, BrokenPipe):
        return "unsupported"
    return "connection_lost"


def _address(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _silence_limit(opts: PipeOptions, peer: _wire.Capabilities) -> float | None:
    """How long the peer may stay silent: judged by the rate at which *it* sends heartbeats,
    and only if both ends use them (``heartbeat_interval=None`` on either end turns the check
    off for the pair, so neither end times out an end that never promised heartbeats)."""
    if not opts.heartbeat_interval or not peer.heartbeat_ms:
        return None
    if opts.heartbeat_timeout is not None:
        return max(opts.heartbeat_timeout, 2 * peer.heartbeat_ms / 1000)
    return SILENCE_INTERVALS * max(opts.heartbeat_interval, peer.heartbeat_ms / 1000)


def _make_pipe(ch: ControlChannel, plane: DataPlane, opts: PipeOptions, device: torch.device,
               peer: _wire.Capabilities, late: _LateBreak) -> Pipe:
    max_inflight, credits = opts.budgets(plane.name)
    pipe = Pipe(ch, plane, device=device, max_inflight_bytes=max_inflight,
                recv_buffer_bytes=credits,
                peer_credits=peer.recv_buffer_bytes or default_budgets(plane.name)[1],
                heartbeat_interval=opts.heartbeat_interval,
                heartbeat_timeout=_silence_limit(opts, peer),
                close_timeout=opts.close_timeout, busy_poll_s=opts.busy_poll_us * 1e-6,
                metrics=PipeMetrics(opts.name, peer=_address(ch.peer),
                                    registry=opts.metrics_registry, enabled=opts.metrics),
                # Inline payloads suit tcp to a CPU receiver; NCCL and CUDA receivers want
                # every byte on their own plane and stream.
                inline_limit=(_wire.MAX_INLINE_PAYLOAD
                              if plane.name == "tcp" and not peer.cuda else 0))
    late.pipe = pipe
    if late.early is not None:
        pipe._break(late.early)
    return pipe


# -- the listening end ------------------------------------------------------------------------


@dataclass
class _PendingSession:
    """A tcp pipe whose data connections have not all arrived yet."""

    sockets: dict[_wire.Direction, asyncio.Future[socket.socket]] = field(default_factory=dict)


class Listener:
    """Accepts pipes from any number of peers. Create with :func:`listen`."""

    def __init__(self, sock: socket.socket, opts: PipeOptions, device: torch.device) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._opts = opts
        self._device = device
        self._ready: deque[Pipe] = deque()
        self._getters: deque[asyncio.Future[None]] = deque()
        self._room = asyncio.Event()
        self._sessions: dict[bytes, _PendingSession] = {}
        self._handshakes: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_HANDSHAKES)
        self._closed = False
        self._accept_task = self._loop.create_task(self._accept_loop())

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound (``port=0`` picks a free one)."""
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def port(self) -> int:
        return self.address[1]

    async def accept(self) -> Pipe:
        """The next pipe whose handshake completed.

        Raises :class:`~aiokvpipe.PipeClosed` once the listener is closed. Cancellation is
        safe: a pipe not yet taken stays for the next ``accept()``.
        """
        while True:
            if self._closed:  # (its queued pipes are aclose()'s to close)
                raise PipeClosed("listener closed")
            if self._ready:
                break
            fut: asyncio.Future[None] = self._loop.create_future()
            self._getters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    self._wake_getter()  # pass our wake-up on: the pipe stays queued
                else:
                    self._getters.remove(fut)
                raise
        pipe = self._ready.popleft()
        self._room.set()
        return pipe

    def _wake_getter(self) -> None:
        while self._getters:
            fut = self._getters.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    async def _offer(self, pipe: Pipe) -> None:
        # (Its handshake's slot held meanwhile: at most that many pipes wait here, each with
        # its sockets and receive memory, while nobody calls accept().)
        while len(self._ready) >= ACCEPT_QUEUE:
            self._room.clear()
            await self._room.wait()
        self._ready.append(pipe)
        self._wake_getter()

    def __aiter__(self) -> AsyncIterator[Pipe]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Pipe]:
        while True:
            try:
                yield await self.accept()
            except PipeClosed:
                return

    async def aclose(self) -> None:
        """Stop listening; handshakes under way are abandoned, pipes not yet accepted closed.
        Pipes already accepted are not affected."""
        if self._closed:
            return
        self._closed = True
        self._accept_task.cancel()
        for task in list(self._handshakes):
            task.cancel()
        try:
            await asyncio.gather(self._accept_task, *self._handshakes, return_exceptions=True)
            self._stop_accepting()
            # Together: a peer that cannot answer the close costs close_timeout, and one
            # after the other, N of them would cost N times that.
            await asyncio.gather(*(pipe.aclose() for pipe in self._ready),
                                 return_exceptions=True)
        except BaseException:
            # Cancelled part-way (a second call returns at once): abort what is left, as a
            # cancelled Pipe.aclose() does, rather than leave it open.
            self._stop_accepting()
            for pipe in self._ready:
                pipe._break(ConnectionAbortedError("Listener.aclose() was cancelled"))
            raise
        finally:
            self._ready.clear()

    def _stop_accepting(self) -> None:
        self._sock.close()
        for fut in self._getters:  # accept() calls waiting: they raise PipeClosed
            if not fut.done():
                fut.set_result(None)

    async def __aenter__(self) -> Listener:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def _accept_loop(self) -> None:
        failing = False
        while True:
            await self._slots.acquire()
            try:
                conn, addr = await self._loop.sock_accept(self._sock)
            except OSError as exc:  # e.g. EMFILE: back off instead of spinning
                self._slots.release()
                # One line when accepting starts failing, not one every 100 ms it lasts.
                (log.debug if failing else log.warning)("accept() failed: %s", exc)
                failing = True
                await asyncio.sleep(0.1)
                continue
            except BaseException:
                self._slots.release()
                raise
            if failing:
                failing = False
                log.warning("accept() works again")
            slot = _Slot(self._slots)
            task = self._loop.create_task(self._serve(conn, addr, slot))
            self._handshakes.add(task)
            task.add_done_callback(functools.partial(self._handshake_done, slot))

    def _handshake_done(self, slot: _Slot, task: asyncio.Task[None]) -> None:
        self._handshakes.discard(task)
        slot.release()

    async def _serve(self, sock: socket.socket, addr: Any, slot: _Slot) -> None:
        tune_socket(sock)
        conn: socket.socket | None = sock  # None once another owner closes it
        pipe: Pipe | None = None
        try:
            async with asyncio.timeout(self._opts.handshake_timeout):
                first = await _read_first_frame(self._loop, sock)
                if isinstance(first, _wire.Attach):
                    self._attach(first, sock)
                    conn = None  # now owned by the session
                    return
                if not isinstance(first, _wire.Hello):
                    raise ProtocolError(f"a connection must open with HELLO or ATTACH, not "
                                        f"{type(first).__name__}")
                hello = first
                conn = None  # the handshake owns (and closes) it from here
                pipe = await self._handshake(sock, hello, slot)
            await self._offer(pipe)
        except asyncio.CancelledError:
            if pipe is not None and pipe not in self._ready:
                if self._closed:
                    # aclose() closes the pipes nobody accepted, gracefully, together: this
                    # one too, though it waited for room in the queue.
                    self._ready.append(pipe)
                else:  # (the loop is being torn down)
                    pipe._break(ConnectionAbortedError("listener cancelled"))
            raise
        except (PipeError, OSError, TimeoutError) as exc:
            log.info("dropped incoming connection from %s: %r", addr, exc)
            if self._opts.metrics:
                handshake_refused(_refusal_reason(exc), registry=self._opts.metrics_registry)
            if isinstance(exc, ProtocolError) and conn is not None:
                _say_why(conn, exc)
        except Exception:  # e.g. NCCL set-up failing: that pipe is lost, the listener is not
            log.exception("handshake with %s failed", addr)
        finally:
            if conn is not None:
                conn.close()

    def _attach(self, frame: _wire.Attach, conn: socket.socket) -> None:
        session = self._sessions.get(frame.session_id)
        fut = session.sockets.get(frame.direction) if session else None
        if fut is None or fut.done():
            raise ProtocolError("ATTACH for an unknown session or a direction already attached")
        fut.set_result(conn)

    async def _handshake(self, conn: socket.socket, hello: _wire.Hello, slot: _Slot) -> Pipe:
        try:
            _, ch = await self._loop.connect_accepted_socket(ControlChannel, conn)
        except BaseException:
            conn.close()
            raise
        plane: DataPlane | None = None
        session_id = secrets.token_bytes(_wire.SESSION_ID_BYTES)
        pending: _PendingSession | None = None
        authenticated = False  # (our failures' text goes to an authenticated peer only)
        try:
            caps = await _local_caps(self._opts, self._device)
            shake = ServerHandshake(self._opts.token_bytes(), caps,
                                    secrets.token_bytes(_wire.NONCE_BYTES), hello)
            ch.write(shake.hello())
            auth = await ch.read_frame()
            try:
                shake.check_auth(auth)
                authenticated = True
                # Only an authenticated client's IPC handle is opened (and a thread started
                # for it): not a byte of an unauthenticated one reaches the driver.
                proven = await _ipc_proven(caps, hello.caps, self._device)
                transport = shake.choose_transport(ipc_proven=proven)
            except Refused as refused:
                ch.write(refused.frame)
                raise refused.error from None
            ids = (await _nccl_plane.new_unique_ids_async()
                   if transport == _wire.Transport.NCCL else None)
            late = _LateBreak()
            if transport == _wire.Transport.TCP:
                pending = _PendingSession({d: self._loop.create_future()
                                           for d in _wire.Direction})
                self._sessions[session_id] = pending
            ch.write(shake.accept(session_id, transport, ids))
            if pending is not None:
                if len(self._sessions) <= MAX_WAITING_FOR_DATA:
                    slot.release()  # the data connections need slots of their own
                c2s, s2c = await _unless_lost(ch, asyncio.gather(
                    pending.sockets[_wire.Direction.CLIENT_TO_SERVER],
                    pending.sockets[_wire.Direction.SERVER_TO_CLIENT]))
                self._sessions.pop(session_id, None)  # waits for data no more
                # A slot again before the pipe exists, held until it is queued for accept():
                # else pipes nobody accepts pile up without bound.
                await _unless_lost(ch, slot.take())
                plane = await TcpPlane.start(s2c, c2s, self._device, late,
                                             self._opts.budgets("tcp")[1])
            elif transport == _wire.Transport.IPC:
                plane = await _ipc_plane.IpcPlane.start(self._device, late)
            else:
                assert ids is not None
                plane = await _unless_lost(ch, _nccl_plane.start(True, ids, self._device, late))
            pipe = _make_pipe(ch, plane, self._opts, self._device, hello.caps, late)
            ch.write(shake.ready())
            return pipe
        except BaseException as exc:
            if authenticated and is_local_failure(exc):  # (NCCL or a data plane failing)
                ch.say(internal_error(exc))  # the client raises PeerFailure, as documented
            ch.abort()
            if plane is not None:
                plane.abort(exc)
            if pending is not None:
                for fut in pending.sockets.values():
                    if fut.done() and not fut.cancelled():
                        fut.result().close()
                    fut.cancel()
            raise
        finally:
            self._sessions.pop(session_id, None)


class _Slot:
    """One connection's place among a listener's concurrent handshakes, given back once."""

    __slots__ = ("_semaphore", "_held")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._semaphore.release()

    async def take(self) -> None:
        """Hold a place again (given back by :meth:`release`, once more)."""
        if not self._held:
            await self._semaphore.acquire()
            self._held = True


async def _unless_lost(ch: ControlChannel, step: Awaitable[T]) -> T:
    """Await a handshake step, but give up as soon as the control connection dies: a client
    killed mid-handshake must not hold the listener's slot until the handshake timeout."""
    task = asyncio.ensure_future(step)
    either: set[asyncio.Future[Any]] = {task, ch.lost}
    try:
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            # (A cancelled gather() ends with an exception: read it, or asyncio logs an
            # ERROR of its own for every handshake given up.)
            task.add_done_callback(mark_read)
    if not task.done() or task.cancelled():
        raise BrokenPipe("the peer left during the handshake") from ch.lost.result()
    return task.result()


async def listen(host: str = "127.0.0.1", port: int = 0, options: PipeOptions | None = None,
                 *, backlog: int = 128, **opts: Any) -> Listener:
    """Listen for pipes on ``host:port`` (default 127.0.0.1, a free port: see
    :attr:`Listener.port`). ``options`` (a :class:`PipeOptions`) and/or keyword options
    (which override its fields) apply to every accepted pipe. Raises ``TypeError``/
    ``ValueError`` for bad options, :class:`~aiokvpipe.PipeError` when the host name does not
    resolve, and ``OSError`` when the address cannot be bound (in use, say)."""
    options = _options(options, opts)
    device = await normalize_device_async(options.device)
    loop = asyncio.get_running_loop()
    infos = await _resolve(loop, host, port, socket.AI_PASSIVE)
    family, _, _, _, address = infos[0]
    sock = socket.create_server(address[:2] if family == socket.AF_INET else address,
                                family=family, backlog=backlog)
    sock.setblocking(False)
    return Listener(sock, options, device)


async def _resolve(loop: asyncio.AbstractEventLoop, host: str, port: int, flags: int = 0
                   ) -> list[Any]:
    try:
        return await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=flags)
    except socket.gaierror as exc:
        raise PipeError(f"cannot resolve {host!r}: {exc.strerror}") from exc


# -- the connecting end -----------------------------------------------------------------------


#: Errors of a connection attempt that a listener starting later, or a host coming back,
#: would cure: retried until connect_timeout.
_RETRIED: Final = (ConnectionRefusedError, ConnectionResetError, ConnectionAbortedError)
_RETRIED_ERRNOS: Final = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH})
#: How long the last attempt, made at connect_timeout itself, may wait for an answer.
_LAST_TRY_S: Final = 0.2
#: How long an address that does not answer is waited for when the name has more.
_ADDRESS_WAIT_S: Final = 1.0


async def _open_socket(loop: asyncio.AbstractEventLoop, host: str, port: int,
                       deadline: float) -> socket.socket:
    """Connect to ``host``'s addresses in turn, as resolved (``localhost`` may name ``::1``
    first and a listener on 127.0.0.1 next), retrying while none accepts (refused, the
    listener not up yet) or its host is out of reach, until ``deadline``: then
    :class:`TimeoutError`, also for an attempt still unanswered there (SYNs dropped by a
    firewall, a listener's full accept queue), which would otherwise wait for the kernel's
    own timeout (minutes). Any other ``OSError`` is a :class:`PipeError` (chained)."""
    delay = 0.02
    while True:
        refused: OSError | None = None  # a cure may come: retried
        failed: OSError | None = None  # an address this host cannot reach at all
        infos = await _resolve(loop, host, port)
        for i, (family, type_, proto, _, address) in enumerate(infos):
            more = i + 1 < len(infos)
            until = max(deadline, loop.time() + _LAST_TRY_S)
            if more:  # an address that does not answer must leave time for the others
                until = min(until, loop.time() + _ADDRESS_WAIT_S)
            try:
                return await _connect_to(loop, (family, type_, proto, address), until)
            except TimeoutError as exc:
                if not more:
                    raise TimeoutError(f"nobody accepted a pipe at {host}:{port} (no answer)"
                                       ) from exc
                refused = refused or exc
            except OSError as exc:
                if isinstance(exc, _RETRIED) or exc.errno in _RETRIED_ERRNOS:
                    refused = exc
                else:  # (::1 on a host without IPv6, say: the next address may do)
                    failed = failed or exc
        if refused is None:
            assert failed is not None  # (getaddrinfo gives one address at least)
            raise PipeError(f"cannot connect to {host}:{port}: {failed}") from failed
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise TimeoutError(f"nobody accepted a pipe at {host}:{port}") from refused
        # The last pause ends at the deadline itself, for one last try there.
        await asyncio.sleep(min(delay, remaining))
        delay = min(delay * 2, 0.5)


#: Where a socket connects: family, type, protocol, address (as getaddrinfo gives them).
_Where = tuple[int, int, int, Any]


async def _connect_to(loop: asyncio.AbstractEventLoop, where: _Where, until: float | None
                      ) -> socket.socket:
    """One connection attempt, given up at loop time ``until`` (``TimeoutError``); ``None``:
    bounded by the caller (a data connection, within the handshake's timeout)."""
    family, type_, proto, address = where
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    try:
        if until is None:
            await loop.sock_connect(sock, address)
        else:
            async with asyncio.timeout_at(until):
                await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    tune_socket(sock)
    return sock


async def connect(host: str, port: int, options: PipeOptions | None = None,
                  **opts: Any) -> Pipe:
    """Open a pipe to a :func:`listen`-ing peer.

    ``options`` (a :class:`PipeOptions`) and/or keyword options (which override its fields).
    Retries a refused connection until ``connect_timeout`` (the peer may start later), then
    runs the handshake within ``handshake_timeout``. Raises, and nothing else:

    * ``TypeError``/``ValueError`` -- bad options (before anything is opened);
    * :class:`TimeoutError` -- nobody accepted within ``connect_timeout`` (refused, its host
      out of reach, or no answer at all), or the handshake did not finish within
      ``handshake_timeout``;
    * :class:`~aiokvpipe.AuthenticationError` -- the tokens differ;
    * :class:`~aiokvpipe.ProtocolError` -- the peer is not aiokvpipe (or not this version);
    * :class:`~aiokvpipe.PeerFailure` -- the listener failed on its side during the handshake,
      after this end authenticated (before, it drops the connection: :class:`BrokenPipe`);
    * :class:`~aiokvpipe.PipeError` -- the ends cannot agree on a transport, the host name
      does not resolve (the ``socket.gaierror`` chained), connecting failed otherwise (the
      ``OSError`` chained: permission denied, say), or this end's data plane did not start
      (NCCL's, CUDA's or the allocator's error chained);
    * :class:`~aiokvpipe.BrokenPipe` -- the listener dropped the connection during the
      handshake (the ``OSError`` chained).

    Cancellation closes whatever was opened.
    """
    options = _options(options, opts)
    device = await normalize_device_async(options.device)
    loop = asyncio.get_running_loop()
    sock = await _open_socket(loop, host, port, loop.time() + options.connect_timeout)
    try:
        async with asyncio.timeout(options.handshake_timeout):
            return await _client_handshake(loop, sock, host, port, options, device)
    except TimeoutError as exc:
        if exc.args:  # (a timeout of the handshake's own, already saying which)
            raise
        raise TimeoutError(f"the handshake with {host}:{port} did not finish within "
                           f"handshake_timeout={options.handshake_timeout:g} s") from None


async def _client_handshake(loop: asyncio.AbstractEventLoop, sock: socket.socket, host: str,
                            port: int, opts: PipeOptions, device: torch.device) -> Pipe:
    # The data connections go where this one went: the name resolved again (round-robin
    # DNS) might send them, and the session id, to another listener.
    where = (sock.family, sock.type, sock.proto, sock.getpeername())
    try:
        _, ch = await loop.create_connection(ControlChannel, sock=sock)
    except OSError as exc:
        sock.close()
        raise BrokenPipe(f"{host}:{port} dropped the handshake") from exc
    data_socks: list[socket.socket] = []
    plane: DataPlane | None = None
    try:
        shake = ClientHandshake(opts.token_bytes(), await _local_caps(opts, device),
                                secrets.token_bytes(_wire.NONCE_BYTES))
        ch.write(shake.hello())
        while shake.accept is None:
            answer = shake.receive(await ch.read_frame())
            if answer is not None:
                ch.write(answer)
        accept = shake.accept
        late = _LateBreak()
        if accept.transport == _wire.Transport.TCP:
            for direction in _wire.Direction:
                s = await _connect_to(loop, where, None)  # (handshake_timeout bounds it)
                data_socks.append(s)
                await loop.sock_sendall(s, _wire.encode(_wire.Attach(accept.session_id,
                                                                     direction)))
            c2s, s2c = data_socks
            plane = await _started("tcp", TcpPlane.start(c2s, s2c, device, late,
                                                          opts.budgets("tcp")[1]))
        elif accept.transport == _wire.Transport.IPC:
            plane = await _started("ipc", _ipc_plane.IpcPlane.start(device, late))
        else:
            assert accept.nccl_ids is not None  # the codec guarantees ids with nccl
            plane = await _started("nccl", _unless_lost(ch, _nccl_plane.start(
                False, accept.nccl_ids, device, late)))
        shake.receive(await ch.read_frame())  # READY
        assert shake.server is not None and plane is not None
        return _make_pipe(ch, plane, opts, device, shake.server.caps, late)
    except BaseException as exc:
        ch.abort()
        if plane is not None:
            plane.abort(exc)
        for s in data_socks:
            s.close()
        if isinstance(exc, OSError) and not isinstance(exc, (PipeError, TimeoutError)):
            raise BrokenPipe(f"{host}:{port} dropped the handshake") from exc
        raise


async def _started(transport: str, start: Awaitable[DataPlane]) -> DataPlane:
    """Await the start of this end's data plane: its own failure (NCCL's, CUDA's, out of
    memory) is a :class:`PipeError` with that cause, as :func:`connect` promises, not the
    raw error; the connection's and the peer's stay what they are."""
    try:
        return await start
    except (PipeError, OSError):  # typed already, or the connection's (BrokenPipe, above)
        raise
    except Exception as exc:
        raise PipeError(f"could not start the {transport} data plane here: {exc!r}") from exc


def _options(options: PipeOptions | None, overrides: dict[str, Any]) -> PipeOptions:
    if options is None:
        return PipeOptions(**overrides)
    if not isinstance(options, PipeOptions):
        raise TypeError(f"options must be a PipeOptions, not {type(options).__name__}")
    return dataclasses.replace(options, **overrides) if overrides else options


async def open_pipe(host: str, port: int, rank: int, options: PipeOptions | None = None,
                    **opts: Any) -> Pipe:
    """Seed-style set-up: ``rank`` 0 listens on ``host:port`` for one peer, ``rank`` 1
    connects to it. Both return the same pipe's two ends. Options as for :func:`connect`.

    Rank 0 waits for its peer as long as it takes (``connect_timeout`` bounds rank 1's
    attempts, not rank 0's wait): bound it with ``asyncio.timeout()``. Cancelled, it closes
    whatever it opened."""
    if rank == 0:
        listener = await listen(host, port, options, **opts)
        pipe: Pipe | None = None
        try:
            pipe = await listener.accept()
        finally:
            try:
                await listener.aclose()
            except BaseException:
                if pipe is not None:
                    # Cancelled while the listener closed: the caller never gets the pipe,
                    # so it ends here (left open, its heartbeats kept the peer waiting).
                    pipe._break(ConnectionAbortedError("open_pipe() was cancelled"))
                raise
        return pipe
    if rank == 1:
        return await connect(host, port, options, **opts)
    raise ValueError(f"rank must be 0 (listens) or 1 (connects), not {rank!r}")

