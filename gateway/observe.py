"""Metrics and access logs, recorded once per request at its end.

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
import datetime
import json
import logging
import os
import random
import re
import sys
import time
from bisect import bisect_left
from typing import Any

import orjson

from gateway.relay import Exchange

log = logging.getLogger("gateway")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds; from sub-millisecond (a fast backend) to minutes (long generations).
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
#: The gateway's own time before a request goes upstream: microseconds to milliseconds.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)
GAP_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0)

#: The largest token count taken from a backend's usage (the keys file's tpm bound).
MAX_USAGE = 1_000_000_000
#: Seconds between writes of the accumulated figures to the prometheus-client values.
FLUSH_INTERVAL = 1.0

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_random_bits = random.getrandbits
_json_decoder = json.JSONDecoder()


def request_id(given: bytes | None) -> bytes:
    """The client's X-Request-ID when it is 1-128 of ``[A-Za-z0-9._-]``, else a new one: 96
    random bits in hex, from ``random`` (no system call per request as with os.urandom; the
    module reseeds itself in a forked worker, so workers never share a sequence)."""
    if given is not None and _REQUEST_ID.fullmatch(given):
        return given
    return b"%024x" % _random_bits(96)


def find_usage(tail: bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens from the last ``"usage":{...}`` in the response's last bytes.

    Only the tail is looked at: the final usage chunk of a stream, or the end of a JSON body,
    where OpenAI-compatible servers put ``usage``. Nothing else of the body is parsed.
    """
    at = tail.rfind(b'"usage"')
    return None if at < 0 else _usage_at(tail, at)


def exchange_usage(ex: Exchange) -> tuple[int, int] | None:
    """``find_usage`` over the last two pieces relayed, without joining them when the last one
    holds ``"usage"`` (the last occurrence in both is then the last one in it)."""
    last = ex.last
    at = last.rfind(b'"usage"')
    if at >= 0:
        return _usage_at(last, at)
    return find_usage(ex.prev + last) if ex.prev else None


def _usage_at(tail: bytes, at: int) -> tuple[int, int] | None:
    try:
        text = tail[at + 7 :].decode("utf-8", "replace")
        colon = text.index(":")
        start = colon + 1
        while start < len(text) and text[start] in " \t\r\n":
            start += 1
        value, _ = _json_decoder.raw_decode(text, start)
    except (ValueError, IndexError):
        return None
    if not isinstance(value, dict):
        return None
    prompt, completion = value.get("prompt_tokens"), value.get("completion_tokens")
    # Counts a backend can mean: ints (not bools), never negative (a counter cannot go down),
    # and not beyond what a float counter holds exactly.
    if type(prompt) is not int or type(completion) is not int:
        return None
    if not (0 <= prompt <= MAX_USAGE and 0 <= completion <= MAX_USAGE):
        return None
    return prompt, completion


def tokens_used(ex: Exchange) -> int:
    """Tokens a finished request used: its usage, else (streams) the estimate from its chunks."""
    if not ex.started or not 200 <= ex.status < 300:
        return 0
    usage = exchange_usage(ex)
    if usage is not None:
        return usage[0] + usage[1]
    return max(ex.chunks - (3 if ex.end == "done" else 1), 0) if ex.sse else 0


class Metrics:
    """The gateway's metric families, with children cached per label set."""

    def __init__(self, backend: str) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        #: The label for requests that never reached a backend (404s, 401s, ...).
        self.backend = backend
        self.multiprocess = bool(os.environ.get(MULTIPROC_ENV))
        self.registry = CollectorRegistry(auto_describe=True)
        reg = None if self.multiprocess else self.registry
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
            "From the request's arrival to the first body byte from the backend, as the client sees it.",
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
        self.limit_store_errors = Counter(
            "gateway_limit_store_errors_total",
            "Requests whose shared (Redis) rate-limit check failed and fell back (or were refused).",
            registry=reg,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._ends: dict[tuple[str, str, str, int], tuple[Any, ...]] = {}
        self._models: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._flusher: asyncio.TimerHandle | None = None

    def child(self, family: Any, *labels: str) -> Any:
        """The accumulator for one label set of ``family`` (made on first use, then cached)."""
        key = (id(family), *labels)
        c = self._children.get(key)
        if c is None:
            metric = family.labels(*labels)
            c = self._children[key] = _Observe(metric) if hasattr(metric, "_upper_bounds") else _Count(metric)
        return c

    def flush(self) -> None:
        """Write what was added up since the last flush to the prometheus-client values; one
        value refused does not hold back the others."""
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

    def record(self, ex: Exchange, route: str, model: str) -> None:
        b = ex.backend if ex.backend != "-" else self.backend
        status = ex.status
        requests, overhead, ttft, duration, max_gap, disconnects, not_supported = self._per_end(route, model, b, status)
        requests.inc()
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
        if ex.started and 200 <= status < 300 and route in _TOKEN_ROUTES:
            usage = exchange_usage(ex)
            if usage is not None:
                tokens_in, tokens_out = self._per_model(b, model)
                tokens_in.inc(usage[0])
                tokens_out.inc(usage[1])
            elif ex.sse:
                # Role chunk, finish chunk and [DONE] carry no content; a cut stream lacks the last two.
                framing = 3 if end == "done" else 1
                self.child(self.tokens_estimated, b, model, "output").inc(max(ex.chunks - framing, 0))

    def exposition(self) -> tuple[bytes, bytes]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        self.flush()  # this worker's figures are always current in its own answer
        if self.multiprocess:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        else:
            registry = self.registry
        return generate_latest(registry), CONTENT_TYPE_LATEST.encode()


_TOKEN_ROUTES = frozenset({"chat", "completions", "responses", "embeddings"})


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


#: Lines are written in batches of at most this many bytes: writes to a pipe up to PIPE_BUF are
#: atomic, so several workers' lines never interleave mid-line.
LOG_BATCH = 4096
#: Seconds a line may wait for its batch to fill.
LOG_FLUSH_DELAY = 0.05
#: Lines waiting (as their fields, not yet formatted) that make a batch go out at once.
LOG_PENDING = 32


class AccessLog:
    """One line per request on stdout: JSON (orjson) or, on a terminal, plain text.

    A finished request leaves its fields in a tuple; they are formatted together, and written in
    whole-line batches of up to ``LOG_BATCH`` bytes, when ``LOG_PENDING`` are waiting, at the
    latest ``LOG_FLUSH_DELAY`` after the first one (on an event loop; at once without one), and at
    shutdown: one write per a dozen requests under load instead of one each, and the formatting
    out of the request's way, in one tight loop.
    """

    def __init__(self, fmt: str) -> None:
        if fmt == "auto":
            fmt = "text" if os.isatty(1) else "json"
        self.json = fmt == "json"
        self._second = -1
        self._stamp = ""
        self._milli = -1
        self._time = ""
        self._pending: list[tuple[Any, ...]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def flush(self) -> None:
        """Write the lines waiting, if any."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._pending:
            return
        line = self._line
        lines = [line(fields) for fields in self._pending]
        self._pending.clear()
        batch: list[bytes] = []
        size = 0
        for text in lines:
            if size + len(text) > LOG_BATCH and batch:
                _write_out(b"".join(batch))
                batch.clear()
                size = 0
            batch.append(text)
            size += len(text)
        _write_out(b"".join(batch))

    def _at(self, now: float) -> str:
        """``now`` in ISO 8601 UTC with milliseconds; the seconds part is formatted once per
        second, the whole once per millisecond."""
        milli = int(now * 1000)
        if milli == self._milli:
            return self._time
        second, rest = divmod(milli, 1000)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        self._milli = milli
        self._time = f"{self._stamp}.{rest:03d}Z"
        return self._time

    def write(self, ex: Exchange, method: str, path: str, route: str, model: str) -> None:
        pending = self._pending
        pending.append(
            (
                time.time(),
                ex.t_start,
                ex.t_first,
                ex.t_end,
                ex.request_id,
                ex.key_id,
                method,
                path,
                route,
                model,
                ex.backend,
                ex.status,
                ex.nbytes,
                ex.chunks,
                ex.end,
            )
        )
        if len(pending) >= LOG_PENDING:
            self.flush()
            return
        if self._timer is not None and self._timer_loop is not None and not self._timer_loop.is_closed():
            return  # the batch's timer will write it
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._timer = loop.call_later(LOG_FLUSH_DELAY, self.flush)
        self._timer_loop = loop

    def _line(self, fields: tuple[Any, ...]) -> bytes:
        """One request's line, from the fields ``write`` kept."""
        (now, t_start, t_first, t_end, request_id, key_id, method, path, route, model, backend, status, nbytes,
         chunks, end) = fields  # fmt: skip
        ttft = None if not t_first else round((t_first - t_start) * 1000, 3)
        duration = round((t_end - t_start) * 1000, 3)
        if self.json:
            return orjson.dumps(
                {
                    "time": self._at(now),
                    "request_id": request_id.decode("ascii"),
                    "key_id": key_id,
                    "method": method,
                    "path": path,
                    "route": route,
                    "model": model,
                    "backend": backend,
                    "status": status,
                    "bytes": nbytes,
                    "ttft_ms": ttft,
                    "duration_ms": duration,
                    "chunks": chunks,
                    "end": end,
                },
                option=orjson.OPT_APPEND_NEWLINE,
            )
        return (
            f"{time.strftime('%H:%M:%S', time.localtime(now))} {status} {method} {path} backend={backend} "
            f"model={model} ttft={ttft}ms duration={duration}ms chunks={chunks} bytes={nbytes} end={end} "
            f"key={key_id} id={request_id.decode('ascii')}\n"
        ).encode()


def _write_out(data: bytes) -> None:
    try:
        while data:
            data = data[os.write(1, data) :]
    except OSError:
        pass


def setup_logging(level: str, fmt: str) -> None:
    """The ``gateway`` logger: JSON lines or plain text on stderr, at ``level``."""
    if fmt == "auto":
        fmt = "text" if os.isatty(2) else "json"
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                line = {
                    "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                        timespec="milliseconds"
                    ),
                    "level": record.levelname.lower(),
                    "message": record.getMessage(),
                }
                if record.exc_info:  # log.exception(): the traceback, in the same line
                    line["traceback"] = self.formatException(record.exc_info)
                return orjson.dumps(line).decode()

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
