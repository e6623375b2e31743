"""Header policy: which fields cross the gateway, in each direction, and what it adds.

Pure functions over ``list[tuple[bytes, bytes]]``: nothing here does I/O.
"""

from __future__ import annotations

from gateway.memo import keep

#: Request headers never forwarded: hop-by-hop ones (RFC 9110 7.6.1), the client's credentials,
#: and those the gateway sets itself (host, content-length).
DROP_REQUEST_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"expect",
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
        b"x-request-id",
    }
)

#: Response headers never relayed: hop-by-hop ones and those the server sets.
DROP_RESPONSE_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"date",
        b"server",
        b"x-request-id",
    }
)

#: Added to an event stream's headers: no cache, and no buffering by a proxy in front of us.
SSE_EXTRA_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
#: Dropped from an event stream's headers: ours replace the first two; a stream has no length.
_DROP_SSE = DROP_RESPONSE_HEADERS | {b"cache-control", b"x-accel-buffering", b"content-length"}


#: ``response_headers``'s answers by the backend's fields (a backend repeats its heads: see
#: ``h1.read_head``), at most ``_RELAYED_KEPT``.
_RELAYED: dict[tuple[tuple[bytes, bytes], ...], tuple[list[tuple[bytes, bytes]], bool]] = {}
_RELAYED_KEPT = 64


def response_headers(raw: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bool]:
    """Relayed headers (hop-by-hop ones dropped) and whether the body is an event stream; the
    list is the caller's own (a copy of the one kept for the same fields)."""
    key = tuple(raw)
    found = _RELAYED.get(key) or keep(_RELAYED, key, _relayed(raw), _RELAYED_KEPT)
    return found[0].copy(), found[1]


def _relayed(raw: list[tuple[bytes, bytes]]) -> tuple[list[tuple[bytes, bytes]], bool]:
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
