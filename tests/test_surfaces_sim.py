"""End to end, with the official clients: the Messages API (anthropic), the Responses API (openai),
tokenize, detokenize, rerank and score through a real gateway (``gateway serve``) in front of
simulated vLLM (two replicas), llama.cpp and TGI backends, with a routes file.

Each surface is checked for its answers, its token counts in /metrics, routing by model and alias,
the gateway's 501 in the surface's shape, a backend reset mid-stream seen by the client as an error
(the client raises; never a complete answer), and a client disconnect aborting the generation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import orjson
import pytest
from anthropic.types import MessageParam, ToolChoiceToolParam, ToolParam
from openai.types.chat import ChatCompletionMessageParam

from gateway.sim import SimServer
from tests import rawhttp
from tests.promtext import metric
from tests.rawhttp import connect, request_bytes
from tests.servers import NO_DELAY, Gateway, sim, wait_until

KEY = "client-key-surfaces"
BACKEND_KEY = "sim-backend-key"
#: Every simulator: no delays unless a request asks, a few tokens per answer.
SIM = {**NO_DELAY, "api_key": BACKEND_KEY, "tokens": 6}


@pytest.fixture(scope="module")
def sims() -> Iterator[dict[str, SimServer]]:
    with (
        sim(kind="vllm", **SIM) as v1,
        sim(kind="vllm", **SIM) as v2,
        sim(kind="llamacpp", **SIM) as llama,
        sim(kind="tgi", **SIM) as tgi,
    ):
        yield {"v1": v1, "v2": v2, "llama": llama, "tgi": tgi}


@pytest.fixture(scope="module")
def gw(sims: dict[str, SimServer], module_tmp: Path) -> Iterator[Gateway]:
    routes_file = module_tmp / "routes.toml"
    v1, v2, llama, tgi = sims["v1"], sims["v2"], sims["llama"], sims["tgi"]
    routes_file.write_text(
        # p2c: the same prompt then reaches both replicas (where a stored response lives matters).
        "[[backends]]\nname='v'\nkind='vllm'\napi_key_env='SIM_KEY'\nbalance='p2c'\n"
        f"urls=['{v1.base_url}', '{v2.base_url}']\nmodels=['m-v']\naliases={{'claude-alias'='m-v'}}\n"
        "[[backends]]\nname='l'\nkind='llamacpp'\napi_key_env='SIM_KEY'\n"
        f"urls=['{llama.base_url}']\nmodels=['m-l']\n"
        "[[backends]]\nname='t'\nkind='tgi'\napi_key_env='SIM_KEY'\n"
        f"urls=['{tgi.base_url}']\nmodels=['m-t']\n"
    )
    with Gateway(module_tmp, GATEWAY_ROUTES=str(routes_file), SIM_KEY=BACKEND_KEY, API_KEYS=KEY) as g:
        yield g
        assert g.stop() == 0


@pytest.fixture
def claude(gw: Gateway) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key=KEY, max_retries=0) as c:
        yield c


@pytest.fixture
def oai(gw: Gateway) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=gw.base_url, api_key=KEY, max_retries=0) as c:
        yield c


def tokens(gw: Gateway, backend: str, kind: str) -> float:
    text = gw.request("GET", "/metrics").body.decode()
    return metric(text, "gateway_tokens_total", backend=backend, type=kind)


def counted(gw: Gateway, backend: str, kind: str, at_least: float) -> bool:
    """Whether /metrics shows the tokens within 3 s (the figures are written every second)."""
    return wait_until(lambda: tokens(gw, backend, kind) >= at_least, 3.0, 0.1)


HI: list[MessageParam] = [{"role": "user", "content": "hello there"}]
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
TOOLS: list[ToolParam] = [{"name": "lookup", "description": "look it up", "input_schema": {"type": "object"}}]


# -- Messages -------------------------------------------------------------------------------------


def test_messages_with_the_key_in_x_api_key_and_as_a_bearer_token(gw: Gateway, claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model="m-v", max_tokens=4, messages=HI)
    assert [b.type for b in m.content] == ["text"]
    assert m.content[0].type == "text" and m.content[0].text == " the quick brown fox"
    assert (m.stop_reason, m.usage.output_tokens) == ("max_tokens", 4)
    with anthropic.Anthropic(base_url=gw.url, auth_token=KEY, max_retries=0) as bearer:
        assert bearer.messages.create(model="m-v", max_tokens=2, messages=HI).usage.output_tokens == 2
    with anthropic.Anthropic(base_url=gw.url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(anthropic.AuthenticationError) as refused:
            wrong.messages.create(model="m-v", max_tokens=2, messages=HI)
    body = refused.value.body
    assert isinstance(body, dict) and body["type"] == "error" and body["error"]["type"] == "authentication_error"
    # Two different keys: refused, whichever is valid.
    r = gw.request("POST", "/v1/messages", {"model": "m-v", "max_tokens": 1, "messages": HI},
                   {"x-api-key": KEY, "authorization": "Bearer other"})  # fmt: skip
    assert r.status == 401 and orjson.loads(r.body)["error"]["type"] == "authentication_error"


def test_messages_stream_text_and_tokens_counted(gw: Gateway, claude: anthropic.Anthropic) -> None:
    before_in, before_out = tokens(gw, "v", "input"), tokens(gw, "v", "output")
    with claude.messages.stream(model="m-v", max_tokens=5, messages=HI) as stream:
        text = stream.get_final_text()
        final = stream.get_final_message()
    assert text == " the quick brown fox jumps"
    assert final.usage.output_tokens == 5 and final.stop_reason == "max_tokens"
    assert counted(gw, "v", "output", before_out + 5)
    assert counted(gw, "v", "input", before_in + final.usage.input_tokens)


def test_messages_tool_use_and_count_tokens(claude: anthropic.Anthropic) -> None:
    forced: ToolChoiceToolParam = {"type": "tool", "name": "lookup"}
    m = claude.messages.create(model="m-v", max_tokens=3, messages=HI, tools=TOOLS, tool_choice=forced)
    (block,) = m.content
    assert block.type == "tool_use" and block.name == "lookup" and block.input == {"text": " the quick brown"}
    assert m.stop_reason == "tool_use"
    with claude.messages.stream(
        model="m-l",
        max_tokens=2,
        messages=HI,
        tools=TOOLS,
        tool_choice={"type": "any"},
    ) as stream:
        (block,) = stream.get_final_message().content
    assert block.type == "tool_use" and block.input == {"text": " the quick"}
    assert claude.messages.count_tokens(model="m-v", messages=HI).input_tokens == 3


def test_messages_routed_by_model_and_alias_and_refused_in_anthropic_shape(
    sims: dict[str, SimServer], claude: anthropic.Anthropic
) -> None:
    llama = sims["llama"].stats.requests_total
    assert claude.messages.create(model="m-l", max_tokens=1, messages=HI).usage.output_tokens == 1
    assert sims["llama"].stats.requests_total == llama + 1
    vllm = sims["v1"].stats.requests_total + sims["v2"].stats.requests_total
    m = claude.messages.create(model="claude-alias", max_tokens=1, messages=HI)
    assert m.model == "m-v"  # the alias rewritten to the backend's model
    assert sims["v1"].stats.requests_total + sims["v2"].stats.requests_total == vllm + 1
    with pytest.raises(anthropic.NotFoundError) as unknown:
        claude.messages.create(model="nope", max_tokens=1, messages=HI)
    assert unknown.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    tgi = sims["tgi"].stats.http_requests_total
    with pytest.raises(anthropic.APIStatusError) as refused:
        claude.messages.create(model="m-t", max_tokens=1, messages=HI)
    assert refused.value.status_code == 501
    message = "The Text Generation Inference backend does not support messages."
    assert refused.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": message}}
    with pytest.raises(anthropic.APIStatusError):
        claude.messages.count_tokens(model="m-t", messages=HI)
    assert sims["tgi"].stats.http_requests_total == tgi  # never contacted


# -- Responses ------------------------------------------------------------------------------------


def test_responses_streamed_and_not_counted_and_retrieved_from_their_replica(
    gw: Gateway, oai: openai.OpenAI, sims: dict[str, SimServer]
) -> None:
    before = tokens(gw, "v", "output")
    r = oai.responses.create(model="m-v", input="hello there", max_output_tokens=3)
    assert r.output_text == " the quick brown" and r.usage is not None and r.usage.output_tokens == 3
    events = list(oai.responses.create(model="m-v", input="hello", max_output_tokens=2, stream=True))
    assert [e.type for e in events][0] == "response.created" and events[-1].type == "response.completed"
    with oai.responses.stream(model="m-v", input="hello", max_output_tokens=4) as stream:
        final = stream.get_final_response()
    assert final.output_text == " the quick brown fox"
    assert counted(gw, "v", "output", before + 3 + 2 + 4)
    # Stored on one of two replicas: every retrieval reaches the one that holds it. p2c between two
    # idle replicas is a coin toss per create: created until each replica holds some (at most 40).
    ids = [final.id]
    for _ in range(40):
        ids.append(oai.responses.create(model="m-v", input="hi", max_output_tokens=1).id)
        held = {rid: name for name in ("v1", "v2") for rid in sims[name].app.surfaces.stored}
        if len({held[rid] for rid in ids}) == 2:
            break
    assert {held[rid] for rid in ids} == {"v1", "v2"}  # both replicas made some
    for rid in ids:
        assert oai.responses.retrieve(rid).id == rid
    oai.responses.delete(ids[0])
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(ids[0])


def test_a_response_continued_goes_to_the_replica_that_holds_its_predecessor(
    oai: openai.OpenAI, sims: dict[str, SimServer]
) -> None:
    first = oai.responses.create(model="m-v", input="hi", max_output_tokens=1)
    holder = next(name for name in ("v1", "v2") if first.id in sims[name].app.surfaces.stored)
    other = "v2" if holder == "v1" else "v1"
    before = {name: sims[name].stats.requests_total for name in ("v1", "v2")}
    previous = first.id
    for _ in range(6):
        previous = oai.responses.create(
            model="m-v", input="and then?", previous_response_id=previous, max_output_tokens=1
        ).id
        assert previous in sims[holder].app.surfaces.stored  # each one made where its predecessor is
    assert sims[holder].stats.requests_total == before[holder] + 6
    assert sims[other].stats.requests_total == before[other]


def test_responses_refused_by_a_kind_without_them(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        oai.responses.create(model="m-t", input="hi")
    assert refused.value.status_code == 501 and refused.value.body["code"] == "not_supported"  # type: ignore[index]


# -- tokenize, detokenize, rerank, score --------------------------------------------------------------


def auth() -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}"}


def test_tokenize_and_detokenize_on_each_kind(gw: Gateway) -> None:
    ids = list("héllo".encode())
    for model, body in (("m-v", {"prompt": "héllo"}), ("m-l", {"content": "héllo"}), ("m-t", {"inputs": "héllo"})):
        r = gw.request("POST", "/tokenize", {"model": model, **body}, auth())
        assert r.status == 200, r.body
        answer = orjson.loads(r.body)
        # Each kind's own answer, relayed: vLLM's with a count, llama.cpp's tokens, TGI's spans.
        got = [t["id"] for t in answer] if isinstance(answer, list) else answer["tokens"]
        assert got == ids, model
        assert ("count" in answer) is (model == "m-v")
    for model, key in (("m-v", "prompt"), ("m-l", "content")):
        r = gw.request("POST", "/detokenize", {"model": model, "tokens": list(b"hi")}, auth())
        assert (r.status, orjson.loads(r.body)[key]) == (200, "hi")
    r = gw.request("POST", "/detokenize", {"model": "m-t", "tokens": [104]}, auth())  # TGI has none
    assert r.status == 501 and orjson.loads(r.body)["error"]["code"] == "not_supported"
    r = gw.request("POST", "/tokenize", {"model": "nope", "prompt": "x"}, auth())
    assert r.status == 404 and orjson.loads(r.body)["error"]["code"] == "model_not_found"
    assert gw.request("POST", "/tokenize", {"model": "m-v", "prompt": "x"}).status == 401


def test_rerank_and_score_counted_where_served(gw: Gateway) -> None:
    before = tokens(gw, "v", "input")
    docs = ["a fox", "the quick brown fox", "nothing here"]
    reported = 0
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        r = gw.request("POST", path, {"model": "m-v", "query": "quick brown fox", "documents": docs}, auth())
        assert r.status == 200, (path, r.body)
        answer = orjson.loads(r.body)
        assert [x["index"] for x in answer["results"]] == [1, 0, 2]
        reported += answer["usage"]["prompt_tokens"]
    r = gw.request("POST", "/score", {"model": "m-v", "text_1": "fox", "text_2": docs}, auth())
    assert r.status == 200 and len(orjson.loads(r.body)["data"]) == 3
    reported += orjson.loads(r.body)["usage"]["prompt_tokens"]
    assert reported > 0 and counted(gw, "v", "input", before + reported)
    assert gw.request("POST", "/score", {"model": "m-l", "text_1": "x", "text_2": "y"}, auth()).status == 501


# -- faults: a reset mid-stream, a client that leaves ----------------------------------------------


RESET = {"x-sim-fault": "reset-after=3"}


def test_a_reset_mid_stream_makes_every_client_raise(claude: anthropic.Anthropic, oai: openai.OpenAI) -> None:
    with pytest.raises(anthropic.APIStatusError) as cut:  # noqa: PT012
        with claude.messages.stream(model="m-v", max_tokens=8, messages=HI, extra_headers=RESET) as stream:
            for _ in stream:
                pass
    assert "backend is unavailable" in str(cut.value)
    with pytest.raises(anthropic.APIStatusError):  # noqa: PT012
        for _ in claude.messages.create(model="m-l", max_tokens=8, messages=HI, stream=True, extra_headers=RESET):
            pass
    with pytest.raises(openai.APIError) as cut_responses:  # noqa: PT012
        for _ in oai.responses.create(model="m-v", input="hi", max_output_tokens=8, stream=True, extra_headers=RESET):
            pass
    assert "backend is unavailable" in str(cut_responses.value)
    with pytest.raises(openai.APIError):  # noqa: PT012
        with oai.responses.stream(model="m-v", input="hi", max_output_tokens=8, extra_headers=RESET) as stream:
            for _ in stream:
                pass
    with pytest.raises(openai.APIError):  # noqa: PT012
        for _ in oai.chat.completions.create(
            model="m-v", messages=CHAT, max_tokens=8, stream=True, extra_headers=RESET
        ):
            pass


@pytest.mark.parametrize(
    ("path", "body", "marker"),
    [
        ("/v1/messages", {"model": "m-v", "max_tokens": 400, "messages": HI, "stream": True}, b"content_block_delta"),
        ("/v1/responses", {"model": "m-v", "input": "hi", "max_output_tokens": 400, "stream": True}, b"text.delta"),
        ("/v1/messages", {"model": "m-v", "max_tokens": 400, "messages": HI}, None),
    ],
)
def test_a_client_disconnect_aborts_the_generation(
    gw: Gateway, sims: dict[str, SimServer], path: str, body: dict[str, object], marker: bytes | None
) -> None:
    stats = [sims["v1"].stats, sims["v2"].stats]
    requests = sum(s.requests_total for s in stats)
    aborted = sum(s.aborted_requests_total for s in stats)
    headers = {**auth(), "x-sim-itl-ms": "20"}
    conn = connect(gw.port, request_bytes("POST", path, body, headers, close=False))
    if marker is not None:
        conn.read_until(marker)
    else:
        assert wait_until(lambda: sum(s.requests_total for s in stats) > requests, 5)
        time.sleep(0.1)
    conn.abort()
    assert wait_until(lambda: sum(s.aborted_requests_total for s in stats) > aborted, 2.0), "the backend never saw it"


def test_time_to_first_token_is_the_first_content_event(gw: Gateway) -> None:
    """The opening events come at once, the first token 300 ms later: the access log's TTFT is the
    token's, on both surfaces."""
    for path, body in (
        ("/v1/messages", {"model": "m-v", "max_tokens": 2, "messages": HI, "stream": True}),
        ("/v1/responses", {"model": "m-v", "input": "hi", "max_output_tokens": 2, "stream": True}),
    ):
        rid = f"ttft{path.replace('/', '-')}-{time.monotonic_ns()}"
        r = gw.request("POST", path, body, {**auth(), "x-sim-ttft-ms": "300", "x-request-id": rid})
        assert r.status == 200 and (b"message_stop" in r.body or b"response.completed" in r.body)

        def logged(rid: str = rid) -> list[str]:
            return [x for x in gw.output().splitlines() if rid in x]

        assert wait_until(lambda: bool(logged()), 2.0)
        entry = orjson.loads(logged()[0])
        assert entry["ttft_ms"] >= 290 and entry["duration_ms"] >= entry["ttft_ms"]


# -- the simulator on its own: which kind serves what -------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "embeddings", "path", "served"),
    [
        ("tgi", True, "/v1/messages", False),
        ("tgi", True, "/tokenize", True),
        ("tgi", True, "/detokenize", False),
        ("llamacpp", True, "/v1/messages/count_tokens", True),
        ("llamacpp", True, "/v1/rerank", True),
        ("llamacpp", False, "/v1/rerank", False),  # rerank depends on the launch: not without it
        ("sglang", True, "/v1/tokenize", True),
        ("vllm", True, "/rerank", True),
        ("vllm", True, "/v1/rerank", False),  # the simulator serves the canonical spelling only
        ("ollama", True, "/tokenize", False),
    ],
)
def test_the_simulator_serves_what_the_kind_serves(kind: str, embeddings: bool, path: str, served: bool) -> None:
    body = {
        "model": "m",
        "max_tokens": 1,
        "messages": HI,
        "prompt": "x",
        "tokens": [120],
        "query": "q",
        "documents": [],
    }
    with sim(kind=kind, embeddings=embeddings, **NO_DELAY) as s:
        r = rawhttp.request(s.port, "POST", path, body)
    assert (r.status == 200) is served, (r.status, r.body)
    assert served or r.status in (404, 405)


@pytest.mark.parametrize(
    ("path", "body", "opening"),
    [
        ("/v1/messages", {"model": "m", "max_tokens": 4, "messages": HI, "stream": True, "n": 2}, b"message_start"),
        ("/v1/responses", {"model": "m", "input": "hi", "stream": True, "n": 2}, b"response.created"),
    ],
)
def test_n_is_a_chat_field_the_other_surfaces_ignore(path: str, body: dict[str, object], opening: bytes) -> None:
    """llama.cpp's simulator honours ``n`` (several choices) on chats; a Messages or Responses
    stream has no choices: one opening event, each token once."""
    with sim(kind="llamacpp", **NO_DELAY) as s:
        r = rawhttp.request(s.port, "POST", path, body)
    assert r.status == 200, r.body
    assert r.body.count(opening) == 2  # one event: its type is named twice (event line, data)
