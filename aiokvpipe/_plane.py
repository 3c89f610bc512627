"""The data-plane interface: what the Pipe needs from a way of moving payload bytes.

The Pipe owns ordering, keys, credits and failure; a plane only moves the payload of one
message after another, in the order posted, in each direction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Protocol

import torch

from ._wire import TensorSpec


class DataPlane(Protocol):
    #: ``"tcp"`` or ``"nccl"``, as reported in ``Pipe.stats``.
    name: str

    def post_send(self, tensors: Sequence[torch.Tensor]) -> asyncio.Future[None]:
        """Queue the payload of the next outgoing message (contiguous tensors, in order).

        Called synchronously from ``send()`` in the caller's task, so a CUDA plane can order
        itself after work already queued on the caller's current stream. The future completes
        once the tensors' memory may be reused, and fails if the plane breaks.
        """
        ...

    def post_recv(self, specs: Sequence[TensorSpec]) -> asyncio.Future[list[torch.Tensor]]:
        """Queue the receipt of the next incoming payload into new tensors on the pipe's
        device; the future yields them once their contents are final."""
        ...

    def abort(self, exc: BaseException) -> None:
        """Break: stop all transfers at once; pending futures fail with ``exc``."""
        ...

    def close(self) -> None:
        """Release the plane's resources after a graceful close (nothing is in flight)."""
        ...
