"""The data-plane interface: what the Pipe needs from a way of moving payload bytes.

The Pipe owns ordering, keys, credits and failure; a plane only moves the payload of one
message after another, in the order posted, in each direction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

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


T = TypeVar("T")
_FROM_SOURCE: Any = object()


def settle_like(dest: asyncio.Future[T], source: asyncio.Future[Any],
                value: T = _FROM_SOURCE) -> None:
    """Complete ``dest`` the way ``source`` completed: cancelled, failed, or with ``value``
    (by default ``source``'s own result). Does nothing if ``dest`` is already done."""
    if dest.done():
        return
    if source.cancelled():
        dest.cancel()
    elif (exc := source.exception()) is not None:
        dest.set_exception(exc)
    else:
        dest.set_result(source.result() if value is _FROM_SOURCE else value)
