"""gateway/tracing.py: traces configured by the OTEL_* variables, exported over OTLP/HTTP to a
receiver in the test (tests/otlp.py): the client's trace continued, one client span per attempt
whose context reaches the backend, GenAI attributes, the first-chunk event; and a collector that is
dead or hung never fails a request. Its cost is measured with ``just bench-ab`` (README), not here."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from typing import Any

import pytest

from gateway import relay, span_export, tracing
from gateway.app import Gateway
from gateway.config import ConfigError, settings_from_strings
from tests.fakes import Conn, FakeBackend, Req, default_handler, sse_events
from tests.otlp import OtlpReceiver, Span
from tests.promtext import metric
from tests.servers import ROOT, StartGateway, free_port

pytest.importorskip("opentelemetry.sdk.trace", reason="needs the otel extra (pip install -e '.[dev]' has it)")
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult  # noqa: E402

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
STREAM = b'{"model":"fake","stream":true,"stream_options":{"include_usage":true},"max_tokens":4}'


def otel_env(endpoint: str, **more: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_SERVICE_NAME": "gateway-under-test",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **more,
    }


def wait_spans(receiver: OtlpReceiver, trace_id: str, count: int, timeout: float = 10.0) -> list[Span]:
    deadline = time.monotonic() + timeout
    while True:
        spans = receiver.trace(trace_id)
        if len(spans) >= count or time.monotonic() > deadline:
            return spans
        time.sleep(0.05)


# -- configuration ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "on"),
    [
        ({}, False),
        ({"OTEL_SERVICE_NAME": "x"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_traces_are_on_only_with_an_endpoint_and_not_disabled(env: dict[str, str], on: bool) -> None:
    assert tracing.check(env) is on


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER='zipkin': expected otlp or none"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "expected one of http/protobuf, grpc"),
        ({"OTEL_BSP_MAX_QUEUE_SIZE": "many"}, "OTEL_BSP_MAX_QUEUE_SIZE='many': expected a whole number"),
    ],
)
def test_what_the_gateway_cannot_do_stops_start_up(env: dict[str, str], fragment: str) -> None:
    full = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", **env}
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        tracing.check(full)
        tracing.Tracing(full)


def test_without_the_extra_start_up_fails_with_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with pytest.raises(ConfigError, match=r"not installed .*pip install 'gateway\[otel\]'"):
        tracing.check({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    code = (
        "import sys; sys.modules['opentelemetry.sdk.trace'] = None\n"
        "from gateway.cli import main\n"
        "sys.exit(main(['serve', '--backend-base-url', 'http://127.0.0.1:9/v1']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "the otel extra is not installed" in done.stderr


def test_off_the_request_path_has_no_tracing_and_nothing_is_imported() -> None:
    code = (
        "import sys\n"
        "from gateway.app import Gateway\n"
        "from gateway.config import settings_from_strings\n"
        "from gateway import relay\n"
        "g = Gateway(settings_from_strings({'BACKEND_BASE_URL': 'http://127.0.0.1:9/v1'}))\n"
        "assert g.tracing is None and g.forwarder.on_replica is relay.attempt\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    g = Gateway(settings_from_strings({"BACKEND_BASE_URL": "http://127.0.0.1:9/v1"}))
    assert g.tracing is None and g.forwarder.on_replica is relay.attempt


class _Failing(SpanExporter):
    def __init__(self) -> None:
        self.calls = 0

    def export(self, spans: Any) -> SpanExportResult:
        self.calls += 1
        return SpanExportResult.FAILURE


def test_the_span_queue_counts_what_it_drops() -> None:
    from opentelemetry.sdk.trace import TracerProvider

    exporter = _Failing()
    queue = span_export.SpanQueue(exporter, {"OTEL_BSP_SCHEDULE_DELAY": "600000", "OTEL_BSP_MAX_QUEUE_SIZE": "3"})
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(queue)  # type: ignore[arg-type]
    tracer = provider.get_tracer("t")
    for _ in range(5):
        tracer.start_span("s").end()
    assert queue.dropped["queue_full"] == 2 and exporter.calls == 0  # nothing sent before the delay
    queue.shutdown()  # sends the 3 queued: refused
    assert exporter.calls == 1 and queue.dropped["export_failed"] == 3


# -- end to end --------------------------------------------------------------------------------------


def test_a_streamed_chat_continues_the_clients_trace(start_gateway: StartGateway, backend: FakeBackend) -> None:
    with OtlpReceiver() as receiver:
        g = start_gateway(BACKEND_BASE_URL=backend.url, **otel_env(receiver.url)).start()
        headers = {"traceparent": f"00-{TRACE}-{PARENT}-01", "tracestate": "vendor=one", "content-type": "x"}
        assert g.request("GET", "/metrics").status == 200  # the gateway's own answers: not traced
        assert g.request("GET", "/nowhere").status == 404
        r = g.request("POST", "/v1/chat/completions", STREAM, headers)
        assert r.status == 200 and b"[DONE]" in r.body
        spans = wait_spans(receiver, TRACE, 2)
        assert len(receiver.spans) == 2  # none but the chat's
    server = next(s for s in spans if s.kind == "SPAN_KIND_SERVER")
    client = next(s for s in spans if s.kind == "SPAN_KIND_CLIENT")
    assert len(spans) == 2
    assert server.parent_span_id == PARENT and client.parent_span_id == server.span_id
    sent = backend.requests[-1]
    assert sent.header("traceparent") == f"00-{TRACE}-{client.span_id}-01"  # the client span's, not the client's
    assert sent.header("tracestate") == "vendor=one"
    assert server.resource["service.name"] == "gateway-under-test"
    assert server.name == "POST /v1/chat/completions" and client.name == "chat fake"
    a = client.attributes  # the GenAI call, after the conventions
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "vllm"
    assert a["gen_ai.request.model"] == "fake" and a["gen_ai.response.model"] == "fake"
    assert a["gen_ai.request.stream"] is True
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (3, 4)  # the usage chunk's
    assert a["server.address"] == "127.0.0.1" and a["server.port"] == backend.port
    assert a["gateway.replica"] == f"127.0.0.1:{backend.port}" and a["gateway.attempt"] == 1
    s = server.attributes  # the gateway's request
    assert s["http.route"] == "/v1/chat/completions" and s["http.request.method"] == "POST"
    assert s["gateway.backend"] == "vllm" and s["gateway.balance"] == "single" and s["gateway.route"] == "chat"
    assert s["gateway.end"] == "done"
    for span in (server, client):
        assert span.attributes["http.response.status_code"] == 200
        assert "error.type" not in span.attributes and span.status == "STATUS_CODE_UNSET"
        ttft = span.attributes["gen_ai.response.time_to_first_chunk"]
        (event,) = [e for e in span.events if e[0] == "gen_ai.first_chunk"]
        assert span.start_ns < event[1] <= span.end_ns
        assert abs((event[1] - span.start_ns) / 1e9 - ttft) < 1e-3
    assert (
        server.attributes["gen_ai.response.time_to_first_chunk"]
        > client.attributes["gen_ai.response.time_to_first_chunk"]
    )


def test_tracing_changes_nothing_that_is_sent(start_gateway: StartGateway, backend: FakeBackend) -> None:
    """With traces on, a request goes where and as it would without them: a route with the kind's
    own path spelling keeps it (``/tokenize`` at the server's root, not under ``/v1``), and a body
    the gateway does not read (a passthrough route) is forwarded whatever its fields hold."""
    with OtlpReceiver() as receiver:
        g = start_gateway(BACKEND_BASE_URL=backend.url, **otel_env(receiver.url)).start()
        g.request("POST", "/tokenize", b'{"model":"fake","prompt":"hi"}')  # the fake answers what it answers
        assert backend.requests[-1].target == "/tokenize"
        headers = {"content-type": "x", "traceparent": f"00-{TRACE}-{PARENT}-01"}
        r = g.request("POST", "/v1/whatever/else", b'{"model": 5, "stream": "yes"}', headers)
        assert backend.requests[-1].target == "/v1/whatever/else" and r.status != 400
        assert r.status == 404  # the fake backend's own answer, relayed
        assert backend.requests[-1].body == b'{"model": 5, "stream": "yes"}'
        spans = wait_spans(receiver, TRACE, 2)
    server = next(s for s in spans if s.kind == "SPAN_KIND_SERVER")
    # Not one of the gateway's fixed paths: no http.route, and the path stays out of the name.
    assert server.name == "POST" and "http.route" not in server.attributes
    assert server.attributes["url.path"] == "/v1/whatever/else"


def test_each_attempt_is_a_client_span_and_only_the_last_ones_context_answers(start_gateway: StartGateway) -> None:
    async def unavailable(req: Req, conn: Conn) -> None:
        if req.method == "POST":
            await conn.json(503, {"error": {"message": "busy", "type": "x", "param": None, "code": 503}})
        else:
            await default_handler(req, conn)

    with OtlpReceiver() as receiver, FakeBackend(handler=unavailable) as busy, FakeBackend() as good:
        g = start_gateway(
            BACKEND_BASE_URL=f"{busy.url},{good.url}", GATEWAY_EJECT_AFTER="1000", **otel_env(receiver.url)
        ).start()
        for i in range(40):  # the first pick is at random: until one went to the busy replica first
            trace = f"{i + 1:032x}"
            headers = {"traceparent": f"00-{trace}-{PARENT}-01"}
            assert g.request("POST", "/v1/chat/completions", b'{"model":"fake"}', headers).status == 200
            if busy.requests and (busy.requests[-1].header("traceparent") or "").split("-")[1:2] == [trace]:
                break
        else:
            pytest.fail("never tried the busy replica first")
        spans = wait_spans(receiver, trace, 3)
    clients = sorted((s for s in spans if s.kind == "SPAN_KIND_CLIENT"), key=lambda s: s.start_ns)
    assert [s.attributes["gateway.attempt"] for s in clients] == [1, 2]
    first, second = clients
    assert first.attributes["error.type"] == "503" and first.status == "STATUS_CODE_ERROR"
    assert first.attributes["gateway.replica"] == f"127.0.0.1:{busy.port}"
    assert second.attributes["http.response.status_code"] == 200 and "error.type" not in second.attributes
    assert busy.requests[-1].header("traceparent") == f"00-{trace}-{first.span_id}-01"
    assert good.requests[-1].header("traceparent") == f"00-{trace}-{second.span_id}-01"


def test_a_client_leaving_mid_stream_ends_its_spans_without_an_error(
    start_gateway: StartGateway, backend: FakeBackend
) -> None:
    async def slow(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        for event in sse_events(500):
            await conn.chunk(event)
            await asyncio.sleep(0.01)
        await conn.end_chunked()

    backend.handler = slow
    with OtlpReceiver() as receiver:
        g = start_gateway(BACKEND_BASE_URL=backend.url, **otel_env(receiver.url)).start()
        s = socket.create_connection(("127.0.0.1", g.port))
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
            b"traceparent: 00-" + TRACE.encode() + b"-" + PARENT.encode() + b"-01\r\n\r\n{}"
        )
        got = b""
        while got.count(b"data:") < 3:
            got += s.recv(65536)
        s.close()
        spans = wait_spans(receiver, TRACE, 2)
    assert {s.kind for s in spans} == {"SPAN_KIND_SERVER", "SPAN_KIND_CLIENT"}
    for span in spans:
        assert "error.type" not in span.attributes and span.status == "STATUS_CODE_UNSET", span
        assert span.attributes["http.response.status_code"] == 200
        assert span.end_ns - span.start_ns < 3e9  # ended when the client left, not after 500 events
    (server,) = [s for s in spans if s.kind == "SPAN_KIND_SERVER"]
    assert server.attributes["gateway.end"] == "client_gone"


def test_an_unsampled_request_passes_the_decision_on_and_records_nothing(
    start_gateway: StartGateway, backend: FakeBackend
) -> None:
    with OtlpReceiver() as receiver:
        env = otel_env(receiver.url, OTEL_TRACES_SAMPLER="traceidratio", OTEL_TRACES_SAMPLER_ARG="0")
        g = start_gateway(BACKEND_BASE_URL=backend.url, **env).start()
        headers = {"traceparent": f"00-{TRACE}-{PARENT}-01"}
        assert g.request("POST", "/v1/chat/completions", STREAM, headers).status == 200
        version, trace, span_id, flags = (backend.requests[-1].header("traceparent") or "").split("-")
        assert (version, trace, flags) == ("00", TRACE, "00") and span_id != PARENT  # ours, not sampled
        time.sleep(0.3)  # ten export intervals
        assert receiver.spans == [] and receiver.posts == 0


def test_every_worker_sends_its_spans(start_gateway: StartGateway, backend: FakeBackend) -> None:
    with OtlpReceiver() as receiver:
        g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_WORKERS="2", **otel_env(receiver.url)).start()
        pids: set[int] = set()
        deadline = time.monotonic() + 15
        while len(pids) < 2 and time.monotonic() < deadline:
            for _ in range(8):
                assert g.request("POST", "/v1/chat/completions", b'{"model":"fake"}').status == 200
            time.sleep(0.2)
            pids = {s.resource["process.pid"] for s in list(receiver.spans)}
    assert len(pids) == 2


@pytest.mark.parametrize("collector", ["dead", "hung"])
def test_a_dead_or_hung_collector_never_fails_a_request(
    start_gateway: StartGateway, backend: FakeBackend, collector: str
) -> None:
    with OtlpReceiver(hang=True) as hung:
        endpoint = hung.url if collector == "hung" else f"http://127.0.0.1:{free_port()}"
        g = start_gateway(
            BACKEND_BASE_URL=backend.url,
            **otel_env(endpoint, OTEL_EXPORTER_OTLP_TIMEOUT="1", OTEL_BSP_MAX_QUEUE_SIZE="8"),
        ).start()
        for _ in range(20):
            assert g.request("POST", "/v1/chat/completions", STREAM, {}).status == 200
        reason = "queue_full" if collector == "hung" else "export_failed"
        deadline = time.monotonic() + 10
        while True:
            dropped = metric(
                g.request("GET", "/metrics").body.decode(), "gateway_trace_spans_dropped_total", reason=reason
            )
            if dropped > 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert dropped > 0
        if collector == "hung":
            assert hung.posts >= 1  # it did reach the collector, which never answered
        assert g.stop() == 0  # and shutting down does not hang on it either


def test_an_outgoing_with_other_headers_keeps_every_other_decision() -> None:
    """``Outgoing.with_headers`` (the trace context added to each attempt) copies every slot but
    the headers: a slot added to ``Outgoing`` and not copied there fails here."""
    from gateway.exchange import Outgoing

    out = Outgoing(object(), b"POST", b"/tokenize", b"q=1", [(b"a", b"1")], b"{}", b"sticky", [1, 2])  # type: ignore[arg-type]
    out.rooted, out.pinned = True, object()  # type: ignore[assignment]
    headers = [(b"traceparent", b"00-x")]
    new = out.with_headers(headers)
    assert new.headers is headers and out.headers == [(b"a", b"1")]
    for name in Outgoing.__slots__:
        if name != "headers":
            assert getattr(new, name) is getattr(out, name), name
