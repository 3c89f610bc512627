"""The pipe's protocol, sans I/O: one end of an open pipe as a state machine.

Bytes from the peer go in (:meth:`PipeProtocol.receive_data`); validated frames come out for
the I/O layer to act on; what the I/O layer wants to say is turned into bytes here
(:meth:`~PipeProtocol.send_header`, :meth:`~PipeProtocol.send_close`, ...). Sequence numbers,
the credit ledgers of both directions, discarded keys and the close handshake live here, in
one :class:`State`, and nowhere else; nothing here touches sockets, asyncio or torch, so every
rule can be tested byte by byte (``tests/test_protocol.py``).

Errors keep their sides apart (h11's split): the peer breaking a rule raises
:class:`~aiokvpipe.ProtocolError` from :meth:`~PipeProtocol.receive_data`; the peer saying
that *it* failed raises :class:`~aiokvpipe.PeerFailure`; misuse by our own caller raises
:class:`LocalProtocolError` (a bug in the I/O layer, never the peer's fault).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Final, TypeVar

from . import _handshake, _wire
from ._dtypes import DTYPE_OF
from ._errors import (
    AuthenticationError,
    PeerFailure,
    PeerSaysProtocolError,
    PipeError,
    ProtocolError,
)
from ._wire import Structure, TensorSpec, Transport

#: Keys remembered as discarded; the oldest is forgotten first. A forgotten key only means a
#: message arriving for it much later is kept (holding its credits) instead of dropped.
MAX_TOMBSTONES: Final = 4096

#: Credit owed to the peer of at least 1/CREDIT_RETURN_SHARE of our window is due at once;
#: less may wait to be returned together with more (the I/O layer decides how long).
CREDIT_RETURN_SHARE: Final = 8


class State(enum.Enum):
    """Where one end of a pipe stands.

    ``OPEN`` → ``CLOSING`` (a CLOSE was sent or received) → ``CLOSED`` (both CLOSEs were
    exchanged and every announced payload arrived). ``BROKEN`` can follow any state but
    ``CLOSED``, and is final.
    """

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"
    BROKEN = "broken"


# The states as module constants for the per-message tests: an enum member's lookup on its
# class costs ~70 ns on Python 3.11, a module global's ~7.
_OPEN: Final = State.OPEN
_BROKEN: Final = State.BROKEN


class LocalProtocolError(RuntimeError):
    """The I/O layer asked the protocol for something its state forbids (our bug)."""


class PipeProtocol:
    """The rules of an open pipe, for one end.

    ``recv_buffer_bytes`` is the credit this end granted the peer in the handshake;
    ``peer_credit`` the credit the peer granted us. ``signals``: the data plane signals on
    this connection (ipc): SIGNAL frames are its records; on any other pipe they break it.
    """

    __slots__ = (
        "state", "close_sent", "close_received", "_decoder",
        "next_send_seq", "peer_credit", "credit_outstanding", "credit_owed",
        "next_recv_seq", "recv_buffer_bytes", "credit_held", "payloads_pending",
        "_tombstones", "next_offer_id", "_offers_out", "_retracted", "next_offer_in",
        "_offers_in", "_refused", "_peer_pools", "signals", "backlogged", "_specs_checked",
    )

    def __init__(self, *, recv_buffer_bytes: int, peer_credit: int,
                 decoder: _wire.FrameDecoder | None = None, signals: bool = False) -> None:
        self.state = State.OPEN
        self.signals = signals
        self.close_sent = False
        self.close_received = False
        self._decoder = decoder if decoder is not None else _wire.FrameDecoder()
        #: Bytes received are kept unparsed (a budget ran out): feed again, even nothing.
        self.backlogged = False
        # sending
        self.next_send_seq = 0
        #: Credit the peer granted us (its ``recv_buffer_bytes``).
        self.peer_credit = max(peer_credit, 1)
        #: Credit spent on messages the peer has not yet returned.
        self.credit_outstanding = 0
        # receiving
        self.next_recv_seq = 0
        self.recv_buffer_bytes = recv_buffer_bytes
        #: The specs of the last header, checked (see _header).
        self._specs_checked: tuple[TensorSpec, ...] = ()
        #: Credit the peer spent here and we have not returned (claimed or not).
        self.credit_held = 0
        #: Credit of messages claimed (or dropped) here, to return with the next frame we send.
        self.credit_owed = 0
        #: Headers whose payload has not been reported complete (:meth:`payload_done`).
        self.payloads_pending = 0
        self._tombstones: OrderedDict[str | None, None] = OrderedDict()
        # block transfers (see the section below)
        self.next_offer_id = 0
        self._offers_out: dict[int, _OfferState] = {}
        self._retracted: OrderedDict[int, None] = OrderedDict()
        self.next_offer_in = 0
        self._offers_in: dict[int, tuple[_OfferState, int]] = {}  # state, credit held
        #: offers we refused lately: the sender's RETRACT of one may cross our refusal
        self._refused: OrderedDict[int, None] = OrderedDict()
        self._peer_pools: set[int] = set()

    # -- sending --------------------------------------------------------------------------

    @property
    def can_send(self) -> bool:
        """New messages may be sent: the pipe is open and neither end has sent CLOSE."""
        return self.state is State.OPEN

    def send_header(self, key: str | None, structure: Structure, specs: Sequence[TensorSpec],
                    nbytes: int, inline: bool, note: bytes | None = None,
                    payload: Sequence[bytes | memoryview] = ()) -> bytes:
        """Commit the next message: its header frame; when ``inline``, with its ``payload``
        bytes (the pieces of it, in order) in the same frame. The credits we owe ride along,
        and ``note``, the data plane's description of the payload (only a plane that
        signals).

        The caller has reserved ``message_cost(nbytes, specs)`` of credit
        (:meth:`spend`) and must write the bytes returned, in order, before anything else.
        """
        if self.state is not _OPEN:
            raise LocalProtocolError(f"cannot send a message in state {self.state.name}")
        if note is not None and not self.signals:
            raise LocalProtocolError("this pipe's data plane takes no notes")
        credit = self.credit_owed
        # The frame made whole before anything is committed: a ValueError, or a
        # MemoryError joining the payload, leaves the sequence and the credit owed as they
        # were, and the stream in step.
        head = _wire.encode_header(self.next_send_seq, key, structure, specs, inline, credit,
                                   note)
        if payload:
            head = head + payload[0] if len(payload) == 1 else b"".join((head, *payload))
        self.credit_owed = 0
        self.credit_held -= credit
        self.next_send_seq += 1
        return head

    def spend(self, cost: int) -> None:
        """Account credit reserved for a message (the I/O layer's budget admitted it)."""
        self.credit_outstanding += cost

    def refund(self, cost: int) -> None:
        """Give back credit reserved by :meth:`spend` for a message that was never sent."""
        self.credit_outstanding -= cost

    def send_credit(self) -> bytes:
        """A CREDIT frame returning what we owe (``b""`` when nothing is owed, or when the
        peer will send nothing more and so needs no credit)."""
        n = self.credit_owed
        if not n or self.close_received or self.state in (State.BROKEN, State.CLOSED):
            return b""
        self.credit_owed = 0
        self.credit_held -= n
        return _wire.encode_credit(n)

    def send_close(self) -> bytes:
        """Our CLOSE: no message follows it. The I/O layer sends it once its posted payloads
        have left (and, answering the peer's CLOSE, once all the peer announced arrived)."""
        if self.close_sent or self.state in (State.BROKEN, State.CLOSED):
            raise LocalProtocolError(f"cannot send CLOSE in state {self.state.name}")
        self.close_sent = True
        self.state = State.CLOSING
        self._maybe_closed()
        return _wire.encode(_wire.Close(self.next_send_seq))

    def send_signal(self, data: bytes) -> bytes:
        """SIGNAL frames carrying the data plane's records ``data`` (split as long as it
        takes); ``b""`` once the pipe is broken or closed: nothing more goes out then."""
        if not self.signals:
            raise LocalProtocolError("this pipe's data plane does not signal")
        if self.state in (State.BROKEN, State.CLOSED) or not data:
            return b""
        step = _wire.MAX_SIGNAL_BYTES
        if len(data) <= step:
            return _wire.encode_signal(data)
        return b"".join(_wire.encode_signal(data[i:i + step])
                        for i in range(0, len(data), step))

    def start_closing(self) -> None:
        """Our end decided to close: no new message may be sent from now on."""
        if self.state is State.OPEN:
            self.state = State.CLOSING

    # -- receiving ------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, budget: int | None = None
                     ) -> list[_wire.Frame]:
        """Feed bytes from the peer; returns the frames the I/O layer must act on, in order:

        * :class:`~aiokvpipe._wire.Header` -- a message arrived (validated; its credit is
          held). Post its payload (with its ``note``, if any, only ever on a pipe whose
          plane signals), then call :meth:`payload_done`; a message whose key is discarded
          (:meth:`is_discarded`) is dropped with :meth:`release`.
        * :class:`~aiokvpipe._wire.Credit` -- the peer returned this much credit
          (validated against :attr:`credit_outstanding`, already deducted).
        * :class:`~aiokvpipe._wire.Close` -- the peer will send nothing more.
        * :class:`~aiokvpipe._wire.Signal` -- records for the data plane (only when
          ``signals``; they may follow the peer's CLOSE: acknowledgements of what we sent).

        Heartbeats are consumed here. Raises :class:`ProtocolError` when the peer broke a
        rule and :class:`PeerFailure` when it reported a failure of its own; the protocol is
        then ``BROKEN``.

        ``budget``: decode only frames of about this much work (``FrameDecoder.feed``); the
        rest is kept, unparsed, and :attr:`backlogged` says so until a later call (with more
        bytes or none) takes it.
        """
        if self.state is _BROKEN:
            self.backlogged = False
            return []
        decoder = self._decoder
        try:
            frames = decoder.feed(data, budget)
            self.backlogged = decoder.backlogged
            # Every frame but a heartbeat (and a block frame settled here) is the caller's:
            # ``frames`` itself is returned, unless one of those has to be left out.
            out: list[_wire.Frame] | None = None
            for i, frame in enumerate(frames):
                ftype = type(frame)
                if ftype is _wire.Header:
                    assert isinstance(frame, _wire.Header)
                    self._header(frame)
                elif ftype is _wire.Credit:
                    assert isinstance(frame, _wire.Credit)
                    self._credit_returned(frame.nbytes)
                elif ftype is _wire.Signal:
                    if not self.signals:
                        raise ProtocolError("SIGNAL frame on a pipe whose data plane takes "
                                            "none")
                elif ftype is _wire.Heartbeat or (ftype in _BLOCK_FRAMES
                                                  and not self._block_frame(frame)):
                    if out is None:
                        out = frames[:i]
                    continue
                elif ftype is _wire.Close:
                    assert isinstance(frame, _wire.Close)
                    self._close(frame)
                elif ftype is _wire.Error:
                    assert isinstance(frame, _wire.Error)
                    raise _remote_error(frame)
                elif ftype not in _BLOCK_FRAMES:
                    raise ProtocolError(f"unexpected {ftype.__name__} frame on an open pipe")
                if out is not None:
                    out.append(frame)
            return frames if out is None else out
        except (ProtocolError, PeerFailure):
            self.state = State.BROKEN
            self.backlogged = False
            raise

    def _credit_returned(self, n: int) -> None:
        if n > self.credit_outstanding:
            raise ProtocolError(f"peer returned more credit than we used ({n} bytes; "
                                f"{self.credit_outstanding} outstanding)")
        self.credit_outstanding -= n

    def _header(self, h: _wire.Header) -> None:
        if self.close_received:
            raise ProtocolError("message header after the peer's CLOSE")
        if h.credit:
            self._credit_returned(h.credit)
        if h.note is not None:
            if not self.signals:
                raise ProtocolError("a header with a note on a pipe whose data plane takes "
                                    "none")
            if not h.nbytes:  # (a message without payload bytes travels inline)
                raise ProtocolError("a header with a note and no payload")
        if h.seq != self.next_recv_seq:
            raise ProtocolError(f"header #{h.seq} where #{self.next_recv_seq} was due")
        specs = h.tensors
        if specs is not self._specs_checked:
            # The decoder hands out the same specs for a recurring message: they are
            # checked once, not once a message.
            for spec in specs:
                if spec.dtype not in DTYPE_OF:
                    raise ProtocolError(f"dtype code {spec.dtype} is not supported by this "
                                        "torch")
            self._specs_checked = specs
        cost = h.cost
        # An oversize message is allowed only when the peer had every credit back.
        held = self.credit_held
        if held and held + cost > self.recv_buffer_bytes:
            raise ProtocolError("peer sent beyond the receive credits it was granted")
        self.credit_held = held + cost
        self.next_recv_seq += 1
        self.payloads_pending += 1

    def _close(self, frame: _wire.Close) -> None:
        if self.close_received:
            raise ProtocolError("a second CLOSE")
        if frame.messages != self.next_recv_seq:
            raise ProtocolError(f"peer closed after {frame.messages} messages but sent "
                                f"{self.next_recv_seq} headers")
        self.close_received = True
        if self.state is State.OPEN:
            self.state = State.CLOSING
        self._maybe_closed()

    def payload_done(self) -> None:
        """A message's payload arrived whole (inline ones at once)."""
        self.payloads_pending -= 1
        if self.close_sent:
            self._maybe_closed()

    def release(self, cost: int) -> bool:
        """A received message was claimed or dropped: its credit goes back to the peer with
        our next frame (:meth:`send_credit`, or riding on a header). Returns
        :attr:`credit_return_due`, which the I/O layer asks after every release."""
        self.credit_owed += cost
        return self.credit_return_due

    @property
    def credit_return_due(self) -> bool:
        """Enough credit is owed to the peer that it should go back now, not linger."""
        return self.credit_owed * CREDIT_RETURN_SHARE >= self.recv_buffer_bytes

    @property
    def credit_buffered(self) -> int:
        """Credit held by messages received here and not yet claimed."""
        return self.credit_held - self.credit_owed

    # -- discarded keys ---------------------------------------------------------------------

    def discard(self, key: str | None) -> None:
        """Remember ``key`` as given up: messages arriving for it later are dropped.

        Bounded (:data:`MAX_TOMBSTONES`, oldest forgotten first).
        """
        _remember(self._tombstones, key)

    def undiscard(self, key: str | None) -> None:
        """Someone asks for ``key`` again: its later messages are kept from now on."""
        if self._tombstones:
            self._tombstones.pop(key, None)

    def is_discarded(self, key: str | None) -> bool:
        return bool(self._tombstones) and key in self._tombstones

    # -- block transfers ------------------------------------------------------------------
    #
    #   sender                                  receiver
    #   POOL(id, layout)  (once per pool)  ──▶
    #   OFFER(id, pool, key, layers, ids)  ──▶  holds offer_cost() of credit until it answers
    #                                      ◀──  PULL(id) once a recv_blocks() matches it, or
    #                                           PULL(id, why) refusing it (misfit, counts)
    #   BLOCK_DATA(id); payload on the plane ─▶ received straight into the named blocks
    #   (ipc: the receiver copies out of the sender's pool itself, then PULLED(id) ◀──)
    #   RETRACT(id)  (the sender gave up before the PULL)  ──▶
    #   OFFER_FAILED(id, key, layers, why) ──▶  instead of an OFFER: the send_blocks() failed
    #                                           on its arguments; the matching receive fails
    #                                           (answered by nothing: its credit goes back)

    def send_pool(self, pool_id: int, layout: bytes) -> bytes:
        """Describe one of our pools to the peer (once per pipe, before its first offer)."""
        return _wire.encode(_wire.PoolInfo(pool_id, layout))

    def send_offer(self, pool_id: int, key: str | None, layers: tuple[int, ...],
                   ids: tuple[int, ...]) -> tuple[int, bytes]:
        """Offer blocks; the caller has reserved :func:`offer_cost` of credit (:meth:`spend`).
        Returns the offer's id and the OFFER frame."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot offer blocks in state {self.state.name}")
        offer_id = self.next_offer_id
        frame = _wire.encode(_wire.Offer(offer_id, pool_id, key, layers, ids))  # may refuse
        self.next_offer_id += 1
        self._offers_out[offer_id] = _OfferState.OFFERED
        return offer_id, frame

    def send_offer_failed(self, key: str | None, layers: tuple[int, ...], error: str) -> bytes:
        """Tell the peer that a ``send_blocks`` for ``key`` failed on its arguments; the
        caller has reserved :func:`failed_offer_cost` of credit (:meth:`spend`). Nothing
        answers it."""
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"cannot offer blocks in state {self.state.name}")
        frame = _wire.encode(_wire.OfferFailed(self.next_offer_id, key, layers, error))
        self.next_offer_id += 1
        return frame

    def failed_offer_taken(self, offer_id: int) -> None:
        """The peer's failed offer was matched to a receive (or dropped): its credit goes
        back."""
        entry = self._offers_in.pop(offer_id, None)
        if entry is None or entry[0] is not _OfferState.FAILED:
            raise LocalProtocolError(f"failed offer {offer_id} is not waiting")
        self.release(entry[1])

    def send_retract(self, offer_id: int) -> bytes:
        """Give up an offer the peer has not pulled."""
        if self._offers_out.pop(offer_id, None) is not _OfferState.OFFERED:
            raise LocalProtocolError(f"offer {offer_id} cannot be retracted")
        _remember(self._retracted, offer_id)
        return _wire.encode(_wire.Retract(offer_id))

    def send_block_data(self, offer_id: int) -> bytes:
        """The next chunk of a pulled offer's payload follows on the data plane (write this
        as the chunk is posted). :meth:`offer_sent` after the last chunk."""
        if self._offers_out.get(offer_id) not in (_OfferState.PULLED, _OfferState.SENDING):
            raise LocalProtocolError(f"offer {offer_id} was not pulled")
        self._offers_out[offer_id] = _OfferState.SENDING
        return _wire.encode(_wire.BlockData(offer_id))

    def offer_sent(self, offer_id: int) -> None:
        """Our pulled offer's payload is all on its way."""
        self._offers_out.pop(offer_id, None)

    def offer_received(self, offer_id: int) -> None:
        """The peer's pulled offer's payload is all announced. (The two ends number their
        offers each on its own: our offer #n and the peer's are two different offers.)"""
        self._offers_in.pop(offer_id, None)

    def send_pull(self, offer_id: int, error: str = "") -> bytes:
        """Answer an offer: take it (its payload or, over ipc, our own copy follows) or refuse
        it with ``error``. Either way its credit goes back to the peer."""
        entry = self._offers_in.get(offer_id)
        if entry is None or entry[0] is not _OfferState.OFFERED:
            raise LocalProtocolError(f"offer {offer_id} is not waiting for an answer")
        self.release(entry[1])
        if error:
            del self._offers_in[offer_id]
            _remember(self._refused, offer_id)
        else:
            self._offers_in[offer_id] = (_OfferState.PULLED, 0)
        return _wire.encode(_wire.Pull(offer_id, error))

    def offer_waiting(self, offer_id: int) -> bool:
        """Whether the peer's offer still waits for our answer: one retracted in the same
        read as it came was answered by that RETRACT already."""
        entry = self._offers_in.get(offer_id)
        return entry is not None and entry[0] is _OfferState.OFFERED

    def send_pulled(self, offer_id: int) -> bytes:
        """We copied a pulled offer out of the peer's pool ourselves (ipc)."""
        entry = self._offers_in.get(offer_id)
        if entry is None or entry[0] not in (_OfferState.PULLED, _OfferState.SENDING):
            raise LocalProtocolError(f"offer {offer_id} was not pulled")
        del self._offers_in[offer_id]
        return _wire.encode(_wire.Pulled(offer_id))

    def _block_frame(self, frame: _wire.Frame) -> bool:
        """Check a block-transfer frame; True if the I/O layer must act on it."""
        if isinstance(frame, _wire.PoolInfo):
            if frame.pool_id in self._peer_pools:
                raise ProtocolError(f"pool {frame.pool_id} described twice")
            if len(self._peer_pools) >= _wire.MAX_POOLS:
                raise ProtocolError(f"more than {_wire.MAX_POOLS} pools")
            self._peer_pools.add(frame.pool_id)
            return True
        if isinstance(frame, (_wire.Offer, _wire.OfferFailed)):
            if self.close_received:
                raise ProtocolError("block offer after the peer's CLOSE")
            if frame.offer_id != self.next_offer_in:
                raise ProtocolError(f"offer #{frame.offer_id} where #{self.next_offer_in} "
                                    "was due")
            if isinstance(frame, _wire.OfferFailed):
                cost = failed_offer_cost(frame.key, len(frame.layers), frame.error)
            elif frame.pool_id not in self._peer_pools:
                raise ProtocolError(f"offer of pool {frame.pool_id}, never described")
            else:
                cost = offer_cost(len(frame.ids), len(frame.layers))
            if self.credit_held and self.credit_held + cost > self.recv_buffer_bytes:
                raise ProtocolError("peer offered beyond the receive credits it was granted")
            self.credit_held += cost
            self.next_offer_in += 1
            self._offers_in[frame.offer_id] = (
                _OfferState.FAILED if isinstance(frame, _wire.OfferFailed)
                else _OfferState.OFFERED, cost)
            return True
        if isinstance(frame, _wire.Retract):
            entry = self._offers_in.get(frame.offer_id)
            if entry is None:
                if self._refused.pop(frame.offer_id, False) is None:
                    return False  # crossed our refusal: nothing to do
                raise ProtocolError(f"RETRACT of offer {frame.offer_id}, not pending")
            if entry[0] is _OfferState.SENDING:
                # Sent after our PULL reached the peer (its BLOCK_DATA says so): a RETRACT
                # that crosses the PULL comes before any BLOCK_DATA.
                raise ProtocolError(f"RETRACT of offer {frame.offer_id} after its BLOCK_DATA")
            if entry[0] is _OfferState.FAILED:
                raise ProtocolError(f"RETRACT of offer {frame.offer_id}, which failed")
            del self._offers_in[frame.offer_id]
            if entry[0] is _OfferState.OFFERED:
                self.release(entry[1])
            return True
        if isinstance(frame, _wire.BlockData):
            entry = self._offers_in.get(frame.offer_id)
            if entry is None or entry[0] in (_OfferState.OFFERED, _OfferState.FAILED):
                raise ProtocolError(f"BLOCK_DATA for offer {frame.offer_id}, not pulled")
            self._offers_in[frame.offer_id] = (_OfferState.SENDING, 0)
            return True
        # a PULL or PULLED about one of our offers
        assert isinstance(frame, (_wire.Pull, _wire.Pulled))
        offer_id = frame.offer_id
        state = self._offers_out.get(offer_id)
        if state is None:
            if offer_id in self._retracted:
                return False  # crossed our RETRACT: nothing to do
            raise ProtocolError(f"{type(frame).__name__.upper()} of offer {offer_id}, "
                                "never made")
        if isinstance(frame, _wire.Pull):
            if state is not _OfferState.OFFERED:
                raise ProtocolError(f"offer {offer_id} pulled twice")
            if frame.error:
                del self._offers_out[offer_id]
            else:
                self._offers_out[offer_id] = _OfferState.PULLED
            return True
        if state is not _OfferState.SENDING:  # (ipc: copied out on our "copy now")
            raise ProtocolError(f"PULLED of offer {offer_id} before its BLOCK_DATA")
        del self._offers_out[offer_id]
        return True

    # -- ending ---------------------------------------------------------------------------

    def _maybe_closed(self) -> None:
        if self.close_sent and self.close_received and not self.payloads_pending:
            self.state = State.CLOSED

    def fail(self) -> None:
        """The pipe broke (for any reason): nothing more is sent or accepted, and nothing
        kept is left to feed (:attr:`backlogged`: the I/O layer stops asking)."""
        self.state = State.BROKEN  # (also after both CLOSEs: the close did not complete)
        self.backlogged = False


def _remember(tombstones: OrderedDict[Any, None], key: Any) -> None:
    """Add ``key`` (as the newest) to a bounded set of tombstones: beyond
    :data:`MAX_TOMBSTONES` the oldest is forgotten."""
    tombstones[key] = None
    tombstones.move_to_end(key)
    if len(tombstones) > MAX_TOMBSTONES:
        tombstones.popitem(last=False)


class _OfferState(enum.Enum):
    OFFERED = "offered"
    #: An OFFER_FAILED: waits for a receive to fail, answered by nothing.
    FAILED = "failed"
    PULLED = "pulled"
    #: Its BLOCK_DATA went (ours) or came (the peer's): the sender is committed to it.
    SENDING = "sending"


_BLOCK_FRAMES: Final = frozenset({_wire.PoolInfo, _wire.Offer, _wire.OfferFailed, _wire.Pull,
                                  _wire.BlockData, _wire.Retract, _wire.Pulled})


#: Credit a block offer's id or layer index costs: an int of a tuple the receiver holds
#: until it answers (about 36 bytes in Python; 4 on the wire).
_OFFER_ITEM_BYTES: Final = 40


def offer_cost(blocks: int, layers: int) -> int:
    """Credit a block offer holds at the receiver until answered: its frame and bookkeeping
    (the blocks themselves land in memory the receiver already has)."""
    return _wire.MESSAGE_OVERHEAD_BYTES + _OFFER_ITEM_BYTES * (blocks + layers)


def failed_offer_cost(key: str | None, layers: int, error: str) -> int:
    """Credit a failed offer holds at the receiver until a receive takes it: its texts too."""
    return (offer_cost(0, layers) + (0 if key is None else len(key.encode()))
            + len(error.encode()))


def _remote_error(frame: _wire.Error) -> Exception:
    """What an ERROR frame from the peer means here."""
    if frame.code == _wire.ErrorCode.INTERNAL:
        return PeerFailure(f"the peer failed: {frame.text}")
    return PeerSaysProtocolError(f"peer reported an error: {frame.text}")


# -- the handshake, in order -------------------------------------------------------------------
#
#   client                               server
#   HELLO(nonce, caps)        ────▶
#                             ◀────      HELLO(nonce, caps)
#   AUTH(proof)               ────▶      verify; choose the data plane
#                             ◀────      ACCEPT(proof, session, transport, nccl ids) | ERROR
#   verify; set up the plane             set up the plane (tcp: the ATTACH connections)
#                             ◀────      READY
#   (the pipe is open: what follows READY is the pipe's)


class Refused(PipeError):
    """The server refuses the client; :attr:`frame` (an ERROR) tells the client why."""

    def __init__(self, frame: _wire.Error, error: PipeError) -> None:
        super().__init__(str(error))
        self.frame = frame
        self.error = error


def refusal(frame: _wire.Frame, during: str) -> PipeError | None:
    """The typed error an ERROR frame from the peer stands for (``None`` for other frames)."""
    if not isinstance(frame, _wire.Error):
        return None
    if frame.code == _wire.ErrorCode.AUTHENTICATION:
        return AuthenticationError(f"peer refused us: {frame.text}")
    if frame.code == _wire.ErrorCode.UNSUPPORTED:
        return PipeError(f"peer refused the pipe: {frame.text}")
    if frame.code == _wire.ErrorCode.INTERNAL:
        return PeerFailure(f"the peer failed during {during}: {frame.text}")
    # The peer's verdict on our bytes: the blame goes our way (ProtocolError still).
    return PeerSaysProtocolError(f"peer reported an error during {during}: {frame.text}")


def _expect(frame: _wire.Frame, kind: type[_F], during: str) -> _F:
    error = refusal(frame, during)
    if error is not None:
        raise error
    if not isinstance(frame, kind):
        raise ProtocolError(f"expected {kind.__name__} during {during}, got "
                            f"{type(frame).__name__}")
    return frame


_F = TypeVar("_F", bound=_wire.Frame)


class ClientHandshake:
    """The connecting end's side of the handshake: feed it each frame, send what it returns.

    ``wanted`` is this end's ``transport`` option. Every step raises a typed error:
    :class:`AuthenticationError`, :class:`ProtocolError`, :class:`PipeError` (no common data
    plane) or :class:`PeerFailure`.
    """

    def __init__(self, token: bytes | None, caps: _wire.Capabilities, nonce: bytes) -> None:
        self._token = token
        self._caps = caps
        self._nonce = nonce
        self._step = "hello"
        self.server: _wire.Hello | None = None
        self.accept: _wire.Accept | None = None

    def hello(self) -> _wire.Hello:
        return _wire.Hello(self._nonce, self._caps)

    def receive(self, frame: _wire.Frame) -> _wire.Frame | None:
        """The next frame from the server; returns the frame to answer with, if any."""
        if self._step == "hello":
            self.server = _expect(frame, _wire.Hello, "handshake")
            self._step = "accept"
            return _wire.Auth(_handshake.proof(self._token, True, self._nonce,
                                               self.server.nonce))
        if self._step == "accept":
            accept = _expect(frame, _wire.Accept, "handshake")
            assert self.server is not None
            if self._token and not _handshake.verify(self._token, False, self._nonce,
                                                     self.server.nonce, accept.proof):
                raise AuthenticationError("the listener could not prove it holds the token")
            wanted = self._caps.transport
            if wanted != Transport.AUTO and accept.transport != wanted:
                raise ProtocolError(f"the listener chose {accept.transport.name.lower()}, but "
                                    f"this end asked for {wanted.name.lower()}")
            if accept.transport == Transport.NCCL and not (self._caps.cuda and self._caps.nccl):
                raise ProtocolError("the listener chose nccl, which this end did not offer")
            if accept.transport == Transport.IPC and not (self._caps.cuda and self._caps.ipc):
                raise ProtocolError("the listener chose ipc, which this end did not offer")
            self.accept = accept
            self._step = "ready"
            return None
        if self._step == "ready":
            _expect(frame, _wire.Ready, "handshake")
            self._step = "open"
            return None
        raise ProtocolError(f"{type(frame).__name__} after the handshake ended")

    @property
    def done(self) -> bool:
        return self._step == "open"


class ServerHandshake:
    """The listening end's side of the handshake, from the client's HELLO to READY."""

    def __init__(self, token: bytes | None, caps: _wire.Capabilities, nonce: bytes,
                 client: _wire.Hello) -> None:
        self._token = token
        self._caps = caps
        self._nonce = nonce
        self.client = client
        self._step = "auth"

    def hello(self) -> _wire.Hello:
        return _wire.Hello(self._nonce, self._caps)

    def receive_auth(self, frame: _wire.Frame, *, ipc_proven: bool = False) -> Transport:
        """:meth:`check_auth`, then :meth:`choose_transport` (for a caller that has its
        ``ipc_proven`` at hand: one that must open the client's probe to know opens it only
        between the two)."""
        self.check_auth(frame)
        return self.choose_transport(ipc_proven=ipc_proven)

    def check_auth(self, frame: _wire.Frame) -> None:
        """Check the client's proof; raises :class:`Refused` (whose ERROR frame the I/O layer
        sends before dropping the client). Nothing the client sent is acted upon before
        this: its IPC probe handle is opened only once it passed."""
        if self._step != "auth":
            raise ProtocolError(f"{type(frame).__name__} out of order in the handshake")
        auth = _expect(frame, _wire.Auth, "handshake")
        if self._token and not _handshake.verify(self._token, True, self.client.nonce,
                                                 self._nonce, auth.proof):
            raise Refused(_wire.Error(_wire.ErrorCode.AUTHENTICATION,
                                      "authentication failed: the tokens differ (give both "
                                      "ends the same token= or AIOKVPIPE_TOKEN)"),
                          AuthenticationError("peer failed authentication: the tokens differ"))
        self._step = "choose"

    def choose_transport(self, *, ipc_proven: bool = False) -> Transport:
        """The data plane, once the client authenticated; raises :class:`Refused` if none
        fits. ``ipc_proven``: this process opened the client's IPC probe handle."""
        if self._step != "choose":
            raise LocalProtocolError("transport chosen before the client authenticated")
        try:
            transport = _handshake.choose_transport(self._caps, self.client.caps,
                                                    ipc_proven=ipc_proven)
        except _handshake.NoTransport as exc:
            raise Refused(_wire.Error(_wire.ErrorCode.UNSUPPORTED, str(exc)),
                          PipeError(str(exc))) from None
        self._step = "accept"
        return transport

    def accept(self, session_id: bytes, transport: Transport,
               nccl_ids: tuple[bytes, bytes] | None) -> _wire.Accept:
        if self._step != "accept":
            raise LocalProtocolError("ACCEPT before the client authenticated")
        self._step = "ready"
        return _wire.Accept(_handshake.proof(self._token, False, self.client.nonce,
                                             self._nonce), session_id, transport, nccl_ids)

    def ready(self) -> _wire.Ready:
        if self._step != "ready":
            raise LocalProtocolError("READY before ACCEPT")
        self._step = "open"
        return _wire.Ready()
