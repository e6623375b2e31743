"""Send one request upstream and relay its response, chunk by chunk, as it arrives.

Nothing here parses or waits for the body: whatever one read from the backend brings is sent on
at once as one ``http.response.body`` message (see ``Connection.iter_body``). A failure after the
response has started ends an event stream with a final ``data: {"error":...}`` event, so a cut
answer never looks complete.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import TYPE_CHECKING

import httpcore

from gateway.errors import JSON_HEADERS, GatewayError, sse_error_event
from gateway.netio import Stream as NetStream
from gateway.types import Send

if TYPE_CHECKING:
    from gateway.balance import Backend, Replica
from gateway.exchange import Exchange
from gateway.upstream import DROP_RESPONSE_HEADERS, Connection, Pool

log = logging.getLogger("gateway")

SSE_EXTRA_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
#: Dropped from an event stream's headers: ours replace the first two; a stream has no length.
_DROP_SSE = DROP_RESPONSE_HEADERS | {b"cache-control", b"x-accel-buffering", b"content-length"}

#: Errors that mean a reused keep-alive connection had been closed by the backend before our
#: request reached it: safe to try once more on another connection.
_STALE = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


def _written(conn: Connection) -> bool:
    """Whether any byte of the request was handed to the connection (unknown: assume so)."""
    stream = conn._network_stream
    return stream.written > 0 if isinstance(stream, NetStream) else True


def response_headers(raw: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Relayed headers (hop-by-hop ones dropped) and whether the body is an event stream."""
    sse = False
    listed: set[bytes] | None = None
    for name, value in raw:
        lower = name.lower()
        if lower == b"content-type":
            sse = value[:17].lower() == b"text/event-stream"
        elif lower == b"connection":  # the fields it names are for that hop only (RFC 9110 7.6.1)
            listed = (listed or set()) | {t.strip().lower() for t in value.split(b",")}
    drop = _DROP_SSE if sse else DROP_RESPONSE_HEADERS
    if listed:
        drop = drop | listed
    out = [(name, value) for name, value in raw if name.lower() not in drop]
    if sse:
        out.extend(SSE_EXTRA_HEADERS)
    return out, sse


class Timeouts:
    """Per-phase limits in seconds: each its own error (see upstream.map_error)."""

    __slots__ = ("header", "first_token", "idle")

    def __init__(self, header: float, first_token: float, idle: float) -> None:
        #: Per read and write until the response head is in (Connection.exchange); the body is
        #: read by Connection.iter_body with first_token / idle.
        self.header = header
        self.first_token = first_token
        self.idle = idle


#: Answers retried on another replica while nothing has gone to the client yet.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
#: A retried answer is kept (to relay it if every attempt fails) up to this size.
_KEEP_LIMIT = 64 * 1024


async def forward(
    backend: Backend,
    method: bytes,
    path: bytes,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    timeouts: Timeouts,
    retries: int,
    send: Send,
    ex: Exchange,
    sticky: bytes | None = None,
) -> None:
    """Forward one request to one of the backend's replicas and relay the response.

    Connect failures and 429/502/503/504 answers are retried on another replica, up to
    ``retries`` more times, only while nothing has been sent to the client; when the budget is
    spent the last answer is relayed unchanged. httpcore's exceptions propagate.
    """
    tried: list[Replica] = []
    kept: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None
    while True:
        replica = backend.pick(tried, sticky)
        tried.append(replica)
        may_retry = len(tried) <= retries and len(tried) < len(backend.replicas)
        target = replica.target
        upstream_target = target.upstream_target(path, query)
        all_headers = [*target.static_headers, *headers]
        replica.inflight += 1
        try:
            try:
                conn, status, response_headers = await _send(
                    replica.pool, method, upstream_target, all_headers, body, timeouts.header, ex
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout):
                backend.failed(replica)
                if may_retry:
                    continue
                if kept is not None:
                    await _relay_kept(send, ex, kept)
                    return
                raise
            if status in RETRY_STATUSES and may_retry:
                kept = (status, response_headers, await _read_kept(replica.pool, conn))
                if status == 429:
                    backend.cool_off(replica, _retry_after(response_headers))
                else:
                    backend.failed(replica)
                continue
            if status >= 500:
                backend.failed(replica)
            else:
                backend.succeeded(replica)
            await _relay(replica.pool, conn, status, response_headers, timeouts, send, ex)
            return
        finally:
            replica.inflight -= 1


async def _send(
    pool: Pool,
    method: bytes,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    header_timeout: float,
    ex: Exchange,
) -> tuple[Connection, int, list[tuple[bytes, bytes]]]:
    """A connection and the response headers; a reused connection the backend had closed while
    idle is replaced (up to twice) before giving up."""
    attempts = 0
    while True:
        ex.phase = "connect"
        conn, reused = await pool.acquire()
        ex.phase = "headers"
        ex.t_upstream = perf_counter()
        stream = conn._network_stream
        if isinstance(stream, NetStream):
            stream.written = 0
        try:
            status, response_headers = await conn.exchange(method, target, headers, body, header_timeout)
            return conn, status, response_headers
        except _STALE:
            pool.release(conn)  # httpcore closed it: discarded
            attempts += 1
            # The backend had closed the idle connection: send again on another one, unless the
            # request may have reached it (some bytes went out) and is not idempotent.
            if reused and attempts < 3 and (method in _IDEMPOTENT or not _written(conn)):
                continue
            raise
        except BaseException:
            pool.release(conn)
            raise


async def _read_kept(pool: Pool, conn: Connection) -> bytes:
    """Read a response we may relay later (a retried error answer), bounded."""
    parts, size = [], 0
    try:
        async for chunk in conn.iter_body(5.0, 5.0):
            parts.append(chunk)
            size += len(chunk)
            if size > _KEEP_LIMIT:
                break
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.RemoteProtocolError):
        pass
    finally:
        await conn.close_response()
        pool.release(conn)
    return b"".join(parts)[:_KEEP_LIMIT]


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return 1.0
    return 1.0


async def _relay_kept(send: Send, ex: Exchange, kept: tuple[int, list[tuple[bytes, bytes]], bytes]) -> None:
    status, raw_headers, body = kept
    relayed, ex.sse = response_headers(raw_headers)
    relayed = [(n, v) for n, v in relayed if n.lower() != b"content-length"]
    relayed.append((b"content-length", str(len(body)).encode()))
    relayed.append((b"x-request-id", ex.request_id))
    relayed.extend(ex.extra_headers)
    ex.status = status
    await send({"type": "http.response.start", "status": status, "headers": relayed})
    ex.started = True
    ex.active = False
    ex.nbytes = len(body)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _relay(
    pool: Pool,
    conn: Connection,
    status: int,
    raw_headers: list[tuple[bytes, bytes]],
    timeouts: Timeouts,
    send: Send,
    ex: Exchange,
) -> None:
    last_sent = False
    try:
        try:
            relayed, ex.sse = response_headers(raw_headers)
            relayed.append((b"x-request-id", ex.request_id))
            relayed.extend(ex.extra_headers)
            ex.status = status
            await send({"type": "http.response.start", "status": status, "headers": relayed})
            ex.started = True
            ex.phase = "first_token" if ex.sse else "body"
            first = timeouts.first_token if ex.sse else timeouts.idle
            end_known = conn.end_known_early
            whole = conn.body_in_hand()
            if whole is not None:  # the usual short answer: its one piece is already here
                ex.t_first = ex.t_last = perf_counter()
                ex.phase = "body"
                ex.nbytes = len(whole)
                ex.last = whole
                last_sent = True
                await send({"type": "http.response.body", "body": whole, "more_body": False})
            else:
                async for chunk in conn.iter_body(first, timeouts.idle):
                    # Per piece: a timestamp, one comparison, a byte count. Nothing else.
                    now = perf_counter()
                    if ex.t_first:
                        gap = now - ex.t_last
                        if gap > ex.max_gap:
                            ex.max_gap = gap
                    else:
                        ex.t_first = now
                        ex.phase = "body"
                    ex.t_last = now
                    ex.nbytes += len(chunk)
                    ex.prev = ex.last
                    ex.last = chunk
                    if end_known and conn.body_complete:
                        # The last piece ends the response: one send fewer, and a body whole in
                        # one piece is one message to Granian (a plain response, no streamed body).
                        last_sent = True
                        await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    else:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        finally:
            ex.chunks = conn.body_chunks
            # Closes the connection unless the body was read to the end: this is what makes
            # the backend abort a generation nobody will read.
            await conn.close_response()
    finally:
        pool.release(conn)
    ex.active = False
    if not last_sent:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def send_error(send: Send, err: GatewayError, ex: Exchange) -> None:
    ex.status = err.status
    headers = [*JSON_HEADERS, (b"x-request-id", ex.request_id)]
    if err.headers:
        headers.extend(err.headers)
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": err.body(), "more_body": False})


async def fail(send: Send, ex: Exchange, err: GatewayError) -> None:
    """Tell the client about a failure in whatever phase it happened."""
    ex.active = False
    if not ex.started:
        await send_error(send, err, ex)
        return
    if ex.sse:
        event = sse_error_event(err.message, err.type, err.code, ex.tail())
        ex.nbytes += len(event)
        await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    else:
        # A plain body cut mid-way: nothing can be appended that a JSON parser would accept, and
        # ending the response normally would close the chunked body cleanly, so the client would
        # take the cut body as complete. Returning without the final message makes Granian drop
        # the connection without the last chunk (or short of the Content-Length): the client sees
        # a failed transfer.
        log.warning("upstream body cut after the response started: %s", err.message)
