"""The backend as seen from one worker: its address, the headers it needs, and a pool of
httpcore HTTP/1.1 connections that the gateway owns.

Why our own pool rather than ``httpcore.AsyncConnectionPool``: a request is ended by cancelling
it when its client goes away, in any phase; httpcore's pool can leak a slot when a request is
cancelled while it waits for one (httpcore issue 1093), and it scans every connection per
request. Here acquire and release are O(1), a connection whose response was not read to the end
is closed (which is what makes the backend abort the generation), and a fully read one goes back
on the idle stack.

Each connection is httpcore's HTTP/1.1 connection, whose protocol engine is h11. For the
exchanges that need nothing of h11's state machine (almost all of them: a plain request, and an
answer framed by one Content-Length or by chunked coding) ``Connection.exchange`` writes the
request and reads the answer's head itself, and the body readers frame the body: h11's events
and state transitions were over half of the app's own time per non-streamed request (a third of
the worker's CPU per request). Anything else is handed to h11, with the request replayed into its
state, and read exactly as before.
``tests/test_direct_path.py`` holds both paths to the same bytes, errors and reuse.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import ssl
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import h11
import httpcore
from httpcore import AsyncHTTP11Connection

from gateway.config import Settings
from gateway.errors import GatewayError, backend_timeout, backend_unavailable, pool_exhausted
from gateway.netio import AsyncioBackend
from gateway.profiles import Profile

try:  # h11's body readers: iter_body takes over from them before they have read anything
    from h11._readers import ChunkedReader, ContentLengthReader
except ImportError:  # pragma: no cover - a later h11 that moved them; then h11 frames bodies itself
    ChunkedReader = ContentLengthReader = None  # type: ignore[assignment,misc]
try:  # h11's header list: exchange() builds it directly once the headers are known to be valid
    from h11._headers import Headers as H11Headers
except ImportError:  # pragma: no cover - a later h11 that moved it; then h11 checks each header
    H11Headers = None  # type: ignore[assignment,misc]
from httpcore._async.http11 import HTTPConnectionState

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]

#: Request headers never forwarded: hop-by-hop ones (RFC 9110 7.6.1), the client's credentials,
#: and those the gateway sets itself (host, content-length).
DROP_REQUEST_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"x-request-id",
    }
)

#: Response headers never relayed: hop-by-hop ones and those the server sets.
DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"server",
        b"x-request-id",
    }
)


class Target:
    """One replica's address and what every request to it carries; built once per worker."""

    def __init__(self, base_url: str, profile: Profile, api_key: str) -> None:
        parts = urlsplit(base_url)
        scheme = parts.scheme.encode()
        host = parts.hostname or ""
        default_port = 443 if scheme == b"https" else 80
        port = parts.port or default_port
        self.scheme = scheme
        self.host = host
        self.port = port
        self.origin = httpcore.Origin(scheme, host.encode("idna"), port)
        host_header = host if ":" not in host else f"[{host}]"
        if port != default_port:
            host_header = f"{host_header}:{port}"
        self.host_header = host_header.encode("idna")
        base_path = parts.path.rstrip("/")
        #: Client path ``/v1/x`` goes to ``base_path + /x``: the base URL's path replaces ``/v1``.
        self.base_path = base_path.encode()
        #: The server root, for health paths (the base URL without a trailing /v1).
        self.root_path = (base_path[: -len("/v1")] if base_path.endswith("/v1") else base_path).encode()
        self.auth_headers: list[tuple[bytes, bytes]] = (
            [(b"authorization", b"Bearer " + api_key.encode())] if api_key and profile.takes_key else []
        )
        self.base_url = base_url
        self.display = f"{profile.display_name} at {base_url}"
        #: Sent with every request: Host and the backend's key.
        self.static_headers: list[tuple[bytes, bytes]] = [(b"host", self.host_header), *self.auth_headers]

    def upstream_target(self, raw_path: bytes, query: bytes) -> bytes:
        """The request-target for a client path that starts with ``/v1``."""
        target = self.base_path + raw_path[3:]
        return target + b"?" + query if query else target

    def url(self, target: bytes) -> httpcore.URL:
        return httpcore.URL(scheme=self.scheme, host=self.origin.host, port=self.port, target=target)


def make_ssl_context(settings: Settings, base_url: str) -> ssl.SSLContext | None:
    if not base_url.startswith("https:"):
        return None
    ctx = ssl.create_default_context(cafile=settings.gateway_ca_bundle or None)
    if not settings.gateway_tls_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _NoLock:
    __slots__ = ()

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_LOCK = _NoLock()


class Connection(AsyncHTTP11Connection):
    """httpcore's HTTP/1.1 connection, with its per-event receive loop trimmed.

    httpcore enters a ``contextlib`` context manager (``map_exceptions``) around every h11
    ``next_event()`` call, i.e. once or twice per streamed chunk. This override does the same work
    (same events, same reads, same exception mapping) with a plain ``try``. Bodies are read with
    ``iter_body``; ``exchange`` takes a direct path past h11 where h11 has nothing to decide.
    """

    def __init__(self, origin: httpcore.Origin, stream: httpcore.AsyncNetworkStream, keepalive_expiry: float | None):
        super().__init__(origin=origin, stream=stream, keepalive_expiry=keepalive_expiry)
        # The pool hands a connection to one request at a time, so httpcore's state lock (an
        # anyio lock, several task look-ups per request) guards nothing here.
        self._state_lock = _NO_LOCK  # type: ignore[assignment]
        #: Body chunks of the current response so far, as the backend framed them (HTTP chunks
        #: of a chunked body, usually one SSE event each): ``iter_body`` may yield several at once.
        self.body_chunks = 0
        #: The current exchange took the direct path (see ``exchange``): h11 has not seen it.
        self._direct = False
        #: Direct path: the request as sent (for a hand-over to h11), the response head's bytes,
        #: its framing (a Content-Length, or -1 for chunked), the bytes read past the head, whether
        #: the message has ended, and whatever came after its end (then the connection is not reused).
        self._sent: tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes] | None = None
        self._head = b""
        self._length = 0
        self._rest = b""
        self._ended = False
        self._extra = b""

    async def _receive_event(self, timeout: float | None = None) -> h11.Event | type[h11.PAUSED]:  # noqa: ASYNC109
        state = self._h11_state
        while True:
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpcore.RemoteProtocolError(exc) from exc
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            data = await self._network_stream.read(self.READ_NUM_BYTES, timeout=timeout)
            if data == b"" and state.their_state == h11.SEND_RESPONSE:
                raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
            state.receive_data(data)

    async def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float | None,  # noqa: ASYNC109 - per read and write, as httpcore's are
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send one request and read its response head: the status and the raw headers. The body
        follows with ``iter_body``; then ``close_response()``, as with an httpcore response.

        What ``handle_async_request`` does for the gateway's requests (same bytes, same state,
        same exceptions), without building an ``httpcore.Request`` and URL, four trace contexts
        and a regex per header name and value: the head and body go out in one write. A request
        h11 would send as plain bytes takes ``_direct_exchange``; any other goes through h11's
        events. A ``WriteError`` is passed over to read the answer, as httpcore does: a server
        may answer and close before reading the whole request.
        """
        state = self._state
        if state is not HTTPConnectionState.IDLE and state is not HTTPConnectionState.NEW:
            raise httpcore.ConnectionNotAvailable()
        self._request_count += 1
        self._state = HTTPConnectionState.ACTIVE
        self._expire_at = None
        valid = fields_valid(headers)
        if (
            DIRECT
            and valid
            and _direct_request(method, target, headers, body)
            and not self._h11_state._receive_buffer  # bytes already here are h11's to read (never via the pool)
        ):
            try:
                return await self._direct_exchange(method, target, headers, body, timeout)
            except BaseException:
                await self.close_response()  # not read to the end: closed
                raise
        fields = _h11_fields(headers) if valid and H11Headers is not None else None
        try:
            h11_state = self._h11_state
            try:
                event = (
                    h11.Request(method=method, target=target, headers=headers)
                    if fields is None
                    else h11.Request(method=method, target=target, headers=fields, _parsed=True)
                )
                data = h11_state.send(event) or b""
                if body:
                    data += h11_state.send(h11.Data(data=body)) or b""
                data += h11_state.send(h11.EndOfMessage()) or b""
            except h11.LocalProtocolError as exc:
                raise httpcore.LocalProtocolError(exc) from exc
            try:
                await self._network_stream.write(data, timeout=timeout)
            except httpcore.WriteError:
                pass
            if not h11_state.trailing_data[0]:
                # Nothing buffered (the pool reuses no connection with bytes left over): h11's first
                # answer would be NEED_DATA, so read first.
                received = await self._network_stream.read(self.READ_NUM_BYTES, timeout=timeout)
                if not received:
                    raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
                h11_state.receive_data(received)
            return await self._h11_head(timeout)
        except BaseException:
            await self._response_closed()  # no await inside can be interrupted: see _NoLock, netio
            raise

    async def _h11_head(self, timeout: float | None) -> tuple[int, list[tuple[bytes, bytes]]]:  # noqa: ASYNC109
        """h11's response head, past any 1xx (a 101 is the answer itself)."""
        while True:
            head = await self._receive_event(timeout)
            if type(head) is h11.Response or (type(head) is h11.InformationalResponse and head.status_code == 101):
                return head.status_code, head.headers.raw_items()

    async def _direct_exchange(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float | None,  # noqa: ASYNC109
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """``exchange`` without h11's state machine, for the requests and responses that need none
        of it: the bytes h11 would write (the Host field first), and a response head that h11 would
        read to the same status and fields (``_direct_head``: HTTP/1.1, framed by one
        Content-Length or by chunked coding, no ``Connection: close``, no 1xx, 204 or 304, the
        head whole in the first read). Anything else read back is handed to h11 with the request
        replayed into its state, so it is read, framed and refused exactly as on h11's own path.
        The body's end is read here too; trailers, if any, are h11's again.
        """
        self._direct = True
        self._sent = (method, target, headers, body)
        self._ended = False
        if headers[0][0] != b"host":  # h11 writes Host first (the gateway's own lists start with it)
            headers = sorted(headers, key=lambda field: field[0] != b"host")  # stable: the rest keep their order
        fields_block = b"\r\n".join([b": ".join(field) for field in headers])
        try:
            await self._network_stream.write(
                b"".join([method, b" ", target, b" HTTP/1.1\r\n", fields_block, b"\r\n\r\n", body]), timeout=timeout
            )
        except httpcore.WriteError:
            pass  # read the answer anyway, as httpcore does
        received = await self._network_stream.read(self.READ_NUM_BYTES, timeout=timeout)
        if not received:
            raise httpcore.RemoteProtocolError("Server disconnected without sending a response.")
        end = received.find(b"\r\n\r\n")
        head = _direct_head(received, end) if end >= 0 else None
        if head is None:  # h11 reads this one: a head in several reads, or one that needs h11
            self._to_h11(received)
            return await self._h11_head(timeout)
        status, raw, self._length = head
        self._head = received[: end + 4]
        self._rest = received[end + 4 :]
        return status, raw

    def _to_h11(self, received: bytes) -> None:
        """Hand the exchange over to h11: the request sent replayed into its state, then the
        bytes received so far; from here on h11 reads the response, as on its own path."""
        assert self._sent is not None
        method, target, headers, body = self._sent
        state = self._h11_state
        state.send(h11.Request(method=method, target=target, headers=_h11_fields(headers), _parsed=True))
        if body:
            state.send(h11.Data(data=body))
        state.send(h11.EndOfMessage())
        state.receive_data(received)
        self._direct = False

    async def close_response(self) -> None:
        """After a response: back to idle if it was read to the end, else closed."""
        self._sent = None
        if self._direct:
            self._direct = False
            self._head = self._rest = b""
            if self._ended and not self._extra:
                self._state = HTTPConnectionState.IDLE
                if self._keepalive_expiry is not None:
                    self._expire_at = time.monotonic() + self._keepalive_expiry
            else:
                self._extra = b""
                await self.aclose()
            return
        await self._response_closed()

    @property
    def end_known_early(self) -> bool:
        """Whether ``body_complete`` can turn True for this response (a Content-Length body on the
        direct path), so that a relay need not ask after every piece of the others."""
        return self._direct and self._length >= 0

    def body_in_hand(self) -> bytes | None:
        """The whole body when it came in the read that brought the head (a Content-Length body on
        the direct path): the response ends with it, as ``iter_body`` would end it after one
        piece. None when there is more to read, or none (then ``iter_body``)."""
        length = self._length
        if not self._direct or length <= 0 or len(self._rest) < length:
            return None
        data, self._rest = self._rest, b""
        self._ended, self._extra = True, data[length:]
        self.body_chunks = 1
        return data[:length] if len(data) > length else data

    @property
    def body_complete(self) -> bool:
        """Whether the piece ``iter_body`` just handed out was the body's last (known on the direct
        path, where a Content-Length body's end is read before its last piece is handed out; False
        where it is not known yet)."""
        return self._direct and self._ended

    def iter_body(self, first_timeout: float | None, idle_timeout: float | None) -> AsyncIterator[bytes]:
        """The response body, piece by piece as it arrives, waiting at most ``first_timeout`` for
        the first piece and ``idle_timeout`` between pieces. Close the response afterwards as
        usual: a body not read to the end then closes the connection.

        A chunked body (every SSE stream) is de-chunked here rather than by h11, whose two
        ``next_event()`` calls per chunk were most of the gateway's per-chunk cost; h11 still
        reads the response head, the last chunk and any trailers, so its state (and whether the
        connection can be reused) stays exactly what it would have been. A ``Content-Length``
        body is read here too (``_sized``), and h11 ends the message.
        """
        self.body_chunks = 0
        if self._direct:
            if self._length < 0:
                return self._dechunk(first_timeout, idle_timeout)
            return self._sized(first_timeout, idle_timeout)
        reader = self._h11_state._reader if FAST_CHUNKED else None
        if (
            type(reader) is ChunkedReader
            and reader._bytes_in_chunk == 0
            and not reader._bytes_to_discard
            and not reader._reading_trailer
        ):
            return self._dechunk(first_timeout, idle_timeout)
        if type(reader) is ContentLengthReader and reader._remaining == reader._length > 0:
            return self._sized(first_timeout, idle_timeout)
        return self._h11_body(first_timeout, idle_timeout)

    async def _h11_body(self, first_timeout: float | None, idle_timeout: float | None) -> AsyncIterator[bytes]:
        """The body as h11 frames it (one generator, where ``response.stream`` nests two)."""
        timeout = first_timeout
        while True:
            event = await self._receive_event(timeout)
            timeout = idle_timeout
            if type(event) is h11.Data:
                self.body_chunks += 1
                yield bytes(event.data)  # h11 hands out a bytearray; ASGI bodies are bytes
            elif type(event) is h11.EndOfMessage or event is h11.PAUSED:
                return

    async def _sized(self, first_timeout: float | None, idle_timeout: float | None) -> AsyncIterator[bytes]:
        """A ``Content-Length`` body, each read yielded as it arrives; h11 then ends the message
        (and keeps any bytes past the body, so the pool does not reuse the connection)."""
        state = self._h11_state
        direct = self._direct
        if direct:
            length = left = self._length
            data, self._rest = self._rest, b""
            if not left:  # an empty body: the message ended with its head
                self._ended, self._extra = True, data
                return
        else:
            reader: ContentLengthReader = state._reader  # type: ignore[assignment]  # checked by iter_body
            buffered = state._receive_buffer.maybe_extract_at_most(len(state._receive_buffer))
            data = bytes(buffered) if buffered else b""
            length = reader._length
            left = reader._remaining
        timeout = first_timeout
        while True:
            if data:
                self.body_chunks += 1
                if len(data) >= left:
                    extra = data[left:]
                    if direct:  # ended before the last piece goes out: see ``body_complete``
                        self._ended, self._extra = True, extra
                        yield data[:left] if extra else data
                        return
                    yield data[:left] if extra else data
                    reader._remaining = 0
                    if extra:
                        state.receive_data(extra)
                    while type(await self._receive_event(idle_timeout)) is not h11.EndOfMessage:
                        pass
                    return
                left -= len(data)
                if not direct:
                    reader._remaining = left
                yield data
                timeout = idle_timeout
            data = await self._network_stream.read(self.READ_NUM_BYTES, timeout)
            if not data:
                raise httpcore.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    f"(received {length - left} bytes, expected {length})"
                )

    async def _dechunk(self, first_timeout: float | None, idle_timeout: float | None) -> AsyncIterator[bytes]:
        """A chunked body's data, as h11 would frame it (same grammar, same limits, same errors),
        with everything that arrived in one read yielded as one piece. Chunk data is yielded as
        soon as any of it is here, never held back for the rest of its chunk."""
        state = self._h11_state
        direct = self._direct
        if direct:
            data, self._rest = self._rest, b""
        else:
            buffered = state._receive_buffer.maybe_extract_at_most(len(state._receive_buffer))
            data = bytes(buffered) if buffered else b""
        read = self._network_stream.read
        match = _CHUNK_LINE.match
        limit = state._max_incomplete_event_size  # this connection's h11 bound on an unfinished line
        timeout = first_timeout
        left = 0  # bytes of the current chunk's data still to come
        crlf = False  # a chunk's data is complete; its CRLF comes next
        while True:
            pos, size, pieces, error, partial_line = 0, len(data), [], None, False
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
                    if size - pos < 2:
                        if data[pos:] != b"\r\n"[: size - pos]:
                            error = _malformed_footer(data[pos:])
                        break
                    if data[pos] != 13 or data[pos + 1] != 10:
                        error = _malformed_footer(data[pos : pos + 2])
                        break
                    pos += 2
                    crlf = False
                if pos == size:
                    break  # this read is used up: the next size line comes with the next one
                line = match(data, pos)
                if line is None:
                    if data.find(b"\r\n", pos) >= 0:
                        error = httpcore.RemoteProtocolError(f"illegal chunk header: {data[pos : pos + 40]!r}")
                    elif size - pos > limit:
                        error = _line_too_long()
                    partial_line = True
                    break
                left = int(line[1], 16)
                if not left:  # the last chunk: h11 reads it and the trailers, and ends the message
                    if pieces:
                        yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    if not direct:
                        state.receive_data(data[pos:])
                    elif data[line.end() : line.end() + 2] == b"\r\n":  # no trailers: the message ends here
                        self._ended, self._extra = True, data[line.end() + 2 :]
                        return
                    else:  # trailers, or their end still to come: h11 reads them from the last chunk on
                        self._to_h11(self._head + data[pos:])
                    while type(await self._receive_event(idle_timeout)) is not h11.EndOfMessage:
                        pass
                    return
                pos = line.end()
                self.body_chunks += 1
            if pieces:  # data before a framing error is relayed first, as h11 does
                yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                timeout = idle_timeout
            if error is not None:
                raise error
            rest = data[pos:] if pos < size else b""
            more = await read(self.READ_NUM_BYTES, timeout)
            if partial_line and b"\n" not in more:
                # A size line cannot end before a LF arrives: gather reads without searching the
                # line again each time (linear however finely the backend splits it).
                parts, total = [rest, more], len(rest) + len(more)
                while more and b"\n" not in more:
                    if total > limit:
                        raise _line_too_long()
                    more = await read(self.READ_NUM_BYTES, timeout)
                    parts.append(more)
                    total += len(more)
                rest, more = b"".join(parts[:-1]), parts[-1]
            if not more:
                raise httpcore.RemoteProtocolError(
                    "peer closed connection without sending complete message body (incomplete chunked read)"
                )
            data = rest + more if rest else more


_NAMES = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-z]+(?:\n[-!#$%&'*+.^_`|~0-9a-z]+)*")
_VALUE = rb"(?:[^\x00\s]+(?:[ \t]+[^\x00\s]+)*)?"
_VALUES = re.compile(_VALUE + rb"(?:\n" + _VALUE + rb")*")


def request_headers(headers: list[tuple[bytes, bytes]]) -> H11Headers | None:
    """``headers`` as h11's header list when ``fields_valid`` passes them, else None (h11 then
    checks them field by field and refuses them exactly as before)."""
    if H11Headers is None or not fields_valid(headers):  # H11Headers is None: see the import
        return None
    return _h11_fields(headers)


def _h11_fields(headers: list[tuple[bytes, bytes]]) -> H11Headers:
    """h11's own header list for ``headers`` that ``fields_valid`` passed (h11 checks none again)."""
    return H11Headers([(n, n, v) for n, v in headers])


def fields_valid(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether h11 would accept ``headers`` as they are, checked in one pass per field.

    h11 matches each name and each value against its grammar, one regex call each. Here all
    names are matched at once (newline-joined: a newline is in neither grammar, so a count of
    them shows no value held one), and all values likewise. Lower-case names (all an ASGI server
    hands over, and the gateway's own) and the gateway's own framing (at most one
    ``content-length``, all digits, and no ``transfer-encoding``) pass; anything else
    is refused here: h11 then checks it field by field.
    """
    names = b"\n".join([n for n, _ in headers])
    values = b"\n".join([v for _, v in headers])
    newlines = len(headers) - 1
    if (
        names.count(b"\n") != newlines
        or values.count(b"\n") != newlines
        or b"transfer-encoding" in names
        or _NAMES.fullmatch(names) is None
        or _VALUES.fullmatch(values) is None
    ):
        return False
    if b"content-length" in names:
        lengths = [v for n, v in headers if n == b"content-length"]
        if len(lengths) != 1 or not lengths[0].isdigit() or len(lengths[0]) > 20:
            return False
    return True


_TOKEN = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
#: Request fields that change how h11 runs the exchange (its keep-alive, 100-continue and
#: upgrade handling): requests with them take h11's path.
_STATEFUL = frozenset({b"connection", b"expect", b"upgrade"})
#: A status line as h11 reads it, of HTTP/1.1 only (the reason phrase is optional there too).
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3})(?: [^\x00\n\r\x0b\x0c]*)?\r\n")
#: One field line as h11 reads it: a token name, a colon, and a value of visible characters,
#: obs-text, spaces and tabs (stripped of the spaces and tabs around it: h11's OWS).
_FIELD_LINE = re.compile(rb"([-!#$%&'*+.^_`|~0-9a-zA-Z]+):([^\x00\n\r\x0b\x0c]*)\r\n")


def _direct_request(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
    """Whether h11 would send this request (fields already checked by ``fields_valid``) as
    the plain bytes the direct path writes: a token method, a visible-ASCII target, one Host,
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


def _direct_head(data: bytes, end: int) -> tuple[int, list[tuple[bytes, bytes]], int] | None:
    """The status, fields and framing (a Content-Length, or -1: chunked) of the response head
    ``data[:end]`` (``end`` is where its blank line starts), as h11 would read them, if it is one
    the direct path reads: HTTP/1.1, a final status with a body (not 204 or 304), fields on one
    line each, exactly one of one Content-Length (digits) or ``Transfer-Encoding: chunked``, and no
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
            length = -1
            fields[i] = (name, b"chunked")  # h11 hands out the coding lower-cased
        elif lower == b"connection" and b"close" in [t.strip() for t in value.lower().split(b",")]:
            return None
    if length == -2 or covered != stop:
        return None
    return status, fields, length


#: One chunk-size line (RFC 9112 7.1), as h11 accepts it: up to 20 hex digits, extensions
#: skipped, trailing blanks tolerated.
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,20})(?:;[^\n]*)?[ \t]*\r\n")


def _line_too_long() -> httpcore.RemoteProtocolError:
    return httpcore.RemoteProtocolError("chunk header too long")


def _malformed_footer(got: bytes) -> httpcore.RemoteProtocolError:
    return httpcore.RemoteProtocolError(f"malformed chunk footer: {got!r} (expected b'\\r\\n')")


def _h11_internals_known() -> bool:
    """Whether this h11 has the receive buffer and body readers that ``_dechunk`` and ``_sized``
    take over from; if a later h11 does not, bodies are framed by h11 itself (slower, equally
    correct)."""
    if ChunkedReader is None:
        return False
    probe = h11.Connection(h11.CLIENT)
    reader = ChunkedReader()
    sized = ContentLengthReader(1)
    return (
        hasattr(probe, "_reader")
        and hasattr(getattr(probe, "_receive_buffer", None), "maybe_extract_at_most")
        and all(hasattr(reader, a) for a in ("_bytes_in_chunk", "_bytes_to_discard", "_reading_trailer"))
        and all(hasattr(sized, a) for a in ("_length", "_remaining"))
        and hasattr(probe, "_max_incomplete_event_size")
    )


FAST_CHUNKED = _h11_internals_known()
#: ``exchange`` goes past h11's state machine for the requests and responses that need none of it
#: (its body readers are the same ones that take over from h11's, hence the same condition).
DIRECT = FAST_CHUNKED and H11Headers is not None


async def open_connection(
    target: Target,
    ssl_context: ssl.SSLContext | None,
    connect_timeout: float,
    keepalive: float | None,
    network: httpcore.AsyncNetworkBackend,
) -> Connection:
    """A new HTTP/1.1 connection with TCP_NODELAY set; httpcore's exceptions on failure."""
    stream = await network.connect_tcp(target.host, target.port, timeout=connect_timeout, socket_options=NODELAY)
    if ssl_context is not None:
        stream = await stream.start_tls(ssl_context, server_hostname=target.host, timeout=connect_timeout)
    return Connection(origin=target.origin, stream=stream, keepalive_expiry=keepalive)


class Pool:
    """Up to ``size`` connections to one origin: an idle stack and a FIFO of waiters.

    State changes are synchronous (no awaits between a check and its update), so no lock is
    needed on one event loop.
    """

    def __init__(
        self,
        target: Target,
        *,
        size: int,
        connect_timeout: float,
        pool_timeout: float,
        keepalive: float,
        ssl_context: ssl.SSLContext | None = None,
        network: httpcore.AsyncNetworkBackend | None = None,
    ) -> None:
        self._target = target
        self._size = size
        self._connect_timeout = connect_timeout
        self._pool_timeout = pool_timeout
        self._keepalive = keepalive
        self._ssl = ssl_context
        self._network = network or AsyncioBackend()
        self._idle: list[Connection] = []
        #: Open or opening connections, idle ones included.
        self._open = 0
        self._active = 0
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()

    # -- introspection, for tests, /metrics and humans --------------------------------------

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def active(self) -> int:
        return self._active

    @property
    def open(self) -> int:
        return self._open

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def __repr__(self) -> str:
        return (
            f"<Pool {self._target.display} [Connections: {self._open} open, {self._active} active, "
            f"{len(self._idle)} idle, size {self._size} | Waiting: {len(self._waiters)}]>"
        )

    # -- acquire / release --------------------------------------------------------------------

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection ready for one request, and whether it was reused from the idle stack."""
        if self._closed:
            raise backend_unavailable("the gateway is shutting down")
        while self._idle:
            conn = self._idle.pop()
            if conn.has_expired():
                self._discard(conn)
                continue
            self._active += 1
            return conn, True
        if self._open >= self._size:
            conn_or_none = await self._wait()
            if conn_or_none is not None:
                self._active += 1
                return conn_or_none, True
            # A slot was freed for us (self._open already counts it).
        else:
            self._open += 1
        try:
            conn = await open_connection(self._target, self._ssl, self._connect_timeout, self._keepalive, self._network)
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        self._active += 1
        return conn, False

    async def _wait(self) -> Connection | None:
        """Wait for a connection (or, with None, a free slot) handed over by release/discard."""
        fut: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            async with asyncio.timeout(self._pool_timeout):
                return await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                # Handed something at the moment we gave up: pass it on, never leak it.
                handed = fut.result()
                if handed is None:
                    self._open -= 1
                    self._wake_one()
                else:
                    self._put_back(handed)
            else:
                fut.cancel()
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(exc, TimeoutError):
                raise pool_exhausted(self._pool_timeout) from None
            raise

    def release(self, conn: Connection) -> None:
        """Return a connection after its response was closed; reused only if fully read and the
        backend sent nothing past the end of the response."""
        self._active -= 1
        # h11's trailing_data would copy its buffer for the same answer: is anything in it.
        if conn.is_idle() and not self._closed and not conn._h11_state._receive_buffer:
            self._put_back(conn)
        else:
            self._discard(conn)

    def _put_back(self, conn: Connection) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self._idle.append(conn)

    def _discard(self, conn: Connection) -> None:
        self._open -= 1
        if not conn.is_closed():
            # Only reached for expired idle connections and defensive paths: the response
            # close already closed a connection whose body was not read to the end.
            task = asyncio.get_running_loop().create_task(conn.aclose())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._wake_one()

    def _wake_one(self) -> None:
        """Hand a free slot to the first live waiter, which then opens a connection."""
        if self._open >= self._size:
            return
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                self._open += 1
                fut.set_result(None)
                return

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._open -= 1
            await conn.aclose()
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(backend_unavailable("the gateway is shutting down"))


#: Which timeout a read that timed out ran into, by phase (the error's code stays
#: backend_timeout; its message names the setting).
_PHASE_TIMEOUTS = {
    "connect": "no connection within GATEWAY_CONNECT_TIMEOUT",
    "headers": "no response headers within GATEWAY_HEADER_TIMEOUT (default: GATEWAY_READ_TIMEOUT)",
    "first_token": "no first token within GATEWAY_TTFT_TIMEOUT (default: GATEWAY_READ_TIMEOUT)",
    "body": "silent for longer than GATEWAY_IDLE_TIMEOUT (default: GATEWAY_READ_TIMEOUT)",
}


def map_error(exc: Exception, phase: str) -> GatewayError:
    """httpcore's exceptions, mapped once at this boundary to the gateway's errors."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, (httpcore.ConnectTimeout, httpcore.PoolTimeout)):
        return backend_timeout(_PHASE_TIMEOUTS["connect"])
    if isinstance(exc, httpcore.TimeoutException):
        return backend_timeout(_PHASE_TIMEOUTS.get(phase, _PHASE_TIMEOUTS["body"]))
    if isinstance(exc, httpcore.ConnectError):
        return backend_unavailable(f"connection failed ({exc or type(exc).__name__})")
    if isinstance(exc, httpcore.LocalProtocolError):
        # h11's message quotes the refused value, which may be a header the gateway adds itself.
        return GatewayError(
            400,
            "invalid_request_error",
            "invalid_request",
            "The request cannot be forwarded: a header or the path holds characters HTTP does not allow.",
        )
    if isinstance(exc, (httpcore.NetworkError, httpcore.RemoteProtocolError)):
        return backend_unavailable(f"connection lost while waiting for {phase} ({exc or type(exc).__name__})")
    return backend_unavailable(f"{type(exc).__name__} while waiting for {phase}")


def error_class(exc: BaseException) -> str:
    """connect, timeout or reset: the metrics' class of an upstream failure."""
    if isinstance(exc, httpcore.TimeoutException):
        return "timeout"
    if isinstance(exc, httpcore.ConnectError):
        return "connect"
    return "reset"
