"""The pure, synchronous pieces of the request path."""

from __future__ import annotations

import hashlib

import orjson
import pytest

from gateway import errors, routes
from gateway.auth import KeyRing, key_id
from gateway.errors import GatewayError, sse_error_event
from gateway.payload import peek, with_model
from gateway.relay import Exchange, response_headers


def test_keyring() -> None:
    ring = KeyRing(["k1", "k2"])
    assert ring.enabled
    assert ring.check(b"Bearer k1") and ring.check(b"bearer k2") and ring.check(b"BEARER k1 ")
    for bad in (None, b"", b"k1", b"Bearer", b"Bearer k3", b"Basic k1", b"Bearer k1k1", b"Bearerk1"):
        assert not ring.check(bad)
    off = KeyRing([])
    assert not off.enabled and off.check(None)
    assert key_id(b"k1") == hashlib.sha256(b"k1").hexdigest()[:8]
    assert "k1" not in repr(ring._digests)  # only digests are held


def test_routes() -> None:
    assert routes.resolve("/v1/chat/completions") is routes.CHAT
    assert routes.resolve("/v1/models") is routes.MODELS
    assert routes.resolve("/v1/models/org/model-7b") is routes.PASSTHROUGH
    assert routes.resolve("/v1/responses/r1") is routes.RESPONSES
    assert routes.resolve("/v1/audio/transcriptions") is routes.PASSTHROUGH
    assert routes.resolve("/v1/.well/x") is routes.PASSTHROUGH  # a dot that is not a dot segment
    for bad in ("/", "/v1", "/v2/x", "/metrics2", "/v1/../load", "/v1/./x", "/v1/a/.."):
        assert routes.resolve(bad) is None


def test_peek() -> None:
    p = peek(b'{"model":"m","stream":true,"messages":[{"deep":[[[{}]]]}],"tools":[{"type":"function"}]}')
    assert (p.model, p.stream, p.wants_tools) == ("m", True, True)
    p = peek(b'{"tools": null}')
    assert (p.model, p.stream, p.wants_tools) == (None, None, False)
    assert not peek(b'{"tools": []}').wants_tools
    for bad, status_fragment in ((b"[]", "JSON object"), (b"{", "not valid JSON"), (b'{"model":1}', "$.model")):
        with pytest.raises(GatewayError) as info:
            peek(bad)
        assert info.value.status == 400 and status_fragment in info.value.message


def test_with_model_keeps_other_values_raw() -> None:
    body = b'{"messages":[{"content":"caf\\u00e9 \xf0\x9f\x98\x80"}],"n":1.50,"model":null}'
    out = with_model(body, 'm "quoted"')
    assert orjson.loads(out)["model"] == 'm "quoted"'
    assert b'"content":"caf\\u00e9 \xf0\x9f\x98\x80"' in out  # untouched bytes
    assert b'"n":1.50' in out
    assert orjson.loads(with_model(b"{}", "x")) == {"model": "x"}


def test_error_body_shape() -> None:
    for err in (
        errors.bad_request("m"),
        errors.unauthorized(),
        errors.not_found("/x"),
        errors.method_not_allowed("GET", "/v1/chat/completions", ("POST",)),
        errors.too_large(10),
        errors.not_supported("TGI", "embeddings"),
        errors.backend_unavailable("x"),
        errors.backend_timeout("x"),
        errors.pool_exhausted(1.0),
        errors.draining(),
    ):
        body = orjson.loads(err.body())
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert 400 <= err.status < 600


@pytest.mark.parametrize(
    ("tail", "prefix"),
    [(b"", b""), (b"\n\n", b""), (b"}\n", b"\n"), (b'"}', b"\n\n"), (b"\r\r", b""), (b"\r\n", b"\n")],
)
def test_sse_error_event_framing(tail: bytes, prefix: bytes) -> None:
    ev = sse_error_event("boom", "api_error", "backend_unavailable", tail)
    assert ev.startswith(prefix + b"data: {")
    assert ev.endswith(b"\n\n")
    assert orjson.loads(ev[len(prefix) + 6 :])["error"]["message"] == "boom"


def test_exchange_tail() -> None:
    ex = Exchange()
    assert ex.tail() == b""
    ex.prev, ex.last = b"abc", b"d"
    assert ex.tail() == b"cd"
    ex.prev, ex.last = b"abc", b"xyz"
    assert ex.tail() == b"yz"


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
