"""Floods of client connections (issue #21): idle connections and half-sent heads must not starve
real requests, and what each held connection costs the worker stays bounded.

Granian's backpressure counts open connections (idle keep-alive and half-sent heads included), not
requests in progress; past it a worker stops calling ``accept()`` and new clients wait in the
kernel's listen queue. With the default settings and one worker, 10,000 held connections must
leave room for real requests, answered about as fast as without the flood. Every held connection,
whatever it sent, is closed by the one HTTP/1 timer hyper has (GATEWAY_CLIENT_HEADER_TIMEOUT).

The figures in RELIABILITY.md come from ``pytest -s tests/test_flood.py`` (the ``RELIABILITY`` lines).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import select
import socket
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.rawhttp import Result, fetch, request_bytes
from tests.reliability import Meter, chat, sampling
from tests.servers import NO_DELAY, Gateway, SimProc, wait_until

pytestmark = pytest.mark.slow

#: Connections in each flood, and the real requests timed meanwhile (at once, 10 s timeout each).
FLOOD = 10_000
REAL = 20
#: What a connection that stalls in its head has sent: a request line and two fields, no blank line.
HALF_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n"


def ensure_nofile(need: int) -> None:
    """Raise this process's own open-file soft limit to ``need`` (skip if the hard limit is lower)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"the flood needs {need} open files in this process; the hard limit (ulimit -Hn) is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class Flood:
    """``n`` client connections to 127.0.0.1:``port`` that never finish a request: each has sent
    ``raw`` (nothing for an idle one) and then nothing more. Opened in batches with non-blocking
    connects (a full listen queue drops SYNs instead of blocking us); ``connected`` says how many
    completed the handshake, which the kernel does whether or not Granian accepts them."""

    def __init__(self, port: int, n: int, raw: bytes = b"", *, batch: int = 500, wait: float = 1.0) -> None:
        self.socks: list[socket.socket] = []
        self.connected = 0
        self._raw = raw
        self._poll = select.epoll()
        self._pending: dict[int, socket.socket] = {}
        try:
            for start in range(0, n, batch):
                for _ in range(min(batch, n - start)):
                    s = socket.socket()
                    self.socks.append(s)
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    self._pending[s.fileno()] = s
                    self._poll.register(s.fileno(), select.EPOLLOUT)
                # A batch that cannot complete within ``wait`` means the listen queue is full: the
                # rest are sent without waiting (bounded time: dropped SYNs are retried for minutes).
                if not self._settle(wait):
                    wait = 0.0
            self._settle(3.0)
        except BaseException:
            self.close()
            raise

    def _settle(self, within: float) -> bool:
        """Take the handshakes that complete within ``within`` s (sending ``raw`` on each); whether
        none is left pending."""
        deadline = time.monotonic() + within
        while self._pending and time.monotonic() < deadline:
            for fd, _ in self._poll.poll(0.05):
                s = self._pending.pop(fd)
                self._poll.unregister(fd)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    self.connected += 1
                    if self._raw:  # whole, even past what the socket's buffer takes at once
                        s.settimeout(5.0)
                        s.sendall(self._raw)
                        s.setblocking(False)
        return not self._pending

    def close(self) -> None:
        self._poll.close()
        for s in self.socks:
            s.close()
        self.socks.clear()

    def __enter__(self) -> Flood:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def real_requests(port: int, n: int = REAL, timeout: float = 10.0) -> list[Result]:
    """``n`` chat completions through the gateway at once, each on its own new connection."""
    raw = request_bytes("POST", "/v1/chat/completions", chat(False, 4))

    async def all_of_them() -> list[Result]:
        return list(await asyncio.gather(*(fetch(port, raw, timeout=timeout) for _ in range(n))))

    return asyncio.run(all_of_them())


@dataclass
class Timed:
    """How a batch of real requests went: answered 200, and latencies (s) of those answered."""

    ok: int
    latencies: list[float]

    @classmethod
    def of(cls, results: list[Result]) -> Timed:
        answered = [r for r in results if r.status == 200 and r.error is None]
        return cls(len(answered), sorted(r.t_end for r in results))

    def __str__(self) -> str:
        lat = self.latencies
        return f"{self.ok}/{len(lat)} OK, p50 {statistics.median(lat) * 1000:.0f} ms, p100 {lat[-1] * 1000:.0f} ms"


def held_connections(meter: Meter, fds0: int, n: int, within: float = 10.0) -> int:
    """How many of the flood's connections the worker holds (accepted: one descriptor each), once
    it has taken all ``n``, or has taken no more for half a second, or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    held, still_since = meter.fds() - fds0, time.monotonic()
    while held < n and time.monotonic() < deadline and time.monotonic() - still_since < 0.5:
        time.sleep(0.05)
        now = meter.fds() - fds0
        if now != held:
            held, still_since = now, time.monotonic()
    return held


@dataclass
class FloodResult:
    held: int
    connected: int
    rss_growth: int
    quiet: Timed
    flooded: Timed

    def line(self, what: str, n: int) -> str:
        return (
            f"RELIABILITY flood {what}: {n} opened, {self.connected} connected, {self.held} held by the worker; "
            f"real requests without {self.quiet}, during {self.flooded}; worker RSS "
            f"+{self.rss_growth / 2**20:.1f} MiB ({self.rss_growth / max(self.held, 1) / 1024:.1f} KiB per held "
            "connection)"
        )


def run_flood(gw: Gateway, n: int, raw: bytes) -> FloodResult:
    """Real requests timed without a flood, then ``n`` flood connections, real requests again while
    they are held, the worker's memory measured throughout."""
    assert gw.proc is not None
    meter = Meter(gw.proc.pid)
    real_requests(gw.port, 5)  # warm: the upstream connections exist before the baseline
    quiet = Timed.of(real_requests(gw.port))
    time.sleep(0.2)
    rss0, fds0 = meter.rss(), meter.fds()
    with sampling(meter), Flood(gw.port, n, raw) as flood:
        held = held_connections(meter, fds0, n)
        time.sleep(0.3)  # the half-sent heads read in
        meter.rss()
        flooded = Timed.of(real_requests(gw.port))
    return FloodResult(held, flood.connected, meter.peak_rss - rss0, quiet, flooded)


def closed_after(socks: list[socket.socket], within: float) -> list[float]:
    """Seconds until the server closed each of ``socks`` (those still open after ``within`` s are
    left out), each socket's end seen as an EOF or a reset."""
    t0 = time.monotonic()
    poll = select.epoll()
    try:
        for s in socks:
            poll.register(s.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
        open_fds, closed = {s.fileno(): s for s in socks}, []
        while open_fds and time.monotonic() - t0 < within:
            for fd, _ in poll.poll(0.05):
                with contextlib.suppress(OSError):
                    if open_fds[fd].recv(65536):
                        continue  # an answer (a keep-alive request's): the end comes later
                poll.unregister(fd)
                del open_fds[fd]
                closed.append(time.monotonic() - t0)
        return closed
    finally:
        poll.close()


@pytest.fixture(scope="module")
def sim_proc() -> Iterator[SimProc]:
    args = [a for k, v in NO_DELAY.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    with SimProc(*args, "--max-running", "1000") as s:
        yield s


@contextlib.contextmanager
def gateway(tmp: Path, sim: SimProc, **env: str) -> Iterator[Gateway]:
    """A gateway with the default settings (one worker), quiet logs, in front of the simulator."""
    with Gateway(tmp, BACKEND_BASE_URL=sim.base_url, GATEWAY_ACCESS_LOG="false", **env) as g:
        yield g


@pytest.mark.parametrize("what", ["idle", "half-head"])
def test_a_flood_of_connections_leaves_room_for_real_requests(sim_proc: SimProc, tmp_path: Path, what: str) -> None:
    """10,000 connections held on one worker with the default settings (beyond the old cap of
    4,096): every real request is answered, about as fast as without them, and the worker's memory
    grows by a bounded amount per held connection."""
    ensure_nofile(FLOOD + 1024)
    with gateway(tmp_path, sim_proc) as g:
        result = run_flood(g, FLOOD, HALF_HEAD if what == "half-head" else b"")
        after = Timed.of(real_requests(g.port))
    print("\n" + result.line(what, FLOOD))
    assert result.held >= FLOOD, result.line(what, FLOOD)
    assert (result.quiet.ok, result.flooded.ok, after.ok) == (REAL, REAL, REAL), result.line(what, FLOOD)
    # Generous: these take ~10-30 ms on loopback; starved, they waited out the client's 10 s.
    assert result.flooded.latencies[-1] < 1.0, result.line(what, FLOOD)
    assert result.rss_growth < 256 * 2**20, result.line(what, FLOOD)


def test_held_connections_are_closed_at_the_header_timeout(sim_proc: SimProc, tmp_path: Path) -> None:
    """Idle connections, half-sent heads and keep-alive connections idle after a request are all
    closed by the same timer (GATEWAY_CLIENT_HEADER_TIMEOUT, here 1 s; hyper cannot tell them
    apart), and the worker lets go of every descriptor they held."""
    n = 1000
    ensure_nofile(3 * n + 1024)
    with gateway(tmp_path, sim_proc, GATEWAY_CLIENT_HEADER_TIMEOUT="1") as g:
        assert g.proc is not None
        meter = Meter(g.proc.pid)
        real_requests(g.port, 5)
        time.sleep(0.2)
        fds0 = meter.fds()
        raw = request_bytes("POST", "/v1/chat/completions", chat(False, 2), close=False)
        with Flood(g.port, n) as idle, Flood(g.port, n, HALF_HEAD) as half, Flood(g.port, 20, raw) as kept:
            assert held_connections(meter, fds0, 2 * n + 20) >= 2 * n + 20
            closed = closed_after(idle.socks + half.socks + kept.socks, within=5.0)
            # At most 20 more descriptors: the backend connections the kept-alive requests added.
            assert wait_until(lambda: meter.fds() <= fds0 + 20, 2.0), meter.fds() - fds0
    print(
        f"\nRELIABILITY flood timeout: {n} idle, {n} half-head and 20 kept-alive connections, header timeout 1 s: "
        f"{len(closed)} closed by the gateway, the last after {max(closed, default=0):.2f} s"
    )
    assert len(closed) == 2 * n + 20
    assert max(closed) < 3.0


def test_a_head_held_unfinished_is_bounded(sim_proc: SimProc, tmp_path: Path) -> None:
    """What one connection can hold while its head never ends is bounded by
    GATEWAY_CLIENT_MAX_HEADER_BYTES (64 KiB): just under it, the worker holds the bytes (~80 KiB
    each, against ~130 KiB with hyper's default 408 KiB bound, and up to 408 KiB there); past it,
    431 and the connection closed."""
    n = 1000
    ensure_nofile(n + 1024)
    start = b"POST /v1/chat/completions HTTP/1.1\r\nhost: gateway\r\nx-pad: "
    with gateway(tmp_path, sim_proc) as g:
        assert g.proc is not None
        meter = Meter(g.proc.pid)
        real_requests(g.port, 5)
        time.sleep(0.2)
        rss0, fds0 = meter.rss(), meter.fds()
        with sampling(meter), Flood(g.port, n, start + b"a" * (63 * 1024)):
            assert held_connections(meter, fds0, n) >= n
            time.sleep(0.5)
            growth = meter.rss() - rss0
            flooded = Timed.of(real_requests(g.port))
        with Flood(g.port, 100, start + b"a" * (100 * 1024)) as over:
            closed = closed_after(over.socks, within=5.0)
    print(
        f"\nRELIABILITY flood big heads: {n} unfinished heads of 63 KiB held, worker RSS +{growth / 2**20:.1f} MiB "
        f"({growth / n / 1024:.1f} KiB each); real requests meanwhile {flooded}; 100 of 100 KiB: "
        f"{len(closed)} closed after at most {max(closed, default=0) * 1000:.0f} ms"
    )
    assert flooded.ok == REAL
    assert growth < n * 128 * 1024
    assert len(closed) == 100 and max(closed) < 2.0
