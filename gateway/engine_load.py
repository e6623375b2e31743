"""The engines' own load, read from each replica's Prometheus ``/metrics`` (policy ``prefix``).

Every ``GATEWAY_ENGINE_METRICS_INTERVAL`` seconds a worker GETs each replica's ``/metrics`` (at the
server root, like the health probe, on a fresh connection: ``probe.get``), reads only the lines
its kind's ``EngineMetrics`` names (every spelling listed), and stores on the ``Replica`` the
requests running and waiting and the KV-cache usage, fresh for ``STALE_AFTER`` intervals. After
that, or when a scrape fails, the reading is unknown and balancing falls back to the gateway's own
in-flight counts: a silent engine is never taken as a saturated one.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import httpcore

from gateway import probe
from gateway.profiles import EngineMetrics

if TYPE_CHECKING:
    from gateway.balance import Backend, Replica

#: A reading counts for this many intervals, then it is unknown.
STALE_AFTER = 3.0
#: A /metrics answer larger than this is not read (vLLM's is ~100 KiB with its histograms).
MAX_BYTES = 4 * 1024 * 1024


class EngineLoad:
    """One scrape's figures (None: the engine did not report it)."""

    __slots__ = ("running", "waiting", "kv_usage")

    def __init__(self, running: float | None, waiting: float | None, kv_usage: float | None) -> None:
        self.running = running
        self.waiting = waiting
        self.kv_usage = kv_usage

    def __repr__(self) -> str:
        return f"EngineLoad(running={self.running}, waiting={self.waiting}, kv_usage={self.kv_usage})"


def parse(text: bytes, names: EngineMetrics) -> EngineLoad:
    """The figures ``names`` asks for, from Prometheus exposition ``text``.

    Samples of one figure with several label sets (one per model or engine) add up for the
    running and waiting counts; the KV-cache usage is the highest of them. For each figure the
    first spelling in ``names`` that appears wins (an engine exposing both during a rename is
    not counted twice)."""
    wanted: dict[bytes, tuple[int, int]] = {}
    for field, spellings in enumerate((names.running, names.waiting, names.kv_usage)):
        for rank, name in enumerate(spellings):
            wanted[name.encode()] = (field, rank)
    found: list[dict[int, float]] = [{}, {}, {}]
    for line in text.splitlines():
        if not line or line[0] == 35:  # "#": HELP and TYPE lines
            continue
        end = line.find(b"{")
        if end < 0:
            end = line.find(b" ")
            if end < 0:
                continue  # a name with no value
        hit = wanted.get(line[:end])
        if hit is None:
            continue
        value = _value(line)
        if value is None:
            continue
        field, rank = hit
        seen = found[field]
        if field == 2:
            seen[rank] = max(seen.get(rank, 0.0), value)
        else:
            seen[rank] = seen.get(rank, 0.0) + value
    running, waiting, kv = (seen[min(seen)] if seen else None for seen in found)
    return EngineLoad(running, waiting, kv)


def _value(line: bytes) -> float | None:
    """A sample line's value: after the labels (which may hold spaces), before any timestamp."""
    close = line.rfind(b"}")
    rest = line[close + 1 :] if close >= 0 else line.split(b" ", 1)[1] if b" " in line else b""
    parts = rest.split()
    if not parts:
        return None
    try:
        value = float(parts[0])
    except ValueError:
        return None
    return value if value == value else None  # NaN: no reading


def store(replica: Replica, reading: EngineLoad, until: float) -> None:
    """Keep ``reading`` on ``replica`` until ``until`` (monotonic)."""
    replica.engine_running = reading.running or 0.0
    replica.engine_waiting = reading.waiting or 0.0
    replica.engine_kv = reading.kv_usage
    replica.engine_until = until


async def scrape(
    replica: Replica,
    names: EngineMetrics,
    network: httpcore.AsyncNetworkBackend,
    timeout: float,  # noqa: ASYNC109 - per connect/read, not a cancel scope
) -> EngineLoad | None:
    """One replica's reading; None when it cannot be had (the old one then goes stale)."""
    target = replica.target
    headers = [(b"host", target.host_header), (b"accept", b"text/plain"), *target.auth_headers]
    try:
        status, body = await probe.get(
            target, target.root_path + b"/metrics", headers, replica.ssl_context, network, timeout, MAX_BYTES
        )
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, OSError):
        return None
    if status != 200 or body is None:
        return None
    return parse(body, names)


async def poll_forever(
    backend: Backend,
    names: EngineMetrics,
    network: httpcore.AsyncNetworkBackend,
    interval: float,
    timeout: float,  # noqa: ASYNC109 - per connect/read, not a cancel scope
) -> None:
    """Read every replica's engine load every ``interval`` seconds, until cancelled."""
    while True:
        readings = await asyncio.gather(*(scrape(r, names, network, timeout) for r in backend.replicas))
        until = time.monotonic() + STALE_AFTER * interval
        for replica, reading in zip(backend.replicas, readings, strict=True):
            if reading is not None:
                store(replica, reading, until)
        await asyncio.sleep(interval)
