"""``Connection.exchange``'s direct path, checked against h11's own path on the same connection.

For the requests and responses that need nothing of h11's state machine, ``exchange`` writes the
request and reads the response head itself (``h1.plain_request``, ``h1.parse_head``), and the body
readers frame the body without h11; anything else is handed to h11 with the request replayed
into its state. The oracle is the same ``Connection`` with the direct path switched off
(``connection.DIRECT``): for every request and every response (valid, unusual or broken, split into
reads at arbitrary points) both must write the same bytes, report the same status and fields,
yield the same body bytes by the same read, fail on the same inputs with the same exception, and
leave the connection reusable in exactly the same cases.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

import httpcore
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import connection
from gateway.connection import Connection
from gateway.h1 import parse_head as _direct_head
from gateway.h1 import plain_request as _direct_request

ORIGIN = httpcore.Origin(b"http", b"127.0.0.1", 8000)
CHECK = settings(
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=os.environ.get("FUZZ_EXPLORE") != "1",
)
BODY = b'{"model":"m","stream":true}'
REQUEST = [(b"host", b"backend:8000"), (b"content-type", b"application/json"), (b"content-length", b"27")]


@dataclass
class Backend(httpcore.AsyncNetworkStream):
    """Answers with ``parts``, one read each, then EOF; keeps what was written."""

    parts: list[bytes]
    done: int = 0
    writes: list[bytes] = field(default_factory=list)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109
        if self.done >= len(self.parts):
            return b""
        self.done += 1
        return self.parts[self.done - 1]

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        self.writes.append(bytes(buffer))

    async def aclose(self) -> None:
        return None


@dataclass
class Outcome:
    writes: bytes
    status: int | None
    fields: list[tuple[bytes, bytes]] | None
    pieces: dict[int, bytes]  # the bytes yielded before each further read
    error: type[BaseException] | None
    reusable: bool
    chunks: int
    direct: bool  # whether the direct path read this response (h11 never saw it)
    complete: list[bool]  # conn.body_complete after each piece


async def _run(
    parts: list[bytes], method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes
) -> Outcome:
    stream = Backend(parts)
    conn = Connection(origin=ORIGIN, stream=stream, keepalive_expiry=60.0)
    status = fields = None
    pieces: dict[int, bytes] = {}
    error: type[BaseException] | None = None
    direct = False
    complete: list[bool] = []
    try:
        status, fields = await conn.exchange(method, target, headers, body, None)
        direct = conn._direct
        # As the relay reads it: the whole body when it came with the head, else piece by piece.
        whole = conn.body_in_hand()
        if whole is not None:
            pieces[stream.done] = whole
            complete.append(True)
        else:
            async for piece in conn.iter_body(None, None):
                assert type(piece) is bytes and piece
                pieces[stream.done] = pieces.get(stream.done, b"") + piece
                complete.append(conn.body_complete)
        await conn.close_response()
    except (httpcore.RemoteProtocolError, httpcore.LocalProtocolError) as exc:
        error = type(exc)
        await conn.close_response()
    reusable = conn.is_idle() and not conn._h11_state.trailing_data[0]
    return Outcome(
        b"".join(stream.writes),
        status,
        [(bytes(n), bytes(v)) for n, v in fields] if fields is not None else None,
        pieces,
        error,
        reusable,
        conn.body_chunks,
        direct,
        complete,
    )


def compare(
    parts: list[bytes],
    monkeypatch: pytest.MonkeyPatch,
    method: bytes = b"POST",
    target: bytes = b"/v1/chat/completions",
    headers: list[tuple[bytes, bytes]] = REQUEST,
    body: bytes = BODY,
) -> Outcome:
    ours = asyncio.run(_run(parts, method, target, headers, body))
    with monkeypatch.context() as m:
        m.setattr(connection, "DIRECT", False)
        h11s = asyncio.run(_run(parts, method, target, headers, body))
    assert not h11s.direct
    fields = ("writes", "status", "fields", "pieces", "error", "reusable", "chunks")
    assert [getattr(ours, f) for f in fields] == [getattr(h11s, f) for f in fields], (parts, ours, h11s)
    # The relay ends the response with a piece said to be the last: only ever the last one.
    assert True not in ours.complete[:-1] and True not in h11s.complete, (parts, ours.complete)
    if ours.complete[-1:] == [True]:
        assert ours.direct and ours.error is None
    return ours


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False) if b > a]


# -- responses -------------------------------------------------------------------------------

STATUS = st.sampled_from(
    [
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 200",
        b"HTTP/1.1 200 ",
        b"HTTP/1.1 404 Not Found",
        b"HTTP/1.1 500 Internal\tError",
        b"HTTP/1.1 429 Too Many Requests",
        b"HTTP/1.0 200 OK",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK",
        b"HTTP/1.1 103 Early Hints\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK",
        b"HTTP/1.1 2000 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 200 O\x00K",
        b"HTTP/1.1 200 \xe9t\xe9",
        b"\r\nHTTP/1.1 200 OK",
    ]
)
PLAIN = st.sampled_from(
    [
        (b"content-type", b"application/json"),
        (b"Content-Type", b"text/event-stream; charset=utf-8"),
        (b"x-thing", b"a b"),
        (b"X-Empty", b""),
        (b"date", b"Mon, 06 Jan 2025 12:00:00 GMT"),
        (b"server", b"uvicorn"),
        (b"x-ows", b"\t v \t"),
    ]
)
ODD_LINES = st.sampled_from(
    [
        b"connection: close",
        b"Connection: keep-alive",
        b"connection: upgrade, CLOSE",
        b"transfer-encoding: gzip",
        b"transfer-encoding: chunked, chunked",
        b"content-length: 5, 5",
        b"content-length: +5",
        b"content-length: 99999999999999999999999",
        b"bad line",
        b"x : y",
        b" folded continuation",
        b"x-nul: a\x00b",
        b"x-bare-cr: a\rb",
        b"x-high: \xff\xfe",
        b"x-vt: a\x0bb",
        b"x-ff:\x0c",
        b"x-ctl\x01: v",
        b"x-tabs: \t a \t\t b \t",
        b":empty-name",
    ]
)


@st.composite
def responses(draw: st.DrawFn) -> bytes:
    status = draw(STATUS)
    lines = [n + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + v for n, v in draw(st.lists(PLAIN, max_size=4))]
    chunked = draw(st.booleans())
    payload = draw(st.binary(max_size=80))
    if chunked:
        te = draw(st.sampled_from([b"transfer-encoding: chunked", b"Transfer-Encoding: Chunked"]))
        lines.insert(draw(st.integers(0, len(lines))), te)
        sizes = draw(st.lists(st.integers(1, 30), max_size=4))
        body, at = [], 0
        for size in sizes:
            piece = payload[at : at + size]
            at += size
            if piece:
                body.append(b"%x%s\r\n%s\r\n" % (len(piece), draw(st.sampled_from([b"", b";x=1"])), piece))
        body.append(b"0\r\n" + draw(st.sampled_from([b"", b"x-usage: 1\r\n", b"bad trailer\r\n"])) + b"\r\n")
        raw_body = b"".join(body)
    else:
        declared = len(payload) + draw(st.sampled_from([0, 0, 0, -1, 1]))
        lines.insert(draw(st.integers(0, len(lines))), b"content-length: %d" % max(0, declared))
        raw_body = payload
    for _ in range(draw(st.integers(0, 2))):
        lines.insert(draw(st.integers(0, len(lines))), draw(ODD_LINES))
    ends = [draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"])) for _ in lines]
    head = status + b"\r\n" + b"".join(line + end for line, end in zip(lines, ends, strict=True)) + b"\r\n"
    after = draw(st.sampled_from([b"", b"", b"HTTP/1.1 200 OK\r\n", b"junk"]))
    return head + raw_body + after


@pytest.mark.slow
@CHECK
@given(raw=responses(), cuts=st.lists(st.integers(0, 10_000), max_size=8), head_whole=st.booleans())
def test_every_response_reads_as_on_h11s_path(
    raw: bytes, cuts: list[int], head_whole: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if head_whole:  # the usual case: the head (and maybe more) in the first read
        end = raw.find(b"\r\n\r\n")
        cuts = [c for c in cuts if c % (len(raw) + 1) >= end + 4] if end >= 0 else cuts
    compare(split(raw, cuts), monkeypatch)


@st.composite
def plain_responses(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """What backends send almost always: HTTP/1.1, a final status with a body, fields on one line
    each, one Content-Length or chunked coding, no Connection: close. Returns (head, rest)."""
    status = draw(st.sampled_from([b"200 OK", b"200", b"201 Created", b"400 Bad Request", b"429 Slow Down", b"503 X"]))
    fields = [n + b":" + draw(st.sampled_from([b" ", b"", b"\t"])) + v for n, v in draw(st.lists(PLAIN, max_size=5))]
    payload = draw(st.binary(max_size=60))
    if draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), draw(st.sampled_from([b"transfer-encoding: chunked"])))
        rest = (b"%x\r\n%s\r\n" % (len(payload), payload) if payload else b"") + b"0\r\n\r\n"
    else:
        fields.insert(draw(st.integers(0, len(fields))), b"Content-Length: %d" % len(payload))
        rest = payload
    if draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), b"Connection: keep-alive")
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n", rest


@pytest.mark.slow
@CHECK
@given(response=plain_responses(), cut=st.integers(0, 10_000))
def test_plain_responses_take_the_direct_path(
    response: tuple[bytes, bytes], cut: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fuzz above mostly draws odd answers that h11 must read; these are the usual ones, and
    # every one of them is read directly (and still exactly as h11 reads it).
    head, rest = response
    at = cut % (len(rest) + 1)
    ours = compare([head + rest[:at], rest[at:]] if rest[at:] else [head + rest], monkeypatch)
    assert ours.direct and ours.error is None and ours.reusable


@pytest.mark.slow
@CHECK
@given(
    method=st.sampled_from([b"POST", b"GET", b"DELETE", b"HEAD", b"CONNECT", b"P\xd3ST", b"", b"GET "]),
    target=st.sampled_from([b"/v1/models", b"/v1/x?y=1&z=%20", b"/v1/\xff", b"/v1/a b", b"", b"*"]),
    extra=st.lists(
        st.sampled_from(
            [
                (b"host", b"other"),
                (b"connection", b"close"),
                (b"expect", b"100-continue"),
                (b"upgrade", b"h2c"),
                (b"x-a", b"1"),
                (b"x-b", b"a\r\nx-c: 2"),
                (b"X-Upper", b"v"),
                (b"content-length", b"3"),
                (b"transfer-encoding", b"chunked"),
            ]
        ),
        max_size=3,
    ),
    body=st.sampled_from([b"", b"abc", BODY]),
    host_at=st.integers(0, 3),
)
def test_every_request_is_written_or_refused_as_by_h11(
    method: bytes,
    target: bytes,
    extra: list[tuple[bytes, bytes]],
    body: bytes,
    host_at: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    headers = list(extra)
    headers.insert(min(host_at, len(headers)), (b"host", b"backend:8000"))  # h11 writes Host first wherever it is
    if body and not any(n == b"content-length" for n, _ in extra):
        headers.append((b"content-length", b"%d" % len(body)))
    answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
    compare([answer], monkeypatch, method=method, target=target, headers=headers, body=body)


# -- what takes which path ----------------------------------------------------------------------

SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
JSON_HEAD = (
    b"HTTP/1.1 200 OK\r\ndate: x\r\nserver: uvicorn\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n"
)


@pytest.mark.parametrize(
    ("parts", "direct"),
    [
        ([JSON_HEAD + b"{}"], True),
        ([JSON_HEAD, b"{", b"}"], True),
        ([SSE_HEAD + b"5\r\nhello\r\n", b"0\r\n\r\n"], True),
        ([SSE_HEAD + b"5\r\nhello\r\n0\r\nx-usage: 1\r\n\r\n"], True),  # trailers: h11 reads them
        ([b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"], True),
        ([JSON_HEAD[:20], JSON_HEAD[20:] + b"{}"], False),  # the head in two reads
        ([b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"], False),
        ([b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive\r\ncontent-length: 2\r\n\r\n{}"], True),
        ([b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 2\r\n\r\n{}"], False),
        ([b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}"], False),
        ([b"HTTP/1.1 100 Continue\r\n\r\n" + JSON_HEAD + b"{}"], False),
        ([b"HTTP/1.1 103 Early Hints\r\ncontent-length: 0\r\n\r\n" + JSON_HEAD + b"{}"], False),
        ([b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n"], False),
        ([b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nuntil close"], False),
        ([b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n{}"], False),
    ],
)
def test_which_path_reads_the_response(parts: list[bytes], direct: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    assert compare(parts, monkeypatch).direct is direct


def test_the_common_exchanges_are_reused_and_framed(monkeypatch: pytest.MonkeyPatch) -> None:
    sized = compare([JSON_HEAD + b"{}"], monkeypatch)
    assert sized.reusable and sized.pieces == {1: b"{}"} and sized.status == 200
    assert sized.fields == [
        (b"date", b"x"),
        (b"server", b"uvicorn"),
        (b"content-length", b"2"),
        (b"content-type", b"application/json"),
    ]
    sse = compare([SSE_HEAD + b"5\r\nhello\r\n", b"3\r\nabc\r\n0\r\n\r\n"], monkeypatch)
    assert sse.reusable and sse.pieces == {1: b"hello", 2: b"abc"} and sse.chunks == 2
    assert (b"transfer-encoding", b"chunked") in (sse.fields or [])
    # Bytes past the end of the response: the connection is not reused.
    assert not compare([JSON_HEAD + b"{}junk"], monkeypatch).reusable
    assert not compare([SSE_HEAD + b"0\r\n\r\nHTTP/1.1"], monkeypatch).reusable
    # Cut short: an error, and closed.
    cut = compare([JSON_HEAD + b"{"], monkeypatch)
    assert cut.error is httpcore.RemoteProtocolError and not cut.reusable


def test_a_reused_connection_alternates_paths_cleanly() -> None:
    # One connection: a direct exchange, one h11 has to read, then a direct one again.
    answers = [
        JSON_HEAD + b"{}",
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\n[]",
        SSE_HEAD + b"2\r\nok\r\n0\r\n\r\n",
    ]

    async def run() -> list[tuple[bool, bytes, bool]]:
        stream = Backend([])
        conn = Connection(origin=ORIGIN, stream=stream, keepalive_expiry=60.0)
        out = []
        for answer in answers:
            stream.parts, stream.done = [answer], 0
            await conn.exchange(b"POST", b"/v1/x", REQUEST, BODY, None)
            direct = conn._direct
            body = b"".join([p async for p in conn.iter_body(None, None)])
            await conn.close_response()
            out.append((direct, body, conn.is_idle()))
        return out

    assert asyncio.run(run()) == [(True, b"{}", True), (False, b"[]", True), (True, b"ok", True)]


def test_direct_request_conditions() -> None:
    host = [(b"host", b"h")]
    assert _direct_request(b"POST", b"/v1/x", [*host, (b"content-length", b"3")], b"abc")
    assert _direct_request(b"GET", b"/v1/models", host, b"")
    assert not _direct_request(b"POST", b"/v1/x", [*host, (b"content-length", b"4")], b"abc")  # h11 refuses
    assert not _direct_request(b"POST", b"/v1/x", host, b"abc")  # no length: h11 refuses
    assert not _direct_request(b"HEAD", b"/v1/x", host, b"")  # no body in the answer: h11 frames it
    assert not _direct_request(b"GET", b"/v1/x", [], b"")  # no Host: h11 refuses
    assert not _direct_request(b"GET", b"/v1/x", [*host, *host], b"")
    assert not _direct_request(b"GET", b"/v1/x", [*host, (b"connection", b"close")], b"")
    assert not _direct_request(b"GET", b"/v1/x y", host, b"")


def test_direct_head_reads_what_h11_reads() -> None:
    head = b"HTTP/1.1 201 Created\r\nA:  b c \r\nTransfer-Encoding: CHUNKED\r\n\r\n"
    assert _direct_head(head, len(head) - 4) == (201, [(b"A", b"b c"), (b"Transfer-Encoding", b"chunked")], -1)
    sized = b"HTTP/1.1 200\r\ncontent-length: 0\r\n\r\n"
    assert _direct_head(sized, len(sized) - 4) == (200, [(b"content-length", b"0")], 0)


def test_bytes_left_from_the_last_answer_are_read_as_h11_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    # The pool never reuses such a connection; used directly, it still reads what h11 would: the
    # bytes left over after a HEAD's answer are the next answer, not the socket's next read.
    async def run() -> list[int]:
        stream = Backend([b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nHTTP/1.1 201 X\r\ncontent-length: 0\r\n\r\n"])
        conn = Connection(origin=ORIGIN, stream=stream, keepalive_expiry=60.0)
        statuses = []
        for method in (b"HEAD", b"GET"):
            status, _ = await conn.exchange(method, b"/v1/models", [(b"host", b"h")], b"", None)
            statuses.append(status)
            assert [p async for p in conn.iter_body(None, None)] == []
            await conn.close_response()
            stream.parts.append(b"HTTP/1.1 202 Y\r\ncontent-length: 0\r\n\r\n")
        return statuses

    ours = asyncio.run(run())
    monkeypatch.setattr(connection, "DIRECT", False)
    assert ours == asyncio.run(run()) == [200, 201]


def test_a_body_read_by_h11_is_never_said_complete_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """``body_complete`` is the direct path's knowledge only: after a direct exchange ended its
    body, an exchange that h11 reads on the same connection never calls a piece the last."""
    whole = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nabcd"
    stream = Backend([whole, b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nab", b"cd"])

    async def go() -> list[list[bool]]:
        conn = Connection(origin=ORIGIN, stream=stream, keepalive_expiry=60.0)
        seen = []
        for direct in (True, False):
            monkeypatch.setattr(connection, "DIRECT", direct)
            await conn.exchange(b"POST", b"/v1/x", REQUEST, BODY, None)
            seen.append([conn.body_complete async for _ in conn.iter_body(None, None)])
            await conn.close_response()
            assert conn.is_idle()
        return seen

    assert asyncio.run(go()) == [[True], [False, False]]
