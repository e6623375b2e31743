"""``gateway demo``: the simulator with the gateway in front, one streamed example, clean stop."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson

from tests.servers import clean_env, free_port


def port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def demo_once(port: int, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--once", "--port", str(port)],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=cwd,
        timeout=timeout,
    )


def test_demo_once(tmp_path: Path) -> None:
    port = free_port()
    proc = demo_once(port, tmp_path, 90)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"http://127.0.0.1:{port}/v1" in out
    assert "curl -N" in out and "Authorization: Bearer demo-key" in out
    example = out.split("through the gateway:", 1)[1].split("Try it yourself", 1)[0]
    assert len(example.split()) >= 10  # the streamed words arrived
    assert port_closed(port)


def test_demo_piped_prints_the_answer_whole_and_the_access_log_apart(tmp_path: Path) -> None:
    """With stdout a pipe (``gateway demo > file``, ``| less``) the streamed answer is contiguous:
    the gateway's access-log lines, its own /health checks' included, go to stderr instead."""
    from gateway.sim.responses import completion_text

    port = free_port()
    proc = demo_once(port, tmp_path, 90)
    assert proc.returncode == 0, proc.stderr
    example = proc.stdout.split("through the gateway:\n", 1)[1].split("\nTry it yourself", 1)[0]
    assert example.strip() == completion_text(24).strip()
    assert '"request_id"' not in proc.stdout
    logged = [orjson.loads(line) for line in proc.stderr.splitlines() if line.startswith('{"time"')]
    assert {(line["path"], line["status"]) for line in logged} >= {("/health", 200), ("/v1/chat/completions", 200)}


def test_demo_stops_both_on_ctrl_c(tmp_path: Path) -> None:
    port, sim_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--sim-port", str(sim_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=tmp_path,
    )
    try:
        assert proc.stdout is not None
        seen = b""
        deadline = time.monotonic() + 60
        while b"Ctrl-C" not in seen and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
        assert b"Ctrl-C" in seen
        assert not port_closed(port) and not port_closed(sim_port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert port_closed(port) and port_closed(sim_port)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()


def test_demo_refuses_a_busy_port(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = demo_once(port, tmp_path, 60)
    assert proc.returncode == 2 and "in use" in proc.stderr
