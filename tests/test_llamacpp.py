"""End to end against the real llama.cpp server: ``gateway serve`` (``BACKEND_KIND=llamacpp``) in
front of ``llama-server`` running a generated tiny model, driven by the official ``openai`` client
and by raw HTTP. What the server answers is compared with what the gateway relays.

Needs the binary from ``tests/tools/build_llama_server.py`` (``tests/run.sh`` builds it once per
machine); without it the module skips, saying why.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.llamacpp import (
    ALIAS,
    CLIENT_KEY,
    SERVER_KEY,
    LlamaServer,
    StartServer,
    gateway_for,
    read_markers,
    request,
    send_keeping_open,
    sse_events,
    stable,
    task_started,
    unavailable_reason,
)
from tests.servers import Gateway, free_port

#: A real llama-server per module and model: seconds each, so outside the fast lane.
pytestmark = pytest.mark.slow

_reason = unavailable_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
#: Far more than one slot's 512 tokens of context (the byte-level tokenizer: ~1 token a byte).
TOO_LONG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello world " * 400}]
#: Greedy sampling on a prompt evaluated afresh each time: the same request gives the same text.
SAME_TEXT = {"temperature": 0, "cache_prompt": False}


@pytest.fixture(scope="module")
def gw(llama: LlamaServer, module_tmp: Path) -> Iterator[Gateway]:
    with gateway_for(module_tmp, llama) as g:
        yield g
        assert g.stop() == 0


@pytest.fixture(scope="module")
def gw_embed(llama_embed: LlamaServer, module_tmp: Path) -> Iterator[Gateway]:
    with gateway_for(module_tmp, llama_embed) as g:
        yield g
        assert g.stop() == 0


@pytest.fixture
def client(gw: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30) as c:
        yield c


def both(
    gw: Gateway, server: LlamaServer, method: str, path: str, body: object = None
) -> tuple[tuple[int, dict[str, str], bytes], tuple[int, dict[str, str], bytes]]:
    """The same request through the gateway and straight to the server."""
    return request(gw.port, method, path, body, CLIENT_KEY), request(server.port, method, path, body, SERVER_KEY)


# -- the OpenAI surface through the official client ------------------------------------------------


def test_models_and_chat(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [ALIAS]
    r = client.chat.completions.create(model="anything", messages=HI, max_tokens=7)
    assert r.model == ALIAS
    assert r.choices[0].finish_reason == "length"
    assert isinstance(r.choices[0].message.content, str) and r.choices[0].message.content
    assert r.usage is not None and r.usage.completion_tokens == 7


def test_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model=ALIAS, prompt="the", max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens == 5


@pytest.mark.parametrize("n", [1, 12, 100])
def test_chat_stream_one_event_per_token(client: openai.OpenAI, n: int) -> None:
    stream = client.chat.completions.create(
        model=ALIAS,
        messages=HI,
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == n
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == n


def test_completions_stream(client: openai.OpenAI) -> None:
    chunks = list(
        client.completions.create(
            model=ALIAS, prompt="the", max_tokens=9, stream=True, stream_options={"include_usage": True}
        )
    )
    assert len([c for c in chunks if c.choices and c.choices[0].text]) == 9
    assert chunks[-1].choices[0].finish_reason == "length"
    # llama.cpp puts the usage on the finish chunk here, not on an extra chunk with no choices.
    usage = [c.usage for c in chunks if c.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 9


def test_concurrent_streams_more_than_slots(gw: Gateway) -> None:
    body = {"model": ALIAS, "messages": HI, "max_tokens": 40, "stream": True}
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: request(gw.port, "POST", "/v1/chat/completions", body, CLIENT_KEY), range(6)))
    for status, _, raw in answers:
        assert status == 200
        events = sse_events(raw)
        assert events[-1] == b"[DONE]" and len(events) == 1 + 40 + 1 + 1  # role, tokens, finish, [DONE]


# -- the stream on the wire ---------------------------------------------------------------------------


@pytest.mark.parametrize("include_usage", [True, False])
def test_stream_bytes_match_the_server(gw: Gateway, llama: LlamaServer, include_usage: bool) -> None:
    body: dict[str, object] = {"model": ALIAS, "messages": HI, "max_tokens": 6, "stream": True, **SAME_TEXT}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    (status, headers, raw), (d_status, d_headers, d_raw) = both(gw, llama, "POST", "/v1/chat/completions", body)
    assert status == d_status == 200
    for name in ("content-type", "x-accel-buffering"):
        assert headers[name] == d_headers[name]
    assert headers["content-type"] == "text/event-stream"
    assert "content-length" not in headers
    assert raw.endswith(b"data: [DONE]\n\n")
    events = sse_events(raw)
    chunks = [orjson.loads(e) for e in events[:-1]]
    first, tokens = chunks[0], chunks[1:7]
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert all(c["choices"][0]["delta"].keys() == {"content"} for c in tokens)
    finish = chunks[7]
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    if include_usage:
        assert len(chunks) == 9
        assert chunks[8]["choices"] == [] and chunks[8]["usage"]["completion_tokens"] == 6
    else:
        assert len(chunks) == 8 and "usage" not in finish
    # Event for event the same as the server's own answer to the same request.
    assert [stable(c) for c in chunks] == [stable(orjson.loads(e)) for e in sse_events(d_raw)[:-1]]


def test_non_streamed_matches_the_server(gw: Gateway, llama: LlamaServer) -> None:
    body = {"model": ALIAS, "messages": HI, "max_tokens": 20, **SAME_TEXT}
    (status, headers, raw), (d_status, d_headers, d_raw) = both(gw, llama, "POST", "/v1/chat/completions", body)
    assert status == d_status == 200
    assert headers["content-type"] == d_headers["content-type"] == "application/json; charset=utf-8"
    assert stable(orjson.loads(raw)) == stable(orjson.loads(d_raw))


# -- embeddings ------------------------------------------------------------------------------------------


def test_embeddings(gw_embed: Gateway, llama_embed: LlamaServer) -> None:
    with openai.OpenAI(base_url=gw_embed.url + "/v1", api_key=CLIENT_KEY, max_retries=0, timeout=30) as c:
        r = c.embeddings.create(model=ALIAS, input=["hello", "world"])
        assert [len(d.embedding) for d in r.data] == [64, 64]
        assert r.data[0].embedding != r.data[1].embedding
        # Chat still works on a server started with --embeddings.
        chat = c.chat.completions.create(model=ALIAS, messages=HI, max_tokens=3)
        assert chat.usage is not None and chat.usage.completion_tokens == 3
    (status, _, raw), (d_status, _, d_raw) = both(
        gw_embed, llama_embed, "POST", "/v1/embeddings", {"model": ALIAS, "input": "same"}
    )
    assert status == d_status == 200
    assert orjson.loads(raw)["data"] == orjson.loads(d_raw)["data"]


def test_embeddings_unsupported_relayed_unchanged(gw: Gateway, llama: LlamaServer, client: openai.OpenAI) -> None:
    (status, headers, raw), (d_status, d_headers, d_raw) = both(
        gw, llama, "POST", "/v1/embeddings", {"model": ALIAS, "input": "x"}
    )
    assert status == d_status == 501
    assert raw == d_raw
    assert headers["content-type"] == d_headers["content-type"]
    assert orjson.loads(raw)["error"]["type"] == "not_supported_error"
    with pytest.raises(openai.InternalServerError) as info:
        client.embeddings.create(model=ALIAS, input="x")
    assert info.value.status_code == 501


# -- errors from the server, relayed unchanged --------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_over_context_relayed_unchanged(gw: Gateway, llama: LlamaServer, stream: bool) -> None:
    body = {"model": ALIAS, "messages": TOO_LONG, "max_tokens": 4, "stream": stream}
    (status, headers, raw), (d_status, _, d_raw) = both(gw, llama, "POST", "/v1/chat/completions", body)
    assert status == d_status == 400
    assert raw == d_raw
    assert headers["content-type"].startswith("application/json")  # a plain error even for a stream
    err = orjson.loads(raw)["error"]
    assert err["type"] == "exceed_context_size_error" and err["n_ctx"] == 512 and err["n_prompt_tokens"] > 512


def test_prompt_over_context_through_client(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=ALIAS, messages=TOO_LONG, max_tokens=4)
    assert "exceeds the available context size" in info.value.message


def test_wrong_backend_key_relayed(llama: LlamaServer, tmp_path: Path) -> None:
    g = gateway_for(tmp_path, llama, BACKEND_API_KEY="not-the-key").start()
    try:
        status, _, raw = request(g.port, "POST", "/v1/chat/completions", {"messages": HI}, CLIENT_KEY)
        d_status, _, d_raw = request(llama.port, "POST", "/v1/chat/completions", {"messages": HI}, "not-the-key")
        assert status == d_status == 401
        assert raw == d_raw == b'{"error":{"message":"Invalid API Key","type":"authentication_error","code":401}}'
        with (
            openai.OpenAI(base_url=g.url + "/v1", api_key=CLIENT_KEY, max_retries=0) as c,
            pytest.raises(openai.AuthenticationError),
        ):
            c.chat.completions.create(model=ALIAS, messages=HI)
        # /ready probes /health, which needs no key: the server is up, only the key is wrong.
        assert request(g.port, "GET", "/ready")[0] == 200
    finally:
        assert g.stop() == 0


# -- readiness ------------------------------------------------------------------------------------------


def test_ready(gw: Gateway) -> None:
    status, _, raw = request(gw.port, "GET", "/ready")
    info = orjson.loads(raw)
    assert status == 200
    assert (info["status"], info["kind"], info["backend_status"]) == ("ready", "llamacpp", 200)


def test_ready_unreachable_until_the_server_starts(start_llama: StartServer, tmp_path: Path) -> None:
    port = free_port()
    server = start_llama(port=port, start=False)
    g = gateway_for(tmp_path, server).start()
    try:
        status, _, raw = request(g.port, "GET", "/ready")
        info = orjson.loads(raw)
        assert status == 503 and info["status"] == "unreachable" and info["backend_status"] is None
        server.start()
        status, _, raw = request(g.port, "GET", "/ready")
        assert status == 200 and orjson.loads(raw)["status"] == "ready"
    finally:
        assert g.stop() == 0


# -- a client that leaves: the server cancels the generation ------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["mid-stream", "non-streamed"])
def test_client_disconnect_cancels_generation(
    start_llama: StartServer, paced_model: Path, tmp_path: Path, stream: bool
) -> None:
    # One slot of 2,048 tokens on the paced model: 2,000 tokens would take 15 s or more.
    server = start_llama(paced_model, slots=1)
    g = gateway_for(tmp_path, server).start()
    try:
        since = len(server.output())
        body = {"model": ALIAS, "messages": HI, "max_tokens": 2000, "stream": stream}
        s = send_keeping_open(g.port, "/v1/chat/completions", body)
        try:
            task = task_started(server, since)
            if stream:
                read_markers(s, b"data: ", 5)
            else:
                time.sleep(0.3)
        finally:
            gone = time.monotonic()
            s.abort()
        cancelled = server.wait_for_output(f"stop: cancel task, id_task = {task}", timeout=3.0, start=since)
        assert cancelled is not None, f"the server never cancelled task {task}:\n{server.output()[since:]}"
        assert time.monotonic() - gone < 2.0
        # ... released the slot after a few hundred tokens at most (not the 2,000 asked for) ...
        assert server.wait_for_output(f"task {task} | stop processing", timeout=2.0, start=since) is not None
        released = re.search(rf"task {task} \| stop processing: n_tokens = (\d+)", server.output()[since:])
        assert released is not None and int(released.group(1)) < 500
        # ... and serves a new request on its only slot straight away.
        t0 = time.monotonic()
        status, _, raw = request(g.port, "POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 5}, CLIENT_KEY)
        assert status == 200 and orjson.loads(raw)["usage"]["completion_tokens"] == 5
        assert time.monotonic() - t0 < 2.0
    finally:
        assert g.stop() == 0
