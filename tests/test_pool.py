"""``gateway.pool.Pool`` over the in-memory network: reuse, the size bound and its FIFO of
waiters, timeouts and shutdown (as httpcore exceptions, mapped to the same answers as before),
and no slot or connection lost when a waiter gives up as something is handed to it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import httpcore
import pytest

from gateway import errors
from gateway.connection import Connection
from gateway.pool import Pool, PoolClosed, PoolTimeout
from gateway.profiles import PROFILES
from gateway.target import Target
from tests.memnet import MemoryNetwork

ANSWER = [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"]
REQUEST = [(b"host", b"backend:8000")]
TARGET = Target("http://backend:8000/v1", PROFILES["vllm"], "")


def record_pass_on(pool: Pool) -> list[Connection | None]:
    """What waiters that gave up passed on (see ``Pool._pass_on``)."""
    passed: list[Connection | None] = []
    pass_on = pool._pass_on

    def recording(handed: Connection | None) -> None:
        passed.append(handed)
        pass_on(handed)

    pool._pass_on = recording  # type: ignore[method-assign]
    return passed


def make_pool(network: httpcore.AsyncNetworkBackend, size: int = 1, pool_timeout: float = 5.0, **kw: Any) -> Pool:
    return Pool(
        TARGET,
        size=size,
        connect_timeout=1.0,
        pool_timeout=pool_timeout,
        keepalive=kw.pop("keepalive", 60.0),
        network=network,
        **kw,
    )


async def exchange(conn: Connection, read_body: bool = True) -> None:
    """One request on ``conn``: the body read to the end (reusable), or not (closed)."""
    status, _ = await conn.exchange(b"GET", b"/v1/models", REQUEST, b"", 1.0)
    assert status == 200
    if read_body:
        assert conn.body_in_hand() == b"{}"
    await conn.close_response()


def test_a_response_read_to_the_end_is_reused() -> None:
    async def run() -> None:
        network = MemoryNetwork(ANSWER)
        pool = make_pool(network)
        for i in range(3):
            conn, reused = await pool.acquire()
            assert reused is (i > 0) and pool.active == 1
            await exchange(conn)
            assert conn.reusable
            pool.release(conn)
            assert (pool.open, pool.idle, pool.active) == (1, 1, 0)
        assert network.connects == 1
        await pool.aclose()

    asyncio.run(run())


def test_a_response_not_read_to_the_end_closes_its_connection() -> None:
    async def run() -> None:
        network = MemoryNetwork(ANSWER)
        pool = make_pool(network)
        conn, _ = await pool.acquire()
        await exchange(conn, read_body=False)
        assert not conn.reusable and conn.is_closed()
        pool.release(conn)
        assert (pool.open, pool.idle) == (0, 0)
        conn, reused = await pool.acquire()
        assert not reused and network.connects == 2
        pool.release(conn)  # never used: not idle, so discarded and closed
        await asyncio.sleep(0)
        assert (pool.open, pool.idle) == (0, 0) and conn.is_closed()

    asyncio.run(run())


def test_an_expired_idle_connection_is_replaced() -> None:
    async def run() -> None:
        network = MemoryNetwork(ANSWER)
        pool = make_pool(network, keepalive=0.0)
        conn, _ = await pool.acquire()
        await exchange(conn)
        pool.release(conn)
        await asyncio.sleep(0.001)
        again, reused = await pool.acquire()
        assert again is not conn and not reused and network.connects == 2 and pool.open == 1
        pool.release(again)

    asyncio.run(run())


def test_waiters_are_served_in_order_with_the_freed_connection() -> None:
    async def run() -> list[str]:
        pool = make_pool(MemoryNetwork(ANSWER))
        held, _ = await pool.acquire()
        order: list[str] = []

        async def waiter(name: str) -> None:
            conn, reused = await pool.acquire()
            assert conn is held and reused
            order.append(name)
            await exchange(conn)
            pool.release(conn)

        tasks = [asyncio.create_task(waiter(name)) for name in "abc"]
        await asyncio.sleep(0)
        assert pool.waiting == 3 and "Waiting: 3" in repr(pool)
        await exchange(held)
        pool.release(held)
        await asyncio.gather(*tasks)
        assert (pool.open, pool.idle, pool.waiting) == (1, 1, 0)
        return order

    assert asyncio.run(run()) == ["a", "b", "c"]


def test_a_pool_timeout_is_httpcores_and_maps_to_the_same_answer() -> None:
    async def run() -> PoolTimeout:
        pool = make_pool(MemoryNetwork(ANSWER), pool_timeout=0.01)
        held, _ = await pool.acquire()
        with pytest.raises(PoolTimeout) as info:
            await pool.acquire()
        assert pool.waiting == 0
        pool.release(held)
        return info.value

    exc = asyncio.run(run())
    assert isinstance(exc, httpcore.PoolTimeout) and exc.wait == 0.01
    err, expected = errors.map_error(exc, "connect"), errors.pool_exhausted(0.01)
    assert (err.status, err.code, err.message, err.headers) == (
        503,
        "pool_exhausted",
        expected.message,
        expected.headers,
    )
    assert err.message == "No backend connection became free within 0.01 s."


def test_a_closed_pool_fails_waiters_and_new_requests_with_the_same_answer() -> None:
    async def run() -> list[BaseException]:
        pool = make_pool(MemoryNetwork(ANSWER))
        held, _ = await pool.acquire()
        waiter = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        await pool.aclose()
        raised: list[BaseException] = []
        for attempt in (waiter, pool.acquire()):
            try:
                await attempt
            except PoolClosed as exc:
                raised.append(exc)
        pool.release(held)  # a busy connection coming back to a closed pool is closed
        await asyncio.sleep(0)
        assert held.is_closed() and pool.open == 0
        return raised

    raised = asyncio.run(run())
    assert len(raised) == 2
    for exc in raised:
        assert isinstance(exc, httpcore.NetworkError)
        err = errors.map_error(exc, "connect")
        assert (err.status, err.code) == (502, "backend_unavailable")
        assert err.message == "The backend is unavailable: the gateway is shutting down"


class FailingNetwork(MemoryNetwork):
    """Refuses the first ``fail`` connects."""

    def __init__(self, pieces: list[bytes], fail: int) -> None:
        super().__init__(pieces)
        self.fail = fail

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        if self.fail:
            self.fail -= 1
            await asyncio.sleep(0)
            raise httpcore.ConnectError("refused")
        return await super().connect_tcp(host, port, timeout, local_address, socket_options)


def test_a_failed_connect_frees_its_slot_for_the_next_waiter() -> None:
    async def run() -> None:
        pool = make_pool(FailingNetwork(ANSWER, fail=1))
        first = asyncio.create_task(pool.acquire())
        second = asyncio.create_task(pool.acquire())
        with pytest.raises(httpcore.ConnectError):
            await first
        conn, reused = await second
        assert not reused and (pool.open, pool.active) == (1, 1)
        pool.release(conn)

    asyncio.run(run())


def test_a_waiter_cancelled_as_a_connection_is_handed_to_it_passes_it_on() -> None:
    async def run() -> None:
        network = MemoryNetwork(ANSWER)
        pool = make_pool(network)
        held, _ = await pool.acquire()
        await exchange(held)
        passed = record_pass_on(pool)
        first = asyncio.create_task(pool.acquire())
        second = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        pool.release(held)  # handed to the first waiter...
        first.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await first
        conn, reused = await second
        assert passed == [held]
        assert conn is held and reused and network.connects == 1
        assert (pool.open, pool.active, pool.waiting) == (1, 1, 0)
        pool.release(conn)

    asyncio.run(run())


def test_a_waiter_timing_out_as_a_slot_is_handed_to_it_passes_it_on() -> None:
    async def run() -> None:
        network = MemoryNetwork(ANSWER)
        pool = make_pool(network, pool_timeout=0)
        held, _ = await pool.acquire()
        passed = record_pass_on(pool)
        first = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        pool.release(held)  # never used: discarded, its slot handed to the waiter as it times out
        with pytest.raises(PoolTimeout):
            await first
        assert passed == [None]
        assert (pool.open, pool.active, pool.waiting) == (0, 0, 0)  # the slot was given back
        conn, reused = await pool.acquire()
        assert not reused and pool.open == 1
        pool.release(conn)

    asyncio.run(run())


def test_cancelling_waiters_in_every_phase_leaks_no_slot() -> None:
    async def run() -> None:
        network = MemoryNetwork(ANSWER)
        pool = make_pool(network, size=2)
        for _ in range(20):
            held = [await pool.acquire() for _ in range(2)]
            waiters = [asyncio.create_task(pool.acquire()) for _ in range(4)]
            await asyncio.sleep(0)
            for conn, _ in held:
                await exchange(conn, read_body=conn is not held[0][0])
                pool.release(conn)
            for task in waiters[::2]:
                task.cancel()
            done = await asyncio.gather(*waiters, return_exceptions=True)
            got = [r for r in done if isinstance(r, tuple)]
            for conn, _ in got:
                pool.release(conn)
            assert pool.active == 0 and pool.waiting == 0 and pool.open <= 2
        conns = [await pool.acquire() for _ in range(2)]  # both slots still usable
        assert pool.active == 2
        for conn, _ in conns:
            pool.release(conn)

    asyncio.run(run())
