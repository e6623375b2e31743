"""The collector while a worker serves (``gateway.heap``): frozen startup objects, raised
thresholds, cyclic garbage still collected, and everything put back at shutdown."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from gateway import heap

GENERATIONAL = gc.get_threshold()[2] != 0  # CPython up to 3.13; an incremental collector says 0


@pytest.fixture
def collector() -> Iterator[list[dict[str, Any]]]:
    """The collections that ran (their ``gc.callbacks`` info), the collector restored afterwards
    whatever the test did."""
    before, frozen = gc.get_threshold(), gc.get_freeze_count()
    runs: list[dict[str, Any]] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop":
            runs.append(info)

    gc.callbacks.append(seen)
    try:
        yield runs
    finally:
        gc.callbacks.remove(seen)
        if gc.get_freeze_count() and not frozen:
            gc.unfreeze()
        gc.set_threshold(*before)


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_settle_freezes_what_startup_made_raises_the_thresholds_and_its_answer_puts_both_back(
    collector: list[dict[str, Any]],
) -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    restore = heap.settle()
    assert gc.get_freeze_count() > 1000  # this process's modules, classes, functions
    assert gc.get_threshold()[0] == heap.YOUNG
    if GENERATIONAL:
        assert gc.get_threshold() == (heap.YOUNG, heap.MIDDLE, before[2])
    restore()
    assert gc.get_freeze_count() == 0
    assert gc.get_threshold() == before
    heap.unsettled()  # nothing to put back before settling
    assert gc.get_threshold() == before


def test_objects_in_flight_start_no_collection_and_cyclic_garbage_is_still_collected(
    collector: list[dict[str, Any]],
) -> None:
    restore = heap.settle()
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
    restore()
