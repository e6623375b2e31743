"""ASGI types (the gateway uses no framework): the scopes and messages it reads and writes.

Typed after the ASGI 3 specification's HTTP and lifespan messages, so mypy checks every message
the gateway sends and every field it reads from one it receives.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Literal, NotRequired, TypedDict

Headers = Iterable[tuple[bytes, bytes]]


class HTTPScope(TypedDict):
    type: Literal["http"]
    method: str
    path: str
    raw_path: NotRequired[bytes | None]
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    http_version: NotRequired[str]
    scheme: NotRequired[str]
    client: NotRequired[tuple[str, int] | None]
    server: NotRequired[tuple[str, int | None] | None]
    root_path: NotRequired[str]


class LifespanScope(TypedDict):
    type: Literal["lifespan"]


class WebSocketScope(TypedDict):
    type: Literal["websocket"]


Scope = HTTPScope | LifespanScope | WebSocketScope


class HTTPRequestEvent(TypedDict):
    type: Literal["http.request"]
    body: NotRequired[bytes]
    more_body: NotRequired[bool]


class HTTPDisconnectEvent(TypedDict):
    type: Literal["http.disconnect"]


class LifespanStartupEvent(TypedDict):
    type: Literal["lifespan.startup"]


class LifespanShutdownEvent(TypedDict):
    type: Literal["lifespan.shutdown"]


ReceiveMessage = HTTPRequestEvent | HTTPDisconnectEvent | LifespanStartupEvent | LifespanShutdownEvent


class HTTPResponseStartEvent(TypedDict):
    type: Literal["http.response.start"]
    status: int
    headers: Headers


class HTTPResponseBodyEvent(TypedDict):
    type: Literal["http.response.body"]
    body: bytes
    more_body: bool


class LifespanCompleteEvent(TypedDict):
    type: Literal["lifespan.startup.complete", "lifespan.shutdown.complete"]


class LifespanFailedEvent(TypedDict):
    type: Literal["lifespan.startup.failed", "lifespan.shutdown.failed"]
    message: str


SendMessage = HTTPResponseStartEvent | HTTPResponseBodyEvent | LifespanCompleteEvent | LifespanFailedEvent

Receive = Callable[[], Awaitable[ReceiveMessage]]
Send = Callable[[SendMessage], Awaitable[None]]
