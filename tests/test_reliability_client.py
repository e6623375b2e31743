"""Client-side faults (issue #9): disconnects in every phase against the simulator, slow readers,
slow senders.

test_faults.py covers disconnects against the scripted fake backend; here the backend is the
simulator, whose own counters say whether a generation was aborted, plus the phases that fake
cannot produce (a connect that hangs) and many aborts in a row. Slow senders: what Granian enforces
by itself (a header read timeout that closes the connection, no body timeout at all) and the body
timeout the gateway adds (GATEWAY_CLIENT_BODY_TIMEOUT, 408).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.sim import SimServer
from tests import servers
from tests.fakes import FakeBackend
from tests.rawhttp import Connection, Result, connect, exchange, fetch, request_bytes
from tests.reliability import Meter, chat, check_stream, openai_error
from tests.servers import Gateway, StartGateway, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    with servers.sim(ttft_ms=5.0, itl_ms=5.0, itl_jitter_ms=0.0, batch_slowdown=0.0) as s:
        yield s


@pytest.fixture(scope="module")
def gw(sim: SimServer, module_tmp: Path) -> Iterator[Gateway]:
    with Gateway(module_tmp, BACKEND_BASE_URL=sim.base_url, GATEWAY_POOL_SIZE="1", GATEWAY_POOL_TIMEOUT="3") as g:
        yield g
        assert g.stop() == 0


def next_request_ok(gw: Gateway) -> None:
    r = exchange(gw.port, request_bytes("POST", "/v1/chat/completions", chat(True, 6)), timeout=10)
    assert (r.status, r.error, check_stream(r.body, 6)) == (200, None, None)


# -- disconnects, against the simulator ------------------------------------------------------------


PHASES = {
    # phase: (streamed, extra headers, what to wait for before leaving)
    "waiting-for-headers": (True, {"x-sim-fault": "stall-before-headers-ms=5000"}, None),
    "mid-stream": (True, {"x-sim-itl-ms": "50"}, b'" brown"'),
    "non-streamed": (False, {"x-sim-itl-ms": "50"}, None),
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_disconnect_aborts_the_generation_within_a_second(gw: Gateway, sim: SimServer, phase: str) -> None:
    streamed, headers, marker = PHASES[phase]
    requests, aborted = sim.stats.requests_total, sim.stats.aborted_requests_total
    s = connect(gw.port, request_bytes("POST", "/v1/chat/completions", chat(streamed, 60), headers, close=False))
    if marker is None:
        assert wait_until(lambda: sim.stats.requests_total > requests, 5)
        time.sleep(0.1)  # well inside the stall / the generation
    else:
        s.read_until(marker)
    gone = time.monotonic()
    s.abort()
    assert wait_until(lambda: sim.stats.aborted_requests_total > aborted, 1.0), "the backend never saw it"
    print(f"\nRELIABILITY disconnect {phase}: backend abort after {(time.monotonic() - gone) * 1000:.0f} ms")
    next_request_ok(gw)  # one pooled connection: it was not leaked
    assert wait_until(lambda: sim.stats.open_connections == 1)


def test_a_disconnect_before_the_watch_begins_is_seen_when_it_does(gw: Gateway, sim: SimServer) -> None:
    """A client that leaves a few milliseconds in, before the watcher's first tick (25-50 ms),
    while the backend stalls before its headers: the tick's ``receive()`` (the body's last
    message first, as the body stage stops at its Content-Length) still reports the disconnect
    already past, and the generation is aborted long before the stall would end."""
    requests, aborted = sim.stats.requests_total, sim.stats.aborted_requests_total
    headers = {"x-sim-fault": "stall-before-headers-ms=5000"}
    s = connect(gw.port, request_bytes("POST", "/v1/chat/completions", chat(True, 60), headers, close=False))
    assert wait_until(lambda: sim.stats.requests_total > requests, 5)
    s.abort()
    assert wait_until(lambda: sim.stats.aborted_requests_total > aborted, 1.0), "the backend never saw it"
    next_request_ok(gw)
    assert wait_until(lambda: sim.stats.open_connections == 1)


def test_disconnect_while_the_gateway_connects_leaks_no_slot(start_gateway: StartGateway) -> None:
    """Connecting to a backend whose accept queue is full hangs; the client leaves meanwhile. With a
    pool of one, the next request must be let through to connect (504 after the connect timeout),
    not kept waiting for a slot the first one still holds (503 after the pool timeout)."""
    with socket.socket() as hole, socket.socket() as filler:
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        filler.connect(hole.getsockname())
        g = start_gateway(
            BACKEND_BASE_URL=f"http://127.0.0.1:{hole.getsockname()[1]}/v1",
            GATEWAY_POOL_SIZE="1",
            GATEWAY_CONNECT_TIMEOUT="1.5",
            GATEWAY_POOL_TIMEOUT="0.3",
            GATEWAY_METRICS="false",
        ).start()
        for _ in range(3):
            s = connect(g.port, request_bytes("POST", "/v1/chat/completions", chat(False, 2), close=False))
            time.sleep(0.3)
            s.abort()
        time.sleep(0.1)
        r = exchange(g.port, request_bytes("POST", "/v1/chat/completions", chat(False, 2)), timeout=10)
        assert r.status == 504 and openai_error(r.body)["code"] == "backend_timeout", r


def test_many_aborts_in_a_row_leak_nothing(start_gateway: StartGateway, sim: SimServer) -> None:
    n, pool = 60, 4
    g = start_gateway(BACKEND_BASE_URL=sim.base_url, GATEWAY_POOL_SIZE=str(pool), GATEWAY_POOL_TIMEOUT="2").start()
    aborted = sim.stats.aborted_requests_total
    rng = random.Random(9)
    markers = [b'"role"', b'" quick"', b'" fox"', b'" over"', b'" lazy"']
    slow = {"x-sim-itl-ms": "20"}

    async def one(i: int) -> Result:
        raw = request_bytes("POST", "/v1/chat/completions", chat(True, 60), slow)
        return await fetch(g.port, raw, abort_after=rng.choice(markers), timeout=10)

    async def all_aborts() -> list[Result]:
        out: list[Result] = []
        for start in range(0, n, pool):
            out += await asyncio.gather(*(one(i) for i in range(start, start + pool)))
        return out

    results = asyncio.run(all_aborts())
    assert all(r.error == "aborted" for r in results), [r.error for r in results if r.error != "aborted"]
    assert wait_until(lambda: sim.stats.aborted_requests_total - aborted == n, 2.0), sim.stats

    async def full_pool() -> list[Result]:
        raw = request_bytes("POST", "/v1/chat/completions", chat(True, 6))
        return list(await asyncio.gather(*(fetch(g.port, raw, timeout=10) for _ in range(pool))))

    ok = asyncio.run(full_pool())
    assert all((r.status, r.error, check_stream(r.body, 6)) == (200, None, None) for r in ok)
    assert max(r.t_end for r in ok) < 1.5  # none waited for a leaked slot
    print(f"\nRELIABILITY aborts: {n} streams reset by their clients, as many backend aborts, pool of {pool} intact")


# -- slow readers -----------------------------------------------------------------------------------


def test_slow_readers_bounded_memory_and_backpressure(start_gateway: StartGateway) -> None:
    """Clients that stop reading: the backend is held back (its writes block) instead of the
    gateway buffering the stream; the worker's memory stays small; the backend sees them leave."""
    clients, wanted = 4, 2_000_000
    with servers.sim(ttft_ms=0.0, itl_ms=0.0, itl_jitter_ms=0.0, prefill_us_per_token=0.0) as fast:
        g = start_gateway(BACKEND_BASE_URL=fast.base_url, GATEWAY_METRICS="false", GATEWAY_ACCESS_LOG="false").start()
        assert g.proc is not None
        meter = Meter(g.proc.pid)
        rss0 = meter.rss()
        raw = request_bytes("POST", "/v1/chat/completions", chat(True, wanted), close=False)
        socks = [connect(g.port, raw, rcvbuf=4096) for _ in range(clients)]
        try:
            for s in socks:
                s.read_until(b"data: ")  # the streams have started, then nobody reads
            previous, steady_since = -1, time.monotonic()
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                time.sleep(0.25)
                meter.rss()
                tokens = fast.stats.generated_tokens_total
                if tokens != previous:
                    previous, steady_since = tokens, time.monotonic()
                elif time.monotonic() - steady_since > 1.0:
                    break
            held_back = fast.stats.generated_tokens_total
            assert time.monotonic() < deadline, "the backend never stopped: nothing pushed back"
            assert held_back < clients * wanted // 4  # only what socket buffers hold, a few MiB each
            growth = meter.peak_rss - rss0
            aborted = fast.stats.aborted_requests_total
        finally:
            for s in socks:
                s.abort()
        assert wait_until(lambda: fast.stats.aborted_requests_total - aborted == clients, 2.0)
    print(
        f"\nRELIABILITY slow readers: {clients} stalled streams; the backend stopped after {held_back} tokens "
        f"(~{held_back * 200 // clients >> 20} MiB each, in socket buffers) of {clients * wanted} asked; "
        f"worker RSS +{growth / 2**20:.1f} MiB"
    )
    assert growth < clients * 4 * 1024 * 1024


# -- slow senders -----------------------------------------------------------------------------------


@pytest.fixture
def granian_direct(backend: FakeBackend, tmp_path: Path) -> Iterator[int]:
    """The app under Granian started by hand with a 1 s header read timeout (the README's way to
    run Granian with your own flags): shows what Granian itself enforces."""
    env = {"BACKEND_BASE_URL": backend.url, "GATEWAY_METRICS": "false", "GATEWAY_ACCESS_LOG": "false"}
    with Gateway(tmp_path, granian=["--http1-header-read-timeout", "1000"], **env) as g:
        yield g.port


def test_granian_cuts_slow_headers_but_not_slow_bodies(granian_direct: int, backend: FakeBackend) -> None:
    port = granian_direct
    with contextlib.ExitStack() as stack:
        # Headers trickled one line every 0.2 s: closed at the header read timeout, with no answer.
        trickle = stack.enter_context(Connection(port))
        t0 = time.monotonic()
        trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        closed = False
        for i in range(20):
            try:
                trickle.sendall(b"x-slow-%d: y\r\n" % i)
            except OSError:
                closed = True
                break
            time.sleep(0.2)
        if not closed:
            closed, got = trickle.closed_by_peer(1.0)
            assert got == b""
        assert closed and 0.9 < time.monotonic() - t0 < 2.5
        # A connection that never sends a byte: the same timeout.
        idle = stack.enter_context(Connection(port))
        closed, got = idle.closed_by_peer(2.0)
        assert closed and got == b""
        # A body that never completes: Granian keeps waiting (the gateway must cut it: see below).
        body = stack.enter_context(
            connect(port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        )
        closed, got = body.closed_by_peer(2.0)
        assert not closed and got == b""
    assert backend.requests == []


@pytest.mark.parametrize("how", ["stalled", "trickled"])
def test_slow_body_gets_408(start_gateway: StartGateway, backend: FakeBackend, how: str) -> None:
    """Granian waits for a body forever, so the gateway times it (GATEWAY_CLIENT_BODY_TIMEOUT).
    (Found by this campaign: a body trickled or stalled after the head held its connection and up
    to GATEWAY_MAX_BODY_BYTES of memory forever.)"""
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_CLIENT_BODY_TIMEOUT="1").start()
    body = chat(False, 2)
    with Connection(g.port) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % len(body) + body[:5])
        sent = 5
        with contextlib.suppress(OSError):
            while time.monotonic() - t0 < 3 and not s.answered(0.1):
                if how == "trickled" and sent < len(body) - 1:  # a byte every 0.1 s, never the last
                    s.sendall(body[sent : sent + 1])
                    sent += 1
        answered = time.monotonic() - t0
        closed, got = s.closed_by_peer(2.0)
    assert got.startswith(b"HTTP/1.1 408 "), got[:100]
    assert openai_error(got.split(b"\r\n\r\n", 1)[1])["code"] == "request_timeout"
    assert closed and 0.9 < answered < 2.5
    assert backend.requests == []


def test_header_timeout_is_configurable(start_gateway: StartGateway, backend: FakeBackend) -> None:
    """Granian's header read timeout, set through ``gateway serve`` (GATEWAY_CLIENT_HEADER_TIMEOUT):
    a trickled head is cut without an answer. (It was fixed at Granian's 30 s before this campaign.)"""
    g = start_gateway(BACKEND_BASE_URL=backend.url, GATEWAY_CLIENT_HEADER_TIMEOUT="1").start()
    with connect(g.port, b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n") as s:
        closed, got = s.closed_by_peer(2.5)
    assert closed and got == b""
