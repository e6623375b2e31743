"""Micro-benchmarks of the gateway's hot path, piece by piece, and of whole requests in memory.

Run (from the repository root; pytest-benchmark's default timing settings)::

    .venv/bin/pytest bench/micro --benchmark-only

To compare commits, save a run on each and compare them (results go to ``.benchmarks/``, keyed by
machine and Python version, so only runs from the same machine compare)::

    .venv/bin/pytest bench/micro --benchmark-only --benchmark-autosave
    # ... change the code ...
    .venv/bin/pytest bench/micro --benchmark-only --benchmark-compare
    .venv/bin/pytest bench/micro --benchmark-only --benchmark-compare=0001 --benchmark-compare-fail=median:10%

The app benchmarks (``test_app_*``, ``test_httpcore_*``) drive ``Gateway.__call__`` on a uvloop
loop with an in-memory httpcore backend (see conftest.py): real pool, real httpcore/h11 parsing,
no sockets. They use fixed rounds so that the suite stays short and runs compare; the streamed
ones also record ``per_chunk_us`` (median round / events) in the saved JSON's ``extra_info``.
``tests/test_bench_micro.py`` runs every body once with ``--benchmark-disable``, so none can rot.

Sub-microsecond results include pytest-benchmark's own call of the lambda (~30-50 ns).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import httpcore
import orjson
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from bench.micro.conftest import (
    CLIENT_KEY,
    MODEL,
    AppRequest,
    MemoryNetwork,
    chat_body,
    client_headers,
    json_completion,
    json_response,
    sse_events,
    sse_response,
)
from gateway import routes
from gateway.app import Gateway
from gateway.auth import KeyRing
from gateway.client_headers import HeaderPass
from gateway.errors import error_body, sse_error_event
from gateway.exchange import Exchange
from gateway.h1 import ChunkedBody, parse_head, plain_request
from gateway.headers import DROP_REQUEST_HEADERS, response_headers
from gateway.payload import peek, with_model
from gateway.profiles import Support
from gateway.types import HTTPScope

#: Events in the streamed benchmarks' response (a 1000-token answer, one event per token).
STREAM_EVENTS = 1000


def _per_chunk(benchmark: BenchmarkFixture, chunks: int) -> None:
    benchmark.extra_info["chunks"] = chunks
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["per_chunk_us"] = round(benchmark.stats.stats.median / chunks * 1e6, 3)


# -- request body: peek and model fill-in --------------------------------------------------------


def _large_body() -> bytes:
    """A ~200 KB chat body: a long conversation, model last so peek must skip everything first."""
    turn = "The quick brown fox jumps over the lazy dog, again and again. " * 32  # ~2 KB
    messages = [{"role": "user" if i % 2 else "assistant", "content": turn} for i in range(100)]
    return orjson.dumps({"messages": messages, "max_tokens": 256, "stream": True, "model": MODEL})


SMALL_BODY = chat_body(stream=True)
LARGE_BODY = _large_body()
BODIES = {"small": SMALL_BODY, "large_200k": LARGE_BODY}


@pytest.mark.parametrize("size", list(BODIES))
def test_peek(benchmark: BenchmarkFixture, size: str) -> None:
    body = BODIES[size]
    if size == "large_200k":
        assert 190_000 < len(body) < 220_000
    p = benchmark(peek, body)
    assert p.model == MODEL and p.stream is True and not p.wants_tools


@pytest.mark.parametrize("size", list(BODIES))
def test_with_model(benchmark: BenchmarkFixture, size: str) -> None:
    body = orjson.dumps({k: v for k, v in orjson.loads(BODIES[size]).items() if k != "model"})
    out = benchmark(with_model, body, "served-model")
    assert orjson.loads(out)["model"] == "served-model"


# -- auth, routing, capability check ----------------------------------------------------------


@pytest.mark.parametrize("outcome", ["hit", "miss"])
@pytest.mark.parametrize("n_keys", [1, 10])
def test_auth_check(benchmark: BenchmarkFixture, n_keys: int, outcome: str) -> None:
    keys = [f"sk-bench-{i:02d}-{'x' * 30}" for i in range(n_keys)]
    ring = KeyRing(keys)
    # A hit on the last key, a miss of the same length: the check is meant to cost the same.
    presented = keys[-1] if outcome == "hit" else keys[-1][:-1] + "y"
    header = b"Bearer " + presented.encode()
    assert (benchmark(ring.identify, header) is not None) is (outcome == "hit")


ROUTE_PATHS = {
    "chat": ("/v1/chat/completions", routes.CHAT),
    "passthrough": ("/v1/audio/transcriptions", routes.PASSTHROUGH),
    "unknown": ("/nope", None),
}


@pytest.mark.parametrize("kind", list(ROUTE_PATHS))
def test_route_resolve(benchmark: BenchmarkFixture, kind: str) -> None:
    path, expected = ROUTE_PATHS[kind]
    assert benchmark(routes.resolve, path) is expected


def test_capability_check(benchmark: BenchmarkFixture, gateway_on: Callable[[MemoryNetwork], Gateway]) -> None:
    # The app looks up the mapping it cached at construction: ``Settings.capabilities`` is a
    # property that re-applies the overrides on every access, so it is never read per request.
    app = gateway_on(MemoryNetwork([]))
    caps = app.topology.first.capabilities
    cap = routes.CHAT.capability
    assert cap is not None
    assert benchmark(lambda: caps[cap] is Support.UNSUPPORTED) is False


# -- headers ------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by ``receive`` to stop ``Gateway._forward`` right after its synchronous prefix."""


async def _receive_stop() -> Any:
    raise _Stop


async def _never_send(message: Any) -> None:
    raise AssertionError("nothing is sent before the body is read")


def test_request_headers_app(benchmark: BenchmarkFixture, gateway_on: Callable[[MemoryNetwork], Gateway]) -> None:
    """The real ``Gateway._forward`` up to its first ``receive()``: header pass, capability check.

    Driven synchronously with ``coro.send(None)``: nothing before the body read suspends, and our
    ``receive`` raises at once, so this includes creating two coroutines and one raise/catch. Client
    auth is off here (the key check has its own benchmark); compare with the header pass below.
    """
    app = gateway_on(MemoryNetwork([]))
    app.keys = KeyRing([])
    app.read_body.timeout = 0.0  # its timer needs a running loop, which this synchronous drive has not
    scope = cast(HTTPScope, AppRequest(app, "/v1/chat/completions", SMALL_BODY).scope)

    def prefix() -> None:
        coro = app._forward(routes.CHAT, scope, _receive_stop, _never_send, Exchange())
        try:
            coro.send(None)
        except _Stop:
            return
        raise AssertionError("Gateway._forward went past the body read")

    benchmark(prefix)


def test_request_headers_pass(benchmark: BenchmarkFixture) -> None:
    """The client-header pass alone (``client_headers.HeaderPass``): what the app checks, what it
    forwards, and the request id."""
    headers = client_headers(len(SMALL_BODY))
    header_pass = HeaderPass()  # no sticky header configured

    found = benchmark(header_pass, headers)
    assert found.authorization == b"Bearer " + CLIENT_KEY.encode() and found.auth_count == 1
    assert found.content_length == str(len(SMALL_BODY)).encode()
    assert [n for n, _ in found.forwarded] == [
        b"accept-encoding",
        b"accept",
        b"content-type",
        b"user-agent",
        b"x-stainless-lang",
        b"x-stainless-package-version",
        b"x-stainless-retry-count",
        b"x-request-id",
    ]


UPSTREAM_HEADERS = {
    "sse": [
        (b"date", b"Mon, 06 Jan 2025 12:00:00 GMT"),
        (b"server", b"uvicorn"),
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"transfer-encoding", b"chunked"),
    ],
    "json": [
        (b"date", b"Mon, 06 Jan 2025 12:00:00 GMT"),
        (b"server", b"uvicorn"),
        (b"content-length", b"1234"),
        (b"content-type", b"application/json"),
    ],
}


#: Response heads as vLLM (uvicorn) sends them, whole in one read, as the direct path reads them.
UPSTREAM_HEADS = {
    kind: b"HTTP/1.1 200 OK\r\n" + b"".join(b"%s: %s\r\n" % field for field in fields) + b"\r\n"
    for kind, fields in UPSTREAM_HEADERS.items()
}


@pytest.mark.parametrize("kind", list(UPSTREAM_HEADS))
def test_direct_head(benchmark: BenchmarkFixture, kind: str) -> None:
    """The response head read without h11 (``h1.parse_head``): status, fields, framing."""
    head = UPSTREAM_HEADS[kind]
    status, fields, length = benchmark(parse_head, head, len(head) - 4)
    assert status == 200 and fields == UPSTREAM_HEADERS[kind]
    assert length == (-1 if kind == "sse" else 1234)


def test_direct_request(benchmark: BenchmarkFixture) -> None:
    """Whether a request goes out without h11 (``h1.plain_request``), per request."""
    headers = [(b"host", b"backend.bench:8000"), *client_headers(len(SMALL_BODY))[1:]]
    headers = [(n, v) for n, v in headers if n not in DROP_REQUEST_HEADERS or n in (b"host", b"content-length")]
    assert benchmark(plain_request, b"POST", b"/v1/chat/completions", headers, SMALL_BODY)


def test_chunked_feed(benchmark: BenchmarkFixture) -> None:
    """``h1.ChunkedBody.feed`` on a paced stream's read: one whole HTTP chunk (one SSE event)."""
    event = sse_events(2)[0]
    body = ChunkedBody(100 * 1024)
    assert benchmark(body.feed, b"%x\r\n%s\r\n" % (len(event), event)) == event


@pytest.mark.parametrize("kind", list(UPSTREAM_HEADERS))
def test_response_headers(benchmark: BenchmarkFixture, kind: str) -> None:
    out, sse = benchmark(response_headers, UPSTREAM_HEADERS[kind])
    assert sse is (kind == "sse")
    assert (b"server", b"uvicorn") not in out


# -- error bodies -------------------------------------------------------------------------------


def test_error_body(benchmark: BenchmarkFixture) -> None:
    body = benchmark(error_body, "The backend is unavailable: connection lost", "api_error", "backend_unavailable")
    assert orjson.loads(body)["error"]["code"] == "backend_unavailable"


def test_sse_error_event(benchmark: BenchmarkFixture) -> None:
    event = benchmark(
        sse_error_event, "The backend timed out: no data within the read timeout", "api_error", "backend_timeout", b"}"
    )
    assert event.startswith(b"\n\ndata: {") and event.endswith(b"\n\n")


# -- whole requests through the ASGI app, upstream in memory ---------------------------------------


def _assert_kept_alive(app: Gateway, network: MemoryNetwork) -> None:
    assert network.connects == 1, "each round must reuse the pooled connection"
    assert (
        app.topology.first.replicas[0].pool is not None
        and app.topology.first.replicas[0].pool.open == 1
        and app.topology.first.replicas[0].pool.idle == 1
    )


def test_loop_floor(benchmark: BenchmarkFixture, loop: asyncio.AbstractEventLoop) -> None:
    """``loop.run_until_complete`` of an empty coroutine: the harness's fixed cost in every round of
    the benchmarks below (a loop start and stop, no part of serving a request)."""

    async def nothing() -> None:
        return None

    benchmark.pedantic(  # type: ignore[no-untyped-call]  # pytest-benchmark's has no annotations
        lambda: loop.run_until_complete(nothing()), rounds=2000, warmup_rounds=100
    )


def test_app_stream(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    gateway_on: Callable[[MemoryNetwork], Gateway],
) -> None:
    """One streamed chat request of ``STREAM_EVENTS`` events through ``app(scope, receive, send)``."""
    events = sse_events(STREAM_EVENTS)
    network = MemoryNetwork(sse_response(events))
    app = gateway_on(network)
    request = AppRequest(app, "/v1/chat/completions", chat_body(stream=True))

    seen = loop.run_until_complete(request.check())
    assert seen.status == 200 and seen.finished
    assert seen.messages == STREAM_EVENTS + 1  # one per event, then the empty final message
    assert seen.body_bytes == sum(map(len, events))

    benchmark.pedantic(  # type: ignore[no-untyped-call]  # pytest-benchmark's has no annotations
        lambda: loop.run_until_complete(request.run()), rounds=40, warmup_rounds=3
    )
    _per_chunk(benchmark, STREAM_EVENTS)
    _assert_kept_alive(app, network)


def test_app_json(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    gateway_on: Callable[[MemoryNetwork], Gateway],
) -> None:
    """One non-streamed chat request through the app: the fixed cost of a request."""
    body = json_completion()
    network = MemoryNetwork(json_response(body))
    app = gateway_on(network)
    request = AppRequest(app, "/v1/chat/completions", chat_body(stream=False))

    seen = loop.run_until_complete(request.check())
    assert seen.status == 200 and seen.finished and seen.body_bytes == len(body)

    benchmark.pedantic(  # type: ignore[no-untyped-call]  # pytest-benchmark's has no annotations
        lambda: loop.run_until_complete(request.run()), rounds=2000, warmup_rounds=100
    )
    _assert_kept_alive(app, network)


@pytest.mark.parametrize("kind", ["stream", "json"])
def test_httpcore_baseline(
    benchmark: BenchmarkFixture,
    loop: asyncio.AbstractEventLoop,
    gateway_on: Callable[[MemoryNetwork], Gateway],
    kind: str,
) -> None:
    """The same exchange as ``test_app_<kind>`` straight on the gateway's pool, with the headers the
    gateway would forward: what httpcore and h11 cost alone. The app's time minus this one is the
    gateway's own share (auth, routing, peek, header passes, disconnect watcher, ASGI messages)."""
    stream = kind == "stream"
    events = sse_events(STREAM_EVENTS) if stream else [json_completion()]
    network = MemoryNetwork(sse_response(events) if stream else json_response(events[0]))
    app = gateway_on(network)
    pool = app.topology.first.replicas[0].pool
    assert pool is not None
    target = app.topology.first.replicas[0].target
    url = target.url(b"/v1/chat/completions")
    body = chat_body(stream=stream)
    headers = [
        *target.static_headers,
        *((n, v) for n, v in client_headers(len(body)) if n not in DROP_REQUEST_HEADERS),
        (b"content-length", str(len(body)).encode()),
    ]

    t = app.forwarder.timeouts
    connect = app.settings.gateway_connect_timeout
    extensions = {"timeout": {"connect": connect, "read": t.header, "write": t.header, "pool": 30.0}}

    async def exchange() -> int:
        conn, _ = await pool.acquire()
        try:
            request = httpcore.Request(b"POST", url, headers=headers, content=body, extensions=extensions)
            response = await conn.handle_async_request(request)
            size = 0
            try:
                async for chunk in response.stream:  # type: ignore[union-attr]
                    size += len(chunk)
            finally:
                await response.aclose()
            return size
        finally:
            pool.release(conn)

    assert loop.run_until_complete(exchange()) == sum(map(len, events))
    if stream:
        benchmark.pedantic(  # type: ignore[no-untyped-call]  # pytest-benchmark's has no annotations
            lambda: loop.run_until_complete(exchange()), rounds=40, warmup_rounds=3
        )
        _per_chunk(benchmark, STREAM_EVENTS)
    else:
        benchmark.pedantic(  # type: ignore[no-untyped-call]  # pytest-benchmark's has no annotations
            lambda: loop.run_until_complete(exchange()), rounds=2000, warmup_rounds=100
        )
    _assert_kept_alive(app, network)
