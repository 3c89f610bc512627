"""Moving blocks: memoryviews of CPU pools, chunked gather/scatter, pool-to-pool copies.

Every path is checked against the naive per-block copy ``dst.select(bd, d).copy_(src.select(
bd, s))`` on pools of random geometry (block_dim anywhere, permuted strides, a storage
offset, the two ends laid out differently), with sentinel bytes in every block the transfer
does not name. The CUDA copy kernel's piece tables are checked on the CPU by applying them
with ``memmove``; the kernel itself runs in the ``cuda``-marked tests.
"""

from __future__ import annotations

import asyncio
import ctypes
import math
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aiokvpipe import _blocks_move
from aiokvpipe._blocks import BlockPool, merge_runs, normalize_ids
from aiokvpipe._blocks_move import (
    Chunk,
    MappedPool,
    Segment,
    copy_runs,
    gather,
    iter_chunks,
    kernel_available,
    run_views,
    scatter,
    whole_chunk,
)

fast = settings(max_examples=120, derandomize=True, deadline=None, database=None)
DTYPES = [torch.float32, torch.bfloat16, torch.int8, torch.float64, torch.bool]
SENTINEL = 0xA5

# -- pools of random geometry -------------------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    block_shape: tuple[int, ...]
    block_dim: int
    perm: tuple[int, ...]  # physical order of the dims up to block_dim (outermost first)
    offset: bool  # the tensor starts inside its storage


def make_tensor(g: Geometry, num_blocks: int, dtype: torch.dtype, device: str = "cpu"
                ) -> torch.Tensor:
    bd = g.block_dim
    shape = g.block_shape[:bd] + (num_blocks,) + g.block_shape[bd:]
    outer = [shape[p] for p in g.perm]
    if g.offset:
        outer[0] += 1
    alloc = torch.empty(*outer, *shape[bd + 1:], dtype=dtype, device=device)
    if g.offset:
        alloc = alloc[1:]
    inverse = [g.perm.index(i) for i in range(bd + 1)]
    t = alloc.permute(*inverse, *range(bd + 1, len(shape)))
    assert t.shape == shape
    return t


def fill(t: torch.Tensor, value: int | None = None) -> torch.Tensor:
    raw = t.unsqueeze(-1).view(torch.uint8)
    if value is None:
        raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8))
    else:
        raw.fill_(value)
    return t


def block_bytes_of(t: torch.Tensor, block_dim: int, b: int) -> torch.Tensor:
    return raw(t).select(block_dim, b).reshape(-1)


@dataclass
class Pair:
    """A source pool, a fitting destination pool (sentinel-filled) and their block_dims."""

    src: BlockPool
    dst: BlockPool

    def expected_after(self, layers: tuple[int, ...], src_ids: list[int],
                       dst_ids: list[int], before: list[torch.Tensor]) -> list[torch.Tensor]:
        """The destination tensors' bytes (``raw``) after a per-block copy, from a
        :func:`snapshot` of them (bytes, so that bool tensors keep their odd bytes)."""
        out = []
        for i, snap in enumerate(before):
            t = snap.clone()
            if i in layers:
                sbd = self.src.layout.tensors[i].block_dim
                dbd = self.dst.layout.tensors[i].block_dim
                for s, d in zip(src_ids, dst_ids, strict=True):
                    t.select(dbd, d).copy_(raw(self.src.tensors[i]).select(sbd, s))
            out.append(t)
        return out


def raw(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(-1).view(torch.uint8)


def assert_bytes_equal(pool: BlockPool, expected: list[torch.Tensor]) -> None:
    for i, (t, e) in enumerate(zip(pool.tensors, expected, strict=True)):
        assert torch.equal(raw(t).cpu(), e.cpu()), f"tensor {i} differs"


@st.composite
def pool_pairs(draw: st.DrawFn, max_tensors: int = 3) -> Pair:
    count = draw(st.integers(1, max_tensors))
    sbd, dbd = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    n_src, n_dst = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    src, dst = [], []
    for _ in range(count):
        block_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=max(sbd, dbd, 1),
                                          max_size=3)))
        dtype = draw(st.sampled_from(DTYPES))
        for out, bd, n, value in ((src, sbd, n_src, None), (dst, dbd, n_dst, SENTINEL)):
            g = Geometry(block_shape, bd, tuple(draw(st.permutations(range(bd + 1)))),
                         draw(st.booleans()))
            out.append(fill(make_tensor(g, n, dtype), value))
    return Pair(BlockPool(src, block_dim=sbd), BlockPool(dst, block_dim=dbd))


@st.composite
def transfers(draw: st.DrawFn, max_tensors: int = 3
              ) -> tuple[Pair, tuple[int, ...], list[int], list[int]]:
    pair = draw(pool_pairs(max_tensors))
    n_src, n_dst = pair.src.num_blocks, pair.dst.num_blocks
    dst_ids = draw(st.lists(st.integers(0, n_dst - 1), unique=True, max_size=n_dst))
    src_ids = draw(st.one_of(
        st.lists(st.integers(0, n_src - 1), min_size=len(dst_ids), max_size=len(dst_ids)),
        st.integers(0, max(n_src - len(dst_ids), 0)).map(
            lambda a: [min(a + k, n_src - 1) for k in range(len(dst_ids))])))
    count = len(pair.src.tensors)
    layers = tuple(sorted(draw(st.sets(st.integers(0, count - 1), min_size=1))))
    return pair, layers, src_ids, dst_ids


def snapshot(pool: BlockPool) -> list[torch.Tensor]:
    return [raw(t).clone() for t in pool.tensors]


# -- CPU pools: memoryviews -------------------------------------------------------------------


@fast
@given(transfers())
def test_run_views_carry_blocks_in_canonical_order(
        case: tuple[Pair, tuple[int, ...], list[int], list[int]]) -> None:
    pair, layers, src_ids, dst_ids = case
    expected = pair.expected_after(layers, src_ids, dst_ids, snapshot(pair.dst))
    src_runs, dst_runs = merge_runs(src_ids, src_ids), merge_runs(dst_ids, dst_ids)
    for i in layers:
        sbd = pair.src.layout.tensors[i].block_dim
        stream = b"".join(bytes(v) for v in run_views(pair.src, i, src_runs, "src"))
        canonical = b"".join(bytes(block_bytes_of(pair.src.tensors[i], sbd, b).numpy())
                             for b in src_ids)
        assert stream == canonical
        # The receiving end: recv_into its own views, in its own runs.
        pos = 0
        for view in run_views(pair.dst, i, dst_runs, "dst"):
            view[:] = stream[pos:pos + len(view)]
            pos += len(view)
        assert pos == len(stream)
    assert_bytes_equal(pair.dst, expected)


def test_run_views_merge_adjacent_memory_and_are_zero_copy() -> None:
    t = torch.zeros(8, 4, 2)  # block_dim 0: consecutive blocks are adjacent
    pool = BlockPool([t], block_dim=0)
    views = run_views(pool, 0, merge_runs([2, 3, 4, 6], [0, 1, 2, 3]), "src")
    assert [len(v) for v in views] == [3 * 32, 32]
    views[1][:4] = b"\x00\x00\x80\x3f"  # 1.0f, little-endian
    assert t[6, 0, 0].item() == 1.0
    kv = torch.zeros(2, 8, 4)  # [2, num_blocks, ...]: a block is two ranges
    views = run_views(BlockPool([kv], block_dim=1), 0, ((1, 0, 2),), "dst")
    assert [len(v) for v in views] == [16] * 4


def test_run_views_argument_errors() -> None:
    pool = BlockPool([torch.zeros(8, 4)], block_dim=0)
    with pytest.raises(ValueError, match="outside"):
        run_views(pool, 0, ((7, 0, 2),), "src")
    with pytest.raises(ValueError, match="side"):
        run_views(pool, 0, ((0, 0, 1),), "both")  # type: ignore[arg-type]


# -- chunks -------------------------------------------------------------------------------------


@fast
@given(sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5), count=st.integers(0, 20),
       extra=st.integers(0, 200))
def test_iter_chunks_cover_the_stream_in_order_within_staging(
        sizes: list[int], count: int, extra: int) -> None:
    pool = BlockPool([torch.zeros(30, n, dtype=torch.uint8) for n in sizes], block_dim=0)
    layers = tuple(range(len(sizes)))
    staging = max(sizes) + extra
    chunks = list(iter_chunks(pool.layout, layers, count, staging))
    covered = [(s.tensor, p) for c in chunks for s in c.segments for p in range(s.start, s.stop)]
    assert covered == [(i, p) for i in layers for p in range(count)]
    for c in chunks:
        assert c.segments
        assert c.nbytes == sum((s.stop - s.start) * sizes[s.tensor] for s in c.segments)
        assert c.nbytes <= staging
    # Greedy: each chunk but the last was closed because the next block did not fit.
    for c, nxt in zip(chunks, chunks[1:], strict=False):
        assert c.nbytes + sizes[nxt.segments[0].tensor] > staging
    # The same on any pool that fits (the other end cuts the same chunks).
    other = BlockPool([torch.zeros(9, n, dtype=torch.uint8).t() for n in sizes], block_dim=1)
    assert list(iter_chunks(other.layout, layers, count, staging)) == chunks


def test_a_block_larger_than_the_staging_is_a_chunk_of_its_own() -> None:
    """(A ValueError once: raised mid-transfer, after the offer and the pull, it broke the
    pipe as a failure of ours.) Its neighbours still share chunks as they fit."""
    pool = BlockPool([torch.zeros(8, 4, dtype=torch.uint8), torch.zeros(8, 16, dtype=torch.uint8),
                      torch.zeros(8, 4, dtype=torch.uint8)], block_dim=0)
    chunks = list(iter_chunks(pool.layout, (0, 1, 2), 2, 10))
    assert [(c.nbytes, [(s.tensor, s.start, s.stop) for s in c.segments]) for c in chunks] == [
        (8, [(0, 0, 2)]), (16, [(1, 0, 1)]), (16, [(1, 1, 2)]), (8, [(2, 0, 2)])]


# -- gather / scatter / copy_runs, torch path (CPU) -------------------------------------------


def staged_transfer(pair: Pair, layers: tuple[int, ...], src_ids: list[int],
                    dst_ids: list[int], staging: int, method: str) -> None:
    buf = torch.empty(staging, dtype=torch.uint8, device=pair.src.device)
    src_ids_n = normalize_ids(pair.src, src_ids, destination=False)
    dst_ids_n = normalize_ids(pair.dst, dst_ids, destination=True)
    for chunk in iter_chunks(pair.src.layout, layers, len(src_ids), staging):
        fill(buf, 0x3C)
        gather(pair.src, src_ids_n, chunk, buf, method=method)  # type: ignore[arg-type]
        scatter(pair.dst, dst_ids_n, chunk, buf, method=method)  # type: ignore[arg-type]


@fast
@given(case=transfers(), extra=st.integers(0, 300))
def test_gather_scatter_through_bounded_staging(
        case: tuple[Pair, tuple[int, ...], list[int], list[int]], extra: int) -> None:
    pair, layers, src_ids, dst_ids = case
    expected = pair.expected_after(layers, src_ids, dst_ids, snapshot(pair.dst))
    staging = max(pair.src.layout.tensors[i].block_bytes for i in layers) + extra
    staged_transfer(pair, layers, src_ids, dst_ids, staging, "torch")
    assert_bytes_equal(pair.dst, expected)


def test_gather_writes_canonical_bytes_and_nothing_past_the_chunk() -> None:
    kv = fill(torch.empty(2, 6, 3, dtype=torch.float16))
    pool = BlockPool([kv], block_dim=1)
    chunk = whole_chunk(pool.layout, (0,), 2)
    out = torch.full((chunk.nbytes + 8,), 7, dtype=torch.uint8)
    gather(pool, (4, 1), chunk, out)
    assert torch.equal(out[:chunk.nbytes], torch.cat([block_bytes_of(kv, 1, 4),
                                                       block_bytes_of(kv, 1, 1)]))
    assert out[chunk.nbytes:].tolist() == [7] * 8


def test_gather_scatter_buffer_errors() -> None:
    pool = BlockPool([torch.zeros(4, 8)], block_dim=0)
    chunk = whole_chunk(pool.layout, (0,), 2)
    with pytest.raises(ValueError, match="holds 63 bytes"):
        gather(pool, (0, 1), chunk, torch.empty(63, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        scatter(pool, (0, 1), chunk, torch.empty(64))
    with pytest.raises(ValueError, match="does not fit"):
        gather(pool, (0,), chunk, torch.empty(64, dtype=torch.uint8))
    with pytest.raises(ValueError, match="method"):
        gather(pool, (0, 1), chunk, torch.empty(64, dtype=torch.uint8),
               method="fast")  # type: ignore[arg-type]


@fast
@given(transfers())
def test_copy_runs_torch_path(case: tuple[Pair, tuple[int, ...], list[int], list[int]]) -> None:
    pair, layers, src_ids, dst_ids = case
    expected = pair.expected_after(layers, src_ids, dst_ids, snapshot(pair.dst))
    copy_runs(pair.src, pair.dst, layers, merge_runs(src_ids, dst_ids), method="torch")
    assert_bytes_equal(pair.dst, expected)


def test_copy_runs_argument_errors() -> None:
    a = BlockPool([torch.zeros(4, 8)], block_dim=0)
    with pytest.raises(ValueError, match="do not fit"):
        copy_runs(a, BlockPool([torch.zeros(4, 9)], block_dim=0), (0,), ((0, 0, 1),))
    with pytest.raises(ValueError, match=r"run \(3, 0, 2\) is outside"):
        copy_runs(a, BlockPool([torch.zeros(9, 8)], block_dim=0), (0,), ((3, 0, 2),))
    with pytest.raises(ValueError, match="pointers"):
        MappedPool(a.layout, (1, 2), torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CuPy"):
        copy_runs(a, a, (0,), ((0, 1, 1),), method="kernel")
    assert not kernel_available(torch.device("cpu"))


def test_a_peer_pool_must_lie_inside_the_memory_its_regions_map() -> None:
    from aiokvpipe._errors import ProtocolError
    from aiokvpipe._pipe_blocks import _mapped_pool

    # vLLM's [2, num_blocks, ...] laid out with the block dimension outermost in memory
    t = torch.zeros(8, 2, 4, 3).transpose(0, 1)
    layout = BlockPool([t, torch.zeros(2, 8, 4, 3)], block_dim=1).layout
    span = 2 * 8 * 4 * 3 * 4
    dev = torch.device("cpu")
    mapped = _mapped_pool(layout, [(4096, span), (1 << 20, span + 9)], dev)
    assert mapped.data_ptrs == (4096, 1 << 20)
    with pytest.raises(ProtocolError, match="spans 768 bytes"):
        _mapped_pool(layout, [(4096, span), (1 << 20, span - 1)], dev)
    with pytest.raises(ProtocolError, match="placed 1 tensors"):
        _mapped_pool(layout, [(4096, span)], dev)


# -- the kernel's piece tables, applied on the host -------------------------------------------


def apply_on_host(table: torch.Tensor) -> None:
    """What the CUDA kernel does with a launch plan's pieces, with memmove on CPU memory."""
    for src, dst, n in table.tolist():
        assert 0 < n <= _blocks_move.MAX_PIECE_BYTES
        ctypes.memmove(dst, src, n)


def check_disjoint(table: torch.Tensor, column: int) -> None:
    spans = sorted((a, a + n) for a, n in zip(table[:, column].tolist(), table[:, 2].tolist(),
                                              strict=True))
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start


@fast
@given(case=transfers(), piece=st.sampled_from([16, 24, 64, 1 << 16]))
def test_runs_table_is_a_per_block_copy(
        case: tuple[Pair, tuple[int, ...], list[int], list[int]], piece: int) -> None:
    pair, layers, src_ids, dst_ids = case
    expected = pair.expected_after(layers, src_ids, dst_ids, snapshot(pair.dst))
    runs = merge_runs(src_ids, dst_ids)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(_blocks_move, "MAX_PIECE_BYTES", piece)
        if runs:
            s_idx, d_idx = _blocks_move._expand_runs(runs)
            table = _blocks_move._runs_table(pair.src, pair.dst, layers, s_idx, d_idx).flat()
            assert int(table[:, 2].sum()) == len(src_ids) * pair.src.layout.block_bytes(layers)
            check_disjoint(table, 1)
            apply_on_host(table)
    assert_bytes_equal(pair.dst, expected)


@fast
@given(case=transfers(), extra=st.integers(0, 300))
def test_staged_tables_gather_and_scatter(
        case: tuple[Pair, tuple[int, ...], list[int], list[int]], extra: int) -> None:
    pair, layers, src_ids, dst_ids = case
    expected = pair.expected_after(layers, src_ids, dst_ids, snapshot(pair.dst))
    staging = max(pair.src.layout.tensors[i].block_bytes for i in layers) + extra
    buf = torch.empty(staging, dtype=torch.uint8)
    for chunk in iter_chunks(pair.src.layout, layers, len(src_ids), staging):
        fill(buf, 0x3C)
        out = _blocks_move._staged_table(pair.src, src_ids, chunk, buf.data_ptr(), False).flat()
        check_disjoint(out, 1)
        apply_on_host(out)
        reference = torch.empty_like(buf)
        gather(pair.src, src_ids, chunk, reference, method="torch")
        assert torch.equal(buf[:chunk.nbytes], reference[:chunk.nbytes])
        into = _blocks_move._staged_table(pair.dst, dst_ids, chunk, buf.data_ptr(), True).flat()
        check_disjoint(into, 1)
        apply_on_host(into)
    assert_bytes_equal(pair.dst, expected)


def test_tables_merge_runs_of_blocks_into_few_pieces() -> None:
    src = BlockPool([torch.zeros(2, 64, 16, dtype=torch.uint8) for _ in range(3)], block_dim=1)
    dst = BlockPool([torch.zeros(2, 32, 16, dtype=torch.uint8) for _ in range(3)], block_dim=1)
    s_idx, d_idx = _blocks_move._expand_runs(((10, 0, 8), (40, 20, 4)))
    plan = _blocks_move._runs_table(src, dst, (0, 2), s_idx, d_idx)
    # Two runs × two segments (K and V), shared by both tensors: 4 pieces, not 48.
    assert plan.pieces.shape[0] == 4
    assert plan.jobs.shape[0] == 2
    table = plan.flat()
    assert table.shape[0] == 8
    assert sorted(table[:, 2].tolist()) == [64] * 4 + [128] * 4


def test_mixed_segment_sizes_cut_at_both_sides_boundaries() -> None:
    # [2, N, 3] int8 (two 3-byte segments) → [N, 2, 3] (one 6-byte segment): gcd 3.
    src = BlockPool([fill(torch.empty(2, 5, 3, dtype=torch.int8))], block_dim=1)
    dst = BlockPool([fill(torch.empty(4, 2, 3, dtype=torch.int8), SENTINEL)], block_dim=0)
    s_idx, d_idx = _blocks_move._expand_runs(((1, 2, 2),))
    table = _blocks_move._runs_table(src, dst, (0,), s_idx, d_idx).flat()
    assert math.gcd(*table[:, 2].tolist()) == 3
    apply_on_host(table)
    assert torch.equal(dst.tensors[0][2:4], src.tensors[0][:, 1:3].transpose(0, 1))
    assert (raw(dst.tensors[0][:2]) == SENTINEL).all()


# -- CUDA: the kernel itself ----------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def to_cuda(pair: Pair) -> Pair:
    def move(pool: BlockPool) -> BlockPool:
        # Same strides on the device: empty_strided, then copy the bytes.
        out = []
        for t in pool.tensors:
            c = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
            c.copy_(t)
            out.append(c)
        return BlockPool(out, block_dim=pool.layout.tensors[0].block_dim)
    return Pair(move(pair.src), move(pair.dst))


@pytest.mark.cuda
@cuda
@settings(max_examples=60, derandomize=True, deadline=None, database=None)
@given(case=transfers(), extra=st.integers(0, 300), pinned=st.booleans())
def test_cuda_kernel_paths_equal_the_per_block_copy(
        case: tuple[Pair, tuple[int, ...], list[int], list[int]], extra: int,
        pinned: bool) -> None:
    pytest.importorskip("cupy")
    host, layers, src_ids, dst_ids = case
    expected = host.expected_after(layers, src_ids, dst_ids, snapshot(host.dst))
    for method in ("kernel", "torch"):
        pair = to_cuda(host)
        copy_runs(pair.src, pair.dst, layers, merge_runs(src_ids, dst_ids), method=method)
        torch.cuda.synchronize()
        assert_bytes_equal(pair.dst, expected)

        pair = to_cuda(host)
        staging = max(pair.src.layout.tensors[i].block_bytes for i in layers) + extra
        buf = (torch.empty(staging, dtype=torch.uint8).pin_memory() if pinned
               else torch.empty(staging, dtype=torch.uint8, device="cuda"))
        for chunk in iter_chunks(pair.src.layout, layers, len(src_ids), staging):
            gather(pair.src, src_ids, chunk, buf, method=method)  # type: ignore[arg-type]
            scatter(pair.dst, dst_ids, chunk, buf, method=method)  # type: ignore[arg-type]
        torch.cuda.synchronize()
        assert_bytes_equal(pair.dst, expected)


@pytest.mark.cuda
@cuda
def test_cuda_copy_from_a_mapped_pool_on_a_side_stream() -> None:
    pytest.importorskip("cupy")
    src = BlockPool([torch.randn(2, 64, 16, 8, 128, device="cuda").to(torch.bfloat16)
                     for _ in range(4)], block_dim=1)
    dst = BlockPool([torch.zeros(32, 2, 16, 8, 128, dtype=torch.bfloat16, device="cuda")
                     for _ in range(4)], block_dim=0)
    mapped = MappedPool(src.layout, tuple(t.data_ptr() for t in src.tensors),
                        torch.device("cuda", torch.cuda.current_device()))
    assert torch.equal(mapped.byte_view(1), raw(src.tensors[1]))
    src_ids, dst_ids = [5, 6, 7, 40, 2], [0, 1, 2, 30, 9]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    copy_runs(mapped, dst, (0, 1, 3), merge_runs(src_ids, dst_ids), stream=side)
    side.synchronize()
    for i in range(4):
        for s, d in zip(src_ids, dst_ids, strict=True):
            want = src.tensors[i][:, s] if i != 2 else torch.zeros_like(src.tensors[i][:, s])
            assert torch.equal(dst.tensors[i][d], want)
        untouched = sorted(set(range(32)) - set(dst_ids))
        assert (dst.tensors[i][untouched] == 0).all()


@pytest.mark.cuda
@cuda
def test_cuda_repeated_copies_reuse_their_plan_but_never_across_pools() -> None:
    """copy_runs on the kernel checks and plans a call once per (layouts, pools, runs,
    layers, stream): a later pool at the same address, other layers, or runs outside a
    smaller pool must not reuse it, and the cache must not keep a pool alive."""
    import gc
    import weakref

    pytest.importorskip("cupy")
    src = BlockPool([torch.randn(2, 16, 4, 8, device="cuda") for _ in range(3)], block_dim=1)
    runs = merge_runs([3, 4, 9], [0, 1, 5])

    def fresh_dst(blocks: int = 8) -> BlockPool:
        return BlockPool([torch.zeros(2, blocks, 4, 8, device="cuda") for _ in range(3)],
                         block_dim=1)

    def check(dst: BlockPool, layers: tuple[int, ...]) -> None:
        torch.cuda.synchronize()
        for i in range(3):
            for s, d in ((3, 0), (4, 1), (9, 5)):
                want = src.tensors[i][:, s] if i in layers else torch.zeros_like(
                    src.tensors[i][:, s])
                assert torch.equal(dst.tensors[i][:, d], want)

    dst = fresh_dst()
    checks = 0
    check_runs = _blocks_move._check_runs

    def counting(*args: object) -> None:
        nonlocal checks
        checks += 1
        check_runs(*args)  # type: ignore[arg-type]

    _blocks_move._check_runs = counting  # type: ignore[assignment]
    try:
        copy_runs(src, dst, (0, 2), runs, method="kernel")
        copy_runs(src, dst, (0, 2), runs, method="kernel")  # the cached plan
    finally:
        _blocks_move._check_runs = check_runs
    assert checks == 1
    check(dst, (0, 2))
    gone = weakref.ref(dst)
    del dst
    gc.collect()
    assert gone() is None  # the plan holds no pool
    torch.cuda.synchronize()
    dst = fresh_dst()  # the caching allocator may hand out the same addresses
    copy_runs(src, dst, (1,), runs, method="kernel")
    check(dst, (1,))
    with pytest.raises(ValueError, match="outside the pools"):
        copy_runs(src, fresh_dst(4), (1,), runs, method="kernel")


@pytest.mark.cuda
@cuda
def test_cuda_a_new_plan_is_uploaded_on_the_stream_that_copies() -> None:
    """The tables of a call planned anew go up on the stream the kernel runs on: uploaded on
    a busy current stream, the kernel on a side stream read them before they arrived (an
    illegal memory access on the H200)."""
    pytest.importorskip("cupy")
    src = BlockPool([torch.randn(2, 64, 4, 8, device="cuda") for _ in range(2)], block_dim=1)
    dst = BlockPool([torch.zeros(2, 64, 4, 8, device="cuda") for _ in range(2)], block_dim=1)
    src_ids, dst_ids = [7, 3, 40, 41, 9], [0, 63, 5, 6, 20]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    torch.cuda._sleep(200_000_000)  # the current stream is busy for a while
    copy_runs(src, dst, (0, 1), merge_runs(src_ids, dst_ids), stream=side, method="kernel")
    side.synchronize()
    for i in range(2):
        for s_, d in zip(src_ids, dst_ids, strict=True):
            assert torch.equal(dst.tensors[i][:, d], src.tensors[i][:, s_])
    torch.cuda.synchronize()


@pytest.mark.cuda
@cuda
def test_cuda_odd_sizes_take_the_narrow_copies() -> None:
    pytest.importorskip("cupy")
    # 3-byte segments: neither 16- nor 4-byte aligned.
    src = BlockPool([fill(torch.empty(2, 9, 3, dtype=torch.int8, device="cuda"))], block_dim=1)
    dst = BlockPool([fill(torch.empty(9, 2, 3, dtype=torch.int8, device="cuda"), SENTINEL)],
                    block_dim=0)
    copy_runs(src, dst, (0,), merge_runs([1, 2, 8], [3, 4, 0]), method="kernel")
    torch.cuda.synchronize()
    for s, d in ((1, 3), (2, 4), (8, 0)):
        assert torch.equal(dst.tensors[0][d], src.tensors[0][:, s])
    assert (raw(dst.tensors[0][[1, 2, 5, 6, 7, 8]]) == SENTINEL).all()


def test_segment_dataclasses() -> None:
    c = Chunk((Segment(0, 0, 2),), 8)
    assert c == Chunk((Segment(0, 0, 2),), 8)
    assert hash(c) == hash(Chunk((Segment(0, 0, 2),), 8))


async def test_a_cancelled_waiter_leaves_the_kernels_preparation_to_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The thread and futures only (no GPU needed): the compile itself is held by an event.
    release = threading.Event()
    calls: list[int] = []

    def compile_kernel(index: int, done: Future[None]) -> None:
        calls.append(index)
        release.wait(10)
        done.set_result(None)

    monkeypatch.setattr(_blocks_move, "_compile_kernel", compile_kernel)
    monkeypatch.setattr(_blocks_move, "_prepared", {})
    dev = torch.device("cuda", 0)
    first = asyncio.ensure_future(_blocks_move.prepare_kernel(dev))
    second = asyncio.ensure_future(_blocks_move.prepare_kernel(dev))
    await asyncio.sleep(0)  # both are now waiting for the one preparation
    assert not _blocks_move.kernel_prepared(dev)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    release.set()
    await asyncio.wait_for(second, 10)  # not cancelled with the first
    assert _blocks_move.kernel_prepared(dev) and calls == [0]
    await _blocks_move.prepare_kernel(dev)  # done: nothing more
    assert calls == [0]


async def test_a_thread_that_cannot_start_leaves_no_preparation_behind(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A preparation recorded before its thread started, when the start fails, was never
    # completed: every later block call of the device waited for it forever.
    calls: list[int] = []

    def compile_kernel(index: int, done: Future[None]) -> None:
        calls.append(index)
        done.set_result(None)

    class NoThread(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(_blocks_move, "_compile_kernel", compile_kernel)
    monkeypatch.setattr(_blocks_move, "_prepared", {})
    dev = torch.device("cuda", 0)
    with monkeypatch.context() as m:
        m.setattr(_blocks_move.threading, "Thread", NoThread)
        await asyncio.wait_for(_blocks_move.prepare_kernel(dev), 5)  # returns, raises nothing
    assert not _blocks_move.kernel_prepared(dev) and calls == []
    await asyncio.wait_for(_blocks_move.prepare_kernel(dev), 5)  # threads start again
    assert _blocks_move.kernel_prepared(dev) and calls == [0]
