"""A scripted fake backend for the gateway's tests: raw asyncio HTTP/1.1 in a background thread.

Each request is answered by a handler chosen by path (or the default). Handlers can stall, cut
the connection, or stream slowly, and the server records what reached it: requests (method,
target, headers, body), TCP connections, and client disconnects while a response was pending.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson


@dataclass
class Req:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return orjson.loads(self.body)


class Conn:
    """The response side of one request."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = obj if isinstance(obj, bytes) else orjson.dumps(obj)
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        await self.send(
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n{extra}\r\n".encode()
            + body
        )

    async def start_chunked(self, status: int = 200, content_type: str = "text/event-stream") -> None:
        await self.send(
            f"HTTP/1.1 {status} OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n".encode()
        )

    async def chunk(self, data: bytes) -> None:
        await self.send(b"%x\r\n%s\r\n" % (len(data), data))

    async def end_chunked(self) -> None:
        await self.send(b"0\r\n\r\n")

    def reset(self) -> None:
        """Abort the TCP connection (RST)."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.writer.transport.abort()


Handler = Callable[[Req, Conn], Awaitable[None]]


def sse_events(n: int, model: str = "fake") -> list[bytes]:
    """``n`` chat chunks, a usage chunk and [DONE], as separate SSE events."""
    out = []
    for i in range(n):
        out.append(
            b"data: "
            + orjson.dumps(
                {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": model,
                    "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}],
                }
            )
            + b"\n\n"
        )
    out.append(
        b"data: "
        + orjson.dumps(
            {
                "id": "c1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": n + 3},
            }
        )
        + b"\n\n"
    )
    out.append(b"data: [DONE]\n\n")
    return out


def chat_completion(model: str, text: str = "hello") -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }


async def default_handler(req: Req, conn: Conn) -> None:
    """An OpenAI-ish backend: chat, completions, embeddings, models, /health."""
    path = req.target.split("?", 1)[0]
    if path.endswith("/health") or path == "/":
        await conn.json(200, {"status": "ok"})
        return
    if path.endswith("/models"):
        await conn.json(
            200, {"object": "list", "data": [{"id": "fake", "object": "model", "created": 1, "owned_by": "me"}]}
        )
        return
    body = req.json() if req.body else {}
    model = body.get("model", "fake")
    if path.endswith("/embeddings"):
        await conn.json(
            200,
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                "model": model,
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            },
        )
        return
    if path.endswith("/completions"):
        if body.get("stream"):
            await conn.start_chunked()
            for ev in sse_events(int(body.get("max_tokens") or 5), model):
                await conn.chunk(ev)
            await conn.end_chunked()
        elif path.endswith("/chat/completions"):
            await conn.json(200, chat_completion(model))
        else:
            await conn.json(
                200,
                {
                    "id": "t1",
                    "object": "text_completion",
                    "created": 1,
                    "model": model,
                    "choices": [{"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                },
            )
        return
    await conn.json(404, {"error": {"message": "nope", "type": "NotFoundError", "param": None, "code": 404}})


@dataclass
class FakeBackend:
    """Start with ``with FakeBackend() as fb:``; ``fb.url`` is its OpenAI base URL."""

    handler: Handler = default_handler
    # (Left out of the repr: a failing test's report would print every request.)
    requests: list[Req] = field(default_factory=list, repr=False)
    #: The gateway's own background model listings, kept apart from what clients caused.
    internal: list[Req] = field(default_factory=list, repr=False)
    connections: int = 0
    disconnects: list[float] = field(default_factory=list, repr=False)
    port: int = 0

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._disconnected = threading.Condition()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeBackend:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _start(self) -> None:
        # Request heads up to 1 MiB, beyond Granian's own bound (408 KiB), so what the gateway
        # forwards is always seen; a larger one is answered 431 as a real server would.
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, limit=1 << 20)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in list(self._writers):
            w.transport.abort()
        await asyncio.sleep(0)

    def wait_disconnects(self, n: int, timeout: float) -> bool:
        """Wait until at least ``n`` client disconnects were seen during pending responses."""
        deadline = time.monotonic() + timeout
        with self._disconnected:
            while len(self.disconnects) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._disconnected.wait(left)
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                except asyncio.LimitOverrunError:
                    writer.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n")
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = [(k.strip(), v.strip()) for k, v in (ln.split(":", 1) for ln in lines[1:] if ln)]
                length = next((int(v) for k, v in headers if k.lower() == "content-length"), 0)
                body = await reader.readexactly(length) if length else b""
                req = Req(method, target, headers, body)
                if (req.header("user-agent") or "").endswith("(model list)"):
                    self.internal.append(req)
                else:
                    self.requests.append(req)
                eof = asyncio.ensure_future(reader.read(1))
                handler = asyncio.ensure_future(self.handler(req, Conn(writer)))
                await asyncio.wait({eof, handler}, return_when=asyncio.FIRST_COMPLETED)
                if not handler.done():
                    # The client went away while we were answering: what a real engine sees.
                    handler.cancel()
                    with contextlib.suppress(BaseException):
                        await handler
                    self._note_disconnect()
                    return
                eof.cancel()
                with contextlib.suppress(BaseException):
                    await eof
                if handler.exception() is not None or writer.transport.is_closing():
                    return
        finally:
            self._writers.discard(writer)
            writer.transport.abort()

    def _note_disconnect(self) -> None:
        with self._disconnected:
            self.disconnects.append(time.monotonic())
            self._disconnected.notify_all()
