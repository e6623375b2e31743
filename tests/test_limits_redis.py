"""Per-key limits shared through a real Redis server: two gateway processes, one allowance."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests import rawhttp
from tests.fakes import FakeBackend
from tests.servers import Gateway, Server, StartGateway, free_port

REDIS = shutil.which("redis-server")
if REDIS is None:
    pytest.skip(
        "redis-server not found: tests/run.sh installs it with apt-get when run as root", allow_module_level=True
    )

KEY = "team-a-shared-secret"


class RedisServer(Server):
    name = "redis-server"

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        argv = [str(REDIS), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        super().__init__([*argv, "--dir", str(tmp)], tmp / f"redis-{self.port}.log")

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as r:
        yield r


def post(g: Gateway) -> rawhttp.Response:
    return g.request("POST", "/v1/chat/completions", b'{"model":"m"}', {"authorization": f"Bearer {KEY}"})


def keys_file(tmp_path: Path, rpm: int) -> str:
    p = tmp_path / "keys.toml"
    p.write_text(f"[[keys]]\nname='team-a'\nkey_env='TEAM_A_KEY'\nrpm={rpm}\n")
    return str(p)


def test_two_gateways_share_one_allowance(
    start_gateway: StartGateway, backend: FakeBackend, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = {
        "BACKEND_BASE_URL": backend.url,
        "GATEWAY_KEYS_FILE": keys_file(tmp_path, 5),
        "TEAM_A_KEY": KEY,
        "REDIS_URL": redis_server.url,
    }
    a, b = start_gateway(**env).start(), start_gateway(**env).start()
    # Stay inside one minute window: if the minute is about to turn, wait for the next one.
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    statuses = [post(g).status for g in (a, b, a, b, a)]
    assert statuses == [200] * 5
    status, headers, body = post(b)
    assert status == 429 and orjson.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-limit-requests"] == "5"
    assert post(a).status == 429  # the other process refuses too: the count is shared


def test_redis_stopped_mid_run_falls_back_to_local_limits(
    start_gateway: StartGateway, backend: FakeBackend, redis_server: RedisServer, tmp_path: Path
) -> None:
    g = start_gateway(
        BACKEND_BASE_URL=backend.url,
        GATEWAY_KEYS_FILE=keys_file(tmp_path, 1000),
        TEAM_A_KEY=KEY,
        REDIS_URL=redis_server.url,
    ).start()
    assert post(g).status == 200
    redis_server.stop()
    t0 = time.monotonic()
    for _ in range(5):
        assert post(g).status == 200  # keeps serving, with local limits
    assert time.monotonic() - t0 < 5
    text = g.output()
    assert text.count("limits' Redis is unreachable") == 1  # logged once
    metrics = g.request("GET", "/metrics").body.decode()
    assert "gateway_limit_store_errors_total 5.0" in metrics
    assert 'gateway_limit_decisions_total{decision="allowed"} 6.0' in metrics  # decided locally meanwhile


def test_fail_closed_refuses_without_redis(start_gateway: StartGateway, backend: FakeBackend, tmp_path: Path) -> None:
    g = start_gateway(
        BACKEND_BASE_URL=backend.url,
        GATEWAY_KEYS_FILE=keys_file(tmp_path, 1000),
        TEAM_A_KEY=KEY,
        REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
        GATEWAY_LIMITS_FAIL_CLOSED="true",
    ).start()
    status, headers, body = post(g)
    assert status == 503 and orjson.loads(body)["error"]["code"] == "limits_unavailable"
    assert headers["retry-after"] == "1"
    assert [r for r in backend.requests if r.method == "POST"] == []
    metrics = g.request("GET", "/metrics").body.decode()
    assert 'gateway_limit_decisions_total{decision="unavailable"} 1.0' in metrics
