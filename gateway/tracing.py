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

Export is off the request path (``span_export``): ended spans go into a bounded queue that a thread
sends in batches; a full queue or a failed export drops spans, counted in
``gateway_trace_spans_dropped_total``. No request waits on a collector.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Iterable, Mapping
from time import perf_counter, time_ns
from typing import TYPE_CHECKING, Any

from gateway import routes
from gateway.config import ConfigError
from gateway.exchange import Exchange, Outgoing
from gateway.span_export import BSP_SETTINGS, SpanQueue, env_number, exporter

if TYPE_CHECKING:
    from opentelemetry.trace import Span as ApiSpan

    from gateway.balance import Replica
    from gateway.relay import OnReplica, Timeouts
    from gateway.types import HTTPScope, Send
    from gateway.usage import Usage

PROTOCOLS = ("http/protobuf", "grpc")
#: The gateway's routes as GenAI operations (``gen_ai.operation.name``'s well-known values).
OPERATIONS = {
    "chat": "chat",
    "completions": "text_completion",
    "embeddings": "embeddings",
    "responses": "chat",
    "messages": "chat",
}
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,256})"')


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
    for name, default in BSP_SETTINGS.items():
        env_number(environ, name, default)
    return True


class TracedExchange(Exchange):
    """An ``Exchange`` with its trace: made instead of one when tracing is on."""

    __slots__ = ("span", "recording", "wall", "attempts")

    def __init__(self, t_start: float, span: ApiSpan, wall: int) -> None:
        super().__init__(t_start)
        self.span = span
        #: False when the sampler dropped the trace: then no client spans and no attributes, only
        #: the context (flagged not sampled) passed on to the backend.
        self.recording = span.is_recording()
        #: ``time_ns()`` at ``t_start``: turns the relay's ``perf_counter()`` stamps into span times.
        self.wall = wall
        #: One per attempt on a replica.
        self.attempts: list[Attempt] = []

    def ns(self, t: float) -> int:
        return self.wall + int((t - self.t_start) * 1e9)


class Tracing:
    """One worker's tracer provider, export queue and the request path's hooks."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._server_kind = SpanKind.SERVER
        env = os.environ if environ is None else environ
        resource = Resource.create().merge(Resource({"process.pid": os.getpid()}))  # which worker
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "gateway"}))
        self.provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        self.queue = SpanQueue(exporter(_protocol(env)), env)
        self.provider.add_span_processor(self.queue)  # type: ignore[arg-type]
        self.tracer = self.provider.get_tracer("gateway")
        self.propagator = TraceContextTextMapPropagator()

    def drops(self) -> Iterable[tuple[str, int]]:
        return self.queue.dropped.items()

    def shutdown(self) -> None:
        self.queue.shutdown()

    # -- the request path (only when tracing is on) --------------------------------------------

    def exchange(self, scope: HTTPScope, route: routes.Route | None, t_start: float) -> Exchange:
        """A request's ``Exchange`` (begun at ``t_start``, on ``route``): for a route that goes to
        a backend, with its SERVER span started (continuing the client's trace); the gateway's own
        answers (health, metrics, errors for unknown paths) are not traced."""
        if route is None or not route.upstream:
            return Exchange(t_start)
        wall = time_ns()
        carrier = {}
        for name, value in scope["headers"]:
            if name == b"traceparent" or name == b"tracestate":
                carrier[name.decode("latin-1")] = value.decode("latin-1")
        parent = self.propagator.extract(carrier) if carrier else None
        span = self.tracer.start_span(
            scope["method"], context=parent, kind=self._server_kind, start_time=wall, record_exception=False
        )
        return TracedExchange(t_start, span, wall)

    def wrap(self, on_replica: OnReplica) -> OnReplica:
        """``relay.attempt`` with a CLIENT span around each attempt, its context sent on."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        tracer = self.tracer

        async def traced(
            out: Outgoing, replica: Replica, timeouts: Timeouts, may_retry: bool, send: Send, ex: Exchange
        ) -> Any:
            assert isinstance(ex, TracedExchange)
            if not ex.recording:  # not sampled: the backend only learns the decision
                return await on_replica(_with_context(out, ex.span), replica, timeouts, may_retry, send, ex)
            # Attributes are set once, at the end (``finish``): each costs a validation in the SDK,
            # and those given here would be validated twice (the sampler's copy).
            span = tracer.start_span(
                out.path.decode("latin-1"), set_span_in_context(ex.span), SpanKind.CLIENT, record_exception=False
            )
            sent = _with_context(out, span)
            attempt = Attempt(span, replica, out.backend.profile.kind, perf_counter())
            ex.attempts.append(attempt)
            try:
                kept = await on_replica(sent, replica, timeouts, may_retry, send, ex)
            except asyncio.CancelledError:  # the client left (or the total timeout): see ``finish``
                attempt.ended = perf_counter()
                raise
            except BaseException as exc:
                attempt.ended = perf_counter()
                attempt.error = type(exc).__name__
                raise
            attempt.ended = perf_counter()
            if kept is not None:  # an answer to retry elsewhere: its status is the error
                attempt.error = str(kept[0])
            return kept

        return traced

    def finish(self, ex: Exchange, route: str, method: str, path: str, usage: Usage | None) -> None:
        """End the request's spans with what is known now: status, model, tokens, first token."""
        if not isinstance(ex, TracedExchange) or not ex.recording:
            return
        operation = OPERATIONS.get(route, route)
        model = ex.request_model
        attempts = ex.attempts
        for i, attempt in enumerate(attempts):
            span, target, error = attempt.span, attempt.replica.target, attempt.error
            attrs: dict[str, Any] = {
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": attempt.replica_kind,
                "server.address": target.host,
                "server.port": target.port,
                "gateway.replica": target.label,
                "gateway.attempt": i + 1,
            }
            if model:
                attrs["gen_ai.request.model"] = model
            if ex.stream:
                attrs["gen_ai.request.stream"] = True
            span.update_name(f"{operation} {model}" if model else operation)
            if i == len(attempts) - 1 and error is None:  # the attempt that answered the client
                if ex.status:
                    attrs["http.response.status_code"] = ex.status
                response_model = _response_model(ex) if ex.started else None
                if response_model is not None:
                    attrs["gen_ai.response.model"] = response_model
                if usage is not None and not usage.estimated:
                    attrs["gen_ai.usage.input_tokens"] = usage.prompt
                    attrs["gen_ai.usage.output_tokens"] = usage.completion
                _first_chunk(span, ex, attrs, attempt.started)
                error = _error_type(ex)
            if error is not None:
                attrs["error.type"] = error
                _set_error(span)
            span.set_attributes(attrs)
            span.end(end_time=ex.ns(attempt.ended or ex.t_end))
        server = ex.span
        attrs = {
            "http.request.method": method,
            "url.path": path,
            "http.response.status_code": ex.status,
            "gateway.route": route,
            "gateway.backend": ex.backend,
            "gateway.end": ex.end,
        }
        if path in routes.TABLE:  # a fixed path (not a stored response's id, not a passthrough one)
            server.update_name(f"{method} {path}")
            attrs["http.route"] = path
        if ex.balance != "-":
            attrs["gateway.balance"] = ex.balance
        _first_chunk(server, ex, attrs, ex.t_start)
        error = _error_type(ex)
        if error is not None:
            attrs["error.type"] = error
            _set_error(server)
        server.set_attributes(attrs)
        server.end(end_time=ex.ns(ex.t_end))


class Attempt:
    """One attempt on a replica: its span, when it started and ended (perf_counter), and what went
    wrong (None: it answered, or the client left)."""

    __slots__ = ("span", "replica", "replica_kind", "started", "ended", "error")

    def __init__(self, span: ApiSpan, replica: Replica, kind: str, started: float) -> None:
        self.span = span
        self.replica = replica
        #: The backend's kind: ``gen_ai.provider.name``.
        self.replica_kind = kind
        self.started = started
        self.ended = 0.0
        self.error: str | None = None


def _first_chunk(span: ApiSpan, ex: TracedExchange, attrs: dict[str, Any], since: float) -> None:
    """A stream's time to first chunk on ``span``: the conventions' attribute, and an event at
    that moment."""
    if ex.sse and ex.t_first and ex.t_first >= since:
        attrs["gen_ai.response.time_to_first_chunk"] = ex.t_first - since
        span.add_event("gen_ai.first_chunk", timestamp=ex.ns(ex.t_first))


def _with_context(out: Outgoing, span: ApiSpan) -> Outgoing:
    """``out`` with ``span``'s context as its ``traceparent`` (W3C Trace Context, version 00) and
    ``tracestate``, the client's replaced."""
    ctx = span.get_span_context()
    headers = [(n, v) for n, v in out.headers if n != b"traceparent" and n != b"tracestate"]
    headers.append((b"traceparent", b"00-%032x-%016x-%02x" % (ctx.trace_id, ctx.span_id, ctx.trace_flags)))
    if ctx.trace_state:
        headers.append((b"tracestate", ctx.trace_state.to_header().encode("latin-1")))
    return out.with_headers(headers)


def _error_type(ex: Exchange) -> str | None:
    """The span's ``error.type``: a 5xx status, else why the exchange failed; None when it did not
    (a client leaving is no error of the backend's: it was cancelled on purpose)."""
    if ex.status >= 500:
        return str(ex.status)
    return None if ex.end in ("done", "client_gone") else ex.error_class or ex.end


def _set_error(span: ApiSpan) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR))


def _response_model(ex: Exchange) -> str | None:
    """The ``model`` of the answer, from its last bytes (a stream's final chunks, or a short
    body): the body is never parsed."""
    found = _MODEL.findall(ex.last)  # the last one there is the last one of both: no join
    if not found and ex.prev:
        found = _MODEL.findall(ex.prev + ex.last)
    return found[-1].decode("utf-8", "replace") if found else None
