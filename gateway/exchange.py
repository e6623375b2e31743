"""One forwarded request: what was decided about it (``Outgoing``), and its progress and figures
(``Exchange``), with the names of its states.

``Outgoing`` is built once, by the stages that decide where a request goes and what is sent, and
read by the relay. An ``Exchange`` is shared by the stages, the relay, the disconnect watcher, the
timers and, at the request's end, the metrics and the access log.
"""

from __future__ import annotations

from time import perf_counter
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gateway.balance import Backend, Replica
    from gateway.limits import KeyLimits

#: What a forwarded request is waiting for: a connection, the response head, the first body
#: piece (streams), or more of the body. Each has its own timeout (see ``upstream.map_error``).
Phase = Literal["connect", "headers", "first_token", "body"]
#: Why a response ended: ``done``; the client left (``client_gone``); the backend failed
#: (``upstream_error``) or was too slow (``timeout``); or a bug in the gateway (``internal_error``).
End = Literal["done", "client_gone", "upstream_error", "timeout", "internal_error"]
#: The metrics' class of an upstream failure.
ErrorClass = Literal["connect", "timeout", "reset"]
#: Why the gateway cancelled a request itself.
CancelledBy = Literal["disconnect", "timeout"]


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
        "backend",
        "balance",
        "limits",
        "extra_headers",
        "surface",
        "t_token",
        "head",
        "replica",
        "request_model",
        "stream",
    )

    def __init__(self, t_start: float = 0.0) -> None:
        #: True until the response is finished; the watcher cancels only an active exchange.
        self.active = True
        #: Set when the gateway cancelled the request itself.
        self.cancelled_by: CancelledBy | None = None
        #: What the request was waiting for.
        self.phase: Phase = "connect"
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
        #: The largest gap between two pieces of body arriving from the backend.
        self.max_gap = 0.0
        #: Why the response ended.
        self.end: End = "done"
        #: For upstream errors: what kind.
        self.error_class: ErrorClass | None = None
        self.request_id = b""
        self.key_id = "-"
        #: The backend's name (metrics and logs); "-" when the request never got to one.
        self.backend = "-"
        #: Why its replica was picked (``affinity.Reason``); "-" when none was.
        self.balance = "-"
        #: The client key's limits (a keys file), and headers to add to the response for them.
        self.limits: KeyLimits | None = None
        self.extra_headers: list[tuple[bytes, bytes]] = []
        #: The route's error shape (``surfaces``): the gateway's own errors are written in it.
        self.surface = "openai"
        #: Streams of the surfaces whose first events carry no token: when the first content event
        #: came (0: none did; ``t_first`` takes it at the end), and the pieces before it (``head``:
        #: where ``message_start`` carries the input tokens).
        self.t_token = 0.0
        self.head = b""
        #: The replica the request went to last (Responses: the id map records it).
        self.replica: Replica | None = None
        #: A JSON body's model as sent upstream (after an alias) and whether it asked for a
        #: stream, from the routing stage's one decode (traces read them); None and False else.
        self.request_model: str | None = None
        self.stream = False

    def piece(self, chunk: bytes) -> float:
        """A piece of the response body arrived (the relay, per piece): its time, the largest gap
        so far, the byte count and the last two pieces; returns the time. The first piece also
        ends the wait for the first token and is kept in ``head`` (a Responses id is read from
        it)."""
        now = perf_counter()
        if self.t_first:
            gap = now - self.t_last
            if gap > self.max_gap:
                self.max_gap = gap
        else:
            self.t_first = now
            self.phase = "body"
            self.head = chunk
        self.t_last = now
        self.nbytes += len(chunk)
        self.prev = self.last
        self.last = chunk
        return now

    def tail(self) -> bytes:
        """The last two bytes sent to the client."""
        last = self.last
        return last[-2:] if len(last) >= 2 else (self.prev + last)[-2:]


class Outgoing:
    """A request as it goes upstream: decided once, read by the relay."""

    __slots__ = ("backend", "method", "path", "query", "headers", "body", "sticky", "blocks", "rooted", "pinned")

    def __init__(
        self,
        backend: Backend,
        method: bytes,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        sticky: bytes | None,
        blocks: list[int] | None = None,
    ) -> None:
        self.backend = backend
        self.method = method
        #: The client's raw path (``/v1/...``) without its query; each replica maps it to its base.
        self.path = path
        self.query = query
        #: The client's headers as forwarded (the replica adds Host and its key in front).
        self.headers = headers
        self.body = body
        #: The value that keeps a client on one replica (GATEWAY_STICKY), if any.
        self.sticky = sticky
        #: The prompt's block hashes (``gateway.prefix``), for a backend whose policy is ``prefix``.
        self.blocks = blocks
        #: ``path`` is relative to the server root (a kind's own spelling, ``Profile.paths``), not
        #: a client ``/v1/...`` path mapped to the base URL.
        self.rooted = False
        #: The replica to try first (Responses: the one holding a stored response).
        self.pinned: Replica | None = None

    def with_headers(self, headers: list[tuple[bytes, bytes]]) -> Outgoing:
        """The same request with other headers (every other decision kept; ``copy.copy`` of a
        slotted object costs ten times this)."""
        new = Outgoing(self.backend, self.method, self.path, self.query, headers, self.body, self.sticky, self.blocks)
        new.rooted, new.pinned = self.rooted, self.pinned
        return new
