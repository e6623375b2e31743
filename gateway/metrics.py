"""Metrics, recorded once per request at its end.

Per chunk the relay only takes a timestamp, compares one gap and counts (see ``relay.forward``);
everything here runs once per request, after the response is finished.

Metrics are prometheus-client objects. Under ``gateway serve`` every Granian worker writes them to
files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, set up by the
supervisor), so one scrape of ``/metrics``, whichever worker answers it, shows the sum of all
workers. Without that variable (Granian run by hand, tests in one process) each app keeps its own
registry.

A request's figures are first added up in plain Python (``_Count``, ``_Observe``) and written to
the prometheus-client values by ``Metrics.flush()``: every ``FLUSH_INTERVAL`` seconds, before this
worker answers a scrape, and at shutdown. In multiprocess mode each value write is a locked mmap
write, about a dozen per request: ~40 us of the worker's CPU per request, against ~3 us for the
sums. The price: another worker's last second may be missing from a scrape.
"""

from __future__ import annotations

import asyncio
import logging
import os
from bisect import bisect_left
from typing import TYPE_CHECKING, Any

from gateway.state_metrics import StateMetrics

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from gateway.exchange import Exchange
    from gateway.usage import Usage

log = logging.getLogger("gateway")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds; from sub-millisecond (a fast backend) to minutes (long generations).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: The gateway's own time before a request goes upstream: microseconds to milliseconds.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0)

#: Seconds between writes of the accumulated figures to the prometheus-client values.
FLUSH_INTERVAL = 1.0


class Metrics:
    """The gateway's metric families, with children cached per label set."""

    def __init__(self, backend: str) -> None:
        from prometheus_client import CollectorRegistry

        #: The label for requests that never reached a backend (404s, 401s, ...).
        self.backend = backend
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiprocess else self.registry
        self._declare_timings(reg)
        self._declare_counts(reg)
        #: Replicas, admission, pools and traces: sampled with every flush, nothing per request.
        self.state = StateMetrics(reg)
        self._children: dict[tuple[Any, ...], Any] = {}
        self._ends: dict[tuple[str, str, str, int], tuple[Any, ...]] = {}
        self._models: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._flusher: asyncio.TimerHandle | None = None

    def _declare_timings(self, reg: CollectorRegistry | None) -> None:
        """Requests and their timings (None: prometheus-client's multiprocess files)."""
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by route, model, backend and HTTP status.",
            ["route", "model", "backend", "status"],
            registry=reg,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests being answered.",
            ["backend"],
            registry=reg,
            multiprocess_mode="livesum",
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "From the request's arrival to the first body byte from the backend, as the client sees it "
            "(Messages and Responses streams: to the first content event).",
            ["route", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "From the request's arrival to the end of its response.",
            ["route", "backend"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.overhead = Histogram(
            "gateway_overhead_seconds",
            "The gateway's own time before the request goes upstream (auth, body, checks).",
            ["route", "backend"],
            buckets=OVERHEAD_BUCKETS,
            registry=reg,
        )
        self.max_gap = Histogram(
            "gateway_stream_max_chunk_gap_seconds",
            "Each stream's largest gap between two chunks from the backend, observed once at its end.",
            ["route", "backend"],
            buckets=GAP_BUCKETS,
            registry=reg,
        )

    def _declare_counts(self, reg: CollectorRegistry | None) -> None:
        """What went wrong, and tokens."""
        from prometheus_client import Counter

        self.upstream_errors = Counter(
            "gateway_upstream_errors_total",
            "Backend failures by class: connect, timeout, reset (connection lost), status_5xx.",
            ["backend", "class"],
            registry=reg,
        )
        self.disconnects = Counter(
            "gateway_client_disconnects_total",
            "Clients that went away before their response was complete.",
            ["route", "backend"],
            registry=reg,
        )
        self.not_supported = Counter(
            "gateway_not_supported_total",
            "Requests answered 501 by the gateway because the backend kind lacks the capability.",
            ["route", "backend"],
            registry=reg,
        )
        self.tokens = Counter(
            "gateway_tokens_total",
            "Tokens reported by the backend's usage (non-streamed bodies and final usage chunks).",
            ["backend", "model", "type"],
            registry=reg,
        )
        self.tokens_estimated = Counter(
            "gateway_tokens_estimated_total",
            "Completion tokens estimated from content events, for streams without a usage chunk.",
            ["backend", "model", "type"],
            registry=reg,
        )
        self.balance = Counter(
            "gateway_balance_decisions_total",
            "Replicas picked, by backend and why (single, trial, sticky, p2c, prefix, new_prefix, load, fail_open, "
            "pinned).",
            ["backend", "reason"],
            registry=reg,
        )
        self.limit_store_errors = Counter(
            "gateway_limit_store_errors_total",
            "Requests whose shared (Redis) rate-limit check failed and fell back (or were refused).",
            registry=reg,
        )
        self.limit_decisions = Counter(
            "gateway_limit_decisions_total",
            "Per-key limit checks (keys with limits only): allowed, rejected (429), unavailable (503, fail-closed).",
            ["decision"],
            registry=reg,
        )

    def child(self, family: Any, *labels: str) -> Any:
        """The accumulator for one label set of ``family`` (made on first use, then cached)."""
        key = (id(family), *labels)
        c = self._children.get(key)
        if c is None:
            metric = family.labels(*labels)
            c = self._children[key] = _Observe(metric) if hasattr(metric, "_upper_bounds") else _Count(metric)
        return c

    def flush(self) -> None:
        """Write the worker's state (``StateMetrics.sample``) and what was added up since the last
        flush to the prometheus-client values; one value refused does not hold back the others."""
        self.state.sample()
        for c in self._children.values():
            try:
                c.flush()
            except (ValueError, OverflowError) as exc:  # e.g. a counter asked to go down
                log.warning("metric %s not written: %s", c.metric, exc)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every ``FLUSH_INTERVAL`` seconds on ``loop`` until ``stop()``."""

        def tick() -> None:
            try:
                self.flush()
            finally:
                self._flusher = loop.call_later(FLUSH_INTERVAL, tick)

        self._flusher = loop.call_later(FLUSH_INTERVAL, tick)

    def stop(self) -> None:
        """Stop the periodic flush and write out what is left."""
        if self._flusher is not None:
            self._flusher.cancel()
            self._flusher = None
        self.flush()

    def _per_end(self, route: str, model: str, backend: str, status: int) -> tuple[Any, ...]:
        """The request counter and the per-route accumulators of one label set, looked up once
        per request (tokens: ``_per_model``, made on first use, like the error counters)."""
        key = (route, model, backend, status)
        found = self._ends.get(key)
        if found is None:
            found = self._ends[key] = (
                self.child(self.requests, route, model, backend, str(status)),
                self.child(self.overhead, route, backend),
                self.child(self.ttft, route, backend),
                self.child(self.duration, route, backend),
                self.child(self.max_gap, route, backend),
                self.child(self.disconnects, route, backend),
                self.child(self.not_supported, route, backend),
            )
        return found

    def _per_model(self, backend: str, model: str) -> tuple[Any, Any]:
        key = (backend, model)
        found = self._models.get(key)
        if found is None:
            found = self._models[key] = (
                self.child(self.tokens, backend, model, "input"),
                self.child(self.tokens, backend, model, "output"),
            )
        return found

    def record(self, ex: Exchange, route: str, model: str, usage: Usage | None) -> None:
        """Add one finished request to the figures; ``usage`` is ``read_usage(ex)``, read once
        per request for the metrics and the tokens-per-minute limit alike."""
        b = ex.backend if ex.backend != "-" else self.backend
        status = ex.status
        requests, overhead, ttft, duration, max_gap, disconnects, not_supported = self._per_end(route, model, b, status)
        requests.inc()
        if ex.balance != "-":
            self.child(self.balance, b, ex.balance).inc()
        if ex.t_upstream:
            overhead.observe(ex.t_upstream - ex.t_start)
        if ex.t_first:
            ttft.observe(ex.t_first - ex.t_start)
        duration.observe(ex.t_end - ex.t_start)
        if ex.sse and ex.chunks > 1:
            max_gap.observe(ex.max_gap)
        end = ex.end
        if end == "client_gone":
            disconnects.inc()
        elif end in ("upstream_error", "timeout"):
            self.child(self.upstream_errors, b, ex.error_class or "reset").inc()
        elif status == 501 and not ex.started:
            not_supported.inc()
        if ex.started and status >= 500:
            self.child(self.upstream_errors, b, "status_5xx").inc()
        if usage is not None and route in _TOKEN_ROUTES:
            if usage.estimated:
                self.child(self.tokens_estimated, b, model, "output").inc(usage.completion)
            else:
                tokens_in, tokens_out = self._per_model(b, model)
                tokens_in.inc(usage.prompt)
                tokens_out.inc(usage.completion)

    def exposition(self) -> tuple[bytes, bytes]:
        """``/metrics``: the Prometheus text of every worker (or of this app alone) and its type."""
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        self.flush()  # this worker's figures are always current in its own answer
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST.encode()


_TOKEN_ROUTES = frozenset({"chat", "completions", "responses", "embeddings", "messages", "rerank", "score"})


class _Count:
    """A counter's or gauge's increments since the last flush."""

    __slots__ = ("metric", "pending")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.pending: float = 0

    def inc(self, amount: float = 1) -> None:
        self.pending += amount

    def dec(self, amount: float = 1) -> None:
        self.pending -= amount

    def flush(self) -> None:
        if self.pending:
            amount, self.pending = self.pending, 0
            self.metric.inc(amount)  # a gauge's inc takes a negative amount too


class _Observe:
    """A histogram's observations since the last flush: a count per bucket and their sum.

    prometheus-client keeps one value per bucket (the first whose upper bound is >= the
    observation; cumulated only in the exposition) and one for the sum; a flush adds to each
    what ``observe()`` would have added one observation at a time.
    """

    __slots__ = ("metric", "bounds", "counts", "total", "n")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.bounds: list[float] = list(metric._upper_bounds)
        self.counts = [0] * len(self.bounds)
        self.total = 0.0
        self.n = 0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.total += amount
        self.n += 1

    def flush(self) -> None:
        if not self.n:
            return
        buckets = self.metric._buckets
        counts = self.counts
        for i, count in enumerate(counts):
            if count:
                buckets[i].inc(count)
                counts[i] = 0
        self.metric._sum.inc(self.total)
        self.total = 0.0
        self.n = 0
