"""The Responses API's state, as a routing stage: requests that name a stored response go to the
backend and replica holding it (``responses_map``)."""

from __future__ import annotations

import msgspec

from gateway import routes
from gateway.balance import Backend, Replica
from gateway.exchange import Exchange
from gateway.responses_map import ResponseMap, first_id
from gateway.topology import check_capability
from gateway.types import HTTPScope


class _Continues(msgspec.Struct):
    previous_response_id: str | None = None


_continues = msgspec.json.Decoder(_Continues)


class Stateful:
    """One worker's response id map, consulted and filled by the Responses routes only."""

    __slots__ = ("ids",)

    def __init__(self) -> None:
        self.ids = ResponseMap()

    def route(self, route: routes.Route, path: str, body: bytes, backend: Backend) -> tuple[Backend, Replica | None]:
        """The backend and replica for a request that names a stored response (its path's id, or
        a create's ``previous_response_id``), when the map holds it; else ``backend`` as routed."""
        if route.stateful == "by_id":
            response_id: str | None = routes.response_id(path)
        else:
            try:
                response_id = _continues.decode(body).previous_response_id
            except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
                response_id = None  # the backend says what is wrong with it
        found = self.ids.get(response_id) if response_id else None
        if found is None:
            return backend, None
        check_capability(found[0], route.capability)
        return found

    def remember(self, route: routes.Route, scope: HTTPScope, ex: Exchange, backend: Backend) -> None:
        """After the answer: a created response's id is recorded; a deleted one forgotten."""
        if not 200 <= ex.status < 300 or ex.replica is None:
            return
        if route.stateful == "create":
            response_id = first_id(ex.head or ex.last)
            if response_id is not None:
                self.ids.put(response_id, backend, ex.replica)
        elif scope["method"] == "DELETE":
            self.ids.forget(routes.response_id(scope["path"]))
