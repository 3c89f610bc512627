"""Messages <-> (structure, flat tensors): what ``send()`` validates before anything is sent."""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch

from aiokvpipe import _wire
from aiokvpipe._message import check_key, flatten, rebuild
from aiokvpipe._wire import MAX_KEY_BYTES, MAX_NAME_BYTES, MAX_NDIM, MAX_TENSORS, Structure

#: The protocol's dtype codes: stable constants, spelled out here so a renumbering fails.
WIRE_CODES = {
    "float32": 1, "float16": 2, "bfloat16": 3, "float64": 4,
    "float8_e4m3fn": 5, "float8_e5m2": 6, "float8_e4m3fnuz": 7, "float8_e5m2fnuz": 8,
    "float8_e8m0fnu": 9,
    "int8": 10, "int16": 11, "int32": 12, "int64": 13,
    "uint8": 14, "uint16": 15, "uint32": 16, "uint64": 17,
    "bool": 18, "complex64": 19, "complex128": 20, "complex32": 21,
}


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (2, 3)) -> torch.Tensor:
    """A tensor of ``dtype`` with distinct, exactly representable values."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 is "experimental"
        n = 1
        for d in shape:
            n *= d
        base = torch.arange(n, dtype=torch.float32).reshape(shape)
        if dtype == torch.bool:
            return base.remainder(2) == 1
        if dtype.is_complex:
            return torch.complex(base, -base - 0.5).to(dtype)
        return (base + 1).to(dtype)


def raw(t: torch.Tensor) -> bytes:
    """The bytes a receiver would get: the tensor's elements in C order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = t.resolve_conj().resolve_neg().contiguous()
        return bytes(t.reshape(-1).view(torch.uint8).numpy().tobytes()) if t.numel() else b""


def assert_sent_as(out_tensor: torch.Tensor, original: torch.Tensor) -> None:
    assert out_tensor.is_contiguous()
    assert not out_tensor.is_conj() and not out_tensor.is_neg()
    assert out_tensor.dtype == original.dtype
    assert out_tensor.shape == original.shape
    assert raw(out_tensor) == raw(original)


# -- dtypes -----------------------------------------------------------------------------------

AVAILABLE = [n for n in WIRE_CODES if isinstance(getattr(torch, n, None), torch.dtype)]


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_supported_dtype_flattens_with_its_wire_code(name: str) -> None:
    dtype = getattr(torch, name)
    t = sample(dtype)
    out = flatten(t)
    assert out.structure == Structure.TENSOR
    (spec,) = out.specs
    assert spec.dtype == WIRE_CODES[name]
    assert spec.itemsize == dtype.itemsize == _wire.DTYPE_ITEMSIZE[spec.dtype]
    assert spec.shape == (2, 3)
    assert spec.name == ""
    assert out.nbytes == spec.nbytes == 6 * dtype.itemsize
    assert_sent_as(out.tensors[0], t)


@pytest.mark.parametrize("name", AVAILABLE)
def test_every_supported_dtype_round_trips_through_flatten_and_rebuild(name: str) -> None:
    t = sample(getattr(torch, name), (3,))
    out = flatten([t])
    back = rebuild(out.structure, out.specs, out.tensors)
    assert isinstance(back, list) and len(back) == 1
    assert raw(back[0]) == raw(t)


def test_the_float8_and_unsigned_dtypes_of_this_torch_are_supported() -> None:
    # This torch has them all; a silently dropped one would shrink the parametrisation above.
    assert len(AVAILABLE) == len(WIRE_CODES)


@pytest.mark.parametrize("dtype_name", ["qint8", "quint8", "bits8", "bits16", "uint4", "int4",
                                        "float4_e2m1fn_x2"])
def test_unsupported_dtype_is_a_type_error(dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        pytest.skip(f"this torch has no {dtype_name}")
    if dtype in (torch.qint8, torch.quint8):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = torch.quantize_per_tensor(torch.tensor([1.0, 2.0]), 0.1, 0, dtype)
    else:
        t = torch.empty(4, dtype=dtype)
    for msg in (t, [sample(torch.float32), t], {"ok": sample(torch.float32), "bad": t}):
        with pytest.raises(TypeError, match="dtype"):
            flatten(msg)


# -- structures -------------------------------------------------------------------------------


def test_none_is_an_empty_message() -> None:
    out = flatten(None)
    assert (out.structure, out.tensors, out.specs, out.nbytes) == (Structure.NONE, (), (), 0)
    assert rebuild(out.structure, out.specs, out.tensors) is None


def test_single_tensor_rebuilds_as_a_tensor() -> None:
    t = sample(torch.float32)
    out = flatten(t)
    back = rebuild(out.structure, out.specs, out.tensors)
    assert isinstance(back, torch.Tensor)
    assert torch.equal(back, t)


def test_list_keeps_order_and_count() -> None:
    ts = [sample(torch.float32, (i + 1,)) for i in range(4)]
    out = flatten(ts)
    assert out.structure == Structure.LIST
    assert [s.shape for s in out.specs] == [(1,), (2,), (3,), (4,)]
    assert all(s.name == "" for s in out.specs)
    assert out.nbytes == 4 * (1 + 2 + 3 + 4)
    back = rebuild(out.structure, out.specs, out.tensors)
    assert isinstance(back, list)
    assert all(torch.equal(a, b) for a, b in zip(back, ts, strict=True))


def test_tuple_of_tensors_is_sent_as_a_list() -> None:
    ts = (sample(torch.int32), sample(torch.int64))
    out = flatten(ts)
    assert out.structure == Structure.LIST
    back = rebuild(out.structure, out.specs, out.tensors)
    assert isinstance(back, list) and len(back) == 2


def test_empty_list_and_empty_dict_are_messages_without_tensors() -> None:
    for msg, structure in (([], Structure.LIST), ({}, Structure.DICT)):
        out = flatten(msg)
        assert out.structure == structure and out.tensors == () and out.nbytes == 0
        assert rebuild(out.structure, out.specs, out.tensors) == msg


def test_dict_keeps_names_and_order() -> None:
    msg = {"v": sample(torch.bfloat16), "k": sample(torch.float16, (4,)),
           "ключ": sample(torch.int8),
           "": sample(torch.bool)}
    out = flatten(msg)
    assert out.structure == Structure.DICT
    assert [s.name for s in out.specs] == ["v", "k", "ключ", ""]
    back = rebuild(out.structure, out.specs, out.tensors)
    assert isinstance(back, dict)
    assert list(back) == list(msg)
    assert all(torch.equal(back[k], msg[k]) for k in msg)


def test_any_mapping_of_str_to_tensors_is_a_dict_message() -> None:
    msg = OrderedDict([("b", sample(torch.float32)), ("a", sample(torch.float32))])
    out = flatten(msg)
    assert out.structure == Structure.DICT
    assert [s.name for s in out.specs] == ["b", "a"]


def test_flattened_specs_survive_the_wire() -> None:
    out = flatten({"k": sample(torch.float16, (2, 0, 3)), "v": sample(torch.complex64, ()),
                   "x": sample(torch.uint64, (1,) * MAX_NDIM)})
    h = _wire.Header(7, "req", out.structure, out.specs)
    assert _wire.FrameDecoder().feed(_wire.encode(h)) == [h]
    assert h.nbytes == out.nbytes


@pytest.mark.parametrize("msg", [
    {sample(torch.float32)},
    frozenset(),
    (1, 2),
    [1.0],
    [sample(torch.float32), None],
    [[sample(torch.float32)]],
    {1: sample(torch.float32)},
    {"a": sample(torch.float32), 2: sample(torch.float32)},
    {"a": 3},
    {"a": {"b": sample(torch.float32)}},
    "tensor",
    "",
    b"bytes",
    3,
    3.5,
    sample(torch.float32).numpy(),
], ids=["set", "frozenset", "tuple-of-ints", "list-of-float", "list-with-none", "nested-list",
        "dict-int-key", "dict-mixed-keys", "dict-int-value", "nested-dict", "str", "empty-str",
        "bytes", "int", "float", "ndarray"])
def test_unsupported_structures_are_type_errors(msg: object) -> None:
    with pytest.raises(TypeError):
        flatten(msg)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr, torch.sparse_csc,
                                    torch.sparse_bsr], ids=["coo", "csr", "csc", "bsr"])
def test_sparse_tensors_are_type_errors(layout: torch.layout) -> None:
    t = torch.eye(4).to_sparse(layout=layout, blocksize=(2, 2) if layout == torch.sparse_bsr
                               else None)
    assert t.layout == layout
    for msg in (t, [t], {"s": t}):
        with pytest.raises(TypeError, match="strided|dense"):
            flatten(msg)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("layout", [torch.strided, torch.jagged], ids=["strided", "jagged"])
def test_nested_tensors_are_type_errors(layout: torch.layout) -> None:
    # A nested tensor built with the default layout reports ``layout == torch.strided``, so the
    # layout check alone does not catch it; it must still be refused as a bad argument (not
    # with whatever RuntimeError torch raises on the way).
    t = torch.nested.nested_tensor([torch.ones(2, 4), torch.ones(3, 4)], layout=layout)
    for msg in (t, [t], {"n": t}):
        with pytest.raises(TypeError):
            flatten(msg)


def test_tensor_without_storage_is_refused_before_sending() -> None:
    # A meta tensor has a shape and dtype but no data. Accepting it here lets send() hand the
    # data plane a null buffer: the socket write fails with EFAULT and the whole pipe breaks --
    # a bad argument tearing down a healthy pipe.
    t = torch.empty(1000, device="meta")
    for msg in (t, [t], {"m": t}):
        with pytest.raises((TypeError, ValueError)):
            flatten(msg)


@pytest.mark.parametrize("shape", [(1 << 25, 1 << 25, 0), (0, 1 << 25, 1 << 25),
                                   (1 << 20, 0, 1 << 20, 1 << 20), (3, 0, 5), (0,)])
def test_what_flatten_accepts_the_receiving_wire_decoder_accepts(shape: tuple[int, ...]) -> None:
    # Empty tensors cost no memory whatever their other dimensions. flatten() must either
    # refuse such a tensor as a bad argument, or the header it produces must be one the peer
    # decodes -- otherwise send() succeeds and the pipe breaks on the peer's ProtocolError.
    try:
        out = flatten(torch.empty(shape))
    except ValueError:
        return
    data = _wire.encode(_wire.Header(0, None, out.structure, out.specs))
    assert _wire.FrameDecoder().feed(data) == [_wire.Header(0, None, out.structure, out.specs)]


# -- limits -----------------------------------------------------------------------------------


def test_message_of_exactly_max_tensors_is_accepted() -> None:
    out = flatten([torch.empty(0)] * MAX_TENSORS)
    assert len(out.specs) == MAX_TENSORS


@pytest.mark.parametrize("as_dict", [False, True])
def test_too_many_tensors_is_a_value_error(as_dict: bool) -> None:
    ts = [torch.empty(0)] * (MAX_TENSORS + 1)
    msg = {str(i): t for i, t in enumerate(ts)} if as_dict else ts
    with pytest.raises(ValueError):
        flatten(msg)


def test_too_many_dimensions_is_a_value_error() -> None:
    assert flatten(torch.zeros((1,) * MAX_NDIM)).specs[0].shape == (1,) * MAX_NDIM
    with pytest.raises(ValueError):
        flatten(torch.zeros((1,) * (MAX_NDIM + 1)))


def test_dict_name_longer_than_the_limit_is_a_value_error() -> None:
    flatten({"n" * MAX_NAME_BYTES: torch.zeros(1)})
    with pytest.raises(ValueError):
        flatten({"n" * (MAX_NAME_BYTES + 1): torch.zeros(1)})
    with pytest.raises(ValueError):  # the limit is in UTF-8 bytes, not characters
        flatten({"é" * (MAX_NAME_BYTES // 2 + 1): torch.zeros(1)})


# -- keys -------------------------------------------------------------------------------------


def test_check_key_accepts_none_and_strings_unchanged() -> None:
    assert check_key(None) is None
    assert check_key("") == ""
    assert check_key("req-17/⚡") == "req-17/⚡"
    assert check_key("k" * MAX_KEY_BYTES) == "k" * MAX_KEY_BYTES


def test_key_longer_than_the_limit_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        check_key("k" * (MAX_KEY_BYTES + 1))
    # 513 characters, 1026 bytes in UTF-8: the limit is on bytes.
    with pytest.raises(ValueError):
        check_key("é" * (MAX_KEY_BYTES // 2 + 1))


@pytest.mark.parametrize("key", [b"bytes", 17, 1.5, ("a",), ["a"], object()],
                         ids=["bytes", "int", "float", "tuple", "list", "object"])
def test_non_string_key_is_a_type_error(key: object) -> None:
    with pytest.raises(TypeError):
        check_key(key)


# -- layouts: what is sent is what the tensor reads as ----------------------------------------


@pytest.mark.parametrize("make", [
    lambda: sample(torch.float32, (4, 6)).t(),
    lambda: sample(torch.int64, (10,))[::3],
    lambda: sample(torch.float16, (4, 6))[1:3, ::2],
    lambda: sample(torch.float32, (1, 5)).expand(4, 5),
    lambda: sample(torch.float32, (2, 3, 4, 5)).to(memory_format=torch.channels_last),
    lambda: sample(torch.complex64, (3, 4)).permute(1, 0),
    lambda: sample(torch.bool, (6, 6)).diagonal(),
    lambda: sample(torch.float8_e4m3fn, (4, 4)).t(),
], ids=["transposed", "step-slice", "2d-slice", "expanded", "channels-last", "complex-permuted",
        "diagonal", "float8-transposed"])
def test_non_contiguous_tensor_is_sent_contiguous_with_equal_values(
        make: Callable[[], torch.Tensor]) -> None:
    t = make()
    assert not t.is_contiguous()
    before = raw(t)
    out = flatten({"t": t})
    sent = out.tensors[0]
    assert_sent_as(sent, t)
    assert out.specs[0].shape == tuple(t.shape)
    assert out.nbytes == t.numel() * t.element_size()
    assert raw(t) == before  # the caller's tensor is untouched


def test_contiguous_tensor_is_not_copied() -> None:
    t = sample(torch.float32, (8, 8))
    assert flatten(t).tensors[0].data_ptr() == t.data_ptr()


def test_contiguous_slice_with_a_storage_offset_sends_only_its_elements() -> None:
    base = sample(torch.int32, (10,))
    t = base[4:7]
    out = flatten(t)
    assert out.nbytes == 3 * 4
    assert_sent_as(out.tensors[0], t)
    assert out.tensors[0].tolist() == [5, 6, 7]


def test_conjugate_view_is_resolved() -> None:
    x = sample(torch.complex64, (3,))
    c = x.conj()
    assert c.is_conj()
    sent = flatten(c).tensors[0]
    assert not sent.is_conj()
    # The memory holds the conjugated values, not x's with a lazy conj bit.
    assert torch.view_as_real(sent)[:, 1].tolist() == (-x.imag).tolist()
    assert torch.equal(sent, c)


def test_negative_view_is_resolved() -> None:
    x = sample(torch.complex128, (4,))
    n = x.conj().imag
    assert n.is_neg()
    sent = flatten([n]).tensors[0]
    assert not sent.is_neg()
    assert sent.is_contiguous()
    assert sent.tolist() == (-x.imag).tolist()


def test_contiguous_negative_view_is_resolved() -> None:
    # Contiguous, so ``.contiguous()`` alone would hand over the un-negated memory.
    x = torch.tensor([1.5, -2.0, 3.0])
    n = torch._neg_view(x)
    assert n.is_neg() and n.is_contiguous()
    sent = flatten(n).tensors[0]
    assert not sent.is_neg()
    assert sent.numpy().tolist() == [-1.5, 2.0, -3.0]  # numpy reads the raw memory


def test_tensor_requiring_grad_is_detached() -> None:
    t = torch.ones(3, requires_grad=True) * 2
    sent = flatten(t).tensors[0]
    assert not sent.requires_grad
    assert sent.tolist() == [2.0, 2.0, 2.0]


# -- 0-d and empty tensors --------------------------------------------------------------------


def test_zero_dimensional_tensor() -> None:
    t = torch.tensor(3.5, dtype=torch.float64)
    out = flatten(t)
    assert out.specs[0].shape == ()
    assert out.nbytes == 8
    back = rebuild(out.structure, out.specs, out.tensors)
    assert isinstance(back, torch.Tensor) and back.dim() == 0 and back.item() == 3.5


@pytest.mark.parametrize("shape", [(0,), (0, 7), (3, 0, 2)])
def test_empty_tensor(shape: tuple[int, ...]) -> None:
    t = torch.empty(shape, dtype=torch.float32)
    out = flatten({"e": t})
    assert out.specs[0].shape == shape
    assert out.specs[0].nbytes == 0 and out.nbytes == 0
    back = rebuild(out.structure, out.specs, out.tensors)
    assert isinstance(back, dict) and back["e"].shape == shape


def test_empty_non_contiguous_view() -> None:
    t = torch.empty(0, 4).t()
    out = flatten(t)
    assert out.specs[0].shape == (4, 0)
    assert out.nbytes == 0
