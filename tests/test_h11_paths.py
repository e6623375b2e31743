"""The gateway's shortcuts past h11 on the hot path, each checked against h11 (or httpcore) itself.

``Connection._dechunk``: the gateway de-chunks response bodies. h11 is the oracle: for every
response (valid or broken chunked framing, split into reads at arbitrary points), the gateway's
path and h11's own (``Connection._h11_body``) must yield the same bytes by the same read (nothing
held back), fail on the same inputs, and leave the h11 state in the same place: the message done,
the same bytes left over after it, so the pool reuses exactly the connections it would have reused.

``request_headers``: the request's header fields checked in one pass. Whatever it accepts, h11
accepts with the same fields; whatever h11 refuses, it leaves to h11.

``Connection.exchange``: writes exactly the bytes httpcore's ``handle_async_request`` writes for
the same request, in one write, and reads the same response head.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import h11
import httpcore
import pytest
from h11._headers import Headers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import connection
from gateway.connection import Connection
from gateway.h1 import fields_valid

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
ORIGIN = httpcore.Origin(b"http", b"127.0.0.1", 8000)
CHECK = settings(
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("FUZZ_EXPLORE") != "1",
)


@dataclass
class Reads(httpcore.AsyncNetworkStream):
    """A backend connection that hands out ``parts`` one read at a time, then EOF."""

    parts: list[bytes]
    done: int = 0  # reads answered so far
    log: list[tuple[int, bytes]] = field(default_factory=list)  # (reads so far, piece yielded)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self.done >= len(self.parts):
            return b""
        part = self.parts[self.done]
        self.done += 1
        return part

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        return None

    async def aclose(self) -> None:
        return None


@dataclass
class Outcome:
    pieces: list[tuple[int, bytes]]
    error: type[BaseException] | None
    their_state: object
    trailing: bytes
    body_chunks: int


async def _read(parts: list[bytes], *, fast: bool) -> Outcome:
    stream = Reads(parts)
    conn = Connection(origin=ORIGIN, stream=stream, keepalive_expiry=None)
    state = conn._h11_state
    state.send(h11.Request(method="POST", target="/v1/chat/completions", headers=[("host", "x")]))
    state.send(h11.EndOfMessage())
    pieces: list[tuple[int, bytes]] = []
    error: type[BaseException] | None = None
    try:
        head = await conn._receive_event(None)
        assert type(head) is h11.Response
        body = conn.iter_body(None, None) if fast else conn._h11_body(None, None)
        async for piece in body:
            assert type(piece) is bytes and piece
            pieces.append((stream.done, piece))
    except httpcore.RemoteProtocolError as exc:
        error = type(exc)
    return Outcome(pieces, error, state.their_state, state.trailing_data[0], conn.body_chunks)


def _by_read(pieces: list[tuple[int, bytes]]) -> dict[int, bytes]:
    """The bytes yielded before each further read: how pieces were grouped may differ, when they
    became available may not."""
    out: dict[int, bytes] = {}
    for n, piece in pieces:
        out[n] = out.get(n, b"") + piece
    return out


def _compare(parts: list[bytes]) -> Outcome:
    ours = asyncio.run(_read(parts, fast=True))
    h11s = asyncio.run(_read(parts, fast=False))
    assert ours.error == h11s.error, (ours, h11s)
    assert _by_read(ours.pieces) == _by_read(h11s.pieces), (ours, h11s)
    if ours.error is None:
        assert (ours.their_state, ours.trailing) == (h11s.their_state, h11s.trailing)
    return ours


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


HEX = st.sampled_from(["x", "X", "0x", "00x"])
CHUNK = st.tuples(
    st.binary(min_size=1, max_size=300),
    HEX,
    st.sampled_from([b"", b";name=value", b";a;b=1", b'; q="x y"']),
    st.sampled_from([b"", b" ", b"\t "]),
)
TRAILERS = st.sampled_from([b"", b"x-usage: 12\r\n", b"a: 1\r\nb: 2\r\n"])


def _chunked(chunks: list[tuple[bytes, str, bytes, bytes]], last: bytes, trailers: bytes, after: bytes) -> bytes:
    out = [HEAD]
    for data, fmt, ext, ows in chunks:
        size = ("0" if fmt == "00x" else "") + format(len(data), "x" if fmt == "x" else "X")
        out.append(size.encode() + ext + ows + b"\r\n" + data + b"\r\n")
    out.append(last + b"\r\n" + trailers + b"\r\n" + after)
    return b"".join(out)


@pytest.mark.slow
@CHECK
@given(
    chunks=st.lists(CHUNK, max_size=8),
    last=st.sampled_from([b"0", b"000", b"0;end", b"0 "]),
    trailers=TRAILERS,
    after=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"junk"]),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_valid_bodies_match_h11(
    chunks: list[tuple[bytes, str, bytes, bytes]], last: bytes, trailers: bytes, after: bytes, cuts: list[int]
) -> None:
    raw = _chunked(chunks, last, trailers, after)
    ours = _compare(_split(raw, cuts))
    assert ours.error is None and ours.their_state is h11.DONE
    assert b"".join(p for _, p in ours.pieces) == b"".join(c[0] for c in chunks)
    assert ours.body_chunks == len(chunks)  # the backend's chunks, however reads grouped them
    assert after.startswith(ours.trailing)  # what came in the same read as the end (the rest is unread)


@pytest.mark.slow
@CHECK
@given(
    chunks=st.lists(CHUNK, min_size=1, max_size=6),
    at=st.integers(0, 10_000),
    edit=st.one_of(
        st.tuples(st.just("replace"), st.binary(min_size=1, max_size=3)),
        st.tuples(st.just("insert"), st.sampled_from([b"\r", b"\n", b"\r\n", b"g", b";", b" ", b"0", b"\x00"])),
        st.tuples(st.just("delete"), st.integers(1, 4).map(lambda n: b"." * n)),
        st.tuples(st.just("truncate"), st.just(b"")),
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_broken_bodies_fail_as_h11_fails(
    chunks: list[tuple[bytes, str, bytes, bytes]], at: int, edit: tuple[str, bytes], cuts: list[int]
) -> None:
    raw = _chunked(chunks, b"0", b"", b"")
    body_at = len(HEAD) + at % (len(raw) - len(HEAD))
    kind, what = edit
    if kind == "replace":
        raw = raw[:body_at] + what + raw[body_at + len(what) :]
    elif kind == "insert":
        raw = raw[:body_at] + what + raw[body_at:]
    elif kind == "delete":
        raw = raw[:body_at] + raw[body_at + len(what) :]
    else:
        raw = raw[:body_at]
    _compare(_split(raw, cuts))


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"5\r\nhello\r\n", "ends before the last chunk"),
        (b"5\r\nhelloXY0\r\n\r\n", "no CRLF after the chunk data"),
        (b"5\r\nhello\r", "ends inside the CRLF after the chunk data"),
        (b"g\r\nhello\r\n0\r\n\r\n", "not a hex size"),
        (b"+5\r\nhello\r\n0\r\n\r\n", "a sign int() would accept"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "a prefix int() would accept"),
        (b"5_0\r\nhello\r\n0\r\n\r\n", "an underscore int() would accept"),
        (b" 5\r\nhello\r\n0\r\n\r\n", "leading blank"),
        (b"1" * 21 + b"\r\n", "more than 20 hex digits"),
        (b"5;a\nb\r\nhello\r\n0\r\n\r\n", "a bare LF inside the size line"),
        (b"5;" + b"x" * 110_000, "a size line longer than the connection's h11 limit (100 KiB)"),
    ],
)
def test_malformed_framing_is_a_protocol_error(body: bytes, why: str) -> None:
    for parts in ([HEAD + body], [HEAD, *(body[i : i + 3] for i in range(0, len(body), 3))]):
        assert _compare(parts).error is httpcore.RemoteProtocolError, why


def test_reads_of_one_whole_chunk_each_are_checked_like_any_other() -> None:
    # A paced stream: every read is one chunk exactly (the dechunker's shortest path).
    ours = _compare([HEAD, b"5\r\nhello\r\n", b"5;x=1 \r\nworld\r\n", b"0\r\n\r\n"])
    assert ours.error is None and [p for _, p in ours.pieces] == [b"hello", b"world"]
    for bad in (b"5\r\nhelloXY", b"5\r\nhello\n\r", b"5\r\nhello\rX"):
        # the same length as a good one, and a good read after it: only the CRLF check finds it
        assert _compare([HEAD, bad, b"5\r\nworld\r\n0\r\n\r\n"]).error is httpcore.RemoteProtocolError, bad


def test_a_long_chunk_extension_within_the_connections_limit_is_read() -> None:
    # httpcore raises h11's bound on an unfinished line to 100 KiB: a 20 KB size line split
    # across reads is fine for h11 on this connection, so it is for _dechunk too.
    line = b"5;" + b"x" * 20_000
    for parts in ([HEAD + line], [HEAD, *(line[i : i + 997] for i in range(0, len(line), 997))]):
        ours = _compare([*parts, b"\r", b"\nhello\r\n0\r\n\r\n"])  # the CRLF split too
        assert ours.error is None and b"".join(p for _, p in ours.pieces) == b"hello"


def test_data_is_yielded_as_it_arrives_and_reads_are_merged() -> None:
    # Half a chunk is yielded at once; two chunks from one read are one piece.
    parts = [HEAD + b"a\r\n01234", b"56789\r\n3\r\nabc\r\n3\r\ndef\r\n", b"0\r\n\r\n"]
    ours = _compare(parts)
    assert ours.pieces == [(1, b"01234"), (2, b"56789abcdef")]
    assert ours.body_chunks == 3
    assert ours.their_state is h11.DONE


SIZED_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"


@pytest.mark.slow
@CHECK
@given(
    body=st.binary(min_size=1, max_size=600),
    after=st.sampled_from([b"", b"HTTP/1.1 200 OK\r\n", b"x"]),
    cut_short=st.integers(0, 3),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
)
def test_sized_bodies_match_h11(body: bytes, after: bytes, cut_short: int, cuts: list[int]) -> None:
    """A Content-Length body: same bytes by the same read, same errors when the backend closes
    early, same state and leftover bytes (``Connection._sized`` against h11)."""
    raw = SIZED_HEAD % len(body) + body + after
    if cut_short:
        raw = raw[: len(raw) - len(after) - min(cut_short, len(body))]
    ours = _compare(_split(raw, cuts))
    if cut_short:
        assert ours.error is httpcore.RemoteProtocolError
    else:
        assert ours.error is None and ours.their_state is h11.DONE
        assert b"".join(p for _, p in ours.pieces) == body
        assert after.startswith(ours.trailing)


@pytest.mark.parametrize(
    ("head", "reader"),
    [(HEAD, "Connection._dechunk"), (SIZED_HEAD % 2 + b"{}", "Connection._sized")],
)
def test_the_installed_h11_takes_the_fast_paths(head: bytes, reader: str) -> None:
    # If a new h11 moved the internals _dechunk and _sized take over from, bodies would silently
    # go back to h11's slower framing: make that a failing test, not a quiet regression.
    assert connection.FAST_CHUNKED

    async def kind() -> str:
        conn = Connection(origin=ORIGIN, stream=Reads([head]), keepalive_expiry=None)
        conn._h11_state.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn._h11_state.send(h11.EndOfMessage())
        await conn._receive_event(None)
        body = conn.iter_body(None, None)
        name = body.__qualname__  # type: ignore[attr-defined]
        await body.aclose()  # type: ignore[attr-defined]
        return str(name)

    assert asyncio.run(kind()) == reader


# -- request_headers -----------------------------------------------------------------------------


def request_headers(headers: list[tuple[bytes, bytes]]) -> Headers | None:
    """``headers`` as h11's header list when ``h1.fields_valid`` passes them (as
    ``Connection.exchange`` builds it), else None (h11 then checks them field by field)."""
    return Headers([(n, n, v) for n, v in headers]) if fields_valid(headers) else None


NAME = st.one_of(
    st.sampled_from([b"content-type", b"x-api-key", b"host", b"user-agent", b"content-length", b"accept"]),
    st.text(alphabet="abcXYZ-_.!~09", min_size=0, max_size=6).map(str.encode),
    st.binary(max_size=6),
)
VALUE = st.one_of(
    st.sampled_from([b"application/json", b"", b"12", b"0", b"00017", b"1" * 21, b"a b", b" a", b"a ", b"a\tb"]),
    st.binary(max_size=12),
    st.text(max_size=8).map(lambda t: t.encode("utf-8")),
)
FIELDS = st.lists(st.tuples(NAME, VALUE), max_size=8)


@pytest.mark.slow
@CHECK
@given(fields=FIELDS)
def test_request_headers_accept_only_what_h11_accepts(fields: list[tuple[bytes, bytes]]) -> None:
    from h11._headers import normalize_and_validate

    fast = request_headers(fields)
    try:
        h11s = normalize_and_validate(fields)
    except h11.LocalProtocolError:
        assert fast is None, fields
        return
    if fast is not None:
        assert fast._full_items == h11s._full_items


def test_request_headers_take_the_common_case() -> None:
    fields = [(b"host", b"backend:8000"), (b"content-type", b"application/json"), (b"content-length", b"42")]
    fast = request_headers(fields)
    assert fast is not None and fast.raw_items() == fields
    # Left to h11: an upper-case name, a second length, a transfer coding, a value with a line break.
    for odd in (b"Content-Type", b"content-length", b"transfer-encoding"):
        assert request_headers([*fields, (odd, b"chunked" if odd == b"transfer-encoding" else b"1")]) is None
    assert request_headers([*fields, (b"x-a", b"1\r\nx-b: 2")]) is None


# -- exchange ------------------------------------------------------------------------------------


@dataclass
class Recorder(httpcore.AsyncNetworkStream):
    """Keeps what is written; answers every read with ``answer`` once."""

    answer: bytes
    writes: list[bytes] = field(default_factory=list)
    answered: bool = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self.answered:
            return b""
        self.answered = True
        return self.answer

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.writes.append(bytes(buffer))

    async def aclose(self) -> None:
        return None


ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nX-Thing: a\r\n\r\n{}"


@pytest.mark.parametrize(
    ("method", "body", "fields"),
    [
        (b"POST", b'{"model":"m"}', [(b"content-type", b"application/json"), (b"content-length", b"13")]),
        (b"GET", b"", [(b"accept", b"*/*")]),
        (b"POST", b"x", [(b"X-Upper", b"v"), (b"content-length", b"1")]),  # h11's own checks
    ],
)
def test_exchange_writes_what_httpcore_writes(method: bytes, body: bytes, fields: list[tuple[bytes, bytes]]) -> None:
    headers = [(b"host", b"backend:8000"), *fields]

    async def ours() -> tuple[list[bytes], int, list[tuple[bytes, bytes]], object]:
        stream = Recorder(ANSWER)
        conn = Connection(origin=ORIGIN, stream=stream, keepalive_expiry=None)
        status, got = await conn.exchange(method, b"/v1/x?y=1", headers, body, 5.0)
        assert b"".join([p async for p in conn.iter_body(5.0, 5.0)]) == b"{}"
        await conn.close_response()
        return stream.writes, status, got, conn.is_idle()

    async def httpcores() -> tuple[list[bytes], int, list[tuple[bytes, bytes]]]:
        stream = Recorder(ANSWER)
        conn = httpcore.AsyncHTTP11Connection(origin=ORIGIN, stream=stream)
        url = httpcore.URL(scheme=b"http", host=b"127.0.0.1", port=8000, target=b"/v1/x?y=1")
        response = await conn.handle_async_request(httpcore.Request(method, url, headers=headers, content=body))
        await response.aread()
        await response.aclose()
        return stream.writes, response.status, response.headers

    writes, status, got, idle = asyncio.run(ours())
    expected_writes, expected_status, expected_headers = asyncio.run(httpcores())
    assert len(writes) == 1  # head and body in one write
    assert writes[0] == b"".join(expected_writes)
    assert (status, got) == (expected_status, expected_headers)
    assert idle  # read to the end: ready for the next request


def test_exchange_reports_a_backend_that_closed_without_answering() -> None:
    # What a keep-alive connection the backend had closed looks like: the relay's resend rule
    # (relay._STALE) depends on this exception.
    async def run() -> tuple[str, bool]:
        conn = Connection(origin=ORIGIN, stream=Recorder(b""), keepalive_expiry=None)
        try:
            await conn.exchange(b"GET", b"/v1/models", [(b"host", b"h")], b"", 5.0)
        except httpcore.RemoteProtocolError as exc:
            return str(exc), conn.is_closed()
        raise AssertionError("no error")

    message, closed = asyncio.run(run())
    assert message == "Server disconnected without sending a response." and closed


def test_exchange_refuses_what_h11_refuses_and_closes() -> None:
    async def run() -> tuple[type[BaseException], bool, list[bytes]]:
        stream = Recorder(ANSWER)
        conn = Connection(origin=ORIGIN, stream=stream, keepalive_expiry=None)
        try:
            await conn.exchange(b"POST", b"/v1/x", [(b"host", b"h"), (b"x-a", b"1\r\nx-b: 2")], b"", 5.0)
        except httpcore.LocalProtocolError as exc:
            return type(exc), conn.is_closed(), stream.writes
        raise AssertionError("a header with a line break was sent")

    kind, closed, writes = asyncio.run(run())
    assert kind is httpcore.LocalProtocolError and closed and writes == []
