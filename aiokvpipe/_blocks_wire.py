"""The wire body of a block pool's layout, sans I/O (the POOL frame of ``_wire`` carries it;
offers and pulls are ``_wire`` frames of their own).

Pure bytes in and out (big-endian ``struct`` layouts, length-prefixed UTF-8), no torch work,
nothing unpickled. Every count and length read is bounded before it is used; anything
malformed raises :class:`~aiokvpipe.ProtocolError`. Encoding a value out of range raises
``ValueError`` (a local mistake). The frames that carry these bodies add their own prefix.

``LAYOUT`` (once per pool and pipe)::

    u32 pool_id | u8 flags (1: named) | u16 count | count × tensor
    tensor: u8 name_len | name | u8 dtype | u8 ndim | u8 block_dim | ndim × u64 shape
            | ndim × u64 strides (in elements)
"""

from __future__ import annotations

import hashlib
import struct
from typing import Final

from ._blocks import MAX_POOL_SEGMENTS, MAX_POOL_TENSORS, PoolLayout, TensorLayout
from ._errors import ProtocolError
from ._wire import MAX_NAME_BYTES, MAX_NDIM

__all__ = [
    "MAX_LAYOUT_BODY",
    "encode_layout",
    "decode_layout",
    "fingerprint",
]

_LAYOUT_HEAD = struct.Struct(">IBH")
_TENSOR_HEAD = struct.Struct(">BBB")
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U8 = struct.Struct(">B")
_DIMS = [struct.Struct(f">{n}Q") for n in range(2 * MAX_NDIM + 1)]

MAX_LAYOUT_BODY: Final = _LAYOUT_HEAD.size + MAX_POOL_TENSORS * (
    1 + MAX_NAME_BYTES + _TENSOR_HEAD.size + 16 * MAX_NDIM)


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
    segments = 0
    try:
        for _ in range(count):
            name = r.text(r.unpack(_U8)[0])
            dtype, ndim, block_dim = r.unpack(_TENSOR_HEAD)
            if not 1 <= ndim <= MAX_NDIM:
                raise ProtocolError(f"LAYOUT tensor of {ndim} dimensions")
            dims = r.unpack(_DIMS[2 * ndim])
            tensors.append(TensorLayout(name, dtype, dims[:ndim], dims[ndim:], block_dim))
            # As they are built, not once all are: a pool of a thousand tensors of a thousand
            # segments each took 0.3 s and 40 MiB to decode before it was refused.
            segments += len(tensors[-1].segment_offsets)
            if segments > MAX_POOL_SEGMENTS:
                raise ProtocolError(f"LAYOUT of more than {MAX_POOL_SEGMENTS} segments a block")
        r.end()
        return pool_id, PoolLayout(tuple(tensors), bool(flags))
    except ValueError as exc:
        raise ProtocolError(f"invalid pool layout: {exc}") from None


# -- offer --------------------------------------------------------------------------------------


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
