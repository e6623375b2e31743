"""Backends and their replicas: balancing, health, ejection, admission.

A ``Backend`` is one served set of models on one kind of engine, with one or more replicas (URLs),
each with its own pool. Picking a replica is power of two choices on in-flight requests divided by
weight (ties at random), or, for a backend whose policy is ``prefix``, the replica expected to hold
the request's prompt prefix in its cache while its load allows (``gateway.affinity``); a backend
with one replica skips all of it. Replicas leave the rotation when their active probe says they are
loading or down, or passively after consecutive connect failures or 5xx answers (ejected for a
cool-off, then given a single trial request). When every replica is out, traffic goes to them
anyway (fail-open) and /ready says so.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Mapping
from hashlib import blake2b
from typing import Any

import httpcore

from gateway import errors, probe
from gateway.affinity import Affinity, Reason, load, rendezvous
from gateway.config import Balance
from gateway.handover import HandOver
from gateway.pool import Pool
from gateway.probe import ReplicaState
from gateway.profiles import Profile, Support
from gateway.target import Target


class Replica:
    __slots__ = (
        "target",
        "pool",
        "ssl_context",
        "weight",
        "inflight",
        "failures",
        "ejected_until",
        "trial",
        "state",
        "latency_ms",
        "detail",
        "hash_key",
        "engine_running",
        "engine_waiting",
        "engine_kv",
        "engine_until",
        "ejections",
        "cool_offs",
    )

    def __init__(self, target: Target, pool: Pool, ssl_context: ssl.SSLContext | None, weight: int) -> None:
        self.target = target
        self.pool = pool
        self.ssl_context = ssl_context
        self.weight = weight
        self.inflight = 0
        #: Consecutive connect failures or 5xx answers.
        self.failures = 0
        #: monotonic() until which the replica is out (passive ejection, or a 429's Retry-After).
        self.ejected_until = 0.0
        #: A trial request is in flight after a cool-off: no other traffic until it answers.
        self.trial = False
        #: From the active probe.
        self.state: ReplicaState = "ready"
        self.latency_ms: float | None = None
        self.detail: str | None = None
        #: Rendezvous hashing's key for this replica (same in every process).
        self.hash_key = blake2b(target.base_url.encode(), digest_size=32).digest()
        #: The engine's own load from its /metrics (``gateway.engine_load``), and the monotonic()
        #: time until which that reading counts; after it, unknown (never taken as saturated).
        self.engine_running = 0.0
        self.engine_waiting = 0.0
        self.engine_kv: float | None = None
        self.engine_until = 0.0
        #: Times taken out of the rotation: after failures, and by a 429's Retry-After (read by
        #: the metrics' sampler, ``gateway.state_metrics``, once a second).
        self.ejections = 0
        self.cool_offs = 0

    def state_now(self, now: float) -> str:
        """As /ready says it: ``ready``, ``ejected`` (cooling off), ``loading`` or ``unreachable``."""
        return self.state if self.ejected_until <= now else "ejected"

    def usable(self, now: float) -> bool:
        """In the rotation: ready, not cooling off, and no trial request of it pending."""
        return self.state == "ready" and self.ejected_until <= now and not self.trial

    def due_trial(self, now: float) -> bool:
        """Its cool-off is over and it has not answered since: one trial request decides."""
        return self.state == "ready" and 0.0 < self.ejected_until <= now and not self.trial

    def undecided(self) -> None:
        """A trial request ended with no verdict (its client left, say): the next one is the trial."""
        self.trial = False

    def report(self, now: float) -> dict[str, Any]:
        out: dict[str, Any] = {
            "url": self.target.base_url,
            "state": self.state_now(now),
            "in_flight": self.inflight,
            "latency_ms": self.latency_ms,
        }
        if self.detail:
            out["detail"] = self.detail
        if self.engine_until >= now:
            out["engine"] = {"running": self.engine_running, "waiting": self.engine_waiting, "kv_usage": self.engine_kv}
        return out


class Backend:
    """One backend: its profile, capabilities, models, replicas and admission limit."""

    def __init__(
        self,
        name: str,
        profile: Profile,
        capabilities: Mapping[str, Support],
        replicas: list[Replica],
        *,
        models: tuple[str, ...] = (),
        aliases: Mapping[str, str] | None = None,
        eject_after: int = 3,
        eject_seconds: float = 10.0,
        max_inflight: int = 0,
        queue_size: int = 0,
        queue_timeout: float = 30.0,
        policy: Balance = "p2c",
    ) -> None:
        self.name = name
        self.profile = profile
        self.capabilities = capabilities
        self.replicas = replicas
        self.single = replicas[0] if len(replicas) == 1 else None
        self.models = models
        self.aliases = dict(aliases or {})
        self.eject_after = eject_after
        self.eject_seconds = eject_seconds
        self.max_inflight = max_inflight
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.inflight = 0
        #: Requests waiting for a slot under ``max_inflight``.
        self._queue: HandOver[None] = HandOver()
        self.policy: Balance = policy
        #: The prefix memory, only where it can matter: policy ``prefix`` and several replicas.
        #: None: requests carry no block hashes (no work added on the request path).
        self.affinity = Affinity() if policy == "prefix" and self.single is None else None
        #: Why the last ``pick`` chose as it did (read at once by its caller: picks are synchronous).
        self.reason: Reason = "single" if self.single is not None else "p2c"
        #: Requests refused by admission, by reason (read by the metrics' sampler).
        self.rejected = {"queue_full": 0, "queue_timeout": 0, "draining": 0}

    # -- picking a replica ----------------------------------------------------------------------

    def pick(
        self, tried: list[Replica] | None = None, sticky: bytes | None = None, blocks: list[int] | None = None
    ) -> Replica:
        """Power of two choices among usable replicas not tried yet; fail-open when none is.

        With a ``sticky`` value (a session header or the client key), the usable replica with the
        highest rendezvous hash of it: the same client keeps reaching the same replica (its prefix
        cache) while that one is usable, and only its share moves when replicas come and go.
        With the prompt's ``blocks`` (policy ``prefix``), the replica ``Affinity`` prefers while its
        load allows. ``reason`` says which rule decided.
        """
        single = self.single
        if single is not None:
            return single
        now = time.monotonic()
        untried = [r for r in self.replicas if not tried or r not in tried]
        for r in untried:
            if r.due_trial(now):  # half-open: the first request after a cool-off is its trial
                r.trial = True
                self.reason = "trial"
                if blocks and self.affinity is not None:
                    self.affinity.remember(blocks, r)  # its cache now holds this prompt too
                return r
        pool = [r for r in untried if r.usable(now)]
        if sticky is not None and pool:
            self.reason = "sticky"
            return rendezvous(pool, sticky)
        if blocks and pool:
            chosen = self._by_prefix(pool, blocks, now)
            if self.affinity is not None:
                self.affinity.remember(blocks, chosen)
            return chosen
        self.reason = "p2c" if pool else "fail_open"
        if not pool:
            pool = untried or self.replicas  # fail-open: try anyway rather than refuse all
        return _two_choices(pool)

    def _by_prefix(self, pool: list[Replica], blocks: list[int], now: float) -> Replica:
        affinity = self.affinity
        if affinity is None or len(pool) == 1:
            self.reason = "p2c"
            return pool[0] if len(pool) == 1 else _two_choices(pool)
        chosen, self.reason = affinity.choose(pool, blocks, now)
        return chosen if chosen is not None else _two_choices(pool, now)

    def succeeded(self, r: Replica) -> None:
        if r.failures or r.trial or r.ejected_until:
            r.failures = 0
            r.trial = False
            r.ejected_until = 0.0

    def failed(self, r: Replica) -> None:
        """A connect failure or a 5xx: after ``eject_after`` in a row, out for ``eject_seconds``."""
        r.failures += 1
        if r.trial or r.failures >= self.eject_after:
            now = time.monotonic()
            if r.ejected_until <= now:
                r.ejections += 1
            r.ejected_until = now + self.eject_seconds
        r.trial = False

    def cool_off(self, r: Replica, seconds: float) -> None:
        """A 429 with Retry-After: no traffic to this replica for that long."""
        r.cool_offs += 1
        r.ejected_until = max(r.ejected_until, time.monotonic() + min(seconds, 300.0))
        r.trial = False

    # -- health ---------------------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        now = time.monotonic()
        usable = sum(1 for r in self.replicas if r.usable(now))
        return {
            "name": self.name,
            "kind": self.profile.kind,
            "status": "ready" if usable else "fail-open",
            "usable_replicas": usable,
            "replicas": [r.report(now) for r in self.replicas],
        }

    async def probe_forever(
        self,
        network: httpcore.AsyncNetworkBackend,
        interval: float,
        timeout: float,  # noqa: ASYNC109 - per probe connection, not a cancel scope
    ) -> None:
        every = interval * self.profile.probe_factor
        while True:
            await self.probe_once(network, timeout)
            await asyncio.sleep(every)

    async def probe_once(
        self,
        network: httpcore.AsyncNetworkBackend,
        timeout: float,  # noqa: ASYNC109 - per probe connection, not a cancel scope
    ) -> None:
        results = await asyncio.gather(
            *(
                probe.probe(
                    r.target,
                    self.profile.health_path,
                    self.profile.kind,
                    ssl_context=r.ssl_context,
                    network=network,
                    timeout=timeout,
                )
                for r in self.replicas
            )
        )
        for r, (_, state) in zip(self.replicas, results, strict=True):
            r.state = state["status"]
            r.latency_ms = state["latency_ms"]
            r.detail = state.get("detail")

    # -- admission --------------------------------------------------------------------------------

    async def admit(self, draining: bool) -> None:
        """Wait for room under ``max_inflight`` (bounded queue), else 429 / 503 while draining."""
        if not self.max_inflight or self.inflight < self.max_inflight:
            self.inflight += 1
            return
        if draining:
            self.rejected["draining"] += 1
            raise errors.draining()
        if len(self._queue) >= self.queue_size:
            self.rejected["queue_full"] += 1
            raise errors.overloaded(self.name)
        try:
            await self._queue.wait(self.queue_timeout, self._pass_on)
        except TimeoutError:
            self.rejected["queue_timeout"] += 1
            raise errors.overloaded(self.name) from None
        # The slot was handed over by leave(): inflight already counts it.

    @property
    def queued(self) -> int:
        """Requests waiting for admission now."""
        return len(self._queue)

    def leave(self) -> None:
        """A request is done: its slot goes to the first queued one, else it is freed."""
        if not (self._queue.waiters and self._queue.hand(None)):
            self.inflight -= 1

    def _pass_on(self, _slot: None) -> None:
        self.leave()  # a slot handed over as its waiter gave up


def _two_choices(pool: list[Replica], now: float | None = None) -> Replica:
    """The less loaded of two random replicas (ties at random); with ``now``, load counts the
    engines' fresh waiting queues (policy ``prefix``), else in-flight requests only."""
    if len(pool) == 1:
        return pool[0]
    a, b = random.sample(pool, 2)  # noqa: S311 - load balancing, not security
    if now is None:
        la, lb = a.inflight / a.weight, b.inflight / b.weight
    else:
        la, lb = load(a, now), load(b, now)
    if la == lb:
        return a if random.random() < 0.5 else b  # noqa: S311
    return a if la < lb else b
