"""Send one request upstream and relay its response, chunk by chunk, as it arrives.

Nothing here parses or waits for the body: whatever one read from the backend brings is sent on
at once as one ``http.response.body`` message (see ``Connection.iter_body``). A failure after the
response has started ends an event stream with a final error event in the surface's own form
(``surfaces.stream_error``), so a cut answer never looks complete.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from time import perf_counter
from typing import TYPE_CHECKING

import httpcore

from gateway.connection import Connection
from gateway.errors import JSON_HEADERS, GatewayError
from gateway.headers import response_headers
from gateway.surfaces import TOKEN_MARKERS, body_for, stream_error
from gateway.types import Send

if TYPE_CHECKING:
    from gateway.balance import Replica
from gateway.exchange import Exchange, Outgoing

log = logging.getLogger("gateway")

#: Errors that mean a reused keep-alive connection had been closed by the backend before our
#: request reached it: safe to try once more on another connection.
_STALE = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE"})


class Timeouts:
    """Per-phase limits in seconds: each its own error (see errors.map_error)."""

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
#: A retried answer, read to relay it if every attempt fails: status, headers, body.
_Kept = tuple[int, list[tuple[bytes, bytes]], bytes]
#: One attempt on one replica (``attempt``'s signature).
OnReplica = Callable[[Outgoing, "Replica", Timeouts, bool, Send, Exchange], Awaitable[_Kept | None]]


async def forward(
    out: Outgoing, timeouts: Timeouts, retries: int, send: Send, ex: Exchange, on_replica: OnReplica
) -> None:
    """Forward one request to one of its backend's replicas and relay the response.

    Connect failures and 429/502/503/504 answers are retried on another replica, up to
    ``retries`` more times, only while nothing has been sent to the client; when the budget is
    spent the last answer is relayed unchanged. httpcore's exceptions propagate. ``on_replica``
    runs each attempt (``attempt``, or tracing's span around it: ``tracing.Tracing.wrap``).
    """
    backend = out.backend
    tried: list[Replica] = []
    kept: _Kept | None = None
    while True:
        pinned = out.pinned
        if pinned is not None and not tried:
            replica = pinned  # the replica holding the stored response this request names
            ex.balance = "pinned"
        else:
            replica = backend.pick(tried, out.sticky, out.blocks)
            ex.balance = backend.reason
        ex.replica = replica
        tried.append(replica)
        # A request pinned to the replica holding its stored response is not retried elsewhere:
        # no other replica has that response, so the pinned one's answer is the one to relay.
        may_retry = pinned is None and len(tried) <= retries and len(tried) < len(backend.replicas)
        replica.inflight += 1
        try:
            answer = await on_replica(out, replica, timeouts, may_retry, send, ex)
        except (httpcore.ConnectError, httpcore.ConnectTimeout):
            backend.failed(replica)
            if may_retry:
                continue
            if kept is not None:
                await _relay_kept(send, ex, kept)
                return
            raise
        finally:
            replica.inflight -= 1
            if replica.trial:  # its trial got no verdict (the client left, say)
                replica.undecided()
        if answer is None:
            return
        kept = answer


async def attempt(
    out: Outgoing, replica: Replica, timeouts: Timeouts, may_retry: bool, send: Send, ex: Exchange
) -> _Kept | None:
    """The request on one replica: a connection from its pool (released here, whatever happens),
    the response relayed (None), or read and kept when it may be retried on another replica.
    A reused connection the backend had closed while idle is replaced (up to twice)."""
    backend, method, body = out.backend, out.method, out.body
    target = replica.target
    path = target.upstream_target(out.path, out.query, out.rooted)
    headers = [*target.static_headers, *out.headers]
    pool = replica.pool
    attempts = 0
    while True:
        ex.phase = "connect"
        conn, reused = await pool.acquire()
        try:
            ex.phase = "headers"
            ex.t_upstream = perf_counter()
            try:
                status, raw_headers = await conn.exchange(method, path, headers, body, timeouts.header)
            except _STALE:
                attempts += 1
                # The backend had closed the idle connection: send again on another one, unless the
                # request may have reached it (some bytes went out) and is not idempotent.
                if reused and attempts < 3 and (method in _IDEMPOTENT or not conn.request_sent):
                    continue
                raise
            if status in RETRY_STATUSES and may_retry:
                kept = (status, raw_headers, await _read_kept(conn))
                if status == 429:
                    backend.cool_off(replica, _retry_after(raw_headers))
                else:
                    backend.failed(replica)
                return kept
            if status >= 500:
                backend.failed(replica)
            else:
                backend.succeeded(replica)
            last_sent = await _relay(conn, status, raw_headers, timeouts, send, ex)
            break
        finally:
            pool.release(conn)
    ex.active = False
    if not last_sent:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    return None


async def _read_kept(conn: Connection) -> bytes:
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
    return b"".join(parts)[:_KEEP_LIMIT]


def _retry_after(headers: list[tuple[bytes, bytes]]) -> float:
    for name, value in headers:
        if name.lower() == b"retry-after":
            try:
                return max(0.0, float(value))
            except ValueError:
                return 1.0
    return 1.0


async def _relay_kept(send: Send, ex: Exchange, kept: _Kept) -> None:
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
    conn: Connection,
    status: int,
    raw_headers: list[tuple[bytes, bytes]],
    timeouts: Timeouts,
    send: Send,
    ex: Exchange,
) -> bool:
    """Relay the response on ``conn``, then close it; True if the final body message was sent."""
    last_sent = searched = False
    try:
        relayed, ex.sse = response_headers(raw_headers)
        relayed.append((b"x-request-id", ex.request_id))
        relayed.extend(ex.extra_headers)
        ex.status = status
        await send({"type": "http.response.start", "status": status, "headers": relayed})
        ex.started = True
        ex.phase = "first_token" if ex.sse else "body"
        first = timeouts.first_token if ex.sse else timeouts.idle
        whole = conn.body_in_hand()
        if whole is not None:  # the usual short answer: its one piece is already here
            ex.t_first = ex.t_last = perf_counter()
            ex.phase = "body"
            ex.nbytes = len(whole)
            ex.last = whole
            last_sent = True
            await send({"type": "http.response.body", "body": whole, "more_body": False})
        else:
            handle: Callable[[bytes], float] = ex.piece  # per piece: a timestamp, a comparison, a byte count
            if ex.sse and ex.surface != "openai":
                marker = TOKEN_MARKERS.get(ex.surface)
                if marker is not None:
                    searched = True
                    handle = _HeadSearch(ex, marker)
            pumped = conn.pumped(send, handle, first, timeouts.idle)
            if pumped is not None:  # the usual stream: relayed from the socket's callbacks
                last_sent = await pumped
            else:
                async for chunk in conn.iter_body(first, timeouts.idle):
                    handle(chunk)
                    if conn.body_complete:
                        # The last piece ends the response: one send fewer, and a body whole in
                        # one piece is one message to Granian (a plain response, no streamed body).
                        last_sent = True
                        await send({"type": "http.response.body", "body": chunk, "more_body": False})
                    else:
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    finally:
        ex.chunks = conn.body_chunks
        if searched:
            ex.t_first = ex.t_token  # these surfaces' first token is their first content event
        # Closes the connection unless the body was read to the end: this is what makes
        # the backend abort a generation nobody will read.
        await conn.close_response()
    return last_sent


#: The pieces before a stream's first token kept for its usage (``message_start``), at most.
_HEAD_LIMIT = 16 * 1024


class _HeadSearch:
    """``Exchange.piece`` for the surfaces whose first events carry no token
    (``surfaces.TOKEN_MARKERS``): until a piece holds ``marker`` (the first token; it may straddle
    two pieces), the pieces are also kept in ``ex.head`` (up to ``_HEAD_LIMIT``: where
    ``message_start`` carries the input tokens), and its time goes to ``ex.t_token``. Only these
    first pieces are searched."""

    __slots__ = ("ex", "marker", "found")

    def __init__(self, ex: Exchange, marker: bytes) -> None:
        self.ex = ex
        self.marker = marker
        self.found = False

    def __call__(self, chunk: bytes) -> float:
        ex = self.ex
        now = ex.piece(chunk)
        if self.found:
            return now
        if len(ex.head) < _HEAD_LIMIT and ex.head is not chunk:  # the first one is in already (``piece``)
            ex.head += chunk
        marker = self.marker
        width = len(marker)
        if marker in chunk or marker in ex.prev[-width:] + chunk[:width]:
            ex.t_token = now
            self.found = True
        return now


async def send_error(send: Send, err: GatewayError, ex: Exchange) -> None:
    ex.status = err.status
    headers = [*JSON_HEADERS, (b"x-request-id", ex.request_id)]
    if err.headers:
        headers.extend(err.headers)
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body_for(ex.surface, err), "more_body": False})


async def fail(send: Send, ex: Exchange, err: GatewayError) -> None:
    """Tell the client about a failure in whatever phase it happened."""
    ex.active = False
    if not ex.started:
        await send_error(send, err, ex)
        return
    if ex.sse:
        event = stream_error(ex.surface, err, ex.tail())
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
