"""A cancel-safe FIFO of waiters, each handed one thing directly by whoever frees it.

Used by the pool (a connection, or None for a free slot to open one in) and by admission (a
slot under a backend's in-flight limit). The freeing side hands the thing to the first live
waiter, so a newcomer can never overtake the queue. The subtle part is a waiter that gives up
(a timeout, or its task cancelled) at the very moment something is handed to it: it owns what
it was handed, and passes it on with ``give_back`` rather than lose it.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class HandOver(Generic[T]):
    """Waiters in arrival order; ``hand`` gives one thing to the first that still waits."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        #: The waiters' futures, oldest first. Read-only outside this class: ``if queue.waiters``
        #: is the hot paths' check for anyone waiting (cheaper than a call to ``hand``).
        self.waiters: collections.deque[asyncio.Future[T]] = collections.deque()

    def __len__(self) -> int:
        """Waiters now queued."""
        return len(self.waiters)

    def __repr__(self) -> str:
        return f"<HandOver waiting={len(self.waiters)}>"

    async def wait(self, timeout: float | None, give_back: Callable[[T], None]) -> T:  # noqa: ASYNC109
        """Wait up to ``timeout`` seconds (None: for ever) for something handed over.

        Raises ``TimeoutError`` when none came in time, or whatever ``fail_all`` set. When this
        waiter's wait ends otherwise (timeout, cancellation) after something was handed to it,
        that thing goes to ``give_back`` before the exception propagates: never leaked.
        """
        fut: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except BaseException:
            if fut.done() and not fut.cancelled():
                if fut.exception() is None:
                    give_back(fut.result())  # handed over as we gave up: pass it on
            else:
                fut.cancel()
                try:  # still queued unless a hand-over popped it
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise

    def hand(self, thing: T) -> bool:
        """Give ``thing`` to the first waiter still waiting; False (kept by the caller) if none."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(thing)
                return True
        return False

    def fail_all(self, error: Callable[[], BaseException]) -> None:
        """End every wait with a fresh exception from ``error`` (a shutting-down pool)."""
        waiters = self.waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_exception(error())
