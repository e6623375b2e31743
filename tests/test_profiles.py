"""Every backend kind: its health path is what /ready probes, its key goes in the right header
(or none), and capability gating and overrides decide what is forwarded."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from gateway.profiles import CAPABILITIES, PROFILES, Profile, Support, apply_overrides
from tests.asgi import call, make_gateway
from tests.fakes import FakeBackend

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_table_is_complete() -> None:
    assert set(PROFILES) == {"vllm", "sglang", "tgi", "llamacpp", "ollama", "localai", "lmstudio", "openai"}
    for kind, p in PROFILES.items():
        assert p.kind == kind
        assert p.health_path.startswith("/")
        assert set(p.capabilities) == set(CAPABILITIES)
        assert p.display_name and p.best_for
        if p.default_base_url is not None:
            assert p.default_base_url.startswith("http://127.0.0.1:") and p.default_base_url.endswith("/v1")


def test_facts_from_backends_md() -> None:
    assert PROFILES["ollama"].health_path == "/" and not PROFILES["ollama"].takes_key
    assert PROFILES["localai"].health_path == "/readyz"
    assert PROFILES["lmstudio"].health_path == PROFILES["openai"].health_path == "/v1/models"
    for kind in ("vllm", "tgi", "sglang", "llamacpp"):
        assert PROFILES[kind].health_path == "/health"
    assert PROFILES["tgi"].support("embeddings") is Support.UNSUPPORTED
    assert PROFILES["tgi"].support("responses") is Support.UNSUPPORTED
    for kind in ("vllm", "sglang", "llamacpp"):
        assert PROFILES[kind].support("embeddings") is Support.DEPENDS
    for kind in ("ollama", "localai", "lmstudio"):
        assert PROFILES[kind].support("embeddings") is Support.SUPPORTED
    assert all(p.support("tools") is Support.DEPENDS for p in PROFILES.values())
    assert PROFILES["openai"].default_base_url is None
    ports = {k: p.default_base_url for k, p in PROFILES.items()}
    assert ports["vllm"] == "http://127.0.0.1:8000/v1"
    assert ports["ollama"] == "http://127.0.0.1:11434/v1"
    assert ports["llamacpp"] == ports["localai"] == "http://127.0.0.1:8080/v1"
    assert ports["tgi"] == "http://127.0.0.1:3000/v1"
    assert ports["sglang"] == "http://127.0.0.1:30000/v1"
    assert ports["lmstudio"] == "http://127.0.0.1:1234/v1"


@pytest.mark.parametrize("kind", sorted(PROFILES))
def test_health_path_probed_and_key_style(kind: str) -> None:
    profile = PROFILES[kind]
    with FakeBackend() as fb:

        async def go() -> None:
            app = make_gateway(BACKEND_KIND=kind, BACKEND_BASE_URL=fb.url, BACKEND_API_KEY="bk-1")
            await app.startup()
            try:
                ready = await call(app, "GET", "/ready")
                assert ready.status == 200, ready.body
                assert ready.json()["kind"] == kind
                probe = fb.requests[-1]
                assert probe.target == profile.health_path
                chat = await call(app, "POST", "/v1/chat/completions", b'{"model":"m"}')
                assert chat.status == 200
            finally:
                await app.shutdown()

        run(go())
        for req in fb.requests:
            expected = "Bearer bk-1" if profile.takes_key else None
            assert req.header("authorization") == expected, (kind, req.target)


def test_health_path_is_relative_to_the_server_root() -> None:
    with FakeBackend() as fb:

        async def go() -> None:
            app = make_gateway(BACKEND_KIND="openai", BACKEND_BASE_URL=f"http://127.0.0.1:{fb.port}/openai/v1")
            await app.startup()
            try:
                assert (await call(app, "GET", "/ready")).status == 200
                await call(app, "POST", "/v1/chat/completions", b"{}")
            finally:
                await app.shutdown()

        run(go())
        assert [r.target for r in fb.requests] == ["/openai/v1/models", "/openai/v1/chat/completions"]


def _forwarded(env: dict[str, str], path: str, body: bytes) -> tuple[int, bool, dict[str, object]]:
    with FakeBackend() as fb:

        async def go() -> tuple[int, dict[str, object]]:
            app = make_gateway(BACKEND_BASE_URL=fb.url, **env)
            await app.startup()
            try:
                r = await call(app, "POST", path, body)
                return r.status, r.json()
            finally:
                await app.shutdown()

        status, out = run(go())
        return status, bool(fb.requests), out


@pytest.mark.parametrize(
    ("env", "path", "body", "gated"),
    [
        ({"BACKEND_KIND": "tgi"}, "/v1/embeddings", b"{}", True),
        ({"BACKEND_KIND": "tgi"}, "/v1/responses", b"{}", True),
        ({"BACKEND_KIND": "tgi"}, "/v1/responses/abc/cancel", b"{}", True),
        ({"BACKEND_KIND": "tgi", "BACKEND_CAPABILITIES": "+embeddings"}, "/v1/embeddings", b"{}", False),
        ({"BACKEND_KIND": "vllm"}, "/v1/embeddings", b"{}", False),  # depends: the backend answers
        ({"BACKEND_KIND": "vllm", "BACKEND_CAPABILITIES": "-embeddings"}, "/v1/embeddings", b"{}", True),
        (
            {"BACKEND_KIND": "ollama", "BACKEND_CAPABILITIES": " -tools , ~embeddings"},
            "/v1/chat/completions",
            b'{"tools":[{"type":"function"}]}',
            True,
        ),
        ({"BACKEND_KIND": "ollama", "BACKEND_CAPABILITIES": "-tools"}, "/v1/chat/completions", b'{"tools":[]}', False),
        ({"BACKEND_KIND": "ollama", "BACKEND_CAPABILITIES": "-tools"}, "/v1/chat/completions", b"{}", False),
        ({"BACKEND_KIND": "llamacpp", "BACKEND_CAPABILITIES": "-chat"}, "/v1/chat/completions", b"{}", True),
    ],
)
def test_capability_gating(env: dict[str, str], path: str, body: bytes, gated: bool) -> None:
    status, reached, out = _forwarded(env, path, body)
    if gated:
        assert status == 501 and not reached
        err = out["error"]
        assert isinstance(err, dict)
        assert err["type"] == "not_supported_error" and err["code"] == "not_supported"
        assert PROFILES[env["BACKEND_KIND"]].display_name in err["message"]
    else:
        assert reached and status != 501


def test_override_syntax() -> None:
    base = PROFILES["vllm"].capabilities
    out = apply_overrides(base, "+embeddings,-tools,~chat")
    assert out["embeddings"] is Support.SUPPORTED
    assert out["tools"] is Support.UNSUPPORTED
    assert out["chat"] is Support.DEPENDS
    assert base["embeddings"] is Support.DEPENDS  # the profile itself is untouched
    for bad in ("embeddings", "+nope", "*tools"):
        with pytest.raises(ValueError, match="NAME"):
            apply_overrides(base, bad)


def test_readme_kinds_table_matches_profiles() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("## Backend kinds", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    assert set(rows) == set(PROFILES)
    for kind, p in PROFILES.items():
        probe, key, unsupported, depends = rows[kind]
        assert probe == f"`GET {p.health_path}`"
        assert key == ("yes" if p.takes_key else "no")

        def names(support: Support, p: Profile = p) -> str:
            return ", ".join(c for c in CAPABILITIES if p.support(c) is support)

        assert unsupported == names(Support.UNSUPPORTED)
        assert depends == names(Support.DEPENDS)


def test_readme_lists_every_setting() -> None:
    from pathlib import Path

    from gateway.config import ENV_NAMES

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for env_name in ENV_NAMES:
        assert f"| `{env_name}` |" in text, env_name


def test_engine_metrics_names() -> None:
    """Load-reporting kinds name their metrics (newest spelling first); the others report none."""
    with_metrics = {k for k, p in PROFILES.items() if p.engine_metrics is not None}
    assert with_metrics == {"vllm", "sglang", "tgi", "llamacpp"}
    for kind in with_metrics:
        m = PROFILES[kind].engine_metrics
        assert m is not None
        assert m.running and m.waiting, kind
        groups = (m.running, m.waiting, m.kv_usage, m.prefix_queries, m.prefix_hits)
        names = [name for group in groups for name in group]
        assert all(name and " " not in name for name in names), kind
        assert len(names) == len(set(names)), kind
        # Counters are named as exposed, with their _total suffix.
        assert all(name.endswith("_total") for name in (*m.prefix_queries, *m.prefix_hits)), kind
    vllm = PROFILES["vllm"].engine_metrics
    assert vllm is not None
    assert vllm.running == ("vllm:num_requests_running",)
    assert vllm.waiting == ("vllm:num_requests_waiting",)
    assert vllm.kv_usage == ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
    assert vllm.prefix_queries[0] == "vllm:prefix_cache_queries_total"
    assert vllm.prefix_hits[0] == "vllm:prefix_cache_hits_total"
    assert "vllm:gpu_prefix_cache_hits_total" in vllm.prefix_hits


def test_sglang_metrics_accept_both_prefixes() -> None:
    m = PROFILES["sglang"].engine_metrics
    assert m is not None and m.needs == "--enable-metrics"
    for group in (m.running, m.waiting, m.kv_usage, m.prefix_queries, m.prefix_hits):
        colon = [n for n in group if n.startswith("sglang:")]
        assert colon and {n.replace("sglang:", "sglang_", 1) for n in colon} <= set(group)


def test_llamacpp_and_tgi_metrics_have_no_cache_figures() -> None:
    for kind in ("llamacpp", "tgi"):
        m = PROFILES[kind].engine_metrics
        assert m is not None and not m.kv_usage and not m.prefix_queries and not m.prefix_hits
    llamacpp = PROFILES["llamacpp"].engine_metrics
    assert llamacpp is not None and "--metrics" in llamacpp.needs


def test_readme_engine_metrics_table_matches_profiles() -> None:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text.split("### Engine load metrics", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1:]
    assert set(rows) == set(PROFILES)
    for kind, p in PROFILES.items():
        m = p.engine_metrics
        if m is None:
            assert rows[kind][0] == "none", kind
            continue
        for group in (m.running, m.waiting, m.kv_usage, m.prefix_queries, m.prefix_hits):
            if group:
                assert f"`{group[0]}`" in rows[kind][0], (kind, group[0])
            for name in group[1:]:
                assert f"`{name}`" in rows[kind][1] or name.startswith("sglang_"), (kind, name)
        if m.needs:
            assert m.needs.split(" ", 1)[0] in rows[kind][2], kind
