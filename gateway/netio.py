"""An asyncio-native network backend for httpcore: one Protocol per connection.

httpcore's default asyncio backend goes through anyio, which opens a cancel scope for every read
and write (``fail_after``). Here a read is a buffer pop when data is already there, or one future
and a deadline when it must wait (one timer per stream checks the deadlines); whether an idle
keep-alive connection was closed by the backend is known from the protocol's callbacks, without
a syscall. Reading pauses when more than ``HIGH_WATER`` bytes are buffered, so a slow client's
backpressure reaches the backend.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore
from httpcore import AsyncNetworkBackend, AsyncNetworkStream

HIGH_WATER = 256 * 1024

SocketOption = tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]


class _Protocol(asyncio.Protocol):
    __slots__ = (
        "_loop",
        "transport",
        "_chunks",
        "_buffered",
        "_eof",
        "_exc",
        "_waiter",
        "_paused",
        "_drain",
        "_write_paused",
        "sink",
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        # Reads not yet taken; a list, as ``take`` empties it at once (a deque would hold a 64-slot
        # block, ~0.7 KiB, for every upstream connection).
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._eof = False
        self._exc: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        #: Takes each read instead of the buffer while a body is relayed from these callbacks
        #: (``gateway.pump.Pump``: its ``data`` and ``ended``).
        self.sink: Any = None

    # -- callbacks from the event loop -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is not None:
            sink.data(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self._eof = True
        if self.sink is not None:
            self.sink.ended(None)
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._exc = exc
        if self.sink is not None:
            self.sink.ended(exc)
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # -- used by the stream ------------------------------------------------------------------

    def take(self, max_bytes: int) -> bytes:
        """What has arrived, up to ``max_bytes``: the reads waiting are handed over together."""
        chunks = self._chunks
        chunk = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if len(chunk) > max_bytes:
            chunks.append(chunk[max_bytes:])
            chunk = chunk[:max_bytes]
        self._buffered -= len(chunk)
        if self._paused and self._buffered <= HIGH_WATER // 4 and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk


def _on_timeout(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())


class Stream(AsyncNetworkStream):
    """One TCP (or TLS) connection as httpcore sees it.

    A read that has to wait does not arm a timer of its own: it sets the stream's read deadline,
    and one timer per stream, armed only when none is due by then, checks the deadline when it
    fires (and re-arms for a later one). A stream of paced tokens waits once per token; this
    keeps that wait to a future and a clock read.
    """

    __slots__ = ("_proto", "_loop", "written", "_deadline", "_timer")

    def __init__(self, proto: _Protocol, loop: asyncio.AbstractEventLoop) -> None:
        self._proto = proto
        self._loop = loop
        #: Bytes of the current request handed to the transport (reset when a request starts).
        self.written = 0
        #: When the read now waiting times out (loop time); None: it may wait for ever.
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    def _check_deadline(self) -> None:
        self._timer = None
        waiter = self._proto._waiter
        deadline = self._deadline
        if waiter is None or waiter.done() or deadline is None:
            return  # no read waiting: the next one arms the timer again
        if self._loop.time() >= deadline:
            waiter.set_exception(TimeoutError())
        else:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 - httpcore's API
        proto = self._proto
        if proto._chunks:
            return proto.take(max_bytes)
        if proto._eof:
            if proto._exc is not None:
                raise httpcore.ReadError(str(proto._exc) or type(proto._exc).__name__)
            return b""
        loop = self._loop
        fut: asyncio.Future[None] = loop.create_future()
        proto._waiter = fut
        if timeout is None:
            self._deadline = None
        else:
            self._deadline = deadline = loop.time() + timeout
            timer = self._timer
            if timer is None or timer.when() > deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = loop.call_at(deadline, self._check_deadline)
        try:
            await fut
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no data within {timeout:g} s") from None
        finally:
            proto._waiter = None
        if proto._chunks:
            return proto.take(max_bytes)
        if proto._exc is not None:
            raise httpcore.ReadError(str(proto._exc) or type(proto._exc).__name__)
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109
        if not buffer:
            return
        proto = self._proto
        transport = proto.transport
        if transport is None or transport.is_closing() or proto._eof and proto._exc is not None:
            raise httpcore.WriteError("connection closed")
        transport.write(buffer)
        self.written += len(buffer)
        if not proto._write_paused:
            return
        fut: asyncio.Future[None] = self._loop.create_future()
        proto._drain = fut
        timer = self._loop.call_later(timeout, _on_timeout, fut) if timeout is not None else None
        try:
            await fut
        except TimeoutError:
            raise httpcore.WriteTimeout(f"could not write within {timeout:g} s") from None
        finally:
            proto._drain = None
            if timer is not None:
                timer.cancel()

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._proto.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's API
    ) -> AsyncNetworkStream:
        transport = self._proto.transport
        assert transport is not None
        try:
            async with asyncio.timeout(timeout):
                new = await self._loop.start_tls(transport, self._proto, ssl_context, server_hostname=server_hostname)
        except TimeoutError:
            transport.abort()
            raise httpcore.ConnectTimeout(f"TLS handshake not done within {timeout:g} s") from None
        except (OSError, ssl.SSLError) as exc:
            transport.abort()
            raise httpcore.ConnectError(str(exc)) from None
        assert new is not None
        self._proto.transport = new
        return self

    def get_extra_info(self, info: str) -> Any:
        proto = self._proto
        if info == "is_readable":
            # For an idle connection: anything buffered, or EOF, means the backend closed it.
            return bool(proto._chunks) or proto._eof
        transport = proto.transport
        if transport is None:
            return None
        if info == "socket":
            return transport.get_extra_info("socket")
        if info == "ssl_object":
            return transport.get_extra_info("ssl_object")
        if info == "client_addr":
            return transport.get_extra_info("sockname")
        if info == "server_addr":
            return transport.get_extra_info("peername")
        return None


class AsyncioBackend(AsyncNetworkBackend):
    """``httpcore.AsyncNetworkBackend`` on the running asyncio (uvloop) loop."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's API
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        proto = _Protocol(loop)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(
                    lambda: proto, host, port, local_addr=(local_address, 0) if local_address else None
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection to {host}:{port} within {timeout:g} s") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from None
        sock: socket.socket | None = proto.transport.get_extra_info("socket") if proto.transport else None
        if sock is not None:
            for option in socket_options or ():
                sock.setsockopt(*option)
        return Stream(proto, loop)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
