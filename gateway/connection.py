"""One HTTP/1.1 connection to a backend: ``gateway.h1`` driven over httpcore's network stream,
with h11 (through httpcore's connection) as the fallback for all that ``h1`` does not take.

With ``gateway.h11_path`` (h11's own path, the fallback, and the private names of h11 and
httpcore, looked up and checked there), the only module that touches private state of h11 and
httpcore (h11's receive buffer, body readers, header list and size limit; httpcore's connection
state, stream and expiry), pinned to their minor versions in pyproject.toml. h11 per exchange was
over half of the app's own time per non-streamed request and most of the per-chunk cost: plain
exchanges go past it (``DIRECT``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import h11
import httpcore

from gateway import h1
from gateway.h1 import fields_valid, plain_request, read_head, request_bytes
from gateway.h11_path import ACTIVE, IDLE, NEW, ChunkedReader, ContentLengthReader, H11Path, disconnected, h11_fields
from gateway.h11_path import DIRECT as DIRECT
from gateway.h11_path import FAST_CHUNKED as FAST_CHUNKED
from gateway.netio import Stream as NetStream
from gateway.pump import Pump
from gateway.types import Send


class Connection(H11Path):
    """One backend connection, used by one request at a time.

    The relay's interface: ``exchange`` (send a request, get the response head), then the body by
    ``body_in_hand``, ``pumped`` or ``iter_body`` (``body_complete`` says a piece was the last), then
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
        return self._state is IDLE and not self._h11_state._receive_buffer

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
        if state is not IDLE and state is not NEW:
            raise httpcore.ConnectionNotAvailable()
        self._request_count += 1
        self._state = ACTIVE
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
                raise disconnected()
            end = received.find(b"\r\n\r\n")
            head = read_head(received, end) if end >= 0 else None
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
        self, send: Send, handle: Callable[[bytes], float], first_timeout: float | None, idle_timeout: float | None
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
        handle: Callable[[bytes], float],
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
        await self._direct_end(decoder, idle_timeout)
        return last_sent

    async def close_response(self) -> None:
        """After a response: back to idle if it was read to the end, else closed."""
        self._sent = None
        if self._direct:
            self._direct = False
            self._head = self._rest = b""
            if self.body_complete and not self._extra:
                self._state = IDLE
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
        state.send(h11.Request(method=method, target=target, headers=h11_fields(headers), _parsed=True))
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
        if direct:
            await self._direct_end(decoder, idle_timeout)
            return
        if decoder.error is not None:
            raise httpcore.RemoteProtocolError(str(decoder.error))
        state.receive_data(decoder.tail)
        await self._h11_end(idle_timeout)

    async def _direct_end(self, decoder: h1.ChunkedBody | h1.SizedBody, idle_timeout: float | None) -> None:  # noqa: ASYNC109
        """A direct-path body's decoder finished: the message ended (``body_complete``; what came
        after it is kept, so the pool does not reuse the connection), its framing broke (raised,
        after the data before the fault went out), or trailers follow (h11 reads them from the
        last chunk on)."""
        if decoder.state is h1.BodyState.DONE:
            self.body_complete, self._extra = True, decoder.extra
            return
        assert isinstance(decoder, h1.ChunkedBody)  # a sized body can only end
        if decoder.error is not None:
            raise httpcore.RemoteProtocolError(str(decoder.error))
        self._to_h11(self._head + decoder.tail)
        await self._h11_end(idle_timeout)
