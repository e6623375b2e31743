"""``just bench`` in its smoke mode: the end-to-end suite must keep producing complete results."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.scenarios import FULL
from tests.servers import ROOT, clean_env

#: The nginx pass needs nginx (tests/run.sh installs it where it can); without it, its test skips.
NGINX = shutil.which("nginx") is not None


def _python_m(
    module: str, *args: str, timeout: float = 240, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m module args`` from the repository, in the clean environment (and ``env``)."""
    argv = [sys.executable, "-m", module, *args]
    environment = {**clean_env(), **(env or {})}
    return subprocess.run(argv, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=timeout)


def _smoke(out: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    """``bench --smoke`` with ``args``: it must succeed; its output and JSON document."""
    proc = _python_m("bench", "--smoke", "--quiet", "--rounds", "2", "--out", str(out), *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_file,) = out.glob("bench-*.json")
    (png_file,) = out.glob("bench-*.png")
    assert png_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return proc, orjson.loads(json_file.read_bytes())


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    proc, doc = _smoke(tmp_path, "--floor")
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
        # The event loop's thread did part of it, never more than all threads together.
        assert 0 <= cost["main_thread_cpu_per_request_us"] <= cost["cpu_per_request_us"]
        assert cost["kernel_cpu_per_request_us"] >= 0  # in ticks: a short round may see none
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
            assert "floor_added" not in sc  # the floor stands in for the backend: nothing is added
            above = sc["above_floor"]
            assert above["main_thread_cpu_per_request_us"] == round(
                cost["main_thread_cpu_per_request_us"] - sc["floor_cost"]["main_thread_cpu_per_request_us"], 2
            )
            assert above["other_threads_cpu_per_request_us"] == round(
                above["cpu_per_request_us"] - above["main_thread_cpu_per_request_us"], 2
            )
            assert (above["main_thread_cpu_per_chunk_us"] is None) is (not sc["params"]["stream"])
            assert above["kernel_cpu_per_request_us"] == round(
                cost["kernel_cpu_per_request_us"] - sc["floor_cost"]["kernel_cpu_per_request_us"], 2
            )
        else:
            assert "floor" not in sc
            # Every client that left was seen by the backend as an aborted generation within 1 s.
            assert sc["gateway"]["abort_share"] == 1.0
            assert sc["direct"]["abort_share"] == 1.0
    assert "c1-stream" in proc.stdout and "gateway" in proc.stdout and "gateway above the floor" in proc.stdout
    # CPU comes in 10 ms ticks: a smoke round may see none, but the run as a whole does.
    assert sum(sc["gateway_cost"]["main_thread_cpu_per_request_us"] for sc in doc["scenarios"]) > 0
    assert "in the event loop's thread" in proc.stdout and "in Granian's other threads" in proc.stdout
    assert "in the kernel (system time): gateway" in proc.stdout and "in the kernel " in proc.stdout
    assert "nginx" not in proc.stdout and "floor_error" not in doc["scenarios"][0]
    # The 1,000-stream scenario (a few streams here): each stream's largest gap, for every target.
    (spread,) = (sc for sc in doc["scenarios"] if sc["scenario"] == "stream-paced-1000")
    for side in ("direct", "gateway", "floor"):
        gaps = spread[side]["largest_gap_ms"]
        assert 0 < gaps["p50"] <= gaps["p99"] <= gaps["max"]
    assert "each stream's largest gap p50/p99/max ms: direct " in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not NGINX, reason="nginx is not installed (tests/run.sh installs it where it is root)")
def test_bench_nginx_pass(tmp_path: Path) -> None:
    """``--nginx``: the same load through nginx, and the gateway's CPU as a multiple of its."""
    scenarios = "c1-stream,nonstream-c16,stream-fast-c16,disconnect"
    proc, doc = _smoke(tmp_path, "--nginx", "--scenarios", scenarios)
    assert [s["scenario"] for s in doc["scenarios"]] == scenarios.split(",")
    for sc in doc["scenarios"]:
        if sc["params"]["abort_after"] is not None:
            assert "nginx" not in sc
            continue
        nginx = sc["nginx"]
        assert nginx["errors"] == 0 and nginx["requests"] >= sc["params"]["concurrency"]
        assert nginx["ttft_ms"]["p50"] is not None and nginx["ttft_ms"]["p50"] > 0
        if sc["params"]["stream"]:
            assert nginx["events"] >= nginx["requests"]  # streams went through nginx whole
        assert set(sc["nginx_added"]) >= {"ttft_ms", "latency_ms"}
        ratios = sc["times_nginx"]
        assert set(ratios) == {"cpu_per_request", "cpu_per_chunk"}
        assert all(v is None or v > 0 for v in ratios.values())
        assert (ratios["cpu_per_chunk"] is None) or sc["params"]["stream"]
    assert "gateway CPU / nginx CPU" in proc.stdout


def _refused(*args: str, **env: str) -> tuple[int, str]:
    """``bench`` with ``args`` (and ``env`` over the clean environment): its exit code and stderr."""
    proc = _python_m("bench", *args, timeout=60, env=env)
    return proc.returncode, proc.stderr


def test_nginx_pass_needs_nginx() -> None:
    code, stderr = _refused("--nginx", PATH="/nonexistent")
    assert code == 2 and "--nginx needs nginx on PATH" in stderr


def test_nginx_pass_refuses_an_https_backend() -> None:
    code, stderr = _refused("--nginx", "--backend-kind", "vllm", "--backend-url", "https://gpu:8000/v1")
    assert code == 2 and "plain-HTTP backend only" in stderr


def test_floor_needs_the_simulator() -> None:
    code, stderr = _refused("--floor", "--backend", "llamacpp")
    assert code == 2 and "simulator only" in stderr


_BURN = """
import os, sys, threading, time
def burn():
    end = time.process_time() + float(sys.argv[2])
    if sys.argv[1] == "kernel":  # reads of /dev/zero: time mostly in the kernel's copy
        fd = os.open("/dev/zero", os.O_RDONLY)
        while time.process_time() < end:
            os.read(fd, 65536)
        return
    while time.process_time() < end:  # a system call (no vDSO for this clock): every 1,000 steps
        for _ in range(1000):
            pass
print("ready", flush=True)
sys.stdin.readline()
if sys.argv[1] == "thread":
    t = threading.Thread(target=burn)
    t.start()
    t.join()
else:
    burn()
print("done", flush=True)
sys.stdin.read()
"""


def _metered_burn(where: str, seconds: float) -> tuple[float, float, float]:
    """``Tree.since_split()`` and ``since_kernel()`` around a child process burning ``seconds`` of
    CPU in its main thread, in another one, or in the kernel (``where``), marked once the child is
    up, so its start-up is not counted."""
    from bench.procstat import Tree

    with subprocess.Popen(
        [sys.executable, "-c", _BURN, where, str(seconds)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stdout.readline() == "ready\n"
            tree = Tree(proc.pid)
            tree.mark()
            proc.stdin.write("go\n")
            proc.stdin.flush()
            assert proc.stdout.readline() == "done\n"
            return (*tree.since_split(), tree.since_kernel())
        finally:
            proc.kill()


@pytest.mark.parametrize("where", ["main", "thread"])
def test_cpu_of_the_main_thread_is_told_apart(where: str) -> None:
    """``Tree.since_split()`` tells the main thread's CPU (a Granian worker's event loop) from
    every thread's, a thread that has ended included."""
    total, main, kernel = _metered_burn(where, 0.4)
    assert total >= 0.3
    if where == "main":
        assert main >= 0.3
    else:
        assert main <= 0.1
    assert kernel <= 0.1  # a loop in Python: user time


def test_cpu_in_the_kernel_is_told_apart() -> None:
    """``Tree.since_kernel()`` is the system time within the whole: reads of /dev/zero spend
    most of theirs in the kernel, where a loop in Python spends almost none (above)."""
    total, _, kernel = _metered_burn("kernel", 0.4)
    assert total >= 0.3
    assert 0.15 <= kernel <= total + 0.02  # ticks against nanoseconds: two ticks of rounding


@pytest.mark.skipif(not Path("/proc/self/schedstat").exists(), reason="this kernel keeps no schedstat")
def test_cpu_is_metered_in_nanoseconds_not_ticks() -> None:
    """3 ms of CPU shows as about that, where ``stat``'s 10 ms ticks would say 0 or 10 ms: the
    paired rounds of ``bench.ab`` resolve a few microseconds a request only so."""
    total, main, _ = _metered_burn("main", 0.003)
    assert 0.002 <= main <= total < 0.009


@pytest.mark.slow
def test_bench_ab_pairs_a_revision_with_this_tree() -> None:
    """``bench.ab``: both gateways answer, each round is paired, and the differences are printed;
    a revision that does not exist is refused."""
    proc = _python_m("bench.ab", "--base", "HEAD", "--pairs", "2", "--seconds", "0.3", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("nonstream-c16: 2 pairs of 0.3 s rounds")
    base, this = lines[1], lines[2]
    assert "base (HEAD " in base and "this tree" in this
    for line in (base, this):
        rounds = orjson.loads(line.split("rounds ", 1)[1])
        assert len(rounds) == 2 and all(r > 0 for r in rounds)
    assert "time to first byte" in base and "time to first byte" in this
    assert ", kernel " in base and ", kernel " in this  # each side's CPU in the kernel, too
    differences = [line for line in lines if "paired difference (this tree - base)" in line]
    assert len(differences) == 3 and "time to first byte" in differences[-1]
    refused = _python_m("bench.ab", "--base", "no-such-revision", timeout=60)
    assert refused.returncode != 0 and "not a revision" in refused.stderr


@pytest.mark.slow
def test_bench_ab_sets_this_env_on_this_side_only() -> None:
    """``--this-env``: the working tree's gateway gets the setting (a bad one stops it from
    starting) and the base's does not (it started, and its log has no complaint)."""
    bad = ("--this-env", "GATEWAY_MAX_BODY_BYTES=x")
    proc = _python_m("bench.ab", "--pairs", "1", "--seconds", "0.3", *bad, timeout=120)
    assert proc.returncode != 0
    kept = Path(proc.stderr.split("bench.ab: logs kept in ", 1)[1].split()[0])
    try:
        assert "GATEWAY_MAX_BODY_BYTES" in (kept / "this.log").read_text()
        assert "GATEWAY_MAX_BODY_BYTES" not in (kept / "base.log").read_text()
    finally:
        shutil.rmtree(kept, ignore_errors=True)


class _Cycle:
    """An object in a reference cycle: only the cyclic collector frees it."""

    def __init__(self) -> None:
        self.me = self


def test_collector_off_holds_the_collector_off_then_collects() -> None:
    """``collector_off``: no cyclic collection inside (the collector is off), one as it ends (a
    cycle made inside is freed by then), and the collector as it found it afterwards, on or off."""
    import gc
    import weakref

    from bench.loadgen import collector_off

    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        try:
            with collector_off():
                assert not gc.isenabled()
                kept = weakref.ref(_Cycle())
                assert kept() is not None
            assert kept() is None
            assert gc.isenabled() is enabled
        finally:
            gc.enable()


def test_a_measured_round_runs_with_the_load_generators_collector_off() -> None:
    """``Runner._measure``: the round it meters runs with this process's collector off (its full
    collections stalled every stream of a 1,000-stream round for 120-190 ms), and what the round
    left in cycles is collected once the round's figures are read."""
    import asyncio
    import gc
    import os
    import weakref

    from bench.loadgen import Sample
    from bench.procstat import Tree
    from bench.runner import Endpoint, Runner, Side

    seen: list[bool] = []
    made: list[weakref.ref[_Cycle]] = []

    class Stub(Runner):
        async def _round(self, ep: Endpoint, sc: object, n: int) -> list[Sample]:
            seen.append(gc.isenabled())
            made.append(weakref.ref(_Cycle()))
            await asyncio.sleep(0)
            return [Sample(start=0.0, status=200, first_byte=0.001, end=0.002)]

    ep = Endpoint("here", "127.0.0.1", 1, "/v1", None)
    runner = Stub(ep, ep, model="m", gateway_tree=Tree(os.getpid()), backend_tree=None, progress=lambda _: None)
    sc = next(s for s in FULL if s.name == "nonstream-c16")
    side = Side()
    assert gc.isenabled()
    asyncio.run(runner._measure(side, ep, sc, 1))
    assert seen == [False]
    assert made[0]() is None
    assert gc.isenabled() and len(side.samples) == 1


def test_side_figures_count_failures_once_each() -> None:
    """Every sample is either counted (ok, or an abort the scenario asked for) or a failure with
    its reason among the examples; identical samples are still counted one by one."""
    from bench import report
    from bench.loadgen import Sample
    from bench.runner import Side

    sc = next(s for s in FULL if s.name == "nonstream-c16")
    good = [Sample(start=0.0, status=200, first_byte=0.001, end=0.002) for _ in range(3)]
    bad = [
        Sample(start=0.0, status=502, first_byte=0.001, end=0.002),
        Sample(start=0.0, status=502, first_byte=0.001, end=0.002),
        Sample(start=0.0, error="reset"),
        Sample(start=0.0, status=200, first_byte=0.001),  # no end: cut short
    ]
    aborted = Sample(start=0.0, status=200, first_byte=0.001, aborted=True)
    side = Side(samples=[*good, *bad, aborted], wall=1.0)
    fig = report.side_figures(side, sc)
    assert (fig["requests"], fig["errors"]) == (8, 4)
    assert fig["error_examples"] == ["reset", "status 200", "status 502"]
    assert fig["throughput_rps"] == 4.0  # the three good ones and the abort


def test_largest_gap_is_each_streams_worst_stall() -> None:
    """Each stream's largest gap is the longest wait between two of its reads (not the mean, not
    the time to first byte); the scenario's figures are percentiles of those, one per stream."""
    from bench import report
    from bench.loadgen import Sample

    def stream(*arrivals: float) -> Sample:
        return Sample(start=0.0, status=200, first_byte=arrivals[0] if arrivals else None, arrivals=list(arrivals))

    assert stream(0.5, 0.52, 0.56, 0.57).largest_gap() == pytest.approx(0.04)
    assert stream(0.5).largest_gap() is None and stream().largest_gap() is None
    # One stall in the middle of a long stream is its figure however many even gaps surround it.
    even = [1.0 + 0.02 * i for i in range(50)]
    stalled = stream(*even[:20], even[19] + 0.3, *(even[19] + 0.3 + 0.02 * i for i in range(1, 30)))
    assert stalled.largest_gap() == pytest.approx(0.3)
    streams = [stream(*even) for _ in range(299)] + [stalled, stream(0.1)]
    figures = report.largest_gaps(streams)
    assert figures["p50"] == pytest.approx(20.0)  # ms
    assert figures["p99"] == pytest.approx(20.0)  # one stall in 300 streams with a gap is past the 99th
    assert figures["max"] == pytest.approx(300.0)
    figures = report.largest_gaps([stalled, stalled, stream(*even)])
    assert figures["p50"] == pytest.approx(300.0) and figures["p99"] == pytest.approx(300.0)
    assert report.largest_gaps([stream(0.1)]) == {"p50": None, "p99": None, "max": None}


def test_stream_paced_1000_spreads_a_thousand_streams() -> None:
    """The 1,000-stream scenario: paced at 20 ms, starts spread over one second, bounded per
    stream; smoke mode keeps its shape with a few streams."""
    from bench.scenarios import smoke

    (sc,) = (s for s in FULL if s.name == "stream-paced-1000")
    assert (sc.concurrency, sc.ttft_ms, sc.itl_ms, sc.spread_seconds) == (1000, 20.0, 20.0, 1.0)
    assert sc.stream and not sc.burst and sc.timeout_seconds < sc.round_seconds
    (small,) = (s for s in smoke() if s.name == "stream-paced-1000")
    assert small.concurrency <= 4 and 0 < small.spread_seconds <= 0.2


def test_above_floor_pairs_each_side_with_its_rounds_floor() -> None:
    """``bench-ab --floor``: each side's share above the floor is taken round by round against
    that round's floor, and the paired difference is of those shares."""
    from bench.ab import ABOVE_FLOOR_KEYS, above_floor

    base = [40.0, 50.0, 44.0]
    this = [30.0, 41.0, 32.0]
    floor = [20.0, 30.0, 22.0]  # the machine slowed in round 2: all three moved together
    a = above_floor(base, this, floor)
    assert a["rounds"] == 3
    assert a["base_above"] == pytest.approx(20.0)  # median of 20, 20, 22
    assert a["this_above"] == pytest.approx(10.0)  # median of 10, 11, 10
    assert a["base_times_floor"] == pytest.approx(2.0)  # median of 2.0, 1.667, 2.0
    assert a["this_times_floor"] == pytest.approx(32.0 / 22.0)  # median of 1.5, 1.367, 1.455
    assert a["this_share_of_base"] == pytest.approx(0.5)
    assert a["diff_median"] == pytest.approx(-10.0)  # median of -10, -9, -12
    assert a["diff_min"] == pytest.approx(-12.0) and a["diff_max"] == pytest.approx(-9.0)
    assert a["diff_mean"] == pytest.approx(-31.0 / 3)
    # A round with no figure on any side is left out of all of it; none at all gives no figures.
    b = above_floor([*base, None], [*this, 5.0], [*floor, 1.0])
    assert b == a
    assert above_floor([None], [1.0], [1.0]) == dict.fromkeys(ABOVE_FLOOR_KEYS, None)
    # A floor of zero (no 10 ms tick in a round) gives no multiple rather than a division by zero.
    z = above_floor([10.0], [5.0], [0.0])
    assert z["base_times_floor"] is None and z["this_share_of_base"] == pytest.approx(0.5)


def _ab_with(label: str, *args: str) -> list[str]:
    """``bench.ab`` (2 pairs of 0.3 s) with a third server (``args``): it must succeed, and the
    line of the server whose label starts with ``label`` must show two rounds that used CPU; the
    output's lines."""
    proc = _python_m("bench.ab", *args, "--pairs", "2", "--seconds", "0.3", timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    (side,) = (line for line in lines if line.strip().startswith(label))
    rounds = orjson.loads(side.split("rounds ", 1)[1])
    assert len(rounds) == 2 and all(r > 0 for r in rounds)
    return lines


@pytest.mark.slow
def test_bench_ab_pairs_the_floor_too() -> None:
    """``bench.ab --floor``: Granian alone answers in every round next to both gateways, and each
    side's CPU above it is printed."""
    lines = _ab_with("floor (Granian alone)", "--floor")
    above = [line for line in lines if line.startswith("  above the floor")]
    assert len(above) == 2 and all("paired difference median" in line for line in above)


def test_over_nginx_pairs_each_side_with_its_rounds_nginx() -> None:
    """``bench-ab --nginx``: a side's time to first byte is taken against nginx's in the same
    round, and only rounds where both have a figure count."""
    from bench.ab import over_reference

    side = [26.0, 30.0, 25.5, None]
    nginx = [24.0, 27.0, 25.0, 24.0]  # round 2 was slow for both: the difference keeps that out
    d = over_reference(side, nginx)
    assert d["rounds"] == 3
    assert d["median"] == pytest.approx(2.0)  # of 2.0, 3.0, 0.5
    assert d["mean"] == pytest.approx(5.5 / 3)
    assert d["min"] == pytest.approx(0.5) and d["max"] == pytest.approx(3.0)
    assert d["low"] is None and d["high"] is None  # three rounds: too few for a 95% interval
    none = {"rounds": 0, "median": None, "mean": None, "min": None, "max": None, "low": None, "high": None}
    assert over_reference([None], [1.0]) == none
    six = over_reference([3.0, 1.0, 2.0, 6.0, 5.0, 4.0], [0.0] * 6)
    assert (six["low"], six["high"]) == (1.0, 6.0)


def test_the_median_interval_is_the_sign_tests() -> None:
    """``bench-ab``'s 95% interval of a paired difference's median: order statistics k in from
    each end, k the largest with P(binomial(n, 1/2) < k) <= 2.5% (so its cover is at least 95%)."""
    from math import comb

    from bench.ab import median_interval

    assert median_interval([1.0] * 5) is None  # 2 / 32 > 5%: five pairs cannot exclude a coin flip
    values = [float(v) for v in (12, 3, 7, 1, 10, 5, 8, 2, 11, 4, 9, 6)]  # 1..12, shuffled
    assert median_interval(values) == (3.0, 10.0)  # n = 12: k = 3 (P(X <= 2) = 79 / 4096)
    assert median_interval([float(v) for v in range(1, 11)]) == (2.0, 9.0)  # n = 10: k = 2
    for n in range(6, 40):
        low, high = median_interval([float(v) for v in range(n)]) or (None, None)
        assert low is not None and high is not None and low == n - 1 - high
        k = int(low) + 1
        assert sum(comb(n, i) for i in range(k)) / 2**n <= 0.025 < sum(comb(n, i) for i in range(k + 1)) / 2**n
    assert median_interval([-3.0, -2.5, -2.0, -1.0, -0.5, 0.4, -1.5, -2.2]) == (-3.0, 0.4)  # holds 0


def test_bench_ab_nginx_needs_nginx() -> None:
    proc = _python_m("bench.ab", "--nginx", timeout=60, env={"PATH": "/nonexistent"})
    assert proc.returncode != 0 and "--nginx needs nginx on PATH" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not NGINX, reason="nginx is not installed (tests/run.sh installs it where it is root)")
def test_bench_ab_pairs_nginx_too() -> None:
    """``bench.ab --nginx``: nginx answers in every round next to both gateways, and each side's
    time to first byte over nginx's, p50 and p99, its streams' largest gap p99 over nginx's (a
    streamed scenario) and its CPU multiple are printed; the gap is paired between the sides too."""
    lines = _ab_with("nginx ", "--nginx", "--scenario", "c1-stream")
    (own,) = (line for line in lines if line.startswith("  nginx "))
    assert " us/req (kernel " in own  # nginx's CPU in the kernel, next to the gateways'
    over = [line for line in lines if line.startswith("  over nginx in the same round")]
    what = [line.split("same round, ", 1)[1].split(" (median): ", 1)[0] for line in over]
    assert what == ["time to first byte p50", "time to first byte p99", "each stream's largest gap p99"]
    for line in over:
        figures = line.split(": ", 1)[1]
        assert figures.startswith("base ") and "; this tree " in figures and " ms (mean " in figures
    for line in over[:2]:
        assert "(mean -," not in line  # both sides had figures in both rounds ("-" is none)
    paired = [line for line in lines if line.startswith("  paired difference (this tree - base)")]
    assert "each stream's largest gap between reads" in paired[-1]
    (cpu,) = (line for line in lines if line.startswith("  CPU per request as a multiple of nginx's"))
    assert cpu.count("x") >= 2 and "base " in cpu and "this tree " in cpu


@pytest.mark.slow
def test_bench_routing_smoke(tmp_path: Path) -> None:
    """``bench --routing --smoke``: every policy ran every workload on two replicas, and the
    figures come from what the replicas, the gateway and the clients measured."""
    proc = _python_m("bench", "--routing", "--smoke", "--quiet", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_file,) = tmp_path.glob("routing-*.json")
    (png_file,) = tmp_path.glob("routing-*.png")
    assert png_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = orjson.loads(json_file.read_bytes())
    env = doc["environment"]
    assert env["args"]["routing"]["replicas"] == 2 and env["cores"]
    answer_tokens = env["args"]["routing"]["shape"]["answer_tokens"]
    assert [(r["policy"], r["workload"]) for r in doc["runs"]] == [
        (p, w) for p in ("p2c", "prefix") for w in ("shared", "control", "skewed")
    ]
    for run in doc["runs"]:
        _check_routing_run(run, env, answer_tokens)
    assert set(doc["summary"]) == {"shared", "control", "skewed"}
    knee = doc["knee"]
    # The threshold is twice the unloaded TTFT the first policy measured, and the sweep judged by it.
    unloaded = knee["sweeps"]["p2c"]["unloaded"]
    assert unloaded["requests"] > 0 and unloaded["ttft_ms"]["p50"] > 0
    assert knee["threshold_ms"] == round(2 * unloaded["ttft_ms"]["p50"], 3)
    # The control ran at its own knee (the first policy's sweep on it), the others at the shared one's.
    assert knee["control_sweep"]["steps"][0]["workload"] == "control"
    if knee["control_sweep"]["knee_rps"]:
        assert doc["rates_rps"]["control"] == knee["control_sweep"]["knee_rps"]
    assert doc["rates_rps"]["skewed"] == doc["rates_rps"]["shared"]
    for sweep in [*knee["sweeps"].values(), knee["control_sweep"]]:
        assert sweep["steps"] and all(
            s["under_threshold"] == (s["ttft_ms"]["p90"] < knee["threshold_ms"]) for s in sweep["steps"]
        )
    assert set(doc["goals"]) == {"shared", "control", "skewed"}
    assert "workload policy" in proc.stdout and "goals:" in proc.stdout


def _check_routing_run(run: dict[str, Any], env: dict[str, Any], answer_tokens: int) -> None:
    assert run["errors"] == 0, run["error_examples"]
    assert run["requests"] > 0 and 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p90"] <= run["ttft_ms"]["p99"]
    # The replicas' own counters saw exactly the requests sent, and generated their answers.
    assert sum(r["requests"] for r in run["replicas"]) == run["requests"]
    assert abs(sum(r["share"] for r in run["replicas"]) - 1) < 0.01
    assert run["output_tokens_per_s"] == pytest.approx(run["throughput_rps"] * answer_tokens, rel=0.05)
    assert all(r["waiting_peak"] is not None and r["waiting_peak"] >= 0 for r in run["replicas"])
    assert run["gateway_cpu_per_request_us"] >= 0
    if env["sim_engine_model"]:
        assert 0 <= run["prefix_cache_hit_rate"] <= 1 and run["prefix_cache_queries"] > 0
    else:
        assert run["prefix_cache_hit_rate"] is None
    if run["decisions"] is not None:  # read from the gateway's own counter, by reason
        assert all(isinstance(n, int) and n >= 0 for n in run["decisions"].values())
        if run["policy"] == "prefix" and env["gateway_knows_balance"]:
            assert sum(run["decisions"].values()) > 0
