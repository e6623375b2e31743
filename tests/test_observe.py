"""Metrics, access log and request ids through a running gateway: summed across workers, bounded,
and no key ever in logs or metrics. Their units have their own files (test_metrics.py,
test_access_log.py, test_usage.py, test_request_id.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.fakes import Conn, FakeBackend, Req, default_handler, sse_events
from tests.promtext import metric
from tests.servers import Gateway, StartGateway, free_port

CLIENT_KEY = "client-secret-key-123"
BACKEND_KEY = "backend-secret-key-456"


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {CLIENT_KEY}", "content-type": "application/json"}


def scrape_when(g: Gateway, name: str, value: float, **labels: str) -> str:
    """Scrape until one series shows ``value``: a request's metrics are recorded just after its
    response went out and written out by its worker within a second (``metrics.FLUSH_INTERVAL``),
    possibly another worker than the one answering the scrape."""
    return scrape_until(g, [(name, value, labels)])


def scrape_until(g: Gateway, expected: list[tuple[str, float, dict[str, str]]]) -> str:
    """Scrape until every (name, value, labels) series holds, or 5 s passed."""
    deadline = time.monotonic() + 5
    while True:
        text = g.request("GET", "/metrics").body.decode()
        if all(metric(text, n, **lb) == v for n, v, lb in expected) or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


def series_count(text: str, name: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith(name + "{"))


def access_lines(g: Gateway) -> list[dict[str, object]]:
    out = []
    for line in g.output().splitlines():
        if line.startswith('{"time"') and '"request_id"' in line:
            out.append(orjson.loads(line))
    return out


def wait_for(pred: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_metrics_sum_across_workers_and_stay_bounded(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(
        BACKEND_BASE_URL=backend.url, BACKEND_API_KEY=BACKEND_KEY, API_KEYS=CLIENT_KEY, GATEWAY_WORKERS="2"
    ).start()
    # Both workers up and each has listed the backend's models (the label bound).
    wait_for(lambda: len(backend.internal) >= 2)
    for _ in range(20):
        assert g.request("POST", "/v1/chat/completions", b'{"model":"fake"}', auth()).status == 200
    for _ in range(6):
        body = b'{"model":"fake","stream":true,"stream_options":{"include_usage":true},"max_tokens":4}'
        assert g.request("POST", "/v1/chat/completions", body, auth()).status == 200
    for i in range(40):  # client-chosen model names must not become series
        assert g.request("POST", "/v1/chat/completions", b'{"model":"junk-%d"}' % i, auth()).status == 200
    for _ in range(3):
        assert g.request("GET", "/nope", headers=auth()).status == 404
    assert g.request("GET", "/v1/models", headers={"authorization": "Bearer wrong"}).status == 401
    status, headers, _ = g.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    # Both workers' figures: each writes all of its own at once, within a second.
    text = scrape_until(
        g,
        [
            ("gateway_requests_total", 26, {"route": "chat", "model": "fake", "status": "200"}),
            ("gateway_requests_total", 40, {"route": "chat", "model": "other", "status": "200"}),
            ("gateway_requests_total", 3, {"route": "unknown", "status": "404"}),
            ("gateway_requests_total", 1, {"route": "models", "status": "401"}),
            ("gateway_tokens_total", 20 * 1 + 6 * 4, {"model": "fake", "type": "output"}),
            ("gateway_stream_max_chunk_gap_seconds_count", 6, {"route": "chat"}),
        ],
    )
    assert metric(text, "gateway_requests_total", route="chat", model="fake", status="200") == 26
    assert metric(text, "gateway_requests_total", route="chat", model="other", status="200") == 40
    assert metric(text, "gateway_requests_total", route="unknown", status="404") == 3
    assert metric(text, "gateway_requests_total", route="models", status="401") == 1
    assert series_count(text, "gateway_requests_total") <= 6
    # usage: non-streamed bodies say 3 in / 1 out; the streams' final usage chunks 3 in / 4 out.
    assert metric(text, "gateway_tokens_total", model="fake", type="input") == 26 * 3
    assert metric(text, "gateway_tokens_total", model="fake", type="output") == 20 * 1 + 6 * 4
    assert metric(text, "gateway_time_to_first_token_seconds_count", route="chat") == 66
    assert metric(text, "gateway_request_duration_seconds_count", route="chat") == 66
    assert metric(text, "gateway_overhead_seconds_count", route="chat") == 66
    assert metric(text, "gateway_stream_max_chunk_gap_seconds_count", route="chat") == 6
    assert metric(text, "gateway_requests_in_flight", backend="vllm") == 0
    # Both workers recorded traffic: the scrape summed their files.
    assert g.proc is not None
    granian = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(int(p)) == g.proc.pid]
    assert granian
    env = Path(f"/proc/{granian[0]}/environ").read_bytes().split(b"\0")
    mdir = next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    assert len(list(Path(mdir).glob("counter_*.db"))) >= 2
    # No key, client's or backend's, in the metrics or the logs.
    assert CLIENT_KEY not in text and BACKEND_KEY not in text
    out = g.output()
    assert CLIENT_KEY not in out and BACKEND_KEY not in out


def _ppid(pid: int) -> int:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return -1
    return int(raw[raw.rindex(")") + 2 :].split()[1])


def test_access_log_completed_disconnected_failed(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, API_KEYS=CLIENT_KEY, GATEWAY_READ_TIMEOUT="1").start()
    # Completed stream.
    h = {**auth(), "x-request-id": "req-done-1"}
    status, headers, _ = g.request("POST", "/v1/chat/completions", b'{"model":"fake","stream":true,"max_tokens":3}', h)
    assert status == 200 and headers["x-request-id"] == "req-done-1"
    assert backend.requests[-1].header("x-request-id") == "req-done-1"

    # Disconnected mid-stream.
    async def slow(r: Req, c: Conn) -> None:
        await c.start_chunked()
        for ev in sse_events(500):
            await c.chunk(ev)
            await asyncio.sleep(0.01)
        await c.end_chunked()

    backend.handler = slow
    s = socket.create_connection(("127.0.0.1", g.port))
    body = b"{}"
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-request-id: req-gone-2\r\n"
        b"authorization: Bearer " + CLIENT_KEY.encode() + b"\r\ncontent-length: 2\r\n\r\n" + body
    )
    got = b""
    while got.count(b"data:") < 3:
        got += s.recv(65536)
    s.close()
    assert backend.wait_disconnects(1, 2.0)

    # Failed: the backend resets mid-stream.
    async def resets(r: Req, c: Conn) -> None:
        await c.start_chunked()
        await c.chunk(sse_events(1)[0])
        await asyncio.sleep(0.05)
        c.reset()

    backend.handler = resets
    status, _, body_out = g.request("POST", "/v1/chat/completions", b"{}", {**auth(), "x-request-id": "req-fail-3"})
    assert status == 200 and b'"backend_unavailable"' in body_out

    # Timed out before headers.
    async def silent(r: Req, c: Conn) -> None:
        await asyncio.sleep(30)

    backend.handler = silent
    status, headers, _ = g.request("POST", "/v1/chat/completions", b"{}", {**auth(), "x-request-id": "bad id!"})
    assert status == 504
    generated = headers["x-request-id"]
    assert generated != "bad id!" and len(generated) == 24

    backend.handler = default_handler
    wanted = {"req-done-1", "req-gone-2", "req-fail-3", generated}
    wait_for(lambda: wanted <= {str(line["request_id"]) for line in access_lines(g)})
    lines = {str(line["request_id"]): line for line in access_lines(g)}
    done, gone, failed, timed = lines["req-done-1"], lines["req-gone-2"], lines["req-fail-3"], lines[generated]
    for line in (done, gone, failed, timed):
        assert set(line) >= {
            "time", "request_id", "key_id", "route", "model", "backend", "status", "bytes",
            "ttft_ms", "duration_ms", "chunks", "end",
        }  # fmt: skip
        assert isinstance(line["status"], int)
        assert line["key_id"] == __import__("hashlib").sha256(CLIENT_KEY.encode()).hexdigest()[:8]
        assert line["route"] == "chat" and line["backend"] == "vllm"
    assert (done["status"], done["end"], done["chunks"]) == (200, "done", 5)  # 3 tokens, usage, [DONE]
    assert done["balance"] == "single"  # one replica: no balancing at all
    assert isinstance(done["ttft_ms"], float) and isinstance(done["bytes"], int) and done["bytes"] > 0
    assert (gone["status"], gone["end"]) == (200, "client_gone")
    assert isinstance(gone["chunks"], int) and gone["chunks"] >= 3
    assert (failed["status"], failed["end"]) == (200, "upstream_error")
    assert (timed["status"], timed["end"], timed["ttft_ms"]) == (504, "timeout", None)

    text = scrape_when(g, "gateway_upstream_errors_total", 1, **{"class": "timeout"})
    assert metric(text, "gateway_client_disconnects_total", route="chat") == 1
    assert metric(text, "gateway_upstream_errors_total", **{"class": "reset"}) == 1
    assert metric(text, "gateway_upstream_errors_total", **{"class": "timeout"}) == 1
    assert CLIENT_KEY not in g.output()


def test_streams_without_usage_are_estimated(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_WORKERS="1").start()
    wait_for(lambda: len(backend.internal) >= 1)

    async def no_usage(r: Req, c: Conn) -> None:
        events = sse_events(6)
        await c.start_chunked()
        await c.chunk(b'data: {"choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n')
        for ev in events[:6]:
            await c.chunk(ev)
        await c.chunk(b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}\n\n')
        await c.chunk(b"data: [DONE]\n\n")
        await c.end_chunked()

    backend.handler = no_usage
    assert g.request("POST", "/v1/chat/completions", b'{"model":"fake","stream":true}').status == 200
    text = scrape_when(g, "gateway_tokens_estimated_total", 6, model="fake", type="output")
    assert metric(text, "gateway_tokens_estimated_total", model="fake", type="output") == 6
    assert metric(text, "gateway_tokens_total", model="fake", type="output") == 0


def test_not_supported_and_connect_errors_counted(start_gateway: StartGateway) -> None:
    g = start_gateway(BACKEND_KIND="tgi", BACKEND_BASE_URL=f"http://127.0.0.1:{free_port()}/v1").start()
    assert g.request("POST", "/v1/embeddings", b"{}").status == 501
    assert g.request("POST", "/v1/chat/completions", b"{}").status == 502
    text = scrape_when(g, "gateway_requests_total", 1, route="chat", status="502")
    assert metric(text, "gateway_not_supported_total", route="embeddings", backend="tgi") == 1
    assert metric(text, "gateway_upstream_errors_total", backend="tgi", **{"class": "connect"}) == 1
    assert metric(text, "gateway_requests_total", route="chat", status="502") == 1


@pytest.mark.parametrize("require", ["true", "false"])
def test_metrics_behind_a_key_when_configured(start_gateway: StartGateway, backend: FakeBackend, require: str) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, API_KEYS=CLIENT_KEY, GATEWAY_METRICS_REQUIRE_KEY=require).start()
    assert g.request("GET", "/metrics").status == (401 if require == "true" else 200)
    assert g.request("GET", "/metrics", headers=auth()).status == 200


def test_metrics_and_access_log_can_be_off(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_METRICS="false", GATEWAY_ACCESS_LOG="false").start()
    assert g.request("POST", "/v1/chat/completions", b"{}").status == 200
    assert g.request("GET", "/metrics").status == 404
    assert access_lines(g) == []
    assert backend.internal == []  # no model listing either


def test_traceparent_passes_through(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert g.request("POST", "/v1/chat/completions", b"{}", {"traceparent": tp}).status == 200
    sent = backend.requests[-1]
    assert sent.header("traceparent") == tp
    assert sent.header("x-request-id") is not None
