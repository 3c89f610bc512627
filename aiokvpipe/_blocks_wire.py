"""Wire bodies of the block transfer, sans I/O: pool layouts, offers and pulls.

Pure bytes in and out (big-endian ``struct`` layouts, length-prefixed UTF-8), no torch work,
nothing unpickled. Every count and length read is bounded before it is used; anything
malformed raises :class:`~aiokvpipe.ProtocolError`. Encoding a value out of range raises
``ValueError`` (a local mistake). The frames that carry these bodies add their own prefix.

``LAYOUT`` (once per pool and pipe)::

    u32 pool_id | u8 flags (1: named) | u16 count | count × tensor
    tensor: u8 name_len | name | u8 dtype | u8 ndim | u8 block_dim | ndim × u64 shape
            | ndim × u64 strides (in elements)

``OFFER`` (the sender: "these blocks of that pool, for this key")::

    u64 offer_id | u32 pool_id | u8 has_key | u16 key_len | key | u16 n_layers
    | n_layers × u16 tensor index (strictly increasing) | u32 block_count
    | u8 has_src_ids | block_count × u32 src id (only when has_src_ids)

``PULL`` (the receiver's answer)::

    u64 offer_id | u8 status | u64 chunk_bytes | u16 text_len | text
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass
from typing import Final

from ._blocks import MAX_NUM_BLOCKS, MAX_POOL_TENSORS, PoolLayout, TensorLayout
from ._errors import ProtocolError
from ._wire import MAX_ERROR_TEXT_BYTES, MAX_KEY_BYTES, MAX_NAME_BYTES, MAX_NDIM

__all__ = [
    "MAX_OFFER_BLOCKS",
    "MAX_LAYOUT_BODY",
    "MAX_OFFER_BODY",
    "MAX_PULL_BODY",
    "Offer",
    "Pull",
    "PullStatus",
    "encode_layout",
    "decode_layout",
    "encode_offer",
    "decode_offer",
    "encode_pull",
    "decode_pull",
    "fingerprint",
]

#: Most blocks one offer may name: 4 Mi tokens at block_size 16; 1 MiB of source ids.
MAX_OFFER_BLOCKS: Final = 1 << 18

_LAYOUT_HEAD = struct.Struct(">IBH")
_TENSOR_HEAD = struct.Struct(">BBB")
_OFFER_HEAD = struct.Struct(">QIBH")
_PULL_HEAD = struct.Struct(">QBQH")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U8 = struct.Struct(">B")
_DIMS = [struct.Struct(f">{n}Q") for n in range(2 * MAX_NDIM + 1)]

MAX_LAYOUT_BODY: Final = _LAYOUT_HEAD.size + MAX_POOL_TENSORS * (
    1 + MAX_NAME_BYTES + _TENSOR_HEAD.size + 16 * MAX_NDIM)
MAX_OFFER_BODY: Final = (_OFFER_HEAD.size + MAX_KEY_BYTES + 2 + 2 * MAX_POOL_TENSORS + 4 + 1
                         + 4 * MAX_OFFER_BLOCKS)
MAX_PULL_BODY: Final = _PULL_HEAD.size + MAX_ERROR_TEXT_BYTES


class PullStatus(enum.IntEnum):
    """The receiver's answer to an offer."""

    ACCEPT = 0
    #: The pools do not fit (tensor count, dtype or block shape).
    MISFIT = 1
    #: The receiver names a different number of blocks.
    COUNT = 2
    #: Some other argument error on the receiving end (its text says which).
    INVALID = 3
    #: The matching ``recv_blocks`` was cancelled or timed out before the data moved.
    CANCELLED = 4


@dataclass(frozen=True, slots=True)
class Offer:
    """What ``send_blocks`` announces: ``block_count`` blocks of the tensors ``layers``
    (indices, strictly increasing) of pool ``pool_id``, for ``key``; ``src_ids`` only where
    the receiver pulls from the sender's pool itself (ipc)."""

    offer_id: int
    pool_id: int
    key: str | None
    layers: tuple[int, ...]
    block_count: int
    src_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _check_u("offer_id", self.offer_id, 64)
        _check_u("pool_id", self.pool_id, 32)
        if self.key is not None and len(self.key.encode()) > MAX_KEY_BYTES:
            raise ValueError(f"key is over {MAX_KEY_BYTES} bytes in UTF-8")
        if not 1 <= len(self.layers) <= MAX_POOL_TENSORS:
            raise ValueError(f"an offer names 1 to {MAX_POOL_TENSORS} tensors")
        if any(not 0 <= i < MAX_POOL_TENSORS for i in self.layers) or any(
                a >= b for a, b in zip(self.layers, self.layers[1:], strict=False)):
            raise ValueError(f"offer layers {self.layers[:8]} are not strictly increasing "
                             f"indices below {MAX_POOL_TENSORS}")
        if not 0 <= self.block_count <= MAX_OFFER_BLOCKS:
            raise ValueError(f"an offer names at most {MAX_OFFER_BLOCKS} blocks, not "
                             f"{self.block_count}")
        if self.src_ids is not None:
            if len(self.src_ids) != self.block_count:
                raise ValueError(f"{len(self.src_ids)} source ids for {self.block_count} "
                                 "blocks")
            if self.src_ids and not (0 <= min(self.src_ids)
                                     and max(self.src_ids) < MAX_NUM_BLOCKS):
                raise ValueError("source block id out of the u32 range")


@dataclass(frozen=True, slots=True)
class Pull:
    """The receiver's answer to offer ``offer_id``: ``ACCEPT`` (then the data moves, in
    pieces of at most ``chunk_bytes`` where the plane stages; 0: the plane's default) or a
    refusal with a short ``text`` (cut to 1,024 bytes of UTF-8)."""

    offer_id: int
    status: PullStatus = PullStatus.ACCEPT
    text: str = ""
    chunk_bytes: int = 0

    def __post_init__(self) -> None:
        _check_u("offer_id", self.offer_id, 64)
        _check_u("chunk_bytes", self.chunk_bytes, 64)
        if not isinstance(self.status, PullStatus):
            object.__setattr__(self, "status", PullStatus(self.status))
        raw = self.text.encode()
        if len(raw) > MAX_ERROR_TEXT_BYTES:
            object.__setattr__(self, "text",
                               raw[:MAX_ERROR_TEXT_BYTES].decode(errors="ignore"))


# -- layout -------------------------------------------------------------------------------------


def _layout_tail(layout: PoolLayout) -> bytes:
    parts = [struct.pack(">BH", int(layout.named), len(layout.tensors))]
    for t in layout.tensors:
        name = t.name.encode()
        ndim = len(t.shape)
        parts.append(_U8.pack(len(name)) + name + _TENSOR_HEAD.pack(t.dtype, ndim, t.block_dim)
                     + _DIMS[2 * ndim].pack(*t.shape, *t.strides))
    return b"".join(parts)


def encode_layout(pool_id: int, layout: PoolLayout) -> bytes:
    """The LAYOUT body announcing ``layout`` as pool ``pool_id`` (u32)."""
    _check_u("pool_id", pool_id, 32)
    return _U32.pack(pool_id) + _layout_tail(layout)


def fingerprint(layout: PoolLayout) -> bytes:
    """16 bytes identifying ``layout``, equal in every process for equal layouts."""
    return hashlib.sha256(b"aiokvpipe-pool-layout-1\0" + _layout_tail(layout)).digest()[:16]


def decode_layout(body: bytes | bytearray | memoryview) -> tuple[int, PoolLayout]:
    """``(pool_id, layout)`` from a LAYOUT body; ``ProtocolError`` if malformed or if the
    layout is not one a pool could have (see ``aiokvpipe._blocks``)."""
    r = _Reader(body, "LAYOUT", MAX_LAYOUT_BODY)
    pool_id, flags, count = r.unpack(_LAYOUT_HEAD)
    if flags not in (0, 1):
        raise ProtocolError(f"LAYOUT flags {flags:#x}")
    if not 1 <= count <= MAX_POOL_TENSORS:
        raise ProtocolError(f"LAYOUT of {count} tensors (1 to {MAX_POOL_TENSORS})")
    tensors = []
    try:
        for _ in range(count):
            name = r.text(r.unpack(_U8)[0])
            dtype, ndim, block_dim = r.unpack(_TENSOR_HEAD)
            if not 1 <= ndim <= MAX_NDIM:
                raise ProtocolError(f"LAYOUT tensor of {ndim} dimensions")
            dims = r.unpack(_DIMS[2 * ndim])
            tensors.append(TensorLayout(name, dtype, dims[:ndim], dims[ndim:], block_dim))
        r.end()
        return pool_id, PoolLayout(tuple(tensors), bool(flags))
    except ValueError as exc:
        raise ProtocolError(f"invalid pool layout: {exc}") from None


# -- offer --------------------------------------------------------------------------------------


def encode_offer(offer: Offer) -> bytes:
    """The OFFER body of ``offer``."""
    key = b"" if offer.key is None else offer.key.encode()
    parts = [_OFFER_HEAD.pack(offer.offer_id, offer.pool_id, offer.key is not None, len(key)),
             key, _U16.pack(len(offer.layers)),
             struct.pack(f">{len(offer.layers)}H", *offer.layers),
             _U32.pack(offer.block_count), _U8.pack(offer.src_ids is not None)]
    if offer.src_ids is not None:
        parts.append(struct.pack(f">{len(offer.src_ids)}I", *offer.src_ids))
    return b"".join(parts)


def decode_offer(body: bytes | bytearray | memoryview) -> Offer:
    """An :class:`Offer` from an OFFER body; ``ProtocolError`` if malformed."""
    r = _Reader(body, "OFFER", MAX_OFFER_BODY)
    offer_id, pool_id, has_key, key_len = r.unpack(_OFFER_HEAD)
    if has_key not in (0, 1) or (not has_key and key_len):
        raise ProtocolError("OFFER key flag and length disagree")
    if key_len > MAX_KEY_BYTES:
        raise ProtocolError(f"OFFER key of {key_len} bytes exceeds {MAX_KEY_BYTES}")
    key = r.text(key_len) if has_key else None
    (n_layers,) = r.unpack(_U16)
    if not 1 <= n_layers <= MAX_POOL_TENSORS:
        raise ProtocolError(f"OFFER names {n_layers} tensors (1 to {MAX_POOL_TENSORS})")
    layers = r.unpack(struct.Struct(f">{n_layers}H"))
    (count,) = r.unpack(_U32)
    if count > MAX_OFFER_BLOCKS:
        raise ProtocolError(f"OFFER of {count} blocks exceeds {MAX_OFFER_BLOCKS}")
    (has_ids,) = r.unpack(_U8)
    if has_ids not in (0, 1):
        raise ProtocolError(f"OFFER source-ids flag {has_ids}")
    src_ids = r.unpack(struct.Struct(f">{count}I")) if has_ids else None
    r.end()
    try:
        return Offer(offer_id, pool_id, key, layers, count, src_ids)
    except ValueError as exc:
        raise ProtocolError(f"invalid OFFER: {exc}") from None


# -- pull ---------------------------------------------------------------------------------------


def encode_pull(pull: Pull) -> bytes:
    """The PULL body of ``pull``."""
    text = pull.text.encode()
    return _PULL_HEAD.pack(pull.offer_id, pull.status, pull.chunk_bytes, len(text)) + text


def decode_pull(body: bytes | bytearray | memoryview) -> Pull:
    """A :class:`Pull` from a PULL body; ``ProtocolError`` if malformed (an unknown status,
    an accept with a text, a text over the limit or not UTF-8)."""
    r = _Reader(body, "PULL", MAX_PULL_BODY)
    offer_id, status, chunk_bytes, text_len = r.unpack(_PULL_HEAD)
    try:
        st = PullStatus(status)
    except ValueError:
        raise ProtocolError(f"PULL status {status}") from None
    if text_len > MAX_ERROR_TEXT_BYTES:
        raise ProtocolError(f"PULL text of {text_len} bytes exceeds {MAX_ERROR_TEXT_BYTES}")
    if st == PullStatus.ACCEPT and text_len:
        raise ProtocolError("an accepting PULL carries no text")
    text = r.text(text_len)
    r.end()
    return Pull(offer_id, st, text, chunk_bytes)


# -- helpers ------------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked cursor over one body: a read past the end is a ProtocolError."""

    __slots__ = ("_mv", "_pos", "_what")

    def __init__(self, body: bytes | bytearray | memoryview, what: str, limit: int) -> None:
        self._mv = memoryview(body).cast("B")
        if len(self._mv) > limit:
            raise ProtocolError(f"{what} body of {len(self._mv)} bytes exceeds {limit}")
        self._pos = 0
        self._what = what

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        pos = self._pos
        if pos + s.size > len(self._mv):
            raise ProtocolError(f"truncated {self._what} body")
        self._pos = pos + s.size
        return s.unpack_from(self._mv, pos)

    def text(self, n: int) -> str:
        end = self._pos + n
        if end > len(self._mv):
            raise ProtocolError(f"truncated {self._what} body")
        try:
            out = str(self._mv[self._pos:end], "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"invalid UTF-8 in {self._what} body") from None
        self._pos = end
        return out

    def end(self) -> None:
        if self._pos != len(self._mv):
            raise ProtocolError(f"{len(self._mv) - self._pos} stray bytes in {self._what} body")


def _check_u(what: str, value: int, bits: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < (1 << bits):
        raise ValueError(f"{what} {value!r} is not a u{bits}")
