"""Granian alone: the floor under the gateway's cost (``just bench --floor``).

A trivial ASGI app, served by ``gateway.server.run_granian`` with the gateway's own settings (the
bench's ``--gateway-env`` too), one worker pinned to the gateway's CPU, answers each benchmark
request itself, with no upstream at all. Its answers have the simulator's shape (built by
``gateway.sim.responses``: a chat completion, or one SSE event per token, one
``http.response.body`` each) and streams are paced by the same ``x-sim-*`` headers on the same
kind of schedule (``gateway.sim.engine.Ticker``); its garbage collector is set as the gateway's
(``gateway.heap``). Its CPU per request and per event is what Granian and the ASGI calls cost;
what the gateway costs above it is its own work: its Python and the upstream connection (socket
reads and writes, wake-ups, and h11 for unusual answers). Unlike ``gateway serve`` there is no
supervisor process (it idles, polling every 0.1 s).

    python -m bench.floor --port 8123    # serve it by hand (pinning is up to you)
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import orjson

from gateway import heap
from gateway.sim.engine import Ticker
from gateway.sim.kinds import WIRES
from gateway.sim.responses import Elapsed
from gateway.types import HTTPScope, Receive, Scope, Send

#: The simulator's vLLM answers: their bytes, SSE prefix and content types.
_WIRE = WIRES["vllm"]
_JSON = [(b"content-type", _WIRE.json_type)]
_NO_TIME = Elapsed(0.0, 0.0)


def _field(scope: HTTPScope, name: bytes) -> bytes | None:
    """The value of the request's first header called ``name``, None without one."""
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


def _header(scope: HTTPScope, name: bytes, default: float) -> float:
    """A pacing header's milliseconds, in seconds (``default`` when absent or not a number)."""
    value = _field(scope, name)
    try:
        return default if value is None else float(value) / 1000
    except ValueError:
        return default


def _declared(scope: HTTPScope) -> int:
    """The request's Content-Length, -1 for none."""
    value = _field(scope, b"content-length")
    return -1 if value is None else int(value)


async def _body(receive: Receive, declared: int) -> bytes:
    """The body, up to its declared length as the gateway reads it (``gateway.body``): Granian's
    empty last message is not asked for, which would be one more hand-over the gateway skips."""
    parts = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b""
        part = message.get("body", b"")
        parts.append(part)
        size += len(part)
        if not message.get("more_body", False) or size == declared:
            return b"".join(parts)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers like the simulator's vLLM kind with ``--fast``, paced per request by its headers."""
    if scope["type"] == "lifespan":  # the collector as the gateway sets it (``gateway.heap``)
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                heap.settle()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                heap.restore()
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200, "headers": _JSON})
        await send({"type": "http.response.body", "body": b'{"status":"ok"}', "more_body": False})
        return
    request = orjson.loads(await _body(receive, _declared(scope)) or b"{}")
    model = str(request.get("model", "floor"))
    tokens = int(request.get("max_tokens") or 16)
    if not request.get("stream"):
        body = _WIRE.answers.chat_completion(model, tokens, "length", 1, 1, _NO_TIME)
        headers = [*_JSON, (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return
    ttft = _header(scope, b"x-sim-ttft-ms", 0.0)
    itl = _header(scope, b"x-sim-itl-ms", 0.0)
    frames = _WIRE.answers.frames(sse_data=_WIRE.sse_data, chat=True, model=model, n=1)
    usage = bool((request.get("stream_options") or {}).get("include_usage"))
    await send({"type": "http.response.start", "status": 200, "headers": _WIRE.stream_headers})
    ticker = Ticker()
    await ticker.wait(ttft)
    role = frames.role(0)
    if role is not None:
        await send({"type": "http.response.body", "body": role, "more_body": True})
    for i in range(tokens):
        if i:
            await ticker.wait(itl)
        await send({"type": "http.response.body", "body": frames.token(i, 0), "more_body": True})
    for event in frames.ends(0, "length", 1, tokens, usage, _NO_TIME):
        await send({"type": "http.response.body", "body": event, "more_body": True})
    trailer = frames.trailer(1, tokens, usage)
    if trailer is not None:
        await send({"type": "http.response.body", "body": trailer, "more_body": True})
    await send({"type": "http.response.body", "body": frames.done, "more_body": False})


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.config import load_settings
    from gateway.server import run_granian

    p = argparse.ArgumentParser(prog="bench.floor", description=__doc__)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    # The gateway's own Granian settings, from the environment the bench gives the gateway too
    # (``bench.runner.server_env``); the backend is never used.
    overrides = {
        "BACKEND_KIND": "vllm",
        "BACKEND_BASE_URL": "http://127.0.0.1:9/v1",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(args.port),
    }
    run_granian(load_settings(dotenv=None, overrides=overrides), target="bench.floor:app", factory=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
