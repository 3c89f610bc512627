"""Block pools: what a pool of KV blocks looks like, and the checks made before blocks move.

A serving engine keeps each layer's KV cache as one big tensor of fixed-size *blocks* and a
request as a list of block ids. :class:`BlockPool` wraps such tensors; :class:`PoolLayout` is
its frozen, hashable description (what the peer is told once per pipe); the functions below
validate a transfer's arguments and merge its ids into runs. Moving the bytes lives in
``_blocks_move``, the wire bodies in ``_blocks_wire``.

**Which tensors a pool accepts.** A block is, in every tensor, the slice at that index along
``block_dim``. The dimensions after ``block_dim`` must be dense and row-major (as in any
contiguous tensor), so one block of a tensor is ``P`` contiguous *segments* of equal size,
one per index of the dimensions before ``block_dim`` (``P`` = their product, at most
:data:`MAX_SEGMENTS_PER_BLOCK`; dimensions whose stride makes segments adjacent are folded,
so ``P`` is often 1). The dimensions up to and including ``block_dim`` may have any
non-overlapping strides: every contiguous tensor is accepted, and so are permuted views such
as vLLM's ``[2, num_blocks, ...]`` view of a ``[num_blocks, 2, ...]`` allocation. Rejected:
tensors whose inner dimensions are not dense, that overlap themselves (a stride of 0, say),
conjugate/negative views, and empty blocks.

**The byte order of a block** (what every plane carries): the block's elements in row-major
order of its per-block shape (the tensor's shape without ``block_dim``). Two fitting pools
therefore exchange blocks even when one is ``[2, N, ...]`` with ``block_dim=1`` and the other
``[N, 2, ...]`` with ``block_dim=0``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import torch

from ._dtypes import code_of, dtype_of
from ._wire import DTYPE_ITEMSIZE, MAX_NAME_BYTES, MAX_NDIM, MAX_PAYLOAD_BYTES

__all__ = [
    "MAX_POOL_TENSORS",
    "MAX_NUM_BLOCKS",
    "MAX_SEGMENTS_PER_BLOCK",
    "MAX_POOL_SEGMENTS",
    "MAX_PIPE_SEGMENTS",
    "MAX_PIPE_TENSORS",
    "BlockPool",
    "TensorLayout",
    "PoolLayout",
    "BlockIdError",
    "LayerNameError",
    "check_fits",
    "check_counts",
    "normalize_ids",
    "normalize_layers",
    "merge_runs",
]

#: Most tensors in one pool (an 80-layer model with K and V apart is 160).
MAX_POOL_TENSORS: Final = 1024
#: Block ids travel as u32.
MAX_NUM_BLOCKS: Final = (1 << 32) - 1
#: Most contiguous segments one block of one tensor may consist of (after folding adjacent
#: ones): each is a separate copy, so a layout that shreds blocks finer is refused.
MAX_SEGMENTS_PER_BLOCK: Final = 1024
#: Most segments one block of a whole pool may consist of, its tensors' together (vLLM's
#: ``[2, num_blocks, ...]`` layers of an 80-layer model: 160). Each is an offset a layout
#: holds (about 40 bytes in Python) and computes: this bounds what describing a pool costs.
MAX_POOL_SEGMENTS: Final = 1 << 16
#: Most segments the pools one end describes on one pipe may have together (what the
#: other end holds for them: about 40 MiB at most).
MAX_PIPE_SEGMENTS: Final = 1 << 20
#: Most tensors the pools one end describes on one pipe may have together: each costs the
#: other end a tensor layout (up to ~2.4 KB: 32 dimensions, a 255-byte name), so at most
#: ~40 MB (1,024 pools of 1,024 tensors once held 2.5 GB, charged to no credit). A hundred
#: pools of an 80-layer model's 160 tensors fit.
MAX_PIPE_TENSORS: Final = 1 << 14

#: ``(src_start, dst_start, length)``: blocks ``src_start .. src_start+length-1`` go to
#: ``dst_start .. dst_start+length-1``.
Run = tuple[int, int, int]


class BlockIdError(IndexError, ValueError):
    """A block id outside the pool (an ``IndexError`` and a ``ValueError``)."""


class LayerNameError(KeyError, ValueError):
    """``layers`` names a tensor the dict pool does not have (a ``KeyError`` and a
    ``ValueError``, like every other bad argument of a block call)."""


@dataclass(frozen=True, slots=True)
class TensorLayout:
    """One tensor of a pool: everything needed to address its blocks from a base pointer.

    ``dtype`` is the wire code (``aiokvpipe._dtypes``), ``shape`` and ``strides`` (in elements)
    the tensor's, ``block_dim`` non-negative. Construction validates the geometry and raises
    ``ValueError`` (see the module docstring for what is accepted). Equality and hashing use
    exactly these five fields.
    """

    name: str
    dtype: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    block_dim: int
    #: Bytes per element.
    itemsize: int = field(init=False, compare=False, repr=False)
    #: ``shape`` without ``block_dim``: the shape of one block.
    block_shape: tuple[int, ...] = field(init=False, compare=False, repr=False)
    #: Bytes in one block of this tensor.
    block_bytes: int = field(init=False, compare=False, repr=False)
    #: Bytes between block ``b`` and block ``b + 1``.
    block_stride_bytes: int = field(init=False, compare=False, repr=False)
    #: Bytes in one contiguous segment of a block.
    segment_bytes: int = field(init=False, compare=False, repr=False)
    #: Byte offsets of block 0's segments from the tensor's first element, in the block's
    #: row-major order. Block ``b``'s are these plus ``b * block_stride_bytes``.
    segment_offsets: tuple[int, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        itemsize = DTYPE_ITEMSIZE.get(self.dtype)
        if itemsize is None:
            raise ValueError(f"unknown dtype code {self.dtype}")
        if len(self.name.encode()) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name {self.name[:40]!r} is over {MAX_NAME_BYTES} bytes")
        ndim = len(self.shape)
        if not 1 <= ndim <= MAX_NDIM or len(self.strides) != ndim:
            raise ValueError(f"a pool tensor has 1 to {MAX_NDIM} dimensions and one stride "
                             f"per dimension (shape {self.shape[:8]}, strides "
                             f"{self.strides[:8]})")
        if not 0 <= self.block_dim < ndim:
            raise ValueError(f"block_dim {self.block_dim} outside a {ndim}-d tensor")
        if any(d < 0 for d in self.shape) or any(s < 0 for s in self.strides):
            raise ValueError("negative size or stride")
        span = itemsize
        for d, s in zip(self.shape, self.strides, strict=True):
            span += (d - 1) * s * itemsize if d else 0
            if d > MAX_PAYLOAD_BYTES or s > MAX_PAYLOAD_BYTES or span > MAX_PAYLOAD_BYTES:
                raise ValueError(f"tensor of shape {self.shape[:8]} is beyond the size limit")
        bd = self.block_dim
        block_shape = self.shape[:bd] + self.shape[bd + 1:]
        if math.prod(block_shape) == 0:
            raise ValueError(f"blocks of shape {block_shape} are empty")
        # The dimensions after block_dim must be dense: one segment is their elements.
        inner = 1
        for d, s in zip(reversed(self.shape[bd + 1:]), reversed(self.strides[bd + 1:]),
                        strict=True):
            if d != 1 and s != inner:
                raise ValueError(
                    f"shape {self.shape} with strides {self.strides}: the dimensions after "
                    f"block_dim {bd} are not dense, so a block is not a few contiguous "
                    "byte ranges (make the tensor contiguous)")
            inner *= d
        # Fold the dimensions before block_dim that continue a segment (innermost first).
        outer = [(d, s) for d, s in zip(self.shape[:bd], self.strides[:bd], strict=True)]
        segment = inner
        while outer and (outer[-1][0] == 1 or outer[-1][1] == segment):
            segment *= outer.pop()[0]
        count = math.prod(d for d, _ in outer)
        if count > MAX_SEGMENTS_PER_BLOCK:
            raise ValueError(f"a block of shape {block_shape} with strides {self.strides} is "
                             f"{count} separate byte ranges; the limit is "
                             f"{MAX_SEGMENTS_PER_BLOCK}")
        # No two elements may share memory: sorted by stride, each outer dimension must step
        # over everything the smaller ones span.
        dims = sorted((s, d) for d, s in [*outer, (self.shape[bd], self.strides[bd])] if d > 1)
        covered = segment
        for s, d in dims:
            if s < covered:
                raise ValueError(f"shape {self.shape} with strides {self.strides} overlaps "
                                 "itself: blocks would share memory")
            covered += s * (d - 1)
        offsets = [0]
        for d, s in outer:
            offsets = [o + i * s for o in offsets for i in range(d)]
        put = object.__setattr__
        put(self, "itemsize", itemsize)
        put(self, "block_shape", block_shape)
        put(self, "block_bytes", math.prod(block_shape) * itemsize)
        put(self, "block_stride_bytes", self.strides[bd] * itemsize)
        put(self, "segment_bytes", segment * itemsize)
        put(self, "segment_offsets", tuple(o * itemsize for o in offsets))

    @property
    def num_blocks(self) -> int:
        return self.shape[self.block_dim]

    @property
    def span_bytes(self) -> int:
        """Bytes from the first element to one past the last."""
        return self.itemsize + sum((d - 1) * s * self.itemsize
                                   for d, s in zip(self.shape, self.strides, strict=True))


@dataclass(frozen=True, slots=True)
class PoolLayout:
    """A pool's description: its tensors' layouts and whether they are named (a dict pool).

    Frozen and hashable; two processes holding equal pools build equal layouts. Construction
    checks what holds across tensors (``ValueError``): 1 to :data:`MAX_POOL_TENSORS` tensors,
    the same ``num_blocks`` (1 to :data:`MAX_NUM_BLOCKS`) in each, unique names in a named
    pool and empty names otherwise.
    """

    tensors: tuple[TensorLayout, ...]
    named: bool

    def __post_init__(self) -> None:
        if not 1 <= len(self.tensors) <= MAX_POOL_TENSORS:
            raise ValueError(f"a pool holds 1 to {MAX_POOL_TENSORS} tensors, not "
                             f"{len(self.tensors)}")
        n = self.tensors[0].num_blocks
        if not 1 <= n <= MAX_NUM_BLOCKS:
            raise ValueError(f"a pool holds 1 to {MAX_NUM_BLOCKS} blocks, not {n}")
        for i, t in enumerate(self.tensors):
            if t.num_blocks != n:
                raise ValueError(f"tensor {i} has {t.num_blocks} blocks along its block_dim, "
                                 f"tensor 0 has {n}: every tensor of a pool has the pool's "
                                 "num_blocks")
        segments = self.segments
        if segments > MAX_POOL_SEGMENTS:
            raise ValueError(f"a block of this pool is {segments} separate byte ranges over "
                             f"its tensors; the limit is {MAX_POOL_SEGMENTS}")
        names = [t.name for t in self.tensors]
        if self.named and len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in a pool")
        if not self.named and any(names):
            raise ValueError("tensors of an unnamed (list) pool have no names")

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].num_blocks

    @property
    def segments(self) -> int:
        """Separate byte ranges one block of the pool is, over all its tensors."""
        return sum(len(t.segment_offsets) for t in self.tensors)

    @property
    def names(self) -> tuple[str, ...] | None:
        return tuple(t.name for t in self.tensors) if self.named else None

    def block_bytes(self, layers: Iterable[int] | None = None) -> int:
        """Bytes in one block of the tensors ``layers`` (indices; all when ``None``)."""
        if layers is None:
            return sum(t.block_bytes for t in self.tensors)
        return sum(self.tensors[i].block_bytes for i in layers)


def layout_of(t: object, block_dim: int, name: str = "") -> TensorLayout:
    """The layout of one pool tensor; ``TypeError``/``ValueError`` if it cannot be one."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"pool tensors must be torch.Tensor, not {type(t).__name__}")
    if t.layout is not torch.strided or t.is_nested:
        raise TypeError("pool tensors must be dense (strided, not sparse or nested)")
    if t.device.type not in ("cpu", "cuda"):
        raise TypeError(f"pool tensors live on the CPU or a CUDA device, not {t.device}")
    if t.is_conj() or t.is_neg():
        raise ValueError("a conjugate or negative view does not hold what it reads as: "
                         "resolve_conj()/resolve_neg() it first")
    code = code_of(t.dtype)  # TypeError for a dtype the pipe cannot carry
    if t.dim() == 0:
        raise ValueError("a pool tensor has at least one dimension (the block dimension)")
    bd = block_dim + t.dim() if block_dim < 0 else block_dim
    if not 0 <= bd < t.dim():
        raise ValueError(f"block_dim {block_dim} is outside a {t.dim()}-d tensor")
    return TensorLayout(name, code, tuple(t.shape), tuple(t.stride()), bd)


class BlockPool:
    """A pool of fixed-size KV blocks: one or more same-device tensors (a ``list``, or a
    ``dict`` of ``str`` → tensor), each holding the pool's ``num_blocks`` blocks along
    ``block_dim``.

    ``block_dim`` may be negative (counted from each tensor's last dimension). Typical pools:
    vLLM's per-layer ``[2, num_blocks, block_size, kv_heads, head_dim]`` (``block_dim=1``),
    ``[num_blocks, 2, block_size, kv_heads, head_dim]`` or MLA's
    ``[num_blocks, block_size, dim]`` (``block_dim=0``). Accepted strides: see
    ``aiokvpipe._blocks``' docstring (every contiguous tensor is accepted).

    The pool references the tensors (no copy); transfers read or write them in place. The
    tensors must not share memory with each other, and must stay where they are: their
    addresses are taken once (do not ``set_()`` them or assign ``.data``; make a new pool).
    Raises ``TypeError`` for a wrong type, an unsupported dtype, a non-strided, nested or meta
    tensor, or tensors on different devices; ``ValueError`` for differing ``num_blocks``, an
    unsupported layout, no tensors, or names over 255 bytes in UTF-8.
    """

    __slots__ = ("_tensors", "_layout", "_device", "_fingerprint", "_data_ptrs", "__weakref__")

    def __init__(self, tensors: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
                 block_dim: int = 1) -> None:
        if isinstance(block_dim, bool) or not isinstance(block_dim, int):
            raise TypeError(f"block_dim must be an int, not {type(block_dim).__name__}")
        items: list[tuple[str, object]]
        if isinstance(tensors, Mapping):
            items = []
            for name, t in tensors.items():
                if not isinstance(name, str):
                    raise TypeError(f"pool tensor names are str, not {type(name).__name__}")
                items.append((name, t))
            named = True
        elif isinstance(tensors, Sequence) and not isinstance(tensors, str | bytes):
            items = [("", t) for t in tensors]
            named = False
        else:
            raise TypeError("a BlockPool is built from a list or dict of tensors, not "
                            f"{type(tensors).__name__}")
        if not items:
            raise ValueError("a BlockPool needs at least one tensor")
        if len(items) > MAX_POOL_TENSORS:
            raise ValueError(f"a pool holds at most {MAX_POOL_TENSORS} tensors")
        layouts = []
        pool_tensors: list[torch.Tensor] = []
        for i, (name, obj) in enumerate(items):
            what = f"tensor {name!r}" if named else f"tensor {i}"
            try:
                layouts.append(layout_of(obj, block_dim, name))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{what}: {exc}") from None
            assert isinstance(obj, torch.Tensor)
            t = obj
            if pool_tensors and t.device != pool_tensors[0].device:
                raise TypeError(f"{what} is on {t.device}, the first tensor on "
                                f"{pool_tensors[0].device}: a pool's tensors share one device")
            pool_tensors.append(t)
        seen: dict[int, int] = {}
        for i, t in enumerate(pool_tensors):
            if t.data_ptr() in seen:
                raise ValueError(f"tensors {seen[t.data_ptr()]} and {i} are the same memory")
            seen[t.data_ptr()] = i
        self._layout = PoolLayout(tuple(layouts), named)
        self._tensors: tuple[torch.Tensor, ...] = tuple(pool_tensors)
        #: each tensor's address (fixed: a pool's tensors never change), for the copy plans
        self._data_ptrs = tuple(seen)
        device = pool_tensors[0].device
        assert device is not None
        self._device: torch.device = device
        self._fingerprint: bytes | None = None

    def __repr__(self) -> str:
        t = self._layout.tensors[0]
        return (f"BlockPool({len(self._tensors)} tensors, {self.num_blocks} blocks of "
                f"{self._layout.block_bytes()} bytes, {dtype_of(t.dtype)}, {self._device})")

    @property
    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The pool's tensors, in order (a dict pool's in its insertion order)."""
        return self._tensors

    @property
    def memory_key(self) -> tuple[bytes, tuple[int, ...], torch.device]:
        """Equal for pools of one layout over the same memory: a BlockPool made again
        around the same tensors (per request, say) is the same pool to a pipe. (The layout
        by its fingerprint, computed once per pool: hashing the layout itself took 14 µs for
        80 layers at every send_blocks.)"""
        return self.layout_fingerprint, self._data_ptrs, self._device

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def num_blocks(self) -> int:
        return self._layout.num_blocks

    @property
    def names(self) -> tuple[str, ...] | None:
        """The dict keys, in order; ``None`` for a pool built from a list."""
        return self._layout.names

    @property
    def dtypes(self) -> tuple[torch.dtype, ...]:
        return tuple(t.dtype for t in self._tensors)

    @property
    def block_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per tensor, the shape of one block (the tensor's shape without ``block_dim``)."""
        return tuple(t.block_shape for t in self._layout.tensors)

    @property
    def block_bytes(self) -> int:
        """Bytes in one block, all tensors together."""
        return self._layout.block_bytes()

    @property
    def layout(self) -> PoolLayout:
        """The frozen, hashable description of this pool (what the peer is told)."""
        return self._layout

    @property
    def layout_fingerprint(self) -> bytes:
        """16 bytes identifying :attr:`layout` (names, dtypes, shapes, strides, block
        dimension): equal in every process for equal layouts."""
        if self._fingerprint is None:
            from ._blocks_wire import fingerprint
            self._fingerprint = fingerprint(self._layout)
        return self._fingerprint


def _describe(layout: PoolLayout, i: int) -> str:
    name = layout.tensors[i].name
    return f"tensor {i} ({name!r})" if layout.named else f"tensor {i}"


def check_fits(local: PoolLayout, peer: PoolLayout) -> None:
    """``ValueError`` naming the first misfit unless blocks of ``peer`` can land in ``local``
    (and back): the same number of tensors and, tensor by tensor, the same dtype and block
    shape. ``num_blocks``, names and strides may differ; but two dict pools naming the same
    tensors in another order do not fit (tensors go by position: a ``{"k", "v"}`` pool's K
    would land in a ``{"v", "k"}`` pool's V, silently)."""
    if len(local.tensors) != len(peer.tensors):
        raise ValueError(f"pools do not fit: {len(local.tensors)} tensors here, "
                         f"{len(peer.tensors)} in the peer's pool")
    if (local.named and peer.named and local.names != peer.names
            and sorted(local.names or ()) == sorted(peer.names or ())):
        raise ValueError("pools do not fit: they name the same tensors in another order "
                         "(tensors go by position); make both dicts in one order")
    for i, (a, b) in enumerate(zip(local.tensors, peer.tensors, strict=True)):
        if a.dtype != b.dtype:
            raise ValueError(f"pools do not fit: {_describe(local, i)} is "
                             f"{_dtype_name(a.dtype)} here, {_dtype_name(b.dtype)} in the "
                             "peer's pool")
        if a.block_shape != b.block_shape:
            raise ValueError(f"pools do not fit: {_describe(local, i)} has blocks of shape "
                             f"{list(a.block_shape)} here, {list(b.block_shape)} in the "
                             "peer's pool")


def _dtype_name(code: int) -> str:
    dt = dtype_of(code)
    return str(dt).removeprefix("torch.") if dt is not None else f"dtype code {code}"


def check_counts(local_count: int, peer_count: int) -> None:
    """``ValueError`` unless both ends name as many blocks."""
    if local_count != peer_count:
        raise ValueError(f"block counts differ: {local_count} block ids here, {peer_count} "
                         "on the peer")


def normalize_ids(pool: BlockPool | PoolLayout, ids: object, *,
                  destination: bool) -> tuple[int, ...]:
    """Block ids as a tuple of ints, checked against ``pool``.

    Accepts a list, tuple or range of ints (or of objects with ``__index__``, such as NumPy
    integers) or a 1-D integer CPU tensor. Raises ``TypeError`` for anything else (booleans,
    floats, a CUDA tensor: reading one would block on the device), :class:`BlockIdError` (an
    ``IndexError`` and ``ValueError``) naming the first id outside ``0 .. num_blocks-1``, and,
    when ``destination``, ``ValueError`` naming an id given twice (a source may repeat ids).
    """
    num_blocks = pool.num_blocks
    out: tuple[int, ...]
    if isinstance(ids, torch.Tensor):
        if ids.device.type != "cpu":
            raise TypeError("block ids must be on the CPU (reading a CUDA tensor would block); "
                            "pass ids.cpu() or a list")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise TypeError(f"block ids must be integers, not {ids.dtype}")
        if ids.dim() != 1:
            raise TypeError(f"a tensor of block ids must be 1-D, not {ids.dim()}-D")
        out = tuple(ids.tolist())
    elif isinstance(ids, range):
        out = tuple(ids)
    elif isinstance(ids, list | tuple) and set(map(type, ids)) <= {int}:
        out = tuple(ids)  # plain ints (the common case), checked in C
    elif isinstance(ids, list | tuple):
        vals = []
        for v in ids:
            if isinstance(v, bool) or not hasattr(type(v), "__index__"):
                raise TypeError(f"block ids must be ints, not {type(v).__name__} ({v!r})")
            vals.append(operator.index(v))
        out = tuple(vals)
    else:
        raise TypeError("block ids must be a list, tuple, range or 1-D integer tensor, not "
                        f"{type(ids).__name__}")
    if out and not (0 <= min(out) and max(out) < num_blocks):
        bad = next(i for i in out if not 0 <= i < num_blocks)
        raise BlockIdError(f"block id {bad} is outside the pool (0 .. {num_blocks - 1})")
    if destination and len(set(out)) != len(out):
        seen: set[int] = set()
        for i in out:
            if i in seen:
                raise ValueError(f"destination block id {i} is named twice")
            seen.add(i)
    return out


def normalize_layers(pool: BlockPool | PoolLayout, layers: object) -> tuple[int, ...]:
    """The tensors ``layers`` names, as sorted tensor indices (``None``: all of them).

    ``layers`` is one index or name, or a sequence of them (names only for a dict pool).
    Raises ``TypeError`` for other types (booleans included), :class:`LayerNameError` (a
    ``KeyError`` and a ``ValueError``) for an unknown name, :class:`BlockIdError` (an
    ``IndexError`` and a ``ValueError``) for an index out of range, ``ValueError`` for a
    tensor named twice or an empty selection.
    """
    layout = pool.layout if isinstance(pool, BlockPool) else pool
    count = len(layout.tensors)
    if layers is None:
        return tuple(range(count))
    items = [layers] if isinstance(layers, int | str) else layers
    if not isinstance(items, list | tuple | range):
        raise TypeError("layers must be None, an index, a name or a list of them, not "
                        f"{type(layers).__name__}")
    names = layout.names
    out: list[int] = []
    for item in items:
        if isinstance(item, str):
            if names is None:
                raise TypeError(f"layer {item!r}: a list pool's tensors are chosen by index")
            try:
                out.append(names.index(item))
            except ValueError:
                raise LayerNameError(f"the pool has no tensor named {item!r}") from None
        elif isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < count:
                raise BlockIdError(f"layer index {item} is outside the pool's {count} tensors")
            out.append(item)
        else:
            raise TypeError(f"layers are indices or names, not {type(item).__name__}")
    if len(set(out)) != len(out):
        raise ValueError(f"layers name a tensor twice: {list(items)!r}")
    if not out:
        raise ValueError("layers names no tensor")
    return tuple(sorted(out))


def merge_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> tuple[Run, ...]:
    """Pair ``src_ids[i]`` with ``dst_ids[i]`` and merge neighbours that are consecutive on
    both sides into ``(src_start, dst_start, length)`` runs, in order.

    ``merge_runs(ids, ids)`` gives the runs of one side alone. ``ValueError`` if the lengths
    differ. Ids are not range-checked here (see :func:`normalize_ids`).
    """
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source ids, {len(dst_ids)} destination ids")
    runs: list[Run] = []
    if not src_ids:
        return ()
    s0 = ps = src_ids[0]
    d0 = pd = dst_ids[0]
    n = 1
    for s, d in zip(src_ids[1:], dst_ids[1:], strict=True):
        if s == ps + 1 and d == pd + 1:
            n += 1
        else:
            runs.append((s0, d0, n))
            s0, d0, n = s, d, 1
        ps, pd = s, d
    runs.append((s0, d0, n))
    return tuple(runs)
