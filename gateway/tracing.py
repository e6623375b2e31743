"""Traces (OpenTelemetry), configured only by the standard ``OTEL_*`` environment variables.

Tracing is on when an OTLP endpoint is set (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``) and neither ``OTEL_SDK_DISABLED=true`` nor
``OTEL_TRACES_EXPORTER=none`` turns it off. It needs the ``otel`` extra; asked for without it, the
gateway does not start (``check``). Each worker builds its own provider and export thread at
startup (after Granian forked it).

Off, the request path reads one attribute (``Gateway._http``: ``tracing`` is None). On,
a request gets a SERVER span continuing the client's ``traceparent``/``tracestate``, and each
attempt on a replica (one per retry) a CLIENT span whose context replaces the client's
``traceparent`` towards the backend. Nothing is done per chunk: the first token's time is already
noted by the relay (``Exchange.t_first``) and becomes, at the request's end, the GenAI attribute
``gen_ai.response.time_to_first_chunk`` and a ``gen_ai.first_chunk`` event stamped at that moment.
Spans are ended there too, with the times they ended at.

Export is off the request path: ended spans go into a bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``)
that a thread sends in batches; a full queue or a failed export drops spans, counted in
``gateway_trace_spans_dropped_total``. No request waits on a collector.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from time import perf_counter, time_ns
from typing import TYPE_CHECKING, Any

from gateway import routes
from gateway.config import ConfigError
from gateway.exchange import Exchange, Outgoing

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, Span
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as ApiSpan

    from gateway.balance import Replica
    from gateway.relay import Timeouts
    from gateway.types import HTTPScope, Send
    from gateway.usage import Usage

log = logging.getLogger("gateway")

PROTOCOLS = ("http/protobuf", "grpc")
#: The gateway's routes as GenAI operations (``gen_ai.operation.name``'s well-known values).
OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings", "responses": "chat"}
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')

OnReplica = Callable[["Outgoing", "Replica", "Timeouts", bool, "Send", Exchange], Awaitable[Any]]


def wanted(environ: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def _protocol(environ: Mapping[str, str]) -> str:
    return (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or PROTOCOLS[0]
    ).strip()


def check(environ: Mapping[str, str]) -> bool:
    """Whether tracing is on; ``ConfigError`` (one line, start-up stops) when the environment asks
    for what the gateway cannot do: an exporter other than otlp, an unknown protocol, or the
    packages not installed."""
    if not wanted(environ):
        return False
    exporter = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporter != "otlp":
        raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: expected otlp or none")
    protocol = _protocol(environ)
    if protocol not in PROTOCOLS:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    try:
        import opentelemetry.sdk.trace  # noqa: F401

        if protocol == "grpc":
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
        else:
            import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except ImportError as exc:
        package = "opentelemetry-exporter-otlp-proto-grpc" if protocol == "grpc" else "the otel extra"
        raise ConfigError(
            f"traces are asked for (an OTLP endpoint is set) but {package} is not installed "
            f"({exc.name}): pip install 'gateway[otel]'"
            + (" opentelemetry-exporter-otlp-proto-grpc" if protocol == "grpc" else "")
            + ", or unset OTEL_EXPORTER_OTLP_ENDPOINT (or set OTEL_SDK_DISABLED=true)"
        ) from None
    return True


def _env_number(environ: Mapping[str, str], name: str, default: int) -> int:
    try:
        value = int(environ.get(name, "") or default)
    except ValueError:
        raise ConfigError(f"{name}={environ[name]!r}: expected a whole number") from None
    if value <= 0:
        raise ConfigError(f"{name}={value}: expected a number above 0")
    return value


class SpanQueue:
    """A span processor: ended, sampled spans go into a bounded queue that one thread exports in
    batches (the ``OTEL_BSP_*`` settings). A full queue or a failed export drops spans, counted
    in ``dropped``; nothing here ever blocks the thread that ends a span."""

    def __init__(self, exporter: SpanExporter, environ: Mapping[str, str]) -> None:
        self._exporter = exporter
        self._delay = _env_number(environ, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        self._max = _env_number(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self._batch = min(_env_number(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self._max)
        self._queue: deque[ReadableSpan] = deque()
        #: Spans dropped, by reason; each key is written by one thread only.
        self.dropped = {"queue_full": 0, "export_failed": 0}
        self._wake = threading.Event()
        self._stopping = False
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="gateway-span-export", daemon=True)
        self._thread.start()

    def on_start(self, span: Span, parent_context: object = None) -> None:
        pass

    def _on_ending(self, span: Span) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None or not context.trace_flags.sampled:
            return
        queue = self._queue
        if len(queue) >= self._max:
            self.dropped["queue_full"] += 1
            return
        queue.append(span)
        if len(queue) >= self._batch:
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._send_all()
            if self._stopping:
                return

    def _send_all(self) -> None:
        from opentelemetry.sdk.trace.export import SpanExportResult

        queue = self._queue
        while queue:
            batch = [queue.popleft() for _ in range(min(self._batch, len(queue)))]
            try:
                ok = self._exporter.export(batch) == SpanExportResult.SUCCESS
            except Exception as exc:  # an exporter bug must not end the thread
                ok = False
                log.debug("span export raised %r", exc)
            if not ok:
                self.dropped["export_failed"] += len(batch)
            if ok == self._failing:  # log the changes only, never once per batch
                self._failing = not ok
                if ok:
                    log.warning("trace export works again")
                else:
                    log.warning("trace export failed: spans are dropped until the collector answers")

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._wake.set()
        return True

    def shutdown(self, timeout: float = 2.0) -> None:
        """Export what is queued (for at most ``timeout`` seconds), then stop."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self._exporter.shutdown()


class TracedExchange(Exchange):
    """An ``Exchange`` with its trace: made instead of one when tracing is on."""

    __slots__ = ("span", "wall", "attempts", "request_model", "stream")

    def __init__(self, t_start: float, span: ApiSpan, wall: int) -> None:
        super().__init__(t_start)
        self.span = span
        #: ``time_ns()`` at ``t_start``: turns the relay's ``perf_counter()`` stamps into span times.
        self.wall = wall
        #: One per attempt on a replica: its span, when it started and ended (perf_counter), and
        #: what went wrong (None: it answered).
        self.attempts: list[tuple[ApiSpan, float, float, str | None]] = []
        self.request_model: str | None = None
        self.stream = False

    def ns(self, t: float) -> int:
        return self.wall + int((t - self.t_start) * 1e9)


class Tracing:
    """One worker's tracer provider, export queue and the request path's hooks."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        env = os.environ if environ is None else environ
        resource = Resource.create().merge(Resource({"process.pid": os.getpid()}))  # which worker
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "gateway"}))
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.queue = SpanQueue(_exporter(_protocol(env)), env)
        self.provider.add_span_processor(self.queue)  # type: ignore[arg-type]
        self.tracer = self.provider.get_tracer("gateway")
        self.propagator = TraceContextTextMapPropagator()

    def drops(self) -> Iterable[tuple[str, int]]:
        return self.queue.dropped.items()

    def shutdown(self) -> None:
        self.queue.shutdown()

    # -- the request path (only when tracing is on) --------------------------------------------

    def exchange(self, scope: HTTPScope) -> Exchange:
        """A request's ``Exchange``: for a route that goes to a backend, with its SERVER span
        started (continuing the client's trace); the gateway's own answers (health, metrics,
        errors for unknown paths) are not traced."""
        from opentelemetry.trace import SpanKind

        t_start = perf_counter()
        route = routes.resolve(scope["path"])
        if route is None or not route.upstream:
            return Exchange(t_start)
        wall = time_ns()
        carrier = {}
        for name, value in scope["headers"]:
            if name == b"traceparent" or name == b"tracestate":
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        parent = self.propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            scope["method"], context=parent, kind=SpanKind.SERVER, start_time=wall, record_exception=False
        )
        return TracedExchange(t_start, span, wall)

    def wrap(self, on_replica: OnReplica) -> OnReplica:
        """``relay._on_replica`` with a CLIENT span around each attempt, its context sent on."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        from gateway.payload import peek

        tracer, inject = self.tracer, self.propagator.inject

        async def traced(
            out: Outgoing, replica: Replica, timeouts: Timeouts, may_retry: bool, send: Send, ex: Exchange
        ) -> Any:
            assert isinstance(ex, TracedExchange)
            if not ex.attempts:  # the body as sent upstream (the model after an alias), read once
                peeked = peek(out.body) if out.body[:1] == b"{" else None
                ex.request_model = peeked.model if peeked is not None else None
                ex.stream = bool(peeked is not None and peeked.stream)
            target = replica.target
            span = tracer.start_span(
                out.path.decode("latin-1"),
                context=set_span_in_context(ex.span),
                kind=SpanKind.CLIENT,
                record_exception=False,
                attributes={
                    "server.address": target.host,
                    "server.port": target.port,
                    "gen_ai.provider.name": out.backend.profile.kind,
                    "http.request.method": out.method.decode("latin-1"),
                    "gateway.backend": out.backend.name,
                    "gateway.replica": target.label,
                    "gateway.balance": ex.balance,
                    "gateway.attempt": len(ex.attempts) + 1,
                },
            )
            carrier: dict[str, str] = {}
            inject(carrier, context=set_span_in_context(span))
            headers = [(n, v) for n, v in out.headers if n != b"traceparent" and n != b"tracestate"]
            headers.extend((k.encode(), v.encode()) for k, v in carrier.items())
            sent = Outgoing(out.backend, out.method, out.path, out.query, headers, out.body, out.sticky, out.blocks)
            started = perf_counter()
            error: str | None = None
            try:
                kept = await on_replica(sent, replica, timeouts, may_retry, send, ex)
            except asyncio.CancelledError:  # the client left (or the total timeout): see ``finish``
                raise
            except BaseException as exc:
                error = type(exc).__name__
                raise
            finally:
                ex.attempts.append((span, started, perf_counter(), error))
            if kept is not None:  # an answer to retry elsewhere: its status is the error
                ex.attempts[-1] = (span, started, ex.attempts[-1][2], str(kept[0]))
            return kept

        return traced

    def finish(self, ex: Exchange, route: str, method: str, path: str, usage: Usage | None) -> None:
        """End the request's spans with what is known now: status, model, tokens, first token."""
        if not isinstance(ex, TracedExchange):
            return
        operation = OPERATIONS.get(route)
        response_model = _response_model(ex) if ex.started else None
        common: dict[str, Any] = {"gateway.route": route, "gateway.end": ex.end, "http.request.method": method}
        if operation is not None:
            common["gen_ai.operation.name"] = operation
            if ex.request_model:
                common["gen_ai.request.model"] = ex.request_model
            if ex.stream:
                common["gen_ai.request.stream"] = True
        last = len(ex.attempts) - 1
        for i, (span, started, ended, error) in enumerate(ex.attempts):
            attrs = dict(common)
            if operation is not None:
                span.update_name(f"{operation} {ex.request_model}" if ex.request_model else operation)
            if i == last and error is None:
                if ex.status:
                    attrs["http.response.status_code"] = ex.status
                self._answered(span, ex, attrs, started, response_model, usage)
                # A client leaving is no error of the backend's (cancelled on purpose).
                if ex.status >= 500 or ex.end not in ("done", "client_gone"):
                    error = str(ex.status) if ex.status >= 500 else (ex.error_class or ex.end)
            if error is not None:
                attrs["error.type"] = error
                _set_error(span)
            span.set_attributes(attrs)
            span.end(end_time=ex.ns(ended))
        server = ex.span
        attrs = dict(common)
        attrs.update({"http.response.status_code": ex.status, "url.path": path, "gateway.backend": ex.backend})
        if route != "unknown":  # the gateway's routes are fixed paths: low cardinality
            server.update_name(f"{method} {path}")
            attrs["http.route"] = path
        if ex.balance != "-":
            attrs["gateway.balance"] = ex.balance
        self._answered(server, ex, attrs, ex.t_start, response_model, usage)
        if ex.status >= 500 or ex.end not in ("done", "client_gone"):
            attrs["error.type"] = str(ex.status) if ex.status >= 500 else (ex.error_class or ex.end)
            _set_error(server)
        server.set_attributes(attrs)
        server.end(end_time=ex.ns(ex.t_end))

    @staticmethod
    def _answered(
        span: ApiSpan, ex: TracedExchange, attrs: dict[str, Any], since: float, model: str | None, usage: Usage | None
    ) -> None:
        """The answer's attributes on ``span``: model, tokens, time to first chunk (and its event)."""
        if model is not None:
            attrs["gen_ai.response.model"] = model
        if usage is not None and not usage.estimated:
            attrs["gen_ai.usage.input_tokens"] = usage.prompt
            attrs["gen_ai.usage.output_tokens"] = usage.completion
        if ex.sse and ex.t_first and ex.t_first >= since:  # the conventions' TTFT is for streams
            ttft = ex.t_first - since
            attrs["gen_ai.response.time_to_first_chunk"] = ttft
            span.add_event("gen_ai.first_chunk", {"gateway.ttft_seconds": ttft}, timestamp=ex.ns(ex.t_first))


def _set_error(span: ApiSpan) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR))


def _response_model(ex: Exchange) -> str | None:
    """The ``model`` of the answer, from its last bytes (a stream's final chunks, or a short
    body): the body is never parsed."""
    found = _MODEL.findall(ex.prev + ex.last)
    return found[-1].decode("utf-8", "replace") if found else None


def _exporter(protocol: str) -> SpanExporter:
    """The OTLP exporter for ``protocol``; it reads its endpoint, headers, timeout and compression
    from the environment itself."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        grpc: SpanExporter = GrpcExporter()
        return grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()
