"""When tokens come out: admission to a fixed number of generation slots, and the pacing of each
sequence (time to first token, inter-token latency).

The model, as in a continuous-batching engine: at most ``max_running`` sequences generate at once and
the rest wait in FIFO order, so queueing shows up in TTFT. TTFT is a base plus a prefill cost per
prompt token. Every gap between tokens is a base plus jitter, stretched by the number of sequences
sharing the batch. Pure arithmetic lives in ``Timing``; the only awaits are the slot and the sleeps.
"""

from __future__ import annotations

import asyncio
import random
from collections import deque

import msgspec

from gateway.sim.stats import SimStats


class Timing(msgspec.Struct, frozen=True, kw_only=True):
    """The pacing of one request (the server's knobs, with any ``x-sim-*`` header override)."""

    ttft_ms: float
    itl_ms: float
    itl_jitter_ms: float
    prefill_us_per_token: float
    batch_slowdown: float

    @property
    def zero(self) -> bool:
        return self.ttft_ms == 0 and self.itl_ms == 0 and self.itl_jitter_ms == 0 and self.prefill_us_per_token == 0

    def first_token_s(self, prompt_tokens: int) -> float:
        """Seconds from admission to the first token: base plus prefill."""
        return (self.ttft_ms + self.prefill_us_per_token * prompt_tokens / 1000.0) / 1000.0

    def gap_s(self, running: int, rng: random.Random) -> float:
        """Seconds between two tokens while ``running`` sequences share the batch."""
        ms = self.itl_ms
        if self.itl_jitter_ms:
            ms = max(0.0, ms + rng.uniform(-self.itl_jitter_ms, self.itl_jitter_ms))
        return ms * (1.0 + self.batch_slowdown * max(0, running - 1)) / 1000.0


class Ticker:
    """Sleeps against a running deadline, so per-sleep overshoot does not add up over a stream."""

    __slots__ = ("_loop", "_due")

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._due = self._loop.time()

    def now(self) -> float:
        """The loop's clock, in seconds."""
        return self._loop.time()

    async def wait(self, seconds: float) -> None:
        if seconds <= 0:
            return
        now = self._loop.time()
        # A stream that fell behind (a slow reader, a stall) restarts its schedule from now
        # instead of bursting to catch up.
        self._due = max(self._due, now) + seconds
        await asyncio.sleep(self._due - now)


class Scheduler:
    """At most ``max_running`` sequences hold a slot; the others wait in FIFO order."""

    __slots__ = ("max_running", "_stats", "_waiters")

    def __init__(self, max_running: int, stats: SimStats) -> None:
        self.max_running = max_running
        self._stats = stats
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def running(self) -> int:
        return self._stats.running

    async def acquire(self) -> None:
        """Take a slot, queueing if none is free. Pair with ``release`` in a ``finally``."""
        stats = self._stats
        if stats.running < self.max_running and not self._waiters:
            stats.running += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        stats.waiting += 1
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                # The slot was handed over just as we were cancelled: pass it on.
                self.release()
            else:
                # ``release`` may already have dropped this cancelled waiter from the queue.
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                stats.waiting -= 1
            raise

    def release(self) -> None:
        stats = self._stats
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                # The slot goes straight to the next in line: ``running`` stays the same.
                stats.waiting -= 1
                waiter.set_result(None)
                return
        stats.running -= 1
