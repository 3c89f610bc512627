"""The implementations a case can name -- ours and each baseline -- and how a measured process
runs one.

A case's ``impl`` (also kept in every JSON record) is a key of :data:`IMPLS`. To add a baseline
(the ``ipc`` suite's consumer copying out of the producer's buffer mapped through CUDA IPC, the
``blocks`` suite's copy kernel over block ids): write its side of a case, either an asyncio
:class:`~.endpoints.Endpoint` or a blocking ``(role, device, case, emit) -> phase results`` in a
module of its own as :mod:`.raw_nccl` is, and register it below with its label.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .block_endpoint import BlocksEndpoint
from .blocks_ipc_copy import ipc_copy_case
from .common import Emit, Json
from .endpoints import (
    CeilingEndpoint,
    EndpointClass,
    OursEndpoint,
    OursNoPollEndpoint,
    StreamsEndpoint,
    TensorStreamsEndpoint,
)
from .measure import run_endpoint_case
from .raw_ipc import pipe_memory_case, raw_ipc_case
from .raw_nccl import raw_nccl_case

#: Runs one case's phases on one side, in a measured process: ``(role, device, case, emit)``
#: → that side's results, one per phase; raises on any failure. The receiver goes first and
#: emits ``{"type": "rendezvous", "value": ...}`` for the coordinator to hand to the sender.
CaseRunner = Callable[[str, str, Json, Emit], list[Json]]


@dataclass(frozen=True)
class Impl:
    label: str
    """Its name in tables, plots and progress lines."""
    run: CaseRunner


def _asyncio(endpoint: EndpointClass) -> CaseRunner:
    return functools.partial(run_endpoint_case, endpoint)


IMPLS: Final[dict[str, Impl]] = {
    "ours": Impl("ours", _asyncio(OursEndpoint)),
    "ours-no-poll": Impl("ours, no busy poll", _asyncio(OursNoPollEndpoint)),
    "streams-asyncio": Impl("asyncio streams", _asyncio(StreamsEndpoint)),
    "streams-uvloop": Impl("uvloop streams", _asyncio(StreamsEndpoint)),
    "streams-tensors": Impl("tensor streams (uvloop)", _asyncio(TensorStreamsEndpoint)),
    "ceiling": Impl("ceiling", _asyncio(CeilingEndpoint)),
    "nccl-raw": Impl("raw NCCL", raw_nccl_case),
    "ipc-raw": Impl("raw IPC copy", raw_ipc_case),
    "pipe-memory": Impl("GPU memory of one pipe", pipe_memory_case),
    "blocks": Impl("ours, blocks", _asyncio(BlocksEndpoint)),
    "blocks-ipc-copy": Impl("CUDA IPC copy", ipc_copy_case),
}


def label(impl: str) -> str:
    return IMPLS[impl].label
