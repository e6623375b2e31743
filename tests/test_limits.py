"""Per-key limits from a keys file, enforced in process: requests and tokens per minute."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from gateway.app import Gateway
from gateway.config import ConfigError, settings_from_strings
from gateway.errors import GatewayError
from gateway.limits import KeyLimits, Limiter, load_keys
from tests.asgi import call
from tests.fakes import FakeBackend
from tests.promtext import metric
from tests.servers import clean_env


def keys_file(tmp_path: Path, text: str) -> str:
    p = tmp_path / "keys.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[[keys]]\nname='a'\n", "exactly one of key_env or key_sha256"),
        ("[[keys]]\nname='a'\nkey_env='NOT_SET_X'\n", "keys[0].key_env = 'NOT_SET_X'"),
        ("[[keys]]\nname='a'\nkey_sha256='abc'\n", "keys[0].key_sha256 = 'abc': expected 64 lowercase hex"),
        ("[[keys]]\nname='a'\nkey_env='K1'\nrpm=0\n", "keys[0].rpm"),
        ("[[keys]]\nname='a'\nkey_env='K1'\ncolour=1\n", "colour"),
        ("[[keys]]\nname='a'\nkey_env='K1'\n[[keys]]\nname='a'\nkey_env='K2'\n", "keys[1].name = 'a'"),
        ("[[keys]]\nname='a'\nkey_env='K1'\n[[keys]]\nname='b'\nkey_env='K1'\n", "the same key as 'a'"),
        ("nonsense", "cannot be read as TOML"),
    ],
)
def test_keys_file_mistakes(tmp_path: Path, text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_keys(keys_file(tmp_path, text), environ={"K1": "one", "K2": "two"})
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_keys_are_held_as_digests(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"k2-secret").hexdigest()
    got = load_keys(
        keys_file(tmp_path, f"[[keys]]\nname='a'\nkey_env='K1'\nrpm=5\n[[keys]]\nname='b'\nkey_sha256='{digest}'\n"),
        environ={"K1": "k1-secret"},
    )
    assert got == {
        hashlib.sha256(b"k1-secret").digest(): KeyLimits("a", 5, None),
        bytes.fromhex(digest): KeyLimits("b", None, None),
    }


def test_cli_bad_keys_file_exit_2(tmp_path: Path) -> None:
    path = keys_file(tmp_path, "[[keys]]\nname='a'\n")
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--keys-file", path],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        timeout=30,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "key_env or key_sha256" in proc.stderr


def test_fixed_window_limiter() -> None:
    now = [120.0]
    lim = Limiter(clock=lambda: now[0])
    key = KeyLimits("team-a", rpm=2, tpm=100)
    headers = dict(lim.admit(key))
    assert headers[b"x-ratelimit-limit-requests"] == b"2" and headers[b"x-ratelimit-remaining-requests"] == b"1"
    lim.admit(key)
    with pytest.raises(GatewayError) as info:
        lim.admit(key)
    err = info.value
    assert err.status == 429 and err.code == "rate_limit_exceeded" and err.type == "rate_limit_error"
    assert dict(err.headers or [])[b"retry-after"] == b"60"
    now[0] = 180.5  # the next minute: the whole allowance again
    lim.admit(key)
    lim.spend(key, 150)  # one big request may overshoot; the next is refused
    with pytest.raises(GatewayError, match="tokens"):
        lim.admit(key)
    other = KeyLimits("team-b", rpm=None, tpm=None)
    for _ in range(100):
        lim.admit(other)  # no limits: never refused


def test_keys_file_keys_and_api_keys_both_work_and_limits_apply(tmp_path: Path) -> None:
    path = keys_file(tmp_path, "[[keys]]\nname='team-a'\nkey_env='TEAM_A_KEY_T'\nrpm=3\n")
    with FakeBackend() as fb:

        async def go() -> None:
            import os

            os.environ["TEAM_A_KEY_T"] = "team-a-secret"
            try:
                app = Gateway(
                    settings_from_strings(
                        {"BACKEND_BASE_URL": fb.url, "API_KEYS": "plain-key", "GATEWAY_KEYS_FILE": path}
                    )
                )
            finally:
                del os.environ["TEAM_A_KEY_T"]
            await app.startup()
            try:
                team = [(b"authorization", b"Bearer team-a-secret")]
                plain = [(b"authorization", b"Bearer plain-key")]
                statuses = []
                for _ in range(4):
                    r = await call(app, "POST", "/v1/chat/completions", b'{"model":"m"}', team)
                    statuses.append(r.status)
                assert statuses == [200, 200, 200, 429]
                assert r.json()["error"]["code"] == "rate_limit_exceeded"
                assert r.header(b"retry-after") is not None and r.header(b"x-ratelimit-limit-requests") == b"3"
                ok = await call(app, "POST", "/v1/chat/completions", b'{"model":"m"}', team[:0] + plain)
                assert ok.status == 200  # API_KEYS keys have no limits
                first = await call(
                    app, "POST", "/v1/chat/completions", b'{"model":"m"}', [(b"authorization", b"Bearer x")]
                )
                assert first.status == 401
                assert app.metrics is not None
                text = app.metrics.exposition()[0].decode()
                assert metric(text, "gateway_limit_decisions_total", decision="allowed") == 3
                assert metric(text, "gateway_limit_decisions_total", decision="rejected") == 1
            finally:
                await app.shutdown()

        asyncio.run(go())
        posts = [r for r in fb.requests if r.method == "POST"]
        assert len(posts) == 4  # the refused request never reached the backend


def test_access_log_shows_the_key_name(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = keys_file(tmp_path, "[[keys]]\nname='team-a'\nkey_env='TEAM_A_KEY_U'\n")
    with FakeBackend() as fb, pytest.MonkeyPatch.context() as mp:
        mp.setenv("TEAM_A_KEY_U", "team-a-secret-2")

        async def go() -> None:
            app = Gateway(
                settings_from_strings(
                    {"BACKEND_BASE_URL": fb.url, "GATEWAY_KEYS_FILE": path, "GATEWAY_LOG_FORMAT": "json"}
                )
            )
            await app.startup()
            try:
                r = await call(
                    app, "POST", "/v1/chat/completions", b"{}", [(b"authorization", b"Bearer team-a-secret-2")]
                )
                assert r.status == 200
            finally:
                await app.shutdown()

        asyncio.run(go())
    out = capfd.readouterr().out
    lines = [orjson.loads(line) for line in out.splitlines() if line.startswith('{"time"')]
    assert lines and lines[-1]["key_id"] == "team-a"
    assert "team-a-secret-2" not in out
