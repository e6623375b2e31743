"""End to end: a real Granian server (``gateway serve``) in front of the fake backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest

from tests import rawhttp
from tests.fakes import Conn, FakeBackend, Req, default_handler, sse_events
from tests.servers import Gateway

KEY = "client-key-1"
BACKEND_KEY = "backend-secret-9"


@pytest.fixture(scope="module")
def gw(module_backend: FakeBackend, module_tmp: Path) -> Iterator[Gateway]:
    with Gateway(
        module_tmp,
        BACKEND_BASE_URL=module_backend.url,
        BACKEND_API_KEY=BACKEND_KEY,
        API_KEYS=f"{KEY}, other-key",
        MODEL_NAME="served-model",
        GATEWAY_MAX_BODY_BYTES="65536",
    ) as g:
        yield g
        assert g.stop() == 0


@pytest.fixture
def client(gw: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture(autouse=True)
def _reset_handler(module_backend: FakeBackend) -> Iterator[None]:
    module_backend.handler = default_handler
    yield
    module_backend.handler = default_handler


def auth(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}", "content-type": "application/json", **(extra or {})}


# -- the OpenAI surface through the official client -------------------------------------------


def test_chat_non_streamed(client: openai.OpenAI, module_backend: FakeBackend) -> None:
    r = client.chat.completions.create(model="m-x", messages=[{"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == "hello"
    assert r.model == "m-x"
    sent = module_backend.requests[-1]
    assert sent.method == "POST" and sent.target == "/v1/chat/completions"
    assert sent.json()["messages"] == [{"role": "user", "content": "hi"}]


def test_chat_streamed_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=4,
    )
    chunks = list(stream)
    assert [c.choices[0].delta.content for c in chunks if c.choices] == ["t0 ", "t1 ", "t2 ", "t3 "]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4


def test_completions_and_embeddings_and_models(client: openai.OpenAI) -> None:
    assert client.completions.create(model="m", prompt="x").choices[0].text == "hi"
    assert client.embeddings.create(model="m", input="x").data[0].embedding == [0.1, 0.2]
    assert [m.id for m in client.models.list().data] == ["fake"]


def test_upstream_error_relayed_unchanged(client: openai.OpenAI, module_backend: FakeBackend) -> None:
    body = {"object": "error", "message": "flat sglang style", "type": "Bad Request", "param": None, "code": 400}

    async def handler(req: Req, conn: Conn) -> None:
        await conn.json(400, body, headers={"x-upstream": "yes"})

    module_backend.handler = handler
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[])
    assert info.value.status_code == 400
    assert info.value.response.json() == body
    assert info.value.response.headers["x-upstream"] == "yes"


# -- byte-exact relay --------------------------------------------------------------------------


def test_stream_bytes_pass_through_exactly(gw: Gateway, module_backend: FakeBackend) -> None:
    # TGI style: `data:` without a space, a keep-alive comment, CRLF endings, events split
    # across chunks: the gateway must not re-frame any of it.
    pieces = [b'data:{"a":1}\n\n', b":\n\n", b'data: {"b"', b":2}\r\n\r\n", b"data:[DONE]\n\n"]

    async def handler(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        for p in pieces:
            await conn.chunk(p)
        await conn.end_chunked()

    module_backend.handler = handler
    status, headers, body = gw.request("POST", "/v1/chat/completions", b'{"stream":true}', auth())
    assert status == 200
    assert body == b"".join(pieces)
    assert headers["content-type"] == "text/event-stream"
    assert headers["x-accel-buffering"] == "no"
    assert headers["cache-control"] == "no-cache"
    assert "content-length" not in headers


def test_request_body_forwarded_unchanged(gw: Gateway, module_backend: FakeBackend) -> None:
    raw = b'{ "model" : "keep-me",\n "messages": [{"role":"user","content":"\\u00e9 caf\xc3\xa9"}], "x_unknown": [1,2]}'
    status, _, _ = gw.request("POST", "/v1/chat/completions", raw, auth())
    assert status == 200
    assert module_backend.requests[-1].body == raw


def test_model_filled_in_when_missing(gw: Gateway, module_backend: FakeBackend) -> None:
    status, _, _ = gw.request("POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"x"}]}', auth())
    assert status == 200
    sent = module_backend.requests[-1].json()
    assert sent == {"messages": [{"role": "user", "content": "x"}], "model": "served-model"}


def test_headers_to_backend(gw: Gateway, module_backend: FakeBackend) -> None:
    status, _, _ = gw.request(
        "POST",
        "/v1/chat/completions",
        b"{}",
        auth({"x-custom": "kept", "connection": "keep-alive", "x-api-key": KEY}),  # the same key twice: fine
    )
    assert status == 200
    sent = module_backend.requests[-1]
    assert sent.header("authorization") == f"Bearer {BACKEND_KEY}"  # the client's key is never forwarded
    assert sent.header("x-api-key") is None
    assert sent.header("x-custom") == "kept"
    assert sent.header("host") == f"127.0.0.1:{module_backend.port}"
    assert sent.header("content-length") == str(len(sent.body))
    assert sent.header("connection") is None


def test_passthrough_path_query_and_multipart(gw: Gateway, module_backend: FakeBackend) -> None:
    async def handler(req: Req, conn: Conn) -> None:
        await conn.json(200, {"target": req.target, "ct": req.header("content-type"), "len": len(req.body)})

    module_backend.handler = handler
    body = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\nRIFF\x00\x01\r\n--b--\r\n'
    status, _, out = gw.request(
        "POST",
        "/v1/audio/transcriptions?x=1&y=%2F",
        body,
        auth({"content-type": "multipart/form-data; boundary=b"}),
    )
    assert status == 200
    assert orjson.loads(out) == {
        "target": "/v1/audio/transcriptions?x=1&y=%2F",
        "ct": "multipart/form-data; boundary=b",
        "len": len(body),
    }
    assert module_backend.requests[-1].body == body


# -- errors the gateway makes itself: OpenAI shape ----------------------------------------------


def assert_openai_error(body: bytes, type_: str, code: str | None) -> dict[str, object]:
    err = orjson.loads(body)["error"]
    assert isinstance(err, dict)
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == type_ and err["code"] == code
    assert isinstance(err["message"], str) and err["message"]
    return err


def test_auth_errors(gw: Gateway, module_backend: FakeBackend) -> None:
    n = len(module_backend.requests)
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": KEY}, {"authorization": "Basic abc"}):
        status, h, body = gw.request("GET", "/v1/models", headers=headers)
        assert status == 401
        assert h["www-authenticate"] == "Bearer"
        assert_openai_error(body, "authentication_error", "invalid_api_key")
    assert len(module_backend.requests) == n  # never forwarded
    # Either configured key works; the scheme is case-insensitive.
    assert gw.request("GET", "/v1/models", headers={"authorization": "bearer other-key"}).status == 200


def test_auth_error_through_client(gw: Gateway) -> None:
    with (
        openai.OpenAI(base_url=gw.url + "/v1", api_key="wrong", max_retries=0) as c,
        pytest.raises(openai.AuthenticationError),
    ):
        c.models.list()


def test_duplicate_authorization_refused(gw: Gateway) -> None:
    twice = [("authorization", "Bearer nope"), ("authorization", f"Bearer {KEY}")]
    assert gw.request("GET", "/v1/models", headers=twice).status == 401


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1,2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"", "not valid JSON"),
        (b'{"model": 5}', "model"),
        (b'{"stream": "yes"}', "stream"),
    ],
)
def test_bad_json_bodies(gw: Gateway, module_backend: FakeBackend, body: bytes, fragment: str) -> None:
    n = len(module_backend.requests)
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        status, _, out = gw.request("POST", path, body, auth())
        assert status == 400
        err = assert_openai_error(out, "invalid_request_error", "invalid_request")
        assert fragment in str(err["message"])
    assert len(module_backend.requests) == n


def test_bad_json_through_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.post("/chat/completions", body=[1], cast_to=object)
    assert info.value.status_code == 400


def test_unknown_path_and_method(gw: Gateway) -> None:
    status, _, body = gw.request("GET", "/nope", headers=auth())
    assert status == 404
    assert_openai_error(body, "not_found_error", "not_found")
    status, h, body = gw.request("GET", "/v1/chat/completions", headers=auth())
    assert status == 405 and h["allow"] == "POST"
    assert_openai_error(body, "invalid_request_error", "method_not_allowed")
    status, _, body = gw.request("DELETE", "/health")
    assert status == 405


@pytest.mark.parametrize("path", ["/v1/../load", "/v1/./models", "/v1/x/../../admin", "/v1/%2e%2e/load", "/v1"])
def test_dot_segments_never_forwarded(gw: Gateway, module_backend: FakeBackend, path: str) -> None:
    n = len(module_backend.requests)
    status, _, body = gw.request("GET", path, headers=auth())
    assert status == 404
    assert len(module_backend.requests) == n


def test_body_too_large(gw: Gateway, module_backend: FakeBackend) -> None:
    n = len(module_backend.requests)
    big = b'{"messages":"' + b"x" * 70000 + b'"}'
    status, _, body = gw.request("POST", "/v1/chat/completions", big, auth())
    assert status == 413
    assert_openai_error(body, "invalid_request_error", "request_too_large")
    # Chunked upload (no Content-Length): refused as soon as the limit is passed.
    resp = rawhttp.request(gw.port, "POST", "/v1/chat/completions", headers=auth(), chunks=[big[:40000], big[40000:]])
    assert resp.status == 413
    assert len(module_backend.requests) == n


def test_health_never_touches_backend(gw: Gateway, module_backend: FakeBackend) -> None:
    n = len(module_backend.requests)
    status, _, body = gw.request("GET", "/health")
    assert (status, orjson.loads(body)) == (200, {"status": "ok"})
    assert len(module_backend.requests) == n


def test_ready_probes_backend_without_client_key(gw: Gateway, module_backend: FakeBackend) -> None:
    status, _, body = gw.request("GET", "/ready")
    info = orjson.loads(body)
    assert status == 200 and info["status"] == "ready" and info["kind"] == "vllm"
    assert isinstance(info["latency_ms"], float)
    probe = module_backend.requests[-1]
    assert probe.target == "/health" and probe.method == "GET"


def test_ready_loading(gw: Gateway, module_backend: FakeBackend) -> None:
    async def handler(req: Req, conn: Conn) -> None:
        await conn.json(503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})

    module_backend.handler = handler
    status, _, body = gw.request("GET", "/ready")
    assert status == 503 and orjson.loads(body)["status"] == "loading"


def test_keepalive_connections_reused(gw: Gateway, module_backend: FakeBackend) -> None:
    gw.request("GET", "/v1/models", headers=auth())
    before = module_backend.connections
    for _ in range(10):
        assert gw.request("GET", "/v1/models", headers=auth()).status == 200
        assert gw.request("POST", "/v1/chat/completions", b'{"stream":true}', auth()).status == 200
    assert module_backend.connections == before


def test_large_stream(gw: Gateway, module_backend: FakeBackend) -> None:
    events = sse_events(2000)

    async def handler(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        for i in range(0, len(events), 7):
            await conn.chunk(b"".join(events[i : i + 7]))
        await conn.end_chunked()

    module_backend.handler = handler
    status, _, body = gw.request("POST", "/v1/chat/completions", b'{"stream":true}', auth())
    assert status == 200 and body == b"".join(events)
