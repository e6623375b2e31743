"""Faults on both sides: the backend sees every client disconnect within a second, in every
phase; upstream failures reach the client promptly in a well-formed way; no pool slot leaks."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import openai
import orjson
import pytest

from tests import rawhttp
from tests.fakes import Conn, FakeBackend, Handler, Req, default_handler, sse_events
from tests.servers import Gateway, StartGateway, free_port

pytestmark = pytest.mark.slow


def send_raw(port: int, body: bytes, path: str = "/v1/chat/completions") -> rawhttp.Connection:
    return rawhttp.connect(port, rawhttp.request_bytes("POST", path, body, close=False))


def post_stream(g: Gateway) -> rawhttp.Response:
    return rawhttp.request(g.port, "POST", "/v1/chat/completions", b'{"stream":true}')


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


def second_request_ok(g: Gateway, backend: FakeBackend) -> None:
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
    start_gateway: StartGateway, backend: FakeBackend, handler: Handler, wait_for: bytes | None
) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_POOL_SIZE="1").start()
    backend.handler = handler
    s = send_raw(g.port, b'{"stream":true}')
    if wait_for is None:
        while not backend.requests:
            time.sleep(0.01)
    else:
        s.read_until(wait_for)
    gone = time.monotonic()
    s.abort()
    assert backend.wait_disconnects(1, timeout=1.0), "backend never saw the disconnect"
    assert backend.disconnects[0] - gone < 1.0
    second_request_ok(g, backend)


def test_disconnect_while_waiting_for_a_pool_slot(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_POOL_SIZE="1", GATEWAY_POOL_TIMEOUT="30").start()
    backend.handler = never_answers
    holder = send_raw(g.port, b"{}")
    while not backend.requests:
        time.sleep(0.01)
    waiter = send_raw(g.port, b"{}")  # queued behind the only connection
    time.sleep(0.3)
    waiter.abort()
    time.sleep(0.2)
    holder.abort()
    assert backend.wait_disconnects(1, timeout=1.0)
    # Neither the cancelled waiter nor the aborted request may keep the only slot.
    second_request_ok(g, backend)
    assert len(backend.requests) == 2  # the waiter never reached the backend


def test_disconnect_before_body_complete(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()
    s = rawhttp.connect(
        g.port, b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n{"model":'
    )
    time.sleep(0.2)
    s.abort()
    time.sleep(0.3)
    assert backend.requests == []
    second_request_ok(g, backend)


def test_upstream_reset_mid_stream_ends_with_error_event(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()

    async def handler(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        for ev in sse_events(3)[:3]:
            await conn.chunk(ev)
        await conn.chunk(b'data: {"half')  # an event cut in the middle
        await asyncio.sleep(0.05)
        conn.reset()

    backend.handler = handler
    resp = post_stream(g)
    body = resp.body
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


def test_read_timeout(start_gateway: StartGateway, backend: FakeBackend) -> None:
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
    body = post_stream(g).body
    assert body.startswith(sse_events(1)[0] + b'data: {"error"')
    assert b"backend_timeout" in body
    assert backend.wait_disconnects(2, timeout=1.0)  # the stalled upstream was closed both times


def test_total_timeout(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_TOTAL_TIMEOUT="0.6").start()
    backend.handler = slow_stream  # never silent, but long
    t0 = time.monotonic()
    body = post_stream(g).body
    assert 0.5 < time.monotonic() - t0 < 3
    assert body.rstrip().endswith(b"}")
    assert b'"backend_timeout"' in body.rsplit(b"data: ", 1)[1]
    assert backend.wait_disconnects(1, timeout=1.0)


def test_backend_down(start_gateway: StartGateway) -> None:
    g = start_gateway(BACKEND_BASE_URL=f"http://127.0.0.1:{free_port()}/v1").start()
    with (
        openai.OpenAI(base_url=g.url + "/v1", api_key="x", max_retries=0) as c,
        pytest.raises(openai.APIStatusError) as info,
    ):
        c.chat.completions.create(model="m", messages=[])
    assert info.value.status_code == 502 and info.value.code == "backend_unavailable"
    resp = rawhttp.request(g.port, "GET", "/ready")
    assert resp.status == 503 and resp.json()["status"] == "unreachable"


def test_backend_closes_before_answering(start_gateway: StartGateway, backend: FakeBackend) -> None:
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


def test_stale_keepalive_connection_is_retried(start_gateway: StartGateway, backend: FakeBackend) -> None:
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


def test_drain_on_sigterm(start_gateway: StartGateway, backend: FakeBackend) -> None:
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
        result["body"] = post_stream(g).body

    t = threading.Thread(target=run_stream)
    t.start()
    while not backend.requests:
        time.sleep(0.01)
    assert g.proc is not None
    g.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with rawhttp.Connection(g.port, timeout=5) as conn:
        resp = conn.request("GET", "/ready")
        assert resp.status == 503 and resp.json()["status"] == "draining"
        resp = conn.request("POST", "/v1/chat/completions", b"{}")
        assert resp.status == 503 and resp.json()["error"]["code"] == "draining"
    t.join(10)
    assert result["body"] == b"".join(sse_events(40))  # the in-flight stream finished whole
    assert g.proc.wait(10) == 0


def test_drain_grace_period_caps_shutdown(start_gateway: StartGateway, backend: FakeBackend) -> None:
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


def test_idle_gateway_stops_at_once_on_sigint(start_gateway: StartGateway, backend: FakeBackend) -> None:
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_DRAIN_SECONDS="30").start()
    t0 = time.monotonic()
    assert g.stop(signal.SIGINT) == 0
    assert time.monotonic() - t0 < 5


def test_post_that_reached_the_backend_is_not_sent_again(start_gateway: StartGateway, backend: FakeBackend) -> None:
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


def test_a_body_framed_by_transfer_encoding_is_read_whole_whatever_its_content_length(
    start_gateway: StartGateway, backend: FakeBackend
) -> None:
    """A request with both Content-Length and Transfer-Encoding: chunked, framed by its chunks
    (RFC 9112 6.3; Granian, through hyper, drops the length from the scope, and the header pass
    ignores it too): the body stage does not stop at the length the client declared, whose
    bytes the first chunk happens to fill; the whole body reaches the backend."""
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()
    body = b'{"model":"m","messages":[]}'
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:2], body[2:])) + b"0\r\n\r\n"
    head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n"
    resp = rawhttp.exchange(g.port, head + chunks)
    assert resp.status == 200
    assert backend.requests[-1].body == body
