"""The export of ended spans, off the request path: a bounded queue that one thread sends in
batches to the OTLP exporter (``OTEL_BSP_*`` settings, as the SDK's batch processor reads them).

A full queue or a failed export (the collector down, refusing, or slower than
``OTEL_EXPORTER_OTLP_TIMEOUT``) drops spans, counted by reason in ``SpanQueue.dropped`` (then in
``gateway_trace_spans_dropped_total``); nothing here ever blocks the thread that ends a span.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from gateway.config import ConfigError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan, Span
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("gateway")


#: The batch settings the SDK's batch processor reads, with its defaults (ms, spans, spans).
BSP_SETTINGS = {"OTEL_BSP_SCHEDULE_DELAY": 5000, "OTEL_BSP_MAX_QUEUE_SIZE": 2048, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512}


def env_number(environ: Mapping[str, str], name: str, default: int) -> int:
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
        delay, size, batch = (env_number(environ, name, default) for name, default in BSP_SETTINGS.items())
        self._delay = delay / 1000
        self._max = size
        self._batch = min(batch, size)
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


def exporter(protocol: str) -> SpanExporter:
    """The OTLP exporter for ``protocol``; it reads its endpoint, headers, timeout and compression
    from the environment itself."""
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        grpc: SpanExporter = GrpcExporter()
        return grpc
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()
