"""BlockPool, pool layouts and the argument checks made before any block moves."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aiokvpipe
from aiokvpipe._blocks import (
    MAX_SEGMENTS_PER_BLOCK,
    BlockIdError,
    BlockPool,
    PoolLayout,
    TensorLayout,
    check_counts,
    check_fits,
    merge_runs,
    normalize_ids,
    normalize_layers,
)

fast = settings(max_examples=200, derandomize=True, deadline=None, database=None)


def vllm_pool(layers: int = 2, num_blocks: int = 8, dtype: torch.dtype = torch.bfloat16
              ) -> BlockPool:
    return BlockPool([torch.zeros(2, num_blocks, 4, 2, 8, dtype=dtype) for _ in range(layers)],
                     block_dim=1)


# -- construction -----------------------------------------------------------------------------


def test_exported_from_the_package() -> None:
    assert aiokvpipe.BlockPool is BlockPool
    assert "BlockPool" in aiokvpipe.__all__


@pytest.mark.parametrize(("shape", "block_dim", "block_shape", "segments"), [
    ((2, 8, 4, 2, 8), 1, (2, 4, 2, 8), 2),      # vLLM [2, num_blocks, ...]
    ((8, 2, 4, 2, 8), 0, (2, 4, 2, 8), 1),      # [num_blocks, 2, ...]
    ((8, 4, 16), 0, (4, 16), 1),                # MLA
    ((2, 8, 4, 2, 8), -4, (2, 4, 2, 8), 2),     # negative block_dim
    ((3, 5, 8), 2, (3, 5), 15),                 # block_dim last: one element per segment
])
def test_common_layouts(shape: tuple[int, ...], block_dim: int, block_shape: tuple[int, ...],
                        segments: int) -> None:
    t = torch.zeros(shape, dtype=torch.float16)
    pool = BlockPool({"a": t, "b": t.clone()}, block_dim=block_dim)
    assert pool.num_blocks == 8
    assert pool.names == ("a", "b")
    assert pool.device == torch.device("cpu")
    assert pool.dtypes == (torch.float16, torch.float16)
    assert pool.block_shapes == (block_shape, block_shape)
    tl = pool.layout.tensors[0]
    assert len(tl.segment_offsets) == segments
    assert tl.block_bytes == 2 * torch.Size(block_shape).numel()
    assert pool.block_bytes == 2 * tl.block_bytes
    assert pool.tensors[0] is t


def test_list_pool_has_no_names() -> None:
    pool = vllm_pool()
    assert pool.names is None
    assert not pool.layout.named


def test_permuted_view_folds_into_one_segment() -> None:
    # vLLM's [2, num_blocks, ...] view of a [num_blocks, 2, ...] allocation: one block is
    # one contiguous range, even though the tensor is not contiguous.
    t = torch.zeros(8, 2, 4, 16).transpose(0, 1)
    assert not t.is_contiguous()
    tl = BlockPool([t], block_dim=1).layout.tensors[0]
    assert tl.segment_offsets == (0,)
    assert tl.segment_bytes == tl.block_bytes == 2 * 4 * 16 * 4
    assert tl.block_stride_bytes == tl.block_bytes


@pytest.mark.parametrize(("make", "error", "match"), [
    (lambda: [], ValueError, "at least one tensor"),
    (lambda: "abc", TypeError, "list or dict"),
    (lambda: [torch.zeros(4, 2), "x"], TypeError, "torch.Tensor"),
    (lambda: {1: torch.zeros(4, 2)}, TypeError, "names are str"),
    (lambda: [torch.zeros(4, 2), torch.zeros(5, 2)], ValueError, "num_blocks"),
    (lambda: [torch.zeros(4, 2, dtype=torch.float16), torch.zeros(4, 2)], None, None),
    (lambda: [torch.zeros(4, 2, device="meta")], TypeError, "meta"),
    (lambda: [torch.zeros(4, 2).to_sparse()], TypeError, "strided"),
    (lambda: [torch.empty(4, 2, dtype=torch.bits8)], TypeError, "dtype"),
    (lambda: [torch.zeros(4, 4)[:, ::2]], ValueError, "not dense"),
    (lambda: [torch.zeros(1, 2).expand(4, 2)], ValueError, "overlaps itself"),
    (lambda: [torch.zeros(4, 0)], ValueError, "empty"),
    (lambda: [torch.zeros(0, 2)], ValueError, "1 to"),
    (lambda: [torch.zeros(())], ValueError, "at least one dimension"),
    (lambda: {"x" * 256: torch.zeros(4, 2)}, ValueError, "255 bytes"),
    (lambda: [torch.zeros(4, 2, dtype=torch.complex64).conj()], ValueError, "conjugate"),
])
def test_bad_pools_are_refused(make: object, error: type[Exception] | None,
                               match: str | None) -> None:
    tensors = make()  # type: ignore[operator]
    if error is None:  # mixed dtypes are fine: each tensor has its own
        BlockPool(tensors, block_dim=0)
        return
    with pytest.raises(error, match=match):
        BlockPool(tensors, block_dim=0)


def test_too_many_segments_per_block_are_refused() -> None:
    t = torch.zeros(MAX_SEGMENTS_PER_BLOCK + 1, 4, 2)
    with pytest.raises(ValueError, match="separate byte ranges"):
        BlockPool([t], block_dim=1)
    BlockPool([torch.zeros(MAX_SEGMENTS_PER_BLOCK, 4, 2)], block_dim=1)


def test_block_dim_errors() -> None:
    with pytest.raises(ValueError, match="block_dim 3"):
        BlockPool([torch.zeros(4, 2)], block_dim=3)
    with pytest.raises(ValueError, match="block_dim -3"):
        BlockPool([torch.zeros(4, 2)], block_dim=-3)
    with pytest.raises(TypeError, match="block_dim"):
        BlockPool([torch.zeros(4, 2)], block_dim=True)


def test_same_tensor_twice_is_refused() -> None:
    t = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="same memory"):
        BlockPool([t, t], block_dim=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.cuda
def test_mixed_devices_are_refused() -> None:
    with pytest.raises(TypeError, match="one device"):
        BlockPool([torch.zeros(4, 2), torch.zeros(4, 2, device="cuda")], block_dim=0)


def test_mixed_devices_are_refused_without_cuda() -> None:
    # The meta device stands in for a second device where no GPU exists: the device check
    # must name the device, whatever it is.
    with pytest.raises(TypeError, match="meta"):
        BlockPool([torch.zeros(4, 2), torch.zeros(4, 2, device="meta")], block_dim=0)


# -- layouts ----------------------------------------------------------------------------------


def test_layout_is_frozen_hashable_and_equal_for_equal_pools() -> None:
    a, b = vllm_pool(), vllm_pool()
    assert a.layout == b.layout
    assert hash(a.layout) == hash(b.layout)
    assert a.layout_fingerprint == b.layout_fingerprint
    assert len(a.layout_fingerprint) == 16
    with pytest.raises(AttributeError):
        a.layout.named = True  # type: ignore[misc]
    other = vllm_pool(num_blocks=9)
    assert other.layout != a.layout
    assert other.layout_fingerprint != a.layout_fingerprint


def test_fingerprint_is_stable_across_processes_and_versions() -> None:
    # A golden value: the fingerprint is how two ends recognise a pool, so it may only
    # change together with the LAYOUT encoding.
    pool = BlockPool({"k": torch.zeros(8, 4, 2, dtype=torch.bfloat16)}, block_dim=0)
    assert pool.layout_fingerprint.hex() == "ef7a02d92c4236e172f65f2f2ef86fa8"


def test_fingerprint_covers_names_and_strides() -> None:
    base = BlockPool({"k": torch.zeros(2, 8, 4)}, block_dim=1).layout_fingerprint
    assert BlockPool({"v": torch.zeros(2, 8, 4)}, block_dim=1).layout_fingerprint != base
    permuted = torch.zeros(8, 2, 4).transpose(0, 1)
    assert BlockPool({"k": permuted}, block_dim=1).layout_fingerprint != base


def test_tensor_layout_validates_its_fields() -> None:
    TensorLayout("", 1, (4, 2), (2, 1), 0)
    with pytest.raises(ValueError, match="dtype code"):
        TensorLayout("", 99, (4, 2), (2, 1), 0)
    with pytest.raises(ValueError, match="one stride"):
        TensorLayout("", 1, (4, 2), (2,), 0)
    with pytest.raises(ValueError, match="size limit"):
        TensorLayout("", 1, (4, 1 << 60), (1 << 60, 1), 0)
    with pytest.raises(ValueError, match="names"):
        PoolLayout((TensorLayout("a", 1, (4, 2), (2, 1), 0),), named=False)
    with pytest.raises(ValueError, match="duplicate"):
        PoolLayout((TensorLayout("a", 1, (4, 2), (2, 1), 0),) * 2, named=True)


# -- fit --------------------------------------------------------------------------------------


def test_pools_of_different_num_blocks_and_block_dim_fit() -> None:
    a = vllm_pool(num_blocks=8)
    b = BlockPool([torch.zeros(100, 2, 4, 2, 8, dtype=torch.bfloat16) for _ in range(2)],
                  block_dim=0)
    check_fits(a.layout, b.layout)
    check_fits(b.layout, a.layout)


@pytest.mark.parametrize(("peer", "match"), [
    (lambda: vllm_pool(layers=3), "2 tensors here, 3 in the peer's pool"),
    (lambda: vllm_pool(dtype=torch.float16), "tensor 0 is bfloat16 here, float16"),
    (lambda: BlockPool([torch.zeros(2, 8, 4, 2, 8, dtype=torch.bfloat16),
                        torch.zeros(2, 8, 4, 2, 4, dtype=torch.bfloat16)], block_dim=1),
     r"tensor 1 has blocks of shape \[2, 4, 2, 8\] here, \[2, 4, 2, 4\]"),
])
def test_misfits_name_the_first_difference(peer: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        check_fits(vllm_pool().layout, peer().layout)  # type: ignore[operator]


def test_misfit_names_a_dict_pools_tensor() -> None:
    a = BlockPool({"k0": torch.zeros(8, 4), "v0": torch.zeros(8, 4)}, block_dim=0)
    b = BlockPool({"k0": torch.zeros(8, 4), "v0": torch.zeros(8, 5)}, block_dim=0)
    with pytest.raises(ValueError, match=r"tensor 1 \('v0'\)"):
        check_fits(a.layout, b.layout)


def test_dict_pools_naming_the_same_tensors_in_another_order_do_not_fit() -> None:
    # Tensors go by position: K would land in V, silently.
    kv = BlockPool({"k": torch.zeros(8, 4), "v": torch.ones(8, 4)}, block_dim=0)
    vk = BlockPool({"v": torch.zeros(8, 4), "k": torch.ones(8, 4)}, block_dim=0)
    with pytest.raises(ValueError, match="another order"):
        check_fits(kv.layout, vk.layout)
    check_fits(kv.layout, kv.layout)
    other = BlockPool({"key": torch.zeros(8, 4), "value": torch.zeros(8, 4)}, block_dim=0)
    check_fits(kv.layout, other.layout)  # other names: by position, as documented
    check_fits(kv.layout, BlockPool([torch.zeros(8, 4), torch.zeros(8, 4)],
                                    block_dim=0).layout)  # a list pool: by position


def test_check_counts() -> None:
    check_counts(3, 3)
    with pytest.raises(ValueError, match="3 block ids here, 4 on the peer"):
        check_counts(3, 4)


# -- ids and layers ---------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [[3, 1, 2], (3, 1, 2), torch.tensor([3, 1, 2]),
                                 torch.tensor([3, 1, 2], dtype=torch.int32)])
def test_ids_normalize_to_a_tuple_of_ints(ids: object) -> None:
    out = normalize_ids(vllm_pool(), ids, destination=True)
    assert out == (3, 1, 2)
    assert all(type(i) is int for i in out)


def test_ids_from_range_and_empty() -> None:
    assert normalize_ids(vllm_pool(), range(2, 5), destination=True) == (2, 3, 4)
    assert normalize_ids(vllm_pool(), [], destination=True) == ()


@pytest.mark.parametrize(("ids", "error", "match"), [
    ([1, 8], BlockIdError, "block id 8 is outside the pool"),
    ([-1], BlockIdError, "block id -1"),
    ([True, 2], TypeError, "bool"),
    ([1.0], TypeError, "float"),
    (torch.tensor([1.0]), TypeError, "float"),
    (torch.tensor([[1]]), TypeError, "1-D"),
    ({1, 2}, TypeError, "set"),
    (3, TypeError, "int"),
])
def test_bad_ids(ids: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        normalize_ids(vllm_pool(), ids, destination=False)


def test_out_of_range_is_both_index_and_value_error() -> None:
    with pytest.raises(IndexError):
        normalize_ids(vllm_pool(), [9], destination=False)
    with pytest.raises(ValueError):
        normalize_ids(vllm_pool(), [9], destination=False)


def test_destination_ids_named_twice_are_refused_source_ids_are_not() -> None:
    pool = vllm_pool()
    assert normalize_ids(pool, [1, 2, 1], destination=False) == (1, 2, 1)
    with pytest.raises(ValueError, match="destination block id 1 is named twice"):
        normalize_ids(pool, [1, 2, 1], destination=True)


def test_layers() -> None:
    pool = BlockPool({"k0": torch.zeros(8, 4), "v0": torch.zeros(8, 4),
                      "k1": torch.zeros(8, 4)}, block_dim=0)
    assert normalize_layers(pool, None) == (0, 1, 2)
    assert normalize_layers(pool, ["k1", "k0"]) == (0, 2)
    assert normalize_layers(pool, [2, "v0"]) == (1, 2)
    assert normalize_layers(pool, "v0") == (1,)
    assert normalize_layers(pool, 2) == (2,)
    assert normalize_layers(pool.layout, range(2)) == (0, 1)
    with pytest.raises(KeyError, match="'x'"):
        normalize_layers(pool, ["x"])
    with pytest.raises(ValueError, match="'x'"):  # like every bad argument of a block call
        normalize_layers(pool, "x")
    with pytest.raises(ValueError, match="twice"):
        normalize_layers(pool, ["k0", 0])
    with pytest.raises(IndexError, match="layer index 3"):
        normalize_layers(pool, [3])
    with pytest.raises(TypeError):
        normalize_layers(pool, [True])
    with pytest.raises(TypeError):
        normalize_layers(pool, {"k0"})
    with pytest.raises(ValueError, match="no tensor"):
        normalize_layers(pool, [])
    with pytest.raises(TypeError, match="by index"):
        normalize_layers(vllm_pool(), ["k0"])


# -- runs -------------------------------------------------------------------------------------


def test_merge_runs_examples() -> None:
    assert merge_runs([], []) == ()
    assert merge_runs([5], [0]) == ((5, 0, 1),)
    assert merge_runs([1, 2, 3, 7, 8], [4, 5, 9, 0, 1]) == ((1, 4, 2), (3, 9, 1), (7, 0, 2))
    assert merge_runs([3, 2, 1], [1, 2, 3]) == ((3, 1, 1), (2, 2, 1), (1, 3, 1))
    with pytest.raises(ValueError, match="2 source ids, 1 destination"):
        merge_runs([1, 2], [1])


def naive_copy(src: list[int], dst: list[int], n: int) -> list[int]:
    out = [-1] * n
    for s, d in zip(src, dst, strict=True):
        out[d] = s
    return out


def runs_copy(runs: tuple[tuple[int, int, int], ...], n: int) -> list[int]:
    out = [-1] * n
    for s, d, length in runs:
        for k in range(length):
            out[d + k] = s + k
    return out


@fast
@given(data=st.data())
def test_merge_runs_is_a_per_block_copy(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 40))
    dst = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    # Mostly runs of consecutive ids, as a block allocator hands them out.
    src = data.draw(st.one_of(
        st.lists(st.integers(0, n - 1), min_size=len(dst), max_size=len(dst)),
        st.integers(0, n - len(dst)).map(lambda a: list(range(a, a + len(dst))))))
    runs = merge_runs(src, dst)
    assert runs_copy(runs, n) == naive_copy(src, dst, n)
    assert sum(r[2] for r in runs) == len(dst)
    # Maximal: no two neighbouring runs could have been one.
    for (s0, d0, n0), (s1, d1, _) in zip(runs, runs[1:], strict=False):
        assert not (s1 == s0 + n0 and d1 == d0 + n0)
