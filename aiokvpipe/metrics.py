"""Prometheus metrics for pipes (optional extra ``metrics``: ``pip install aiokvpipe[metrics]``).

Without ``prometheus-client`` this module still imports and every hook is a no-op
(:data:`AVAILABLE` is then ``False``).

What is exported (all names start with ``aiokvpipe_``)::

    messages_sent_total{pipe}          counter    messages whose send() completed
    messages_received_total{pipe}      counter    messages handed to a recv() caller
    block_transfers_sent_total{pipe}   counter    send_blocks() calls that completed
    block_transfers_received_total{pipe} counter  recv_blocks() calls that completed
    bytes_sent_total{pipe}             counter    payload bytes of those: messages and blocks
    bytes_received_total{pipe}         counter
    send_duration_seconds{pipe}        histogram  send() called -> returned
    recv_duration_seconds{pipe}        histogram  recv() called -> returned (waiting included)
    send_blocks_duration_seconds{pipe} histogram  send_blocks() called -> returned
    recv_blocks_duration_seconds{pipe} histogram  recv_blocks() called -> returned
    budget_wait_seconds{pipe}          summary    time send() waited for max_inflight_bytes
    credit_wait_seconds{pipe}          summary    time send() waited for the peer's credits
    inflight_bytes{pipe}               gauge      payload bytes posted and not yet sent
    pipes_open                         gauge
    pipes_opened_total                 counter
    pipes_closed_total                 counter    ended gracefully
    pipes_broken_total{cause}          counter    cause: one of BREAK_CAUSES
    handshakes_refused_total{reason}   counter    reason: one of REFUSAL_REASONS

Histogram buckets run from 10 µs to 10 s (1-2-5 steps, see :data:`LATENCY_BUCKETS`).

Label cardinality is bounded. ``cause`` and ``reason`` are closed sets, every value exported
from the start (at 0). ``pipe`` is either a name the user chose, whose series outlive the pipe
and are shared by every pipe of that name (a reconnecting pipe keeps counting where the last
one stopped), or, without a name, the peer's address, whose series are removed when the last
pipe with that label ends (a name that equals a peer's address shares its series, which then
outlive their pipes as a name's do). So the number of ``pipe`` values is at most the number
of names the user chose plus the number of pipes open now.

Cost: the per-message hooks add to plain attributes of the pipe's own :class:`PipeMetrics`
(no lock, no label look-up); values are read only when the registry is scraped, by a
collector registered once per registry. Each :class:`PipeMetrics` must be used from one thread
(its pipe's event loop); scraping from any thread is safe.
"""

from __future__ import annotations

import logging
import threading
import weakref
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final, Literal, get_args

log = logging.getLogger("aiokvpipe")

try:
    from prometheus_client import REGISTRY as _DEFAULT_REGISTRY
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
        Metric,
        SummaryMetricFamily,
    )
    from prometheus_client.utils import floatToGoString
    _available = True
except ImportError:  # the optional extra is not installed: every hook is a no-op
    _available = False

#: Whether ``prometheus-client`` is installed (else every hook is a no-op).
AVAILABLE: Final[bool] = _available

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

__all__ = [
    "AVAILABLE",
    "BREAK_CAUSES",
    "LATENCY_BUCKETS",
    "REFUSAL_REASONS",
    "BreakCause",
    "PipeMetrics",
    "RefusalReason",
    "handshake_refused",
]

#: Why a pipe broke (label ``cause`` of ``aiokvpipe_pipes_broken_total``).
BreakCause = Literal[
    "peer_closed_connection",  # the connection ended without a graceful close (peer died)
    "heartbeat_missed",  # the peer was silent longer than heartbeat_timeout
    "protocol_error",  # the peer sent bytes that violate the wire format or its limits
    "peer_failure",  # the peer reported a failure on its side (an ERROR frame)
    "local_failure",  # something failed here: an allocation, CUDA, a data plane
    "close_timeout",  # a graceful close did not complete in time
    "cancelled",  # aborted here: aclose() cancelled, the pipe torn down by its owner
]
BREAK_CAUSES: Final[tuple[BreakCause, ...]] = get_args(BreakCause)

#: Why a handshake was refused (label ``reason`` of ``aiokvpipe_handshakes_refused_total``).
RefusalReason = Literal[
    "authentication",  # one side could not prove it holds the shared token
    "protocol",  # not aiokvpipe, a malformed or oversized handshake frame
    "version",  # an aiokvpipe of an incompatible protocol version
    "unsupported",  # the ends cannot agree: transport, device, options
    "timeout",  # the handshake did not finish within handshake_timeout
    "connection_lost",  # the peer hung up during the handshake
]
REFUSAL_REASONS: Final[tuple[RefusalReason, ...]] = get_args(RefusalReason)

#: Upper bounds (seconds) of the latency histograms' buckets: 10 µs to 10 s in 1-2-5 steps.
LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3,
    0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)

_NBUCKETS: Final = len(LATENCY_BUCKETS) + 1  # and +Inf


class PipeMetrics:
    """The metrics of one pipe: the pipe calls these hooks, each costs a few attribute updates.

    ``PipeMetrics(name, peer=..., registry=None, enabled=True)``: the series are labelled
    ``pipe=name`` when ``name`` is given (kept after the pipe ends, shared by pipes of that
    name), else ``pipe=peer`` (removed when the last pipe with that label ends). ``registry``
    is a ``prometheus_client.CollectorRegistry``; ``None`` means the default ``REGISTRY``.

    Life: hooks may be called from construction on; the series appear at :meth:`opened` and
    the pipe ends them with exactly one of :meth:`closed` or :meth:`broken` (a second end is
    ignored). Hooks called after the end still count for a named pipe and are dropped for an
    unnamed one. All hooks are no-ops when ``prometheus-client`` is missing or with
    ``enabled=False`` (nothing is registered then); :attr:`enabled` tells the caller whether
    timing a call is worth it.
    """

    __slots__ = ("enabled", "label", "_live", "_late_hooks_count", "_named", "_collector",
                 "_opened", "_ended",
                 "bytes_sent", "send_seconds", "send_buckets",
                 "bytes_received", "recv_seconds", "recv_buckets",
                 "send_blocks_seconds", "send_blocks_buckets",
                 "recv_blocks_seconds", "recv_blocks_buckets",
                 "budget_waits", "budget_wait_seconds", "credit_waits", "credit_wait_seconds",
                 "inflight_bytes")

    def __init__(self, name: str | None = None, *, peer: str = "",
                 registry: CollectorRegistry | None = None, enabled: bool = True) -> None:
        #: False without prometheus-client or with ``enabled=False``: every hook is a no-op
        self.enabled: bool = AVAILABLE and enabled
        #: the value of the ``pipe`` label
        self.label: str = name if name is not None else peer
        self._named = name is not None
        #: False when disabled or ended: the hot hooks then take their slow path
        self._live = self.enabled
        #: True once a named pipe ended: hooks then count straight into its label's totals
        self._late_hooks_count = False
        self._collector = _collector_for(registry) if self.enabled else None
        self._opened = False
        self._ended = False
        # A message count is the sum of its histogram's buckets: one update less per message.
        self.bytes_sent = 0
        self.send_seconds = 0.0
        self.send_buckets = [0] * _NBUCKETS
        self.bytes_received = 0
        self.recv_seconds = 0.0
        self.recv_buckets = [0] * _NBUCKETS
        self.send_blocks_seconds = 0.0
        self.send_blocks_buckets = [0] * _NBUCKETS
        self.recv_blocks_seconds = 0.0
        self.recv_blocks_buckets = [0] * _NBUCKETS
        self.budget_waits = 0
        self.budget_wait_seconds = 0.0
        self.credit_waits = 0
        self.credit_wait_seconds = 0.0
        self.inflight_bytes = 0

    # -- per message: keep these cheap --------------------------------------------------------

    def sent(self, nbytes: int, seconds: float) -> None:
        """A ``send()`` of ``nbytes`` payload bytes returned after ``seconds``."""
        if not self._live:
            if self._late_hooks_count:
                self._late(sent=(nbytes, seconds))
            return
        self.bytes_sent += nbytes
        self.send_seconds += seconds
        self.send_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def received(self, nbytes: int, seconds: float) -> None:
        """A ``recv()`` returned a message of ``nbytes`` payload bytes after ``seconds``."""
        if not self._live:
            if self._late_hooks_count:
                self._late(received=(nbytes, seconds))
            return
        self.bytes_received += nbytes
        self.recv_seconds += seconds
        self.recv_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def sent_blocks(self, nbytes: int, seconds: float) -> None:
        """A ``send_blocks()`` of ``nbytes`` returned after ``seconds`` (a block transfer,
        not a message: its bytes count with the messages', its call apart)."""
        if not self._live:
            if self._late_hooks_count:
                self._late(sent_blocks=(nbytes, seconds))
            return
        self.bytes_sent += nbytes
        self.send_blocks_seconds += seconds
        self.send_blocks_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def received_blocks(self, nbytes: int, seconds: float) -> None:
        """A ``recv_blocks()`` of ``nbytes`` returned after ``seconds``."""
        if not self._live:
            if self._late_hooks_count:
                self._late(received_blocks=(nbytes, seconds))
            return
        self.bytes_received += nbytes
        self.recv_blocks_seconds += seconds
        self.recv_blocks_buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1

    def waited_budget(self, seconds: float) -> None:
        """A ``send()`` waited ``seconds`` for ``max_inflight_bytes`` to free up."""
        if not self._live:
            if self._late_hooks_count:
                self._late(budget=seconds)
            return
        self.budget_waits += 1
        self.budget_wait_seconds += seconds

    def waited_credits(self, seconds: float) -> None:
        """A ``send()`` waited ``seconds`` for receive credits from the peer."""
        if not self._live:
            if self._late_hooks_count:
                self._late(credits=seconds)
            return
        self.credit_waits += 1
        self.credit_wait_seconds += seconds

    def inflight(self, nbytes: int) -> None:
        """Payload bytes of this pipe in flight now (sent ones posted, not yet complete)."""
        if self._live:
            self.inflight_bytes = nbytes

    # -- lifecycle ----------------------------------------------------------------------------

    def opened(self) -> None:
        """The pipe is open: its series appear, ``pipes_opened_total`` counts it. Idempotent."""
        if self._collector is None or self._opened or self._ended:
            return
        self._opened = True
        self._collector.attach(self)

    def closed(self) -> None:
        """The pipe ended gracefully (counted in ``pipes_closed_total``)."""
        self._end(None)

    def broken(self, cause: BreakCause) -> None:
        """The pipe broke; ``cause`` is one of :data:`BREAK_CAUSES` (else ``ValueError``)."""
        if cause not in BREAK_CAUSES:
            raise ValueError(f"unknown break cause {cause!r}; one of {BREAK_CAUSES}")
        self._end(cause)

    def _end(self, cause: BreakCause | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._live = False
        self.inflight_bytes = 0
        if self._collector is not None and self._opened:
            self._collector.detach(self, cause)
            self._late_hooks_count = self._named

    def _late(self, **hook: Any) -> None:
        # A hook after the end (say a recv() of a message that arrived before the close):
        # only a named series outlives its pipe to count it. ``hook``: one of
        # _Totals.record's keywords.
        if self._collector is not None:
            self._collector.add_late(self.label, hook)

    def __repr__(self) -> str:
        state = ("disabled" if not self.enabled else "ended" if self._ended
                 else "open" if self._opened else "new")
        return f"<aiokvpipe.metrics.PipeMetrics pipe={self.label!r} {state}>"


def handshake_refused(reason: RefusalReason, *,
                      registry: CollectorRegistry | None = None) -> None:
    """Count a refused or failed handshake; ``reason`` is one of :data:`REFUSAL_REASONS`
    (else ``ValueError``). A no-op without ``prometheus-client``."""
    if reason not in REFUSAL_REASONS:
        raise ValueError(f"unknown refusal reason {reason!r}; one of {REFUSAL_REASONS}")
    if AVAILABLE:
        _collector_for(registry).refused(reason)


# -- the collector: reads the PipeMetrics at scrape time ------------------------------------------

class _Totals:
    """Counts summed over pipes: what the ended pipes of a label counted, or (at scrape
    time) a label's whole total."""

    __slots__ = ("bytes_sent", "send_seconds", "send_buckets",
                 "bytes_received", "recv_seconds", "recv_buckets",
                 "send_blocks_seconds", "send_blocks_buckets",
                 "recv_blocks_seconds", "recv_blocks_buckets",
                 "budget_waits", "budget_wait_seconds", "credit_waits", "credit_wait_seconds",
                 "inflight_bytes")

    def __init__(self) -> None:
        self.bytes_sent = self.bytes_received = 0
        self.send_seconds = self.recv_seconds = 0.0
        self.send_blocks_seconds = self.recv_blocks_seconds = 0.0
        self.send_buckets = [0] * _NBUCKETS
        self.recv_buckets = [0] * _NBUCKETS
        self.send_blocks_buckets = [0] * _NBUCKETS
        self.recv_blocks_buckets = [0] * _NBUCKETS
        self.budget_waits = self.credit_waits = 0
        self.budget_wait_seconds = self.credit_wait_seconds = 0.0
        self.inflight_bytes = 0  # always 0: an ended pipe has nothing in flight

    @property
    def messages_sent(self) -> int:
        return sum(self.send_buckets)

    @property
    def messages_received(self) -> int:
        return sum(self.recv_buckets)

    @property
    def block_transfers_sent(self) -> int:
        return sum(self.send_blocks_buckets)

    @property
    def block_transfers_received(self) -> int:
        return sum(self.recv_blocks_buckets)

    def add(self, m: PipeMetrics | _Totals) -> None:
        self.bytes_sent += m.bytes_sent
        self.bytes_received += m.bytes_received
        self.budget_waits += m.budget_waits
        self.budget_wait_seconds += m.budget_wait_seconds
        self.credit_waits += m.credit_waits
        self.credit_wait_seconds += m.credit_wait_seconds
        self.inflight_bytes += m.inflight_bytes
        for way in _WAYS:
            setattr(self, f"{way}_seconds",
                    getattr(self, f"{way}_seconds") + getattr(m, f"{way}_seconds"))
            mine = getattr(self, f"{way}_buckets")
            # list() first: the owner's loop may be adding to it meanwhile
            for i, n in enumerate(list(getattr(m, f"{way}_buckets"))):
                mine[i] += n


    def record(self, sent: tuple[int, float] | None = None,
               received: tuple[int, float] | None = None,
               sent_blocks: tuple[int, float] | None = None,
               received_blocks: tuple[int, float] | None = None,
               budget: float | None = None, credits: float | None = None) -> None:
        """Count one late hook (see PipeMetrics._late); the caller holds the lock."""
        for call, way, attr in ((sent, "send", "bytes_sent"),
                                (received, "recv", "bytes_received"),
                                (sent_blocks, "send_blocks", "bytes_sent"),
                                (received_blocks, "recv_blocks", "bytes_received")):
            if call is not None:
                setattr(self, attr, getattr(self, attr) + call[0])
                setattr(self, f"{way}_seconds", getattr(self, f"{way}_seconds") + call[1])
                getattr(self, f"{way}_buckets")[bisect_left(LATENCY_BUCKETS, call[1])] += 1
        if budget is not None:
            self.budget_waits += 1
            self.budget_wait_seconds += budget
        if credits is not None:
            self.credit_waits += 1
            self.credit_wait_seconds += credits


class _Label:
    """The live pipes of one ``pipe`` label, and (named labels only) what ended ones counted."""

    __slots__ = ("live", "retired", "named")

    def __init__(self) -> None:
        self.live: list[PipeMetrics] = []
        self.retired: _Totals | None = None
        #: A named pipe used it: it outlives its pipes, even when an unnamed pipe whose peer
        #: address is that name ends last (else the name's counters would go back to 0).
        self.named = False


_P: Final = "aiokvpipe_"
#: The calls timed, each with its ``<way>_seconds`` and ``<way>_buckets``.
_WAYS: Final = ("send", "recv", "send_blocks", "recv_blocks")


_BUCKET_LABELS: Final[tuple[str, ...]] = (
    (*(floatToGoString(b) for b in LATENCY_BUCKETS), "+Inf") if AVAILABLE else ())


class _Collector:
    """A prometheus_client collector over the live PipeMetrics of one registry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._labels: dict[str, _Label] = {}
        self._opened = 0
        self._closed = 0
        self._broken = dict.fromkeys(BREAK_CAUSES, 0)
        self._refused = dict.fromkeys(REFUSAL_REASONS, 0)

    # called by PipeMetrics (rarely: once or twice per pipe)

    def attach(self, m: PipeMetrics) -> None:
        with self._lock:
            entry = self._labels.setdefault(m.label, _Label())
            entry.live.append(m)
            entry.named |= m._named
            self._opened += 1

    def detach(self, m: PipeMetrics, cause: BreakCause | None) -> None:
        with self._lock:
            if cause is None:
                self._closed += 1
            else:
                self._broken[cause] += 1
            entry = self._labels[m.label]
            entry.live.remove(m)
            if not entry.named and not entry.live:
                del self._labels[m.label]  # bounded cardinality: the series go with the pipe
                return
            # A named label, or an unnamed one still used by another pipe (two pipes to one
            # peer address): keep what this pipe counted, so counters never go down.
            if entry.retired is None:
                entry.retired = _Totals()
            entry.retired.add(m)

    def add_late(self, label: str, hook: dict[str, Any]) -> None:
        with self._lock:
            entry = self._labels.get(label)
            if entry is not None and entry.retired is not None:
                entry.retired.record(**hook)

    def refused(self, reason: RefusalReason) -> None:
        with self._lock:
            self._refused[reason] += 1

    # called by the registry

    def describe(self) -> list[Metric]:
        return list(self._families({}))

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            totals: dict[str, _Totals] = {}
            for label, entry in self._labels.items():
                t = totals[label] = _Totals()
                if entry.retired is not None:
                    t.add(entry.retired)
                for m in entry.live:
                    t.add(m)
            families = list(self._families(totals))
        yield from families

    def _families(self, totals: dict[str, _Totals]) -> Iterator[Metric]:
        def counter(name: str, doc: str, attr: str) -> CounterMetricFamily:
            f = CounterMetricFamily(_P + name, doc, labels=["pipe"])
            for label, t in totals.items():
                f.add_metric([label], getattr(t, attr))
            return f

        yield counter("messages_sent", "Messages whose send() completed.", "messages_sent")
        yield counter("messages_received", "Messages returned by recv().", "messages_received")
        yield counter("block_transfers_sent", "send_blocks() calls that completed.",
                      "block_transfers_sent")
        yield counter("block_transfers_received", "recv_blocks() calls that completed.",
                      "block_transfers_received")
        yield counter("bytes_sent", "Payload bytes sent: messages and blocks.", "bytes_sent")
        yield counter("bytes_received", "Payload bytes received: messages and blocks.",
                      "bytes_received")
        for way, doc in (("send", "send() called to returned, seconds."),
                         ("recv", "recv() called to returned (waiting included), seconds."),
                         ("send_blocks", "send_blocks() called to returned, seconds."),
                         ("recv_blocks", "recv_blocks() called to returned (waiting "
                                         "included), seconds.")):
            h = HistogramMetricFamily(_P + f"{way}_duration_seconds", doc, labels=["pipe"])
            for label, t in totals.items():
                counts: list[int] = getattr(t, f"{way}_buckets")
                cumulative, acc = [], 0
                for bound, n in zip(_BUCKET_LABELS, counts):
                    acc += n
                    cumulative.append((bound, float(acc)))
                h.add_metric([label], cumulative, getattr(t, f"{way}_seconds"))
            yield h
        for what, doc in (("budget", "Time send() waited for max_inflight_bytes, seconds."),
                          ("credit", "Time send() waited for the peer's receive credits, "
                                     "seconds.")):
            s = SummaryMetricFamily(_P + f"{what}_wait_seconds", doc, labels=["pipe"])
            for label, t in totals.items():
                s.add_metric([label], getattr(t, f"{what}_waits"),
                             getattr(t, f"{what}_wait_seconds"))
            yield s
        g = GaugeMetricFamily(_P + "inflight_bytes", "Payload bytes posted and not yet sent.",
                              labels=["pipe"])
        for label, t in totals.items():
            g.add_metric([label], t.inflight_bytes)
        yield g
        yield GaugeMetricFamily(_P + "pipes_open", "Pipes open now.",
                                value=self._opened - self._closed - sum(self._broken.values()))
        yield CounterMetricFamily(_P + "pipes_opened", "Pipes opened.", value=self._opened)
        yield CounterMetricFamily(_P + "pipes_closed", "Pipes that ended gracefully.",
                                  value=self._closed)
        b = CounterMetricFamily(_P + "pipes_broken", "Pipes that broke, by cause.",
                                labels=["cause"])
        for cause, n in self._broken.items():
            b.add_metric([cause], n)
        yield b
        r = CounterMetricFamily(_P + "handshakes_refused", "Handshakes refused, by reason.",
                                labels=["reason"])
        for reason, n in self._refused.items():
            r.add_metric([reason], n)
        yield r


_collectors: weakref.WeakKeyDictionary[Any, _Collector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


def _collector_for(registry: CollectorRegistry | None) -> _Collector:
    """The collector registered with ``registry`` (registered on first use, never at import)."""
    if registry is None:
        registry = _DEFAULT_REGISTRY
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None:
            collector = _collectors[registry] = _Collector()
            try:
                registry.register(collector)
            except ValueError as exc:  # names the registry holds already: pipes go on
                log.warning("aiokvpipe's metrics are not exported to %r: %s", registry, exc)
        return collector
