"""Where each stored Responses API response lives: a bounded map from response id to the backend
and replica that made it.

A response is stored on the replica that generated it; retrieving, deleting or cancelling it,
listing its input items, and a create that continues it (``previous_response_id``) must reach that
replica. The id is read once per create, from the answer's first piece (the non-streamed body, or
the ``response.created`` event that opens a stream): a byte search for the first ``"id"``, never a
parse of the stream. The map is per worker process and keeps the ``LIMIT`` most recent ids; an id it
does not hold (forgotten, made before a restart, or through another worker or gateway replica) is
routed as if it named none: to the first backend, on a replica its balancer picks (with one replica,
the right one).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from gateway.usage import value_after

if TYPE_CHECKING:
    from gateway.balance import Backend, Replica

#: Ids remembered per worker: about 200 bytes each.
LIMIT = 65_536
#: Ids are read from this many bytes at most of the first piece.
_SCAN = 4096


class ResponseMap:
    """Response id -> (backend, replica), least recently used first out."""

    __slots__ = ("_ids", "limit")

    def __init__(self, limit: int = LIMIT) -> None:
        self._ids: OrderedDict[str, tuple[Backend, Replica]] = OrderedDict()
        self.limit = limit

    def __len__(self) -> int:
        return len(self._ids)

    def get(self, response_id: str) -> tuple[Backend, Replica] | None:
        found = self._ids.get(response_id)
        if found is not None:
            self._ids.move_to_end(response_id)
        return found

    def put(self, response_id: str, backend: Backend, replica: Replica) -> None:
        ids = self._ids
        ids[response_id] = (backend, replica)
        ids.move_to_end(response_id)
        while len(ids) > self.limit:
            ids.popitem(last=False)

    def forget(self, response_id: str) -> None:
        self._ids.pop(response_id, None)


def first_id(head: bytes) -> str | None:
    """The value of the first ``"id"`` in ``head``: a Responses object's own id comes first in the
    non-streamed body and in the ``response`` of ``response.created``."""
    at = head.find(b'"id"', 0, _SCAN)
    if at < 0:
        return None
    value = value_after(head, at + 4, at + 4 + 512)
    return value if isinstance(value, str) and value else None
