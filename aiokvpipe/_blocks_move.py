"""Moving blocks: byte views for sockets, gather/scatter through staging, pool-to-pool copies.

Every plane carries a transfer as the same byte stream, the *canonical order*: for each
tensor of the transfer (ascending index), for each block id in the caller's order, the
block's bytes in row-major order of its block shape (``aiokvpipe._blocks``). So two fitting
pools with different strides or ``block_dim`` exchange blocks correctly.

* CPU pools (tcp): :func:`run_views` gives memoryviews over the blocks themselves, for
  ``sendmsg`` and ``recv_into``; adjacent memory is one view.
* Staged transfers (nccl, tcp with CUDA pools): :func:`iter_chunks` cuts a transfer into
  chunks that fit a staging buffer -- the same chunks on both ends, since they depend only
  on the tensors' block sizes, the number of ids and the staging size -- and :func:`gather`
  / :func:`scatter` copy one chunk between the pool and the buffer.
* Pool to pool (ipc): :func:`copy_runs` copies from a peer's pool mapped into this process
  (:class:`MappedPool`) straight into the local pool.

On CUDA each of these is ONE kernel launch (CuPy ``RawKernel``: 16-byte vectorised copies,
one thread block per piece of at most 64 KiB), enqueued on the caller's stream
(``stream=None``: the current one); nothing synchronises the host. The kernel reads a small
table: per tensor its two base addresses, and one list of ``(src_offset, dst_offset,
nbytes)`` pieces shared by all tensors of the same geometry. On an H200 it moved the 512 MiB
of an 8B-Llama request's blocks (256 random ids of 4,096) at 0.88 × a contiguous copy.
Without CuPy, or with ``method="torch"``, the same copies run as
``index_select``/``index_copy_`` over byte views (a second pass through memory where a
block is more than one segment). None of these functions await anything; cancellation is
the caller's business (what is enqueued runs to completion).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import functools
import itertools
import logging
import math
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import torch

from ._blocks import BlockPool, PoolLayout, Run, TensorLayout, check_fits
from ._cuda import device_index, short_gil_turns

log = logging.getLogger("aiokvpipe")

__all__ = [
    "MAX_PIECE_BYTES",
    "Chunk",
    "Segment",
    "MappedPool",
    "Method",
    "run_views",
    "iter_chunks",
    "gather",
    "scatter",
    "copy_runs",
    "kernel_available",
    "kernel_prepared",
    "prepare_kernel",
]

#: Pieces longer than this are split, so one thread block never copies more (load balance).
MAX_PIECE_BYTES: Final = 64 * 1024
_THREADS: Final = 256
_MAX_GRID: Final = 1 << 20

Method = Literal["auto", "kernel", "torch"]
Side = Literal["src", "dst"]


# -- CPU pools: memoryviews -----------------------------------------------------------------


def run_views(pool: BlockPool, tensor_index: int, runs: Sequence[Run], side: Side
              ) -> list[memoryview]:
    """Writable memoryviews over the blocks of ``runs`` in tensor ``tensor_index`` of a CPU
    pool, in canonical order (run by run, block by block, each block's segments in order);
    physically adjacent pieces are one view. ``side`` says which start of each
    ``(src_start, dst_start, length)`` run is this pool's.

    Zero-copy: the views alias the pool's memory and do not keep it alive (hold the pool).
    Raises ``TypeError`` for a CUDA pool, ``ValueError`` for a run outside the pool.
    """
    if pool.device.type != "cpu":
        raise TypeError("run_views needs a CPU pool (stage CUDA pools with gather/scatter)")
    if side not in ("src", "dst"):
        raise ValueError(f"side is 'src' or 'dst', not {side!r}")
    tl = pool.layout.tensors[tensor_index]
    # Only this pool's column: the other is the peer's pool, or the positions 0..n-1 of a
    # packed stream, which a source that repeats ids makes longer than this pool.
    if side == "src":
        _check_runs(runs, pool.num_blocks, sys.maxsize)
    else:
        _check_runs(runs, sys.maxsize, pool.num_blocks)
    col = 0 if side == "src" else 1
    stride, seg, offsets = tl.block_stride_bytes, tl.segment_bytes, tl.segment_offsets
    # Every segment's start, in canonical order (a comprehension: this runs for every
    # tensor of every transfer, thousands of segments each).
    starts = [b * stride + off for run in runs for b in range(run[col], run[col] + run[2])
              for off in offsets]
    if not starts:
        return []
    t = pool.tensors[tensor_index]
    whole = memoryview((ctypes.c_ubyte * tl.span_bytes).from_address(t.data_ptr())).cast("B")
    if not any(b == a + seg for a, b in zip(starts, starts[1:])):  # nothing adjacent
        return [whole[a:a + seg] for a in starts]
    spans: list[list[int]] = []
    for o in starts:
        if spans and spans[-1][1] == o:
            spans[-1][1] = o + seg
        else:
            spans.append([o, o + seg])
    return [whole[a:b] for a, b in spans]


# -- chunks of a staged transfer ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Segment:
    """Blocks ``ids[start:stop]`` of tensor ``tensor`` (an index into the pool)."""

    tensor: int
    start: int
    stop: int


@dataclass(frozen=True, slots=True)
class Chunk:
    """Consecutive segments of the canonical stream; ``nbytes`` their bytes together."""

    segments: tuple[Segment, ...]
    nbytes: int


def iter_chunks(layout: PoolLayout, layers: Sequence[int], count: int, staging_bytes: int
                ) -> Iterator[Chunk]:
    """Cut the transfer of ``count`` blocks of tensors ``layers`` into chunks of at most
    ``staging_bytes``, in canonical order, each as full as whole blocks allow. A block of one
    tensor larger than ``staging_bytes`` is a chunk of its own (its staging is that large).

    Both ends of a transfer with fitting pools get the same chunks from the same
    ``staging_bytes`` (agree on it first).
    """
    sizes = [layout.tensors[i].block_bytes for i in layers]
    segments: list[Segment] = []
    used = 0
    for tensor, size in zip(layers, sizes, strict=True):
        pos = 0
        while pos < count:
            n = min(count - pos, max(staging_bytes - used, 0) // size)
            if n == 0:
                if segments:
                    yield Chunk(tuple(segments), used)
                    segments, used = [], 0
                    continue
                n = 1  # (it fits no staging: alone)
            segments.append(Segment(tensor, pos, pos + n))
            used += n * size
            pos += n
    if segments:
        yield Chunk(tuple(segments), used)


def whole_chunk(layout: PoolLayout, layers: Sequence[int], count: int) -> Chunk:
    """One chunk holding the whole transfer (no staging bound)."""
    segs = tuple(Segment(i, 0, count) for i in layers)
    return Chunk(segs, count * layout.block_bytes(layers))


# -- the pool-to-pool source ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MappedPool:
    """A peer's pool mapped into this process (CUDA IPC): its layout and, per tensor, the
    address of the tensor's first element as seen here (on ``device``)."""

    layout: PoolLayout
    data_ptrs: tuple[int, ...]
    device: torch.device

    def __post_init__(self) -> None:
        if len(self.data_ptrs) != len(self.layout.tensors):
            raise ValueError(f"{len(self.data_ptrs)} pointers for "
                             f"{len(self.layout.tensors)} tensors")

    @property
    def num_blocks(self) -> int:
        return self.layout.num_blocks

    def byte_view(self, i: int) -> torch.Tensor:
        """Tensor ``i`` as a uint8 tensor of shape ``(*shape, itemsize)`` over the mapped
        memory (no copy; valid while the mapping is)."""
        tl = self.layout.tensors[i]
        if self.device.type == "cpu":  # host memory mapped here (shared memory, a test)
            raw = (ctypes.c_char * tl.span_bytes).from_address(self.data_ptrs[i])
            return torch.frombuffer(raw, dtype=torch.uint8).as_strided(
                (*tl.shape, tl.itemsize), (*(st * tl.itemsize for st in tl.strides), 1))
        iface = {
            "shape": (*tl.shape, tl.itemsize),
            "strides": (*(s * tl.itemsize for s in tl.strides), 1),
            "typestr": "|u1",
            "data": (self.data_ptrs[i], False),
            "version": 3,
        }
        holder = type("_Mapped", (), {"__cuda_array_interface__": iface})()
        return torch.as_tensor(holder, device=self.device)


Source = BlockPool | MappedPool


# -- gather / scatter / copy_runs -----------------------------------------------------------


def gather(pool: Source, ids: Sequence[int], chunk: Chunk, out: torch.Tensor, *,
           stream: torch.cuda.Stream | None = None, method: Method = "auto") -> None:
    """Copy ``chunk``'s blocks (positions into ``ids``) from ``pool`` (local, or a peer's
    mapped into this process) into ``out[:chunk.nbytes]`` in canonical order.

    ``out``: a contiguous 1-D uint8 tensor on the pool's device (or, for a CUDA pool, in
    pinned host memory) of at least ``chunk.nbytes`` bytes. Enqueued on ``stream``; returns
    without waiting. ``ValueError``/``TypeError`` for a wrong buffer.
    """
    _check_buffer(pool, out, chunk.nbytes, "out")
    _move_staged(pool, ids, chunk, out, to_pool=False, stream=stream, method=method)


def scatter(pool: BlockPool, ids: Sequence[int], chunk: Chunk, src: torch.Tensor, *,
            stream: torch.cuda.Stream | None = None, method: Method = "auto") -> None:
    """The inverse of :func:`gather`: write ``src[:chunk.nbytes]`` into ``chunk``'s blocks
    of ``pool``. Nothing outside those blocks is written. ``ids`` should be destination ids
    (no repeats: a repeated id would be written twice, in no set order)."""
    _check_buffer(pool, src, chunk.nbytes, "src")
    _move_staged(pool, ids, chunk, src, to_pool=True, stream=stream, method=method)


def copy_runs(src: Source, dst: BlockPool, layers: Sequence[int], runs: Sequence[Run], *,
              stream: torch.cuda.Stream | None = None, method: Method = "auto") -> None:
    """Copy the blocks of ``runs`` (``(src_start, dst_start, length)``, from
    :func:`~aiokvpipe._blocks.merge_runs`) of tensors ``layers`` from ``src`` into ``dst``:
    on CUDA one kernel over every run of every tensor, enqueued on ``stream``.

    ``src`` is a local :class:`~aiokvpipe.BlockPool` or a :class:`MappedPool`; it must fit
    ``dst`` (``ValueError`` otherwise, as for a run outside either pool). Returns without
    waiting; the source must not change and stay mapped until the stream has run the copy.
    """
    if isinstance(src, MappedPool) and src.device != dst.device:
        raise ValueError(f"the mapped pool is on {src.device}, the destination on "
                         f"{dst.device}")
    if isinstance(src, BlockPool) and src.device != dst.device:
        raise ValueError(f"copy_runs copies within one device, not {src.device} → "
                         f"{dst.device}")
    kind = _choose(dst.device, method) if runs and layers else "torch"
    if kind == "kernel":
        _prepared_launch(src, dst, tuple(layers), runs, stream if stream is not None
                         else torch.cuda.current_stream(dst.device)).run()
        return
    check_fits(dst.layout, src.layout)
    _check_runs(runs, src.num_blocks, dst.num_blocks)
    if not runs or not layers:
        return
    with _on(stream, dst.device):
        s_idx, d_idx = _expand_runs(runs)
        s_dev, d_dev = _to_device(s_idx, dst.device), _to_device(d_idx, dst.device)
        for i in layers:
            source = _tensor_bytes(src, i).movedim(src.layout.tensors[i].block_dim, 0)
            target = _byte_view(dst.tensors[i], dst.layout.tensors[i]).movedim(
                dst.layout.tensors[i].block_dim, 0)
            target.index_copy_(0, d_dev, source.index_select(0, s_dev))


def kernel_available(device: torch.device) -> bool:
    """Whether the copy kernel can run on ``device`` (a CUDA device and CuPy)."""
    return device.type == "cuda" and _kernel() is not None


#: Per device index: done once CuPy is imported and the copy kernel compiled there.
_prepared: dict[int, concurrent.futures.Future[None]] = {}
_prepared_lock = threading.Lock()


def kernel_prepared(device: torch.device) -> bool:
    """Whether :func:`prepare_kernel` has nothing (more) to do for ``device``."""
    if device.type != "cuda":
        return True
    fut = _prepared.get(device_index(device))
    return fut is not None and fut.done()


async def prepare_kernel(device: torch.device) -> None:
    """Import CuPy and compile the copy kernel for ``device`` in a worker thread, once per
    process and device; returns at once when that is done.

    Without it the first block transfer did both on the event loop: CuPy's import (hundreds
    of ms in a process that had not imported it) and NVRTC's compile or its disk cache. A
    failure is not raised here: the kernel is then unavailable and the torch path runs.
    Cancelling one waiter leaves the preparation, and every other waiter, alone."""
    if device.type != "cuda":
        return
    index = device_index(device)
    fut = _prepared.get(index)
    if fut is None:
        with _prepared_lock:
            fut = _prepared.get(index)
            if fut is None:
                fut = concurrent.futures.Future()
                fut.set_running_or_notify_cancel()  # a waiter's cancel cannot cancel it now
                try:
                    threading.Thread(target=_compile_kernel, args=(index, fut), daemon=True,
                                     name="aiokvpipe-kernel").start()
                except RuntimeError as exc:
                    # No thread to be had (a process at its limit). Kept only once started:
                    # a future that no thread completes would hold every later block call
                    # of this device. The first launch makes the kernel instead, on the
                    # loop as before; a later call tries a thread again.
                    log.warning("cannot start a thread to make the block copy kernel on "
                                "cuda:%d (%s): it is made at its first launch", index, exc)
                    return
                _prepared[index] = fut
    if not fut.done():
        with short_gil_turns():
            await asyncio.wrap_future(fut)


def _compile_kernel(index: int, done: concurrent.futures.Future[None]) -> None:
    try:
        kernel = _kernel()
        compile_now = getattr(kernel, "compile", None)  # else the first launch compiles
        if compile_now is not None:
            import cupy

            with cupy.cuda.Device(index):
                compile_now()
    except Exception as exc:  # noqa: BLE001 - the torch path runs instead
        log.info("the block copy kernel does not compile on cuda:%d (%r): block transfers "
                 "use torch's indexing", index, exc)
        _kernel_cache[:] = [None]
    finally:
        done.set_result(None)


# -- internals ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Geom:
    """Where a block's segments lie, relative to a base address."""

    block_bytes: int
    block_stride: int
    segment_bytes: int
    segment_offsets: tuple[int, ...]

    @staticmethod
    def of(t: TensorLayout) -> _Geom:
        return _Geom(t.block_bytes, t.block_stride_bytes, t.segment_bytes, t.segment_offsets)

    @staticmethod
    def packed(block_bytes: int) -> _Geom:
        """Blocks back to back, as in a staging buffer."""
        return _Geom(block_bytes, block_bytes, block_bytes, (0,))


#: Per pool layout (by identity, the layout kept for the check), its tensors' geometries:
#: a request touches every tensor of a pool, so this is looked up once, not once per tensor.
_GEOMS: dict[int, tuple[PoolLayout, tuple[_Geom, ...]]] = {}


def _geoms(layout: PoolLayout) -> tuple[_Geom, ...]:
    entry = _GEOMS.get(id(layout))
    if entry is None or entry[0] is not layout:
        if len(_GEOMS) >= 256:
            _GEOMS.clear()
        entry = _GEOMS[id(layout)] = (layout, tuple(map(_Geom.of, layout.tensors)))
    return entry[1]


#: (src geometry, src base address, dst geometry, dst base address, key of the id pairs)
_Job = tuple[_Geom, int, _Geom, int, Any]


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one kernel launch copies. ``jobs`` (int64 ``[J, 4]``): per job a source and a
    destination base address and the ``[first, first+count)`` rows of ``pieces`` (int64
    ``[R, 3]``: source offset, destination offset, bytes) to copy relative to them."""

    jobs: torch.Tensor
    pieces: torch.Tensor

    def flat(self) -> torch.Tensor:
        """Every copy as absolute ``(src_ptr, dst_ptr, nbytes)`` rows (for tests)."""
        rows = []
        for sb, db, first, count in self.jobs.tolist():
            rel = self.pieces[first:first + count]
            rows.append(rel + torch.tensor([sb, db, 0], dtype=torch.int64))
        return torch.cat(rows) if rows else torch.empty(0, 3, dtype=torch.int64)


def _plan(jobs: Sequence[_Job], pairs: dict[Any, tuple[torch.Tensor, torch.Tensor]]) -> _Plan:
    """The launch plan copying every job's blocks.

    Jobs with the same geometries and id pairs share one relative piece table (the tensors
    of a pool usually all look alike): the host work is a few vectorised ops per kind of
    tensor, and the table sent to the device is as small as one tensor's pieces.
    """
    tables: dict[tuple[_Geom, _Geom, Any], tuple[int, int]] = {}
    parts: list[torch.Tensor] = []
    rows = 0
    job_rows = []
    for sg, sb, dg, db, key in jobs:
        where = tables.get((sg, dg, key))
        if where is None:
            rel = _relative_pieces(sg, dg, *pairs[key])
            where = tables[sg, dg, key] = (rows, rel.shape[0])
            parts.append(rel)
            rows += rel.shape[0]
        job_rows.append((sb, db, *where))
    pieces = torch.cat(parts) if parts else torch.empty(0, 3, dtype=torch.int64)
    return _Plan(torch.tensor(job_rows, dtype=torch.int64).reshape(-1, 4), pieces)


def _relative_pieces(sg: _Geom, dg: _Geom, s_idx: Any, d_idx: Any) -> torch.Tensor:
    """Pieces (offsets from the bases) copying blocks ``s_idx[i]`` → ``d_idx[i]``: each
    block cut where either side's segments end, then neighbours adjacent on both sides
    merged, then split to at most :data:`MAX_PIECE_BYTES`.

    In NumPy (the kernel needs CuPy, which brings it): a request's new block ids are planned
    on the host before its copy can start, and on arrays this small torch's per-op overhead
    made the plan cost more than the copy (1.1 ms for 256 ids on the 2-core VM; NumPy
    0.1 ms).
    """
    import numpy as np

    g = math.gcd(sg.segment_bytes, dg.segment_bytes)
    pos = np.arange(0, sg.block_bytes, g, dtype=np.int64)  # [k] offsets in a block
    s_rel = np.asarray(sg.segment_offsets, dtype=np.int64)[pos // sg.segment_bytes] \
        + pos % sg.segment_bytes
    d_rel = np.asarray(dg.segment_offsets, dtype=np.int64)[pos // dg.segment_bytes] \
        + pos % dg.segment_bytes
    # Piece-major (all blocks' first piece, then all second pieces...): consecutive blocks'
    # same pieces are neighbours in the list, so runs of blocks merge.
    # ids: int64 arrays, or CPU tensors (NumPy reads them in place)
    s_ids, d_ids = np.asarray(s_idx, dtype=np.int64), np.asarray(d_idx, dtype=np.int64)
    src = (s_rel[:, None] + s_ids[None, :] * sg.block_stride).reshape(-1)
    dst = (d_rel[:, None] + d_ids[None, :] * dg.block_stride).reshape(-1)
    if src.size == 0:
        return torch.empty(0, 3, dtype=torch.int64)
    joined = np.empty(src.size, dtype=bool)
    joined[0] = False
    joined[1:] = (src[1:] == src[:-1] + g) & (dst[1:] == dst[:-1] + g)
    starts = np.flatnonzero(~joined)
    lengths = np.diff(starts, append=src.size) * g
    src, dst = src[starts], dst[starts]
    # Split long pieces.
    parts = (lengths + MAX_PIECE_BYTES - 1) // MAX_PIECE_BYTES
    if int(parts.max()) > 1:
        first = np.cumsum(parts) - parts
        which = np.repeat(np.arange(parts.size), parts)
        skip = (np.arange(int(parts.sum())) - first[which]) * MAX_PIECE_BYTES
        src, dst = src[which] + skip, dst[which] + skip
        lengths = np.minimum(lengths[which] - skip, MAX_PIECE_BYTES)
    return torch.from_numpy(np.stack([src, dst, lengths], axis=1))


def _expand_runs(runs: Sequence[Run]) -> tuple[torch.Tensor, torch.Tensor]:
    src = [a + k for a, _, n in runs for k in range(n)]
    dst = [b + k for _, b, n in runs for k in range(n)]
    return torch.tensor(src, dtype=torch.int64), torch.tensor(dst, dtype=torch.int64)


def _expand_runs_np(runs: Sequence[Run]) -> tuple[Any, Any]:
    """:func:`_expand_runs` as NumPy arrays, without a Python loop over the blocks."""
    import numpy as np

    flat = np.fromiter(itertools.chain.from_iterable(runs), dtype=np.int64,
                       count=3 * len(runs)).reshape(-1, 3)
    lengths = flat[:, 2]
    # each block's place in its run: 0, 1, ... restarting at every run
    step = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.repeat(flat[:, 0], lengths) + step, np.repeat(flat[:, 1], lengths) + step


def _move_staged(pool: Source, ids: Sequence[int], chunk: Chunk, buf: torch.Tensor, *,
                 to_pool: bool, stream: torch.cuda.Stream | None, method: Method) -> None:
    layout = pool.layout
    for s in chunk.segments:
        if not (0 <= s.tensor < len(layout.tensors) and 0 <= s.start <= s.stop <= len(ids)):
            raise ValueError(f"chunk segment {s} does not fit the pool and {len(ids)} ids")
    if not chunk.segments:
        return
    idx_of = _segment_ids(ids, chunk)
    kind = _choose(pool.device, method)
    with _on(stream, pool.device):
        if kind == "kernel":
            _launch(_staged_table(pool, ids, chunk, buf.data_ptr(), to_pool), pool.device)
        else:
            offset = 0
            for s in chunk.segments:
                tl = layout.tensors[s.tensor]
                n = s.stop - s.start
                idx = _to_device(idx_of[s.start, s.stop], pool.device)
                view = _tensor_bytes(pool, s.tensor).movedim(tl.block_dim, 0)
                region = buf[offset:offset + n * tl.block_bytes]
                if region.device != pool.device:  # pinned host staging of a CUDA pool
                    if to_pool:
                        view.index_copy_(0, idx, region.to(pool.device, non_blocking=True)
                                         .view(n, *tl.block_shape, tl.itemsize))
                    else:
                        region.copy_(view.index_select(0, idx).reshape(-1), non_blocking=True)
                elif to_pool:
                    view.index_copy_(0, idx, region.view(n, *tl.block_shape, tl.itemsize))
                else:
                    torch.index_select(view, 0, idx,
                                       out=region.view(n, *tl.block_shape, tl.itemsize))
                offset += n * tl.block_bytes


def _segment_ids(ids: Sequence[int], chunk: Chunk) -> dict[tuple[int, int], torch.Tensor]:
    out: dict[tuple[int, int], torch.Tensor] = {}
    for s in chunk.segments:
        if (s.start, s.stop) not in out:
            out[s.start, s.stop] = torch.tensor(ids[s.start:s.stop], dtype=torch.int64)
    return out


def _runs_groups(src: Source, dst: BlockPool, layers: Sequence[int]
                 ) -> dict[tuple[_Geom, _Geom], list[tuple[int, int]]]:
    """:func:`copy_runs`' tensors by geometry (source, destination): per kind of tensor,
    the (source, destination) base addresses. A pool's tensors are usually all alike."""
    src_ptrs, dst_ptrs = _base_ptrs(src), _base_ptrs(dst)
    src_geoms, dst_geoms = _geoms(src.layout), _geoms(dst.layout)
    groups: dict[tuple[_Geom, _Geom], list[tuple[int, int]]] = {}
    for i in layers:
        groups.setdefault((src_geoms[i], dst_geoms[i]), []).append((src_ptrs[i], dst_ptrs[i]))
    return groups


def _runs_table(src: Source, dst: BlockPool, layers: Sequence[int], s_idx: torch.Tensor,
                d_idx: torch.Tensor) -> _Plan:
    """The launch plan of :func:`copy_runs` as one table (what :func:`_launch_runs` runs,
    group by group)."""
    jobs = [(sg, sb, dg, db, 0) for (sg, dg), bases in _runs_groups(src, dst, layers).items()
            for sb, db in bases]
    return _plan(jobs, {0: (s_idx, d_idx)})


#: Tables of recent :func:`copy_runs` calls on the device, by what they hold, device and
#: stream: piece tables by (geometries, runs), so that a request streamed layer by layer
#: plans once, not once per layer; job tables (two addresses per tensor) by their rows, so
#: that calls naming the same tensors upload nothing. A table is only read on the stream that
#: uploaded it (so it is there in time), and once evicted its memory goes back to that
#: stream's pool, reused only after what the stream ran.
_TABLES: dict[str, OrderedDict[tuple[Any, ...], torch.Tensor]] = {
    "pieces": OrderedDict(), "jobs": OrderedDict()}
#: Per kind at most (piece tables reach hundreds of KiB; job tables are a few hundred bytes,
#: and a request sent a layer at a time names 32 or more of them: 8 such requests in flight,
#: 256). Planned calls (_LAUNCHES) keep theirs too.
_MAX_TABLES: Final = {"pieces": 16, "jobs": 1024}
_TABLES_LOCK = threading.Lock()  # pipes on several threads' loops share the cache


def _device_table(kind: str, key: tuple[Any, ...], make: Callable[[], torch.Tensor],
                  device: torch.device, stream: int) -> torch.Tensor:
    """The table ``make()`` builds, on ``device`` (uploaded on ``stream``), cached."""
    key = (*key, device, stream)
    cache = _TABLES[kind]
    with _TABLES_LOCK:
        table = cache.get(key)
        if table is not None:
            cache.move_to_end(key)
            return table
    table = make().pin_memory().to(device, non_blocking=True)
    with _TABLES_LOCK:
        cache[key] = table
        if len(cache) > _MAX_TABLES[kind]:
            cache.popitem(last=False)
    return table


def _pieces_of_runs(sg: _Geom, dg: _Geom, runs: tuple[Run, ...]) -> torch.Tensor:
    return _relative_pieces(sg, dg, *_expand_runs_np(runs))


def _jobs_of(bases: tuple[tuple[int, int], ...], count: int) -> torch.Tensor:
    """Job rows: per tensor its two base addresses and all ``count`` shared pieces."""
    return torch.tensor([(sb, db, 0, count) for sb, db in bases], dtype=torch.int64)


class _Launch:
    """A :func:`copy_runs` call on the kernel, checked and planned: its kernel launches
    (tables on the device, uploaded on its stream) and what it was made from, held so that a
    later call from the same objects can be recognised by identity (ids are not reused while
    an object is held). It holds no pool memory: layouts, base addresses and runs only."""

    __slots__ = ("made_of", "calls", "tables", "device")

    def __init__(self, made_of: tuple[object, ...], device: torch.device) -> None:
        self.made_of = made_of
        self.calls: list[tuple[int, int, int, int, int]] = []
        self.tables: list[torch.Tensor] = []
        self.device = device

    def run(self) -> None:
        for call in self.calls:
            _run_kernel(*call, self.device)


#: Recent :func:`copy_runs` calls on the kernel, planned once: by the runs they copy (the
#: object, as merge_runs made it and the pipe remembers it), then by the identities of the
#: pools, layers and stream. A request's layers, and requests that reuse a slot's blocks,
#: check and plan once (on an H200 the checks and lookups of a 256-block request took longer
#: than its copy). The plans hold their tables on the device: as many runs are kept as piece
#: tables are (a few hundred KiB each at most), each with a bounded number of calls.
_LAUNCHES: OrderedDict[int, tuple[Sequence[Run], dict[tuple[int, ...], _Launch]]] = \
    OrderedDict()
_MAX_PLANNED_RUNS: Final = 16
_MAX_LAUNCHES_PER_RUNS: Final = 1024  # a few ints and table references each


def _prepared_launch(src: Source, dst: BlockPool, layers: tuple[int, ...],
                     runs: Sequence[Run], stream: torch.cuda.Stream) -> _Launch:
    """The launch of ``copy_runs(src, dst, layers, runs)`` on ``stream``: from the cache when
    made from the same objects, else checked (``ValueError`` as :func:`copy_runs` says) and
    planned, its tables uploaded on ``stream`` (the stream that reads them)."""
    # Only a tuple is known not to change under us (merge_runs' runs are tuples).
    cacheable = type(runs) is tuple
    made_of = (src.layout, dst.layout, _base_ptrs(src), _base_ptrs(dst))
    handle = stream.cuda_stream
    key = (*map(id, made_of), *layers, handle)
    if cacheable:
        with _TABLES_LOCK:
            entry = _LAUNCHES.get(id(runs))
            if entry is not None and entry[0] is runs:
                _LAUNCHES.move_to_end(id(runs))
                launch = entry[1].get(key)
                if launch is not None and all(a is b for a, b in zip(launch.made_of, made_of)):
                    return launch
    check_fits(dst.layout, src.layout)
    _check_runs(runs, src.num_blocks, dst.num_blocks)
    device = dst.device
    launch = _Launch(made_of, device)
    frozen = tuple((a, b, n) for a, b, n in runs)
    with torch.cuda.stream(stream):  # the tables go up on the stream the kernel runs on
        for (sg, dg), bases in _runs_groups(src, dst, layers).items():
            pieces = _device_table("pieces", (sg, dg, frozen),
                                   functools.partial(_pieces_of_runs, sg, dg, frozen),
                                   device, handle)
            count = pieces.shape[0]
            if count == 0:
                continue
            rows = tuple(bases)
            jobs = _device_table("jobs", (rows, count),
                                 functools.partial(_jobs_of, rows, count), device, handle)
            launch.tables += [pieces, jobs]
            launch.calls.append((jobs.data_ptr(), len(rows), pieces.data_ptr(), count,
                                 handle))
    if cacheable:
        with _TABLES_LOCK:
            entry = _LAUNCHES.get(id(runs))
            if entry is None or entry[0] is not runs:
                entry = _LAUNCHES[id(runs)] = (runs, {})
                if len(_LAUNCHES) > _MAX_PLANNED_RUNS:
                    _LAUNCHES.popitem(last=False)
            launches = entry[1]
            launches[key] = launch
            if len(launches) > _MAX_LAUNCHES_PER_RUNS:
                del launches[next(iter(launches))]
    return launch


def _staged_table(pool: Source, ids: Sequence[int], chunk: Chunk, buf_ptr: int,
                  to_pool: bool) -> _Plan:
    """The launch plan of :func:`gather` (``to_pool`` false) or :func:`scatter` between
    ``chunk``'s blocks and the buffer at ``buf_ptr``."""
    idx_of = _segment_ids(ids, chunk)
    bases = _base_ptrs(pool)
    jobs: list[_Job] = []
    pairs: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for s in chunk.segments:
        tl = pool.layout.tensors[s.tensor]
        key = (s.start, s.stop)
        block_ids, positions = idx_of[key], torch.arange(s.stop - s.start)
        pairs[key] = (positions, block_ids) if to_pool else (block_ids, positions)
        pool_geom, pool_base = _geoms(pool.layout)[s.tensor], bases[s.tensor]
        buf_geom, buf_base = _Geom.packed(tl.block_bytes), buf_ptr + offset
        if to_pool:
            jobs.append((buf_geom, buf_base, pool_geom, pool_base, key))
        else:
            jobs.append((pool_geom, pool_base, buf_geom, buf_base, key))
        offset += (s.stop - s.start) * tl.block_bytes
    return _plan(jobs, pairs)


def _byte_view(t: torch.Tensor, tl: TensorLayout) -> torch.Tensor:
    """``t`` as uint8 of shape ``(*t.shape, itemsize)``, aliasing its memory."""
    return t.unsqueeze(-1).view(torch.uint8)


def _tensor_bytes(pool: Source, i: int) -> torch.Tensor:
    """Tensor ``i`` of a local or mapped pool as uint8 ``(*shape, itemsize)``, no copy."""
    if isinstance(pool, MappedPool):
        return pool.byte_view(i)
    return _byte_view(pool.tensors[i], pool.layout.tensors[i])


def _base_ptrs(pool: Source) -> tuple[int, ...]:
    return pool.data_ptrs if isinstance(pool, MappedPool) else pool._data_ptrs


def _check_buffer(pool: Source, buf: torch.Tensor, nbytes: int, what: str) -> None:
    if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1 \
            or not buf.is_contiguous():
        raise TypeError(f"{what} must be a contiguous 1-D uint8 tensor")
    if buf.numel() < nbytes:
        raise ValueError(f"{what} holds {buf.numel()} bytes; the chunk needs {nbytes}")
    if buf.device != pool.device and not (pool.device.type == "cuda"
                                          and buf.device.type == "cpu" and buf.is_pinned()):
        raise ValueError(f"{what} is on {buf.device}, the pool on {pool.device} (a CUDA "
                         "pool also takes pinned host memory)")


def _check_runs(runs: Sequence[Run], src_blocks: int, dst_blocks: int) -> None:
    for run in runs:
        s, d, n = run
        if n < 1 or s < 0 or d < 0 or s + n > src_blocks or d + n > dst_blocks:
            raise ValueError(f"run {tuple(run)} is outside the pools ({src_blocks} source, "
                             f"{dst_blocks} destination blocks)")


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class _on:
    """``with torch.cuda.stream(stream)`` for a CUDA device (the current stream when
    ``stream`` is None); nothing for the CPU."""

    def __init__(self, stream: torch.cuda.Stream | None, device: torch.device) -> None:
        self._ctx: Any = None
        if device.type == "cuda":
            self._ctx = torch.cuda.stream(stream if stream is not None
                                          else torch.cuda.current_stream(device))

    def __enter__(self) -> None:
        if self._ctx is not None:
            self._ctx.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._ctx is not None:
            self._ctx.__exit__(*exc)


def _choose(device: torch.device, method: Method) -> Literal["kernel", "torch"]:
    if method == "torch":
        return "torch"
    if method not in ("auto", "kernel"):
        raise ValueError(f"method is 'auto', 'kernel' or 'torch', not {method!r}")
    if kernel_available(device):
        return "kernel"
    if method == "kernel":
        raise RuntimeError(f"the copy kernel needs a CUDA device and CuPy (device {device})")
    return "torch"


_KERNEL_SOURCE: Final = r"""
extern "C" __global__ void aiokvpipe_copy_pieces(const long long* __restrict__ jobs,
                                                 const long long* __restrict__ pieces) {
    // blockIdx.y: the job (a tensor's base addresses); blockIdx.x strides over its pieces.
    const long long* job = jobs + 4 * blockIdx.y;
    const unsigned long long sbase = job[0], dbase = job[1];
    const long long first = job[2], count = job[3];
    for (long long p = blockIdx.x; p < count; p += gridDim.x) {
        const long long* pc = pieces + 3 * (first + p);
        const char* src = (const char*)(sbase + pc[0]);
        char* dst = (char*)(dbase + pc[1]);
        const long long n = pc[2];
        const long long t = threadIdx.x, step = blockDim.x;
        if ((((unsigned long long)src | (unsigned long long)dst | (unsigned long long)n)
             & 15) == 0) {
            const uint4* s = (const uint4*)src;
            uint4* d = (uint4*)dst;
            const long long n16 = n >> 4;
            long long i = t;
            for (; i + 3 * step < n16; i += 4 * step) {  // four loads in flight per thread
                uint4 a = s[i], b = s[i + step], c = s[i + 2 * step], e = s[i + 3 * step];
                d[i] = a; d[i + step] = b; d[i + 2 * step] = c; d[i + 3 * step] = e;
            }
            for (; i < n16; i += step) d[i] = s[i];
        } else if ((((unsigned long long)src | (unsigned long long)dst
                     | (unsigned long long)n) & 3) == 0) {
            const unsigned int* s = (const unsigned int*)src;
            unsigned int* d = (unsigned int*)dst;
            for (long long i = t; i < (n >> 2); i += step) d[i] = s[i];
        } else {
            for (long long i = t; i < n; i += step) dst[i] = src[i];
        }
    }
}
"""
#: CUDA's limit on gridDim.y: more jobs than this take several launches.
_MAX_JOBS_PER_LAUNCH: Final = 65535

_kernel_cache: list[Any] = []


def _kernel() -> Any:
    """The compiled copy kernel (CuPy compiles it per device on first launch), or ``None``
    where CuPy or CUDA is missing."""
    if not _kernel_cache:
        kernel = None
        if torch.cuda.is_available():
            try:
                import cupy
                kernel = cupy.RawKernel(_KERNEL_SOURCE, "aiokvpipe_copy_pieces")
            except Exception:  # noqa: BLE001 - CuPy absent or broken: the torch path works
                kernel = None
        _kernel_cache.append(kernel)
    return _kernel_cache[0]


class _StreamRef:
    """A raw CUDA stream handle, offered to CuPy through the CUDA stream protocol."""

    def __init__(self, handle: int) -> None:
        self._handle = handle

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self._handle)


_cupy_streams: dict[int, Any] = {}


def _cupy_stream(handle: int) -> Any:
    """CuPy's view of a torch stream, made once per stream handle."""
    stream = _cupy_streams.get(handle)
    if stream is None:
        import cupy
        from_external = getattr(cupy.cuda.Stream, "from_external", None)
        stream = (from_external(_StreamRef(handle)) if from_external is not None
                  else cupy.cuda.ExternalStream(handle))
        if len(_cupy_streams) >= 64:  # streams come and go: stay bounded
            _cupy_streams.clear()
        _cupy_streams[handle] = stream
    return stream


def _launch(plan: _Plan, device: torch.device) -> None:
    """Run ``plan`` with one kernel on the current stream of ``device`` (several launches
    only past 65,535 jobs)."""
    if plan.pieces.shape[0] == 0 or plan.jobs.shape[0] == 0:
        return

    n_jobs = plan.jobs.shape[0]
    # One pinned buffer, one host-to-device copy: jobs then pieces.
    both = torch.cat([plan.jobs.reshape(-1), plan.pieces.reshape(-1)]).pin_memory()
    table = both.to(device, non_blocking=True)
    _run_kernel(table.data_ptr(), n_jobs, table.data_ptr() + 32 * n_jobs,
                int(plan.jobs[:, 3].max()), torch.cuda.current_stream(device).cuda_stream,
                device)
    # table goes back to torch's caching allocator here: only work on this same stream,
    # which runs after the kernel, can reuse its memory.


def _run_kernel(jobs_ptr: int, n_jobs: int, pieces_ptr: int, widest: int, stream: int,
                device: torch.device) -> None:
    """Launch the copy kernel on ``stream`` (a handle) of ``device`` over ``n_jobs`` jobs at
    ``jobs_ptr`` (device memory), pieces at ``pieces_ptr``; ``widest``: the most pieces of
    one job (several launches only past 65,535 jobs)."""
    import cupy
    import numpy

    cupy_stream = _cupy_stream(stream)
    with cupy.cuda.Device(device.index):
        for first in range(0, n_jobs, _MAX_JOBS_PER_LAUNCH):
            jobs = min(_MAX_JOBS_PER_LAUNCH, n_jobs - first)
            _kernel()((min(widest, _MAX_GRID), jobs), (_THREADS,),
                      (numpy.uint64(jobs_ptr + 32 * first), numpy.uint64(pieces_ptr)),
                      stream=cupy_stream)
