"""Prefix-cache affinity (``GATEWAY_BALANCE=prefix``): which replica is expected to hold a
request's prompt prefix in its KV cache, and when load overrides that.

Pure and synchronous, in-process, per worker:

- ``Affinity`` remembers, for each prompt block hash (``gateway.prefix``), the replicas recently
  sent that prefix: a bounded LRU (``capacity`` hashes, ``HOLDERS`` replicas each), so memory stays
  bounded whatever the traffic;
- a request goes to the usable replica holding its longest remembered prefix, while that replica's
  load is ``within`` reach of the least-loaded one's; a prefix never seen goes to its home, the
  replica with the highest rendezvous hash of its first block, but only while the home is about
  as idle as the least-loaded replica (``within_new``): every worker and every gateway replica
  computes the same home with no shared state, and that agreement is a tie-breaker, never a reason
  to queue (traffic with no shared prefix must fare as under power of two choices);
- beyond the bound, affinity is let go and the pick is by load (the caller's power of two
  choices); the replica chosen then holds the prefix too, so a prefix whose traffic exceeds one
  replica spreads over several.

Load is the replica's in-flight requests plus the engine's own waiting queue when a fresh reading
of it is known (``Replica.engine_waiting``), over its weight.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gateway.balance import Replica

#: Why a replica was picked (``gateway_balance_decisions_total``'s ``reason``, the access log's
#: ``balance``): the only replica; a half-open trial after a cool-off; GATEWAY_STICKY; power of two
#: choices; a remembered prefix; a new prefix's home; affinity let go for load; every replica out.
Reason = Literal["single", "trial", "sticky", "p2c", "prefix", "new_prefix", "load", "fail_open"]
REASONS: tuple[Reason, ...] = ("single", "trial", "sticky", "p2c", "prefix", "new_prefix", "load", "fail_open")

#: Replicas remembered per block hash (the most recent first).
HOLDERS = 4
#: Block hashes remembered per worker and backend: about 4 MiB (measured with tracemalloc: ~240
#: bytes a hash with its holders), the prefixes of the last 512 distinct 16 KiB prompts, or of
#: many more conversations where they share their first blocks.
CAPACITY = 16384


def rendezvous(replicas: Sequence[Replica], key: bytes) -> Replica:
    """The replica with the highest hash of (its URL, ``key``): the same for every process, and
    only the keys of a replica that comes or goes move. blake2b, not crc32: crc32 of keys that
    differ only in their last bytes is far from uniform (32 keys put 53% on one of 4 replicas)."""
    return max(replicas, key=lambda r: blake2b(key, digest_size=8, key=r.hash_key).digest())


def load(r: Replica, now: float) -> float:
    """In-flight requests plus the engine's waiting queue (when its reading is fresh), by weight."""
    n: float = r.inflight
    if r.engine_until >= now:
        n += r.engine_waiting
    return n / r.weight


def within(least: float) -> float:
    """The most load a replica holding the prefix may carry while the least-loaded carries
    ``least``: beyond it, recomputing the prefix elsewhere costs less than the wait."""
    return least + max(4.0, least * 0.5)


def within_new(least: float) -> float:
    """The most load a new prefix's home may carry: nothing is cached there yet, so only a near tie
    with the least-loaded replica makes it the better choice."""
    return least + max(1.0, least * 0.25)


class Affinity:
    """One backend's prefix memory: block hash -> the replicas recently sent that prefix."""

    __slots__ = ("capacity", "_holders")

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._holders: OrderedDict[int, list[Replica]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._holders)

    def holders(self, block: int) -> list[Replica]:
        return self._holders.get(block, [])

    def choose(self, pool: list[Replica], blocks: list[int], now: float) -> tuple[Replica | None, Reason]:
        """The replica for a request whose prompt has ``blocks`` among the usable ``pool``, and why;
        None (with ``load``) when affinity is let go: the caller picks by load."""
        loads = {r: load(r, now) for r in pool}
        least = min(loads.values())
        bound = within(least)
        released = False
        found = self._holders
        for block in reversed(blocks):  # the longest remembered prefix first
            held = found.get(block)
            if not held:
                continue
            ok = [r for r in held if r in loads and loads[r] <= bound]
            if ok:
                return min(ok, key=loads.__getitem__), "prefix"
            released = True  # its holders are out or too busy: a shorter prefix may still do
        if released:
            return None, "load"
        home = rendezvous(pool, blocks[0].to_bytes(8, "little"))
        if loads[home] <= within_new(least):
            return home, "new_prefix"
        return None, "load"

    def remember(self, blocks: list[int], replica: Replica) -> None:
        """``replica`` was sent this prefix: it now holds each of its blocks (most recent first)."""
        found = self._holders
        for block in blocks:
            held = found.get(block)
            if held is None:
                found[block] = [replica]
            else:
                found.move_to_end(block)
                if held[0] is not replica:
                    if replica in held:
                        held.remove(replica)
                    held.insert(0, replica)
                    del held[HOLDERS:]
        while len(found) > self.capacity:
            found.popitem(last=False)
