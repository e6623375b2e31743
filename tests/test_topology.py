"""One topology, one request path: the settings' one backend and a backends file's several
differ only in their data (which backends, which models), and where the two modes used to
disagree the gateway now does one thing (see the README's "Several backends and replicas")."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from gateway import routes
from gateway.app import Gateway
from gateway.config import settings_from_strings
from gateway.errors import GatewayError
from gateway.netio import AsyncioBackend
from gateway.topology import Topology, settings_backend
from gateway.worker import build_topology, declared_backends
from tests.asgi import call
from tests.fakes import FakeBackend

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def topology(**env: str) -> Topology:
    settings = settings_from_strings(env)
    return build_topology(*declared_backends(settings), settings, AsyncioBackend())


def backends_file(tmp_path: Path, *blocks: str) -> str:
    path = tmp_path / "backends.toml"
    path.write_text("\n".join(f"[[backends]]\n{b}" for b in blocks))
    return str(path)


TWO = (
    "name='chat'\nkind='tgi'\nurls=['http://127.0.0.1:9/v1']\nmodels=['m1']\naliases={a1='m1'}\n",
    "name='embed'\nkind='ollama'\nurls=['http://127.0.0.1:9/v1']\nmodels=['e1']\n",
)


def test_settings_become_one_backend_that_serves_any_model() -> None:
    t = topology(BACKEND_KIND="sglang", BACKEND_BASE_URL="http://h:1/v1,http://h:2/v1", MODEL_NAME="dflt")
    (only,) = t.backends
    assert only.name == "sglang" and len(only.replicas) == 2 and t.any_model is only
    assert t.by_model == {} and t.replicas == 2
    assert t.route_model("anything") == (only, "anything")
    assert t.route_model(None) == (only, "dflt")  # MODEL_NAME filled in
    assert not t.answers_models
    spec = settings_backend(settings_from_strings({"BACKEND_KIND": "tgi", "BACKEND_CAPABILITIES": "+embeddings"}))
    assert spec.name == "tgi" and spec.models == [] and spec.capabilities == "+embeddings"


def test_settings_without_model_name_send_a_modelless_request_as_it_is() -> None:
    t = topology()
    assert t.route_model(None) == (t.first, None)


def test_a_backends_file_routes_by_its_table(tmp_path: Path) -> None:
    t = topology(GATEWAY_ROUTES=backends_file(tmp_path, *TWO))
    chat, embed = t.backends
    assert t.any_model is None and t.answers_models
    assert t.route_model("m1") == (chat, "m1")
    assert t.route_model("a1") == (chat, "m1")  # an alias is rewritten to its model
    assert t.route_model("e1") == (embed, "e1")
    with pytest.raises(GatewayError) as missing:
        t.route_model(None)
    assert (missing.value.status, missing.value.code) == (400, "invalid_request")
    with pytest.raises(GatewayError) as unknown:
        t.route_model("nope")
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")
    listed = orjson.loads(t.model_list())
    assert [(m["id"], m["owned_by"]) for m in listed["data"]] == [("m1", "chat"), ("a1", "chat"), ("e1", "embed")]


def test_the_backend_is_known_before_the_body_when_only_one_could_take_it(tmp_path: Path) -> None:
    one = topology(BACKEND_KIND="tgi")
    assert one.known_before_body(routes.CHAT) is one.first
    with pytest.raises(GatewayError) as refused:  # TGI has no embeddings: refused before the body
        one.known_before_body(routes.EMBEDDINGS)
    assert refused.value.status == 501
    two = topology(GATEWAY_ROUTES=backends_file(tmp_path, *TWO))
    assert two.known_before_body(routes.CHAT) is None  # the model decides
    assert two.known_before_body(routes.RESPONSES) is None  # a Responses create names its model too
    # A path routed by no model goes to the first backend, and its capability is checked there.
    with pytest.raises(GatewayError) as responses:
        two.known_before_body(routes.RESPONSE_BY_ID)
    assert responses.value.status == 501 and "Text Generation Inference" in responses.value.message
    assert two.known_before_body(routes.PASSTHROUGH) is two.first


async def started(**env: str) -> Gateway:
    app = Gateway(settings_from_strings(env))
    await app.startup()
    return app


def test_a_capability_is_refused_before_the_body_with_one_backend_and_after_it_with_several(
    tmp_path: Path,
) -> None:
    """Not JSON at all: with one backend (TGI, no embeddings) the 501 comes first, as the body
    is never read; with several, the body names the backend, so it must be read (400)."""

    async def go() -> tuple[int, int]:
        one = await started(BACKEND_KIND="tgi", BACKEND_BASE_URL="http://127.0.0.1:9/v1")
        r1 = await call(one, "POST", "/v1/embeddings", b"not json")
        several = await started(GATEWAY_ROUTES=backends_file(tmp_path, *TWO))
        r2 = await call(several, "POST", "/v1/embeddings", b"not json")
        await one.shutdown()
        await several.shutdown()
        return r1.status, r2.status

    assert run(go()) == (501, 400)


def test_with_several_backends_a_path_without_model_is_checked_against_the_first(tmp_path: Path) -> None:
    """A stored response's path names no model (and the id map knows none here): it goes to the
    first backend (TGI), which has no Responses API, so the gateway answers 501 instead of
    forwarding it; a Responses create is routed by its model like chat."""
    with FakeBackend() as fb:
        first = f"name='chat'\nkind='tgi'\nurls=['{fb.url}']\nmodels=['m1']\n"
        second = f"name='other'\nkind='vllm'\nurls=['{fb.url}']\nmodels=['m2']\n"

        async def go() -> tuple[int, Any]:
            app = await started(GATEWAY_ROUTES=backends_file(tmp_path, first, second))
            r = await call(app, "GET", "/v1/responses/resp_1")
            await call(app, "POST", "/v1/responses", orjson.dumps({"model": "m2", "input": "hi"}))
            await app.shutdown()
            return r.status, r.json()["error"]["code"]

        assert run(go()) == (501, "not_supported")
        assert [r.target for r in fb.requests if "responses" in r.target] == ["/v1/responses"]


def test_models_are_listed_by_the_backend_with_one_and_by_the_gateway_with_a_table(tmp_path: Path) -> None:
    with FakeBackend() as fb:

        async def go() -> tuple[int, int]:
            one = await started(BACKEND_BASE_URL=fb.url)
            r1 = await call(one, "GET", "/v1/models")
            table = await started(
                GATEWAY_ROUTES=backends_file(tmp_path, f"name='b'\nkind='vllm'\nurls=['{fb.url}']\nmodels=['x']\n")
            )
            r2 = await call(table, "GET", "/v1/models")
            await one.shutdown()
            await table.shutdown()
            assert r2.json()["data"][0]["id"] == "x"
            return r1.status, r2.status

        assert run(go()) == (200, 200)
        forwarded = [r for r in fb.requests if r.target.endswith("/models")]
        assert len(forwarded) == 1  # only the one-backend gateway asked the backend


def test_the_balance_policy_per_backend(tmp_path: Path) -> None:
    """GATEWAY_BALANCE for the settings' backend and as the routes file's default; ``balance``
    per backend overrides it. A prefix memory only where it can matter (several replicas)."""
    two = "http://h:1/v1,http://h:2/v1"
    assert topology(BACKEND_BASE_URL=two, GATEWAY_BALANCE="p2c").first.policy == "p2c"
    only = topology(BACKEND_BASE_URL=two, GATEWAY_BALANCE="prefix").first
    assert only.policy == "prefix" and only.affinity is not None
    assert topology(GATEWAY_BALANCE="prefix").first.affinity is None  # one replica: nothing to do
    routes = backends_file(
        tmp_path,
        "name='a'\nkind='vllm'\nurls=['http://h:1/v1','http://h:2/v1']\nmodels=['m1']\nbalance='p2c'\n",
        "name='b'\nkind='vllm'\nurls=['http://h:3/v1','http://h:4/v1']\nmodels=['m2']\n",
    )
    a, b = topology(GATEWAY_ROUTES=routes, GATEWAY_BALANCE="prefix").backends
    assert (a.policy, b.policy) == ("p2c", "prefix") and a.affinity is None and b.affinity is not None


@pytest.mark.parametrize(
    ("kind", "policy"),
    [
        ("vllm", "prefix"),
        ("sglang", "prefix"),
        ("tgi", "p2c"),
        ("llamacpp", "p2c"),
        ("ollama", "p2c"),
        ("openai", "p2c"),
    ],
)
def test_auto_balances_by_prefix_the_kinds_with_a_prefix_cache(kind: str, policy: str, tmp_path: Path) -> None:
    """The default, ``auto``: by prefix for the kinds whose engines keep (and count) a prefix cache,
    power of two choices for the others; a routes file's backends resolve it for their own kind."""
    two = "http://h:1/v1,http://h:2/v1"
    backend = topology(BACKEND_KIND=kind, BACKEND_BASE_URL=two).first
    assert backend.policy == policy and (backend.affinity is not None) == (policy == "prefix")
    assert topology(BACKEND_KIND=kind, BACKEND_BASE_URL="http://h:1/v1").first.affinity is None  # one replica
    routes = backends_file(
        tmp_path,
        f"name='a'\nkind='{kind}'\nurls=['http://h:1/v1','http://h:2/v1']\nmodels=['m1']\n",
        "name='b'\nkind='vllm'\nurls=['http://h:3/v1','http://h:4/v1']\nmodels=['m2']\nbalance='p2c'\n",
    )
    a, b = topology(GATEWAY_ROUTES=routes).backends
    assert (a.policy, b.policy) == (policy, "p2c")
