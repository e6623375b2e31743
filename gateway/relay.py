"""Send one request upstream and relay its response, chunk by chunk, as it arrives.

Nothing here parses, joins or copies the body: each piece httpcore reads is sent on as its own
``http.response.body`` message. A failure after the response has started ends an event stream
with a final ``data: {"error":...}`` event, so a cut answer never looks complete.
"""

from __future__ import annotations

import logging
from time import perf_counter
from typing import Any

import httpcore

from gateway.errors import GatewayError, error_body, sse_error_event
from gateway.types import Send
from gateway.upstream import DROP_RESPONSE_HEADERS, Pool, Target

log = logging.getLogger("gateway")

SSE_EXTRA_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
_SSE_REPLACED = frozenset({b"cache-control", b"x-accel-buffering", b"content-length"})

#: Errors that mean a reused keep-alive connection had been closed by the backend before our
#: request reached it: safe to try once more on another connection.
_STALE = (httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError)


class Exchange:
    """One request's progress and figures, shared with the disconnect watcher, the timer and the
    metrics/access log written at its end."""

    __slots__ = (
        "active",
        "cancelled_by",
        "phase",
        "started",
        "sse",
        "prev",
        "last",
        "status",
        "t_start",
        "t_upstream",
        "t_first",
        "t_last",
        "t_end",
        "chunks",
        "nbytes",
        "max_gap",
        "end",
        "error_class",
        "request_id",
        "key_id",
    )

    def __init__(self, t_start: float = 0.0, request_id: bytes = b"") -> None:
        #: True until the response is finished; the watcher cancels only an active exchange.
        self.active = True
        #: "disconnect" or "timeout" when the gateway cancelled the request itself.
        self.cancelled_by: str | None = None
        self.phase = "connecting"
        self.started = False
        self.sse = False
        self.prev = b""
        self.last = b""
        self.status = 0
        self.t_start = t_start
        #: When the request went upstream; 0 if it never did.
        self.t_upstream = 0.0
        #: When the first body chunk came from the backend; 0 if none did.
        self.t_first = 0.0
        self.t_last = 0.0
        self.t_end = 0.0
        self.chunks = 0
        self.nbytes = 0
        #: The largest gap between two chunks from the backend.
        self.max_gap = 0.0
        #: Why the response ended: done, client_gone, upstream_error, timeout.
        self.end = "done"
        #: For upstream errors: connect, timeout or reset.
        self.error_class: str | None = None
        self.request_id = request_id
        self.key_id = "-"

    def tail(self) -> bytes:
        """The last two bytes sent to the client."""
        last = self.last
        return last[-2:] if len(last) >= 2 else (self.prev + last)[-2:]


def response_headers(raw: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Relayed headers (hop-by-hop ones dropped) and whether the body is an event stream."""
    sse = False
    for name, value in raw:
        if name.lower() == b"content-type" and value[:17].lower() == b"text/event-stream":
            sse = True
            break
    drop = DROP_RESPONSE_HEADERS | _SSE_REPLACED if sse else DROP_RESPONSE_HEADERS
    out = [(name, value) for name, value in raw if name.lower() not in drop]
    if sse:
        out.extend(SSE_EXTRA_HEADERS)
    return out, sse


async def forward(
    pool: Pool,
    target: Target,
    method: bytes,
    url_target: bytes,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    extensions: dict[str, Any],
    send: Send,
    ex: Exchange,
) -> None:
    """Forward one request and relay the response; httpcore's exceptions propagate."""
    request = httpcore.Request(method, target.url(url_target), headers=headers, content=body, extensions=extensions)
    read_timeout = extensions["timeout"]["read"]
    attempts = 0
    while True:
        ex.phase = "connecting"
        conn, reused = await pool.acquire()
        try:
            ex.phase = "waiting for response headers"
            ex.t_upstream = perf_counter()
            try:
                response = await conn.handle_async_request(request)
            except _STALE:
                attempts += 1
                if reused and attempts < 3:
                    continue  # the finally below releases (discards) the dead connection
                raise
            try:
                relayed, ex.sse = response_headers(response.headers)
                relayed.append((b"x-request-id", ex.request_id))
                ex.status = response.status
                await send({"type": "http.response.start", "status": response.status, "headers": relayed})
                ex.started = True
                ex.phase = "reading the response body"
                async for chunk in conn.iter_body(read_timeout):
                    # Per chunk: a timestamp, one comparison, two counters. Nothing else.
                    now = perf_counter()
                    if ex.chunks:
                        gap = now - ex.t_last
                        if gap > ex.max_gap:
                            ex.max_gap = gap
                    else:
                        ex.t_first = now
                    ex.t_last = now
                    ex.chunks += 1
                    ex.nbytes += len(chunk)
                    ex.prev = ex.last
                    ex.last = chunk
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                # Closes the connection unless the body was read to the end: this is what makes
                # the backend abort a generation nobody will read.
                await response.aclose()
            pool.release(conn)
            conn = None  # type: ignore[assignment]
            ex.active = False
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        finally:
            if conn is not None:
                pool.release(conn)


async def send_error(send: Send, err: GatewayError, ex: Exchange) -> None:
    ex.status = err.status
    headers = [(b"content-type", b"application/json"), (b"x-request-id", ex.request_id)]
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
    else:
        # A plain body cut mid-way: nothing can be appended that a JSON parser would accept;
        # ending here leaves a short body (and a short read where a content-length was sent).
        log.warning("upstream body cut after the response started: %s", err.message)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


__all__ = ["Exchange", "error_body", "fail", "forward", "response_headers", "send_error"]
