"""A listener says why it drops a connection that does not speak aiokvpipe."""

from __future__ import annotations

import asyncio

import pytest

import aiokvpipe
from aiokvpipe import _wire

pytestmark = pytest.mark.timeout(30)


async def test_garbage_first_frame_gets_an_error_frame_before_the_close() -> None:
    listener = await aiokvpipe.listen()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 10)  # until the listener closes
        writer.close()
        frames = _wire.FrameDecoder().feed(reply)
        assert len(frames) == 1 and isinstance(frames[0], _wire.Error)
        assert frames[0].code == _wire.ErrorCode.PROTOCOL
        assert "unknown frame type" in frames[0].text
    finally:
        await listener.aclose()
