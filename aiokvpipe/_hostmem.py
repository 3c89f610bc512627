"""Host memory: byte views of CPU tensors, recycled memory for received CPU tensors, and which
memory the process may not write.

Fresh memory from the OS costs a page fault and the kernel zeroing the page on first touch;
on loopback that costs as much as receiving the bytes. Received tensors therefore get their
memory from a pool: when the last tensor viewing a block dies, the block goes back to the pool
(up to ``max_cached_bytes``) for the next message of a similar size.
"""

from __future__ import annotations

import bisect
import ctypes
import threading
from collections.abc import Sequence
from typing import Any, Final

import torch

#: Below this, malloc's own free lists already reuse memory; pooling would only add overhead.
MIN_POOLED_BYTES: Final = 256 * 1024


def byte_view(t: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU tensor's bytes (no copy).

    The view does not keep ``t`` alive: the caller must hold ``t`` while the view is used.
    """
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


#: The process's memory mappings and their permissions (Linux).
_MAPS: Final = "/proc/self/maps"


def read_only(spans: Sequence[tuple[int, int]]) -> list[int]:
    """The indices of the ``(start, end)`` address spans that memory mapped without write
    permission overlaps (a ``numpy.memmap`` opened ``"r"``, say: a socket's receive into it
    fails with EFAULT, and a plain write faults). Empty where the mappings cannot be read
    (not Linux). Blocking: reads ``/proc/self/maps`` (milliseconds in a large process)."""
    try:
        with open(_MAPS, "rb") as f:
            maps = f.read()
    except OSError:
        return []
    starts: list[int] = []
    ends: list[int] = []
    for line in maps.splitlines():  # "start-end perms offset dev inode path", ascending
        fields = line.split(maxsplit=2)
        if len(fields) < 2 or b"w" in fields[1]:
            continue
        lo, _, hi = fields[0].partition(b"-")
        starts.append(int(lo, 16))
        ends.append(int(hi, 16))
    bad = []
    for i, (start, end) in enumerate(spans):
        # Of the read-only mappings that begin before ``end`` (they are sorted and do not
        # overlap), the last ends last: it overlaps the span if any of them does.
        j = bisect.bisect_left(starts, end) - 1
        if j >= 0 and ends[j] > start:
            bad.append(i)
    return bad


def size_class(nbytes: int) -> int:
    """Round up to one of four steps per power of two: at most 25% of a block goes unused,
    and messages of similar sizes share blocks."""
    step = 1 << max(nbytes.bit_length() - 3, 12)
    return -(-nbytes // step) * step


class HostBufferPool:
    def __init__(self, max_cached_bytes: int) -> None:
        self._max_cached = max_cached_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._cached = 0
        self._lock = threading.Lock()  # blocks come back from whichever thread frees a tensor
        self._holders: dict[int, type[Any]] = {}

    @property
    def cached_bytes(self) -> int:
        return self._cached

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor, on pooled memory when it is large enough."""
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if nbytes < MIN_POOLED_BYTES:
            return torch.empty(shape, dtype=dtype)
        size = size_class(nbytes)
        with self._lock:
            blocks = self._free.get(size)
            base = blocks.pop() if blocks else None
            if base is not None:
                self._cached -= size
        if base is None:
            # Not bytearray(size): that zeroes every page at once, on the event loop (a 512 MiB
            # message stalled it for half a second). Fresh pages are faulted in as the payload
            # lands in them instead, read by read.
            base = torch.empty(size, dtype=torch.uint8)
        holder = self._holder_type(size).from_address(base.data_ptr())
        holder.base = base
        flat = torch.frombuffer(holder, dtype=torch.uint8, count=nbytes)
        return flat.view(dtype).reshape(shape)

    def _holder_type(self, size: int) -> type[Any]:
        # The tensor's storage keeps its buffer exporter (the holder) alive; when the storage
        # dies, the holder's __del__ hands the block back. One ctypes array type per size.
        holder = self._holders.get(size)
        if holder is None:
            pool = self

            def __del__(self: Any) -> None:
                pool._give_back(self.base)

            holder = type(f"_Block{size}", (ctypes.c_ubyte * size,), {"__del__": __del__})
            self._holders[size] = holder
        return holder

    def close(self) -> None:
        """Its pipe ended: drop the blocks cached, and those given back later too (a received
        tensor the application still holds kept the cache, up to ``max_cached_bytes``, of a
        pipe long gone)."""
        with self._lock:
            self._max_cached = 0
            self._free.clear()
            self._cached = 0

    def _give_back(self, base: torch.Tensor) -> None:
        size = base.numel()
        with self._lock:
            if self._cached + size <= self._max_cached:
                self._free.setdefault(size, []).append(base)
                self._cached += size
