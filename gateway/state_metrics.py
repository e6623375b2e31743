"""Metrics of the worker's state rather than of its requests: replicas, admission, pools, traces.

Nothing here runs per request. The balancer, the pools and the span processor count in plain
integers where things happen (a replica ejected, a request refused admission, an acquire that
waited, a span dropped: the rare paths); ``StateMetrics.sample()``, called with every metrics flush
(once a second, and before this worker answers a scrape), reads those integers and the current
states and writes what changed to prometheus-client. A state shorter than a second may be missed
by the gauges; the counters miss nothing.

Gauges are summed over live workers (prometheus-client's ``livesum``): ``gateway_replica_state``
counts the workers that see a replica in each state (each worker has its own passive view).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.balance import Backend

#: Every state a replica can be reported in (``Replica.state_now``): each is a series, 0 or 1 per
#: worker, so a dashboard sees a state go to 0 rather than a series vanish.
REPLICA_STATES = ("ready", "ejected", "loading", "unreachable")


class StateMetrics:
    """The state families, and what was last written to each (only changes are written)."""

    def __init__(self, reg: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Gauge

        self.replica_state = Gauge(
            "gateway_replica_state",
            "Workers that see the replica in each state (ready, ejected, loading, unreachable).",
            ["backend", "replica", "state"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.ejections = Counter(
            "gateway_replica_ejections_total",
            "Replicas taken out of the rotation: after consecutive failures, or for a 429's Retry-After.",
            ["backend", "replica", "reason"],
            registry=reg,
        )
        self.queue = Gauge(
            "gateway_admission_queue_length",
            "Requests waiting for admission under GATEWAY_MAX_INFLIGHT.",
            ["backend"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.rejections = Counter(
            "gateway_admission_rejections_total",
            "Requests refused by admission: queue_full, queue_timeout, draining.",
            ["backend", "reason"],
            registry=reg,
        )
        self.pool_connections = Gauge(
            "gateway_pool_connections",
            "Connections to a replica: active (a request on it) or idle.",
            ["backend", "replica", "state"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.pool_waits = Counter(
            "gateway_pool_waits_total",
            "Requests that found every connection to their replica busy and waited for one.",
            ["backend", "replica"],
            registry=reg,
        )
        self.pool_timeouts = Counter(
            "gateway_pool_wait_timeouts_total",
            "Requests that waited for a connection longer than GATEWAY_POOL_TIMEOUT (answered 503).",
            ["backend", "replica"],
            registry=reg,
        )
        self.spans_dropped = Counter(
            "gateway_trace_spans_dropped_total",
            "Spans not exported: the export queue was full, or the collector failed or timed out.",
            ["reason"],
            registry=reg,
        )
        self._last: dict[tuple[Any, ...], float] = {}
        self._children: dict[tuple[Any, ...], Any] = {}
        self.backends: list[Backend] = []
        #: The tracing's drop counts by reason, when tracing is on (``gateway.tracing``).
        self.drops: Callable[[], Iterable[tuple[str, int]]] | None = None

    def _child(self, family: Any, *labels: str) -> Any:
        key = (id(family), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def _set(self, family: Any, value: float, *labels: str) -> None:
        """Set a gauge, written only when it changed."""
        key = (id(family), *labels)
        if self._last.get(key) != value:
            self._child(family, *labels).set(value)
            self._last[key] = value

    def _add(self, family: Any, total: int, *labels: str) -> None:
        """Bring a counter to ``total``, an integer counted elsewhere since this worker started."""
        key = (id(family), *labels)
        child = self._child(family, *labels)  # made at the first sample: the series shows 0 from the start
        seen = self._last.get(key, 0)
        if total != seen:
            child.inc(total - seen)
            self._last[key] = total

    def sample(self) -> None:
        """Write the current states and the counts since the last sample."""
        now = time.monotonic()
        for backend in self.backends:
            name = backend.name
            self._set(self.queue, backend.queued, name)
            for reason, total in backend.rejected.items():
                self._add(self.rejections, total, name, reason)
            for replica in backend.replicas:
                label = replica.target.label
                state = replica.state_now(now)
                for each in REPLICA_STATES:
                    self._set(self.replica_state, 1 if each == state else 0, name, label, each)
                self._add(self.ejections, replica.ejections, name, label, "failures")
                self._add(self.ejections, replica.cool_offs, name, label, "rate_limited")
                pool = replica.pool
                self._set(self.pool_connections, pool.active, name, label, "active")
                self._set(self.pool_connections, pool.idle, name, label, "idle")
                self._add(self.pool_waits, pool.waits, name, label)
                self._add(self.pool_timeouts, pool.wait_timeouts, name, label)
        if self.drops is not None:
            for reason, total in self.drops():
                self._add(self.spans_dropped, total, reason)
