"""Drive the ASGI app in-process with hand-written receive/send (no server, no framework)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import orjson

from gateway.app import Gateway
from gateway.config import settings_from_strings
from gateway.types import Receive, Scope, Send

#: A test double's message: a plain dict (the gateway's own messages are typed in gateway.types).
Message = dict[str, Any]


async def asgi(
    app: Gateway,
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[Message]],
    send: Callable[[Message], Awaitable[None]],
) -> None:
    """Call the app with hand-written doubles, as loosely typed as a server's."""
    await app(cast(Scope, scope), cast(Receive, receive), cast(Send, send))


@dataclass
class Result:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    finished: bool = False

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return orjson.loads(self.body)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


def make_gateway(**env: str) -> Gateway:
    return Gateway(settings_from_strings(env))


async def call(
    app: Gateway,
    method: str,
    path: str,
    body: bytes | list[bytes] = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    raw_path: bytes | None = None,
) -> Result:
    parts = body if isinstance(body, list) else [body]
    messages: list[Message] = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)
    ]
    forever = asyncio.Event()

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await forever.wait()
        return {"type": "http.disconnect"}

    result = Result()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            assert result.status == 0, "response started twice"
            result.status = message["status"]
            result.headers = list(message["headers"])
        else:
            assert result.status, "body before start"
            assert not result.finished, "body after the end"
            result.chunks.append(message.get("body", b""))
            result.finished = not message.get("more_body", False)

    scope: dict[str, Any] = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode() if raw_path is None else raw_path,
        "query_string": query,
        "headers": headers or [],
    }
    await asgi(app, scope, receive, send)
    return result
