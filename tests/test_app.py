"""The ASGI app driven in-process with hand-written receive/send."""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from gateway import heap
from gateway.types import ReceiveMessage
from gateway.watch import WATCH_AFTER
from tests.asgi import Message, asgi, call, make_gateway
from tests.fakes import Conn, FakeBackend, Req, sse_events
from tests.servers import Gateway, ServerExited

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_lifespan_startup_failure_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GATEWAY_CONTROL_DIR", str(tmp_path / "missing"))
    app = make_gateway()
    sent: list[Message] = []
    inbox: list[Message] = [{"type": "lifespan.startup"}]

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(m: Message) -> None:
        sent.append(m)

    run(asgi(app, {"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert "missing" in sent[0]["message"]


def test_worker_exits_rather_than_serving_without_its_pool(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(ServerExited) as info, Gateway(tmp_path, module="gateway.server", GATEWAY_CONTROL_DIR=missing):
        pass  # reached only if it served
    assert info.value.returncode != 0
    assert "lifespan startup failed" in info.value.output


def test_lifespan_startup_and_shutdown(collector: list[dict[str, Any]]) -> None:
    """The worker serves with the collector settled (``gateway.heap``) and puts it back at
    shutdown."""
    app = make_gateway()
    sent: list[tuple[str, tuple[int, int, int], int]] = []
    inbox: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    before = gc.get_threshold()

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(m: Message) -> None:
        sent.append((m["type"], gc.get_threshold(), gc.get_freeze_count()))

    run(asgi(app, {"type": "lifespan"}, receive, send))
    assert [each[0] for each in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    (_, serving, frozen), (_, after, left) = sent
    assert serving[0] == heap.YOUNG and frozen > 0
    assert after == before and left == 0


def test_a_websocket_is_closed_unaccepted_and_every_scope_gets_a_coroutine() -> None:
    """The app returns the coroutine serving a scope (a server awaits what it returns); a
    websocket's does nothing, so the server closes it without it being accepted."""
    app = make_gateway()
    sent: list[Message] = []
    received: list[int] = []

    async def receive() -> Message:
        received.append(1)
        return {"type": "websocket.connect"}

    async def send(m: Message) -> None:
        sent.append(m)

    server_side: Any = app  # called as a server calls it, with a websocket scope
    served = server_side({"type": "websocket", "path": "/v1/chat/completions", "headers": []}, receive, send)
    assert asyncio.iscoroutine(served)
    assert run(served) is None
    assert sent == [] and received == []


def test_head_health_and_draining() -> None:
    async def go() -> None:
        app = make_gateway()
        await app.startup()
        r = await call(app, "HEAD", "/health")
        assert r.status == 200 and r.body == b""
        app.draining = True
        r = await call(app, "GET", "/ready")
        assert r.status == 503 and r.json()["status"] == "draining"
        r = await call(app, "POST", "/v1/chat/completions", b"{}")
        assert r.status == 503 and r.json()["error"]["code"] == "draining"
        assert r.header(b"retry-after") == b"1"
        assert (await call(app, "GET", "/health")).status == 200
        await app.shutdown()

    run(go())


def test_body_in_pieces_and_disconnect_during_body() -> None:
    with FakeBackend() as fb:

        async def go() -> None:
            app = make_gateway(BACKEND_BASE_URL=fb.url)
            await app.startup()
            r = await call(app, "POST", "/v1/chat/completions", [b'{"mod', b'el":"a",', b'"x":1}'])
            assert r.status == 200
            assert fb.requests[-1].body == b'{"model":"a","x":1}'

            sent: list[Message] = []
            inbox: list[Message] = [
                {"type": "http.request", "body": b"{", "more_body": True},
                {"type": "http.disconnect"},
            ]

            async def receive() -> Message:
                return inbox.pop(0)

            async def send(m: Message) -> None:
                sent.append(m)

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/v1/chat/completions",
                "headers": [],
                "query_string": b"",
            }
            await asgi(app, scope, receive, send)
            assert sent == []
            assert len(fb.requests) == 1
            await app.shutdown()

        run(go())


def test_disconnect_mid_stream_cancels_upstream_in_process() -> None:
    async def slow(req: Req, conn: Conn) -> None:
        await conn.start_chunked()
        for ev in sse_events(500):
            await conn.chunk(ev)
            await asyncio.sleep(0.01)
        await conn.end_chunked()

    with FakeBackend(handler=slow) as fb:

        async def go() -> None:
            app = make_gateway(BACKEND_BASE_URL=fb.url)
            await app.startup()
            gone = asyncio.Event()
            chunks: list[bytes] = []
            inbox: list[Message] = [{"type": "http.request", "body": b"{}", "more_body": False}]

            async def receive() -> Message:
                if inbox:
                    return inbox.pop(0)
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(m: Message) -> None:
                if m["type"] == "http.response.body":
                    chunks.append(m["body"])
                    if len(chunks) == 3:
                        gone.set()

            scope = {
                "type": "http",
                "method": "POST",
                "path": "/v1/chat/completions",
                "headers": [],
                "query_string": b"",
            }
            await asyncio.wait_for(asgi(app, scope, receive, send), 5)
            assert 3 <= len(chunks) < 50
            assert (
                app.topology.first.replicas[0].pool is not None
                and app.topology.first.replicas[0].pool.active == 0
                and app.topology.first.replicas[0].pool.idle == 0
                and app.topology.first.replicas[0].pool.open == 0
            )
            # The task survives its own cancellation: nothing is left pending on it.
            current = asyncio.current_task()
            assert current is not None and current.cancelling() == 0
            await app.shutdown()

        run(go())
        assert fb.wait_disconnects(1, 1.0)


def test_disconnect_watcher_only_for_exchanges_that_outlive_a_tick() -> None:
    """A fast answer never calls receive() again; a slow one is watched within two ticks, and a
    client that left before then is noticed when it is (the disconnect is already past)."""

    async def handler(req: Req, conn: Conn) -> None:
        if req.body == b'{"slow":true}':
            await asyncio.sleep(2)
        await conn.json(200, {"ok": True})

    async def request(app: Any, body: bytes) -> tuple[list[float], list[Message]]:
        """receive() call times (from the start) and what was sent; the client is gone once its
        body has been read."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        inbox: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]
        calls: list[float] = []
        sent: list[Message] = []

        async def receive() -> Message:
            calls.append(loop.time() - t0)
            return inbox.pop(0) if inbox else {"type": "http.disconnect"}

        async def send(m: Message) -> None:
            sent.append(m)

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": []}
        await asyncio.wait_for(asgi(app, scope, receive, send), 5)
        return calls, sent

    with FakeBackend(handler=handler) as fb:

        async def go() -> None:
            app = make_gateway(BACKEND_BASE_URL=fb.url)
            await app.startup()
            calls, sent = await request(app, b"{}")
            assert len(calls) == 1 and sent[0]["status"] == 200
            calls, sent = await request(app, b'{"slow":true}')
            assert len(calls) == 2 and sent == []
            assert WATCH_AFTER <= calls[1] < 2 * WATCH_AFTER + 0.5
            await app.shutdown()

        run(go())
        assert fb.wait_disconnects(1, 1.0)


class Answer(asyncio.Future[Message]):
    """One of ``GranianLike``'s answers: a future that records the callbacks removed from it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, removed: list[object]) -> None:
        super().__init__(loop=loop)
        self.removed = removed

    def remove_done_callback(self, fn: Any) -> int:
        self.removed.append(fn)
        return super().remove_done_callback(fn)


class GranianLike:
    """A receive() shaped like Granian's: each call answers a future, done at once with the next
    of ``messages`` while there are any, then pending (what a watcher waits on); it records the
    calls, the pending futures, and the callbacks removed from them."""

    def __init__(self, loop: asyncio.AbstractEventLoop, messages: list[Message]) -> None:
        self.loop = loop
        self.messages = list(messages)
        self.calls = 0
        self.pending: list[asyncio.Future[Message]] = []
        self.removed: list[object] = []

    def __call__(self) -> asyncio.Future[Message]:
        self.calls += 1
        fut = Answer(self.loop, self.removed)
        if self.messages:
            fut.set_result(self.messages.pop(0))
        else:
            self.pending.append(fut)
        return fut


async def granian_like_request(
    app: Any, messages: list[Message], content_length: bytes | None, more: list[tuple[bytes, bytes]] | None = None
) -> tuple[GranianLike, list[Message]]:
    """One chat request through ``app`` with a Granian-shaped receive() serving ``messages``."""
    receive = GranianLike(asyncio.get_running_loop(), messages)
    sent: list[Message] = []

    async def send(m: Message) -> None:
        sent.append(m)

    headers = [] if content_length is None else [(b"content-length", content_length)]
    headers += more or []
    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": headers}
    await asyncio.wait_for(asgi(app, scope, receive, send), 5)
    return receive, sent


#: How Granian hands a request body over: its bytes with more_body true, then an empty last message.
GRANIAN_BODY: list[Message] = [
    {"type": "http.request", "body": b"{}", "more_body": True},
    {"type": "http.request", "body": b"", "more_body": False},
]


def test_the_body_stage_stops_at_the_declared_length_and_the_watcher_lets_go_at_the_end() -> None:
    """With a Content-Length, the body's bytes end the body stage: the empty last message is not
    asked for (one hand-over fewer in Granian); without one, the body is read to its last
    message. A watched exchange takes that last message at its first tick and watches on; the
    receive() it then holds is cancelled, its callback removed first, when the exchange ends
    normally (the server never has to answer it), and the request is not cancelled by that. A
    server answering http.request past the body's end ends the watch."""

    async def handler(req: Req, conn: Conn) -> None:
        if req.body == b"{ }":
            await asyncio.sleep(3 * WATCH_AFTER)
        await conn.json(200, {"ok": True})

    with FakeBackend(handler=handler) as fb:

        async def go() -> None:
            app = make_gateway(BACKEND_BASE_URL=fb.url)
            await app.startup()
            receive, sent = await granian_like_request(app, GRANIAN_BODY, b"2")
            assert receive.calls == 1 and sent[0]["status"] == 200 and fb.requests[-1].body == b"{}"
            receive, sent = await granian_like_request(app, GRANIAN_BODY, None)
            assert receive.calls == 2 and sent[0]["status"] == 200 and fb.requests[-1].body == b"{}"
            # Transfer-Encoding frames the body whatever Content-Length says (RFC 9112 6.3)
            framed: list[Message] = [
                {**GRANIAN_BODY[0], "body": b"{"},
                {**GRANIAN_BODY[0], "body": b"}"},
                GRANIAN_BODY[1],
            ]
            receive, sent = await granian_like_request(app, framed, b"1", [(b"transfer-encoding", b"chunked")])
            assert receive.calls == 3 and sent[0]["status"] == 200 and fb.requests[-1].body == b"{}"
            slow: list[Message] = [{**GRANIAN_BODY[0], "body": b"{ }"}, GRANIAN_BODY[1]]
            receive, sent = await granian_like_request(app, slow, b"3")
            assert sent[0]["status"] == 200 and json.loads(sent[1]["body"]) == {"ok": True}
            assert fb.requests[-1].body == b"{ }"
            # the body; at the tick the last message, then the watch on the next one
            assert receive.calls == 3 and len(receive.pending) == 1
            assert receive.pending[0].cancelled() and len(receive.removed) == 1  # its callback went first
            # Past the body's last message the next can only be http.disconnect (the ASGI spec): a
            # server that answers http.request again ends the watch rather than have it ask again
            # and again; the request goes on.
            receive, sent = await granian_like_request(app, [*slow, *[GRANIAN_BODY[1]] * 50], b"3")
            assert sent[0]["status"] == 200 and receive.calls == 3 and receive.pending == []
            assert not app.forwarder.watch._watching
            await app.shutdown()

        run(go())


def test_a_disconnect_after_the_bodys_last_message_cancels_the_exchange() -> None:
    """The watcher that found the body's last message still sees the disconnect after it."""

    async def handler(req: Req, conn: Conn) -> None:
        await asyncio.sleep(2)
        await conn.json(200, {"ok": True})

    with FakeBackend(handler=handler) as fb:

        async def go() -> None:
            app = make_gateway(BACKEND_BASE_URL=fb.url)
            await app.startup()
            messages: list[Message] = [*GRANIAN_BODY, {"type": "http.disconnect"}]
            receive, sent = await granian_like_request(app, messages, b"2")
            assert sent == [] and receive.calls == 3 and receive.pending == []
            assert not app.forwarder.watch._watching
            await app.shutdown()

        run(go())
        assert fb.wait_disconnects(1, 1.0)


def test_pool_reuses_and_counts() -> None:
    with FakeBackend() as fb:

        async def go() -> None:
            app = make_gateway(BACKEND_BASE_URL=fb.url, GATEWAY_POOL_SIZE="2")
            await app.startup()
            results = await asyncio.gather(
                *(call(app, "POST", "/v1/chat/completions", b'{"stream":true}') for _ in range(10))
            )
            assert all(r.status == 200 and r.finished for r in results)
            assert app.topology.first.replicas[0].pool is not None
            assert (
                app.topology.first.replicas[0].pool.open <= 2
                and app.topology.first.replicas[0].pool.active == 0
                and app.topology.first.replicas[0].pool.waiting == 0
            )
            assert "idle" in repr(app.topology.first.replicas[0].pool)
            await app.shutdown()

        run(go())
        assert fb.connections <= 2 + len(fb.internal)  # the model listing has its own connection


def test_body_timeout_is_a_408_and_other_cancellations_pass_through() -> None:
    """The body stage's own timer: its expiry is a 408 ``request_timeout``; a cancellation from
    elsewhere (a server shutting down) while the body is awaited stays a cancellation."""
    from gateway.errors import GatewayError

    app = make_gateway(GATEWAY_CLIENT_BODY_TIMEOUT="0.05")

    async def never() -> ReceiveMessage:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def timed_out() -> tuple[int, str | None, int]:
        try:
            await app.read_body(never, None)
        except GatewayError as err:
            task = asyncio.current_task()
            assert task is not None
            return err.status, err.code, task.cancelling()
        raise AssertionError("no timeout")

    assert run(timed_out()) == (408, "request_timeout", 0)

    async def cancelled_from_outside() -> str:
        reader = asyncio.ensure_future(app.read_body(never, None))
        await asyncio.sleep(0.01)
        reader.cancel()
        try:
            await reader
        except asyncio.CancelledError:
            return "cancelled"
        return "no cancellation"

    assert run(cancelled_from_outside()) == "cancelled"

    async def prompt_body() -> bytes:
        async def receive() -> ReceiveMessage:
            return {"type": "http.request", "body": b"{}", "more_body": False}

        body = await app.read_body(receive, b"2")
        await asyncio.sleep(0.1)  # past the timeout: its timer was cancelled with the read
        return body

    assert run(prompt_body()) == b"{}"


def test_the_timers_go_on_the_loop_that_serves_the_request() -> None:
    """The app remembers the loop its startup ran on (asking asyncio costs a system call); a
    request served on another loop, that one closed, still gets its body timeout there."""
    app = make_gateway(GATEWAY_CLIENT_BODY_TIMEOUT="0.05")

    async def start() -> None:
        await app.startup()
        for task in app._tasks:
            task.cancel()

    run(start())
    assert app._loop is not None and app._loop.is_closed()

    async def never() -> ReceiveMessage:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def timed_out() -> int:
        from gateway.errors import GatewayError

        try:
            await app.read_body(never, None)
        except GatewayError as err:
            return err.status
        raise AssertionError("no timeout")

    assert run(timed_out()) == 408


def test_the_last_body_piece_ends_the_response_where_its_end_is_known() -> None:
    """On the direct path a Content-Length body's end is read before its last piece is relayed:
    that piece goes out as the final message (a body whole in one read is one message). Where h11
    reads the answer, on the same connection afterwards, the end comes as its own empty message."""
    body = b'{"answer": "' + b"x" * 40 + b'"}'
    half = len(body) // 2
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % len(body)
    # Each answer as the writes the backend makes, a short pause between them.
    answers = [
        [head + b"\r\n" + body],  # direct, whole
        [head + b"\r\n" + body[:half], body[half:]],  # direct, in two reads
        [head, b"\r\n" + body[:half], body[half:]],  # the head split across reads: h11 reads it
    ]

    async def handler(req: Req, conn: Conn) -> None:
        if req.target.startswith("/v1/models"):
            await conn.send(b"HTTP/1.1 200 OK\r\ncontent-length: 27\r\n\r\n" + b'{"object":"list","data":[]}')
            return
        for i, piece in enumerate(answers.pop(0)):
            if i:  # not after the last: the fake would take the next request for a disconnect
                await asyncio.sleep(0.05)
            await conn.send(piece)

    async def relayed(app: Any) -> list[tuple[bytes, bool]]:
        """The body messages the app sent for one request: (body, more_body)."""
        messages: list[tuple[bytes, bool]] = []
        requests = [{"type": "http.request", "body": b"{}", "more_body": False}]

        async def send(message: Message) -> None:
            if message["type"] == "http.response.body":
                messages.append((message.get("body", b""), message.get("more_body", False)))

        async def receive() -> Message:
            if requests:
                return requests.pop()
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b""}
        await asyncio.wait_for(asgi(app, scope, receive, send), 5)
        return messages

    async def go(fb: FakeBackend) -> list[list[tuple[bytes, bool]]]:
        app = make_gateway(BACKEND_BASE_URL=fb.url)
        await app.startup()
        seen = [await relayed(app) for _ in range(3)]
        await app.shutdown()
        return seen

    with FakeBackend(handler=handler) as fb:
        whole, pieces, by_h11 = run(go(fb))
        connections = fb.connections
    assert whole == [(body, False)]
    assert pieces == [(body[:half], True), (body[half:], False)]
    assert by_h11 == [(body[:half], True), (body[half:], True), (b"", False)]
    assert connections - 1 <= 1  # one for the answers (the model listing may have its own)


def test_a_bug_is_a_500_with_its_traceback_not_a_backend_error(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """An exception that is neither httpcore's nor the OS's is the gateway's own fault: 500
    ``internal_error`` in the OpenAI shape, logged with its traceback, never counted as an
    upstream error (it used to be a 502 ``backend_unavailable`` and a ``reset``)."""
    import gateway.forward

    async def broken(*args: Any) -> None:
        raise AttributeError("a bug in the relay")

    monkeypatch.setattr(gateway.forward, "forward", broken)
    with FakeBackend() as fb:

        async def go() -> tuple[Any, bytes | None, bytes]:
            app = make_gateway(BACKEND_BASE_URL=fb.url)
            await app.startup()
            r = await call(app, "POST", "/v1/chat/completions", b'{"model":"m"}', [(b"x-request-id", b"rid-1")])
            assert r.status == 500 and r.finished
            assert app.metrics is not None
            page, _ = app.metrics.exposition()
            await app.shutdown()
            return r.json(), r.header(b"x-request-id"), page

        body, rid, page = run(go())
    assert body == {
        "error": {
            "message": "The gateway failed to handle the request; see its log.",
            "type": "api_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert rid == b"rid-1"
    assert b"gateway_upstream_errors_total{" not in page
    (line,) = [json.loads(x) for x in capfd.readouterr().err.splitlines() if '"level":"error"' in x]
    assert line["message"] == "internal error on POST /v1/chat/completions (request rid-1)"
    assert "Traceback" in line["traceback"] and "AttributeError: a bug in the relay" in line["traceback"]


def test_a_bug_after_the_response_started_closes_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the head is out nothing can be appended that a client would take as an error: the
    response is left without its final message, so the server drops the connection."""
    import gateway.forward

    async def broken_midway(*args: Any) -> None:
        send, ex = args[3], args[4]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        ex.started = True
        await send({"type": "http.response.body", "body": b"part", "more_body": True})
        raise KeyError("a bug mid-stream")

    monkeypatch.setattr(gateway.forward, "forward", broken_midway)
    with FakeBackend() as fb:

        async def go() -> Any:
            app = make_gateway(BACKEND_BASE_URL=fb.url)
            await app.startup()
            r = await call(app, "POST", "/v1/chat/completions", b'{"model":"m"}')
            await app.shutdown()
            return r

        r = run(go())
    assert r.status == 200 and r.body == b"part" and not r.finished


def test_lifespan_shutdown_failure_is_reported_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    app = make_gateway()
    sent: list[Message] = []
    inbox: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Message:
        return inbox.pop(0)

    async def send(m: Message) -> None:
        sent.append(m)

    async def broken_shutdown() -> None:
        raise RuntimeError("pool would not close")

    monkeypatch.setattr(app, "shutdown", broken_shutdown)
    run(asgi(app, {"type": "lifespan"}, receive, send))
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.failed"]
    assert "Traceback" in sent[1]["message"] and "pool would not close" in sent[1]["message"]
    assert "RuntimeError: pool would not close" in capfd.readouterr().err
