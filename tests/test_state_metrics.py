"""gateway/state_metrics.py: replica states, ejections, admission, pool waits and dropped spans,
sampled from the worker's state into the metrics with each flush."""

from __future__ import annotations

import asyncio

import pytest

from gateway import errors
from gateway.balance import Backend, Replica
from gateway.errors import GatewayError
from gateway.metrics import Metrics
from gateway.pool import Pool, PoolTimeout
from gateway.profiles import PROFILES
from gateway.target import Target
from tests.promtext import metric

VLLM = PROFILES["vllm"]


def replica(url: str) -> Replica:
    target = Target(url, VLLM, "")
    pool = Pool(target, size=1, connect_timeout=1, pool_timeout=0.01, keepalive=5)
    return Replica(target, pool, None, 1)


def backend(*replicas: Replica, max_inflight: int = 0, queue_size: int = 0) -> Backend:
    return Backend(
        "main",
        VLLM,
        VLLM.capabilities,
        list(replicas),
        eject_after=2,
        eject_seconds=60,
        max_inflight=max_inflight,
        queue_size=queue_size,
        queue_timeout=0.01,
    )


def scrape(m: Metrics) -> str:
    return m.exposition()[0].decode()


def test_replica_states_and_ejections_follow_the_balancer() -> None:
    a, b = replica("http://user:pw@10.0.0.1:8000/v1"), replica("http://[::1]:8001/v1")
    be = backend(a, b)
    m = Metrics("main")
    m.state.backends = [be]
    text = scrape(m)
    assert metric(text, "gateway_replica_state", replica="10.0.0.1:8000", state="ready") == 1
    assert metric(text, "gateway_replica_state", replica="[::1]:8001", state="ready") == 1
    assert 'replica="10.0.0.1:8000",state="ejected"} 0.0' in text  # every state is a series
    assert "pw" not in text
    be.failed(a)
    assert metric(scrape(m), "gateway_replica_ejections_total", replica="10.0.0.1:8000", reason="failures") == 0
    be.failed(a)  # the second in a row: out
    be.failed(a)  # already out: not a second ejection
    be.cool_off(b, 5)
    b.state = "loading"
    text = scrape(m)
    assert metric(text, "gateway_replica_state", replica="10.0.0.1:8000", state="ejected") == 1
    assert metric(text, "gateway_replica_state", replica="10.0.0.1:8000", state="ready") == 0
    assert metric(text, "gateway_replica_ejections_total", replica="10.0.0.1:8000", reason="failures") == 1
    assert metric(text, "gateway_replica_ejections_total", replica="[::1]:8001", reason="rate_limited") == 1
    be.succeeded(a)
    b.ejected_until = 0.0
    text = scrape(m)
    assert metric(text, "gateway_replica_state", replica="10.0.0.1:8000", state="ready") == 1
    assert metric(text, "gateway_replica_state", replica="[::1]:8001", state="loading") == 1
    assert metric(text, "gateway_replica_ejections_total", replica="10.0.0.1:8000", reason="failures") == 1


def test_admission_queue_and_rejections_by_reason() -> None:
    be = backend(replica("http://10.0.0.1:8000/v1"), max_inflight=1, queue_size=1)
    m = Metrics("main")
    m.state.backends = [be]
    seen: dict[str, float] = {}

    async def run() -> None:
        await be.admit(False)  # the one slot
        waiter = asyncio.ensure_future(be.admit(False))
        await asyncio.sleep(0)
        seen["queued"] = metric(scrape(m), "gateway_admission_queue_length", backend="main")
        with pytest.raises(GatewayError):
            await be.admit(False)  # the queue is full
        with pytest.raises(GatewayError) as refused:
            await be.admit(True)
        assert refused.value.code == errors.draining().code
        with pytest.raises(GatewayError):
            await waiter  # it timed out in the queue

    asyncio.run(run())
    text = scrape(m)
    assert seen["queued"] == 1
    assert metric(text, "gateway_admission_queue_length", backend="main") == 0
    for reason in ("queue_full", "queue_timeout", "draining"):
        assert metric(text, "gateway_admission_rejections_total", backend="main", reason=reason) == 1, reason


def test_pool_waits_and_timeouts_are_counted() -> None:
    r = replica("http://127.0.0.1:9/v1")
    be = backend(r)
    m = Metrics("main")
    m.state.backends = [be]
    pool = r.pool

    async def run() -> None:
        pool._open = 1  # its one connection is taken (opening): the next acquire waits
        with pytest.raises(PoolTimeout):
            await pool.acquire()

    asyncio.run(run())
    text = scrape(m)
    assert metric(text, "gateway_pool_waits_total", replica="127.0.0.1:9") == 1
    assert metric(text, "gateway_pool_wait_timeouts_total", replica="127.0.0.1:9") == 1
    assert metric(text, "gateway_pool_connections", replica="127.0.0.1:9", state="active") == 0


def test_dropped_spans_are_carried_into_the_counter() -> None:
    m = Metrics("main")
    drops = {"queue_full": 0, "export_failed": 0}
    m.state.drops = lambda: drops.items()
    assert metric(scrape(m), "gateway_trace_spans_dropped_total", reason="queue_full") == 0
    drops["queue_full"] = 3
    drops["export_failed"] = 2
    scrape(m)
    drops["queue_full"] = 5
    text = scrape(m)
    assert metric(text, "gateway_trace_spans_dropped_total", reason="queue_full") == 5
    assert metric(text, "gateway_trace_spans_dropped_total", reason="export_failed") == 2
