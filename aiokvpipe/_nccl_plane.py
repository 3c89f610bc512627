"""The nccl data plane (CuPy NCCL on CUDA streams). Placeholder until implemented."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._plane import DataPlane


def nccl_info() -> tuple[bool, int]:
    """(CuPy with NCCL importable here, NCCL version) -- never raises."""
    try:
        from cupy.cuda import nccl  # noqa: F401
    except Exception:
        return False, 0
    return False, 0


def new_unique_ids() -> tuple[bytes, bytes]:
    raise NotImplementedError


async def start(server: bool, ids: tuple[bytes, bytes], device: torch.device,
                on_lost: Callable[[BaseException], None]) -> DataPlane:
    raise NotImplementedError
