"""A paged KV cache as serving engines keep one: a block pool, a free list, block tables.

Layout (vLLM's): per layer one tensor ``[2 (K, V), num_blocks, block_size, heads, head_dim]``,
wrapped in an :class:`aiokvpipe.BlockPool` with ``block_dim=1``, so tensor ``i`` of the pool is
layer ``i`` (``layers=[i]`` moves one layer). A request owns a *block table*: the ids of the
blocks holding its tokens in order, token ``t`` at slot ``t % block_size`` of block
``table[t // block_size]``; the last block's unused slots hold zeros.

:class:`PagedKV` is the pool plus its :class:`BlockAllocator`; :meth:`PagedKV.write_layer`
scatters one layer's KV (as a transformers cache holds it: ``[1, heads, seq, head_dim]``)
into a block table and :meth:`PagedKV.to_cache` gathers a request's blocks back into a
``DynamicCache``. Nothing here is thread-safe except what says so: the allocator belongs to
the event loop; the copies may run in a worker thread on blocks the loop handed it.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache

import aiokvpipe

__all__ = ["BLOCK_SIZE", "BlockAllocator", "OutOfBlocks", "PagedKV"]

BLOCK_SIZE = 16  # tokens per block (vLLM's default)


class OutOfBlocks(Exception):
    """The pool has fewer free blocks than a request needs (nothing was allocated)."""


class BlockAllocator:
    """A free list of block ids ``0 .. num_blocks-1``.

    :meth:`allocate` takes all-or-nothing; :meth:`free` gives ids back and raises
    ``ValueError`` for an id that is not allocated (a double free would hand one block to two
    requests). Freed blocks are reused last (FIFO), so a use-after-free shows up late, not at
    once, in tests that compare outputs.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("a pool needs at least one block")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        """``n`` free block ids; raises :class:`OutOfBlocks` if fewer are free."""
        if n > len(self._free):
            raise OutOfBlocks(f"{n} KV blocks needed, {len(self._free)} of "
                              f"{self.num_blocks} free")
        ids = [self._free.popleft() for _ in range(n)]
        self._used.update(ids)
        return ids

    def free(self, ids: list[int]) -> None:
        """Give ``ids`` back (checked first: nothing is freed if one is not allocated)."""
        if not self._used.issuperset(ids) or len(set(ids)) != len(ids):
            raise ValueError(f"freeing blocks that are not allocated: {sorted(ids)[:8]}")
        self._used.difference_update(ids)
        self._free.extend(ids)


class PagedKV:
    """The KV block pool of one model (``n_layer`` tensors, see the module docstring) and its
    allocator. ``num_blocks`` blocks of ``block_size`` tokens, zero-filled, on ``device``."""

    def __init__(self, config: Any, num_blocks: int, *, block_size: int = BLOCK_SIZE,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.block_size = block_size
        self.n_layer: int = config.n_layer
        self.heads: int = config.n_head
        self.head_dim: int = config.n_embd // config.n_head
        shape = (2, num_blocks, block_size, self.heads, self.head_dim)
        self.pool = aiokvpipe.BlockPool(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.n_layer)],
            block_dim=1)
        self.allocator = BlockAllocator(num_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks a request of ``num_tokens`` tokens occupies."""
        return math.ceil(num_tokens / self.block_size)

    def block_bytes(self, num_blocks: int) -> int:
        """Bytes ``num_blocks`` blocks take across all layers (what moving them moves)."""
        t = self.pool.tensors[0]
        return num_blocks * self.n_layer * t[:, 0].numel() * t.element_size()

    def write_layer(self, layer: int, block_ids: list[int], keys: torch.Tensor,
                    values: torch.Tensor) -> None:
        """Scatter one layer's KV (``[1, heads, seq, head_dim]`` each, ``seq`` tokens filling
        ``block_ids`` in order) into the pool; the last block's spare slots get zeros."""
        n = len(block_ids)
        kv = torch.stack((keys[0], values[0])).transpose(1, 2)  # [2, seq, heads, head_dim]
        spare = n * self.block_size - kv.shape[1]
        if not 0 <= spare < self.block_size:
            raise ValueError(f"{kv.shape[1]} tokens do not fill {n} blocks of "
                             f"{self.block_size}")
        kv = F.pad(kv, (0, 0, 0, 0, 0, spare))
        index = torch.tensor(block_ids, device=kv.device)
        self.pool.tensors[layer][:, index] = kv.reshape(2, n, self.block_size, self.heads,
                                                        self.head_dim)

    def read_layer(self, layer: int, block_ids: list[int], num_tokens: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of :meth:`write_layer`: fresh contiguous ``[1, heads, num_tokens,
        head_dim]`` keys and values gathered from ``block_ids``."""
        t = self.pool.tensors[layer]
        index = torch.tensor(block_ids, device=t.device)
        kv = t[:, index].reshape(2, len(block_ids) * self.block_size, self.heads,
                                 self.head_dim)[:, :num_tokens].transpose(1, 2)
        return kv[0].unsqueeze(0).contiguous(), kv[1].unsqueeze(0).contiguous()

    def to_cache(self, block_ids: list[int], num_tokens: int) -> DynamicCache:
        """A transformers cache holding the request's ``num_tokens`` tokens of every layer,
        copied out of the pool (decoding then extends the cache, not the pool)."""
        cache = DynamicCache()
        for layer in range(self.n_layer):
            cache.update(*self.read_layer(layer, block_ids, num_tokens), layer)
        return cache
