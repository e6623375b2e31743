"""gateway/relay.py: the headers relayed to the client, and what the client gets when a request
fails before or after its response started (driven with a hand-written ``send``)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
import pytest

from gateway import errors
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.relay import _retry_after, fail, send_error
from gateway.types import SendMessage

Headers = list[tuple[bytes, bytes]]


class Sent:
    """The ASGI messages a coroutine sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []

    async def __call__(self, message: SendMessage) -> None:
        self.messages.append(dict(message))

    @property
    def types(self) -> list[str]:
        return [m["type"] for m in self.messages]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"] == "http.response.body")


def started(*, sse: bool, last: bytes, prev: bytes = b"") -> Exchange:
    """An exchange whose response has started and whose last body pieces were ``prev``, ``last``."""
    ex = Exchange()
    ex.request_id = b"req-1"
    ex.started, ex.sse, ex.prev, ex.last = True, sse, prev, last
    ex.nbytes = len(prev) + len(last)
    return ex


# -- _retry_after --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([], 1.0),
        ([(b"retry-after", b"5")], 5.0),
        ([(b"Retry-After", b"2.5")], 2.5),
        ([(b"RETRY-AFTER", b"0")], 0.0),
        ([(b"retry-after", b"-3")], 0.0),
        ([(b"retry-after", b"Wed, 21 Oct 2015 07:28:00 GMT")], 1.0),  # an HTTP date: the default
        ([(b"retry-after", b"")], 1.0),
        ([(b"x-other", b"9"), (b"retry-after", b"7"), (b"retry-after", b"8")], 7.0),  # the first one
    ],
)
def test_retry_after(headers: Headers, seconds: float) -> None:
    assert _retry_after(headers) == seconds


# -- send_error and fail -------------------------------------------------------------------------------


def test_send_error() -> None:
    sent = Sent()
    ex = Exchange()
    ex.request_id = b"req-7"
    err = errors.pool_exhausted(2.0)
    asyncio.run(send_error(sent, err, ex))
    start, body = sent.messages
    assert start == {
        "type": "http.response.start",
        "status": 503,
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"req-7"), (b"retry-after", b"1")],
    }
    assert body == {"type": "http.response.body", "body": err.body(), "more_body": False}
    assert orjson.loads(body["body"])["error"]["code"] == "pool_exhausted"
    assert ex.status == 503


def test_send_error_without_extra_headers() -> None:
    sent = Sent()
    ex = Exchange()
    asyncio.run(send_error(sent, errors.bad_request("no"), ex))
    assert sent.messages[0]["headers"] == [(b"content-type", b"application/json"), (b"x-request-id", b"")]
    assert sent.messages[0]["status"] == ex.status == 400


def test_fail_before_the_response_started_is_a_whole_error_answer() -> None:
    sent = Sent()
    ex = Exchange()
    ex.request_id = b"req-2"
    err = errors.backend_timeout("no answer")
    asyncio.run(fail(sent, ex, err))
    assert sent.types == ["http.response.start", "http.response.body"]
    assert sent.messages[0]["status"] == 504
    assert (b"x-request-id", b"req-2") in sent.messages[0]["headers"]
    assert sent.body == err.body() and sent.messages[-1]["more_body"] is False
    assert not ex.active and ex.status == 504


@pytest.mark.parametrize(
    ("prev", "last", "separator"),
    [
        (b"", b'data: {"a":1}\n\n', b""),  # the last event ended
        (b'data: {"a":1}\n', b"\n", b""),  # ... split across two pieces
        # Two bytes cannot tell "\r\n\r\n" from one line's end: a blank line more is harmless.
        (b"", b'data: {"a":1}\r\n\r\n', b"\n"),
        (b"", b'data: {"a":1}\r\r', b""),
        (b"", b'data: {"a":1}\n', b"\n"),  # one line break short
        (b"", b'data: {"a":1}\r', b"\r"),  # a lone CR: a LF would only make it CRLF, one line end
        (b"", b'data: {"a":1}\n\r', b""),  # a LF, then a CR that ends an empty line
        (b"", b'data: {"ha', b"\n\n"),  # cut mid-event
        (b'data: {"ha', b"l", b"\n\n"),  # ... with a one-byte last piece
    ],
)
def test_fail_on_a_started_event_stream_appends_an_error_event(
    prev: bytes, last: bytes, separator: bytes | None
) -> None:
    sent = Sent()
    ex = started(sse=True, prev=prev, last=last)
    before = ex.nbytes
    err = errors.backend_unavailable("reset")
    asyncio.run(fail(sent, ex, err))
    event, end = sent.messages
    assert event["type"] == "http.response.body" and event["more_body"] is True
    assert end == {"type": "http.response.body", "body": b"", "more_body": False}
    error_event = b"data: " + errors.error_body(err.message, err.type, err.code) + b"\n\n"
    assert event["body"].endswith(error_event)
    if separator is not None:
        assert event["body"] == separator + error_event
    # The error is an event of its own whatever came before it.
    stream = prev + last + event["body"]
    final = stream.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n\n")[-2]
    assert orjson.loads(final.strip().removeprefix(b"data: "))["error"]["code"] == "backend_unavailable"
    assert ex.nbytes == before + len(event["body"])
    assert not ex.active


def test_fail_on_a_started_plain_body_sends_nothing_more(caplog: pytest.LogCaptureFixture) -> None:
    """A cut JSON body must not end cleanly: no final message, so the transfer fails visibly."""
    sent = Sent()
    ex = started(sse=False, last=b'{"choices":[')
    with caplog.at_level(logging.WARNING, logger="gateway"):
        asyncio.run(fail(sent, ex, errors.backend_unavailable("reset")))
    assert sent.messages == []
    assert not ex.active
    assert "upstream body cut after the response started" in caplog.text


def test_fail_carries_the_errors_own_status_and_type() -> None:
    err = GatewayError(418, "api_error", "teapot", "short and stout", headers=[(b"x-why", b"tea")])
    sent = Sent()
    asyncio.run(fail(sent, Exchange(), err))
    assert sent.messages[0]["status"] == 418
    assert (b"x-why", b"tea") in sent.messages[0]["headers"]
    assert orjson.loads(sent.body)["error"] == {
        "message": "short and stout",
        "type": "api_error",
        "param": None,
        "code": "teapot",
    }


def test_exchange_tail() -> None:
    ex = Exchange()
    assert ex.tail() == b""
    ex.prev, ex.last = b"abc", b"d"
    assert ex.tail() == b"cd"
    ex.prev, ex.last = b"abc", b"xyz"
    assert ex.tail() == b"yz"
