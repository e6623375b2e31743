"""Load and drain, bounded and on loopback: 1,000 concurrent streams through one worker with the
default settings, every byte checked; SIGTERM under load loses nothing that was in flight.

The simulator runs in its own process with an inter-token latency, so the streams overlap; the
client is one asyncio loop of raw sockets in the test process. Figures are printed with a
``RELIABILITY`` prefix (``pytest -s``) for RELIABILITY.md.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from gateway.sim import new_event_loop
from tests.rawhttp import Result, fetch, request_bytes
from tests.reliability import Meter, chat, check_stream, sampling
from tests.servers import SimProc, StartGateway

pytestmark = pytest.mark.slow

STREAMS = 1000
TOKENS = 64
#: The simulator's pacing: 64 tokens at 40 ms make each stream last about 2.6 s, so all overlap.
SIM_ARGS = (
    "--itl-ms",
    "40",
    "--itl-jitter-ms",
    "2",
    "--ttft-ms",
    "20",
    "--max-running",
    "4096",
    "--batch-slowdown",
    "0",
)


@pytest.fixture(scope="module")
def sim() -> Iterator[SimProc]:
    with SimProc(*SIM_ARGS) as s:
        yield s


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


def max_overlap(results: list[Result]) -> int:
    """The most streams that were open at once (from their head and end times)."""
    edges = sorted([(r.t_head, 1) for r in results] + [(r.t_end, -1) for r in results])
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_a_thousand_concurrent_streams_with_default_settings(start_gateway: StartGateway, sim: SimProc) -> None:
    g = start_gateway(BACKEND_BASE_URL=sim.base_url).start()  # default pool size and admission limits
    assert g.proc is not None
    meter = Meter(g.proc.pid)
    assert len(meter.pids) == 1  # one worker
    rss0, fds0 = meter.rss(), meter.fds()
    raw = request_bytes("POST", "/v1/chat/completions", chat(stream=True, max_tokens=TOKENS))
    before = sim.metrics()

    async def all_streams() -> list[Result]:
        return await asyncio.gather(*(fetch(g.port, raw, timeout=60) for _ in range(STREAMS)))

    t0 = time.monotonic()
    with sampling(meter):
        results = run(all_streams())
    wall = time.monotonic() - t0
    after = sim.metrics()

    problems = [(r.status, r.error, check_stream(r.body, TOKENS)) for r in results]
    bad = [p for p in problems if p != (200, None, None)]
    assert not bad, f"{len(bad)} of {STREAMS} streams failed, e.g. {bad[:3]}"
    overlap = max_overlap(results)
    assert overlap >= STREAMS * 0.95, f"only {overlap} streams were open at once"
    assert after["sim_completed_requests_total"] - before["sim_completed_requests_total"] == STREAMS
    assert after["sim_aborted_requests_total"] == before["sim_aborted_requests_total"]
    assert wall < 30
    peak_delta = meter.peak_rss - rss0
    nbytes = sum(len(r.body) for r in results)
    print(
        f"\nRELIABILITY load: {STREAMS} streams x {TOKENS} tokens, {overlap} open at once, {nbytes} bytes, "
        f"all intact, {wall:.1f} s; worker RSS {rss0 >> 20} MiB -> peak {meter.peak_rss >> 20} MiB "
        f"(+{peak_delta / STREAMS / 1024:.0f} KiB per stream); fds {fds0} -> {meter.fds()} (pool kept)"
    )
    # A stream costs the worker tens of KiB, never its whole body.
    assert peak_delta < STREAMS * 200 * 1024


def test_sigterm_under_load_finishes_every_stream(start_gateway: StartGateway, sim: SimProc) -> None:
    n = 300
    g = start_gateway(BACKEND_BASE_URL=sim.base_url, GATEWAY_DRAIN_SECONDS="20").start()
    assert g.proc is not None
    raw = request_bytes("POST", "/v1/chat/completions", chat(stream=True, max_tokens=TOKENS))

    async def scenario() -> tuple[list[Result], Result, Result, float, float]:
        heads = [asyncio.Event() for _ in range(n)]
        streams = [asyncio.ensure_future(fetch(g.port, raw, timeout=30, on_head=h)) for h in heads]
        await asyncio.wait_for(asyncio.gather(*(h.wait() for h in heads)), 15)
        assert g.proc is not None
        t_term = time.monotonic()
        g.proc.send_signal(signal.SIGTERM)
        # /ready says "draining" while the streams are still running, and new work is refused.
        ready = Result()
        while time.monotonic() - t_term < 2:
            ready = await fetch(g.port, request_bytes("GET", "/ready"), timeout=5)
            if ready.status == 503:
                break
            await asyncio.sleep(0.02)
        t_ready = time.monotonic() - t_term
        refused = await fetch(g.port, request_bytes("POST", "/v1/chat/completions", chat()), timeout=5)
        running = sum(not s.done() for s in streams)
        assert running > n // 2, f"only {running} streams were still running when /ready turned"
        return list(await asyncio.gather(*streams)), ready, refused, t_ready, t_term

    results, ready, refused, t_ready, t_term = run(scenario())
    assert ready.status == 503 and b'"draining"' in ready.body
    assert refused.status == 503 and b'"draining"' in refused.body
    bad = [(r.status, r.error, check_stream(r.body, TOKENS)) for r in results]
    bad = [b for b in bad if b != (200, None, None)]
    assert not bad, f"{len(bad)} of {n} in-flight streams were lost or cut, e.g. {bad[:3]}"
    assert g.proc.wait(20) == 0
    stopped = time.monotonic() - t_term
    assert stopped < 20
    print(
        f"\nRELIABILITY drain: SIGTERM with {n} streams in flight: /ready 503 after {t_ready * 1000:.0f} ms, "
        f"all {n} completed intact, exit 0 after {stopped:.1f} s (grace 20 s)"
    )
