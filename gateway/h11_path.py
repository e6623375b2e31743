"""h11's path for ``gateway.connection``: the exchanges ``gateway.h1`` does not take, read and
written through h11's events (``H11Path``), and the private parts of h11 and httpcore the
connection relies on, looked up once.

h11's receive buffer, body readers, header list and size limit, and httpcore's connection
states are not public API: the versions are pinned in pyproject.toml, and each piece is checked
for here at import. Where one is missing, the connection takes h11's path for everything (slower,
equally correct): ``FAST_CHUNKED`` and ``DIRECT`` say what is available.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import h11
import httpcore
from httpcore import AsyncHTTP11Connection
from httpcore._async.http11 import HTTPConnectionState

try:  # h11's body readers: the body is taken over from them before they have read anything
    from h11._readers import ChunkedReader, ContentLengthReader
except ImportError:  # pragma: no cover - a later h11 that moved them; then h11 frames bodies itself
    ChunkedReader = ContentLengthReader = None  # type: ignore[assignment,misc]
try:  # h11's header list: built directly once the headers are known to be valid
    from h11._headers import Headers as H11Headers
except ImportError:  # pragma: no cover - a later h11 that moved it; then h11 checks each header
    H11Headers = None  # type: ignore[assignment,misc]

__all__ = [
    "ACTIVE",
    "DIRECT",
    "FAST_CHUNKED",
    "IDLE",
    "NEW",
    "ChunkedReader",
    "ContentLengthReader",
    "H11Path",
    "disconnected",
    "h11_fields",
]

IDLE, NEW, ACTIVE = HTTPConnectionState.IDLE, HTTPConnectionState.NEW, HTTPConnectionState.ACTIVE


def _h11_internals_known() -> bool:
    """Whether this h11 has the receive buffer, readers and limit ``connection`` uses."""
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
#: ``Connection.exchange`` goes past h11's state machine for the exchanges that need none of it.
DIRECT = FAST_CHUNKED and H11Headers is not None


def h11_fields(headers: list[tuple[bytes, bytes]]) -> H11Headers:
    """h11's own header list for headers that ``h1.fields_valid`` passed (h11 checks none again)."""
    return H11Headers([(n, n, v) for n, v in headers])


def disconnected() -> httpcore.RemoteProtocolError:
    return httpcore.RemoteProtocolError("Server disconnected without sending a response.")


class H11Path(AsyncHTTP11Connection):
    """httpcore's HTTP/1.1 connection with h11's path as ``gateway.connection.Connection`` drives
    it: an exchange through h11's events, its head, its body, its end."""

    #: Body pieces counted without a decoder (``Connection.body_chunks``).
    _counted: int

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
        fields = h11_fields(headers) if valid and H11Headers is not None else None
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
                    raise disconnected()
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
                raise disconnected()
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
