"""The sans-I/O wire format: frames to bytes and back, and every way bytes can be malformed.

Nothing here opens a socket, starts a loop or imports torch: the decoder is fed byte strings
and we assert on the frames (or the :class:`ProtocolError`) that come out.
"""

from __future__ import annotations

import gc
import struct
import tracemalloc
from collections.abc import Sequence
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiokvpipe import ProtocolError, _wire
from aiokvpipe._protocol import offer_cost
from aiokvpipe._wire import (
    DTYPE_ITEMSIZE,
    FRAME_PREFIX_BYTES,
    MAGIC,
    MAX_BODY,
    MAX_HEADER_BODY,
    MAX_KEY_BYTES,
    MAX_NAME_BYTES,
    MAX_NDIM,
    MAX_OFFER_BLOCKS,
    MAX_PAYLOAD_BYTES,
    MAX_TENSORS,
    NCCL_UNIQUE_ID_BYTES,
    NONCE_BYTES,
    PROOF_BYTES,
    PROTOCOL_VERSION,
    SESSION_ID_BYTES,
    Accept,
    Attach,
    Auth,
    BlockData,
    Capabilities,
    Close,
    Credit,
    Direction,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    FrameType,
    Header,
    Heartbeat,
    Hello,
    Offer,
    OfferFailed,
    PoolInfo,
    Pull,
    Pulled,
    Ready,
    Retract,
    Signal,
    Structure,
    TensorSpec,
    Transport,
    encode,
    encode_header,
    message_cost,
)

# -- helpers ----------------------------------------------------------------------------------

NONCE = bytes(range(NONCE_BYTES))
PROOF = bytes(range(100, 100 + PROOF_BYTES))
SESSION = bytes(range(200, 200 + SESSION_ID_BYTES))
UUID = bytes(range(16, 32))
NCCL_IDS = (b"\x01" * NCCL_UNIQUE_ID_BYTES, bytes(range(NCCL_UNIQUE_ID_BYTES)))

F32, F16, U8, C128 = 1, 2, 14, 20  # wire dtype codes


def spec(code: int, shape: tuple[int, ...], name: str = "") -> TensorSpec:
    return TensorSpec(code, shape, DTYPE_ITEMSIZE[code], name)


def raw_frame(ftype: int, body: bytes, *, flags: int = 0, reserved: int = 0,
              length: int | None = None) -> bytes:
    """A frame built by hand, so that any field can be wrong."""
    declared = len(body) if length is None else length
    return struct.pack(">BBHI", ftype, flags, reserved, declared) + body


def decode_one(data: bytes) -> _wire.Frame:
    """Decode ``data`` fed in one piece; it must hold exactly one frame and nothing more."""
    dec = FrameDecoder()
    frames = dec.feed(data)
    assert dec.buffered == 0
    assert len(frames) == 1
    return frames[0]


def feed_bytewise(data: bytes) -> tuple[list[_wire.Frame], FrameDecoder]:
    dec = FrameDecoder()
    frames: list[_wire.Frame] = []
    for i in range(len(data)):
        frames += dec.feed(data[i:i + 1])
    return frames, dec


RawTensor = tuple[bytes, int, int | None, tuple[int, ...]]


def header_body(*, seq: int = 0, key: bytes | None = None, key_len: int | None = None,
                structure: int = Structure.LIST, count: int | None = None,
                tensors: Sequence[RawTensor] = (), credit: int = 0) -> bytes:
    """A HEADER body built field by field: tensors are ``(name, dtype, ndim, shape)``, with
    ``ndim=None`` meaning ``len(shape)``."""
    if key_len is None:
        key_len = 0xFFFF if key is None else len(key)
    specs = b""
    for name, code, ndim, shape in tensors:
        specs += struct.pack(">B", len(name)) + name
        specs += struct.pack(">BB", code, len(shape) if ndim is None else ndim)
        specs += struct.pack(f">{len(shape)}Q", *shape)
    out = struct.pack(">QQHBII", seq, credit, key_len, structure,
                      len(tensors) if count is None else count, len(specs))
    return out + specs + (key or b"")


def assert_rejected(data: bytes) -> None:
    """Feeding ``data`` raises ProtocolError -- and nothing else (pytest.raises lets any other
    exception type through, failing the test)."""
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(data)


# -- one sample of every frame type (and the interesting variants) ----------------------------

SAMPLE_FRAMES: dict[str, _wire.Frame] = {
    "hello-default": Hello(NONCE, Capabilities()),
    "hello-full": Hello(NONCE, Capabilities(Transport.NCCL, cuda=True, nccl=True,
                                            device_uuid=UUID, nccl_version=22_105,
                                            recv_buffer_bytes=(1 << 64) - 1,
                                            heartbeat_ms=(1 << 32) - 1)),
    "hello-ipc": Hello(NONCE, Capabilities(Transport.IPC, cuda=True, device_uuid=UUID,
                                           recv_buffer_bytes=1 << 20,
                                           host_id=bytes(range(200, 216)), ipc=True)),
    "hello-tcp": Hello(NONCE, Capabilities(Transport.TCP, cuda=True, nccl=False,
                                           recv_buffer_bytes=1 << 30)),
    "auth-empty": Auth(),
    "auth-proof": Auth(PROOF),
    "accept-tcp": Accept(PROOF, SESSION, Transport.TCP),
    "accept-tcp-noproof": Accept(b"", SESSION, Transport.TCP),
    "accept-nccl": Accept(PROOF, SESSION, Transport.NCCL, NCCL_IDS),
    "accept-ipc": Accept(PROOF, SESSION, Transport.IPC),
    "ready": Ready(),
    "attach-c2s": Attach(SESSION, Direction.CLIENT_TO_SERVER),
    "attach-s2c": Attach(SESSION, Direction.SERVER_TO_CLIENT),
    "error": Error(ErrorCode.AUTHENTICATION, "bad token ✗ (ünïcødé)"),
    "error-empty": Error(ErrorCode.PROTOCOL, ""),
    "header-none": Header(0, None, Structure.NONE),
    "header-none-keyed": Header(1, "req-1", Structure.NONE),
    "header-tensor": Header(2, "", Structure.TENSOR, (spec(F32, (3, 4)),)),
    "header-tensor-0d": Header(3, None, Structure.TENSOR, (spec(C128, ()),)),
    "header-list": Header(4, "kv/⚡/17", Structure.LIST,
                          (spec(F16, (2, 0, 5)), spec(U8, (7,)), spec(13, (1,) * MAX_NDIM))),
    "header-list-empty": Header(5, None, Structure.LIST),
    "header-dict": Header((1 << 64) - 1, "k" * MAX_KEY_BYTES, Structure.DICT,
                          (spec(3, (8, 128), "k"), spec(3, (8, 128), "v"),
                           spec(18, (1,), ""), spec(21, (2, 2), "ключ"))),
    "header-inline": Header(6, "req-2", Structure.DICT,
                            (spec(F32, (2, 3), "k"), spec(U8, (0,), "e"), spec(U8, (5,), "v")),
                            bytes(range(24)) + b"hello"),
    "header-inline-empty": Header(7, None, Structure.NONE, (), b""),
    "header-with-credit": Header(8, None, Structure.TENSOR, (spec(U8, (4,)),), None, 1 << 40),
    "header-inline-with-credit-max": Header(9, "r", Structure.TENSOR, (spec(U8, (2,)),),
                                            b"ab", (1 << 64) - 1),
    "header-noted": Header(10, "req-3", Structure.TENSOR, (spec(U8, (1 << 24,)),), None, 5,
                           bytes(range(20))),
    "header-noted-max": Header(11, None, Structure.LIST, (spec(F32, (2,)), spec(U8, (0,))),
                               note=b"\xff" * _wire.MAX_NOTE_BYTES),
    "credit-0": Credit(0),
    "credit-max": Credit((1 << 64) - 1),
    "heartbeat": Heartbeat(),
    "close": Close(7),
    "close-max": Close((1 << 64) - 1),
    "hello-ipc-probe": Hello(NONCE, Capabilities(Transport.AUTO, cuda=True, ipc=True,
                                                 host_id=bytes(range(16)),
                                                 ipc_probe=bytes(range(64)))),
    "pool": PoolInfo(3, b"layout bytes"),
    "pool-empty-max-id": PoolInfo((1 << 32) - 1, b""),
    "offer": Offer(0, 2, "req-17", (0, 5, 63), (7, 3, 3, 1 << 31)),
    "offer-unkeyed-no-blocks": Offer((1 << 64) - 1, 0, None, (1,), ()),
    "offer-failed": OfferFailed(9, "req-17", (0, 2), "block id 99 is outside the pool ✗"),
    "offer-failed-unkeyed-no-layers": OfferFailed((1 << 64) - 1, None, (), ""),
    "pull": Pull(4),
    "pull-refused": Pull(5, "pools do not fit: tensor 0 is bfloat16 here ✗"),
    "block-data": BlockData(6),
    "retract": Retract(7),
    "pulled": Pulled((1 << 64) - 1),
    "signal": Signal(b"\x05" + bytes(8)),
    "signal-max": Signal(bytes(range(256)) * (_wire.MAX_SIGNAL_BYTES // 256)),
}
SAMPLE_IDS = list(SAMPLE_FRAMES)
SAMPLES = list(SAMPLE_FRAMES.values())


def test_samples_cover_every_frame_type() -> None:
    kinds = {type(f) for f in SAMPLES}
    assert kinds == {Hello, Auth, Accept, Ready, Attach, Error, Header, Credit, Heartbeat, Close,
                     PoolInfo, Offer, OfferFailed, Pull, BlockData, Retract, Pulled, Signal}
    types = {_wire.decode_prefix(encode(f)[:FRAME_PREFIX_BYTES])[0] for f in SAMPLES}
    assert types == set(FrameType)


# -- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("frame", SAMPLES, ids=SAMPLE_IDS)
def test_frame_round_trips_in_one_feed(frame: _wire.Frame) -> None:
    data = encode(frame)
    assert decode_one(data) == frame
    assert encode(decode_one(data)) == data


@pytest.mark.parametrize("frame", SAMPLES, ids=SAMPLE_IDS)
def test_frame_round_trips_fed_one_byte_at_a_time(frame: _wire.Frame) -> None:
    data = encode(frame)
    dec = FrameDecoder()
    for i in range(len(data) - 1):
        assert dec.feed(data[i:i + 1]) == []
        assert dec.buffered <= max(FRAME_PREFIX_BYTES, len(data))
    assert dec.feed(data[-1:]) == [frame]
    assert dec.buffered == 0


@pytest.mark.parametrize("frame", SAMPLES, ids=SAMPLE_IDS)
def test_frame_prefix_declares_the_body_length(frame: _wire.Frame) -> None:
    data = encode(frame)
    ftype, length = _wire.decode_prefix(data[:FRAME_PREFIX_BYTES])
    assert length == len(data) - FRAME_PREFIX_BYTES
    assert length <= MAX_BODY[ftype]


def test_many_frames_in_one_stream_come_out_in_order() -> None:
    stream = b"".join(encode(f) for f in SAMPLES)
    assert FrameDecoder().feed(stream) == SAMPLES
    frames, dec = feed_bytewise(stream)
    assert frames == SAMPLES
    assert dec.buffered == 0


def test_stream_split_at_every_offset_decodes_the_same() -> None:
    frames = [SAMPLE_FRAMES["hello-full"], SAMPLE_FRAMES["header-dict"], Heartbeat(), Close(3)]
    stream = b"".join(encode(f) for f in frames)
    for cut in range(len(stream) + 1):
        dec = FrameDecoder()
        out = dec.feed(stream[:cut]) + dec.feed(stream[cut:])
        assert out == frames, cut
        assert dec.buffered == 0


@settings(max_examples=200, deadline=None)
@given(order=st.permutations(range(len(SAMPLES))), cuts=st.lists(st.integers(0, 4000),
                                                                  max_size=6),
       budget=st.integers(1, 40))
def test_a_budget_keeps_the_rest_for_later_and_loses_nothing(
        order: list[int], cuts: list[int], budget: int) -> None:
    frames = [SAMPLES[i] for i in order]
    stream = b"".join(encode(f) for f in frames)
    dec, out, pos = FrameDecoder(), [], 0
    for end in sorted({min(c, len(stream)) for c in cuts} | {len(stream)}):
        got = dec.feed(stream[pos:end], budget)
        pos = end
        while True:
            # Never more than the budget's worth (one frame at least) in one call.
            assert sum(_wire.frame_weight(*_wire.decode_prefix(encode(f)[:FRAME_PREFIX_BYTES]))
                       for f in got[:-1]) < budget
            out += got
            if not dec.backlogged:
                break
            got = dec.feed(b"", budget)
    assert out == frames
    assert dec.buffered == 0 and not dec.backlogged


def test_a_signal_frame_weighs_by_its_size() -> None:
    small, full = Signal(b"\x05" + bytes(8)), Signal(bytes(_wire.MAX_SIGNAL_BYTES))
    dec = FrameDecoder()
    assert len(dec.feed(encode(small) * 40, budget=8)) == 8  # one a message, as a header
    assert dec.feed(b"", budget=100) and not dec.backlogged
    assert len(dec.feed(encode(full) * 3, budget=17)) == 1  # 64 KiB weighs 17
    assert len(dec.feed(b"", budget=40)) == 2


def test_a_noted_header_weighs_a_header_and_the_signal_it_replaces() -> None:
    noted = encode(Header(0, None, Structure.TENSOR, (spec(U8, (16,)),), note=bytes(20)))
    dec = FrameDecoder()
    assert len(dec.feed(noted * 10, budget=8)) == 4  # a copy launched each: weight 2
    assert len(dec.feed(b"", budget=100)) == 6


def test_block_frames_weigh_more_than_message_headers() -> None:
    offers = [SAMPLE_FRAMES[k] for k in SAMPLE_FRAMES if isinstance(SAMPLE_FRAMES[k], Offer)]
    stream = b"".join(encode(offers[0]) for _ in range(40))
    dec = FrameDecoder()
    assert len(dec.feed(stream, 256)) == 16 and dec.backlogged
    headers = b"".join(encode(Credit(i + 1)) for i in range(300))
    assert len(FrameDecoder().feed(headers, 256)) == 256


def test_partial_frame_is_held_until_complete() -> None:
    data = encode(Credit(42))
    dec = FrameDecoder()
    assert dec.feed(data[:5]) == []
    assert dec.buffered == 5
    assert dec.feed(data[5:-1]) == []
    assert dec.feed(data[-1:] + data[:3]) == [Credit(42)]
    assert dec.buffered == 3  # the start of the next frame is kept


def test_key_none_and_empty_key_are_distinct_on_the_wire() -> None:
    unkeyed = encode(Header(9, None, Structure.NONE))
    empty = encode(Header(9, "", Structure.NONE))
    assert unkeyed != empty
    a, b = decode_one(unkeyed), decode_one(empty)
    assert isinstance(a, Header) and isinstance(b, Header)
    assert a.key is None
    assert b.key == ""


def test_header_at_every_limit_round_trips_within_max_header_body() -> None:
    tensors = tuple(spec(U8, (1,) * MAX_NDIM, f"{i:0{MAX_NAME_BYTES}d}")
                    for i in range(MAX_TENSORS))
    h = Header((1 << 64) - 1, "é" * (MAX_KEY_BYTES // 2), Structure.DICT, tensors)
    data = encode(h)
    assert len(data) - FRAME_PREFIX_BYTES == MAX_HEADER_BODY
    assert MAX_HEADER_BODY < 1 << 32  # the prefix can declare it
    assert decode_one(data) == h


def test_header_of_exactly_the_payload_limit_is_accepted() -> None:
    h = Header(0, None, Structure.LIST, (spec(U8, (MAX_PAYLOAD_BYTES,)),))
    got = decode_one(encode(h))
    assert got == h
    assert isinstance(got, Header) and got.nbytes == MAX_PAYLOAD_BYTES


def test_recurring_specs_are_decoded_from_the_cache_with_the_rest_fresh() -> None:
    # A receiver remembers specs by their bytes; everything else in the header is read anew.
    dec = FrameDecoder()
    specs = (spec(F16, (2, 3), "k"), spec(F16, (2, 3), "v"))
    first = Header(0, "a", Structure.DICT, specs, bytes(24), credit=5)
    second = Header(1, None, Structure.DICT, specs, bytes(range(24)), credit=0)
    got = dec.feed(encode(first) + encode(second))
    assert got == [first, second]
    assert got[0].tensors is got[1].tensors  # the second came from the cache
    # The same specs under another structure are not the same run of bytes.
    assert dec.feed(encode(Header(2, None, Structure.LIST, (spec(F16, (2, 3)),) * 2))) == [
        Header(2, None, Structure.LIST, (spec(F16, (2, 3)),) * 2)]


def test_the_specs_cache_is_bounded_and_caches_only_small_runs() -> None:
    dec = FrameDecoder()
    for i in range(3 * _wire._CACHED_SPECS):
        h = Header(i, None, Structure.TENSOR, (spec(U8, (i + 1,)),))
        assert dec.feed(encode(h)) == [h]
        assert len(dec._specs_cache) <= _wire._CACHED_SPECS
    dec._specs_cache.clear()
    big = Header(0, None, Structure.LIST, tuple(spec(U8, (j,)) for j in range(200)))
    assert dec.feed(encode(big)) == [big]
    assert not dec._specs_cache


def test_a_writable_buffer_decodes_like_bytes() -> None:
    h = Header(3, "k", Structure.TENSOR, (spec(F32, (2,)),), bytes(8), credit=9)
    assert FrameDecoder().feed(bytearray(encode(h))) == [h]
    assert FrameDecoder().feed(memoryview(bytearray(encode(h)))) == [h]
    dec = FrameDecoder()  # and uses the specs cache as bytes do
    got = dec.feed(bytearray(encode(h) + encode(replace(h, seq=4))))
    assert got[0].tensors is got[1].tensors


def test_the_specs_cache_never_hashes_the_bytes_a_frame_arrived_in() -> None:
    # Hashing a memoryview hashes the whole object it views first: looking the specs up by a
    # view of a read hashed the read (19 µs for 64 KiB, once per read on a busy pipe).
    hashed: list[int] = []

    class Read(bytes):
        def __hash__(self) -> int:
            hashed.append(len(self))
            return super().__hash__()

    h = Header(0, None, Structure.TENSOR, (spec(U8, (4096,)),), bytes(4096))
    frames = [replace(h, seq=i) for i in range(16)]
    dec = FrameDecoder()
    assert dec.feed(Read(b"".join(encode(f) for f in frames))) == frames
    assert dec.feed(Read(encode(replace(h, seq=16)))) == [replace(h, seq=16)]
    assert hashed == []
    assert len(dec._specs_cache) == 1


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_header_whose_specs_length_lies_is_rejected(delta: int) -> None:
    body = header_body(structure=Structure.TENSOR, tensors=[(b"", F32, None, (3,))])
    specs_len = struct.unpack_from(">I", body, 23)[0]
    lying = body[:23] + struct.pack(">I", specs_len + delta) + body[27:]
    assert_rejected(raw_frame(FrameType.HEADER, lying))


def test_decoded_tensor_specs_carry_the_itemsize_of_their_dtype() -> None:
    for code, itemsize in DTYPE_ITEMSIZE.items():
        body = header_body(structure=Structure.TENSOR, tensors=[(b"", code, None, (3, 5))])
        h = decode_one(raw_frame(FrameType.HEADER, body))
        assert isinstance(h, Header)
        assert h.tensors[0].itemsize == itemsize
        assert h.nbytes == 15 * itemsize


def test_error_text_longer_than_the_limit_is_truncated_to_fit_the_frame() -> None:
    e = Error(ErrorCode.INTERNAL, "é" * _wire.MAX_ERROR_TEXT_BYTES)  # 2 bytes per char
    assert len(e.text.encode()) <= _wire.MAX_ERROR_TEXT_BYTES
    assert decode_one(encode(e)) == e


def test_error_frame_with_unknown_code_decodes_as_internal() -> None:
    got = decode_one(raw_frame(FrameType.ERROR, struct.pack(">H", 999) + b"boom"))
    assert got == Error(ErrorCode.INTERNAL, "boom")


# -- the frame prefix -------------------------------------------------------------------------


@pytest.mark.parametrize("ftype", [0, 7, 8, 15, 20, 127, 255])
def test_unknown_frame_type_is_rejected(ftype: int) -> None:
    assert_rejected(raw_frame(ftype, b""))


@pytest.mark.parametrize(("flags", "reserved"), [(1, 0), (0x80, 0), (0, 1), (0, 0x8000),
                                                  (0xFF, 0xFFFF)])
def test_reserved_prefix_bits_are_rejected(flags: int, reserved: int) -> None:
    assert_rejected(raw_frame(FrameType.HEARTBEAT, b"", flags=flags, reserved=reserved))
    assert_rejected(raw_frame(FrameType.CREDIT, bytes(8), flags=flags, reserved=reserved))


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
@pytest.mark.parametrize("excess", [1, None], ids=["limit+1", "u32-max"])
def test_oversize_body_is_rejected_from_the_prefix_alone(ftype: FrameType,
                                                         excess: int | None) -> None:
    length = 0xFFFF_FFFF if excess is None else MAX_BODY[ftype] + excess
    prefix = raw_frame(ftype, b"", length=length)
    dec = FrameDecoder()
    with pytest.raises(ProtocolError):
        dec.feed(prefix)  # no body byte has arrived yet
    assert dec.buffered <= FRAME_PREFIX_BYTES


def test_oversize_header_prefix_rejected_before_any_body_is_buffered() -> None:
    dec = FrameDecoder()
    prefix = raw_frame(FrameType.HEADER, b"", length=MAX_HEADER_BODY + 1)
    for b in prefix[:-1]:
        assert dec.feed(bytes([b])) == []
    with pytest.raises(ProtocolError):
        dec.feed(prefix[-1:])
    assert dec.buffered <= FRAME_PREFIX_BYTES


def test_decode_prefix_rejects_a_short_prefix() -> None:
    with pytest.raises(ProtocolError):
        _wire.decode_prefix(encode(Heartbeat())[:-1])


# -- HELLO ------------------------------------------------------------------------------------


def hello_body(*, magic: bytes = MAGIC, version: int = PROTOCOL_VERSION, transport: int = 0,
               cuda: int = 0, nccl: int = 0) -> bytes:
    """A valid HELLO body with single fields overwritten (layout: magic, u16 version, nonce,
    then the capabilities starting with u8 transport, u8 cuda, u8 nccl)."""
    body = bytearray(encode(Hello(NONCE, Capabilities(device_uuid=UUID)))[FRAME_PREFIX_BYTES:])
    body[0:4] = magic
    body[4:6] = struct.pack(">H", version)
    caps = 6 + NONCE_BYTES
    body[caps:caps + 3] = bytes([transport, cuda, nccl])
    return bytes(body)


def test_hand_built_hello_body_is_valid() -> None:  # so the cases below fail for one reason
    assert decode_one(raw_frame(FrameType.HELLO, hello_body())) == Hello(
        NONCE, Capabilities(device_uuid=UUID))


@pytest.mark.parametrize("magic", [b"HTTP", b"akvp", b"\0\0\0\0", b"AKVQ"])
def test_bad_magic_is_rejected(magic: bytes) -> None:
    assert_rejected(raw_frame(FrameType.HELLO, hello_body(magic=magic)))


@pytest.mark.parametrize("version", [0, PROTOCOL_VERSION + 1, 0xFFFF])
def test_other_protocol_version_is_rejected(version: int) -> None:
    assert_rejected(raw_frame(FrameType.HELLO, hello_body(version=version)))
    assert_rejected(encode(Hello(NONCE, Capabilities(), version=version)))


@pytest.mark.parametrize(("cuda", "nccl"), [(2, 0), (0, 2), (255, 1), (1, 0x80)])
def test_non_boolean_capability_flags_are_rejected(cuda: int, nccl: int) -> None:
    assert_rejected(raw_frame(FrameType.HELLO, hello_body(cuda=cuda, nccl=nccl)))


@pytest.mark.parametrize("transport", [4, 255])
def test_unknown_transport_preference_is_rejected(transport: int) -> None:
    assert_rejected(raw_frame(FrameType.HELLO, hello_body(transport=transport)))


def test_ipc_preference_host_id_and_flag_travel_in_hello() -> None:
    host = bytes(range(100, 116))
    probe = bytes(range(64))
    caps = Capabilities(Transport.IPC, cuda=True, host_id=host, ipc=True, ipc_probe=probe)
    body = encode(Hello(NONCE, caps))[FRAME_PREFIX_BYTES:]
    # The ipc fields close the capabilities: host id, the ipc flag, the probe handle.
    assert body[-81:] == host + b"\x01" + probe
    assert decode_one(encode(Hello(NONCE, caps))).caps == caps


@pytest.mark.parametrize("flag", [2, 0x80, 255])
def test_non_boolean_ipc_flag_is_rejected(flag: int) -> None:
    body = bytearray(hello_body())
    body[-65] = flag  # the ipc flag, before the 64-byte probe handle
    assert_rejected(raw_frame(FrameType.HELLO, bytes(body)))


@pytest.mark.parametrize("n", [0, 15, 17])
def test_host_id_of_wrong_length_is_refused_when_built(n: int) -> None:
    with pytest.raises(ProtocolError):
        Capabilities(host_id=bytes(n))


# -- AUTH, ACCEPT, ATTACH -----------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 16, PROOF_BYTES - 1])
def test_auth_proof_of_wrong_length_is_rejected(n: int) -> None:
    assert_rejected(raw_frame(FrameType.AUTH, bytes(n)))


def accept_body(proof: bytes = PROOF, transport: int = Transport.TCP, ids: bytes = b"",
                proof_len: int | None = None) -> bytes:
    n = len(proof) if proof_len is None else proof_len
    return bytes([n]) + proof + SESSION + bytes([transport]) + ids


def test_hand_built_accept_body_is_valid() -> None:
    assert decode_one(raw_frame(FrameType.ACCEPT, accept_body())) == SAMPLE_FRAMES["accept-tcp"]


@pytest.mark.parametrize("body", [
    accept_body(transport=Transport.AUTO),
    accept_body(transport=4),
    accept_body(transport=Transport.NCCL),  # NCCL without its ids
    accept_body(transport=Transport.TCP, ids=b"".join(NCCL_IDS)),  # TCP with ids
    accept_body(proof=bytes(5)),
    accept_body(proof_len=PROOF_BYTES + 1),  # proof length runs past the body's fields
], ids=["auto", "unknown-transport", "nccl-without-ids", "tcp-with-ids", "short-proof",
        "proof-len-overruns"])
def test_invalid_accept_is_rejected(body: bytes) -> None:
    assert_rejected(raw_frame(FrameType.ACCEPT, body))


@pytest.mark.parametrize("direction", [2, 255])
def test_attach_with_unknown_direction_is_rejected(direction: int) -> None:
    assert_rejected(raw_frame(FrameType.ATTACH, SESSION + bytes([direction])))


# -- truncation and trailing bytes ------------------------------------------------------------

# Bodies whose length is not implied by the frame length: every strict prefix is malformed.
FIXED_LAYOUT = [(k, f) for k, f in SAMPLE_FRAMES.items()
                if not isinstance(f, (Auth, Error, Signal))]  # (a signal's bytes are the plane's)


def test_a_signal_frame_carries_1_to_max_bytes() -> None:
    assert FrameDecoder().feed(raw_frame(FrameType.SIGNAL, b"\x01")) == [Signal(b"\x01")]
    with pytest.raises(ProtocolError, match="empty SIGNAL"):
        FrameDecoder().feed(raw_frame(FrameType.SIGNAL, b""))
    with pytest.raises(ProtocolError, match="exceeds"):
        FrameDecoder().feed(raw_frame(FrameType.SIGNAL, bytes(_wire.MAX_SIGNAL_BYTES + 1)))
    for n in (0, _wire.MAX_SIGNAL_BYTES + 1):
        with pytest.raises(ValueError):
            _wire.encode_signal(bytes(n))


@pytest.mark.parametrize("frame", [f for _, f in FIXED_LAYOUT], ids=[k for k, _ in FIXED_LAYOUT])
def test_truncated_body_is_rejected_at_every_length(frame: _wire.Frame) -> None:
    body = encode(frame)[FRAME_PREFIX_BYTES:]
    ftype = _wire.decode_prefix(encode(frame)[:FRAME_PREFIX_BYTES])[0]
    for n in range(len(body)):
        with pytest.raises(ProtocolError):
            FrameDecoder().feed(raw_frame(ftype, body[:n]))


def test_truncated_auth_proof_is_rejected() -> None:
    for n in range(1, PROOF_BYTES):
        assert_rejected(raw_frame(FrameType.AUTH, PROOF[:n]))


@pytest.mark.parametrize("n", [0, 1])
def test_error_frame_too_short_for_its_code_is_rejected(n: int) -> None:
    assert_rejected(raw_frame(FrameType.ERROR, b"\x00" * n))


# (A signal's body is opaque: every byte of it is the plane's.)
NOT_ERROR = [(k, f) for k, f in SAMPLE_FRAMES.items() if not isinstance(f, (Error, Signal))]


@pytest.mark.parametrize("frame", [f for _, f in NOT_ERROR], ids=[k for k, _ in NOT_ERROR])
@pytest.mark.parametrize("extra", [b"\x00", b"\x01\x02\x03"])
def test_stray_trailing_bytes_in_a_body_are_rejected(frame: _wire.Frame, extra: bytes) -> None:
    data = encode(frame)
    ftype = _wire.decode_prefix(data[:FRAME_PREFIX_BYTES])[0]
    assert_rejected(raw_frame(ftype, data[FRAME_PREFIX_BYTES:] + extra))


# -- HEADER -----------------------------------------------------------------------------------


def test_hand_built_header_body_is_valid() -> None:
    body = header_body(seq=5, key=b"abc", structure=Structure.DICT,
                       tensors=[(b"x", F32, None, (2, 3)), (b"y", U8, None, ())])
    assert decode_one(raw_frame(FrameType.HEADER, body)) == Header(
        5, "abc", Structure.DICT, (spec(F32, (2, 3), "x"), spec(U8, (), "y")))


@pytest.mark.parametrize("key", [b"\xff", b"\xc3", b"ok\xed\xa0\x80", b"\x80abc"])
def test_invalid_utf8_key_is_rejected(key: bytes) -> None:
    assert_rejected(raw_frame(FrameType.HEADER, header_body(key=key)))


def test_invalid_utf8_dict_name_is_rejected() -> None:
    body = header_body(structure=Structure.DICT, tensors=[(b"\xfe\xff", F32, None, (1,))])
    assert_rejected(raw_frame(FrameType.HEADER, body))


def test_key_longer_than_the_limit_is_rejected() -> None:
    key = b"k" * (MAX_KEY_BYTES + 1)
    assert_rejected(raw_frame(FrameType.HEADER, header_body(key=key)))


def test_key_length_overrunning_the_body_is_rejected() -> None:
    assert_rejected(raw_frame(FrameType.HEADER, header_body(key=b"abc", key_len=500)))


@pytest.mark.parametrize("structure", [Structure.LIST, Structure.DICT])
def test_too_many_tensors_is_rejected(structure: Structure) -> None:
    # Every tensor is present and valid (0-d, distinct names): only the count is wrong.
    tensors = [(f"{i}".encode() if structure == Structure.DICT else b"", U8, None, ())
               for i in range(MAX_TENSORS + 1)]
    ok = decode_one(raw_frame(FrameType.HEADER, header_body(structure=structure,
                                                           tensors=tensors[:-1])))
    assert isinstance(ok, Header) and len(ok.tensors) == MAX_TENSORS
    too_many = header_body(structure=structure, tensors=tensors)
    assert_rejected(raw_frame(FrameType.HEADER, too_many))


def test_huge_tensor_count_is_rejected_without_tensors_to_read() -> None:
    assert_rejected(raw_frame(FrameType.HEADER, header_body(count=0xFFFF_FFFF)))


def test_tensor_count_beyond_the_tensors_present_is_rejected() -> None:
    body = header_body(count=3, tensors=[(b"", F32, None, (1,))])
    assert_rejected(raw_frame(FrameType.HEADER, body))


@pytest.mark.parametrize("ndim", [MAX_NDIM + 1, 255])
def test_too_many_dimensions_is_rejected(ndim: int) -> None:
    body = header_body(tensors=[(b"", U8, ndim, (1,) * ndim)])
    assert_rejected(raw_frame(FrameType.HEADER, body))


@pytest.mark.parametrize("code", [0, max(DTYPE_ITEMSIZE) + 1, 100, 255])
def test_unknown_dtype_code_is_rejected(code: int) -> None:
    body = header_body(tensors=[(b"", code, None, (4,))])
    assert_rejected(raw_frame(FrameType.HEADER, body))


@pytest.mark.parametrize("tensors", [
    [(b"", U8, None, (MAX_PAYLOAD_BYTES + 1,))],
    [(b"", F32, None, (MAX_PAYLOAD_BYTES // 4 + 1,))],  # elements fit, bytes do not
    [(b"", F32, None, (1 << 40, 1 << 40))],
    [(b"", C128, None, (1 << 20,) * 3)],
    [(b"", U8, None, ((1 << 64) - 1,))],
    [(b"", U8, None, ((1 << 64) - 1, (1 << 64) - 1, 0))],
    [(b"", U8, None, (0, (1 << 64) - 1))],
    [(b"", U8, None, (1 << 47,)), (b"", U8, None, (1 << 47,)), (b"", U8, None, (1,))],
], ids=["dim-over", "bytes-over", "product", "3d-complex", "u64-max-dim", "u64-max-with-zero",
        "zero-then-u64-max", "sum-over"])
def test_shapes_beyond_the_payload_limit_are_rejected(tensors: list[RawTensor]) -> None:
    body = header_body(structure=Structure.LIST, tensors=tensors)
    assert_rejected(raw_frame(FrameType.HEADER, body))


@pytest.mark.parametrize("shape", [(0, 1 << 40, 1 << 40), (1 << 40, 1 << 40, 0),
                                   (0, 1 << 48, 1 << 48)])
def test_zero_sized_tensor_cannot_hide_huge_dimensions(shape: tuple[int, ...]) -> None:
    # Zero elements, but the receiver allocates ``torch.empty(shape)`` and torch computes strides
    # from the other dimensions: 2**80 overflows int64 ("Stride calculation overflowed"), a
    # RuntimeError instead of a ProtocolError. The product of the non-zero dimensions must be
    # bounded just like a real payload.
    body = header_body(structure=Structure.TENSOR, tensors=[(b"", U8, None, shape)])
    assert_rejected(raw_frame(FrameType.HEADER, body))


@pytest.mark.parametrize("shape", [(1 << 25, 1 << 25, 0), (1 << 30, 0, 1 << 30),
                                   (7, 1 << 47, 3, 0)])
def test_acceptance_of_a_shape_does_not_depend_on_the_order_of_its_dimensions(
        shape: tuple[int, ...]) -> None:
    # All of these are zero-byte tensors. The decoder rejects them when the zero comes last and
    # accepts them when it comes first; one peer's legitimate empty tensor then breaks the pipe.
    outcomes = set()
    for order in (shape, tuple(reversed(shape)), tuple(sorted(shape))):
        body = header_body(structure=Structure.TENSOR, tensors=[(b"", F32, None, order)])
        try:
            decode_one(raw_frame(FrameType.HEADER, body))
            outcomes.add("accepted")
        except ProtocolError:
            outcomes.add("rejected")
    assert len(outcomes) == 1, f"{shape}: order decides ({outcomes})"


def test_duplicate_dict_names_are_rejected() -> None:
    body = header_body(structure=Structure.DICT,
                       tensors=[(b"k", F32, None, (1,)), (b"v", F32, None, (1,)),
                                (b"k", F32, None, (2,))])
    assert_rejected(raw_frame(FrameType.HEADER, body))


def test_duplicate_empty_dict_names_are_rejected() -> None:
    body = header_body(structure=Structure.DICT,
                       tensors=[(b"", F32, None, (1,)), (b"", F32, None, (1,))])
    assert_rejected(raw_frame(FrameType.HEADER, body))


@pytest.mark.parametrize("structure", [Structure.TENSOR, Structure.LIST])
def test_tensor_names_outside_dict_messages_are_rejected(structure: Structure) -> None:
    body = header_body(structure=structure, tensors=[(b"name", F32, None, (1,))])
    assert_rejected(raw_frame(FrameType.HEADER, body))


@pytest.mark.parametrize(("structure", "count"), [
    (Structure.NONE, 1), (Structure.NONE, 2), (Structure.TENSOR, 0), (Structure.TENSOR, 2)])
def test_structure_and_tensor_count_must_agree(structure: Structure, count: int) -> None:
    tensors = [(b"", F32, None, (1,))] * count
    assert_rejected(raw_frame(FrameType.HEADER, header_body(structure=structure, tensors=tensors)))


@pytest.mark.parametrize("structure", [4, 255])
def test_unknown_structure_is_rejected(structure: int) -> None:
    assert_rejected(raw_frame(FrameType.HEADER, header_body(structure=structure)))


# -- credits ----------------------------------------------------------------------------------


def test_message_cost_is_positive_even_for_an_empty_message() -> None:
    assert message_cost(0, ()) > 0  # a flood of None messages still consumes credits


def test_message_cost_covers_the_payload() -> None:
    spec = TensorSpec(1, (4,), 4)
    for payload, tensors in [(0, 0), (1, 1), (4096, 3), (MAX_PAYLOAD_BYTES, MAX_TENSORS)]:
        assert message_cost(payload, [spec] * tensors) >= payload


def test_message_cost_is_strictly_increasing_in_payload_tensors_dimensions_and_names() -> None:
    payloads = [0, 1, 2, 255, 256, 4096, 1 << 20, MAX_PAYLOAD_BYTES]
    counts = [0, 1, 2, 64, MAX_TENSORS]
    spec = TensorSpec(1, (4,), 4)
    for t in counts:
        costs = [message_cost(p, [spec] * t) for p in payloads]
        assert costs == sorted(costs) and len(set(costs)) == len(costs)
    for p in payloads:
        costs = [message_cost(p, [spec] * t) for t in counts]
        assert costs == sorted(costs) and len(set(costs)) == len(costs)
    costs = [message_cost(0, [TensorSpec(1, (1,) * n, 4)]) for n in range(1, MAX_NDIM + 1)]
    assert costs == sorted(costs) and len(set(costs)) == len(costs)
    assert message_cost(0, [TensorSpec(1, (1,), 4, "k" * 100)]) > message_cost(
        0, [TensorSpec(1, (1,), 4, "k")])


def decoded(data: bytes) -> tuple[list[Frame], int]:
    """The frames of ``data``, and the bytes of memory they hold (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        frames = FrameDecoder().feed(data)
        return frames, tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


def shape_of(i: int, ndim: int) -> tuple[int, ...]:
    """A shape of no elements whose first few sizes are ints Python does not cache."""
    big = (0, *(300 + i + j for j in range(min(ndim, 4) - 1)))
    return big + (1,) * (ndim - len(big))


def test_a_header_of_many_specs_costs_at_least_what_it_holds_decoded() -> None:
    # The credits a header holds bound what it makes the receiver hold until recv(): its
    # specs as decoded, dimensions and names included (a flat 64 bytes a spec was a
    # seventh of it for specs of 32 dimensions).
    for ndim, name in [(1, ""), (4, ""), (MAX_NDIM, ""), (4, "n" * 200)]:
        specs = tuple(TensorSpec(1, shape_of(i, ndim), 4, f"{name}{i}" if name else "")
                      for i in range(1024))
        frames, held = decoded(encode_header(
            0, None, Structure.DICT if name else Structure.LIST, specs, inline=True))
        assert frames[0].cost >= held, (ndim, len(name), frames[0].cost, held)


def test_an_offer_costs_at_least_what_its_ids_hold_decoded() -> None:
    # The receiver holds an offer's ids (a tuple of ints) until it answers: 4 credit bytes
    # an id were a ninth of that.
    ids = tuple(range(1000, 1000 + MAX_OFFER_BLOCKS))
    frames, held = decoded(encode(Offer(0, 0, "k", tuple(range(64)), ids)))
    assert offer_cost(len(ids), 64) >= held, (offer_cost(len(ids), 64), held)
    assert frames[0].ids == ids



# -- notes (a data plane's description of the payload, in the header) ------------------------


def _noted_body(note_len: int, note: bytes) -> bytes:
    plain = encode(Header(0, None, Structure.TENSOR, (spec(U8, (10,)),)))[FRAME_PREFIX_BYTES:]
    return plain + bytes([note_len]) + note


@pytest.mark.parametrize("note_len, note, match", [
    (0, b"", "note of 0 bytes"),
    (_wire.MAX_NOTE_BYTES + 1, bytes(_wire.MAX_NOTE_BYTES + 1), "note of 65 bytes"),
    (20, bytes(19), "truncated HEADER_NOTED"),
    (20, bytes(21), "stray bytes in HEADER_NOTED"),
    (None, b"", "truncated HEADER_NOTED"),  # no length byte at all
], ids=["empty", "too-long", "short", "long", "missing"])
def test_a_malformed_note_is_a_protocol_error(note_len: int | None, note: bytes,
                                              match: str) -> None:
    body = (_noted_body(note_len, note) if note_len is not None
            else _noted_body(0, b"")[:-1])
    with pytest.raises(ProtocolError, match=match):
        decode_one(raw_frame(FrameType.HEADER_NOTED, body))


def test_a_note_longer_than_the_limit_is_refused_from_the_prefix() -> None:
    # The frame's declared length alone exceeds what a noted header may hold.
    too_long = _wire.MAX_BODY[FrameType.HEADER_NOTED] + 1
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">BBHI", FrameType.HEADER_NOTED, 0, 0, too_long))


@pytest.mark.parametrize("note", [b"", bytes(_wire.MAX_NOTE_BYTES + 1)], ids=["empty", "long"])
def test_encoder_refuses_a_note_the_decoder_would(note: bytes) -> None:
    with pytest.raises(ValueError, match="note"):
        encode(Header(0, None, Structure.TENSOR, (spec(U8, (4,)),), note=note))


def test_an_inline_message_carries_no_note() -> None:
    with pytest.raises(ValueError, match="no note"):
        encode(Header(0, None, Structure.TENSOR, (spec(U8, (2,)),), b"ab", note=b"x"))
    with pytest.raises(ValueError, match="no note"):
        _wire.encode_header(0, None, Structure.TENSOR, (spec(U8, (2,)),), inline=True,
                            note=b"x")


# -- inline payloads ---------------------------------------------------------------------------


def _inline_body(specs: tuple[_wire.TensorSpec, ...], payload: bytes) -> bytes:
    """A HEADER_INLINE body built from a plain HEADER encoding plus raw payload bytes."""
    plain = encode(Header(0, None, Structure.LIST, specs))[FRAME_PREFIX_BYTES:]
    return plain + payload


def test_inline_payload_shorter_than_its_specs_is_truncation() -> None:
    body = _inline_body((spec(U8, (10,)),), b"\x01" * 9)
    with pytest.raises(ProtocolError, match="truncated"):
        decode_one(raw_frame(FrameType.HEADER_INLINE, body))


def test_inline_payload_longer_than_its_specs_is_stray_bytes() -> None:
    body = _inline_body((spec(U8, (10,)),), b"\x01" * 11)
    with pytest.raises(ProtocolError, match="stray"):
        decode_one(raw_frame(FrameType.HEADER_INLINE, body))


def test_inline_payload_beyond_the_inline_limit_is_refused() -> None:
    big = _wire.MAX_INLINE_PAYLOAD + 1
    body = _inline_body((spec(U8, (big,)),), bytes(big))
    with pytest.raises(ProtocolError, match="inline"):
        decode_one(raw_frame(FrameType.HEADER_INLINE, body))


def test_encoder_refuses_an_inline_payload_that_does_not_match_the_specs() -> None:
    with pytest.raises(ValueError):
        encode(Header(0, None, Structure.TENSOR, (spec(U8, (4,)),), b"abc"))

