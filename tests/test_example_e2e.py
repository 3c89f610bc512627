"""End to end: examples/prefill_server.py -> aiokvpipe -> examples/decode_server.py.

Real uvicorn processes, real HTTP and a real pipe on 127.0.0.1: the prefill server streams
each request's KV blocks from its paged pool into the decode server's. Every wait is bounded
(httpx timeouts, bounded health polling, pytest-timeout) and every process is killed and
reaped in teardown, also when a test fails. After each scenario both servers' pools must have
every block free again: a leaked block is a failure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
pytest.importorskip("transformers")
pytest.importorskip("prometheus_client")
torch = pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import launch
import paged_kv
import tinygpt
from prometheus_client.parser import text_string_to_metric_families

STARTUP_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 30.0
TOKEN = "e2e-test-secret"
# Both servers and the reference run here; e.g. AIOKVPIPE_EXAMPLE_DEVICE=cuda:0 on a GPU box.
DEVICE = os.environ.get("AIOKVPIPE_EXAMPLE_DEVICE", "cpu")
if DEVICE.startswith("cuda") and not torch.cuda.is_available():
    pytest.skip(f"AIOKVPIPE_EXAMPLE_DEVICE={DEVICE} but no CUDA", allow_module_level=True)


class Cluster:
    """A prefill server and a decode server wired together, on fresh ports."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.http_port = launch.free_port()
        self.pipe_port = launch.free_port()
        self.prefill = self._new_prefill()
        self.decode = launch.decode_server(
            port=launch.free_port(),
            prefill_port=self.http_port,
            pipe_port=self.pipe_port,
            device=DEVICE,
            token=TOKEN,
            log_path=logdir / "decode.log",
        )

    def _new_prefill(self) -> launch.Server:
        return launch.prefill_server(
            port=self.http_port, pipe_port=self.pipe_port, device=DEVICE, token=TOKEN,
            log_path=self.logdir / "prefill.log",
        )  # fmt: skip

    def start(self) -> None:
        self.prefill.start()
        self.decode.start()
        self.prefill.wait_healthy(STARTUP_TIMEOUT_S)
        self.decode.wait_healthy(STARTUP_TIMEOUT_S, ready=launch.pipe_connected)

    def restart_prefill(self) -> None:
        """A new prefill process on the same HTTP and pipe ports (the old one must be dead)."""
        self.prefill = self._new_prefill().start()
        self.prefill.wait_healthy(STARTUP_TIMEOUT_S)

    def close(self) -> None:
        for server in (self.decode, self.prefill):
            try:
                server.stop(timeout=10.0)
            finally:
                server.kill()  # no-op when already reaped


def _cluster(logdir: Path) -> Iterator[Cluster]:
    cluster = Cluster(logdir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from _cluster(tmp_path_factory.mktemp("cluster"))


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A cluster this test may break."""
    yield from _cluster(tmp_path)


class Reference:
    """The same model in this one process: what the split pipeline must reproduce."""

    def __init__(self) -> None:
        self.model = tinygpt.build_model(DEVICE, seed=0)
        self.tok = tinygpt.ByteTokenizer()
        self._texts: dict[tuple[str, int], str] = {}

    def __call__(self, prompt: str, max_tokens: int) -> str:
        if (prompt, max_tokens) not in self._texts:
            text = tinygpt.generate(self.model, self.tok, prompt, max_tokens)
            self._texts[prompt, max_tokens] = text
        return self._texts[prompt, max_tokens]

    def kv_bytes(self, prompt: str) -> int:
        """What moving the prompt's KV blocks moves: whole blocks of every layer."""
        cfg = self.model.config
        blocks = -(-len(self.tok.encode(prompt)) // paged_kv.BLOCK_SIZE)
        return blocks * paged_kv.BLOCK_SIZE * cfg.n_layer * 2 * cfg.n_embd * 4  # float32


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference()


async def _generate(client: Any, url: str, prompt: str, max_tokens: int,
                    kv_streaming: str | None = None) -> Any:
    body = {"prompt": prompt, "max_tokens": max_tokens, "kv_streaming": kv_streaming}
    return await client.post(f"{url}/generate", json=body, timeout=HTTP_TIMEOUT_S)


async def _health(server: launch.Server) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        resp = await client.get(f"{server.url}/health")
    assert resp.status_code == 200
    body: dict[str, Any] = resp.json()
    return body


async def _wait_health(server: launch.Server, ready: Any, timeout: float = 15.0
                       ) -> dict[str, Any]:
    # Blocking poll of a subprocess: run it off the loop so the test's loop stays sane.
    return await asyncio.to_thread(server.wait_healthy, timeout, ready)


def _pool_all_free(body: dict[str, Any]) -> bool:
    return bool(body["kv_blocks"]["free"] == body["kv_blocks"]["total"])


async def _assert_no_blocks_held(cluster: Cluster) -> None:
    """Both pools have every block free once the requests are over (a request's blocks go
    back as it ends, so the decode server must show it at once; the prefill server may free
    a moment after its answer left, when the forward pass's thread is seen to be over)."""
    decode = await _health(cluster.decode)
    assert decode["inflight"] == 0
    assert _pool_all_free(decode), decode["kv_blocks"]
    if cluster.prefill.alive():
        await _wait_health(cluster.prefill, _pool_all_free, 5.0)


PROMPTS = [
    "Hello, world",
    "a",
    "Ünïcødé prompts are bytes too ✓",
    "Once upon a time, in a data center far, far away, " * 8,
    "z" * (tinygpt.MAX_POSITIONS - 32),  # fills the context exactly with the 32 new tokens
]


@pytest.mark.parametrize("kv_streaming", ["layer", "whole"])
async def test_generation_through_the_pipe_matches_single_process(
    cluster: Cluster, reference: Reference, kv_streaming: str
) -> None:
    async with httpx.AsyncClient() as client:
        for prompt in PROMPTS:
            resp = await _generate(client, cluster.decode.url, prompt, 32, kv_streaming)
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["text"] == reference(prompt, 32)
            n_prompt = len(prompt.encode())
            assert body["prompt_tokens"] == n_prompt
            assert body["tokens"] == 32
            assert body["kv_bytes"] == reference.kv_bytes(prompt)
            assert body["kv_streaming"] == kv_streaming
            for timing in ("prefill_ms", "transfer_ms", "ttft_ms", "decode_ms", "total_ms"):
                assert 0 <= body[timing] < HTTP_TIMEOUT_S * 1e3
            assert body["ttft_ms"] <= body["total_ms"]
    await _assert_no_blocks_held(cluster)


async def test_twenty_concurrent_requests_do_not_mix_and_health_answers(
    cluster: Cluster, reference: Reference
) -> None:
    prompts = [f"request {i}: hello" for i in range(20)]
    max_tokens = [48 + i for i in range(20)]
    expected = [reference(p, n) for p, n in zip(prompts, max_tokens)]
    assert len(set(expected)) == 20  # so a swapped KV cache would show up as a wrong text

    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        batch = asyncio.gather(
            *(_generate(client, cluster.decode.url, p, n) for p, n in zip(prompts, max_tokens))
        )
        probes_during_batch = 0
        max_inflight = 0
        slowest_probe = 0.0
        deadline = time.monotonic() + HTTP_TIMEOUT_S
        while not batch.done() and time.monotonic() < deadline:
            for server in (cluster.decode, cluster.prefill):
                t0 = time.perf_counter()
                resp = await client.get(f"{server.url}/health", timeout=5.0)
                slowest_probe = max(slowest_probe, time.perf_counter() - t0)
                assert resp.status_code == 200
                if server is cluster.decode:
                    max_inflight = max(max_inflight, resp.json()["inflight"])
            if not batch.done():
                probes_during_batch += 1
            await asyncio.wait([batch], timeout=0.005)
        responses = await asyncio.wait_for(batch, HTTP_TIMEOUT_S)

    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    assert [r.json()["text"] for r in responses] == expected
    assert probes_during_batch >= 1
    assert max_inflight >= 2  # health answered while the server itself had requests open
    assert slowest_probe < 2.0
    await _assert_no_blocks_held(cluster)


def _scrape_series(text: str, pipe: str) -> dict[str, float]:
    """aiokvpipe's samples of the series labelled ``pipe`` (histogram buckets left out)."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("aiokvpipe_") and sample.labels.get("pipe") == pipe
        and not sample.name.endswith("_bucket")
    }


async def _scrape(server: launch.Server, pipe: str) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=5.0) as client:
        resp = await client.get(f"{server.url}/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return _scrape_series(resp.text, pipe)


async def test_metrics_are_scraped_over_http_and_move_with_requests(
    cluster: Cluster, reference: Reference
) -> None:
    decode_before = await _scrape(cluster.decode, "decode-to-prefill")
    prefill_before = await _scrape(cluster.prefill, "prefill-to-decode")
    # The hello/welcome exchange has already moved a message each way.
    assert decode_before["aiokvpipe_messages_sent_total"] >= 1
    assert decode_before["aiokvpipe_bytes_sent_total"] > 0  # the decoder's id
    assert decode_before["aiokvpipe_send_duration_seconds_count"] >= 1
    assert prefill_before["aiokvpipe_messages_received_total"] >= 1
    assert prefill_before["aiokvpipe_bytes_received_total"] > 0
    assert prefill_before["aiokvpipe_recv_duration_seconds_count"] >= 1

    n = 4
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        responses = await asyncio.gather(
            *(_generate(client, cluster.decode.url, f"metrics {i}", 8) for i in range(n)))
    assert [r.status_code for r in responses] == [200] * n, [r.text for r in responses]

    decode = await _scrape(cluster.decode, "decode-to-prefill")
    prefill = await _scrape(cluster.prefill, "prefill-to-decode")

    def moved(after: dict[str, float], before: dict[str, float], name: str) -> float:
        return after[f"aiokvpipe_{name}"] - before.get(f"aiokvpipe_{name}", 0.0)

    # Each request's first token: one int64 message prefill -> decode.
    assert moved(prefill, prefill_before, "messages_sent_total") >= n
    assert moved(prefill, prefill_before, "bytes_sent_total") >= 8 * n
    assert moved(prefill, prefill_before, "send_duration_seconds_count") >= n
    assert moved(prefill, prefill_before, "send_duration_seconds_sum") > 0
    assert moved(decode, decode_before, "messages_received_total") >= n
    assert moved(decode, decode_before, "bytes_received_total") >= 8 * n
    assert moved(decode, decode_before, "recv_duration_seconds_count") >= n
    assert moved(decode, decode_before, "recv_duration_seconds_sum") > 0


@pytest.mark.parametrize("when", ["as soon as blocks are taken", "while decoding"])
async def test_an_abandoned_request_frees_its_blocks_and_the_pipe_goes_on(
    cluster: Cluster, reference: Reference, when: str
) -> None:
    before = await _health(cluster.decode)
    assert _pool_all_free(before)
    early = when.startswith("as soon")
    prompt = ("long prompt " * 100)[:1000] if early else "a long answer"
    max_tokens = 16 if early else 500

    def taken(body: dict[str, Any]) -> bool:
        return bool(body["kv_blocks"]["free"] < body["kv_blocks"]["total"])

    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        request = asyncio.create_task(_generate(client, cluster.decode.url, prompt, max_tokens))
        try:
            async with httpx.AsyncClient(timeout=5.0) as prober:
                deadline = time.monotonic() + HTTP_TIMEOUT_S
                while True:  # no pause between probes: the request must not finish unseen
                    body = (await prober.get(f"{cluster.decode.url}/health")).json()
                    ready = taken(body) if early else body["decoding"] >= 1
                    if ready or request.done() or time.monotonic() > deadline:
                        break
            assert not request.done(), "the request ended before it could be abandoned"
        finally:
            request.cancel()  # httpx closes the connection: the server sees the client go
    with pytest.raises(asyncio.CancelledError):
        await request

    after = await _wait_health(
        cluster.decode,
        lambda b: b["abandoned"] == before["abandoned"] + 1 and b["inflight"] == 0
        and _pool_all_free(b))
    assert after["connects"] == before["connects"]  # the pipe was not broken by it
    await _assert_no_blocks_held(cluster)
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        resp = await _generate(client, cluster.decode.url, prompt, 12)
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"] == reference(prompt, 12)
    await _assert_no_blocks_held(cluster)


async def test_invalid_request_is_rejected(cluster: Cluster) -> None:
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        resp = await _generate(client, cluster.decode.url, "hi", 0)
        assert resp.status_code == 422
        resp = await _generate(client, cluster.decode.url, "", 4)
        assert resp.status_code == 422
        too_long = "x" * (tinygpt.MAX_POSITIONS - 10)  # fits alone, not with 11 more tokens
        resp = await _generate(client, cluster.decode.url, too_long, 11)
        assert resp.status_code == 422


async def _poll_decode_health(cluster: Cluster, ready: Any, timeout: float) -> dict[str, Any]:
    return await _wait_health(cluster.decode, ready, timeout)


async def test_killed_prefill_gives_503_then_recovers_after_restart(
    own_cluster: Cluster, reference: Reference
) -> None:
    cluster = own_cluster
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        resp = await _generate(client, cluster.decode.url, "before the crash", 16)
        assert resp.status_code == 200 and resp.json()["text"] == reference("before the crash", 16)

        # Requests in every phase when the prefill server dies: waiting for their KV blocks
        # (these fail with 503), or decoding from blocks already here (these may finish).
        prompts = [(f"in flight {i} " * 80)[:900] for i in range(6)]
        batch = asyncio.gather(*(_generate(client, cluster.decode.url, p, 40) for p in prompts))
        await _poll_decode_health(cluster, lambda b: b["inflight"] >= 3, 15.0)
        cluster.prefill.kill()  # SIGKILL: no goodbye on the pipe or HTTP
        responses = await asyncio.wait_for(batch, HTTP_TIMEOUT_S)
        for prompt, r in zip(prompts, responses):
            assert r.status_code in (200, 503), r.text
            if r.status_code == 200:
                assert r.json()["text"] == reference(prompt, 40)
            else:
                assert {"error", "message"} <= r.json().keys()
        await _assert_no_blocks_held(cluster)  # failed requests gave their blocks back

        # Right after the kill (pipe maybe not yet known dead) and after the decoder noticed:
        # both must answer 503 with a JSON reason, promptly.
        for _ in range(3):
            t0 = time.monotonic()
            resp = await _generate(client, cluster.decode.url, "during the outage", 16)
            assert resp.status_code == 503, resp.text
            assert {"error", "message"} <= resp.json().keys()
            assert time.monotonic() - t0 < 10.0
        health = await _poll_decode_health(cluster, lambda b: not b["pipe_connected"], 15.0)
        assert health["last_error"]
        resp = await _generate(client, cluster.decode.url, "during the outage", 16)
        assert resp.status_code == 503
        assert "reconnecting" in resp.json()["message"]
        await _assert_no_blocks_held(cluster)

        cluster.restart_prefill()
        await _poll_decode_health(
            cluster, lambda b: b["pipe_connected"] and b["connects"] >= 2, STARTUP_TIMEOUT_S
        )

        prompts = [f"after restart {i}" for i in range(5)]
        responses = await asyncio.gather(
            *(_generate(client, cluster.decode.url, p, 24) for p in prompts)
        )
        assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
        assert [r.json()["text"] for r in responses] == [reference(p, 24) for p in prompts]
    await _assert_no_blocks_held(cluster)


async def test_killed_decode_server_is_forgotten_and_a_new_one_served(
    own_cluster: Cluster, reference: Reference
) -> None:
    cluster = own_cluster
    old = cluster.decode.wait_healthy(5.0)
    cluster.decode.kill()
    # The prefill server notices the dead pipe (heartbeat/EOF) and drops that decoder.
    await asyncio.to_thread(
        cluster.prefill.wait_healthy, 15.0, lambda b: old["decoder_id"] not in b["decoders"]
    )
    cluster.decode.start()  # same argv and ports, fresh process with a new decoder id
    new = await asyncio.to_thread(
        cluster.decode.wait_healthy, STARTUP_TIMEOUT_S, launch.pipe_connected
    )
    assert new["decoder_id"] != old["decoder_id"]
    async with httpx.AsyncClient(timeout=HTTP_TIMEOUT_S) as client:
        resp = await _generate(client, cluster.decode.url, "new decoder", 20)
    assert resp.status_code == 200, resp.text
    assert resp.json()["text"] == reference("new decoder", 20)
