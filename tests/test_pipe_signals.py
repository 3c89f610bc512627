"""SIGNAL frames (the ipc plane's records on the control connection) as a pipe without a
signalling plane sees them, over real sockets; the ipc pipes that read them are tested on a GPU
(tests/test_pipe_ipc.py)."""

from __future__ import annotations

import asyncio

import pytest
from conftest import PairFactory

import aiokvpipe
from aiokvpipe import _wire


async def test_a_signal_frame_on_a_pipe_without_a_signalling_plane_is_a_protocol_error(
        pair_factory: PairFactory) -> None:
    # SIGNAL frames carry the ipc plane's records; a tcp pipe has no one to read them, so
    # one breaks the receiving end as the peer's violation, and the sender is told so.
    a, b = await pair_factory()
    assert a.transport == "tcp" and b._on_signal is None
    a._control.write_encoded(_wire.encode_signal(b"\x05" + bytes(8)))
    async with asyncio.timeout(5):
        with pytest.raises(aiokvpipe.BrokenPipe) as here:
            await b.wait_closed()
        with pytest.raises(aiokvpipe.BrokenPipe) as there:
            await a.wait_closed()
    assert isinstance(here.value.__cause__, aiokvpipe.ProtocolError)
    assert "SIGNAL" in str(here.value.__cause__)
    assert isinstance(there.value.__cause__, aiokvpipe.ProtocolError)  # "peer reported ..."
    assert "SIGNAL" in str(there.value.__cause__)
