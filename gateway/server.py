"""Serving: Granian runs the app; ``gateway serve`` supervises it for a graceful drain.

Process tree: ``gateway serve`` (supervisor) -> Granian main (``python -m gateway.server``) ->
N worker processes. The supervisor owns SIGTERM/SIGINT: it marks the control directory as
draining (workers answer 503 to new requests, /ready says ``draining``), waits until no request is
in flight or the grace period is over, then stops Granian and exits 0. Granian runs in its own
session so a terminal's Ctrl-C reaches only the supervisor, which drains first.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from gateway.config import ENV_NAMES, Settings, load_settings
from gateway.drain import CONTROL_ENV, begin_drain, workers_idle
from gateway.metrics import MULTIPROC_ENV

#: How long Granian's workers get to stop once the drain is over (or its grace period spent):
#: requests still in flight then are cut, and the OS closes their upstream connections.
STOP_TIMEOUT = 3.0


def run_granian(settings: Settings, target: str = "gateway.app:create_app", *, factory: bool = True) -> None:
    """Serve the app with Granian in this process (blocking). ASGI, uvloop, HTTP/1.1.

    ``target`` is the gateway unless the benchmark's floor (``bench.floor``) serves its own
    trivial app with exactly these settings.
    """
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops, TaskImpl
    from granian.http import HTTP1Settings
    from granian.log import LogLevels

    Granian(
        target,
        factory=factory,
        address=settings.gateway_host,
        port=settings.gateway_port,
        interface=Interfaces.ASGI,
        workers=settings.gateway_workers,
        loop=Loops.uvloop,
        task_impl=TaskImpl.asyncio,
        http=HTTPModes.http1,
        websockets=False,
        backlog=settings.gateway_backlog,
        backpressure=settings.gateway_backpressure,
        http1_settings=HTTP1Settings(
            header_read_timeout=max(1, int(settings.gateway_client_header_timeout * 1000)),
            max_buffer_size=settings.gateway_client_max_header_bytes,
        ),
        log_level=LogLevels(settings.gateway_log_level),
        workers_kill_timeout=int(STOP_TIMEOUT),
    ).serve()


#: Descriptors a worker holds besides its client and backend connections: its listening socket,
#: the event loop's own, log and metrics files; generous, as running out fails accept() (EMFILE).
FD_RESERVE = 256


def files_needed(settings: Settings, replicas: int) -> int:
    """Open files one worker needs at its limits: every client connection Granian lets it hold
    (``GATEWAY_BACKPRESSURE``), every backend connection its pools may open (one pool of
    ``GATEWAY_POOL_SIZE`` per replica), and ``FD_RESERVE``. The limit is per process, and each
    worker is a process of its own, so this is also what each needs with several workers."""
    return settings.gateway_backpressure + settings.gateway_pool_size * replicas + FD_RESERVE


def nofile_plan(soft: int, hard: int, need: int) -> tuple[int | None, bool]:
    """The soft open-file limit to set (None: leave it) and whether the hard limit falls short."""
    if hard != resource.RLIM_INFINITY and hard < need:
        return (hard if soft < hard else None), True
    return (need if soft != resource.RLIM_INFINITY and soft < need else None), False


def raise_nofile(settings: Settings, replicas: int) -> str | None:
    """Raise this process's soft RLIMIT_NOFILE (Granian and its workers inherit it) to what a worker
    needs, up to the hard limit. Often 1024 by default, it would cap a worker at ~1,000 client
    connections whatever GATEWAY_BACKPRESSURE says, the rest failing accept() with EMFILE. (Granian
    2.8 raises its own soft limit to the hard one too; this does not rely on it.) Returns the one
    line to show when the hard limit is too low to hold that many, else None."""
    need = files_needed(settings, replicas)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new_soft, short = nofile_plan(soft, hard, need)
    if new_soft is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new_soft, hard))
    if not short:
        return None
    upstream = need - settings.gateway_backpressure - FD_RESERVE
    return (
        f"gateway: warning: the open-file limit is {hard} (hard), below the {need} each worker needs for "
        f"GATEWAY_BACKPRESSURE={settings.gateway_backpressure} client and {upstream} backend connections: "
        f"with its pools full a worker holds about {max(hard - upstream - FD_RESERVE, 0)} client connections, "
        "accept() fails beyond (raise it: ulimit -Hn, systemd LimitNOFILE=, docker --ulimit nofile=; "
        "or lower GATEWAY_BACKPRESSURE)"
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """Settings as environment variables, so Granian's workers rebuild exactly the same ones."""
    out = {}
    for env_name, field in ENV_NAMES.items():
        value = getattr(settings, field)
        out[env_name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return out


class Supervisor:
    """Runs Granian as a child process and drains it on SIGTERM/SIGINT."""

    def __init__(
        self, settings: Settings, *, extra_env: dict[str, str] | None = None, stdout: int | None = None
    ) -> None:
        """``stdout``: where Granian's stdout (the access log) goes, as for ``subprocess.Popen``;
        None (``gateway serve``) leaves it this process's own."""
        self.settings = settings
        self._extra_env = extra_env or {}
        self._stdout = stdout
        self._stop = threading.Event()
        self.child: subprocess.Popen[bytes] | None = None
        self.control_dir: Path | None = None

    def start(self) -> None:
        self.control_dir = Path(tempfile.mkdtemp(prefix="gateway-ctl-"))
        env = {**os.environ, **settings_env(self.settings), **self._extra_env, CONTROL_ENV: str(self.control_dir)}
        if self.settings.gateway_metrics:
            # prometheus-client's multiprocess mode: one scrape shows the sum of all workers.
            metrics_dir = self.control_dir / "metrics"
            metrics_dir.mkdir()
            env[MULTIPROC_ENV] = str(metrics_dir)
        self.child = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "gateway.server"],
            env=env,
            stdout=self._stdout,
            start_new_session=True,
        )

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def wait(self) -> int:
        """Block until the child exits (its code) or a stop is requested (drain, then 0)."""
        assert self.child is not None
        while not self._stop.is_set():
            code = self.child.poll()
            if code is not None:
                return 0 if code == 0 else 1
            self._stop.wait(0.1)
        return self.drain_and_stop()

    def drain_and_stop(self) -> int:
        assert self.child is not None and self.control_dir is not None
        if self.child.poll() is None:
            begin_drain(self.control_dir)
            deadline = time.monotonic() + self.settings.gateway_drain_seconds
            # Give every worker at least one tick to notice and report before trusting "idle".
            time.sleep(0.15)
            while time.monotonic() < deadline and self.child.poll() is None:
                if workers_idle(self.control_dir):
                    break
                time.sleep(0.05)
            else:
                if self.child.poll() is None:  # say so: requests still in flight are about to be cut
                    print(
                        f"gateway: GATEWAY_DRAIN_SECONDS ({self.settings.gateway_drain_seconds:g} s) passed with "
                        "requests still in flight; stopping the workers",
                        file=sys.stderr,
                        flush=True,
                    )
            self._terminate()
        self._cleanup()
        return 0

    def _terminate(self) -> None:
        assert self.child is not None
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
            try:
                self.child.wait(STOP_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                os.killpg(self.child.pid, signal.SIGKILL)
                self.child.wait()

    def _cleanup(self) -> None:
        if self.control_dir is not None:
            shutil.rmtree(self.control_dir, ignore_errors=True)
            self.control_dir = None


def serve(settings: Settings) -> int:
    """``gateway serve``: run until SIGTERM/SIGINT, drain, exit 0."""
    from gateway.worker import declared_backends

    replicas = sum(len(spec.urls) for spec in declared_backends(settings)[0])
    warning = raise_nofile(settings, replicas)
    if warning is not None:
        print(warning, file=sys.stderr, flush=True)
    sup = Supervisor(settings)
    signal.signal(signal.SIGTERM, sup.request_stop)
    signal.signal(signal.SIGINT, sup.request_stop)
    sup.start()
    try:
        return sup.wait()
    finally:
        if sup.child is not None and sup.child.poll() is None:
            sup._terminate()
        sup._cleanup() if sup.control_dir is not None else None


def _exit_with_parent() -> None:
    """Stop Granian if the supervisor dies without draining us (e.g. SIGKILL): no orphans."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


if __name__ == "__main__":
    if os.environ.get(CONTROL_ENV):
        _exit_with_parent()
    run_granian(load_settings())
