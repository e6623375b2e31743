"""The ASGI application: lifespan (one upstream pool per worker), dispatch, error boundary.

A forwarded request passes through named stages, in this order (each its own module):

1. the client-header pass (``client_headers``): what to check, what to forward;
2. authentication (``auth``), the same for local and forwarded routes;
3. per-key limits (``limits``);
4. the capability check, as soon as the backend is known (``topology``);
5. the body read, bounded in size and time (``body``);
6. model routing (``topology``) and the payload peek (``payload``; ``prefix`` also reads the prompt's
   block hashes for a backend that balances by prefix), then admission (``balance``);
7. forwarding (``forward``): the upstream pool (``pool``) and the relay (``relay``).

The local endpoints live in ``local``, the disconnect watcher in ``watch``, building a worker's
backends in ``worker``, the collector's settings while it serves in ``heap``. Run it with
``gateway serve`` or ``granian --interface asgi --factory gateway.app:create_app``."""

from __future__ import annotations

import asyncio
import logging
import os
import traceback
from collections.abc import Coroutine
from pathlib import Path
from time import perf_counter
from typing import Any
from urllib.parse import quote

import httpcore
import msgspec

from gateway import engine_load, errors, heap, local, probe, routes, tracing
from gateway.access_log import AccessLog
from gateway.auth import KeyRing
from gateway.balance import Backend
from gateway.body import BodyReader, ClientGone
from gateway.client_headers import HeaderPass, given_request_id
from gateway.config import Settings, load_settings
from gateway.drain import CONTROL_ENV, WorkerDrain
from gateway.errors import GatewayError
from gateway.exchange import Exchange, Outgoing
from gateway.forward import Forwarder
from gateway.limits import KeyLimits, Limiter, SharedLimiter, load_keys
from gateway.logs import setup_logging
from gateway.metrics import Metrics
from gateway.netio import AsyncioBackend
from gateway.payload import peek, with_model
from gateway.prefix import block_hashes, peek_prompt
from gateway.relay import Timeouts, send_error
from gateway.stateful import Stateful
from gateway.topology import Topology, check_capability, upstream_path
from gateway.types import HTTPScope, Receive, Scope, Send
from gateway.usage import Usage, read_usage
from gateway.worker import build_topology, declared_backends

log = logging.getLogger("gateway")

#: Methods whose requests carry no body unless the client sends one (no Content-Length: 0 added).
_BODILESS = ("GET", "HEAD", "DELETE", "OPTIONS")


class Gateway:
    """The gateway's ASGI callable. Everything per-worker is created in the lifespan."""

    def __init__(self, settings: Settings, *, network: httpcore.AsyncNetworkBackend | None = None) -> None:
        self.settings = s = settings
        self.keys = KeyRing(s.client_keys, load_keys(s.gateway_keys_file) if s.gateway_keys_file else None)
        self.limiter = Limiter()
        self.shared: SharedLimiter | None = None
        self.network = network or AsyncioBackend()
        self.read_body = BodyReader(s.gateway_max_body_bytes, s.gateway_client_body_timeout, self._running_loop)
        read = s.gateway_read_timeout
        timeouts = Timeouts(
            s.gateway_header_timeout or read, s.gateway_ttft_timeout or read, s.gateway_idle_timeout or read
        )
        self.forwarder = Forwarder(timeouts, s.gateway_retries, s.gateway_total_timeout or None, self._running_loop)
        sticky = s.gateway_sticky
        self.sticky_key = sticky == "key"
        header = sticky.removeprefix("header:")
        self.header_pass = HeaderPass(header.lower().encode() if header != sticky else None)
        #: The declared backends (a backends file, or the settings' one), checked at load time;
        #: their pools are built per worker, at startup.
        self._declared = declared_backends(s)
        specs = self._declared[0]
        self.topology = Topology([], any_model=None)
        self.metrics = Metrics(specs[0].name) if s.gateway_metrics else None
        self.access_log = AccessLog(s.gateway_log_format) if s.gateway_access_log else None
        #: Model names that may appear as a metric label; any other is counted as "other".
        self.known_models: set[str] = {s.model_name} if s.model_name else set()
        for spec in specs:
            self.known_models.update(spec.models, spec.aliases)
        self.stateful = Stateful()  # where stored Responses live
        #: Traces: asked for by the OTEL_* variables (checked here: a mistake stops start-up), built
        #: per worker at startup (after the fork). None: the request path reads this, nothing more.
        self._trace = tracing.check(os.environ)
        self.tracing: tracing.Tracing | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.inflight = 0
        self.draining = False
        self._drain: WorkerDrain | None = None
        #: The loop serving the requests (asyncio.get_running_loop() costs a getpid() on 3.11).
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def backends(self) -> list[Backend]:
        return self.topology.backends

    # -- ASGI entry ---------------------------------------------------------------------------

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Coroutine[Any, Any, None]:
        """The coroutine serving ``scope``, returned, not awaited: one frame fewer per resumption."""
        if scope["type"] == "http":
            return self._http(scope, receive, send)
        if scope["type"] == "lifespan":
            return self._lifespan(receive, send)
        return _not_served()  # websocket: returning without accepting closes it

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception:  # the worker must exit, never serve without its pool
                    log.exception("gateway worker failed to start")
                    await send({"type": "lifespan.startup.failed", "message": traceback.format_exc()})
                    return
                heap.settle()  # the collector kept off the relay while the worker serves
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                heap.restore()
                try:
                    await self.shutdown()
                except Exception:
                    log.exception("gateway worker failed to shut down cleanly")
                    await send({"type": "lifespan.shutdown.failed", "message": traceback.format_exc()})
                    return
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def startup(self) -> None:
        s = self.settings
        setup_logging(s.gateway_log_level, s.gateway_log_format)
        self.topology = topology = build_topology(*self._declared, s, self.network)
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
        if self._trace:
            self.tracing = traces = tracing.Tracing()
            self.forwarder.on_replica = traces.wrap(self.forwarder.on_replica)
            if self.metrics is not None:
                self.metrics.state.drops = traces.drops
        self._loop = loop = asyncio.get_running_loop()
        if topology.replicas > 1:
            probe_timeout = min(s.gateway_connect_timeout, 5.0)
            for backend in topology.backends:
                self._tasks.append(
                    loop.create_task(backend.probe_forever(self.network, s.gateway_probe_interval, probe_timeout))
                )
                self._read_engine_load(backend, loop, probe_timeout)
        if self.metrics is not None:
            self.metrics.state.backends = topology.backends
            self.metrics.start(loop)
            if topology.any_model is not None:
                self._tasks.append(loop.create_task(self._refresh_models(topology.any_model)))

    def _read_engine_load(self, backend: Backend, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        """Poll the replicas' engine load, where it can matter: a backend balancing by prefix over
        several replicas, of a kind whose engine reports its load, with an interval set."""
        names = backend.profile.engine_metrics
        interval = self.settings.gateway_engine_metrics_interval
        if backend.affinity is None or names is None or interval <= 0:
            return
        poll = engine_load.poll_forever(backend, names, self.network, interval, min(timeout, interval))
        self._tasks.append(loop.create_task(poll))

    async def _refresh_models(self, backend: Backend) -> None:
        """Keep the set of model names the backend lists (bounds the metrics' model label)."""
        replica = backend.replicas[0]
        while True:
            listed = await probe.list_models(
                replica.target,
                ssl_context=replica.ssl_context,
                network=self.network,
                timeout=self.settings.gateway_connect_timeout,
            )
            if listed:
                self.known_models = listed | self.topology.known_models()
            await asyncio.sleep(60 if listed else 5)

    def _begin_drain(self) -> None:
        self.draining = True

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.forwarder.watch.close()
        if self.tracing is not None:  # what is queued goes out, for at most 2 s, off the loop
            await asyncio.get_running_loop().run_in_executor(None, self.tracing.shutdown)
        if self._drain is not None:
            await self._drain.stop()
        if self.metrics is not None:
            self.metrics.stop()  # writes out what the last interval added up
        if self.access_log is not None:
            self.access_log.flush()
        if self.metrics is not None and self.metrics.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
        for backend in self.topology.backends:
            for replica in backend.replicas:
                await replica.pool.aclose()
        if self.shared is not None:
            await self.shared.aclose()

    # -- HTTP ---------------------------------------------------------------------------------

    async def _http(self, scope: HTTPScope, receive: Receive, send: Send) -> None:
        """Dispatch one request, and the error boundary: every exception ends here."""
        t_start = perf_counter()
        traces = self.tracing
        path: str = scope["path"]
        method: str = scope["method"]
        route = routes.resolve(path)
        ex = Exchange(t_start) if traces is None else traces.exchange(scope, route, t_start)
        model = "none"
        self.inflight += 1
        try:
            if route is None:
                raise errors.not_found(path)
            ex.surface = route.surface
            if route.methods is not None and method not in route.methods:
                raise errors.method_not_allowed(method, path, route.methods)
            if method in routes.REFUSED_METHODS:
                raise errors.method_not_allowed(method, path, ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"))
            if not route.upstream or (route is routes.MODELS and self.topology.answers_models):
                ex.request_id = given_request_id(scope["headers"])
                await local.answer(self, route, method, scope, send, ex)
            elif self.draining:
                raise errors.draining()
            else:
                model = await self._forward(route, scope, receive, send, ex)
        except GatewayError as err:
            if not ex.request_id:
                ex.request_id = given_request_id(scope["headers"])
            await send_error(send, err, ex)
        except ClientGone:
            ex.end = "client_gone"
        except Exception:  # a bug in the gateway: never a backend error, never a hang
            log.exception("internal error on %s %s (request %s)", method, path, ex.request_id.decode() or "-")
            ex.end = "internal_error"
            ex.active = False
            if not ex.started:
                if not ex.request_id:
                    ex.request_id = given_request_id(scope["headers"])
                await send_error(send, errors.internal_error(), ex)
            # Started: returning without the final body message makes the server drop the
            # connection, so the client sees a failed transfer rather than a cut answer.
        finally:
            self.inflight -= 1
            usage = self._record(ex, route, method, path, model)
            if traces is not None:
                traces.finish(ex, route.name if route is not None else "unknown", method, path, usage)

    def _record(self, ex: Exchange, route: routes.Route | None, method: str, path: str, model: str) -> Usage | None:
        """A finished request's metrics, token spend and access log line; returns its usage."""
        ex.t_end = perf_counter()
        if ex.end == "client_gone" and not ex.started:
            ex.status = 499  # nginx's "client closed request": nothing was answered
        name = route.name if route is not None else "unknown"
        # Once, for the metrics and the tokens-per-minute limit alike.
        usage = read_usage(ex, route.usage if route is not None else "none")
        if self.metrics is not None:
            self.metrics.record(ex, name, model, usage)
        if ex.limits is not None and ex.limits.tpm is not None:
            (self.shared or self.limiter).spend(ex.limits, 0 if usage is None else usage.total)
        if self.access_log is not None:
            self.access_log.write(ex, method, path, name, model)
        return usage

    async def _forward(self, route: routes.Route, scope: HTTPScope, receive: Receive, send: Send, ex: Exchange) -> str:
        """The forwarding stages, in order; returns the model label for metrics and logs."""
        client = self.header_pass(scope["headers"])
        ex.request_id = client.request_id
        identity = self.keys.authenticate(client.authorization, client.auth_count, client.api_key)
        sticky = client.sticky
        if identity is not None:
            ex.key_id, limits = identity
            if limits is not None:
                await self._admit_limits(limits, ex)
            if self.sticky_key:
                sticky = ex.key_id.encode()
        backend = self.topology.known_before_body(route)
        body = await self.read_body(receive, client.content_length)
        model, blocks, pinned = "none", None, None
        previous: bytes | msgspec.Raw = b""
        if route.json_body:
            backend, body, model, blocks, previous = self._route_by_model(route, body, backend, ex)
        assert backend is not None
        if route.stateful is not None:
            backend, pinned = self.stateful.route(route, scope["path"], previous, backend)
        forwarded = client.forwarded
        if body or scope["method"] not in _BODILESS:
            forwarded.append((b"content-length", str(len(body)).encode()))
        ex.backend = backend.name
        if route.default_path is not None:  # the kind's own spelling of the route
            path, rooted = upstream_path(backend, route), True
        else:
            path, rooted = scope.get("raw_path") or b"", False
            if not path.startswith(b"/v1/"):
                # The client percent-encoded the /v1 prefix itself: forward the decoded path, re-encoded.
                path = quote(scope["path"], safe="/:@!$&'()*+,;=-._~").encode()
        out = Outgoing(
            backend,
            scope["method"].encode(),
            path.split(b"?", 1)[0],
            scope.get("query_string", b""),
            forwarded,
            body,
            sticky,
            blocks,
        )
        if rooted or pinned is not None:
            out.rooted, out.pinned = rooted, pinned
        await backend.admit(self.draining)
        # The gauge counts requests bound for a backend, not probes and scrapes.
        gauge = self.metrics.child(self.metrics.in_flight, backend.name) if self.metrics is not None else None
        if gauge is not None:
            gauge.inc()
        try:
            await self.forwarder.run(out, receive, send, ex)
        finally:
            backend.leave()
            if gauge is not None:
                gauge.dec()
        if route.stateful is not None:
            self.stateful.remember(route, scope, ex, backend)
        return model

    async def _admit_limits(self, limits: KeyLimits, ex: Exchange) -> None:
        """The limits stage: 429 when the key is over its limits, else the headers to add."""
        ex.limits = limits
        shared = self.shared
        metrics = self.metrics
        try:
            ex.extra_headers = await shared.admit(limits) if shared is not None else self.limiter.admit(limits)
        except GatewayError as err:
            if metrics is not None:
                metrics.child(metrics.limit_decisions, "rejected" if err.status == 429 else "unavailable").inc()
            raise
        if metrics is not None:
            metrics.child(metrics.limit_decisions, "allowed").inc()

    def _route_by_model(
        self, route: routes.Route, body: bytes, known: Backend | None, ex: Exchange
    ) -> tuple[Backend, bytes, str, list[int] | None, msgspec.Raw]:
        """The routing stage for JSON bodies, from one decode: the backend for the body's model
        (its capability checked, unless it was ``known`` and checked before the body), the body to
        send (the model rewritten for an alias or filled in), the model's metrics label, the
        prompt's block hashes when the backend balances by prefix (None otherwise: no work added)
        and the raw ``previous_response_id`` (``stateful``). The model sent and whether a stream
        was asked for go to ``ex`` (traces)."""
        # The prompt read in the same decode, only where it may serve.
        peeked, prompt = peek_prompt(body) if self.topology.by_prefix else (peek(body), b"")
        backend, served = self.topology.route_model(peeked.model)
        if backend is not known:
            check_capability(backend, route.capability)
        if served is not None and served != peeked.model:  # an alias, or the MODEL_NAME fill-in
            body = with_model(body, served)
        if peeked.wants_tools:
            check_capability(backend, "tools")
        name = served or peeked.model
        ex.request_model, ex.stream = name, peeked.stream is True
        blocks = block_hashes(prompt, name or "") if backend.affinity is not None else None
        label = (name if name in self.known_models else "other") if name else "none"
        return backend, body, label, blocks, peeked.previous_response_id

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        return loop if loop is not None and loop.is_running() else asyncio.get_running_loop()


async def _not_served() -> None:  # a websocket
    return


def create_app() -> Gateway:
    """Factory for Granian (``--factory gateway.app:create_app``): settings from the environment."""
    return Gateway(load_settings())
