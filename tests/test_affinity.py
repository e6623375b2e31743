"""gateway/affinity.py through Backend.pick: prefix affinity, a new prefix's home, release under
load, engine load and its staleness, ejection and loading, retries, stickiness, bounded memory.

Replicas are built without a pool: picking never touches it."""

from __future__ import annotations

import collections
import random
import time
from collections.abc import Iterator
from typing import cast

import pytest

from gateway import engine_load
from gateway.affinity import HOLDERS, Affinity, rendezvous
from gateway.balance import Backend, Replica
from gateway.pool import Pool
from gateway.prefix import block_hashes
from gateway.profiles import PROFILES
from gateway.target import Target

VLLM = PROFILES["vllm"]


def replica(n: int) -> Replica:
    return Replica(Target(f"http://10.0.1.{n}:8000/v1", VLLM, ""), cast(Pool, None), None, 1)


def prefix_backend(n: int = 4) -> Backend:
    return Backend("main", VLLM, VLLM.capabilities, [replica(i) for i in range(1, n + 1)], policy="prefix")


def blocks(text: str) -> list[int]:
    return block_hashes(text.encode(), "m")


def why(b: Backend) -> str:
    """The last pick's reason (a call, so that type checkers do not narrow it between picks)."""
    return b.reason


SHARED = "s" * 2048  # 8 blocks


@pytest.fixture(autouse=True)
def _seeded() -> Iterator[None]:
    state = random.getstate()
    random.seed(17)
    yield
    random.setstate(state)


def test_only_prefix_backends_with_several_replicas_keep_a_memory() -> None:
    assert prefix_backend().affinity is not None
    assert prefix_backend(1).affinity is None
    assert Backend("b", VLLM, VLLM.capabilities, [replica(1), replica(2)]).affinity is None  # p2c


def test_a_new_prefix_goes_home_and_returns_there() -> None:
    b = prefix_backend()
    first = b.pick(blocks=blocks(SHARED + "user one"))
    assert why(b) == "new_prefix"
    assert first is rendezvous(b.replicas, blocks(SHARED)[0].to_bytes(8, "little"))
    for i in range(20):
        assert b.pick(blocks=blocks(SHARED + f"user {i} asks something else")) is first
        assert why(b) == "prefix"


def test_the_longest_remembered_prefix_wins() -> None:
    b = prefix_backend()
    a, c = b.replicas[0], b.replicas[2]
    short, long = blocks(SHARED), blocks(SHARED + "t" * 1024)
    assert b.affinity is not None
    b.affinity.remember(short, a)
    b.affinity.remember(long, c)  # c also holds the short prefix now, a only the short one
    assert b.pick(blocks=blocks(SHARED + "t" * 1024 + "more")) is c
    assert why(b) == "prefix"


def test_new_prefixes_spread_over_their_homes() -> None:
    b = prefix_backend()
    homes = collections.Counter(b.pick(blocks=blocks(f"prompt {i} " * 40)).target.base_url for i in range(400))
    assert len(homes) == 4 and min(homes.values()) > 70
    assert len(b.affinity or ()) > 0


def test_two_workers_agree_on_a_new_prefix_home() -> None:
    """No shared state: another process (another Backend, its replicas built anew) picks alike."""
    one, two = prefix_backend(), prefix_backend()
    for i in range(50):
        bl = blocks(f"group {i} system prompt " * 30)
        assert one.pick(blocks=bl).target.base_url == two.pick(blocks=bl).target.base_url


def test_a_loaded_home_is_let_go_for_load() -> None:
    b = prefix_backend()
    bl = blocks(SHARED)
    home = b.pick(blocks=bl)
    home.inflight = 5  # the others idle: 5 > 0 + max(4, 0)
    chosen = b.pick(blocks=bl)
    assert chosen is not home and why(b) == "load"
    # The replica chosen holds the prefix now too: the least loaded holder takes it.
    assert b.pick(blocks=bl) is chosen and why(b) == "prefix"
    chosen.inflight, home.inflight = 9, 4  # home within the bound again (least 0 + 4)
    assert b.pick(blocks=bl) is home and why(b) == "prefix"


def test_a_new_prefix_whose_home_is_busy_goes_by_load() -> None:
    b = prefix_backend()
    bl = blocks("fresh " * 100)
    home = rendezvous(b.replicas, bl[0].to_bytes(8, "little"))
    home.inflight = 9
    assert b.pick(blocks=bl) is not home and why(b) == "load"


def test_a_hot_prefix_spreads_over_several_replicas() -> None:
    """Traffic beyond one replica: holders accumulate and each request goes to the least loaded."""
    b = prefix_backend()
    bl = blocks(SHARED)
    for _ in range(40):  # 40 requests in flight at once, none finished
        b.pick(blocks=bl).inflight += 1
    loads = sorted(r.inflight for r in b.replicas)
    assert loads[-1] - loads[0] <= 5 and loads[0] >= 5  # none starved, none hot-spotted


def test_the_engine_queue_counts_while_fresh_and_not_after() -> None:
    b = prefix_backend()
    bl = blocks(SHARED)
    home = b.pick(blocks=bl)
    now = time.monotonic()
    engine_load.store(home, engine_load.EngineLoad(running=64, waiting=30, kv_usage=0.97), now + 3)
    other = b.pick(blocks=bl)
    assert other is not home and why(b) == "load"
    assert home.report(now)["engine"]["waiting"] == 30
    other.inflight = 1
    home.engine_until = now - 0.001  # stale: unknown, never saturated
    assert b.pick(blocks=bl) is home and why(b) == "prefix"
    assert "engine" not in home.report(time.monotonic())


def test_ejected_or_loading_replicas_are_never_preferred() -> None:
    b = prefix_backend()
    bl = blocks(SHARED)
    home = b.pick(blocks=bl)
    home.state = "loading"
    assert all(b.pick(blocks=bl) is not home for _ in range(20))
    home.state = "ready"
    b.eject_after = 1
    b.failed(home)
    assert all(b.pick(blocks=bl) is not home for _ in range(20))
    home.ejected_until = time.monotonic() - 1  # cool-off over: its half-open trial comes first
    assert b.pick(blocks=bl) is home and why(b) == "trial"
    b.succeeded(home)
    for r in b.replicas:
        r.inflight = 0 if r is home else 1
    assert b.pick(blocks=bl) is home and why(b) == "prefix"


def test_a_retry_goes_to_another_replica_and_sticky_wins() -> None:
    b = prefix_backend()
    bl = blocks(SHARED)
    home = b.pick(blocks=bl)
    assert b.pick([home], None, bl) is not home
    sticky_owner = rendezvous(b.replicas, b"session-1")
    assert b.pick(sticky=b"session-1", blocks=bl) is sticky_owner and why(b) == "sticky"


def test_fail_open_when_every_replica_is_out() -> None:
    b = prefix_backend(2)
    for r in b.replicas:
        r.state = "unreachable"
    assert b.pick(blocks=blocks(SHARED)) in b.replicas and why(b) == "fail_open"


def test_memory_is_bounded_whatever_the_traffic() -> None:
    aff = Affinity(capacity=100)
    rs = [replica(i) for i in range(1, 9)]
    for i in range(500):
        aff.remember(blocks(f"unique {i} " * 50), rs[i % 8])
    assert len(aff) == 100
    hot = blocks(SHARED)
    for r in rs:
        aff.remember(hot, r)
    assert aff.holders(hot[0]) == rs[::-1][:HOLDERS]  # the most recent first, at most HOLDERS
    for i in range(100):  # the least recently used go first
        aff.remember(blocks(f"later {i} " * 50), rs[0])
    assert aff.holders(hot[0]) == [] and len(aff) == 100
