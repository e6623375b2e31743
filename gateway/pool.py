"""A per-worker pool of connections to one replica.

Why our own pool rather than ``httpcore.AsyncConnectionPool``: a request is ended by cancelling
it when its client goes away, in any phase; httpcore's pool can leak a slot when a request is
cancelled while it waits for one (httpcore issue 1093), and it scans every connection per
request. Here acquire and release are O(1), a connection whose response was not read to the end
is closed (which is what makes the backend abort the generation), and a fully read one goes back
on the idle stack. The pool raises httpcore's exceptions only; ``errors.map_error`` turns them
into the client's answer.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

import httpcore

from gateway.connection import Connection
from gateway.handover import HandOver
from gateway.netio import AsyncioBackend
from gateway.target import Target

NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


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


class PoolTimeout(httpcore.PoolTimeout):
    """No connection became free within the pool timeout (``wait`` seconds)."""

    def __init__(self, wait: float) -> None:
        super().__init__(f"no connection became free within {wait:g} s")
        self.wait = wait


class PoolClosed(httpcore.NetworkError):
    """The pool was closed (the worker is shutting down) before it could give a connection."""

    def __init__(self) -> None:
        super().__init__("the pool is closed")


class Pool:
    """Up to ``size`` connections to one origin: an idle stack and a FIFO of waiters.

    State changes are synchronous (no awaits between a check and its update), so no lock is
    needed on one event loop. Whoever ``acquire``s a connection ``release``s it, once, after
    closing its response.
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
        #: Waiters for a connection, or (None) for a free slot to open one in.
        self._queue: HandOver[Connection | None] = HandOver()
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()
        #: Acquires that found every connection busy and waited, and those that gave up (read by
        #: the metrics' sampler once a second).
        self.waits = 0
        self.wait_timeouts = 0

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
        return len(self._queue)

    def __repr__(self) -> str:
        return (
            f"<Pool {self._target.display} [Connections: {self._open} open, {self._active} active, "
            f"{len(self._idle)} idle, size {self._size} | Waiting: {len(self._queue)}]>"
        )

    # -- acquire / release --------------------------------------------------------------------

    async def acquire(self) -> tuple[Connection, bool]:
        """A connection ready for one request, and whether it was reused from the idle stack.

        Raises ``PoolTimeout`` when none became free in time, ``PoolClosed`` once the pool is
        closed, and httpcore's connect exceptions when a new connection cannot be opened.
        """
        if self._closed:
            raise PoolClosed()
        while self._idle:
            conn = self._idle.pop()
            if conn.has_expired():
                self._discard(conn)
                continue
            self._active += 1
            return conn, True
        if self._open >= self._size:
            self.waits += 1
            try:
                handed = await self._queue.wait(self._pool_timeout, self._pass_on)
            except TimeoutError:
                self.wait_timeouts += 1
                raise PoolTimeout(self._pool_timeout) from None
            if handed is not None:
                self._active += 1
                return handed, True
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

    def release(self, conn: Connection) -> None:
        """Take back a connection after its response was closed; reused only if it was read to
        the end and the backend sent nothing past it."""
        self._active -= 1
        if conn.reusable and not self._closed:
            self._put_back(conn)
        else:
            self._discard(conn)

    def _pass_on(self, handed: Connection | None) -> None:
        """What a waiter that gave up had been handed: to the next waiter, or back."""
        if handed is None:
            self._open -= 1
            self._wake_one()
        else:
            self._put_back(handed)

    def _put_back(self, conn: Connection) -> None:
        if not (self._queue.waiters and self._queue.hand(conn)):
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
        if self._open < self._size and self._queue.waiters and self._queue.hand(None):
            self._open += 1

    async def aclose(self) -> None:
        """Close the idle connections and fail every waiter; busy ones close as they come back."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._open -= 1
            await conn.aclose()
        self._queue.fail_all(PoolClosed)
