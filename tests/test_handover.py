"""``gateway.handover.HandOver``: FIFO hand-over, timeouts, cancellation, and the races where a
waiter gives up at the moment something is handed to it (it must pass the thing on)."""

from __future__ import annotations

import asyncio

import pytest

from gateway.balance import Backend, Replica
from gateway.errors import GatewayError
from gateway.handover import HandOver
from gateway.pool import Pool
from gateway.profiles import PROFILES
from gateway.target import Target
from tests.memnet import MemoryNetwork


def _never(thing: object) -> None:
    raise AssertionError(f"nothing was handed over, yet {thing!r} was given back")


def test_things_go_to_waiters_in_arrival_order() -> None:
    async def run() -> list[tuple[str, int]]:
        queue: HandOver[int] = HandOver()
        got: list[tuple[str, int]] = []

        async def waiter(name: str) -> None:
            got.append((name, await queue.wait(None, _never)))

        tasks = [asyncio.create_task(waiter(name)) for name in "abc"]
        await asyncio.sleep(0)
        assert len(queue) == 3
        for thing in (1, 2, 3):
            assert queue.hand(thing)
        await asyncio.gather(*tasks)
        assert len(queue) == 0 and not queue.hand(4)  # nobody waits: the caller keeps it
        return got

    assert asyncio.run(run()) == [("a", 1), ("b", 2), ("c", 3)]


def test_a_timeout_leaves_the_queue_and_raises_timeout_error() -> None:
    async def run() -> None:
        queue: HandOver[int] = HandOver()
        with pytest.raises(TimeoutError):
            await queue.wait(0.01, _never)
        assert len(queue) == 0
        assert not queue.hand(1)

    asyncio.run(run())


def test_a_cancelled_waiter_leaves_the_queue_and_is_skipped() -> None:
    async def run() -> list[int]:
        queue: HandOver[int] = HandOver()
        got: list[int] = []

        async def waiter() -> None:
            got.append(await queue.wait(None, _never))

        first, second = asyncio.create_task(waiter()), asyncio.create_task(waiter())
        await asyncio.sleep(0)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert len(queue) == 1
        assert queue.hand(7)  # to the second: the cancelled one is out of the queue
        await second
        return got

    assert asyncio.run(run()) == [7]


def test_cancelled_as_something_is_handed_over_passes_it_on() -> None:
    async def run() -> None:
        queue: HandOver[str] = HandOver()
        given_back: list[str] = []
        task = asyncio.create_task(queue.wait(None, given_back.append))
        await asyncio.sleep(0)
        # In the same tick: the thing is handed over, then the waiter's task is cancelled before
        # it runs again. The waiter owns the thing and must not drop it.
        assert queue.hand("conn")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert given_back == ["conn"] and len(queue) == 0

    asyncio.run(run())


def test_timing_out_as_something_is_handed_over_passes_it_on() -> None:
    async def run() -> None:
        queue: HandOver[str] = HandOver()
        given_back: list[str] = []
        # A timeout of 0 expires on the loop's next turn; the hand-over below lands before the
        # waiter resumes, so both happen "at once".
        task = asyncio.create_task(queue.wait(0, given_back.append))
        await asyncio.sleep(0)
        assert queue.hand("slot")
        with pytest.raises(TimeoutError):
            await task
        assert given_back == ["slot"] and len(queue) == 0

    asyncio.run(run())


def test_a_waiter_passing_on_hands_to_the_next_waiter() -> None:
    async def run() -> list[str]:
        queue: HandOver[str] = HandOver()
        got: list[str] = []

        def pass_on(thing: str) -> None:
            if not queue.hand(thing):
                raise AssertionError("the second waiter should have taken it")

        first = asyncio.create_task(queue.wait(None, pass_on))
        second = asyncio.create_task(queue.wait(None, _never))
        await asyncio.sleep(0)
        assert queue.hand("conn")
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        got.append(await second)
        return got

    assert asyncio.run(run()) == ["conn"]


def test_fail_all_ends_every_wait_with_its_own_exception() -> None:
    async def run() -> list[BaseException]:
        queue: HandOver[int] = HandOver()
        tasks = [asyncio.create_task(queue.wait(None, _never)) for _ in range(3)]
        await asyncio.sleep(0)
        queue.fail_all(lambda: ConnectionAbortedError("closed"))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert len(queue) == 0
        return [r for r in results if isinstance(r, BaseException)]

    errors = asyncio.run(run())
    assert [type(e) for e in errors] == [ConnectionAbortedError] * 3
    assert len({id(e) for e in errors}) == 3  # a fresh one each: no traceback shared across tasks


# -- the same queue under admission (``Backend.admit`` / ``leave``) ---------------------------


def _backend(max_inflight: int, queue_size: int, queue_timeout: float = 5.0) -> Backend:
    target = Target("http://backend:8000/v1", PROFILES["vllm"], "")
    pool = Pool(target, size=1, connect_timeout=1.0, pool_timeout=1.0, keepalive=5.0, network=MemoryNetwork([]))
    replica = Replica(target, pool, None, 1)
    return Backend(
        "vllm",
        PROFILES["vllm"],
        {},
        [replica],
        max_inflight=max_inflight,
        queue_size=queue_size,
        queue_timeout=queue_timeout,
    )


def test_admission_hands_a_slot_on_when_its_waiter_is_cancelled() -> None:
    async def run() -> None:
        backend = _backend(max_inflight=1, queue_size=2)
        await backend.admit(draining=False)
        first = asyncio.create_task(backend.admit(draining=False))
        second = asyncio.create_task(backend.admit(draining=False))
        await asyncio.sleep(0)
        with pytest.raises(GatewayError) as full:
            await backend.admit(draining=False)  # the queue is full
        assert full.value.code == "overloaded"
        backend.leave()  # the slot goes to the first waiter...
        first.cancel()  # ...which gives up before it runs: the second gets it
        with pytest.raises(asyncio.CancelledError):
            await first
        await second
        assert backend.inflight == 1
        backend.leave()
        assert backend.inflight == 0

    asyncio.run(run())


def test_admission_timing_out_is_overloaded_and_leaks_nothing() -> None:
    async def run() -> None:
        backend = _backend(max_inflight=1, queue_size=1, queue_timeout=0.01)
        await backend.admit(draining=False)
        with pytest.raises(GatewayError) as info:
            await backend.admit(draining=False)
        assert (info.value.status, info.value.code) == (429, "overloaded")
        backend.leave()
        assert backend.inflight == 0
        await backend.admit(draining=False)
        assert backend.inflight == 1

    asyncio.run(run())
