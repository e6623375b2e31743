"""The collector while a worker serves (``gateway.heap``): frozen startup objects, raised
thresholds, cyclic garbage still collected, and everything put back at shutdown (the
``collector`` fixture, ``tests/conftest.py``, puts it back whatever a test did)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

from gateway import heap

GENERATIONAL = gc.get_threshold()[2] != 0  # CPython up to 3.13; an incremental collector says 0


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_settle_freezes_what_startup_made_raises_the_thresholds_and_restore_puts_both_back(
    collector: list[dict[str, Any]],
) -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    heap.settle()
    assert gc.get_freeze_count() > 1000  # this process's modules, classes, functions
    assert gc.get_threshold()[0] == heap.YOUNG
    if GENERATIONAL:
        assert gc.get_threshold() == (heap.YOUNG, heap.MIDDLE, before[2])
    heap.restore()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
    heap.restore()  # nothing to put back once restored
    assert gc.get_threshold() == before


def test_objects_in_flight_start_no_collection_and_cyclic_garbage_is_still_collected(
    collector: list[dict[str, Any]],
) -> None:
    heap.settle()
    collector.clear()
    # A burst's worth of containers alive at once (a thousand requests' scopes, say): with
    # CPython's default threshold (700) this ran several collections over objects all alive.
    alive = [{"request": i} for i in range(heap.YOUNG // 2)]
    assert collector == []
    # Garbage that only the collector can free: pairs referring to each other, unreachable.
    first = Node()
    first.other = Node()
    first.other.other = first
    gone = weakref.ref(first)
    del first
    for _ in range(heap.YOUNG):
        a, b = Node(), Node()
        a.other, b.other = b, a
    del a, b
    assert collector, "no collection ran after more than the young threshold of cyclic garbage"
    assert sum(info["collected"] for info in collector) > 0
    assert gone() is None
    assert len(alive) == heap.YOUNG // 2
    heap.restore()
