"""Bounded memos for what a backend or a client sends again and again (a response head, a header
field, the headers relayed for a head): looked up per request, filled on a miss."""

from __future__ import annotations

from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def keep(memo: dict[K, V], key: K, value: V, most: int) -> V:
    """Keep ``value`` for ``key`` in ``memo`` and return it; a memo holding ``most`` entries is
    emptied first (what repeats comes back at once; what churned, such as a head's Date, goes)."""
    if len(memo) >= most:
        memo.clear()
    memo[key] = value
    return value
