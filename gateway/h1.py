"""A sans-IO HTTP/1.1 engine for the exchanges that need nothing of h11's state machine.

Pure and synchronous: the request's bytes, the response head parsed, and the body decoded from
bytes fed in, with no sockets and no awaits. ``gateway.connection`` drives it over a network
stream. The grammar, limits and errors are h11's (0.16): whatever this module accepts, h11 reads
to the same status, fields and body bytes; what it does not take (``plain_request`` or
``parse_head`` answer False or None) is left to h11, the oracle and the fallback.
``tests/test_direct_path.py`` and ``tests/test_h11_paths.py`` hold the two to the same results.
"""

from __future__ import annotations

import enum
import re

from gateway.memo import keep

# -- the request -------------------------------------------------------------------------------

#: The bytes a field name may hold (h11's token, lower-case: ASGI servers' and the gateway's names).
_NAME_BYTES = b"-!#$%&'*+.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
#: The bytes a field value may hold anywhere (h11's ``[^\x00\s]``); spaces and tabs only inside it.
_VALUE_BYTES = bytes(b for b in range(256) if b not in b"\x00\t\n\x0b\x0c\r ")
_BLANKS = b" \t"
_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
#: Request fields that change how h11 runs the exchange (its keep-alive, 100-continue and
#: upgrade handling): requests with them take h11's path.
_STATEFUL = frozenset({b"connection", b"expect", b"upgrade"})
#: Fields found valid before, as (name, value): most of a request's fields are the same in every
#: request (the backend's own, the client's content type and accept), so each is checked once. At
#: most ``_VALID_KEPT`` (then all are let go and checked again). Never a Content-Length (its count
#: is checked per request) nor a request id (new in every request: it would only crowd the others).
_VALID: dict[tuple[bytes, bytes], bool] = {}
_VALID_KEPT = 1024


def fields_valid(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether h11 would accept ``headers`` as they are.

    h11 matches each name and each value against its grammar, one regex call each. Here a field
    seen valid before is looked up (``_VALID``); any other is checked by deleting the bytes its
    name and value may hold (``bytes.translate``: nothing may be left of the name, and of the value
    only spaces or tabs, never at its edges). No regex runs per request (costly on the cold cache a
    request finds). Lower-case names (all an ASGI server hands over, and the gateway's own) and the
    gateway's own framing (one all-digit ``content-length``, no ``transfer-encoding``) pass;
    anything else is refused here: h11 then checks it field by field.
    """
    if not headers:
        return False
    valid = _VALID
    lengths = 0
    for field in headers:
        if field in valid:
            continue
        name, value = field
        if name == b"content-length":
            lengths += 1
            if lengths > 1 or not value.isdigit() or len(value) > 20:
                return False
            continue
        if not name or name.translate(None, _NAME_BYTES) or name == b"transfer-encoding":
            return False
        rest = value.translate(None, _VALUE_BYTES)
        if rest and (rest.translate(None, _BLANKS) or value[:1] in _BLANKS or value[-1:] in _BLANKS):
            return False  # bytes never allowed (NUL, CR, LF, VT, FF), or a blank at an edge
        if name != b"x-request-id":
            keep(valid, field, True, _VALID_KEPT)
    return True


def plain_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
    """Whether h11 would send this request (fields already checked by ``fields_valid``) as
    the plain bytes ``request_bytes`` writes: a token method, a visible-ASCII target, one Host,
    a body exactly as long as its Content-Length, and nothing that changes h11's handling."""
    if _TOKEN.fullmatch(method) is None or _TARGET.fullmatch(target) is None or method in (b"HEAD", b"CONNECT"):
        return False
    hosts = 0
    length: bytes | None = None
    for name, value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            length = value
        elif name in _STATEFUL:
            return False
    if hosts != 1:
        return False
    return len(body) == int(length) if length is not None else not body


def request_bytes(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The bytes h11 writes for a request ``plain_request`` passed: head and body in one buffer."""
    if headers[0][0] != b"host":  # h11 writes Host first (the gateway's own lists start with it)
        headers = sorted(headers, key=lambda field: field[0] != b"host")  # stable: the rest keep their order
    fields_block = b"\r\n".join([b": ".join(field) for field in headers])
    return b"".join([method, b" ", target, b" HTTP/1.1\r\n", fields_block, b"\r\n\r\n", body])


# -- the response head -------------------------------------------------------------------------

#: A status line as h11 reads it, of HTTP/1.1 only (the reason phrase is optional there too).
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3})(?: [^\x00\n\r\x0b\x0c]*)?\r\n")
#: One field line as h11 reads it: a token name, a colon, and a value of visible characters,
#: obs-text, spaces and tabs (stripped of the spaces and tabs around it: h11's OWS).
_FIELD_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):([^\x00\n\r\x0b\x0c]*)\r\n")

#: The framing ``parse_head`` reports for a chunked body (else the Content-Length).
CHUNKED = -1

#: ``read_head``'s answers by the head's bytes: a backend sends the same head again and again (a
#: stream's differs only in its Date, once a second), so it is parsed once. At most ``_HEADS_KEPT``
#: (then all are let go and parsed again).
_HEADS: dict[bytes, tuple[int, list[tuple[bytes, bytes]], int] | None] = {}
_HEADS_KEPT = 64
_UNREAD: tuple[int, list[tuple[bytes, bytes]], int] = (0, [], 0)


def read_head(data: bytes, end: int) -> tuple[int, list[tuple[bytes, bytes]], int] | None:
    """``parse_head``'s answer, looked up when the same head was read before. The fields list
    is shared by every response with that head: the caller must not change it."""
    key = data[:end]
    found = _HEADS.get(key, _UNREAD)
    return keep(_HEADS, key, parse_head(data, end), _HEADS_KEPT) if found is _UNREAD else found


def parse_head(data: bytes, end: int) -> tuple[int, list[tuple[bytes, bytes]], int] | None:
    """The status, fields and framing (a Content-Length, or ``CHUNKED``) of the response head
    ``data[:end]`` (``end`` is where its blank line starts), as h11 would read them, if it is one
    this engine reads: HTTP/1.1, a final status with a body (not 204 or 304), fields on one line
    each, exactly one of one Content-Length (digits) or ``Transfer-Encoding: chunked``, and no
    ``Connection: close`` (h11 then ends the connection). None: h11 reads it."""
    line = _STATUS_LINE.match(data)
    if line is None:
        return None
    status = int(line[1])
    start = line.end()
    if status < 200 or status in (204, 304):
        return None
    stop = end + 2
    fields: list[tuple[bytes, bytes]] = _FIELD_LINE.findall(data, start, stop)
    covered = start  # the lines found must tile the head: findall skips what does not match
    length = -2
    for i, (name, raw) in enumerate(fields):
        covered += len(name) + len(raw) + 3
        value = raw.strip(b" \t")
        if value is not raw:
            fields[i] = (name, value)
        lower = name.lower()
        if lower == b"content-length":
            if length != -2 or not value.isdigit() or len(value) > 20:
                return None
            length = int(value)
        elif lower == b"transfer-encoding":
            if length != -2 or value.lower() != b"chunked":
                return None
            length = CHUNKED
            fields[i] = (name, b"chunked")  # h11 hands out the coding lower-cased
        elif lower == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
            return None
    if length == -2 or covered != stop:
        return None
    return status, fields, length


# -- the response body -------------------------------------------------------------------------


class ProtocolError(Exception):
    """The backend broke HTTP/1.1's framing; the message is h11's for the same fault."""


class BodyState(enum.Enum):
    """Where a body decoder stands. SIZE, DATA and CRLF are inside a chunked body; a sized
    body is in DATA until DONE."""

    SIZE = "size"  # a chunk-size line comes next
    DATA = "data"  # inside a chunk's data (or a sized body)
    CRLF = "crlf"  # a chunk's data is complete; its CRLF comes next
    LAST = "last"  # the last chunk came; its trailers, or their end, are still to come
    DONE = "done"  # the message ended; ``extra`` holds what came after it
    ERROR = "error"  # the framing is broken; ``error`` says how


# Module-level names for the states the per-read code compares against (a global load, where
# ``BodyState.X`` is an attribute look-up on the enum class each time).
_SIZE, _DATA, _CRLF = BodyState.SIZE, BodyState.DATA, BodyState.CRLF
_LAST, _DONE, _ERROR = BodyState.LAST, BodyState.DONE, BodyState.ERROR

#: One chunk-size line (RFC 9112 7.1), as h11 accepts it: up to 20 hex digits, extensions
#: skipped, trailing blanks tolerated.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\n]*)?[ \t]*\r\n")
_HEX_DIGITS = b"0123456789abcdefABCDEF"
#: Bare hex size lines already read, and their sizes: a stream's events are of a few sizes, so
#: their lines are looked up, not parsed again (``int(line, 16)`` costs more than the rest of a
#: chunk's framing). Only hex digits, at most ``_SIZES_KEPT`` (then the others are parsed).
_SIZES: dict[bytes, int] = {}
_SIZES_KEPT = 4096


def _hex_size(line: bytes) -> int:
    """The size a bare size line of 1 to 20 bytes says (kept in ``_SIZES``), or 0 if it holds
    anything but hex digits (``_frame`` then reads it, as the general case)."""
    if line.strip(_HEX_DIGITS):
        return 0
    n = int(line, 16)
    if len(_SIZES) < _SIZES_KEPT:
        _SIZES[line] = n
    return n


def _line_too_long() -> ProtocolError:
    return ProtocolError("chunk header too long")


def _malformed_footer(got: bytes) -> ProtocolError:
    return ProtocolError(f"malformed chunk footer: {got!r} (expected b'\\r\\n')")


class SizedBody:
    """A body framed by a Content-Length: every byte fed is body up to that length. ``left``:
    the bytes still to come when the body was started elsewhere (by h11); by default all."""

    __slots__ = ("length", "left", "state", "finished", "extra", "chunks")

    def __init__(self, length: int, left: int = -1) -> None:
        if left < 0:
            left = length
        self.length = length
        #: Bytes of the body still to come.
        self.left = left
        self.state = _DATA if left else _DONE
        #: The body has ended (state DONE): checked once per piece, so a plain attribute.
        self.finished = not left
        self.extra = b""
        #: Pieces fed that held body bytes.
        self.chunks = 0

    def feed(self, data: bytes) -> bytes:
        """The body bytes in ``data`` (not empty); past the body's end the rest goes to ``extra``."""
        self.chunks += 1
        left = self.left
        if len(data) >= left:
            self.extra = extra = data[left:]
            self.left = 0
            self.state = _DONE
            self.finished = True
            return data[:left] if extra else data
        self.left = left - len(data)
        return data

    def eof_error(self) -> ProtocolError:
        """What h11 says when the connection ends before the body does."""
        received = self.length - self.left
        return ProtocolError(
            f"peer closed connection without sending complete message body (received {received} bytes, "
            f"expected {self.length})"
        )


class ChunkedBody:
    """A chunked body's data, as h11 frames it (same grammar, limits and errors), with all the
    data in one fed piece handed out as one: never held back for the rest of its chunk.

    ``feed`` returns the data found; once ``finished``, ``state`` says why: LAST (``tail`` holds
    the last chunk's line and what followed it, for h11 to read its trailers), DONE (the message
    ended; ``extra`` is what came after it) or ERROR (``error``; the data before the fault is
    still returned first, as h11 hands it out before it fails).
    """

    __slots__ = ("limit", "state", "finished", "tail", "extra", "error", "chunks", "_left", "_rest", "_line", "_seen")

    def __init__(self, limit: int) -> None:
        #: The longest unfinished size line accepted (the connection's h11 bound).
        self.limit = limit
        self.state = _SIZE
        self.finished = False
        self.tail = b""
        self.extra = b""
        self.error: ProtocolError | None = None
        #: The backend's chunks so far (usually one SSE event each), however reads grouped them.
        self.chunks = 0
        self._left = 0  # bytes of the current chunk's data still to come
        self._rest = b""  # an unfinished CRLF or size line, to complete with the next piece
        self._line: list[bytes] | None = None  # an unfinished size line without its LF yet, in parts
        self._seen = 0  # bytes in ``_line``

    def feed(self, data: bytes) -> bytes:
        """The chunk data in ``data`` (a non-empty read), as one piece (b"" if none)."""
        line = self._line
        if line is not None:
            # A size line cannot end before a LF arrives: gather pieces without searching the
            # line again each time (linear however finely the backend splits it).
            line.append(data)
            if b"\n" not in data:
                self._seen += len(data)
                if self._seen > self.limit:
                    self._fail(_line_too_long())
                return b""
            self._line = None
            data = b"".join(line)
        elif self._rest:
            data = self._rest + data
            self._rest = b""
        elif self.state is _SIZE:
            # The paced stream's shape: one whole chunk per read, its size line bare hex digits.
            end = data.find(b"\r\n")
            if 0 < end <= 20:
                size_line = data[:end]
                n = _SIZES.get(size_line) or _hex_size(size_line)
                if n and len(data) == end + n + 4 and data[-2] == 13 and data[-1] == 10:
                    self.chunks += 1
                    return data[end + 2 : -2]
        return self._frame(data)

    def _frame(self, data: bytes) -> bytes:
        """The general case: any mix of partial and whole chunks, in one pass over ``data``."""
        find = data.find
        state = self.state
        left = self._left
        crlf = state is _CRLF
        pos, size, pieces = 0, len(data), []
        while True:
            if left:
                end = pos + left
                if end > size:
                    if pos < size:
                        pieces.append(data[pos:])
                        left -= size - pos
                        pos = size
                    break
                pieces.append(data[pos:end])
                pos, left, crlf = end, 0, True
            if crlf:
                if data[pos : pos + 2] != b"\r\n":  # a wrong footer, or one cut at the read's end
                    if size - pos >= 2 or data[pos:] != b"\r\n"[: size - pos]:
                        self._fail(_malformed_footer(data[pos : pos + 2]))
                    break
                pos += 2
                crlf = False
            if pos == size:
                break  # this piece is used up: the next size line comes with the next one
            # A bare hex size line is looked up (``_SIZES``) as in ``feed``; others take the regex.
            nl = find(b"\r\n", pos, pos + 22)
            if nl > pos:
                line = data[pos:nl]
                left = _SIZES.get(line) or _hex_size(line)
                if left:
                    pos = nl + 2
                    self.chunks += 1
                    continue
            found = _CHUNK_LINE.match(data, pos)
            if found is None:
                self._no_size_line(data, pos)
                break
            left = int(found[1], 16)
            if not left:
                self._last_chunk(data, pos, found.end())
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)
            pos = found.end()
            self.chunks += 1
        if not self.finished:
            self._left = left
            self.state = _DATA if left else _CRLF if crlf else _SIZE
            if self._line is None and pos < size:
                self._rest = data[pos:]
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _no_size_line(self, data: bytes, pos: int) -> None:
        """No whole size line at ``pos``: a broken one, one too long, or one still coming."""
        if data.find(b"\r\n", pos) >= 0:
            self._fail(ProtocolError(f"illegal chunk header: {data[pos : pos + 40]!r}"))
        elif len(data) - pos > self.limit:
            self._fail(_line_too_long())
        else:
            self._line, self._seen = [data[pos:]], len(data) - pos

    def _last_chunk(self, data: bytes, pos: int, end: int) -> None:
        """The last chunk's line is ``data[pos:end]``: the message ends, unless trailers follow."""
        self.finished = True
        self.tail = data[pos:]
        if data[end : end + 2] == b"\r\n":  # no trailers: the message ends here
            self.state, self.extra = _DONE, data[end + 2 :]
        else:
            self.state = _LAST

    def _fail(self, error: ProtocolError) -> None:
        self.state = _ERROR
        self.finished = True
        self.error = error

    @staticmethod
    def eof_error() -> ProtocolError:
        """What h11 says when the connection ends before the body does."""
        return ProtocolError("peer closed connection without sending complete message body (incomplete chunked read)")
