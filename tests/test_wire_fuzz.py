"""Property tests of the wire decoder: whatever bytes arrive, it yields frames or raises
:class:`ProtocolError` -- never another exception, never unbounded buffering.

The default run is small, fixed (``derandomize``) and fast. ``-m slow`` runs the same properties
with ``AIOKVPIPE_FUZZ_EXAMPLES`` examples each (default 20 000), on fresh random seeds.
"""

from __future__ import annotations

import itertools
import os
import struct
from typing import get_args

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aiokvpipe import ProtocolError, _wire
from aiokvpipe._wire import (
    DEVICE_UUID_BYTES,
    DTYPE_ITEMSIZE,
    FRAME_PREFIX_BYTES,
    MAX_BODY,
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_PAYLOAD_BYTES,
    NCCL_UNIQUE_ID_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    SESSION_ID_BYTES,
    FrameDecoder,
    FrameType,
    Structure,
    TensorSpec,
    Transport,
    encode,
)

SLOW_EXAMPLES = int(os.environ.get("AIOKVPIPE_FUZZ_EXAMPLES", "20000"))
#: The most a decoder may hold between feeds: an incomplete prefix, or the prefix's declared
#: (already bounded) body minus one byte.
MAX_BUFFERED = max(FRAME_PREFIX_BYTES, max(MAX_BODY.values()))

fast = settings(max_examples=150, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])
slow = settings(max_examples=SLOW_EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
FRAME_CLASSES = get_args(_wire.Frame)

# -- strategies -------------------------------------------------------------------------------

u64 = st.integers(0, (1 << 64) - 1)
nonce = st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES)
session = st.binary(min_size=SESSION_ID_BYTES, max_size=SESSION_ID_BYTES)
proof = st.one_of(st.just(b""), st.binary(min_size=PROOF_BYTES, max_size=PROOF_BYTES))
nccl_id = st.binary(min_size=NCCL_UNIQUE_ID_BYTES, max_size=NCCL_UNIQUE_ID_BYTES)


def _short_text(max_bytes: int, max_size: int) -> st.SearchStrategy[str]:
    return st.text(max_size=max_size).filter(lambda s: len(s.encode()) <= max_bytes)


capabilities = st.builds(
    _wire.Capabilities,
    transport=st.sampled_from(Transport),
    cuda=st.booleans(),
    nccl=st.booleans(),
    device_uuid=st.binary(min_size=DEVICE_UUID_BYTES, max_size=DEVICE_UUID_BYTES),
    nccl_version=st.integers(0, (1 << 32) - 1),
    recv_buffer_bytes=u64,
    heartbeat_ms=st.integers(0, (1 << 32) - 1),
    host_id=st.binary(min_size=16, max_size=16),
    ipc=st.booleans(),
)

accept = st.one_of(
    st.builds(_wire.Accept, proof, session, st.just(Transport.TCP)),
    st.builds(_wire.Accept, proof, session, st.just(Transport.NCCL), st.tuples(nccl_id, nccl_id)),
    st.builds(_wire.Accept, proof, session, st.just(Transport.IPC)),
)


@st.composite
def tensor_specs(draw: st.DrawFn, name: str = "") -> TensorSpec:
    code = draw(st.sampled_from(sorted(DTYPE_ITEMSIZE)))
    shape = tuple(draw(st.lists(st.one_of(st.integers(0, 8), st.integers(0, 1 << 16)),
                                max_size=6)))
    s = TensorSpec(code, shape, DTYPE_ITEMSIZE[code], name)
    # Unambiguously valid: within the limit even with every zero dimension counted as one
    # (whether a zero may excuse huge other dimensions is pinned down in test_wire.py).
    bound = s.itemsize
    for d in shape:
        bound *= max(d, 1)
    assume(bound <= MAX_PAYLOAD_BYTES)
    return s


@st.composite
def headers(draw: st.DrawFn) -> _wire.Header:
    structure = draw(st.sampled_from(Structure))
    if structure == Structure.NONE:
        specs: list[TensorSpec] = []
    elif structure == Structure.TENSOR:
        specs = [draw(tensor_specs())]
    elif structure == Structure.LIST:
        specs = draw(st.lists(tensor_specs(), max_size=5))
    else:
        names = draw(st.lists(_short_text(MAX_NAME_BYTES, 12), max_size=5, unique=True))
        specs = [draw(tensor_specs(n)) for n in names]
    assume(sum(s.nbytes for s in specs) <= MAX_PAYLOAD_BYTES)
    key = draw(st.one_of(st.none(), _short_text(MAX_KEY_BYTES, 20)))
    return _wire.Header(draw(u64), key, structure, tuple(specs))


frames = st.one_of(
    st.builds(_wire.Hello, nonce, capabilities),
    st.builds(_wire.Auth, proof),
    accept,
    st.just(_wire.Ready()),
    st.builds(_wire.Attach, session, st.sampled_from(_wire.Direction)),
    st.builds(_wire.Error, st.sampled_from(_wire.ErrorCode), _short_text(200, 40)),
    headers(),
    st.builds(_wire.Credit, u64),
    st.just(_wire.Heartbeat()),
    st.builds(_wire.Close, u64),
)


@st.composite
def plausible_prefix_then_noise(draw: st.DrawFn) -> bytes:
    """A valid prefix (so decoding gets past it) declaring a body of random bytes."""
    ftype = draw(st.sampled_from(FrameType))
    body = draw(st.binary(max_size=min(MAX_BODY[ftype], 300)))
    return struct.pack(">BBHI", ftype, 0, 0, len(body)) + body


#: Streams that mostly look like aiokvpipe, with noise in them: pure random bytes would almost
#: always die on the first prefix and never exercise a body parser.
streams = st.lists(
    st.one_of(st.binary(max_size=64), frames.map(encode), plausible_prefix_then_noise()),
    max_size=6,
).map(b"".join)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


# -- the properties, shared by the fast and the slow runs ---------------------------------------


def check_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    dec = FrameDecoder()
    for chunk in chunked(data, cuts):
        try:
            out = dec.feed(chunk)
        except ProtocolError:
            return  # the connection would be dropped here
        assert all(isinstance(f, FRAME_CLASSES) for f in out)
        assert dec.buffered <= MAX_BUFFERED


def check_round_trip(frame: _wire.Frame, cuts: list[int]) -> None:
    data = encode(frame)
    dec = FrameDecoder()
    out: list[_wire.Frame] = []
    for chunk in chunked(data, cuts):
        out += dec.feed(chunk)
    assert out == [frame]
    assert dec.buffered == 0
    assert encode(out[0]) == data


def check_single_byte_mutation(frame: _wire.Frame, index: int, flip: int) -> None:
    original = encode(frame)
    i = index % len(original)
    mutated = bytearray(original)
    mutated[i] ^= flip
    dec = FrameDecoder()
    try:
        out = dec.feed(bytes(mutated))
    except ProtocolError:
        return
    # Otherwise: whole frames, possibly followed by an incomplete one the decoder waits on
    # (the length was changed upwards) -- within bounds.
    assert dec.buffered <= MAX_BUFFERED
    assert all(isinstance(f, FRAME_CLASSES) for f in out)
    if not any(isinstance(f, _wire.Error) for f in out):
        # Every frame but ERROR (whose text is decoded leniently) has exactly one encoding:
        # what was decoded re-encodes to the bytes consumed, and the rest is still buffered.
        consumed = b"".join(encode(f) for f in out)
        assert consumed == bytes(mutated[:len(consumed)])
        # The rest is an incomplete frame; its prefix may already have been parsed.
        assert len(mutated) - len(consumed) - dec.buffered in (0, FRAME_PREFIX_BYTES)


cuts_st = st.lists(st.integers(0, 1 << 16), max_size=12)


@fast
@given(data=streams, cuts=cuts_st)
def test_arbitrary_bytes_yield_frames_or_protocol_error(data: bytes, cuts: list[int]) -> None:
    check_arbitrary_bytes(data, cuts)


@fast
@given(data=st.binary(max_size=200), cuts=cuts_st)
def test_uniform_random_bytes_yield_frames_or_protocol_error(data: bytes,
                                                              cuts: list[int]) -> None:
    check_arbitrary_bytes(data, cuts)


@fast
@given(frame=frames, cuts=cuts_st)
def test_valid_frames_round_trip_exactly(frame: _wire.Frame, cuts: list[int]) -> None:
    check_round_trip(frame, cuts)


@fast
@given(frame=frames, index=st.integers(0, 1 << 16), flip=st.integers(1, 255))
def test_single_byte_mutation_gives_a_frame_or_protocol_error(frame: _wire.Frame, index: int,
                                                              flip: int) -> None:
    check_single_byte_mutation(frame, index, flip)


@pytest.mark.parametrize("index", range(FRAME_PREFIX_BYTES))
def test_prefix_mutations_of_a_header_never_escape_protocol_error(index: int) -> None:
    # Exhaustive over one prefix byte: cheap, and the prefix is what bounds memory.
    frame = _wire.Header(1, "k", Structure.DICT,
                         (TensorSpec(1, (2, 3), 4, "a"), TensorSpec(14, (), 1, "b")))
    for flip in range(1, 256):
        check_single_byte_mutation(frame, index, flip)


# -- slow variants: same properties, many more random examples ----------------------------------


@pytest.mark.slow
@pytest.mark.timeout(max(300, SLOW_EXAMPLES // 20))
@slow
@given(data=streams, cuts=cuts_st)
def test_slow_arbitrary_bytes_yield_frames_or_protocol_error(data: bytes,
                                                             cuts: list[int]) -> None:
    check_arbitrary_bytes(data, cuts)


@pytest.mark.slow
@pytest.mark.timeout(max(300, SLOW_EXAMPLES // 20))
@slow
@given(frame=frames, cuts=cuts_st)
def test_slow_valid_frames_round_trip_exactly(frame: _wire.Frame, cuts: list[int]) -> None:
    check_round_trip(frame, cuts)


@pytest.mark.slow
@pytest.mark.timeout(max(300, SLOW_EXAMPLES // 20))
@slow
@given(frame=frames, index=st.integers(0, 1 << 16), flip=st.integers(1, 255))
def test_slow_single_byte_mutation_gives_a_frame_or_protocol_error(
        frame: _wire.Frame, index: int, flip: int) -> None:
    check_single_byte_mutation(frame, index, flip)
