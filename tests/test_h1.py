"""``gateway.h1`` alone: the sans-IO engine fed bytes, no connection, no loop.

Its agreement with h11 on every input is checked through the connection in
``tests/test_direct_path.py`` and ``tests/test_h11_paths.py``; here are its states and edges.
"""

from __future__ import annotations

import h11
import pytest
from h11._headers import normalize_and_validate
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import h1
from gateway.h1 import BodyState, ChunkedBody, SizedBody

LIMIT = 100 * 1024


def feed_all(decoder: ChunkedBody | SizedBody, pieces: list[bytes]) -> list[bytes]:
    out = []
    for piece in pieces:
        out.append(decoder.feed(piece))
        if decoder.finished:
            break
    return out


# -- the request ---------------------------------------------------------------------------------


def test_request_bytes_put_host_first_and_keep_the_rest_in_order() -> None:
    headers = [(b"x-a", b"1"), (b"host", b"h:1"), (b"content-length", b"2")]
    assert h1.plain_request(b"POST", b"/v1/x", headers, b"{}")
    assert h1.request_bytes(b"POST", b"/v1/x", headers, b"{}") == (
        b"POST /v1/x HTTP/1.1\r\nhost: h:1\r\nx-a: 1\r\ncontent-length: 2\r\n\r\n{}"
    )


@pytest.mark.parametrize(
    ("headers", "valid"),
    [
        ([(b"host", b"h"), (b"content-type", b"application/json")], True),
        ([(b"host", b"h"), (b"X-Upper", b"v")], False),  # h11 checks it itself
        ([(b"host", b"h"), (b"x-a", b"1\r\nx-b: 2")], False),
        ([(b"host", b"h"), (b"x-a", b" padded")], False),
        ([(b"host", b"h"), (b"transfer-encoding", b"chunked")], False),
        ([(b"host", b"h"), (b"content-length", b"1"), (b"content-length", b"1")], False),
        ([(b"host", b"h"), (b"content-length", b"+1")], False),
        ([(b"host", b"h"), (b"user-agent", b"Mozilla/5.0 (X11; Linux)\tx")], True),  # spaces inside
        ([(b"host", b"h"), (b"x-a", b"")], True),  # an empty value
        ([(b"x-a", b""), (b"host", b"h")], True),
        ([(b"host", b"h"), (b"x-a", b"\x01\x7f\xff")], True),  # h11's [^\x00\s]: control bytes and obs-text
        ([(b"host", b"h"), (b"x-a", b"a\t")], False),  # a tab at the end
        ([(b"host", b"h"), (b"x-a", b"\ta")], False),
        ([(b"x-a", b" "), (b"host", b"h")], False),
        ([(b"host", b"h"), (b"x-a", b"a\x00b")], False),
        ([(b"host", b"h"), (b"x-a", b"a\x0bb")], False),
        ([(b"host", b"h"), (b"", b"v")], False),  # an empty name, last
        ([(b"", b"v"), (b"host", b"h")], False),
        ([(b"", b"v")], False),
        ([], False),
        ([(b"host", b"h"), (b"x a", b"v")], False),
    ],
)
def test_fields_valid(headers: list[tuple[bytes, bytes]], valid: bool) -> None:
    assert h1.fields_valid(headers) is valid
    assert h1.fields_valid(headers) is valid  # again, with the fields found valid looked up


_NAMES = st.sampled_from(
    [b"host", b"x-a", b"content-length", b"x-request-id", b"X-Up", b"", b"x a", b"transfer-encoding"]
)
_VALUES = st.binary(max_size=6).map(lambda v: v.replace(b"\n", b"\t")) | st.sampled_from([b"12", b"+1", b" a", b"a b"])


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=5))
@settings(max_examples=400, deadline=None)
def test_fields_valid_passes_only_what_h11_accepts_also_when_looked_up(headers: list[tuple[bytes, bytes]]) -> None:
    try:
        normalize_and_validate(headers)
        accepted = True
    except h11.LocalProtocolError:
        accepted = False
    valid = h1.fields_valid(headers)
    assert h1.fields_valid(headers) is valid  # looked up the second time: the same answer
    if valid:
        assert accepted
    elif accepted and headers:  # refused though h11 takes it: only what the engine leaves to h11
        names = [n for n, _ in headers]
        assert any(n != n.lower() for n in names) or b"transfer-encoding" in names or names.count(b"content-length") > 1


# -- the response head -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "parsed"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", (200, [(b"content-length", b"12")], 12)),
        (b"HTTP/1.1 404\r\nTransfer-Encoding: Chunked\r\n\r\n", (404, [(b"Transfer-Encoding", b"chunked")], -1)),
        (
            b"HTTP/1.1 200 OK\r\nx:\t v \t\r\ncontent-length: 0\r\n\r\n",
            (200, [(b"x", b"v"), (b"content-length", b"0")], 0),
        ),
        (b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n", None),  # read until close: h11's
        (b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n", None),
        (b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n", None),
        (b"HTTP/1.1 101 Switching\r\ncontent-length: 0\r\n\r\n", None),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\r\nbad line\r\ncontent-length: 0\r\n\r\n", None),
        (b"HTTP/1.1 200 OK\ncontent-length: 0\r\n\r\n", None),
    ],
)
def test_parse_head(head: bytes, parsed: tuple[int, list[tuple[bytes, bytes]], int] | None) -> None:
    assert h1.parse_head(head, head.find(b"\r\n\r\n")) == parsed
    assert h1.read_head(head + b"body", head.find(b"\r\n\r\n")) == parsed  # looked up or not: the same


def test_a_head_read_before_is_looked_up_and_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h1, "_HEADS", {})
    monkeypatch.setattr(h1, "_HEADS_KEPT", 2)
    calls: list[bytes] = []
    parse = h1.parse_head

    def counted(data: bytes, end: int) -> tuple[int, list[tuple[bytes, bytes]], int] | None:
        calls.append(data[:end])
        return parse(data, end)

    monkeypatch.setattr(h1, "parse_head", counted)
    sse = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    first = h1.read_head(sse + b"5\r\nhello\r\n", len(sse) - 4)
    again = h1.read_head(sse + b"other body", len(sse) - 4)  # the body after the head plays no part
    assert first == (200, [(b"content-type", b"text/event-stream"), (b"transfer-encoding", b"chunked")], h1.CHUNKED)
    assert again is first and len(calls) == 1
    close = b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
    assert h1.read_head(close, len(close) - 4) is None and h1.read_head(close, len(close) - 4) is None
    assert len(calls) == 2  # a head left to h11 is remembered too
    other = b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n"
    assert h1.read_head(other, len(other) - 4) == (404, [(b"content-length", b"2")], 2)
    assert len(h1._HEADS) == 1  # full at two: let go, then this one kept
    assert h1.read_head(sse, len(sse) - 4) == first and len(calls) == 4


# -- a sized body ----------------------------------------------------------------------------------


def test_sized_body_in_pieces_and_past_its_end() -> None:
    body = SizedBody(5)
    assert (body.state, body.finished) == (BodyState.DATA, False)
    assert body.feed(b"ab") == b"ab" and body.left == 3
    assert body.feed(b"cdeHTTP") == b"cde"
    assert (body.state, body.finished, body.extra, body.chunks) == (BodyState.DONE, True, b"HTTP", 2)


def test_an_empty_sized_body_is_done_before_any_byte() -> None:
    body = SizedBody(0)
    assert (body.state, body.finished) == (BodyState.DONE, True)


def test_a_sized_body_cut_short_says_what_h11_says() -> None:
    body = SizedBody(10, left=10)
    body.feed(b"abc")
    assert str(body.eof_error()) == (
        "peer closed connection without sending complete message body (received 3 bytes, expected 10)"
    )


# -- a chunked body --------------------------------------------------------------------------------


def test_one_whole_chunk_per_piece() -> None:
    body = ChunkedBody(LIMIT)
    pieces = [b"5\r\nhello\r\n", b"3;x=1\r\nabc\r\n", b"0A\r\n0123456789\r\n", b"2 \r\nhi\r\n"]
    assert feed_all(body, pieces) == [b"hello", b"abc", b"0123456789", b"hi"]
    assert (body.state, body.chunks, body.finished) == (BodyState.SIZE, 4, False)
    assert body.feed(b"0\r\n\r\nnext") == b""
    assert (body.state, body.finished, body.extra, body.tail) == (BodyState.DONE, True, b"next", b"0\r\n\r\nnext")


def test_size_lines_read_before_are_looked_up_and_only_hex_ones_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h1, "_SIZES", {})
    monkeypatch.setattr(h1, "_SIZES_KEPT", 3)
    pieces = [b"5\r\nhello\r\n", b"05\r\nworld\r\n", b"5;x\r\nagain\r\n", b"5 \r\nspace\r\n", b"5\r\nthird\r\n"]
    for _ in range(2):  # the first time each line is parsed, the second looked up: the same answers
        body = ChunkedBody(LIMIT)
        assert feed_all(body, pieces) == [b"hello", b"world", b"again", b"space", b"third"]
        assert (body.state, body.chunks) == (BodyState.SIZE, 5)
    assert h1._SIZES == {b"5": 5, b"05": 5}  # extensions and blanks are _frame's, never kept
    more = [b"%x\r\n%s\r\n" % (n, b"x" * n) for n in (7, 8, 9)]
    assert feed_all(ChunkedBody(LIMIT), more) == [b"x" * 7, b"x" * 8, b"x" * 9]
    assert h1._SIZES == {b"5": 5, b"05": 5, b"7": 7}  # bounded: the lines past the bound are parsed each time
    # A kept size that does not frame this piece (the piece is cut short) is read by _frame.
    body = ChunkedBody(LIMIT)
    assert (body.feed(b"7\r\nxxx"), body.state) == (b"xxx", BodyState.DATA)


def test_several_chunks_in_one_read_look_their_bare_size_lines_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """``_frame`` (a read of several chunks) keeps and looks up bare hex lines as ``feed`` does;
    a line with an extension or blanks, and the last chunk's, are still the regex's."""
    monkeypatch.setattr(h1, "_SIZES", {})
    read = b"5\r\nhello\r\n3;x=1\r\nabc\r\n0a\r\n0123456789\r\n5\r\nworld\r\n0\r\n\r\n"
    body = ChunkedBody(LIMIT)
    assert (body.feed(read), body.state, body.chunks) == (b"helloabc0123456789world", BodyState.DONE, 4)
    assert h1._SIZES == {b"5": 5, b"0a": 10, b"0": 0}  # "0" kept as 0: still the regex's (trailers)
    # Kept lines are looked up, not matched: a read of kept lines alone never reaches the regex.
    monkeypatch.setattr(h1, "_CHUNK_LINE", None)
    body = ChunkedBody(LIMIT)
    assert body.feed(b"5\r\nhello\r\n0a\r\n0123456789\r\n5\r\nwor") == b"hello0123456789wor"
    assert (body.state, body.chunks, body.feed(b"ld\r\n")) == (BodyState.DATA, 3, b"ld")


def test_data_is_handed_out_as_it_arrives_through_every_state() -> None:
    body = ChunkedBody(LIMIT)
    assert (body.feed(b"a\r\n0123"), body.state) == (b"0123", BodyState.DATA)
    assert (body.feed(b"456789"), body.state) == (b"456789", BodyState.CRLF)
    assert (body.feed(b"\r"), body.state) == (b"", BodyState.CRLF)
    assert (body.feed(b"\n2\r\nab\r\n2\r"), body.state) == (b"ab", BodyState.SIZE)
    assert body.feed(b"\ncd\r\n0\r\nx-usage: 1\r\n") == b"cd"
    assert (body.state, body.finished, body.tail, body.chunks) == (BodyState.LAST, True, b"0\r\nx-usage: 1\r\n", 3)


def test_data_before_a_framing_error_is_returned_first() -> None:
    body = ChunkedBody(LIMIT)
    assert body.feed(b"2\r\nokXY") == b"ok"
    assert (body.state, body.finished) == (BodyState.ERROR, True)
    assert str(body.error) == "malformed chunk footer: b'XY' (expected b'\\r\\n')"


@pytest.mark.parametrize(
    ("pieces", "message"),
    [
        ([b"g\r\n"], "illegal chunk header: b'g\\r\\n'"),
        ([b"+5\r\nhello\r\n"], "illegal chunk header: b'+5\\r\\nhello\\r\\n'"),
        ([b"5;" + b"x" * (LIMIT + 1)], "chunk header too long"),
        ([b"5;", *[b"x" * 1024] * 101], "chunk header too long"),  # gathered across pieces
    ],
)
def test_framing_errors(pieces: list[bytes], message: str) -> None:
    body = ChunkedBody(LIMIT)
    assert b"".join(feed_all(body, pieces)) == b""
    assert body.state is BodyState.ERROR and str(body.error) == message


def test_a_size_line_split_finely_is_gathered_until_its_line_feed() -> None:
    body = ChunkedBody(LIMIT)
    line = b"5;" + b"e" * 3000 + b"\r\n"
    pieces = [line[i : i + 7] for i in range(0, len(line), 7)]
    assert b"".join(feed_all(body, [*pieces, b"hello\r\n"])) == b"hello"
    assert body.state is BodyState.SIZE and body.chunks == 1


def test_a_chunked_body_cut_short_says_what_h11_says() -> None:
    assert str(ChunkedBody.eof_error()) == (
        "peer closed connection without sending complete message body (incomplete chunked read)"
    )
