"""gateway/headers.py: the response headers relayed to the client (hop-by-hop ones dropped, an
event stream's own added)."""

from __future__ import annotations

import pytest

from gateway import headers
from gateway.headers import SSE_EXTRA_HEADERS, response_headers

Headers = list[tuple[bytes, bytes]]


def test_response_headers() -> None:
    out, sse = response_headers(
        [
            (b"content-type", b"text/event-stream; charset=utf-8"),
            (b"transfer-encoding", b"chunked"),
            (b"Connection", b"keep-alive"),
            (b"cache-control", b"max-age=10"),
            (b"x-request-id", b"upstream-own-id"),  # replaced by the gateway's request id
            (b"x-vllm-thing", b"kept"),
        ]
    )
    assert sse
    assert out == [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"x-vllm-thing", b"kept"),
        (b"cache-control", b"no-cache"),
        (b"x-accel-buffering", b"no"),
    ]
    out, sse = response_headers([(b"content-type", b"application/json"), (b"content-length", b"12")])
    assert not sse and out == [(b"content-type", b"application/json"), (b"content-length", b"12")]


def test_the_same_fields_again_are_looked_up_and_each_caller_gets_its_own_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(headers, "_RELAYED", {})
    monkeypatch.setattr(headers, "_RELAYED_KEPT", 1)
    raw = [(b"content-type", b"text/event-stream"), (b"date", b"Mon, 07 Dec 2026 16:13:11 GMT")]
    out, sse = response_headers(raw)
    out.append((b"x-request-id", b"one"))  # what the relay does with its list
    again, sse_again = response_headers(list(raw))
    assert sse and sse_again and again == [(b"content-type", b"text/event-stream"), *SSE_EXTRA_HEADERS]
    assert list(headers._RELAYED) == [tuple(raw)]
    plain = [(b"content-type", b"application/json")]
    assert response_headers(plain) == (plain, False) and list(headers._RELAYED) == [tuple(plain)]  # bounded


@pytest.mark.parametrize(
    "name",
    [
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
    ],
)
def test_hop_by_hop_and_own_headers_are_dropped_in_any_case(name: bytes) -> None:
    for spelled in (name, name.upper(), name.title()):
        out, sse = response_headers([(b"content-type", b"application/json"), (spelled, b"x"), (b"x-kept", b"1")])
        assert not sse
        assert out == [(b"content-type", b"application/json"), (b"x-kept", b"1")], spelled


def test_fields_named_by_connection_are_dropped() -> None:
    """RFC 9110 7.6.1: the fields a Connection header lists are for that hop only."""
    raw: Headers = [
        (b"content-type", b"application/json"),
        (b"connection", b"keep-alive, X-Hop , x-other"),
        (b"X-Hop", b"1"),
        (b"x-other", b"2"),
        (b"x-end-to-end", b"3"),
    ]
    out, _ = response_headers(raw)
    assert out == [(b"content-type", b"application/json"), (b"x-end-to-end", b"3")]
    # Without a Connection header nothing beyond the fixed set goes.
    out, _ = response_headers([(b"x-hop", b"1")])
    assert out == [(b"x-hop", b"1")]


def test_event_stream_headers() -> None:
    """An event stream has no length, and the gateway's own cache and buffering headers replace
    the backend's; the content type is recognised whatever its case and parameters."""
    for content_type in (b"text/event-stream", b"Text/Event-Stream;charset=utf-8"):
        raw: Headers = [
            (b"Content-Type", content_type),
            (b"Content-Length", b"100"),
            (b"Cache-Control", b"no-store"),
            (b"X-Accel-Buffering", b"yes"),
            (b"x-kept", b"1"),
        ]
        out, sse = response_headers(raw)
        assert sse, content_type
        assert out == [(b"Content-Type", content_type), (b"x-kept", b"1"), *SSE_EXTRA_HEADERS]
    # The same headers on a JSON answer are relayed as they are.
    raw = [(b"content-type", b"application/json"), (b"content-length", b"2"), (b"cache-control", b"no-store")]
    assert response_headers(raw) == (raw, False)
    assert response_headers([(b"content-type", b"text/event")]) == ([(b"content-type", b"text/event")], False)
    assert response_headers([]) == ([], False)


def test_response_headers_leaves_its_input_alone() -> None:
    raw: Headers = [(b"content-type", b"text/event-stream"), (b"connection", b"close")]
    copy = list(raw)
    response_headers(raw)
    assert raw == copy
