"""``gateway demo``: the simulator with the gateway in front of it, in one process tree.

It starts ``gateway sim`` (imitating vLLM) and ``gateway serve`` pointed at it, streams one chat
completion through the gateway to show it working, prints a ``curl`` command to try, and stops
both on Ctrl-C (or at once with ``--once``). This is the only place the simulator stands in for a
backend: ``gateway serve`` never falls back to it.

The demo's own text goes to stdout and the gateway's access log to stderr, held back while the
example prints: the answer reads whole whether stdout is a terminal, a file or another program.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

import orjson

from gateway.config import ENV_NAMES, Settings, settings_from_strings
from gateway.server import Supervisor

HOST = "127.0.0.1"
KEY = "demo-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _wait_health(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            if ok:
                return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


def _stream_once(port: int, key: str) -> str:
    """One streamed chat completion through the gateway; the text it produced."""
    body = orjson.dumps(
        {
            "model": "sim-model",
            "messages": [{"role": "user", "content": "Hello from the demo!"}],
            "max_tokens": 24,
            "stream": True,
        }
    )
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=body,
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"the gateway answered {resp.status}: {resp.read()[:300]!r}")
    text = []
    for line in resp:
        if line.startswith(b"data: {"):
            choices = orjson.loads(line[6:]).get("choices") or []
            if choices:
                piece = choices[0].get("delta", {}).get("content")
                if piece:
                    text.append(piece)
                    print(piece, end="", flush=True)
    print()
    conn.close()
    return "".join(text)


class _AccessLogRelay:
    """The demo gateway's stdout (its access log, a pipe) passed on to the demo's stderr line by
    line, except while ``held``: lines that come then wait until the demo's text is out."""

    def __init__(self, source: IO[bytes]) -> None:
        self.held = threading.Lock()
        self._source = source
        self._thread = threading.Thread(target=self._run, name="demo-access-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Read to the end whatever becomes of stderr: a full pipe would stall the gateway's workers.
        for line in self._source:
            with self.held:
                try:
                    sys.stderr.buffer.write(line)
                    sys.stderr.buffer.flush()
                except (OSError, ValueError):
                    pass

    def join(self, timeout: float) -> None:
        """Wait for the last lines (the gateway writes them as it stops)."""
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._source.close()


def _gateway_settings(port: int, sim_port: int) -> Settings:
    env = {k: v for k, v in os.environ.items() if k in ENV_NAMES and k.startswith("GATEWAY_")}
    env.update(
        {
            "BACKEND_KIND": "vllm",
            "BACKEND_BASE_URL": f"http://{HOST}:{sim_port}/v1",
            "API_KEYS": KEY,
            "GATEWAY_HOST": HOST,
            "GATEWAY_PORT": str(port),
            "GATEWAY_LOG_LEVEL": env.get("GATEWAY_LOG_LEVEL", "warning"),
        }
    )
    if env.get("GATEWAY_LOG_FORMAT", "auto") == "auto":
        # The access log ends up on the demo's stderr: its format follows that, not the pipe.
        env["GATEWAY_LOG_FORMAT"] = "text" if sys.stderr.isatty() else "json"
    return settings_from_strings(env)


def _show(port: int, sim_port: int, once: bool) -> None:
    print(f"gateway demo: simulator (vLLM wire format) on http://{HOST}:{sim_port}/v1")
    print(f"gateway demo: gateway on http://{HOST}:{port}/v1, client key {KEY!r}")
    print("gateway demo: one streamed chat completion through the gateway:\n")
    _stream_once(port, KEY)
    print(
        "\nTry it yourself:\n\n"
        f"  curl -N http://{HOST}:{port}/v1/chat/completions \\\n"
        f"    -H 'Authorization: Bearer {KEY}' -H 'Content-Type: application/json' \\\n"
        '    -d \'{"model": "sim-model", "stream": true, '
        '"messages": [{"role": "user", "content": "Hi"}]}\'\n'
    )
    if not once:
        print("Press Ctrl-C to stop.")
    sys.stdout.flush()


def _stop_sim(sim: subprocess.Popen[bytes]) -> None:
    if sim.poll() is None:
        sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(10)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()


def run_demo(port: int, sim_port: int, once: bool) -> int:
    """``gateway demo``: start both, show one streamed answer, then wait for Ctrl-C (or stop)."""
    if _port_taken(HOST, port):
        print(f"gateway demo: port {port} is in use; pick another with --port", file=sys.stderr)
        return 2
    sim_port = sim_port or _free_port()
    sim = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "gateway.sim", "--kind", "vllm", "--host", HOST, "--port", str(sim_port)],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    sup: Supervisor | None = None
    relay: _AccessLogRelay | None = None
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if not _wait_health(sim_port, sim):
            print("gateway demo: the simulator did not start", file=sys.stderr)
            return 1
        sup = Supervisor(_gateway_settings(port, sim_port), stdout=subprocess.PIPE)
        sup.start()
        assert sup.child is not None and sup.child.stdout is not None
        relay = _AccessLogRelay(sup.child.stdout)
        if not _wait_health(port, sup.child):
            print("gateway demo: the gateway did not start", file=sys.stderr)
            return 1
        with relay.held:
            _show(port, sim_port, once)
        while not once and not stop.is_set():
            if sup.child.poll() is not None or sim.poll() is not None:
                print("gateway demo: a process exited unexpectedly", file=sys.stderr)
                return 1
            stop.wait(0.2)
        return 0
    finally:
        if sup is not None:
            sup.drain_and_stop()
        if relay is not None:
            relay.join(5)
        _stop_sim(sim)
        print("gateway demo: stopped.")
