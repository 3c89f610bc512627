"""Wire bodies of block transfers: LAYOUT, OFFER, PULL round-trip exactly, and any other
bytes give :class:`ProtocolError` -- never another exception (project style:
tests/test_wire_fuzz.py)."""

from __future__ import annotations

import struct
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiokvpipe import ProtocolError, _blocks_wire
from aiokvpipe._blocks import MAX_POOL_SEGMENTS, BlockPool, PoolLayout, TensorLayout
from aiokvpipe._blocks_wire import (
    MAX_LAYOUT_BODY,
    decode_layout,
    encode_layout,
)
from aiokvpipe._wire import DTYPE_ITEMSIZE

fast = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _short_text(max_bytes: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size).filter(lambda s: len(s.encode()) <= max_bytes)


@st.composite
def tensor_layouts(draw: st.DrawFn, num_blocks: int, name: str) -> TensorLayout:
    block_shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    bd = draw(st.integers(0, len(block_shape)))
    shape = (*block_shape[:bd], num_blocks, *block_shape[bd:])
    # A contiguous tensor's strides, its outer dimensions possibly permuted in memory.
    perm = draw(st.permutations(range(bd + 1)))
    inner = shape[bd + 1:]
    strides = [0] * len(shape)
    step = 1
    for i in reversed(range(bd + 1, len(shape))):
        strides[i] = step
        step *= shape[i]
    for p in reversed(perm):
        strides[p] = step
        step *= shape[p]
    del inner
    code = draw(st.sampled_from(sorted(DTYPE_ITEMSIZE)))
    return TensorLayout(name, code, shape, tuple(strides), bd)


@st.composite
def layouts(draw: st.DrawFn) -> PoolLayout:
    n = draw(st.integers(1, 1 << 20))
    named = draw(st.booleans())
    count = draw(st.integers(1, 5))
    names = (draw(st.lists(_short_text(255, 12), min_size=count, max_size=count, unique=True))
             if named else [""] * count)
    return PoolLayout(tuple(draw(tensor_layouts(n, name)) for name in names), named)


u32 = st.integers(0, (1 << 32) - 1)
u64 = st.integers(0, (1 << 64) - 1)


CODECS = {
    "layout": (lambda v: encode_layout(*v), decode_layout,
               st.tuples(u32, layouts()), MAX_LAYOUT_BODY),
}


@pytest.mark.parametrize("kind", CODECS)
@fast
@given(data=st.data())
def test_round_trip_exactly(kind: str, data: st.DataObject) -> None:
    enc, dec, values, limit = CODECS[kind]
    value = data.draw(values)
    body = enc(value)
    assert len(body) <= limit
    assert dec(body) == value
    assert dec(memoryview(bytearray(body))) == value
    assert enc(dec(body)) == body


@pytest.mark.parametrize("kind", CODECS)
@fast
@given(data=st.data())
def test_mutations_and_truncations_give_a_value_or_protocol_error(
        kind: str, data: st.DataObject) -> None:
    enc, dec, values, _ = CODECS[kind]
    body = bytearray(enc(data.draw(values)))
    i = data.draw(st.integers(0, len(body) - 1))
    body[i] ^= data.draw(st.integers(1, 255))
    for candidate in (bytes(body), bytes(body[:data.draw(st.integers(0, len(body)))]),
                      bytes(body) + data.draw(st.binary(min_size=1, max_size=8))):
        try:
            out = dec(candidate)
        except ProtocolError:
            continue
        assert enc(out) == candidate  # one encoding per value: what decodes re-encodes


@pytest.mark.parametrize("kind", CODECS)
@fast
@given(data=st.binary(max_size=300))
def test_random_bytes_give_a_value_or_protocol_error(kind: str, data: bytes) -> None:
    _, dec, _, _ = CODECS[kind]
    try:
        dec(data)
    except ProtocolError:
        pass


def test_layout_of_a_real_pool_round_trips() -> None:
    pool = BlockPool({f"layer{i}": torch.zeros(2, 64, 16, 8, 128, dtype=torch.bfloat16)
                      for i in range(3)}, block_dim=1)
    assert decode_layout(encode_layout(7, pool.layout)) == (7, pool.layout)


def _layout_body(pool_id: int, flags: int, tensors: list[tuple[str, int, tuple[int, ...],
                                                           tuple[int, ...], int]]) -> bytes:
    out = struct.pack(">IBH", pool_id, flags, len(tensors))
    for name, code, shape, strides, bd in tensors:
        raw = name.encode()
        out += struct.pack(">B", len(raw)) + raw + struct.pack(">BBB", code, len(shape), bd)
        out += struct.pack(f">{2 * len(shape)}Q", *shape, *strides)
    return out


@pytest.mark.parametrize(("tensors", "flags", "match"), [
    ([("", 1, (4, 2), (2, 1), 0)], 2, "flags"),
    ([], 0, "0 tensors"),
    ([("", 99, (4, 2), (2, 1), 0)], 0, "dtype code"),
    ([("", 1, (4, 2), (2, 1), 2)], 0, "block_dim"),
    ([("", 1, (4, 2), (1, 1), 0)], 0, "overlaps"),
    ([("", 1, (4, 2), (2, 2), 0)], 0, "not dense"),
    ([("", 1, (4, 2), (2, 1), 0), ("", 1, (5, 2), (2, 1), 0)], 0, "num_blocks"),
    ([("a", 1, (4, 2), (2, 1), 0)], 0, "no names"),
    ([("a", 1, (4, 2), (2, 1), 0), ("a", 1, (4, 2), (2, 1), 0)], 1, "duplicate"),
    ([("", 1, (4, 1 << 50), (1 << 50, 1), 0)], 0, "size limit"),
    ([("", 1, (0, 2), (2, 1), 0)], 0, "1 to"),
    ([("", 1, (2,) * 33, (1,) * 33, 0)], 0, "33 dimensions"),
])
def test_invalid_layouts_are_protocol_errors(tensors: list[tuple[str, int, tuple[int, ...],
                                                                  tuple[int, ...], int]],
                                             flags: int, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        decode_layout(_layout_body(1, flags, tensors))


def test_layout_limits_are_checked_before_reading() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_layout(bytes(MAX_LAYOUT_BODY + 1))
    with pytest.raises(ProtocolError, match="1025 tensors"):
        decode_layout(struct.pack(">IBH", 0, 0, 1025))
    with pytest.raises(ProtocolError, match="truncated"):
        decode_layout(struct.pack(">IBH", 0, 0, 1000))


def shredded_layout(tensors: int, segments: int, pool_id: int = 0) -> bytes:
    """A LAYOUT body of ``tensors`` tensors whose blocks are ``segments`` one-element byte
    ranges each, built by hand (a pool beyond the limits cannot be built)."""
    one = encode_layout(pool_id, PoolLayout(
        (TensorLayout("", 1, (segments, 2, 1), (2, 1, 1), 1),), False))
    head, tensor = one[:7], one[7:]  # pool id, flags, count; then the one tensor
    return head[:5] + struct.pack(">H", tensors) + tensor * tensors


def test_a_layout_too_finely_shredded_is_refused_before_it_costs_much(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 1,024 tensors of 1,024 segments a block: 53 KB on the wire, once 0.3 s and 40 MiB to
    # decode, and a pipe accepts 1,024 pools. Refused as the total passes the limit, with
    # no more tensors decoded than it takes to pass it.
    built = [0]

    def counted(*args: Any) -> TensorLayout:
        built[0] += 1
        return TensorLayout(*args)

    monkeypatch.setattr(_blocks_wire, "TensorLayout", counted)
    with pytest.raises(ProtocolError, match="segments"):
        decode_layout(shredded_layout(1024, 1024))
    assert built[0] == MAX_POOL_SEGMENTS // 1024 + 1
    monkeypatch.undo()
    _, layout = decode_layout(shredded_layout(64, 1024))  # the limit itself is fine
    assert layout.segments == MAX_POOL_SEGMENTS


def test_a_pool_too_finely_shredded_is_refused_here_too() -> None:
    tensors = [torch.zeros(1024, 2, 1) for _ in range(MAX_POOL_SEGMENTS // 1024 + 1)]
    with pytest.raises(ValueError, match="separate byte ranges"):
        BlockPool(tensors, block_dim=1)
