"""Upstream faults (issue #9): the simulator's fault modes and raw sockets.

For every fault the client gets a prompt, well-formed answer (an OpenAI error, or a stream ended by
an error event, or the backend's own error relayed unchanged), the backend sees the generation the
gateway gave up on aborted, the broken connection is closed rather than reused, and the next
request succeeds through a pool of one connection, which proves no slot leaked. (test_faults.py
covers the same with the scripted fake backend; these use the simulator and raw sockets.)
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.sim import SimServer
from tests import servers
from tests.fakes import Conn, FakeBackend, Req, default_handler
from tests.rawhttp import Result, exchange, fetch_all, request_bytes
from tests.reliability import Meter, chat, check_stream, openai_error, sampling, sse_error
from tests.servers import Gateway, StartGateway, free_port, wait_until

pytestmark = pytest.mark.slow

BACKEND_KEY = "sk-backend-never-shown-7f3a"
READ_TIMEOUT = 0.8
#: A well-formed answer arrives within this (the read timeout plus room for a loaded machine).
PROMPT = 2.5


#: The simulator's pacing for these tests.
SIM = {"ttft_ms": 5.0, "itl_ms": 5.0, "itl_jitter_ms": 0.0, "batch_slowdown": 0.0}


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with servers.sim(**SIM) as s:
        yield s


@pytest.fixture(scope="module")
def gw(sim: SimServer, module_tmp: Path) -> Iterator[Gateway]:
    with Gateway(
        module_tmp,
        BACKEND_BASE_URL=sim.base_url,
        BACKEND_API_KEY=BACKEND_KEY,
        GATEWAY_POOL_SIZE="1",
        GATEWAY_POOL_TIMEOUT="3",
        GATEWAY_READ_TIMEOUT=str(READ_TIMEOUT),
    ) as g:
        yield g
        assert g.stop() == 0
        assert BACKEND_KEY not in g.output()


@dataclass(frozen=True)
class Fault:
    #: The x-sim-fault header.
    spec: str
    stream: bool
    #: What the client gets: the status, and the gateway's error code (None: the backend's own
    #: answer, relayed unchanged).
    status: int
    code: str | None
    #: Generations the backend must see aborted (those the gateway gave up on).
    aborts: int


FAULTS = {
    "backend-503": Fault("status=503", False, 503, None, 0),
    "reset-before-answer": Fault("reset-after=0", False, 502, "backend_unavailable", 0),
    "stall-before-headers": Fault("stall-before-headers-ms=3000", True, 504, "backend_timeout", 1),
    "stall-mid-stream": Fault("stall-after=2;stall-ms=3000", True, 200, "backend_timeout", 1),
    "reset-mid-stream": Fault("reset-after=3", True, 200, "backend_unavailable", 0),
    "error-event-mid-stream": Fault("error-after=2", True, 200, None, 0),
    "reset-non-streamed": Fault("reset-after=2", False, 502, "backend_unavailable", 0),
    "stall-non-streamed": Fault("stall-after=1;stall-ms=3000", False, 504, "backend_timeout", 1),
}


def assert_pool_recovered(gw: Gateway, sim: SimServer) -> None:
    """The next request succeeds (one pooled connection: it was given back) and afterwards the
    backend holds exactly that one connection: the broken one was closed, not kept or reused."""
    ok = exchange(gw.port, request_bytes("POST", "/v1/chat/completions", chat(stream=True, max_tokens=8)))
    assert (ok.status, ok.error, check_stream(ok.body, 8)) == (200, None, None)
    assert wait_until(lambda: sim.stats.open_connections == 1), sim.stats


@pytest.mark.parametrize("name", list(FAULTS))
def test_simulator_fault(gw: Gateway, sim: SimServer, name: str) -> None:
    f = FAULTS[name]
    aborted = sim.stats.aborted_requests_total
    raw = request_bytes("POST", "/v1/chat/completions", chat(f.stream, 16), {"x-sim-fault": f.spec})
    r = exchange(gw.port, raw)
    assert r.error is None, r  # a complete HTTP message on the wire
    assert r.status == f.status, r
    assert r.t_end < PROMPT, f"the answer took {r.t_end:.2f} s"
    print(f"\nRELIABILITY fault {name}: {r.status} after {r.t_end * 1000:.0f} ms")
    if f.status != 200:
        err = openai_error(r.body)
        if f.code is not None:
            assert err["code"] == f.code
    elif f.code is not None:
        event = sse_error(r.body)
        assert event is not None and event["code"] == f.code, r.body[-300:]
    else:  # the backend's own mid-stream error event and [DONE], unchanged
        assert b'"error"' in r.body and r.body.endswith(b"data: [DONE]\n\n")
    assert BACKEND_KEY not in r.body.decode("latin-1") + str(r.headers)
    assert wait_until(lambda: sim.stats.aborted_requests_total - aborted >= f.aborts), "backend never saw the abort"
    assert_pool_recovered(gw, sim)


def test_backend_dies_and_comes_back(start_gateway: StartGateway) -> None:
    """A stream in flight when the backend dies ends with an error event; while it is down every
    request gets a prompt 502 and /ready says unreachable; once it is back on the same port the
    first request succeeds: no stale pooled connection is tried."""
    port = free_port()
    with servers.sim(port=port, ttft_ms=5.0, itl_ms=40.0, itl_jitter_ms=0.0) as sim:
        g = start_gateway(BACKEND_BASE_URL=sim.base_url, GATEWAY_READ_TIMEOUT="5").start()
        # Fill the pool with a few idle keep-alive connections.
        warm = request_bytes("POST", "/v1/chat/completions", chat(False, 2))

        assert all(r.status == 200 for r in asyncio.run(fetch_all(g.port, [warm] * 4)))
        assert wait_until(lambda: sim.stats.open_connections == 4)
        box: dict[str, Result] = {}
        stream = request_bytes("POST", "/v1/chat/completions", chat(True, 200))
        t = threading.Thread(target=lambda: box.update(r=exchange(g.port, stream)))
        t.start()
        assert wait_until(lambda: sim.stats.running == 1, 5)
        time.sleep(0.2)
    t.join(10)
    cut = box["r"]
    assert cut.status == 200 and cut.error is None
    err = sse_error(cut.body)
    assert err is not None and err["code"] == "backend_unavailable", cut.body[-200:]
    for _ in range(3):
        down = exchange(g.port, request_bytes("POST", "/v1/chat/completions", chat(False, 2)))
        assert down.status == 502 and down.t_end < 1.0
        assert openai_error(down.body)["code"] == "backend_unavailable"
    ready = exchange(g.port, request_bytes("GET", "/ready"))
    assert ready.status == 503 and b'"unreachable"' in ready.body
    with servers.sim(**SIM, port=port) as back:
        assert exchange(g.port, request_bytes("GET", "/ready")).status == 200
        for _ in range(5):
            r = exchange(g.port, request_bytes("POST", "/v1/chat/completions", chat(True, 6)))
            assert (r.status, r.error, check_stream(r.body, 6)) == (200, None, None)
        assert back.stats.requests_total == 5  # each reached the new backend once: no failed try


# -- raw sockets: what the simulator cannot do --------------------------------------------------------


def test_backend_accepted_by_the_kernel_never_answers(start_gateway: StartGateway) -> None:
    """A listening socket whose process never calls accept(): TCP connects, nothing is ever read."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/v1"
        g = start_gateway(BACKEND_BASE_URL=url, GATEWAY_READ_TIMEOUT=str(READ_TIMEOUT), GATEWAY_POOL_SIZE="1").start()
        for _ in range(2):  # the second proves the first gave its only pool slot back
            r = exchange(g.port, request_bytes("POST", "/v1/chat/completions", chat(False, 2)))
            assert r.status == 504 and openai_error(r.body)["code"] == "backend_timeout"
            assert READ_TIMEOUT <= r.t_end < PROMPT


def test_backend_that_never_accepts(start_gateway: StartGateway) -> None:
    """A full accept queue: SYNs are dropped and connect() hangs; the connect timeout answers."""
    with socket.socket() as hole, socket.socket() as filler:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        filler.connect(hole.getsockname())  # takes the one place in the queue
        url = f"http://127.0.0.1:{hole.getsockname()[1]}/v1"
        g = start_gateway(BACKEND_BASE_URL=url, GATEWAY_CONNECT_TIMEOUT="0.5", GATEWAY_POOL_SIZE="1").start()
        for _ in range(2):
            r = exchange(g.port, request_bytes("POST", "/v1/chat/completions", chat(False, 2)))
            assert r.status == 504 and openai_error(r.body)["code"] == "backend_timeout"
            assert r.t_end < PROMPT


async def _cut_json_with_length(req: Req, conn: Conn) -> None:
    await conn.send(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{"id":"x",')
    await asyncio.sleep(0.05)
    conn.reset()


async def _cut_json_chunked(req: Req, conn: Conn) -> None:
    await conn.start_chunked(200, "application/json")
    await conn.chunk(b'{"id":"x","choices":[')
    await asyncio.sleep(0.05)
    conn.reset()


async def _bad_status_line(req: Req, conn: Conn) -> None:
    await conn.send(b"HTTP/1.1 2x0 OK\r\ncontent-length: 2\r\n\r\n{}")


async def _not_http(req: Req, conn: Conn) -> None:
    await conn.send(b"\x16\x03\x01\x00\x05hello, this is not HTTP\r\n\r\n")


async def _bad_chunk(req: Req, conn: Conn) -> None:
    await conn.send(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        b'f\r\ndata: {"a":1}\n\n\r\nzz\r\n'
    )


async def _huge_headers(req: Req, conn: Conn) -> None:
    await conn.send(b"HTTP/1.1 200 OK\r\nx-huge: " + b"h" * 300_000 + b"\r\ncontent-length: 2\r\n\r\n{}")


async def _longer_than_declared(req: Req, conn: Conn) -> None:
    # Bytes past the declared length would be read as the next response on a reused connection.
    await conn.send(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 200")


#: name -> (handler, what the client must get)
MALFORMED = {
    "truncated-with-content-length": (_cut_json_with_length, "short read"),
    "bad-status-line": (_bad_status_line, 502),
    "not-http": (_not_http, 502),
    "bad-chunk-in-stream": (_bad_chunk, "error event"),
    "huge-response-headers": (_huge_headers, 502),
    "longer-than-declared": (_longer_than_declared, 200),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_truncated_or_malformed_response(start_gateway: StartGateway, backend: FakeBackend, name: str) -> None:
    handler, expected = MALFORMED[name]
    g = start_gateway(BACKEND_BASE_URL=backend.url, BACKEND_API_KEY=BACKEND_KEY, GATEWAY_POOL_SIZE="1").start()
    backend.handler = handler
    r = exchange(g.port, request_bytes("POST", "/v1/chat/completions", chat(True, 4)), timeout=5)
    assert r.t_end < PROMPT, r
    if expected == "short read":  # the relayed Content-Length is not met: the client's read fails
        assert r.status == 200 and r.error == "eof", r
    elif expected == "error event":
        assert r.status == 200 and r.error is None
        err = sse_error(r.body)
        assert err is not None and err["code"] == "backend_unavailable", r.body
    else:
        assert r.status == expected and r.error is None, r
        if expected == 502:
            assert openai_error(r.body)["code"] == "backend_unavailable"
    assert BACKEND_KEY not in r.body.decode("latin-1") + str(r.headers)
    connections = backend.connections
    backend.handler = default_handler
    ok = exchange(g.port, request_bytes("POST", "/v1/chat/completions", chat(False, 2)))
    assert ok.status == 200 and ok.json()["choices"][0]["message"]["content"] == "hello"
    assert backend.connections > connections  # the broken connection was not reused


def test_truncated_chunked_body_is_a_failed_transfer(start_gateway: StartGateway, backend: FakeBackend) -> None:
    """(Found by this campaign: the cut body ended with a clean last chunk and looked complete.)"""
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()
    backend.handler = _cut_json_chunked
    r = exchange(g.port, request_bytes("POST", "/v1/chat/completions", chat(False, 4)), timeout=5)
    assert r.t_end < PROMPT
    assert r.status == 200 and r.error == "eof", r  # the client's HTTP library must see a cut transfer


def test_huge_response_streams_through_in_bounded_memory(start_gateway: StartGateway, backend: FakeBackend) -> None:
    size = 48 * 1024 * 1024
    piece = bytes(range(256)) * 4096  # 1 MiB

    async def huge(req: Req, conn: Conn) -> None:
        await conn.send(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n" % size
        )
        for _ in range(size // len(piece)):
            await conn.send(piece)

    backend.handler = huge
    g = start_gateway(BACKEND_BASE_URL=backend.url).start()
    assert g.proc is not None
    meter = Meter(g.proc.pid)
    rss0 = meter.rss()
    with sampling(meter):
        r = exchange(g.port, request_bytes("GET", "/v1/files/big/content"), timeout=60)
    assert r.status == 200 and r.error is None and len(r.body) == size
    assert hashlib.sha256(r.body).digest() == hashlib.sha256(piece * (size // len(piece))).digest()
    growth = meter.peak_rss - rss0
    print(f"\nRELIABILITY huge response: {size >> 20} MiB relayed intact, worker RSS +{growth / 2**20:.1f} MiB at peak")
    assert growth < 24 * 1024 * 1024


def test_surplus_after_content_length_never_answers_another_request(
    start_gateway: StartGateway, backend: FakeBackend
) -> None:
    """(Found by this campaign: the surplus stayed in the pooled connection's buffer and was read as
    the answer to the next request on it.)"""
    answered = 0

    async def surplus_then_normal(req: Req, conn: Conn) -> None:
        nonlocal answered
        answered += 1
        if answered == 1:  # a whole second response past the declared length, in the same write
            await conn.send(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
                b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n"not yours"'
            )
        else:
            await conn.json(200, {"answer": answered})

    backend.handler = surplus_then_normal
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_POOL_SIZE="1", GATEWAY_METRICS="false").start()
    first = exchange(g.port, request_bytes("GET", "/v1/first"))
    assert (first.status, first.body) == (200, b"{}")
    second = exchange(g.port, request_bytes("GET", "/v1/second"))
    assert second.body != b'"not yours"'
    assert second.status == 200 and second.json() == {"answer": 2}


def test_backend_connection_options_are_not_relayed(start_gateway: StartGateway, backend: FakeBackend) -> None:
    async def nominates(req: Req, conn: Conn) -> None:
        await conn.send(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: x-hop, keep-alive\r\n"
            b"x-hop: for the gateway only\r\nkeep-alive: timeout=5\r\ncontent-length: 2\r\n\r\n{}"
        )

    backend.handler = nominates
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_METRICS="false").start()
    r = exchange(g.port, request_bytes("GET", "/v1/x"))
    assert r.status == 200 and r.body == b"{}"
    assert "keep-alive" not in r.headers  # a hop-by-hop field of its own: dropped already
    assert "x-hop" not in r.headers
