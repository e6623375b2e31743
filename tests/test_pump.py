"""The body relayed from the socket's callbacks (``gateway.pump``, ``Connection.pumped``), on real
loopback sockets.

The oracle is ``Connection.iter_body`` on the same kind of connection: for every response
(whole, split into reads anywhere, with trailers, cut short, broken), the pump must hand ``send``
the same bytes, end with the same exception, and leave the connection reusable in the same cases.
Then what only the pump does: it drives ``send``'s awaitable itself, so a ``send`` that is not done
at once (Granian's when the client is slow, or a coroutine) must stop the upstream reads until it
is and keep the pieces in order; its read deadlines must fire as ``netio.Stream``'s do, and never
while the client is the one being waited for; a cancelled relay must let go of everything.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpcore
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import h1, pump
from gateway.connection import Connection
from gateway.h1 import ChunkedBody
from gateway.netio import AsyncioBackend, Stream
from gateway.types import Send
from tests import rawhttp
from tests.asgi import Message
from tests.servers import free_port

ORIGIN = httpcore.Origin(b"http", b"127.0.0.1", 8000)
REQUEST = [(b"host", b"backend:8000"), (b"content-type", b"application/json"), (b"content-length", b"2")]
CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
EVENTS = [b'data: {"i":%d,"text":"%s"}\n\n' % (i, b"x" * (i * 7 % 50)) for i in range(12)]


def frames(events: list[bytes]) -> list[bytes]:
    """Each event in a chunk of its own, one read each."""
    return [b"%x\r\n%s\r\n" % (len(e), e) for e in events]


def stamp(piece: bytes) -> float:
    """The relay's bookkeeping reduced to what the pump needs of it: the piece's time."""
    return time.perf_counter()


def chunked(events: list[bytes], end: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(frames(events)) + end


@dataclass
class Upstream:
    """A loopback backend: answers the first request with ``parts``, written ``gap`` seconds
    apart (each its own read, as a backend flushing each token), then closes if ``close``."""

    parts: list[bytes]
    gap: float = 0.002
    close: bool = False
    #: Reset the connection (RST) instead of closing it.
    abort: bool = False
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        for i, part in enumerate(self.parts):
            if i:
                await asyncio.sleep(self.gap)
            writer.write(part)
            await writer.drain()
        if self.abort:
            rawhttp.abort(writer)
        elif self.close:
            writer.close()


@dataclass
class Relayed:
    pieces: list[bytes] = field(default_factory=list)
    final: bool = False  # the last piece went out as the final body message
    error: type[BaseException] | None = None
    message: str = ""
    reusable: bool = False
    chunks: int = 0

    @property
    def body(self) -> bytes:
        return b"".join(self.pieces)


def run(upstream: Upstream, relay: Callable[[Connection, Stream], Awaitable[Relayed]]) -> Relayed:
    async def main() -> Relayed:
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert isinstance(stream, Stream)
        conn = Connection(origin=ORIGIN, stream=stream, keepalive_expiry=60.0)
        try:
            return await relay(conn, stream)
        finally:
            await conn.aclose()
            for writer in upstream.writers:
                writer.close()
            server.close()
            await server.wait_closed()
            await asyncio.sleep(0)

    return uvloop.run(main())


def recorder(out: Relayed) -> Send:
    async def send(message: Message) -> None:
        out.pieces.append(message["body"])
        out.final = not message.get("more_body", False)

    return send  # type: ignore[return-value]


async def by_pump(conn: Connection, stream: Stream, timeouts: tuple[float, float] = (5.0, 5.0)) -> Relayed:
    out = Relayed()
    await conn.exchange(b"POST", b"/v1/chat/completions", REQUEST, b"{}", 5.0)
    pumped = conn.pumped(recorder(out), stamp, *timeouts)
    assert pumped is not None, "a direct-path body on a netio stream is pumped"
    try:
        out.final = await pumped
    except Exception as exc:  # noqa: BLE001 - recorded for the comparison
        out.error, out.message = type(exc), str(exc)
    await conn.close_response()
    out.reusable, out.chunks = conn.reusable, conn.body_chunks
    return out


async def by_iteration(conn: Connection, stream: Stream) -> Relayed:
    out = Relayed()
    await conn.exchange(b"POST", b"/v1/chat/completions", REQUEST, b"{}", 5.0)
    try:
        async for piece in conn.iter_body(5.0, 5.0):
            out.pieces.append(piece)
            out.final = conn.body_complete
    except Exception as exc:  # noqa: BLE001
        out.error, out.message = type(exc), str(exc)
    await conn.close_response()
    out.reusable, out.chunks = conn.reusable, conn.body_chunks
    return out


def same_outcome(parts: list[bytes], close: bool = False, gap: float = 0.002) -> tuple[Relayed, Relayed]:
    pumped = run(Upstream(parts, gap, close), by_pump)
    iterated = run(Upstream(parts, gap, close), by_iteration)
    assert pumped.body == iterated.body
    assert (pumped.error, pumped.message) == (iterated.error, iterated.message)
    assert pumped.reusable == iterated.reusable
    assert pumped.chunks == iterated.chunks
    return pumped, iterated


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


# -- the oracle: the same outcome as iter_body -----------------------------------------------------


def test_a_stream_one_event_a_read_ends_with_a_final_piece() -> None:
    body = chunked(EVENTS)
    # 20 ms apart, so that the terminating chunk is a read of its own even on a loaded machine.
    pumped, _ = same_outcome([CHUNKED_HEAD, *frames(EVENTS), b"0\r\n\r\n"], gap=0.02)
    assert pumped.body == b"".join(EVENTS) and len(body) > len(pumped.body)
    assert pumped.error is None and pumped.reusable and pumped.chunks == len(EVENTS)
    # The terminating chunk came in a read of its own: the last piece was a plain one, and the
    # relay sends the empty final message itself.
    assert not pumped.final


def test_the_last_event_with_the_end_goes_out_as_the_final_message() -> None:
    pumped, _ = same_outcome([CHUNKED_HEAD, chunked(EVENTS[:3], b""), chunked(EVENTS[3:])])
    assert pumped.final and pumped.pieces[-1].endswith(EVENTS[-1]) and pumped.reusable


@settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8), end=st.sampled_from(["done", "cut"]))
def test_any_split_of_a_chunked_body_relays_like_iter_body(cuts: list[int], end: str) -> None:
    body = chunked(EVENTS) if end == "done" else chunked(EVENTS, b"")[:-7]
    same_outcome([CHUNKED_HEAD, *splits(body, cuts)], close=end == "cut")


@pytest.mark.parametrize(
    "name, tail",
    [
        ("trailers", b"0\r\nx-usage: 12\r\n\r\n"),
        ("broken size line", b"zz\r\nnope\r\n"),
        ("bad chunk end", b"5\r\nhelloXX"),
    ],
)
def test_trailers_and_broken_framing_end_like_iter_body(name: str, tail: bytes) -> None:
    pumped, _ = same_outcome([CHUNKED_HEAD, chunked(EVENTS[:2], b""), tail], close=True)
    assert pumped.body.startswith(EVENTS[0] + EVENTS[1])
    if name == "trailers":
        assert pumped.error is None
    else:
        assert pumped.error is httpcore.RemoteProtocolError and not pumped.reusable


def test_a_sized_body_in_several_reads() -> None:
    body = b'{"text":"' + b"y" * 3000 + b'"}'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
    pumped, _ = same_outcome([head, body[:1000], body[1000:2500], body[2500:]])
    assert pumped.body == body and pumped.final and pumped.reusable


def test_a_sized_body_cut_short() -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    pumped, _ = same_outcome([head, b"x" * 30], close=True)
    assert pumped.error is httpcore.RemoteProtocolError and pumped.body == b"x" * 30


def test_a_backend_that_closed_before_the_pump_began() -> None:
    """Head, some data and the close all arrived before the relay took the body."""

    async def relay(conn: Connection, stream: Stream) -> Relayed:
        await conn.exchange(b"POST", b"/v1/chat/completions", REQUEST, b"{}", 5.0)

        async def closed() -> None:  # the rest and the EOF arrive before the pump begins
            while not stream._proto._eof:
                await asyncio.sleep(0.005)

        await asyncio.wait_for(closed(), 10)
        assert stream._proto._eof
        out = Relayed()
        pumped = conn.pumped(recorder(out), stamp, 5.0, 5.0)
        assert pumped is not None
        with pytest.raises(httpcore.RemoteProtocolError):
            await asyncio.wait_for(pumped, 2.0)
        return out

    out = run(Upstream([CHUNKED_HEAD, chunked(EVENTS[:2], b"")], gap=0.0, close=True), relay)
    assert out.body == EVENTS[0] + EVENTS[1]


def test_only_a_netio_stream_on_the_direct_path_is_pumped() -> None:
    async def relay(conn: Connection, stream: Stream) -> Relayed:
        conn._direct = False  # as after h11 read the head
        assert conn.pumped(recorder(Relayed()), stamp, 1.0, 1.0) is None
        conn._direct, conn._length = True, h1.CHUNKED  # a direct-path body on another network's stream
        conn._network_stream = rawhttp  # type: ignore[assignment]  # anything but a netio stream
        assert conn.pumped(recorder(Relayed()), stamp, 1.0, 1.0) is None
        conn._network_stream = stream
        return Relayed()

    run(Upstream([]), relay)


# -- driving send's awaitable ------------------------------------------------------------------------


class Later:
    """A future-like awaitable as Granian's ``send`` returns when its body channel is full:
    pending until ``finish``, with ``add_done_callback`` and ``cancel``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._fut: asyncio.Future[None] = loop.create_future()
        self._asyncio_future_blocking = False

    def __await__(self) -> Iterator[Any]:
        return self._fut.__await__()

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        self._fut.add_done_callback(lambda _: fn(self._fut))

    def cancel(self) -> bool:
        return self._fut.cancel()

    def finish(self) -> None:
        if not self._fut.done():
            self._fut.set_result(None)


def slow_client(kind: str, delay: float, out: Relayed, paused: list[bool], stream: Stream) -> Send:
    """A ``send`` whose every piece takes ``delay`` s to be taken, recording whether the upstream
    socket was being read while it waited."""
    loop = asyncio.get_running_loop()
    transport = stream._proto.transport
    assert transport is not None

    def note(message: Message) -> None:
        out.pieces.append(message["body"])
        out.final = not message.get("more_body", False)

    if kind == "future":

        def send(message: Message) -> Any:
            note(message)
            later = Later(loop)
            loop.call_later(delay, later.finish)
            if message["more_body"]:  # after the last piece nothing is read any more anyway
                loop.call_later(delay / 2, lambda: paused.append(not transport.is_reading()))
            return later

        return send  # type: ignore[return-value]

    async def coroutine_send(message: Message) -> None:
        note(message)
        if kind == "bare yield":  # asyncio.sleep(0) yields None to the task: the driver goes on next round
            for _ in range(3):
                await asyncio.sleep(0)
        await asyncio.sleep(delay / 2)
        if message["more_body"]:
            paused.append(not transport.is_reading())
        await asyncio.sleep(delay / 2)

    return coroutine_send  # type: ignore[return-value]


@pytest.mark.parametrize("kind", ["future", "coroutine", "bare yield"])
def test_a_slow_client_stops_the_upstream_reads_and_keeps_the_order(kind: str) -> None:
    """Each piece waits 20 ms for the client, longer than the 10 ms idle timeout: no timeout (the
    client is the one waited for), the upstream socket is not read meanwhile, nothing is lost."""

    async def relay(conn: Connection, stream: Stream) -> Relayed:
        out, paused = Relayed(), list[bool]()
        await conn.exchange(b"POST", b"/v1/chat/completions", REQUEST, b"{}", 5.0)
        pumped = conn.pumped(slow_client(kind, 0.02, out, paused, stream), stamp, 0.01, 0.01)
        assert pumped is not None
        out.final = await pumped
        await conn.close_response()
        out.reusable = conn.reusable
        assert paused and all(paused), paused
        return out

    out = run(Upstream([CHUNKED_HEAD, *frames(EVENTS), b"0\r\n\r\n"], gap=0.001), relay)
    assert out.body == b"".join(EVENTS), [p[:12] for p in out.pieces]
    assert out.reusable and len(out.pieces) >= 2  # what came while paused is read at once afterwards


def test_a_send_that_fails_ends_the_body_and_closes_the_connection() -> None:
    async def relay(conn: Connection, stream: Stream) -> Relayed:
        await conn.exchange(b"POST", b"/v1/chat/completions", REQUEST, b"{}", 5.0)

        async def send(message: Message) -> None:
            raise RuntimeError("transport closed")

        pumped = conn.pumped(send, stamp, 1.0, 1.0)  # type: ignore[arg-type]
        assert pumped is not None
        with pytest.raises(RuntimeError, match="transport closed"):
            await pumped
        await conn.close_response()
        assert not conn.reusable and conn.is_closed()
        return Relayed()

    run(Upstream([CHUNKED_HEAD, chunked(EVENTS)]), relay)


def test_a_send_that_fails_after_waiting_ends_the_body() -> None:
    async def relay(conn: Connection, stream: Stream) -> Relayed:
        await conn.exchange(b"POST", b"/v1/chat/completions", REQUEST, b"{}", 5.0)

        async def send(message: Message) -> None:
            await asyncio.sleep(0.01)
            raise RuntimeError("client gone mid-write")

        pumped = conn.pumped(send, stamp, 1.0, 1.0)  # type: ignore[arg-type]
        assert pumped is not None
        with pytest.raises(RuntimeError, match="client gone mid-write"):
            await pumped
        assert stream._proto.sink is None
        return Relayed()

    run(Upstream([CHUNKED_HEAD, chunked(EVENTS[:1], b"")]), relay)


def test_a_reset_mid_body_is_a_read_error_after_the_data_before_it() -> None:
    out = run(Upstream([CHUNKED_HEAD, chunked(EVENTS[:2], b"")], abort=True), by_pump)
    assert out.error is httpcore.ReadError and out.body == EVENTS[0] + EVENTS[1] and not out.reusable
    assert run(Upstream([CHUNKED_HEAD, chunked(EVENTS[:2], b"")], abort=True), by_iteration).error is out.error


def test_a_failing_handle_ends_the_body() -> None:
    async def relay(conn: Connection, stream: Stream) -> Relayed:
        await conn.exchange(b"POST", b"/v1/chat/completions", REQUEST, b"{}", 5.0)

        def handle(piece: bytes) -> float:
            raise ValueError("bookkeeping bug")

        pumped = conn.pumped(recorder(Relayed()), handle, 1.0, 1.0)
        assert pumped is not None
        with pytest.raises(ValueError, match="bookkeeping bug"):
            await pumped
        return Relayed()

    run(Upstream([CHUNKED_HEAD, chunked(EVENTS[:1], b"")]), relay)


def test_a_cancelled_relay_lets_go_of_a_pending_send() -> None:
    """The disconnect watcher cancels the request while its send waits: the pending awaitable is
    cancelled, the upstream socket stops going to the pump, the connection is closed."""

    async def relay(conn: Connection, stream: Stream) -> Relayed:
        loop = asyncio.get_running_loop()
        pending: list[Later] = []

        def send(message: Message) -> Any:
            later = Later(loop)
            pending.append(later)
            return later

        await conn.exchange(b"POST", b"/v1/chat/completions", REQUEST, b"{}", 5.0)
        pumped = conn.pumped(send, stamp, 1.0, 1.0)  # type: ignore[arg-type]
        assert pumped is not None
        task = asyncio.ensure_future(pumped)

        async def first_send() -> None:
            while not pending:
                await asyncio.sleep(0.001)

        await asyncio.wait_for(first_send(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert pending[0]._fut.cancelled()
        assert stream._proto.sink is None and len(pending) == 1
        await conn.close_response()
        assert conn.is_closed()
        return Relayed()

    run(Upstream([CHUNKED_HEAD, *frames(EVENTS)], gap=0.001), relay)


# -- read deadlines ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parts, message",
    [
        ([CHUNKED_HEAD], "no data within 0.05 s"),  # nothing after the head: the first-token timeout
        ([CHUNKED_HEAD, chunked(EVENTS[:1], b"")], "no data within 0.03 s"),  # then idle
    ],
)
def test_a_stalled_backend_times_out_at_the_reads_deadline(parts: list[bytes], message: str) -> None:
    async def relay(conn: Connection, stream: Stream) -> Relayed:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        out = await by_pump(conn, stream, (0.05, 0.03))
        out.message = f"{out.message} after {loop.time() - t0:.3f}"
        return out

    out = run(Upstream(parts, gap=0.0), relay)
    assert out.error is httpcore.ReadTimeout and out.message.startswith(message)
    waited = float(out.message.rsplit(" ", 1)[1])
    assert 0.025 <= waited < 1.0 and not out.reusable


def test_reads_that_keep_coming_never_time_out() -> None:
    """Pieces 50 ms apart for 750 ms with a 150 ms idle timeout: the deadline moves with each read
    (a stall of the loop shorter than 100 ms does not make a read late)."""
    parts = [CHUNKED_HEAD, *frames(EVENTS + EVENTS[:3]), b"0\r\n\r\n"]
    out = run(Upstream(parts, gap=0.05), lambda c, s: by_pump(c, s, (0.15, 0.15)))
    assert out.error is None and out.reusable


# -- Granian's send -----------------------------------------------------------------------------------

_PROBE_APP = """
from gateway import pump

async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
    sent = send({"type": "http.response.body", "body": b"data: 1\\n\\n", "more_body": True})
    kind = type(sent)
    verdict = kind is pump._DONE_TYPE or pump._at_once(kind)
    await sent
    await send({"type": "http.response.body", "body": b"%s.%s %s" % (
        kind.__module__.encode(), kind.__qualname__.encode(), str(verdict).encode()), "more_body": False})
"""


def test_granians_done_answer_is_known_and_nothing_else_is(tmp_path: Path) -> None:
    """The pump skips driving ``send``'s answer only for Granian's always-done awaitable: served by
    the Granian the gateway runs on, a body piece's answer is that type and is recognised (if a
    later Granian renamed it, every piece would be driven: correct, slower, and this test says so)."""
    (tmp_path / "probe_app.py").write_text(_PROBE_APP)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{Path(__file__).resolve().parent.parent}"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "asgi",
            "--loop",  # as gateway.server.run_granian runs it
            "uvloop",
            "--http",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "probe_app:app",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        answer = b""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not answer:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                    while chunk := sock.recv(65536):
                        answer += chunk
            except OSError:
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(10)
    assert b"granian._granian.PyEmptyAwaitable True" in answer, answer
    # Anything else is driven, whatever it claims to be.
    assert not pump._at_once(type("PyEmptyAwaitable", (), {"__module__": "elsewhere"}))
    assert not pump._at_once(Later)


class _Transport:
    """A transport that only says whether it is being read."""

    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False


class _Proto:
    def __init__(self) -> None:
        self.sink: Any = None
        self.transport = _Transport()
        self._eof = False
        self._exc: BaseException | None = None


def test_the_end_of_the_connection_waits_for_the_piece_the_client_holds() -> None:
    """The backend's connection ends while the client is still taking a piece: that piece is not
    dropped (its send is not cancelled); the body fails once the client has it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        proto, pending, sent = _Proto(), Later(loop), list[Message]()

        def send(message: Message) -> Any:
            sent.append(message)
            return pending

        body = pump.Pump(proto, ChunkedBody(1 << 16), send, stamp, loop, 1.0, 1.0)  # type: ignore[arg-type]
        done = body.run(b"")
        body.data(b"5\r\nhello\r\n")
        assert not proto.transport.reading  # the client's turn
        body.ended(None)  # the backend closed meanwhile
        body.ended(OSError("and the socket went"))
        await asyncio.sleep(0.01)
        assert not done.done() and not pending._fut.cancelled()
        pending.finish()
        with pytest.raises(httpcore.RemoteProtocolError):
            await asyncio.wait_for(done, 1.0)
        assert [m["body"] for m in sent] == [b"hello"] and proto.sink is None

    uvloop.run(main())
