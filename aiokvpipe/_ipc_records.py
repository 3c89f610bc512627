"""The ipc plane's records, sans I/O: what the producer tells the consumer on the control
connection (SIGNAL frames), encoded and decoded as fixed ``struct`` layouts with bounded
counts, and the consumer's check of each against what was announced before.

- ``REGION``: an allocation exported (its CUDA IPC handle and size), to be mapped once;
  ``RETIRE``: that mapping may go.
- ``COPY``: the pieces (region, offset, bytes) of one message's payload, final by now; a
  message of one piece most often travels as a 20-byte *note* in its own header instead
  (:func:`encode_note`).
- ``ACK``: the consumer copied that many COPY records so far (counts, in order).
- ``POOL``: where each tensor of a block pool lies in the producer's regions.

:class:`RecordDecoder` refuses anything malformed with :class:`ProtocolError`;
:class:`ConsumerLedger` refuses records that contradict the announcements (an unknown
region, a piece outside its region, too many copies in flight). :class:`RingSpace` hands out
the staging ring's spans. Nothing here touches CUDA; nothing is ever unpickled.
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Final, NamedTuple

from . import _cudaipc
from ._errors import ProtocolError
from ._wire import MAX_PAYLOAD_BYTES

IPC_HANDLE_BYTES: Final = _cudaipc.IPC_HANDLE_BYTES
#: Pieces one COPY record may name (a message of more tensors takes several records).
MAX_PIECES: Final = 1024
#: COPY records in flight (sent, not yet acknowledged) per direction at most.
MAX_COPIES_IN_FLIGHT: Final = 64
#: Regions a consumer keeps mapped at once; a producer announcing more violates the protocol.
MAX_REGIONS: Final = 1024
#: Alignment of the spans of a staging ring.
RING_ALIGN: Final = 256



class RecordType(enum.IntEnum):
    REGION = 2  # producer → consumer: an exported allocation, once until retired
    RETIRE = 3  # producer → consumer: a region will not be named again
    COPY = 4  # producer → consumer: copy these pieces (their data is final)
    ACK = 5  # consumer → producer: this many COPY records done in all
    POOL = 6  # producer → consumer: where a block pool's tensors lie (regions, offsets)


@dataclass(frozen=True, slots=True)
class RegionRecord:
    region: int
    size: int  # bytes of the allocation, from its base
    handle: bytes


@dataclass(frozen=True, slots=True)
class RetireRecord:
    region: int


class Piece(NamedTuple):
    region: int
    offset: int  # from the region's base
    nbytes: int


@dataclass(frozen=True, slots=True)
class CopyRecord:
    """The next bytes of the current message: ``pieces`` in order; ``last``: its end."""

    pieces: tuple[Piece, ...]
    last: bool

    @property
    def nbytes(self) -> int:
        pieces = self.pieces
        if len(pieces) == 1:  # the common case: a whole tensor in one allocation
            return pieces[0].nbytes
        return sum(p.nbytes for p in pieces)


@dataclass(frozen=True, slots=True)
class AckRecord:
    copies: int  # COPY records completed since the plane started


class PoolPlace(NamedTuple):
    region: int
    offset: int  # of the tensor's first element, from the region's base


@dataclass(frozen=True, slots=True)
class PoolRecord:
    """Block pool ``pool_id`` (the pipe's id) lies at ``places``, one per tensor, in regions
    that stay mapped for the plane's life; no places: the pool could not be exported and
    its blocks travel staged."""

    pool_id: int
    places: tuple[PoolPlace, ...]


Record = RegionRecord | RetireRecord | CopyRecord | AckRecord | PoolRecord

_REGION = struct.Struct(f">BIQ{IPC_HANDLE_BYTES}s")
_RETIRE = struct.Struct(">BI")
_COPY_HEAD = struct.Struct(">BBH")  # type, flags (bit 0: last), piece count
_PIECE = struct.Struct(">IQQ")
_COPY_ONE = struct.Struct(">BBHIQQ")  # a COPY record of one piece: _COPY_HEAD, then _PIECE
_ACK = struct.Struct(">BQ")
_POOL_HEAD = struct.Struct(">BIH")  # type, pool id, tensor count
_PLACE = struct.Struct(">IQ")
#: Tensors one POOL record may place (a pool of more travels staged).
MAX_POOL_TENSORS: Final = 4096
# The record types as plain ints, for the decoder's per-record tests: an IntEnum member's
# lookup and comparison, and RecordType(code), cost 0.1-0.6 µs each (2026-12-04).
_ACK_CODE: Final = int(RecordType.ACK)
_COPY_CODE: Final = int(RecordType.COPY)
_POOL_CODE: Final = int(RecordType.POOL)
#: Sizes of the fixed-layout records by type code (ACK is decoded on its own path).
_FIXED_SIZE: Final = {int(RecordType.REGION): _REGION.size,
                      int(RecordType.RETIRE): _RETIRE.size}
MAX_RECORD_BYTES: Final = max(_COPY_HEAD.size + MAX_PIECES * _PIECE.size,
                              _POOL_HEAD.size + MAX_POOL_TENSORS * _PLACE.size)



def encode_record(rec: Record) -> bytes:
    """One record's bytes. ``ValueError`` for a record the decoder would refuse."""
    if isinstance(rec, CopyRecord):
        if not 1 <= len(rec.pieces) <= MAX_PIECES:
            raise ValueError(f"a COPY record names 1 to {MAX_PIECES} pieces")
        parts = [_COPY_HEAD.pack(RecordType.COPY, int(rec.last), len(rec.pieces))]
        for p in rec.pieces:
            _check_piece(p, ValueError)
            parts.append(_PIECE.pack(*p))
        return b"".join(parts)
    if isinstance(rec, AckRecord):
        return _ACK.pack(RecordType.ACK, rec.copies)
    if isinstance(rec, PoolRecord):
        if len(rec.places) > MAX_POOL_TENSORS or not 0 <= rec.pool_id < 1 << 32:
            raise ValueError(f"a POOL record places up to {MAX_POOL_TENSORS} tensors")
        return b"".join([_POOL_HEAD.pack(RecordType.POOL, rec.pool_id, len(rec.places)),
                         *(_PLACE.pack(*p) for p in rec.places)])
    if isinstance(rec, RetireRecord):
        return _RETIRE.pack(RecordType.RETIRE, rec.region)
    _check_handle(rec.handle, ValueError)
    if not 0 < rec.size <= MAX_PAYLOAD_BYTES:
        raise ValueError(f"region size {rec.size} out of range")
    return _REGION.pack(RecordType.REGION, rec.region, rec.size, rec.handle)


def encode_copy_of_one(region: int, offset: int, nbytes: int) -> bytes:
    """A COPY record of one piece, the last of its message (the common case, without the
    checks and the list of :func:`encode_record`; the caller took the piece from a live
    export)."""
    return _COPY_ONE.pack(_COPY_CODE, 1, 1, region, offset, nbytes)


def _check_handle(handle: bytes, err: type[Exception]) -> None:
    if len(handle) != IPC_HANDLE_BYTES:
        raise err(f"an IPC handle is {IPC_HANDLE_BYTES} bytes, not {len(handle)}")


def encode_note(region: int, offset: int, nbytes: int) -> bytes:
    """A header's note naming the message's one piece (:meth:`IpcPlane.post_send_noted`)."""
    return _PIECE.pack(region, offset, nbytes)


def decode_note(note: bytes) -> Piece:
    """The piece a header's note names; :class:`ProtocolError` if it is malformed."""
    if len(note) != _PIECE.size:
        raise ProtocolError(f"a note of {len(note)} bytes; a COPY note is {_PIECE.size}")
    return _piece_at(note, 0)


def _piece_at(buf: bytes | bytearray, pos: int) -> Piece:
    """The piece encoded at ``pos``, checked (also bounded by the payload limit)."""
    piece = Piece(*_PIECE.unpack_from(buf, pos))
    _check_piece(piece, ProtocolError)
    return piece


def _check_piece(p: Piece, err: type[Exception]) -> None:
    if p.nbytes < 1 or p.offset < 0 or p.offset + p.nbytes > MAX_PAYLOAD_BYTES:
        raise err(f"piece of {p.nbytes} bytes at {p.offset} out of range")
    if not 0 <= p.region < 1 << 32:
        raise err(f"region id {p.region} out of range")


class RecordDecoder:
    """Incremental decoder of the peer's records (each end is producer and consumer at once,
    on one ordered stream): ``feed()`` bytes, get records back. Holds at most one partial
    record (:data:`MAX_RECORD_BYTES`); anything malformed raises :class:`ProtocolError`.
    """

    _KNOWN: Final = frozenset(int(t) for t in RecordType)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Record]:
        self._buf += data
        buf = self._buf
        out: list[Record] = []
        pos, end = 0, len(buf)
        while pos < end:
            kind = buf[pos]
            if kind == _ACK_CODE:  # what a sender reads after every poll of the peer's
                if end - pos < _ACK.size:
                    break
                out.append(AckRecord(_ACK.unpack_from(buf, pos)[1]))
                pos += _ACK.size
                continue
            if kind not in self._KNOWN:
                raise ProtocolError(f"unexpected ipc record type {kind}")
            if kind == _COPY_CODE:
                if end - pos < _COPY_HEAD.size:
                    break
                _, flags, count = _COPY_HEAD.unpack_from(buf, pos)
                if flags not in (0, 1):
                    raise ProtocolError(f"COPY record with flags {flags:#x}")
                if not 1 <= count <= MAX_PIECES:
                    raise ProtocolError(f"COPY record with {count} pieces (1..{MAX_PIECES})")
                size = _COPY_HEAD.size + count * _PIECE.size
                if end - pos < size:
                    break
                if count == 1:  # every message of one tensor: no generators (µs a record)
                    out.append(CopyRecord((_piece_at(buf, pos + _COPY_HEAD.size),),
                                          flags == 1))
                    pos += size
                    continue
                pieces = tuple(Piece(*_PIECE.unpack_from(buf, pos + _COPY_HEAD.size + i * 20))
                               for i in range(count))
                for p in pieces:
                    _check_piece(p, ProtocolError)
                if sum(p.nbytes for p in pieces) > MAX_PAYLOAD_BYTES:
                    raise ProtocolError("COPY record beyond the payload limit")
                out.append(CopyRecord(pieces, bool(flags)))
            elif kind == _POOL_CODE:
                if end - pos < _POOL_HEAD.size:
                    break
                _, pool_id, count = _POOL_HEAD.unpack_from(buf, pos)
                if count > MAX_POOL_TENSORS:
                    raise ProtocolError(f"POOL record with {count} tensors "
                                        f"(at most {MAX_POOL_TENSORS})")
                size = _POOL_HEAD.size + count * _PLACE.size
                if end - pos < size:
                    break
                places = tuple(PoolPlace(*_PLACE.unpack_from(buf, pos + _POOL_HEAD.size
                                                             + i * _PLACE.size))
                               for i in range(count))
                out.append(PoolRecord(pool_id, places))
            else:  # REGION or RETIRE (ACK above)
                size = _FIXED_SIZE[kind]
                if end - pos < size:
                    break
                out.append(self._fixed(RecordType(kind), buf, pos))
            pos += size
        del buf[:pos]
        return out

    @staticmethod
    def _fixed(kind: RecordType, buf: bytearray, pos: int) -> Record:
        if kind is RecordType.RETIRE:
            return RetireRecord(_RETIRE.unpack_from(buf, pos)[1])
        _, region, size, handle = _REGION.unpack_from(buf, pos)
        if not 0 < size <= MAX_PAYLOAD_BYTES:
            raise ProtocolError(f"region of {size} bytes")
        return RegionRecord(region, size, handle)

    @property
    def buffered(self) -> int:
        return len(self._buf)


class ConsumerLedger:
    """What the producer announced, checked record by record (sans I/O).

    Raises :class:`ProtocolError` for a region announced twice or beyond
    :data:`MAX_REGIONS`, a retire of an unknown region, a COPY naming an unknown region or a
    piece outside its region, or more than :data:`MAX_COPIES_IN_FLIGHT` copies in flight.
    """

    def __init__(self) -> None:
        self.regions: dict[int, int] = {}  # live region → announced size
        self.in_flight = 0
        self.pools: set[int] = set()

    def pool(self, rec: PoolRecord) -> None:
        """A pool placed: once per pool id, at most :data:`MAX_REGIONS` pools, each tensor in
        a live region and starting inside it (the block layer checks that its blocks fit)."""
        if rec.pool_id in self.pools:
            raise ProtocolError(f"pool {rec.pool_id} placed twice")
        if len(self.pools) >= MAX_REGIONS:
            raise ProtocolError(f"more than {MAX_REGIONS} pools placed")
        for p in rec.places:
            size = self.regions.get(p.region)
            if size is None:
                raise ProtocolError(f"POOL places a tensor in unknown region {p.region}")
            if not 0 <= p.offset < size:
                raise ProtocolError(f"POOL places a tensor at {p.offset}, outside region "
                                    f"{p.region} of {size} bytes")
        self.pools.add(rec.pool_id)

    def region(self, rec: RegionRecord) -> None:
        if rec.region in self.regions:
            raise ProtocolError(f"region {rec.region} announced twice")
        if len(self.regions) >= MAX_REGIONS:
            raise ProtocolError(f"more than {MAX_REGIONS} regions mapped at once")
        self.regions[rec.region] = rec.size

    def retire(self, rec: RetireRecord) -> None:
        if self.regions.pop(rec.region, None) is None:
            raise ProtocolError(f"retire of unknown region {rec.region}")

    def copy(self, rec: CopyRecord) -> None:
        if self.in_flight >= MAX_COPIES_IN_FLIGHT:
            raise ProtocolError(f"more than {MAX_COPIES_IN_FLIGHT} copies in flight")
        for p in rec.pieces:
            size = self.regions.get(p.region)
            if size is None:
                raise ProtocolError(f"COPY names unknown region {p.region}")
            if p.offset + p.nbytes > size:
                raise ProtocolError(f"piece [{p.offset}, {p.offset + p.nbytes}) lies outside "
                                    f"region {p.region} of {size} bytes")
        self.in_flight += 1

    def copied(self) -> None:
        self.in_flight -= 1


class RingSpace:
    """Offsets of a staging ring: spans handed out in order, released oldest first (acks
    come in order). Sans I/O; the memory itself is the plane's."""

    def __init__(self, size: int, align: int = RING_ALIGN) -> None:
        self.size = size
        self._align = align
        self._spans: deque[tuple[int, int]] = deque()  # (start, end), oldest first

    def alloc(self, n: int) -> tuple[int, int] | None:
        """The longest contiguous span of at most ``n`` bytes free now, as (start, length);
        ``None`` if the ring is full."""
        if not self._spans:
            start, room = 0, self.size
        else:
            first, last_end = self._spans[0][0], self._spans[-1][1]
            head = -(-last_end // self._align) * self._align
            if last_end > first:  # in use: [first, last_end)
                if head < self.size:
                    start, room = head, self.size - head
                else:
                    start, room = 0, first
            else:  # wrapped: in use [first, size) and [0, last_end)
                start, room = head, first - head
        if room <= 0:
            return None
        length = min(n, room)
        self._spans.append((start, start + length))
        return start, length

    def release(self) -> None:
        self._spans.popleft()

    @property
    def in_use(self) -> int:
        return len(self._spans)

