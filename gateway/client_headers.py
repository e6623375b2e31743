"""The client-header pass: one look at each of the client's request headers (pure, no I/O).

It picks out what the later stages need (the credentials, ``Authorization`` and ``x-api-key``; the
body's declared length; the request id; the sticky value) and builds the list of headers forwarded to the backend: every
header except hop-by-hop ones, those the client's ``Connection`` header names, the client's
credentials and those the gateway sets itself (``DROP_REQUEST_HEADERS``).
"""

from __future__ import annotations

from gateway.headers import DROP_REQUEST_HEADERS
from gateway.request_id import request_id

Headers = list[tuple[bytes, bytes]]


class ClientHeaders:
    """What the header pass found in one request's headers."""

    __slots__ = ("forwarded", "authorization", "auth_count", "api_key", "content_length", "request_id", "sticky")

    def __init__(
        self,
        forwarded: Headers,
        authorization: bytes | None,
        auth_count: int,
        content_length: bytes | None,
        request_id: bytes,
        sticky: bytes | None,
        api_key: list[bytes] | None = None,
    ) -> None:
        #: Headers to forward, the request id last (the gateway's ``content-length`` follows).
        self.forwarded = forwarded
        #: The last ``Authorization`` value, and how many there were (two is a 401).
        self.authorization = authorization
        self.auth_count = auth_count
        #: Every ``x-api-key`` value (the anthropic client's header), None when there was none.
        self.api_key = api_key
        #: The declared ``Content-Length``; None without one, or where ``Transfer-Encoding``
        #: frames the body (it overrides the length, RFC 9112 6.3).
        self.content_length = content_length
        #: The client's ``X-Request-ID`` when well-formed, else a new one.
        self.request_id = request_id
        #: The value of the sticky header (``GATEWAY_STICKY=header:NAME``), if any.
        self.sticky = sticky


class HeaderPass:
    """The pass, configured once per worker with the one optional header it also looks at."""

    __slots__ = ("sticky_header", "_noted")

    def __init__(self, sticky_header: bytes | None = None) -> None:
        self.sticky_header = sticky_header
        #: Headers the pass looks at; every other one is forwarded as it is, unexamined.
        self._noted = DROP_REQUEST_HEADERS | ({sticky_header} if sticky_header else set())

    def __call__(self, headers: Headers) -> ClientHeaders:
        authorization: bytes | None = None
        auth_count = 0
        content_length: bytes | None = None
        given_id: bytes | None = None
        sticky: bytes | None = None
        api_key: list[bytes] | None = None
        sticky_header = self.sticky_header
        connection: list[bytes] = []
        framed = False
        forwarded: Headers = []
        noted = self._noted
        for name, value in headers:
            if name not in noted:
                forwarded.append((name, value))
                continue
            if name == b"authorization":
                authorization = value
                auth_count += 1
                if name == sticky_header:  # a key header can be the sticky one too
                    sticky = value
            elif name == b"x-api-key":
                api_key = [value] if api_key is None else [*api_key, value]
                if name == sticky_header:
                    sticky = value
            elif name == b"content-length":
                content_length = value
            elif name == b"x-request-id":
                given_id = value
            elif name == sticky_header:
                sticky = value
                if name not in DROP_REQUEST_HEADERS:  # the only noted name that is forwarded
                    forwarded.append((name, value))
            elif name == b"connection":
                connection.append(value)
            elif name == b"transfer-encoding":
                framed = True
        if framed:
            content_length = None
        if connection and connection != [b"keep-alive"]:  # what HTTP/1.1 clients send names nothing
            forwarded = _without_listed(forwarded, connection)
        rid = request_id(given_id)
        forwarded.append((b"x-request-id", rid))
        return ClientHeaders(forwarded, authorization, auth_count, content_length, rid, sticky, api_key)


def _without_listed(forwarded: Headers, connection: list[bytes]) -> Headers:
    """Fields the client's Connection header names are hop-by-hop too (RFC 9110 7.6.1)."""
    listed = {t.strip().lower() for t in b",".join(connection).split(b",")} - {b"keep-alive", b"close", b""}
    return [(n, v) for n, v in forwarded if n not in listed] if listed else forwarded


def given_request_id(headers: Headers) -> bytes:
    """The request id for a request the header pass did not see (local routes, early errors)."""
    for name, value in headers:
        if name == b"x-request-id":
            return request_id(value)
    return request_id(None)
