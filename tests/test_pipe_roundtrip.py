"""Round trips through a real pipe (127.0.0.1 sockets, both event loops): every dtype, every
message structure, sizes from 0-d to 64 MiB, and bad arguments that must not hurt the pipe."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

import aiokvpipe
from aiokvpipe._dtypes import CODE_OF

Pair = tuple[aiokvpipe.Pipe, aiokvpipe.Pipe]
MiB = 1 << 20


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns of any dtype (NaNs and all); bools get valid 0/1 bytes."""
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for d in shape:
        numel *= d
    high = 2 if dtype == torch.bool else 256
    raw = torch.randint(0, high, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The bytes ``t`` reads as, in row-major order (works for every dtype, float8 included)."""
    t = t.resolve_conj().resolve_neg().contiguous()
    if t.dim() == 0:
        t = t.reshape(1)
    return t.reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same_tensor(sent: torch.Tensor, got: torch.Tensor, where: str = "") -> None:
    assert isinstance(got, torch.Tensor), f"{where}: got {type(got).__name__}"
    assert got.dtype == sent.dtype, f"{where}: dtype {got.dtype} != {sent.dtype}"
    assert got.shape == sent.shape, f"{where}: shape {tuple(got.shape)} != {tuple(sent.shape)}"
    assert got.device.type == "cpu", where
    assert raw_bytes(got) == raw_bytes(sent), f"{where}: values differ"


def assert_same_message(sent: Any, got: Any) -> None:
    if sent is None:
        assert got is None
    elif isinstance(sent, torch.Tensor):
        assert_same_tensor(sent, got, "tensor")
    elif isinstance(sent, (list, tuple)):
        assert isinstance(got, list), f"got {type(got).__name__}, expected list"
        assert len(got) == len(sent)
        for i, (s, g) in enumerate(zip(sent, got)):
            assert_same_tensor(s, g, f"item {i}")
    else:
        assert isinstance(got, dict), f"got {type(got).__name__}, expected dict"
        assert list(got) == list(sent), "dict keys or their order differ"
        for k in sent:
            assert_same_tensor(sent[k], got[k], f"key {k!r}")


async def roundtrip(pair: Pair, msg: Any, key: str | None = None) -> Any:
    a, b = pair
    await a.send(msg, key=key)
    return await asyncio.wait_for(b.recv(key=key), 30)


# -- dtypes -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", sorted(CODE_OF, key=str), ids=lambda d: str(d).split(".")[-1])
async def test_every_supported_dtype_round_trips_bit_exactly(pipe_pair: Pair,
                                                             dtype: torch.dtype) -> None:
    sent = random_tensor(dtype, (3, 16), seed=CODE_OF[dtype])
    got = await roundtrip(pipe_pair, sent)
    assert_same_tensor(sent, got, str(dtype))


def test_dtype_table_covers_the_dtypes_this_torch_has() -> None:
    expected = ["float32", "float16", "bfloat16", "float64", "int8", "int16", "int32", "int64",
                "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
                "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "uint16", "uint32",
                "uint64", "complex32"]
    present = [n for n in expected if isinstance(getattr(torch, n, None), torch.dtype)]
    missing = [n for n in present if getattr(torch, n) not in CODE_OF]
    assert not missing, f"torch has these dtypes but the pipe cannot send them: {missing}"


async def test_all_dtypes_in_one_dict_message(pipe_pair: Pair) -> None:
    sent = {str(d): random_tensor(d, (5, 8), seed=i) for i, d in enumerate(CODE_OF)}
    assert_same_message(sent, await roundtrip(pipe_pair, sent))


# -- structures -----------------------------------------------------------------------------------


def _structures() -> list[Any]:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    cplx = torch.randn(4, 3, dtype=torch.complex64, generator=torch.Generator().manual_seed(1))
    return [
        pytest.param(None, id="none"),
        pytest.param(torch.randn(7, 3), id="tensor"),
        pytest.param([torch.randn(2), torch.arange(5), torch.ones(2, 2, dtype=torch.bfloat16)],
                     id="list"),
        pytest.param({"k": torch.randn(2, 3), "v": torch.arange(4, dtype=torch.int32),
                      "ключ": torch.zeros(1, dtype=torch.bool), "": torch.ones(3)}, id="dict"),
        pytest.param([], id="empty-list"),
        pytest.param({}, id="empty-dict"),
        pytest.param([torch.randn(3)], id="list-of-one"),
        pytest.param(torch.tensor(3.5), id="0d-float"),
        pytest.param(torch.tensor(True), id="0d-bool"),
        pytest.param(torch.tensor(-7, dtype=torch.int64), id="0d-int64"),
        pytest.param([torch.tensor(1.0), torch.tensor(2, dtype=torch.int8)], id="list-of-0d"),
        pytest.param(torch.empty(0), id="empty-1d"),
        pytest.param(torch.empty(0, 4, dtype=torch.float16), id="empty-0x4"),
        pytest.param(torch.empty(3, 0, 2, dtype=torch.int64), id="empty-3x0x2"),
        pytest.param([torch.empty(0), torch.ones(2), torch.empty(5, 0)], id="list-with-empties"),
        pytest.param({"e": torch.empty(0, dtype=torch.uint8)}, id="dict-of-empty"),
        pytest.param(base.t(), id="noncontig-transposed"),
        pytest.param(base[:, ::3], id="noncontig-strided-slice"),
        pytest.param(base[2:4], id="contig-view-with-storage-offset"),
        pytest.param(torch.arange(3).expand(4, 3), id="noncontig-expanded-stride0"),
        pytest.param(torch.randn(2, 3, 4, 5).permute(3, 1, 0, 2), id="noncontig-permuted"),
        pytest.param(torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
                     id="channels-last"),
        pytest.param(cplx.conj(), id="conj-view"),
        pytest.param(cplx.t()[1:], id="noncontig-complex"),
        pytest.param({"a": base.t(), "b": base[::2, 1::4]}, id="dict-of-noncontig"),
        pytest.param((torch.ones(2), torch.zeros(3)), id="tuple-arrives-as-list"),
    ]


@pytest.mark.parametrize("msg", _structures())
async def test_structure_round_trips(pipe_pair: Pair, msg: Any) -> None:
    got = await roundtrip(pipe_pair, msg)
    assert_same_message(msg, got)
    if isinstance(got, torch.Tensor):
        assert got.is_contiguous()


async def test_conj_view_arrives_as_the_conjugated_values(pipe_pair: Pair) -> None:
    x = torch.tensor([1 + 2j, 3 - 4j], dtype=torch.complex64)
    got = await roundtrip(pipe_pair, x.conj())
    assert not got.is_conj()
    assert got.tolist() == [1 - 2j, 3 + 4j]


async def test_server_to_client_direction(pipe_pair: Pair) -> None:
    client, server = pipe_pair
    sent = {"x": random_tensor(torch.float16, (33, 17), seed=5)}
    got = await roundtrip((server, client), sent, key="back")
    assert_same_message(sent, got)


async def test_both_directions_at_once(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    xs = [random_tensor(torch.float32, (256 * 1024,), seed=i) for i in range(8)]
    ys = [random_tensor(torch.int16, (300 * 1024,), seed=100 + i) for i in range(8)]

    async def send_all(p: aiokvpipe.Pipe, msgs: list[torch.Tensor]) -> None:
        for m in msgs:
            await p.send(m)

    async def recv_all(p: aiokvpipe.Pipe, n: int) -> list[Any]:
        return [await p.recv() for _ in range(n)]

    _, _, got_b, got_a = await asyncio.wait_for(asyncio.gather(
        send_all(a, xs), send_all(b, ys), recv_all(b, len(xs)), recv_all(a, len(ys))), 60)
    for s, g in zip(xs, got_b):
        assert_same_tensor(s, g)
    for s, g in zip(ys, got_a):
        assert_same_tensor(s, g)


async def test_64_mib_tensor_round_trips(pipe_pair: Pair) -> None:
    sent = random_tensor(torch.uint8, (64 * MiB,), seed=64)
    got = await roundtrip(pipe_pair, sent)
    assert got.shape == sent.shape and got.dtype == sent.dtype
    assert torch.equal(got, sent)


async def test_64_mib_message_of_several_tensors(pipe_pair: Pair) -> None:
    sent = {"k": random_tensor(torch.bfloat16, (8, 1024, 1024), seed=1),  # 16 MiB
            "v": random_tensor(torch.float32, (12, 1024, 1024), seed=2),  # 48 MiB
            "tail": torch.empty(0)}
    assert_same_message(sent, await roundtrip(pipe_pair, sent))


async def test_sender_may_overwrite_tensor_once_send_returns(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    x = random_tensor(torch.float32, (4 * MiB,), seed=9)  # 16 MiB: more than socket buffers
    expected = x.clone()
    await a.send(x)
    x.fill_(0)  # allowed: "the tensor may be reused or freed" once send() returned
    got = await asyncio.wait_for(b.recv(), 30)
    assert_same_tensor(expected, got)


async def test_received_tensors_do_not_alias_each_other(pipe_pair: Pair) -> None:
    a, b = pipe_pair
    await a.send(torch.ones(1000))
    await a.send(torch.ones(1000))
    first, second = await b.recv(), await b.recv()
    first.zero_()
    assert torch.equal(second, torch.ones(1000))


async def test_loop_parametrisation_really_runs_uvloop(any_loop: str, request: Any) -> None:
    # Guards the conftest hook: the "uvloop" variant must not silently run asyncio's loop.
    callspec = getattr(request.node, "callspec", None)
    if callspec is None:
        pytest.skip("this pytest-asyncio has no loop-factory hook: asyncio's loop only")
    assert any_loop == callspec.id.split("-")[-1]


# -- bad arguments --------------------------------------------------------------------------------

_T = torch.ones(3)


def _bad_sends() -> list[Any]:
    cases = [
        pytest.param(("hello",), {}, TypeError, id="str-message"),
        pytest.param((b"bytes",), {}, TypeError, id="bytes-message"),
        pytest.param((5,), {}, TypeError, id="int-message"),
        pytest.param(([_T, 3],), {}, TypeError, id="list-with-int"),
        pytest.param(([[_T]],), {}, TypeError, id="nested-list"),
        pytest.param(({"a": [_T]},), {}, TypeError, id="dict-of-list"),
        pytest.param(({1: _T},), {}, TypeError, id="dict-int-key"),
        pytest.param(({"n" * 256: _T},), {}, ValueError, id="dict-name-too-long"),
        pytest.param((torch.eye(3).to_sparse(),), {}, TypeError, id="sparse-tensor"),
        pytest.param((torch.ones([1] * 33),), {}, ValueError, id="33-dims"),
        pytest.param(([_T] * 4097,), {}, ValueError, id="4097-tensors"),
        pytest.param((_T,), {"key": 5}, TypeError, id="int-key"),
        pytest.param((_T,), {"key": b"k"}, TypeError, id="bytes-key"),
        pytest.param((_T,), {"key": "x" * 1025}, ValueError, id="key-too-long"),
        pytest.param((_T,), {"bogus": 1}, TypeError, id="unknown-keyword"),
        pytest.param((_T, "k", "extra"), {}, TypeError, id="extra-positional"),
    ]
    for name in ("bits8", "uint4", "float4_e2m1fn_x2", "int4"):
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype not in CODE_OF:
            cases.append(pytest.param((torch.empty(4, dtype=dtype),), {}, TypeError,
                                      id=f"dtype-{name}"))
            cases.append(pytest.param(([torch.ones(2), torch.empty(4, dtype=dtype)],), {},
                                      TypeError, id=f"list-with-dtype-{name}"))
    return cases


@pytest.mark.parametrize(("args", "kwargs", "exc"), _bad_sends())
async def test_bad_send_arguments_raise_and_leave_the_pipe_healthy(
        pipe_pair: Pair, args: tuple[Any, ...], kwargs: dict[str, Any], exc: type) -> None:
    a, b = pipe_pair
    before = a.stats.messages_sent
    with pytest.raises(exc):
        await a.send(*args, **kwargs)
    assert not a.closed and not b.closed
    good = torch.arange(10)
    await a.send(good)
    # The next message is the good one: nothing of the bad call went out.
    assert torch.equal(await asyncio.wait_for(b.recv(), 10), good)
    assert a.stats.messages_sent == before + 1
    assert b.stats.messages_received == before + 1


@pytest.mark.parametrize(("kwargs", "exc"), [
    pytest.param({"key": 3}, TypeError, id="int-key"),
    pytest.param({"key": "x" * 1025}, ValueError, id="key-too-long"),
    pytest.param({"bogus": 1}, TypeError, id="unknown-keyword"),
])
async def test_bad_recv_arguments_raise_and_leave_the_pipe_healthy(
        pipe_pair: Pair, kwargs: dict[str, Any], exc: type) -> None:
    a, b = pipe_pair
    await a.send(torch.ones(2))  # waits, unclaimed, while the bad call fails
    with pytest.raises(exc):
        await b.recv(**kwargs)
    assert torch.equal(await b.recv(), torch.ones(2))
    await a.send(torch.zeros(2))
    assert torch.equal(await b.recv(), torch.zeros(2))


@pytest.mark.parametrize(("opts", "exc"), [
    pytest.param({"bogus_option": 1}, TypeError, id="unknown-option"),
    pytest.param({"transport": "udp"}, ValueError, id="unknown-transport"),
    pytest.param({"max_inflight_bytes": 0}, ValueError, id="zero-inflight"),
    pytest.param({"recv_buffer_bytes": -1}, ValueError, id="negative-recv-buffer"),
    pytest.param({"max_inflight_bytes": 1.5}, ValueError, id="float-inflight"),
    pytest.param({"heartbeat_interval": 0}, ValueError, id="zero-heartbeat"),
    # (beyond 32 bits of milliseconds: the handshake failed, blaming the peer)
    pytest.param({"heartbeat_interval": 5e6}, ValueError, id="heartbeat-beyond-the-wire"),
    pytest.param({"connect_timeout": -1}, ValueError, id="negative-connect-timeout"),
    pytest.param({"device": "tpu"}, ValueError, id="unknown-device-type"),
    pytest.param({"device": "meta"}, ValueError, id="non-cuda-device"),
    pytest.param({"device": "cuda:7"} if not torch.cuda.is_available() else {"device": "cuda:999"},
                 ValueError, id="absent-cuda-device"),
    pytest.param({"token": 1234}, TypeError, id="int-token"),
])
async def test_bad_options_are_rejected_without_touching_a_live_pipe(
        pipe_pair: Pair, opts: dict[str, Any], exc: type) -> None:
    a, b = pipe_pair
    with pytest.raises(exc):
        await aiokvpipe.connect("127.0.0.1", 1, **opts)
    with pytest.raises(exc):
        await aiokvpipe.listen("127.0.0.1", 0, **opts)
    await a.send({"still": torch.ones(4)})
    assert torch.equal((await b.recv())["still"], torch.ones(4))


async def test_open_pipe_rejects_a_bad_rank() -> None:
    with pytest.raises(ValueError):
        await aiokvpipe.open_pipe("127.0.0.1", 1, rank=2)
