"""Start the backend and the gateway, run every scenario direct and through the gateway in
interleaved rounds, and meter the gateway's CPU from /proc.

Protocol per scenario: a primer (a few requests each way, not measured), a warm-up round each
way, then measured rounds alternating direct/gateway (the order flips every round) so the
machine's drift cancels out. On a machine with 2+ CPUs the gateway is pinned to CPU 0 and the
backend and this load generator to CPU 1; each process's CPU use is recorded so the report can
say which one was the limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.loadgen import Connection, Sample, build_request, collector_off
from bench.procstat import Tree, self_cpu
from bench.scenarios import Scenario
from tests.tools.llama_server import free_port, pin_to

Progress = Callable[[str], None]


@dataclass
class Endpoint:
    """Somewhere to send load: the backend directly, or the gateway."""

    name: str
    host: str
    port: int
    base_path: str  # the OpenAI base path, e.g. /v1
    api_key: str | None


@dataclass
class Side:
    """What one target produced in one scenario (all measured rounds together)."""

    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    loadgen_cpu: float = 0.0
    backend_cpu: float = 0.0
    gateway_cpu: float = 0.0
    #: The part of ``gateway_cpu`` in the processes' main threads (a Granian worker's event loop).
    gateway_main_cpu: float = 0.0
    #: The part of ``gateway_cpu`` spent in the kernel (system time: system calls, scheduling).
    gateway_kernel_cpu: float = 0.0
    gateway_rss: int = 0
    aborted_seen: int | None = None
    aborted_sent: int = 0


def cpu_plan() -> tuple[int | None, int | None]:
    """(gateway CPU, backend+loadgen CPU), or (None, None) when there are not two to pin to."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pin_loadgen() -> tuple[int | None, int | None]:
    """``cpu_plan()``, with this process (the load generator) pinned to the second CPU."""
    gateway_cpu, other_cpu = cpu_plan()
    if other_cpu is not None:
        os.sched_setaffinity(0, {other_cpu})
    return gateway_cpu, other_cpu


def key_value(item: str) -> tuple[str, str]:
    """An argparse ``type`` for ``--gateway-env KEY=VALUE``."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"wants KEY=VALUE, got {item!r}")
    return key, value


def add_gateway_env(parser: argparse.ArgumentParser, text: str, flag: str = "--gateway-env") -> None:
    """``--gateway-env KEY=VALUE`` (repeatable; or ``flag``): ``dict(args.gateway_env)`` is the
    settings."""
    parser.add_argument(flag, action="append", default=[], type=key_value, metavar="KEY=VALUE", help=text)


def settled_tree(proc: subprocess.Popen[bytes]) -> Tree:
    """The process tree of a server that answered ready, once its workers are fully up."""
    time.sleep(0.3)
    return Tree(proc.pid)


def wait_ready(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0, headers: dict[str, str] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            req = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(req, timeout=1) as r:  # noqa: S310 - loopback
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready within {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def _running(
    argv: list[str], port: int, cpu: int | None, log: Path, ready: str = "/health", **popen: Any
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Run one of the benchmark's servers (output to ``log``, pinned to ``cpu``) until ``ready``
    answers 200; stopped on the way out."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
            argv,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=pin_to(cpu),  # noqa: PLW1509 - affinity must be set before exec
            **popen,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}{ready}", proc)
        yield proc, port
    finally:
        stop(proc)


@contextlib.contextmanager
def start_sim(cpu: int | None, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """The built-in simulator with no delays of its own; scenarios pace it per request."""
    port = free_port()
    argv = [sys.executable, "-m", "gateway.sim", "--kind", "vllm", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--fast", "--batch-slowdown", "0", "--max-running", "100000"]
    with _running(argv, port, cpu, log) as running:
        yield running


def server_env(settings: dict[str, str], extra_env: dict[str, str]) -> dict[str, str]:
    """The environment of a benchmarked server (the gateway, or the floor with its settings):
    this one without any gateway setting of the developer's, one worker, quiet logs, then
    ``settings`` and the run's ``--gateway-env``."""
    from gateway.config import ENV_NAMES

    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    return {**env, "GATEWAY_WORKERS": "1", "GATEWAY_LOG_LEVEL": "warning", **settings, **extra_env}


@contextlib.contextmanager
def start_gateway(
    cpu: int | None, log: Path, backend_kind: str, backend_url: str, backend_key: str | None, extra_env: dict[str, str]
) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    backend = {"BACKEND_KIND": backend_kind, "BACKEND_BASE_URL": backend_url, "BACKEND_API_KEY": backend_key or ""}
    env = server_env({**backend, "GATEWAY_PORT": str(port)}, extra_env)
    workdir = tempfile.mkdtemp(prefix="bench-gw-")  # never a developer's .env
    try:
        with _running([sys.executable, "-m", "gateway", "serve"], port, cpu, log, env=env, cwd=workdir) as running:
            yield running
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(workdir)


@contextlib.contextmanager
def start_floor(cpu: int | None, log: Path, extra_env: dict[str, str]) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """Granian alone (``bench.floor``), with the gateway's Granian settings (``extra_env`` too:
    the same backlog, backpressure and workers), pinned like it."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.floor", "--port", str(port)]
    env = server_env({}, extra_env)
    with _running(argv, port, cpu, log, env=env, cwd=Path(__file__).resolve().parent.parent) as running:
        yield running


#: nginx as the reference proxy (``just bench --nginx``): one worker, keep-alive connections to the
#: backend that are never recycled (nor the clients'), nothing buffered either way (as the gateway
#: streams), the backend's own Host, no access log, errors to the pass's log, and a ready answer
#: of its own (the backend may have no /health at its root).
NGINX_CONF = """
worker_processes 1;
daemon off;
error_log stderr warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    tcp_nodelay on;
    keepalive_requests 1000000000;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream backend {{ server {backend}; keepalive 256; keepalive_requests 1000000000; }}
    server {{
        listen 127.0.0.1:{port};
        location = /__ready {{ return 200; }}
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {backend};
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


@contextlib.contextmanager
def start_nginx(cpu: int | None, log: Path, host: str, port: int) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """nginx proxying to the backend at ``host``:``port``, pinned like the gateway, in a scratch
    directory."""
    backend = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    listen = free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, backend=backend, port=listen))
    try:
        with _running(["nginx", "-c", str(conf), "-p", str(workdir)], listen, cpu, log, ready="/__ready") as running:
            yield running
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def sim_counter(host: str, port: int, name: str, api_key: str | None) -> float | None:
    """A counter from the backend's /metrics, or None when it has no such series."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        req = urllib.request.Request(f"http://{host}:{port}/metrics", headers=headers)
        with urllib.request.urlopen(req, timeout=2) as r:  # noqa: S310 - loopback
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


class Runner:
    def __init__(
        self,
        direct: Endpoint,
        gateway: Endpoint,
        *,
        model: str,
        gateway_tree: Tree,
        backend_tree: Tree | None,
        progress: Progress,
        rounds: int = 4,
    ) -> None:
        self.direct = direct
        self.gateway = gateway
        self.model = model
        self.gateway_tree = gateway_tree
        self.backend_tree = backend_tree
        self.progress = progress
        self.rounds = rounds
        self._conns: dict[str, list[Connection]] = {}

    def alone(self, ep: Endpoint, tree: Tree, *, backend: bool) -> Runner:
        """A runner for another server in the gateway's place (the floor, or nginx), metered by
        ``tree``, with this one's load and rounds; the backend's CPU too if it still serves."""
        return Runner(
            self.direct,
            ep,
            model=self.model,
            gateway_tree=tree,
            backend_tree=self.backend_tree if backend else None,
            progress=self.progress,
            rounds=self.rounds,
        )

    def _payload(self, ep: Endpoint, sc: Scenario) -> bytes:
        body: dict[str, object] = {
            "model": self.model,
            "messages": [{"role": "user", "content": "Say something about benchmarks, please."}],
            "max_tokens": sc.tokens,
            "stream": sc.stream,
        }
        if sc.stream:
            body["stream_options"] = {"include_usage": True}
        pacing = {"x-sim-ttft-ms": str(sc.ttft_ms), "x-sim-itl-ms": str(sc.itl_ms), "x-sim-itl-jitter-ms": "0"}
        return build_request(ep.host, ep.port, ep.base_path + "/chat/completions", body, ep.api_key, pacing)

    def _connections(self, ep: Endpoint, n: int) -> list[Connection]:
        conns = self._conns.setdefault(ep.name, [])
        while len(conns) < n:
            conns.append(Connection(ep.host, ep.port))
        return conns[:n]

    async def _round(self, ep: Endpoint, sc: Scenario, n: int) -> list[Sample]:
        raw = self._payload(ep, sc)
        conns = self._connections(ep, sc.concurrency)
        deadline = time.monotonic() + sc.round_seconds
        samples: list[Sample] = []
        issued = 0

        async def user(conn: Connection) -> None:
            nonlocal issued
            while issued < n and time.monotonic() < deadline:
                issued += 1
                s = await conn.request(raw, abort_after_events=sc.abort_after, timeout=sc.timeout_seconds)
                samples.append(s)
                if sc.burst:
                    return

        async def spread(conn: Connection, at: float) -> None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
            samples.append(await conn.request(raw, timeout=sc.timeout_seconds))

        if sc.spread_seconds:
            # Open loop: one stream per connection, the wave's starts spread evenly over
            # ``spread_seconds``, whatever the earlier streams are doing.
            while issued < n and time.monotonic() < deadline:
                wave = conns[: min(sc.concurrency, n - issued)]
                issued += len(wave)
                t0 = time.monotonic()
                step = sc.spread_seconds / len(wave)
                await asyncio.gather(*(spread(c, t0 + i * step) for i, c in enumerate(wave)))
        elif sc.burst:
            while issued < n and time.monotonic() < deadline:
                await asyncio.gather(*(user(c) for c in conns[: min(sc.concurrency, n - issued)]))
        else:
            await asyncio.gather(*(user(c) for c in conns))
        return samples

    async def run(self, sc: Scenario) -> tuple[Side, Side]:
        """Direct and through the gateway, in interleaved rounds."""
        direct, gateway = await self._rounds(sc, [self.direct, self.gateway])
        return direct, gateway

    async def run_alone(self, sc: Scenario) -> Side:
        """The same protocol against the ``gateway`` endpoint alone (the floor's and nginx's passes)."""
        (side,) = await self._rounds(sc, [self.gateway])
        return side

    async def _rounds(self, sc: Scenario, eps: list[Endpoint]) -> list[Side]:
        """A primer and a warm-up round per endpoint (not measured), then measured rounds, the
        endpoints' order flipped every round; the last endpoint's CPU is the gateway tree's."""
        sides = [Side() for _ in eps]
        for ep in eps:
            await self._round(ep, sc, max(2, min(sc.concurrency, 8)))
            await self._round(ep, sc, max(sc.concurrency, sc.requests // (self.rounds * 4)))
        per_round = max(1, sc.requests // self.rounds)
        for r in range(self.rounds):
            order = list(zip(eps, sides, strict=True))
            for ep, side in order if r % 2 == 0 else reversed(order):
                self.progress(f"{sc.name}: round {r + 1}/{self.rounds} {ep.name}")
                await self._measure(side, ep, sc, per_round)
        if sc.abort_after is not None:
            for ep in eps:
                self._conns.pop(ep.name, None)
        sides[-1].gateway_rss = self.gateway_tree.rss()
        return sides

    async def _settle(self) -> float | None:
        """The backend's aborted counter once it stopped moving (aborts of earlier rounds land late)."""
        last = self._aborted()
        deadline = time.monotonic() + 2.0
        while last is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.15)
            now = self._aborted()
            if now == last:
                break
            last = now
        return last

    async def _measure(self, side: Side, ep: Endpoint, sc: Scenario, n: int) -> None:
        aborted_before = await self._settle() if sc.abort_after is not None else None
        with collector_off():  # the client's own collections would stall the round it measures
            self.gateway_tree.mark()
            if self.backend_tree is not None:
                self.backend_tree.mark()
            cpu0, t0 = self_cpu(), time.perf_counter()
            samples = await self._round(ep, sc, n)
            side.wall += time.perf_counter() - t0
            side.loadgen_cpu += self_cpu() - cpu0
            total, main = self.gateway_tree.since_split()
            side.gateway_cpu += total
            side.gateway_main_cpu += main
            side.gateway_kernel_cpu += self.gateway_tree.since_kernel()
            if self.backend_tree is not None:
                side.backend_cpu += self.backend_tree.since()
        side.samples.extend(samples)
        if sc.abort_after is not None:
            sent = sum(1 for s in samples if s.aborted)
            side.aborted_sent += sent
            if aborted_before is not None:
                deadline = time.monotonic() + 1.0
                seen = 0.0
                while time.monotonic() < deadline:
                    now = self._aborted()
                    seen = (now or 0.0) - aborted_before
                    if seen >= sent:
                        break
                    await asyncio.sleep(0.02)
                side.aborted_seen = (side.aborted_seen or 0) + min(int(seen), sent)

    def _aborted(self) -> float | None:
        return sim_counter(self.direct.host, self.direct.port, "sim_aborted_requests_total", self.direct.api_key)
