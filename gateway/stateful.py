"""The Responses API's state, as a routing stage: requests that name a stored response go to the
backend and replica holding it (``responses_map``)."""

from __future__ import annotations

import msgspec

from gateway import routes
from gateway.balance import Backend, Replica
from gateway.exchange import Exchange
from gateway.responses_map import ResponseMap, first_id
from gateway.types import HTTPScope

_string = msgspec.json.Decoder(str)


class Stateful:
    """One worker's response id map, consulted and filled by the Responses routes only."""

    __slots__ = ("ids",)

    def __init__(self) -> None:
        self.ids = ResponseMap()

    def route(
        self, route: routes.Route, path: str, previous: bytes | msgspec.Raw, backend: Backend
    ) -> tuple[Backend, Replica | None]:
        """The backend and replica for a request that names a stored response (its path's id, or
        a create's ``previous_response_id``, ``previous`` as the body has it: raw JSON, read by
        the routing stage's decode), when the map holds it; else ``backend`` as routed."""
        if route.stateful == "by_id":
            response_id: str | None = routes.response_id(path)
        else:
            try:
                response_id = _string.decode(previous) if previous else None
            except (msgspec.MsgspecError, UnicodeDecodeError):
                response_id = None  # not a string: the backend says what is wrong with it
        found = self.ids.get(response_id) if response_id else None
        if found is None:
            return backend, None
        return found  # its backend created it: it serves the Responses routes

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
