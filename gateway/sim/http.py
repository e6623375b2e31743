"""A minimal HTTP/1.1 server protocol: just enough for an inference API, and fast.

One ``HttpConnection`` per TCP connection. ``data_received`` parses a request head and its
``Content-Length`` body by hand; once complete the request runs as one task, and further bytes wait
in the buffer until it ends (keep-alive; pipelined requests run one after another). Responses are
written with a known length, or as a chunked stream where every ``send_chunk`` is its own
``transport.write`` (no buffering on our side). When the client goes away, ``connection_lost``
cancels the running task: that is how a generation learns of a disconnect, at once.

Malformed requests get a 400 and the connection is closed. Request bodies must come with a
``Content-Length``; a chunked request body gets 411.
"""

from __future__ import annotations

import asyncio
import http
import socket
import struct
import sys
import traceback
from collections.abc import Awaitable, Callable, Sequence
from typing import cast

import msgspec

from gateway.sim.stats import SimStats

MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024

Headers = Sequence[tuple[bytes, bytes]]
Handler = Callable[["HttpConnection", "Request"], Awaitable[None]]

_SERVER = b"server: gateway-sim\r\n"
_CHUNKED = b"transfer-encoding: chunked\r\n"
_CLOSE = b"connection: close\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_LINGER_RST = struct.pack("ii", 1, 0)
_status_lines: dict[int, bytes] = {}


def status_line(status: int) -> bytes:
    line = _status_lines.get(status)
    if line is None:
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Unknown"
        line = _status_lines[status] = f"HTTP/1.1 {status} {phrase}\r\n".encode()
    return line


class Canned(msgspec.Struct, frozen=True):
    """A whole response known in advance; its bytes are built once."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""


class Request:
    """One parsed request. Header names are lower-case bytes; a repeated header keeps the last value."""

    __slots__ = ("method", "path", "query", "headers", "body", "keep_alive", "http10")

    def __init__(
        self, method: str, path: str, query: str, headers: dict[bytes, bytes], body: bytes, http10: bool
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body = body
        self.http10 = http10
        conn = headers.get(b"connection", b"").lower()
        self.keep_alive = b"keep-alive" in conn if http10 else b"close" not in conn

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} ({len(self.body)} bytes)>"


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


def parse_head(head: bytes) -> tuple[str, str, str, dict[bytes, bytes], bool]:
    """``method, path, query, headers, is_http10`` from the bytes before the blank line."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(505 if version.startswith(b"HTTP/") else 400, "unsupported HTTP version")
    if not method.isalpha() or not method.isupper() or not target.startswith(b"/"):
        raise BadRequest(400, "malformed request line")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in b" \t" or name[:1] in b" \t":
            raise BadRequest(400, "malformed header line")
        name = name.lower()
        value = value.strip(b" \t")
        if name == b"content-length" and headers.get(name, value) != value:
            raise BadRequest(400, "conflicting Content-Length")
        headers[name] = value
    path, _, query = target.partition(b"?")
    try:
        return method.decode("ascii"), path.decode("ascii"), query.decode("ascii"), headers, version == b"HTTP/1.0"
    except UnicodeDecodeError:
        raise BadRequest(400, "non-ASCII request target") from None


class HttpConnection(asyncio.Protocol):
    """One client connection: parse, run the handler, write the answer."""

    def __init__(self, handler: Handler, stats: SimStats, registry: set[HttpConnection]) -> None:
        self._handler = handler
        self._stats = stats
        self._registry = registry
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Task[None] | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._close_after = False
        self._chunked = True
        #: Set once the status line of the current response is written.
        self.started = False
        #: Set once the peer is gone (or we closed): writes are dropped from then on.
        self.lost = False

    # -- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but have its methods.
        self._transport = transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self._stats.connections_total += 1
        self._stats.open_connections += 1
        self._registry.add(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._next_request()
        elif len(self._buffer) > MAX_HEAD + MAX_BODY:
            self._transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        # A half-close is a disconnect for an inference server: stop and close.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._stats.open_connections -= 1
        self._registry.discard(self)
        self._writable.set()
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    # -- request cycle ------------------------------------------------------------------------------

    def _next_request(self) -> None:
        buf = self._buffer
        while buf[:2] == b"\r\n":  # tolerated before a request line
            del buf[:2]
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_HEAD:
                self._refuse(431, "request head too large")
            return
        try:
            method, path, query, headers, http10 = parse_head(bytes(buf[:end]))
            if b"transfer-encoding" in headers:
                raise BadRequest(411, "send the request body with a Content-Length")
            raw_length = headers.get(b"content-length", b"0")
            if not raw_length.isdigit():
                raise BadRequest(400, "bad Content-Length")
            length = int(raw_length)
            if length > MAX_BODY:
                raise BadRequest(413, "request body too large")
        except BadRequest as exc:
            self._refuse(exc.status, str(exc))
            return
        start = end + 4
        if len(buf) < start + length:
            if headers.get(b"expect", b"").lower() == b"100-continue" and len(buf) == start:
                self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]
            return
        body = bytes(buf[start : start + length])
        del buf[: start + length]
        request = Request(method, path, query, headers, body, http10)
        self._close_after = not request.keep_alive
        self._chunked = not http10
        self.started = False
        self._task = asyncio.get_running_loop().create_task(self._run(request))

    async def _run(self, request: Request) -> None:
        try:
            await self._handler(self, request)
        except asyncio.CancelledError:
            pass  # the client went away (or the server is closing)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            if not self.started:
                self.respond(500, (), b"internal error in the simulator\n")
            self._close_after = True
        finally:
            self._task = None
        transport = self._transport
        if self.lost or transport is None:
            return
        if self._close_after:
            self.lost = True
            transport.close()
            return
        transport.resume_reading()
        if self._buffer:
            self._next_request()

    def _refuse(self, status: int, reason: str) -> None:
        self._close_after = True
        self.respond(status, ((b"content-type", b"text/plain; charset=utf-8"),), reason.encode() + b"\n")
        self.lost = True
        self._transport.close()  # type: ignore[union-attr]

    # -- writing ------------------------------------------------------------------------------------

    def _head(self, status: int, headers: Headers) -> bytearray:
        out = bytearray(status_line(status))
        for name, value in headers:
            out += name + b": " + value + b"\r\n"
        out += _SERVER
        if self._close_after:
            out += _CLOSE
        return out

    def respond(
        self, status: int, headers: Headers, body: bytes, *, head_only: bool = False, close: bool = False
    ) -> None:
        """Write a whole response with a Content-Length, in one write; ``close`` ends the
        connection after it (``Connection: close``)."""
        if self.lost:
            return
        self.started = True
        if close:
            self._close_after = True
        out = self._head(status, headers)
        out += b"content-length: %d\r\n\r\n" % len(body)
        if not head_only:
            out += body
        self._transport.write(out)  # type: ignore[union-attr]

    def respond_canned(self, canned: Canned, *, head_only: bool = False, close: bool = False) -> None:
        self.respond(canned.status, canned.headers, canned.body, head_only=head_only, close=close)

    def start_stream(self, status: int, headers: Headers) -> None:
        """Write the head of a streamed response: chunked, or close-delimited for HTTP/1.0."""
        if self.lost:
            return
        self.started = True
        if not self._chunked:
            self._close_after = True
        out = self._head(status, headers)
        if self._chunked:
            out += _CHUNKED
        out += b"\r\n"
        self._transport.write(out)  # type: ignore[union-attr]

    def send_chunk(self, data: bytes) -> None:
        """One piece of a streamed body, written at once as its own chunk."""
        if self.lost or not data:
            return
        if self._chunked:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))  # type: ignore[union-attr]
        else:
            self._transport.write(data)  # type: ignore[union-attr]

    def end_stream(self) -> None:
        if self.lost:
            return
        if self._chunked:
            self._transport.write(_LAST_CHUNK)  # type: ignore[union-attr]

    @property
    def write_blocked(self) -> bool:
        return not self._writable.is_set()

    async def drain(self) -> None:
        """Wait while the client is not reading (the transport's buffer is above its high mark)."""
        await self._writable.wait()

    def reset(self) -> None:
        """Drop the connection with a TCP RST, as a crashed backend would."""
        transport = self._transport
        if self.lost or transport is None:
            return
        self.lost = True
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            except OSError:
                pass
        transport.abort()

    def abort(self) -> None:
        """Server shutdown: stop the running request and drop the connection."""
        if self._task is not None:
            self._task.cancel()
        if self._transport is not None and not self.lost:
            self.lost = True
            self._transport.abort()

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task
