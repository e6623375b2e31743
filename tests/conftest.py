from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeBackend

ROOT = Path(__file__).resolve().parent.parent

# Fixtures for the tests against the real llama.cpp server (they start nothing unless asked for).
pytest_plugins = ("tests.llamacpp",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**overrides: str) -> dict[str, str]:
    """The environment without any of the gateway's own variables, plus ``overrides``."""
    from gateway.config import ENV_NAMES

    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    env.update(overrides)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def wait_http(url: str, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:  # noqa: S310 - loopback test URL
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def http_request(
    g: GatewayProc, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection: status, lower-cased headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


class GatewayProc:
    """``gateway serve`` as a subprocess, in a temporary directory (never a developer's .env)."""

    def __init__(self, cwd: Path, **env: str) -> None:
        self.port = int(env.get("GATEWAY_PORT") or free_port())
        env["GATEWAY_PORT"] = str(self.port)
        self.env = clean_env(**env)
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = cwd / f"gateway-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GatewayProc:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                cwd=self.cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_http(self.url + "/health", proc=self.proc)
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            # Say why: the drain's view of the workers is in the gateway's own log.
            raise AssertionError(
                f"the gateway did not stop within {timeout:g} s of signal {sig}; its log ends:\n{self.output()[-4000:]}"
            ) from None


@pytest.fixture
def backend() -> Iterator[FakeBackend]:
    with FakeBackend() as fb:
        yield fb


@pytest.fixture(scope="module")
def module_backend() -> Iterator[FakeBackend]:
    with FakeBackend() as fb:
        yield fb


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gw")


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[type[GatewayProc]]:
    """Start gateways with given env; all are stopped at the end of the test."""
    started: list[GatewayProc] = []

    class _G(GatewayProc):
        def __init__(self, **env: str) -> None:
            super().__init__(tmp_path, **env)
            started.append(self)

    yield _G
    for g in started:
        if g.proc is not None and g.proc.poll() is None:
            g.stop()
