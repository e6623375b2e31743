"""``just bench`` in its smoke mode: the end-to-end suite must keep producing complete results."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from bench.scenarios import FULL
from tests.conftest import ROOT, clean_env

#: The nginx pass needs nginx (tests/run.sh installs it where it can); without it, it is left out.
NGINX = shutil.which("nginx") is not None


def test_bench_smoke(tmp_path: Path) -> None:
    if not NGINX:
        print("nginx is not installed: the smoke run leaves out the --nginx pass")
    argv = [sys.executable, "-m", "bench", "--smoke", "--quiet", "--rounds", "2", "--floor", "--out", str(tmp_path)]
    proc = subprocess.run(
        argv + (["--nginx"] if NGINX else []),
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_file,) = tmp_path.glob("bench-*.json")
    (png_file,) = tmp_path.glob("bench-*.png")
    assert png_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = orjson.loads(json_file.read_bytes())
    env = doc["environment"]
    assert env["python"] and env["cores"] and env["packages"]["granian"] and env["args"]["backend_kind"] == "vllm"
    assert [s["scenario"] for s in doc["scenarios"]] == [s.name for s in FULL]
    # One worker is part of all the gateway's processes (supervisor, Granian's main, the worker).
    assert 0 < doc["gateway_idle_worker_rss_mib"] < doc["gateway_idle_rss_mib"]
    for sc in doc["scenarios"]:
        for side in ("direct", "gateway"):
            fig = sc[side]
            assert fig["errors"] == 0, (sc["scenario"], side, fig["error_examples"])
            assert fig["requests"] >= sc["params"]["concurrency"]
            assert fig["ttft_ms"]["p50"] is not None and fig["ttft_ms"]["p50"] > 0
            if sc["params"]["stream"]:
                assert fig["events"] >= fig["requests"]
        assert set(sc["added"]) >= {"ttft_ms", "gap_ms", "latency_ms", "throughput_rps"}
        cost = sc["gateway_cost"]
        assert cost["cpu_per_request_us"] >= 0 and cost["rss_mib"] > 0
        if sc["params"]["abort_after"] is None:
            # --floor: Granian alone answered the same load, and the gateway's cost above it is reported.
            floor = sc["floor"]
            assert floor["errors"] == 0 and floor["requests"] >= sc["params"]["concurrency"]
            assert floor["ttft_ms"]["p50"] is not None and floor["ttft_ms"]["p50"] > 0
            if sc["params"]["stream"]:
                assert floor["events"] >= floor["requests"]
            assert sc["floor_cost"]["cpu_per_request_us"] >= 0
            assert sc["above_floor"]["cpu_per_request_us"] == round(
                cost["cpu_per_request_us"] - sc["floor_cost"]["cpu_per_request_us"], 2
            )
            if NGINX:
                nginx = sc["nginx"]
                assert nginx["errors"] == 0 and nginx["requests"] >= sc["params"]["concurrency"]
                assert nginx["ttft_ms"]["p50"] is not None and nginx["ttft_ms"]["p50"] > 0
                assert set(sc["times_nginx"]) == {"cpu_per_request", "cpu_per_chunk"}
        else:
            assert "floor" not in sc and "nginx" not in sc
            # Every client that left was seen by the backend as an aborted generation within 1 s.
            assert sc["gateway"]["abort_share"] == 1.0
            assert sc["direct"]["abort_share"] == 1.0
    assert "c1-stream" in proc.stdout and "gateway" in proc.stdout and "gateway above the floor" in proc.stdout
    assert ("gateway CPU / nginx CPU" in proc.stdout) is NGINX


def test_nginx_pass_needs_nginx() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--nginx"],
        capture_output=True,
        text=True,
        env={**clean_env(), "PATH": "/nonexistent"},
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2 and "--nginx needs nginx on PATH" in proc.stderr


@pytest.mark.skipif(not NGINX, reason="nginx is not installed")
def test_nginx_pass_refuses_an_https_backend() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--nginx", "--backend-kind", "vllm", "--backend-url", "https://gpu:8000/v1"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2 and "plain-HTTP backend only" in proc.stderr


def test_floor_needs_the_simulator() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--floor", "--backend", "llamacpp"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 2 and "simulator only" in proc.stderr
