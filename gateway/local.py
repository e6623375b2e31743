"""The endpoints the gateway answers itself: /health, /ready, /metrics and, when the topology
has a model table (``Topology.answers_models``), /v1/models."""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from gateway import errors, probe, routes
from gateway.auth import authorization_of
from gateway.errors import JSON_HEADERS
from gateway.exchange import Exchange
from gateway.types import HTTPScope, Send

if TYPE_CHECKING:
    from gateway.app import Gateway

_HEALTH_BODY = b'{"status":"ok"}'


async def answer(app: Gateway, route: routes.Route, method: str, scope: HTTPScope, send: Send, ex: Exchange) -> None:
    """Answer one local route (the request id is already set)."""
    headers = JSON_HEADERS
    if route is routes.HEALTH:
        status, body = 200, _HEALTH_BODY
    elif route is routes.METRICS:
        if app.metrics is None:
            raise errors.not_found("/metrics")
        if app.settings.gateway_metrics_require_key:
            _authenticate(app, scope, ex)
        body, content_type = app.metrics.exposition()
        status, headers = 200, [(b"content-type", content_type)]
    elif route is routes.MODELS:  # the backends file's models: the gateway answers itself
        _authenticate(app, scope, ex)
        status, body = 200, app.topology.model_list()
    else:
        status, body = await ready(app)
    ex.status = status
    ex.nbytes = len(body)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body, "more_body": False})


def _authenticate(app: Gateway, scope: HTTPScope, ex: Exchange) -> None:
    identity = app.keys.authenticate(*authorization_of(scope["headers"]))
    if identity is not None:
        ex.key_id = identity[0]


async def ready(app: Gateway) -> tuple[int, bytes]:
    """One backend with one replica is probed on each call and reported alone; otherwise every
    backend and replica is reported with its state from the latest background probes."""
    topology = app.topology
    first = topology.first
    if app.draining:
        return 503, orjson.dumps({"status": "draining", "kind": first.profile.kind})
    single = first.single
    if single is not None and len(topology.backends) == 1:
        status, info = await probe.probe(
            single.target,
            first.profile.health_path,
            first.profile.kind,
            ssl_context=single.ssl_context,
            network=app.network,
            timeout=min(app.settings.gateway_connect_timeout, 5.0),
        )
        return status, orjson.dumps(info)
    reports = [b.report() for b in topology.backends]
    ok = all(r["usable_replicas"] for r in reports)
    return (200 if ok else 503), orjson.dumps({"status": "ready" if ok else "degraded", "backends": reports})
