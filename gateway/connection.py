"""One HTTP/1.1 connection to a backend: ``gateway.h1`` driven over httpcore's network stream,
with h11 (through httpcore's connection) as the fallback for all that ``h1`` does not take.

The one module that touches private state of h11 and httpcore (h11's receive buffer, body
readers, header list and size limit; httpcore's connection state, stream and expiry), pinned to
their minor versions in pyproject.toml. h11 per exchange was over half of the app's own time per
non-streamed request and most of the per-chunk cost: plain exchanges go past it (``DIRECT``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import h11
import httpcore
from httpcore import AsyncHTTP11Connection

from gateway import h1
from gateway.h1 import fields_valid, parse_head, plain_request, request_bytes
from gateway.netio import Stream as NetStream
from gateway.pump import Pump
from gateway.types import Send

try:  # h11's body readers: the body is taken over from them before they have read anything
    from h11._readers import ChunkedReader, ContentLengthReader
except ImportError:  # pragma: no cover - a later h11 that moved them; then h11 frames bodies itself
    ChunkedReader = ContentLengthReader = None  # type: ignore[assignment,misc]
try:  # h11's header list: built directly once the headers are known to be valid
    from h11._headers import Headers as H11Headers
except ImportError:  # pragma: no cover - a later h11 that moved it; then h11 checks each header
    H11Headers = None  # type: ignore[assignment,misc]
from httpcore._async.http11 import HTTPConnectionState

_IDLE, _NEW, _ACTIVE = HTTPConnectionState.IDLE, HTTPConnectionState.NEW, HTTPConnectionState.ACTIVE


def _h11_internals_known() -> bool:
    """Whether this h11 has the receive buffer, readers and limit used here."""
    if ChunkedReader is None:
        return False
    probe, chunked, sized = h11.Connection(h11.CLIENT), ChunkedReader(), ContentLengthReader(1)
    return (
        all(hasattr(probe, a) for a in ("_reader", "_max_incomplete_event_size", "_receive_buffer"))
        and all(hasattr(chunked, a) for a in ("_bytes_in_chunk", "_bytes_to_discard", "_reading_trailer"))
        and all(hasattr(sized, a) for a in ("_length", "_remaining"))
        and hasattr(probe._receive_buffer, "maybe_extract_at_most")
    )


#: Bodies h11 has started are decoded by ``h1`` (else h11 frames them, slower, equally correct).
FAST_CHUNKED = _h11_internals_known()
#: ``exchange`` goes past h11's state machine for the requests and responses that need none of it.
DIRECT = FAST_CHUNKED and H11Headers is not None


def _h11_fields(headers: list[tuple[bytes, bytes]]) -> H11Headers:
    """h11's own header list for headers that ``fields_valid`` passed (h11 checks none again)."""
    return H11Headers([(n, n, v) for n, v in headers])


def _disconnected() -> httpcore.RemoteProtocolError:
    return httpcore.RemoteProtocolError("Server disconnected without sending a response.")


class Connection(AsyncHTTP11Connection):
    """One backend connection, used by one request at a time.

    The relay's interface: ``exchange`` (send a request, get the response head), then the body by
    ``body_in_hand`` or ``iter_body`` (``body_complete`` says a piece was the last), then
    ``close_response``; ``reusable`` and ``request_sent`` for the pool and the resend rule.
    httpcore's ``handle_async_request`` works too, but its error paths need anyio (not a
    dependency): the gateway itself does not call it.
    """

    def __init__(self, origin: httpcore.Origin, stream: httpcore.AsyncNetworkStream, keepalive_expiry: float | None):
        super().__init__(origin=origin, stream=stream, keepalive_expiry=keepalive_expiry)
        # The pool hands a connection to one request at a time, so httpcore's state lock (an
        # anyio lock, several task look-ups per request) guards nothing here.
        self._state_lock = contextlib.nullcontext()  # type: ignore[assignment]
        #: The piece of the body just handed out was its last (known only where the framing says
        #: so before the read that would end it: a Content-Length body on the direct path).
        self.body_complete = False
        #: The current exchange took the direct path: h11 has not seen it.
        self._direct = False
        #: Direct path: the request as sent (for a hand-over to h11), the response head's bytes,
        #: its framing (``h1.parse_head``), and the bytes read past the head.
        self._sent: tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes] | None = None
        self._head = b""
        self._length = 0
        self._rest = b""
        #: Whatever came after the end of the response (then the connection is not reused).
        self._extra = b""
        self._decoder: h1.ChunkedBody | h1.SizedBody | None = None
        self._counted = 0  # body pieces counted without a decoder

    # -- the interface --------------------------------------------------------------------------

    @property
    def body_chunks(self) -> int:
        """Body chunks of the current response so far, as the backend framed them (HTTP chunks of
        a chunked body, usually one SSE event each); ``iter_body`` may yield several at once."""
        decoder = self._decoder
        return self._counted if decoder is None else decoder.chunks

    @property
    def reusable(self) -> bool:
        """Whether the response was read to its end and nothing came after it."""
        # h11's trailing_data would copy its buffer for the same answer: is anything in it.
        return self._state is _IDLE and not self._h11_state._receive_buffer

    @property
    def request_sent(self) -> bool:
        """Whether any byte of the current request went out (unknown: assume so)."""
        stream = self._network_stream
        return stream.written > 0 if isinstance(stream, NetStream) else True

    async def exchange(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float | None,  # noqa: ASYNC109 - per read and write, as httpcore's are
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Send one request and read its response head: the status and the raw headers. The body
        follows; then ``close_response()``. Same bytes, state and exceptions as httpcore's
        ``handle_async_request``, in one write and without its per-request objects.

        A plain request (``h1.plain_request``) goes out as the bytes h11 would write, and a head
        that h11 would read to the same status and fields (``h1.parse_head``), whole in the first
        read, is read here; any other answer is handed to h11 with the request replayed into its
        state, so it is read, framed and refused exactly as on h11's own path. A ``WriteError`` is
        passed over to read the answer, as httpcore does: a server may answer and close before
        reading the whole request.
        """
        state = self._state
        if state is not _IDLE and state is not _NEW:
            raise httpcore.ConnectionNotAvailable()
        self._request_count += 1
        self._state = _ACTIVE
        self._expire_at = None
        self.body_complete = False
        self._decoder, self._counted = None, 0
        stream = self._network_stream
        if isinstance(stream, NetStream):
            stream.written = 0
        valid = fields_valid(headers)
        if not (
            DIRECT
            and valid
            and plain_request(method, target, headers, body)
            and not self._h11_state._receive_buffer  # bytes already here are h11's to read (never via the pool)
        ):
            return await self._h11_exchange(method, target, headers, body, timeout, valid)
        self._direct = True
        self._sent = (method, target, headers, body)
        try:
            try:
                await stream.write(request_bytes(method, target, headers, body), timeout=timeout)
            except httpcore.WriteError:
                pass  # read the answer anyway, as httpcore does
            received = await stream.read(self.READ_NUM_BYTES, timeout=timeout)
            if not received:
                raise _disconnected()
            end = received.find(b"\r\n\r\n")
            head = parse_head(received, end) if end >= 0 else None
            if head is None:  # h11 reads this one: a head in several reads, or one that needs h11
                self._to_h11(received)
                return await self._h11_head(timeout)
        except BaseException:
            await self.close_response()  # not read to the end: closed
            raise
        status, raw, self._length = head
        self._head = received[: end + 4]
        self._rest = received[end + 4 :]
        return status, raw

    def body_in_hand(self) -> bytes | None:
        """The whole body when it came in the read that brought the head (a Content-Length body on
        the direct path): the response ends with it, as ``iter_body`` would end it after one
        piece. None when there is more to read, or none (then ``iter_body``)."""
        length = self._length
        if not self._direct or length <= 0 or len(self._rest) < length:
            return None
        data, self._rest = self._rest, b""
        self.body_complete, self._extra = True, data[length:]
        self._counted = 1
        return data[:length] if len(data) > length else data

    def iter_body(self, first_timeout: float | None, idle_timeout: float | None) -> AsyncIterator[bytes]:
        """The response body, piece by piece as it arrives (all of one read in one piece),
        waiting at most ``first_timeout`` for the first piece and ``idle_timeout`` between
        pieces. Close the response afterwards: a body not read to the end closes the connection.

        A chunked or Content-Length body is decoded by ``h1`` (also when h11 read the head: its
        state is then kept exactly where its own reading would leave it); any other by h11.
        """
        if self._direct:
            if self._length == h1.CHUNKED:
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

    def pumped(
        self, send: Send, handle: Callable[[bytes], object], first_timeout: float | None, idle_timeout: float | None
    ) -> Awaitable[bool] | None:
        """The body relayed to ``send`` by the socket's callbacks (``gateway.pump``), each piece
        given to ``handle`` first: what ``iter_body`` and a loop of sends would do, without a task
        wake-up per piece; True if the last piece went out as the final body message. None where
        only ``iter_body`` serves: a body h11 read the head of, an empty one, another network."""
        stream = self._network_stream
        if not self._direct or not self._length or type(stream) is not NetStream:
            return None
        return self._pump(stream, send, handle, first_timeout, idle_timeout)

    async def _pump(
        self,
        stream: NetStream,
        send: Send,
        handle: Callable[[bytes], object],
        first_timeout: float | None,
        idle_timeout: float | None,
    ) -> bool:
        proto = stream._proto
        data, self._rest = self._rest, b""
        if proto._chunks:
            data += proto.take(proto._buffered)
        length = self._length
        if length == h1.CHUNKED:
            decoder: h1.ChunkedBody | h1.SizedBody = h1.ChunkedBody(self._h11_state._max_incomplete_event_size)
        else:
            decoder = h1.SizedBody(length)
        self._decoder = decoder
        pump = Pump(proto, decoder, send, handle, stream._loop, first_timeout, idle_timeout)
        try:
            last_sent = await pump.run(data)
        finally:
            pump.detach()
        if decoder.state is h1.BodyState.DONE:
            self.body_complete, self._extra = True, decoder.extra
            return last_sent
        assert isinstance(decoder, h1.ChunkedBody)
        if decoder.error is not None:
            raise httpcore.RemoteProtocolError(str(decoder.error))
        # Trailers, or their end still to come: h11 reads them from the last chunk on.
        self._to_h11(self._head + decoder.tail)
        await self._h11_end(idle_timeout)
        return False

    async def close_response(self) -> None:
        """After a response: back to idle if it was read to the end, else closed."""
        self._sent = None
        if self._direct:
            self._direct = False
            self._head = self._rest = b""
            if self.body_complete and not self._extra:
                self._state = _IDLE
                if self._keepalive_expiry is not None:
                    self._expire_at = time.monotonic() + self._keepalive_expiry
            else:
                self._extra = b""
                await self.aclose()
            return
        await self._response_closed()

    # -- the direct path ----------------------------------------------------------------------

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

    async def _sized(self, first_timeout: float | None, idle_timeout: float | None) -> AsyncIterator[bytes]:
        """A Content-Length body, each read yielded as it arrives. On h11's path, h11 then ends the
        message (and keeps any bytes past the body, so the pool does not reuse the connection)."""
        state = self._h11_state
        direct = self._direct
        if direct:
            self._decoder = decoder = h1.SizedBody(self._length)
            data, self._rest = self._rest, b""
            if decoder.finished:  # an empty body: the message ended with its head
                self.body_complete, self._extra = True, data
                return
        else:
            reader: ContentLengthReader = state._reader  # type: ignore[assignment]  # checked by iter_body
            self._decoder = decoder = h1.SizedBody(reader._length, reader._remaining)
            data = self._take_h11_buffer()
        feed = decoder.feed
        read = self._network_stream.read
        size = self.READ_NUM_BYTES
        timeout = first_timeout
        while True:
            if data:
                piece = feed(data)
                if decoder.finished:
                    if direct:  # ended before the last piece goes out: see ``body_complete``
                        self.body_complete, self._extra = True, decoder.extra
                        yield piece
                        return
                    yield piece
                    reader._remaining = 0
                    if decoder.extra:
                        state.receive_data(decoder.extra)
                    await self._h11_end(idle_timeout)
                    return
                if not direct:
                    reader._remaining = decoder.left
                yield piece
                timeout = idle_timeout
            data = await read(size, timeout)
            if not data:
                raise httpcore.RemoteProtocolError(str(decoder.eof_error()))

    async def _dechunk(self, first_timeout: float | None, idle_timeout: float | None) -> AsyncIterator[bytes]:
        """A chunked body's data, decoded by ``h1.ChunkedBody``: data is yielded as soon as any of
        it is here. Trailers, if any, are h11's to read (and on h11's path the last chunk too, so
        its state ends where its own reading would end it)."""
        state = self._h11_state
        direct = self._direct
        if direct:
            data, self._rest = self._rest, b""
        else:
            data = self._take_h11_buffer()
        self._decoder = decoder = h1.ChunkedBody(state._max_incomplete_event_size)
        feed = decoder.feed
        read = self._network_stream.read
        size = self.READ_NUM_BYTES
        timeout = first_timeout
        while True:
            if data:
                piece = feed(data)
                if piece:  # data before a framing error is relayed first, as h11 does
                    yield piece
                    timeout = idle_timeout
                if decoder.finished:
                    break
            data = await read(size, timeout)
            if not data:
                raise httpcore.RemoteProtocolError(str(decoder.eof_error()))
        if decoder.error is not None:
            raise httpcore.RemoteProtocolError(str(decoder.error))
        if not direct:
            state.receive_data(decoder.tail)
        elif decoder.state is h1.BodyState.DONE:
            self.body_complete, self._extra = True, decoder.extra
            return
        else:  # trailers, or their end still to come: h11 reads them from the last chunk on
            self._to_h11(self._head + decoder.tail)
        await self._h11_end(idle_timeout)

    # -- h11's path -----------------------------------------------------------------------------

    async def _h11_exchange(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        timeout: float | None,  # noqa: ASYNC109
        valid: bool,
    ) -> tuple[int, list[tuple[bytes, bytes]]]:
        """``exchange`` through h11's events, which check and refuse what h11 refuses; the
        connection is closed on any failure."""
        fields = _h11_fields(headers) if valid and H11Headers is not None else None
        h11_state = self._h11_state
        try:
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
                    raise _disconnected()
                h11_state.receive_data(received)
            return await self._h11_head(timeout)
        except BaseException:
            await self._response_closed()  # no await inside can be interrupted: no lock, see netio
            raise

    async def _receive_event(self, timeout: float | None = None) -> h11.Event | type[h11.PAUSED]:  # noqa: ASYNC109
        # httpcore's own enters ``map_exceptions`` (a contextlib manager) per event; a plain try
        # does the same work.
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
                raise _disconnected()
            state.receive_data(data)

    async def _h11_head(self, timeout: float | None) -> tuple[int, list[tuple[bytes, bytes]]]:  # noqa: ASYNC109
        """h11's response head, past any 1xx (a 101 is the answer itself)."""
        while True:
            head = await self._receive_event(timeout)
            if type(head) is h11.Response or (type(head) is h11.InformationalResponse and head.status_code == 101):
                return head.status_code, head.headers.raw_items()

    async def _h11_body(self, first_timeout: float | None, idle_timeout: float | None) -> AsyncIterator[bytes]:
        """The body as h11 frames it (one generator, where ``response.stream`` nests two)."""
        timeout = first_timeout
        while True:
            event = await self._receive_event(timeout)
            timeout = idle_timeout
            if type(event) is h11.Data:
                self._counted += 1
                yield bytes(event.data)  # h11 hands out a bytearray; ASGI bodies are bytes
            elif type(event) is h11.EndOfMessage or event is h11.PAUSED:
                return

    async def _h11_end(self, timeout: float | None) -> None:  # noqa: ASYNC109
        while type(await self._receive_event(timeout)) is not h11.EndOfMessage:
            pass

    def _take_h11_buffer(self) -> bytes:
        buffer = self._h11_state._receive_buffer
        taken = buffer.maybe_extract_at_most(len(buffer))
        return bytes(taken) if taken else b""
