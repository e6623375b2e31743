"""gateway/errors.py: the OpenAI error body and the error event that ends a cut stream."""

from __future__ import annotations

import orjson
import pytest

from gateway import errors
from gateway.errors import sse_error_event


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
