"""Faults on both sides: the backend sees every client disconnect within a second, in every
phase; upstream failures reach the client promptly in a well-formed way; no pool slot leaks."""

from __future__ import annotations

import asyncio
import http.client
import signal
import socket
import threading
import time

import openai
import orjson
import pytest

from tests.conftest import GatewayProc
from tests.fakes import Conn, FakeBackend, Req, default_handler, sse_events

pytestmark = pytest.mark.slow


def send_raw(port: int, body: bytes, path: str = "/v1/chat/completions") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return s


def abort(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def read_until(s: socket.socket, marker: bytes, timeout: float = 10) -> bytes:
    s.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


async def slow_stream(req: Req, conn: Conn) -> None:
    await conn.start_chunked()
    for ev in sse_events(1000):
        await conn.chunk(ev)
        await asyncio.sleep(0.02)
    await conn.end_chunked()


async def never_answers(req: Req, conn: Conn) -> None:
    await asyncio.sleep(3600)


async def slow_json(req: Req, conn: Conn) -> None:
    await conn.send(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{"a":')
    await asyncio.sleep(3600)


def second_request_ok(g: GatewayProc, backend: FakeBackend) -> None:
    """With a pool of one connection, this only works if the slot was given back."""
    backend.handler = default_handler
    with openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0, timeout=5) as c:
        assert c.chat.completions.create(model="m", messages=[]).choices[0].message.content == "hello"


@pytest.mark.parametrize(
    ("handler", "wait_for"),
    [
        (never_answers, None),  # waiting for the backend's headers
        (slow_stream, b"t3 "),  # mid-stream
        (slow_json, b'{"a":'),  # during a non-streamed response
    ],
    ids=["waiting-for-headers", "mid-stream", "non-streamed"],
)
def test_client_disconnect_reaches_backend(
    start_gateway: type[GatewayProc], backend: FakeBackend, handler, wait_for
) -> None:  # type: ignore[no-untyped-def]
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_POOL_SIZE="1").start()
    backend.handler = handler
    s = send_raw(g.port, b'{"stream":true}')
    if wait_for is None:
        while not backend.requests:
            time.sleep(0.01)
    else:
        read_until(s, wait_for)
    gone = time.monotonic()
    abort(s)
    assert backend.wait_disconnects(1, timeout=1.0), "backend never saw the disconnect"
    assert backend.disconnects[0] - gone < 1.0
    second_request_ok(g, backend)


def test_disconnect_while_waiting_for_a_pool_slot(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_POOL_SIZE="1", GATEWAY_POOL_TIMEOUT="30").start()
    backend.handler = never_answers
    holder = send_raw(g.port, b"{}")
    while not backend.requests:
        time.sleep(0.01)
    waiter = send_raw(g.port, b"{}")  # queued behind the only connection
    time.sleep(0.3)
    abort(waiter)
    time.sleep(0.2)
    abort(holder)
    assert backend.wait_disconnects(1, timeout=1.0)
    # Neither the cancelled waiter nor the aborted request may keep the only slot.
    second_request_ok(g, backend)
    assert len(backend.requests) == 2  # the waiter never reached the backend


def test_disconnect_before_body_complete(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()
    s = socket.create_connection(("127.0.0.1", g.port))
    s.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{"model":')
    time.sleep(0.2)
    abort(s)
    time.sleep(0.3)
    assert backend.requests == []
    second_request_ok(g, backend)


def test_upstream_reset_mid_stream_ends_with_error_event(
    start_gateway: type[GatewayProc], backend: FakeBackend
) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()

    async def handler(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        for ev in sse_events(3)[:3]:
            await conn.chunk(ev)
        await conn.chunk(b'data: {"half')  # an event cut in the middle
        await asyncio.sleep(0.05)
        conn.reset()

    backend.handler = handler
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=b'{"stream":true}')
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 200
    assert body.startswith(b"".join(sse_events(3)[:3]) + b'data: {"half')
    tail = body.split(b'data: {"half', 1)[1]
    assert tail.startswith(b'\n\ndata: {"error"')
    err = orjson.loads(tail.strip()[len(b"data: ") :])["error"]
    assert err["code"] == "backend_unavailable"

    # And the official client raises rather than returning a cut answer as complete.
    async def cut_between_events(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        for ev in sse_events(3)[:3]:
            await conn.chunk(ev)
        await asyncio.sleep(0.05)
        conn.reset()

    backend.handler = cut_between_events
    with openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0) as c, pytest.raises(openai.APIError):
        list(c.chat.completions.create(model="m", messages=[], stream=True))
    second_request_ok(g, backend)


def test_read_timeout(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_READ_TIMEOUT="0.5").start()
    backend.handler = never_answers
    t0 = time.monotonic()
    with (
        openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0) as c,
        pytest.raises(openai.APIStatusError) as info,
    ):
        c.chat.completions.create(model="m", messages=[])
    assert info.value.status_code == 504
    assert info.value.code == "backend_timeout"
    assert time.monotonic() - t0 < 3

    async def stalls_mid_stream(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        await conn.chunk(sse_events(1)[0])
        await asyncio.sleep(3600)

    backend.handler = stalls_mid_stream
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=b'{"stream":true}')
    body = conn.getresponse().read()
    conn.close()
    assert body.startswith(sse_events(1)[0] + b'data: {"error"')
    assert b"backend_timeout" in body
    assert backend.wait_disconnects(2, timeout=1.0)  # the stalled upstream was closed both times


def test_total_timeout(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_TOTAL_TIMEOUT="0.6").start()
    backend.handler = slow_stream  # never silent, but long
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    conn.request("POST", "/v1/chat/completions", body=b'{"stream":true}')
    body = conn.getresponse().read()
    conn.close()
    assert 0.5 < time.monotonic() - t0 < 3
    assert body.rstrip().endswith(b"}")
    assert b'"backend_timeout"' in body.rsplit(b"data: ", 1)[1]
    assert backend.wait_disconnects(1, timeout=1.0)


def test_backend_down(start_gateway: type[GatewayProc]) -> None:
    from tests.conftest import free_port

    g = start_gateway(BACKEND_BASE_URL=f"http://127.0.0.1:{free_port()}/v1").start()
    with (
        openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0) as c,
        pytest.raises(openai.APIStatusError) as info,
    ):
        c.chat.completions.create(model="m", messages=[])
    assert info.value.status_code == 502 and info.value.code == "backend_unavailable"
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    conn.request("GET", "/ready")
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    assert resp.status == 503 and orjson.loads(body)["status"] == "unreachable"


def test_backend_closes_before_answering(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()

    async def hangs_up(req: Req, conn: Conn) -> None:
        conn.reset()

    backend.handler = hangs_up
    with (
        openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0) as c,
        pytest.raises(openai.APIStatusError) as info,
    ):
        c.chat.completions.create(model="m", messages=[])
    assert info.value.status_code == 502
    second_request_ok(g, backend)


def test_stale_keepalive_connection_is_retried(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    """A backend that closes idle keep-alive connections must not cost the next request."""
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()
    second_request_ok(g, backend)

    async def answer_then_close(req: Req, conn: Conn) -> None:
        await default_handler(req, conn)
        conn.writer.close()

    backend.handler = answer_then_close
    with openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0) as c:
        for _ in range(5):
            assert c.models.list().data[0].id == "fake"


def test_drain_on_sigterm(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_DRAIN_SECONDS="10").start()

    async def stream_for_a_second(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        for ev in sse_events(40):
            await conn.chunk(ev)
            await asyncio.sleep(0.025)
        await conn.end_chunked()

    backend.handler = stream_for_a_second
    result: dict[str, bytes] = {}

    def run_stream() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=b'{"stream":true}')
        result["body"] = conn.getresponse().read()
        conn.close()

    t = threading.Thread(target=run_stream)
    t.start()
    while not backend.requests:
        time.sleep(0.01)
    assert g.proc is not None
    g.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=5)
    conn.request("GET", "/ready")
    resp = conn.getresponse()
    assert resp.status == 503 and orjson.loads(resp.read())["status"] == "draining"
    conn.request("POST", "/v1/chat/completions", body=b"{}")
    resp = conn.getresponse()
    assert resp.status == 503 and orjson.loads(resp.read())["error"]["code"] == "draining"
    conn.close()
    t.join(10)
    assert result["body"] == b"".join(sse_events(40))  # the in-flight stream finished whole
    assert g.proc.wait(10) == 0


def test_drain_grace_period_caps_shutdown(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_DRAIN_SECONDS="0.5").start()
    backend.handler = never_answers
    s = send_raw(g.port, b"{}")
    while not backend.requests:
        time.sleep(0.01)
    t0 = time.monotonic()
    try:
        assert g.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 6
    finally:
        s.close()
    assert backend.wait_disconnects(1, timeout=1.0)
    assert "GATEWAY_DRAIN_SECONDS (0.5 s) passed with requests still in flight" in g.output()


def test_idle_gateway_stops_at_once_on_sigint(start_gateway: type[GatewayProc], backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_DRAIN_SECONDS="30").start()
    t0 = time.monotonic()
    assert g.stop(signal.SIGINT) == 0
    assert time.monotonic() - t0 < 5


def test_post_that_reached_the_backend_is_not_sent_again(
    start_gateway: type[GatewayProc], backend: FakeBackend
) -> None:
    """A reused connection that fails after the request went out: a POST is not resent (the
    backend may be generating it), while an idle connection closed beforehand is simply replaced."""
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_POOL_SIZE="1", GATEWAY_METRICS="false").start()
    second_request_ok(g, backend)  # leaves one idle keep-alive connection in the pool

    async def crashes_after_reading(req: Req, conn: Conn) -> None:
        conn.writer.close()  # read the request, then go away without an answer

    backend.handler = crashes_after_reading
    before = len(backend.requests)
    with (
        openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0) as c,
        pytest.raises(openai.APIStatusError) as info,
    ):
        c.chat.completions.create(model="m", messages=[])
    assert info.value.status_code == 502
    assert len(backend.requests) == before + 1  # exactly once
    second_request_ok(g, backend)
