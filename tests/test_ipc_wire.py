"""The ipc plane's sans-I/O parts, on any machine: the signalling records' codec, the
consumer's ledger of what the producer announced, the staging ring's offsets, and the
handshake helpers' answers without CUDA."""

from __future__ import annotations

import asyncio
import functools
import struct
from collections import deque
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiokvpipe import ProtocolError, _cudaipc, _ipc_probe
from aiokvpipe._ipc_plane import IpcPlane, _Export, _Job, _Part
from aiokvpipe._ipc_probe import host_id, ipc_info, probe_opens
from aiokvpipe._ipc_records import (
    _COPY_ONE,
    _PIECE,
    IPC_HANDLE_BYTES,
    MAX_COPIES_IN_FLIGHT,
    MAX_PIECES,
    MAX_POOL_TENSORS,
    MAX_RECORD_BYTES,
    MAX_REGIONS,
    AckRecord,
    ConsumerLedger,
    CopyRecord,
    Piece,
    PoolPlace,
    PoolRecord,
    RecordDecoder,
    RegionRecord,
    RetireRecord,
    RingSpace,
    encode_record,
)
from aiokvpipe._wire import MAX_PAYLOAD_BYTES, TensorSpec

HANDLE = bytes(range(64))
OTHER = bytes(range(1, 65))

PRODUCER_SAMPLES = [
    RegionRecord(1, 2 << 20, HANDLE),
    RegionRecord((1 << 32) - 1, MAX_PAYLOAD_BYTES, OTHER),
    RetireRecord(7),
    CopyRecord((Piece(1, 0, 4096),), True),
    CopyRecord((Piece(1, 512, 1), Piece(2, 0, 1 << 30), Piece(1, 0, 7)), False),
    CopyRecord(tuple(Piece(i, i, i + 1) for i in range(MAX_PIECES)), True),
    PoolRecord(0, ()),  # a pool that travels staged
    PoolRecord(3, (PoolPlace(1, 0), PoolPlace(1, 1 << 28), PoolPlace((1 << 32) - 1, 7))),
    PoolRecord((1 << 32) - 1, tuple(PoolPlace(i, i) for i in range(MAX_POOL_TENSORS))),
]
CONSUMER_SAMPLES = [AckRecord(0), AckRecord(1), AckRecord((1 << 64) - 1)]


def rejected(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        RecordDecoder().feed(data)


# -- codec --------------------------------------------------------------------------------------


@pytest.mark.parametrize("rec", PRODUCER_SAMPLES, ids=lambda r: type(r).__name__)
def test_producer_record_round_trips_whole_and_byte_by_byte(rec: object) -> None:
    data = encode_record(rec)  # type: ignore[arg-type]
    assert RecordDecoder().feed(data) == [rec]
    dec = RecordDecoder()
    got = []
    for i in range(len(data)):
        got += dec.feed(data[i:i + 1])
        assert dec.buffered <= MAX_RECORD_BYTES
    assert got == [rec]
    assert dec.buffered == 0


@pytest.mark.parametrize("rec", CONSUMER_SAMPLES)
def test_ack_round_trips(rec: AckRecord) -> None:
    assert RecordDecoder().feed(encode_record(rec)) == [rec]
    dec, data, got = RecordDecoder(), encode_record(rec) * 2, []
    for i in range(len(data)):  # cut anywhere: each comes out once whole
        got += dec.feed(data[i:i + 1])
    assert got == [rec, rec] and dec.buffered == 0


def test_many_records_in_one_feed_come_out_in_order() -> None:
    data = b"".join(encode_record(r) for r in PRODUCER_SAMPLES)
    assert RecordDecoder().feed(data + data[:5]) == PRODUCER_SAMPLES


def test_both_ends_records_share_one_stream_in_order() -> None:
    # One connection carries a producer's records and its acks of the other direction.
    recs = [PRODUCER_SAMPLES[0], CONSUMER_SAMPLES[1], *PRODUCER_SAMPLES[1:3], CONSUMER_SAMPLES[2]]
    data = b"".join(encode_record(r) for r in recs)
    assert RecordDecoder().feed(data) == recs


def test_copy_record_layout_is_fixed() -> None:
    data = encode_record(CopyRecord((Piece(9, 4096, 100),), True))
    assert data == struct.pack(">BBH", 4, 1, 1) + struct.pack(">IQQ", 9, 4096, 100)
    # The producer's one-piece fast path writes that same layout in one pack.
    assert _COPY_ONE.pack(4, 1, 1, 9, 4096, 100) == data
    assert encode_record(AckRecord(5)) == b"\x05" + (5).to_bytes(8, "big")


def test_a_one_piece_send_is_described_as_the_general_encoder_would() -> None:
    """The producer's fast path (a message of one tensor in one exported allocation)
    announces the region once, before its first COPY, then writes one COPY record, last,
    naming region, offset and length: byte for byte what ``encode_record`` makes of them.
    (Its one struct with the arguments in another order would pass every other CPU test.)
    Run on a bare host object: ``_describe``'s fast path touches only these attributes."""
    host = SimpleNamespace(_inflight=deque(), _gated=deque(), _out=bytearray())
    host._emit = functools.partial(IpcPlane._emit, host)
    host._one = functools.partial(IpcPlane._one, host)
    host._take_one = functools.partial(IpcPlane._take_one, host)
    ex = _Export(7, 1234, 0x10000, 1 << 20, HANDLE)
    jobs = [_Job([_Part(0x10000 + off, n, ex, off)], None, None, None)  # type: ignore[arg-type]
            for off, n in ((4096, 8192), (0, 1 << 20))]
    ex.pending = len(jobs)
    for job in jobs:
        assert IpcPlane._describe(host, job)  # type: ignore[arg-type]
        assert job.index == 1 and job.offset == 0
    assert bytes(host._out) == b"".join([
        encode_record(RegionRecord(7, 1 << 20, HANDLE)),
        encode_record(CopyRecord((Piece(7, 4096, 8192),), True)),
        encode_record(CopyRecord((Piece(7, 0, 1 << 20),), True))])
    assert ex.announced and ex.pending == 0
    assert [(sent.ring_spans, sent.job) for sent in host._inflight] == [(0, j) for j in jobs]


def _bare_consumer() -> IpcPlane:
    """An IpcPlane with only what checking a note touches (the real one needs a GPU)."""
    plane = IpcPlane.__new__(IpcPlane)
    plane._error, plane._closing, plane._ledger = None, False, ConsumerLedger()
    plane._mappings, plane._copies, plane._targets, plane._waiting = {}, deque(), deque(), False
    plane._batch, plane._deferred = None, []
    return plane


SIXTEEN = (TensorSpec(0, (16,), 1),)  # uint8 × 16: the message the notes below arrive on


@pytest.mark.parametrize("note, match", [
    (b"", "a note of 0 bytes"),
    (_PIECE.pack(1, 0, 16) + b"\x00", "a note of 21 bytes"),
    (_PIECE.pack(1, 0, 0), "piece of 0 bytes"),
    (_PIECE.pack(1, MAX_PAYLOAD_BYTES, 1), "out of range"),
    # Its copy would be left over, and fill the next message's receive: never delivered
    # under another message's header, whatever its size.
    (_PIECE.pack(1, 0, 32), "a note of 32 bytes on a message of 16"),
    (_PIECE.pack(1, 0, 8), "a note of 8 bytes on a message of 16"),
    (_PIECE.pack(1, 0, 16), "unknown region 1"),  # never announced
], ids=["empty", "long", "empty-piece", "past-limit", "larger", "smaller", "unannounced"])
def test_a_bad_note_is_a_protocol_error_before_anything_is_posted(note: bytes, match: str
                                                                  ) -> None:
    plane = _bare_consumer()
    with pytest.raises(ProtocolError, match=match):
        plane.post_recv_noted(SIXTEEN, note)
    assert plane._ledger.in_flight == 0  # no copy was taken on


@pytest.mark.parametrize("data", [
    b"\x00", b"\x01", b"\x07", b"\xff",  # unknown record types
    struct.pack(">BBH", 4, 2, 1) + struct.pack(">IQQ", 1, 0, 1),  # flags beyond bit 0
    struct.pack(">BBH", 4, 0, 0),  # no pieces
    struct.pack(">BBH", 4, 0, MAX_PIECES + 1),  # too many, refused before buffering
    struct.pack(">BBH", 4, 0, 1) + struct.pack(">IQQ", 1, 0, 0),  # empty piece
    struct.pack(">BBH", 4, 0, 1) + struct.pack(">IQQ", 1, MAX_PAYLOAD_BYTES, 1),
    struct.pack(">BBH", 4, 0, 2) + struct.pack(">IQQ", 1, 0, MAX_PAYLOAD_BYTES)
    + struct.pack(">IQQ", 2, 0, 1),  # pieces beyond the payload limit together
    struct.pack(">BIQ", 2, 1, 0) + HANDLE,  # empty region
    struct.pack(">BIQ", 2, 1, MAX_PAYLOAD_BYTES + 1) + HANDLE,
    struct.pack(">BIH", 6, 0, MAX_POOL_TENSORS + 1),  # a pool of too many tensors
], ids=["type-0", "type-1", "type-7", "type-255", "flags",
        "no-pieces", "too-many-pieces", "empty-piece", "piece-past-limit", "sum-past-limit",
        "empty-region", "huge-region", "pool-too-many"])
def test_malformed_producer_records_are_protocol_errors(data: bytes) -> None:
    rejected(data)


def test_a_too_long_copy_is_refused_from_its_head_alone() -> None:
    # The count is checked before the body is awaited: nothing is buffered for it.
    rejected(struct.pack(">BBH", 4, 0, 0xFFFF))


def test_encoder_refuses_what_the_decoder_would() -> None:
    with pytest.raises(ValueError):
        encode_record(CopyRecord((), True))
    with pytest.raises(ValueError):
        encode_record(CopyRecord((Piece(1, 0, 0),), True))
    with pytest.raises(ValueError):
        encode_record(RegionRecord(1, 10, b"short"))
    with pytest.raises(ValueError):
        encode_record(RegionRecord(1, 0, HANDLE))
    with pytest.raises(ValueError):
        encode_record(PoolRecord(1, tuple(PoolPlace(1, 0)
                                          for _ in range(MAX_POOL_TENSORS + 1))))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_give_records_or_protocol_errors_only(chunks: list[bytes]) -> None:
    dec = RecordDecoder()
    try:
        for chunk in chunks:
            dec.feed(chunk)
            assert dec.buffered <= MAX_RECORD_BYTES
    except ProtocolError:
        pass


# -- the consumer's ledger ----------------------------------------------------------------------


def ledger() -> ConsumerLedger:
    led = ConsumerLedger()
    led.region(RegionRecord(1, 1000, HANDLE))
    return led


def test_ledger_accepts_a_well_formed_sequence() -> None:
    led = ledger()
    rec = CopyRecord((Piece(1, 0, 1000),), True)
    led.copy(rec)
    led.copied()
    led.copy(rec)
    led.retire(RetireRecord(1))
    led.region(RegionRecord(1, 10, OTHER))  # an id may come back once retired


@pytest.mark.parametrize(("step", "match"), [
    (lambda led: led.copy(CopyRecord((Piece(2, 0, 1),), True)), "unknown region"),
    (lambda led: led.copy(CopyRecord((Piece(1, 999, 2),), True)), "outside"),
    (lambda led: led.copy(CopyRecord((Piece(1, 1000, 1),), True)), "outside"),
    (lambda led: led.copy(CopyRecord((Piece(1, 0, 1), Piece(3, 0, 1)), True)), "unknown"),
    (lambda led: led.region(RegionRecord(1, 5, OTHER)), "twice"),
    (lambda led: led.retire(RetireRecord(9)), "unknown region"),
], ids=["unknown-region", "past-end", "at-end", "second-piece-unknown", "region-twice",
        "retire-unknown"])
def test_ledger_refuses_what_was_not_announced(step: object, match: str) -> None:
    led = ledger()
    with pytest.raises(ProtocolError, match=match):
        step(led)  # type: ignore[operator]


def test_ledger_places_a_pool_once_inside_announced_regions() -> None:
    led = ledger()
    led.pool(PoolRecord(0, (PoolPlace(1, 0), PoolPlace(1, 999))))
    led.pool(PoolRecord(1, ()))
    with pytest.raises(ProtocolError, match="twice"):
        led.pool(PoolRecord(0, ()))
    with pytest.raises(ProtocolError, match="unknown region"):
        led.pool(PoolRecord(2, (PoolPlace(2, 0),)))
    with pytest.raises(ProtocolError, match="outside"):
        led.pool(PoolRecord(3, (PoolPlace(1, 1000),)))


def test_ledger_bounds_the_copies_in_flight() -> None:
    led = ledger()
    rec = CopyRecord((Piece(1, 0, 1),), False)
    for _ in range(MAX_COPIES_IN_FLIGHT):
        led.copy(rec)
    with pytest.raises(ProtocolError, match="in flight"):
        led.copy(rec)
    led.copied()
    led.copy(rec)


def test_ledger_bounds_the_regions_mapped_at_once() -> None:
    led = ConsumerLedger()
    for i in range(MAX_REGIONS):
        led.region(RegionRecord(i, 1, HANDLE))
    with pytest.raises(ProtocolError, match="regions"):
        led.region(RegionRecord(MAX_REGIONS, 1, HANDLE))
    led.retire(RetireRecord(0))
    led.region(RegionRecord(MAX_REGIONS, 1, HANDLE))


# -- the staging ring's offsets -----------------------------------------------------------------


def test_ring_hands_out_aligned_spans_in_order_and_wraps() -> None:
    ring = RingSpace(4096, align=256)
    assert ring.alloc(1000) == (0, 1000)
    assert ring.alloc(1000) == (1024, 1000)
    assert ring.alloc(5000) == (2048, 2048)  # what is left up to the end
    assert ring.alloc(1) is None  # full
    ring.release()  # [0, 1000) free again
    assert ring.alloc(2000) == (0, 1024)  # wraps, up to the oldest span still in use
    assert ring.alloc(1) is None
    ring.release()
    ring.release()
    assert ring.alloc(100) == (1024, 100)
    ring.release()
    ring.release()
    assert ring.in_use == 0
    assert ring.alloc(4096) == (0, 4096)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.integers(1, 5000), st.none()), max_size=60))
def test_ring_spans_never_overlap(ops: list[int | None]) -> None:
    ring = RingSpace(8192, align=256)
    live: list[tuple[int, int]] = []
    for op in ops:
        if op is None:
            if live:
                ring.release()
                live.pop(0)
            continue
        got = ring.alloc(op)
        if got is None:
            continue
        start, length = got
        assert 0 < length <= op
        assert start % 256 == 0 and start + length <= 8192
        for s, n in live:
            assert start + length <= s or s + n <= start
        live.append((start, length))


# -- without CUDA -------------------------------------------------------------------------------


def test_host_id_names_this_boot() -> None:
    hid = host_id()
    assert len(hid) == 16
    assert hid == host_id()
    assert hid != bytes(16)  # Linux always has a boot id


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
def test_without_cuda_ipc_info_says_why_not() -> None:
    ok, why = ipc_info()
    assert not ok
    assert "cuda" in why.lower()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer without CUDA")
async def test_without_cuda_a_probe_does_not_open_and_raises_nothing() -> None:
    assert await probe_opens(HANDLE, torch.device("cuda", 0)) is False
    assert await probe_opens(b"short", torch.device("cuda", 0)) is False


async def test_the_plane_refuses_a_cpu_device() -> None:
    with pytest.raises(ValueError, match="CUDA"):
        await IpcPlane.start(torch.device("cpu"), lambda exc: None)
    assert IPC_HANDLE_BYTES == 64
    await asyncio.sleep(0)


async def test_the_probe_handle_is_made_in_a_thread_once_then_given_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Every handshake offers the probe handle, before its peer authenticated: only the
    first makes it (in a thread); the others start none. CUDA faked at its seam."""
    threads: list[str] = []
    in_thread = _ipc_probe.in_daemon_thread

    async def counted(fn: object, name: str) -> object:
        threads.append(name)
        return await in_thread(fn, name)  # type: ignore[arg-type]

    monkeypatch.setattr(_ipc_probe, "in_daemon_thread", counted)
    monkeypatch.setattr(_ipc_probe, "_probes", {})
    monkeypatch.setattr(_cudaipc, "malloc", lambda nbytes, index: 4096)
    monkeypatch.setattr(_cudaipc, "export_memory", lambda base: b"h" * 64)
    device = torch.device("cuda", 3)
    assert [await _ipc_probe.export_probe(device) for _ in range(3)] == [b"h" * 64] * 3
    assert threads == ["aiokvpipe-ipc"], threads
