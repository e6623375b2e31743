"""A static table from path to route: one dict lookup per request, no pattern scan."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import msgspec


class Route(msgspec.Struct, frozen=True, kw_only=True):
    """What the gateway does for one path."""

    name: str
    #: Allowed methods; None means any (forwarded unchanged).
    methods: tuple[str, ...] | None
    #: Capability the route needs from the backend (see profiles.CAPABILITIES).
    capability: str | None = None
    #: A JSON body the gateway peeks at (model fill-in, tools, JSON check).
    json_body: bool = False
    #: Whether the route is forwarded to the backend (else the gateway answers itself).
    upstream: bool = True


HEALTH = Route(name="health", methods=("GET", "HEAD"), upstream=False)
READY = Route(name="ready", methods=("GET", "HEAD"), upstream=False)
METRICS = Route(name="metrics", methods=("GET",), upstream=False)
CHAT = Route(name="chat", methods=("POST",), capability="chat", json_body=True)
COMPLETIONS = Route(name="completions", methods=("POST",), capability="completions", json_body=True)
EMBEDDINGS = Route(name="embeddings", methods=("POST",), capability="embeddings", json_body=True)
MODELS = Route(name="models", methods=("GET",))
RESPONSES = Route(name="responses", methods=None, capability="responses")
#: Any other /v1/... path: forwarded unchanged, body and content-type included.
PASSTHROUGH = Route(name="v1", methods=None)

TABLE: Mapping[str, Route] = MappingProxyType(
    {
        "/health": HEALTH,
        "/ready": READY,
        "/metrics": METRICS,
        "/v1/chat/completions": CHAT,
        "/v1/completions": COMPLETIONS,
        "/v1/embeddings": EMBEDDINGS,
        "/v1/models": MODELS,
        "/v1/responses": RESPONSES,
    }
)


#: Never forwarded: TRACE would echo the backend key the gateway adds; CONNECT opens a tunnel.
REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})


def resolve(path: str) -> Route | None:
    """The route for a decoded request path, or None (404).

    Dot segments are refused rather than forwarded: ``/v1/../load`` must not reach a backend's
    admin routes outside ``/v1``.
    """
    route = TABLE.get(path)
    if route is not None:
        return route
    if not path.startswith("/v1/") or ("/." in path and _has_dot_segment(path)):
        return None
    if path.startswith("/v1/responses/"):
        return RESPONSES
    return PASSTHROUGH


def _has_dot_segment(path: str) -> bool:
    return any(seg in (".", "..") for seg in path.split("/"))
