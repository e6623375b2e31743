"""End to end against the real llama.cpp server, on the surfaces beyond chat that it serves: the
Anthropic Messages API (``/v1/messages``, ``count_tokens``), the Responses API (create), and
``/tokenize``, ``/detokenize``; its rerank (501 unless started with ``--reranking``) relayed, and
the gateway's own 501 for score, which llama-server does not serve. Driven by the official
``anthropic`` and ``openai`` clients through ``gateway serve`` (``BACKEND_KIND=llamacpp``).

A backend that dies mid-stream (SIGKILL on llama-server) must make each client raise, and a
client that leaves must make llama-server cancel the task, on each streamed surface.
Needs the binary from ``tests/tools/build_llama_server.py``; without it the module skips.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import orjson
import pytest
from anthropic.types import MessageParam

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
    task_started,
    unavailable_reason,
)
from tests.promtext import metric
from tests.servers import Gateway, wait_until

pytestmark = pytest.mark.slow

_reason = unavailable_reason()
if _reason is not None:
    pytest.skip(_reason, allow_module_level=True)

HI: list[MessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def gw(llama: LlamaServer, module_tmp: Path) -> Iterator[Gateway]:
    with gateway_for(module_tmp, llama) as g:
        yield g
        assert g.stop() == 0


@pytest.fixture
def claude(gw: Gateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key=CLIENT_KEY, max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture
def oai(gw: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30) as c:
        yield c


def tokens(gw: Gateway, kind: str) -> float:
    return metric(request(gw.port, "GET", "/metrics")[2].decode(), "gateway_tokens_total", type=kind)


def test_messages_create_stream_and_count_tokens(gw: Gateway, claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model=ALIAS, max_tokens=4, messages=HI)
    assert m.type == "message" and m.content[0].type == "text" and m.usage.output_tokens == 4
    assert m.stop_reason == "max_tokens"  # the tiny model never samples an end token
    with anthropic.Anthropic(base_url=gw.url, auth_token=CLIENT_KEY, max_retries=0, timeout=30) as bearer:
        assert bearer.messages.create(model=ALIAS, max_tokens=2, messages=HI).usage.output_tokens == 2
    before_in, before_out = tokens(gw, "input"), tokens(gw, "output")
    with claude.messages.stream(model=ALIAS, max_tokens=5, messages=HI) as stream:
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert final.usage.output_tokens == 5 and len(text) >= 1
    counted = claude.messages.count_tokens(model=ALIAS, messages=HI).input_tokens
    assert counted > 1
    # The prompt's tokens, those llama.cpp read from its cache included, and the output's.
    assert wait_until(lambda: tokens(gw, "output") >= before_out + 5, 3.0, 0.1)
    assert wait_until(lambda: tokens(gw, "input") >= before_in + counted, 3.0, 0.1)


def test_responses_streamed_and_not(gw: Gateway, oai: openai.OpenAI) -> None:
    """``responses.create``, streamed and not. (``responses.stream()`` fails against llama-server
    itself, with or without the gateway: its events carry no ``output_index``, which that helper's
    accumulator indexes by.)"""
    before = tokens(gw, "output")
    r = oai.responses.create(model=ALIAS, input="hi", max_output_tokens=3)
    assert r.id.startswith("resp_") and r.usage is not None and r.usage.output_tokens == 3
    events = list(oai.responses.create(model=ALIAS, input="hi", max_output_tokens=3, stream=True))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) == 3
    assert wait_until(lambda: tokens(gw, "output") >= before + 6, 3.0, 0.1)


def test_tokenize_and_detokenize_relayed(gw: Gateway, llama: LlamaServer) -> None:
    for path, body in (("/tokenize", {"content": "hello"}), ("/detokenize", {"tokens": [101, 81, 81, 84]})):
        direct = request(llama.port, "POST", path, body, SERVER_KEY)
        through = request(gw.port, "POST", path, body, CLIENT_KEY)
        assert through[0] == direct[0] == 200 and through[2] == direct[2], path
    assert orjson.loads(request(gw.port, "POST", "/detokenize", {"tokens": [101, 81, 81, 84]}, CLIENT_KEY)[2]) == {
        "content": "hello"
    }


def test_rerank_relayed_and_score_refused(gw: Gateway, llama: LlamaServer) -> None:
    body = {"model": ALIAS, "query": "a", "documents": ["a", "b"]}
    direct = request(llama.port, "POST", "/v1/rerank", body, SERVER_KEY)
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        through = request(gw.port, "POST", path, body, CLIENT_KEY)
        assert (through[0], through[2]) == (direct[0], direct[2]) == (501, direct[2]), path  # llama.cpp's own 501
    status, _, raw = request(gw.port, "POST", "/v1/score", {"model": ALIAS, "text_1": "a", "text_2": "b"}, CLIENT_KEY)
    assert status == 501 and orjson.loads(raw)["error"]["code"] == "not_supported"  # the gateway's


# -- a backend that dies mid-stream; a client that leaves -------------------------------------------


def _kill_after_first_token(server: LlamaServer, since: int) -> None:
    task_started(server, since)
    time.sleep(0.3)
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGKILL)


@pytest.mark.parametrize("surface", ["messages", "responses"])
def test_backend_killed_mid_stream_makes_the_client_raise(
    start_llama: StartServer, paced_model: Path, tmp_path: Path, surface: str
) -> None:
    server = start_llama(paced_model, slots=1)
    g = gateway_for(tmp_path, server).start()
    try:
        since = len(server.output())
        with pytest.raises((anthropic.APIStatusError, openai.APIError)) as cut:  # noqa: PT012
            if surface == "messages":
                with anthropic.Anthropic(base_url=g.url, api_key=CLIENT_KEY, max_retries=0, timeout=30) as c:
                    with c.messages.stream(model=ALIAS, max_tokens=1500, messages=HI) as stream:
                        for n, _ in enumerate(stream):
                            if n == 3:
                                _kill_after_first_token(server, since)
            else:
                with openai.OpenAI(base_url=g.base_url, api_key=CLIENT_KEY, max_retries=0, timeout=30) as o:
                    events = o.responses.create(model=ALIAS, input="hi", max_output_tokens=1500, stream=True)
                    for n, _ in enumerate(events):
                        if n == 3:
                            _kill_after_first_token(server, since)
        assert "backend is unavailable" in str(cut.value)
    finally:
        assert g.stop() == 0


@pytest.mark.parametrize(
    ("path", "body", "marker"),
    [
        ("/v1/messages", {"model": ALIAS, "max_tokens": 1500, "messages": HI, "stream": True}, b"content_block_delta"),
        ("/v1/responses", {"model": ALIAS, "input": "hi", "max_output_tokens": 1500, "stream": True}, b"text.delta"),
    ],
)
def test_client_disconnect_cancels_generation(
    start_llama: StartServer, paced_model: Path, tmp_path: Path, path: str, body: dict[str, object], marker: bytes
) -> None:
    server = start_llama(paced_model, slots=1)
    g = gateway_for(tmp_path, server).start()
    try:
        since = len(server.output())
        s = send_keeping_open(g.port, path, body)
        task = task_started(server, since)
        read_markers(s, marker, 3)
        s.abort()
        cancelled = server.wait_for_output(f"stop: cancel task, id_task = {task}", timeout=3.0, start=since)
        assert cancelled is not None, f"the server never cancelled task {task}:\n{server.output()[since:]}"
    finally:
        assert g.stop() == 0
