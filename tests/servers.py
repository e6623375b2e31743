"""The tests' one way to start servers for end-to-end tests.

* ``Gateway``: ``gateway serve`` (or Granian with the app factory and flags of the test's choosing,
  or any module of the package) in its own process, on a free 127.0.0.1 port, in a temporary
  directory (never a developer's .env), with the gateway's variables cleared from the environment.
* ``SimProc``: the simulator in its own process (its own core, for load); ``sim``: in a thread of
  this process (its counters readable directly).
* ``FakeBackend`` (from ``tests.fakes``): the scripted fake upstream, in a thread.

Each is a context manager: entering waits until the server answers (and raises ``ServerExited``
with its output if it died first), leaving stops it and kills what it left behind. The ``Server``
base class does the same for any other program (say redis-server).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlencode

import orjson

from gateway.sim import SimServer, make_config, sim_in_thread
from tests import rawhttp
from tests.fakes import FakeBackend

ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "ROOT",
    "FakeBackend",
    "Gateway",
    "Prometheus",
    "Server",
    "ServerExited",
    "SimProc",
    "StartGateway",
    "clean_env",
    "free_port",
    "sim",
]


def free_port() -> int:
    """A port nobody listens on now (the usual race: the test binds it soon after)."""
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


class ServerExited(RuntimeError):
    """The server's process ended before it was ready; ``output`` is all it wrote."""

    def __init__(self, name: str, returncode: int, output: str) -> None:
        super().__init__(f"{name} exited with {returncode} before it was ready; its output ends:\n{output[-4000:]}")
        self.returncode = returncode
        self.output = output


class Server:
    """A program in its own process group, its stdout and stderr in ``log``.

    ``start`` waits until ``ready()`` holds; ``stop`` signals the process, waits, and kills the
    whole group if needed (or if anything of it is left once the process has gone)."""

    name = "server"

    def __init__(self, argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def ready(self) -> bool:
        """Whether the server answers yet (called every 50 ms while starting)."""
        return True

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> Self:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - our own programs
                self.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._kill_group()
                raise ServerExited(self.name, self.proc.returncode, self.output())
            if self.ready():
                return self
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"{self.name} was not ready within {timeout:g} s; its output ends:\n{self.output()[-4000:]}"
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send ``sig`` and wait for the exit status; past ``timeout``, kill everything and fail
        with the output (which says why, say the drain's view of the workers)."""
        assert self.proc is not None, "never started"
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"{self.name} did not stop within {timeout:g} s of signal {sig}; it wrote:\n{self.output()[-4000:]}"
            ) from None
        self._kill_group()
        return code

    def kill(self) -> None:
        if self.proc is not None:
            self._kill_group()
            self.proc.wait()

    def _kill_group(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def __enter__(self) -> Self:
        return self if self.running else self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running:
            self.stop()
        elif self.proc is not None:
            self._kill_group()


def _answers(port: int, path: str) -> bool:
    try:
        return rawhttp.request(port, "GET", path, timeout=1.0).status == 200
    except OSError:
        return False


#: Granian run by hand as the README shows (the app factory), without ``gateway serve``'s flags.
GRANIAN = ("--interface", "asgi", "--loop", "uvloop", "--http", "1", "--no-ws", "--factory", "gateway.app:create_app")


class Gateway(Server):
    """The gateway in its own process, in ``cwd``, configured by ``env`` (GATEWAY_PORT is set to a
    free port unless given).

    By default ``python -m gateway serve``; ``granian=[flags]`` runs Granian itself with the app
    factory, ``GRANIAN`` and these flags; ``module`` runs another module (``gateway.server``)."""

    name = "the gateway"

    def __init__(
        self, cwd: Path, *, granian: Sequence[str] | None = None, module: str | None = None, **env: str
    ) -> None:
        self.port = int(env.get("GATEWAY_PORT") or free_port())
        env["GATEWAY_PORT"] = str(self.port)
        if granian is not None:
            argv = [str(Path(sys.executable).parent / "granian"), *GRANIAN, "--port", str(self.port), *granian]
        else:
            argv = [sys.executable, "-m", *((module,) if module else ("gateway", "serve"))]
        super().__init__(argv, cwd / f"gateway-{self.port}.log", env=clean_env(**env), cwd=cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI base URL."""
        return self.url + "/v1"

    def ready(self) -> bool:
        return _answers(self.port, "/health")

    def request(
        self, method: str, path: str, body: object = None, headers: rawhttp.Headers | None = None
    ) -> rawhttp.Response:
        """One request on its own connection."""
        return rawhttp.request(self.port, method, path, body, headers)


class Prometheus(Server):
    """Debian's ``prometheus`` on a free 127.0.0.1 port, scraping ``targets`` (host:port) and
    evaluating ``rule_files`` twice a second, its storage in ``workdir``."""

    name = "prometheus"

    def __init__(self, workdir: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()) -> None:
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(
            orjson.dumps(  # JSON is YAML
                {
                    "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
                    "rule_files": [str(p) for p in rule_files],
                    "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": list(targets)}]}],
                }
            ).decode()
        )
        argv = [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        super().__init__(argv, workdir / "prometheus.log", cwd=workdir)

    def ready(self) -> bool:
        return _answers(self.port, "/-/ready")

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``'s ``data``, or AssertionError with Prometheus's error."""
        query = urlencode(params)
        response = rawhttp.request(self.port, "GET", f"/api/v1/{path}?{query}" if query else f"/api/v1/{path}")
        answer = orjson.loads(response.body)
        assert answer.get("status") == "success", f"{path} {params}: {answer}"
        return answer["data"]

    def query(self, expr: str) -> list[Any]:
        """An instant query's result (a vector's series; an empty list when nothing matched)."""
        data = self.api("query", query=expr)
        result: list[Any] = data["result"] if data["resultType"] in ("vector", "matrix") else [data["result"]]
        return result


#: What the ``start_gateway`` fixture gives: ``start_gateway(**env)`` makes a ``Gateway`` in the test's
#: temporary directory (``.start()`` it or enter it); it is stopped at the end of the test.
StartGateway = Callable[..., Gateway]

_LISTENING = re.compile(r"serving (http://[^ ]+?)/v1 ")
_SERIES = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{[^}]*\})? (\S+)$", re.M)


class SimProc(Server):
    """``python -m gateway.sim --port 0 ARGS`` in its own process; ready once it says where it
    listens."""

    name = "the simulator"

    def __init__(self, *args: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
        self.url = ""
        self.port = 0
        if log is None:
            fd, name = tempfile.mkstemp(prefix="sim-", suffix=".log")
            os.close(fd)
            log = Path(name)
        super().__init__([sys.executable, "-m", "gateway.sim", "--port", "0", *args], log, env=env)

    def ready(self) -> bool:
        found = _LISTENING.search(self.output())
        if found is None:
            return False
        self.url = found.group(1)
        self.port = int(self.url.rsplit(":", 1)[1])
        return True

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        text = rawhttp.request(self.port, "GET", "/metrics", timeout=5).body.decode()
        return {name: float(value) for name, value in _SERIES.findall(text)}

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        try:
            return super().stop(sig, timeout)
        finally:
            self.log.unlink(missing_ok=True)


#: The simulator's timings all at zero.
NO_DELAY: dict[str, Any] = {
    "ttft_ms": 0,
    "itl_ms": 0,
    "itl_jitter_ms": 0,
    "prefill_us_per_token": 0,
    "batch_slowdown": 0,
}


@contextlib.contextmanager
def sim(**config: Any) -> Iterator[SimServer]:
    """The simulator in a thread of this process, on a free port, configured by ``config``
    (``gateway.sim.make_config``'s arguments)."""
    with sim_in_thread(make_config(**{"port": 0, **config})) as server:
        yield server


def wait_until(check: Callable[[], bool], timeout: float = 1.0, every: float = 0.005) -> bool:
    """Whether ``check()`` holds within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return check()
