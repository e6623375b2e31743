"""The ASGI application: lifespan (one upstream pool per worker), dispatch, error boundary.

A request flows one way: route -> auth -> capability check -> body (bounded, peeked) ->
upstream pool -> relay. Run it with ``gateway serve``, or with Granian directly:
``granian --interface asgi --factory gateway.app:create_app``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import httpcore

from gateway import errors, probe, routes
from gateway.auth import KeyRing
from gateway.config import Settings, load_settings
from gateway.drain import CONTROL_ENV, WorkerDrain
from gateway.errors import GatewayError
from gateway.payload import peek, with_model
from gateway.profiles import Support
from gateway.relay import Exchange, fail, forward, send_error
from gateway.types import Receive, Scope, Send
from gateway.upstream import DROP_REQUEST_HEADERS, Pool, Target, make_ssl_context, map_error

log = logging.getLogger("gateway")

_HEALTH_BODY = b'{"status":"ok"}'
_JSON = [(b"content-type", b"application/json")]


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class Gateway:
    """The gateway's ASGI callable. Everything per-worker is created in the lifespan."""

    def __init__(self, settings: Settings, *, network: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.settings = settings
        self.profile = settings.profile
        self.capabilities = settings.capabilities
        self.keys = KeyRing(settings.client_keys)
        self.target = Target(settings)
        self.ssl_context = make_ssl_context(settings)
        self.network = network or httpcore.AnyIOBackend()
        self.max_body = settings.gateway_max_body_bytes
        self.total_timeout = settings.gateway_total_timeout or None
        self.extensions: dict[str, Any] = {
            "timeout": {
                "connect": settings.gateway_connect_timeout,
                "read": settings.gateway_read_timeout,
                "write": settings.gateway_read_timeout,
                "pool": settings.gateway_pool_timeout,
            }
        }
        self.static_headers = [(b"host", self.target.host_header), *self.target.auth_headers]
        self.pool: Pool | None = None
        self.inflight = 0
        self.draining = False
        self._drain: WorkerDrain | None = None

    # -- ASGI entry ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            self.inflight += 1
            try:
                await self._http(scope, receive, send)
            finally:
                self.inflight -= 1
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        # websocket: not served; returning without accepting closes it.

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:  # the worker must exit, never serve without its pool
                    log.error("gateway worker failed to start: %s", exc)
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        s = self.settings
        self.pool = Pool(
            self.target,
            size=s.gateway_pool_size,
            connect_timeout=s.gateway_connect_timeout,
            pool_timeout=s.gateway_pool_timeout,
            keepalive=s.gateway_keepalive,
            ssl_context=self.ssl_context,
            network=self.network,
        )
        control = os.environ.get(CONTROL_ENV)
        if control:
            self._drain = WorkerDrain(Path(control), lambda: self.inflight, self._begin_drain)
            self._drain.start()

    def _begin_drain(self) -> None:
        self.draining = True

    async def shutdown(self) -> None:
        if self._drain is not None:
            await self._drain.stop()
        if self.pool is not None:
            await self.pool.aclose()

    # -- HTTP ---------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        route = routes.resolve(path)
        try:
            if route is None:
                raise errors.not_found(path)
            method: str = scope["method"]
            if route.methods is not None and method not in route.methods:
                raise errors.method_not_allowed(method, path, route.methods)
            if not route.upstream:
                await self._local(route, method, send)
                return
            if self.draining:
                raise errors.draining()
            await self._upstream(route, scope, receive, send)
        except GatewayError as err:
            await send_error(send, err)
        except _ClientGone:
            return

    async def _local(self, route: routes.Route, method: str, send: Send) -> None:
        if route is routes.HEALTH:
            status, body = 200, _HEALTH_BODY
        elif self.draining:
            status, body = 503, b'{"status":"draining","kind":"%s"}' % self.profile.kind.encode()
        else:
            status, body = await probe.probe(
                self.target,
                self.profile.health_path,
                self.profile.kind,
                ssl_context=self.ssl_context,
                network=self.network,
                timeout=min(self.settings.gateway_connect_timeout, 5.0),
            )
        await send({"type": "http.response.start", "status": status, "headers": _JSON})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body, "more_body": False})

    async def _upstream(self, route: routes.Route, scope: Scope, receive: Receive, send: Send) -> None:
        # One pass over the client's headers: what we check, and what we forward.
        authorization: bytes | None = None
        auth_count = 0
        content_length: bytes | None = None
        forwarded = list(self.static_headers)
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
                auth_count += 1
            elif name == b"content-length":
                content_length = value
            if name not in DROP_REQUEST_HEADERS:
                forwarded.append((name, value))

        if self.keys.enabled and (auth_count != 1 or not self.keys.check(authorization)):
            raise errors.unauthorized()

        cap = route.capability
        if cap is not None and self.capabilities[cap] is Support.UNSUPPORTED:
            raise errors.not_supported(self.profile.display_name, cap)

        body = await self._read_body(receive, content_length)

        if route.json_body:
            peeked = peek(body)
            if peeked.wants_tools and self.capabilities["tools"] is Support.UNSUPPORTED:
                raise errors.not_supported(self.profile.display_name, "tools")
            if peeked.model is None and self.settings.model_name:
                body = with_model(body, self.settings.model_name)
        if body or scope["method"] not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            forwarded.append((b"content-length", str(len(body)).encode()))

        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        target = self.target.upstream_target(raw_path.split(b"?", 1)[0], scope.get("query_string", b""))
        await self._exchange(scope["method"].encode(), target, forwarded, body, receive, send)

    async def _read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        limit = self.max_body
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise errors.bad_request("Invalid Content-Length header.") from None
            if declared > limit:
                raise errors.too_large(limit)
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone
        body: bytes = message.get("body", b"")
        if not message.get("more_body", False):
            if len(body) > limit:
                raise errors.too_large(limit)
            return body
        parts = [body]
        size = len(body)
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise errors.too_large(limit)
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _exchange(
        self,
        method: bytes,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        receive: Receive,
        send: Send,
    ) -> None:
        """Forward with cancellation on client disconnect (and on the total timeout, if set)."""
        assert self.pool is not None, "lifespan startup did not run"
        ex = Exchange()
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        watcher = loop.create_task(_watch_disconnect(receive, ex, task))
        timer = loop.call_later(self.total_timeout, _expire, ex, task) if self.total_timeout else None
        try:
            await forward(self.pool, self.target, method, target, headers, body, self.extensions, send, ex)
        except asyncio.CancelledError:
            if ex.cancelled_by is None:
                raise
            task.uncancel()
            if ex.cancelled_by == "timeout":
                await fail(send, ex, errors.backend_timeout(f"the total timeout of {self.total_timeout:g} s passed"))
        except Exception as exc:  # mapped once, here, at the upstream boundary
            err = map_error(exc, ex.phase)
            if not isinstance(exc, GatewayError):
                log.warning("upstream %s failed while %s: %r", self.target.display, ex.phase, exc)
            await fail(send, ex, err)
        finally:
            ex.active = False
            watcher.cancel()
            if timer is not None:
                timer.cancel()


async def _watch_disconnect(receive: Receive, ex: Exchange, task: asyncio.Task[Any]) -> None:
    """Granian's send() does not fail when the client has gone: receive() is what tells."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            if ex.active:
                ex.cancelled_by = "disconnect"
                task.cancel()
            return


def _expire(ex: Exchange, task: asyncio.Task[Any]) -> None:
    if ex.active and ex.cancelled_by is None:
        ex.cancelled_by = "timeout"
        task.cancel()


def create_app() -> Gateway:
    """Factory for Granian (``--factory gateway.app:create_app``): settings from the environment."""
    return Gateway(load_settings())
