"""Heartbeats judge the peer, not our own stalls."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

import aiokvpipe

pytestmark = pytest.mark.timeout(30)


async def test_a_stall_of_our_own_process_does_not_break_the_pipe() -> None:
    opts = {"heartbeat_interval": 0.1}  # silence limit 0.6 s
    listener = await aiokvpipe.listen(**opts)
    accept = asyncio.create_task(listener.accept())
    a = await aiokvpipe.connect("127.0.0.1", listener.port, **opts)
    b = await accept
    try:
        time.sleep(1.0)  # the whole process stalls (a GC, a blocking call): both ends go quiet
        for _ in range(10):  # several heartbeat periods after the stall
            await asyncio.sleep(0.1)
        assert not a.closed and not b.closed, (a._error, b._error)
        await a.send(torch.ones(3))
        got = await asyncio.wait_for(b.recv(), 5)
        assert isinstance(got, torch.Tensor) and torch.equal(got, torch.ones(3))
    finally:
        await a.aclose()
        await b.aclose()
        await listener.aclose()
