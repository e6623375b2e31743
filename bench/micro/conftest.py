"""The micro-benchmarks' pre-built backend answers, client requests, event loop and app fixtures.

The upstream is in memory (``tests.memnet.MemoryNetwork``): every read hands the gateway the next
piece of a pre-built HTTP/1.1 response (one SSE event per piece, as a backend that flushes each
token would send it), and every write (the request) rewinds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import uvloop

from gateway.app import Gateway
from gateway.config import settings_from_strings
from gateway.drain import CONTROL_ENV
from tests.asgi import Message, asgi
from tests.memnet import MemoryNetwork, MemoryStream

__all__ = ["MemoryNetwork", "MemoryStream"]

#: The client key the app benchmarks are configured with (client auth on, as in production).
CLIENT_KEY = "sk-bench-0123456789abcdef0123456789abcdef"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


# -- pre-built backend responses (shaped like vLLM's, served by uvicorn) --------------------------

_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"date: Mon, 06 Jan 2025 12:00:00 GMT\r\n"
    b"server: uvicorn\r\n"
    b"content-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\n"
    b"\r\n"
)


def sse_events(n: int) -> list[bytes]:
    """``n`` SSE events: ``n - 1`` one-token chat chunks, then ``data: [DONE]``."""
    events = []
    for i in range(n - 1):
        chunk = {
            "id": "chatcmpl-5f3c1d2e9a8b4c7d",
            "object": "chat.completion.chunk",
            "created": 1736164800,
            "model": MODEL,
            "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "logprobs": None, "finish_reason": None}],
        }
        events.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def sse_response(events: list[bytes]) -> list[bytes]:
    """The read pieces of a chunked SSE response: the head, one HTTP chunk per event, the end."""
    return [_SSE_HEAD, *(b"%x\r\n%s\r\n" % (len(ev), ev) for ev in events), b"0\r\n\r\n"]


def json_completion() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-5f3c1d2e9a8b4c7d",
            "object": "chat.completion",
            "created": 1736164800,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! " * 40, "tool_calls": []},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 24, "completion_tokens": 80, "total_tokens": 104},
        }
    )


def json_response(body: bytes) -> list[bytes]:
    head = (
        b"HTTP/1.1 200 OK\r\n"
        b"date: Mon, 06 Jan 2025 12:00:00 GMT\r\n"
        b"server: uvicorn\r\n"
        b"content-length: %d\r\n"
        b"content-type: application/json\r\n"
        b"\r\n" % len(body)
    )
    return [head, body]


# -- what a client sends ------------------------------------------------------------------------


def client_headers(body_len: int) -> list[tuple[bytes, bytes]]:
    """The headers openai-python (httpx) sends with a chat request, as Granian hands them over."""
    return [
        (b"host", b"127.0.0.1:4000"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
        (b"accept", b"application/json"),
        (b"content-type", b"application/json"),
        (b"user-agent", b"OpenAI/Python 1.58.1"),
        (b"x-stainless-lang", b"python"),
        (b"x-stainless-package-version", b"1.58.1"),
        (b"x-stainless-retry-count", b"0"),
        (b"authorization", b"Bearer " + CLIENT_KEY.encode()),
        (b"content-length", str(body_len).encode()),
    ]


def chat_body(stream: bool) -> bytes:
    return orjson.dumps(
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Write a haiku about connection pools."},
            ],
            "max_tokens": 64,
            "stream": stream,
        }
    )


async def discard(message: Message) -> None:
    """The no-op ``send`` used while timing."""
    return None


@dataclass
class Seen:
    status: int = 0
    messages: int = 0
    body_bytes: int = 0
    finished: bool = False


class AppRequest:
    """One POST driven through ``app(scope, receive, send)``; the client never disconnects."""

    def __init__(self, app: Gateway, path: str, body: bytes) -> None:
        self.app = app
        self.body = body
        self.scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "scheme": "http",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "query_string": b"",
            "headers": client_headers(len(body)),
        }

    async def run(self, send: Callable[[Message], Awaitable[None]] = discard) -> None:
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": self.body, "more_body": False}
            # The disconnect watcher waits here until the app cancels it at the end.
            await asyncio.get_running_loop().create_future()
            raise AssertionError("unreachable")

        await asgi(self.app, self.scope, receive, send)

    async def check(self) -> Seen:
        """Run once, recording what the client would see (used before timing)."""
        seen = Seen()

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen.status = message["status"]
            else:
                seen.messages += 1
                seen.body_bytes += len(message.get("body", b""))
                seen.finished = not message.get("more_body", False)

        await self.run(send)
        return seen


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch) -> Iterator[asyncio.AbstractEventLoop]:
    """A uvloop event loop for one benchmark (the loop ``gateway serve`` runs on)."""
    monkeypatch.delenv(CONTROL_ENV, raising=False)  # no drain watcher in the benchmarks
    ev_loop = uvloop.new_event_loop()
    yield ev_loop
    ev_loop.run_until_complete(ev_loop.shutdown_asyncgens())
    ev_loop.close()


@pytest.fixture
def gateway_on(loop: asyncio.AbstractEventLoop) -> Iterator[Callable[[MemoryNetwork], Gateway]]:
    """Build a started Gateway (pool and all) over an in-memory upstream; shut down afterwards."""
    started: list[Gateway] = []

    def make(network: MemoryNetwork) -> Gateway:
        settings = settings_from_strings(
            {"BACKEND_KIND": "vllm", "BACKEND_BASE_URL": "http://backend.bench:8000/v1", "API_KEYS": CLIENT_KEY}
        )
        app = Gateway(settings, network=network)
        loop.run_until_complete(app.startup())
        # The background model listing would share the in-memory network: not part of a request.
        if app._tasks:
            for task in app._tasks:
                task.cancel()
            loop.run_until_complete(asyncio.wait(app._tasks))
            network.connects = 0
        started.append(app)
        return app

    yield make
    for app in started:
        loop.run_until_complete(app.shutdown())
