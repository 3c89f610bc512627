"""aiokvpipe.metrics: every metric as scraped from a private registry; the no-op fallback."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from aiokvpipe import metrics  # noqa: E402
from aiokvpipe.metrics import (  # noqa: E402
    BREAK_CAUSES,
    LATENCY_BUCKETS,
    REFUSAL_REASONS,
    PipeMetrics,
    handshake_refused,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value("aiokvpipe_" + name, labels)


def bucket(registry: CollectorRegistry, way: str, le: str, pipe: str) -> float | None:
    return value(registry, f"{way}_duration_seconds_bucket", le=le, pipe=pipe)


def test_messages_bytes_and_latency_histograms_each_way(registry: CollectorRegistry) -> None:
    m = PipeMetrics("prefill", registry=registry)
    m.opened()
    m.sent(4096, 3e-5)
    m.sent(100, 1e-3)  # exactly on a bound: counted in that bucket (le is inclusive)
    m.sent(0, 11.0)  # beyond the last bound: only +Inf
    m.received(1 << 20, 0.25)
    assert value(registry, "messages_sent_total", pipe="prefill") == 3
    assert value(registry, "bytes_sent_total", pipe="prefill") == 4196
    assert value(registry, "messages_received_total", pipe="prefill") == 1
    assert value(registry, "bytes_received_total", pipe="prefill") == 1 << 20
    assert bucket(registry, "send", "2e-05", "prefill") == 0
    assert bucket(registry, "send", "5e-05", "prefill") == 1
    assert bucket(registry, "send", "0.0005", "prefill") == 1
    assert bucket(registry, "send", "0.001", "prefill") == 2
    assert bucket(registry, "send", "10.0", "prefill") == 2
    assert bucket(registry, "send", "+Inf", "prefill") == 3
    assert value(registry, "send_duration_seconds_count", pipe="prefill") == 3
    assert value(registry, "send_duration_seconds_sum", pipe="prefill") == pytest.approx(
        11.00103)
    assert bucket(registry, "recv", "0.2", "prefill") == 0
    assert bucket(registry, "recv", "0.5", "prefill") == 1
    assert value(registry, "recv_duration_seconds_sum", pipe="prefill") == 0.25
    m.sent_blocks(1 << 16, 2e-3)  # a block transfer: its bytes with the messages', its call
    m.received_blocks(1 << 10, 0.3)  # counted and timed apart
    assert value(registry, "bytes_sent_total", pipe="prefill") == 4196 + (1 << 16)
    assert value(registry, "bytes_received_total", pipe="prefill") == (1 << 20) + (1 << 10)
    assert value(registry, "messages_sent_total", pipe="prefill") == 3
    assert value(registry, "block_transfers_sent_total", pipe="prefill") == 1
    assert value(registry, "block_transfers_received_total", pipe="prefill") == 1
    assert bucket(registry, "send_blocks", "0.002", "prefill") == 1
    assert value(registry, "recv_blocks_duration_seconds_sum", pipe="prefill") == 0.3


def test_buckets_span_10us_to_10s() -> None:
    assert LATENCY_BUCKETS[0] == 1e-5 and LATENCY_BUCKETS[-1] == 10.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_waits_and_inflight(registry: CollectorRegistry) -> None:
    m = PipeMetrics(peer="10.0.0.7:5555", registry=registry)
    m.opened()
    m.waited_budget(0.5)
    m.waited_budget(0.25)
    m.waited_credits(2.0)
    m.inflight(1 << 20)
    m.inflight(4096)  # a level, not a sum
    p = "10.0.0.7:5555"
    assert value(registry, "budget_wait_seconds_count", pipe=p) == 2
    assert value(registry, "budget_wait_seconds_sum", pipe=p) == 0.75
    assert value(registry, "credit_wait_seconds_count", pipe=p) == 1
    assert value(registry, "credit_wait_seconds_sum", pipe=p) == 2.0
    assert value(registry, "inflight_bytes", pipe=p) == 4096


def test_lifecycle_counts_opened_closed_and_broken_by_cause(registry: CollectorRegistry
                                                          ) -> None:
    for cause in BREAK_CAUSES:
        assert value(registry, "pipes_broken_total", cause=cause) is None  # nothing registered
    pipes = [PipeMetrics(peer=f"p{i}", registry=registry) for i in range(4)]
    assert value(registry, "pipes_opened_total") == 0
    for m in pipes:
        m.opened()
    m.opened()  # idempotent
    assert value(registry, "pipes_opened_total") == 4
    assert value(registry, "pipes_open") == 4
    pipes[0].closed()
    pipes[1].broken("heartbeat_missed")
    pipes[2].broken("heartbeat_missed")
    pipes[3].broken("peer_closed_connection")
    pipes[3].closed()  # a second end is ignored
    assert value(registry, "pipes_open") == 0
    assert value(registry, "pipes_closed_total") == 1
    assert value(registry, "pipes_broken_total", cause="heartbeat_missed") == 2
    assert value(registry, "pipes_broken_total", cause="peer_closed_connection") == 1
    # the whole closed set is exported, so rate() works before the first break of a kind
    for cause in set(BREAK_CAUSES) - {"heartbeat_missed", "peer_closed_connection"}:
        assert value(registry, "pipes_broken_total", cause=cause) == 0


def test_unknown_cause_or_reason_is_a_value_error(registry: CollectorRegistry) -> None:
    m = PipeMetrics("x", registry=registry)
    m.opened()
    with pytest.raises(ValueError):
        m.broken("gremlins")  # type: ignore[arg-type]
    assert value(registry, "pipes_open") == 1  # not ended by the bad call
    with pytest.raises(ValueError):
        handshake_refused("gremlins", registry=registry)  # type: ignore[arg-type]


def test_handshakes_refused_by_reason(registry: CollectorRegistry) -> None:
    handshake_refused("authentication", registry=registry)
    handshake_refused("authentication", registry=registry)
    handshake_refused("timeout", registry=registry)
    assert value(registry, "handshakes_refused_total", reason="authentication") == 2
    assert value(registry, "handshakes_refused_total", reason="timeout") == 1
    for reason in set(REFUSAL_REASONS) - {"authentication", "timeout"}:
        assert value(registry, "handshakes_refused_total", reason=reason) == 0


def test_unnamed_series_are_removed_when_the_last_pipe_with_the_label_ends(
        registry: CollectorRegistry) -> None:
    a = PipeMetrics(peer="host:1", registry=registry)
    b = PipeMetrics(peer="host:1", registry=registry)  # two pipes to one peer address
    a.opened()
    b.opened()
    a.sent(10, 1e-4)
    b.sent(20, 1e-4)
    a.inflight(5)
    b.inflight(7)
    assert value(registry, "bytes_sent_total", pipe="host:1") == 30
    assert value(registry, "inflight_bytes", pipe="host:1") == 12
    a.broken("peer_closed_connection")
    # the label lives on with b: what a counted stays (a counter never goes down)
    assert value(registry, "bytes_sent_total", pipe="host:1") == 30
    assert value(registry, "messages_sent_total", pipe="host:1") == 2
    assert value(registry, "inflight_bytes", pipe="host:1") == 7
    b.closed()
    b.sent(1, 1e-4)  # after the end of an unnamed pipe: dropped
    for name in ("bytes_sent_total", "messages_sent_total", "inflight_bytes",
                 "send_duration_seconds_count", "budget_wait_seconds_count"):
        assert value(registry, name, pipe="host:1") is None, name
    assert "host:1" not in generate_latest(registry).decode()


def test_named_series_outlive_the_pipe_and_continue_with_the_next(
        registry: CollectorRegistry) -> None:
    first = PipeMetrics("decode", peer="host:1", registry=registry)
    first.opened()
    first.sent(100, 1e-3)
    first.inflight(100)
    first.broken("heartbeat_missed")
    assert value(registry, "bytes_sent_total", pipe="decode") == 100
    assert value(registry, "inflight_bytes", pipe="decode") == 0
    first.received(8, 2e-3)  # a message claimed after the end still counts
    assert value(registry, "messages_received_total", pipe="decode") == 1
    assert bucket(registry, "recv", "0.002", "decode") == 1
    first.received_blocks(64, 0.1)  # so does a block transfer ending after it
    assert value(registry, "block_transfers_received_total", pipe="decode") == 1
    assert value(registry, "bytes_received_total", pipe="decode") == 72
    assert value(registry, "recv_blocks_duration_seconds_sum", pipe="decode") == 0.1
    first.waited_budget(1.0)
    first.waited_credits(1.0)
    assert value(registry, "budget_wait_seconds_sum", pipe="decode") == 1.0
    assert value(registry, "credit_wait_seconds_sum", pipe="decode") == 1.0
    second = PipeMetrics("decode", peer="host:2", registry=registry)  # a reconnect
    second.opened()
    second.sent(50, 1e-3)
    assert value(registry, "bytes_sent_total", pipe="decode") == 150
    assert value(registry, "messages_sent_total", pipe="decode") == 2
    assert value(registry, "send_duration_seconds_count", pipe="decode") == 2
    assert value(registry, "bytes_sent_total", pipe="host:2") is None  # the name wins


def test_a_name_equal_to_an_unnamed_pipes_peer_address_keeps_its_counts(
        registry: CollectorRegistry) -> None:
    # A pipe named "host:1" and an unnamed one whose peer is host:1 share the label. The
    # unnamed pipe ending last deleted the label's series, the named pipe's counts with them:
    # a counter that went back to nothing.
    named = PipeMetrics("host:1", peer="other:9", registry=registry)
    unnamed = PipeMetrics(peer="host:1", registry=registry)
    named.opened()
    unnamed.opened()
    named.sent(100, 1e-3)
    unnamed.sent(20, 1e-3)
    named.closed()
    unnamed.closed()
    assert value(registry, "bytes_sent_total", pipe="host:1") == 120
    assert value(registry, "messages_sent_total", pipe="host:1") == 2
    later = PipeMetrics(peer="host:1", registry=registry)  # and so on, never going down
    later.opened()
    later.sent(1, 1e-3)
    later.broken("peer_closed_connection")
    assert value(registry, "bytes_sent_total", pipe="host:1") == 121


def test_hooks_before_opened_show_at_opened(registry: CollectorRegistry) -> None:
    m = PipeMetrics("early", registry=registry)
    m.sent(5, 1e-4)
    assert value(registry, "bytes_sent_total", pipe="early") is None
    m.opened()
    assert value(registry, "bytes_sent_total", pipe="early") == 5
    never = PipeMetrics("never", registry=registry)
    never.sent(5, 1e-4)
    never.broken("local_failure")  # never opened: not counted as a pipe
    assert value(registry, "pipes_broken_total", cause="local_failure") == 0
    assert value(registry, "bytes_sent_total", pipe="never") is None


def test_a_disabled_instance_counts_nothing_and_registers_nothing(
        registry: CollectorRegistry) -> None:
    m = PipeMetrics("off", registry=registry, enabled=False)
    assert not m.enabled
    m.opened()
    m.sent(1, 1.0)
    m.broken("cancelled")
    assert sum(m.send_buckets) == 0
    assert list(registry.collect()) == []


def test_exposition_parses_and_one_collector_per_registry(registry: CollectorRegistry) -> None:
    for i in range(3):
        m = PipeMetrics(f"p{i}", registry=registry)
        m.opened()
        m.sent(i, 0.01 * i)
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    assert families["aiokvpipe_send_duration_seconds"].type == "histogram"
    assert families["aiokvpipe_budget_wait_seconds"].type == "summary"
    assert families["aiokvpipe_inflight_bytes"].type == "gauge"
    assert families["aiokvpipe_messages_sent"].type == "counter"
    assert len([s for s in families["aiokvpipe_messages_sent"].samples
                if s.name.endswith("_total")]) == 3
    assert value(registry, "pipes_opened_total") == 3  # one collector, not three


def test_default_registry_is_used_lazily_not_at_import() -> None:
    code = textwrap.dedent("""
        from prometheus_client import REGISTRY
        import aiokvpipe, aiokvpipe.metrics as m
        assert REGISTRY.get_sample_value("aiokvpipe_pipes_opened_total") is None
        p = m.PipeMetrics("default")
        p.opened()
        assert REGISTRY.get_sample_value("aiokvpipe_pipes_opened_total") == 1
        m.handshake_refused("protocol")
        assert REGISTRY.get_sample_value("aiokvpipe_handshakes_refused_total",
                                         {"reason": "protocol"}) == 1
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_without_prometheus_client_the_module_imports_and_hooks_do_nothing() -> None:
    # The narrowest seam: the import of prometheus_client fails, nothing else is faked.
    code = textwrap.dedent("""
        import sys
        sys.modules["prometheus_client"] = None
        import aiokvpipe
        from aiokvpipe import metrics
        assert metrics.AVAILABLE is False
        m = metrics.PipeMetrics("x", peer="h:1")
        assert m.enabled is False
        m.opened()
        m.sent(4096, 1e-5)
        m.received(4096, 1e-5)
        m.waited_budget(1.0)
        m.waited_credits(1.0)
        m.inflight(10)
        m.broken("heartbeat_missed")
        m.closed()
        metrics.handshake_refused("timeout")
        assert sum(m.send_buckets) == m.bytes_received == m.inflight_bytes == 0
        try:
            metrics.handshake_refused("nonsense")
        except ValueError:
            pass
        else:
            raise AssertionError("a bad reason must still be refused")
        assert "prometheus_client.core" not in sys.modules
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_scrape_from_another_thread_sees_consistent_histograms(
        registry: CollectorRegistry) -> None:
    import threading

    m = PipeMetrics("busy", registry=registry)
    m.opened()
    stop = threading.Event()
    seen: list[float] = []

    def scrape() -> None:
        while not stop.is_set():
            fams = {f.name: f for f in registry.collect()}
            for s in fams["aiokvpipe_messages_sent"].samples:
                if s.name.endswith("_total"):
                    seen.append(s.value)
            hist = fams["aiokvpipe_send_duration_seconds"].samples
            buckets = [s.value for s in hist if s.name.endswith("_bucket")]
            assert buckets == sorted(buckets)  # cumulative

    t = threading.Thread(target=scrape)
    t.start()
    try:
        for i in range(20000):
            m.sent(1, LATENCY_BUCKETS[i % len(LATENCY_BUCKETS)])
    finally:
        stop.set()
        t.join(30)
    assert seen == sorted(seen)  # a counter never goes down
    assert value(registry, "messages_sent_total", pipe="busy") == 20000
    assert value(registry, "send_duration_seconds_count", pipe="busy") == 20000


def test_metrics_module_exports() -> None:
    assert metrics.AVAILABLE is True
    assert set(metrics.__all__) >= {"PipeMetrics", "handshake_refused", "AVAILABLE"}


def test_a_registry_holding_our_names_already_costs_metrics_not_pipes(
        registry: CollectorRegistry, caplog: pytest.LogCaptureFixture) -> None:
    # Registering with a registry that holds a clashing name raised out of the pipe's
    # set-up: the first handshake failed.
    prometheus_client.Counter("aiokvpipe_pipes_opened", "the user's own", registry=registry)
    m = PipeMetrics(peer="p", registry=registry)
    m.opened()
    m.sent(100, 0.001)
    assert sum("not exported" in r.getMessage() for r in caplog.records) == 1
    PipeMetrics(peer="q", registry=registry).opened()  # one warning a registry, no more
    assert sum("not exported" in r.getMessage() for r in caplog.records) == 1
