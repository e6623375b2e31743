"""The ASGI application: lifespan (one upstream pool per worker), dispatch, error boundary.

A request flows one way: route -> auth -> capability check -> body (bounded, peeked) ->
upstream pool -> relay. Run it with ``gateway serve``, or with Granian directly:
``granian --interface asgi --factory gateway.app:create_app``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from time import perf_counter
from typing import Any
from urllib.parse import quote

import httpcore
import orjson

from gateway import errors, probe, routes
from gateway.auth import KeyRing
from gateway.balance import Backend, Replica
from gateway.config import Settings, load_settings
from gateway.drain import CONTROL_ENV, WorkerDrain
from gateway.errors import GatewayError, error_class, map_error
from gateway.headers import DROP_REQUEST_HEADERS
from gateway.limits import Limiter, SharedLimiter, load_keys
from gateway.netio import AsyncioBackend
from gateway.observe import AccessLog, Metrics, request_id, setup_logging, tokens_used
from gateway.payload import peek, with_model
from gateway.pool import Pool
from gateway.profiles import PROFILES, Profile, Support, apply_overrides
from gateway.relay import Exchange, Timeouts, fail, forward, send_error
from gateway.routes_file import RoutesSpec, load_routes
from gateway.target import Target, make_ssl_context
from gateway.types import Receive, Scope, Send

log = logging.getLogger("gateway")

_HEALTH_BODY = b'{"status":"ok"}'


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class Gateway:
    """The gateway's ASGI callable. Everything per-worker is created in the lifespan."""

    def __init__(self, settings: Settings, *, network: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.settings = settings
        self.keys = KeyRing(
            settings.client_keys, load_keys(settings.gateway_keys_file) if settings.gateway_keys_file else None
        )
        self.limiter = Limiter()
        self.shared: SharedLimiter | None = None
        self.network = network or AsyncioBackend()
        self.max_body = settings.gateway_max_body_bytes
        self.body_timeout = settings.gateway_client_body_timeout
        self.total_timeout = settings.gateway_total_timeout or None
        read = settings.gateway_read_timeout
        self.timeouts = Timeouts(
            header=settings.gateway_header_timeout or read,
            first_token=settings.gateway_ttft_timeout or read,
            idle=settings.gateway_idle_timeout or read,
        )
        self.retries = settings.gateway_retries
        sticky = settings.gateway_sticky
        self.sticky_key = sticky == "key"
        self.sticky_header = sticky[len("header:") :].lower().encode() if sticky.startswith("header:") else None
        #: Request headers the forwarding loop looks at; every other one is forwarded as it is.
        self._noted = DROP_REQUEST_HEADERS | ({self.sticky_header} if self.sticky_header else set())
        #: With a routes file: the backends' specs and keys (the Backends are built at startup).
        self.routes_spec: RoutesSpec | None = None
        self.route_keys: dict[str, str] = {}
        if settings.gateway_routes:
            self.routes_spec, self.route_keys = load_routes(settings.gateway_routes)
        self.backends: list[Backend] = []
        #: Routing by model (routes file only): served model or alias -> (backend, model to send).
        self.by_model: dict[str, tuple[Backend, str]] = {}
        self.default: Backend | None = None
        label = self.routes_spec.backends[0].name if self.routes_spec else settings.profile.kind
        self.metrics = Metrics(label) if settings.gateway_metrics else None
        self.access_log = AccessLog(settings.gateway_log_format) if settings.gateway_access_log else None
        #: Model names that may appear as a metric label; any other is counted as "other".
        self.known_models: set[str] = {settings.model_name} if settings.model_name else set()
        if self.routes_spec is not None:
            for spec in self.routes_spec.backends:
                self.known_models.update(spec.models, spec.aliases)
        self._tasks: list[asyncio.Task[None]] = []
        self.inflight = 0
        self.draining = False
        self._drain: WorkerDrain | None = None
        #: The loop lifespan startup ran on, which serves the requests: asyncio.get_running_loop()
        #: costs a getpid() system call per call on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None
        self.watch = DisconnectWatch()

    @property
    def pool(self) -> Pool | None:
        """The first replica's pool (the only one in the common single-backend setup)."""
        return self.backends[0].replicas[0].pool if self.backends else None

    @property
    def routed(self) -> bool:
        return self.routes_spec is not None

    # -- ASGI entry ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
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
        setup_logging(s.gateway_log_level, s.gateway_log_format)
        if self.routes_spec is None:
            self.backends = [
                self._backend(s.profile.kind, s.profile, s.capabilities, s.base_urls, s.backend_api_key, None)
            ]
        else:
            for spec in self.routes_spec.backends:
                profile = PROFILES[spec.kind]
                backend = self._backend(
                    spec.name,
                    profile,
                    apply_overrides(profile.capabilities, spec.capabilities),
                    tuple(spec.urls),
                    self.route_keys.get(spec.name, ""),
                    spec.weights,
                    models=tuple(spec.models),
                    aliases=spec.aliases,
                )
                self.backends.append(backend)
                for model in spec.models:
                    self.by_model[model] = (backend, model)
                for alias, model in spec.aliases.items():
                    self.by_model[alias] = (backend, model)
        self.default = self.backends[0]
        if s.redis_url and s.gateway_keys_file:
            errors_metric = self.metrics.limit_store_errors if self.metrics is not None else None
            self.shared = SharedLimiter(
                s.redis_url,
                fail_closed=s.gateway_limits_fail_closed,
                local=self.limiter,
                on_failure=errors_metric.inc if errors_metric is not None else None,
            )
        control = os.environ.get(CONTROL_ENV)
        if control:
            self._drain = WorkerDrain(Path(control), lambda: self.inflight, self._begin_drain)
            self._drain.start()
        self._loop = loop = asyncio.get_running_loop()
        if self.routed or len(self.default.replicas) > 1:
            probe_timeout = min(s.gateway_connect_timeout, 5.0)
            for backend in self.backends:
                self._tasks.append(
                    loop.create_task(backend.probe_forever(self.network, s.gateway_probe_interval, probe_timeout))
                )
        if self.metrics is not None:
            self.metrics.start(loop)
        if self.metrics is not None and not self.routed:
            self._tasks.append(loop.create_task(self._refresh_models()))

    def _backend(
        self,
        name: str,
        profile: Profile,
        capabilities: Mapping[str, Support],
        urls: tuple[str, ...],
        key: str,
        weights: list[int] | None,
        *,
        models: tuple[str, ...] = (),
        aliases: Mapping[str, str] | None = None,
    ) -> Backend:
        s = self.settings
        replicas = []
        for i, url in enumerate(urls):
            target = Target(url, profile, key)
            ssl_context = make_ssl_context(s, url)
            pool = Pool(
                target,
                size=s.gateway_pool_size,
                connect_timeout=s.gateway_connect_timeout,
                pool_timeout=s.gateway_pool_timeout,
                keepalive=s.gateway_keepalive,
                ssl_context=ssl_context,
                network=self.network,
            )
            replicas.append(Replica(target, pool, ssl_context, weights[i] if weights else 1))
        return Backend(
            name,
            profile,
            capabilities,
            replicas,
            models=models,
            aliases=aliases,
            eject_after=s.gateway_eject_after,
            eject_seconds=s.gateway_eject_seconds,
            max_inflight=s.gateway_max_inflight,
            queue_size=s.gateway_queue_size,
            queue_timeout=s.gateway_queue_timeout,
        )

    async def _refresh_models(self) -> None:
        """Keep the set of model names the backend lists (bounds the metrics' model label)."""
        assert self.default is not None
        replica = self.default.replicas[0]
        while True:
            listed = await probe.list_models(
                replica.target,
                ssl_context=replica.ssl_context,
                network=self.network,
                timeout=self.settings.gateway_connect_timeout,
            )
            if listed:
                self.known_models = listed | ({self.settings.model_name} if self.settings.model_name else set())
            await asyncio.sleep(60 if listed else 5)

    def _begin_drain(self) -> None:
        self.draining = True

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.watch.close()
        if self._drain is not None:
            await self._drain.stop()
        if self.metrics is not None:
            self.metrics.stop()  # writes out what the last interval added up
        if self.access_log is not None:
            self.access_log.flush()
        if self.metrics is not None and self.metrics.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
        for backend in self.backends:
            for replica in backend.replicas:
                await replica.pool.aclose()
        if self.shared is not None:
            await self.shared.aclose()

    # -- HTTP ---------------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        ex = Exchange(perf_counter())
        path: str = scope["path"]
        method: str = scope["method"]
        route = routes.resolve(path)
        model = "none"
        self.inflight += 1
        metrics = self.metrics
        try:
            if route is None:
                raise errors.not_found(path)
            if route.methods is not None and method not in route.methods:
                raise errors.method_not_allowed(method, path, route.methods)
            if method in routes.REFUSED_METHODS:
                raise errors.method_not_allowed(method, path, ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"))
            if not route.upstream or (route is routes.MODELS and self.routed):
                ex.request_id = _request_id(scope)
                await self._local(route, method, scope, send, ex)
            elif self.draining:
                raise errors.draining()
            else:
                model = await self._upstream(route, scope, receive, send, ex)
        except GatewayError as err:
            if not ex.request_id:
                ex.request_id = _request_id(scope)
            await send_error(send, err, ex)
        except _ClientGone:
            ex.end = "client_gone"
        finally:
            self.inflight -= 1
            ex.t_end = perf_counter()
            if ex.end == "client_gone" and not ex.started:
                ex.status = 499  # nginx's "client closed request": nothing was answered
            name = route.name if route is not None else "unknown"
            if metrics is not None:
                metrics.record(ex, name, model)
            if ex.limits is not None and ex.limits.tpm is not None:
                (self.shared or self.limiter).spend(ex.limits, tokens_used(ex))
            if self.access_log is not None:
                self.access_log.write(ex, method, path, name, model)

    async def _local(self, route: routes.Route, method: str, scope: Scope, send: Send, ex: Exchange) -> None:
        headers = errors.JSON_HEADERS
        if route is routes.HEALTH:
            status, body = 200, _HEALTH_BODY
        elif route is routes.METRICS:
            if self.metrics is None:
                raise errors.not_found("/metrics")
            if self.settings.gateway_metrics_require_key:
                self._authenticate(scope["headers"], ex)
            body, content_type = self.metrics.exposition()
            status, headers = 200, [(b"content-type", content_type)]
        elif route is routes.MODELS:  # the routes file's models: the gateway answers itself
            self._authenticate(scope["headers"], ex)
            status, body = 200, self._model_list()
        else:
            status, body = await self._ready()
        ex.status = status
        ex.nbytes = len(body)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body, "more_body": False})

    async def _ready(self) -> tuple[int, bytes]:
        assert self.default is not None
        if self.draining:
            return 503, orjson.dumps({"status": "draining", "kind": self.default.profile.kind})
        single = self.default.single
        if not self.routed and single is not None:
            # One backend, one replica: probe it on each call.
            status, info = await probe.probe(
                single.target,
                self.default.profile.health_path,
                self.default.profile.kind,
                ssl_context=single.ssl_context,
                network=self.network,
                timeout=min(self.settings.gateway_connect_timeout, 5.0),
            )
            return status, orjson.dumps(info)
        reports = [b.report() for b in self.backends]
        ok = all(r["usable_replicas"] for r in reports)
        return (200 if ok else 503), orjson.dumps({"status": "ready" if ok else "degraded", "backends": reports})

    def _model_list(self) -> bytes:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": backend.name}
            for name, (backend, _) in self.by_model.items()
        ]
        return orjson.dumps({"object": "list", "data": data})

    def _authenticate(self, headers: list[tuple[bytes, bytes]], ex: Exchange) -> None:
        if not self.keys.enabled:
            return
        values = [v for n, v in headers if n == b"authorization"]
        key_id = self.keys.verify(values[0]) if len(values) == 1 else None
        if key_id is None:
            raise errors.unauthorized()
        ex.key_id = key_id

    async def _upstream(self, route: routes.Route, scope: Scope, receive: Receive, send: Send, ex: Exchange) -> str:
        """Forward one request; returns the model label for metrics and logs."""
        # One pass over the client's headers: what we check, and what we forward.
        authorization: bytes | None = None
        auth_count = 0
        content_length: bytes | None = None
        given_id: bytes | None = None
        sticky: bytes | None = None
        sticky_header = self.sticky_header
        connection: list[bytes] = []
        forwarded: list[tuple[bytes, bytes]] = []
        noted = self._noted
        for name, value in scope["headers"]:
            if name not in noted:
                forwarded.append((name, value))
                continue
            if name == b"authorization":
                authorization = value
                auth_count += 1
            elif name == b"content-length":
                content_length = value
            elif name == b"x-request-id":
                given_id = value
            elif name == sticky_header:
                sticky = value
                if name not in DROP_REQUEST_HEADERS:  # the only noted name that is forwarded
                    forwarded.append((name, value))
            elif name == b"connection":
                connection.append(value)
        if connection and connection != [b"keep-alive"]:  # what HTTP/1.1 clients send names nothing
            # Fields the client's Connection header names are hop-by-hop too (RFC 9110 7.6.1).
            listed = {t.strip().lower() for t in b",".join(connection).split(b",")} - {b"keep-alive", b"close", b""}
            if listed:
                forwarded = [(n, v) for n, v in forwarded if n not in listed]
        ex.request_id = rid = request_id(given_id)
        forwarded.append((b"x-request-id", rid))

        if self.keys.enabled:
            identity = self.keys.identify(authorization) if auth_count == 1 else None
            if identity is None:
                raise errors.unauthorized()
            ex.key_id, limits = identity
            if limits is not None:
                ex.limits = limits
                # 429 when over its limits
                shared = self.shared
                ex.extra_headers = await shared.admit(limits) if shared is not None else self.limiter.admit(limits)
            if self.sticky_key:
                sticky = ex.key_id.encode()

        backend = self.default
        assert backend is not None, "lifespan startup did not run"
        cap = route.capability
        if not self.routed and cap is not None and backend.capabilities[cap] is Support.UNSUPPORTED:
            raise errors.not_supported(backend.profile.display_name, cap)

        body = await self._read_body(receive, content_length)

        model = "none"
        if route.json_body:
            peeked = peek(body)
            name = peeked.model
            if self.routed:
                name = name or self.settings.model_name
                if not name:
                    raise errors.missing_model()
                found = self.by_model.get(name)
                if found is None:
                    raise errors.model_not_found(name)
                backend, served = found
                if cap is not None and backend.capabilities[cap] is Support.UNSUPPORTED:
                    raise errors.not_supported(backend.profile.display_name, cap)
                if served != peeked.model:  # an alias, or the MODEL_NAME fill-in
                    body = with_model(body, served)
                name = served
            elif name is None and self.settings.model_name:
                name = self.settings.model_name
                body = with_model(body, name)
            if peeked.wants_tools and backend.capabilities["tools"] is Support.UNSUPPORTED:
                raise errors.not_supported(backend.profile.display_name, "tools")
            if name:
                model = name if name in self.known_models else "other"
        if body or scope["method"] not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            forwarded.append((b"content-length", str(len(body)).encode()))

        ex.backend = backend.name
        raw_path: bytes = scope.get("raw_path") or b""
        if not raw_path.startswith(b"/v1/"):
            # The client percent-encoded the /v1 prefix itself: forward the decoded path, re-encoded.
            raw_path = quote(scope["path"], safe="/:@!$&'()*+,;=-._~").encode()
        await backend.admit(self.draining)
        # The gauge counts requests bound for a backend, not probes and scrapes.
        gauge = self.metrics.child(self.metrics.in_flight, backend.name) if self.metrics is not None else None
        if gauge is not None:
            gauge.inc()
        try:
            await self._exchange(
                backend,
                scope["method"].encode(),
                raw_path.split(b"?", 1)[0],
                scope.get("query_string", b""),
                forwarded,
                body,
                receive,
                send,
                ex,
                sticky,
            )
        finally:
            backend.leave()
            if gauge is not None:
                gauge.dec()
        return model

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        return loop if loop is not None and loop.is_running() else asyncio.get_running_loop()

    async def _read_body(self, receive: Receive, content_length: bytes | None) -> bytes:
        limit = self.max_body
        if content_length is not None:
            try:
                declared = int(content_length)
            except ValueError:
                raise errors.bad_request("Invalid Content-Length header.") from None
            if declared > limit:
                raise errors.too_large(limit)
        if not self.body_timeout:
            return await self._receive_body(receive, limit)
        # asyncio.timeout()'s semantics with one timer and no context object (~4 us a request):
        # the timer cancels the task; that cancellation, and only that one, becomes the 408.
        loop = self._running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        cancelling = task.cancelling()
        expired: list[bool] = []
        timer = loop.call_later(self.body_timeout, _body_expired, task, expired)
        try:
            return await self._receive_body(receive, limit)
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                raise errors.request_timeout(self.body_timeout) from None
            raise
        finally:
            timer.cancel()

    async def _receive_body(self, receive: Receive, limit: int) -> bytes:
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
        backend: Backend,
        method: bytes,
        path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        receive: Receive,
        send: Send,
        ex: Exchange,
        sticky: bytes | None = None,
    ) -> None:
        """Forward with cancellation on client disconnect (and on the total timeout, if set)."""
        loop = self._running_loop()
        task = asyncio.current_task(loop)
        assert task is not None
        watch = self.watch
        watch.add(ex, receive, task, loop)
        timer = loop.call_later(self.total_timeout, _expire, ex, task) if self.total_timeout else None
        try:
            await forward(backend, method, path, query, headers, body, self.timeouts, self.retries, send, ex, sticky)
        except asyncio.CancelledError:
            if ex.cancelled_by is None:
                raise
            task.uncancel()
            if ex.cancelled_by == "timeout":
                ex.end, ex.error_class = "timeout", "timeout"
                await fail(send, ex, errors.backend_timeout(f"GATEWAY_TOTAL_TIMEOUT ({self.total_timeout:g} s) passed"))
            else:
                ex.end = "client_gone"
        except Exception as exc:  # mapped once, here, at the upstream boundary
            err = map_error(exc, ex.phase)
            if not isinstance(exc, GatewayError):
                ex.error_class = error_class(exc)
                ex.end = "timeout" if ex.error_class == "timeout" else "upstream_error"
                log.warning("upstream %s failed waiting for %s: %r", backend.name, ex.phase, exc)
            await fail(send, ex, err)
        finally:
            ex.active = False
            watch.discard(ex)
            if timer is not None:
                timer.cancel()


def _request_id(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            return request_id(value)
    return request_id(None)


#: An exchange still running this long (up to twice as long) gets its disconnect watcher.
WATCH_AFTER = 0.025


class DisconnectWatch:
    """Arms the disconnect watcher only for exchanges that outlive one tick of ``WATCH_AFTER``.

    Most non-streamed answers take a few milliseconds: watching them would cost a second
    ``receive()`` each (about 7 us with Granian) for a disconnect that could at most cancel the
    last millisecond of their work. An exchange that is still running at the second tick after it
    began (25 to 50 ms) is watched as before; a client that left before then is noticed at that
    tick, because the server's ``receive()`` answers ``http.disconnect`` for a disconnect already
    past.
    Per request this costs a dict insert and pop; the tick runs only while exchanges wait.
    """

    __slots__ = ("_young", "_old", "_tasks", "_timer", "_loop")

    def __init__(self) -> None:
        #: Exchanges begun since the last tick, and those begun the tick before, with what they
        #: need to be watched: the request's ``receive`` and its task.
        self._young: dict[Exchange, tuple[Receive, asyncio.Task[Any]]] = {}
        self._old: dict[Exchange, tuple[Receive, asyncio.Task[Any]]] = {}
        #: Watcher tasks (servers whose ``receive()`` is a coroutine), cancelled when the exchange ends.
        self._tasks: dict[Exchange, asyncio.Task[Any]] = {}
        self._timer: asyncio.TimerHandle | None = None
        #: The loop the tick runs on: the one serving the requests.
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, ex: Exchange, receive: Receive, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._young[ex] = (receive, task)
        if self._timer is None or self._loop is not loop:  # (a loop gone with its timer: tests)
            self._loop = loop
            self._timer = loop.call_later(WATCH_AFTER, self._tick)

    def discard(self, ex: Exchange) -> None:
        """The exchange ended: forget it, and stop its watcher task if it has one."""
        if self._young.pop(ex, None) is None and self._old.pop(ex, None) is None and self._tasks:
            watcher = self._tasks.pop(ex, None)
            if watcher is not None:
                watcher.cancel()

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        due, self._old, self._young = self._old, self._young, {}
        for ex, (receive, task) in due.items():
            watcher = _watch_disconnect(receive, ex, task, loop)
            if watcher is not None:
                self._tasks[ex] = watcher
        self._timer = loop.call_later(WATCH_AFTER, self._tick) if self._old else None

    def close(self) -> None:
        """Stop the tick (shutdown); exchanges not yet watched stay unwatched."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _watch_disconnect(
    receive: Receive, ex: Exchange, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop
) -> asyncio.Task[Any] | None:
    """Cancel ``task`` when the client disconnects (Granian's send() does not fail then).

    Granian's ``receive()`` returns a future-like object: a done-callback on it watches for the
    disconnect without a task of its own. A server whose ``receive()`` is a coroutine gets it
    wrapped in a task (returned, to be cancelled when the exchange ends). Once the body has been
    read, the next message can only be ``http.disconnect``.
    """
    pending: Any = receive()
    watcher = None if hasattr(pending, "add_done_callback") else loop.create_task(pending)

    def on_message(fut: Any) -> None:
        if fut.cancelled():
            return
        try:
            message = fut.result()
        except BaseException:  # noqa: BLE001 - the server closed the channel: the client is gone
            message = {"type": "http.disconnect"}
        if message["type"] == "http.disconnect" and ex.active:
            ex.cancelled_by = "disconnect"
            task.cancel()

    (watcher or pending).add_done_callback(on_message)
    return watcher


def _body_expired(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def _expire(ex: Exchange, task: asyncio.Task[Any]) -> None:
    if ex.active and ex.cancelled_by is None:
        ex.cancelled_by = "timeout"
        task.cancel()


def create_app() -> Gateway:
    """Factory for Granian (``--factory gateway.app:create_app``): settings from the environment."""
    return Gateway(load_settings())
