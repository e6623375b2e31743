"""The simulated backend: OpenAI wire format, each kind's quirks, faults, timing, disconnects."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest

from gateway.sim import ConfigError, Fault, SimConfig, SimServer, make_config, parse_fault
from tests import servers
from tests.rawhttp import Connection, request
from tests.servers import NO_DELAY, SimProc


def running(**given: Any) -> contextlib.AbstractContextManager[SimServer]:
    """The simulator in a thread, without delays unless ``given``."""
    return servers.sim(**{**NO_DELAY, **given})


def chat_body(stream: bool = False, max_tokens: int | None = 4, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "stream": stream}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


@pytest.fixture
def sim() -> Iterator[SimServer]:
    with running() as server:
        yield server


@contextlib.contextmanager
def client_for(sim: SimServer, key: str = "none") -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=sim.base_url, api_key=key, max_retries=0, timeout=10) as client:
        yield client


def wait_for(check: Callable[[], bool], timeout: float = 1.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.005)
    return check()


def payloads(events: list[bytes], prefix: bytes = b"data: ") -> list[bytes]:
    out = []
    for event in events:
        assert event.startswith(prefix), event
        out.append(event[len(prefix) :])
    return out


# -- the OpenAI wire format, through the official client --------------------------------------------


def test_chat_stream_through_openai_client(sim: SimServer) -> None:
    with client_for(sim) as client:
        stream = client.chat.completions.create(
            model="my-model",
            messages=[{"role": "user", "content": "x" * 40}],
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 5
    assert all(c.object == "chat.completion.chunk" and c.model == "my-model" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (10, 5, 15)
    assert sim.stats.completed_requests_total == 1
    assert sim.stats.generated_tokens_total == 5


def test_chat_non_stream_through_openai_client(sim: SimServer) -> None:
    with client_for(sim) as client:
        answer = client.chat.completions.create(model="echo-me", messages=[{"role": "user", "content": "hi"}])
        limited = client.chat.completions.create(
            model="echo-me", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3
        )
    assert answer.model == "echo-me"
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.completion_tokens == sim.config.tokens
    content = answer.choices[0].message.content
    assert content is not None and len(content.split()) == sim.config.tokens
    assert limited.choices[0].finish_reason == "length"
    assert limited.usage is not None and limited.usage.completion_tokens == 3


def test_completions_stream_and_non_stream(sim: SimServer) -> None:
    with client_for(sim) as client:
        whole = client.completions.create(model="m", prompt="once upon a time", max_tokens=4)
        chunks = list(client.completions.create(model="m", prompt="once upon a time", max_tokens=4, stream=True))
    assert whole.object == "text_completion"
    assert whole.usage is not None and whole.usage.completion_tokens == 4
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) == 4
    assert "".join(texts) == whole.choices[0].text
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_embeddings_and_models(sim: SimServer) -> None:
    with client_for(sim) as client:
        result = client.embeddings.create(model="embedder", input=["a", "b", "a"])  # base64 on the wire
        sized = client.embeddings.create(model="embedder", input="a", dimensions=8, encoding_format="float")
        models = client.models.list()
    vectors = [d.embedding for d in result.data]
    assert len(vectors) == 3 and len(vectors[0]) == 32
    assert vectors[0] == vectors[2] != vectors[1]
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-4
    assert len(sized.data[0].embedding) == 8
    assert [m.id for m in models.data] == ["sim-model"]


def test_raw_stream_framing(sim: SimServer) -> None:
    with Connection(sim.port) as raw:
        raw.send("POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=3))
        status, headers = raw.read_head()
        assert status == 200
        assert headers["content-type"].startswith("text/event-stream")
        assert headers["transfer-encoding"] == "chunked"
        chunks = list(raw.iter_chunks())
    # One event per HTTP chunk: role, 3 tokens, finish, [DONE].
    assert len(chunks) == 6
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") for c in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"
    first = json.loads(chunks[1][6:])
    assert set(first) == {"id", "object", "created", "model", "choices"}
    assert first["choices"][0] == {"index": 0, "delta": {"content": " the"}, "logprobs": None, "finish_reason": None}


# -- each kind's habits -------------------------------------------------------------------------------


def test_tgi_writes_data_without_space_and_has_no_embeddings() -> None:
    with running(kind="tgi") as sim:
        answer = request(sim.port, "POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=2, model="tgi"))
        events = answer.events()
        assert all(e.startswith(b"data:") and not e.startswith(b"data: ") for e in events)
        assert events[-1] == b"data:[DONE]"
        assert json.loads(events[1][5:])["model"] == "sim-model"  # "tgi" names the served model
        assert request(sim.port, "POST", "/v1/embeddings", {"input": "x"}).status == 404
        bad = request(sim.port, "POST", "/v1/chat/completions", {"messages": "nope"})
        assert bad.status == 422
        assert bad.json()["error_type"] == "validation" and isinstance(bad.json()["error"], str)
        with client_for(sim) as client:  # the SDK copes with "data:" without a space
            chunks = list(
                client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
                )
            )
        assert sum(1 for c in chunks if c.choices[0].delta.content) == 3


AUTH_CASES = [
    # kind, 401 body (None: empty), extra headers that also authenticate
    ("vllm", {"error": "Unauthorized"}, []),
    ("sglang", {"error": "Unauthorized"}, [{"x-api-key": "k"}]),
    ("tgi", None, [{"authorization": "BEARER K"}]),
    (
        "llamacpp",
        {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}},
        [{"x-api-key": "k"}],
    ),
    (
        "localai",
        {"error": {"code": 401, "message": "An authentication key is required", "type": "invalid_request_error"}},
        [{"x-api-key": "k"}, {"xi-api-key": "k"}],
    ),
    ("lmstudio", None, []),
    ("openai", None, []),
]


@pytest.mark.parametrize(("kind", "body", "alternatives"), AUTH_CASES, ids=[c[0] for c in AUTH_CASES])
def test_auth_per_kind(kind: str, body: Any, alternatives: list[dict[str, str]]) -> None:
    with running(kind=kind, api_key="k") as sim:
        path, payload = "/v1/chat/completions", chat_body()
        denied = request(sim.port, "POST", path, payload)
        wrong = request(sim.port, "POST", path, payload, {"authorization": "Bearer nope"})
        assert denied.status == wrong.status == 401
        if kind == "tgi":
            assert denied.body == b""
        elif body is not None:
            assert denied.json() == body
        else:
            assert denied.json()["error"]["code"] == "invalid_api_key"
        if kind == "localai":
            assert denied.headers["www-authenticate"] == "Bearer"
        assert request(sim.port, "POST", path, payload, {"authorization": "Bearer k"}).status == 200
        for headers in alternatives:
            assert request(sim.port, "POST", path, payload, headers).status == 200, headers
        with client_for(sim, key="k") as client:
            assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices
        with client_for(sim, key="bad") as client, pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        if kind not in ("lmstudio", "openai"):  # their health path is /v1/models, which needs the key
            health = next(iter(sim.app.wire.health))
            assert request(sim.port, "GET", health).status == 200
        assert request(sim.port, "GET", "/metrics").status == 200


def test_ollama_takes_no_key_and_answers_on_root() -> None:
    with running(kind="ollama", api_key="ignored") as sim:
        assert request(sim.port, "POST", "/v1/chat/completions", chat_body()).status == 200
        root = request(sim.port, "GET", "/")
        assert root.status == 200
        assert root.headers["content-type"].startswith("text/plain")
        assert root.body == b"Ollama is running"
        head = request(sim.port, "HEAD", "/")
        assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "17"


HEALTH_CASES = [
    ("vllm", "/health", b""),
    ("sglang", "/health", b""),
    ("tgi", "/health", b""),
    ("llamacpp", "/health", b'{"status":"ok"}'),
    ("localai", "/readyz", b""),
    ("localai", "/healthz", b""),
    ("lmstudio", "/v1/models", None),
    ("openai", "/v1/models", None),
]


@pytest.mark.parametrize(("kind", "path", "body"), HEALTH_CASES)
def test_health_paths(kind: str, path: str, body: bytes | None) -> None:
    with running(kind=kind) as sim:
        answer = request(sim.port, "GET", path)
        assert answer.status == 200
        if body is not None:
            assert answer.body == body


def test_error_shapes_per_kind() -> None:
    shapes: dict[str, Callable[[Any], bool]] = {
        "vllm": lambda b: b["error"]["code"] == 404 and b["error"]["type"] == "NotFoundError",
        "sglang": lambda b: b["object"] == "error" and b["code"] == 404 and "message" in b,
        "tgi": lambda b: isinstance(b["error"], str) and "error_type" in b,
        "llamacpp": lambda b: b["error"] == {"code": 404, "message": "File Not Found", "type": "not_found_error"},
        "ollama": lambda b: b["error"]["type"] == "not_found_error" and b["error"]["code"] is None,
        "localai": lambda b: b["error"]["code"] == 404,
        "lmstudio": lambda b: b["error"]["type"] == "invalid_request_error",
        "openai": lambda b: b["error"]["type"] == "invalid_request_error",
    }
    for kind, check in shapes.items():
        with running(kind=kind) as sim:
            answer = request(sim.port, "GET", "/no/such/path")
            assert answer.status == 404, kind
            assert check(answer.json()), (kind, answer.body)
            wrong_method = request(sim.port, "GET", "/v1/chat/completions")
            # llama.cpp routes by method and path: a wrong method is an unknown route.
            assert wrong_method.status == (404 if kind == "llamacpp" else 405), kind


def test_sglang_flat_error_through_client() -> None:
    with running(kind="sglang") as sim, client_for(sim) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="m", messages=[])
        body = caught.value.body
        assert isinstance(body, dict)
        assert body["object"] == "error"
        assert body["code"] == 400


def test_llamacpp_quirks() -> None:
    with running(kind="llamacpp", embeddings=False) as sim:
        off = request(sim.port, "POST", "/v1/embeddings", {"input": "x"})
        assert off.status == 501 and off.json()["error"]["type"] == "not_supported_error"
        assert off.headers["connection"] == "close"


# -- llama.cpp, as the real llama-server answers (checked against the pinned build) ----------------------

LLAMA_JSON = "application/json; charset=utf-8"
LLAMA_404 = b'{"error":{"message":"File Not Found","type":"not_found_error","code":404}}'
TIMINGS_KEYS = [
    "cache_n",
    "prompt_n",
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_n",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
]


@pytest.fixture
def llama() -> Iterator[SimServer]:
    with running(kind="llamacpp", model="tiny", api_key="k") as server:
        yield server


def keyed(port: int, method: str, path: str, body: Any = None, **headers: str) -> Any:
    return request(port, method, path, body, {"authorization": "Bearer k", **headers})


def stream_chunks(answer: Any) -> list[Any]:
    """The JSON chunks of a stream (``[DONE]`` checked and left out)."""
    events = payloads(answer.events())
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_llamacpp_json_type_and_close_on_errors(llama: SimServer) -> None:
    port = llama.port
    for method, path, key, status in (
        ("GET", "/health", False, 200),
        ("GET", "/v1/models", True, 200),
        ("POST", "/v1/chat/completions", True, 200),
        ("POST", "/v1/chat/completions", False, 401),
        ("GET", "/no/such", True, 404),
        ("POST", "/v1/completions", True, 400),  # no prompt
    ):
        body = (
            chat_body() if method == "POST" and path.endswith("chat/completions") else {} if method == "POST" else None
        )
        answer = keyed(port, method, path, body) if key else request(port, method, path, body)
        assert answer.status == status, (path, answer)
        assert answer.headers["content-type"] == LLAMA_JSON, path
        assert ("connection" in answer.headers) is (status >= 400), path
    with Connection(port) as raw:  # the server closes after an error, as llama-server does
        assert raw.request("GET", "/no/such", headers={"authorization": "Bearer k"}).status == 404
        assert raw.is_closed_by_peer()
    with running(kind="vllm") as other:  # other kinds keep their own habits
        answer = request(other.port, "GET", "/no/such")
        assert answer.headers["content-type"] == "application/json" and "connection" not in answer.headers


def test_llamacpp_models_need_the_key_and_metrics_stay_open(llama: SimServer) -> None:
    for path in ("/v1/models", "/models"):
        assert request(llama.port, "GET", path).status == 401
        assert keyed(llama.port, "GET", path).status == 200
    for path in ("/health", "/v1/health"):
        assert request(llama.port, "GET", path).status == 200
    assert request(llama.port, "GET", "/").status == 404  # open, but nothing there
    metrics = request(llama.port, "GET", "/metrics")  # the simulator's own, not llama-server's 501
    assert metrics.status == 200 and b"sim_requests_total" in metrics.body


def test_llamacpp_model_list() -> None:
    with running(kind="llamacpp", model="tiny", ctx_size=512) as sim:
        doc = request(sim.port, "GET", "/v1/models").json()
        with client_for(sim) as client:
            listed = client.models.list()
    assert list(doc) == ["models", "object", "data"]
    assert doc["object"] == "list" and doc["models"][0]["name"] == doc["models"][0]["model"] == "tiny"
    (model,) = doc["data"]
    assert list(model) == ["id", "aliases", "tags", "object", "architecture", "created", "owned_by", "meta"]
    assert (model["id"], model["aliases"], model["tags"], model["object"]) == ("tiny", ["tiny"], [], "model")
    assert model["owned_by"] == "llamacpp" and isinstance(model["created"], int)
    assert model["meta"]["n_ctx"] == 512 and model["meta"]["n_embd"] == 64
    assert [m.id for m in listed.data] == ["tiny"]


def test_llamacpp_chat_stream_chunks(llama: SimServer) -> None:
    answer = keyed(llama.port, "POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=3, model="asked"))
    assert answer.headers["content-type"] == "text/event-stream" and answer.headers["x-accel-buffering"] == "no"
    chunks = stream_chunks(answer)
    assert len(chunks) == 5  # role, 3 tokens, finish
    envelope = ["choices", "created", "id", "model", "system_fingerprint", "object"]
    assert all(list(c)[:6] == envelope for c in chunks)
    assert all(c["system_fingerprint"] == "b0-unknown" and c["model"] == "tiny" for c in chunks)
    assert all(c["id"].startswith("chatcmpl-") and c["id"] == chunks[0]["id"] for c in chunks)
    assert all("logprobs" not in c["choices"][0] for c in chunks)
    assert chunks[0]["choices"] == [
        {"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}
    ]
    assert chunks[1]["choices"] == [{"finish_reason": None, "index": 0, "delta": {"content": " the"}}]
    # Without include_usage the finish chunk carries the timings, and no usage follows.
    finish = chunks[-1]
    assert finish["choices"] == [{"finish_reason": "length", "index": 0, "delta": {}}]
    assert list(finish["timings"]) == TIMINGS_KEYS and "usage" not in finish
    assert finish["timings"]["prompt_n"] == 3 and finish["timings"]["predicted_n"] == 3  # "hello there": 3


def test_llamacpp_chat_stream_usage_chunk(llama: SimServer) -> None:
    body = chat_body(stream=True, max_tokens=2, stream_options={"include_usage": True})
    chunks = stream_chunks(keyed(llama.port, "POST", "/v1/chat/completions", body))
    finish, last = chunks[-2:]
    assert finish["choices"][0]["finish_reason"] == "length" and "timings" not in finish
    assert last["choices"] == []
    assert last["usage"] == {
        "completion_tokens": 2,
        "prompt_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert list(last)[-2:] == ["usage", "timings"] and last["timings"]["predicted_n"] == 2
    with client_for(llama, key="k") as client:  # the SDK reads it all
        got = list(
            client.chat.completions.create(
                model="m",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=2,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    assert got[-1].usage is not None and got[-1].usage.completion_tokens == 2
    assert got[-1].usage.prompt_tokens_details is not None and got[-1].usage.prompt_tokens_details.cached_tokens == 0


def test_llamacpp_completion_stream(llama: SimServer) -> None:
    for options in (None, {"include_usage": True}):  # the same either way
        body: dict[str, Any] = {"model": "asked", "prompt": "hello there", "max_tokens": 2, "stream": True}
        if options:
            body["stream_options"] = options
        chunks = stream_chunks(keyed(llama.port, "POST", "/v1/completions", body))
        assert len(chunks) == 3  # 2 tokens, finish: no role chunk, no "choices": [] chunk
        assert all(c["choices"] for c in chunks)
        assert all(c["id"].startswith("chatcmpl-") and c["model"] == "tiny" for c in chunks)
        assert list(chunks[0]) == ["choices", "created", "model", "system_fingerprint", "object", "id"]
        assert chunks[0]["choices"] == [{"text": " the", "index": 0, "logprobs": None, "finish_reason": None}]
        finish = chunks[-1]
        assert list(finish) == ["choices", "created", "model", "system_fingerprint", "object", "usage", "id", "timings"]
        assert finish["choices"] == [{"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}]
        assert (
            finish["usage"]["completion_tokens"] == 2 and finish["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        )


def test_llamacpp_model_field(llama: SimServer) -> None:
    chat = keyed(llama.port, "POST", "/v1/chat/completions", chat_body(model="asked"))
    text = keyed(llama.port, "POST", "/v1/completions", {"model": "asked", "prompt": "x", "max_tokens": 1})
    embedded = keyed(llama.port, "POST", "/v1/embeddings", {"model": "asked", "input": "x"})
    unnamed = keyed(llama.port, "POST", "/v1/embeddings", {"input": "x"})
    assert chat.json()["model"] == text.json()["model"] == "tiny"  # the served alias, whatever was asked
    assert embedded.json()["model"] == "asked" and unnamed.json()["model"] == "tiny"


def test_llamacpp_whole_answers(llama: SimServer) -> None:
    chat = keyed(llama.port, "POST", "/v1/chat/completions", chat_body(max_tokens=2)).json()
    assert list(chat) == ["choices", "created", "model", "system_fingerprint", "object", "usage", "id", "timings"]
    assert chat["system_fingerprint"] == "b0-unknown" and chat["object"] == "chat.completion"
    assert chat["choices"] == [
        {"finish_reason": "length", "index": 0, "message": {"role": "assistant", "content": " the quick"}}
    ]
    assert chat["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert list(chat["timings"]) == TIMINGS_KEYS and chat["timings"]["prompt_ms"] > 0
    text = keyed(llama.port, "POST", "/v1/completions", {"prompt": "hello there", "max_tokens": 2}).json()
    assert text["id"].startswith("chatcmpl-") and text["system_fingerprint"] == "b0-unknown"
    assert text["choices"] == [{"text": " the quick", "index": 0, "logprobs": None, "finish_reason": "length"}]
    assert text["usage"]["prompt_tokens_details"] == {"cached_tokens": 0} and "timings" in text
    with client_for(llama, key="k") as client:
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert answer.system_fingerprint == "b0-unknown" and answer.choices[0].message.content == " the quick"


def test_llamacpp_context_size() -> None:
    exceeded = {
        "error": {
            "code": 400,
            "message": "request (40 tokens) exceeds the available context size (32 tokens), try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 40,
            "n_ctx": 32,
        }
    }
    with running(kind="llamacpp", ctx_size=32) as sim:
        for stream in (False, True):  # plain JSON even for a stream
            answer = request(
                sim.port, "POST", "/v1/chat/completions", chat_body(stream, messages=[{"content": "x" * 160}])
            )
            assert (answer.status, answer.json()) == (400, exceeded)
            assert answer.headers["content-type"] == LLAMA_JSON and answer.headers["connection"] == "close"
        # 32 tokens of prompt is already too many; 31 leaves room for one token.
        edge = request(sim.port, "POST", "/v1/completions", {"prompt": "x" * 128, "max_tokens": 5})
        assert edge.status == 400 and edge.json()["error"]["n_prompt_tokens"] == 32
        full = request(sim.port, "POST", "/v1/completions", {"prompt": "x" * 124, "max_tokens": 5}).json()
        assert full["usage"]["completion_tokens"] == 1 and full["choices"][0]["finish_reason"] == "length"
        stopped = request(sim.port, "POST", "/v1/completions", {"prompt": "x" * 100}).json()  # no max_tokens
        assert stopped["usage"]["completion_tokens"] == 7 and stopped["choices"][0]["finish_reason"] == "length"
        assert sim.stats.completed_requests_total == 2
    long_prompt = {"prompt": "x" * 4000, "max_tokens": 1}
    with running(kind="llamacpp") as sim:  # the default context never gets in the way
        assert request(sim.port, "POST", "/v1/completions", long_prompt).status == 200
    with running(kind="vllm", ctx_size=32) as sim:  # other kinds take any prompt
        assert request(sim.port, "POST", "/v1/completions", long_prompt).status == 200


def test_llamacpp_n_choices(llama: SimServer) -> None:
    whole = keyed(llama.port, "POST", "/v1/chat/completions", chat_body(max_tokens=2, n=2)).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1]
    assert all(c["message"]["content"] == " the quick" for c in whole["choices"])
    assert whole["usage"]["completion_tokens"] == 2  # llama-server counts one choice
    text = keyed(llama.port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1, "n": 3}).json()
    assert [c["index"] for c in text["choices"]] == [0, 1, 2]
    body = chat_body(stream=True, max_tokens=2, n=2, stream_options={"include_usage": True})
    chunks = stream_chunks(keyed(llama.port, "POST", "/v1/chat/completions", body))
    by_choice: dict[int, list[Any]] = {0: [], 1: []}
    usages = [c for c in chunks if not c["choices"]]
    for c in chunks:
        if c["choices"]:
            by_choice[c["choices"][0]["index"]].append(c["choices"][0])
    for choice in by_choice.values():
        assert choice[0]["delta"] == {"role": "assistant", "content": None}
        assert "".join(c["delta"].get("content") or "" for c in choice) == " the quick"
        assert choice[-1]["finish_reason"] == "length"
    assert len(usages) == 2  # one usage chunk after each choice's finish
    assert llama.stats.generated_tokens_total == 2 * 2 + 3 + 2 * 2
    with client_for(llama, key="k") as client:
        answer = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2)
    assert len(answer.choices) == 2
    for n in (0, 300, "2"):
        bad = keyed(llama.port, "POST", "/v1/chat/completions", chat_body(n=n))
        assert bad.status == 400 and "Field 'n'" in bad.json()["error"]["message"], n
    with running(kind="vllm") as other:  # other kinds answer one choice, as before
        assert len(request(other.port, "POST", "/v1/chat/completions", chat_body(n=2)).json()["choices"]) == 1


def test_llamacpp_not_found(llama: SimServer) -> None:
    for method, path in (("GET", "/no/such"), ("GET", "/v1/chat/completions"), ("POST", "/v1/models")):
        answer = keyed(llama.port, method, path, {} if method == "POST" else None)
        assert (answer.status, answer.body) == (404, LLAMA_404), (method, path)
    assert request(llama.port, "GET", "/no/such").status == 401  # the key comes first
    alias = keyed(llama.port, "POST", "/chat/completions", chat_body())
    assert alias.status == 200 and alias.json()["object"] == "chat.completion"


def test_llamacpp_embeddings_are_model_wide(llama: SimServer) -> None:
    answer = keyed(llama.port, "POST", "/v1/embeddings", {"input": ["a", "b"], "dimensions": 8}).json()
    assert list(answer) == ["model", "object", "usage", "data"]
    assert [len(d["embedding"]) for d in answer["data"]] == [64, 64]  # dimensions is ignored
    assert list(answer["data"][0]) == ["embedding", "index", "object"]
    packed = keyed(llama.port, "POST", "/v1/embeddings", {"input": "a", "encoding_format": "base64"}).json()
    assert packed["data"][0]["encoding_format"] == "base64"


def test_llamacpp_load_phase_answers_503_everywhere() -> None:
    with running(kind="llamacpp", load_seconds=0.4, api_key="k") as sim:
        loading = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
        for path, method in (("/health", "GET"), ("/v1/models", "GET"), ("/v1/chat/completions", "POST")):
            answer = request(sim.port, method, path, chat_body() if method == "POST" else None)
            assert (answer.status, answer.json()) == (503, loading)
            assert answer.headers["content-type"] == "application/json; charset=utf-8"
            assert answer.headers["connection"] == "close"
        assert wait_for(lambda: sim.loaded, 2.0)
        assert request(sim.port, "GET", "/health").status == 200


def test_localai_readyz_during_load() -> None:
    with running(kind="localai", load_seconds=0.3) as sim:
        starting = request(sim.port, "GET", "/readyz")
        assert starting.status == 503 and starting.json()["status"] == "starting"
        assert request(sim.port, "GET", "/healthz").status == 200
        assert wait_for(lambda: request(sim.port, "GET", "/readyz").status == 200, 2.0)


def test_vllm_refuses_connections_while_loading() -> None:
    with running(kind="vllm", load_seconds=0.3) as sim:
        with pytest.raises(ConnectionRefusedError):
            Connection(sim.port, timeout=1).close()
        assert wait_for(lambda: sim.loaded, 2.0)
        assert request(sim.port, "GET", "/health").status == 200


# -- faults ---------------------------------------------------------------------------------------------


def test_fault_header_parsing() -> None:
    assert parse_fault("status=503") == Fault(status=503)
    assert parse_fault(" stall-after=2; stall_ms=5000 ,error-after=1") == Fault(
        stall_after=2, stall_ms=5000.0, error_after=1
    )
    for bad in ("status", "status=abc", "nope=1", "status=42", "stall-after=1", "reset-after=-1"):
        with pytest.raises(ConfigError):
            parse_fault(bad)


def test_fault_status(sim: SimServer) -> None:
    answer = request(sim.port, "POST", "/v1/chat/completions", chat_body(), {"x-sim-fault": "status=503"})
    assert answer.status == 503 and answer.json()["error"]["code"] == 503
    with client_for(sim) as client, pytest.raises(openai.RateLimitError):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], extra_headers={"x-sim-fault": "status=429"}
        )
    bad = request(sim.port, "POST", "/v1/chat/completions", chat_body(), {"x-sim-fault": "bogus=1"})
    assert bad.status == 400
    assert sim.stats.faults_total == 2


def test_fault_status_from_config_applies_to_every_inference_request() -> None:
    with running(fault=Fault(status=500)) as sim:
        assert request(sim.port, "POST", "/v1/chat/completions", chat_body()).status == 500
        assert request(sim.port, "POST", "/v1/embeddings", {"input": "x"}).status == 500
        assert request(sim.port, "GET", "/health").status == 200
        # The header adds to, and overrides, the server-wide faults.
        assert (
            request(sim.port, "POST", "/v1/completions", {"prompt": "x"}, {"x-sim-fault": "status=502"}).status == 502
        )


def test_fault_reset_after_chunks(sim: SimServer) -> None:
    with Connection(sim.port) as raw:
        raw.send(
            "POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=10), {"x-sim-fault": "reset-after=3"}
        )
        assert raw.read_head()[0] == 200
        got: list[bytes] = []
        with pytest.raises(ConnectionError):
            for chunk in raw.iter_chunks():
                got.append(chunk)
        assert len(got) == 3
    with Connection(sim.port) as raw:
        raw.send("POST", "/v1/chat/completions", chat_body(), {"x-sim-fault": "reset-after=0"})
        with pytest.raises(ConnectionError):
            raw.read_head()
    assert sim.stats.completed_requests_total == 0 and sim.stats.faults_total == 2


def test_fault_stalls(sim: SimServer) -> None:
    start = time.monotonic()
    answer = request(
        sim.port, "POST", "/v1/chat/completions", chat_body(), {"x-sim-fault": "stall-before-headers-ms=300"}
    )
    assert answer.status == 200 and time.monotonic() - start >= 0.28
    with Connection(sim.port) as raw:
        raw.send(
            "POST",
            "/v1/chat/completions",
            chat_body(stream=True, max_tokens=4),
            {"x-sim-fault": "stall-after=2;stall-ms=300"},
        )
        raw.read_head()
        stamps = [time.monotonic() for _ in raw.iter_chunks()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert gaps[1] >= 0.28  # between event 2 and event 3
    assert max(gaps[:1] + gaps[2:]) < 0.2


@pytest.mark.parametrize(("kind", "done"), [("vllm", True), ("llamacpp", False), ("localai", True), ("tgi", True)])
def test_fault_error_event(kind: str, done: bool) -> None:
    with running(kind=kind) as sim:
        answer = request(
            sim.port,
            "POST",
            "/v1/chat/completions",
            chat_body(stream=True, max_tokens=10),
            {"x-sim-fault": "error-after=2"},
        )
        assert answer.status == 200
        events = answer.events()
        prefix = b"data:" if kind == "tgi" else b"data: "
        body = payloads(events, prefix)
        assert len(body) == 3 + done
        assert "error" in json.loads(body[2])
        assert (body[-1] == b"[DONE]") is done


def test_ollama_mid_stream_error_is_raw_json_without_done() -> None:
    with running(kind="ollama") as sim:
        answer = request(
            sim.port,
            "POST",
            "/v1/chat/completions",
            chat_body(stream=True, max_tokens=10),
            {"x-sim-fault": "error-after=2"},
        )
        events = answer.events()
        assert len(events) == 3
        assert json.loads(events[-1]) == {"error": "simulated fault: generation error"}
        assert b"[DONE]" not in answer.body


def test_fault_error_event_through_client(sim: SimServer) -> None:
    with client_for(sim) as client:
        stream = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_headers={"x-sim-fault": "error-after=3"},
        )
        with pytest.raises(openai.APIError, match="simulated fault"):
            list(stream)
        stream.close()


def test_faults_on_non_streamed_requests(sim: SimServer) -> None:
    chat, embed = "/v1/chat/completions", "/v1/embeddings"
    failed = request(sim.port, "POST", chat, chat_body(max_tokens=5), {"x-sim-fault": "error-after=2"})
    assert failed.status == 500 and "simulated fault" in failed.json()["error"]["message"]
    assert request(sim.port, "POST", embed, {"input": "x"}, {"x-sim-fault": "error-after=3"}).status == 500
    with Connection(sim.port) as raw:
        raw.send("POST", chat, chat_body(max_tokens=5), {"x-sim-fault": "reset-after=2"})
        with pytest.raises(ConnectionError):
            raw.read_head()
    # A count past the completion's length never fires.
    assert request(sim.port, "POST", chat, chat_body(max_tokens=2), {"x-sim-fault": "error-after=9"}).status == 200
    assert sim.stats.faults_total == 3


def test_llamacpp_error_before_first_token_is_a_plain_error() -> None:
    with running(kind="llamacpp") as sim:
        answer = request(
            sim.port, "POST", "/v1/chat/completions", chat_body(stream=True), {"x-sim-fault": "error-after=0"}
        )
        assert answer.status == 500 and answer.json()["error"]["type"] == "server_error"


# -- disconnects, timing, queueing ---------------------------------------------------------------------


def test_disconnect_aborts_generation() -> None:
    with running(itl_ms=20) as sim:
        raw = Connection(sim.port)
        raw.send("POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=500))
        raw.read_head()
        chunks = raw.iter_chunks()
        next(chunks), next(chunks)
        assert sim.stats.running == 1
        raw.close()
        assert wait_for(lambda: sim.stats.aborted_requests_total == 1, 1.0)
        assert sim.stats.running == 0 and sim.stats.completed_requests_total == 0
        assert sim.stats.generated_tokens_total < 100


def test_disconnect_while_queued_and_non_stream() -> None:
    with running(itl_ms=20, max_running=1) as sim:
        first, second = Connection(sim.port), Connection(sim.port)
        first.send("POST", "/v1/chat/completions", chat_body(max_tokens=500))
        assert wait_for(lambda: sim.stats.running == 1)
        second.send("POST", "/v1/chat/completions", chat_body(max_tokens=5))
        assert wait_for(lambda: sim.stats.waiting == 1)
        second.close()
        assert wait_for(lambda: sim.stats.aborted_requests_total == 1 and sim.stats.waiting == 0)
        first.close()
        assert wait_for(lambda: sim.stats.aborted_requests_total == 2 and sim.stats.running == 0)


def test_timing_knobs_are_roughly_honoured() -> None:
    with running(ttft_ms=200, itl_ms=20) as sim:
        with Connection(sim.port) as raw:
            start = time.monotonic()
            raw.send("POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=20))
            raw.read_head()
            stamps = [time.monotonic() - start for _ in raw.iter_chunks()]
        ttft = stamps[1]  # the first content chunk
        assert 0.18 <= ttft < 0.6
        assert stamps[-1] - ttft > 0.3  # 19 gaps of 20 ms
        assert stamps[-1] < 1.5
        # Per-request overrides.
        start = time.monotonic()
        answer = request(
            sim.port,
            "POST",
            "/v1/completions",
            {"prompt": "x", "max_tokens": 5},
            {"x-sim-ttft-ms": "0", "x-sim-itl-ms": "0"},
        )
        assert answer.status == 200 and time.monotonic() - start < 0.15


def test_prefill_and_queueing_grow_ttft() -> None:
    with running(prefill_us_per_token=1000, itl_ms=30, max_running=1) as sim:
        start = time.monotonic()
        assert request(sim.port, "POST", "/v1/completions", {"prompt": "x" * 800, "max_tokens": 1}).status == 200
        assert time.monotonic() - start >= 0.18  # 200 prompt tokens at 1 ms each
        one, two = Connection(sim.port), Connection(sim.port)
        with one, two:
            start = time.monotonic()
            one.send("POST", "/v1/chat/completions", chat_body(max_tokens=8))
            assert wait_for(lambda: sim.stats.running == 1)
            two.send("POST", "/v1/chat/completions", chat_body(max_tokens=8))
            assert one.read_response().status == 200
            first_done = time.monotonic() - start
            assert two.read_response().status == 200
            second_done = time.monotonic() - start
        assert first_done >= 0.2 and second_done >= 2 * 0.2


def test_x_sim_tokens_sets_default_length(sim: SimServer) -> None:
    answer = request(sim.port, "POST", "/v1/chat/completions", chat_body(max_tokens=None), {"x-sim-tokens": "7"})
    assert answer.json()["usage"]["completion_tokens"] == 7
    assert answer.json()["choices"][0]["finish_reason"] == "stop"


# -- HTTP/1.1 handling ---------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(sim: SimServer) -> None:
    with Connection(sim.port) as raw:
        for _ in range(3):
            assert raw.request("POST", "/v1/chat/completions", chat_body(stream=True)).status == 200
            assert raw.request("POST", "/v1/chat/completions", chat_body()).status == 200
            assert raw.request("GET", "/health").status == 200
    with client_for(sim) as client:
        for _ in range(5):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert wait_for(lambda: sim.stats.open_connections == 1)  # the client's pool keeps its connection
    assert sim.stats.connections_total == 2
    assert sim.stats.http_requests_total == 14
    assert wait_for(lambda: sim.stats.open_connections == 0)


def test_connection_close_and_http10(sim: SimServer) -> None:
    with Connection(sim.port) as raw:
        answer = raw.request("GET", "/health", headers={"connection": "close"})
        assert answer.status == 200 and answer.headers["connection"] == "close"
        assert raw.is_closed_by_peer()
    with Connection(sim.port) as raw:
        raw.send("POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=2), version="HTTP/1.0")
        answer = raw.read_response()
        assert "transfer-encoding" not in answer.headers
        assert answer.events()[-1] == b"data: [DONE]"


@pytest.mark.parametrize(
    "raw_request",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health HTTP/2.0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nbad header\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\ncontent-length: x\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
        b"GET health HTTP/1.1\r\n\r\n",
    ],
)
def test_malformed_requests_get_4xx_and_close(sim: SimServer, raw_request: bytes) -> None:
    with Connection(sim.port) as raw:
        raw.sock.sendall(raw_request)
        answer = raw.read_response()
        assert 400 <= answer.status < 600
        assert raw.is_closed_by_peer()
    assert request(sim.port, "GET", "/health").status == 200


def test_body_in_pieces_and_invalid_json(sim: SimServer) -> None:
    body = json.dumps(chat_body()).encode()
    with Connection(sim.port) as raw:
        raw.sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-len")
        time.sleep(0.02)
        raw.sock.sendall(b"gth: %d\r\n\r\n" % len(body) + body[:10])
        time.sleep(0.02)
        raw.sock.sendall(body[10:])
        assert raw.read_response().status == 200
        assert raw.request("POST", "/v1/chat/completions", b"{not json").status == 400


def test_metrics_text(sim: SimServer) -> None:
    request(sim.port, "POST", "/v1/chat/completions", chat_body())
    text = request(sim.port, "GET", "/metrics").body.decode()
    values = dict(re.findall(r"^([a-z_:]+)(?:\{[^}]*\})? (\d+)$", text, re.M))
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "sim_open_connections"):
        assert name in values
    assert values["sim_requests_total"] == values["sim_completed_requests_total"] == "1"
    assert values["sim_aborted_requests_total"] == "0"
    assert int(values["sim_connections_total"]) == 2


def test_config_validation_and_repr() -> None:
    with pytest.raises(ConfigError):
        make_config(kind="nope")
    with pytest.raises(ConfigError):
        make_config(max_running=0)
    config = make_config(api_key="secret", ttft_ms=0, itl_ms=0, itl_jitter_ms=0, prefill_us_per_token=0)
    assert "secret" not in repr(config) and config.fast
    assert not SimConfig().fast


def test_concurrent_streams_from_threads() -> None:
    with running(itl_ms=2) as sim:
        errors: list[BaseException] = []

        def one() -> None:
            try:
                answer = request(sim.port, "POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=20))
                assert len(answer.events()) == 23
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        assert sim.stats.completed_requests_total == 16 and sim.stats.running == 0


# -- the command line ----------------------------------------------------------------------------------


def test_python_m_gateway_sim_subprocess() -> None:
    env = {**os.environ, "SIM_MODEL": "from-env"}
    with SimProc("--kind", "sglang", "--fast", "--api-key", "k", env=env) as sim:
        assert re.match(r"http://127\.0\.0\.1:\d+$", sim.url), sim.url
        models = request(sim.port, "GET", "/v1/models", headers={"x-api-key": "k"}).json()
        assert models["data"][0]["id"] == "from-env"
        assert request(sim.port, "GET", "/v1/models").status == 401
        assert sim.stop(signal.SIGTERM, timeout=5) == 0


def test_cli_rejects_bad_flags() -> None:
    import argparse

    from gateway.sim.cli import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = config_from_args(parser.parse_args(["--kind", "tgi", "--fast", "--error-after", "2", "--no-embeddings"]))
    assert config.kind == "tgi" and config.fast and config.fault == Fault(error_after=2) and not config.embeddings
    with pytest.raises(ConfigError):
        config_from_args(parser.parse_args(["--stall-after", "1"]))
    with pytest.raises(ConfigError):
        config_from_args(parser.parse_args(["--itl-ms", "-1"]))
    assert config_from_args(parser.parse_args(["--kind", "llamacpp", "--ctx-size", "512"])).ctx_size == 512
    with pytest.raises(ConfigError):
        config_from_args(parser.parse_args(["--ctx-size", "0"]))


def test_a_responses_token_event_is_the_bytes_the_generic_writer_writes() -> None:
    """The Responses stream's token events are built from pre-made parts: byte for byte what
    ``_ev`` writes for the same event (a drift between the two would change what clients parse)."""
    import orjson

    from gateway.sim.responses import WORDS_JSON
    from gateway.sim.surfaces import ResponsesFrames

    frames = ResponsesFrames("m", 3)
    for i in range(3):
        token = frames.token(i, 0)
        frames.seq -= 1  # the same sequence number again, for the generic writer
        where = {"item_id": frames.item_id, "output_index": 0, "content_index": 0}
        word = orjson.loads(WORDS_JSON[i])
        assert token == frames._ev("response.output_text.delta", **where, delta=word, logprobs=[])
    assert frames.seq == 3


def test_the_simulator_settles_its_collector_while_it_serves(collector: list[dict[str, Any]]) -> None:
    """``python -m gateway.sim`` serves with the collector settled as the gateway's worker is
    (``gateway.heap``): a simulator holding 1,000 streams otherwise ran full collections of some
    30 ms over them, a stall of every stream it paces that a client reads as the gateway's. A
    stop puts the collector back (and the ``collector`` fixture does, should the test fail)."""
    import asyncio
    import gc

    from gateway import heap
    from gateway.sim.cli import _serve

    before = gc.get_threshold()
    assert before[0] != heap.YOUNG

    async def run() -> tuple[tuple[int, ...], int]:
        serving = asyncio.create_task(_serve(make_config(port=0)))
        for _ in range(500):
            if gc.get_threshold()[0] == heap.YOUNG:
                break
            await asyncio.sleep(0.01)
        seen = gc.get_threshold()
        os.kill(os.getpid(), signal.SIGTERM)  # _serve's own handler: a clean stop
        return seen, await asyncio.wait_for(serving, 10)

    seen, code = asyncio.run(run())
    assert seen[0] == heap.YOUNG and code == 0
    assert gc.get_threshold() == before
