"""The aiokvpipe wire format, sans I/O.

Every byte on a control or data connection before the payload is a *frame*::

    +--------+--------+-----------+---------------+------------------+
    | type   | flags  | reserved  | body length   | body             |
    | u8     | u8 = 0 | u16 = 0   | u32, big end. | ``length`` bytes |
    +--------+--------+-----------+---------------+------------------+

Each frame type has its own maximum body length, checked *before* the body is buffered, so a
peer cannot make us allocate more than :data:`MAX_HEADER_BODY` bytes for one frame. Bodies are
fixed ``struct`` layouts plus length-prefixed UTF-8 strings; nothing is ever unpickled.

This module imports neither asyncio, sockets nor torch: it turns frames into bytes
(:func:`encode`) and bytes into frames (:class:`FrameDecoder`), and raises
:class:`~aiokvpipe.ProtocolError` for anything malformed.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn, TypeVar

from ._errors import ProtocolError

MAGIC: Final = b"AKVP"
#: 8: a CPU pool's block transfer over tcp in staging chunks, one BLOCK_DATA each; 7: a grant
#: of 0 credits is the transport's default; 6: credits weigh specs; 5: a plane's note in a
#: header; 4: ipc
PROTOCOL_VERSION: Final = 9

NONCE_BYTES: Final = 32
PROOF_BYTES: Final = 32
SESSION_ID_BYTES: Final = 16
DEVICE_UUID_BYTES: Final = 16
HOST_ID_BYTES: Final = 16
IPC_HANDLE_BYTES: Final = 64
NCCL_UNIQUE_ID_BYTES: Final = 128

#: Limits on what one message header may describe.
MAX_KEY_BYTES: Final = 1024
MAX_NAME_BYTES: Final = 255
MAX_TENSORS: Final = 4096
MAX_NDIM: Final = 32
#: No single dimension and no message payload may exceed 2**48 bytes (256 TiB): far beyond any
#: real tensor, small enough that arithmetic on it never overflows.
MAX_PAYLOAD_BYTES: Final = 1 << 48
MAX_ERROR_TEXT_BYTES: Final = 1024

_FRAME_PREFIX: Final = struct.Struct(">BBHI")
FRAME_PREFIX_BYTES: Final = _FRAME_PREFIX.size

#: Payloads up to this size may travel inside their header frame (HEADER_INLINE): one write,
#: one read, no data-plane round. Small enough never to hold a control frame up for long.
MAX_INLINE_PAYLOAD: Final = 64 * 1024

#: Bytes a HEADER_NOTED frame's note may hold: a data plane's description of the payload (the
#: ipc plane's: which piece of which exported region to copy, 20 bytes).
MAX_NOTE_BYTES: Final = 64

#: Largest possible HEADER body: every field at its limit.
MAX_HEADER_BODY: Final = (
    8 + 8 + 2 + 1 + 4 + 4 + MAX_TENSORS * (1 + MAX_NAME_BYTES + 1 + 1 + 8 * MAX_NDIM)
    + MAX_KEY_BYTES
)


class FrameType(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    ACCEPT = 3
    READY = 4
    ATTACH = 5
    ERROR = 6
    HEADER = 16
    HEADER_INLINE = 20  # a HEADER whose (small) payload follows in the same frame
    CREDIT = 17
    HEARTBEAT = 18
    CLOSE = 19
    # paged KV: block transfers, a rendezvous driven by the receiver
    POOL = 21  # describes one of the sender's block pools, once per pipe
    OFFER = 22  # "these blocks of that pool, under this key": waits for a PULL
    PULL = 23  # the receiver matched an offer (or refuses it, saying why)
    BLOCK_DATA = 24  # the offer's payload follows on the data plane now
    RETRACT = 25  # the sender gave up an offer not yet pulled
    PULLED = 26  # the receiver copied the blocks itself (ipc): the sender may reuse them
    SIGNAL = 27  # the data plane's own records (ipc: regions, copies, acks), in stream order
    HEADER_NOTED = 28  # a HEADER carrying the data plane's note on its payload (ipc: where)
    OFFER_FAILED = 29  # a send_blocks() failed on its own arguments: its receive fails too


class Transport(enum.IntEnum):
    """Data plane: ``AUTO`` only ever appears as a preference, never as the outcome."""

    AUTO = 0
    TCP = 1
    NCCL = 2
    IPC = 3


class Structure(enum.IntEnum):
    """The shape of a message: what ``recv()`` rebuilds."""

    NONE = 0
    TENSOR = 1
    LIST = 2
    DICT = 3


class Direction(enum.IntEnum):
    """Which way a data connection carries payload, seen from the connecting side."""

    CLIENT_TO_SERVER = 0
    SERVER_TO_CLIENT = 1


class ErrorCode(enum.IntEnum):
    PROTOCOL = 1
    AUTHENTICATION = 2
    UNSUPPORTED = 3
    INTERNAL = 4


# -- frames ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What one end can do; the server picks the data plane from both ends' capabilities."""

    transport: Transport = Transport.AUTO
    cuda: bool = False  # this end's pipe device is a CUDA device
    nccl: bool = False  # CuPy with NCCL is importable here
    device_uuid: bytes = bytes(DEVICE_UUID_BYTES)  # the CUDA device's UUID, zeros when none
    nccl_version: int = 0
    #: credits this end grants its peer at start; 0: the default of the transport picked
    recv_buffer_bytes: int = 0
    heartbeat_ms: int = 0  # how often this end sends heartbeats; 0: it sends none
    #: Which host (kernel boot) this end runs on, zeros when unknown: two ends with the same
    #: non-zero id may share GPU memory through CUDA IPC.
    host_id: bytes = bytes(HOST_ID_BYTES)
    ipc: bool = False  # this end can export and open CUDA IPC handles on its device
    #: A CUDA IPC handle of a small allocation of this end's (zeros: none): the listener
    #: proves that ipc works between the two processes by opening the client's.
    ipc_probe: bytes = bytes(IPC_HANDLE_BYTES)

    def __post_init__(self) -> None:
        _check_len("device_uuid", self.device_uuid, DEVICE_UUID_BYTES)
        _check_len("host_id", self.host_id, HOST_ID_BYTES)
        _check_len("ipc_probe", self.ipc_probe, IPC_HANDLE_BYTES)
        _check_u("nccl_version", self.nccl_version, 32)
        _check_u("recv_buffer_bytes", self.recv_buffer_bytes, 64)
        _check_u("heartbeat_ms", self.heartbeat_ms, 32)


@dataclass(frozen=True, slots=True)
class Hello:
    """First frame of each end of a control connection."""

    nonce: bytes
    caps: Capabilities
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_len("nonce", self.nonce, NONCE_BYTES)


@dataclass(frozen=True, slots=True)
class Auth:
    """The client's proof that it holds the token (empty when it has none)."""

    proof: bytes = b""

    def __post_init__(self) -> None:
        _check_proof(self.proof)


@dataclass(frozen=True, slots=True)
class Accept:
    """The server's proof, the session and the chosen data plane."""

    proof: bytes
    session_id: bytes
    transport: Transport
    nccl_ids: tuple[bytes, bytes] | None = None  # (server→client comm, client→server comm)

    def __post_init__(self) -> None:
        _check_proof(self.proof)
        _check_len("session_id", self.session_id, SESSION_ID_BYTES)
        if self.transport not in (Transport.TCP, Transport.NCCL, Transport.IPC):
            raise ProtocolError(f"ACCEPT names no concrete transport: {self.transport!r}")
        if (self.nccl_ids is not None) != (self.transport == Transport.NCCL):
            raise ProtocolError("ACCEPT carries NCCL ids exactly when the transport is nccl")
        for uid in self.nccl_ids or ():
            _check_len("nccl unique id", uid, NCCL_UNIQUE_ID_BYTES)


@dataclass(frozen=True, slots=True)
class Ready:
    """The server has every connection of the session; the pipe is open."""


@dataclass(frozen=True, slots=True)
class Attach:
    """First frame of a tcp data connection: which session and which direction it serves."""

    session_id: bytes
    direction: Direction

    def __post_init__(self) -> None:
        _check_len("session_id", self.session_id, SESSION_ID_BYTES)


@dataclass(frozen=True, slots=True)
class Error:
    """Why the sender is about to drop the connection."""

    code: ErrorCode
    text: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", error_text(self.text))


#: What one message costs against the receiver's credits beyond its payload: the header and
#: bookkeeping it holds while unclaimed, and each tensor's spec as decoded (about 140 bytes
#: in Python, 36 more a dimension, and its name: see TensorSpec.cost). Charging it bounds
#: memory even for a flood of empty (``None``) messages, or of headers of 4,096 specs of 32
#: dimensions each (charged a seventh of what they held when a spec cost a flat 64). Both
#: ends compute it the same way (:func:`message_cost`).
MESSAGE_OVERHEAD_BYTES: Final = 256
TENSOR_OVERHEAD_BYTES: Final = 160
DIM_OVERHEAD_BYTES: Final = 40


# The three frames of every message's hot path are built per message on both ends: they are
# plain slotted dataclasses, not frozen ones (three times cheaper to build). Treat them as
# immutable all the same.


@dataclass(slots=True)
class TensorSpec:
    """What the receiver allocates: dtype (a wire code, see ``_dtypes``) and shape."""

    dtype: int
    shape: tuple[int, ...]
    itemsize: int
    name: str = ""
    #: Payload bytes (computed once: the hot path asks for it several times per message).
    nbytes: int = field(init=False, repr=False, compare=False)
    #: What the spec itself costs against the receiver's credits (see message_cost).
    cost: int = field(init=False, repr=False, compare=False)
    #: This spec's wire encoding, filled in by the first :func:`encode_header` that sends it
    #: (a sender reuses specs of recurring shapes).
    wire: bytes | None = field(init=False, default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.itemsize
        for d in self.shape:
            n *= d
        self.nbytes = n
        # (A name's characters take up to 4 bytes each in a str, and a dict message's are
        # held twice: in its spec and as its key.)
        self.cost = (TENSOR_OVERHEAD_BYTES + DIM_OVERHEAD_BYTES * len(self.shape)
                     + 4 * len(self.name))


@dataclass(slots=True, init=False)
class Header:
    """Announces one message; its payload follows on the data plane, tensor after tensor."""

    seq: int
    key: str | None
    structure: Structure
    tensors: tuple[TensorSpec, ...]
    #: The payload itself, for a small message sent inline; ``None``: it follows on the
    #: data plane. A decoded header's inline payload is a view of the received bytes: copy
    #: it out, do not keep it.
    inline: bytes | memoryview | None
    #: Receive credits the sender returns along with this message (a CREDIT frame's worth,
    #: without the frame: a request/response pair then costs one frame each way).
    credit: int
    #: The data plane's note on where the payload is (1 to MAX_NOTE_BYTES bytes, opaque here;
    #: only a plane that signals sends or takes one), so that the payload's description
    #: travels in the header's own frame; ``None``: the plane describes it on its own.
    note: bytes | None
    #: Payload bytes, and the credits the message holds (:func:`message_cost`).
    nbytes: int = field(init=False, repr=False, compare=False)
    cost: int = field(init=False, repr=False, compare=False)

    # Written out, not generated with a __post_init__: one call less for every message
    # received. ``nbytes`` is for the decoder, which computed (and bounded) the payload size
    # already; it must equal the tensors' sum.
    def __init__(self, seq: int, key: str | None, structure: Structure,
                 tensors: tuple[TensorSpec, ...] = (), inline: bytes | memoryview | None = None,
                 credit: int = 0, note: bytes | None = None, nbytes: int | None = None
                 ) -> None:
        self.seq = seq
        self.key = key
        self.structure = structure
        self.tensors = tensors
        self.inline = inline
        self.credit = credit
        self.note = note
        if nbytes is None:
            nbytes = 0
            for t in tensors:
                nbytes += t.nbytes
        self.nbytes = nbytes
        self.cost = message_cost(nbytes, tensors)


@dataclass(slots=True)
class Credit:
    """The receiver frees ``nbytes`` of its receive buffer for the sender."""

    nbytes: int

    def __post_init__(self) -> None:
        _check_u("credit", self.nbytes, 64)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Proof of life; any frame counts as one, this one is sent when nothing else is."""


@dataclass(frozen=True, slots=True)
class Close:
    """Graceful end: the sender sent exactly ``messages`` messages and will send no more."""

    messages: int

    def __post_init__(self) -> None:
        _check_u("messages", self.messages, 64)


#: Bytes of plane records one SIGNAL frame may carry (an ipc record is at most ~48 KiB).
MAX_SIGNAL_BYTES: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Signal:
    """Records of the data plane (ipc), opaque to the pipe: they travel on the control
    connection, in order with the headers, and the plane decodes and checks them itself."""

    data: bytes


#: Limits on block transfers: one offer names at most this many blocks (a 2M-token request
#: of 16-token blocks), a pool's description is at most this long.
MAX_OFFER_BLOCKS: Final = 1 << 17
MAX_LAYOUT_BYTES: Final = 1 << 20
MAX_POOLS: Final = 1024


@dataclass(frozen=True, slots=True)
class PoolInfo:
    """One of the sender's block pools: its id on this pipe and its layout (see _blocks)."""

    pool_id: int
    layout: bytes

    def __post_init__(self) -> None:
        _check_u("pool id", self.pool_id, 32)
        if len(self.layout) > MAX_LAYOUT_BYTES:
            raise ProtocolError(f"pool layout of {len(self.layout)} bytes exceeds "
                                f"{MAX_LAYOUT_BYTES}")


@dataclass(frozen=True, slots=True)
class Offer:
    """Blocks ``ids`` of pool ``pool_id``, the pool's tensors ``layers``, under ``key``."""

    offer_id: int
    pool_id: int
    key: str | None
    layers: tuple[int, ...]
    ids: tuple[int, ...]

    def __post_init__(self) -> None:
        _check_u("offer id", self.offer_id, 64)
        _check_u("pool id", self.pool_id, 32)
        if not 0 < len(self.layers) <= MAX_TENSORS:
            raise ProtocolError(f"an offer names {len(self.layers)} tensors")
        if len(self.ids) > MAX_OFFER_BLOCKS:
            raise ProtocolError(f"an offer of {len(self.ids)} blocks exceeds {MAX_OFFER_BLOCKS}")


@dataclass(frozen=True, slots=True)
class Pull:
    """The receiver takes offer ``offer_id`` (``error`` empty) or refuses it, saying why."""

    offer_id: int
    error: str = ""

    def __post_init__(self) -> None:
        _check_u("offer id", self.offer_id, 64)
        object.__setattr__(self, "error", error_text(self.error))


@dataclass(frozen=True, slots=True)
class OfferFailed:
    """In place of an offer (numbered as one): the sender's ``send_blocks`` for ``key``
    failed on its own arguments, saying ``error``; the receive meant for it fails too.
    ``layers``: the pool's tensors it named, or none if those were what was wrong."""

    offer_id: int
    key: str | None
    layers: tuple[int, ...]
    error: str

    def __post_init__(self) -> None:
        _check_u("offer id", self.offer_id, 64)
        if len(self.layers) > MAX_TENSORS:
            raise ProtocolError(f"a failed offer names {len(self.layers)} tensors")
        object.__setattr__(self, "error", error_text(self.error))


@dataclass(frozen=True, slots=True)
class BlockData:
    offer_id: int


@dataclass(frozen=True, slots=True)
class Retract:
    offer_id: int


@dataclass(frozen=True, slots=True)
class Pulled:
    offer_id: int


Frame = (Hello | Auth | Accept | Ready | Attach | Error | Header | Credit | Heartbeat | Close
         | PoolInfo | Offer | OfferFailed | Pull | BlockData | Retract | Pulled | Signal)

def message_cost(payload_bytes: int, specs: Sequence[TensorSpec]) -> int:
    """Credits one message consumes at the receiver until it is claimed by ``recv()``: its
    payload, and what its header and specs hold meanwhile."""
    cost = payload_bytes + MESSAGE_OVERHEAD_BYTES
    for spec in specs:
        cost += spec.cost
    return cost


# -- item sizes of the dtype codes, so the wire can check sizes without importing torch ----------

#: wire dtype code → bytes per element. The mapping to torch dtypes lives in ``_dtypes``.
DTYPE_ITEMSIZE: Final[dict[int, int]] = {
    1: 4,  # float32
    2: 2,  # float16
    3: 2,  # bfloat16
    4: 8,  # float64
    5: 1,  # float8_e4m3fn
    6: 1,  # float8_e5m2
    7: 1,  # float8_e4m3fnuz
    8: 1,  # float8_e5m2fnuz
    9: 1,  # float8_e8m0fnu
    10: 1,  # int8
    11: 2,  # int16
    12: 4,  # int32
    13: 8,  # int64
    14: 1,  # uint8
    15: 2,  # uint16
    16: 4,  # uint32
    17: 8,  # uint64
    18: 1,  # bool
    19: 8,  # complex64
    20: 16,  # complex128
    21: 4,  # complex32 (chalf)
}

# -- encoding ---------------------------------------------------------------------------------

_U8 = struct.Struct(">B")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_CAPS = struct.Struct(f">BBB{DEVICE_UUID_BYTES}sIQI{HOST_ID_BYTES}sB{IPC_HANDLE_BYTES}s")
_HELLO = struct.Struct(f">4sH{NONCE_BYTES}s")
#: seq, credit, key length, structure, count, specs length
_HEADER_FIXED = struct.Struct(">QQHBII")
#: Where the run of bytes that a receiver caches begins (structure, count, specs).
_SPECS_RUN_START = 18
_HEADER_HEAD = struct.Struct(">BBHI" + _HEADER_FIXED.format[1:])  # frame prefix + the above
_TENSOR_FIXED = struct.Struct(">BB")
_SHAPES = [struct.Struct(f">{n}Q") for n in range(MAX_NDIM + 1)]
# A tensor's spec as one struct each: (dtype, ndim, shape...) after its name, and the whole of
# an unnamed one (name length 0 first).
_SPEC_TAIL = [struct.Struct(f">BB{n}Q") for n in range(MAX_NDIM + 1)]
_SPEC_UNNAMED = [struct.Struct(f">BBB{n}Q") for n in range(MAX_NDIM + 1)]
_CREDIT_FRAME = struct.Struct(">BBHIQ")
#: offer id, pool id, key length (0xFFFF: none), layer count, block count
_OFFER_FIXED = struct.Struct(">QIHHI")
_POOL_FIXED = struct.Struct(">II")  # pool id, layout length
_PULL_FIXED = struct.Struct(">QH")  # offer id, error text length
_OFFER_FAILED_FIXED = struct.Struct(">QHHH")  # offer id, key length, layers, error length
_STRUCTURE_OF = {int(s): s for s in Structure}
_TENSOR_COUNT = {Structure.NONE: (0, 0), Structure.TENSOR: (1, 1),
                 Structure.LIST: (0, MAX_TENSORS), Structure.DICT: (0, MAX_TENSORS)}


def encode(frame: Frame) -> bytes:
    """Serialise one frame, prefix included."""
    body: bytes
    if isinstance(frame, Hello):
        c = frame.caps
        body = _HELLO.pack(MAGIC, frame.version, frame.nonce) + _CAPS.pack(
            int(c.transport), c.cuda, c.nccl, c.device_uuid, c.nccl_version, c.recv_buffer_bytes,
            c.heartbeat_ms, c.host_id, c.ipc, c.ipc_probe
        )
        ftype = FrameType.HELLO
    elif isinstance(frame, Auth):
        body, ftype = frame.proof, FrameType.AUTH
    elif isinstance(frame, Accept):
        ids = b"".join(frame.nccl_ids) if frame.nccl_ids else b""
        body = _U8.pack(len(frame.proof)) + frame.proof + frame.session_id
        body += _U8.pack(int(frame.transport)) + ids
        ftype = FrameType.ACCEPT
    elif isinstance(frame, Ready):
        body, ftype = b"", FrameType.READY
    elif isinstance(frame, Attach):
        body, ftype = frame.session_id + _U8.pack(int(frame.direction)), FrameType.ATTACH
    elif isinstance(frame, Error):
        body, ftype = _U16.pack(int(frame.code)) + frame.text.encode(), FrameType.ERROR
    elif isinstance(frame, Header):
        if frame.inline is None:
            return encode_header(frame.seq, frame.key, frame.structure, frame.tensors,
                                 credit=frame.credit, note=frame.note)
        if len(frame.inline) != frame.nbytes:
            raise ValueError("an inline payload must be exactly the message's bytes")
        return encode_header(frame.seq, frame.key, frame.structure, frame.tensors,
                             inline=True, credit=frame.credit, note=frame.note) + frame.inline
    elif isinstance(frame, Credit):
        return encode_credit(frame.nbytes)
    elif isinstance(frame, Heartbeat):
        body, ftype = b"", FrameType.HEARTBEAT
    elif isinstance(frame, Close):
        body, ftype = _U64.pack(frame.messages), FrameType.CLOSE
    elif isinstance(frame, Signal):
        return encode_signal(frame.data)
    elif isinstance(frame, Offer):
        key_len, key = _block_key(frame.key)
        body = b"".join([
            _OFFER_FIXED.pack(frame.offer_id, frame.pool_id, key_len, len(frame.layers),
                              len(frame.ids)),
            key, struct.pack(f">{len(frame.layers)}H", *frame.layers),
            struct.pack(f">{len(frame.ids)}I", *frame.ids)])
        ftype = FrameType.OFFER
    elif isinstance(frame, OfferFailed):
        key_len, key = _block_key(frame.key)
        error = frame.error.encode()
        body = b"".join([
            _OFFER_FAILED_FIXED.pack(frame.offer_id, key_len, len(frame.layers), len(error)),
            key, struct.pack(f">{len(frame.layers)}H", *frame.layers), error])
        ftype = FrameType.OFFER_FAILED
    elif isinstance(frame, PoolInfo):
        body = _POOL_FIXED.pack(frame.pool_id, len(frame.layout)) + frame.layout
        ftype = FrameType.POOL
    elif isinstance(frame, Pull):
        error = frame.error.encode()
        body, ftype = _PULL_FIXED.pack(frame.offer_id, len(error)) + error, FrameType.PULL
    elif isinstance(frame, (BlockData, Retract, Pulled)):
        body, ftype = _U64.pack(frame.offer_id), _OFFER_ID_FRAMES[type(frame)]
    else:  # pragma: no cover - exhaustive over Frame
        raise TypeError(f"not a frame: {frame!r}")
    return _FRAME_PREFIX.pack(int(ftype), 0, 0, len(body)) + body


def encode_credit(nbytes: int) -> bytes:
    """A CREDIT frame (the hot path's: no Credit object is built)."""
    return _CREDIT_FRAME.pack(FrameType.CREDIT, 0, 0, 8, nbytes)


def encode_signal(data: bytes | bytearray) -> bytes:
    """A SIGNAL frame carrying ``data`` (at most :data:`MAX_SIGNAL_BYTES`)."""
    if not 0 < len(data) <= MAX_SIGNAL_BYTES:
        raise ValueError(f"a SIGNAL frame carries 1 to {MAX_SIGNAL_BYTES} bytes, "
                         f"not {len(data)}")
    return _FRAME_PREFIX.pack(FrameType.SIGNAL, 0, 0, len(data)) + data


def encode_header(seq: int, key: str | None, structure: Structure,
                  specs: Sequence[TensorSpec], inline: bool = False, credit: int = 0,
                  note: bytes | None = None) -> bytes:
    """A HEADER frame; with ``inline``, the start of a HEADER_INLINE frame, which the
    message's payload bytes (``sum(spec.nbytes)``) must follow at once; with ``note`` (not
    with ``inline``), a HEADER_NOTED frame ending in ``note length u8 | note``.

    The send path of every message: no Header object is built and no payload is copied, so
    the caller can write the head and the tensors' bytes together. Body layout::

        seq u64 | credit u64 | key length u16 (0xFFFF: no key) | structure u8 | count u32
        | specs length u32 | specs: count × (name length u8 | name | dtype u8 | ndim u8
        | ndim × u64) | key | inline payload (HEADER_INLINE) or note length u8 | note
        (HEADER_NOTED)

    The specs come as one run of bytes whose length is known up front, so that a receiver can
    recognise the specs of a recurring message without parsing them again.
    """
    if key is None:
        key_bytes, key_len = b"", 0xFFFF  # "no key", so that "" stays a key of its own
    else:
        key_bytes = key.encode()
        key_len = len(key_bytes)
        if key_len > MAX_KEY_BYTES:
            raise ValueError(f"key is {key_len} bytes in UTF-8; the limit is {MAX_KEY_BYTES}")
    count = len(specs)
    if count == 1:  # most messages: the spec's bytes as they are, no list to join
        t = specs[0]
        specs_bytes = t.wire or _spec_wire(t)
        nbytes = t.nbytes
    elif count > MAX_TENSORS:
        raise ValueError(f"{count} tensors in one message; the limit is {MAX_TENSORS}")
    else:
        specs_bytes = b"".join([t.wire or _spec_wire(t) for t in specs])
        nbytes = sum(t.nbytes for t in specs)
    specs_len = len(specs_bytes)
    length = _HEADER_FIXED_SIZE + specs_len + len(key_bytes)
    tail = b""
    if inline:
        if nbytes > MAX_INLINE_PAYLOAD:
            raise ValueError(f"an inline payload is at most {MAX_INLINE_PAYLOAD} bytes, "
                             f"not {nbytes}")
        if note is not None:
            raise ValueError("an inline message carries no note")
        ftype, length = _HEADER_INLINE, length + nbytes
    elif note is not None:
        if not 0 < len(note) <= MAX_NOTE_BYTES:
            raise ValueError(f"a note holds 1 to {MAX_NOTE_BYTES} bytes, not {len(note)}")
        tail = _U8.pack(len(note)) + note
        ftype, length = _HEADER_NOTED, length + 1 + len(note)
    else:
        ftype = _HEADER
    return (_HEADER_HEAD.pack(ftype, 0, 0, length, seq, credit, key_len, structure, count,
                              specs_len) + specs_bytes + key_bytes + tail)


def _spec_wire(t: TensorSpec) -> bytes:
    """``t``'s wire encoding, made once and kept on the spec (a sender reuses the specs of
    recurring shapes)."""
    wire = t.wire = _encode_spec(t)
    return wire


def _encode_spec(t: TensorSpec) -> bytes:
    ndim = len(t.shape)
    if ndim > MAX_NDIM:
        raise ValueError(f"tensor has {ndim} dimensions; the limit is {MAX_NDIM}")
    if not t.name:
        return _SPEC_UNNAMED[ndim].pack(0, t.dtype, ndim, *t.shape)
    name = t.name.encode()
    if len(name) > MAX_NAME_BYTES:
        raise ValueError(f"dict key {t.name[:40]!r}… is over {MAX_NAME_BYTES} bytes")
    return _U8.pack(len(name)) + name + _SPEC_TAIL[ndim].pack(t.dtype, ndim, *t.shape)


# -- decoding ---------------------------------------------------------------------------------

#: Largest body each frame type may carry; anything longer is refused before it is buffered.
MAX_BODY: Final[dict[FrameType, int]] = {
    FrameType.HELLO: _HELLO.size + _CAPS.size,
    FrameType.AUTH: PROOF_BYTES,
    FrameType.ACCEPT: 1 + PROOF_BYTES + SESSION_ID_BYTES + 1 + 2 * NCCL_UNIQUE_ID_BYTES,
    FrameType.READY: 0,
    FrameType.ATTACH: SESSION_ID_BYTES + 1,
    FrameType.ERROR: 2 + MAX_ERROR_TEXT_BYTES,
    FrameType.HEADER: MAX_HEADER_BODY,
    FrameType.HEADER_INLINE: MAX_HEADER_BODY + MAX_INLINE_PAYLOAD,
    FrameType.HEADER_NOTED: MAX_HEADER_BODY + 1 + MAX_NOTE_BYTES,
    FrameType.CREDIT: 8,
    FrameType.POOL: 8 + MAX_LAYOUT_BYTES,
    FrameType.OFFER: 20 + MAX_KEY_BYTES + 2 * MAX_TENSORS + 4 * MAX_OFFER_BLOCKS,
    FrameType.PULL: 10 + MAX_ERROR_TEXT_BYTES,
    FrameType.OFFER_FAILED: 14 + MAX_KEY_BYTES + 2 * MAX_TENSORS + MAX_ERROR_TEXT_BYTES,
    FrameType.BLOCK_DATA: 8,
    FrameType.RETRACT: 8,
    FrameType.PULLED: 8,
    FrameType.HEARTBEAT: 0,
    FrameType.CLOSE: 8,
    FrameType.SIGNAL: MAX_SIGNAL_BYTES,
}


#: The frames of a handshake: before a pipe exists, nothing else is read (a message frame
#: there, up to 2 MiB, would be buffered whole before its type was refused).
HANDSHAKE_FRAMES: Final = frozenset((FrameType.HELLO, FrameType.AUTH, FrameType.ACCEPT,
                                     FrameType.READY, FrameType.ATTACH, FrameType.ERROR))

_HEADER: Final = FrameType.HEADER
_HEADER_INLINE: Final = FrameType.HEADER_INLINE
_HEADER_NOTED: Final = FrameType.HEADER_NOTED
_HEADERS: Final = frozenset((_HEADER, _HEADER_INLINE, _HEADER_NOTED))
_SIGNAL: Final = FrameType.SIGNAL

#: raw type byte → (frame type, largest body): one lookup checks a prefix.
_KNOWN_TYPES: Final = {int(t): (t, MAX_BODY[t]) for t in FrameType}


def decode_prefix(prefix: bytes | bytearray | memoryview) -> tuple[FrameType, int]:
    """Check a frame prefix; return its type and body length (already bounded)."""
    if len(prefix) != FRAME_PREFIX_BYTES:
        raise ProtocolError("truncated frame prefix")
    return _check_prefix(*_FRAME_PREFIX.unpack(prefix))


def _bad_prefix(raw_type: int, flags: int, reserved: int, length: int) -> NoReturn:
    _check_prefix(raw_type, flags, reserved, length)
    raise AssertionError("a prefix the fast check refused passed the full one")


def _check_prefix(raw_type: int, flags: int, reserved: int, length: int
                  ) -> tuple[FrameType, int]:
    known = _KNOWN_TYPES.get(raw_type)
    if known is None:
        raise ProtocolError(f"unknown frame type {raw_type}")
    if flags or reserved:
        raise ProtocolError("reserved frame bits are set")
    ftype, max_body = known
    if length > max_body:
        raise ProtocolError(f"{ftype.name} body of {length} bytes exceeds {max_body}")
    return ftype, length


def decode_body(ftype: FrameType, body: bytes | bytearray | memoryview) -> Frame:
    """Parse a body whose length :func:`decode_prefix` has already bounded.

    A HEADER_INLINE frame's payload is returned as a view of ``body``, not a copy.
    """
    if ftype in _HEADERS:
        return _decode_header(memoryview(body).cast("B"), ftype)
    r = _Reader(body, ftype)
    frame: Frame
    if ftype is FrameType.CREDIT:
        frame = Credit(r.u64())
    elif ftype is FrameType.HEARTBEAT:
        frame = Heartbeat()
    elif ftype is FrameType.HELLO:
        magic, version, nonce = r.unpack(_HELLO)
        if magic != MAGIC:
            raise ProtocolError("not an aiokvpipe peer (bad magic)")
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"peer speaks protocol {version}, we speak {PROTOCOL_VERSION}")
        (transport, cuda, nccl, uuid, nccl_version, credits, heartbeat_ms, host_id,
         ipc, probe) = r.unpack(_CAPS)
        frame = Hello(nonce, Capabilities(_enum(Transport, transport), _flag(cuda), _flag(nccl),
                                          uuid, nccl_version, credits, heartbeat_ms, host_id,
                                          _flag(ipc), probe), version)
    elif ftype is FrameType.AUTH:
        frame = Auth(r.take(len(body)))
    elif ftype is FrameType.ACCEPT:
        proof = r.take(r.u8())
        session = r.take(SESSION_ID_BYTES)
        transport = _enum(Transport, r.u8())
        ids = None
        if transport == Transport.NCCL:
            ids = (r.take(NCCL_UNIQUE_ID_BYTES), r.take(NCCL_UNIQUE_ID_BYTES))
        frame = Accept(proof, session, transport, ids)
    elif ftype is FrameType.READY:
        frame = Ready()
    elif ftype is FrameType.ATTACH:
        frame = Attach(r.take(SESSION_ID_BYTES), _enum(Direction, r.u8()))
    elif ftype is FrameType.ERROR:
        code = r.u16()
        text = bytes(r.take(len(body) - 2)).decode(errors="replace")
        frame = Error(ErrorCode(code) if code in ErrorCode._value2member_map_ else
                      ErrorCode.INTERNAL, text)
    elif ftype is FrameType.CLOSE:
        frame = Close(r.u64())
    elif ftype is FrameType.SIGNAL:
        if not body:
            raise ProtocolError("an empty SIGNAL frame")
        frame = Signal(bytes(r.take(len(body))))
    elif ftype is FrameType.OFFER:
        offer_id, pool_id, key_len, nlayers, nids = r.unpack(_OFFER_FIXED)
        key = _read_block_key(r, key_len)
        if nids > MAX_OFFER_BLOCKS:
            raise ProtocolError(f"an offer of {nids} blocks exceeds {MAX_OFFER_BLOCKS}")
        layers = struct.unpack(f">{nlayers}H", r.take(2 * nlayers))
        block_ids = struct.unpack(f">{nids}I", r.take(4 * nids))
        frame = Offer(offer_id, pool_id, key, layers, block_ids)
    elif ftype is FrameType.OFFER_FAILED:
        offer_id, key_len, nlayers, error_len = r.unpack(_OFFER_FAILED_FIXED)
        key = _read_block_key(r, key_len)
        layers = struct.unpack(f">{nlayers}H", r.take(2 * nlayers))
        frame = OfferFailed(offer_id, key, layers,
                            bytes(r.take(error_len)).decode(errors="replace"))
    elif ftype is FrameType.POOL:
        pool_id, length = r.unpack(_POOL_FIXED)
        frame = PoolInfo(pool_id, bytes(r.take(length)))
    elif ftype is FrameType.PULL:
        offer_id, length = r.unpack(_PULL_FIXED)
        frame = Pull(offer_id, bytes(r.take(length)).decode(errors="replace"))
    else:
        frame = _OFFER_ID_TYPES[ftype](r.u64())
    r.end()
    return frame


_OFFER_ID_FRAMES: Final[dict[type, FrameType]] = {
    BlockData: FrameType.BLOCK_DATA, Retract: FrameType.RETRACT, Pulled: FrameType.PULLED}
_OFFER_ID_TYPES: Final = {v: k for k, v in _OFFER_ID_FRAMES.items()}


#: A receiver remembers the parsed specs of this many distinct recurring messages (of at
#: most ``_CACHED_SPECS_BYTES`` each): a KV transfer sends the same shapes over and over.
_CACHED_SPECS: Final = 256
_CACHED_SPECS_BYTES: Final = 1024
_HEADER_FIXED_SIZE: Final = _HEADER_FIXED.size
_unpack_header_fixed: Final = _HEADER_FIXED.unpack_from
#: A header whose specs run ends by here has them cached.
_CACHED_RUN_END: Final = _SPECS_RUN_START + _CACHED_SPECS_BYTES

SpecsCache = dict[bytes, tuple[Structure, tuple[TensorSpec, ...], int]]


def _decode_header(mv: memoryview, ftype: FrameType, cache: SpecsCache | None = None
                   ) -> Header:
    # The hot path of every message: straight offsets into the body, no helper calls per
    # field. Every read is bounds-checked by struct/indexing, reported as truncation.
    size = len(mv)
    try:
        seq, credit, key_len, raw_structure, count, specs_len = _unpack_header_fixed(mv)
    except struct.error:
        raise ProtocolError("truncated HEADER frame") from None
    end = _HEADER_FIXED_SIZE + specs_len
    if end > size:
        raise ProtocolError("truncated HEADER frame")
    # The cache key: structure, count and specs, everything the specs' checks depend on. A
    # copy of those few bytes, not a view of them: hashing a memoryview first hashes the
    # whole object it views (CPython checks that it is hashable), here the read that brought
    # the frame, up to 256 KiB: 19 µs for 64 KiB, once per read, against 0.2 µs for a copy.
    if cache is not None and end <= _CACHED_RUN_END:
        run = mv[_SPECS_RUN_START:end].tobytes()
        known = cache.get(run)
        if known is None:
            known = _structure_and_specs(mv, end, raw_structure, count)
            if len(cache) >= _CACHED_SPECS:
                cache.clear()
            cache[run] = known
    else:
        known = _structure_and_specs(mv, end, raw_structure, count)
    structure, specs, total = known
    pos = end
    key: str | None = None
    if key_len != 0xFFFF:
        if key_len > MAX_KEY_BYTES:
            raise ProtocolError(f"key of {key_len} bytes exceeds {MAX_KEY_BYTES}")
        try:
            key = _utf8(mv, pos, key_len)
        except IndexError:
            raise ProtocolError("truncated HEADER frame") from None
        pos += key_len
    payload = note = None
    if ftype is _HEADER_INLINE:
        if total > MAX_INLINE_PAYLOAD:
            raise ProtocolError(f"inline payload of {total} bytes exceeds {MAX_INLINE_PAYLOAD}")
        payload = mv[pos:pos + total]
        pos += total
    elif ftype is _HEADER_NOTED:
        if pos >= size:
            raise ProtocolError("truncated HEADER_NOTED frame")
        n = mv[pos]
        if not 0 < n <= MAX_NOTE_BYTES:
            raise ProtocolError(f"note of {n} bytes (1 to {MAX_NOTE_BYTES})")
        note = mv[pos + 1:pos + 1 + n].tobytes()
        pos += 1 + n
    if pos != size:
        if pos > size:
            raise ProtocolError(f"truncated {ftype.name} frame")
        raise ProtocolError(f"{size - pos} stray bytes in {ftype.name}")
    return Header(seq, key, structure, specs, payload, credit, note, total)


def _structure_and_specs(mv: memoryview, end: int, raw_structure: int, count: int
                         ) -> tuple[Structure, tuple[TensorSpec, ...], int]:
    """A header's structure, its specs (``mv[_HEADER_FIXED_SIZE:end]``) and their total
    payload bytes, checked."""
    structure = _STRUCTURE_OF.get(raw_structure)
    if structure is None:
        raise ProtocolError(f"invalid Structure value {raw_structure}")
    low, high = _TENSOR_COUNT[structure]
    if not low <= count <= high:
        raise ProtocolError(f"{structure.name} message with {count} tensors")
    specs, total = _decode_specs(mv[:end], _HEADER_FIXED_SIZE, count,
                                 structure is Structure.DICT)
    return structure, specs, total


def _decode_specs(mv: memoryview, pos: int, count: int, is_dict: bool
                  ) -> tuple[tuple[TensorSpec, ...], int]:
    """``count`` tensor specs filling ``mv[pos:]`` exactly; their total payload bytes."""
    specs = []
    total = 0
    names: set[str] = set()
    try:
        for _ in range(count):
            name_len = mv[pos]
            pos += 1
            name = _utf8(mv, pos, name_len) if name_len else ""
            pos += name_len
            if is_dict:
                if name in names:
                    raise ProtocolError(f"duplicate dict key {name!r}")
                names.add(name)
            elif name:
                raise ProtocolError("tensor name outside a dict message")
            code, ndim = _TENSOR_FIXED.unpack_from(mv, pos)
            pos += _TENSOR_FIXED.size
            itemsize = DTYPE_ITEMSIZE.get(code)
            if itemsize is None:
                raise ProtocolError(f"unknown dtype code {code}")
            if ndim > MAX_NDIM:
                raise ProtocolError(f"{ndim} dimensions exceed the limit of {MAX_NDIM}")
            shape = _SHAPES[ndim].unpack_from(mv, pos)
            pos += 8 * ndim
            if not shape_fits(shape, itemsize):
                raise ProtocolError(f"shape {shape[:8]} is beyond the payload limit")
            spec = TensorSpec(code, shape, itemsize, name)
            total += spec.nbytes
            if total > MAX_PAYLOAD_BYTES:
                raise ProtocolError("message larger than the payload limit")
            specs.append(spec)
    except (struct.error, IndexError):
        raise ProtocolError("truncated HEADER frame") from None
    if pos != len(mv):
        raise ProtocolError(f"HEADER specs are {len(mv) - pos} bytes shorter than announced")
    return tuple(specs), total


def _utf8(mv: memoryview, pos: int, n: int) -> str:
    if pos + n > len(mv):
        raise IndexError
    try:
        return str(mv[pos:pos + n], "utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("invalid UTF-8 in a HEADER frame") from None


def shape_fits(shape: tuple[int, ...], itemsize: int) -> bool:
    """Whether a tensor of this shape stays within :data:`MAX_PAYLOAD_BYTES`, counting a zero
    dimension as one: a zero must not let huge dimensions through (strides are computed
    from them all), and a shape's fate must not depend on the order of its dimensions."""
    bound = itemsize
    for d in shape:
        if d < 0:
            return False
        bound *= max(d, 1)
        if bound > MAX_PAYLOAD_BYTES:
            return False
    return True


#: What decoding a frame of each type sets in motion, in units of a message header's: a block
#: transfer's frame makes its receiver check ids, plan or launch a copy and answer (tens of
#: µs), a header mostly a dictionary lookup; a noted header also launches its copy (as a
#: header and the SIGNAL frame it replaces would). :meth:`FrameDecoder.feed`'s budget counts
#: these.
FRAME_WEIGHT: Final = {t: 16 if FrameType.POOL <= t <= FrameType.PULLED
                       else 2 if t is FrameType.HEADER_NOTED else 1 for t in FrameType}
#: A SIGNAL frame weighs one more per this many bytes: one carries one ipc record a message,
#: but up to 64 KiB of them (regions to map, copies to launch).
SIGNAL_BYTES_PER_WEIGHT: Final = 4096


def frame_weight(ftype: FrameType, length: int) -> int:
    """What a frame of ``length`` body bytes weighs against a turn's budget."""
    if ftype is _SIGNAL:
        return 1 + length // SIGNAL_BYTES_PER_WEIGHT
    return FRAME_WEIGHT[ftype]


class FrameDecoder:
    """Incremental decoder: ``feed()`` bytes as they arrive, get whole frames back.

    Buffers at most one frame (its length is checked from the prefix before the body is
    accepted), so memory stays bounded whatever the peer sends; with a budget, also the
    rest of the bytes it was given (:attr:`backlogged`), until fed again.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need: tuple[FrameType, int] | None = None
        self._specs_cache: SpecsCache = {}
        #: Bytes given but not parsed yet, from ``_rest_pos`` on: a budget ran out.
        self._rest = b""
        self._rest_pos = 0
        #: A budget stopped the last :meth:`feed` before the end of what it was given (an
        #: attribute, not a property: the I/O layer reads it after every read).
        self.backlogged = False

    def feed(self, data: bytes | bytearray | memoryview, budget: int | None = None
             ) -> list[Frame]:
        """The frames completed by ``data`` (and the bytes held from earlier calls).

        ``budget``: stop once the frames decoded weigh this much (:data:`FRAME_WEIGHT`; one
        frame at least) and keep the rest for the next call, which may bring no new bytes:
        how the I/O layer bounds the work of one event-loop iteration.
        """
        rest, pos = self._rest, self._rest_pos
        self._rest, self._rest_pos = b"", 0
        self.backlogged = False
        if rest and len(data):  # (the I/O layer holds new bytes back while backlogged)
            rest, pos = rest[pos:] + bytes(data), 0
        frames: list[Frame] = []
        view = memoryview(rest or data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        end = len(view)
        spent = 0
        if self._buf or self._need is not None:
            # A frame was cut at the end of the last chunk: complete it with only the bytes
            # it lacks, then parse the rest of this chunk in place. (Appending the whole
            # chunk and cutting frames off the buffer's front moved every later byte once
            # per frame: with 4 KiB frames, tens of KiB of memmove per message.)
            pos, spent = self._complete_held(view, frames)
        # Whole frames are parsed straight from ``data``; only a trailing partial frame is
        # copied into the buffer.
        while end - pos >= FRAME_PREFIX_BYTES:
            if budget is not None and spent >= budget and frames:
                # Kept as bytes and an offset: a long backlog is not copied once per turn.
                self._rest, self._rest_pos = (rest, pos) if rest else (bytes(view[pos:]), 0)
                self.backlogged = True
                return frames
            raw_type, flags, reserved, length = _FRAME_PREFIX.unpack_from(view, pos)
            known = _KNOWN_TYPES.get(raw_type)
            if known is None or flags or reserved or length > known[1]:
                _bad_prefix(raw_type, flags, reserved, length)
            start = pos + FRAME_PREFIX_BYTES
            stop = start + length
            if stop > end:
                self._need = known[0], length
                self._buf += view[start:]
                return frames
            ftype = known[0]
            if ftype in _HEADERS:  # every message's frame: decoded and weighed in place
                frames.append(_decode_header(view[start:stop], ftype, self._specs_cache))
                spent += FRAME_WEIGHT[ftype]
            else:
                frames.append(self._decode(ftype, view[start:stop]))
                spent += frame_weight(ftype, length)
            pos = stop
        if pos < end:
            self._buf += view[pos:]
        return frames

    def _complete_held(self, view: memoryview, frames: list[Frame]) -> tuple[int, int]:
        """Take from ``view`` what the held partial frame lacks; decode the frame once whole.
        Returns how many bytes of ``view`` were taken (all of it while still incomplete) and
        the weight of the frame decoded (0 if none)."""
        pos = 0
        if self._need is None:  # the prefix itself was cut
            pos = FRAME_PREFIX_BYTES - len(self._buf)
            self._buf += view[:pos]
            if len(self._buf) < FRAME_PREFIX_BYTES:
                return len(view), 0
            self._need = decode_prefix(self._buf)
            self._buf.clear()
        ftype, length = self._need
        stop = pos + length - len(self._buf)
        self._buf += view[pos:stop]
        if len(self._buf) < length:
            return len(view), 0
        # A copy: the frame (an inline payload is a view of it) must not pin the buffer.
        held = memoryview(bytes(self._buf))
        self._buf.clear()
        self._need = None
        frames.append(self._decode(ftype, held))
        return min(stop, len(view)), frame_weight(ftype, length)

    def _decode(self, ftype: FrameType, body: memoryview) -> Frame:
        if ftype in _HEADERS:
            return _decode_header(body, ftype, self._specs_cache)
        if ftype is _SIGNAL and len(body):  # one a message on an ipc pipe: no reader built
            return Signal(body.tobytes())
        return decode_body(ftype, body)

    @property
    def buffered(self) -> int:
        """Bytes held that do not yet make a whole frame."""
        return len(self._buf)


# -- helpers ----------------------------------------------------------------------------------


def error_text(text: str) -> str:
    """``text`` cut to what an ERROR, PULL or OFFER_FAILED frame carries (whole characters of
    at most :data:`MAX_ERROR_TEXT_BYTES` in UTF-8)."""
    data = text.encode()
    if len(data) <= MAX_ERROR_TEXT_BYTES:
        return text
    return data[:MAX_ERROR_TEXT_BYTES].decode(errors="ignore")


def _block_key(key: str | None) -> tuple[int, bytes]:
    """A block frame's key: its length field (0xFFFF: no key) and its bytes."""
    if key is None:
        return 0xFFFF, b""
    data = key.encode()
    if len(data) > MAX_KEY_BYTES:
        raise ValueError(f"key is over {MAX_KEY_BYTES} bytes in UTF-8")
    return len(data), data


def _read_block_key(r: _Reader, key_len: int) -> str | None:
    if key_len == 0xFFFF:
        return None
    if key_len > MAX_KEY_BYTES:
        raise ProtocolError(f"key of {key_len} bytes exceeds {MAX_KEY_BYTES}")
    return r.text(key_len)


class _Reader:
    """Bounds-checked cursor over a frame body: every read past the end is a ProtocolError."""

    __slots__ = ("_mv", "_pos", "_ftype")

    def __init__(self, body: bytes | bytearray | memoryview, ftype: FrameType) -> None:
        self._mv = memoryview(body).cast("B")
        self._pos = 0
        self._ftype = ftype

    def take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._mv):
            raise ProtocolError(f"truncated {self._ftype.name} frame")
        out = bytes(self._mv[self._pos:end])
        self._pos = end
        return out

    def unpack(self, s: struct.Struct) -> tuple[Any, ...]:
        pos = self._pos
        if pos + s.size > len(self._mv):
            raise ProtocolError(f"truncated {self._ftype.name} frame")
        self._pos = pos + s.size
        return s.unpack_from(self._mv, pos)

    def u8(self) -> int:
        pos = self._pos
        if pos >= len(self._mv):
            raise ProtocolError(f"truncated {self._ftype.name} frame")
        self._pos = pos + 1
        return int(self._mv[pos])

    def u16(self) -> int:
        return int(self.unpack(_U16)[0])

    def u32(self) -> int:
        return int(self.unpack(_U32)[0])

    def u64(self) -> int:
        return int(self.unpack(_U64)[0])

    def text(self, n: int) -> str:
        try:
            return self.take(n).decode()
        except UnicodeDecodeError:
            raise ProtocolError(f"invalid UTF-8 in {self._ftype.name} frame") from None

    def end(self) -> None:
        if self._pos != len(self._mv):
            raise ProtocolError(f"{len(self._mv) - self._pos} stray bytes in {self._ftype.name}")


E = TypeVar("E", bound=enum.IntEnum)


def _enum(cls: type[E], value: int) -> E:
    try:
        return cls(value)
    except ValueError:
        raise ProtocolError(f"invalid {cls.__name__} value {value!r}") from None


def _flag(value: object) -> bool:
    if value not in (0, 1):
        raise ProtocolError(f"boolean field holds {value!r}")
    return bool(value)


def _check_len(what: str, value: bytes, n: int) -> None:
    if len(value) != n:
        raise ProtocolError(f"{what} must be {n} bytes, got {len(value)}")


def _check_proof(proof: bytes) -> None:
    if len(proof) not in (0, PROOF_BYTES):
        raise ProtocolError(f"proof must be empty or {PROOF_BYTES} bytes, got {len(proof)}")


def _check_u(what: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ProtocolError(f"{what} {value} out of range for u{bits}")
