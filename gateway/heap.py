"""The worker's heap while it serves: CPython's cyclic garbage collector kept off the relay.

A worker's long-lived objects (modules, settings, profiles, pools: some 30,000 that the collector
tracks) are made once, at startup. A request then makes a few dozen short-lived containers (its
scope, coroutines, futures, exchange) that reference counting frees when it ends. CPython (up to
3.13) collects the young generation once container allocations exceed deallocations by 700, so
a burst of requests in flight together, 64 paced streams or 1,000, makes it collect objects that
are all alive, promote them, and, as they pile up in the older generations, run full
collections over every object in the process: pauses of 14-27 ms with 64 streams and up to 81 ms
with 1,000, each a stall of every stream the worker relays, that found no garbage
(bench/README.md, "The collector").

The simulator (``python -m gateway.sim``) settles its own the same way once it listens: it holds
as many streams as the bench sends it, and a pause of its collector reads as the gateway's.

``settle`` (the lifespan's last step of startup) collects once, moves what is left into the
permanent generation (``gc.freeze``: never traversed again, still freed by reference counting)
and raises the thresholds, so that the requests in flight rarely start a collection and one that
starts traverses only young objects. Cyclic garbage (an exception's traceback, say) is still
collected, a little later. ``restore`` (at shutdown) puts the collector back as it was.
"""

from __future__ import annotations

import gc

#: Container allocations less deallocations between young collections (CPython's default 700).
YOUNG = 10_000
#: Young collections between collections of the middle generation (CPython's default 10): at
#: 10,000 a middle one came every few seconds with 1,000 streams, 11-28 ms each.
MIDDLE = 100

#: The thresholds ``settle`` found, while settled (the collector is the process's: one state).
_before: tuple[int, ...] | None = None


def settle() -> None:
    """Collect, freeze what is left and raise the thresholds (once settled, again only collect
    and freeze: ``restore`` puts back what the first call found)."""
    global _before
    if _before is None:
        _before = gc.get_threshold()
    gc.collect()
    gc.freeze()
    _, middle, old = _before
    if old:  # the generational collector: young, middle and old generations
        gc.set_threshold(YOUNG, MIDDLE, old)
    else:  # an incremental one (its third value is always 0; its second, the old one's pace)
        gc.set_threshold(YOUNG, middle)


def restore() -> None:
    """The collector as it was before ``settle``; nothing to do if it was not settled."""
    global _before
    if _before is not None:
        gc.unfreeze()
        gc.set_threshold(*_before)
        _before = None
