"""``/ready``: probe the backend's own health path, on a fresh connection each call."""

from __future__ import annotations

import ssl
import time
from typing import Any, Literal

import httpcore
import msgspec

from gateway import __version__
from gateway.pool import open_connection
from gateway.target import Target

#: What a health probe found: up, loading its model (503), or down (refused, timed out, other 5xx).
ReplicaState = Literal["ready", "loading", "unreachable"]
#: Marks the gateway's own model listing (refreshed in the background for the metrics' labels).
MODELS_USER_AGENT = f"gateway/{__version__} (model list)".encode()
#: A health answer larger than this is not read further: the status is what matters.
_MAX_BODY = 64 * 1024


async def probe(
    target: Target,
    health_path: str,
    kind: str,
    *,
    ssl_context: ssl.SSLContext | None,
    network: httpcore.AsyncNetworkBackend,
    timeout: float,  # noqa: ASYNC109 - applied per connect/read, not as a cancel scope
) -> tuple[int, dict[str, Any]]:
    """The gateway's readiness (200 or 503) and what to say about it.

    ``ready``: the backend answered below 500 (a 401 from a protected path still proves it is
    up); ``loading``: it answered 503 (llama.cpp's "Loading model", LocalAI's "starting");
    ``unreachable``: refused, timed out, or another 5xx.
    """
    started = time.perf_counter()
    backend_status: int | None = None
    detail: str | None = None
    try:
        headers = [(b"host", target.host_header), (b"accept", b"*/*"), *target.auth_headers]
        backend_status, _ = await get(
            target, target.root_path + health_path.encode(), headers, ssl_context, network, timeout, _MAX_BODY
        )
    except httpcore.TimeoutException:
        detail = f"no answer within {timeout:g} s"
    except (httpcore.NetworkError, httpcore.ProtocolError, OSError) as exc:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    latency_ms = round((time.perf_counter() - started) * 1000, 3)
    status: ReplicaState
    if backend_status is None:
        status = "unreachable"
    elif backend_status == 503:
        status = "loading"
    elif backend_status >= 500:
        status = "unreachable"
        detail = f"the backend answered {backend_status}"
    else:
        status = "ready"
    body: dict[str, Any] = {
        "status": status,
        "kind": kind,
        "latency_ms": latency_ms,
        "backend_status": backend_status,
    }
    if detail:
        body["detail"] = detail
    return (200 if status == "ready" else 503), body


async def get(
    target: Target,
    path: bytes,
    headers: list[tuple[bytes, bytes]],
    ssl_context: ssl.SSLContext | None,
    network: httpcore.AsyncNetworkBackend,
    timeout: float,  # noqa: ASYNC109 - applied per connect/read/write, not as a cancel scope
    limit: int,
) -> tuple[int, bytes | None]:
    """GET ``path`` on a fresh connection, closed afterwards: the status, and the body (None
    when it is longer than ``limit``: not read further). httpcore's exceptions on failure."""
    conn = await open_connection(target, ssl_context, timeout, None, network)
    try:
        status, _ = await conn.exchange(b"GET", path, headers, b"", timeout)
        parts: list[bytes] = []
        seen = 0
        try:
            async for chunk in conn.iter_body(timeout, timeout):
                parts.append(chunk)
                seen += len(chunk)
                if seen > limit:
                    return status, None
        finally:
            await conn.close_response()
    finally:
        await conn.aclose()
    return status, b"".join(parts)


class _Model(msgspec.Struct):
    id: str


class _ModelList(msgspec.Struct):
    data: list[_Model]


_models_decoder = msgspec.json.Decoder(_ModelList)


async def list_models(
    target: Target,
    *,
    ssl_context: ssl.SSLContext | None,
    network: httpcore.AsyncNetworkBackend,
    timeout: float,  # noqa: ASYNC109 - applied per connect/read, not as a cancel scope
) -> set[str]:
    """The model ids the backend lists at ``/v1/models``; empty when it cannot be asked."""
    try:
        headers = [
            (b"host", target.host_header),
            (b"accept", b"application/json"),
            (b"user-agent", MODELS_USER_AGENT),
            *target.auth_headers,
        ]
        status, body = await get(
            target, target.base_path + b"/models", headers, ssl_context, network, timeout, 4 * 1024 * 1024
        )
        if status != 200 or body is None:
            return set()
        return {m.id for m in _models_decoder.decode(body).data}
    except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError, OSError, msgspec.MsgspecError):
        return set()
