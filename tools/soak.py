#!/usr/bin/env python3
"""Soak: steady mixed traffic through ``gateway serve`` in front of the simulator, watching the
worker for growth: resident memory, open file descriptors, and the backend connections it holds.

    python -m tools.soak --minutes 10          # or: just soak --minutes 10
    python -m tools.soak --seconds 60 --json   # the short mode tests/test_soak.py runs

Each of ``--concurrency`` clients loops over a fixed mix (seeded): whole streams (every byte
checked), non-streamed answers (checked), streams the client resets mid-way, streams the backend
resets mid-way (``x-sim-fault: reset-after=3``), backend 503s (``status=503``) and malformed JSON.
A sample is taken every ``--interval`` seconds. The verdict (exit code 1 when it fails): no data
lost, no unexpected answer, and after the warm-up memory, descriptors and backend connections stay
flat (the second half of the samples no higher than the first half, plus a small slack).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson

from gateway.sim import new_event_loop
from gateway.sim.responses import completion_text
from tests.rawhttp import Result, fetch, request_bytes
from tests.reliability import Meter, chat, check_stream, sse_error
from tests.servers import Gateway, SimProc

#: (kind, weight) of the traffic mix.
MIX = (("stream", 50), ("whole", 20), ("client_abort", 10), ("backend_reset", 8), ("backend_503", 6), ("bad_json", 6))
TOKENS = 24
#: Where a client-aborted stream is cut: once the 5th token's text has arrived.
ABORT_AT = b'" jumps"'
SIM_ARGS = ("--itl-ms", "4", "--itl-jitter-ms", "1", "--ttft-ms", "5", "--batch-slowdown", "0")
MIB = 1024 * 1024


@dataclass
class Sample:
    t: float
    rss: int
    fds: int
    backend_connections: int
    requests: int


@dataclass
class Report:
    seconds: float
    concurrency: int
    requests: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    #: Whole streams and answers that did not arrive intact.
    data_lost: int = 0
    #: Any other answer that was not the expected one (first few kept in ``examples``).
    unexpected: int = 0
    examples: list[str] = field(default_factory=list)
    backend_aborts: int = 0
    samples: list[Sample] = field(default_factory=list)
    warmup: float = 0.0
    final_backend_connections: int = 0
    final_in_flight: float = 0.0
    problems: list[str] = field(default_factory=list)

    def series(self, name: str) -> tuple[list[int], list[int]]:
        """The post-warm-up values of one figure, split into a first and a second half."""
        values = [getattr(s, name) for s in self.samples if s.t >= self.warmup]
        half = len(values) // 2
        return values[:half], values[half:]


def _outcome(kind: str, r: Result) -> str | None:
    """None when ``r`` is what this kind of request must get, else what went wrong."""
    if kind == "stream":
        return f"{r.status} {r.error}" if r.status != 200 or r.error is not None else check_stream(r.body, TOKENS)
    if kind == "whole":
        if r.status != 200 or r.error is not None:
            return f"{r.status} {r.error}"
        content = orjson.loads(r.body)["choices"][0]["message"]["content"]
        return None if content == completion_text(TOKENS) else "content differs"
    if kind == "client_abort":
        return None if r.status == 200 and r.error == "aborted" else f"{r.status} {r.error}"
    if kind == "backend_reset":
        err = sse_error(r.body)
        ok = r.status == 200 and r.error is None and err is not None and err.get("code") == "backend_unavailable"
        return None if ok else f"{r.status} {r.error} {r.body[-120:]!r}"
    if kind == "backend_503":
        return None if r.status == 503 and b'"error"' in r.body else f"{r.status} {r.error}"
    if kind == "bad_json":
        return None if r.status == 400 and b'"invalid_request_error"' in r.body else f"{r.status} {r.error}"
    raise ValueError(kind)


_REQUESTS = {
    "stream": request_bytes("POST", "/v1/chat/completions", chat(True, TOKENS)),
    "whole": request_bytes("POST", "/v1/chat/completions", chat(False, TOKENS)),
    # Paced slower (100 ms a token), so the cut lands seconds before the end: the backend must see it.
    "client_abort": request_bytes("POST", "/v1/chat/completions", chat(True, TOKENS), {"x-sim-itl-ms": "100"}),
    "backend_reset": request_bytes(
        "POST", "/v1/chat/completions", chat(True, TOKENS), {"x-sim-fault": "reset-after=3"}
    ),
    "backend_503": request_bytes("POST", "/v1/chat/completions", chat(False, TOKENS), {"x-sim-fault": "status=503"}),
    "bad_json": request_bytes("POST", "/v1/chat/completions", b'{"model": "m", "messages": [}'),
}


async def _client(port: int, seed: int, deadline: float, report: Report) -> None:
    rng = random.Random(seed)  # noqa: S311 - a reproducible traffic mix, not security
    kinds = [k for k, _ in MIX]
    weights = [w for _, w in MIX]
    while time.monotonic() < deadline:
        kind = rng.choices(kinds, weights)[0]
        abort_after = ABORT_AT if kind == "client_abort" else None
        r = await fetch(port, _REQUESTS[kind], timeout=30, abort_after=abort_after)
        problem = _outcome(kind, r)
        report.requests += 1
        report.by_kind[kind] = report.by_kind.get(kind, 0) + 1
        if problem is not None:
            if kind in ("stream", "whole"):
                report.data_lost += 1
            else:
                report.unexpected += 1
            if len(report.examples) < 5:
                report.examples.append(f"{kind}: {problem}")


def _gateway_in_flight(g: Gateway) -> float:
    import urllib.request

    with urllib.request.urlopen(g.url + "/metrics", timeout=5) as resp:  # noqa: S310 - loopback
        for line in resp.read().decode().splitlines():
            if line.startswith("gateway_requests_in_flight{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _drive(g: Gateway, sim: SimProc, meter: Meter, report: Report, interval: float) -> None:
    start = time.monotonic()
    deadline = start + report.seconds
    clients = [asyncio.ensure_future(_client(g.port, seed, deadline, report)) for seed in range(report.concurrency)]
    loop = asyncio.get_running_loop()

    def sample() -> Sample:
        backend = int(sim.metrics()["sim_open_connections"]) - 1  # less this scrape's own connection
        return Sample(round(time.monotonic() - start, 1), meter.rss(), meter.fds(), backend, report.requests)

    while not all(c.done() for c in clients):
        await asyncio.wait(clients, timeout=interval)
        if time.monotonic() < deadline + 1:
            report.samples.append(await loop.run_in_executor(None, sample))
    for c in clients:
        c.result()  # a client that crashed is a failed soak
    await asyncio.sleep(1.0)  # let the last aborts reach the backend
    final = await loop.run_in_executor(None, sample)
    report.final_backend_connections = final.backend_connections
    report.final_in_flight = await loop.run_in_executor(None, _gateway_in_flight, g)


def judge(report: Report, *, rss_slack: int = 6 * MIB, fd_slack: int = 8, conn_slack: int = 4) -> list[str]:
    """What makes the soak fail; empty when it passed."""
    problems = []
    if report.data_lost:
        problems.append(f"{report.data_lost} whole answers lost or damaged: {report.examples}")
    if report.unexpected:
        problems.append(f"{report.unexpected} unexpected answers: {report.examples}")
    for name, slack in (("rss", rss_slack), ("fds", fd_slack), ("backend_connections", conn_slack)):
        first, second = report.series(name)
        if not first or not second:
            problems.append(f"too few samples after the warm-up to judge {name}")
        elif max(second) > max(first) + slack:
            problems.append(f"{name} grew: first half max {max(first)}, second half max {max(second)}")
    if report.final_backend_connections > report.concurrency + 2:
        problems.append(f"{report.final_backend_connections} backend connections open after the traffic stopped")
    if report.final_in_flight != 0:
        problems.append(f"gateway_requests_in_flight is {report.final_in_flight} after the traffic stopped")
    if report.by_kind.get("client_abort", 0) > report.backend_aborts:
        problems.append(f"{report.by_kind['client_abort']} client aborts but {report.backend_aborts} backend aborts")
    return problems


def soak(seconds: float, concurrency: int = 24, interval: float = 2.0, warmup: float | None = None) -> Report:
    """Run one soak and judge it (``report.problems``)."""
    report = Report(seconds=seconds, concurrency=concurrency, warmup=warmup if warmup is not None else seconds / 5)
    with SimProc(*SIM_ARGS) as sim, tempfile.TemporaryDirectory() as tmp:
        g = Gateway(Path(tmp), BACKEND_BASE_URL=sim.base_url, GATEWAY_ACCESS_LOG="false").start()
        try:
            assert g.proc is not None
            meter = Meter(g.proc.pid)
            aborted0 = sim.metrics()["sim_aborted_requests_total"]
            with asyncio.Runner(loop_factory=new_event_loop) as runner:
                runner.run(_drive(g, sim, meter, report, interval))
            report.backend_aborts = int(sim.metrics()["sim_aborted_requests_total"] - aborted0)
        finally:
            code = g.stop()
        if code != 0:
            report.problems.append(f"gateway serve exited {code}")
    report.problems += judge(report)
    return report


def render(report: Report) -> str:
    lines = [
        f"soak: {report.seconds:g} s, {report.concurrency} clients, {report.requests} requests "
        f"({', '.join(f'{k} {v}' for k, v in sorted(report.by_kind.items()))}); data lost {report.data_lost}, "
        f"unexpected {report.unexpected}; backend saw {report.backend_aborts} aborts",
        "   t(s)  requests  worker RSS (MiB)  worker fds  backend connections",
    ]
    for s in report.samples:
        mark = " " if s.t >= report.warmup else "w"
        lines.append(
            f"{mark}{s.t:6.1f}  {s.requests:8d}  {s.rss / MIB:16.1f}  {s.fds:10d}  {s.backend_connections:19d}"
        )
    for name in ("rss", "fds", "backend_connections"):
        first, second = report.series(name)
        if first and second:
            scale = MIB if name == "rss" else 1
            lines.append(
                f"{name}: max {max(first) / scale:.1f} in the first half after warm-up, "
                f"{max(second) / scale:.1f} in the second"
            )
    lines.append(
        f"after the traffic: {report.final_backend_connections} backend connections, "
        f"{report.final_in_flight:g} in flight"
    )
    lines.append("PASS" if not report.problems else "FAIL: " + "; ".join(report.problems))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="how long to run (default 10)")
    length.add_argument("--seconds", type=float, help="how long to run, in seconds")
    p.add_argument("--concurrency", type=int, default=24, help="clients sending at once (default 24)")
    p.add_argument("--interval", type=float, help="seconds between samples (default: 2, or 10 past 5 minutes)")
    p.add_argument("--json", action="store_true", help="also print the report as one JSON line")
    args = p.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes if args.minutes is not None else 10)
    interval = args.interval or (10.0 if seconds > 300 else 2.0)
    report = soak(seconds, args.concurrency, interval)
    print(render(report), flush=True)
    if args.json:
        print(orjson.dumps(asdict(report)).decode(), flush=True)
    return 0 if not report.problems else 1


if __name__ == "__main__":
    sys.exit(main())
