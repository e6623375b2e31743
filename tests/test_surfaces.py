"""The surfaces beyond chat, unit by unit: the client key in ``x-api-key``, error shapes per
surface, usage per stream format, the response id map, and each kind's path spellings."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import orjson
import pytest

from gateway import errors, routes
from gateway.auth import KeyRing, authorization_of
from gateway.client_headers import HeaderPass
from gateway.errors import GatewayError
from gateway.exchange import Exchange
from gateway.profiles import PROFILES, Support
from gateway.relay import fail, send_error
from gateway.responses_map import ResponseMap, first_id
from gateway.surfaces import anthropic_type, body_for, stream_error
from gateway.usage import read_usage
from tests.asgi import call, make_gateway
from tests.fakes import FakeBackend
from tests.test_relay import Sent

# -- x-api-key ------------------------------------------------------------------------------------


def test_the_key_in_x_api_key_is_accepted_like_a_bearer_token() -> None:
    ring = KeyRing(["k1", "k2"])
    k1 = (hashlib.sha256(b"k1").hexdigest()[:8], None)
    assert ring.authenticate(None, 0, [b"k1"]) == k1
    assert ring.authenticate(b"Bearer k1", 1, [b"k1"]) == k1  # the same key in both: fine
    refused = [
        (b"Bearer k2", 1, [b"k1"]),  # two different keys, each valid alone
        (b"Bearer k1", 1, [b"k2"]),
        (None, 0, [b"k1", b"k1"]),  # two x-api-key headers
        (b"Bearer k1", 2, [b"k1"]),
        (None, 0, [b"k3"]),
        (None, 0, [b""]),
        (b"Basic k1", 1, [b"k1"]),
    ]
    for authorization, count, api_key in refused:
        with pytest.raises(GatewayError) as e:
            ring.authenticate(authorization, count, api_key)
        assert e.value.status == 401, (authorization, api_key)


def test_neither_credential_is_forwarded_and_both_are_seen() -> None:
    headers = [(b"authorization", b"Bearer k"), (b"x-api-key", b"k"), (b"anthropic-version", b"2023-06-01")]
    seen = HeaderPass()(headers)
    assert seen.api_key == [b"k"] and seen.authorization == b"Bearer k"
    assert [n for n, _ in seen.forwarded] == [b"anthropic-version", b"x-request-id"]
    assert authorization_of(headers) == (b"Bearer k", 1, [b"k"])
    assert HeaderPass()([]).api_key is None


@pytest.mark.parametrize("name", [b"x-api-key", b"authorization"])
def test_a_key_header_can_be_the_sticky_header_and_still_authenticate(name: bytes) -> None:
    """GATEWAY_STICKY=header:x-api-key keeps a client on one replica by its key: the key is still
    seen for authentication (and still not forwarded)."""
    value = b"k" if name == b"x-api-key" else b"Bearer k"
    seen = HeaderPass(sticky_header=name)([(name, value), (b"accept", b"*/*")])
    assert seen.sticky == value
    assert (seen.api_key, seen.authorization) == (([b"k"], None) if name == b"x-api-key" else (None, b"Bearer k"))
    assert [n for n, _ in seen.forwarded] == [b"accept", b"x-request-id"]


def test_x_api_key_on_local_routes_too(tmp_path: Path) -> None:
    with FakeBackend() as fb:
        file = tmp_path / "routes.toml"
        file.write_text(f"[[backends]]\nname='b'\nkind='vllm'\nurls=['{fb.url}']\nmodels=['m']\n")
        app = make_gateway(GATEWAY_ROUTES=str(file), API_KEYS="k1")

        async def go() -> list[int]:
            await app.startup()
            try:
                return [
                    (await call(app, "GET", "/v1/models", headers=headers)).status
                    for headers in ([(b"x-api-key", b"k1")], [(b"x-api-key", b"k2")], [])
                ]
            finally:
                await app.shutdown()

        assert asyncio.run(go()) == [200, 401, 401]


# -- error shapes ---------------------------------------------------------------------------------


def test_anthropic_types_for_every_status_the_gateway_answers() -> None:
    expected = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        500: "api_error",
        501: "invalid_request_error",
        502: "api_error",
        503: "overloaded_error",
        504: "timeout_error",
    }
    assert {status: anthropic_type(status) for status in expected} == expected
    body = orjson.loads(body_for("anthropic", errors.model_not_found("x")))
    assert body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "The model 'x' is not served here."},
    }
    assert orjson.loads(body_for("responses", errors.model_not_found("x")))["error"]["code"] == "model_not_found"


def test_mid_stream_errors_in_each_surface_form() -> None:
    err = errors.backend_unavailable("reset")
    openai_event = stream_error("openai", err, b"\n\n")
    assert openai_event.startswith(b"data: {") and b"event:" not in openai_event
    anthropic_event = stream_error("anthropic", err, b"}\n")  # a line ended, the event did not
    assert anthropic_event.startswith(b"\nevent: error\ndata: ") and anthropic_event.endswith(b"\n\n")
    data = orjson.loads(anthropic_event.split(b"data: ", 1)[1])
    assert data == {"type": "error", "error": {"type": "api_error", "message": err.message}}
    responses_event = stream_error("responses", err, b"xy")
    assert responses_event.startswith(b"\n\nevent: error\ndata: ")
    data = orjson.loads(responses_event.split(b"data: ", 1)[1])
    assert data["type"] == "error" and data["code"] == "backend_unavailable" and data["message"] == err.message
    assert data["error"]["message"] == err.message  # what makes openai-python raise


def test_send_error_and_fail_use_the_exchange_surface() -> None:
    sent = Sent()
    ex = Exchange()
    ex.surface = "anthropic"
    asyncio.run(send_error(sent, errors.unauthorized(), ex))
    assert orjson.loads(sent.messages[-1]["body"])["error"]["type"] == "authentication_error"
    ex = Exchange()
    ex.surface, ex.started, ex.sse, ex.last = "anthropic", True, True, b"data: {}\n\n"
    asyncio.run(fail(sent, ex, errors.backend_unavailable("gone")))
    assert sent.messages[-2]["body"].startswith(b"event: error\n") and sent.messages[-1]["more_body"] is False


# -- usage per format -----------------------------------------------------------------------------


def _ex(last: bytes, *, sse: bool = False, head: bytes = b"", prev: bytes = b"") -> Exchange:
    ex = Exchange()
    ex.started, ex.status, ex.sse, ex.last, ex.head, ex.prev = True, 200, sse, last, head, prev
    return ex


def test_usage_of_each_surface() -> None:
    start = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":11,"output_tokens":1}}}\n\n'  # noqa: E501
    end = b'event: message_delta\ndata: {"type":"message_delta","usage":{"input_tokens":11,"output_tokens":7}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'  # noqa: E501
    usage = read_usage(_ex(end, sse=True, head=start), "anthropic")
    assert usage is not None and (usage.prompt, usage.completion) == (11, 7)  # input counted once
    body = b'{"id":"msg_1","content":[],"usage":{"input_tokens":3,"output_tokens":4}}'
    usage = read_usage(_ex(body), "anthropic")
    assert usage is not None and (usage.prompt, usage.completion) == (3, 4)
    # What llama.cpp sends: most of the prompt read from its cache, counted apart.
    cached = b'data: {"message":{"usage":{"cache_read_input_tokens":19,"input_tokens":1,"output_tokens":0}}}\n\n'
    usage = read_usage(_ex(end, sse=True, head=cached), "anthropic")
    assert usage is not None and (usage.prompt, usage.completion) == (20, 7)
    completed = b'event: response.completed\ndata: {"response":{"usage":{"input_tokens":5,"input_tokens_details":{"cached_tokens":0},"output_tokens":6}}}\n\n'  # noqa: E501
    usage = read_usage(_ex(completed[40:], sse=True, prev=completed[:40]), "responses")
    assert usage is not None and (usage.prompt, usage.completion) == (5, 6)
    usage = read_usage(_ex(b'{"results":[],"usage":{"prompt_tokens":9,"total_tokens":9}}'), "reported")
    assert usage is not None and (usage.prompt, usage.completion, usage.estimated) == (9, 0, False)
    assert read_usage(_ex(b'{"input_tokens":12}'), "none") is None
    assert read_usage(_ex(b'{"results":[]}'), "reported") is None  # never estimated
    assert read_usage(_ex(b"event: x\ndata: {}\n\n", sse=True), "anthropic") is None


# -- the response id map --------------------------------------------------------------------------


def test_first_id_of_a_body_and_of_a_created_event() -> None:
    assert first_id(b'{"id":"resp_1","object":"response","output":[{"id":"msg_2"}]}') == "resp_1"
    created = (
        b'event: response.created\ndata: {"type":"response.created","sequence_number":0,"response":{"id": "resp_9"'
    )
    assert first_id(created) == "resp_9"
    assert first_id(b'{"object":"response"}') is None
    assert first_id(b'{"id":12}') is None


def test_the_map_is_bounded() -> None:
    ids = ResponseMap(limit=2)
    a, b = object(), object()
    ids.put("r1", a, b)  # type: ignore[arg-type]
    ids.put("r2", a, b)  # type: ignore[arg-type]
    assert ids.get("r1") == (a, b)  # r1 used: r2 is now the oldest
    ids.put("r3", a, b)  # type: ignore[arg-type]
    assert ids.get("r2") is None and len(ids) == 2
    ids.forget("r1")
    assert ids.get("r1") is None


# -- path spellings -------------------------------------------------------------------------------


def test_every_kind_names_a_spelling_or_none_for_what_it_serves() -> None:
    for kind, profile in PROFILES.items():
        for route in (routes.TOKENIZE, routes.DETOKENIZE, routes.RERANK, routes.SCORE):
            assert route.capability is not None
            path = profile.path_for(route)
            if profile.support(route.capability) is Support.UNSUPPORTED:
                continue
            assert path is None or path.startswith("/"), (kind, route.name)
    assert PROFILES["vllm"].paths["rerank"] == "/rerank" and PROFILES["vllm"].paths["score"] == "/score"
    assert PROFILES["tgi"].paths["detokenize"] is None  # TGI: /tokenize only
    assert PROFILES["sglang"].paths["tokenize"] == "/v1/tokenize"


@pytest.mark.parametrize(
    ("kind", "path", "sent"),
    [
        ("vllm", "/v1/rerank", "/rerank"),
        ("vllm", "/v2/rerank", "/rerank"),
        ("vllm", "/v1/score", "/score"),
        ("vllm", "/tokenize", "/tokenize"),
        ("llamacpp", "/rerank", "/v1/rerank"),
        ("sglang", "/detokenize", "/v1/detokenize"),
        ("openai", "/score", "/v1/score"),
    ],
)
def test_each_kind_gets_its_own_spelling(kind: str, path: str, sent: str) -> None:
    with FakeBackend() as fb:
        app = make_gateway(BACKEND_KIND=kind, BACKEND_BASE_URL=fb.url)

        async def go() -> int:
            await app.startup()
            try:
                return (await call(app, "POST", path, b'{"model":"m","query":"q"}', query=b"x=1")).status
            finally:
                await app.shutdown()

        asyncio.run(go())
        assert fb.requests[-1].target == sent + "?x=1"
        assert fb.requests[-1].body == b'{"model":"m","query":"q"}'  # the body unchanged


@pytest.mark.parametrize(
    ("kind", "path", "surface"),
    [
        ("tgi", "/v1/messages", "anthropic"),
        ("tgi", "/v1/messages/count_tokens", "anthropic"),
        ("tgi", "/detokenize", "openai"),
        ("ollama", "/tokenize", "openai"),
        ("tgi", "/v1/responses", "responses"),
        ("llamacpp", "/v1/score", "openai"),
    ],
)
def test_a_kind_without_the_surface_gets_the_gateways_501_in_its_shape(kind: str, path: str, surface: str) -> None:
    with FakeBackend() as fb:
        app = make_gateway(BACKEND_KIND=kind, BACKEND_BASE_URL=fb.url)

        async def go() -> tuple[int, object]:
            await app.startup()
            try:
                r = await call(app, "POST", path, b'{"model":"m","max_tokens":1,"messages":[]}')
                return r.status, r.json()
            finally:
                await app.shutdown()

        status, body = asyncio.run(go())
        assert status == 501 and fb.requests == []
        assert isinstance(body, dict)
        if surface == "anthropic":
            assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        else:
            assert body["error"]["code"] == "not_supported"


def test_readme_lists_every_route_per_kind() -> None:
    from tools import surfaces_table

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert surfaces_table.render(readme) == readme, "README.md is stale: run python -m tools.surfaces_table"
    assert "| `POST /detokenize` (`tokenize`) | yes: `/detokenize` | yes: `/v1/detokenize` | 501 |" in readme


def test_messages_tokens_count_against_the_keys_tpm(tmp_path: Path) -> None:
    """A Messages answer's usage (Anthropic's field names) is spent from the key's tokens per
    minute, like chat's; the refusal is in Anthropic's shape; the key came as x-api-key."""
    from tests.fakes import Conn, Req
    from tests.test_limits import keys_file

    path = keys_file(tmp_path, "[[keys]]\nname='team-a'\nkey_env='SURFACES_TEAM_KEY'\ntpm=30\n")

    async def handler(req: Req, conn: Conn) -> None:
        usage = {"input_tokens": 5, "cache_read_input_tokens": 15, "output_tokens": 15}
        await conn.json(200, {"type": "message", "content": [], "usage": usage})

    with FakeBackend() as fb, pytest.MonkeyPatch.context() as mp:
        fb.handler = handler
        mp.setenv("SURFACES_TEAM_KEY", "team-secret")
        app = make_gateway(BACKEND_BASE_URL=fb.url, GATEWAY_KEYS_FILE=path)

        async def go() -> list[tuple[int, object]]:
            await app.startup()
            try:
                out = []
                for _ in range(2):
                    r = await call(app, "POST", "/v1/messages", b'{"model":"m"}', [(b"x-api-key", b"team-secret")])
                    out.append((r.status, r.json()))
                return out
            finally:
                await app.shutdown()

        (first, _), (second, refused) = asyncio.run(go())
    assert first == 200 and second == 429  # 5 + 15 cached + 15 output = 35 > 30
    assert isinstance(refused, dict) and refused["error"]["type"] == "rate_limit_error" and refused["type"] == "error"


def test_first_token_found_across_pieces_and_usage_from_head_and_tail(capfd: pytest.CaptureFixture[str]) -> None:
    """The first content event arrives in three pieces, each cut through the marker, 250 ms after
    ``message_start``: TTFT is when the piece completing the marker came (not the first piece, not
    the next whole event 400 ms later); the input tokens come from ``message_start``, the output
    tokens from the last ``message_delta``."""
    from tests.fakes import Conn, Req

    start = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{"input_tokens":9}}}\n\n'
    delta = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0}\n\n'
    end = b'event: message_delta\ndata: {"type":"message_delta","usage":{"output_tokens":4}}\n\n'

    async def handler(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        await conn.chunk(start)
        await asyncio.sleep(0.15)
        await conn.chunk(delta[:18])  # "event: content_blo": the first cut through the marker
        await asyncio.sleep(0.1)
        # The rest, cut again in the middle of the marker's second occurrence: neither piece
        # holds it whole, so only the search across pieces finds it here.
        cut = delta.index(b"content_block_delta", 18) + 11
        await conn.chunk(delta[18:cut])
        await asyncio.sleep(0.05)
        await conn.chunk(delta[cut:])
        await asyncio.sleep(0.4)  # a whole event only now: a search piece by piece would stop here
        for _ in range(3):
            await conn.chunk(delta)
        await conn.chunk(end)
        await conn.end_chunked()

    with FakeBackend() as fb:
        fb.handler = handler
        app = make_gateway(BACKEND_BASE_URL=fb.url, GATEWAY_LOG_FORMAT="json")

        async def go() -> bytes:
            await app.startup()
            try:
                r = await call(app, "POST", "/v1/messages", b'{"model":"m","stream":true}')
                assert app.metrics is not None
                app.metrics.flush()
                return r.body + app.metrics.exposition()[0]
            finally:
                await app.shutdown()

        out = asyncio.run(go())
    assert out.startswith(start) and end in out
    assert b'gateway_tokens_total{backend="vllm",model="other",type="input"} 9.0' in out
    assert b'gateway_tokens_total{backend="vllm",model="other",type="output"} 4.0' in out
    log = [orjson.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith('{"time"')]
    assert log[-1]["route"] == "messages" and 240 <= log[-1]["ttft_ms"] < 550, log[-1]


def test_capabilities_as_the_engines_sources_say() -> None:
    """The facts cited in gateway/profiles.py, as capabilities."""
    u, d, s = Support.UNSUPPORTED, Support.DEPENDS, Support.SUPPORTED
    expected = {
        # kind: messages, responses, tokenize, rerank, score
        "vllm": (s, s, s, d, d),  # rerank and score: pooling models only
        "sglang": (d, s, s, d, s),  # /v1/messages only in newer releases; rerank: cross-encoders
        "tgi": (u, u, s, u, u),  # /tokenize alone
        "llamacpp": (s, s, s, d, u),  # rerank needs --reranking; no score
        "ollama": (s, s, u, u, u),
        "localai": (s, s, d, d, u),
        "lmstudio": (s, s, u, u, u),
        "openai": (d, d, d, d, d),  # an unknown endpoint
    }
    for kind, supports in expected.items():
        got = tuple(PROFILES[kind].support(c) for c in ("messages", "responses", "tokenize", "rerank", "score"))
        assert got == supports, kind


def test_prefix_hashes_read_the_messages_system_prompt() -> None:
    """Under the prefix policy a Messages request's system prompt comes before its messages; a
    Responses request's ``input`` is its prompt."""
    from gateway.prefix import blocks_of

    system = "you are a careful assistant " * 40
    with_system = orjson.dumps({"model": "m", "system": system, "messages": HI_MESSAGES})
    without = orjson.dumps({"model": "m", "messages": HI_MESSAGES})
    other_system = orjson.dumps({"model": "m", "system": system.upper(), "messages": HI_MESSAGES})
    assert blocks_of(with_system, "m")[0] != blocks_of(without, "m")[0]
    assert blocks_of(with_system, "m")[0] != blocks_of(other_system, "m")[0]
    assert blocks_of(with_system, "m") == blocks_of(with_system, "m")
    assert blocks_of(orjson.dumps({"model": "m", "input": system}), "m")


HI_MESSAGES = [{"role": "user", "content": "hi"}]
