"""Several backends and replicas: routing by model and alias, balancing, health, ejection,
retries before the first byte, per-phase timeouts, admission, and the routes file's errors."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest

from gateway.app import Gateway
from gateway.backends_file import load_backends
from gateway.config import ConfigError, settings_from_strings
from tests.asgi import Result, call
from tests.fakes import Conn, FakeBackend, Handler, Req, default_handler, sse_events
from tests.servers import clean_env, free_port

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@contextlib.contextmanager
def backends(n: int) -> Iterator[list[FakeBackend]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(FakeBackend()) for _ in range(n)]


def routes_file(tmp_path: Path, text: str) -> str:
    p = tmp_path / "routes.toml"
    p.write_text(text)
    return str(p)


def chat(model: str | None, stream: bool = False) -> bytes:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "stream": stream}
    if model is not None:
        body["model"] = model
    return orjson.dumps(body)


async def started(**env: str) -> Gateway:
    app = Gateway(settings_from_strings({"GATEWAY_PROBE_INTERVAL": "0.1", **env}))
    await app.startup()
    return app


# -- the routes file ------------------------------------------------------------------------------


GOOD = """
[[backends]]
name = "chat"
kind = "vllm"
urls = ["{a}"]
api_key_env = "TEST_CHAT_KEY"
models = ["llama-3.1-8b"]
aliases = {{ "gpt-4o-mini" = "llama-3.1-8b" }}
capabilities = "-embeddings"

[[backends]]
name = "embed"
kind = "ollama"
urls = ["{b}"]
models = ["nomic-embed-text"]
"""


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("backends = 5", "backends = 5: expected"),
        ("[[backends]]\nname='a'\nkind='vllm'\n", "the required key 'urls' is missing"),
        (
            "[[backends]]\nname='a'\nkind='nope'\nurls=['http://h/v1']\n",
            "backends[0].kind = 'nope': expected one of vllm",
        ),
        ("[[backends]]\nname='a'\nkind='vllm'\nurls=['ftp://h/v1']\n", "backends[0].urls[0] = 'ftp://h/v1'"),
        ("[[backends]]\nname='a'\nkind='vllm'\nurls=[]\n", "backends[0].urls = []"),
        ("[[backends]]\nname='a b'\nkind='vllm'\nurls=['http://h/v1']\n", "backends[0].name = 'a b'"),
        (
            "[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\nweights=[1,2]\n",
            "backends[0].weights = [1, 2]: expected 1 weights",
        ),
        ("[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\ncolour='red'\n", "unknown key 'colour'"),
        ("[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\ncapabilities='+flying'\n", "capabilities"),
        ("[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\napi_key_env='NOT_SET_ANYWHERE'\n", "api_key_env"),
        (
            "[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\nmodels=['m']\naliases={x='other'}\n",
            "aliases.x = 'other'",
        ),
        (
            "[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\nmodels=['m']\n"
            "[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\n",
            "backends[1].name = 'a': expected a name no other backend has",
        ),
        (
            "[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\nmodels=['m']\n"
            "[[backends]]\nname='b'\nkind='vllm'\nurls=['http://h/v1']\nmodels=['m']\n",
            "backends[1].models[0] = 'm': expected a model not already served by 'a'",
        ),
        (
            "[[backends]]\nname='a'\nkind='vllm'\nurls=['http://h/v1']\nbalance='rr'\n",
            "balance = 'rr': expected auto, p2c",
        ),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_routes_file_mistakes(tmp_path: Path, text: str, fragment: str) -> None:
    path = routes_file(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_backends(path, environ={})
    msg = str(info.value)
    assert fragment in msg and "\n" not in msg
    assert path in msg or "GATEWAY_ROUTES" in msg


def test_routes_file_error_stops_startup_with_exit_2(tmp_path: Path) -> None:
    path = routes_file(tmp_path, "[[backends]]\nname='a'\nkind='nope'\nurls=['http://h/v1']\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--routes", path],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "backends[0].kind = 'nope'" in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--routes", str(tmp_path / "nope.toml")],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=30,
    )
    assert missing.returncode == 2 and "GATEWAY_ROUTES" in missing.stderr


# -- routing by model ------------------------------------------------------------------------------


def last_post(fb: FakeBackend) -> Req:
    return next(q for q in reversed(fb.requests) if q.method == "POST")


def test_routing_by_model_and_alias(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_CHAT_KEY", "chat-secret")
    with backends(2) as (a, b):
        path = routes_file(tmp_path, GOOD.format(a=a.url, b=b.url))

        async def go() -> None:
            app = await started(GATEWAY_ROUTES=path)
            try:
                r = await call(app, "POST", "/v1/chat/completions", chat("llama-3.1-8b"))
                assert r.status == 200 and r.json()["model"] == "llama-3.1-8b"
                r = await call(app, "POST", "/v1/chat/completions", chat("gpt-4o-mini"))
                assert r.status == 200
                # The last POST (the replicas' health probes run meanwhile: a GET may come after it).
                assert last_post(a).json()["model"] == "llama-3.1-8b"  # the alias was rewritten
                assert last_post(a).header("authorization") == "Bearer chat-secret"
                r = await call(app, "POST", "/v1/embeddings", b'{"model":"nomic-embed-text","input":"x"}')
                assert r.status == 200 and last_post(b).target == "/v1/embeddings"
                assert last_post(b).header("authorization") is None  # ollama takes no key
                r = await call(app, "POST", "/v1/chat/completions", chat("nope"))
                assert r.status == 404 and r.json()["error"]["code"] == "model_not_found"
                assert r.json()["error"]["param"] == "model"
                r = await call(app, "POST", "/v1/chat/completions", chat(None))
                assert r.status == 400 and r.json()["error"]["param"] == "model"
                r = await call(app, "POST", "/v1/embeddings", b'{"model":"gpt-4o-mini","input":"x"}')
                assert r.status == 501  # the chat backend refuses embeddings by its override
                r = await call(app, "GET", "/v1/models")
                ids = sorted(m["id"] for m in r.json()["data"])
                assert ids == ["gpt-4o-mini", "llama-3.1-8b", "nomic-embed-text"]
                ready = await call(app, "GET", "/ready")
                assert ready.status == 200
                names = [x["name"] for x in ready.json()["backends"]]
                assert names == ["chat", "embed"]
            finally:
                await app.shutdown()

        run(go())
        served = [[r for r in fb.requests if r.method == "POST"] for fb in (a, b)]  # not the probes
        assert len(served[0]) == 2 and len(served[1]) == 1


# -- balancing -------------------------------------------------------------------------------------


def _slow(delay: float) -> Handler:
    async def handler(req: Req, conn: Conn) -> None:
        if req.target.endswith("/chat/completions"):
            await asyncio.sleep(delay)
        await default_handler(req, conn)

    return handler


async def _burst(app: Gateway, n: int, conc: int) -> list[Result]:
    sem = asyncio.Semaphore(conc)

    async def one() -> Result:
        async with sem:
            return await call(app, "POST", "/v1/chat/completions", chat("m"))

    return await asyncio.gather(*(one() for _ in range(n)))


def test_slow_replica_gets_less_and_weights_count() -> None:
    with backends(2) as (fast, slow):
        fast.handler = _slow(0.005)
        slow.handler = _slow(0.15)

        async def go() -> None:
            app = await started(BACKEND_BASE_URL=f"{fast.url},{slow.url}")
            try:
                results = await _burst(app, 120, 12)
                assert all(r.status == 200 for r in results)
            finally:
                await app.shutdown()

        run(go())
        n_fast, n_slow = (sum(r.target.endswith("/chat/completions") for r in fb.requests) for fb in (fast, slow))
        assert n_fast > 3 * n_slow

    with backends(2) as (heavy, light):
        heavy.handler = light.handler = _slow(0.03)

        async def weighted() -> None:
            import tempfile

            with tempfile.TemporaryDirectory() as d:
                rf = routes_file(
                    Path(d),
                    f"[[backends]]\nname='c'\nkind='vllm'\nurls=['{heavy.url}','{light.url}']\nmodels=['m']\n"
                    "weights=[4,1]\n",
                )
                app = await started(GATEWAY_ROUTES=rf)
                try:
                    assert all(r.status == 200 for r in await _burst(app, 150, 10))
                finally:
                    await app.shutdown()

        run(weighted())
        n_heavy, n_light = (sum(r.target.endswith("/chat/completions") for r in fb.requests) for fb in (heavy, light))
        assert n_heavy > 1.8 * n_light


# -- retries, ejection, fail-open ----------------------------------------------------------------------


def test_retry_on_a_dead_replica_then_ejection_and_return() -> None:
    dead_port = free_port()
    with backends(1) as (live,):

        async def go() -> None:
            app = await started(
                BACKEND_BASE_URL=f"http://127.0.0.1:{dead_port}/v1,{live.url}",
                GATEWAY_EJECT_AFTER="2",
                GATEWAY_EJECT_SECONDS="0.5",
                GATEWAY_BALANCE="p2c",  # the same prompt each time: by prefix it stays where it went
            )
            try:
                for _ in range(20):
                    r = await call(app, "POST", "/v1/chat/completions", chat("m"))
                    assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == "hello"
                chats = [r for r in live.requests if r.target.endswith("/chat/completions")]
                assert len(chats) == 20  # each answered once: nothing lost or sent twice
                ready = await call(app, "GET", "/ready")
                states = [x["state"] for x in ready.json()["backends"][0]["replicas"]]
                assert states[0] in ("unreachable", "ejected") and states[1] == "ready"
                assert ready.status == 200  # one usable replica is enough
                # The dead replica comes back: probes and the trial request put it back in rotation.
                async with _serve_on(dead_port) as revived:
                    deadline = time.monotonic() + 5
                    while time.monotonic() < deadline and not any(
                        r.target.endswith("/chat/completions") for r in revived.requests
                    ):
                        await call(app, "POST", "/v1/chat/completions", chat("m"))
                        await asyncio.sleep(0.05)
                    assert any(r.target.endswith("/chat/completions") for r in revived.requests), "no traffic again"
            finally:
                await app.shutdown()

        run(go())


@contextlib.asynccontextmanager
async def _serve_on(port: int) -> AsyncIterator[FakeBackend]:
    fb = FakeBackend(port=port)
    await asyncio.to_thread(fb.__enter__)
    try:
        yield fb
    finally:
        await asyncio.to_thread(fb.__exit__, None, None, None)


def _status(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Handler:
    async def handler(req: Req, conn: Conn) -> None:
        if req.target.endswith("/chat/completions"):
            await conn.json(status, body, headers=headers)
        else:
            await default_handler(req, conn)

    return handler


def test_retry_on_503_and_429_to_another_replica() -> None:
    with backends(2) as (a, b):
        a.handler = _status(503, {"error": "loading"})
        b.handler = _status(429, {"error": "slow down"}, {"retry-after": "30"})

        async def go() -> None:
            app = await started(BACKEND_BASE_URL=f"{a.url},{b.url}", GATEWAY_RETRIES="1")
            try:
                r = await call(app, "POST", "/v1/chat/completions", chat("m"))
                # Both answered with retryable statuses: the last answer is relayed unchanged.
                first = "a" if len(a.requests) and a.requests[0].target.endswith("/chat/completions") else "b"
                assert len([x for x in a.requests if x.target.endswith("/chat/completions")]) == 1
                assert len([x for x in b.requests if x.target.endswith("/chat/completions")]) == 1
                last = b if first == "a" else a
                expected = {"error": "slow down"} if last is b else {"error": "loading"}
                assert r.json() == expected
                assert r.status == (429 if last is b else 503)
                # Now one replica answers: the retry reaches it and the client sees only its answer.
                a.handler = default_handler
                b.handler = _status(503, {"error": "loading"})
                a.requests.clear()
                b.requests.clear()
                for _ in range(6):
                    r = await call(app, "POST", "/v1/chat/completions", chat("m"))
                    assert r.status == 200 and r.json()["choices"][0]["message"]["content"] == "hello"
            finally:
                await app.shutdown()

        run(go())


def test_no_retry_after_the_first_byte() -> None:
    async def resets_mid_stream(req: Req, conn: Conn) -> None:
        if not req.target.endswith("/chat/completions"):
            await default_handler(req, conn)
            return
        await conn.start_chunked()
        await conn.chunk(sse_events(1)[0])
        await asyncio.sleep(0.02)
        conn.reset()

    with backends(2) as (a, b):
        a.handler = b.handler = resets_mid_stream

        async def go() -> None:
            app = await started(BACKEND_BASE_URL=f"{a.url},{b.url}")
            try:
                r = await call(app, "POST", "/v1/chat/completions", chat("m", stream=True))
                assert r.status == 200 and r.body.startswith(sse_events(1)[0])
                assert b'"backend_unavailable"' in r.body
            finally:
                await app.shutdown()

        run(go())
        chats = [x for x in a.requests + b.requests if x.target.endswith("/chat/completions")]
        assert len(chats) == 1


def test_fail_open_when_every_replica_is_out() -> None:
    ports = [free_port(), free_port()]

    async def go() -> None:
        app = await started(
            BACKEND_BASE_URL=",".join(f"http://127.0.0.1:{p}/v1" for p in ports), GATEWAY_EJECT_AFTER="1"
        )
        try:
            await asyncio.sleep(0.3)  # the probes have seen both down
            ready = await call(app, "GET", "/ready")
            assert ready.status == 503 and ready.json()["backends"][0]["status"] == "fail-open"
            async with _serve_on(ports[1]) as back:
                # Both are out of rotation, yet requests still go to them rather than being refused.
                r = await call(app, "POST", "/v1/chat/completions", chat("m"))
                assert r.status == 200 or r.status == 502
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    r = await call(app, "POST", "/v1/chat/completions", chat("m"))
                    if r.status == 200:
                        break
                assert r.status == 200 and back.requests
        finally:
            await app.shutdown()

    run(go())


# -- timeouts --------------------------------------------------------------------------------------


def test_each_timeout_says_which() -> None:
    async def silent(req: Req, conn: Conn) -> None:
        await asyncio.sleep(30)

    async def headers_only(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        await asyncio.sleep(30)

    async def one_then_silence(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        await conn.chunk(sse_events(1)[0])
        await asyncio.sleep(30)

    with backends(1) as (fb,):

        async def go() -> None:
            app = await started(
                BACKEND_BASE_URL=fb.url,
                GATEWAY_HEADER_TIMEOUT="0.3",
                GATEWAY_TTFT_TIMEOUT="0.4",
                GATEWAY_IDLE_TIMEOUT="0.5",
            )
            try:
                fb.handler = silent
                r = await call(app, "POST", "/v1/chat/completions", chat("m"))
                assert r.status == 504 and "GATEWAY_HEADER_TIMEOUT" in r.json()["error"]["message"]
                fb.handler = headers_only
                r = await call(app, "POST", "/v1/chat/completions", chat("m", stream=True))
                assert r.status == 200 and b"GATEWAY_TTFT_TIMEOUT" in r.body and b'"backend_timeout"' in r.body
                fb.handler = one_then_silence
                t0 = time.monotonic()
                r = await call(app, "POST", "/v1/chat/completions", chat("m", stream=True))
                assert r.body.startswith(sse_events(1)[0]) and b"GATEWAY_IDLE_TIMEOUT" in r.body
                assert time.monotonic() - t0 < 3
            finally:
                await app.shutdown()

        run(go())


# -- admission ----------------------------------------------------------------------------------------


def test_admission_cap_queue_and_429() -> None:
    with backends(1) as (fb,):
        fb.handler = _slow(0.3)

        async def go() -> None:
            app = await started(BACKEND_BASE_URL=fb.url, GATEWAY_MAX_INFLIGHT="1", GATEWAY_QUEUE_SIZE="1")
            try:
                results = await asyncio.gather(
                    *(call(app, "POST", "/v1/chat/completions", chat("m")) for _ in range(3))
                )
                statuses = sorted(r.status for r in results)
                assert statuses == [200, 200, 429]
                refused = next(r for r in results if r.status == 429)
                assert refused.header(b"retry-after") == b"1"
                assert refused.json()["error"]["code"] == "overloaded"
                assert app.topology.first.inflight == 0
            finally:
                await app.shutdown()

        run(go())
        chats = [x for x in fb.requests if x.target.endswith("/chat/completions")]
        assert len(chats) == 2


def test_sticky_sessions_keep_a_client_on_one_replica() -> None:
    with backends(3) as fbs:

        async def go() -> None:
            app = await started(BACKEND_BASE_URL=",".join(fb.url for fb in fbs), GATEWAY_STICKY="header:x-session-id")
            try:
                for session in ("alice", "bob", "carol", "dave"):
                    for _ in range(5):
                        r = await call(
                            app,
                            "POST",
                            "/v1/chat/completions",
                            chat("m"),
                            headers=[(b"x-session-id", session.encode())],
                        )
                        assert r.status == 200
            finally:
                await app.shutdown()

        run(go())
        seen: dict[str, set[int]] = {}
        for i, fb in enumerate(fbs):
            for r in fb.requests:
                if r.method == "POST":
                    seen.setdefault(str(r.header("x-session-id")), set()).add(i)
        assert set(seen) == {"alice", "bob", "carol", "dave"}
        assert all(len(replicas) == 1 for replicas in seen.values())  # each session on one replica


def test_sticky_setting_is_checked() -> None:
    with pytest.raises(ConfigError, match="GATEWAY_STICKY"):
        settings_from_strings({"GATEWAY_STICKY": "cookie"})
    assert settings_from_strings({"GATEWAY_STICKY": "key"}).gateway_sticky == "key"


def test_a_request_pinned_to_its_stored_response_is_not_retried_elsewhere() -> None:
    """The replica holding a stored response answers 503: that answer is relayed, not a retry on a
    replica that has never heard of the response."""

    async def holder(req: Req, conn: Conn) -> None:
        if req.method == "POST" and req.target.endswith("/responses"):
            await conn.json(200, {"id": "resp_held", "object": "response", "status": "completed", "output": []})
        elif req.target.endswith("/responses/resp_held"):
            await conn.json(503, {"error": {"message": "busy", "type": "x", "param": None, "code": 503}})
        else:
            await default_handler(req, conn)

    async def other(req: Req, conn: Conn) -> None:
        if req.method == "POST" and req.target.endswith("/responses"):  # busy: the create is retried on the holder
            await conn.json(503, {"error": {"message": "busy", "type": "x", "param": None, "code": 503}})
        elif "/responses" in req.target:
            await conn.json(404, {"error": {"message": "no such response", "type": "x", "param": None, "code": 404}})
        else:
            await default_handler(req, conn)

    with FakeBackend(handler=holder) as a, FakeBackend(handler=other) as b:

        async def go() -> None:
            app = await started(BACKEND_BASE_URL=f"{a.url},{b.url}", GATEWAY_BALANCE="p2c", GATEWAY_RETRIES="2")
            try:
                for _ in range(10):  # until a create lands on the holder
                    created = await call(app, "POST", "/v1/responses", b'{"model":"m","input":"hi"}')
                    if created.status == 200:
                        break
                assert created.status == 200
                r = await call(app, "GET", "/v1/responses/resp_held")
                assert r.status == 503 and r.json()["error"]["message"] == "busy"
                assert not any("resp_held" in q.target for q in b.requests)
            finally:
                await app.shutdown()

        run(go())
