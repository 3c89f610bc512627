"""A real pipe's figures, scraped from a private Prometheus registry."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import eventually

import aiokvpipe

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry  # noqa: E402

pytestmark = pytest.mark.timeout(30)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value("aiokvpipe_" + name, labels) or 0.0


async def test_a_pipe_counts_messages_bytes_latency_and_its_end() -> None:
    registry = CollectorRegistry()
    opts = aiokvpipe.PipeOptions(metrics_registry=registry)
    async with await aiokvpipe.listen("127.0.0.1", 0, opts, name="decode") as listener:
        accept = asyncio.create_task(listener.accept())
        a = await aiokvpipe.connect("127.0.0.1", listener.port, opts, name="prefill")
        b = await accept
        assert value(registry, "pipes_open") == 2
        for n in (16, 1 << 18):  # one inline message, one over the data plane
            await a.send(torch.zeros(n), key="k")
            await b.recv(key="k")
        assert value(registry, "messages_sent_total", pipe="prefill") == 2
        assert value(registry, "bytes_sent_total", pipe="prefill") == 4 * (16 + (1 << 18))
        assert value(registry, "messages_received_total", pipe="decode") == 2
        assert value(registry, "recv_duration_seconds_count", pipe="decode") == 2
        assert value(registry, "send_duration_seconds_sum", pipe="prefill") > 0
        a._control._transport.abort()  # type: ignore[union-attr]
        with pytest.raises(aiokvpipe.BrokenPipe):
            await asyncio.wait_for(b.wait_closed(), 5)
        await a.aclose()
    assert value(registry, "pipes_broken_total", cause="peer_closed_connection") >= 1
    assert value(registry, "pipes_open") == 0


async def test_refused_handshakes_are_counted_by_reason() -> None:
    registry = CollectorRegistry()
    async with await aiokvpipe.listen("127.0.0.1", 0, token="right",
                                      metrics_registry=registry) as listener:
        with pytest.raises(aiokvpipe.AuthenticationError):
            await aiokvpipe.connect("127.0.0.1", listener.port, token="wrong")
        # the listener counts once its side of the handshake has ended
        await eventually(lambda: value(registry, "handshakes_refused_total",
                                       reason="authentication") == 1, 5, "refusal counted")
