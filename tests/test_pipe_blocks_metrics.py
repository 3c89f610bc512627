"""Block transfers in a pipe's figures: ``send_blocks``/``recv_blocks`` move most of the bytes
of a paged-KV deployment, so ``pipe.stats`` and the Prometheus series must count them.

Found by the example servers (issue 11/13): their /metrics showed only the first-token
messages, none of the KV blocks.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

import aiokvpipe

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry  # noqa: E402

pytestmark = pytest.mark.timeout(30)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value("aiokvpipe_" + name, labels) or 0.0


async def test_block_transfers_count_in_stats_and_metrics() -> None:
    registry = CollectorRegistry()
    opts = aiokvpipe.PipeOptions(metrics_registry=registry)
    src = aiokvpipe.BlockPool([torch.ones(2, 8, 4, 2, 8) for _ in range(3)], block_dim=1)
    dst = aiokvpipe.BlockPool([torch.zeros(2, 8, 4, 2, 8) for _ in range(3)], block_dim=1)
    moved = 3 * 2 * 2 * 4 * 2 * 8 * 4  # 3 layers x 2 blocks of [2, 4, 2, 8] float32
    async with await aiokvpipe.listen("127.0.0.1", 0, opts, name="decode") as listener:
        accept = asyncio.create_task(listener.accept())
        a = await aiokvpipe.connect("127.0.0.1", listener.port, opts, name="prefill")
        b = await accept
        try:
            async with asyncio.timeout(10):
                await asyncio.gather(a.send_blocks(src, [1, 2], key="r"),
                                     b.recv_blocks(dst, [5, 6], key="r"))
            assert torch.equal(dst.tensors[0][:, 5], src.tensors[0][:, 1])
            assert a.stats.bytes_sent == moved
            assert b.stats.bytes_received == moved
            assert value(registry, "bytes_sent_total", pipe="prefill") == moved
            assert value(registry, "bytes_received_total", pipe="decode") == moved
            # A block transfer is counted as one, and timed, apart from the messages: the
            # stats and the metrics agree. (The metrics counted it as a message, the stats
            # as nothing.)
            assert (a.stats.block_transfers_sent, a.stats.messages_sent) == (1, 0)
            assert (b.stats.block_transfers_received, b.stats.messages_received) == (1, 0)
            assert value(registry, "block_transfers_sent_total", pipe="prefill") == 1
            assert value(registry, "block_transfers_received_total", pipe="decode") == 1
            assert value(registry, "messages_sent_total", pipe="prefill") == 0
            assert value(registry, "messages_received_total", pipe="decode") == 0
            assert value(registry, "send_blocks_duration_seconds_count", pipe="prefill") == 1
            assert value(registry, "recv_blocks_duration_seconds_count", pipe="decode") == 1
            assert value(registry, "send_duration_seconds_count", pipe="prefill") == 0
        finally:
            await a.aclose()
            await b.aclose()
